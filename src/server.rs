//! The control socket and the loop that serves it.
//!
//! One thread, one `poll()`: every client connection is non-blocking, has a
//! capped input buffer and an idle deadline, so a silent or slow client costs
//! a slot and nothing else. A request travels:
//!
//! 1. [`Server`] reads bytes from a connection into its [`Framer`];
//! 2. each complete JSON value becomes a [`Request`]; `bind` params become a
//!    [`BindTarget`] ([`crate::protocol::bind`]);
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
//! Errors become JSON-RPC errors and never carry a descriptor. The peer's
//! credentials are read once, at accept, and travel with every request of the
//! connection.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::stat::{umask, Mode};
use serde_json::{json, Value};

use crate::acl::Action;
use crate::fd::{self, PeerCred, SCM_MAX_FD};
use crate::introspect;
use crate::protocol::bind::{BindParams, BindTarget};
use crate::protocol::framing::{FrameError, Framer};
use crate::protocol::{code, Request, Response, RpcError};
use crate::registry::Registry;
use crate::reload::Live;
use crate::socket::{self, OpenError, PathError};
use crate::spec::{SocketKey, SocketSpec, SpecError};

/// Backlog of the control socket: generous, so a burst of clients during a
/// mass restart is queued by the kernel rather than refused.
const CONTROL_BACKLOG: u32 = 4096;
/// Replies queued for one connection before the broker stops reading its
/// requests (back-pressure on a client that does not read).
const MAX_QUEUED_REPLIES: usize = 16;
/// Bytes read from one connection per wake-up, so one busy client cannot
/// starve the others.
const READ_CHUNK: usize = 16 * 1024;
/// Most sockets in one `bind_many` request: each costs a duplicate descriptor
/// until the reply is written.
pub const MAX_BATCH: usize = 4096;
/// How long to stop accepting after accept() fails for lack of resources
/// (EMFILE, ENFILE, ENOMEM): the listener stays readable, so accepting again
/// at once would spin, logging a failure each turn.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Settings of the control loop.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Connections served at once; beyond, new ones wait in the kernel's
    /// accept queue.
    pub max_clients: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions { idle_timeout: Duration::from_secs(30), max_clients: 4096 }
    }
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The control socket's folder could not be created or examined.
    #[error("control socket folder {path}: {source}")]
    Dir {
        /// The folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The folder is under `$XDG_RUNTIME_DIR`, which is set but missing.
    #[error(
        "control socket folder {path}: XDG_RUNTIME_DIR={runtime} does not exist (it is made at login \
         by systemd-logind); unset XDG_RUNTIME_DIR to use /tmp/sockbroker-UID, or pass --control PATH"
    )]
    RuntimeDirMissing {
        /// `$XDG_RUNTIME_DIR`.
        runtime: PathBuf,
        /// The folder.
        path: PathBuf,
    },
    /// A private folder under /tmp belongs to someone else.
    #[error("control socket folder {path} is owned by uid {owner}, not by us (uid {uid}); refusing to use it")]
    DirOwner {
        /// The folder.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our uid.
        uid: u32,
    },
    /// The control path is not a valid socket address.
    #[error("control socket {path}: {source}")]
    Address {
        /// The path given.
        path: PathBuf,
        /// Why it is refused.
        #[source]
        source: SpecError,
    },
    /// Another broker listens on the path, or a non-socket file is there.
    #[error("{0} (is another broker running? stop it, or pass another --control path)")]
    InUse(#[source] PathError),
    /// The socket could not be created.
    #[error("control socket: {0}")]
    Open(#[source] OpenError),
}

/// The control socket: a listening UNIX socket at a path, removed again when
/// dropped if it is still ours.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Inode of the socket file we made; `None` when the file is not ours to
    /// remove (a socket passed by systemd).
    owned_inode: Option<u64>,
}

impl ControlSocket {
    /// Creates the control socket at `path` with mode `mode`, creating its
    /// folder. A stale socket file is replaced; a live one, or any other file,
    /// is an error.
    pub fn bind(path: &Path, mode: u32) -> Result<ControlSocket, ControlError> {
        let path = std::path::absolute(path).map_err(|source| ControlError::Dir { path: path.into(), source })?;
        let key = SocketKey::unix(crate::spec::UnixKind::Stream, &path.to_string_lossy())
            .map_err(|source| ControlError::Address { path: path.clone(), source })?;
        if let Some(dir) = path.parent() {
            prepare_dir(dir)?;
        }
        socket::clear_stale_unix_path(&path).map_err(ControlError::InUse)?;
        let mut spec = SocketSpec::new(key);
        spec.options.backlog = CONTROL_BACKLOG;
        // The socket file is created with its final mode (no chmod after bind,
        // which would leave a window with the default mode). umask is
        // process-wide: this runs at start-up, before any other thread.
        let old = umask(Mode::from_bits_truncate(!mode & 0o777));
        let opened = socket::open(&spec);
        umask(old);
        let fd = opened.map_err(ControlError::Open)?;
        let inode = std::fs::symlink_metadata(&path).map(|m| m.ino()).ok();
        Self::from_listener(UnixListener::from(fd), path, inode)
    }

