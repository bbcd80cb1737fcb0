//! A Rust client for the broker: connect, ask for sockets, get [`OwnedFd`]s.
//!
//! ```no_run
//! use sockbroker::client::Client;
//! let mut client = Client::connect_default()?;
//! let listener = client.bind(&"tcp://127.0.0.1:8080".parse()?)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The path comes from `SOCKBROKER_SOCKET`, then `MULTIBINDER_SOCK`, then the
//! default (see [`crate::config`]). Received descriptors are close-on-exec;
//! whoever passes one to a child clears the flag on that descriptor alone.
//!
//! While the broker upgrades itself its control socket stays open, but other
//! restarts (a crash, a restart by a supervisor, multibinder's re-exec) leave a
//! moment with no socket file or no listener. The client therefore retries a
//! refused, reset or missing connection with a short backoff, for at most
//! [`RETRY_FOR`] in all; `bind` requests cut off before their reply are asked
//! again (asking twice for one socket yields the same socket).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::channel::{self, ReadError};
use crate::protocol::bind::BindParams;
use crate::protocol::framing::{FrameError, Framer};
use crate::protocol::{Method, Request, Response, RpcError};
use crate::spec::SocketSpec;

/// The largest reply the client reads: a `list` page or a `bind_many`
/// result of the broker's largest batch fits well within it.
pub const MAX_REPLY: usize = 16 * 1024 * 1024;
/// How long the client waits for a reply before giving up.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest the client keeps retrying a refused, reset or missing control
/// connection.
pub const RETRY_FOR: Duration = Duration::from_secs(2);
/// The first pause between retries; it doubles up to [`RETRY_MAX_DELAY`].
const RETRY_FIRST_DELAY: Duration = Duration::from_millis(5);
const RETRY_MAX_DELAY: Duration = Duration::from_millis(200);

/// Whether a method may be sent again when the connection broke before the
/// reply: doing it twice has the effect of doing it once.
fn idempotent(method: &str) -> bool {
    Method::parse(method).is_ok_and(Method::idempotent)
}

/// Whether a control connection failure is one an upgrade or restart of the
/// broker can cause, and so worth retrying.
fn retryable(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(e.kind(), ConnectionRefused | ConnectionReset | ConnectionAborted | NotFound | BrokenPipe | UnexpectedEof)
}

/// Bounded, growing pauses between retries.
struct Backoff {
    deadline: Instant,
    delay: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff { deadline: Instant::now() + RETRY_FOR, delay: RETRY_FIRST_DELAY }
    }

    /// Waits before the next try; false when the time is up.
    fn wait(&mut self) -> bool {
        if Instant::now() + self.delay > self.deadline {
            return false;
        }
        std::thread::sleep(self.delay);
        self.delay = (self.delay * 2).min(RETRY_MAX_DELAY);
        true
    }
}

/// Connects, retrying what [`retryable`] allows while `backoff` has time.
fn connect_retrying(path: &Path, backoff: &mut Backoff) -> io::Result<UnixStream> {
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(e) if retryable(&e) && backoff.wait() => log::debug!("{}: {e}; retrying", path.display()),
            Err(e) => return Err(e),
        }
    }
}

/// What went wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The control socket could not be reached.
    #[error("cannot connect to the broker at {path}: {source}")]
    Connect {
        /// The control socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Sending or receiving failed.
    #[error("talking to the broker at {path}: {source}")]
    Io {
        /// The control socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The reply is not a JSON-RPC response to our request.
    #[error("the broker at {path} sent an invalid reply: {detail}")]
    Protocol {
        /// The control socket path.
        path: PathBuf,
        /// What was wrong with it.
        detail: String,
    },
    /// The broker answered with an error. `what` is printed only when the
    /// broker's message does not already name it, so each fact shows once.
    #[error("{}", once(what, &error.to_string()))]
    Refused {
        /// What was asked for.
        what: String,
        /// The broker's error.
        error: RpcError,
    },
    /// A successful bind came without a descriptor.
    #[error("{what}: the broker reported success but attached no descriptor")]
    NoDescriptor {
        /// What was asked for.
        what: String,
    },
}

impl ClientError {
    /// The JSON-RPC error code, when the broker refused.
    pub fn code(&self) -> Option<i64> {
        match self {
            ClientError::Refused { error, .. } => Some(error.code),
            _ => None,
        }
    }
}

/// `context: text`, or `text` alone when it already says `context`.
pub(crate) fn once(context: &str, text: &str) -> String {
    if text.contains(context) {
        text.to_string()
    } else {
        format!("{context}: {text}")
    }
}

/// A connection to the broker's control socket.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    path: PathBuf,
    framer: Framer,
    next_id: u64,
}

