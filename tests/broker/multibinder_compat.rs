//! The reference client's exact wire form against the real broker.

use crate::common;

use std::os::fd::AsFd;

use common::*;

#[test]
fn reference_client_gets_the_same_socket_twice() {
    let broker = Broker::start("mbsame");
    let port = held_port(&broker.control, "tcp");
    let (reply, fds) = reference_request(&broker.control, &multibinder_bind_request("127.0.0.1", port));
    let v = json(&reply);
    assert_eq!(v["result"], true, "{reply}");
    assert_eq!(v["id"], "c0ffee00-0000-4000-8000-000000000001");
    assert_eq!(fds.len(), 1);
    let (reply2, fds2) = reference_request(&broker.control, &multibinder_bind_request("127.0.0.1", port));
    assert_eq!(json(&reply2)["result"], true);
    assert_eq!(inode(fds[0].as_fd()), inode(fds2[0].as_fd()), "second bind must get the same kernel socket");
    assert!(is_cloexec(fds[0].as_fd()));
}

/// The success reply is exactly multibinder's, in the one recvmsg the
/// reference client makes, with exactly one descriptor: a bound, listening
/// TCP socket with SO_REUSEADDR, as multibinder made it. The request's extra
/// keys (backlog, unknown ones) are accepted.
#[test]
fn reference_reply_is_multibinder_s() {
    let broker = Broker::start("mbreply");
    let port = held_port(&broker.control, "tcp");
    let request = format!(
        r#"{{"jsonrpc":"2.0","method":"bind","params":[{{"address":"127.0.0.1","port":{port},"backlog":10240,"reuse_port":true}}],"id":"6f1c2a3b-uuid"}}"#
    );
    let (reply, fds) = reference_request(&broker.control, request.as_bytes());
    assert_eq!(json(&reply), serde_json::json!({"jsonrpc": "2.0", "id": "6f1c2a3b-uuid", "result": true}));
    assert_eq!(fds.len(), 1, "exactly one descriptor");
    let fd = fds[0].as_fd();
    assert_eq!(sock_type(fd), nix::sys::socket::SockType::Stream);
    assert!(is_listening(fd));
    assert!(nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::ReuseAddr).unwrap());
    // The socket works: connect to the port and accept through the descriptor.
    let listener = std::net::TcpListener::from(fds.into_iter().next().unwrap());
    let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    listener.accept().unwrap();
}

/// The same socket for the reference client on separate connections and for
/// the library client: every generation gets one kernel listen queue.
#[test]
fn reference_and_library_clients_share_one_socket() {
    let broker = Broker::start("mbshare");
    let mut client = broker.client();
    let (spec, fd) = bind_free_tcp(&mut client);
    let port: u16 = spec.rsplit(':').next().unwrap().parse().unwrap();
    for _ in 0..5 {
        let (reply, fds) = reference_request(&broker.control, &multibinder_bind_request("127.0.0.1", port));
        assert_eq!(json(&reply)["result"], true);
        assert_eq!(inode(fds[0].as_fd()), inode(fd.as_fd()));
    }
}

/// Errors look like multibinder's: code 10000 "Could not bind: …" and
/// -32601 "Method not found", no descriptor, the id echoed.
#[test]
fn errors_look_like_multibinder_s() {
    let broker = Broker::start("mberr");
    let port = held_port(&broker.control, "tcp");
    let (reply, fds) = reference_request(&broker.control, &multibinder_bind_request("192.0.2.1", port));
    let v = json(&reply);
    assert_rpc_error(&v, &fds, 10000, &[]);
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.starts_with(&format!("Could not bind: tcp://192.0.2.1:{port}: ")), "{message}");
    assert_eq!(v["id"], "c0ffee00-0000-4000-8000-000000000001");

    let (reply, fds) =
        reference_request(&broker.control, br#"{"jsonrpc":"2.0","method":"unbind","params":[],"id":"u-1"}"#);
    let v = json(&reply);
    assert_rpc_error(&v, &fds, -32601, &[]);
    assert!(v["error"]["message"].as_str().unwrap().starts_with("Method not found"), "{v}");
    assert_eq!(v["id"], "u-1");
}

/// As with the reference server, several requests on one connection, one
/// per write, each answered by one message the reference client's single
/// recvmsg reads whole.
#[test]
fn several_requests_on_one_connection_one_per_write() {
    let broker = Broker::start("mbseveral");
    let port = held_port(&broker.control, "tcp");
    let stream = connect(&broker.control);
    let mut first = None;
    for _ in 0..5 {
        send_raw(stream.as_fd(), &multibinder_bind_request("127.0.0.1", port));
        let (reply, fds) = recv_raw(stream.as_fd());
        assert_eq!(json(&reply)["result"], true, "{reply}");
        assert_eq!(fds.len(), 1);
        let ino = inode(fds[0].as_fd());
        assert_eq!(*first.get_or_insert(ino), ino);
    }
}

/// A multibinder unit sets only MULTIBINDER_SOCK; clients then find the broker.
#[test]
fn multibinder_sock_is_honoured() {
    let broker = Broker::start("mbenv");
    let port = held_port(&broker.control, "tcp");
    let out = std::process::Command::new(BIN)
        .args(["bind", &format!("tcp://127.0.0.1:{port}")])
        .env_remove("SOCKBROKER_SOCKET")
        .env("MULTIBINDER_SOCK", &broker.control)
        .output_within(COMMAND_TIMEOUT)
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (reply, fds) = reference_request(&broker.control, &multibinder_bind_request("127.0.0.1", port));
    assert_eq!(json(&reply)["result"], true);
    let expect = format!("tcp://127.0.0.1:{port}: received socket inode {}", inode(fds[0].as_fd()));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expect);
}
