//! The loop that serves the control socket ([`ControlSocket`], in
//! `server/control.rs`) and the bind request.
//!
//! One thread, one `poll()`: every client connection is non-blocking, has a
//! capped input buffer and an idle deadline, so a silent or slow client costs
//! a slot and nothing else. A request travels:
//!
//! 1. [`Server`] reads bytes from a connection into its [`Framer`];
//! 2. each complete JSON value becomes a [`Request`]; `bind` params become a
//!    [`crate::protocol::bind::BindTarget`], and `Server::dispatch` in
//!    `server/service.rs` answers it;
//! 3. the peer is judged by the allow rules in force ([`crate::acl`], held in
//!    [`Server::live`]) before anything is opened;
//! 4. [`Registry::get_or_open`] (or a lookup by name) yields the held socket;
//! 5. the reply and a duplicate of the descriptor go out in one `sendmsg`
//!    ([`fd::send_with_fds`]); the duplicate is closed once sent.
//!
//! Besides `bind`: `bind_many` (descriptors split under [`SCM_MAX_FD`] per
//! message), `release`, `list`, `status` ([`crate::introspect`]), `reload`
//! ([`crate::reload`]) and `adopt` (the one request that carries descriptors
//! *to* the broker: read with `recvmsg`, kept per connection until an
//! `adopt` takes them); `docs/control.md` describes them.
//!
//! No peer, whatever it sends or fails to read, may stop the loop from
//! serving another ([`Limits`]; `docs/protocol.md`, "Threat model"):
//! - slots: a per-uid cap, and a reserve for root, the broker's uid and
//!   peers a rule names; a refused connection gets an error and is closed;
//! - time: a deadline for a whole request (bytes that are not a complete
//!   request do not reset it), an idle deadline, and one for descriptors
//!   left unread;
//! - descriptors in flight (sent, not read: the kernel charges them to the
//!   broker's user, and past its `RLIMIT_NOFILE` every `sendmsg` with a
//!   descriptor fails): counted per connection from `SIOCOUTQ` and per uid;
//!   over a cap, the connection's requests wait unread; past the unread
//!   deadline it is shut down but kept, still counted, until the peer reads
//!   or closes (a *zombie*);
//! - memory: reply bytes queued per connection and for all untrusted peers
//!   together are capped; `list` is paged.
//!
//! Errors become JSON-RPC errors and never carry a descriptor. The peer's
//! credentials are read once, at accept, and travel with every request of the
//! connection.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_json::Value;

use crate::channel;
use crate::fd::{self, PeerCred, SCM_MAX_FD};
use crate::limits::Limits;
use crate::protocol::framing::{FrameError, Framer};
use crate::protocol::{code, Request, Response, RpcError};
use crate::registry::Registry;
use crate::reload::Live;
use crate::spec::SocketKey;

/// Replies queued for one connection before the broker stops reading its
/// requests (back-pressure on a client that does not read); the bytes and
/// descriptors they may hold are capped by [`Limits`] too.
const MAX_QUEUED_REPLIES: usize = 16;
/// Bytes read from one connection per wake-up, so one busy client cannot
/// starve the others.
const READ_CHUNK: usize = 16 * 1024;
/// How long to stop accepting after accept() fails for lack of resources
/// (EMFILE, ENFILE, ENOMEM): the listener stays readable, so accepting again
/// at once would spin, logging a failure each turn.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

mod control;
mod service;
pub use control::{ControlError, ControlSocket};

/// Settings of the control loop given on the command line; the rest are
/// [`Limits`] from the configuration.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// `serve --idle-timeout`: wins over `limits.idle_timeout`.
    pub idle_timeout: Option<Duration>,
}

/// A reply waiting to be written.
struct Outgoing {
    bytes: Vec<u8>,
    sent: usize,
    /// Duplicates of the descriptors to attach, closed once sent.
    fds: Vec<OwnedFd>,
}

