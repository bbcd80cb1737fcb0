//! Telling the service manager what the broker is doing (`sd_notify`).
//!
//! Thin wrappers over `libsystemd::daemon::notify`: without `NOTIFY_SOCKET`
//! (not started by systemd, or by a supervisor that does not listen) they do
//! nothing. A failure to notify is logged, never fatal: the broker's sockets
//! matter more than its status line.

use libsystemd::daemon::{self, NotifyState};

/// Sends states to the service manager, logging failures.
pub fn send(states: &[NotifyState]) {
    if let Err(e) = daemon::notify(false, states) {
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
