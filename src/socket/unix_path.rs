//! UNIX socket paths: the one rule for reusing a path
//! ([`clear_stale_unix_path`]: replaced only when it is a socket nobody
//! listens on, never when it is anything else), and binding at a path whose
//! folder is reached without following links ([`open_folder`]), so the folder
//! the socket lands in is the one the allow rules judged. [`super::open`]
//! calls [`bind_unix_path`]; the control socket calls
//! [`clear_stale_unix_path`].

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use nix::sys::stat::{umask, Mode};

use super::Step;
use crate::spec::SocketOptions;

/// Why a UNIX socket path could not be used. Displayed as `PATH: REASON`;
/// inside an [`super::OpenError`], whose key already names the path, only
/// the reason is given ([`PathError::into_io`]), so the path is said once.
#[derive(Debug)]
pub enum PathError {
    /// Something other than a socket is at the path; it is never removed.
    NotASocket(PathBuf),
    /// A symbolic link squats the path (someone may want the socket made
    /// where it points); it is never followed nor removed.
    Symlink {
        /// The socket path.
        path: PathBuf,
        /// Where the link points.
        target: PathBuf,
    },
    /// A process accepts connections on the path.
    Live(PathBuf),
    /// A stale socket file the broker did not create, and no rule for this
    /// exact path allows replacing it.
    NotOurs(PathBuf),
    /// The path could not be examined or removed.
    Io {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

impl PathError {
    /// The socket path.
    pub fn path(&self) -> &Path {
        match self {
            PathError::NotASocket(path) | PathError::Live(path) | PathError::NotOurs(path) => path,
            PathError::Symlink { path, .. } | PathError::Io { path, .. } => path,
        }
    }

    /// What is wrong at the path, without naming it.
    pub fn reason(&self) -> String {
        match self {
            PathError::NotASocket(_) => "exists and is not a socket; refusing to remove it".into(),
            PathError::Symlink { target, .. } => {
                format!("is a symbolic link (to {}), not a socket; refusing to follow or remove it", target.display())
            }
            PathError::Live(_) => "a live socket is already listening there".into(),
            PathError::NotOurs(_) => "a socket file the broker did not create is there; refusing to replace it \
                                      (an allow rule naming this exact path permits it)"
                .into(),
            PathError::Io { source, .. } => source.to_string(),
        }
    }

    /// The error as an `io::Error` with a fitting kind and the reason alone
    /// (for an [`super::OpenError`], whose key names the path already).
    pub fn into_io(self) -> io::Error {
        let kind = match &self {
            PathError::NotASocket(_) | PathError::Symlink { .. } | PathError::Live(_) | PathError::NotOurs(_) => {
                io::ErrorKind::AddrInUse
            }
            PathError::Io { source, .. } => source.kind(),
        };
        io::Error::new(kind, self.reason())
    }
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path().display(), self.reason())
    }
}

impl std::error::Error for PathError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PathError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Makes a UNIX socket path free for `bind()`: nothing there is fine; a socket
/// that refuses connections (left by a dead process) is removed; a live socket
/// or any other kind of file is an error and is left alone. The same check as
/// a brokered socket's ([`bind_unix_path`]), with every stale file replaceable.
pub fn clear_stale_unix_path(path: &Path) -> Result<(), PathError> {
    use nix::fcntl::{openat, OFlag, AT_FDCWD};
    let io_err = |source: io::Error| PathError::Io { path: path.into(), source };
    let (dir, name) = split_path(path).map_err(io_err)?;
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let dirfd = match openat(AT_FDCWD, dir, flags, Mode::empty()) {
        Ok(fd) => fd,
        // No folder, so no file: nothing to clear (bind() says what is missing).
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(io_err(e.into())),
    };
    let sa = UnixAddr::new(path.as_os_str().as_bytes()).map_err(|e| io_err(e.into()))?;
    clear_stale_at(dirfd.as_fd(), name, path, &sa, &|_| true)
}

/// A file, by device and inode: how the broker recognises the socket files
/// it created itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

