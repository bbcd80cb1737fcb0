//! The configuration file through the real binary: `check`, declared sockets
//! at start, and live reload (control method and SIGHUP).

use crate::common;

use std::net::TcpStream;
use std::os::fd::AsFd;

use common::*;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn check_reports_every_problem_with_its_place_and_key() {
    let dir = test_dir("checkbad");
    let out = check(
        &dir,
        r#"[control]
mode = "0999"
owner = "no-such-user-sbt"

[[socket]]
name = "web"
listen = "tcp://127.0.0.1:70000"

[[socket]]
name = "web"
listen = "unix:@sbt-a"

[[socket]]
name = "other"
listen = "unix:@sbt-a"

[[allow]]
group = "no-such-group-sbt"
on_demand = ["tcp://127.0.0.1:9-8"]
"#,
    );
    let err = stderr(&out);
    assert!(!out.status.success(), "{}", output_text(&out));
    let file = dir.join("check.toml");
    let f = file.display();
    for expected in [
        format!("{f}:2:8: control.mode: '0999' is not a mode"),
        format!("{f}:3:9: control.owner: unknown user 'no-such-user-sbt'"),
        format!("{f}:7:10: socket[0].listen: port 70000 is out of range (1-65535)"),
        format!("{f}:10:8: socket[1].name: name 'web' is already declared on line 6"),
        format!("{f}:15:10: socket[2].listen: unix:@sbt-a is already declared on line 11"),
        format!("{f}:18:9: allow[0].group: unknown group 'no-such-group-sbt'"),
        format!("{f}:19:14: allow[0].on_demand[0]: 'tcp://127.0.0.1:9-8': port out of range"),
        format!("{f}: 7 problems"),
    ] {
        assert!(err.contains(&expected), "missing {expected:?} in:\n{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_names_unknown_keys_and_bad_addresses() {
    let dir = test_dir("checkkeys");
    let out = check(&dir, "[[socket]]\nname = \"a\"\nlisten = \"tcp://127.0.0.1:80\"\nbaklog = 5\n");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("check.toml:4:1: socket[0].baklog: unknown field `baklog`, expected one of"), "{err}");

    let out = check(&dir, "[[socket]]\nname = \"a\"\nlisten = \"tcp://localhost:80\"\n");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("check.toml:3:10: socket[0].listen: 'localhost:80': not ADDRESS:PORT"),
        "{}",
        stderr(&out)
    );

    let out = check(&dir, "[[socket]]\nname = \"a\"\nlisten = \"tcp://127.0.0.1:80\"\nbacklog = \"many\"\n");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("check.toml:4:11: socket[0].backlog: invalid type: string"), "{}", stderr(&out));

    let out = check(&dir, "[control\n");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("check.toml:1:"), "{}", stderr(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_accepts_a_good_file() {
    let dir = test_dir("checkgood");
    let out = check(
        &dir,
        r#"[control]
mode = "0660"
group = "nogroup"

[[socket]]
name = "https"
listen = "tcp://[::]:443"
backlog = 4096
ipv6_only = false

[[allow]]
group = "nogroup"
sockets = ["https"]
on_demand = ["tcp://127.0.0.1:8000-8999"]
"#,
    );
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 declared sockets, 1 allow rules)"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn serve_refuses_an_invalid_file() {
    let dir = test_dir("servebad");
    let config = dir.join("bad.toml");
    std::fs::write(&config, "[[socket]]\nname = \"x\"\nlisten = \"tcp://127.0.0.1:0\"\n").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--control", dir.join("c.sock").to_str().unwrap(), "--config", config.to_str().unwrap()])
        .env_remove("NOTIFY_SOCKET")
        .output_within(COMMAND_TIMEOUT)
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("bad.toml:3:10: socket[0].listen: tcp://127.0.0.1:0: port 0 is refused"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.join("c.sock").exists(), "no control socket for a broker that did not start");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn declared(port: u16, dir_tag: &str) -> String {
    format!(
        r#"[[socket]]
name = "web"
listen = "tcp://127.0.0.1:{port}"
backlog = 64

[[socket]]
name = "local"
listen = "unix:@sbt-{dir_tag}-{pid}"
"#,
        pid = std::process::id()
    )
}

#[track_caller]
fn start_declared(name: &str) -> (Broker, u16) {
    Broker::builder(name).start_on_free_port(|port| declared(port, name))
}

#[test]
fn declared_sockets_are_held_from_the_start_under_name_and_key() {
    let (broker, port) = start_declared("decl");
    // Held before anyone asked: the kernel queues a connection already.
    let _early = TcpStream::connect(("127.0.0.1", port)).expect("declared socket listens from the start");
    let mut client = broker.client();
    let by_name = client.bind_name("web").unwrap();
    let by_key = client.bind(&format!("tcp://127.0.0.1:{port}").parse().unwrap()).unwrap();
    assert_eq!(inode(by_name.as_fd()), inode(by_key.as_fd()));
    assert!(is_cloexec(by_name.as_fd()));
    let (queued, backlog) = sockbroker::socket::accept_queue(by_name.as_fd()).unwrap();
    assert_eq!((queued, backlog), (1, 64));
    let local = client.bind_name("local").unwrap();
    let abstract_key = format!("unix:@sbt-decl-{}", std::process::id());
    assert_eq!(inode(local.as_fd()), inode(client.bind(&abstract_key.parse().unwrap()).unwrap().as_fd()));
    assert!(broker.log_text().contains("('web'): opened, declared at"), "{}", broker.log_text());
}

#[test]
fn every_descriptor_the_broker_holds_is_cloexec() {
    let (broker, _) = start_declared("declcloexec");
    // The client stays connected, so its connection is counted for sure.
    let mut client = broker.client();
    client.bind(&format!("unix:@sbt-cloexec-{}", std::process::id()).parse().unwrap()).unwrap();
    let sockets: Vec<(i32, String)> = broker.open_fds().into_iter().filter(|(_, t)| t.starts_with("socket:")).collect();
    // Distinct sockets: the duplicate that carried the reply may not be
    // closed yet when the client already has it.
    let mut inodes: Vec<&String> = sockets.iter().map(|(_, t)| t).collect();
    inodes.sort();
    inodes.dedup();
    assert_eq!(inodes.len(), 5, "control, a connection, two declared, one on demand: {sockets:?}");
    let mut checked = 0;
    for (fd, _) in &sockets {
        // That duplicate may also vanish between the listing and this read.
        let Ok(info) = std::fs::read_to_string(format!("/proc/{}/fdinfo/{fd}", broker.pid())) else { continue };
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap().trim();
        let flags = u32::from_str_radix(flags, 8).unwrap();
        assert_ne!(flags & nix::libc::O_CLOEXEC as u32, 0, "fd {fd} without O_CLOEXEC: {info}");
        checked += 1;
    }
    assert!(checked >= 5, "{sockets:?}");
}

fn broker_holds(broker: &Broker, ino: u64) -> bool {
    broker.open_fds().iter().any(|(_, t)| *t == format!("socket:[{ino}]"))
}

#[test]
fn reload_adds_removes_and_keeps_sockets() {
    let (broker, port) = start_declared("reload");
    let mut client = broker.client();
    let web = client.bind_name("web").unwrap();
    let web_ino = inode(web.as_fd());
    let local = client.bind_name("local").unwrap();
    let local_ino = inode(local.as_fd());
    assert!(broker_holds(&broker, web_ino));

    // New file: "web" removed, "local" kept under a new name, "extra" added.
    let pid = std::process::id();
    broker.write_config(&format!(
        "[[socket]]\nname = \"renamed\"\nlisten = \"unix:@sbt-reload-{pid}\"\n\n\
         [[socket]]\nname = \"extra\"\nlisten = \"unix:@sbt-reload-extra-{pid}\"\n"
    ));
    let out = broker.cli(&["reload"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "reloaded: 1 opened, 1 closed, 1 kept, 0 rules");

    let err = client.bind_name("web").unwrap_err();
    assert_eq!(err.code(), Some(10001), "{err}");
    assert!(!broker_holds(&broker, web_ino), "the broker closed its copy of the removed socket");
    // The consumer's copy is untouched: it still listens and accepts.
    let listener = std::net::TcpListener::from(web);
    let _conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    listener.accept().expect("the consumer keeps accepting on its copy");

    assert_eq!(inode(client.bind_name("renamed").unwrap().as_fd()), local_ino, "kept socket, same kernel socket");
    assert_eq!(client.bind_name("local").unwrap_err().code(), Some(10001));
    client.bind_name("extra").unwrap();
}

#[test]
fn invalid_reload_changes_nothing() {
    let (broker, port) = start_declared("badreload");
    let mut client = broker.client();
    let before = inode(client.bind_name("web").unwrap().as_fd());

    broker.write_config("[[socket]]\nname = \"web\"\nlisten = \"tcp://127.0.0.1:99999\"\n");
    let out = broker.cli(&["reload"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("socket[0].listen: port 99999 is out of range"), "{err}");
    assert!(err.contains("code 10005"), "{err}");
    assert_eq!(inode(client.bind_name("web").unwrap().as_fd()), before);

    // The same by SIGHUP: the log and systemd's STATUS say why.
    broker.drain_notify();
    broker.signal(nix::sys::signal::Signal::SIGHUP);
    let status = broker.wait_notify("STATUS=reload");
    assert!(status.starts_with("STATUS=reload failed, old configuration kept:"), "{status}");
    assert!(broker.log_text().contains("reload failed, keeping the configuration in force"));
    assert_eq!(inode(client.bind_name("web").unwrap().as_fd()), before);
    // It stays in the status line systemd shows, and in `status`, until a
    // reload succeeds.
    let line = broker.wait_notify("STATUS=serving");
    assert!(line.contains("; last reload failed, old configuration kept:"), "{line}");
    assert!(line.contains("port 99999 is out of range"), "{line}");
    let status = broker.cli(&["status"]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("reload:   FAILED, old configuration kept:"),
        "{}",
        output_text(&status)
    );
    let _ = port;

    // A declared socket that cannot be opened also changes nothing.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    broker.write_config(&format!(
        "[[socket]]\nname = \"web2\"\nlisten = \"tcp://127.0.0.1:{busy_port}\"\nreuse_addr = false\n"
    ));
    let out = broker.cli(&["reload"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("declared socket 'web2'"), "{}", stderr(&out));
    assert_eq!(inode(client.bind_name("web").unwrap().as_fd()), before, "old configuration still in force");
}

#[test]
fn sighup_reloads() {
    let (broker, _port) = start_declared("hup");
    broker.write_config(&format!("[[socket]]\nname = \"hup\"\nlisten = \"unix:@sbt-hup2-{}\"\n", std::process::id()));
    broker.signal(nix::sys::signal::Signal::SIGHUP);
    let status = broker.wait_notify("STATUS=reload");
    assert!(status.starts_with("STATUS=reloaded"), "{status}");
    broker.client().bind_name("hup").unwrap();
    assert_eq!(broker.client().bind_name("web").unwrap_err().code(), Some(10001));
}

/// Each fact once: a bad line's error names its file and its address once,
/// at start and on reload (the header does not repeat the file its problems
/// name).
#[test]
fn a_bad_line_names_its_file_and_address_once() {
    let dir = test_dir("badonce");
    let config = dir.join("bad.toml");
    let bad = "[[socket]]\nname = \"x\"\nlisten = \"tcp://127.0.0.1:0\"\n";
    std::fs::write(&config, bad).unwrap();
    let file = config.display().to_string();
    let address = "tcp://127.0.0.1:0";
    let out = std::process::Command::new(BIN)
        .args(["serve", "--control", dir.join("c.sock").to_str().unwrap(), "--config", &file])
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&format!("{file}:3:10: socket[0].listen: {address}: port 0 is refused")), "{err}");
    assert_eq!(err.matches(&file).count(), 1, "{err}");
    assert_eq!(err.matches(address).count(), 1, "{err}");

    // The same line on reload: the client's error names both once.
    let broker = Broker::builder("badoncereload").config("").start();
    broker.write_config(bad);
    let out = broker.cli(&["reload"]);
    assert!(!out.status.success(), "{}", output_text(&out));
    let err = stderr(&out);
    let file = broker.config_path().display().to_string();
    assert!(err.contains(&format!("{file}:3:10: socket[0].listen: {address}")), "{err}");
    assert_eq!(err.matches(&file).count(), 1, "{err}");
    assert_eq!(err.matches(address).count(), 1, "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
