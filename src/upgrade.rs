//! Upgrading the broker itself without losing a socket or refusing a client:
//! re-exec on SIGUSR1, and `serve --takeover`.
//!
//! Both carry the same [`HandoverState`]: the control socket's listening
//! descriptor, every held socket with its state (key, backlog, name, origin,
//! creation time, hand-out count, last peer), and every client connection that
//! has no reply in flight, with the bytes of any half-read request. The control
//! socket is never closed nor unlinked on the way, so a client connecting
//! during the upgrade waits in the kernel's listen backlog instead of getting
//! "connection refused", and connections already open keep working.
//!
//! # Re-exec (SIGUSR1)
//!
//! 1. [`reexec`] runs `<binary> --version` and requires `sockbroker …`: a
//!    missing or broken binary is caught here, while the broker can still
//!    carry on (after `execve` there is no old process left to fall back to).
//! 2. The state is written as JSON to a memfd, whose number travels in
//!    `SOCKBROKER_UPGRADE_FD`; descriptors are referred to by their numbers,
//!    which `execve` keeps. A memfd rather than an environment variable: the
//!    state grows with the number of sockets, and one environment string is
//!    limited to 128 KiB.
//! 3. `FD_CLOEXEC` is cleared on exactly those descriptors (and the memfd),
//!    then `execve` runs the binary now at the path the broker was started
//!    from, with the same arguments. The signal mask is kept across `execve`,
//!    so a signal arriving meanwhile stays pending for the new image's
//!    signalfd instead of killing it.
//! 4. If `execve` fails, the flags are restored and the broker carries on.
//! 5. The new image finds the variable ([`carried_in`]), takes the numbers
//!    ([`fd::take_inherited`] refuses any that it opened itself), adopts them
//!    with their original origin, and serves. Same pid; READY=1 again.
//!
//! multibinder's form, `MULTIBINDER_BIND__tcp__<address>__<port>=<fd>`, is also
//! adopted at start ([`crate::multibinder`]).
//!
//! # Takeover (`serve --takeover`)
//!
//! ```text
//!  new broker B                         old broker A (serving)
//!  connect(control path) ────────────►  accept (queued like any client)
//!  {"method":"takeover"}  ───────────►  peer is root or A's uid? else refuse
//!                                       leave the poll loop: accept nothing more
//!  adopt state + fds      ◄───────────  reply: state JSON, fds in batches of
//!                                       ≤ SCM_MAX_FD over SCM_RIGHTS
//!  {"method":"takeover-commit"} ─────►  ack; disown the control path; exit 0
//!  own the control path; READY=1; serve (queued clients are accepted now)
//! ```
//!
//! Until A acknowledges the commit, B serves nothing and A keeps its own
//! descriptors: if B dies or the commit does not come within
//! [`COMMIT_TIMEOUT`], A logs why and goes back to serving as if nothing
//! happened. B reads no client byte before the ack, so nothing is consumed by
//! a broker that then disappears.

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::channel::{self, ReadError};
use crate::fd::{self, PeerCred};
use crate::protocol::framing::Framer;
use crate::protocol::{Request, Response, RpcError, COMMIT_METHOD, TAKEOVER_METHOD};
use crate::registry::{Origin, Registry};
use crate::server::{ControlSocket, Server, ServerOptions, TakeoverConn};
use crate::spec::{SocketKey, SocketOptions, SocketSpec};
use crate::systemd::notify;

/// Environment variable naming the memfd that holds the state across a re-exec.
pub const STATE_FD_ENV: &str = "SOCKBROKER_UPGRADE_FD";
/// Version of [`HandoverState`]; a broker refuses a state it does not know.
pub const STATE_VERSION: u32 = 1;
/// How long the old broker waits for the new one to confirm a takeover.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `<binary> --version` may take.
pub const VALIDATE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest state read from another broker (about 100 bytes per socket).
const MAX_STATE: usize = 64 * 1024 * 1024;

