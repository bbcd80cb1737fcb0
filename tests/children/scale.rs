//! A broker holding 10,000 sockets (GLB's scale: 50 HAProxy instances of 200
//! sockets) still answers `list` (paged), `status` and `metrics`, through
//! the library and the real CLI, with every socket accounted for.

use crate::common;

use common::storm;

use std::time::Instant;

use common::*;
use sockbroker::client::Client;

/// How many sockets the broker is made to hold.
const SOCKETS: usize = 10_000;
/// Sockets per `bind_many`: well under `limits.max_batch` and
/// `limits.max_request_bytes`.
const BATCH: usize = 1000;

/// Makes the broker hold `n` TCP listeners on 127.1.X.Y:PORT (the whole of
/// 127/8 is loopback, so one port serves thousands of addresses and no
/// other test's ports are touched); a batch whose port turns out taken is
/// asked for again on another port. Returns the addresses. The descriptors
/// the broker sends back are closed at once: the broker keeps its own.
pub fn hold_many(client: &mut Client, n: usize) -> Vec<String> {
    let mut held = Vec::with_capacity(n);
    let mut next = 0usize;
    let mut tries = 0;
    while held.len() < n {
        tries += 1;
        assert!(tries < 100, "could not hold {n} sockets: {} held after {tries} batches", held.len());
        let port = free_port();
        let want = (n - held.len()).min(BATCH);
        let specs: Vec<String> = (next..next + want)
            .map(|i| format!("tcp://127.{}.{}.{}:{port}", 1 + i / 62_500, i / 250 % 250, i % 250 + 1))
            .collect();
        let parsed: Vec<_> = specs.iter().map(|s| s.parse().unwrap()).collect();
        let results = client.bind_many(&parsed).unwrap();
        for (spec, result) in specs.into_iter().zip(results) {
            match result {
                Ok(_fd) => held.push(spec),
                // Another process took the port meanwhile: the next batch
                // makes up for it on another port.
                Err(e) if e.code == 10000 => {}
                Err(e) => panic!("bind_many {spec}: {e}"),
            }
        }
        next += want;
    }
    held
}

/// `sockbroker ARGS` against `broker`, its output read while it runs (a
/// 10,000-row table does not fit in a pipe), killed after a minute.
fn cli(broker: &Broker, args: &[&str]) -> std::process::Output {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut child = Command::new(BIN)
        .args(args)
        .env("SOCKBROKER_SOCKET", &broker.control)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        stdout.read_to_end(&mut buf).map(|_| buf)
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        stderr.read_to_end(&mut buf).map(|_| buf)
    });
    let status = wait_timeout(&mut child, std::time::Duration::from_secs(60)).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("sockbroker {args:?}: no answer within 60s");
    });
    std::process::Output { status, stdout: out.join().unwrap().unwrap(), stderr: err.join().unwrap().unwrap() }
}

#[test]
fn list_status_and_metrics_answer_with_ten_thousand_sockets() {
    raise_nofile();
    let broker = Broker::start("scale-10k");
    let mut client = broker.client();
    let started = Instant::now();
    let held = hold_many(&mut client, SOCKETS);
    eprintln!("holding {} sockets took {:?}", held.len(), started.elapsed());

    // The library pages through every entry.
    let listed = client.list().unwrap();
    assert_eq!(listed.len(), SOCKETS);
    let mut addresses: Vec<String> = listed.iter().map(|s| s.address.to_string()).collect();
    addresses.sort();
    let mut want = held.clone();
    want.sort();
    assert_eq!(addresses, want, "list names every held socket once");

    // The CLI: the table has a row per socket, --json an entry per socket.
    let out = cli(&broker, &["list"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), SOCKETS + 1, "a header and a row per socket");
    let out = cli(&broker, &["list", "--json"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(entries.as_array().map(Vec::len), Some(SOCKETS));

    let out = cli(&broker, &["status", "--json"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["sockets"], SOCKETS);

    let out = cli(&broker, &["metrics"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let count = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
    assert_eq!(count("sockbroker_socket_info{"), SOCKETS);
    assert_eq!(count("sockbroker_socket_accept_queue_length{"), SOCKETS);
    assert!(
        text.contains(&format!("sockbroker_sockets_held{{origin=\"on-demand\"}} {SOCKETS}\n")),
        "{}",
        &text[..2000]
    );
}

/// The scale benchmark's storm, small: a few `haproxy run` instances under
/// one broker, all reloaded at once, twice, under a client loop over every
/// socket: no request fails and every storm is served.
#[test]
fn a_reload_storm_fails_no_request() {
    raise_nofile();
    let dir = test_dir("scale-storm");
    let s = storm::Storm {
        bin: BIN.into(),
        haproxy: "/usr/sbin/haproxy".into(),
        dir: dir.join("storm"),
        instances: 4,
        sockets: 25,
        storms: 2,
        threads: 2,
        limit: std::time::Duration::from_secs(60),
    };
    let r = s.run();
    assert_eq!(r.failed, 0, "failed requests during the storms: {:?}", r.errors);
    assert_eq!(r.unfinished, 0, "storms not served within {:?}", s.limit);
    assert!(r.requests >= 20, "too little load to mean anything: {r:?}");
    assert_eq!(r.held, 100, "the broker holds every instance's sockets");
    assert_eq!(r.renders.len(), 8, "one render per instance and storm: {r:?}");
}

/// The shipped units are sized for 10,000 held sockets and 50 instances
/// (docs/systemd.md, "Sized for many instances per host").
#[test]
fn units_are_sized_for_ten_thousand_sockets() {
    let unit = |name: &str, key: &str| -> usize {
        let path = format!("{}/units/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap();
        let value = text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('='));
        value.unwrap_or_else(|| panic!("{path}: no {key}=")).trim().parse().unwrap()
    };
    let store = unit("sockbroker.service", "FileDescriptorStoreMax");
    let nofile = unit("sockbroker.service", "LimitNOFILE");
    let backlog = unit("sockbroker.socket", "Backlog");
    assert!(store >= SOCKETS, "FileDescriptorStoreMax={store}");
    assert!(nofile > 2 * SOCKETS, "LimitNOFILE={nofile}");
    assert!(backlog >= 50, "Backlog={backlog}");
    let limits = sockbroker::limits::Limits::default();
    assert!(limits.max_batch >= 200, "one instance's sockets in one bind_many");
}
