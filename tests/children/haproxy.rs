//! HAProxy under the broker, with the real `haproxy` binary: templates in both
//! syntaxes, a thousand binds, `haproxy run` reloads under load, a broken
//! config, graceful stop, two instances side by side.

use crate::common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::daemons::{http_ok, RequestLoop};
use common::supervisor::{children, idle_threads, Supervisor};
use common::*;
use nix::sys::signal::Signal;
use sockbroker::haproxy::{render_template, RenderOptions};

const HAPROXY: &str = "/usr/sbin/haproxy";

/// An HTTP frontend that answers every request itself.
pub(crate) fn http_template(bind: &str) -> String {
    format!(
        "global\n  maxconn 4000\ndefaults\n  mode http\n  timeout client 10s\n  timeout server 10s\n  timeout connect 2s\n\
         frontend web\n  bind {bind}\n  http-request return status 200 content-type text/plain string ok\n"
    )
}

/// `sockbroker ARGS` against `broker`, waited for.
fn sockbroker(broker: &Broker, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("SOCKBROKER_SOCKET", &broker.control)
        .env_remove("NOTIFY_SOCKET")
        .current_dir(&broker.dir)
        .output_within(COMMAND_TIMEOUT)
        .unwrap()
}

#[track_caller]
fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `fd@N` numbers in a rendered config.
fn fd_refs(config: &str) -> Vec<u32> {
    config
        .split("fd@")
        .skip(1)
        .map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn both_syntaxes_render_and_haproxy_accepts_them() {
    let broker = Broker::start("hasyntax");
    let (tcp, held) = bind_free_tcp(&mut broker.client());
    let port: u16 = tcp.rsplit(':').next().unwrap().parse().unwrap();
    let udp = format!("udp://127.0.0.1:{}", free_port());
    let template = broker.dir.join("site.cfg.erb");
    let text = format!(
        "global\n  maxconn 100\ndefaults\n  mode http\n  timeout client 1s\n  timeout server 1s\n  timeout connect 1s\n\
         frontend web\n  bind <%= bind_tcp( '127.0.0.1' , {port} ) %>\n  bind <%= bind_tcp(\"127.0.0.1\", {port}) %>\n\
         <%# a comment %>  bind {{{{ sockbroker \"tcp://[::1]:{port}\" }}}}\n\
         \x20 http-request return status 200\nlog-forward syslog\n  dgram-bind {{{{ sockbroker \"{udp}\" }}}}\n\
         \x20 log stderr format raw local0\n"
    );
    std::fs::write(&template, text).unwrap();

    // multibinder-haproxy-erb's form: render, then exec `haproxy -c` with the descriptors open.
    let out = sockbroker(&broker, &["haproxy", "exec", "--", HAPROXY, "-c", "-f", template.to_str().unwrap()]);
    assert_success(&out, "haproxy exec -- haproxy -c");
    let rendered = broker.dir.join("site.cfg");
    let config = std::fs::read_to_string(&rendered).unwrap();
    assert!(!config.contains("<%") && !config.contains("{{"), "{config}");
    let fds = fd_refs(&config);
    assert_eq!(fds.len(), 4, "{config}");
    assert_eq!(fds.iter().collect::<HashSet<_>>().len(), 4, "each call gets its own descriptor: {config}");
    assert_eq!(std::fs::metadata(&rendered).unwrap().permissions().mode() & 0o777, 0o640);

    // The same template rendered in this process: the descriptors are the broker's sockets.
    let r = render_template(&template, Some(&broker.dir.join("again.cfg")), &control(&broker)).unwrap();
    assert_eq!(r.fds.len(), 4);
    assert_eq!(inode(r.fds[0].as_fd()), inode(held.as_fd()), "bind_tcp gets the socket the broker holds");
    assert_eq!(inode(r.fds[1].as_fd()), inode(held.as_fd()));
    assert!(r.fds.iter().all(|fd| is_cloexec(fd.as_fd())), "renderer's copies stay close-on-exec");
}

fn control(broker: &Broker) -> RenderOptions {
    RenderOptions { control: Some(broker.control.clone()), fallback_bind: false, rendered_dir: None }
}

#[test]
fn erb_write_only_fallback_and_errors() {
    let broker = Broker::start("haerb");
    let template = broker.dir.join("a.cfg.mb");
    std::fs::write(&template, http_template("<%= bind_tcp('127.0.0.1', 1) %>")).unwrap();

    // --erb-write-only: render and exit, HAProxy is not run (it would fail: -c is not given, and no config -f).
    let out =
        sockbroker(&broker, &["haproxy", "erb", "--", "/nonexistent/haproxy", "-f", "a.cfg.mb", "--erb-write-only"]);
    assert_success(&out, "--erb-write-only");
    assert_eq!(fd_refs(&std::fs::read_to_string(broker.dir.join("a.cfg")).unwrap()).len(), 1);

    // Broker unreachable: an error naming the call, or with --fallback-bind the plain address.
    let gone = Command::new(BIN)
        .args(["haproxy", "render", template.to_str().unwrap(), "-o", "direct.cfg"])
        .env("SOCKBROKER_SOCKET", broker.dir.join("nobody.sock"))
        .current_dir(&broker.dir)
        .output_within(COMMAND_TIMEOUT)
        .unwrap();
    assert!(!gone.status.success());
    let err = String::from_utf8_lossy(&gone.stderr);
    assert!(err.contains("a.cfg.mb:9:8: bind_tcp('127.0.0.1', 1): cannot connect to the broker"), "{err}");
    let fallback = Command::new(BIN)
        .args(["haproxy", "render", "--fallback-bind", template.to_str().unwrap(), "-o", "direct.cfg"])
        .env("SOCKBROKER_SOCKET", broker.dir.join("nobody.sock"))
        .current_dir(&broker.dir)
        .output_within(COMMAND_TIMEOUT)
        .unwrap();
    assert_success(&fallback, "--fallback-bind");
    assert!(String::from_utf8_lossy(&fallback.stderr).contains("reloads may drop connections"));
    assert!(std::fs::read_to_string(broker.dir.join("direct.cfg")).unwrap().contains("  bind 127.0.0.1:1\n"));

    // Template code we do not understand: file, line and column, and nothing is written.
    std::fs::write(broker.dir.join("b.cfg.erb"), "global\n  maxconn <%= ENV['MAX'] %>\n").unwrap();
    let out = sockbroker(&broker, &["haproxy", "render", "b.cfg.erb"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("b.cfg.erb:2:11: unsupported ERB code <%= ENV['MAX'] %>"), "{err}");
    assert!(!broker.dir.join("b.cfg").exists());
}

#[test]
fn a_thousand_binds_render_to_a_thousand_descriptors() {
    const N: usize = 1000;
    let broker = Broker::start("ha1000");
    let mut client = broker.client();
    // One port on a thousand loopback addresses (127.1.x.y are all local).
    let addresses: Vec<String> = (0..N).map(|i| format!("127.1.{}.{}", i / 250, i % 250 + 1)).collect();
    let mut port = 0;
    'retry: for _ in 0..10 {
        port = free_port();
        for a in &addresses {
            if let Err(e) = client.bind(&format!("tcp://{a}:{port}").parse().unwrap()) {
                assert_eq!(e.code(), Some(10000), "{e}");
                continue 'retry;
            }
        }
        break;
    }
    let binds: Vec<String> = addresses.iter().map(|a| format!("<%= bind_tcp('{a}', {port}) %>")).collect();
    let template = broker.dir.join("big.cfg.erb");
    std::fs::write(&template, http_template(&binds.join("\n  bind "))).unwrap();

    let r = render_template(&template, None, &control(&broker)).unwrap();
    assert_eq!(r.fds.len(), N);
    let inodes: HashSet<u64> = r.fds.iter().map(|fd| inode(fd.as_fd())).collect();
    assert_eq!(inodes.len(), N, "a thousand distinct sockets");
    let config = std::fs::read_to_string(&r.output).unwrap();
    assert_eq!(fd_refs(&config).into_iter().collect::<HashSet<_>>().len(), N);
    drop(r);

    let out = sockbroker(&broker, &["haproxy", "exec", "--", HAPROXY, "-c", "-f", template.to_str().unwrap()]);
    assert_success(&out, "haproxy -c with 1000 fd@ binds");
}

/// `sockbroker haproxy run --ready-timeout 20s RUN_ARGS -- haproxy -f
/// TEMPLATE HAPROXY_ARGS`, named `name`, serving generation 1.
#[track_caller]
fn start(broker: &Broker, name: &str, template: &Path, run_args: &[&str], haproxy_args: &[&str]) -> Supervisor {
    let run = Supervisor::haproxy_run(broker)
        .name(name)
        .args(&["--ready-timeout", "20s"])
        .args(run_args)
        .command(&[HAPROXY, "-f", template.to_str().unwrap()])
        .command(haproxy_args)
        .start();
    assert!(run.ready.contains("STATUS=serving: generation 1"), "{}", run.ready);
    run
}

/// A broker holding a fresh loopback port, and an HTTP template for it.
pub(crate) fn web_setup(name: &str) -> (Broker, SocketAddr, PathBuf) {
    let broker = Broker::start(name);
    let (spec, _held) = bind_free_tcp(&mut broker.client());
    let addr = tcp_addr(&spec);
    let template = broker.dir.join("web.cfg.sb");
    std::fs::write(&template, http_template(&format!("{{{{ sockbroker \"{spec}\" }}}}"))).unwrap();
    (broker, addr, template)
}

#[test]
fn twenty_reloads_under_load_fail_no_connection() {
    let (broker, addr, template) = web_setup("hareload");
    let mut run = start(&broker, "web", &template, &[], &[]);
    let first = run.generation_pids();
    assert_eq!(first.len(), 1, "one HAProxy master: {first:?}");
    let load = RequestLoop::start(2, move || http_ok(addr));
    load.wait_for(50);
    for i in 0..20 {
        let status = run.reload();
        assert!(status.contains(&format!("STATUS=serving: generation {}", i + 2)), "reload {i}: {status}");
        load.wait_for(20);
    }
    let (ok, failed, errors) = load.finish();
    assert_eq!(failed, 0, "{failed} failed connections out of {} during 20 reloads: {errors:?}", ok + failed);
    assert!(!run.generation_pids().contains(&first[0]), "the first instance was retired");
    let status = run.stop();
    assert!(status.success(), "{status}");
}

/// HAProxy starts with no signal blocked, though `haproxy run` blocks the
/// signals it reads from a signalfd (`/proc/PID/status` SigBlk of the
/// master and its worker).
#[test]
fn haproxy_starts_with_an_empty_signal_mask() {
    let (broker, _addr, template) = web_setup("hasigmask");
    let run = start(&broker, "web", &template, &[], &[]);
    let masters = run.generation_pids();
    assert_eq!(masters.len(), 1, "one HAProxy master: {masters:?}");
    let mut pids = masters.clone();
    pids.extend(children(masters[0]));
    assert!(pids.len() >= 2, "master and worker: {pids:?}");
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let blocked = status.lines().find_map(|l| l.strip_prefix("SigBlk:")).unwrap().trim();
        assert_eq!(blocked, "0000000000000000", "haproxy pid {pid} starts with signals blocked");
    }
}