/// How many re-execs and takeovers this broker's sockets have been through.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Why an upgrade step failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The binary to re-execute failed the `--version` check.
    #[error("{path}: not a working sockbroker binary: {problem}")]
    Binary {
        /// The binary.
        path: PathBuf,
        /// What went wrong.
        problem: String,
    },
    /// A descriptor could not be prepared for exec, or the state not written.
    #[error("preparing the re-exec: {what}: {source}")]
    Prepare {
        /// The step.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `execve` itself failed.
    #[error("execve {path}: {source}")]
    Exec {
        /// The binary.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// The state handed over is inconsistent.
    #[error("the state handed over: {0}")]
    State(String),
    /// The state memfd could not be read.
    #[error("reading the state handed over: {0}")]
    StateRead(#[source] io::Error),
    /// A message between brokers is not the JSON expected.
    #[error("{what}: {source}")]
    Json {
        /// Which message.
        what: &'static str,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The control socket handed over could not be set up.
    #[error(transparent)]
    Control(#[from] crate::server::ControlError),
    /// An inherited descriptor was refused.
    #[error(transparent)]
    Inherit(#[from] fd::InheritError),
    /// The running broker could not be reached.
    #[error("cannot reach the running broker at {path}: {source}")]
    Connect {
        /// The control socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Talking to the other broker failed.
    #[error("takeover over {path}: {source}")]
    Io {
        /// The control socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The running broker refused.
    #[error("the broker at {path} refused the takeover: {error}")]
    Refused {
        /// The control socket path.
        path: PathBuf,
        /// Its answer.
        error: RpcError,
    },
    /// The peer broke the takeover protocol.
    #[error("takeover: {0}")]
    Protocol(String),
}

/// One held socket as handed over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SocketState {
    /// Descriptor: its number (re-exec) or its position among the passed
    /// descriptors (takeover).
    pub fd: i32,
    /// The socket's identity.
    pub key: SocketKey,
    /// The backlog it was opened with (also in `options`; kept for brokers
    /// that read only this).
    pub backlog: u32,
    /// Every option it was opened with, so the next broker compares the
    /// declared spec with the held one truthfully (absent in the state of
    /// older brokers: then only the backlog is known).
    #[serde(default)]
    pub options: Option<SocketOptions>,
    /// Its name, if any.
    pub name: Option<String>,
    /// Where it first came from (kept: a re-exec does not make a systemd
    /// socket an "upgrade" one).
    pub origin: Origin,
    /// When the first broker held it.
    pub created: SystemTime,
    /// How many times it was handed out, over all generations.
    pub handed_out: u64,
    /// The last client it went to.
    pub last_peer: Option<PeerCred>,
    /// The uid whose request created it, who may release it (absent in
    /// the state of older brokers).
    #[serde(default)]
    pub creator: Option<u32>,
}

/// The control socket as handed over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlState {
    /// Descriptor number or position, as for [`SocketState::fd`].
    pub fd: i32,
    /// The path clients connect to.
    pub path: PathBuf,
    /// Inode of the socket file to remove when the broker finally stops.
    pub owned_inode: Option<u64>,
}

/// A client connection as handed over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnState {
    /// Descriptor number or position, as for [`SocketState::fd`].
    pub fd: i32,
    /// The client, as read at accept.
    pub peer: PeerCred,
    /// Bytes of a request not yet complete.
    pub pending: Vec<u8>,
}

/// Everything one broker hands to the next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandoverState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Who wrote it.
    pub from_pid: u32,
    /// Upgrades so far, this one included.
    pub generation: u64,
    /// The control socket.
    pub control: ControlState,
    /// The held sockets.
    pub sockets: Vec<SocketState>,
    /// The client connections.
    pub connections: Vec<ConnState>,
}

/// How descriptors are referred to in a [`HandoverState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Numbering {
    /// By their number in this process (kept by `execve`).
    Raw,
    /// By their position in the list passed over SCM_RIGHTS.
    Position,
}

/// The state of `server` and the descriptors it refers to, in order.
fn snapshot<'a>(server: &'a Server, numbering: Numbering) -> (HandoverState, Vec<BorrowedFd<'a>>) {
    let mut fds: Vec<BorrowedFd<'a>> = Vec::new();
    // Records a descriptor and returns how the state refers to it.
    let mut add = |fd: BorrowedFd<'a>| -> i32 {
        let n = match numbering {
            Numbering::Raw => fd.as_raw_fd(),
            Numbering::Position => fds.len() as i32,
        };
        fds.push(fd);
        n
    };
    let control = ControlState {
        fd: add(server.control().listener_fd()),
        path: server.control().path().to_path_buf(),
        owned_inode: server.control().owned_inode(),
    };
    let sockets = server
        .registry
        .iter()
        .map(|held| SocketState {
            fd: add(held.fd()),
            key: held.key().clone(),
            backlog: held.spec.options.backlog,
            options: Some(held.spec.options.clone()),
            name: held.name.clone(),
            origin: held.origin,
            created: held.created,
            handed_out: held.handed_out,
            last_peer: held.last_peer,
            creator: held.creator,
        })
        .collect();
    let connections = server
        .movable_connections()
        .into_iter()
        .map(|conn| ConnState { fd: add(conn.fd), peer: conn.peer, pending: conn.pending.to_vec() })
        .collect();
    let state = HandoverState {
        version: STATE_VERSION,
        from_pid: std::process::id(),
        generation: GENERATION.load(Ordering::Relaxed) + 1,
        control,
        sockets,
        connections,
    };
    (state, fds)
}

