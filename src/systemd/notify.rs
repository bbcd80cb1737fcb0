//! Telling the service manager what the broker is doing (`sd_notify`).
//!
//! Without `NOTIFY_SOCKET` (not started by systemd, or by a supervisor that
//! does not listen) nothing is sent. A failure to notify is logged, never
//! fatal: the broker's sockets matter more than its status line.
//!
//! The datagram goes out on a connected socket with `MSG_DONTWAIT`, and a
//! full queue is waited for with `poll()`, at most [`SEND_WAIT`]:
//! - `libsystemd::daemon::notify` blocks without limit, and a notify socket
//!   whose reader stalls (a supervisor that stopped reading) would wedge the
//!   broker's only thread;
//! - never waiting would lose fd-store messages in a burst (a configuration
//!   declaring a thousand sockets sends a thousand `FDSTORE=1` datagrams, and
//!   the kernel queues at most `net.unix.max_dgram_qlen`, 512 by default,
//!   until systemd reads them).
//!
//! Once a send has timed out, later ones try once without waiting until one
//! goes through again, so a dead reader costs [`SEND_WAIT`] once, not per
//! message. `libsystemd` still provides the message types and their wire text.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use libsystemd::daemon::{self, NotifyState};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::socket::{
    connect, sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};

/// The longest one notification waits for room in the receiver's queue.
pub const SEND_WAIT: Duration = Duration::from_secs(2);

/// Set when a notification timed out: the reader is not reading.
static STALLED: AtomicBool = AtomicBool::new(false);

/// Why a notification was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `NOTIFY_SOCKET` is not a usable address.
    #[error("NOTIFY_SOCKET '{0}' is not a UNIX socket address")]
    Address(String),
    /// The datagram could not be sent (including a full queue: EAGAIN).
    #[error("sending to NOTIFY_SOCKET: {0}")]
    Send(#[from] nix::Error),
    /// A state failed libsystemd's checks (an invalid FDNAME).
    #[error("{0}")]
    Invalid(String),
}

/// Sends states, with descriptors attached, to `NOTIFY_SOCKET`, waiting at
/// most [`SEND_WAIT`] for room. Ok(false) when there is no `NOTIFY_SOCKET`.
pub fn send_with_fds(states: &[NotifyState], fds: &[BorrowedFd<'_>]) -> Result<bool, NotifyError> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET").filter(|v| !v.is_empty()) else { return Ok(false) };
    send_to(&target, states, fds).map(|()| true)
}

/// Sends states to the notify socket at `target` (a path, or `@name`).
fn send_to(target: &std::ffi::OsStr, states: &[NotifyState], fds: &[BorrowedFd<'_>]) -> Result<(), NotifyError> {
    for state in states {
        if let NotifyState::Fdname(name) = state {
            if !super::listen::fdname_is_valid(name) {
                return Err(NotifyError::Invalid(format!("invalid FDNAME '{name}'")));
            }
        }
    }
    let bytes = target.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::new_abstract(name),
        None => UnixAddr::new(bytes),
    }
    .map_err(|_| NotifyError::Address(target.to_string_lossy().into_owned()))?;
    let text: String = states.iter().map(|s| format!("{s}\n")).collect();
    let sock = socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    // Connected, so that poll() reports POLLOUT when the receiver's queue
    // has room (the kernel tracks the peer of a connected datagram socket).
    connect(sock.as_raw_fd(), &addr)?;
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &[ControlMessage::ScmRights(&raw)] };
    let deadline = Instant::now() + SEND_WAIT;
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(text.as_bytes())], cmsgs, MsgFlags::MSG_DONTWAIT, None) {
            Ok(_) => {
                STALLED.store(false, Ordering::Relaxed);
                return Ok(());
            }
            Err(Errno::EAGAIN) if !STALLED.load(Ordering::Relaxed) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    STALLED.store(true, Ordering::Relaxed);
                    return Err(NotifyError::Send(Errno::EAGAIN));
                }
                match poll(
                    &mut [PollFd::new(sock.as_fd(), PollFlags::POLLOUT)],
                    crate::signals::poll_timeout(Some(left)),
                ) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends states to the service manager, logging failures.
pub fn send(states: &[NotifyState]) {
    if let Err(e) = send_with_fds(states, &[]) {
        log::warn!("sd_notify {states:?}: {e}");
    }
}

/// READY=1 with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status.to_string())]);
}

/// STATUS=…
pub fn status(status: &str) {
    send(&[NotifyState::Status(status.to_string())]);
}

/// STOPPING=1
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping".into())]);
}

/// WATCHDOG=1
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to send WATCHDOG=1: half of `WATCHDOG_USEC` (as systemd
/// advises), or `None` when the service manager wants no pings.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    // At least 10 ms, so a tiny WATCHDOG_USEC cannot make the loop spin.
    daemon::watchdog_enabled(false).map(|timeout| (timeout / 2).max(std::time::Duration::from_millis(10)))
}

/// The CLOCK_MONOTONIC time in microseconds, as `MONOTONIC_USEC=` wants it.
pub fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

/// RELOADING=1 with `MONOTONIC_USEC=` (what `Type=notify-reload` requires)
/// and, if given, a status line: a supervisor starts a reload.
pub fn reload_started(status: Option<String>) {
    let mut states = vec![NotifyState::Reloading, NotifyState::Other(format!("MONOTONIC_USEC={}", monotonic_usec()))];
    states.extend(status.map(NotifyState::Status));
    send(&states);
}

/// RELOADING=1: the broker is re-executing itself; READY=1 follows from the
/// new image (or from this one, if the re-exec fails).
pub fn reloading(status: &str) {
    send(&[NotifyState::Reloading, NotifyState::Status(status.to_string())]);
}

/// MAINPID=…: after a takeover, the new broker is the service's main process.
/// systemd ignores it when that process is outside the service's cgroup.
pub fn main_pid(pid: i32) {
    send(&[NotifyState::Other(format!("MAINPID={pid}"))]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    /// A burst larger than the kernel's datagram queue reaches a reader that
    /// keeps up slowly; a reader that never reads costs one wait, then none.
    #[test]
    fn waits_for_room_but_not_for_a_dead_reader() {
        let dir = std::env::temp_dir().join(format!("sockbroker-notify-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let reader = UnixDatagram::bind(&path).unwrap();
        let qlen: usize = std::fs::read_to_string("/proc/sys/net/unix/max_dgram_qlen")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(512);
        let burst = qlen + 100;
        let drain = std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            let mut got = 0;
            reader.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            while got < burst {
                if got == 0 {
                    // Let the queue fill up first.
                    std::thread::sleep(Duration::from_millis(200));
                }
                reader.recv(&mut buf).unwrap();
                got += 1;
            }
            reader
        });
        for i in 0..burst {
            send_to(path.as_os_str(), &[NotifyState::Status(format!("{i}"))], &[]).unwrap();
        }
        let reader = drain.join().unwrap();

        // Nobody reads now: fill the queue, then one send waits SEND_WAIT and
        // fails, and the next fails at once.
        let mut sent = 0;
        while send_to(path.as_os_str(), &[NotifyState::Watchdog], &[]).is_ok() {
            sent += 1;
            assert!(sent <= qlen + 1, "the queue never filled");
        }
        let t = Instant::now();
        assert!(send_to(path.as_os_str(), &[NotifyState::Watchdog], &[]).is_err());
        assert!(t.elapsed() < SEND_WAIT / 2, "a stalled reader was waited for twice");
        drop(reader);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
