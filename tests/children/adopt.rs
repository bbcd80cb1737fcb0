//! `sockbroker adopt` and `serve --adopt-orphans` against real processes:
//! a HAProxy that bound its port itself, a LISTEN_FDS daemon, UDP and UNIX
//! sockets, a multibinder, a broker killed with SIGKILL; each moved under the
//! broker under a loopback load with no failed request and no new inode. And
//! the refusals: a non-root caller, a missing pid, a process without sockets,
//! a key held by another socket.

use crate::common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::daemons::*;
use common::supervisor::{descendants, Supervisor};
use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const HAPROXY: &str = "/usr/sbin/haproxy";

fn echo_py() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/daemons/echo.py")
}

/// `sockbroker ARGS` against `broker`, waited for (bounded).
fn sockbroker(broker: &Broker, args: &[&str]) -> Output {
    run_cli(&broker.control, None, args)
}

#[track_caller]
fn assert_success(out: &Output, what: &str) {
    assert!(out.status.success(), "{what}: {}", output_text(out));
}

/// `sockbroker adopt ARGS`, which must succeed; (key, inode) per line.
#[track_caller]
fn adopt(broker: &Broker, args: &[&str]) -> Vec<(String, u64)> {
    let mut all = vec!["adopt"];
    all.extend_from_slice(args);
    let out = sockbroker(broker, &all);
    assert_success(&out, "adopt");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (key, rest) = l.split_once(": ").unwrap();
            let inode = rest.rsplit("inode ").next().unwrap().trim_end_matches(')').parse().unwrap();
            (key.to_string(), inode)
        })
        .collect()
}

/// The inode of the socket bound at `key` now, from the kernel's tables.
fn bound_inode(key: &str) -> Option<u64> {
    sockbroker::adopt::bound_sockets().into_iter().find(|(k, _)| k.to_string() == key).map(|(_, i)| i)
}

/// Whether process `pid` has socket `inode` open.
fn holds(pid: i32, inode: u64) -> bool {
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.flatten().any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_str() == Some(&want))))
        .unwrap_or(false)
}

/// Two request loops on `addr` that record each answer's `gen=N`.
fn generations_load(addr: SocketAddr) -> (RequestLoop, Arc<Mutex<BTreeSet<u64>>>) {
    let gens = Arc::new(Mutex::new(BTreeSet::new()));
    let seen = gens.clone();
    let load = RequestLoop::start(2, move || {
        let body = http_get(addr)?;
        seen.lock().unwrap().extend(generation(&body));
        Ok(())
    });
    (load, gens)
}

/// The end of a move, once the old server is gone: 200 more requests, none
/// of all failed, and `key` is still the very socket (`inode`) the old
/// server bound.
#[track_caller]
fn assert_moved(load: RequestLoop, key: &str, inode: u64, what: &str) {
    load.wait_for(200);
    let (ok, failed, errors) = load.finish();
    eprintln!("{what} moved under the broker: {ok} requests, {failed} failed");
    assert_eq!(failed, 0, "{what}: {failed} failed requests out of {}: {errors:?}", ok + failed);
    assert_eq!(bound_inode(key), Some(inode), "the listening socket never changed");
}

/// Waits (bounded) until `child` exits.
#[track_caller]
fn wait_exit(child: &mut Child, what: &str) {
    assert!(wait_timeout(child, Duration::from_secs(30)).is_some(), "{what} did not exit within 30s");
}

/// An HTTP frontend answering every request itself, bound at `bind`.
fn haproxy_config(bind: &str) -> String {
    format!(
        "global\n  maxconn 4000\ndefaults\n  mode http\n  timeout client 10s\n  timeout server 10s\n  timeout connect 2s\n\
         frontend web\n  bind {bind}\n  http-request return status 200 content-type text/plain string ok\n"
    )
}