/// What a broker received from its predecessor, ready to serve.
#[derive(Debug)]
pub struct Carried {
    control: ControlSocket,
    owned_inode: Option<u64>,
    registry: Registry,
    conns: Vec<(UnixStream, PeerCred, Vec<u8>)>,
    generation: u64,
    from: String,
}

impl Carried {
    /// Builds the broker's state from a handed-over state and the descriptors
    /// it refers to (by number or position). Descriptors the state does not
    /// mention are closed; one it mentions but that did not come is an error.
    fn from_state(state: HandoverState, mut fds: HashMap<i32, OwnedFd>, from: String) -> Result<Carried, UpgradeError> {
        if state.version != STATE_VERSION {
            return Err(UpgradeError::State(format!(
                "state version {} from pid {}, this broker reads version {STATE_VERSION}",
                state.version, state.from_pid
            )));
        }
        let mut take = |n: i32, role: &dyn std::fmt::Display| -> Result<OwnedFd, UpgradeError> {
            let fd = fds.remove(&n).ok_or_else(|| UpgradeError::State(format!("{role}: descriptor {n} missing")))?;
            match fd::is_socket(fd.as_fd()) {
                Ok(true) => Ok(fd),
                Ok(false) => Err(UpgradeError::State(format!("{role}: descriptor {n} is not a socket"))),
                Err(e) => Err(UpgradeError::State(format!("{role}: descriptor {n}: {e}"))),
            }
        };
        let listener = UnixListener::from(take(state.control.fd, &"control socket")?);
        // The socket file becomes ours to remove only in into_server(): until
        // then, a failure must leave the path to the broker still serving.
        let control = ControlSocket::from_listener(listener, state.control.path.clone(), None)?;
        let mut registry = Registry::new();
        for s in state.sockets {
            let fd = take(s.fd, &s.key)?;
            let mut spec = SocketSpec::new(s.key.clone());
            match s.options {
                Some(options) => spec.options = options,
                None => spec.options.backlog = s.backlog,
            }
            match registry.adopt(fd, spec, s.name, s.origin) {
                Ok(held) => {
                    held.created = s.created;
                    held.handed_out = s.handed_out;
                    held.last_peer = s.last_peer;
                    held.creator = s.creator;
                }
                Err((_, conflict)) => {
                    return Err(UpgradeError::State(format!("{}: {conflict}", s.key)));
                }
            }
        }
        let mut conns = Vec::with_capacity(state.connections.len());
        for c in state.connections {
            let fd = take(c.fd, &format_args!("connection of {}", c.peer))?;
            conns.push((UnixStream::from(fd), c.peer, c.pending));
        }
        if !fds.is_empty() {
            log::warn!("{} descriptors handed over but not described in the state; closed", fds.len());
        }
        Ok(Carried {
            control,
            owned_inode: state.control.owned_inode,
            registry,
            conns,
            generation: state.generation,
            from,
        })
    }

