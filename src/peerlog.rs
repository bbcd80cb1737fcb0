//! Log lines about what a peer asked for, rate-limited per uid.
//!
//! Every refused or failed request is worth a line, but a client looping on
//! a refused request must not write megabytes a second into the journal
//! (whose own rate limit would then drop the broker's other messages). Each
//! uid but root's and the broker's own has a token bucket: [`Limits::log_burst`] lines at once, then
//! [`Limits::log_per_minute`]. Lines beyond are counted; the next line
//! allowed for that uid, or [`report_suppressed`] (run by the control loop),
//! says "N more suppressed".
//!
//! The state is per thread: the broker logs peer lines from its one control
//! thread, and the request handlers that log ([`crate::server`],
//! [`crate::methods`]) need no handle passed through every call.
//!
//! [`Limits::log_burst`]: crate::limits::Limits::log_burst
//! [`Limits::log_per_minute`]: crate::limits::Limits::log_per_minute

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Uids tracked at most; beyond, buckets that are full again are dropped.
const MAX_TRACKED: usize = 4096;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

#[derive(Debug)]
struct State {
    /// The broker's uid: with root, not rate-limited (they can stop the
    /// broker anyway, and their lines are the operator's own).
    owner: u32,
    burst: u32,
    per_minute: u32,
    buckets: HashMap<u32, Bucket>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State {
        owner: nix::unistd::geteuid().as_raw(),
        burst: crate::limits::Limits::default().log_burst,
        per_minute: crate::limits::Limits::default().log_per_minute,
        buckets: HashMap::new(),
    });
}

/// Sets the burst and rate (from the limits in force).
pub fn configure(burst: u32, per_minute: u32) {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.burst = burst.max(1);
        s.per_minute = per_minute.max(1);
    });
}

/// Whether a line about `uid` may be written now. `Some(n)`: yes, and `n`
/// earlier lines were suppressed since the last one written.
pub fn allow(uid: u32) -> Option<u64> {
    allow_at(uid, Instant::now())
}

fn allow_at(uid: u32, now: Instant) -> Option<u64> {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        if uid == 0 || uid == s.owner {
            return Some(0);
        }
        let (burst, rate) = (f64::from(s.burst), f64::from(s.per_minute) / 60.0);
        if s.buckets.len() >= MAX_TRACKED && !s.buckets.contains_key(&uid) {
            s.buckets
                .retain(|_, b| b.suppressed > 0 || b.tokens + now.duration_since(b.last).as_secs_f64() * rate < burst);
        }
        let b = s.buckets.entry(uid).or_insert(Bucket { tokens: burst, last: now, suppressed: 0 });
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Some(std::mem::take(&mut b.suppressed))
        } else {
            b.suppressed += 1;
            None
        }
    })
}

/// Whether lines are waiting to be reported as suppressed.
pub fn pending() -> bool {
    STATE.with(|s| s.borrow().buckets.values().any(|b| b.suppressed > 0))
}

/// Writes one "N more suppressed" line for each uid with lines suppressed
/// and none written for `quiet`, so a flood that stopped is still reported.
pub fn report_suppressed(quiet: Duration) {
    let now = Instant::now();
    STATE.with(|s| {
        for (uid, b) in s.borrow_mut().buckets.iter_mut() {
            if b.suppressed > 0 && now.duration_since(b.last) >= quiet {
                log::warn!("uid {uid}: {} more messages about its requests suppressed", b.suppressed);
                b.suppressed = 0;
            }
        }
    });
}

/// Logs a line about a peer's request, rate-limited per uid:
/// `peer_log!(peer, log::Level::Warn, "bind {key}: refused: {e}")`. The
/// line starts with the peer (`pid=… uid=… gid=…`).
#[macro_export]
macro_rules! peer_log {
    ($peer:expr, $level:expr, $($arg:tt)+) => {{
        let peer: &$crate::fd::PeerCred = &$peer;
        let level: log::Level = $level;
        if log::log_enabled!(level) {
            if let Some(n) = $crate::peerlog::allow(peer.uid) {
                if n == 0 {
                    log::log!(level, "{} {}", peer, format_args!($($arg)+));
                } else {
                    log::log!(level, "{} {} ({} more suppressed)", peer, format_args!($($arg)+), n);
                }
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate_then_report() {
        configure(3, 60);
        let t0 = Instant::now();
        let uid = 4_000_000_001;
        assert_eq!(allow_at(uid, t0), Some(0));
        assert_eq!(allow_at(uid, t0), Some(0));
        assert_eq!(allow_at(uid, t0), Some(0));
        assert_eq!(allow_at(uid, t0), None);
        assert_eq!(allow_at(uid, t0), None);
        // Another uid is not affected.
        assert_eq!(allow_at(uid + 1, t0), Some(0));
        // One token a second at 60 a minute: the next line says how many
        // were dropped.
        assert_eq!(allow_at(uid, t0 + Duration::from_millis(1100)), Some(2));
        assert_eq!(allow_at(uid, t0 + Duration::from_millis(1100)), None);
    }
}