/// Opens the folder of a UNIX socket path so that the folder the socket
/// goes into is the one the path's text names, which is what the allow rules
/// judged, and stays so until the socket is bound:
///
/// - no symbolic link is followed anywhere on the way (each component is
///   opened with `O_NOFOLLOW`; a link is refused, naming it);
/// - no component of the folder's path may be moved or replaced by anyone
///   but root and the broker's user: its parent folder must belong to one of
///   them and not be writable by group or others, unless it is sticky
///   (`/tmp`) and the component belongs to one of them.
///
/// The first rule defeats a link planted in a folder a peer owns; the second
/// a folder swapped for a link between this check and `bind()`, which takes
/// the path's text (the address clients and `getsockname()` see).
pub fn open_folder(dir: &Path) -> io::Result<OwnedFd> {
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::{fstat, FileStat};
    use std::path::Component;
    let me = nix::unistd::geteuid().as_raw();
    let trusted = |uid: u32| uid == 0 || uid == me;
    let refuse = |why: String| io::Error::new(io::ErrorKind::PermissionDenied, why);
    let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut cur =
        openat(nix::fcntl::AT_FDCWD, "/", flags | OFlag::O_DIRECTORY, Mode::empty()).map_err(io::Error::from)?;
    let mut walked = PathBuf::from("/");
    let mut parent: FileStat = fstat(cur.as_fd()).map_err(io::Error::from)?;
    for comp in dir.components() {
        let name = match comp {
            Component::RootDir | Component::CurDir => continue,
            Component::Normal(name) => name,
            Component::ParentDir | Component::Prefix(_) => {
                return Err(refuse(format!("{}: '..' is not allowed in a socket's folder", dir.display())))
            }
        };
        let next = openat(cur.as_fd(), name, flags, Mode::empty()).map_err(|e| {
            io::Error::new(io::Error::from(e).kind(), format!("{}: {}", walked.join(name).display(), e.desc()))
        })?;
        let st = fstat(next.as_fd()).map_err(io::Error::from)?;
        let here = walked.join(name);
        match st.st_mode & nix::libc::S_IFMT {
            nix::libc::S_IFDIR => {}
            nix::libc::S_IFLNK => {
                let target = std::fs::read_link(&here).map(|t| format!(" (to {})", t.display())).unwrap_or_default();
                return Err(refuse(format!(
                    "{} is a symbolic link{target}; socket folders are resolved without following links",
                    here.display()
                )));
            }
            _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not a folder", here.display()))),
        }
        let sticky = parent.st_mode & nix::libc::S_ISVTX != 0;
        let shared = parent.st_mode & 0o022 != 0;
        let movable = !trusted(parent.st_uid) || (shared && !(sticky && trusted(st.st_uid)));
        if movable {
            let who = if trusted(parent.st_uid) {
                "users other than root".to_string()
            } else {
                format!("uid {}", parent.st_uid)
            };
            return Err(refuse(format!(
                "{}: its folder {} can be changed by {who}, who could swap it for a link; put sockets in a folder whose path only root (or the broker's user) controls",
                here.display(),
                walked.display()
            )));
        }
        cur = next;
        parent = st;
        walked = here;
    }
    // O_PATH|O_NOFOLLOW of the last component is the folder itself (checked
    // above to be a folder), usable as a base for *at() calls.
    Ok(cur)
}

/// The folder and file name of a socket path: the name must be a plain
/// name (not `..`, not empty).
fn split_path(path: &Path) -> io::Result<(&Path, &std::ffi::OsStr)> {
    // The caller's key names the path: say only what is wrong with it.
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, "not a path to a file");
    let name = path.file_name().ok_or_else(bad)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("/"));
    if path.as_os_str().as_bytes().ends_with(b"/") || path.ends_with("..") {
        return Err(bad());
    }
    Ok((dir, name))
}

