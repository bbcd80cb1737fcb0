//! The supervisor's control socket: how `sockbroker supervisor reload --pid
//! PID` asks a running supervisor (`run`, `haproxy run`) for a reload and
//! waits for its outcome, which a signal cannot carry back.
//!
//! ```text
//! client                                  supervisor PID
//! connect @sockbroker-supervisor/PID ───▶ accept; SO_PEERCRED: uid 0 or the supervisor's uid, else closed
//! check SO_PEERCRED pid == PID            (a squatter on the name cannot answer for PID)
//! {"request":"reload"}\n ───────────────▶ start a reload now, or queue one after the current one
//!                        ◀─────────────── {"ok":true|false,"message":"…"}\n once that reload's outcome is known
//! ```
//!
//! The address is an abstract UNIX socket named after the supervisor's pid:
//! nothing to create in a writable folder, nothing left behind, and it works
//! the same in `haproxy@.service` (User=haproxy, ProtectSystem=strict) as
//! from a root shell. Abstract names are visible to every process of the
//! network namespace, so access is decided by the peer's credentials on
//! accept, and the client checks the server's pid in turn.
//!
//! Every connection is non-blocking and read into a bounded buffer inside the
//! supervisor's poll loop: a client that connects and says nothing cannot
//! stall reloads or signals.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::{Pid, Uid};
use serde::{Deserialize, Serialize};

/// The most connections held at once; more are refused with a reply.
pub const MAX_CONNECTIONS: usize = 64;
/// The longest request line.
const MAX_REQUEST: usize = 1024;
/// How long writing a reply may block (a reply fits in the socket buffer;
/// this only bounds a pathological peer).
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// The abstract socket name of supervisor `pid` (shown with a leading `@`).
pub fn name(pid: Pid) -> String {
    format!("sockbroker-supervisor/{pid}")
}

/// What a client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "lowercase")]
pub enum Request {
    /// A reload; the reply is its outcome.
    Reload,
    /// The generations alive now.
    Status,
    /// The supervisor's metrics in the Prometheus text format.
    Metrics,
}

/// One generation, as `status` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationInfo {
    /// Its number (1, 2, …).
    pub number: u64,
    /// Its (main) pid.
    pub pid: i32,
    /// starting, proving, serving, retiring or stopping.
    pub state: String,
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The reload succeeded (or the status request was answered).
    pub ok: bool,
    /// What happened, in words: the serving generation, or why the reload failed.
    pub message: String,
    /// For `status`: every generation alive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub generations: Vec<GenerationInfo>,
    /// For `metrics`: the text ([`super::metrics`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

impl Reply {
    /// A reply with no generation list.
    pub fn new(ok: bool, message: impl Into<String>) -> Reply {
        Reply { ok, message: message.into(), generations: Vec::new(), metrics: None }
    }
}

/// Why talking to a supervisor failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing listens on the supervisor's name.
    #[error("cannot reach the supervisor of pid {pid} at @{name}: {source} (is PID a `sockbroker run` or `sockbroker haproxy run`, in this network namespace?)")]
    Connect {
        /// The supervisor asked for.
        pid: Pid,
        /// Its socket name.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Something else than PID answers on its name.
    #[error("@{name} is served by pid {actual}, not by {pid}: refusing to trust it")]
    Impostor {
        /// The supervisor asked for.
        pid: Pid,
        /// Its socket name.
        name: String,
        /// Who answered.
        actual: i32,
    },
    /// The exchange failed or was cut.
    #[error("talking to the supervisor of pid {pid}: {source}")]
    Io {
        /// The supervisor.
        pid: Pid,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The reply was not understood.
    #[error("the supervisor of pid {pid} sent an unreadable reply {text:?}")]
    BadReply {
        /// The supervisor.
        pid: Pid,
        /// What it sent.
        text: String,
    },
}

/// Sends `request` to supervisor `pid` and waits for its reply (at most
/// `timeout`, if given).
pub fn call(pid: Pid, request: Request, timeout: Option<Duration>) -> Result<Reply, ControlError> {
    let name = name(pid);
    let connect_err = |source| ControlError::Connect { pid, name: name.clone(), source };
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(connect_err)?;
    let mut stream = UnixStream::connect_addr(&addr).map_err(connect_err)?;
    let io_err = |source| ControlError::Io { pid, source };
    let peer = getsockopt(&stream, sockopt::PeerCredentials).map_err(|e| io_err(e.into()))?;
    if peer.pid() != pid.as_raw() {
        return Err(ControlError::Impostor { pid, name, actual: peer.pid() });
    }
    stream.set_read_timeout(timeout).map_err(io_err)?;
    let mut line = serde_json::to_string(&request).unwrap_or_default();
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io_err)?;
    let mut text = String::new();
    stream.read_to_string(&mut text).map_err(|e| {
        if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut {
            io_err(io::Error::new(io::ErrorKind::TimedOut, format!("no outcome within {timeout:?}")))
        } else {
            io_err(e)
        }
    })?;
    if text.is_empty() {
        return Err(io_err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the supervisor closed the connection without an outcome (did it stop?)",
        )));
    }
    serde_json::from_str(text.trim_end()).map_err(|_| ControlError::BadReply { pid, text })
}

