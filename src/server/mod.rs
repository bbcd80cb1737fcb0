//! The server: the control socket ([`ControlSocket`], `server/control.rs`),
//! its client connections (`server/conn.rs`) and the held sockets, served by
//! one event loop (`server/event_loop.rs`, one thread, one epoll) that reads
//! and writes, apart from the service (`server/service.rs`) that judges and
//! answers each request; what a peer may cost a turn is `server/budget.rs`,
//! `list` pages are `server/list.rs`. A request travels:
//!
//! 1. the event loop reads bytes from a connection into its
//!    [`crate::protocol::framing::Framer`];
//! 2. each complete JSON value becomes a [`crate::protocol::Request`] and
//!    its [`crate::protocol::Method`]; `Server::answer` in
//!    `server/service.rs` routes it; `bind` params become a
//!    [`crate::protocol::bind::BindTarget`];
//! 3. the peer is judged by the allow rules in force ([`crate::acl`], held in
//!    [`Server::live`]) before anything is opened;
//! 4. [`Registry::get_or_open`] (or a lookup by name) yields the held socket;
//! 5. the reply and a duplicate of the descriptor go out in one `sendmsg`
//!    ([`fd::send_with_fds`]); the duplicate is closed once sent.
//!
//! Besides `bind`: `bind_many` (descriptors split under [`SCM_MAX_FD`] per
//! message), `release`, `list`, `status` ([`crate::introspect`]), `reload`
//! ([`crate::reconfigure`]) and `adopt` (the one request that carries descriptors
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
//!   together are capped; `list` is paged;
//! - work: per turn of the loop, a share per uid and a few `list` entries
//!   for all untrusted peers together, so binds are served first.
//!
//! Errors become JSON-RPC errors and never carry a descriptor. The peer's
//! credentials are read once, at accept, and travel with every request of the
//! connection.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::poll::PollFlags;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use serde_json::Value;

use crate::fd::PeerCred;
use crate::limits::Limits;
use crate::protocol::{code, RpcError};
use crate::reconfigure::Live;
use crate::registry::Registry;
use crate::spec::SocketKey;

mod accept;
mod budget;
mod conn;
mod control;
mod deadlines;
mod event_loop;
mod list;
mod service;
use budget::{in_flight_budget, nofile, UidUse};
use conn::Conn;
pub use control::{ControlError, ControlSocket};

/// Settings of the control loop given on the command line; the rest are
/// [`Limits`] from the configuration.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// `serve --idle-timeout`: wins over `limits.idle_timeout`.
    pub idle_timeout: Option<Duration>,
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
    /// Work done per uid, this turn ([`budget::TURN_BUDGET`]).
    turn_spent: HashMap<u32, usize>,
    /// `list` entries untrusted peers may still have built until the next
    /// refill ([`budget::LIST_ENTRIES`]), and when it was last refilled.
    list_budget: usize,
    list_refilled: Instant,
    /// Half the descriptor limit: the kernel fails every `sendmsg` with a
    /// descriptor (ETOOMANYREFS) once the broker's user has more in flight
    /// than `RLIMIT_NOFILE`, so untrusted peers together get at most half,
    /// and one uid at most a quarter.
    in_flight_budget: usize,
    /// The soft `RLIMIT_NOFILE` when the loop started.
    nofile: usize,
    /// The sorted keys `list` pages through, and the registry generation
    /// they were sorted at.
    list_order: Option<(u64, Rc<Vec<SocketKey>>)>,
    /// When suppressed log lines were last reported.
    last_log_report: Instant,
    /// When connections held back by a limit were last looked at.
    last_recheck: Instant,
    /// Requests and connections counted for `metrics`.
    pub(crate) counters: crate::metrics::counters::Counters,
    /// When each untrusted uid was last answered `metrics`
    /// (`limits.metrics_interval`).
    pub(crate) metrics_answered: HashMap<u32, Instant>,
    /// What the loop waits on: the control socket, the connections and
    /// the extra descriptor of [`Server::serve_until`].
    epoll: Epoll,
    /// The extra descriptor registered with `epoll`, if any.
    extra_watched: Option<RawFd>,
    /// Whether `epoll` watches the control socket for connections.
    listener_watched: bool,
}

impl Server {
    /// A server on `control`, holding what `registry` holds. Fails only
    /// when the kernel gives no epoll instance.
    pub fn new(control: ControlSocket, registry: Registry, options: ServerOptions) -> io::Result<Server> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(control.listener.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, event_loop::LISTENER))?;
        Ok(Server {
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
            list_budget: budget::LIST_ENTRIES,
            list_refilled: Instant::now(),
            in_flight_budget: in_flight_budget(),
            nofile: nofile(),
            list_order: None,
            last_log_report: Instant::now(),
            last_recheck: Instant::now(),
            counters: Default::default(),
            metrics_answered: HashMap::new(),
            epoll,
            extra_watched: None,
            listener_watched: true,
        })
    }

    /// The control socket.
    pub fn control(&self) -> &ControlSocket {
        &self.control
    }

    /// How many clients are connected.
    pub fn clients(&self) -> usize {
        self.conns.len()
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.live.config.limits
    }

    fn idle_timeout(&self) -> Duration {
        self.options.idle_timeout.unwrap_or(self.live.config.limits.idle_timeout)
    }
}

/// An invalid-params error, logged.
pub(crate) fn invalid(peer: PeerCred, method: &str, what: String, e: &dyn std::fmt::Display) -> RpcError {
    let message = format!("Invalid params: {what}: {e}");
    crate::peer_log!(peer, log::Level::Info, "{method}: {message}");
    RpcError::new(code::INVALID_PARAMS, message)
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
    /// waiting to be written or being built (a reply in flight cannot be
    /// split between two processes). The others are closed when this process exits or execs,
    /// and their clients retry.
    pub fn movable_connections(&self) -> Vec<ConnHandle<'_>> {
        self.conns
            .values()
            .filter(|c| c.outbox.is_empty() && c.list_job.is_none() && !c.closing && !c.read_closed && !c.zombie)
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
            self.insert(conn);
        }
        Ok(())
    }
}