    /// The server, serving what was carried over. Only now does the control
    /// socket file become this broker's to remove when it stops.
    pub fn into_server(mut self, options: ServerOptions) -> Server {
        GENERATION.store(self.generation, Ordering::Relaxed);
        self.control.set_owned_inode(self.owned_inode);
        let (sockets, conns) = (self.registry.len(), self.conns.len());
        let mut server = Server::new(self.control, self.registry, options);
        for (stream, peer, pending) in self.conns {
            if let Err(e) = server.adopt_connection(stream, peer, &pending) {
                log::warn!("{peer}: could not resume the connection: {e}");
            }
        }
        log::info!(
            "resumed after {} (generation {}): holding {sockets} sockets, {conns} client connections carried over",
            self.from,
            self.generation
        );
        server
    }
}

/// What the broker should start from: the state of a previous image of this
/// process (re-exec, always checked first), or, with `takeover`, the state
/// taken over from the broker serving on `control`. `None`: start afresh.
pub fn carried_in(control: &Path, takeover: bool) -> Result<Option<Carried>, UpgradeError> {
    if let Some(carried) = inherited()? {
        if takeover {
            log::info!("--takeover ignored: this process was re-executed and already holds the sockets");
        }
        return Ok(Some(carried));
    }
    if takeover {
        return take_over(control).map(Some);
    }
    Ok(None)
}

/// The state left by a previous image of this process, if any.
fn inherited() -> Result<Option<Carried>, UpgradeError> {
    let Some(value) = std::env::var_os(STATE_FD_ENV) else { return Ok(None) };
    // Read once and removed, so a child of the broker never sees it (this
    // runs at start-up, before any thread exists).
    std::env::remove_var(STATE_FD_ENV);
    let raw: RawFd = value
        .to_str()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| UpgradeError::State(format!("{STATE_FD_ENV}={value:?} is not a descriptor number")))?;
    let memfd = fd::take_inherited(&[raw])?.pop().expect("one descriptor asked, one taken");
    let mut text = String::new();
    std::fs::File::from(memfd).read_to_string(&mut text).map_err(UpgradeError::StateRead)?;
    let state: HandoverState =
        serde_json::from_str(&text).map_err(|source| UpgradeError::Json { what: "the re-exec state", source })?;
    let numbers: Vec<RawFd> = std::iter::once(state.control.fd)
        .chain(state.sockets.iter().map(|s| s.fd))
        .chain(state.connections.iter().map(|c| c.fd))
        .collect();
    let fds = numbers.iter().copied().zip(fd::take_inherited(&numbers)?).collect();
    Carried::from_state(state, fds, "re-exec".into()).map(Some)
}

/// The binary and arguments to re-execute, as they were when the broker
/// started: later, the path may hold a new binary (the point of SIGUSR1),
/// while `/proc/self/exe` would still name the old, possibly deleted, file.
#[derive(Debug, Clone)]
pub struct ExecTarget {
    /// The binary's path.
    pub path: PathBuf,
    /// The full argument list, `argv[0]` included.
    pub args: Vec<OsString>,
}

impl ExecTarget {
    /// Reads the path and arguments; call it first thing in `serve`.
    ///
    /// The path is `argv[0]` made absolute (or found in `PATH` when it has no
    /// '/'), without resolving symbolic links, so that switching a symlink to
    /// a new release is picked up by the next re-exec. `/proc/self/exe`
    /// (already resolved) is the fallback.
    pub fn at_start() -> io::Result<ExecTarget> {
        let args: Vec<OsString> = std::env::args_os().collect();
        let path = match args.first().map(Path::new) {
            Some(arg0) if arg0.as_os_str().as_bytes().contains(&b'/') => std::path::absolute(arg0)?,
            Some(arg0) => find_in_path(arg0).map_or_else(std::env::current_exe, Ok)?,
            None => std::env::current_exe()?,
        };
        Ok(ExecTarget { path, args })
    }
}

