//! Adoption: copying live sockets out of a process that holds them, so the
//! broker holds the *same kernel sockets* (same inode, same accept queue)
//! without a moment where nobody listens.
//!
//! Three ways in, one way to the broker:
//! - [`copy_from_pid`] (`sockbroker adopt --pid PID`, run by root): lists
//!   `/proc/PID/fd`, copies each socket with `pidfd_open` + `pidfd_getfd`
//!   ([`crate::fd`]) and keeps those that are listening (stream, seqpacket) or
//!   bound and unconnected (datagram), identified by [`socket::inspect`];
//! - [`copy_from_multibinder`] (`sockbroker adopt --multibinder SOCK
//!   --from-templates …`, no privilege): asks a running multibinder for each
//!   `bind_tcp` of the templates through its own `bind` method;
//! - [`find_holders`] (`serve --adopt-orphans`): finds, for declared sockets
//!   the broker cannot bind, a process that holds a socket with that address
//!   (`/proc/net/{tcp,tcp6,udp,udp6,unix}` give the inode of the socket bound
//!   there, `/proc/*/fd` the processes that have `socket:[inode]` open), and
//!   copies it with [`copy_one`].
//!
//! The first two hand the copies to the running broker with the control
//! method `adopt` ([`Client::adopt`]): the broker itself needs no
//! CAP_SYS_PTRACE; it checks each received descriptor is a socket it
//! supports and derives its key from the socket alone. Only the recovery
//! path copies inside the broker, and so needs CAP_SYS_PTRACE there.
//!
//! Submodules: `pidfd` (copies by pid), `from_multibinder` (copies through
//! multibinder's `bind`), `orphans` (finds holders, recovers declared
//! sockets). This file holds what they share: the wanted and copied
//! sockets, the errors, and the `adopt` method's params and answers.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::client::{Client, ClientError};
use crate::fd;
use crate::haproxy::template::TemplateError;
use crate::socket::InspectError;
use crate::spec::{SocketKey, SpecError};

mod from_multibinder;
mod orphans;
mod pidfd;

pub use from_multibinder::copy_from_multibinder;
pub use orphans::{adopt_orphans, bound_sockets, find_holders, Holders};
pub use pidfd::{adoptable, copy_from_pid, copy_one, why_not_permitted};

/// The control method that hands copied sockets to the broker.
pub const METHOD: &str = crate::protocol::Method::Adopt.name();

/// One socket to adopt, as named on the command line: `SPEC` or `NAME=SPEC`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The name the broker will hold it under.
    pub name: Option<String>,
    /// The socket.
    pub key: SocketKey,
}

impl FromStr for Wanted {
    type Err = SpecError;
    fn from_str(text: &str) -> Result<Self, SpecError> {
        // A spec never contains '=' before its scheme's "://" or ':'.
        match text.split_once('=') {
            Some((name, spec)) if !name.contains(':') && !name.is_empty() => {
                Ok(Wanted { name: Some(name.to_string()), key: spec.parse()? })
            }
            _ => Ok(Wanted { name: None, key: text.parse()? }),
        }
    }
}

/// A socket copied out of another process.
#[derive(Debug)]
pub struct Copied {
    /// Our copy (close-on-exec): the same kernel socket as the holder's.
    pub fd: OwnedFd,
    /// Its identity, read from the socket.
    pub key: SocketKey,
    /// Where it was copied from: `pid 123 fd 5`, `multibinder /run/mb.sock`.
    pub from: String,
    /// The name to hold it under.
    pub name: Option<String>,
}

