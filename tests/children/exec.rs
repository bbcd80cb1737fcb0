//! `sockbroker exec` against real LISTEN_FDS consumers: the Python test
//! daemon and systemd-socket-proxyd.

use crate::common;

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::daemons::*;
use common::*;

fn exec_cmd(broker: &Broker, notify: &Notify) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("exec")
        .env("SOCKBROKER_SOCKET", &broker.control)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("RUST_LOG", "debug")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .stdin(Stdio::null());
    cmd
}

#[test]
fn child_gets_exactly_stdio_and_its_sockets() {
    let broker = Broker::start("exec_fds");
    let mut client = broker.client();
    let (web, web_fd) = bind_free_tcp(&mut client);
    let (plain, plain_fd) = bind_free_tcp(&mut client);
    let unix = format!("unix:{}", broker.dir.join("ctl.sock").display());
    let unix_fd = client.bind(&unix.parse().unwrap()).unwrap();
    let notify = Notify::bind(&broker.dir, "notify.sock");

    // A descriptor that `exec` itself inherits without close-on-exec, sitting
    // at fd 3, one of the slots: it must be moved out of the way, not passed.
    let leak_path = broker.dir.join("leaked-file");
    let leak = std::fs::File::create(&leak_path).unwrap();
    let leak_raw = leak.as_raw_fd();
    let mut cmd = exec_cmd(&broker, &notify);
    cmd.args(["--socket", &format!("web={web}"), "--socket", &plain, "--socket", &format!("ctl={unix}"), "--"])
        .arg(listen_http());
    // SAFETY: dup2 in the forked child only; async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::dup2(leak_raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = Reaped(cmd.spawn().unwrap());
    notify.wait_line(&mut child.0, "READY=1", START_TIMEOUT);
    let pid = child.0.id() as i32; // exec keeps the pid
                                   // A response means the daemon is in its accept loop, past the moment it
                                   // briefly holds the socket it sent READY=1 on; closing the connection
                                   // happens before EOF reaches us.
    let body = http_get(tcp_addr(&web)).unwrap();
    assert!(body.contains(&format!("pid={pid} ")), "{body}");

    let fds = open_fds(pid);
    let numbers: Vec<i32> = fds.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, vec![0, 1, 2, 3, 4, 5], "the child must hold stdio and its sockets only: {fds:?}");
    assert!(fds.iter().all(|(_, target)| !target.contains("leaked-file")), "{fds:?}");
    assert_eq!(proc_fd_inode(pid, 3), inode(web_fd.as_fd()), "fd 3 must be the broker's socket for {web}");
    assert_eq!(proc_fd_inode(pid, 4), inode(plain_fd.as_fd()), "fd 4 must be the broker's socket for {plain}");
    assert_eq!(proc_fd_inode(pid, 5), inode(unix_fd.as_fd()), "fd 5 must be the broker's socket for {unix}");

    let env = proc_environ(pid);
    assert_eq!(env_of(&env, "LISTEN_PID"), Some(pid.to_string()));
    assert_eq!(env_of(&env, "LISTEN_FDS").as_deref(), Some("3"));
    assert_eq!(env_of(&env, "LISTEN_FDNAMES").as_deref(), Some("web:unknown:ctl"));
    assert_eq!(env_of(&env, "LISTEN_FDS_FIRST_FD"), None);

    let body = http_get(tcp_addr(&plain)).unwrap();
    assert!(body.contains(&format!("pid={pid} ")), "{body}");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = wait_timeout(&mut child.0, Duration::from_secs(10)).expect("daemon did not stop");
    assert!(status.success(), "{status}");
    drop(leak);
}

#[test]
fn unreachable_broker_is_an_error_unless_fallback_bind() {
    let dir = test_dir("exec_nobroker");
    let missing = dir.join("no-broker.sock");
    let spec = format!("tcp://127.0.0.1:{}", free_port());
    let out = Command::new(BIN)
        .args(["exec", "--socket", &spec, "--", "true"])
        .env("SOCKBROKER_SOCKET", &missing)
        .output_within(COMMAND_TIMEOUT)
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot get sockets from the broker"), "{stderr}");
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    assert!(stderr.contains("--fallback-bind"), "{stderr}");

    let notify = Notify::bind(&dir, "notify.sock");
    let mut child = Reaped(
        Command::new(BIN)
            .args(["exec", "--fallback-bind", "--socket", &spec, "--"])
            .arg(listen_http())
            .env("SOCKBROKER_SOCKET", &missing)
            .env("NOTIFY_SOCKET", &notify.path)
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
            .spawn()
            .unwrap(),
    );
    notify.wait_line(&mut child.0, "READY=1", START_TIMEOUT);
    let body = http_get(tcp_addr(&spec)).unwrap();
    assert!(body.contains(&format!("pid={} ", child.0.id())), "{body}");
    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap();
    assert!(stderr.contains("may drop connections"), "{stderr}");

    // Each fact once: a fallback bind that fails (the port is the first
    // child's) names the address once, with the kernel's reason.
    let out = Command::new(BIN)
        .args(["exec", "--fallback-bind", "--socket", &spec, "--", "true"])
        .env("SOCKBROKER_SOCKET", &missing)
        .output_within(COMMAND_TIMEOUT)
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("binding {spec} directly: ")), "{stderr}");
    assert!(stderr.contains("Address already in use"), "{stderr}");
    assert_eq!(stderr.matches(&spec).count(), 1, "the address once: {stderr}");
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_arguments_are_clear_errors() {
    let dir = test_dir("exec_badargs");
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .env("SOCKBROKER_SOCKET", dir.join("x.sock"))
            .output_within(COMMAND_TIMEOUT)
            .unwrap();
        assert!(!out.status.success(), "{args:?} must fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run(&["exec", "--socket", "tcp://127.0.0.1:0", "--", "true"]).contains("port 0"));
    assert!(run(&["exec", "--socket", "bad:name=tcp://x", "--", "true"]).contains("unknown socket form"));
    assert!(run(&["exec", "--socket", "a\tb", "--", "true"]).contains("not a valid descriptor name"));
    let broker = Broker::start("exec_notfound");
    let out = Command::new(BIN)
        .args(["exec", "--socket", &format!("tcp://127.0.0.1:{}", free_port()), "--", "/no/such/daemon"])
        .env("SOCKBROKER_SOCKET", &broker.control)
        .output_within(COMMAND_TIMEOUT)
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/daemon: command not found"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn socket_proxyd_serves_the_brokers_socket() {
    let broker = Broker::start("exec_proxyd");
    let backend = http_backend("from-backend\n");
    let mut client = broker.client();
    let (spec, fd) = bind_free_tcp(&mut client);
    let notify = Notify::bind(&broker.dir, "notify.sock");
    let child = Reaped(
        exec_cmd(&broker, &notify)
            .args(["--socket", &spec, "--", SOCKET_PROXYD, &backend.to_string()])
            .stderr(std::fs::File::create(broker.dir.join("proxyd.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    // proxyd sends no READY=1, and needs none here: the socket listens
    // already (the broker's), so the request waits in its queue until
    // proxyd accepts it. A response proves proxyd runs on that socket.
    for _ in 0..3 {
        assert_eq!(http_get(tcp_addr(&spec)).unwrap(), "from-backend\n");
    }
    let pid = child.0.id() as i32;
    assert_eq!(proc_fd_inode(pid, 3), inode(fd.as_fd()));
    let env = proc_environ(pid);
    assert_eq!(env_of(&env, "LISTEN_PID"), Some(pid.to_string()));
    assert_eq!(env_of(&env, "LISTEN_FDS").as_deref(), Some("1"));
}