/// One client connection.
struct Conn {
    stream: UnixStream,
    peer: PeerCred,
    framer: Framer,
    outbox: VecDeque<Outgoing>,
    /// Reply bytes in `outbox` not written yet.
    queued_bytes: usize,
    /// Descriptors in `outbox` not sent yet (duplicates the broker holds).
    queued_fds: usize,
    /// Descriptors sent that the peer may not have read yet: reset to 0 when
    /// the kernel says the peer has read everything (`SIOCOUTQ` is 0).
    sent_fds: usize,
    /// `SIOCOUTQ` when last looked at.
    last_unread: usize,
    /// Since when the peer has left descriptors unread without reading.
    unread_since: Option<Instant>,
    /// The last complete request or written reply (the idle clock).
    last_active: Instant,
    /// When the first byte of the request not yet complete came.
    request_started: Option<Instant>,
    /// Requests are waiting but a limit holds them back: the connection is
    /// not read from until it is looked at again.
    held: bool,
    /// The peer has shut down its side: answer what is complete, then close.
    read_closed: bool,
    /// An unrecoverable protocol error: flush the error reply, then close.
    closing: bool,
    /// Shut down, kept only to know when the descriptors the peer left
    /// unread are gone (they stay charged to the broker's user until then).
    zombie: bool,
    /// The id of an accepted `takeover` request: the connection leaves the
    /// loop for [`crate::upgrade::hand_over`].
    takeover: Option<Value>,
    /// Descriptors the peer attached to its requests (SCM_RIGHTS), in order,
    /// until an `adopt` request takes them; at most [`SCM_MAX_FD`].
    received: VecDeque<OwnedFd>,
}

impl Conn {
    fn new(stream: UnixStream, peer: PeerCred, max_request: usize) -> Conn {
        Conn {
            stream,
            peer,
            framer: Framer::new(max_request),
            outbox: VecDeque::new(),
            queued_bytes: 0,
            queued_fds: 0,
            sent_fds: 0,
            last_unread: 0,
            unread_since: None,
            last_active: Instant::now(),
            request_started: None,
            held: false,
            read_closed: false,
            closing: false,
            zombie: false,
            takeover: None,
            received: VecDeque::new(),
        }
    }

    /// Descriptors the peer has not read yet, sent or still queued.
    fn in_flight(&self) -> usize {
        self.sent_fds + self.queued_fds
    }

    /// Asks the kernel what the peer has read, and updates the count of
    /// descriptors in flight and the unread clock.
    fn refresh_unread(&mut self, now: Instant) {
        if self.sent_fds == 0 {
            self.unread_since = None;
            return;
        }
        match fd::unread_by_peer(self.stream.as_fd()) {
            Ok(0) => {
                self.sent_fds = 0;
                self.last_unread = 0;
                self.unread_since = None;
            }
            Ok(n) => {
                // Any progress restarts the clock: a slow reader is not a
                // stuck one.
                if n < self.last_unread || self.unread_since.is_none() {
                    self.unread_since = Some(now);
                }
                self.last_unread = n;
            }
            Err(e) => {
                log::debug!("{}: SIOCOUTQ: {e}", self.peer);
            }
        }
    }
}

/// What woke the loop, when it is not client traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The extra descriptor given to [`Server::serve_until`] is readable.
    Extra,
    /// The deadline given to [`Server::serve_until_deadline`] passed.
    Deadline,
    /// The number of held sockets changed (for the status line).
    Changed,
    /// An allowed peer asked to take over: see [`Server::take_takeover`].
    Takeover,
}

/// What the connections of one uid use, counted once per turn of the loop.
#[derive(Debug, Default, Clone, Copy)]
struct UidUse {
    conns: usize,
    in_flight: usize,
}