/// Why sockets could not be copied out of a process.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// No process has this pid.
    #[error("pid {0}: no such process")]
    NoSuchProcess(i32),
    /// The kernel refused access to the process's descriptors.
    #[error("pid {pid}: not permitted to copy its descriptors: {why}")]
    NotPermitted {
        /// The process.
        pid: i32,
        /// What is missing, as far as it can be told (Yama, CAP_SYS_PTRACE).
        why: String,
    },
    /// The kernel has no `pidfd_open` / `pidfd_getfd`.
    #[error("{call}: not supported by this kernel (Linux 5.6 or later is needed to copy sockets out of a process): {source}")]
    Unsupported {
        /// The system call.
        call: &'static str,
        /// ENOSYS.
        #[source]
        source: io::Error,
    },
    /// The process holds no socket the broker could adopt.
    #[error("pid {pid}: no listening socket (looked at {sockets} sockets: {detail})")]
    NoListeningSocket {
        /// The process.
        pid: i32,
        /// How many sockets it has.
        sockets: usize,
        /// Why each was skipped, shortened.
        detail: String,
    },
    /// A socket asked for by `--socket` is not among the process's.
    #[error("{key}: pid {pid} holds no such socket (it holds: {held})")]
    NotHeld {
        /// The socket asked for.
        key: SocketKey,
        /// The process.
        pid: i32,
        /// What it holds.
        held: String,
    },
    /// Reading /proc failed.
    #[error("{path}: {source}")]
    Proc {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Copying one descriptor failed.
    #[error("pid {pid} fd {fd}: pidfd_getfd: {source}")]
    Copy {
        /// The process.
        pid: i32,
        /// Its descriptor.
        fd: RawFd,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The copied descriptor is not the socket it was expected to be.
    #[error("{from}: {source}")]
    Inspect {
        /// Where it was copied from: `pid 123 fd 5`, `multibinder PATH`.
        from: String,
        /// Why it is not the expected socket.
        #[source]
        source: InspectError,
    },
    /// A template could not be read.
    #[error("{path}: {source}")]
    Template {
        /// The template.
        path: PathBuf,
        /// The cause.
        #[source]
        source: TemplateIoError,
    },
    /// The templates hold no `bind_tcp` call.
    #[error("the templates hold no bind_tcp(...) call: nothing to copy from multibinder")]
    NoBinds,
    /// multibinder (or the broker) refused or could not be reached.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// multibinder answered a bind without a descriptor.
    #[error("{0}: multibinder answered without a descriptor")]
    NoDescriptor(SocketKey),
}

/// A template that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum TemplateIoError {
    /// Reading the file.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// Its syntax.
    #[error(transparent)]
    Syntax(#[from] TemplateError),
}

/// How the broker answered for one adopted socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adopted {
    /// The socket's key.
    pub key: SocketKey,
    /// Its inode.
    pub inode: u64,
    /// `adopted`, or `already-held` when the broker held that very socket.
    pub outcome: Outcome,
}

/// What `adopt` did with one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The broker holds it now.
    Adopted,
    /// The broker already held this very socket (same inode): nothing changed.
    AlreadyHeld,
}

/// One entry of the `adopt` params; the descriptors travel with the request,
/// in the same order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptItem {
    /// The name to hold the socket under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where it comes from, for the broker's log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

impl Client {
    /// Hands copied sockets to the broker (method `adopt`; root or the
    /// broker's user only). The broker answers for each, in order.
    pub fn adopt(&mut self, sockets: &[Copied]) -> Result<Vec<Adopted>, ClientError> {
        // One request per SCM_RIGHTS message's worth of descriptors.
        if sockets.len() > fd::SCM_MAX_FD {
            let mut all = Vec::with_capacity(sockets.len());
            for chunk in sockets.chunks(fd::SCM_MAX_FD) {
                all.extend(self.adopt(chunk)?);
            }
            return Ok(all);
        }
        let items: Vec<AdoptItem> =
            sockets.iter().map(|c| AdoptItem { name: c.name.clone(), from: Some(c.from.clone()) }).collect();
        let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|c| c.fd.as_fd()).collect();
        let (result, _) = self.call_with_fds(METHOD, json!({ "sockets": items }), &fds)?;
        serde_json::from_value::<Vec<Adopted>>(result.clone()).map_err(|e| ClientError::Protocol {
            path: self.path().to_path_buf(),
            detail: format!("adopt: unexpected result {result}: {e}"),
        })
    }
}

/// Parses the `adopt` params.
pub fn parse_params(params: &Value) -> Result<Vec<AdoptItem>, String> {
    let items = params.get("sockets").ok_or("\"sockets\" (an array) is required")?;
    serde_json::from_value(items.clone()).map_err(|e| format!("\"sockets\": {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_forms() {
        let w: Wanted = "web=tcp://127.0.0.1:80".parse().unwrap();
        assert_eq!(w.name.as_deref(), Some("web"));
        assert_eq!(w.key.to_string(), "tcp://127.0.0.1:80");
        let w: Wanted = "unix:/run/a=b.sock".parse().unwrap();
        assert_eq!((w.name, w.key.to_string()), (None, "unix:/run/a=b.sock".to_string()));
        assert!("web=nonsense".parse::<Wanted>().is_err());
    }
}
