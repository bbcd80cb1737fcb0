//! The only place where the broker makes sockets.
//!
//! [`open`] turns a [`SocketSpec`] into a bound (and, for stream kinds,
//! listening) socket. The descriptor is created with `SOCK_CLOEXEC` and owned
//! at once, so an error at any later step closes it. [`clear_stale_unix_path`]
//! is the one rule for reusing a UNIX socket path, shared by the control socket
//! and brokered UNIX sockets: a path is replaced only when it is a socket that
//! nobody listens on, and never when it is anything else.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage, UnixAddr,
};

use crate::spec::{SocketKey, SocketSpec, Transport, UnixAddress, UnixKind};

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

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // bind() failures read exactly as multibinder's do:
        // "tcp://127.0.0.1:80: Permission denied (os error 13)".
        match self.step {
            Step::Bind => write!(f, "{}: {}", self.key, self.source),
            step => write!(f, "{}: {}: {}", self.key, step, self.source),
        }
    }
}

/// Why a UNIX socket path could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// Something other than a socket is at the path; it is never removed.
    #[error("{0}: exists and is not a socket; refusing to remove it")]
    NotASocket(PathBuf),
    /// A process accepts connections on the path.
    #[error("{0}: a live socket is already listening there")]
    Live(PathBuf),
    /// The path could not be examined or removed.
    #[error("{path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl PathError {
    /// The error as an `io::Error` with a fitting kind, for callers that
    /// report I/O errors.
    pub fn into_io(self) -> io::Error {
        let kind = match &self {
            PathError::NotASocket(_) | PathError::Live(_) => io::ErrorKind::AddrInUse,
            PathError::Io { source, .. } => source.kind(),
        };
        io::Error::new(kind, self)
    }
}

/// Makes a UNIX socket path free for `bind()`: nothing there is fine; a socket
/// that refuses connections (left by a dead process) is removed; a live socket
/// or any other kind of file is an error and is left alone.
pub fn clear_stale_unix_path(path: &Path) -> Result<(), PathError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(PathError::Io { path: path.into(), source }),
    };
    if !meta.file_type().is_socket() {
        return Err(PathError::NotASocket(path.into()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(PathError::Live(path.into())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("{}: removing stale socket (nobody listens on it)", path.display());
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(PathError::Io { path: path.into(), source }),
            }
        }
        Err(source) => Err(PathError::Io { path: path.into(), source }),
    }
}

/// Creates, binds and (for stream kinds) listens on the socket `spec` names.
///
/// TCP sockets get `SO_REUSEADDR`, as multibinder's did, so a restart of a
/// machine-wide service does not wait out TIME_WAIT.
pub fn open(spec: &SocketSpec) -> Result<OwnedFd, OpenError> {
    let key = &spec.key;
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
            if *transport == Transport::Tcp {
                setsockopt(&fd, sockopt::ReuseAddr, &true)
                    .map_err(errno)
                    .map_err(fail(Step::SetOption("SO_REUSEADDR")))?;
            }
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
            let sa = match address {
                UnixAddress::Path(path) => {
                    clear_stale_unix_path(path).map_err(PathError::into_io).map_err(fail(Step::ClearPath))?;
                    UnixAddr::new(path.as_os_str().as_bytes())
                }
                UnixAddress::Abstract(name) => UnixAddr::new_abstract(name.as_bytes()),
            }
            .map_err(errno)
            .map_err(fail(Step::Bind))?;
            bind(fd.as_raw_fd(), &sa).map_err(errno).map_err(fail(Step::Bind))?;
            fd
        }
    };
    if key.is_listening_kind() {
        listen(fd.as_fd(), spec.options.backlog).map_err(fail(Step::Listen))?;
    }
    Ok(fd)
}

/// `listen()` with any backlog: nix's `Backlog` refuses values above the
/// libc `SOMAXCONN` constant, but the kernel itself caps the value at
/// `net.core.somaxconn`, which administrators raise for busy listeners.
fn listen(fd: BorrowedFd<'_>, backlog: u32) -> io::Result<()> {
    let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
    // SAFETY: `fd` is a valid open descriptor for the duration of the call and
    // listen() takes no pointers.
    let rc = unsafe { nix::libc::listen(fd.as_raw_fd(), backlog) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_removes_a_regular_file() {
        let dir = std::env::temp_dir().join(format!("sockbroker-socket-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("plain");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(clear_stale_unix_path(&file), Err(PathError::NotASocket(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

        let live = dir.join("live.sock");
        let _l = std::os::unix::net::UnixListener::bind(&live).unwrap();
        assert!(matches!(clear_stale_unix_path(&live), Err(PathError::Live(_))));

        let stale = dir.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        clear_stale_unix_path(&stale).unwrap();
        assert!(!stale.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
