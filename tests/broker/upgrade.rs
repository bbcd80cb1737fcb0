//! Upgrading the broker itself (issue 6): SIGUSR1 re-exec and
//! `serve --takeover`, under load, and when they fail.
//!
//! The load is a stand-in for a daemon that serves a brokered socket and keeps
//! reloading: one thread accepts and answers on the socket, swapping in the
//! descriptor a binder thread keeps asking the broker for; a client thread
//! connects in a loop. Two more binders ask through the control socket with
//! multibinder's wire format and no retry: one connection per request (the
//! reference client), and one connection kept open throughout.

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use sockbroker::client::Client;

const RE_EXECS: usize = 20;
const TAKEOVERS: usize = 5;

/// Counters of the load threads.
#[derive(Default)]
struct Counters {
    served: AtomicU64,
    connected: AtomicU64,
    binds: AtomicU64,
    raw_binds: AtomicU64,
    kept_binds: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Counters {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }

    fn snapshot(&self) -> [u64; 5] {
        [&self.served, &self.connected, &self.binds, &self.raw_binds, &self.kept_binds]
            .map(|c| c.load(Ordering::SeqCst))
    }

    /// Waits (bounded) until every counter has moved past `before`, so each
    /// upgrade happens while the load is flowing.
    #[track_caller]
    fn wait_progress(&self, before: [u64; 5]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.snapshot().iter().zip(before).any(|(now, then)| *now <= then) {
            assert!(self.failures.lock().unwrap().is_empty(), "failures: {:?}", self.failures.lock().unwrap());
            assert!(Instant::now() < deadline, "load stalled: {:?} -> {:?}", before, self.snapshot());
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

struct Load {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(control: &Path, spec: &str, port: u16, listener: OwnedFd, inode_want: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let (swap_tx, swap_rx) = mpsc::channel::<OwnedFd>();
        let mut threads = Vec::new();

        // The daemon: accepts and echoes one line per connection; takes each
        // new descriptor the binder sends, as a reloaded generation would.
        threads.push({
            let (stop, counters) = (stop.clone(), counters.clone());
            std::thread::spawn(move || {
                let mut listener = TcpListener::from(listener);
                listener.set_nonblocking(true).unwrap();
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(fd) = swap_rx.try_recv() {
                        listener = TcpListener::from(fd);
                        listener.set_nonblocking(true).unwrap();
                    }
                    let mut pfd = [nix::poll::PollFd::new(listener.as_fd(), nix::poll::PollFlags::POLLIN)];
                    if nix::poll::poll(&mut pfd, 10u16).unwrap_or(0) == 0 {
                        continue;
                    }
                    let Ok((conn, _)) = listener.accept() else { continue };
                    conn.set_nonblocking(false).unwrap();
                    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut reader = BufReader::new(&conn);
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_ok() && (&conn).write_all(line.as_bytes()).is_ok() {
                        counters.served.fetch_add(1, Ordering::SeqCst);
                        // Let the client close first, so TIME_WAIT stays on
                        // its side and reused ports never meet an old
                        // connection of ours; but not for long: this one
                        // thread serves every connection, and a client's
                        // close can be late (a fork elsewhere in the test
                        // process holds its socket until exec).
                        let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
                        let _ = reader.read_line(&mut line);
                    }
                }
            })
        });
        // Its users: connect, send a line, expect it back.
        threads.push({
            let (stop, counters) = (stop.clone(), counters.clone());
            std::thread::spawn(move || {
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    // Paced (about 1000 connections a second): each one leaves
                    // a TIME_WAIT socket behind, and an unbounded rate would
                    // exhaust loopback ports on a shared machine.
                    std::thread::sleep(Duration::from_micros(1000));
                    n += 1;
                    let started = Instant::now();
                    let result = (|| -> Result<String, String> {
                        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                            .map_err(|e| format!("connect: {e}"))?;
                        s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| format!("{e}"))?;
                        s.write_all(format!("ping {n}\n").as_bytes()).map_err(|e| format!("write: {e}"))?;
                        let mut line = String::new();
                        BufReader::new(&s)
                            .read_line(&mut line)
                            .map_err(|e| format!("read after {:?}: {e}", started.elapsed()))?;
                        Ok(line)
                    })();
                    match result {
                        Ok(line) if line == format!("ping {n}\n") => {
                            counters.connected.fetch_add(1, Ordering::SeqCst);
                        }
                        other => counters.fail(format!("connection {n} at {:?}: {other:?}", now())),
                    }
                }
            })
        });
        // The reloading daemon's binder: a new library connection per bind.
        threads.push({
            let (stop, counters, control, spec) = (stop.clone(), counters.clone(), control.to_owned(), spec.to_owned());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match Client::connect(&control).and_then(|mut c| c.bind(&spec.parse().unwrap())) {
                        Ok(fd) if inode(fd.as_fd()) == inode_want => {
                            counters.binds.fetch_add(1, Ordering::SeqCst);
                            let _ = swap_tx.send(fd);
                        }
                        Ok(fd) => counters.fail(format!("bind {spec}: another socket (inode {})", inode(fd.as_fd()))),
                        Err(e) => counters.fail(format!("bind {spec}: {e}")),
                    }
                }
            })
        });
        // multibinder's reference client: one connection, one sendmsg, one
        // recvmsg, no retry. It must never be refused.
        threads.push({
            let (stop, counters, control) = (stop.clone(), counters.clone(), control.to_owned());
            std::thread::spawn(move || {
                let request = multibinder_bind_request("127.0.0.1", port);
                while !stop.load(Ordering::SeqCst) {
                    let stream = match std::os::unix::net::UnixStream::connect(&control) {
                        Ok(s) => s,
                        Err(e) => {
                            counters.fail(format!("reference client connect: {e}"));
                            continue;
                        }
                    };
                    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    send_raw(stream.as_fd(), &request);
                    let (text, fds) = recv_raw(stream.as_fd());
                    if fds.len() == 1 && inode(fds[0].as_fd()) == inode_want && json(&text)["result"] == true {
                        counters.raw_binds.fetch_add(1, Ordering::SeqCst);
                    } else {
                        counters.fail(format!("reference client: {text:?} with {} fds", fds.len()));
                    }
                }
            })
        });
        // A client that keeps one connection open across every upgrade and
        // never reconnects: multibinder's wire format, several requests on
        // one connection. It only works if the connection itself is carried
        // over by every re-exec and takeover.
        threads.push({
            let (stop, counters, control) = (stop.clone(), counters.clone(), control.to_owned());
            std::thread::spawn(move || {
                let request = multibinder_bind_request("127.0.0.1", port);
                let stream = std::os::unix::net::UnixStream::connect(&control).unwrap();
                stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                while !stop.load(Ordering::SeqCst) {
                    send_raw(stream.as_fd(), &request);
                    let (text, fds) = recv_raw(stream.as_fd());
                    if fds.len() == 1 && inode(fds[0].as_fd()) == inode_want && json(&text)["result"] == true {
                        counters.kept_binds.fetch_add(1, Ordering::SeqCst);
                    } else {
                        counters.fail(format!("kept connection: {text:?} with {} fds", fds.len()));
                        return;
                    }
                }
            })
        });
        Load { stop, counters, threads }
    }

    fn finish(self) -> Arc<Counters> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
        self.counters
    }
}