/// The control loop: the control socket, the client connections and the
/// registry of held sockets.
pub struct Server {
    control: ControlSocket,
    /// The sockets the broker holds.
    pub registry: Registry,
    options: ServerOptions,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    /// A connection that asked to take over, out of the loop.
    takeover: Option<Conn>,
    /// The configuration in force: declared sockets and access rules.
    pub live: Live,
    pub(crate) started: Instant,
    /// Set after accept() failed: no accepting before this instant.
    accept_paused_until: Option<Instant>,
    /// Per uid: connections and descriptors in flight, this turn.
    uid_use: HashMap<u32, UidUse>,
    /// Reply bytes queued for untrusted peers, this turn.
    untrusted_queued: usize,
    /// Descriptors in flight to untrusted peers, this turn.
    untrusted_in_flight: usize,
    /// Work done per uid, this turn ([`TURN_BUDGET`]).
    turn_spent: HashMap<u32, usize>,
    /// Half the descriptor limit: the kernel fails every `sendmsg` with a
    /// descriptor (ETOOMANYREFS) once the broker's user has more in flight
    /// than `RLIMIT_NOFILE`, so untrusted peers together get at most half,
    /// and one uid at most a quarter.
    in_flight_budget: usize,
    /// The soft `RLIMIT_NOFILE` when the loop started.
    nofile: usize,
    /// The sorted keys `list` pages through, and the registry generation
    /// they were sorted at.
    list_order: Option<(u64, std::rc::Rc<Vec<SocketKey>>)>,
    /// When suppressed log lines were last reported.
    last_log_report: Instant,
    /// Requests and connections counted for `metrics`.
    pub(crate) counters: crate::metrics::counters::Counters,
}

/// How often suppressed log lines are reported, and how quiet a uid must
/// have been for its count to be reported on its own line.
const LOG_REPORT: Duration = Duration::from_secs(10);

/// How often zombie connections and held-back connections are looked at
/// again when nothing else wakes the loop.
const RECHECK: Duration = Duration::from_millis(20);

impl Server {
    /// A server on `control`, holding what `registry` holds.
    pub fn new(control: ControlSocket, registry: Registry, options: ServerOptions) -> Server {
        Server {
            control,
            registry,
            options,
            conns: HashMap::new(),
            next_conn: 0,
            takeover: None,
            live: Live::default(),
            started: Instant::now(),
            accept_paused_until: None,
            uid_use: HashMap::new(),
            untrusted_queued: 0,
            untrusted_in_flight: 0,
            turn_spent: HashMap::new(),
            in_flight_budget: in_flight_budget(),
            nofile: nofile(),
            list_order: None,
            last_log_report: Instant::now(),
            counters: Default::default(),
        }
    }

    /// The control socket.
    pub fn control(&self) -> &ControlSocket {
        &self.control
    }

    /// How many clients are connected.
    pub fn clients(&self) -> usize {
        self.conns.len()
    }

    pub(crate) fn list_order_cache(&self) -> Option<(u64, std::rc::Rc<Vec<SocketKey>>)> {
        self.list_order.clone()
    }

    pub(crate) fn set_list_order_cache(&mut self, generation: u64, keys: std::rc::Rc<Vec<SocketKey>>) {
        self.list_order = Some((generation, keys));
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.live.config.limits
    }

    fn idle_timeout(&self) -> Duration {
        self.options.idle_timeout.unwrap_or(self.live.config.limits.idle_timeout)
    }

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
            // Connections held back by a limit, or asleep with descriptors
            // unread, are looked at again each turn: the kernel has no event
            // for "the peer read what we sent".
            let recheck: Vec<u64> = self.conns.iter().filter(|(_, c)| c.held).map(|(id, _)| *id).collect();
            for id in recheck {
                self.service(id, PollFlags::empty());
            }
            let timeout =
                self.next_deadline(now).into_iter().chain(deadline).min().map(|d| d.saturating_duration_since(now));