#[test]
fn a_broken_config_never_replaces_the_running_instance() {
    let (broker, addr, template) = web_setup("habroken");
    let mut run = start(&broker, "web", &template, &[], &[]);
    let serving = run.generation_pids();
    let good = std::fs::read_to_string(&template).unwrap();
    let load = RequestLoop::start(1, move || http_ok(addr));
    load.wait_for(20);

    // HAProxy rejects this one: the check fails, generation 1 serves on.
    std::fs::write(&template, good.replace("mode http", "mode http\n  no-such-keyword on")).unwrap();
    let status = run.reload();
    assert!(status.contains("STATUS=reload failed, serving: generation 1"), "{status}");
    assert!(status.contains("[ALERT]") && status.contains("no-such-keyword"), "HAProxy's alert in STATUS=: {status}");
    assert!(run.log_text().contains("no-such-keyword"), "the check's output is logged");
    load.wait_for(20);
    assert_eq!(run.generation_pids(), serving);

    // The same reload asked for on the control socket (ExecReload=): it
    // fails, with HAProxy's output on stderr.
    let out = run.supervisor(&["reload"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("generation 3: haproxy -c refused the config"), "{text}");
    assert!(text.contains("unknown keyword 'no-such-keyword'"), "{text}");
    assert!(text.contains("generation 1 (pid") && text.contains("keeps serving"), "{text}");
    let status = run.next_ready();
    assert!(status.contains("STATUS=reload failed, serving: generation 1"), "{status}");
    assert_eq!(run.generation_pids(), serving);

    // A template error is caught before HAProxy is even asked.
    std::fs::write(&template, good.replace("frontend", "<% oops %>\nfrontend")).unwrap();
    let status = run.reload();
    assert!(status.contains("STATUS=reload failed, serving: generation 1"), "{status}");
    assert_eq!(run.generation_pids(), serving);

    // Fixed: the next reload goes through (each refused one used a number).
    std::fs::write(&template, &good).unwrap();
    let status = run.reload();
    assert!(status.contains("STATUS=serving: generation 5"), "{status}");
    load.wait_for(20);
    let (_, failed, errors) = load.finish();
    assert_eq!(failed, 0, "{errors:?}");
}

#[test]
fn sigterm_drains_then_exits() {
    let (broker, addr, template) = web_setup("haterm");
    let mut run = start(&broker, "web", &template, &[], &[]);
    let pids = run.generation_pids();
    // A client in the middle of a request: HAProxy has read part of it.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();

    run.signal(Signal::SIGTERM);
    // HAProxy's master logs when it got the soft stop and passed it on.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !run.log_text().contains("Exiting Master process") {
        assert!(Instant::now() < deadline, "HAProxy never soft-stopped");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(run.child.try_wait().unwrap().is_none(), "run must wait for the draining instance");
    s.write_all(b"\r\n").unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert!(
        reply.starts_with(b"HTTP/1.1 200"),
        "the request in flight is served: {:?}",
        String::from_utf8_lossy(&reply)
    );
    let status = wait_timeout(&mut run.child, Duration::from_secs(10)).expect("run did not exit after draining");
    assert!(status.success(), "{status}");
    for pid in pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "haproxy {pid} left behind");
    }
}

