//! `list`, `status`, batch bind and `release` through the real binary.

use crate::common;

use std::net::TcpStream;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use common::*;
use sockbroker::introspect::{SocketInfo, Status};
use sockbroker::spec::SocketSpec;

fn list(broker: &Broker) -> Vec<SocketInfo> {
    let (v, _) = broker.client().call("list", serde_json::Value::Null).unwrap();
    serde_json::from_value(v).unwrap()
}

#[test]
fn list_reports_each_socket_and_the_accept_queue() {
    let pid = std::process::id();
    let (broker, port) = Broker::builder("list").start_on_free_port(|port| {
        format!("[[socket]]\nname = \"web\"\nlisten = \"tcp://127.0.0.1:{port}\"\nbacklog = 50\n")
    });
    let mut client = broker.client();
    client.bind_name("web").unwrap();
    client.bind_name("web").unwrap();
    let dgram: SocketSpec = format!("unix-dgram:@sbt-list-{pid}").parse().unwrap();
    client.bind(&dgram).unwrap();

    // Two connections wait in the accept queue: nobody accepts them.
    let _c1 = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let _c2 = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let web = loop {
        let all = list(&broker);
        let web = all.iter().find(|s| s.name.as_deref() == Some("web")).unwrap().clone();
        if web.queued == Some(2) || Instant::now() > deadline {
            break web;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(web.address.to_string(), format!("tcp://127.0.0.1:{port}"));
    assert_eq!((web.kind.as_str(), web.queued, web.backlog, web.handed_out), ("tcp", Some(2), Some(50), 2));
    assert_eq!((web.last_pid, web.last_uid), (Some(pid as i32), Some(0)));
    assert_eq!(serde_json::to_value(web.origin).unwrap(), "config");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(web.created <= now && web.created + 60 > now);

    let all = list(&broker);
    let d = all.iter().find(|s| s.address == dgram.key).unwrap();
    assert_eq!((d.name.as_deref(), d.kind.as_str(), d.queued, d.handed_out), (None, "unix-dgram", None, 1));
    assert_eq!(serde_json::to_value(d.origin).unwrap(), "on-demand");

    // The CLI: an aligned table, and the same data as JSON.
    let out = broker.cli(&["list"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("NAME") && lines[1].starts_with("web "), "{table}");
    let col = lines[0].find("ADDRESS").unwrap();
    assert!(
        lines.iter().skip(1).all(|l| l[col..].starts_with("tcp://") || l[col..].starts_with("unix-dgram:")),
        "{table}"
    );
    assert!(lines[1].contains("config") && lines[1].contains(" 2/50 "), "{table}");
    let out = broker.cli(&["list", "--json"]);
    let parsed: Vec<SocketInfo> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(parsed.len(), 2);
}

#[test]
fn status_reports_version_uptime_and_counts() {
    let broker = Broker::builder("status").config("[[allow]]\nuser = \"nobody\"\nsockets = [\"x\"]\n").start();
    broker.client().bind(&format!("unix:@sbt-status-{}", std::process::id()).parse().unwrap()).unwrap();
    let (v, _) = broker.client().call("status", serde_json::Value::Null).unwrap();
    let s: Status = serde_json::from_value(v).unwrap();
    assert_eq!(s.version, env!("CARGO_PKG_VERSION"));
    assert_eq!((s.pid, s.sockets, s.rules, s.handed_out), (broker.pid() as u32, 1, 1, 1));
    assert_eq!(s.by_origin.get("on-demand"), Some(&1));
    assert_eq!(s.config, broker.config_path().display().to_string());
    assert!(s.uptime < 60);
    let out = broker.cli(&["status"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with(&format!("sockbroker {} (pid {})", env!("CARGO_PKG_VERSION"), broker.pid())), "{text}");
    assert!(text.contains("sockets:  1 held (1 on-demand)"), "{text}");
}

#[test]
fn batch_bind_splits_descriptors_under_the_scm_limit() {
    let broker = Broker::start("batch");
    let pid = std::process::id();
    // 300 sockets: more than one SCM_RIGHTS message can carry (253).
    let specs: Vec<SocketSpec> = (0..301).map(|i| format!("unix:@sbt-batch-{pid}-{i}").parse().unwrap()).collect();
    let mut client = broker.client();
    let results = client.bind_many(&specs).unwrap();
    assert_eq!(results.len(), 301);
    for (spec, result) in specs.iter().zip(&results) {
        let fd = result.as_ref().unwrap_or_else(|e| panic!("{spec}: {e}"));
        assert!(is_cloexec(fd.as_fd()));
        // Each descriptor is the one the broker holds for that spec, in order.
        assert_eq!(inode(fd.as_fd()), inode(client.bind(spec).unwrap().as_fd()), "{spec}");
    }
    // A refused item is reported in its place, without a descriptor.
    let mixed =
        vec![specs[0].clone(), format!("unix:{}", broker.dir.join("no/such/dir.sock").display()).parse().unwrap()];
    let results = client.bind_many(&mixed).unwrap();
    assert!(results[0].is_ok());
    assert_eq!(results[1].as_ref().unwrap_err().code, 10000);
}

#[test]
fn release_closes_the_broker_copy_of_an_on_demand_socket_only() {
    let (broker, port) = Broker::builder("release")
        .start_on_free_port(|port| format!("[[socket]]\nname = \"web\"\nlisten = \"tcp://127.0.0.1:{port}\"\n"));
    let _ = port;
    let mut client = broker.client();
    let spec: SocketSpec = format!("unix:@sbt-release-{}", std::process::id()).parse().unwrap();
    let fd = client.bind(&spec).unwrap();
    let ino = inode(fd.as_fd());
    let held = |b: &Broker| b.open_fds().iter().any(|(_, t)| *t == format!("socket:[{ino}]"));
    assert!(held(&broker));
    client.release(&spec).unwrap();
    assert!(!held(&broker), "the broker closed its copy");
    assert!(list(&broker).iter().all(|s| s.address != spec.key));
    // The client's copy still listens.
    std::os::unix::net::UnixStream::connect_addr(
        &<std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
            format!("sbt-release-{}", std::process::id()).as_bytes(),
        )
        .unwrap(),
    )
    .expect("the client's copy keeps listening");

    let err = client.release(&spec).unwrap_err();
    assert_eq!(err.code(), Some(10004));
    let out = broker.cli(&["release", &format!("tcp://127.0.0.1:{port}")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only sockets created on demand can be released"));
    client.bind_name("web").unwrap();
}