/// Binds `fd` at `path`: the folder is opened without following links
/// ([`open_folder`]), a stale socket file is replaced only when `may_replace`
/// says so, and the new file gets its mode (at creation) and owner.
pub(super) fn bind_unix_path(
    fd: BorrowedFd<'_>,
    path: &Path,
    options: &SocketOptions,
    may_replace: &dyn Fn(FileId) -> bool,
) -> Result<FileId, (Step, io::Error)> {
    use nix::fcntl::AtFlags;
    use nix::sys::stat::fstatat;
    let (dir, name) = split_path(path).map_err(|e| (Step::Bind, e))?;
    let dirfd = open_folder(dir).map_err(|e| (Step::ClearPath, e))?;
    // The folder's path cannot change under us (see open_folder): the path's
    // text, which is the address getsockname() and clients see, reaches it.
    let sa = UnixAddr::new(path.as_os_str().as_bytes()).map_err(|e| (Step::Bind, io::Error::from(e)))?;
    clear_stale_at(dirfd.as_fd(), name, path, &sa, may_replace).map_err(|e| (Step::ClearPath, e.into_io()))?;
    // The file is created with its final mode: no chmod after bind, which
    // would leave a window with the default mode. umask is process-wide; the
    // broker opens sockets from its one thread.
    let old = options.mode.map(|mode| umask(Mode::from_bits_truncate(!mode & 0o777)));
    let bound = bind(fd.as_raw_fd(), &sa);
    if let Some(old) = old {
        umask(old);
    }
    bound.map_err(|e| (Step::Bind, io::Error::from(e)))?;
    let st =
        fstatat(dirfd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| (Step::Bind, io::Error::from(e)))?;
    let id = FileId { dev: st.st_dev, ino: st.st_ino };
    if options.user.is_some() || options.group.is_some() {
        // Through the folder's descriptor, without following a link: the
        // name was just created by bind() as a socket.
        let chown = nix::unistd::fchownat(
            dirfd.as_fd(),
            name,
            options.user.map(nix::unistd::Uid::from_raw),
            options.group.map(nix::unistd::Gid::from_raw),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        );
        if let Err(e) = chown {
            // A socket file with the wrong owner is of no use to whoever
            // asked for it; take it away again.
            let _ = nix::unistd::unlinkat(dirfd.as_fd(), name, nix::unistd::UnlinkatFlags::NoRemoveDir);
            return Err((Step::SetOption("owner and group"), io::Error::from(e)));
        }
    }
    Ok(id)
}

/// The one stale-file check: at `name` inside the opened folder `dir`
/// (`path` names it in errors), asking `may_replace` before removing a stale
/// socket file.
fn clear_stale_at(
    dir: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    path: &Path,
    sa: &UnixAddr,
    may_replace: &dyn Fn(FileId) -> bool,
) -> Result<(), PathError> {
    use nix::fcntl::AtFlags;
    let st = match nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(PathError::Io { path: path.into(), source: e.into() }),
    };
    match st.st_mode & nix::libc::S_IFMT {
        nix::libc::S_IFSOCK => {}
        nix::libc::S_IFLNK => {
            let target = nix::fcntl::readlinkat(dir, name).map(PathBuf::from).unwrap_or_default();
            return Err(PathError::Symlink { path: path.into(), target });
        }
        _ => return Err(PathError::NotASocket(path.into())),
    }
    let probe = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| PathError::Io { path: path.into(), source: e.into() })?;
    match nix::sys::socket::connect(probe.as_raw_fd(), sa) {
        Ok(()) => Err(PathError::Live(path.into())),
        // EPROTOTYPE: a datagram or seqpacket socket is there; it is live
        // only if someone holds it bound, which connect() with our type
        // cannot tell: treat it as in use.
        Err(nix::errno::Errno::EPROTOTYPE) => Err(PathError::Live(path.into())),
        Err(nix::errno::Errno::ECONNREFUSED) => {
            if !may_replace(FileId { dev: st.st_dev, ino: st.st_ino }) {
                return Err(PathError::NotOurs(path.into()));
            }
            log::info!("{}: removing stale socket (nobody listens on it)", path.display());
            match nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
                Err(e) => Err(PathError::Io { path: path.into(), source: e.into() }),
            }
        }
        Err(e) => Err(PathError::Io { path: path.into(), source: e.into() }),
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

        // A link squatting the path is neither followed nor removed.
        let link = dir.join("link.sock");
        std::os::unix::fs::symlink(&live, &link).unwrap();
        let err = clear_stale_unix_path(&link).unwrap_err();
        assert!(matches!(&err, PathError::Symlink { target, .. } if *target == live), "{err}");
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());

        let stale = dir.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        clear_stale_unix_path(&stale).unwrap();
        assert!(!stale.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