#[test]
fn two_instances_side_by_side() {
    let (broker, addr_a, template_a) = web_setup("hatwo");
    let (spec_b, _held) = bind_free_tcp(&mut broker.client());
    let addr_b = tcp_addr(&spec_b);
    let template_b = broker.dir.join("other.cfg.erb");
    // As multibinder's README writes it: `daemon` in global (the supervisor keeps HAProxy in the foreground).
    let text = http_template(&format!("<%= bind_tcp('127.0.0.1', {}) %>", addr_b.port()));
    std::fs::write(&template_b, text.replace("global\n", "global\n  daemon\n")).unwrap();
    let rendered = broker.dir.join("rendered");
    std::fs::create_dir(&rendered).unwrap();

    let mut a = start(&broker, "a", &template_a, &[], &[]);
    let b = start(&broker, "b", &template_b, &["--rendered-dir", rendered.to_str().unwrap()], &["-Ds", "-p", "b.pid"]);
    assert!(rendered.join("other.cfg").exists() && !broker.dir.join("other.cfg").exists());
    http_ok(addr_a).unwrap();
    http_ok(addr_b).unwrap();
    let b_pids = b.generation_pids();
    let status = a.reload();
    assert!(status.contains("generation 2"), "{status}");
    http_ok(addr_a).unwrap();
    http_ok(addr_b).unwrap();
    assert_eq!(b.generation_pids(), b_pids, "reloading one instance leaves the other alone");
    let pidfile = std::fs::read_to_string(broker.dir.join("b.pid")).unwrap();
    assert_eq!(pidfile.trim().parse::<i32>().unwrap(), b_pids[0], "-p passes through to HAProxy");
}