impl Client {
    /// Connects to the control socket at `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let path = path.as_ref().to_path_buf();
        let stream = Client::open(&path, &mut Backoff::new())?;
        Ok(Client { stream, path, framer: Framer::new(MAX_REPLY), next_id: 1 })
    }

    fn open(path: &Path, backoff: &mut Backoff) -> Result<UnixStream, ClientError> {
        let stream =
            connect_retrying(path, backoff).map_err(|source| match crate::config::missing_runtime_dir(path) {
                Some(runtime) => ClientError::Connect {
                    path: path.into(),
                    source: io::Error::new(
                        source.kind(),
                        format!(
                            "{source}: XDG_RUNTIME_DIR={} does not exist (is the broker run by another user?)",
                            runtime.display()
                        ),
                    ),
                },
                None => ClientError::Connect { path: path.into(), source },
            })?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(|source| ClientError::Io { path: path.into(), source })?;
        Ok(stream)
    }

    /// Connects to the control socket named by the environment or the default.
    pub fn connect_default() -> Result<Client, ClientError> {
        Client::connect(crate::config::client_control_path())
    }

    /// The control socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the largest reply this client reads and how long it waits for
    /// one (and for a request to be written): the takeover's reply carries
    /// the whole state of a broker, beyond [`MAX_REPLY`].
    pub fn set_reply_limits(&mut self, max_reply: usize, timeout: Duration) -> Result<(), ClientError> {
        let io_err = |source| ClientError::Io { path: self.path.clone(), source };
        self.stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
        self.stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
        self.framer = Framer::new(max_reply);
        Ok(())
    }

    /// The pid of the process serving the control socket (SO_PEERCRED),
    /// when the kernel says.
    pub fn peer_pid(&self) -> Option<i32> {
        nix::sys::socket::getsockopt(&self.stream, nix::sys::socket::sockopt::PeerCredentials).ok().map(|c| c.pid())
    }

    /// Sends one request and waits for its reply; returns the result and the
    /// descriptors that came with it. A `bind` whose connection breaks before
    /// the reply is sent again on a new connection (see the module docs).
    pub fn call(&mut self, method: &str, params: Value) -> Result<(Value, Vec<OwnedFd>), ClientError> {
        let mut backoff = Backoff::new();
        loop {
            match self.call_once(method, params.clone()) {
                Err(ClientError::Io { source, .. }) if idempotent(method) && retryable(&source) && backoff.wait() => {
                    log::debug!("{}: {method}: {source}; asking again on a new connection", self.path.display());
                    // One budget for the whole call: reconnecting does not
                    // start a new window.
                    self.stream = Client::open(&self.path, &mut backoff)?;
                    self.framer = Framer::new(MAX_REPLY);
                }
                other => return other,
            }
        }
    }

    /// Like [`Client::call`], with descriptors attached to the request (for
    /// `adopt`); never sent twice.
    pub fn call_with_fds(
        &mut self,
        method: &str,
        params: Value,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Value, Vec<OwnedFd>), ClientError> {
        self.call_inner(method, params, fds)
    }

    fn call_once(&mut self, method: &str, params: Value) -> Result<(Value, Vec<OwnedFd>), ClientError> {
        self.call_inner(method, params, &[])
    }

    fn call_inner(
        &mut self,
        method: &str,
        params: Value,
        attach: &[BorrowedFd<'_>],
    ) -> Result<(Value, Vec<OwnedFd>), ClientError> {
        let id = Value::from(self.next_id);
        self.next_id += 1;
        let request = Request { id: id.clone(), method: method.to_string(), params };
        let io_err = |source| ClientError::Io { path: self.path.clone(), source };
        let bytes = request.to_json().into_bytes();
        channel::send(self.stream.as_fd(), bytes, attach).map_err(io_err)?;

        let (value, fds) = match channel::read_value(&self.stream, &mut self.framer) {
            Ok(got) => got,
            Err(ReadError::Io(source)) => return Err(ClientError::Io { path: self.path.clone(), source }),
            Err(ReadError::Closed) => {
                let source = io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before the reply");
                return Err(ClientError::Io { path: self.path.clone(), source });
            }
            // The framer speaks of requests (the broker's view); here it is
            // the broker's reply that outgrew the cap.
            Err(ReadError::Frame(FrameError::TooLarge(max))) => {
                return Err(self.protocol(format!("its reply is larger than the client's limit of {max} bytes")))
            }
            Err(ReadError::Frame(other)) => return Err(self.protocol(other.to_string())),
        };
        let response: Response = serde_json::from_value(value).map_err(|e| self.protocol(e.to_string()))?;
        if response.id != id {
            return Err(self.protocol(format!("reply to request {} while waiting for {id}", response.id)));
        }
        match (response.result, response.error) {
            (_, Some(error)) => Err(ClientError::Refused { what: method.to_string(), error }),
            (Some(result), None) => Ok((result, fds)),
            (None, None) => Err(self.protocol("neither result nor error".into())),
        }
    }

    /// Asks for the socket `spec` names; the broker creates it on first use.
    pub fn bind(&mut self, spec: &SocketSpec) -> Result<OwnedFd, ClientError> {
        self.bind_params(&BindParams::from_spec(spec), spec.to_string())
    }

    /// Asks for the socket the broker holds under `name`.
    pub fn bind_name(&mut self, name: &str) -> Result<OwnedFd, ClientError> {
        self.bind_params(&BindParams::from_name(name), format!("socket named '{name}'"))
    }

    /// Asks for many sockets in one round trip (method `bind_many`). Each
    /// entry is the socket or the broker's refusal for it, in order.
    pub fn bind_many(&mut self, specs: &[SocketSpec]) -> Result<Vec<Result<OwnedFd, RpcError>>, ClientError> {
        let params: Vec<Value> = specs
            .iter()
            .map(|s| serde_json::to_value(BindParams::from_spec(s)))
            .collect::<Result<_, _>>()
            .map_err(|e| self.protocol(e.to_string()))?;
        let (result, fds) = self.call(Method::BindMany.name(), Value::Array(params))?;
        let Value::Array(items) = result else {
            return Err(self.protocol("bind_many: the result is not an array".into()));
        };
        if items.len() != specs.len() {
            return Err(self.protocol(format!("bind_many: {} results for {} sockets", items.len(), specs.len())));
        }
        let ok = items.iter().filter(|i| i.get("ok").is_some()).count();
        if ok != fds.len() {
            return Err(self.protocol(format!("bind_many: {ok} successes but {} descriptors", fds.len())));
        }
        let mut fds = fds.into_iter();
        items
            .into_iter()
            .map(|item| match item.get("error") {
                Some(e) => serde_json::from_value(e.clone()).map(Err).map_err(|e| self.protocol(e.to_string())),
                None => Ok(Ok(fds.next().expect("counted above"))),
            })
            .collect()
    }

    /// Every held socket (method `list`), fetched page by page so that no
    /// reply is larger than one page, however many sockets the broker holds.
    /// A broker that predates paging answers with one array; its entries are
    /// taken as they are.
    pub fn list(&mut self) -> Result<Vec<crate::introspect::SocketInfo>, ClientError> {
        self.list_entries()?
            .into_iter()
            .map(|entry| serde_json::from_value(entry).map_err(|e| self.protocol(format!("list: {e}"))))
            .collect()
    }

    /// Every held socket as the broker describes it (fields this client does
    /// not know included), fetched page by page like [`Client::list`].
    pub fn list_entries(&mut self) -> Result<Vec<Value>, ClientError> {
        let mut all = Vec::new();
        let mut offset = 0usize;
        loop {
            let (value, _) = self.call(Method::List.name(), serde_json::json!({ "offset": offset }))?;
            let page: ListPage = match value {
                Value::Array(items) => ListPage {
                    // Skip the "more" marker a broker adds to an unpaged reply.
                    entries: items.into_iter().filter(|i| i.get("more").is_none()).collect(),
                    next: None,
                },
                other => serde_json::from_value(other).map_err(|e| self.protocol(format!("list: {e}")))?,
            };
            all.extend(page.entries);
            match page.next {
                // A cursor must move forward, or a confused broker would
                // keep the client looping.
                Some(next) if next > offset => offset = next,
                _ => return Ok(all),
            }
        }
    }

    /// The broker's metrics in the Prometheus text format (method `metrics`).
    pub fn metrics(&mut self) -> Result<String, ClientError> {
        let (value, _) = self.call(crate::metrics::METHOD, Value::Null)?;
        match value.get("text").and_then(Value::as_str) {
            Some(text) => Ok(text.to_string()),
            None => Err(self.protocol("metrics: the result has no \"text\"".into())),
        }
    }

    /// Makes the broker close its copy of a socket it created on demand.
    pub fn release(&mut self, spec: &SocketSpec) -> Result<(), ClientError> {
        self.call(Method::Release.name(), BindParams::from_spec(spec).to_json()).map(drop).map_err(|e| match e {
            ClientError::Refused { error, .. } => ClientError::Refused { what: spec.to_string(), error },
            other => other,
        })
    }

    fn bind_params(&mut self, params: &BindParams, what: String) -> Result<OwnedFd, ClientError> {
        let (_, fds) = self.call(Method::Bind.name(), params.to_json()).map_err(|e| match e {
            ClientError::Refused { error, .. } => ClientError::Refused { what: what.clone(), error },
            other => other,
        })?;
        fds.into_iter().next().ok_or(ClientError::NoDescriptor { what })
    }

    fn protocol(&self, detail: String) -> ClientError {
        ClientError::Protocol { path: self.path.clone(), detail }
    }
}