/// How many times the broker's log says it resumed after a re-exec.
fn count_in_log(broker: &Broker, needle: &str) -> usize {
    broker.log_text().matches(needle).count()
}

/// Every socket the broker holds is close-on-exec (the flags cleared for an
/// exec are restored, or set again by the new image).
#[track_caller]
fn assert_sockets_cloexec(pid: i32) {
    for (fd, target) in open_fds(pid) {
        if target.starts_with("socket:") {
            // Client connections come and go while we look.
            let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else { continue };
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap().trim();
            let flags = u32::from_str_radix(flags, 8).unwrap();
            assert!(flags & 0o2000000 != 0, "broker fd {fd} ({target}) is not close-on-exec: flags {flags:o}");
        }
    }
}

/// Sends SIGUSR1 and waits for the broker's next READY=1.
#[track_caller]
fn reexec(broker: &mut Broker) {
    broker.signal(Signal::SIGUSR1);
    wait_ready(&broker.notify, &mut broker.child, "broker after SIGUSR1");
}

fn control_inode(path: &Path) -> u64 {
    std::fs::symlink_metadata(path).unwrap().ino()
}

#[test]
fn reexecs_and_takeovers_under_load_lose_nothing() {
    let mut broker = Broker::start("upgrade_load");
    let (dir, control) = (broker.dir.clone(), broker.control.clone());
    let mut client = broker.client();
    let (spec, fd) = bind_free_tcp(&mut client);
    let port: u16 = spec.rsplit(':').next().unwrap().parse().unwrap();
    let tcp_inode = inode(fd.as_fd());
    let unix_spec = format!("unix:{}", dir.join("app.sock").display());
    let unix_inode = inode(client.bind(&unix_spec.parse().unwrap()).unwrap().as_fd());
    drop(client);
    let control_ino = control_inode(&control);

    let load = Load::start(&control, &spec, port, fd, tcp_inode);
    let mut retired = Vec::new();
    let mut reexecs = 0;
    for round in 0..TAKEOVERS {
        for _ in 0..RE_EXECS / TAKEOVERS {
            let before = load.counters.snapshot();
            load.counters.wait_progress(before);
            reexec(&mut broker);
            reexecs += 1;
            assert_eq!(count_in_log(&broker, "resumed after re-exec"), reexecs - RE_EXECS / TAKEOVERS * round);
            assert_sockets_cloexec(broker.pid());
        }
        let before = load.counters.snapshot();
        load.counters.wait_progress(before);
        let new = Broker::builder("takeover").dir(dir.clone()).control(control.clone()).arg("--takeover").start();
        let mut old = std::mem::replace(&mut broker, new);
        let status = wait_timeout(&mut old.child, Duration::from_secs(10)).expect("old broker still running");
        assert!(status.success(), "old broker after takeover: {status}");
        assert!(old.log_text().contains(&format!("handed over to pid {}", broker.pid())), "{}", old.log_text());
        assert!(broker.log_text().contains("resumed after takeover"));
        assert_sockets_cloexec(broker.pid());
        retired.push(old);
    }
    let before = load.counters.snapshot();
    load.counters.wait_progress(before);
    let counters = load.finish();

    let failures = counters.failures.lock().unwrap();
    assert!(failures.is_empty(), "{} failures, first: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    let [served, connected, binds, raw_binds, kept_binds] = counters.snapshot();
    eprintln!(
        "{RE_EXECS} re-execs, {TAKEOVERS} takeovers: {connected} connections ({served} served), {binds} binds, \
         {raw_binds} reference-client binds, {kept_binds} binds on one kept connection, 0 failures"
    );
    // Same sockets, same control socket file, all along.
    let mut client = broker.client();
    assert_eq!(inode(client.bind(&spec.parse().unwrap()).unwrap().as_fd()), tcp_inode);
    assert_eq!(inode(client.bind(&unix_spec.parse().unwrap()).unwrap().as_fd()), unix_inode);
    assert_eq!(control_inode(&control), control_ino);
    // Every upgrade carried the kept connection (at least) over.
    for b in retired.iter().chain([&broker]) {
        for line in b.log_text().lines().filter(|l| l.contains("resumed after")) {
            let carried: usize = line.split(", ").nth(1).and_then(|p| p.split(' ').next()?.parse().ok()).unwrap();
            assert!(carried >= 1, "{line}");
        }
    }
    assert_eq!(broker.stop().code(), Some(0));
    assert!(!control.exists(), "the last broker removes the control socket it inherited");
}

/// A declared socket with options other than the defaults keeps them across
/// a re-exec and a takeover, and the new broker does not report them as
/// changed (the handed-over state carries the whole spec, not only the
/// backlog).
#[test]
fn reexec_and_takeover_keep_declared_options() {
    use nix::sys::socket::{getsockopt, sockopt};
    let (mut broker, _port) = Broker::builder("upgrade_options").start_on_free_port(|port| {
        format!(
            "[[socket]]\nname = \"web\"\nlisten = \"tcp://127.0.0.1:{port}\"\nbacklog = 77\nkeepalive = true\n\
             keepalive_idle = 31\nno_delay = true\nreceive_buffer = 65536\n"
        )
    });
    let options = |broker: &Broker| {
        let fd = broker.client().bind_name("web").unwrap();
        (
            getsockopt(&fd, sockopt::KeepAlive).unwrap(),
            getsockopt(&fd, sockopt::TcpKeepIdle).unwrap(),
            getsockopt(&fd, sockopt::TcpNoDelay).unwrap(),
            getsockopt(&fd, sockopt::RcvBuf).unwrap(),
        )
    };
    let want = options(&broker);
    assert_eq!(want, (true, 31, true, 131072));
    let inode_of = |broker: &Broker| inode(broker.client().bind_name("web").unwrap().as_fd());
    let want_inode = inode_of(&broker);
    assert_eq!(count_in_log(&broker, "options changed"), 0, "{}", broker.log_text());

    reexec(&mut broker);
    assert_eq!(count_in_log(&broker, "resumed after re-exec"), 1, "{}", broker.log_text());
    assert_eq!(count_in_log(&broker, "options changed"), 0, "{}", broker.log_text());
    assert_eq!(options(&broker), want);
    assert_eq!(inode_of(&broker), want_inode);

    let config = broker.config_path();
    let args = ["--takeover", "--config", config.to_str().unwrap()];
    let new = Broker::builder("takeover").beside(&broker).args(&args).start();
    let mut old = std::mem::replace(&mut broker, new);
    assert!(wait_timeout(&mut old.child, Duration::from_secs(10)).expect("old broker exits").success());
    assert!(broker.log_text().contains("resumed after takeover"), "{}", broker.log_text());
    assert_eq!(count_in_log(&broker, "options changed"), 0, "{}", broker.log_text());
    assert_eq!(options(&broker), want);
    assert_eq!(inode_of(&broker), want_inode);
}

#[test]
fn reexec_to_a_missing_or_broken_binary_keeps_serving() {
    let dir = test_dir("upgrade_broken");
    let program = dir.join("sockbroker");
    install(Path::new(BIN), &program);
    let mut broker = Broker::builder("upgrade_broken").program(&program).dir(dir.clone()).start();
    let control = broker.control.clone();
    let mut client = broker.client();
    let (spec, fd) = bind_free_tcp(&mut client);
    let want = inode(fd.as_fd());
    let control_ino = control_inode(&control);
    let check = |broker: &Broker, failures: usize, why: &str| {
        let log = broker.log_text();
        assert_eq!(log.matches("re-exec failed, still serving").count(), failures, "{log}");
        assert!(log.contains(why), "log does not say {why:?}:\n{log}");
        assert!(!log.contains("resumed after re-exec"), "{log}");
        let mut client = broker.client();
        assert_eq!(inode(client.bind(&spec.parse().unwrap()).unwrap().as_fd()), want);
        assert_eq!(control_inode(&broker.control), control_ino);
        assert_sockets_cloexec(broker.pid());
    };

    // Missing.
    std::fs::remove_file(&program).unwrap();
    reexec(&mut broker);
    check(&broker, 1, "cannot run it");

    // Broken: a script that fails.
    install_script(&program, "#!/bin/sh\necho 'no such thing' >&2\nexit 3\n");
    reexec(&mut broker);
    check(&broker, 2, "`--version` failed");

    // Passes the check, then execve itself fails: the script leaves a process
    // holding itself open for writing, so exec'ing it gives ETXTBSY. The
    // descriptors' close-on-exec flags, cleared for the exec, must be back.
    if kernel_refuses_exec_of_file_open_for_writing(&dir) {
        install_script(
            &program,
            "#!/bin/sh\nexec 3>>\"$0\"\nsleep 2 </dev/null >/dev/null 2>&1 &\necho 'sockbroker 99.0.0'\n",
        );
        reexec(&mut broker);
        check(&broker, 3, "Text file busy");
    } else {
        eprintln!("skipped the execve-failure case: this kernel runs files that are open for writing");
    }
    drop(client);
}

/// Copies an executable with `cp`, in another process: a file this
/// multi-threaded test process opened for writing could be inherited, until
/// its exec, by a child another test thread forks at that moment, and
/// running the file would then fail with ETXTBSY.
#[track_caller]
fn install(src: &Path, dst: &Path) {
    let status = std::process::Command::new("cp").arg(src).arg(dst).status().unwrap();
    assert!(status.success(), "cp {} {}: {status}", src.display(), dst.display());
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Installs a script at `dst` (see [`install`]).
#[track_caller]
fn install_script(dst: &Path, text: &str) {
    let src = dst.with_extension("src");
    std::fs::write(&src, text).unwrap();
    install(&src, dst);
}

/// Whether execve fails with ETXTBSY on a script someone has open for writing.
fn kernel_refuses_exec_of_file_open_for_writing(dir: &Path) -> bool {
    let probe = dir.join("probe.sh");
    std::fs::write(&probe, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let writer = std::fs::OpenOptions::new().append(true).open(&probe).unwrap();
    let result = std::process::Command::new(&probe).status();
    drop(writer);
    matches!(result, Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY))
}

#[test]
fn takeover_that_dies_midway_leaves_the_old_broker_serving() {
    let broker = Broker::start("upgrade_midway");
    let mut client = broker.client();
    let (spec, fd) = bind_free_tcp(&mut client);
    let want = inode(fd.as_fd());
    let control_ino = control_inode(&broker.control);
    let takeover = br#"{"jsonrpc":"2.0","method":"takeover","id":1,"params":{}}"#;
    let serving = |failures: usize| {
        // Reference client: no retry; the old broker must answer at once
        // (after dealing with the failed takeover, which came first).
        let (text, fds) = reference_request(&broker.control, &multibinder_bind_request("127.0.0.1", port_of(&spec)));
        assert_eq!(json(&text)["result"], true, "{text}");
        assert_eq!(inode(fds[0].as_fd()), want);
        wait_for_log(&broker, "; still serving", failures);
        assert_eq!(control_inode(&broker.control), control_ino);
        assert_sockets_cloexec(broker.pid());
        assert!(broker.open_fds().iter().filter(|(_, t)| t.starts_with("socket:")).count() >= 2);
    };

    // Dies right after asking.
    {
        let stream = std::os::unix::net::UnixStream::connect(&broker.control).unwrap();
        send_raw(stream.as_fd(), takeover);
    }
    serving(1);

    // Dies after receiving every descriptor and the state, before confirming.
    {
        let stream = std::os::unix::net::UnixStream::connect(&broker.control).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        send_raw(stream.as_fd(), takeover);
        let (text, fds) = recv_raw(stream.as_fd());
        assert!(text.contains("\"sockets\""), "{text}");
        assert!(fds.iter().any(|f| inode(f.as_fd()) == want), "the held socket came with the state");
    }
    serving(2);

    // A new broker that confirms something else.
    {
        let stream = std::os::unix::net::UnixStream::connect(&broker.control).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        send_raw(stream.as_fd(), takeover);
        let mut got = String::new();
        while json_complete(&got).is_none() {
            got.push_str(&recv_raw(stream.as_fd()).0);
        }
        send_raw(stream.as_fd(), br#"{"jsonrpc":"2.0","method":"bind","id":2,"params":[]}"#);
        let (text, _) = recv_raw(stream.as_fd());
        assert_eq!(text, "", "the old broker closes a takeover gone wrong");
    }
    serving(3);
    drop(client);
}

/// More sockets than one SCM_RIGHTS message can carry (253) cross a
/// takeover and a re-exec intact.
#[test]
fn takeover_carries_more_sockets_than_one_message_holds() {
    let mut broker = Broker::start("upgrade_many");
    let (dir, control) = (broker.dir.clone(), broker.control.clone());
    let mut client = broker.client();
    let specs: Vec<String> = (0..600).map(|i| format!("unix:@sbt-many-{}-{i}", std::process::id())).collect();
    let inodes: Vec<u64> = specs.iter().map(|s| inode(client.bind(&s.parse().unwrap()).unwrap().as_fd())).collect();
    drop(client);
    let new = Broker::builder("takeover").dir(dir).control(control).arg("--takeover").start();
    let mut old = std::mem::replace(&mut broker, new);
    assert!(wait_timeout(&mut old.child, Duration::from_secs(10)).expect("old broker exits").success());
    reexec(&mut broker);
    assert!(broker.log_text().contains("resumed after re-exec (generation 2): holding 600 sockets"));
    let mut client = broker.client();
    for (spec, want) in specs.iter().zip(inodes) {
        assert_eq!(inode(client.bind(&spec.parse().unwrap()).unwrap().as_fd()), want, "{spec}");
    }
    drop(old);
}

/// A bind asked while no broker listens yet (a stale socket file: connection
/// refused) is answered once one starts: the client retries within its window.
#[test]
fn client_retries_until_a_broker_listens() {
    let dir = test_dir("upgrade_client_retry");
    let control = dir.join("control.sock");
    drop(std::os::unix::net::UnixListener::bind(&control).unwrap());
    let refused = std::os::unix::net::UnixStream::connect(&control).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    let spec = format!("unix:@sbt-retry-{}", std::process::id());
    let asking = std::thread::spawn({
        let (control, spec) = (control.clone(), spec.clone());
        move || Client::connect(&control).and_then(|mut c| c.bind(&spec.parse().unwrap()))
    });
    let broker = Broker::builder("restart").dir(dir).control(control).start();
    let got = asking.join().unwrap().expect("the bind asked before the broker started");
    assert_eq!(inode(got.as_fd()), inode(broker.client().bind(&spec.parse().unwrap()).unwrap().as_fd()));
}

/// Another user may not take over: `serve --takeover` run as nobody is
/// refused, exits non-zero, and the broker serves on.
#[test]
fn takeover_by_another_user_is_refused() {
    assert!(nix::unistd::geteuid().is_root(), "needs root to run a process as nobody (setpriv)");
    let broker = Broker::start("upgrade_other_user");
    let mut client = broker.client();
    let (spec, fd) = bind_free_tcp(&mut client);
    std::fs::set_permissions(&broker.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&broker.control, std::fs::Permissions::from_mode(0o666)).unwrap();
    // A copy nobody can reach (the build folder may be under a private home).
    let program = broker.dir.join("sockbroker-copy");
    install(Path::new(BIN), &program);
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&program)
        .args(["serve", "--takeover", "--control"])
        .arg(&broker.control)
        .env_remove("NOTIFY_SOCKET")
        .output_within(COMMAND_TIMEOUT)
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("refused the takeover") && stderr.contains("uid 65534"), "{stderr}");
    assert_eq!(inode(client.bind(&spec.parse().unwrap()).unwrap().as_fd()), inode(fd.as_fd()));
    assert!(broker.log_text().contains("only root or uid"));
}

/// A socket handed over the multibinder way, `MULTIBINDER_BIND__tcp__…=<fd>`,
/// is adopted: binds for its address get that very socket.
#[test]
fn adopts_multibinder_environment() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let raw = listener.as_raw_fd();
    let broker = Broker::builder("upgrade_multibinder")
        .env(&format!("MULTIBINDER_BIND__tcp__127_0.0.1__{port}"), &raw.to_string())
        .inherit_fd(raw)
        .start();
    let mut client = broker.client();
    let got = client.bind(&format!("tcp://127.0.0.1:{port}").parse().unwrap()).unwrap();
    assert_eq!(inode(got.as_fd()), inode(listener.as_fd()));
    assert_sockets_cloexec(broker.pid());
}

/// Waits (bounded) until the log says `needle` `count` times: the broker
/// serves the takeover connection and the test's next request in whichever
/// order they become readable.
#[track_caller]
fn wait_for_log(broker: &Broker, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while count_in_log(broker, needle) < count {
        assert!(Instant::now() < deadline, "log does not say {needle:?} {count} times:\n{}", broker.log_text());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(count_in_log(broker, needle), count, "{}", broker.log_text());
}

/// Wall-clock time, to match a failure with the broker's log.
fn now() -> Duration {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap()
}

fn port_of(spec: &str) -> u16 {
    spec.rsplit(':').next().unwrap().parse().unwrap()
}

/// The first complete JSON value in `text`, if any.
fn json_complete(text: &str) -> Option<serde_json::Value> {
    serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>().next()?.ok()
}