            let paused = self.accept_paused_until.is_some_and(|t| now < t);
            let accepting = self.conns.len() < self.limits().max_clients && !paused;
            let ids: Vec<u64> = self.conns.iter().filter(|(_, c)| !c.zombie).map(|(id, _)| *id).collect();
            let mut fds = Vec::with_capacity(ids.len() + 2);
            fds.push(PollFd::new(extra, PollFlags::POLLIN));
            fds.push(PollFd::new(
                self.control.listener.as_fd(),
                if accepting { PollFlags::POLLIN } else { PollFlags::empty() },
            ));
            for id in &ids {
                let conn = &self.conns[id];
                let mut events = PollFlags::empty();
                if !conn.outbox.is_empty() {
                    events |= PollFlags::POLLOUT;
                } else if !conn.read_closed && !conn.closing && !conn.held {
                    events |= PollFlags::POLLIN;
                }
                fds.push(PollFd::new(conn.stream.as_fd(), events));
            }
            let timeout = match timeout {
                None => PollTimeout::NONE,
                // Round up so a deadline is not polled for repeatedly with 0.
                Some(t) => PollTimeout::try_from(t.as_millis().saturating_add(1).min(i32::MAX as u128) as i32)
                    .unwrap_or(PollTimeout::MAX),
            };
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let revents: Vec<PollFlags> = fds.iter().map(|f| f.revents().unwrap_or(PollFlags::empty())).collect();
            drop(fds);