/// The first executable file called `name` in `PATH`, as a shell finds it.
fn find_in_path(name: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Re-executes the broker, keeping every held socket, the control socket and
/// the idle client connections. Returns only on failure, after restoring
/// every flag it changed, and logging why: the broker then carries on as
/// before.
///
/// The service manager is told RELOADING=1 first, and READY=1 afterwards by
/// the new image or, on failure, by this one.
pub fn reexec(server: &Server, target: &ExecTarget) -> UpgradeError {
    notify::reloading("re-executing");
    let err = try_reexec(server, target);
    // Logged before READY=1, so whoever waits for READY finds the reason.
    log::error!("re-exec failed, still serving: {}", crate::error_chain(&err));
    notify::ready("serving (re-exec failed)");
    err
}

fn try_reexec(server: &Server, target: &ExecTarget) -> UpgradeError {
    if let Err(e) = validate_binary(&target.path) {
        return e;
    }
    let (state, fds) = snapshot(server, Numbering::Raw);
    let memfd = match write_state(&state) {
        Ok(fd) => fd,
        Err(source) => return UpgradeError::Prepare { what: "writing the state to a memfd", source },
    };
    // The new image learns about its descriptors from the state alone:
    // socket-activation or multibinder variables left in the environment
    // would name descriptors it already takes from the state.
    let stale = |k: &std::ffi::OsStr| {
        k == STATE_FD_ENV
            || crate::systemd::listen::LISTEN_ENV.iter().any(|v| k == *v)
            || k.as_bytes().starts_with(crate::multibinder::MULTIBINDER_BIND_PREFIX.as_bytes())
    };
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !stale(k))
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    env.push(CString::new(format!("{STATE_FD_ENV}={}", memfd.as_raw_fd())).expect("no NUL in a number"));
    let args: Vec<CString> = target.args.iter().filter_map(|a| CString::new(a.as_bytes()).ok()).collect();
    let Ok(path) = CString::new(target.path.as_os_str().as_bytes()) else {
        return UpgradeError::Binary { path: target.path.clone(), problem: "NUL byte in the path".into() };
    };

    // Exactly these descriptors cross the exec; everything else stays
    // close-on-exec.
    let crossing: Vec<BorrowedFd<'_>> = fds.iter().copied().chain(std::iter::once(memfd.as_fd())).collect();
    let mut cleared = Vec::with_capacity(crossing.len());
    for fd in &crossing {
        if let Err(source) = fd::set_cloexec(*fd, false) {
            restore_cloexec(&cleared);
            return UpgradeError::Prepare { what: "clearing close-on-exec", source };
        }
        cleared.push(*fd);
    }
    log::info!(
        "re-executing {} (generation {}): {} sockets, {} client connections carried over, {} with a reply in \
         flight left to close",
        target.path.display(),
        state.generation,
        state.sockets.len(),
        state.connections.len(),
        server.clients() - state.connections.len()
    );
    let err = match nix::unistd::execve(&path, &args, &env) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    restore_cloexec(&cleared);
    UpgradeError::Exec { path: target.path.clone(), source: err }
}

fn restore_cloexec(fds: &[BorrowedFd<'_>]) {
    for fd in fds {
        if let Err(e) = fd::set_cloexec(*fd, true) {
            log::error!("descriptor {}: could not restore close-on-exec: {e}", fd.as_raw_fd());
        }
    }
}

/// Writes the state into a fresh memfd (close-on-exec until the exec), read
/// position at the start.
fn write_state(state: &HandoverState) -> io::Result<OwnedFd> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let fd = memfd_create(c"sockbroker-upgrade", MFdFlags::MFD_CLOEXEC)?;
    let mut file = std::fs::File::from(fd);
    serde_json::to_writer(&mut file, state)?;
    file.flush()?;
    file.rewind()?;
    Ok(OwnedFd::from(file))
}

/// Checks that `path` is a sockbroker binary that runs: `path --version` must
/// exit 0 within [`VALIDATE_TIMEOUT`] and print `sockbroker VERSION`.
pub fn validate_binary(path: &Path) -> Result<(), UpgradeError> {
    let bad = |problem: String| UpgradeError::Binary { path: path.to_path_buf(), problem };
    // The child inherits nothing: every descriptor the broker holds is
    // close-on-exec.
    let mut child = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| bad(format!("cannot run it: {e}")))?;
    let deadline = Instant::now() + VALIDATE_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(bad(format!("`--version` did not finish within {VALIDATE_TIMEOUT:?}")));
            }
            Err(e) => return Err(bad(format!("waiting for `--version`: {e}"))),
        }
    };
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    if !status.success() {
        return Err(bad(format!("`--version` failed ({status})")));
    }
    if !out.starts_with("sockbroker ") {
        return Err(bad(format!("`--version` printed {:?}, not \"sockbroker VERSION\"", out.trim())));
    }
    Ok(())
}

