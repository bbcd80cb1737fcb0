//! The broker's life: start-up safety on the control path, stopping on
//! SIGTERM/SIGINT, the per-request log line, and how clients find the broker.

use crate::common;

use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use serde_json::json;

/// Runs `sockbroker ARGS` to completion (bounded) with `env`, and no broker
/// variables inherited from the test's environment.
#[track_caller]
fn run(args: &[&str], env: &[(&str, &std::path::Path)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("SOCKBROKER_SOCKET")
        .env_remove("MULTIBINDER_SOCK")
        .env_remove("NOTIFY_SOCKET")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    // A watchdog instead of a blocking wait that could hang the suite.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
            panic!("sockbroker {args:?} did not finish within 30s");
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A second broker on a live control path refuses to start, says why, and
/// leaves the first one serving.
#[test]
fn second_broker_on_a_live_path_refuses() {
    let broker = Broker::start("lcsecond");
    let control = broker.control.to_str().unwrap();
    let out = run(&["serve", "--control", control], &[]);
    assert!(!out.status.success(), "a second broker must not start: {out:?}");
    let err = text(&out.stderr);
    assert!(err.contains(control) && err.contains("already listening"), "{err}");
    assert!(err.contains("another broker"), "{err}");
    // The first is untouched: its socket file is there and it answers.
    assert!(std::fs::symlink_metadata(&broker.control).unwrap().file_type().is_socket());
    let mut client = broker.client();
    bind_free_tcp(&mut client);
}

/// A stale socket file (nobody listens on it) is replaced.
#[test]
fn stale_control_socket_is_replaced() {
    let dir = test_dir("lcstale");
    let control = dir.join("control.sock");
    drop(UnixListener::bind(&control).unwrap());
    assert!(control.exists());
    let broker = Broker::builder("lcstale").dir(dir).start();
    let mut client = broker.client();
    bind_free_tcp(&mut client);
    assert!(broker.log_text().contains("removing stale socket"), "{}", broker.log_text());
}

/// A file that is not a socket is never removed: the broker refuses to start.
#[test]
fn regular_file_at_the_control_path_is_kept() {
    let dir = test_dir("lcfile");
    for (name, make_dir) in [("control.sock", false), ("control.dir", true)] {
        let control = dir.join(name);
        if make_dir {
            std::fs::create_dir(&control).unwrap();
        } else {
            std::fs::write(&control, b"precious").unwrap();
        }
        let out = run(&["serve", "--control", control.to_str().unwrap()], &[]);
        assert!(!out.status.success(), "{out:?}");
        let err = text(&out.stderr);
        assert!(err.contains("not a socket") && err.contains(control.to_str().unwrap()), "{err}");
        if make_dir {
            assert!(control.is_dir());
        } else {
            assert_eq!(std::fs::read(&control).unwrap(), b"precious");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SIGTERM and SIGINT stop the broker with status 0 and remove the control
/// socket, even with clients connected and sockets held; clients keep the
/// sockets they received.
#[test]
fn sigterm_and_sigint_stop_cleanly() {
    for (name, sig) in [("lcterm", Signal::SIGTERM), ("lcint", Signal::SIGINT)] {
        let mut broker = Broker::start(name);
        let mut client = broker.client();
        let (spec, fd) = bind_free_tcp(&mut client);
        let _idle = connect(&broker.control);
        broker.signal(sig);
        let status = wait_timeout(&mut broker.child, Duration::from_secs(20)).expect("broker did not stop");
        assert_eq!(status.code(), Some(0), "{sig}: {status}");
        assert!(!broker.control.exists(), "{sig}: the control socket must be removed");
        // The client's socket outlives the broker.
        assert!(is_listening(fd.as_fd()), "{spec}");
        assert!(broker.log_text().contains("stopping"), "{}", broker.log_text());
    }
}

/// SIGHUP, SIGUSR1 and SIGUSR2 do not kill the broker (and with it every
/// held socket).
#[test]
fn other_signals_do_not_kill_the_broker() {
    let mut broker = Broker::start("lcsignals");
    let mut client = broker.client();
    let (spec, fd) = bind_free_tcp(&mut client);
    for sig in [Signal::SIGHUP, Signal::SIGUSR1, Signal::SIGUSR2, Signal::SIGPIPE] {
        broker.signal(sig);
    }
    // Still serving, still holding the same socket.
    let again = broker.client().bind(&spec.parse().unwrap()).unwrap();
    assert_eq!(inode(again.as_fd()), inode(fd.as_fd()));
    assert!(broker.child.try_wait().unwrap().is_none());
    assert_eq!(broker.stop().code(), Some(0));
}

/// One log line per request with the peer's pid, uid and gid, the method,
/// the socket and the outcome.
#[test]
fn each_request_is_logged_with_peer_method_socket_and_outcome() {
    let broker = Broker::builder("lclog").env("RUST_LOG", "info").start();
    let peer = format!("pid={} uid={} gid={}", std::process::id(), nix::unistd::geteuid(), nix::unistd::getegid());
    let mut client = broker.client();
    let (spec, _) = bind_free_tcp(&mut client);
    client.bind(&spec.parse().unwrap()).unwrap();
    let port = free_port();
    rpc(&broker.control, &bind_request(1, json!({"address": "192.0.2.1", "port": port})));
    rpc(&broker.control, &bind_request(2, json!({"address": "127.0.0.1", "port": 0})));
    rpc(&broker.control, &bind_request(3, json!({"name": "web"})));
    rpc(&broker.control, br#"{"jsonrpc":"2.0","method":"frobnicate","id":4}"#);
    let log = broker.log_text();
    let has = |needles: &[&str]| log.lines().any(|l| needles.iter().all(|n| l.contains(n)));
    assert!(has(&[&peer, &format!("bind {spec}: ok (new socket")]), "{log}");
    assert!(has(&[&peer, &format!("bind {spec}: ok (held socket")]), "{log}");
    assert!(has(&[&peer, &format!("bind tcp://192.0.2.1:{port}: could not bind"), "os error 99"]), "{log}");
    assert!(has(&[&peer, "bind", "tcp://127.0.0.1:0", "port 0 is refused"]), "{log}");
    assert!(has(&[&peer, "bind name 'web': unknown name"]), "{log}");
    assert!(has(&[&peer, "frobnicate: method not found"]), "{log}");
}

/// Clients find the broker through SOCKBROKER_SOCKET, then MULTIBINDER_SOCK;
/// `serve` without --control listens on SOCKBROKER_SOCKET.
#[test]
fn clients_find_the_broker_from_the_environment() {
    let dir = test_dir("lcenv");
    let control = dir.join("env.sock");
    let missing = dir.join("missing.sock");
    // `serve` takes its path from SOCKBROKER_SOCKET when --control is absent.
    let broker = Broker::builder("lcenv")
        .dir(dir.clone())
        .control(&control)
        .no_control_flag()
        .env("SOCKBROKER_SOCKET", control.to_str().unwrap())
        .env_remove("MULTIBINDER_SOCK")
        .start();
    assert!(std::fs::symlink_metadata(&control).unwrap().file_type().is_socket());

    let mut client = sockbroker::client::Client::connect(&control).unwrap();
    let (spec, fd) = bind_free_tcp(&mut client);
    let expect = format!("{spec}: received socket inode {}", inode(fd.as_fd()));

    for env in [
        vec![("SOCKBROKER_SOCKET", control.as_path())],
        vec![("MULTIBINDER_SOCK", control.as_path())],
        vec![("SOCKBROKER_SOCKET", control.as_path()), ("MULTIBINDER_SOCK", missing.as_path())],
    ] {
        let out = run(&["bind", &spec], &env);
        assert!(out.status.success(), "{env:?}: {out:?}");
        assert_eq!(text(&out.stdout).trim(), expect, "{env:?}");
    }
    // SOCKBROKER_SOCKET comes first, even when MULTIBINDER_SOCK would work.
    let out = run(&["bind", &spec], &[("SOCKBROKER_SOCKET", &missing), ("MULTIBINDER_SOCK", &control)]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("cannot connect to the broker at") && err.contains(missing.to_str().unwrap()), "{err}");

    // Errors from the broker reach the CLI user with a non-zero status.
    let out = run(&["bind", "--name", "nosuch"], &[("SOCKBROKER_SOCKET", &control)]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no socket named 'nosuch'"), "{}", text(&out.stderr));
    let out = run(&["bind", "tcp://192.0.2.1:80"], &[("MULTIBINDER_SOCK", &control)]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("Could not bind: tcp://192.0.2.1:80"), "{}", text(&out.stderr));
    drop(broker);
}

/// The control socket's folder is created, and the socket file has mode 0660
/// from the start.
#[test]
fn control_socket_folder_is_created_and_mode_is_0660() {
    let dir = test_dir("lcmode");
    let control = dir.join("run/sockbroker/control.sock");
    let broker = Broker::builder("lcmode").dir(dir).control(control.clone()).start();
    let meta = std::fs::symlink_metadata(&control).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let mut client = broker.client();
    bind_free_tcp(&mut client);
}

/// Out of descriptors, the broker cannot accept connections: it must wait
/// (not spin on a listener that stays readable, logging each failure), and
/// serve again once descriptors are free.
#[test]
fn descriptor_exhaustion_does_not_spin() {
    raise_nofile();
    // 0-2, the signalfd and the control socket leave room for a few clients.
    let broker = Broker::builder("lcemfile").nofile(10).start();
    let clients: Vec<_> = (0..12).map(|_| connect(&broker.control)).collect();
    wait_until(Duration::from_secs(20), "descriptor table full", || broker.open_fds().len() >= 10);
    // Half a second of exhaustion (the condition under test, not a wait for
    // something to happen).
    std::thread::sleep(Duration::from_millis(500));
    let log = broker.log_text();
    let failed: Vec<_> = log.lines().filter(|l| l.contains("accept failed")).collect();
    // A spinning broker fails thousands of times in that half second; one
    // that backs off, a handful (a generous bound for a loaded machine).
    assert!(!failed.is_empty() && failed.len() <= 100, "{} accept failures: the broker spins", failed.len());
    // One warning per episode of exhaustion, retries at debug level. (A
    // descriptor the broker frees meanwhile, such as the one that sent
    // READY=1, ends an episode: the next failure starts another.)
    let warned = failed.iter().filter(|l| l.contains("WARN")).count();
    let episodes = 1 + log.lines().filter(|l| l.contains("accepting connections again")).count();
    assert_eq!(warned, episodes, "{log}");
    drop(clients);
    let (reply, fds) = rpc(
        &broker.control,
        &bind_request(1, json!({"address": "127.0.0.1", "port": held_port(&broker.control, "tcp")})),
    );
    assert_eq!(reply["result"], true, "{reply}");
    assert_eq!(fds.len(), 1);
}

/// Text from a request (method, address, path, name) cannot forge log
/// lines: control characters are escaped, one record stays one line, both
/// in the plain format and in the journal's (`<N>` prefixes, where journald
/// would make each line an entry of its own).
#[test]
fn requests_cannot_forge_log_lines() {
    for journal in [false, true] {
        // JOURNAL_STREAM names stderr (the log file) when the broker starts.
        let prelude = if journal { r#"export JOURNAL_STREAM="$(stat -L -c %d:%i /proc/self/fd/2)""# } else { "" };
        let broker = Broker::builder("lcforge").prelude(prelude).env("RUST_LOG", "info").start();
        let forged = "\n[FORGED] pid=1 bind: ok";
        let path = format!("{}/x{forged}", broker.dir.display());
        let requests = [
            json!({"jsonrpc": "2.0", "method": format!("m{forged}"), "id": 1}),
            json!({"jsonrpc": "2.0", "method": "bind", "params": [{"address": format!("a{forged}"), "port": 1}], "id": 2}),
            json!({"jsonrpc": "2.0", "method": "bind", "params": [{"name": format!("n{forged}")}], "id": 3}),
            json!({"jsonrpc": "2.0", "method": "bind", "params": [{"type": "unix", "path": format!("/nonexistent/dir{forged}")}], "id": 4}),
            json!({"jsonrpc": "2.0", "method": "bind", "params": [{"type": "unix", "path": path}], "id": 5}),
        ];
        for r in &requests {
            let (reply, _) = rpc(&broker.control, r.to_string().as_bytes());
            assert!(reply.get("error").is_some() || reply["result"] == true, "{reply}");
        }
        let log = broker.log_text();
        let start = if journal { "<" } else { "[" };
        assert!(
            log.lines().all(|l| l.starts_with(start)),
            "a line not made by the logger (journal: {journal}):\n{log}"
        );
        assert!(log.lines().filter(|l| l.contains("[FORGED]")).count() >= requests.len(), "{log}");
    }
}

/// The broker outlives its log: when stderr's reader goes away (journald
/// restarting, say), logging fails silently and every socket stays served.
#[test]
fn broker_survives_its_log_going_away() {
    let mut broker = Broker::builder("lcstderr").stderr_pipe().start();
    let control = broker.control.clone();
    drop(broker.child.stderr.take());
    for _ in 0..3 {
        let (reply, fds) =
            rpc(&control, &bind_request(1, json!({"address": "127.0.0.1", "port": held_port(&control, "tcp")})));
        assert_eq!(reply["result"], true, "{reply}");
        assert_eq!(fds.len(), 1);
    }
    assert!(broker.child.try_wait().unwrap().is_none(), "the broker died when its log went away");
    assert_eq!(broker.stop().code(), Some(0));
}

/// For a user other than root, with nothing configured, `serve` and the
/// clients agree on $XDG_RUNTIME_DIR/sockbroker/control.sock.
#[test]
fn default_path_for_a_user_is_under_xdg_runtime_dir() {
    use std::os::unix::fs::chown;
    assert!(nix::unistd::geteuid().is_root(), "needs root to run the broker as another user (setpriv)");
    let dir = test_dir("lcdefault");
    let nobody = 65534;
    chown(&dir, Some(nobody), Some(nobody)).unwrap();
    let runtime = dir.join("xdg");
    std::fs::create_dir(&runtime).unwrap();
    chown(&runtime, Some(nobody), Some(nobody)).unwrap();
    let control = runtime.join("sockbroker/control.sock");
    let broker = Broker::builder("lcdefault")
        .dir(dir.clone())
        .control(&control)
        .no_control_flag()
        .exec_under("setpriv --reuid=65534 --regid=65534 --clear-groups")
        .env_remove("SOCKBROKER_SOCKET")
        .env_remove("MULTIBINDER_SOCK")
        .env("XDG_RUNTIME_DIR", runtime.to_str().unwrap())
        .start();
    let as_nobody = |cmd: &mut Command| {
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
            .env_remove("SOCKBROKER_SOCKET")
            .env_remove("MULTIBINDER_SOCK")
            .env("XDG_RUNTIME_DIR", &runtime)
            .stdin(Stdio::null());
    };
    assert!(std::fs::symlink_metadata(&control).unwrap().file_type().is_socket());

    let port = held_port(&control, "tcp");
    let mut bind = Command::new("setpriv");
    as_nobody(&mut bind);
    let out = bind.args(["bind", &format!("tcp://127.0.0.1:{port}")]).output_within(COMMAND_TIMEOUT).unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).starts_with(&format!("tcp://127.0.0.1:{port}: received socket inode")));

    // A broker that is not root cannot bind a privileged port: multibinder's
    // own example of a bind failure, word for word.
    let unprivileged: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .map_or(1024, |t| t.trim().parse().unwrap_or(1024));
    let (reply, fds) = rpc(&control, &multibinder_bind_request("127.0.0.1", 80));
    if unprivileged > 80 {
        assert_rpc_error(&reply, &fds, 10000, &["Could not bind: tcp://127.0.0.1:80: Permission denied (os error 13)"]);
    } else {
        // This kernel lets any user bind port 80 (ip_unprivileged_port_start
        // is {unprivileged}): the refusal cannot be shown; a bind must then
        // not be refused for permission.
        assert!(!reply.to_string().contains("Permission denied"), "unprivileged_port_start {unprivileged}: {reply}");
    }
    drop(broker);
}
