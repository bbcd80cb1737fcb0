//! Socket activation with the real `systemd-socket-activate`: the broker
//! holds the sockets systemd made, under their names and their addresses,
//! takes its control socket from systemd, skips what it cannot use, and sends
//! the sockets it makes itself to the fd store.

use crate::common;

use std::io::IoSliceMut;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::socket::{getsockname, recvmsg, ControlMessageOwned, MsgFlags, SockaddrStorage};
use sockbroker::client::Client;

/// Whether `FD_CLOEXEC`-equivalent `O_CLOEXEC` shows in /proc/PID/fdinfo/N.
fn cloexec_in(pid: i32, fd: RawFd) -> bool {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap().trim();
    u32::from_str_radix(flags, 8).unwrap() & 0o2000000 != 0
}

/// The broker's descriptors that are sockets, with their inodes.
fn socket_fds(pid: i32) -> Vec<(RawFd, u64)> {
    open_fds(pid)
        .into_iter()
        .filter_map(|(n, target)| {
            let inode = target.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()?;
            Some((n, inode))
        })
        .collect()
}

/// Reads notify messages until one contains `line`; returns it and its fds.
#[track_caller]
/// One notify message and the descriptors that came with it; `None` when
/// nothing arrived within the socket's read timeout.
fn recv_notify(notify: &UnixDatagram) -> Option<(String, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(notify.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC).ok()?;
    let n = msg.bytes;
    let mut fds = Vec::new();
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just gave us these descriptors.
            fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    Some((String::from_utf8_lossy(&buf[..n]).into_owned(), fds))
}

fn wait_notify(notify: &UnixDatagram, line: &str) -> (String, Vec<OwnedFd>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    notify.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    loop {
        assert!(Instant::now() < deadline, "no notify message with {line:?} within 10s");
        let Some((text, fds)) = recv_notify(notify) else { continue };
        if text.lines().any(|l| l == line || l.starts_with(line)) {
            return (text, fds);
        }
    }
}

fn local_addr(fd: BorrowedFd<'_>) -> String {
    let sa: SockaddrStorage = getsockname(fd.as_raw_fd()).unwrap();
    sa.to_string()
}

