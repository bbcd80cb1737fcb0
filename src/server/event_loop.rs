//! The event loop: one thread, one epoll. Every client connection is
//! non-blocking, has a capped input buffer and an idle deadline, so a silent
//! or slow client costs a slot and nothing else. One turn:
//!
//! 1. expire what is overdue and count what each uid uses
//!    ([`super::budget`]);
//! 2. wait on the epoll (at most until the `list` budget is refilled when a
//!    page is still being built): the extra descriptor (the broker's signalfd), the control
//!    socket and the connections, each registered for what it waits for
//!    ([`Conn::wanted`]), so a turn costs the ready connections, not all;
//! 3. serve the ready connections: read into the [`Framer`], answer each
//!    complete request ([`Server::answer`] in `server/service.rs`), queue the
//!    reply and write it;
//! 4. accept new connections and read their first request at once;
//! 5. look again at connections a limit held back, and build `list` pages
//!    with what the budget has left ([`super::budget::LIST_ENTRIES`]):
//!    binds are served first.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::poll::{PollFlags, PollTimeout};
use nix::sys::epoll::{EpollEvent, EpollFlags};
use serde_json::Value;

use super::budget::LIST_REFILL;
use super::conn::Conn;
use super::deadlines::{unwatch, RECHECK};
use super::{Server, Wake};
use crate::fd::{self, SCM_MAX_FD};
use crate::protocol::framing::FrameError;
use crate::protocol::{code, Response, RpcError};

/// Bytes read from one connection per wake-up, so one busy client cannot
/// starve the others.
const READ_CHUNK: usize = 16 * 1024;
/// How often suppressed log lines are reported, and how quiet a uid must
/// have been for its count to be reported on its own line.
pub(super) const LOG_REPORT: Duration = Duration::from_secs(10);

/// Events taken from the epoll per wait; the rest stay ready for the next.
const EVENTS_PER_WAIT: usize = 256;
/// The epoll token of the extra descriptor; connections count up from 0.
const EXTRA: u64 = u64::MAX;
/// The epoll token of the control socket.
pub(super) const LISTENER: u64 = u64::MAX - 1;

impl Server {
    /// Serves clients until `extra` (a signalfd, for instance) is readable.
    pub fn serve_until(&mut self, extra: BorrowedFd<'_>) -> io::Result<Wake> {
        loop {
            if let Wake::Extra = self.serve_until_deadline(extra, None)? {
                return Ok(Wake::Extra);
            }
        }
    }

    /// Serves clients until `extra` is readable, `deadline` passes (the
    /// daemon's watchdog pings) or the number of held sockets changes.
    pub fn serve_until_deadline(&mut self, extra: BorrowedFd<'_>, deadline: Option<Instant>) -> io::Result<Wake> {
        let held = self.registry.len();
        {
            let l = self.limits();
            crate::peerlog::configure(l.log_burst, l.log_per_minute);
        }
        self.watch_extra(extra)?;
        let mut events = vec![EpollEvent::empty(); EVENTS_PER_WAIT];
        loop {
            let now = Instant::now();
            if deadline.is_some_and(|d| d <= now) {
                return Ok(Wake::Deadline);
            }
            if now.duration_since(self.last_log_report) >= LOG_REPORT {
                crate::peerlog::report_suppressed(LOG_REPORT);
                self.last_log_report = now;
            }
            self.expire(now);
            self.count_use();
            let paused = self.accept_paused_until.is_some_and(|t| now < t);
            let accepting = self.conns.len() < self.limits().max_clients && !paused;
            self.watch_listener(accepting)?;
            // A page still being built: wake when the budget is refilled.
            let busy = self.conns.values().any(|c| c.list_job.is_some() && !c.zombie);
            let refill = busy.then(|| self.list_refilled + LIST_REFILL);
            let timeout = match self.next_deadline(now).into_iter().chain(deadline).chain(refill).min() {
                None => PollTimeout::NONE,
                // Round up so a deadline is not waited for repeatedly with 0.
                Some(d) => PollTimeout::try_from(
                    d.saturating_duration_since(now).as_millis().saturating_add(1).min(i32::MAX as u128) as i32,
                )
                .unwrap_or(PollTimeout::MAX),
            };
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let (mut extra_ready, mut accept_ready) = (false, false);
            for ev in &events[..n] {
                match ev.data() {
                    EXTRA => extra_ready = true,
                    LISTENER => accept_ready = true,
                    id => self.service(id, poll_flags(ev.events())),
                }
            }
            // Stop here, before accepting: the control socket is about to be
            // handed over.
            if self.takeover.is_some() {
                return Ok(Wake::Takeover);
            }
            if accept_ready && accepting {
                self.accept_all();
            }
            // Connections held back by a limit are looked at again after the
            // ready ones, when something woke the loop or every RECHECK (the
            // kernel has no event for "the peer read what we sent"); those
            // building a `list` page, each turn: a page gets what is left.
            let woke = Instant::now();
            let all_held = n > 0 || woke.duration_since(self.last_recheck) >= RECHECK;
            if all_held {
                self.last_recheck = woke;
            }
            let recheck: Vec<u64> = self
                .conns
                .iter()
                .filter(|(_, c)| c.held && (all_held || c.list_job.is_some()))
                .map(|(id, _)| *id)
                .collect();
            for id in recheck {
                if !all_held && self.list_budget == 0 {
                    break; // only pages were due, and the budget is spent
                }
                self.service(id, PollFlags::empty());
            }
            if self.takeover.is_some() {
                return Ok(Wake::Takeover);
            }
            if extra_ready {
                return Ok(Wake::Extra);
            }
            if self.registry.len() != held {
                return Ok(Wake::Changed);
            }
        }
    }