    /// Wraps a listening socket made elsewhere (by systemd). `owned_inode`
    /// is the inode of the file to remove on exit, if the broker made it.
    pub fn from_listener(
        listener: UnixListener,
        path: PathBuf,
        owned_inode: Option<u64>,
    ) -> Result<ControlSocket, ControlError> {
        listener.set_nonblocking(true).map_err(|e| {
            ControlError::Open(OpenError {
                key: SocketKey::unix(crate::spec::UnixKind::Stream, "@control").expect("a valid key"),
                step: socket::Step::SetOption("O_NONBLOCK"),
                source: e,
            })
        })?;
        Ok(ControlSocket { listener, path, owned_inode })
    }

    /// The path clients connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listening socket, for handing it to the next broker.
    pub fn listener_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// The inode of the socket file this broker will remove on exit, if any.
    pub fn owned_inode(&self) -> Option<u64> {
        self.owned_inode
    }

    /// Sets which socket file is ours to remove on exit: `None` after a
    /// takeover, where the file now belongs to the new broker.
    pub fn set_owned_inode(&mut self, inode: Option<u64>) {
        self.owned_inode = inode;
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        // Remove the file only if it is still the one we made: a new broker
        // may already have put its own socket there.
        if let Some(inode) = self.owned_inode {
            if std::fs::symlink_metadata(&self.path).map(|m| m.ino()).ok() == Some(inode) {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    log::warn!("{}: could not remove control socket: {e}", self.path.display());
                }
            }
        }
    }
}

