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
