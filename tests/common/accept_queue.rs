//! Samples the accept queue of every TCP listener on a port, whoever holds
//! it (HAProxy's own sockets included), as `ss -lt` does: a sock_diag
//! netlink dump of the listening sockets only, where `idiag_rqueue` of a
//! listener is its accept queue's length (`sk_ack_backlog`, Recv-Q). The
//! queues of all listeners on the port are summed (HAProxy's classic reload
//! has two SO_REUSEPORT listeners for a while).
//!
//! Not `/proc/net/tcp`: it lists every TCP socket, TIME_WAIT included.
//! Under a load of new connections that is ~100,000 lines, tens of
//! milliseconds of CPU per read, and a sampler reading it every 2 ms kept
//! one of two cores busy, in the very measurement it was part of. Asking
//! for the LISTEN state alone, the kernel walks only its listening table.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType};

/// `SOCK_DIAG_BY_FAMILY`, `NLM_F_REQUEST | NLM_F_DUMP`, `NLMSG_DONE`, `NLMSG_ERROR`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const DUMP_REQUEST: u16 = 0x1 | 0x300;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const TCP_LISTEN: u32 = 10;

/// The summed accept queue of the TCP listeners on `port` now.
pub fn depth(port: u16) -> u32 {
    [nix::libc::AF_INET as u8, nix::libc::AF_INET6 as u8]
        .into_iter()
        .map(|family| {
            listeners(family).unwrap_or_default().iter().filter(|(p, _)| *p == port).map(|(_, q)| q).sum::<u32>()
        })
        .sum()
}

/// `(local port, accept queue)` of every TCP listener of `family`.
fn listeners(family: u8) -> nix::Result<Vec<(u16, u32)>> {
    let sock =
        socket(AddressFamily::Netlink, SockType::Datagram, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkSockDiag)?;
    // nlmsghdr (16 bytes), then inet_diag_req_v2 (56 bytes): family, TCP,
    // no extensions, the LISTEN state alone, any address and port.
    let mut req = Vec::with_capacity(72);
    req.extend_from_slice(&72u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&DUMP_REQUEST.to_ne_bytes());
    req.extend_from_slice(&[0; 8]); // sequence, port id
    req.extend_from_slice(&[family, 6 /* IPPROTO_TCP */, 0, 0]);
    req.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    req.extend_from_slice(&[0; 48]);
    sendto(std::os::fd::AsRawFd::as_raw_fd(&sock), &req, &NetlinkAddr::new(0, 0), MsgFlags::empty())?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(std::os::fd::AsRawFd::as_raw_fd(&sock), &mut buf, MsgFlags::empty())?;
        let mut at = 0;
        while at + 16 <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap());
            if kind == NLMSG_DONE || kind == NLMSG_ERROR || len < 16 {
                return Ok(out);
            }
            // inet_diag_msg: the local port (big-endian) at 4, rqueue at 56.
            let msg = &buf[at + 16..(at + len).min(n)];
            if msg.len() >= 60 {
                let port = u16::from_be_bytes([msg[4], msg[5]]);
                let queue = u32::from_ne_bytes(msg[56..60].try_into().unwrap());
                out.push((port, queue));
            }
            at += (len + 3) & !3;
        }
        if n == 0 {
            return Ok(out);
        }
    }
}

/// A thread sampling [`depth`] until stopped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, u32)>>,
}

impl Sampler {
    /// Samples the listeners of `ports` (summed) every `every`.
    pub fn start(ports: Vec<u16>, every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let at = Instant::now();
                samples.push((at, ports.iter().map(|p| depth(*p)).sum()));
                std::thread::sleep(every);
            }
            samples
        });
        Sampler { stop, thread }
    }

    /// Stops and returns `(when, depth)` samples.
    pub fn finish(self) -> Vec<(Instant, u32)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// The deepest sample whose instant `keep` accepts (0 when none does).
pub fn max_where(samples: &[(Instant, u32)], keep: impl Fn(Instant) -> bool) -> u32 {
    samples.iter().filter(|(t, _)| keep(*t)).map(|(_, d)| *d).max().unwrap_or(0)
}
