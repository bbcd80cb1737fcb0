//! Descriptor hygiene of the real broker: everything it holds is
//! close-on-exec, and its descriptor count does not grow with requests.

use crate::common;

use std::io::Write;
use std::os::fd::AsFd;
use std::time::Duration;

use common::*;
use serde_json::json;

/// Every descriptor the broker has open (beyond stdin, stdout, stderr, which
/// it inherits) is O_CLOEXEC: held sockets of every kind, the control
/// socket, client connections, the signalfd. Received descriptors are too.
#[test]
fn everything_the_broker_holds_is_cloexec() {
    let broker = Broker::start("fdcloexec");
    let mut client = broker.client();
    let (_, tcp) = bind_free_tcp(&mut client);
    let mut received = vec![tcp];
    for spec in [
        format!("unix:{}", broker.dir.join("a.sock").display()),
        format!("unix-dgram:{}", broker.dir.join("d.sock").display()),
        format!("unix-seqpacket:@sbt-cloexec-{}", std::process::id()),
    ] {
        received.push(client.bind(&spec.parse().unwrap()).unwrap());
    }
    let (reply, fds) = rpc(
        &broker.control,
        &bind_request(1, json!({"type": "udp", "address": "127.0.0.1", "port": held_port(&broker.control, "udp")})),
    );
    assert_eq!(reply["result"], true, "{reply}");
    received.extend(fds);
    // Keep a few connections open so their descriptors are checked too.
    let _open: Vec<_> = (0..3).map(|_| connect(&broker.control)).collect();
    let _partial = connect(&broker.control);
    (&_partial).write_all(b"{\"method\":").unwrap();
    // 5 held sockets, the control socket, 5 connections (the library client's too).
    let sockets = || broker.open_fds().iter().filter(|(_, t)| t.starts_with("socket:")).count();
    wait_until(Duration::from_secs(20), "connections accepted", || sockets() >= 5 + 1 + 5);

    let fds = broker.open_fds();
    // Descriptors this test process leaks to its children (the CI runner's,
    // say) were inherited by the broker, not opened by it.
    let me = std::process::id() as i32;
    let inherited: Vec<_> = open_fds(me)
        .into_iter()
        .filter(|(fd, _)| fdinfo_flags(me, *fd).is_some_and(|f| f & O_CLOEXEC_FLAG == 0))
        .collect();
    for (fd, target) in fds.iter().filter(|(fd, _)| *fd > 2) {
        if inherited.contains(&(*fd, target.clone())) {
            continue;
        }
        let flags = fdinfo_flags(broker.pid(), *fd).unwrap_or_else(|| panic!("no fdinfo for fd {fd} ({target})"));
        assert!(flags & O_CLOEXEC_FLAG != 0, "broker fd {fd} ({target}) is not O_CLOEXEC: flags {flags:o}");
    }
    for fd in &received {
        assert!(is_cloexec(fd.as_fd()), "received descriptor must be close-on-exec");
        let flags = fdinfo_flags(std::process::id() as i32, std::os::fd::AsRawFd::as_raw_fd(fd)).unwrap();
        assert!(flags & O_CLOEXEC_FLAG != 0);
    }
}

/// Requests over one persistent connection, `batch` at a time in one write.
fn persistent_load(control: &std::path::Path, requests: &[Vec<u8>], total: usize, batch: usize) -> usize {
    let stream = connect(control);
    let mut done = 0;
    let mut successes = 0;
    let mut i = 0;
    while done < total {
        let n = batch.min(total - done);
        let mut bytes = Vec::new();
        let mut want_ok = 0;
        for _ in 0..n {
            let r = &requests[i % requests.len()];
            want_ok += usize::from(!r.starts_with(b"{\"bad"));
            bytes.extend_from_slice(r);
            i += 1;
        }
        (&stream).write_all(&bytes).unwrap();
        let (replies, fds) = read_replies(&stream, n);
        let ok = replies.iter().filter(|r| r["result"] == true).count();
        assert_eq!(ok, want_ok, "successes in a batch");
        assert_eq!(fds.len(), ok, "one descriptor per success, none per error");
        successes += ok;
        done += n;
    }
    successes
}