    /// Registers the extra descriptor with the epoll. The broker passes the
    /// same signalfd for its whole life; another one is added beside it.
    fn watch_extra(&mut self, extra: BorrowedFd<'_>) -> io::Result<()> {
        let raw = extra.as_raw_fd();
        if self.extra_watched == Some(raw) {
            return Ok(());
        }
        match self.epoll.add(extra, EpollEvent::new(EpollFlags::EPOLLIN, EXTRA)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        self.extra_watched = Some(raw);
        Ok(())
    }

    /// Watches the control socket for connections, or stops watching it
    /// while the loop is not accepting.
    fn watch_listener(&mut self, accepting: bool) -> io::Result<()> {
        if self.listener_watched == accepting {
            return Ok(());
        }
        let flags = if accepting { EpollFlags::EPOLLIN } else { EpollFlags::empty() };
        let mut ev = EpollEvent::new(flags, LISTENER);
        self.epoll.modify(self.control.listener.as_fd(), &mut ev)?;
        self.listener_watched = accepting;
        Ok(())
    }

    /// Puts a connection in the loop, watched by the epoll; returns its id.
    pub(super) fn insert(&mut self, mut conn: Conn) -> u64 {
        let id = self.next_conn;
        self.next_conn += 1;
        self.sync_interest(id, &mut conn);
        self.conns.insert(id, conn);
        id
    }

    /// Tells the epoll what the connection now waits for (nothing, and not
    /// registered, for a zombie: a shut-down socket reports a hang-up for
    /// ever).
    fn sync_interest(&self, id: u64, conn: &mut Conn) {
        let want = (!conn.zombie).then(|| conn.wanted());
        if want == conn.interest {
            return;
        }
        let fd = conn.stream.as_fd();
        let result = match (conn.interest, want) {
            (None, Some(w)) => self.epoll.add(fd, EpollEvent::new(w, id)),
            (Some(_), Some(w)) => self.epoll.modify(fd, &mut EpollEvent::new(w, id)),
            (Some(_), None) => self.epoll.delete(fd),
            (None, None) => Ok(()),
        };
        match result {
            Ok(()) => conn.interest = want,
            Err(e) => log::warn!("{}: epoll_ctl: {e}", conn.peer),
        }
    }

    /// Reads, answers and writes for one connection; drops it when done.
    pub(super) fn service(&mut self, id: u64, events: PollFlags) {
        let Some(mut conn) = self.conns.remove(&id) else { return };
        if conn.zombie {
            self.conns.insert(id, conn);
            return;
        }
        let keep = self.service_conn(&mut conn, events);
        if conn.takeover.is_some() && self.takeover.is_none() {
            // Even if the peer already hung up: hand_over() finds out and
            // logs it.
            unwatch(&self.epoll, &mut conn);
            self.takeover = Some(conn);
        } else if conn.takeover.is_some() {
            log::warn!("{}: another takeover is already under way; closing", conn.peer);
            unwatch(&self.epoll, &mut conn);
        } else if keep {
            self.sync_interest(id, &mut conn);
            self.conns.insert(id, conn);
        } else {
            self.close(id, conn);
        }
    }

    pub(super) fn service_conn(&mut self, conn: &mut Conn, events: PollFlags) -> bool {
        if events.contains(PollFlags::POLLHUP) && conn.held {
            // The peer is gone (POLLHUP on a stream socket: both directions
            // closed) while a limit held its requests: nobody would read
            // the answers, and poll() would report the hang-up every turn.
            return false;
        }
        if (events.contains(PollFlags::POLLIN) || events.contains(PollFlags::POLLHUP)) && !conn.held {
            let mut buf = [0u8; READ_CHUNK];
            // recvmsg rather than read: `adopt` requests carry descriptors.
            match fd::recv_with_fds(conn.stream.as_fd(), &mut buf) {
                Ok(got) if got.len == 0 => conn.read_closed = true,
                Ok(got) => {
                    // Bytes alone do not reset any clock: only a complete
                    // request does (a byte a second must not keep a slot).
                    conn.framer.push(&buf[..got.len]);
                    if conn.request_started.is_none() && conn.framer.has_partial() {
                        conn.request_started = Some(Instant::now());
                    }
                    if !got.fds.is_empty() && !self.may_adopt(conn.peer) {
                        // Only `adopt` takes descriptors, and only from these
                        // peers: anyone else's are closed at once, so they
                        // cannot fill the broker's descriptor table.
                        crate::peer_log!(
                            conn.peer,
                            log::Level::Info,
                            "closed {} descriptors it sent (only root and the broker's user may adopt)",
                            got.fds.len()
                        );
                    } else {
                        conn.received.extend(got.fds);
                    }
                    if conn.received.len() > SCM_MAX_FD {
                        log::warn!(
                            "{}: sent {} descriptors not taken by an adopt request (at most {SCM_MAX_FD}); closing",
                            conn.peer,
                            conn.received.len()
                        );
                        return false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("{}: read failed, closing: {e}", conn.peer);
                    return false;
                }
            }
        }
        if events.contains(PollFlags::POLLERR) && conn.outbox.is_empty() && !events.contains(PollFlags::POLLIN) {
            return false;
        }
        loop {
            let held_back = self.answer_ready(conn);
            match self.flush(conn) {
                Ok(true) => {}
                Ok(false) => {
                    conn.held = held_back;
                    return true; // the peer's buffer is full: wait for POLLOUT
                }
                Err(e) => {
                    // Warn, not debug: an undelivered reply may be a
                    // descriptor a daemon expected and never got, and a
                    // failing sendmsg (ETOOMANYREFS) is how a starved broker
                    // shows. Rate-limited per uid like every peer's line.
                    let errno = nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0));
                    let what = match errno {
                        nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET => {
                            "client went away before reading its reply"
                        }
                        _ => "sending the reply failed",
                    };
                    crate::peer_log!(conn.peer, log::Level::Warn, "{what} ({errno}): {e}; closing");
                    return false;
                }
            }
            if conn.closing {
                return false;
            }
            conn.held = held_back;
            // Everything queued is written; go on with requests that
            // back-pressure held back, if any, unless a limit holds them.
            if !held_back || conn.list_job.is_some() || self.spent_turn(conn) || self.over_limit(conn).is_some() {
                break;
            }
        }
        if conn.read_closed && !conn.held {
            if conn.framer.has_partial() {
                crate::peer_log!(conn.peer, log::Level::Info, "connection closed in the middle of a request");
            }
            return false;
        }
        true
    }

