//! `sockbroker metrics`: the broker's metrics in the Prometheus text format,
//! checked by `promtool check metrics` (Debian package `prometheus`), with
//! numbers that move: a TCP socket's accept queue fills as connections are
//! left unaccepted and empties as they are accepted, hand-outs and requests
//! are counted, a refused peer is counted as a refusal.

use crate::common;

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::metrics::{promtool_check, sample};
use common::*;

fn metrics(broker: &Broker) -> String {
    let out = broker.cli(&["metrics"]);
    assert!(out.status.success(), "sockbroker metrics: {}", output_text(&out));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn accept_queue_rises_and_falls_and_promtool_agrees() {
    let broker = Broker::start("metrics-queue");
    let mut client = broker.client();
    let (spec, fd) = bind_free_tcp(&mut client);
    let listener = TcpListener::from(fd);
    let addr = listener.local_addr().unwrap();
    let label = format!("address=\"{spec}\"");

    let text = metrics(&broker);
    promtool_check(&text);
    assert_eq!(sample(&text, "sockbroker_socket_accept_queue_length", &[&label]), Some(0.0), "{text}");
    let backlog = sample(&text, "sockbroker_socket_accept_queue_backlog", &[&label]).expect("a backlog");
    assert!(backlog >= 1.0, "{text}");
    assert_eq!(sample(&text, "sockbroker_socket_handouts_total", &[&label]), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "sockbroker_socket_info", &[&label, "kind=\"tcp\"", "origin=\"on-demand\""]),
        Some(1.0),
        "{text}"
    );
    assert!(sample(&text, "sockbroker_requests_total", &["method=\"bind\"", "outcome=\"ok\""]) >= Some(1.0), "{text}");
    assert_eq!(sample(&text, "sockbroker_sockets_held", &["origin=\"on-demand\""]), Some(1.0), "{text}");

    // Three connections nobody accepts: the kernel completes the handshake
    // and queues them on the broker's listener (the one the test holds a
    // copy of).
    let waiting: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
    wait_until(Duration::from_secs(10), "three connections in the accept queue", || {
        sample(&metrics(&broker), "sockbroker_socket_accept_queue_length", &[&label]) == Some(3.0)
    });
    // The benches' sampler (sock_diag, as `ss -lt`) sees the same queue.
    assert_eq!(common::accept_queue::depth(addr.port()), 3);
    for _ in 0..3 {
        listener.accept().unwrap();
    }
    drop(waiting);
    let text = metrics(&broker);
    assert_eq!(sample(&text, "sockbroker_socket_accept_queue_length", &[&label]), Some(0.0), "{text}");
    assert_eq!(common::accept_queue::depth(addr.port()), 0);
    promtool_check(&text);
}

#[test]
fn refusals_and_unknown_methods_are_counted_in_closed_label_sets() {
    // The control socket open to everyone, no rule: nobody reaches the
    // broker and is refused by the allow rules.
    let broker = Broker::builder("metrics-refusals").config("[control]\nmode = \"0666\"\n").start();
    let out = broker.cli_as_nobody(&["metrics"]);
    assert!(!out.status.success(), "nobody may not read the metrics: {}", output_text(&out));
    assert!(output_text(&out).contains("code 10003"), "{}", output_text(&out));
    let mut client = broker.client();
    let err = client.call("no-such-method\"{}", serde_json::Value::Null).unwrap_err();
    assert_eq!(err.code(), Some(-32601), "{err}");

    let text = metrics(&broker);
    promtool_check(&text);
    assert_eq!(sample(&text, "sockbroker_request_refusals_total", &["method=\"metrics\""]), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "sockbroker_requests_total", &["method=\"metrics\"", "outcome=\"access_denied\""]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "sockbroker_requests_total", &["method=\"other\"", "outcome=\"method_not_found\""]),
        Some(1.0),
        "{text}"
    );
    assert!(!text.contains("no-such-method"), "a peer's method name never becomes a label:\n{text}");
    assert!(sample(&text, "sockbroker_clients_connected", &[]) >= Some(1.0), "{text}");
    assert!(sample(&text, "sockbroker_process_open_fds", &[]) > Some(0.0), "{text}");
}

#[test]
fn output_file_is_written_atomically_for_the_textfile_collector() {
    let broker = Broker::start("metrics-output");
    let path = broker.dir.join("textfile").join("sockbroker.prom");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    for _ in 0..2 {
        let out = broker.cli(&["metrics", "--output", path.to_str().unwrap()]);
        assert!(out.status.success(), "{}", output_text(&out));
    }
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("# TYPE sockbroker_requests_total counter"), "{text}");
    promtool_check(&text);
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("sockbroker.prom")], "no temporary file is left behind");

    let missing = broker.dir.join("no-such-dir").join("m.prom");
    let out = broker.cli(&["metrics", "--output", missing.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(output_text(&out).contains("no-such-dir"), "the error names the path: {}", output_text(&out));
}