/// A server that binds 127.0.0.1:PORT itself, as `spawn(port)` starts it,
/// serving HTTP; retried on another port when it exits (the port was taken
/// meanwhile).
fn serving_on_a_free_port(what: &str, mut spawn: impl FnMut(u16) -> Child) -> (Reaped, u16) {
    for _ in 0..10 {
        let port = free_port();
        let mut child = Reaped(spawn(port));
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if child.0.try_wait().unwrap().is_some() {
                break; // the port was taken: try another
            }
            if http_ok(addr).is_ok() {
                return (child, port);
            }
            assert!(Instant::now() < deadline, "{what} did not serve on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("no free port for {what} after 10 tries");
}

/// A plain HAProxy in master-worker mode (`-W -db`, as Debian's unit runs
/// it with `-Ws`) that binds 127.0.0.1:PORT itself, serving.
fn plain_haproxy(dir: &Path) -> (Reaped, u16) {
    serving_on_a_free_port("HAProxy", |port| {
        let cfg = dir.join("plain.cfg");
        std::fs::write(&cfg, haproxy_config(&format!("127.0.0.1:{port}"))).unwrap();
        let log = std::fs::File::create(dir.join("plain-haproxy.log")).unwrap();
        Command::new(HAPROXY)
            .args(["-W", "-db", "-f", cfg.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    })
}

/// docs/adopt.md, "A HAProxy that binds its ports itself": adopt, `haproxy
/// run` from an ERB template, soft-stop the old HAProxy.
#[test]
fn haproxy_that_bound_its_port_moves_under_the_broker_with_no_failed_request() {
    let broker = Broker::start("adopt-haproxy");
    let (mut old, port) = plain_haproxy(&broker.dir);
    let old_pid = old.0.id() as i32;
    let key = format!("tcp://127.0.0.1:{port}");
    let inode = bound_inode(&key).expect("HAProxy's socket is in the kernel's table");
    // HAProxy 2.6's master does not keep the listeners: its worker has them.
    let worker = descendants(old_pid).into_iter().find(|p| holds(*p, inode)).expect("a worker holds the listener");
    assert!(!holds(old_pid, inode));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let load = RequestLoop::start(2, move || http_ok(addr));
    load.wait_for(50);

    // 1. The broker copies HAProxy's socket: the same kernel socket. Asked of
    // the master, adopt says there is nothing to take.
    let out = sockbroker(&broker, &["adopt", "--pid", &old_pid.to_string()]);
    assert!(output_text(&out).contains("no listening socket"), "{}", output_text(&out));
    assert_eq!(adopt(&broker, &["--pid", &worker.to_string()]), vec![(key.clone(), inode)]);
    assert!(holds(broker.pid(), inode), "the broker holds the very socket HAProxy bound");
    let list = String::from_utf8_lossy(&sockbroker(&broker, &["list"]).stdout).into_owned();
    assert!(list.lines().any(|l| l.contains(&key) && l.contains("adopted")), "{list}");
    load.wait_for(50);

    // 2. HAProxy under the broker, from a multibinder ERB template.
    let template = broker.dir.join("web.cfg.erb");
    std::fs::write(&template, haproxy_config(&format!("<%= bind_tcp('127.0.0.1', {port}) %>"))).unwrap();
    let run = Supervisor::haproxy_run(&broker)
        .args(&["--ready-timeout", "20s"])
        .command(&[HAPROXY, "-f", template.to_str().unwrap()])
        .start();
    let new_pids = descendants(run.child.id() as i32);
    assert!(new_pids.iter().any(|p| holds(*p, inode)), "the new HAProxy serves the adopted socket");
    load.wait_for(50);

    // 3. Soft-stop the old HAProxy (its master, which stops its worker).
    kill(Pid::from_raw(old_pid), Signal::SIGUSR1).unwrap();
    wait_exit(&mut old.0, "the old HAProxy");
    assert_moved(load, &key, inode, "HAProxy");
}

/// docs/adopt.md, "A daemon with LISTEN_FDS": a daemon started by
/// systemd-socket-activate (it alone holds its socket) moved under `run`.
#[test]
fn listen_fds_daemon_moves_under_run_with_no_failed_request() {
    let broker = Broker::start("adopt-run");
    let (mut old, port) = serving_on_a_free_port("the daemon", |port| {
        Command::new("systemd-socket-activate")
            .args(["-l", &format!("127.0.0.1:{port}"), "python3", listen_http().to_str().unwrap()])
            .env_remove("NOTIFY_SOCKET")
            .env("SOCKBROKER_GENERATION", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    });
    let key = format!("tcp://127.0.0.1:{port}");
    let inode = bound_inode(&key).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (load, gens) = generations_load(addr);
    load.wait_for(50);

    adopt(&broker, &["--pid", &old.0.id().to_string(), "--socket", &format!("http={key}")]);
    let _run = Supervisor::run(&broker)
        .args(&["--socket", "http"])
        .command(&["python3", listen_http().to_str().unwrap()])
        .start();
    load.wait_for(50);
    kill(Pid::from_raw(old.0.id() as i32), Signal::SIGTERM).unwrap();
    wait_exit(&mut old.0, "the old daemon");
    assert_moved(load, &key, inode, "the LISTEN_FDS daemon");
    let gens = gens.lock().unwrap();
    assert!(gens.contains(&0) && gens.contains(&1), "both the old and the new daemon answered: {gens:?}");
}

/// An nginx configuration answering "gen=GEN" on 127.0.0.1:PORT.
fn nginx_config(dir: &Path, name: &str, port: u16, gen: u32) -> PathBuf {
    let path = dir.join(format!("{name}.conf"));
    let d = dir.display();
    std::fs::write(
        &path,
        format!(
            "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/{name}.pid;\nerror_log {d}/{name}-error.log;\n\
             events {{ worker_connections 512; }}\n\
             http {{\n  access_log off;\n  server {{\n    listen 127.0.0.1:{port};\n\
                 location / {{ return 200 \"gen={gen}\\n\"; }}\n  }}\n}}\n"
        ),
    )
    .unwrap();
    path
}

/// docs/adopt.md, "nginx": adopt the listeners of an nginx that bound them
/// itself, start the new generation under `run` (nginx takes inherited
/// sockets from its NGINX variable), then stop the old one gracefully.
#[test]
fn nginx_moves_under_the_broker_with_no_failed_request() {
    const NGINX: &str = "/usr/sbin/nginx";
    let broker = Broker::start("adopt-nginx");
    // Reaped at once: a failing test leaves no nginx behind.
    let (mut old, port) = serving_on_a_free_port("nginx", |port| {
        let conf = nginx_config(&broker.dir, "old", port, 0);
        Command::new(NGINX)
            .args(["-e", &format!("{}/old-error.log", broker.dir.display()), "-p"])
            .arg(&broker.dir)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    });
    let old_pid = old.0.id() as i32;
    let key = format!("tcp://127.0.0.1:{port}");
    let inode = bound_inode(&key).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (load, gens) = generations_load(addr);
    load.wait_for(50);

    // The master holds the listeners (its workers share them).
    assert_eq!(adopt(&broker, &["--pid", &old_pid.to_string()]), vec![(key.clone(), inode)]);
    let conf = nginx_config(&broker.dir, "new", port, 1);
    let pidfile = broker.dir.join("new.pid");
    let error_log = format!("{}/new-error.log", broker.dir.display());
    let _run = Supervisor::run(&broker)
        .name("nginx-run")
        .args(&["--ready", &format!("pidfile:{}", pidfile.display()), "--retire-signal", "QUIT", "--socket", &key])
        .command(&[
            "env",
            "NGINX=3;",
            NGINX,
            "-e",
            &error_log,
            "-p",
            broker.dir.to_str().unwrap(),
            "-c",
            conf.to_str().unwrap(),
        ])
        .start();
    load.wait_for(50);
    // nginx's graceful stop.
    kill(Pid::from_raw(old_pid), Signal::SIGQUIT).unwrap();
    wait_exit(&mut old.0, "the old nginx");
    assert_moved(load, &key, inode, "nginx");
    let gens = gens.lock().unwrap();
    assert!(gens.contains(&0) && gens.contains(&1), "the old and the new nginx answered: {gens:?}");
}

/// A UDP request: one datagram out, the echo back within 5 s.
fn udp_echo(addr: SocketAddr) -> Result<u32, String> {
    let s = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.send_to(b"ping\n", addr).map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf).map_err(|e| format!("no echo: {e}"))?;
    echo_pid(&buf[..n])
}

/// A UNIX stream request on a new connection.
fn unix_echo(path: &Path) -> Result<u32, String> {
    let mut s = UnixStream::connect(path).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"ping\n").map_err(|e| format!("write: {e}"))?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).map_err(|e| format!("read: {e}"))?;
    echo_pid(&reply)
}

fn echo_pid(reply: &[u8]) -> Result<u32, String> {
    let text = String::from_utf8_lossy(reply);
    text.strip_prefix("pid=")
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .filter(|_| text.ends_with("ping\n"))
        .ok_or_else(|| format!("bad reply {text:?}"))
}

/// UDP, UNIX stream and UNIX datagram sockets a daemon bound itself, moved
/// to a new daemon under `run`: every request answered, same inodes.
#[test]
fn udp_and_unix_sockets_move_with_no_lost_request() {
    let broker = Broker::start("adopt-udp-unix");
    let port = free_port();
    let udp = format!("udp://127.0.0.1:{port}");
    let path = broker.dir.join("echo.sock");
    let unix = format!("unix:{}", path.display());
    let dgram = format!("unix-dgram:{}", broker.dir.join("echo.dgram").display());
    let notify = Notify::bind(&broker.dir, "old-notify.sock");
    let mut old = Reaped(
        Command::new("python3")
            .arg(echo_py())
            .args(["--bind", &udp, "--bind", &unix, "--bind", &dgram])
            .env("NOTIFY_SOCKET", &notify.path)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    notify.wait_line(&mut old.0, "READY=1", Duration::from_secs(20));
    let old_pid = old.0.id();
    let inodes: Vec<u64> = [&udp, &unix, &dgram].iter().map(|k| bound_inode(k).unwrap()).collect();

    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let pids = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let (p1, p2) = (pids.clone(), pids.clone());
    let udp_load = RequestLoop::start(1, move || {
        udp_echo(addr).map(|p| {
            p1.lock().unwrap().insert(p);
        })
    });
    let unix_path = path.clone();
    let unix_load = RequestLoop::start(1, move || {
        unix_echo(&unix_path).map(|p| {
            p2.lock().unwrap().insert(p);
        })
    });
    udp_load.wait_for(20);
    unix_load.wait_for(20);

    let adopted = adopt(&broker, &["--pid", &old_pid.to_string()]);
    let mut keys: Vec<&str> = adopted.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort();
    let mut want = vec![udp.as_str(), unix.as_str(), dgram.as_str()];
    want.sort();
    assert_eq!(keys, want);
    for (k, i) in [&udp, &unix, &dgram].iter().zip(&inodes) {
        assert!(adopted.contains(&(k.to_string(), *i)), "{k}: {adopted:?}");
    }
    let _run = Supervisor::run(&broker)
        .args(&["--socket", &udp, "--socket", &unix, "--socket", &dgram])
        .command(&["python3", echo_py().to_str().unwrap()])
        .start();
    udp_load.wait_for(20);
    kill(Pid::from_raw(old_pid as i32), Signal::SIGTERM).unwrap();
    wait_exit(&mut old.0, "the old daemon");
    udp_load.wait_for(50);
    unix_load.wait_for(50);
    for (load, what) in [(udp_load, "UDP"), (unix_load, "UNIX")] {
        let (ok, failed, errors) = load.finish();
        eprintln!("{what} moved: {ok} requests, {failed} failed");
        assert_eq!(failed, 0, "{what}: {failed} failed of {}: {errors:?}", ok + failed);
    }
    let pids = pids.lock().unwrap();
    assert!(pids.len() >= 2 && pids.contains(&old_pid), "old and new daemon answered: {pids:?}");
    for (k, i) in [&udp, &unix, &dgram].iter().zip(&inodes) {
        assert_eq!(bound_inode(k), Some(*i), "{k}");
    }
}

/// docs/adopt.md, "Recovery": a broker killed with SIGKILL outside systemd
/// (no fd store) while a daemon holds its declared sockets comes back with
/// `--adopt-orphans` holding the same sockets; without it, it cannot start.
#[test]
fn a_killed_broker_takes_its_declared_sockets_back_from_the_daemon() {
    let (mut broker, port) = Broker::builder("adopt-orphans").start_on_free_port(|port| {
        format!(
            "[[socket]]\nname = \"web\"\nlisten = \"tcp://127.0.0.1:{port}\"\n\n\
             [[socket]]\nname = \"dns\"\nlisten = \"udp://127.0.0.1:{port}\"\n\n\
             [[socket]]\nname = \"app\"\nlisten = \"unix:/tmp/sbt-orphan-{}-{port}.sock\"\n",
            std::process::id()
        )
    });
    let path = format!("/tmp/sbt-orphan-{}-{port}.sock", std::process::id());
    let keys = [format!("tcp://127.0.0.1:{port}"), format!("udp://127.0.0.1:{port}"), format!("unix:{path}")];
    let inodes: Vec<u64> = keys.iter().map(|k| bound_inode(k).unwrap()).collect();
    for i in &inodes {
        assert!(holds(broker.pid(), *i));
    }
    // A daemon holding all three (the echo server, through `exec`).
    let notify = Notify::bind(&broker.dir, "daemon-notify.sock");
    let mut daemon = Reaped(
        Command::new(BIN)
            .args(["exec", "--socket", "web", "--socket", "dns", "--socket", "app", "--", "python3"])
            .arg(echo_py())
            .env("SOCKBROKER_SOCKET", &broker.control)
            .env("NOTIFY_SOCKET", &notify.path)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    notify.wait_line(&mut daemon.0, "READY=1", Duration::from_secs(20));
    let daemon_pid = daemon.0.id() as i32;

    broker.child.kill().unwrap();
    broker.child.wait().unwrap();
    let config = broker.config_path();
    let args = ["--config", config.to_str().unwrap()];
    // Without --adopt-orphans: the declared sockets are in use.
    let refused = Broker::builder("restart").beside(&broker).args(&args).try_start().err();
    let log = refused.expect("a broker without --adopt-orphans cannot open sockets a daemon holds");
    assert!(log.contains("in use") || log.contains("already listening"), "{log}");

    let mut with = args.to_vec();
    with.push("--adopt-orphans");
    let back = Broker::builder("restart").beside(&broker).args(&with).start();
    for (k, i) in keys.iter().zip(&inodes) {
        assert!(holds(back.pid(), *i), "{k}: the restarted broker holds the same socket (inode {i})");
        assert!(holds(daemon_pid, *i));
        assert_eq!(bound_inode(k), Some(*i));
    }
    let log = back.log_text();
    assert!(log.contains(&format!("adopted from pid {daemon_pid}")), "{log}");
    // The daemon still serves, and a client gets the same socket by name.
    assert!(udp_echo(format!("127.0.0.1:{port}").parse().unwrap()).is_ok());
    let fd = back.client().bind_name("web").unwrap();
    assert_eq!(inode(fd.as_fd()), inodes[0]);
    let list = String::from_utf8_lossy(&sockbroker(&back, &["list"]).stdout).into_owned();
    assert!(list.lines().filter(|l| l.contains("adopted")).count() == 3, "{list}");
    let _ = std::fs::remove_file(&path);
}

/// A minimal multibinder per /work/shared/multibinder-compat.md (the Ruby gem
/// cannot be installed here): binds on `bind`, same socket for the same key.
const MULTIBINDER_PY: &str = r#"
import json, os, socket, array, sys
path = sys.argv[1]
held = {}
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(16)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            req = json.loads(data)
            p = req["params"][0]
            key = ("tcp", p["address"], p["port"])
            if key not in held:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((p["address"], p["port"]))
                s.listen(p.get("backlog", 1000))
                held[key] = s
            reply = json.dumps({"jsonrpc": "2.0", "id": req["id"], "result": True}).encode()
            conn.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [held[key].fileno()]))])
