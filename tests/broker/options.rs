//! Every socket option of a declared socket, read back from the kernel
//! (getsockopt, TCP_INFO, stat) on the descriptor the broker hands out.

use crate::common;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::*;
use nix::libc;
use nix::sys::socket::{getsockopt, sockopt};
use sockbroker::socket::{accept_queue, get_int_option};

/// A broker declaring one TCP socket "s" on a free loopback port with
/// `options` (TOML lines); returns it with the socket it hands out.
#[track_caller]
fn tcp(name: &str, listen_host: &str, options: &str) -> (Broker, OwnedFd) {
    let (broker, _) = Broker::builder(name).start_on_free_port(|port| {
        format!("[[socket]]\nname = \"s\"\nlisten = \"tcp://{listen_host}:{port}\"\n{options}\n")
    });
    let fd = broker.client().bind_name("s").unwrap();
    (broker, fd)
}

/// The same for a socket that needs no port (UNIX) or a UDP one.
#[track_caller]
fn other(name: &str, listen: &str, options: &str) -> (Broker, OwnedFd) {
    let broker =
        Broker::builder(name).config(format!("[[socket]]\nname = \"s\"\nlisten = \"{listen}\"\n{options}\n")).start();
    let fd = broker.client().bind_name("s").unwrap();
    (broker, fd)
}

fn int(fd: BorrowedFd<'_>, level: i32, name: i32) -> i32 {
    get_int_option(fd, level, name).unwrap()
}

#[test]
fn backlog() {
    let (broker, fd) = tcp("optbacklog", "127.0.0.1", "backlog = 77");
    assert_eq!(accept_queue(fd.as_fd()).unwrap(), (0, 77));
    // The same figure through `list`.
    let (list, _) = broker.client().call("list", serde_json::Value::Null).unwrap();
    assert_eq!(list[0]["backlog"], 77, "{list}");
}

#[test]
fn reuse_addr_is_on_for_tcp_by_default_and_can_be_turned_off() {
    let (_b, fd) = tcp("optreuse1", "127.0.0.1", "");
    assert!(getsockopt(&fd, sockopt::ReuseAddr).unwrap());
    let (_b, fd) = tcp("optreuse0", "127.0.0.1", "reuse_addr = false");
    assert!(!getsockopt(&fd, sockopt::ReuseAddr).unwrap());
}

#[test]
fn reuse_port() {
    let (_b, fd) = tcp("optreuseport", "127.0.0.1", "reuse_port = true");
    assert!(getsockopt(&fd, sockopt::ReusePort).unwrap());
}

#[test]
fn ipv6_only() {
    // Linux forces IPV6_V6ONLY on a socket bound to a specific IPv6 address,
    // so "false" is shown on the v4-mapped loopback, which only a dual-stack
    // socket can bind, and which then takes IPv4 connections.
    let (_b, fd) = tcp("optv6off", "[::ffff:127.0.0.1]", "ipv6_only = false");
    assert!(!getsockopt(&fd, sockopt::Ipv6V6Only).unwrap());
    let port = std::net::TcpListener::from(fd).local_addr().unwrap().port();
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("dual-stack socket accepts IPv4");
    let (_b, fd) = tcp("optv6on", "[::1]", "ipv6_only = true");
    assert!(getsockopt(&fd, sockopt::Ipv6V6Only).unwrap());
}

#[test]
fn freebind() {
    let (_b, fd) = tcp("optfreebind", "127.0.0.1", "freebind = true");
    assert!(getsockopt(&fd, sockopt::IpFreebind).unwrap());
}

#[test]
fn transparent() {
    let (_b, fd) = tcp("opttransparent", "127.0.0.1", "transparent = true");
    assert!(getsockopt(&fd, sockopt::IpTransparent).unwrap());
}

#[test]
fn bind_to_device() {
    let (_b, fd) = tcp("optdevice", "127.0.0.1", "bind_to_device = \"lo\"");
    assert_eq!(getsockopt(&fd, sockopt::BindToDevice).unwrap(), "lo");
}

#[test]
fn defer_accept() {
    // The kernel keeps a retransmission count; 3 s is exactly two of them.
    let (_b, fd) = tcp("optdefer", "127.0.0.1", "defer_accept = 3");
    assert_eq!(int(fd.as_fd(), libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT), 3);
}