/// Serves an accepted takeover request (after [`crate::server::Wake::Takeover`]).
/// Returns true when the new broker confirmed and this one must now exit: the
/// control path is then disowned (not removed at exit). Returns false when the
/// takeover failed; this broker then goes on serving, unchanged.
pub fn hand_over(server: &mut Server) -> bool {
    let Some(request) = server.take_takeover() else { return false };
    let peer = request.peer;
    match hand_over_to(server, request) {
        Ok(()) => {
            server.control_mut().set_owned_inode(None);
            notify::main_pid(peer.pid);
            log::info!("handed over to pid {}: exiting without touching the control socket", peer.pid);
            true
        }
        Err(e) => {
            log::warn!("takeover by {peer} failed: {}; still serving", crate::error_chain(&e));
            false
        }
    }
}

fn hand_over_to(server: &Server, request: TakeoverConn) -> Result<(), UpgradeError> {
    let path = server.control().path().to_path_buf();
    let io = |source| UpgradeError::Io { path: path.clone(), source };
    let (state, fds) = snapshot(server, Numbering::Position);
    let counts = (state.sockets.len(), state.connections.len());
    let value =
        serde_json::to_value(&state).map_err(|source| UpgradeError::Json { what: "the takeover state", source })?;
    let bytes = Response::ok(request.id, value).to_bytes();
    let stream = request.stream;
    stream.set_nonblocking(false).map_err(io)?;
    stream.set_write_timeout(Some(COMMIT_TIMEOUT)).map_err(io)?;
    stream.set_read_timeout(Some(COMMIT_TIMEOUT)).map_err(io)?;
    channel::send(stream.as_fd(), bytes, &fds).map_err(io)?;
    log::info!(
        "sent {} sockets and {} connections to pid {}; waiting for its confirmation",
        counts.0,
        counts.1,
        request.peer.pid
    );

    let mut framer = Framer::default();
    let (value, _) = read_value(&stream, &mut framer).map_err(io)?;
    let commit = Request::from_value(value).map_err(|(_, e)| UpgradeError::Protocol(e.message))?;
    if commit.method != COMMIT_METHOD {
        return Err(UpgradeError::Protocol(format!("expected {COMMIT_METHOD}, got {}", commit.method)));
    }
    (&stream).write_all(&Response::ok(commit.id, json!(true)).to_bytes()).map_err(io)?;
    Ok(())
}

/// Reads one JSON value and its descriptors ([`channel::read_value`]), the
/// end of the stream and bad framing as I/O errors naming the other broker.
fn read_value(stream: &UnixStream, framer: &mut Framer) -> io::Result<(Value, Vec<OwnedFd>)> {
    channel::read_value(stream, framer).map_err(|e| match e {
        ReadError::Io(e) => e,
        ReadError::Closed => io::Error::new(io::ErrorKind::UnexpectedEof, "the other broker closed the connection"),
        ReadError::Frame(e) => io::Error::new(io::ErrorKind::InvalidData, e),
    })
}