/// Creates the control socket's folder. The per-user default folder under
/// /tmp (`/tmp/sockbroker-UID`) must be ours and private, or another user
/// could have made it first and swap the socket.
fn prepare_dir(dir: &Path) -> Result<(), ControlError> {
    let dir_err = |source| match crate::config::missing_runtime_dir(dir) {
        Some(runtime) => ControlError::RuntimeDirMissing { runtime, path: dir.into() },
        None => ControlError::Dir { path: dir.into(), source },
    };
    let private = dir.parent() == Some(Path::new("/tmp"))
        && dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("sockbroker-"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(if private { 0o700 } else { 0o755 })
        .create(dir)
        .map_err(dir_err)?;
    if private {
        let meta = std::fs::symlink_metadata(dir).map_err(dir_err)?;
        let uid = nix::unistd::geteuid().as_raw();
        if !meta.is_dir() || meta.uid() != uid {
            return Err(ControlError::DirOwner { path: dir.into(), owner: meta.uid(), uid });
        }
    }
    Ok(())
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
    last_active: Instant,
    /// The peer has shut down its side: answer what is complete, then close.
    read_closed: bool,
    /// An unrecoverable protocol error: flush the error reply, then close.
    closing: bool,
    /// The id of an accepted `takeover` request: the connection leaves the
    /// loop for [`crate::upgrade::hand_over`].
    takeover: Option<Value>,
    /// Descriptors the peer attached to its requests (SCM_RIGHTS), in order,
    /// until an `adopt` request takes them; at most [`SCM_MAX_FD`].
    received: VecDeque<OwnedFd>,
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
}

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
        loop {
            let now = Instant::now();
            if deadline.is_some_and(|d| d <= now) {
                return Ok(Wake::Deadline);
            }
            self.expire_idle(now);
            let timeout =
                self.next_deadline().into_iter().chain(deadline).min().map(|d| d.saturating_duration_since(now));

            let paused = self.accept_paused_until.is_some_and(|t| now < t);
            let accepting = self.conns.len() < self.options.max_clients && !paused;
            let ids: Vec<u64> = self.conns.keys().copied().collect();
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
                } else if !conn.read_closed && !conn.closing {
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

    /// The next idle expiry, or the end of a pause in accepting.
    fn next_deadline(&self) -> Option<Instant> {
        let now = Instant::now();
        let pause_end = self.accept_paused_until.filter(|t| now < *t);
        self.conns.values().map(|c| c.last_active + self.options.idle_timeout).chain(pause_end).min()
    }

    fn expire_idle(&mut self, now: Instant) {
        let timeout = self.options.idle_timeout;
        self.conns.retain(|_, c| {
            let alive = now.duration_since(c.last_active) < timeout;
            if !alive {
                log::info!("{}: closing idle connection after {:?}", c.peer, timeout);
            }
            alive
        });
    }

    fn accept_all(&mut self) {
        // Bounded, so a flood of connections cannot keep the loop from
        // serving the ones it already has.
        for _ in 0..64 {
            if self.conns.len() >= self.options.max_clients {
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
                    // and try again later.
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
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("{peer}: could not make the connection non-blocking, closing: {e}");
                continue;
            }
            let id = self.next_conn;
            self.next_conn += 1;
            self.conns.insert(
                id,
                Conn {
                    stream,
                    peer,
                    framer: Framer::default(),
                    outbox: VecDeque::new(),
                    last_active: Instant::now(),
                    read_closed: false,
                    closing: false,
                    takeover: None,
                    received: VecDeque::new(),
                },
            );
        }
    }

    /// Reads, answers and writes for one connection; drops it when done.
    fn service(&mut self, id: u64, events: PollFlags) {
        let Some(mut conn) = self.conns.remove(&id) else { return };
        let keep = self.service_conn(&mut conn, events);
        if conn.takeover.is_some() && self.takeover.is_none() {
            // Even if the peer already hung up: hand_over() finds out and
            // logs it.
            self.takeover = Some(conn);
        } else if conn.takeover.is_some() {
            log::warn!("{}: another takeover is already under way; closing", conn.peer);
        } else if keep {
            self.conns.insert(id, conn);
        }
    }

    fn service_conn(&mut self, conn: &mut Conn, events: PollFlags) -> bool {
        if events.contains(PollFlags::POLLIN) || events.contains(PollFlags::POLLHUP) {
            let mut buf = [0u8; READ_CHUNK];
            // recvmsg rather than read: `adopt` requests carry descriptors.
            match fd::recv_with_fds(conn.stream.as_fd(), &mut buf) {
                Ok(got) if got.len == 0 => conn.read_closed = true,
                Ok(got) => {
                    conn.framer.push(&buf[..got.len]);
                    if !got.fds.is_empty() && !self.may_adopt(conn.peer) {
                        // Only `adopt` takes descriptors, and only from these
                        // peers: anyone else's are closed at once, so they
                        // cannot fill the broker's descriptor table.
                        log::info!(
                            "{}: closed {} descriptors it sent (only root and the broker's user may adopt)",
                            conn.peer,
                            got.fds.len()
                        );
                    } else {
                        conn.received.extend(got.fds);
                    }
                    conn.last_active = Instant::now();
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
            match flush(conn) {
                Ok(true) => {}
                Ok(false) => return true, // the peer's buffer is full: wait for POLLOUT
                Err(e) => {
                    // Info, not debug: an undelivered reply may be a
                    // descriptor a daemon expected and never got.
                    log::info!("{}: client went away before reading its reply: {e}", conn.peer);
                    return false;
                }
            }
            if conn.closing {
                return false;
            }
            // Everything queued is written; go on with requests that
            // back-pressure held back, if any.
            if !held_back {
                break;
            }
        }
        if conn.read_closed {
            if conn.framer.has_partial() {
                log::info!("{}: connection closed in the middle of a request", conn.peer);
            }
            return false;
        }
        true
    }

    /// Answers every complete request in the buffer, up to the back-pressure
    /// limit. Returns true when it stopped at that limit, so requests may be
    /// left.
    fn answer_ready(&mut self, conn: &mut Conn) -> bool {
        loop {
            if conn.closing || conn.takeover.is_some() {
                return false;
            }
            if conn.outbox.len() >= MAX_QUEUED_REPLIES {
                return true;
            }
            let (response, fds) = match conn.framer.next_value() {
                None => return false,
                Some(Ok(value)) => match Request::from_value(value) {
                    Ok(req) if req.method == crate::upgrade::TAKEOVER_METHOD => {
                        match crate::upgrade::authorize(conn.peer, conn.outbox.is_empty()) {
                            Ok(()) => {
                                conn.takeover = Some(req.id);
                                return false;
                            }
                            Err(e) => (Response::err(req.id, e), Vec::new()),
                        }
                    }
                    Ok(req) if req.method == crate::adopt::METHOD => {
                        let result = self.adopt(conn.peer, &req.params, &mut conn.received);
                        match result {
                            Ok((value, fds)) => (Response::ok(req.id, value), fds),
                            Err(e) => (Response::err(req.id, e), Vec::new()),
                        }
                    }
                    Ok(req) => self.dispatch(conn.peer, req),
                    Err((id, error)) => {
                        log::info!("{}: {}", conn.peer, error.message);
                        (Response::err(id, error), Vec::new())
                    }
                },
                Some(Err(e)) => {
                    let code = match e {
                        FrameError::TooLarge(_) => code::INVALID_REQUEST,
                        FrameError::Syntax(_) => code::PARSE_ERROR,
                    };
                    let message = match &e {
                        FrameError::TooLarge(max) => format!("Invalid request: larger than {max} bytes"),
                        FrameError::Syntax(_) => e.to_string(),
                    };
                    log::info!("{}: {message}; closing the connection", conn.peer);
                    conn.closing = true;
                    (Response::err(Value::Null, RpcError::new(code, message)), Vec::new())
                }
            };
            push_reply(&mut conn.outbox, response.to_bytes(), fds);
        }
    }

    /// Runs one request. Only a success carries descriptors.
    fn dispatch(&mut self, peer: PeerCred, req: Request) -> (Response, Vec<OwnedFd>) {
        let result = match req.method.as_str() {
            "bind" => self.bind(peer, &req.params),
            "bind_many" => self.bind_many(peer, &req.params),
            "release" => self.release(peer, &req.params),
            "list" => Ok((json!(introspect::list(&self.registry)), Vec::new())),
            "status" => Ok((json!(self.status()), Vec::new())),
            "reload" => self.reload(peer),
            other => {
                log::info!("{peer} {other}: method not found");
                Err(RpcError::new(code::METHOD_NOT_FOUND, format!("Method not found: {other}")))
            }
        };
        match result {
            Ok((value, fds)) => (Response::ok(req.id, value), fds),
            Err(e) => (Response::err(req.id, e), Vec::new()),
        }
    }

    fn bind(&mut self, peer: PeerCred, params: &Value) -> Result<(Value, Vec<OwnedFd>), RpcError> {
        let params = BindParams::from_json(params).map_err(|e| invalid(peer, "bind", "bind".into(), &e))?;
        let fd = self.bind_one(peer, &params)?;
        Ok((json!(true), vec![fd]))
    }

    /// One socket: parse, judge, find or open, duplicate. Access is judged
    /// before anything is opened, so a refused peer creates nothing.
    pub(crate) fn bind_one(&mut self, peer: PeerCred, params: &BindParams) -> Result<OwnedFd, RpcError> {
        let target = params.target().map_err(|e| invalid(peer, "bind", params.describe(), &e))?;
        let unknown = |name: &str| {
            log::info!("{peer} bind name '{name}': unknown name");
            RpcError::new(code::UNKNOWN_NAME, crate::registry::UnknownName(name.to_string()).to_string())
        };
        let (name, key) = match &target {
            BindTarget::Name(name) => {
                let held = self.registry.named(name).ok_or_else(|| unknown(name))?;
                (Some(name.clone()), held.key().clone())
            }
            BindTarget::Spec(spec) => (self.registry.get(&spec.key).and_then(|h| h.name.clone()), spec.key.clone()),
        };
        self.live.policy.check(&peer, Action::Bind, name.as_deref(), &key).map_err(|denied| {
            log::warn!("{peer} bind {key}: refused: {denied}");
            RpcError::new(code::ACCESS_DENIED, denied.explained(&self.live.source))
        })?;
        let (held, new) = match &target {
            BindTarget::Name(name) => (self.registry.by_name(name).map_err(|_| unknown(name))?, false),
            BindTarget::Spec(spec) => {
                let new = match self.registry.get_or_open(spec) {
                    Ok((_, new)) => new,
                    Err(e) => {
                        let hint = in_use_by_broker(&self.registry, &e);
                        log::warn!("{peer} bind {}: could not bind: {e}{hint}", spec.key);
                        return Err(RpcError::new(code::BIND_FAILED, format!("Could not bind: {e}{hint}")));
                    }
                };
                (self.registry.get_mut(&spec.key).expect("held: just found or opened"), new)
            }
        };
        if new {
            // A socket the broker made itself: systemd keeps a copy, so a
            // broker restart or crash does not lose it.
            crate::systemd::fdstore::store(held);
        }
        let dup = held.fd().try_clone_to_owned().map_err(|e| {
            log::error!("{peer} bind {}: could not duplicate the held descriptor: {e}", held.key());
            RpcError::new(code::BIND_FAILED, format!("Could not bind: {}: {e}", held.key()))
        })?;
        held.handed_out += 1;
        held.last_peer = Some(peer);
        log::info!(
            "{peer} bind {}: ok ({}, fd {})",
            held.key(),
            if new { "new socket" } else { "held socket" },
            held.fd().as_raw_fd()
        );
        Ok(dup)
    }
}

/// An invalid-params error, logged.
pub(crate) fn invalid(peer: PeerCred, method: &str, what: String, e: &dyn std::fmt::Display) -> RpcError {
    let message = format!("Invalid params: {what}: {e}");
    log::info!("{peer} {method}: {message}");
    RpcError::new(code::INVALID_PARAMS, message)
}

/// Queues a reply. Descriptors beyond the kernel's per-message limit
/// ([`SCM_MAX_FD`]) go in further messages: the reply text is cut so each
/// message carries at least one byte with its share of descriptors, and the
/// receiving kernel never merges two messages that carry descriptors.
fn push_reply(outbox: &mut VecDeque<Outgoing>, bytes: Vec<u8>, mut fds: Vec<OwnedFd>) {
    let chunks = fds.len().div_ceil(SCM_MAX_FD).max(1);
    if chunks == 1 || bytes.len() < chunks {
        outbox.push_back(Outgoing { bytes, sent: 0, fds });
        return;
    }
    for i in 0..chunks {
        let take = fds.len().min(SCM_MAX_FD);
        let part: Vec<OwnedFd> = fds.drain(..take).collect();
        let text = if i + 1 == chunks { bytes[i..].to_vec() } else { bytes[i..i + 1].to_vec() };
        outbox.push_back(Outgoing { bytes: text, sent: 0, fds: part });
    }
}

/// Writes queued replies. Ok(true) when everything is written, Ok(false)
/// when the socket is full.
fn flush(conn: &mut Conn) -> io::Result<bool> {
    while let Some(out) = conn.outbox.front_mut() {
        let fds: Vec<BorrowedFd<'_>> = out.fds.iter().map(|f| f.as_fd()).collect();
        match fd::send_with_fds(conn.stream.as_fd(), &out.bytes[out.sent..], &fds) {
            Ok(n) => {
                // The descriptors travelled with the first byte.
                out.fds.clear();
                out.sent += n;
                conn.last_active = Instant::now();
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
            .filter(|c| c.outbox.is_empty() && !c.closing && !c.read_closed)
            .map(|c| ConnHandle { fd: c.stream.as_fd(), peer: c.peer, pending: c.framer.pending() })
            .collect()
    }

    /// Serves a connection carried over from the previous broker, answering
    /// at once any complete request in `pending`.
    pub fn adopt_connection(&mut self, stream: UnixStream, peer: PeerCred, pending: &[u8]) -> io::Result<()> {
        stream.set_nonblocking(true)?;
        let mut framer = Framer::default();
        framer.push(pending);
        let mut conn = Conn {
            stream,
            peer,
            framer,
            outbox: VecDeque::new(),
            last_active: Instant::now(),
            read_closed: false,
            closing: false,
            takeover: None,
            received: VecDeque::new(),
        };
        if self.service_conn(&mut conn, PollFlags::empty()) {
            let id = self.next_conn;
            self.next_conn += 1;
            self.conns.insert(id, conn);
        }
        Ok(())
    }
}

/// For a bind that failed with "Address already in use": the sockets the
/// broker itself holds on that port and transport (a `sockbroker bind`
/// earlier, say, keeps 127.0.0.1:8080 bound while 0.0.0.0:8080 is asked
/// for), named with how to free them. Empty otherwise.
fn in_use_by_broker(registry: &crate::registry::Registry, e: &crate::socket::OpenError) -> String {
    use crate::spec::SocketKey;
    let SocketKey::Inet { transport, addr } = &e.key else { return String::new() };
    if e.source.kind() != io::ErrorKind::AddrInUse {
        return String::new();
    }
    let mine: Vec<String> = registry
        .iter()
        .filter(|h| matches!(h.key(), SocketKey::Inet { transport: t, addr: a } if t == transport && a.port() == addr.port()))
        .map(|h| h.key().to_string())
        .collect();
    if mine.is_empty() {
        return String::new();
    }
    format!(
        " (this broker holds {} on that port; `sockbroker release ADDRESS` closes a socket it made on demand, \
         `sockbroker list` shows who else holds it)",
        mine.join(", ")
    )
}