/// `systemd-analyze verify` on an instance of units/haproxy@.service, with
/// ExecStart pointing at the binary under test; any output fails.
fn verify_unit(text: &str, dir: &Path) -> String {
    std::fs::write(dir.join("haproxy@.service"), text.replace("/usr/bin/sockbroker", BIN)).unwrap();
    systemd_analyze_verify(dir, &["haproxy@www.service"])
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/units/haproxy@.service")).unwrap();
    let dir = test_dir("haunit");
    assert_eq!(verify_unit(&unit, &dir), "", "systemd-analyze verify haproxy@www.service must print nothing");
    // The check can fail: a misspelt key is reported.
    let broken = unit.replace("TimeoutStopSec=", "TimeoutStopSecs=");
    assert!(verify_unit(&broken, &dir).contains("TimeoutStopSecs"), "verify must catch an unknown key");
    // No root, and no capability but CAP_SYS_NICE (raising a reload's
    // instance from idle priority, --idle-start): the broker binds the ports.
    assert!(unit.contains("\nUser=haproxy\n") && unit.contains("\nCapabilityBoundingSet=CAP_SYS_NICE\n"));
    let granted: Vec<&str> = unit.lines().filter(|l| !l.starts_with('#') && l.contains("CAP_")).collect();
    assert_eq!(
        granted,
        ["CapabilityBoundingSet=CAP_SYS_NICE", "AmbientCapabilities=CAP_SYS_NICE"],
        "no other capability granted"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_reload_without_the_broker_fails_and_the_instance_serves_on() {
    let (mut broker, addr, template) = web_setup("hanobroker");
    let mut run = start(&broker, "web", &template, &[], &[]);
    let serving = run.generation_pids();
    broker.stop();
    // HAProxy holds its own copies of the sockets: it serves without the broker.
    http_ok(addr).unwrap();
    let status = run.reload();
    assert!(status.contains("STATUS=reload failed, serving: generation 1"), "{status}");
    assert!(status.contains("cannot connect to the broker"), "{status}");
    assert_eq!(run.generation_pids(), serving);
    http_ok(addr).unwrap();
}

#[test]
fn pidfile_readiness_sigusr2_reload_and_hard_stop() {
    let (broker, addr, template) = web_setup("hapidfile");
    let pidfile = broker.dir.join("web.pid");
    let mut run = start(&broker, "web", &template, &["--ready", "pidfile"], &["-p", pidfile.to_str().unwrap()]);
    let read_pid = || std::fs::read_to_string(&pidfile).unwrap().trim().parse::<i32>().unwrap();
    assert_eq!(run.generation_pids(), vec![read_pid()], "ready once -p names generation 1's master");

    // SIGUSR2 reloads, as multibinder's wrapper did; the pid file then names
    // the new master. The new config forwards to a backend this test holds.
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let text = std::fs::read_to_string(&template).unwrap().replace(
        "  http-request return status 200 content-type text/plain string ok\n",
        &format!("  default_backend slow\nbackend slow\n  server s1 {}\n", backend.local_addr().unwrap()),
    );
    std::fs::write(&template, text).unwrap();
    run.signal(Signal::SIGUSR2);
    let status = run.next_ready();
    assert!(status.contains("STATUS=serving: generation 2"), "{status}");
    let second = read_pid();
    assert!(run.generation_pids().contains(&second), "-p names generation 2's master");
    // It started idle (--idle-start) as a daemonizing launcher; the master
    // the pid file names, and its worker, were raised at readiness.
    let mut instance = vec![second];
    instance.extend(children(second));
    assert!(instance.len() >= 2, "master and worker: {instance:?}");
    for pid in instance {
        assert_eq!(idle_threads(pid).0, 0, "haproxy pid {pid} left at idle priority");
    }

    // A request in progress (the backend has it and does not answer) keeps
    // the soft-stopped instance draining; a second SIGTERM is the hard stop.
    // Generation 1 may still accept for a moment (it answers by itself):
    // retry until a request reaches the backend.
    let retry_until = Instant::now() + Duration::from_secs(10);
    let (client, mut upstream) = loop {
        let mut client = TcpStream::connect(addr).unwrap();
        client.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut fds = [
            nix::poll::PollFd::new(backend.as_fd(), nix::poll::PollFlags::POLLIN),
            nix::poll::PollFd::new(client.as_fd(), nix::poll::PollFlags::POLLIN),
        ];
        assert!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10_000u16)).unwrap() > 0, "no answer");
        if fds[0].any().unwrap_or(false) {
            break (client, backend.accept().unwrap().0);
        }
        assert!(Instant::now() < retry_until, "generation 1 kept accepting for 10s");
    };
    upstream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 4096];
    assert!(upstream.read(&mut buf).unwrap() > 0, "the backend got the request");
    run.signal(Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !run.log_text().contains(&format!("({second}) : Exiting Master process")) {
        assert!(Instant::now() < deadline, "HAProxy never soft-stopped");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(run.child.try_wait().unwrap().is_none(), "run waits for the draining instance");
    run.signal(Signal::SIGTERM);
    wait_timeout(&mut run.child, Duration::from_secs(5)).expect("the hard stop did not end run");
    assert!(run.log_text().contains("hard stop"), "{}", run.log_text());
    assert!(!Path::new(&format!("/proc/{second}")).exists(), "haproxy {second} left behind");
    drop((client, upstream));
}

/// `haproxy exec` hands HAProxy the sockets its configuration names and
/// nothing else: a descriptor leaked to `sockbroker` by its own parent (not
/// close-on-exec) is closed on exec, as `sockbroker exec` does.
#[test]
fn haproxy_exec_does_not_pass_on_a_leaked_descriptor() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let broker = Broker::start("haleak");
    let (tcp, _held) = bind_free_tcp(&mut broker.client());
    let port: u16 = tcp.rsplit(':').next().unwrap().parse().unwrap();
    let template = broker.dir.join("leak.cfg.erb");
    std::fs::write(&template, format!("frontend web\n  bind <%= bind_tcp('127.0.0.1', {port}) %>\n")).unwrap();
    // A stand-in for HAProxy that writes down what it holds.
    let seen = broker.dir.join("fds.txt");
    let fake = broker.dir.join("fake-haproxy");
    std::fs::write(
        &fake,
        format!(
            "#!/usr/bin/python3\nimport os\nfds = []\nfor n in os.listdir('/proc/self/fd'):\n\
             \x20   try:\n        fds.append(os.readlink('/proc/self/fd/' + n))\n    except OSError:\n        pass\n\
             open({:?}, 'w').write(repr(sorted(fds)))\n",
            seen.display().to_string()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let leak = std::fs::File::create(broker.dir.join("leaked-file")).unwrap();
    let leak_raw = leak.as_raw_fd();
    let mut cmd = Command::new(BIN);
    cmd.args(["haproxy", "exec", "--", fake.to_str().unwrap(), "-f", template.to_str().unwrap()])
        .env("SOCKBROKER_SOCKET", &broker.control)
        .current_dir(&broker.dir);
    // SAFETY: dup2 in the forked child only; async-signal-safe. dup2 clears
    // close-on-exec on the copy: the leak `sockbroker` inherits.
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::dup2(leak_raw, 9) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output_within(COMMAND_TIMEOUT).unwrap();
    assert_success(&out, "haproxy exec -- fake-haproxy");
    let fds = std::fs::read_to_string(&seen).unwrap();
    assert!(!fds.contains("leaked-file"), "HAProxy got the leaked descriptor: {fds}");
    assert!(fds.contains("socket:"), "HAProxy got its socket: {fds}");
}

/// `--drain-timeout`: an old instance still draining (a request in progress
/// at a backend that never answers) is hard-stopped (SIGTERM, HAProxy's hard
/// stop) when the deadline passes, not before, and logged at WARN.
#[test]
fn drain_timeout_hard_stops_a_draining_instance() {
    let (broker, addr, template) = web_setup("hadrain");
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let text = std::fs::read_to_string(&template).unwrap().replace(
        "  http-request return status 200 content-type text/plain string ok\n",
        &format!("  default_backend slow\nbackend slow\n  server s1 {}\n", backend.local_addr().unwrap()),
    );
    std::fs::write(&template, text).unwrap();
    let mut run = start(&broker, "web", &template, &["--ready-grace", "0", "--drain-timeout", "1500ms"], &[]);
    let first = run.generation_pids();
    assert_eq!(first.len(), 1, "{first:?}");

    // Generation 1 is the only instance: the request reaches the backend through it.
    let mut client = TcpStream::connect(addr).unwrap();
    client.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    backend.set_nonblocking(false).unwrap();
    let (mut upstream, _) = backend.accept().unwrap();
    upstream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 4096];
    assert!(upstream.read(&mut buf).unwrap() > 0, "the backend got the request");

    let status = run.reload();
    assert!(status.contains("STATUS=serving: generation 2"), "{status}");
    let retired = Instant::now();
    let gone = |pid: i32| !Path::new(&format!("/proc/{pid}")).exists() || !run.generation_pids().contains(&pid);
    let deadline = retired + Duration::from_secs(15);
    while !gone(first[0]) {
        assert!(Instant::now() < deadline, "generation 1 still draining 15 s after a 1.5 s --drain-timeout");
        std::thread::sleep(Duration::from_millis(10));
    }
    let after = retired.elapsed();
    assert!(after >= Duration::from_millis(1400), "stopped after {after:?}, before its drain deadline");
    let log = run.log_text();
    assert!(log.contains("(--drain-timeout): stopping it hard (SIGTERM)"), "{log}");
    // The request it held ends with it.
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reply = Vec::new();
    let _ = client.read_to_end(&mut reply);
    drop(upstream);
}