    /// Answers every complete request in the buffer, up to the limits, the
    /// uid's share of this turn and the turn's `list` entries. Returns true
    /// when one of them stopped it, so requests (or a page) may be left.
    fn answer_ready(&mut self, conn: &mut Conn) -> bool {
        loop {
            if conn.closing || conn.takeover.is_some() {
                return false;
            }
            if let Some(job) = conn.list_job.as_mut() {
                // A page in the making gets what the turn has left.
                let budget = if self.live.policy.trusts(&conn.peer) { usize::MAX } else { self.list_budget };
                let used = self.build_list(job, budget);
                self.list_budget = self.list_budget.saturating_sub(used);
                if !job.done() {
                    return true;
                }
                let job = conn.list_job.take().expect("looked at above");
                self.queue_reply(conn, job.into_reply(), Vec::new());
                continue;
            }
            if self.spent_turn(conn) {
                return true;
            }
            if let Some(limit) = self.over_limit(conn) {
                if !conn.held {
                    // Back-pressure on a client that does not read is routine;
                    // a cap on what a peer may cost is worth a line.
                    let level = if limit.starts_with("replies") { log::Level::Debug } else { log::Level::Info };
                    crate::peer_log!(
                        conn.peer,
                        level,
                        "not reading further requests until it reads its replies ({limit})"
                    );
                }
                return true;
            }
            let reply = match conn.framer.next_value() {
                None => {
                    if !conn.framer.has_partial() {
                        conn.request_started = None;
                    }
                    return false;
                }
                Some(Ok(value)) => {
                    conn.last_active = Instant::now();
                    conn.request_started = None;
                    self.answer(conn, value).map(|(response, fds)| (response.to_bytes(), fds))
                }
                Some(Err(e)) => {
                    let code = match e {
                        FrameError::TooLarge(_) => code::INVALID_REQUEST,
                        FrameError::Syntax(_) => code::PARSE_ERROR,
                    };
                    let message = match &e {
                        FrameError::TooLarge(max) => {
                            format!("Invalid request: larger than {max} bytes (limits.max_request_bytes)")
                        }
                        FrameError::Syntax(_) => e.to_string(),
                    };
                    crate::peer_log!(conn.peer, log::Level::Info, "{message}; closing the connection");
                    conn.closing = true;
                    Some((Response::err(Value::Null, RpcError::new(code, message)).to_bytes(), Vec::new()))
                }
            };
            if let Some((bytes, fds)) = reply {
                self.queue_reply(conn, bytes, fds);
            }
        }
    }

