//! The control socket itself: its path (made absolute once, by
//! [`ControlSocket::absolute`], before anything compares or binds it), its
//! folder (a private `/tmp/sockbroker-UID` must be ours), the mode it is born
//! with, and its removal on exit only while the file is still the one this
//! broker made. A stale socket file is replaced and a live one (or another
//! file) refused by the one check every UNIX path goes through, in
//! [`socket::open`]. The loop that serves it is [`super::Server`].

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::sys::stat::{umask, Mode};

use crate::socket::{self, OpenError};
use crate::spec::{SocketKey, SocketSpec, SpecError};

/// Backlog of the control socket: generous, so a burst of clients during a
/// mass restart is queued by the kernel rather than refused.
const CONTROL_BACKLOG: u32 = 4096;

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
    /// Another broker listens on the path, or a non-socket file (or a link)
    /// is there: what the stale-socket check of [`socket::open`] refused.
    #[error("{0} (is another broker running? stop it, or pass another --control path)")]
    InUse(#[source] OpenError),
    /// The socket could not be created.
    #[error("control socket: {0}")]
    Open(#[source] OpenError),
}

/// The control socket: a listening UNIX socket at a path, removed again when
/// dropped if it is still ours.
#[derive(Debug)]
pub struct ControlSocket {
    pub(super) listener: UnixListener,
    pub(super) path: PathBuf,
    /// Inode of the socket file we made; `None` when the file is not ours to
    /// remove (a socket passed by systemd).
    owned_inode: Option<u64>,
}

impl ControlSocket {
    /// The control path as the broker uses it everywhere: absolute (against
    /// the working directory), links not resolved.
    pub fn absolute(path: &Path) -> Result<PathBuf, ControlError> {
        std::path::absolute(path).map_err(|source| ControlError::Dir { path: path.into(), source })
    }

    /// Creates the control socket at `path` (absolute: see
    /// [`ControlSocket::absolute`]) with mode `mode`, creating its folder. A
    /// stale socket file is replaced; a live one, or any other file, is an
    /// error.
    pub fn bind(path: &Path, mode: u32) -> Result<ControlSocket, ControlError> {
        let path = path.to_path_buf();
        let key = SocketKey::unix(crate::spec::UnixKind::Stream, &path.to_string_lossy())
            .map_err(|source| ControlError::Address { path: path.clone(), source })?;
        if let Some(dir) = path.parent() {
            prepare_dir(dir)?;
        }
        let mut spec = SocketSpec::new(key);
        spec.options.backlog = CONTROL_BACKLOG;
        // The socket file is created with its final mode (no chmod after bind,
        // which would leave a window with the default mode). umask is
        // process-wide: this runs at start-up, before any other thread.
        let old = umask(Mode::from_bits_truncate(!mode & 0o777));
        let opened = socket::open(&spec);
        umask(old);
        let fd = opened.map_err(|e| match in_use(e) {
            Ok(taken) => ControlError::InUse(taken),
            Err(e) => ControlError::Open(e),
        })?;
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

/// Whether an open error is the stale-socket check refusing what is at the
/// path (a live socket, another file, a link): then it is [`ControlError::InUse`].
fn in_use(e: OpenError) -> Result<OpenError, OpenError> {
    if e.step == socket::Step::ClearPath && e.source.kind() == io::ErrorKind::AddrInUse {
        Ok(e)
    } else {
        Err(e)
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
