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

use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::fd;
use crate::protocol::bind::BindParams;
use crate::protocol::framing::Framer;
use crate::protocol::{Request, Response, RpcError};
use crate::spec::SocketSpec;

/// How long the client waits for a reply before giving up.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// The broker answered with an error.
    #[error("{what}: {error}")]
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
        let stream =
            UnixStream::connect(&path).map_err(|source| ClientError::Connect { path: path.clone(), source })?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(|source| ClientError::Io { path: path.clone(), source })?;
        Ok(Client { stream, path, framer: Framer::default(), next_id: 1 })
    }

    /// Connects to the control socket named by the environment or the default.
    pub fn connect_default() -> Result<Client, ClientError> {
        Client::connect(crate::config::client_control_path())
    }

    /// The control socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request and waits for its reply; returns the result and the
    /// descriptors that came with it.
    pub fn call(&mut self, method: &str, params: Value) -> Result<(Value, Vec<OwnedFd>), ClientError> {
        let id = Value::from(self.next_id);
        self.next_id += 1;
        let request = Request { id: id.clone(), method: method.to_string(), params };
        let io_err = |source| ClientError::Io { path: self.path.clone(), source };
        (&self.stream).write_all(request.to_json().as_bytes()).map_err(io_err)?;

        let mut fds = Vec::new();
        let value = loop {
            if let Some(next) = self.framer.next_value() {
                break next.map_err(|e| self.protocol(e.to_string()))?;
            }
            let mut buf = [0u8; 4096];
            let got = fd::recv_with_fds(self.stream.as_fd(), &mut buf)
                .map_err(|source| ClientError::Io { path: self.path.clone(), source })?;
            fds.extend(got.fds);
            if got.len == 0 {
                return Err(self.protocol("connection closed before the reply".into()));
            }
            self.framer.push(&buf[..got.len]);
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
        let (result, fds) = self.call("bind_many", Value::Array(params))?;
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

    /// Makes the broker close its copy of a socket it created on demand.
    pub fn release(&mut self, spec: &SocketSpec) -> Result<(), ClientError> {
        self.call("release", BindParams::from_spec(spec).to_json()).map(drop).map_err(|e| match e {
            ClientError::Refused { error, .. } => ClientError::Refused { what: spec.to_string(), error },
            other => other,
        })
    }

    fn bind_params(&mut self, params: &BindParams, what: String) -> Result<OwnedFd, ClientError> {
        let (_, fds) = self.call("bind", params.to_json()).map_err(|e| match e {
            ClientError::Refused { error, .. } => ClientError::Refused { what: what.clone(), error },
            other => other,
        })?;
        fds.into_iter().next().ok_or(ClientError::NoDescriptor { what })
    }

    fn protocol(&self, detail: String) -> ClientError {
        ClientError::Protocol { path: self.path.clone(), detail }
    }
}
