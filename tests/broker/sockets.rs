//! The sockets the broker hands out: identity (same key, same kernel socket,
//! from any client), every kind (TCP v4/v6, UDP, UNIX path and abstract),
//! names, and bind failures.

use crate::common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};

use common::*;
use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, SockaddrStorage};
use serde_json::json;

/// Asks for the socket both ways (library client, reference wire form with
/// `params`) and returns both descriptors.
#[track_caller]
fn both_ways(broker: &Broker, spec: &str, params: serde_json::Value) -> (OwnedFd, OwnedFd) {
    let a = broker.client().bind(&spec.parse().unwrap()).unwrap_or_else(|e| panic!("{spec}: {e}"));
    let (reply, mut fds) = rpc(&broker.control, &bind_request(1, params));
    assert_eq!(reply["result"], true, "{spec}: {reply}");
    assert_eq!(fds.len(), 1, "{spec}: one descriptor with the reply");
    let b = fds.pop().unwrap();
    assert_eq!(inode(a.as_fd()), inode(b.as_fd()), "{spec}: both forms must name the same socket");
    assert!(is_cloexec(a.as_fd()) && is_cloexec(b.as_fd()));
    (a, b)
}

fn local_addr(fd: &OwnedFd) -> SocketAddr {
    let sa: SockaddrStorage = getsockname(std::os::fd::AsRawFd::as_raw_fd(fd)).unwrap();
    if let Some(v4) = sa.as_sockaddr_in() {
        SocketAddr::from(std::net::SocketAddrV4::from(*v4))
    } else {
        SocketAddr::from(std::net::SocketAddrV6::from(*sa.as_sockaddr_in6().unwrap()))
    }
}

/// Identical binds get one kernel socket, whichever client and connection
/// asks; different keys get different sockets.
#[test]
fn same_key_same_socket_different_key_different_socket() {
    let broker = Broker::start("sksame");
    let mut c1 = broker.client();
    let (spec, first) = bind_free_tcp(&mut c1);
    let port: u16 = spec.rsplit(':').next().unwrap().parse().unwrap();
    let ino = inode(first.as_fd());
    // Same connection again, another library connection, the reference client,
    // a bracket-less spelling: all the same socket.
    assert_eq!(inode(c1.bind(&spec.parse().unwrap()).unwrap().as_fd()), ino);
    assert_eq!(inode(broker.client().bind(&spec.parse().unwrap()).unwrap().as_fd()), ino);
    for _ in 0..3 {
        let (reply, fds) = reference_request(&broker.control, &multibinder_bind_request("127.0.0.1", port));
        assert_eq!(json(&reply)["result"], true);
        assert_eq!(inode(fds[0].as_fd()), ino);
    }
    // The backlog is not part of the key: the first request's wins.
    let (reply, fds) =
        rpc(&broker.control, &bind_request(1, json!({"address": "127.0.0.1", "port": port, "backlog": 5})));
    assert_eq!(reply["result"], true);
    assert_eq!(inode(fds[0].as_fd()), ino);

    // Different keys: another port, another transport, another family.
    let (_, other_port) = bind_free_tcp(&mut c1);
    assert_ne!(inode(other_port.as_fd()), ino);
    // UDP and IPv6 on the port of a held TCP v4 socket: when someone else
    // has that port for that transport or family, another held port is
    // tried, so the check never passes without having been made.
    for other in ["udp://127.0.0.1:PORT", "tcp://[::1]:PORT"] {
        let mut port = port;
        let mut held = None;
        let tried = (0..20).find(|_| {
            let spec = other.replace("PORT", &port.to_string());
            match c1.bind(&spec.parse().unwrap()) {
                Ok(fd) => {
                    let tcp = held.as_ref().map_or(ino, |fd: &std::os::fd::OwnedFd| inode(fd.as_fd()));
                    assert_ne!(inode(fd.as_fd()), tcp, "{spec}");
                    true
                }
                Err(e) if e.code() == Some(10000) => {
                    let (spec, fd) = bind_free_tcp(&mut c1);
                    port = spec.rsplit(':').next().unwrap().parse().unwrap();
                    held = Some(fd);
                    false
                }
                Err(e) => panic!("{spec}: {e}"),
            }
        });
        assert!(tried.is_some(), "{other}: every port tried was taken for it");
    }
}