#[test]
fn passed_sockets_are_held_by_name_and_by_address() {
    let dir = test_dir("act-named");
    let control = dir.join("control.sock");
    let app = dir.join("app.sock");
    let (p4, p6) = (free_port(), free_port());
    // Datagram sockets come through the activator's pass-through (its -d
    // flag would make every socket a datagram one).
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    let dgram = UnixDatagram::bind(dir.join("log.sock")).unwrap();
    let args = vec![
        "--fdname=dns:log:http:http6:app:control".to_string(),
        format!("-l127.0.0.1:{p4}"),
        format!("-l[::1]:{p6}"),
        format!("-l{}", app.display()),
        format!("-l{}", control.display()),
    ];
    let inherit = vec![OwnedFd::from(udp.try_clone().unwrap()), OwnedFd::from(dgram.try_clone().unwrap())];
    let (mut broker, early) =
        Broker::builder("activated").dir(dir).control(control.clone()).start_activated(&args, inherit);
    let log = broker.log_text();
    assert!(log.contains("from systemd"), "{log}");
    assert!(log.contains("5 sockets from systemd, 0 from the fd store, 0 passed descriptors skipped"), "{log}");

    // The connection made before the broker ran (it started the broker) is
    // served like any other.
    send_raw(early.as_fd(), &multibinder_bind_request("127.0.0.1", p4));
    early.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (reply, early_fds) = recv_raw(early.as_fd());
    assert_eq!(json(&reply)["result"], true, "{reply}");

    let mut client: Client = broker.client();
    assert_eq!(inode(early_fds[0].as_fd()), inode(client.bind_name("http").unwrap().as_fd()));
    for (name, spec) in [
        ("http", format!("tcp://127.0.0.1:{p4}")),
        ("http6", format!("tcp://[::1]:{p6}")),
        ("app", format!("unix:{}", app.display())),
        ("dns", format!("udp://127.0.0.1:{udp_port}")),
        ("log", format!("unix-dgram:{}", broker.dir.join("log.sock").display())),
    ] {
        let by_name = client.bind_name(name).unwrap_or_else(|e| panic!("bind name {name}: {e}"));
        let by_key = client.bind(&spec.parse().unwrap()).unwrap_or_else(|e| panic!("bind {spec}: {e}"));
        assert_eq!(inode(by_name.as_fd()), inode(by_key.as_fd()), "{name} and {spec} must be one socket");
        assert!(is_cloexec(by_name.as_fd()));
        // The very socket the activator made (or was given): the broker holds
        // it (same inode in its table) and made none of its own.
        let held: Vec<u64> = socket_fds(broker.pid()).into_iter().map(|(_, i)| i).collect();
        assert!(held.contains(&inode(by_name.as_fd())), "{name}: not one of the broker's descriptors");
    }
    // The TCP socket listens where systemd-socket-activate bound it: a
    // connection lands in its queue and is accepted from the received copy.
    let http = TcpListener::from(client.bind_name("http").unwrap());
    assert_eq!(local_addr(http.as_fd()), format!("127.0.0.1:{p4}"));
    let _c = TcpStream::connect(("127.0.0.1", p4)).unwrap();
    http.set_nonblocking(false).unwrap();
    http.accept().unwrap();
    // The datagram sockets are the ones this test passed in.
    let dns = client.bind_name("dns").unwrap();
    assert_eq!(inode(dns.as_fd()), inode(udp.as_fd()));
    let log_sock = client.bind_name("log").unwrap();
    assert_eq!(inode(log_sock.as_fd()), inode(dgram.as_fd()));

    // Every held descriptor is close-on-exec, passed ones included.
    for (fd, _) in socket_fds(broker.pid()) {
        assert!(cloexec_in(broker.pid(), fd), "broker fd {fd} is inheritable");
    }

    // The control socket came from systemd: the broker serves on it and does
    // not remove the file on exit (systemd owns it).
    assert!(broker.log_text().contains(&format!("serving on {}", control.display())));
    assert!(broker.stop().success());
    assert!(std::fs::symlink_metadata(&control).is_ok(), "the broker removed systemd's control socket");
}