/// A client's connection inside the supervisor.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    buf: Vec<u8>,
    /// The peer's uid, for the log.
    pub uid: u32,
    /// Why the peer may not ask: answered once its request is read (closing
    /// with its request unread would reset the connection, losing the reply).
    pub refused: Option<String>,
}

impl Connection {
    /// The descriptor to poll while a request is being read.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// Reads what is there; `Ok(Some(request))` once a whole line came,
    /// `Err` when the peer left or sent something unusable.
    pub fn read_request(&mut self) -> Result<Option<Request>, String> {
        let mut chunk = [0u8; 512];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("closed before a request".into()),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                        let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                        return serde_json::from_str(line.trim())
                            .map(Some)
                            .map_err(|_| format!("unknown request {:?}", line.trim()));
                    }
                    if self.buf.len() > MAX_REQUEST {
                        return Err(format!("request longer than {MAX_REQUEST} bytes"));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Sends the reply and closes.
    pub fn answer(self, reply: &Reply) {
        let mut line = serde_json::to_string(reply).unwrap_or_default();
        line.push('\n');
        let mut stream = self.stream;
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        if let Err(e) = stream.write_all(line.as_bytes()) {
            log::debug!("control client (uid {}): reply not delivered: {e}", self.uid);
        }
    }
}

/// The listening side, owned by the supervisor.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    name: String,
    uid: Uid,
}

impl Server {
    /// Listens on this process's name.
    pub fn bind() -> io::Result<Server> {
        let name = name(nix::unistd::getpid());
        let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
        let listener = UnixListener::bind_addr(&addr)?;
        listener.set_nonblocking(true)?;
        Ok(Server { listener, name, uid: Uid::effective() })
    }

    /// The name, with a leading `@`.
    pub fn address(&self) -> String {
        format!("@{}", self.name)
    }

    /// The descriptor to poll for new connections.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// Accepts every pending connection from root or our own uid; others are
    /// closed at once (logged). `room` is how many more may be held.
    pub fn accept(&self, mut room: usize) -> Vec<Connection> {
        let mut accepted = Vec::new();
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        log::warn!("control socket {}: accept: {e}", self.address());
                    }
                    return accepted;
                }
            };
            let cred = match getsockopt(&stream, sockopt::PeerCredentials) {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("control socket: peer credentials: {e}");
                    continue;
                }
            };
            let mut conn = Connection { stream, buf: Vec::new(), uid: cred.uid(), refused: None };
            if cred.uid() != 0 && cred.uid() != self.uid.as_raw() {
                let why = format!("uid {} may not ask: only root and uid {} (the supervisor's)", cred.uid(), self.uid);
                log::warn!("control socket: refused pid {}: {why}", cred.pid());
                conn.refused = Some(why);
            }
            if room == 0 {
                log::warn!("control socket: {MAX_CONNECTIONS} connections already open; refusing pid {}", cred.pid());
                conn.answer(&Reply::new(false, "too many requests waiting; try again"));
                continue;
            }
            if let Err(e) = conn.stream.set_nonblocking(true) {
                log::warn!("control socket: {e}");
                continue;
            }
            log::debug!("control socket: connection from pid {} (uid {}), fd {}", cred.pid(), cred.uid(), {
                conn.stream.as_raw_fd()
            });
            room -= 1;
            accepted.push(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_form() {
        assert_eq!(serde_json::to_string(&Request::Reload).unwrap(), r#"{"request":"reload"}"#);
        assert_eq!(serde_json::from_str::<Request>(r#"{"request":"status"}"#).unwrap(), Request::Status);
        assert!(serde_json::from_str::<Request>(r#"{"request":"shutdown"}"#).is_err());
    }
}