"#;

/// multibinder-haproxy-erb's part, as small as it gets: each
/// `bind_tcp('ADDRESS', PORT)` of the template asked of multibinder with its
/// client's request, rendered as `fd@N`, then HAProxy exec'd with the
/// descriptors open.
const MULTIBINDER_ERB_PY: &str = r#"
import array, json, os, re, socket, sys
mb, template, rendered, *haproxy = sys.argv[1:]
def bind(m):
    c = socket.socket(socket.AF_UNIX)
    c.connect(mb)
    req = {"jsonrpc": "2.0", "method": "bind", "id": "1", "params": [{"address": m.group(1), "port": int(m.group(2)), "backlog": 10240}]}
    c.sendmsg([json.dumps(req).encode()])
    _, anc, _, _ = c.recvmsg(4096, socket.CMSG_SPACE(4))
    fd = array.array("i", anc[0][2])[0]
    os.set_inheritable(fd, True)
    return f"fd@{fd}"
text = re.sub(r"<%=\s*bind_tcp\(\s*'([^']+)'\s*,\s*(\d+)\s*\)\s*%>", bind, open(template).read())
open(rendered, "w").write(text)
os.execvp(haproxy[0], haproxy + ["-f", rendered])
"#;

/// docs/adopt.md, "A multibinder host": HAProxy serving sockets from a
/// running multibinder moves under the broker. The sockets of the
/// templates' bind_tcp calls are copied out of multibinder through its own
/// protocol, `haproxy run` starts on them, the old HAProxy soft-stops and
/// multibinder exits: 0 failed requests, the same inodes.
#[test]
fn a_multibinder_host_moves_to_the_broker_with_no_failed_request() {
    let broker = Broker::start("adopt-mb");
    let mb_sock = broker.dir.join("multibinder.sock");
    let mut mb = Reaped(
        Command::new("python3")
            .args(["-c", MULTIBINDER_PY, mb_sock.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = [0u8; 6];
    mb.0.stdout.as_mut().unwrap().read_exact(&mut line).unwrap();
    assert_eq!(&line, b"ready\n");
    let ports = [free_port(), free_port()];
    let template = broker.dir.join("site.cfg.erb");
    std::fs::write(
        &template,
        haproxy_config(&format!(
            "<%= bind_tcp('127.0.0.1', {}) %>\n  bind <%= bind_tcp('127.0.0.1', {}) %>",
            ports[0], ports[1]
        )),
    )
    .unwrap();
    // The multibinder-era HAProxy, its sockets from multibinder.
    let mut old = Reaped(
        Command::new("python3")
            .args(["-c", MULTIBINDER_ERB_PY, mb_sock.to_str().unwrap(), template.to_str().unwrap()])
            .arg(broker.dir.join("site-mb.cfg"))
            .args([HAPROXY, "-W", "-db"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addrs: Vec<SocketAddr> = ports.iter().map(|p| format!("127.0.0.1:{p}").parse().unwrap()).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while addrs.iter().any(|a| http_ok(*a).is_err()) {
        assert!(old.0.try_wait().unwrap().is_none(), "the multibinder HAProxy exited");
        assert!(Instant::now() < deadline, "the multibinder HAProxy did not serve");
        std::thread::sleep(Duration::from_millis(20));
    }
    let keys: Vec<String> = ports.iter().map(|p| format!("tcp://127.0.0.1:{p}")).collect();
    let inodes: Vec<u64> = keys.iter().map(|k| bound_inode(k).unwrap()).collect();
    for i in &inodes {
        assert!(holds(mb.0.id() as i32, *i), "multibinder holds its sockets");
    }
    let loads: Vec<RequestLoop> = addrs
        .iter()
        .map(|a| {
            let a = *a;
            RequestLoop::start(1, move || http_ok(a))
        })
        .collect();
    for l in &loads {
        l.wait_for(30);
    }

    // With the old services' MULTIBINDER_SOCK as the only hint, "the
    // broker" would be multibinder itself: refused, naming the fix.
    let out = Command::new(BIN)
        .args(["adopt", "--multibinder", mb_sock.to_str().unwrap(), "--from-templates", template.to_str().unwrap()])
        .env_remove("SOCKBROKER_SOCKET")
        .env("MULTIBINDER_SOCK", &mb_sock)
        .output_within(COMMAND_TIMEOUT)
        .unwrap();
    let text = output_text(&out);
    assert!(!out.status.success() && text.contains("set SOCKBROKER_SOCKET"), "{text}");

    // 1. Copy the sockets out of multibinder, through its protocol.
    let adopted =
        adopt(&broker, &["--multibinder", mb_sock.to_str().unwrap(), "--from-templates", template.to_str().unwrap()]);
    let want: Vec<(String, u64)> = keys.iter().cloned().zip(inodes.iter().copied()).collect();
    assert_eq!(adopted, want);
    // 2. HAProxy under the broker, from the same template.
    let _run = Supervisor::haproxy_run(&broker)
        .args(&["--ready-timeout", "20s"])
        .command(&[HAPROXY, "-f", template.to_str().unwrap()])
        .start();
    for l in &loads {
        l.wait_for(30);
    }
    // 3. The old HAProxy soft-stops; multibinder exits.
    kill(Pid::from_raw(old.0.id() as i32), Signal::SIGUSR1).unwrap();
    wait_exit(&mut old.0, "the multibinder HAProxy");
    mb.0.kill().unwrap();
    let _ = mb.0.wait();
    for l in &loads {
        l.wait_for(100);
    }
    for (l, k) in loads.into_iter().zip(&keys) {
        let (ok, failed, errors) = l.finish();
        eprintln!("{k} moved from multibinder: {ok} requests, {failed} failed");
        assert_eq!(failed, 0, "{k}: {failed} failed of {}: {errors:?}", ok + failed);
    }
    for (k, i) in keys.iter().zip(&inodes) {
        assert_eq!(bound_inode(k), Some(*i), "{k}: the listening socket never changed");
        assert!(holds(broker.pid(), *i));
    }
}

/// The user tests run the refused caller as, made with useradd.
fn test_user() -> &'static str {
    const USER: &str = "sbadopt";
    system_user(USER);
    USER
}

#[test]
fn refusals_name_the_problem() {
    let broker = Broker::start("adopt-refuse");
    // Let the unprivileged user reach the control socket: the broker decides.
    std::fs::set_permissions(&broker.dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&broker.control, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let user = test_user();

    // A non-root caller, copying from its own process (which the kernel
    // allows): the broker refuses, and holds nothing.
    let port = free_port();
    let notify = Notify::bind(&broker.dir, "user-notify.sock");
    std::fs::set_permissions(&notify.path, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let mut own = Reaped(
        Command::new("setpriv")
            // Debian's python3: the test runner's may sit in root's home.
            .args([&format!("--reuid={user}"), &format!("--regid={user}"), "--clear-groups", "/usr/bin/python3"])
            .arg(echo_py())
            .args(["--bind", &format!("udp://127.0.0.1:{port}")])
            .env("NOTIFY_SOCKET", &notify.path)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    notify.wait_line(&mut own.0, "READY=1", Duration::from_secs(20));
    let pid = own.0.id().to_string();
    let setpriv = [&format!("--reuid={user}")[..], &format!("--regid={user}"), "--clear-groups"];
    let out = run_cli(&broker.control, Some(&setpriv), &["adopt", "--pid", &pid]);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("adopt") && text.contains("root"), "names the rule: {text}");
    assert!(text.contains("10003"), "access denied: {text}");
    assert!(!String::from_utf8_lossy(&sockbroker(&broker, &["list"]).stdout).contains(&format!(":{port}")));
    let sent = bound_inode(&format!("udp://127.0.0.1:{port}")).unwrap();
    assert!(!holds(broker.pid(), sent), "the descriptors it sent were closed, not kept");

    // The same user against a root process: the kernel refuses, and says why.
    let out = run_cli(&broker.control, Some(&setpriv), &["adopt", "--pid", &broker.pid().to_string()]);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("not permitted") && text.contains("CAP_SYS_PTRACE"), "{text}");

    // No such pid: one above the kernel's pid_max can never be in use.
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    let gone_pid = pid_max + 1;
    let out = sockbroker(&broker, &["adopt", "--pid", &gone_pid.to_string()]);
    assert!(!out.status.success());
    assert!(output_text(&out).contains(&format!("pid {gone_pid}: no such process")), "{}", output_text(&out));

    // A process without a listening socket (its only socket is a client's).
    let mut sleeper = Reaped(
        Command::new("python3")
            .args(["-c", "import socket,sys,time\nu=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nu.connect(('127.0.0.1',9))\nprint('ok',flush=True)\ntime.sleep(60)"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut ok = [0u8; 3];
    sleeper.0.stdout.as_mut().unwrap().read_exact(&mut ok).unwrap();
    let out = sockbroker(&broker, &["adopt", "--pid", &sleeper.0.id().to_string()]);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("no listening socket") && text.contains("connected datagram"), "{text}");

    // A --socket the process does not hold.
    let out = sockbroker(&broker, &["adopt", "--pid", &pid, "--socket", "tcp://127.0.0.1:9"]);
    let text = output_text(&out);
    assert!(
        !out.status.success() && text.contains("tcp://127.0.0.1:9: pid") && text.contains("holds no such socket"),
        "{text}"
    );

    // A conflicting key: the broker holds a UNIX path; the file is replaced
    // by another process's socket (same key, another inode).
    let path = broker.dir.join("app.sock");
    let spec = format!("unix:{}", path.display());
    let held = broker.client().bind(&spec.parse().unwrap()).unwrap();
    std::fs::remove_file(&path).unwrap();
    let notify2 = Notify::bind(&broker.dir, "other-notify.sock");
    let mut other = Reaped(
        Command::new("python3")
            .arg(echo_py())
            .args(["--bind", &spec])
            .env("NOTIFY_SOCKET", &notify2.path)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    notify2.wait_line(&mut other.0, "READY=1", Duration::from_secs(20));
    let out = sockbroker(&broker, &["adopt", "--pid", &other.0.id().to_string()]);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains(&spec) && text.contains("different socket") && text.contains("10014"), "{text}");
    let again = broker.client().bind(&spec.parse().unwrap()).unwrap();
    assert_eq!(inode(again.as_fd()), inode(held.as_fd()), "the held socket was not swapped");
}

/// The method itself, spoken raw: descriptors that are not sockets, or not
/// listening, are refused; the count must match.
#[test]
fn the_adopt_method_checks_every_descriptor() {
    use sockbroker::client::Client;
    let mut broker = Broker::start("adopt-method");
    let mut c = Client::connect(&broker.control).unwrap();
    let file = std::fs::File::open("/dev/null").unwrap();
    let params = serde_json::json!({"sockets": [{"from": "test"}]});
    let err = c.call_with_fds("adopt", params.clone(), &[file.as_fd()]).unwrap_err();
    assert_eq!(err.code(), Some(10014), "{err}");
    assert!(err.to_string().contains("not a socket"), "{err}");
    let unbound = std::net::TcpStream::connect(broker_free_listener()).unwrap();
    let err = c.call_with_fds("adopt", params.clone(), &[unbound.as_fd()]).unwrap_err();
    assert!(err.to_string().contains("not listening"), "{err}");
    let err = c.call_with_fds("adopt", serde_json::json!({"sockets": [{}, {}]}), &[file.as_fd()]).unwrap_err();
    assert_eq!(err.code(), Some(-32602), "{err}");
    // Nothing was held, and the connection still serves.
    let (_, _) = c.call("status", serde_json::Value::Null).unwrap();
    let list = String::from_utf8_lossy(&sockbroker(&broker, &["list", "--json"]).stdout).into_owned();
    assert_eq!(list.trim(), "[]");
    // A listening socket passed directly: adopted, then the same again is a no-op.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (r, _) = c.call_with_fds("adopt", params.clone(), &[l.as_fd()]).unwrap();
    assert_eq!(r[0]["outcome"], "adopted");
    assert_eq!(r[0]["inode"], inode(l.as_fd()));
    let (r, _) = c.call_with_fds("adopt", params, &[l.as_fd()]).unwrap();
    assert_eq!(r[0]["outcome"], "already-held");
    // Every kind: an abstract seqpacket listener and a bound UNIX datagram
    // socket, in one request, one of them named.
    let seq: sockbroker::spec::SocketSpec =
        format!("unix-seqpacket:@sbt-adopt-{}", std::process::id()).parse().unwrap();
    let dgram: sockbroker::spec::SocketSpec =
        format!("unix-dgram:{}", broker.dir.join("d.sock").display()).parse().unwrap();
    let (a, b) = (sockbroker::socket::open(&seq).unwrap(), sockbroker::socket::open(&dgram).unwrap());
    let both = serde_json::json!({"sockets": [{"name": "seq"}, {}]});
    let (r, _) = c.call_with_fds("adopt", both, &[a.as_fd(), b.as_fd()]).unwrap();
    assert_eq!((r[0]["key"].as_str(), r[1]["key"].as_str()), (Some(&*seq.to_string()), Some(&*dgram.to_string())));
    let named = c.bind_name("seq").unwrap();
    assert_eq!(inode(named.as_fd()), inode(a.as_fd()));
    let held = open_fds(broker.pid());
    let want = format!("socket:[{}]", inode(l.as_fd()));
    let n = held.iter().filter(|(_, t)| *t == want).count();
    assert_eq!(n, 1, "one copy held, close-on-exec: {held:?}");
    let (fd, _) = held.iter().find(|(_, t)| *t == want).unwrap();
    assert!(fdinfo_flags(broker.pid(), *fd).is_some_and(|f| f & O_CLOEXEC_FLAG != 0), "O_CLOEXEC on the held copy");
    // Kept in systemd's fd store like any socket the broker holds.
    let port = l.local_addr().unwrap().port();
    let key: sockbroker::spec::SocketKey = format!("tcp://127.0.0.1:{port}").parse().unwrap();
    let stored = format!("FDNAME={}", sockbroker::systemd::fdstore::encode(&key, None).unwrap());
    assert_eq!(broker.wait_notify(&stored), stored);
    // STATUS= is rate-limited: a first one may predate the last adoption.
    let mut status = broker.wait_notify("STATUS=");
    for _ in 0..3 {
        if status.contains("3 adopted") {
            break;
        }
        status = broker.wait_notify("STATUS=");
    }
    assert!(status.contains("holding 3 sockets") && status.contains("3 adopted"), "{status}");
    // And across a re-exec of the broker: the same socket, still "adopted".
    drop(c);
    broker.signal(nix::sys::signal::Signal::SIGUSR1);
    wait_ready(&broker.notify, &mut broker.child, "broker after SIGUSR1");
    assert!(holds(broker.pid(), inode(l.as_fd())));
    let list = String::from_utf8_lossy(&sockbroker(&broker, &["list"]).stdout).into_owned();
    assert!(list.lines().any(|l| l.contains(&format!(":{port}")) && l.contains("adopted")), "{list}");
}

/// A listening loopback address (kept open for the test's life).
fn broker_free_listener() -> SocketAddr {
    let l = Box::leak(Box::new(std::net::TcpListener::bind("127.0.0.1:0").unwrap()));
    l.local_addr().unwrap()
}

/// Whether process `pid` has CAP_SYS_PTRACE in its effective set.
fn has_ptrace(pid: i32) -> bool {
    cap_eff(pid) & (1 << 19) != 0
}

/// docs/adopt.md, "Who needs which privilege": the broker with the shipped
/// unit's capabilities (no CAP_SYS_PTRACE) adopts what root's `sockbroker
/// adopt` copies for it; recovery (`--adopt-orphans`) needs the capability
/// in the broker and says so.
#[test]
fn the_broker_needs_no_ptrace_capability_to_adopt_but_recovery_does() {
    let broker = Broker::builder("adopt-caps").unit_capabilities().start();
    let dir = broker.dir.clone();
    assert!(!has_ptrace(broker.pid()), "the broker runs without CAP_SYS_PTRACE");
    let port = free_port();
    let udp = format!("udp://127.0.0.1:{port}");
    let notify = Notify::bind(&dir, "daemon-notify.sock");
    let mut daemon = Reaped(
        Command::new("python3")
            .arg(echo_py())
            .args(["--bind", &udp])
            .env("NOTIFY_SOCKET", &notify.path)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    notify.wait_line(&mut daemon.0, "READY=1", Duration::from_secs(20));
    let inode = bound_inode(&udp).unwrap();
    // `sockbroker adopt` itself does need the capability, and says so.
    let capless = ["--bounding-set", UNIT_CAPS];
    let out = run_cli(&broker.control, Some(&capless), &["adopt", "--pid", &daemon.0.id().to_string()]);
    let text = output_text(&out);
    assert!(!out.status.success() && text.contains("not permitted") && text.contains("lacks CAP_SYS_PTRACE"), "{text}");
    assert_eq!(adopt(&broker, &["--pid", &daemon.0.id().to_string()]), vec![(udp.clone(), inode)]);
    assert!(holds(broker.pid(), inode));
    // (A broker with these capabilities could copy from this one, another
    // process of root with no more capabilities: stop it.)
    drop(broker);

    // Recovery without the capability: the holder cannot be looked into,
    // the log says what is missing, and the start fails on the address.
    let second = Broker::builder("adopt-caps-recovery")
        .unit_capabilities()
        .config(format!("[[socket]]\nname = \"dns\"\nlisten = \"{udp}\"\n"))
        .arg("--adopt-orphans")
        .try_start();
    let log = second.err().expect("no recovery without CAP_SYS_PTRACE");
    assert!(log.contains("lacks CAP_SYS_PTRACE") && log.contains(&udp), "{log}");
    assert!(log.contains("Address already in use"), "{log}");
}

/// More sockets than one SCM_RIGHTS message carries (253): the command
/// splits them over several `adopt` requests, and the broker holds them all.
#[test]
fn three_hundred_sockets_are_adopted_in_several_requests() {
    let broker = Broker::start("adopt-many");
    let notify = Notify::bind(&broker.dir, "many-notify.sock");
    let script = "import os, socket, sys\nd = sys.argv[1]\nsocks = []\nfor i in range(300):\n    s = socket.socket(socket.AF_UNIX)\n    s.bind(f'{d}/s{i}.sock')\n    s.listen(8)\n    socks.append(s)\nn = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\nn.sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\nimport time\ntime.sleep(120)\n";
    let mut holder = Reaped(
        Command::new("python3")
            .args(["-c", script, broker.dir.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &notify.path)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    notify.wait_line(&mut holder.0, "READY=1", Duration::from_secs(20));
    let adopted = adopt(&broker, &["--pid", &holder.0.id().to_string()]);
    assert_eq!(adopted.len(), 300);
    for (key, inode) in &adopted {
        assert!(holds(broker.pid(), *inode), "{key}");
    }
    let log = broker.log_text();
    assert_eq!(log.matches("adopt unix:").count(), 300, "one line per socket");
}