/// One page of `list`.
#[derive(Debug, serde::Deserialize)]
struct ListPage {
    entries: Vec<Value>,
    #[serde(default)]
    next: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fd;
    use crate::protocol::code;

    #[test]
    fn a_refusal_names_the_socket_once() {
        let spec = "tcp://127.0.0.1:8082";
        let denied = RpcError::new(
            code::ACCESS_DENIED,
            format!("uid 101 (haproxy) may not bind {spec}: no [[allow]] rule grants it"),
        );
        let e = ClientError::Refused { what: spec.into(), error: denied };
        assert_eq!(e.to_string().matches(spec).count(), 1, "{e}");
        let other = RpcError::new(code::BIND_FAILED, "Could not bind: Address already in use");
        let e = ClientError::Refused { what: spec.into(), error: other };
        assert!(e.to_string().starts_with(&format!("{spec}: Could not bind")), "{e}");
    }
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    /// A bind whose connection is closed before the reply is asked again on
    /// a new connection, and succeeds.
    #[test]
    fn bind_cut_off_before_its_reply_is_asked_again() {
        let dir = std::env::temp_dir().join(format!("sockbroker-client-retry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            // First connection: read the request, hang up without answering.
            let (mut first, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = first.read(&mut buf).unwrap();
            drop(first);
            // Second: answer with a descriptor, as the broker does.
            let (second, _) = listener.accept().unwrap();
            let n = (&second).read(&mut buf).unwrap();
            let request: Value = serde_json::from_slice(&buf[..n]).unwrap();
            assert_eq!(request["method"], "bind");
            let (payload, _keep) = UnixStream::pair().unwrap();
            let reply = Response::ok(request["id"].clone(), Value::Bool(true)).to_bytes();
            fd::send_with_fds(second.as_fd(), &reply, &[payload.as_fd()]).unwrap();
            fd::inode(payload.as_fd()).unwrap()
        });
        let mut client = Client::connect(&path).unwrap();
        let got = client.bind(&"tcp://127.0.0.1:9".parse().unwrap()).unwrap();
        assert_eq!(fd::inode(got.as_fd()).unwrap(), server.join().unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// With nobody listening, connecting gives up after the retry window with
    /// the cause, instead of hanging.
    #[test]
    fn gives_up_on_a_missing_socket() {
        let path = std::env::temp_dir().join(format!("sockbroker-client-missing-{}.sock", std::process::id()));
        let err = Client::connect(&path).unwrap_err();
        match err {
            ClientError::Connect { source, .. } => assert_eq!(source.kind(), io::ErrorKind::NotFound),
            other => panic!("{other}"),
        }
    }
}