#[test]
fn fast_open() {
    let (_b, fd) = tcp("opttfo", "127.0.0.1", "fast_open = 16");
    assert_eq!(int(fd.as_fd(), libc::IPPROTO_TCP, libc::TCP_FASTOPEN), 16);
}

#[test]
fn keepalive_with_idle_interval_and_count() {
    let (_b, fd) = tcp(
        "optkeepalive",
        "127.0.0.1",
        "keepalive = true\nkeepalive_idle = 31\nkeepalive_interval = 7\nkeepalive_count = 4",
    );
    assert!(getsockopt(&fd, sockopt::KeepAlive).unwrap());
    assert_eq!(getsockopt(&fd, sockopt::TcpKeepIdle).unwrap(), 31);
    assert_eq!(getsockopt(&fd, sockopt::TcpKeepInterval).unwrap(), 7);
    assert_eq!(getsockopt(&fd, sockopt::TcpKeepCount).unwrap(), 4);
}

#[test]
fn no_delay() {
    let (_b, fd) = tcp("optnodelay", "127.0.0.1", "no_delay = true");
    assert!(getsockopt(&fd, sockopt::TcpNoDelay).unwrap());
}

#[test]
fn receive_and_send_buffers() {
    // The kernel doubles the value for its bookkeeping overhead.
    let (_b, fd) = tcp("optbuffers", "127.0.0.1", "receive_buffer = 65536\nsend_buffer = 49152");
    assert_eq!(getsockopt(&fd, sockopt::RcvBuf).unwrap(), 131072);
    assert_eq!(getsockopt(&fd, sockopt::SndBuf).unwrap(), 98304);
}

#[test]
fn mark() {
    let (_b, fd) = tcp("optmark", "127.0.0.1", "mark = 42");
    assert_eq!(getsockopt(&fd, sockopt::Mark).unwrap(), 42);
}

#[test]
fn broadcast_on_udp() {
    let port = free_port();
    let (_b, fd) = other("optbroadcast", &format!("udp://127.0.0.1:{port}"), "broadcast = true");
    assert!(getsockopt(&fd, sockopt::Broadcast).unwrap());
    // UDP gets no SO_REUSEADDR unless asked.
    assert!(!getsockopt(&fd, sockopt::ReuseAddr).unwrap());
}

#[test]
fn unix_mode_user_and_group() {
    let dir = test_dir("optunixfile");
    let path = dir.join("app.sock");
    let (_b, fd) = other(
        "optunix",
        &format!("unix:{}", path.display()),
        "mode = \"0640\"\nuser = \"nobody\"\ngroup = \"nogroup\"",
    );
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    assert!(getsockopt(&fd, sockopt::AcceptConn).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_stale_unix_path_is_replaced_but_never_a_regular_file() {
    let dir = test_dir("optstale");
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let (_b, fd) = other("optstale1", &format!("unix:{}", stale.display()), "");
    std::os::unix::net::UnixStream::connect(&stale).expect("the stale path now holds the broker's live socket");
    drop(fd);

    let file = dir.join("plain");
    std::fs::write(&file, "keep").unwrap();
    let err = Broker::builder("optstale2")
        .config(format!("[[socket]]\nname = \"s\"\nlisten = \"unix:{}\"\n", file.display()))
        .try_start()
        .err()
        .expect("a regular file at the path stops the start");
    assert!(err.contains("exists and is not a socket; refusing to remove it"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn options_that_do_not_fit_the_socket_are_refused_by_check() {
    let dir = test_dir("optmisfit");
    let out = check(
        &dir,
        "[[socket]]\nname = \"u\"\nlisten = \"udp://127.0.0.1:5353\"\nno_delay = true\nbacklog = 5\n\n\
         [[socket]]\nname = \"a\"\nlisten = \"unix:@x\"\nmode = \"0600\"\n\n\
         [[socket]]\nname = \"t\"\nlisten = \"tcp://127.0.0.1:80\"\nipv6_only = true\nbind_to_device = \"this-name-is-too-long\"\n",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "socket[0].backlog: applies to listening (tcp, unix, unix-seqpacket) sockets only, not udp://127.0.0.1:5353",
        "socket[0].no_delay: applies to tcp sockets only",
        "socket[1].mode: applies to UNIX path (not @abstract) sockets only, not unix:@x",
        "socket[2].ipv6_only: applies to IPv6 sockets only",
        "socket[2].bind_to_device: 'this-name-is-too-long' is not an interface name",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in\n{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