/// After 100,000 requests (most over persistent connections, thousands on
/// a new connection each, some failing), the broker's descriptors are its
/// held sockets plus the overhead it had after warm-up.
#[test]
fn descriptor_count_is_stable_after_100k_requests() {
    raise_nofile();
    let broker = Broker::builder("fdleak").env("RUST_LOG", "info").start();
    let at_start = broker.fd_count_at_start();
    let mut client = broker.client();
    let mut requests = Vec::new();
    for i in 0..6u64 {
        let (spec, _) = bind_free_tcp(&mut client);
        requests.push(bind_request(i, json!({"spec": spec})));
    }
    let path = broker.dir.join("leak.sock");
    requests.push(bind_request(10, json!({"type": "unix", "path": path})));
    requests.push(bind_request(11, json!({"type": "unix", "path": format!("@sbt-leak-{}", std::process::id())})));
    requests.push(bind_request(
        12,
        json!({"type": "udp", "address": "127.0.0.1", "port": held_port(&broker.control, "udp")}),
    ));
    // Failures: bad params, unknown name, unknown method, bind failure. The
    // "bad" marker is a JSON key the broker ignores.
    requests.push(
        br#"{"bad":1,"jsonrpc":"2.0","method":"bind","params":[{"address":"127.0.0.1","port":0}],"id":20}"#.to_vec(),
    );
    requests.push(br#"{"bad":1,"jsonrpc":"2.0","method":"bind","params":[{"name":"nope"}],"id":21}"#.to_vec());
    requests.push(br#"{"bad":1,"jsonrpc":"2.0","method":"list","id":22}"#.to_vec());
    requests.push(
        format!(
            r#"{{"bad":1,"jsonrpc":"2.0","method":"bind","params":[{{"address":"192.0.2.1","port":{}}}],"id":23}}"#,
            free_port()
        )
        .into_bytes(),
    );
    drop(client);
    let held = 9;

    // Warm-up, then the overhead with no client connected.
    persistent_load(&broker.control, &requests, 1000, 16);
    let control = broker.control.clone();
    let (reply, _) = rpc(&control, &requests[0]);
    assert_eq!(reply["result"], true);
    // Once the warm-up connections are closed, the broker has what it started
    // with plus the sockets it holds: that is its fixed overhead.
    wait_until(Duration::from_secs(20), "warm-up connections closed", || broker.open_fds().len() == at_start + held);
    let overhead = broker.open_fds().len() - held;

    const THREADS: usize = 4;
    const PERSISTENT: usize = 24_000;
    const FRESH: usize = 1_000;
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let control = control.clone();
            let mut requests = requests.clone();
            requests.rotate_left(t);
            std::thread::spawn(move || {
                let mut n = persistent_load(&control, &requests, PERSISTENT, 16);
                for i in 0..FRESH {
                    let r = &requests[i % requests.len()];
                    let (reply, fds) = rpc(&control, r);
                    n += fds.len();
                    assert_eq!(fds.len(), usize::from(reply["result"] == true), "{reply}");
                }
                n
            })
        })
        .collect();
    let successes: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(THREADS * (PERSISTENT + FRESH), 100_000);
    assert!(successes > 50_000, "{successes} successes");

    let expected = held + overhead;
    wait_until(Duration::from_secs(30), "descriptor count back to held sockets + overhead", || {
        broker.open_fds().len() == expected
    });
    let fds = broker.open_fds();
    assert_eq!(fds.len(), expected, "{fds:?}");
}

/// Descriptors a client attaches to its request are not kept by the broker.
#[test]
fn descriptors_sent_to_the_broker_are_not_kept() {
    let broker = Broker::start("fdsent");
    let at_start = broker.fd_count_at_start();
    let port = held_port(&broker.control, "tcp");
    let request = bind_request(1, json!({"address": "127.0.0.1", "port": port}));
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    for _ in 0..20 {
        let stream = connect(&broker.control);
        let junk: Vec<_> = (0..10).map(|_| a.as_fd()).collect();
        let n = sockbroker::fd::send_with_fds(stream.as_fd(), &request, &junk).unwrap();
        assert_eq!(n, request.len());
        let (replies, fds) = read_replies(&stream, 1);
        assert_eq!(replies[0]["result"], true, "{}", replies[0]);
        assert_eq!(fds.len(), 1);
    }
    // The held socket, nothing more.
    wait_until(Duration::from_secs(20), "descriptors back to start + 1", || broker.open_fds().len() == at_start + 1);
}
