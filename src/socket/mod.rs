//! The only place where the broker makes sockets.
//!
//! [`open`] turns a [`SocketSpec`] into a bound (and, for stream kinds,
//! listening) socket. The descriptor is created with `SOCK_CLOEXEC` and owned
//! at once, so an error at any later step closes it. [`clear_stale_unix_path`]
//! is the one rule for reusing a UNIX socket path, shared by the control socket
//! and brokered UNIX sockets: a path is replaced only when it is a socket that
//! nobody listens on, and never when it is anything else.
//!
//! Submodules: `unix_path` (stale files, folders reached without links),
//! `options` (set before `bind()`, read back from the kernel), `inspect`
//! (the key of a socket the broker did not make).

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::socket::{bind, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage, UnixAddr};

use crate::spec::{SocketKey, SocketSpec, Transport, UnixAddress, UnixKind};

mod inspect;
mod options;
mod unix_path;

pub use inspect::{inspect, is_connected, InspectError};
pub use options::{accept_queue, get_int_option, read_options, set_int_option};
pub use unix_path::{clear_stale_unix_path, open_folder, FileId, PathError};

use options::{apply_inet_options, listen, set_buffer};
use unix_path::bind_unix_path;

/// The step of opening a socket that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `socket()`.
    Create,
    /// Setting the named socket option.
    SetOption(&'static str),
    /// Making room for a UNIX socket path.
    ClearPath,
    /// `bind()`.
    Bind,
    /// `listen()`.
    Listen,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Create => f.write_str("socket()"),
            Step::SetOption(name) => write!(f, "setting {name}"),
            Step::ClearPath => f.write_str("replacing the socket path"),
            Step::Bind => f.write_str("bind()"),
            Step::Listen => f.write_str("listen()"),
        }
    }
}

/// A socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub struct OpenError {
    /// The socket that was asked for.
    pub key: SocketKey,
    /// What failed.
    pub step: Step,
    /// The kernel's reason.
    #[source]
    pub source: io::Error,
}

impl OpenError {
    /// What failed, without the key: for a message that names the socket
    /// already (a log line about a request for it).
    pub fn cause(&self) -> String {
        match self.step {
            Step::Bind => self.source.to_string(),
            step => format!("{step}: {}", self.source),
        }
    }
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // bind() failures read exactly as multibinder's do:
        // "tcp://127.0.0.1:80: Permission denied (os error 13)".
        write!(f, "{}: {}", self.key, self.cause())
    }
}

/// Creates, binds and (for stream kinds) listens on the socket `spec` names.
///
/// TCP sockets get `SO_REUSEADDR` unless the options say otherwise, as
/// multibinder's did, so a restart of a machine-wide service does not wait out
/// TIME_WAIT. The other [`SocketOptions`] are set before `bind()` (so
/// `IP_FREEBIND`, `SO_REUSEPORT` and `SO_BINDTODEVICE` take effect for it); a
/// UNIX socket file is created with its mode, then given its owner and group.
pub fn open(spec: &SocketSpec) -> Result<OwnedFd, OpenError> {
    open_checked(spec, &|_| true).map(|(fd, _)| fd)
}

/// [`open`], deciding whether a stale socket file found at a UNIX path may be
/// replaced: `may_replace` is asked with the file's identity, and a refusal
/// leaves the file alone and fails with `EADDRINUSE`. Returns the identity
/// of the socket file it created, for UNIX paths.
pub fn open_checked(
    spec: &SocketSpec,
    may_replace: &dyn Fn(FileId) -> bool,
) -> Result<(OwnedFd, Option<FileId>), OpenError> {
    let key = &spec.key;
    let mut file = None;
    let fail = |step| move |source: io::Error| OpenError { key: key.clone(), step, source };
    let errno = |e: nix::Error| io::Error::from(e);

    let fd = match key {
        SocketKey::Inet { transport, addr } => {
            let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
            let ty = match transport {
                Transport::Tcp => SockType::Stream,
                Transport::Udp => SockType::Datagram,
            };
            let fd = socket(family, ty, SockFlag::SOCK_CLOEXEC, None).map_err(errno).map_err(fail(Step::Create))?;
            apply_inet_options(fd.as_fd(), *transport, addr.is_ipv6(), &spec.options)
                .map_err(|(name, source)| fail(Step::SetOption(name))(source))?;
            let sa = SockaddrStorage::from(*addr);
            bind(fd.as_raw_fd(), &sa).map_err(errno).map_err(fail(Step::Bind))?;
            fd
        }
        SocketKey::Unix { kind, address } => {
            let ty = match kind {
                UnixKind::Stream => SockType::Stream,
                UnixKind::Datagram => SockType::Datagram,
                UnixKind::SeqPacket => SockType::SeqPacket,
            };
            let fd = socket(AddressFamily::Unix, ty, SockFlag::SOCK_CLOEXEC, None)
                .map_err(errno)
                .map_err(fail(Step::Create))?;
            if let Some(size) = spec.options.receive_buffer {
                set_buffer(fd.as_fd(), sockopt::RcvBuf, size).map_err(fail(Step::SetOption("SO_RCVBUF")))?;
            }
            if let Some(size) = spec.options.send_buffer {
                set_buffer(fd.as_fd(), sockopt::SndBuf, size).map_err(fail(Step::SetOption("SO_SNDBUF")))?;
            }
            match address {
                UnixAddress::Path(path) => {
                    let created = bind_unix_path(fd.as_fd(), path, &spec.options, may_replace)
                        .map_err(|(step, source)| fail(step)(source))?;
                    file = Some(created);
                }
                UnixAddress::Abstract(name) => {
                    let sa = UnixAddr::new_abstract(name.as_bytes()).map_err(errno).map_err(fail(Step::Bind))?;
                    bind(fd.as_raw_fd(), &sa).map_err(errno).map_err(fail(Step::Bind))?;
                }
            }
            fd
        }
    };
    if key.is_listening_kind() {
        listen(fd.as_fd(), spec.options.backlog).map_err(fail(Step::Listen))?;
    }
    Ok((fd, file))
}
