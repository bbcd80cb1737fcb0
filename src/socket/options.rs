//! Socket options: set on a socket the broker makes, before `bind()`
//! ([`apply_inet_options`], called by [`super::open`]), and read back from
//! the kernel for a socket the broker did not make ([`read_options`]), plus
//! the raw `int` getters and setters nix does not wrap and the accept queue
//! figures introspection shows.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::sys::socket::{setsockopt, sockopt};

use crate::spec::{SocketKey, SocketOptions, Transport, UnixAddress};

/// Sets the IP-level options of `options` on a TCP or UDP socket, before
/// `bind()`. Returns the name of the option that failed with the cause.
pub(super) fn apply_inet_options(
    fd: BorrowedFd<'_>,
    transport: Transport,
    v6: bool,
    options: &SocketOptions,
) -> Result<(), (&'static str, io::Error)> {
    let tcp = transport == Transport::Tcp;
    let set = |name: &'static str, r: nix::Result<()>| r.map_err(|e| (name, io::Error::from(e)));
    let set_int =
        |name: &'static str, level, opt, value: u32| set_int_option(fd, level, opt, value).map_err(|e| (name, e));
    use nix::libc;
    if options.reuse_addr.unwrap_or(tcp) {
        set("SO_REUSEADDR", setsockopt(&fd, sockopt::ReuseAddr, &true))?;
    }
    if options.reuse_port {
        set("SO_REUSEPORT", setsockopt(&fd, sockopt::ReusePort, &true))?;
    }
    if let (Some(only), true) = (options.ipv6_only, v6) {
        set("IPV6_V6ONLY", setsockopt(&fd, sockopt::Ipv6V6Only, &only))?;
    }
    if options.freebind {
        if v6 {
            set_int("IPV6_FREEBIND", libc::IPPROTO_IPV6, libc::IPV6_FREEBIND, 1)?;
        } else {
            set("IP_FREEBIND", setsockopt(&fd, sockopt::IpFreebind, &true))?;
        }
    }
    if options.transparent {
        if v6 {
            set_int("IPV6_TRANSPARENT", libc::IPPROTO_IPV6, libc::IPV6_TRANSPARENT, 1)?;
        } else {
            set("IP_TRANSPARENT", setsockopt(&fd, sockopt::IpTransparent, &true))?;
        }
    }
    if let Some(dev) = &options.bind_to_device {
        set("SO_BINDTODEVICE", setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(dev)))?;
    }
    if let Some(secs) = options.defer_accept {
        set_int("TCP_DEFER_ACCEPT", libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, secs)?;
    }
    if let Some(queue) = options.fast_open {
        set_int("TCP_FASTOPEN", libc::IPPROTO_TCP, libc::TCP_FASTOPEN, queue)?;
    }
    if options.keepalive {
        set("SO_KEEPALIVE", setsockopt(&fd, sockopt::KeepAlive, &true))?;
    }
    if let Some(secs) = options.keepalive_idle {
        set_int("TCP_KEEPIDLE", libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs)?;
    }
    if let Some(secs) = options.keepalive_interval {
        set_int("TCP_KEEPINTVL", libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, secs)?;
    }
    if let Some(count) = options.keepalive_count {
        set_int("TCP_KEEPCNT", libc::IPPROTO_TCP, libc::TCP_KEEPCNT, count)?;
    }
    if options.no_delay {
        set("TCP_NODELAY", setsockopt(&fd, sockopt::TcpNoDelay, &true))?;
    }
    if let Some(size) = options.receive_buffer {
        set_buffer(fd, sockopt::RcvBuf, size).map_err(|e| ("SO_RCVBUF", e))?;
    }
    if let Some(size) = options.send_buffer {
        set_buffer(fd, sockopt::SndBuf, size).map_err(|e| ("SO_SNDBUF", e))?;
    }
    if let Some(mark) = options.mark {
        set("SO_MARK", setsockopt(&fd, sockopt::Mark, &mark))?;
    }
    if options.broadcast {
        set("SO_BROADCAST", setsockopt(&fd, sockopt::Broadcast, &true))?;
    }
    Ok(())
}

pub(super) fn set_buffer<O: nix::sys::socket::SetSockOpt<Val = usize>>(
    fd: BorrowedFd<'_>,
    opt: O,
    size: u32,
) -> io::Result<()> {
    Ok(setsockopt(&fd, opt, &(size as usize))?)
}

