//! Signals as events: the broker and the supervisors block the signals they
//! handle and read them from a signalfd in their poll loop, so no handler
//! ever runs at an arbitrary point of the code.
//!
//! A blocked signal stays blocked across `fork`; every child the project
//! starts gets an empty mask before `execve` (see [`crate::child`]), so
//! daemons see their signals as usual.

use std::time::Duration;

use nix::poll::PollTimeout;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// Blocks `signals` in the calling thread and returns a non-blocking,
/// close-on-exec signalfd that reads them. Call it before any thread starts,
/// so every thread inherits the mask.
pub fn block_into_signalfd(signals: &[Signal]) -> nix::Result<SignalFd> {
    let mut mask = SigSet::empty();
    for &sig in signals {
        mask.add(sig);
    }
    mask.thread_block()?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
}

/// A `poll` timeout for "wait at most this long" (`None`: forever), rounded
/// up to the next millisecond so a deadline is never woken for too early.
pub fn poll_timeout(timeout: Option<Duration>) -> PollTimeout {
    match timeout {
        None => PollTimeout::NONE,
        Some(t) => {
            let ms = t.as_nanos().div_ceil(1_000_000);
            PollTimeout::try_from(ms.min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_round_up() {
        assert_eq!(poll_timeout(None), PollTimeout::NONE);
        assert_eq!(poll_timeout(Some(Duration::ZERO)), PollTimeout::ZERO);
        assert_eq!(poll_timeout(Some(Duration::from_micros(1))), PollTimeout::from(1u16));
        assert_eq!(poll_timeout(Some(Duration::from_millis(250))), PollTimeout::from(250u16));
        assert_eq!(poll_timeout(Some(Duration::from_secs(u64::MAX))), PollTimeout::MAX);
    }
}
