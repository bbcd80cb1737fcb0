//! What one peer may cost the event loop, counted per turn: connections
//! and descriptors in flight per uid, reply bytes queued for untrusted
//! peers, and work units per uid ([`TURN_BUDGET`]) and `list` entries for
//! all untrusted peers together ([`LIST_ENTRIES`] per [`LIST_REFILL`]), so a
//! peer that pipelines costly requests delays binds by one small share, not
//! by all its requests, and cannot keep the broker busy (a broker that
//! sleeps between chunks is woken at once for a bind; one that spins waits
//! for the scheduler). The values are [`Limits`]; [`Server::count_use`] sums
//! them at the start of each turn and [`Server::over_limit`] reads them
//! before a request is answered.

use std::time::{Duration, Instant};

use super::conn::{Conn, MAX_QUEUED_REPLIES};
use super::Server;
use crate::limits::Limits;
use crate::protocol::{Method, Request};

/// What the connections of one uid use, counted once per turn of the loop.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct UidUse {
    pub(super) conns: usize,
    pub(super) in_flight: usize,
}

/// Work units one untrusted uid may use per turn of the loop.
pub(super) const TURN_BUDGET: usize = 16;

/// `list` entries built for all untrusted peers together per
/// [`LIST_REFILL`]: a page is built over several turns, and a bind arriving
/// meanwhile waits for at most this many entries, not for a whole page per
/// attacking connection. About 32,000 entries a second: a page of 256 in
/// 8 ms. Root and the broker's uid are not held to it.
pub(super) const LIST_ENTRIES: usize = 32;
/// How often the `list` budget is refilled.
pub(super) const LIST_REFILL: Duration = Duration::from_millis(1);

/// What a request costs of [`TURN_BUDGET`]: 1, plus its share of entries
/// for `list` (16 a unit) and of items for `bind_many` (64 a unit).
pub(super) fn cost(method: Method, req: &Request, limits: &Limits) -> usize {
    match method {
        Method::List => {
            let limit = req
                .params
                .get("limit")
                .and_then(serde_json::Value::as_u64)
                .map_or(limits.list_page_max, |l| l as usize);
            1 + limit.min(limits.list_page_max) / 16
        }
        Method::BindMany => 1 + req.params.as_array().map_or(0, Vec::len) / 64,
        _ => 1,
    }
}

/// The soft `RLIMIT_NOFILE` (the daemon raises it before the loop starts).
pub(super) fn nofile() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(s, _)| s);
    usize::try_from(soft).unwrap_or(usize::MAX)
}

/// Half the soft `RLIMIT_NOFILE` (read when the loop starts; the daemon
/// raises it first): the most descriptors untrusted peers may have in flight
/// together.
pub(super) fn in_flight_budget() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(s, _)| s);
    let budget = usize::try_from(soft / 2).unwrap_or(usize::MAX).max(16);
    log::info!(
        "descriptors in flight to untrusted peers: at most {budget} together (half of RLIMIT_NOFILE {soft}), \
         per uid the smaller of limits.max_fds_in_flight_per_uid and {}",
        budget / 2
    );
    budget
}

impl Server {
    /// Counts, per uid, connections and descriptors in flight, and the reply
    /// bytes queued for untrusted peers; asks the kernel what was read. A
    /// new turn: the work shares start again.
    pub(super) fn count_use(&mut self) {
        let now = Instant::now();
        self.uid_use.clear();
        self.turn_spent.clear();
        if now >= self.list_refilled + LIST_REFILL {
            self.list_budget = LIST_ENTRIES;
            self.list_refilled = now;
        }
        self.untrusted_queued = 0;
        self.untrusted_in_flight = 0;
        for conn in self.conns.values_mut() {
            conn.refresh_unread(now);
            let u = self.uid_use.entry(conn.peer.uid).or_default();
            u.conns += 1;
            u.in_flight += conn.in_flight();
            if !self.live.policy.trusts(&conn.peer) {
                self.untrusted_queued += conn.queued_bytes;
                self.untrusted_in_flight += conn.in_flight();
            }
        }
    }

    /// Descriptors the broker holds, about: held sockets, connections,
    /// duplicates waiting to be sent, and its own few (control socket,
    /// signalfd, notify, log).
    pub(super) fn fds_in_use(&self) -> usize {
        self.registry.len() + self.conns.len() + self.conns.values().map(|c| c.queued_fds).sum::<usize>() + 16
    }

    /// Which limit keeps the broker from answering another request of this
    /// connection now, if any.
    pub(super) fn over_limit(&self, conn: &Conn) -> Option<&'static str> {
        let l = self.limits();
        if conn.outbox.len() >= MAX_QUEUED_REPLIES {
            return Some("replies queued");
        }
        if conn.queued_bytes >= l.max_queued_bytes_per_connection {
            return Some("limits.max_queued_bytes_per_connection");
        }
        if conn.in_flight() >= l.max_fds_in_flight_per_connection {
            return Some("limits.max_fds_in_flight_per_connection");
        }
        if self.live.policy.trusts(&conn.peer) {
            return None;
        }
        let per_uid = l.max_fds_in_flight_per_uid.min(self.in_flight_budget / 2);
        if self.uid_use.get(&conn.peer.uid).is_some_and(|u| u.in_flight >= per_uid) {
            return Some("limits.max_fds_in_flight_per_uid");
        }
        // The shared budgets hold back only connections that already have
        // something unread: whoever filled them waits, while a peer that
        // reads what it gets (a daemon asking for its socket) is still
        // answered, overshooting by its one reply.
        if self.untrusted_in_flight >= self.in_flight_budget && conn.in_flight() > 0 {
            return Some("half of RLIMIT_NOFILE in flight to untrusted peers");
        }
        if self.untrusted_queued >= l.max_queued_bytes && conn.queued_bytes > 0 {
            return Some("limits.max_queued_bytes");
        }
        None
    }

    /// Whether the connection's uid has used its share of work for this turn
    /// of the loop ([`TURN_BUDGET`]): a uid pipelining costly requests on
    /// many connections (a `list` page builds hundreds of entries) then
    /// delays other uids by one share, not by all its requests.
    pub(super) fn spent_turn(&self, conn: &Conn) -> bool {
        !self.live.policy.trusts(&conn.peer) && self.turn_spent.get(&conn.peer.uid).is_some_and(|s| *s >= TURN_BUDGET)
    }
}