#[test]
fn unusable_descriptors_are_skipped_and_logged() {
    let dir = test_dir("act-unusable");
    let control = dir.join("control.sock");
    // A pipe: not a socket (the activator polls what it passes through, so a
    // regular file cannot travel this way).
    let (pipe_r, _pipe_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let pipe_inode = inode(pipe_r.as_fd());
    // Bound, never listening: no process could accept() from it.
    let idle = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let any: SockaddrStorage = SockaddrStorage::from("127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap());
    nix::sys::socket::bind(idle.as_raw_fd(), &any).unwrap();
    let (p1, p2) = (free_port(), free_port());
    let args = vec![
        "--fdname=pipe:idle:dup:dup:control".to_string(),
        format!("-l127.0.0.1:{p1}"),
        format!("-l127.0.0.1:{p2}"),
        format!("-l{}", control.display()),
    ];
    let (broker, _early) =
        Broker::builder("activated").dir(dir).control(control).start_activated(&args, vec![pipe_r, idle]);
    let log = broker.log_text();
    assert!(log.contains("fd 3 ('pipe'): unusable: not a socket; skipped"), "{log}");
    assert!(log.contains("fd 4 ('idle'): unusable: tcp://127.0.0.1:"), "{log}");
    assert!(log.contains("a TCP socket that is not listening; skipped"), "{log}");
    assert!(
        log.contains(&format!("fd 6 ('dup'): tcp://127.0.0.1:{p2}: the name 'dup' is already taken; skipped")),
        "{log}"
    );
    // Skipped descriptors are closed, not leaked.
    let pipe = format!("pipe:[{pipe_inode}]");
    assert!(!broker.open_fds().iter().any(|(_, t)| *t == pipe), "{:?}", broker.open_fds());
    // The broker carries on with the rest.
    let mut client = broker.client();
    let dup = client.bind_name("dup").unwrap();
    assert_eq!(local_addr(dup.as_fd()), format!("127.0.0.1:{p1}"));
}

#[test]
fn listen_fds_for_another_process_are_ignored() {
    let broker = Broker::builder("act-notours").env("LISTEN_PID", "1").env("LISTEN_FDS", "1").start();
    let log = broker.log_text();
    assert!(log.contains("LISTEN_PID=1 is not our pid"), "{log}");
    assert!(log.contains("0 sockets from systemd"), "{log}");
}

/// A socket the broker makes goes to the fd store (FDSTORE=1 with its FDNAME
/// and the descriptor); a broker started with it in LISTEN_FDS, as systemd
/// does after a restart, holds it again: the same kernel socket.
#[test]
fn own_sockets_go_to_the_fd_store_and_come_back() {
    let first = Broker::start("act-store1");
    let mut client = first.client();
    let (spec, fd) = bind_free_tcp(&mut client);
    let key: sockbroker::spec::SocketKey = spec.parse().unwrap();
    let fdname = sockbroker::systemd::fdstore::encode(&key, None).unwrap();
    let (msg, stored) = wait_notify(&first.notify, "FDSTORE=1");
    assert!(msg.lines().any(|l| l == format!("FDNAME={fdname}")), "{msg}");
    assert_eq!(stored.len(), 1, "{msg}");
    assert_eq!(inode(stored[0].as_fd()), inode(fd.as_fd()));
    let (status, _) = wait_notify(&first.notify, "STATUS=");
    assert!(
        status.contains("holding 1 sockets (0 from systemd, 0 from the fd store, 1 on demand, 0 declared)"),
        "{status}"
    );
    drop(client);
    drop(first);

    // The restart, as systemd does it: the stored socket in LISTEN_FDS under
    // its FDNAME, beside the control socket.
    let dir = test_dir("act-store2");
    let control = dir.join("control.sock");
    let args = vec![format!("--fdname={fdname}:control"), format!("-l{}", control.display())];
    let (second, _early) = Broker::builder("activated").dir(dir).control(control).start_activated(&args, stored);
    let log = second.log_text();
    assert!(log.contains(&format!("holding {spec} (from the fd store)")), "{log}");
    let again = second.client().bind(&spec.parse().unwrap()).unwrap();
    assert_eq!(inode(again.as_fd()), inode(fd.as_fd()), "a new socket instead of the stored one");
    // Not stored a second time: systemd still has it.
    assert!(!log.contains("kept in systemd's fd store"), "{log}");
    // Still releasable: it was made on demand, and releasing it takes it out
    // of the store under the same FDNAME.
    second.client().release(&spec.parse().unwrap()).unwrap();
    let (msg, fds) = wait_notify(&second.notify, "FDSTOREREMOVE=1");
    assert!(msg.lines().any(|l| l == format!("FDNAME={fdname}")), "{msg}");
    assert!(fds.is_empty());
}

/// Every notify message up to and including the first with a line starting
/// with `line`: each message's text and how many descriptors came with it.
#[track_caller]
fn notify_until(notify: &UnixDatagram, line: &str) -> Vec<(String, usize)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    notify.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut seen = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "no notify message with {line:?} within 10s; got {seen:?}");
        let Some((text, fds)) = recv_notify(notify) else { continue };
        let done = text.lines().any(|l| l.starts_with(line));
        seen.push((text, fds.len()));
        if done {
            return seen;
        }
    }
}

/// The FDNAME= value of a notify message.
fn fdname_of(msg: &str) -> Option<&str> {
    msg.lines().find_map(|l| l.strip_prefix("FDNAME="))
}