/// A TCP socket handed out is bound, listening, SO_REUSEADDR, and really
/// accepts connections.
#[test]
fn tcp_v4_socket_listens_and_accepts() {
    let broker = Broker::start("sktcp4");
    let mut client = broker.client();
    let (spec, _) = bind_free_tcp(&mut client);
    let port: u16 = spec.rsplit(':').next().unwrap().parse().unwrap();
    let (fd, _) = both_ways(&broker, &spec, json!({"address": "127.0.0.1", "port": port, "backlog": 64}));
    assert_eq!(sock_type(fd.as_fd()), SockType::Stream);
    assert!(is_listening(fd.as_fd()));
    assert!(getsockopt(&fd, sockopt::ReuseAddr).unwrap());
    assert_eq!(local_addr(&fd), SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    let listener = TcpListener::from(fd);
    let mut out = TcpStream::connect(("127.0.0.1", port)).unwrap();
    out.write_all(b"ping").unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
}

/// IPv6: "::1" in multibinder's `address` and `tcp://[::1]:P` are one socket,
/// an AF_INET6 listener on ::1.
#[test]
fn tcp_v6_loopback() {
    let broker = Broker::start("sktcp6");
    for _ in 0..20 {
        let port = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port();
        let spec = format!("tcp://[::1]:{port}");
        if broker.client().bind(&spec.parse().unwrap()).is_err() {
            continue; // taken between the probe and the bind
        }
        let (fd, _) = both_ways(&broker, &spec, json!({"address": "::1", "port": port}));
        let (_, bracketed) = both_ways(&broker, &spec, json!({"address": "[::1]", "port": port}));
        assert_eq!(inode(fd.as_fd()), inode(bracketed.as_fd()));
        assert!(is_listening(fd.as_fd()));
        assert_eq!(local_addr(&fd), SocketAddr::from((Ipv6Addr::LOCALHOST, port)));
        let listener = TcpListener::from(fd);
        let _out = TcpStream::connect(("::1", port)).unwrap();
        listener.accept().unwrap();
        return;
    }
    panic!("no free IPv6 port after 20 tries");
}

/// UDP by `"type": "udp"` and by `udp://`: a bound datagram socket that
/// receives.
#[test]
fn udp_socket() {
    let broker = Broker::start("skudp");
    for _ in 0..20 {
        let port = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port();
        let spec = format!("udp://127.0.0.1:{port}");
        if broker.client().bind(&spec.parse().unwrap()).is_err() {
            continue;
        }
        let (fd, _) = both_ways(&broker, &spec, json!({"type": "udp", "address": "127.0.0.1", "port": port}));
        assert_eq!(sock_type(fd.as_fd()), SockType::Datagram);
        assert_eq!(local_addr(&fd), SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        let sock = UdpSocket::from(fd);
        UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().send_to(b"dgram", ("127.0.0.1", port)).unwrap();
        let mut buf = [0u8; 16];
        sock.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let (n, _) = sock.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"dgram");
        // A TCP socket on the same port is another socket (when someone
        // else has the port for TCP, same_key_same_socket_different_key_
        // different_socket makes this check on a port it can get).
        match broker.client().bind(&format!("tcp://127.0.0.1:{port}").parse().unwrap()) {
            Ok(tcp) => assert_ne!(inode(tcp.as_fd()), inode(sock.as_fd())),
            Err(e) => assert_eq!(e.code(), Some(10000), "{e}"),
        }
        return;
    }
    panic!("no free UDP port after 20 tries");
}

/// UNIX sockets at a path: `"type": "unix", "path"` and `unix:/…` are one
/// listening socket whose file accepts connections; datagram and seqpacket
/// kinds too.
#[test]
fn unix_path_sockets() {
    let broker = Broker::start("skunix");
    let path = broker.dir.join("app.sock");
    let spec = format!("unix:{}", path.display());
    let (fd, _) = both_ways(&broker, &spec, json!({"type": "unix", "path": path}));
    assert_eq!(sock_type(fd.as_fd()), SockType::Stream);
    assert!(is_listening(fd.as_fd()));
    let listener = UnixListener::from(fd);
    let _out = UnixStream::connect(&path).unwrap();
    listener.accept().unwrap();

    let dgram = broker.dir.join("d.sock");
    let (fd, _) =
        both_ways(&broker, &format!("unix-dgram:{}", dgram.display()), json!({"type": "unix-dgram", "path": dgram}));
    assert_eq!(sock_type(fd.as_fd()), SockType::Datagram);
    let seq = broker.dir.join("s.sock");
    let (fd, _) = both_ways(
        &broker,
        &format!("unix-seqpacket:{}", seq.display()),
        json!({"type": "unix-seqpacket", "path": seq}),
    );
    assert_eq!(sock_type(fd.as_fd()), SockType::SeqPacket);
    assert!(is_listening(fd.as_fd()));
}

/// Abstract UNIX sockets: a leading `@`, no file.
#[test]
fn unix_abstract_sockets() {
    let broker = Broker::start("skabs");
    let name = format!("sbt-abs-{}", std::process::id());
    let spec = format!("unix:@{name}");
    let (fd, _) = both_ways(&broker, &spec, json!({"type": "unix", "path": format!("@{name}")}));
    assert!(is_listening(fd.as_fd()));
    let (spec_form, _) = both_ways(&broker, &spec, json!({"spec": spec}));
    assert_eq!(inode(fd.as_fd()), inode(spec_form.as_fd()));
    // Really in the abstract namespace: connect to it there.
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let _out = UnixStream::connect_addr(&addr).unwrap();
    UnixListener::from(fd).accept().unwrap();
    // A path socket and an abstract one with the same text are different.
    let other = broker.client().bind(&format!("unix:@{name}-2").parse().unwrap()).unwrap();
    assert_ne!(inode(other.as_fd()), inode(spec_form.as_fd()));
}

/// `"spec"` takes every text form.
#[test]
fn spec_param_takes_the_text_form() {
    let broker = Broker::start("skspec");
    let mut client = broker.client();
    let (spec, fd) = bind_free_tcp(&mut client);
    let (reply, fds) = rpc(&broker.control, &bind_request(1, json!({"spec": spec})));
    assert_eq!(reply["result"], true, "{reply}");
    assert_eq!(inode(fds[0].as_fd()), inode(fd.as_fd()));
}

/// A name nobody gave is a clear error (10001) naming it, with no descriptor.
#[test]
fn unknown_name_is_a_clear_error() {
    let broker = Broker::start("skname");
    let (reply, fds) = rpc(&broker.control, &bind_request(3, json!({"name": "http-frontend"})));
    assert_rpc_error(&reply, &fds, 10001, &["no socket named 'http-frontend'"]);
    assert_eq!(reply["id"], 3);
    let err = broker.client().bind_name("http-frontend").unwrap_err();
    assert_eq!(err.code(), Some(10001));
    assert!(err.to_string().contains("http-frontend"), "{err}");
}

/// Bind failures are code 10000, "Could not bind: SPEC: reason", never
/// cached, never with a descriptor.
#[test]
fn bind_failures_are_10000_and_name_the_socket() {
    let broker = Broker::start("skfail");
    // An address this host does not have (TEST-NET-1).
    let port = free_port();
    let (reply, fds) = rpc(&broker.control, &bind_request(1, json!({"address": "192.0.2.1", "port": port})));
    assert_rpc_error(
        &reply,
        &fds,
        10000,
        &[&format!("Could not bind: tcp://192.0.2.1:{port}: "), "Cannot assign requested address", "os error 99"],
    );

    // A port held by someone else's plain listener.
    let held = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = held.local_addr().unwrap().port();
    let request = bind_request(2, json!({"address": "127.0.0.1", "port": port}));
    let (reply, fds) = rpc(&broker.control, &request);
    assert_rpc_error(
        &reply,
        &fds,
        10000,
        &[&format!("Could not bind: tcp://127.0.0.1:{port}: "), "Address already in use", "os error 98"],
    );
    let err = broker.client().bind(&format!("tcp://127.0.0.1:{port}").parse().unwrap()).unwrap_err();
    assert_eq!(err.code(), Some(10000), "{err}");
    // Once it is free, the same request succeeds: failures are not remembered.
    drop(held);
    let (reply, fds) = rpc(&broker.control, &request);
    assert_eq!(reply["result"], true, "{reply}");
    assert_eq!(fds.len(), 1);

    // A regular file at a UNIX path: refused, and the file is left alone.
    let file = broker.dir.join("precious");
    std::fs::write(&file, b"keep").unwrap();
    let (reply, fds) = rpc(&broker.control, &bind_request(3, json!({"type": "unix", "path": file})));
    assert_rpc_error(&reply, &fds, 10000, &[&format!("unix:{}", file.display()), "not a socket"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");

    // A live UNIX listener someone else owns: refused, left alone.
    let live = broker.dir.join("live.sock");
    let listener = UnixListener::bind(&live).unwrap();
    let (reply, fds) = rpc(&broker.control, &bind_request(4, json!({"type": "unix", "path": live})));
    assert_rpc_error(&reply, &fds, 10000, &["live socket"]);
    let _c = UnixStream::connect(&live).unwrap();
    listener.accept().unwrap();

    // A stale socket file (nobody listens) is replaced.
    let stale = broker.dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let (reply, fds) = rpc(&broker.control, &bind_request(5, json!({"type": "unix", "path": stale})));
    assert_eq!(reply["result"], true, "{reply}");
    let listener = UnixListener::from(fds.into_iter().next().unwrap());
    let _c = UnixStream::connect(&stale).unwrap();
    listener.accept().unwrap();
}

/// Each fact once: a bad UNIX path is named once in the client's error, in
/// the broker's log line for the request, and in the error of a broker that
/// cannot open it at start.
#[test]
fn a_bad_unix_path_is_named_once() {
    let broker = Broker::start("skpathonce");
    let file = broker.dir.join("not-a-socket");
    std::fs::write(&file, b"keep").unwrap();
    let path = file.display().to_string();
    let out = broker.cli(&["bind", &format!("unix:{path}")]);
    assert!(!out.status.success(), "{}", output_text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exists and is not a socket; refusing to remove it"), "{}", output_text(&out));
    assert_eq!(err.matches(&path).count(), 1, "{}", output_text(&out));
    let log = broker.log_text();
    let line = log.lines().find(|l| l.contains("could not bind") && l.contains(&path)).expect("a log line");
    assert_eq!(line.matches(&path).count(), 1, "{line}");

    // Declared in the configuration: the start fails naming it once.
    let config = broker.dir.join("declares-file.toml");
    std::fs::write(&config, format!("[[socket]]\nname = \"s\"\nlisten = \"unix:{path}\"\n")).unwrap();
    let other = broker.dir.join("other.sock");
    let err = Broker::builder("declaresfile")
        .dir(broker.dir.clone())
        .control(other)
        .args(&["--config", config.to_str().unwrap()])
        .try_start()
        .err()
        .expect("a regular file at the declared path stops the start");
    let line = err.lines().find(|l| l.contains("not a socket")).unwrap_or_else(|| panic!("{err}"));
    assert_eq!(line.matches(&path).count(), 1, "{line}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
}