    /// Queues a reply and counts it against the peer's uid (and, for an
    /// untrusted peer, the shared budgets) for the rest of the turn.
    fn queue_reply(&mut self, conn: &mut Conn, bytes: Vec<u8>, fds: Vec<OwnedFd>) {
        if !self.live.policy.trusts(&conn.peer) {
            self.untrusted_queued += bytes.len();
            self.untrusted_in_flight += fds.len();
        }
        self.uid_use.entry(conn.peer.uid).or_default().in_flight += fds.len();
        conn.queue(bytes, fds);
    }

    /// Writes the connection's queued replies ([`Conn::flush`]), counting
    /// what left against the untrusted peers' queued bytes.
    fn flush(&mut self, conn: &mut Conn) -> io::Result<bool> {
        let mut written = 0;
        let result = conn.flush(&mut written);
        if !self.live.policy.trusts(&conn.peer) {
            self.untrusted_queued = self.untrusted_queued.saturating_sub(written);
        }
        result
    }
}

/// The epoll readiness as the poll flags the connection code reads.
fn poll_flags(ev: EpollFlags) -> PollFlags {
    let mut flags = PollFlags::empty();
    for (e, p) in [
        (EpollFlags::EPOLLIN, PollFlags::POLLIN),
        (EpollFlags::EPOLLOUT, PollFlags::POLLOUT),
        (EpollFlags::EPOLLERR, PollFlags::POLLERR),
        (EpollFlags::EPOLLHUP, PollFlags::POLLHUP),
    ] {
        if ev.contains(e) {
            flags |= p;
        }
    }
    flags
}