/// A released socket leaves the fd store: `FDSTOREREMOVE=1` with the very
/// FDNAME it was stored under (and no descriptor), through the client API
/// and through `sockbroker release`. A socket still held stays stored, even
/// when the broker stops: systemd must keep it for the next broker.
#[test]
fn released_sockets_leave_the_fd_store() {
    let mut broker = Broker::start("act-storerm");
    let mut client = broker.client();
    let (tcp, _tcp_fd) = bind_free_tcp(&mut client);
    let (tcp_stored, _) = wait_notify(&broker.notify, "FDSTORE=1");
    // A key with `:` and `%`, released by the CLI: its FDNAME is short all the same.
    let unix = format!("unix:@sbt-storerm:{}%x", std::process::id());
    let _unix_fd = client.bind(&unix.parse().unwrap()).unwrap();
    let (unix_stored, _) = wait_notify(&broker.notify, "FDSTORE=1");
    let (kept, _kept_fd) = bind_free_tcp(&mut client);
    let (kept_stored, _) = wait_notify(&broker.notify, "FDSTORE=1");
    let tcp_name = fdname_of(&tcp_stored).unwrap().to_string();
    let unix_name = fdname_of(&unix_stored).unwrap().to_string();
    let kept_name = fdname_of(&kept_stored).unwrap().to_string();
    assert_eq!(tcp_name, sockbroker::systemd::fdstore::encode(&tcp.parse().unwrap(), None).unwrap());
    for name in [&tcp_name, &unix_name, &kept_name] {
        assert!(
            name.starts_with("sb-") && name.len() == 6,
            "{name}: no key spelled out, so 16,384 fit in LISTEN_FDNAMES"
        );
    }

    client.release(&tcp.parse().unwrap()).unwrap();
    let seen = notify_until(&broker.notify, "FDSTOREREMOVE=1");
    let (removal, fds) = seen.last().unwrap();
    assert_eq!(fdname_of(removal), Some(tcp_name.as_str()), "{removal}");
    assert_eq!(*fds, 0, "a removal carries no descriptor: {removal}");

    let out = broker.cli(&["release", &unix]);
    assert!(out.status.success(), "{}", output_text(&out));
    let seen = notify_until(&broker.notify, "FDSTOREREMOVE=1");
    let (removal, fds) = seen.last().unwrap();
    assert_eq!(fdname_of(removal), Some(unix_name.as_str()), "{removal}");
    assert_eq!(*fds, 0, "{removal}");

    // Releasing what is no longer held is refused and removes nothing; nor
    // does stopping: the kept socket stays in the store.
    assert!(client.release(&tcp.parse().unwrap()).is_err());
    drop(client);
    broker.signal(nix::sys::signal::Signal::SIGTERM);
    let seen = notify_until(&broker.notify, "STOPPING=1");
    assert!(seen.iter().all(|(m, _)| !m.contains("FDSTOREREMOVE")), "{seen:?} (kept: {kept} as {kept_name})");
    let status = wait_timeout(&mut broker.child, Duration::from_secs(10)).expect("no exit within 10s of SIGTERM");
    assert!(status.success());
    // Once each: the log says what went and when.
    let log = broker.log_text();
    assert_eq!(log.matches("removed from systemd's fd store").count(), 2, "{log}");
}

/// WATCHDOG=1 keeps coming while the broker serves, when systemd asks for it
/// (WATCHDOG_USEC); STOPPING=1 comes on SIGTERM.
#[test]
fn watchdog_pings_and_stopping() {
    let mut broker = Broker::builder("act-watchdog").env("WATCHDOG_USEC", "200000").start();
    assert!(broker.log_text().contains("systemd watchdog: pinging every 100ms"), "{}", broker.log_text());
    let start = Instant::now();
    for _ in 0..3 {
        wait_notify(&broker.notify, "WATCHDOG=1");
    }
    // Three pings at 100 ms intervals (the first may be READY's): well under
    // the 10 s a missing ping would take to fail wait_notify.
    assert!(start.elapsed() < Duration::from_secs(5), "pings too slow: {:?}", start.elapsed());
    broker.signal(nix::sys::signal::Signal::SIGTERM);
    wait_notify(&broker.notify, "STOPPING=1");
    let status = wait_timeout(&mut broker.child, Duration::from_secs(10)).expect("no exit within 10s of SIGTERM");
    assert!(status.success());
}
