//! The broker's request counters: what the control loop increments as it
//! answers (one call per request, no allocation), and what `metrics` reads.
//!
//! Labels come from closed sets: a method the broker does not serve counts
//! as `other`, an error code it does not know as `error`, so a peer sending
//! random method names cannot grow the metrics without bound. The counters
//! live in the process and go to the next one on a re-exec or takeover
//! ([`CountersState`], by label names, so a broker whose label sets differ
//! still reads them); they restart at zero after a restart (Prometheus'
//! `rate()` and `increase()` handle counter resets).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::protocol::code;

/// Methods counted under their own name; anything else is `other`.
pub const METHODS: &[&str] =
    &["bind", "bind_many", "release", "list", "status", "reload", "adopt", "takeover", "metrics", "other"];

/// The limits that refuse a connection on accept (the `limit` label):
/// `limits.max_clients_per_uid`, the reserve of `limits.max_clients`, the
/// reserve of descriptors below `RLIMIT_NOFILE`.
pub const REFUSALS: [&str; 3] = ["max_clients_per_uid", "max_clients", "descriptors"];

/// Outcomes: `ok`, or the error code's name.
pub const OUTCOMES: &[&str] = &[
    "ok",
    "parse_error",
    "invalid_request",
    "method_not_found",
    "invalid_params",
    "bind_failed",
    "unknown_name",
    "access_denied",
    "not_releasable",
    "reload_failed",
    "too_many",
    "adopt_refused",
    "takeover_refused",
    "error",
];

/// The outcome label of an error code (`None`: success).
pub fn outcome(error: Option<i64>) -> &'static str {
    match error {
        None => "ok",
        Some(code::PARSE_ERROR) => "parse_error",
        Some(code::INVALID_REQUEST) => "invalid_request",
        Some(code::METHOD_NOT_FOUND) => "method_not_found",
        Some(code::INVALID_PARAMS) => "invalid_params",
        Some(code::BIND_FAILED) => "bind_failed",
        Some(code::UNKNOWN_NAME) => "unknown_name",
        Some(code::ACCESS_DENIED) => "access_denied",
        Some(code::NOT_RELEASABLE) => "not_releasable",
        Some(code::RELOAD_FAILED) => "reload_failed",
        Some(code::TOO_MANY) => "too_many",
        Some(code::ADOPT_REFUSED) => "adopt_refused",
        Some(code::TAKEOVER_REFUSED) => "takeover_refused",
        Some(_) => "error",
    }
}

/// What the control loop counted since the process started.
#[derive(Debug, Clone)]
pub struct Counters {
    /// Requests by `[method][outcome]`, indexed as [`METHODS`] and [`OUTCOMES`].
    requests: Vec<[u64; OUTCOMES.len()]>,
    /// Connections refused on accept, by the limit that refused them, as
    /// [`REFUSALS`] names them.
    pub connections_refused: [u64; REFUSALS.len()],
    /// Connections accepted.
    pub connections_accepted: u64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            requests: vec![[0; OUTCOMES.len()]; METHODS.len()],
            connections_refused: [0; REFUSALS.len()],
            connections_accepted: 0,
        }
    }
}

impl Counters {
    /// Counts one answered request; `error` is the error code, if it failed.
    pub fn request(&mut self, method: &str, error: Option<i64>) {
        let m = METHODS.iter().position(|m| *m == method).unwrap_or(METHODS.len() - 1);
        let label = outcome(error);
        let o = OUTCOMES.iter().position(|x| *x == label).unwrap_or(OUTCOMES.len() - 1);
        self.requests[m][o] += 1;
    }

    /// Every non-zero `(method, outcome, count)`, plus `ok` for every method
    /// (so a rate over a method is defined before its first failure).
    pub fn requests(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + '_ {
        self.requests.iter().enumerate().flat_map(|(m, row)| {
            row.iter().enumerate().filter(|(o, n)| **n > 0 || *o == 0).map(move |(o, n)| (METHODS[m], OUTCOMES[o], *n))
        })
    }

    /// The counters as an upgrade carries them.
    pub fn to_state(&self) -> CountersState {
        let mut requests: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (method, outcome, n) in self.requests().filter(|(_, _, n)| *n > 0) {
            requests.entry(method.to_string()).or_default().insert(outcome.to_string(), n);
        }
        let refused = REFUSALS.iter().zip(self.connections_refused).map(|(l, n)| (l.to_string(), n)).collect();
        CountersState { requests, refused, accepted: self.connections_accepted }
    }

    /// The counters a predecessor carried; labels this broker does not know
    /// count as `other` (methods) or `error` (outcomes), and unknown refusal
    /// limits are dropped.
    pub fn from_state(state: &CountersState) -> Counters {
        let mut c = Counters { connections_accepted: state.accepted, ..Counters::default() };
        for (method, outcomes) in &state.requests {
            let m = METHODS.iter().position(|m| m == method).unwrap_or(METHODS.len() - 1);
            for (outcome, n) in outcomes {
                let o = OUTCOMES.iter().position(|o| o == outcome).unwrap_or(OUTCOMES.len() - 1);
                c.requests[m][o] += n;
            }
        }
        for (limit, n) in &state.refused {
            if let Some(i) = REFUSALS.iter().position(|l| l == limit) {
                c.connections_refused[i] += n;
            }
        }
        c
    }

    /// Requests refused by the allow rules, per method.
    pub fn refusals(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        let denied = OUTCOMES.iter().position(|o| *o == "access_denied").unwrap_or(0);
        self.requests.iter().enumerate().map(move |(m, row)| (METHODS[m], row[denied]))
    }
}

/// [`Counters`] by label names, as a re-exec or takeover hands them over.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersState {
    /// Requests by method, then outcome.
    pub requests: BTreeMap<String, BTreeMap<String, u64>>,
    /// Connections refused, by limit.
    pub refused: BTreeMap<String, u64>,
    /// Connections accepted.
    pub accepted: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_survive_their_state_and_unknown_labels_fall_into_other() {
        let mut c = Counters::default();
        c.request("bind", None);
        c.request("bind", Some(code::ACCESS_DENIED));
        c.request("list", None);
        c.connections_refused[1] = 3;
        c.connections_accepted = 7;
        let mut state = c.to_state();
        let back = Counters::from_state(&state);
        assert_eq!(back.to_state(), state);
        state.requests.entry("frobnicate".into()).or_default().insert("ok".into(), 2);
        state.refused.insert("gone".into(), 5);
        let back = Counters::from_state(&state);
        assert!(back.requests().any(|r| r == ("other", "ok", 2)));
        assert_eq!(back.connections_refused, [0, 3, 0]);
        assert_eq!(back.connections_accepted, 7);
    }

    #[test]
    fn closed_label_sets() {
        let mut c = Counters::default();
        c.request("bind", None);
        c.request("bind", Some(code::ACCESS_DENIED));
        c.request("no-such-method-\"x", Some(code::METHOD_NOT_FOUND));
        c.request("list", Some(424242));
        let all: Vec<_> = c.requests().filter(|(_, _, n)| *n > 0).collect();
        assert_eq!(
            all,
            vec![
                ("bind", "ok", 1),
                ("bind", "access_denied", 1),
                ("list", "error", 1),
                ("other", "method_not_found", 1)
            ]
        );
        assert_eq!(c.refusals().find(|(m, _)| *m == "bind"), Some(("bind", 1)));
        assert_eq!(c.requests().count(), METHODS.len() + 3, "ok for every method plus the failures");
    }
}
