//! Telling the service manager what the broker is doing (`sd_notify`).
//!
//! Without `NOTIFY_SOCKET` (not started by systemd, or by a supervisor that
//! does not listen) nothing is sent. A failure to notify is logged, never
//! fatal: the broker's sockets matter more than its status line.
//!
//! The datagram is sent with `MSG_DONTWAIT`: `libsystemd::daemon::notify`
//! uses a blocking socket, and a notify socket whose reader stalls (a full
//! queue of fd-store messages, a supervisor that stopped reading) would then
//! wedge the broker's only thread. `libsystemd` still provides the message
//! types, their wire text and FDNAME validation.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use libsystemd::daemon::{self, NotifyState};
use nix::sys::socket::{sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr};

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

/// Sends states, with descriptors attached, to `NOTIFY_SOCKET` without
/// blocking. Ok(false) when there is no `NOTIFY_SOCKET`.
pub fn send_with_fds(states: &[NotifyState], fds: &[BorrowedFd<'_>]) -> Result<bool, NotifyError> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET").filter(|v| !v.is_empty()) else { return Ok(false) };
    for state in states {
        if let NotifyState::Fdname(name) = state {
            if name.len() > 255 || name.bytes().any(|b| !(0x20..0x7f).contains(&b) || b == b':') {
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
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &[ControlMessage::ScmRights(&raw)] };
    sendmsg(sock.as_raw_fd(), &[IoSlice::new(text.as_bytes())], cmsgs, MsgFlags::MSG_DONTWAIT, Some(&addr))?;
    Ok(true)
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