            for (id, ev) in ids.iter().zip(&revents[2..]) {
                if !ev.is_empty() {
                    self.service(*id, *ev);
                }
            }
            // Stop here, before accepting: the control socket is about to be
            // handed over.
            if self.takeover.is_some() {
                return Ok(Wake::Takeover);
            }
            if revents[1].contains(PollFlags::POLLIN) {
                self.accept_all();
            }
            if revents[0].intersects(PollFlags::POLLIN | PollFlags::POLLERR | PollFlags::POLLHUP) {
                return Ok(Wake::Extra);
            }
            if self.registry.len() != held {
                return Ok(Wake::Changed);
            }
        }
    }

    /// Counts, per uid, connections and descriptors in flight, and the reply
    /// bytes queued for untrusted peers; asks the kernel what was read.
    fn count_use(&mut self) {
        let now = Instant::now();
        self.uid_use.clear();
        self.turn_spent.clear();
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

    /// The next instant something is due: an idle, request or unread
    /// deadline, the end of a pause in accepting, or a recheck.
    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let l = self.limits();
        let idle = self.idle_timeout();
        let pause_end = self.accept_paused_until.filter(|t| now < *t);
        let recheck = self.conns.values().any(|c| c.held || c.zombie || c.sent_fds > 0).then(|| now + RECHECK);
        // Suppressed log lines are reported even if no peer wakes the loop.
        let report = crate::peerlog::pending().then(|| self.last_log_report + LOG_REPORT);
        self.conns
            .values()
            .filter(|c| !c.zombie)
            .flat_map(|c| {
                [
                    Some(c.last_active + idle),
                    c.request_started.filter(|_| !c.held).map(|t| t + l.request_timeout),
                    c.unread_since.map(|t| t + l.unread_timeout),
                ]
            })
            .flatten()
            .chain(pause_end)
            .chain(recheck)
            .chain(report)
            .min()
    }

    /// Closes idle connections, requests not complete in time, and peers
    /// that leave descriptors unread; drops zombies whose descriptors are
    /// gone.
    fn expire(&mut self, now: Instant) {
        let idle = self.idle_timeout();
        let (request_timeout, unread_timeout) = (self.limits().request_timeout, self.limits().unread_timeout);
        let mut gone = Vec::new();
        for (id, c) in self.conns.iter_mut() {
            if c.zombie {
                c.refresh_unread(now);
                if c.sent_fds == 0 {
                    log::info!("{}: the descriptors it left unread are gone; connection closed", c.peer);
                    gone.push(*id);
                }
                continue;
            }
            if c.unread_since.is_some_and(|t| now.duration_since(t) >= unread_timeout) && c.sent_fds > 0 {
                crate::peer_log!(
                    c.peer,
                    log::Level::Warn,
                    "left {} descriptors unread for {:?}: shutting the connection down (limits.unread_timeout)",
                    c.sent_fds,
                    unread_timeout
                );
                make_zombie(c);
                continue;
            }
            if c.request_started.is_some_and(|t| !c.held && now.duration_since(t) >= request_timeout) {
                crate::peer_log!(
                    c.peer,
                    log::Level::Info,
                    "request not complete after {:?}: closing (limits.request_timeout)",
                    request_timeout
                );
                gone.push(*id);
            } else if now.duration_since(c.last_active) >= idle && c.outbox.is_empty() {
                log::debug!("{}: closing idle connection after {:?}", c.peer, idle);
                gone.push(*id);
            } else if now.duration_since(c.last_active) >= idle {
                crate::peer_log!(
                    c.peer,
                    log::Level::Info,
                    "did not read its replies for {idle:?}: closing (limits.idle_timeout)"
                );
                gone.push(*id);
            }
        }
        for id in gone {
            if let Some(conn) = self.conns.remove(&id) {
                self.close(id, conn);
            }
        }
    }

    /// Lets a connection go: closed at once, unless the peer still has
    /// descriptors of ours unread; then it is shut down and kept, so they
    /// stay counted against its uid until it reads them or closes.
    fn close(&mut self, id: u64, mut conn: Conn) {
        conn.refresh_unread(Instant::now());
        if conn.sent_fds > 0 && !conn.zombie {
            make_zombie(&mut conn);
        }
        if conn.zombie && conn.sent_fds > 0 {
            self.conns.insert(id, conn);
        }
    }

    /// Descriptors the broker holds, about: held sockets, connections,
    /// duplicates waiting to be sent, and its own few (control socket,
    /// signalfd, notify, log).
    fn fds_in_use(&self) -> usize {
        self.registry.len() + self.conns.len() + self.conns.values().map(|c| c.queued_fds).sum::<usize>() + 16
    }

    fn accept_all(&mut self) {
        let uid_conns: HashMap<u32, usize> = self.uid_use.iter().map(|(uid, u)| (*uid, u.conns)).collect();
        let mut uid_conns = uid_conns;
        // Bounded, so a flood of connections cannot keep the loop from
        // serving the ones it already has.
        for _ in 0..64 {
            let l = self.limits().clone();
            if self.conns.len() >= l.max_clients {
                return;
            }
            let stream = match self.control.listener.accept() {
                Ok((stream, _)) => {
                    if self.accept_paused_until.take().is_some() {
                        log::info!("{}: accepting connections again", self.control.path.display());
                    }
                    stream
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // A connection that was reset while queued, or a signal.
                Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted) => continue,
                Err(e) => {
                    // EMFILE and friends: leave the rest queued in the kernel
                    // and try again later. Warn once per episode, not each retry.
                    let level = if self.accept_paused_until.is_some() { log::Level::Debug } else { log::Level::Warn };
                    log::log!(
                        level,
                        "{}: accept failed: {e}; retrying every {ACCEPT_BACKOFF:?}",
                        self.control.path.display()
                    );
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            };
            let peer = match fd::peer_credentials(stream.as_fd()) {
                Ok(peer) => peer,
                Err(e) => {
                    log::warn!("control connection without credentials, closing: {e}");
                    continue;
                }
            };
            let trusted = self.live.policy.trusts(&peer);
            let mine = uid_conns.get(&peer.uid).copied().unwrap_or(0);
            let refusal = if !trusted && mine >= l.max_clients_per_uid {
                Some(format!(
                    "too many connections from uid {} ({mine}, limits.max_clients_per_uid is {})",
                    peer.uid, l.max_clients_per_uid
                ))
            } else if self.conns.len() + l.reserved_clients >= l.max_clients && !self.live.policy.names_peer(&peer) {
                Some(format!(
                    "the broker serves {} connections; the last {} of limits.max_clients = {} are kept for root, uid {} and peers a rule names",
                    self.conns.len(),
                    l.reserved_clients,
                    l.max_clients,
                    self.live.policy.owner()
                ))
            } else if self.fds_in_use() + l.reserved_clients >= self.nofile && !self.live.policy.names_peer(&peer) {
                // Near RLIMIT_NOFILE the same reserve holds: idle strangers
                // must not take the last descriptors, or accept() and every
                // bind's duplicate would fail for everyone.
                Some(format!(
                    "the broker uses about {} of its {} descriptors; the last {} are kept for root, uid {} and peers a rule names",
                    self.fds_in_use(),
                    self.nofile,
                    l.reserved_clients,
                    self.live.policy.owner()
                ))
            } else {
                None
            };
            if let Some(why) = refusal {
                self.counters.connections_refused += 1;
                crate::peer_log!(peer, log::Level::Warn, "connection refused: {why}");
                // Best effort, never blocking: tell the client why.
                let reply = Response::err(Value::Null, RpcError::new(code::TOO_MANY, why)).to_bytes();
                let _ = stream.set_nonblocking(true);
                let _ = fd::send_with_fds(stream.as_fd(), &reply, &[]);
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("{peer}: could not make the connection non-blocking, closing: {e}");
                continue;
            }
            *uid_conns.entry(peer.uid).or_default() += 1;
            self.counters.connections_accepted += 1;
            self.uid_use.entry(peer.uid).or_default().conns += 1;
            let id = self.next_conn;
            self.next_conn += 1;
            self.conns.insert(id, Conn::new(stream, peer, l.max_request_bytes));
        }
    }

    /// Reads, answers and writes for one connection; drops it when done.
    fn service(&mut self, id: u64, events: PollFlags) {
        let Some(mut conn) = self.conns.remove(&id) else { return };
        if conn.zombie {
            self.conns.insert(id, conn);
            return;
        }
        let keep = self.service_conn(&mut conn, events);
        if conn.takeover.is_some() && self.takeover.is_none() {
            // Even if the peer already hung up: hand_over() finds out and
            // logs it.
            self.takeover = Some(conn);
        } else if conn.takeover.is_some() {
            log::warn!("{}: another takeover is already under way; closing", conn.peer);
        } else if keep {
            self.conns.insert(id, conn);
        } else {
            self.close(id, conn);
        }
    }

    fn service_conn(&mut self, conn: &mut Conn, events: PollFlags) -> bool {
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
            if !held_back || self.spent_turn(conn) || self.over_limit(conn).is_some() {
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

    /// Which limit keeps the broker from answering another request of this
    /// connection now, if any.
    fn over_limit(&self, conn: &Conn) -> Option<&'static str> {
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
    fn spent_turn(&self, conn: &Conn) -> bool {
        !self.live.policy.trusts(&conn.peer) && self.turn_spent.get(&conn.peer.uid).is_some_and(|s| *s >= TURN_BUDGET)
    }

    /// Answers every complete request in the buffer, up to the limits and
    /// the uid's share of this turn. Returns true when either stopped it, so
    /// requests may be left.
    fn answer_ready(&mut self, conn: &mut Conn) -> bool {
        loop {
            if conn.closing || conn.takeover.is_some() {
                return false;
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
            let (response, fds) = match conn.framer.next_value() {
                None => {
                    if !conn.framer.has_partial() {
                        conn.request_started = None;
                    }
                    return false;
                }
                Some(Ok(value)) => {
                    conn.last_active = Instant::now();
                    conn.request_started = None;
                    match Request::from_value(value) {
                        Ok(req) if req.method == crate::protocol::TAKEOVER_METHOD => {
                            match crate::acl::authorize_takeover(conn.peer, conn.outbox.is_empty()) {
                                Ok(()) => {
                                    conn.takeover = Some(req.id);
                                    return false;
                                }
                                Err(e) => (Response::err(req.id, e), Vec::new()),
                            }
                        }
                        Ok(req) if req.method == crate::adopt::METHOD => {
                            let result = self.adopt(conn.peer, &req.params, &mut conn.received);
                            self.counters.request(&req.method, result.as_ref().err().map(|e| e.code));
                            match result {
                                Ok((value, fds)) => (Response::ok(req.id, value), fds),
                                Err(e) => (Response::err(req.id, e), Vec::new()),
                            }
                        }
                        Ok(req) => {
                            *self.turn_spent.entry(conn.peer.uid).or_default() += cost(&req, self.limits());
                            self.dispatch(conn.peer, req)
                        }
                        Err((id, error)) => {
                            crate::peer_log!(conn.peer, log::Level::Info, "{}", error.message);
                            (Response::err(id, error), Vec::new())
                        }
                    }
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
                    (Response::err(Value::Null, RpcError::new(code, message)), Vec::new())
                }
            };
            let bytes = response.to_bytes();
            conn.queued_bytes += bytes.len();
            conn.queued_fds += fds.len();
            if !self.live.policy.trusts(&conn.peer) {
                self.untrusted_queued += bytes.len();
            }
            self.uid_use.entry(conn.peer.uid).or_default().in_flight += fds.len();
            if !self.live.policy.trusts(&conn.peer) {
                self.untrusted_in_flight += fds.len();
            }
            push_reply(&mut conn.outbox, bytes, fds);
        }
    }

    /// Writes queued replies. Ok(true) when everything is written, Ok(false)
    /// when the socket is full.
    fn flush(&mut self, conn: &mut Conn) -> io::Result<bool> {
        let trusted = self.live.policy.trusts(&conn.peer);
        while let Some(out) = conn.outbox.front_mut() {
            let fds: Vec<BorrowedFd<'_>> = out.fds.iter().map(|f| f.as_fd()).collect();
            match fd::send_with_fds(conn.stream.as_fd(), &out.bytes[out.sent..], &fds) {
                Ok(n) => {
                    // The descriptors travelled with the first byte.
                    let k = out.fds.len();
                    out.fds.clear();
                    conn.queued_fds -= k;
                    conn.sent_fds += k;
                    out.sent += n;
                    conn.queued_bytes -= n;
                    if !trusted {
                        self.untrusted_queued = self.untrusted_queued.saturating_sub(n);
                    }
                    conn.last_active = Instant::now();
                    if conn.unread_since.is_none() && k > 0 {
                        conn.unread_since = Some(Instant::now());
                    }
                    if out.sent == out.bytes.len() {
                        conn.outbox.pop_front();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// Work units one untrusted uid may use per turn of the loop.
const TURN_BUDGET: usize = 16;

/// What a request costs of [`TURN_BUDGET`]: 1, plus its share of entries
/// for `list` (16 a unit) and of items for `bind_many` (64 a unit).
fn cost(req: &Request, limits: &Limits) -> usize {
    match req.method.as_str() {
        "list" => {
            let limit = req.params.get("limit").and_then(Value::as_u64).map_or(limits.list_page_max, |l| l as usize);
            1 + limit.min(limits.list_page_max) / 16
        }
        "bind_many" => 1 + req.params.as_array().map_or(0, Vec::len) / 64,
        _ => 1,
    }
}

/// The soft `RLIMIT_NOFILE` (the daemon raises it before the loop starts).
fn nofile() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(s, _)| s);
    usize::try_from(soft).unwrap_or(usize::MAX)
}

/// Half the soft `RLIMIT_NOFILE` (read when the loop starts; the daemon
/// raises it first): the most descriptors untrusted peers may have in flight
/// together.
fn in_flight_budget() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(s, _)| s);
    let budget = usize::try_from(soft / 2).unwrap_or(usize::MAX).max(16);
    log::info!(
        "descriptors in flight to untrusted peers: at most {budget} together (half of RLIMIT_NOFILE {soft}), \
         per uid the smaller of limits.max_fds_in_flight_per_uid and {}",
        budget / 2
    );
    budget
}

/// Shuts a connection down for good, keeping it only to watch the
/// descriptors its peer left unread.
fn make_zombie(c: &mut Conn) {
    let _ = c.stream.shutdown(std::net::Shutdown::Both);
    c.zombie = true;
    c.held = false;
    // Unsent replies (and their duplicates) are dropped now.
    c.outbox.clear();
    c.queued_bytes = 0;
    c.queued_fds = 0;
}

/// An invalid-params error, logged.
pub(crate) fn invalid(peer: PeerCred, method: &str, what: String, e: &dyn std::fmt::Display) -> RpcError {
    let message = format!("Invalid params: {what}: {e}");
    crate::peer_log!(peer, log::Level::Info, "{method}: {message}");
    RpcError::new(code::INVALID_PARAMS, message)
}

/// Queues a reply, cut by [`channel::split`] so no message carries more
/// than [`SCM_MAX_FD`] descriptors.
fn push_reply(outbox: &mut VecDeque<Outgoing>, bytes: Vec<u8>, fds: Vec<OwnedFd>) {
    for (bytes, fds) in channel::split(bytes, fds) {
        outbox.push_back(Outgoing { bytes, sent: 0, fds });
    }
}

/// A client connection as [`crate::upgrade`] hands it to the next broker.
#[derive(Debug)]
pub struct ConnHandle<'a> {
    /// The connected stream.
    pub fd: BorrowedFd<'a>,
    /// Its peer, as read at accept.
    pub peer: PeerCred,
    /// Bytes of an incomplete request already read from it.
    pub pending: &'a [u8],
}

/// The connection of an accepted `takeover` request, out of the loop.
#[derive(Debug)]
pub struct TakeoverConn {
    /// The stream, still non-blocking.
    pub stream: UnixStream,
    /// The peer asking.
    pub peer: PeerCred,
    /// The request id to answer.
    pub id: Value,
}

// Hooks for crate::upgrade: what a re-exec or a takeover carries over.
impl Server {
    /// The control socket, mutably.
    pub fn control_mut(&mut self) -> &mut ControlSocket {
        &mut self.control
    }

    /// The connection that asked to take over, after [`Wake::Takeover`].
    pub fn take_takeover(&mut self) -> Option<TakeoverConn> {
        let conn = self.takeover.take()?;
        Some(TakeoverConn { stream: conn.stream, peer: conn.peer, id: conn.takeover.unwrap_or(Value::Null) })
    }

    /// The connections that can move to another broker: those with no reply
    /// waiting to be written (a reply in flight cannot be split between two
    /// processes). The others are closed when this process exits or execs,
    /// and their clients retry.
    pub fn movable_connections(&self) -> Vec<ConnHandle<'_>> {
        self.conns
            .values()
            .filter(|c| c.outbox.is_empty() && !c.closing && !c.read_closed && !c.zombie)
            .map(|c| ConnHandle { fd: c.stream.as_fd(), peer: c.peer, pending: c.framer.pending() })
            .collect()
    }

    /// Serves a connection carried over from the previous broker, answering
    /// at once any complete request in `pending`.
    pub fn adopt_connection(&mut self, stream: UnixStream, peer: PeerCred, pending: &[u8]) -> io::Result<()> {
        stream.set_nonblocking(true)?;
        let mut conn = Conn::new(stream, peer, self.limits().max_request_bytes);
        conn.framer.push(pending);
        if conn.framer.has_partial() {
            conn.request_started = Some(Instant::now());
        }
        if self.service_conn(&mut conn, PollFlags::empty()) {
            let id = self.next_conn;
            self.next_conn += 1;
            self.conns.insert(id, conn);
        }
        Ok(())
    }
}