/// Takes over the broker serving on `path`: receives its state and
/// descriptors, adopts them, confirms, and returns once the old broker has
/// acknowledged (it exits right after). On any error before that, the old
/// broker keeps serving.
fn take_over(path: &Path) -> Result<Carried, UpgradeError> {
    let io = |source| UpgradeError::Io { path: path.to_path_buf(), source };
    let stream = UnixStream::connect(path).map_err(|source| UpgradeError::Connect { path: path.into(), source })?;
    let old = fd::peer_credentials(stream.as_fd()).map_err(io)?;
    stream.set_read_timeout(Some(COMMIT_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(COMMIT_TIMEOUT)).map_err(io)?;
    let ask = Request { id: json!(1), method: TAKEOVER_METHOD.into(), params: json!({"pid": std::process::id()}) };
    (&stream).write_all(ask.to_json().as_bytes()).map_err(io)?;

    let mut framer = Framer::new(MAX_STATE);
    let (value, received) = read_value(&stream, &mut framer).map_err(io)?;
    let response: Response =
        serde_json::from_value(value).map_err(|source| UpgradeError::Json { what: "the takeover reply", source })?;
    let result = match (response.result, response.error) {
        (_, Some(error)) => return Err(UpgradeError::Refused { path: path.into(), error }),
        (Some(result), None) => result,
        (None, None) => return Err(UpgradeError::Protocol("reply with neither result nor error".into())),
    };
    let state: HandoverState =
        serde_json::from_value(result).map_err(|source| UpgradeError::Json { what: "the takeover state", source })?;
    let fds = received.into_iter().enumerate().map(|(i, fd)| (i as i32, fd)).collect();
    let carried = Carried::from_state(state, fds, format!("takeover from pid {}", old.pid))?;

    let commit = Request { id: json!(2), method: COMMIT_METHOD.into(), params: Value::Null };
    (&stream).write_all(commit.to_json().as_bytes()).map_err(io)?;
    let mut framer = Framer::default();
    let (value, _) = read_value(&stream, &mut framer).map_err(io)?;
    let ack: Response =
        serde_json::from_value(value).map_err(|source| UpgradeError::Json { what: "the commit reply", source })?;
    if ack.result != Some(json!(true)) {
        return Err(UpgradeError::Protocol(format!("commit not acknowledged: {:?}", ack.error)));
    }
    Ok(carried)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_as_json() {
        let state = HandoverState {
            version: STATE_VERSION,
            from_pid: 42,
            generation: 3,
            control: ControlState { fd: 0, path: "/run/x.sock".into(), owned_inode: Some(7) },
            sockets: vec![SocketState {
                fd: 1,
                key: "tcp://127.0.0.1:80".parse().unwrap(),
                backlog: 128,
                options: Some(SocketOptions { backlog: 128, keepalive: true, ..SocketOptions::default() }),
                name: Some("web".into()),
                origin: Origin::Systemd,
                created: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
                handed_out: 9,
                last_peer: Some(PeerCred { pid: 1, uid: 2, gid: 3 }),
                creator: Some(2),
            }],
            connections: vec![ConnState {
                fd: 2,
                peer: PeerCred { pid: 4, uid: 5, gid: 6 },
                pending: b"{\"me".to_vec(),
            }],
        };
        let text = serde_json::to_string(&state).unwrap();
        assert!(text.contains("\"tcp://127.0.0.1:80\""), "{text}");
        assert_eq!(serde_json::from_str::<HandoverState>(&text).unwrap(), state);
        // The state of an older broker has no options: read as absent.
        let mut old: serde_json::Value = serde_json::from_str(&text).unwrap();
        old["sockets"][0].as_object_mut().unwrap().remove("options");
        let old: HandoverState = serde_json::from_value(old).unwrap();
        assert_eq!((old.sockets[0].options.as_ref(), old.sockets[0].backlog), (None, 128));
    }

    #[test]
    fn batches_descriptors_by_scm_max_fd() {
        // 600 descriptors need three messages; the receiver gets them all, in
        // order, and the text intact.
        let (a, b) = UnixStream::pair().unwrap();
        let held: Vec<OwnedFd> = (0..600).map(|_| OwnedFd::from(UnixStream::pair().unwrap().0)).collect();
        let borrowed: Vec<BorrowedFd<'_>> = held.iter().map(|f| f.as_fd()).collect();
        let text = Response::ok(json!(1), json!({"n": 600, "pad": "x".repeat(10)})).to_bytes();
        let sender = std::thread::scope(|s| {
            let h = s.spawn(|| channel::send(a.as_fd(), text.clone(), &borrowed));
            let (value, fds) = read_value(&b, &mut Framer::default()).unwrap();
            assert_eq!(value["result"]["n"], 600);
            assert_eq!(fds.len(), 600);
            for (got, want) in fds.iter().zip(&held) {
                assert_eq!(fd::inode(got.as_fd()).unwrap(), fd::inode(want.as_fd()).unwrap());
                assert!(fd::is_cloexec(got.as_fd()).unwrap());
            }
            h.join().unwrap()
        });
        sender.unwrap();
    }

    #[test]
    fn rejects_a_broken_binary() {
        let err = validate_binary(Path::new("/nonexistent/sockbroker")).unwrap_err();
        assert!(err.to_string().contains("cannot run it"), "{err}");
        let err = validate_binary(Path::new("/bin/false")).unwrap_err();
        assert!(err.to_string().contains("failed"), "{err}");
        let err = validate_binary(Path::new("/bin/true")).unwrap_err();
        assert!(err.to_string().contains("not \"sockbroker VERSION\""), "{err}");
    }
}