/// `setsockopt` with an `int` value, for the options nix does not wrap
/// (TCP_DEFER_ACCEPT, TCP_FASTOPEN, IPV6_FREEBIND, IPV6_TRANSPARENT, keepalive
/// timers).
pub fn set_int_option(fd: BorrowedFd<'_>, level: i32, name: i32, value: u32) -> io::Result<()> {
    let value = i32::try_from(value).unwrap_or(i32::MAX);
    // SAFETY: `fd` is open for the duration of the call; the pointer and length
    // describe a live `c_int` on our stack.
    let rc = unsafe {
        nix::libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as nix::libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `getsockopt` of an `int` option: reads back what the kernel holds (used by
/// the tests of every option and by introspection).
pub fn get_int_option(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<i32> {
    let mut value: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as nix::libc::socklen_t;
    // SAFETY: `fd` is open for the duration of the call; the pointer and length
    // describe a live, writable `c_int` on our stack.
    let rc = unsafe { nix::libc::getsockopt(fd.as_raw_fd(), level, name, (&mut value as *mut i32).cast(), &mut len) };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The accept queue of a TCP listener: connections waiting for `accept()`,
/// and the backlog (the kernel's cap on that queue, after `somaxconn`).
///
/// On a listening socket, Linux fills `TCP_INFO`'s `tcpi_unacked` with the
/// current queue length and `tcpi_sacked` with the backlog.
pub fn accept_queue(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    // SAFETY: tcp_info is plain old data; all zeroes is a valid value.
    let mut info: nix::libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<nix::libc::tcp_info>() as nix::libc::socklen_t;
    // SAFETY: `fd` is open for the duration of the call; the pointer and length
    // describe `info`, which the kernel fills at most `len` bytes of.
    let rc = unsafe {
        nix::libc::getsockopt(
            fd.as_raw_fd(),
            nix::libc::IPPROTO_TCP,
            nix::libc::TCP_INFO,
            (&mut info as *mut nix::libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if info.tcpi_state != 10 {
        // TCP_LISTEN is 10 in the kernel's state numbering.
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a listening TCP socket"));
    }
    Ok((info.tcpi_unacked, info.tcpi_sacked))
}

/// `listen()` with any backlog: nix's `Backlog` refuses values above the
/// libc `SOMAXCONN` constant, but the kernel itself caps the value at
/// `net.core.somaxconn`, which administrators raise for busy listeners.
pub(super) fn listen(fd: BorrowedFd<'_>, backlog: u32) -> io::Result<()> {
    let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
    // SAFETY: `fd` is a valid open descriptor for the duration of the call and
    // listen() takes no pointers.
    let rc = unsafe { nix::libc::listen(fd.as_raw_fd(), backlog) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The options an existing socket has, read back from the kernel (for a
/// socket the broker adopts and did not make). Nothing is set: the socket
/// keeps exactly what its maker gave it. An option the kernel will not
/// report keeps its default here.
pub fn read_options(fd: BorrowedFd<'_>, key: &SocketKey) -> SocketOptions {
    use nix::libc;
    use nix::sys::socket::getsockopt;
    let int = |level, name| get_int_option(fd, level, name).ok();
    let flag = |level, name| int(level, name).is_some_and(|v| v != 0);
    let positive = |level, name| int(level, name).filter(|v| *v > 0).map(|v| v as u32);
    let mut o = SocketOptions { backlog: 0, ..SocketOptions::default() };
    // The kernel reports buffer sizes doubled (see socket(7)); halve them so
    // the figure matches what a configuration would have asked for.
    o.receive_buffer = getsockopt(&fd, sockopt::RcvBuf).ok().map(|v| (v / 2) as u32);
    o.send_buffer = getsockopt(&fd, sockopt::SndBuf).ok().map(|v| (v / 2) as u32);
    if let SocketKey::Inet { transport, addr } = key {
        o.reuse_addr = Some(flag(libc::SOL_SOCKET, libc::SO_REUSEADDR));
        o.reuse_port = flag(libc::SOL_SOCKET, libc::SO_REUSEPORT);
        o.keepalive = flag(libc::SOL_SOCKET, libc::SO_KEEPALIVE);
        o.broadcast = flag(libc::SOL_SOCKET, libc::SO_BROADCAST);
        o.mark = positive(libc::SOL_SOCKET, libc::SO_MARK);
        if addr.is_ipv6() {
            o.ipv6_only = Some(flag(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY));
            o.freebind = flag(libc::IPPROTO_IPV6, libc::IPV6_FREEBIND);
            o.transparent = flag(libc::IPPROTO_IPV6, libc::IPV6_TRANSPARENT);
        } else {
            o.freebind = flag(libc::IPPROTO_IP, libc::IP_FREEBIND);
            o.transparent = flag(libc::IPPROTO_IP, libc::IP_TRANSPARENT);
        }
        o.bind_to_device = getsockopt(&fd, sockopt::BindToDevice)
            .ok()
            .map(|d| d.to_string_lossy().trim_end_matches('\0').to_string())
            .filter(|d| !d.is_empty());
        if *transport == Transport::Tcp {
            o.no_delay = flag(libc::IPPROTO_TCP, libc::TCP_NODELAY);
            o.defer_accept = positive(libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT);
            o.fast_open = positive(libc::IPPROTO_TCP, libc::TCP_FASTOPEN);
            o.keepalive_idle = positive(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE).filter(|_| o.keepalive);
            o.keepalive_interval = positive(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL).filter(|_| o.keepalive);
            o.keepalive_count = positive(libc::IPPROTO_TCP, libc::TCP_KEEPCNT).filter(|_| o.keepalive);
            if let Ok((_, backlog)) = accept_queue(fd) {
                o.backlog = backlog;
            }
        }
    }
    if let SocketKey::Unix { address: UnixAddress::Path(path), .. } = key {
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            o.mode = Some(meta.mode() & 0o7777);
            o.user = Some(meta.uid());
            o.group = Some(meta.gid());
        }
    }
    if o.backlog == 0 {
        // Only a TCP listener reports its backlog; 0 reads as "unknown".
        o.backlog = crate::spec::DEFAULT_BACKLOG;
    }
    o
}
