//! The control protocol against the real broker: error codes and messages,
//! framing (split, concatenated, oversized requests), and clients that stall,
//! vanish or idle.

use crate::common;

use std::io::Write;
use std::os::fd::AsFd;
use std::time::Duration;

use common::*;
use serde_json::json;

/// Every bad input gets its JSON-RPC code, a message naming the problem, the
/// request's id when it had one, and never a descriptor.
#[test]
fn bad_requests_get_the_right_code_and_a_message_naming_the_problem() {
    let broker = Broker::start("proterr");
    let long_path = format!("/{}", "a".repeat(120));
    #[rustfmt::skip]
    let cases: Vec<(Vec<u8>, i64, Vec<&str>)> = vec![
        // Not JSON.
        (b"{\"jsonrpc\":\"2.0\", nope}".to_vec(), -32700, vec!["Parse error"]),
        (b"]".to_vec(), -32700, vec!["Parse error"]),
        (b"\xff\xfe{}".to_vec(), -32700, vec!["Parse error"]),
        ("[".repeat(1000).into_bytes(), -32700, vec!["Parse error", "recursion limit"]),
        // JSON, but not a request.
        (b"[1,2]".to_vec(), -32600, vec!["not a JSON object"]),
        (b"\"bind\"".to_vec(), -32600, vec!["not a JSON object"]),
        (br#"{"jsonrpc":"2.0","id":7}"#.to_vec(), -32600, vec!["\"method\""]),
        (br#"{"jsonrpc":"2.0","method":5,"id":7}"#.to_vec(), -32600, vec!["\"method\" must be a string"]),
        (br#"{"jsonrpc":"2.0","method":"bind","params":"x","id":7}"#.to_vec(), -32600, vec!["\"params\""]),
        // No such method.
        (br#"{"jsonrpc":"2.0","method":"frobnicate","params":[],"id":7}"#.to_vec(), -32601, vec!["Method not found", "frobnicate"]),
        // Invalid params.
        (bind_request(7, json!({"address": "nope", "port": 8000})), -32602, vec!["'nope'", "not an IP address"]),
        (bind_request(7, json!({"address": "127.0.0.256", "port": 8000})), -32602, vec!["'127.0.0.256'"]),
        (bind_request(7, json!({"address": "::g", "port": 8000})), -32602, vec!["'::g'"]),
        (bind_request(7, json!({"address": "127.0.0.1", "port": 70000})), -32602, vec!["port 70000", "out of range"]),
        (bind_request(7, json!({"address": "127.0.0.1", "port": -1})), -32602, vec!["port -1", "out of range"]),
        (bind_request(7, json!({"address": "127.0.0.1", "port": 0})), -32602, vec!["tcp://127.0.0.1:0", "port 0"]),
        (bind_request(7, json!({"address": "127.0.0.1"})), -32602, vec!["\"port\""]),
        (bind_request(7, json!({"port": 8000})), -32602, vec!["\"address\""]),
        (bind_request(7, json!({"address": "127.0.0.1", "port": "8000"})), -32602, vec!["\"port\": invalid type", "string \"8000\""]),
        (bind_request(7, json!({"address": 127, "port": 8000})), -32602, vec!["\"address\": invalid type"]),
        (bind_request(7, json!({"address": "127.0.0.1", "port": 8000.5})), -32602, vec!["\"port\": invalid type"]),
        (bind_request(7, json!({"address": "127.0.0.1", "port": 8000, "backlog": -5})), -32602, vec!["backlog -5"]),
        (bind_request(7, json!({"address": "127.0.0.1", "port": 8000, "backlog": "big"})), -32602, vec!["\"backlog\": invalid type"]),
        (bind_request(7, json!({"type": "unix", "path": "relative/x.sock"})), -32602, vec!["relative/x.sock", "absolute"]),
        (bind_request(7, json!({"type": "unix"})), -32602, vec!["\"path\""]),
        (bind_request(7, json!({"type": "unix", "path": "/tmp/a\u{0}b"})), -32602, vec!["NUL"]),
        (bind_request(7, json!({"type": "unix", "path": "@"})), -32602, vec!["'@'", "empty"]),
        (bind_request(7, json!({"type": "unix", "path": long_path})), -32602, vec!["longer than 107 bytes"]),
        (bind_request(7, json!({"type": "sctp", "address": "127.0.0.1", "port": 8000})), -32602, vec!["'sctp'"]),
        (bind_request(7, json!({"spec": "tcp://127.0.0.1:0"})), -32602, vec!["port 0"]),
        (bind_request(7, json!({"spec": "http://127.0.0.1:80"})), -32602, vec!["unknown socket form"]),
        (bind_request(7, json!({"spec": "tcp://::1:80"})), -32602, vec!["'::1:80'", "brackets"]),
        (bind_request(7, json!({"spec": "unix:rel"})), -32602, vec!["'rel'", "absolute"]),
        (bind_request(7, json!({"spec": 5})), -32602, vec!["\"spec\": invalid type"]),
        (br#"{"jsonrpc":"2.0","method":"bind","params":[],"id":7}"#.to_vec(), -32602, vec!["params"]),
        (br#"{"jsonrpc":"2.0","method":"bind","params":["x"],"id":7}"#.to_vec(), -32602, vec!["params"]),
        (br#"{"jsonrpc":"2.0","method":"bind","id":7}"#.to_vec(), -32602, vec!["params"]),
    ];
    for (request, code, needles) in &cases {
        let (reply, fds) = rpc(&broker.control, request);
        let shown = String::from_utf8_lossy(request);
        assert_eq!(reply["jsonrpc"], "2.0", "{shown} -> {reply}");
        assert_rpc_error(&reply, &fds, *code, needles);
        // Requests that are objects with an id get it back; the rest get null.
        let expected_id =
            if *code == -32700 || shown.starts_with('[') || shown.starts_with('"') { json!(null) } else { json!(7) };
        assert_eq!(reply["id"], expected_id, "{shown} -> {reply}");
    }
    // None of that hurt the broker.
    let mut client = broker.client();
    bind_free_tcp(&mut client);
}

/// The message of a bad-params error names the socket that was asked for.
#[test]
fn invalid_params_message_names_the_socket() {
    let broker = Broker::start("protname");
    let (reply, fds) = rpc(&broker.control, &bind_request(1, json!({"address": "127.0.0.1", "port": 99999})));
    assert_rpc_error(&reply, &fds, -32602, &["tcp 127.0.0.1 port 99999"]);
    let (reply, fds) = rpc(&broker.control, &bind_request(1, json!({"type": "udp", "address": "x", "port": 53})));
    assert_rpc_error(&reply, &fds, -32602, &["udp x port 53", "'x'"]);
}

/// A parse error cannot be resynchronised: the broker answers and closes.
#[test]
fn parse_error_closes_the_connection() {
    let broker = Broker::start("protparse");
    let stream = connect(&broker.control);
    (&stream).write_all(b"{\"method\": nope} {\"method\":\"bind\"}").unwrap();
    let rest = wait_eof(&stream, Duration::from_secs(20));
    let text = String::from_utf8(rest).unwrap();
    let mut lines = text.lines();
    let reply = json(lines.next().expect("an error reply before the close"));
    assert_eq!(reply["error"]["code"], -32700, "{text}");
    assert_eq!(lines.next(), None, "nothing may follow the parse error: {text}");
}

/// A request over 64 KiB gets -32600 naming the limit, and the connection is
/// closed; a request just under the limit is served.
#[test]
fn request_over_64k_is_refused_and_the_connection_closed() {
    let broker = Broker::start("protbig");
    let port = held_port(&broker.control, "tcp");
    // Just under the cap: served (unknown keys are ignored).
    let mut pad = 60 * 1024;
    let under = loop {
        let r = bind_request(1, json!({"address": "127.0.0.1", "port": port, "padding": "x".repeat(pad)}));
        if r.len() <= 64 * 1024 {
            break r;
        }
        pad -= 1024;
    };
    let stream = connect(&broker.control);
    (&stream).write_all(&under).unwrap();
    let (replies, fds) = read_replies(&stream, 1);
    assert_eq!(replies[0]["result"], true, "{}", replies[0]);
    assert_eq!(fds.len(), 1);

    // Over the cap, whether or not it would ever end.
    for over in [
        bind_request(2, json!({"address": "127.0.0.1", "port": port, "padding": "x".repeat(70 * 1024)})),
        format!("{{\"method\":\"bind\",\"params\":[{{\"padding\":\"{}", "y".repeat(100 * 1024)).into_bytes(),
    ] {
        let stream = connect(&broker.control);
        // The broker stops reading at the cap, so write from a thread: the
        // tail may never be read.
        let writer = {
            let s = stream.try_clone().unwrap();
            std::thread::spawn(move || {
                let _ = (&s).write_all(&over);
            })
        };
        let mut rest = Vec::new();
        let mut fds = Vec::new();
        // Read the one reply (with descriptors, if any were wrongly attached), then EOF.
        let (replies, got) = read_replies(&stream, 1);
        fds.extend(got);
        assert_rpc_error(&replies[0], &fds, -32600, &["larger than 65536 bytes"]);
        rest.extend(wait_eof(&stream, Duration::from_secs(20)));
        assert!(rest.is_empty(), "nothing may follow the size error: {:?}", String::from_utf8_lossy(&rest));
        drop(stream);
        writer.join().unwrap();
    }
    // The broker still serves.
    let mut client = broker.client();
    client.bind(&format!("tcp://127.0.0.1:{port}").parse().unwrap()).unwrap();
}

/// One request delivered in many writes with pauses between them is one
/// request; so are requests split at awkward places.
#[test]
fn split_requests_are_reassembled() {
    let broker = Broker::start("protsplit");
    let port = held_port(&broker.control, "tcp");
    let request = bind_request(42, json!({"address": "127.0.0.1", "port": port, "backlog": 128, "note": "é✓"}));
    for piece in [1usize, 3, 17, 50] {
        let stream = connect(&broker.control);
        for chunk in request.chunks(piece).take(40) {
            (&stream).write_all(chunk).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        let sent = request.chunks(piece).take(40).map(|c| c.len()).sum::<usize>();
        std::thread::sleep(Duration::from_millis(50));
        (&stream).write_all(&request[sent..]).unwrap();
        let (replies, fds) = read_replies(&stream, 1);
        assert_eq!(replies[0], json!({"jsonrpc": "2.0", "id": 42, "result": true}), "pieces of {piece}");
        assert_eq!(fds.len(), 1);
    }
}

/// Several requests in one write (with and without separators) each get
/// their reply, in order, and only successes carry a descriptor.
#[test]
fn concatenated_requests_each_get_a_reply_in_order() {
    let broker = Broker::start("protconcat");
    let port = held_port(&broker.control, "tcp");
    let ok = |id| bind_request(id, json!({"address": "127.0.0.1", "port": port}));
    let unknown = |id: u64| format!(r#"{{"jsonrpc":"2.0","method":"nope","id":{id}}}"#).into_bytes();
    let bad = |id| bind_request(id, json!({"address": "127.0.0.1", "port": 0}));
    for sep in [&b""[..], b"\n", b"\r\n", b"  \t\n\n"] {
        let parts = [ok(1), unknown(2), ok(3), bad(4), ok(5)];
        let batch = parts.join(sep);
        let stream = connect(&broker.control);
        (&stream).write_all(&batch).unwrap();
        let (replies, fds) = read_replies(&stream, parts.len());
        let ids: Vec<_> = replies.iter().map(|r| r["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, [1, 2, 3, 4, 5], "separator {sep:?}");
        assert_eq!(replies[1]["error"]["code"], -32601);
        assert_eq!(replies[3]["error"]["code"], -32602);
        for i in [0, 2, 4] {
            assert_eq!(replies[i]["result"], true, "{}", replies[i]);
        }
        assert_eq!(fds.len(), 3, "exactly one descriptor per success, none per error");
        let first = inode(fds[0].as_fd());
        assert!(fds.iter().all(|fd| inode(fd.as_fd()) == first));
    }
    // More requests than the broker queues replies for, in one write.
    let many: Vec<u8> = (0..100).flat_map(ok).collect();
    let stream = connect(&broker.control);
    (&stream).write_all(&many).unwrap();
    let (replies, fds) = read_replies(&stream, 100);
    assert!(replies.iter().enumerate().all(|(i, r)| r["id"] == i as u64 && r["result"] == true));
    assert_eq!(fds.len(), 100);
}

/// A client that shuts down its writing side after the request still gets
/// the reply.
#[test]
fn half_closed_client_still_gets_its_reply() {
    let broker = Broker::start("prothalf");
    let stream = connect(&broker.control);
    let port = held_port(&broker.control, "tcp");
    (&stream).write_all(&bind_request(1, json!({"address": "127.0.0.1", "port": port}))).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let (replies, fds) = read_replies(&stream, 1);
    assert_eq!(replies[0]["result"], true, "{}", replies[0]);
    assert_eq!(fds.len(), 1);
    wait_eof(&stream, Duration::from_secs(20));
}

/// 500 connected clients that send nothing, or half a request, delay nobody:
/// a fresh client's bind is answered, and each stalled client is still served
/// when it finally completes its request.
#[test]
fn silent_clients_do_not_block_others() {
    raise_nofile();
    let broker = Broker::start("protsilent");
    let port = held_port(&broker.control, "tcp");
    let request = bind_request(9, json!({"address": "127.0.0.1", "port": port}));
    let silent: Vec<_> = (0..500)
        .map(|i| {
            let s = connect(&broker.control);
            if i % 2 == 1 {
                (&s).write_all(&request[..request.len() / 2]).unwrap();
            }
            s
        })
        .collect();
    // A fresh client, both the reference way and the library way.
    let (reply, fds) = rpc(&broker.control, &request);
    assert_eq!(reply["result"], true, "{reply}");
    assert_eq!(fds.len(), 1);
    let mut client = broker.client();
    let fd = client.bind(&format!("tcp://127.0.0.1:{port}").parse().unwrap()).unwrap();
    assert_eq!(inode(fd.as_fd()), inode(fds[0].as_fd()));
    // The stalled ones are still connected, and served once they finish.
    for (i, s) in silent.iter().enumerate().step_by(49) {
        let rest = if i % 2 == 1 { &request[request.len() / 2..] } else { &request[..] };
        (&*s).write_all(rest).unwrap();
        let (replies, fds) = read_replies(s, 1);
        assert_eq!(replies[0]["result"], true, "silent client {i}: {}", replies[0]);
        assert_eq!(fds.len(), 1);
    }
}

/// Clients that leave in the middle of a request, or before reading their
/// reply, cost nothing: the broker serves on and closes their connections.
#[test]
fn clients_that_vanish_cost_nothing() {
    let broker = Broker::start("protvanish");
    // No client yet: the broker's own descriptors; it will hold one socket.
    let baseline = broker.fd_count_at_start() + 1;
    let mut client = broker.client();
    let (spec, _fd) = bind_free_tcp(&mut client);
    drop(client);
    let port: u16 = spec.rsplit(':').next().unwrap().parse().unwrap();
    let request = bind_request(1, json!({"address": "127.0.0.1", "port": port}));
    wait_until(Duration::from_secs(20), "descriptors at the idle count", || broker.open_fds().len() == baseline);

    for i in 0..200 {
        let s = connect(&broker.control);
        match i % 4 {
            // Half a request, then gone.
            0 => (&s).write_all(&request[..request.len() / 3]).unwrap(),
            // A whole request, gone before the reply.
            1 => (&s).write_all(&request).unwrap(),
            // Many requests, gone before any reply: replies (with
            // descriptors) would be queued for nobody.
            2 => (&s).write_all(&request.repeat(40)).unwrap(),
            // Connected and gone without a byte.
            _ => {}
        }
        drop(s);
    }
    let (reply, fds) = rpc(&broker.control, &request);
    assert_eq!(reply["result"], true, "{reply}");
    assert_eq!(fds.len(), 1);
    wait_until(Duration::from_secs(20), "descriptors back to the idle count", || broker.open_fds().len() == baseline);
    assert!(broker.child.id() > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(broker.pid()), None).is_ok());
    assert!(broker.log_text().contains("connection closed in the middle of a request"));
}

/// With `--idle-timeout 1s`, a client that says nothing (or stops talking
/// after a request) is disconnected by the broker.
#[test]
fn idle_clients_are_dropped() {
    let broker = Broker::builder("protidle").args(&["--idle-timeout", "1s"]).start();
    let silent = connect(&broker.control);
    let partial = connect(&broker.control);
    (&partial).write_all(b"{\"method\":\"bi").unwrap();
    let used = connect(&broker.control);
    let port = held_port(&broker.control, "tcp");
    (&used).write_all(&bind_request(1, json!({"address": "127.0.0.1", "port": port}))).unwrap();
    let (replies, _fds) = read_replies(&used, 1);
    assert_eq!(replies[0]["result"], true);
    for s in [&silent, &partial, &used] {
        assert!(wait_eof(s, Duration::from_secs(30)).is_empty());
    }
    assert!(broker.log_text().contains("closing idle connection"), "{}", broker.log_text());
}

/// A small deterministic fuzz: thousands of mangled requests (bytes
/// flipped, inserted, dropped, cut short), each on its own connection that
/// the client half-closes. Every one ends with the broker closing the
/// connection or answering; none crashes or wedges it, and none gets a
/// descriptor unless the reply says success.
#[test]
fn mangled_requests_never_crash_or_wedge_the_broker() {
    let broker = Broker::builder("protfuzz").env("RUST_LOG", "warn").start();
    let port = held_port(&broker.control, "tcp");
    let seeds = [
        bind_request(1, json!({"address": "127.0.0.1", "port": port, "backlog": 10})),
        bind_request(2, json!({"type": "unix", "path": "@sbt-fuzz", "spec": "udp://[::1]:5353", "name": "x"})),
        br#"{"jsonrpc":"2.0","method":"bind","params":{"address":"::1","port":1},"id":[1,{"a":null}]}"#.to_vec(),
    ];
    // xorshift64: reproducible without a dependency.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut answered_ok, mut answered_err, mut silent) = (0, 0, 0);
    for round in 0..1500 {
        let mut bytes = seeds[round % seeds.len()].clone();
        for _ in 0..1 + next() % 4 {
            if bytes.is_empty() {
                bytes.push(b'{');
            }
            let at = (next() as usize) % bytes.len().max(1);
            match next() % 5 {
                0 => bytes[at] ^= 1 << (next() % 8),
                1 => {
                    let specials = b"{}[]\",:\\0\x00\xff\n";
                    bytes.insert(at, specials[(next() as usize) % specials.len()])
                }
                2 if bytes.len() > 1 => drop(bytes.remove(at)),
                3 => bytes.truncate(at),
                _ => bytes[at] = next() as u8,
            }
        }
        let stream = connect(&broker.control);
        (&stream).write_all(&bytes).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        // Everything the broker says before it closes.
        let mut framer = sockbroker::protocol::framing::Framer::default();
        let mut fds = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let got = sockbroker::fd::recv_with_fds(stream.as_fd(), &mut buf)
                .unwrap_or_else(|e| panic!("round {round}: {e} for {:?}", String::from_utf8_lossy(&bytes)));
            if got.len == 0 {
                break;
            }
            fds.extend(got.fds);
            framer.push(&buf[..got.len]);
        }
        let mut successes = 0;
        let mut replies = 0;
        while let Some(v) = framer.next_value() {
            let v = v.unwrap_or_else(|e| panic!("round {round}: the broker sent bad JSON: {e}"));
            assert!(v.get("result").is_some() != v.get("error").is_some(), "round {round}: {v}");
            successes += usize::from(v["result"] == true);
            replies += 1;
        }
        assert_eq!(fds.len(), successes, "round {round}: descriptors without a success reply");
        answered_ok += successes;
        answered_err += replies - successes;
        silent += usize::from(replies == 0);
    }
    // The mutations reached every outcome.
    assert!(
        answered_ok > 0 && answered_err > 0 && silent > 0,
        "{answered_ok} ok, {answered_err} errors, {silent} silent"
    );
    let (reply, fds) = rpc(&broker.control, &bind_request(9, json!({"address": "127.0.0.1", "port": port})));
    assert_eq!(reply["result"], true, "{reply}");
    assert_eq!(fds.len(), 1);
}

/// A client that hangs up before reading its reply: the broker logs the
/// undelivered reply at warn with the errno (seen without RUST_LOG=debug),
/// since it may be a descriptor a daemon expected and never got.
#[test]
fn an_undelivered_reply_is_logged_at_warn() {
    let broker = Broker::builder("protgone").env("RUST_LOG", "info").start();
    let port = held_port(&broker.control, "tcp");
    // The broker may answer before the hang-up lands (then the reply sits
    // unread in a closed socket, and nothing fails): try again, bounded.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !broker.log_text().contains("client went away before reading its reply") {
        assert!(std::time::Instant::now() < deadline, "not logged:\n{}", broker.log_text());
        let stream = connect(&broker.control);
        (&stream).write_all(&bind_request(1, json!({"address": "127.0.0.1", "port": port}))).unwrap();
        drop(stream);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        broker.log_text().lines().any(|l| l.contains("WARN")
            && l.contains("went away")
            && (l.contains("EPIPE") || l.contains("ECONNRESET"))),
        "{}",
        broker.log_text()
    );
}
