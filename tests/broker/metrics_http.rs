//! `[metrics] socket = "NAME"`: the broker serves `GET /metrics` over HTTP
//! on a declared socket, from a thread of its own, so a scraper that sends
//! nothing holds up neither the control socket nor the next scrape for
//! longer than the read timeout.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// One HTTP exchange: the status line and the body.
fn http(port: u16, request: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP head in {out:?}"));
    (head.lines().next().unwrap_or("").to_string(), body.to_string())
}

/// The `# TYPE` lines: the families, whatever their values.
fn families(text: &str) -> Vec<String> {
    text.lines().filter(|l| l.starts_with("# TYPE ")).map(str::to_string).collect()
}

#[test]
fn get_metrics_is_served_on_the_declared_socket() {
    let (mut broker, port) = Broker::builder("metrics-http").unit_capabilities().start_on_free_port(|port| {
        format!(
            "[[socket]]\nname = \"metrics\"\nlisten = \"tcp://127.0.0.1:{port}\"\n\n[metrics]\nsocket = \"metrics\"\n"
        )
    });
    let (status, body) = http(port, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    let cli = broker.cli(&["metrics"]);
    assert!(cli.status.success(), "{}", output_text(&cli));
    let cli = String::from_utf8(cli.stdout).unwrap();
    assert!(!families(&body).is_empty(), "{body}");
    assert_eq!(families(&body), families(&cli), "the same families as `sockbroker metrics`");
    assert!(body.contains("sockbroker_sockets_held{origin=\"config\"} 1"), "{body}");

    let (status, _) = http(port, "GET / HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _) = http(port, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");

    // A scraper that connects and sends nothing: the control socket answers
    // meanwhile, and the next scrape is served once the read timeout (2 s)
    // has closed the silent one.
    let silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let status = broker.cli(&["status"]);
    assert!(status.status.success(), "{}", output_text(&status));
    let started = Instant::now();
    let (status, _) = http(port, "GET /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(started.elapsed() < Duration::from_secs(15), "served after {:?}", started.elapsed());
    drop(silent);
    let serving = format!("serving GET /metrics on tcp://127.0.0.1:{port} ('metrics')");
    assert_eq!(broker.log_text().matches(&serving).count(), 1);

    // The socket is held like any declared one: after a re-exec the new
    // process serves it again, on the same socket.
    let inode_before = broker.cli(&["list", "--json"]);
    let accepted = |text: &str| -> f64 {
        common::metrics::sample(text, "sockbroker_connections_accepted_total", &[]).unwrap_or_else(|| panic!("{text}"))
    };
    let before = accepted(&String::from_utf8(broker.cli(&["metrics"]).stdout).unwrap());
    assert!(before >= 5.0, "{before} connections counted before the re-exec");
    broker.signal(nix::sys::signal::Signal::SIGUSR1);
    wait_ready(&broker.notify, &mut broker.child, "broker after SIGUSR1");
    let (status, body) = http(port, "GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    // The counters went to the new process with the sockets.
    assert!(accepted(&body) > before, "{} after the re-exec, {before} before", accepted(&body));
    assert_eq!(broker.log_text().matches(&serving).count(), 2);
    let inode_after = broker.cli(&["list", "--json"]);
    let inode = |out: &std::process::Output| {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0]["inode"].clone()
    };
    assert_eq!(inode(&inode_before), inode(&inode_after));
    assert!(!inode(&inode_before).is_null(), "{}", output_text(&inode_before));
}

#[test]
fn the_metrics_socket_must_be_a_declared_stream_socket() {
    let dir = test_dir("metrics-http-bad");
    for (toml, name) in [
        ("[metrics]\nsocket = \"nope\"\n", "nope"),
        ("[[socket]]\nname = \"u\"\nlisten = \"udp://127.0.0.1:9\"\n[metrics]\nsocket = \"u\"\n", "u"),
    ] {
        let out = check(&dir, toml);
        assert!(!out.status.success(), "{toml}");
        let err = output_text(&out);
        assert!(err.contains("metrics.socket"), "{err}");
        assert!(err.contains(&format!("'{name}' is not the name of a declared TCP or UNIX stream socket")), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
