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

use nix::sys::stat::{umask, Mode};

use crate::spec::{SocketKey, SocketOptions, SocketSpec, Transport, UnixAddress, UnixKind};

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
    /// A symbolic link squats the path (someone may want the socket made
    /// where it points); it is never followed nor removed.
    #[error("{path}: is a symbolic link (to {target}), not a socket; refusing to follow or remove it")]
    Symlink {
        /// The socket path.
        path: PathBuf,
        /// Where the link points.
        target: PathBuf,
    },
    /// A process accepts connections on the path.
    #[error("{0}: a live socket is already listening there")]
    Live(PathBuf),
    /// A stale socket file the broker did not create, and no rule for this
    /// exact path allows replacing it.
    #[error("{0}: a socket file the broker did not create is there; refusing to replace it (an allow rule naming this exact path permits it)")]
    NotOurs(PathBuf),
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
            PathError::NotASocket(_) | PathError::Symlink { .. } | PathError::Live(_) | PathError::NotOurs(_) => {
                io::ErrorKind::AddrInUse
            }
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
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(path).unwrap_or_default();
        return Err(PathError::Symlink { path: path.into(), target });
    }
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
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not a path to a file", path.display()));
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
fn bind_unix_path(
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

/// [`clear_stale_unix_path`] inside an opened folder, asking `may_replace`
/// before removing a stale socket file.
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
    if st.st_mode & nix::libc::S_IFMT != nix::libc::S_IFSOCK {
        return Err(PathError::NotASocket(path.into()));
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

/// Sets the IP-level options of `options` on a TCP or UDP socket, before
/// `bind()`. Returns the name of the option that failed with the cause.
fn apply_inet_options(
    fd: BorrowedFd<'_>,
    transport: Transport,
    v6: bool,
    options: &SocketOptions,
) -> Result<(), (&'static str, io::Error)> {
    let tcp = transport == Transport::Tcp;
    let set = |name: &'static str, r: nix::Result<()>| r.map_err(|e| (name, io::Error::from(e)));
    let set_int =
        |name: &'static str, level, opt, value: u32| set_int_option(fd, level, opt, value).map_err(|e| (name, e));
    use nix::libc;
    if options.reuse_addr.unwrap_or(tcp) {
        set("SO_REUSEADDR", setsockopt(&fd, sockopt::ReuseAddr, &true))?;
    }
    if options.reuse_port {
        set("SO_REUSEPORT", setsockopt(&fd, sockopt::ReusePort, &true))?;
    }
    if let (Some(only), true) = (options.ipv6_only, v6) {
        set("IPV6_V6ONLY", setsockopt(&fd, sockopt::Ipv6V6Only, &only))?;
    }
    if options.freebind {
        if v6 {
            set_int("IPV6_FREEBIND", libc::IPPROTO_IPV6, libc::IPV6_FREEBIND, 1)?;
        } else {
            set("IP_FREEBIND", setsockopt(&fd, sockopt::IpFreebind, &true))?;
        }
    }
    if options.transparent {
        if v6 {
            set_int("IPV6_TRANSPARENT", libc::IPPROTO_IPV6, libc::IPV6_TRANSPARENT, 1)?;
        } else {
            set("IP_TRANSPARENT", setsockopt(&fd, sockopt::IpTransparent, &true))?;
        }
    }
    if let Some(dev) = &options.bind_to_device {
        set("SO_BINDTODEVICE", setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(dev)))?;
    }
    if let Some(secs) = options.defer_accept {
        set_int("TCP_DEFER_ACCEPT", libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, secs)?;
    }
    if let Some(queue) = options.fast_open {
        set_int("TCP_FASTOPEN", libc::IPPROTO_TCP, libc::TCP_FASTOPEN, queue)?;
    }
    if options.keepalive {
        set("SO_KEEPALIVE", setsockopt(&fd, sockopt::KeepAlive, &true))?;
    }
    if let Some(secs) = options.keepalive_idle {
        set_int("TCP_KEEPIDLE", libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs)?;
    }
    if let Some(secs) = options.keepalive_interval {
        set_int("TCP_KEEPINTVL", libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, secs)?;
    }
    if let Some(count) = options.keepalive_count {
        set_int("TCP_KEEPCNT", libc::IPPROTO_TCP, libc::TCP_KEEPCNT, count)?;
    }
    if options.no_delay {
        set("TCP_NODELAY", setsockopt(&fd, sockopt::TcpNoDelay, &true))?;
    }
    if let Some(size) = options.receive_buffer {
        set_buffer(fd, sockopt::RcvBuf, size).map_err(|e| ("SO_RCVBUF", e))?;
    }
    if let Some(size) = options.send_buffer {
        set_buffer(fd, sockopt::SndBuf, size).map_err(|e| ("SO_SNDBUF", e))?;
    }
    if let Some(mark) = options.mark {
        set("SO_MARK", setsockopt(&fd, sockopt::Mark, &mark))?;
    }
    if options.broadcast {
        set("SO_BROADCAST", setsockopt(&fd, sockopt::Broadcast, &true))?;
    }
    Ok(())
}

fn set_buffer<O: nix::sys::socket::SetSockOpt<Val = usize>>(fd: BorrowedFd<'_>, opt: O, size: u32) -> io::Result<()> {
    Ok(setsockopt(&fd, opt, &(size as usize))?)
}

/// `setsockopt` with an `int` value, for the options nix does not wrap
/// (TCP_DEFER_ACCEPT, TCP_FASTOPEN, IPV6_FREEBIND, IPV6_TRANSPARENT, keepalive
/// timers).
pub fn set_int_option(fd: BorrowedFd<'_>, level: i32, name: i32, value: u32) -> io::Result<()> {
    let value = i32::try_from(value).unwrap_or(i32::MAX);
    // SAFETY: `fd` is open for the duration of the call; the pointer and length
    // describe a live `c_int` on our stack.
    let rc = unsafe {
        nix::libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as nix::libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `getsockopt` of an `int` option: reads back what the kernel holds (used by
/// the tests of every option and by introspection).
pub fn get_int_option(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<i32> {
    let mut value: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as nix::libc::socklen_t;
    // SAFETY: `fd` is open for the duration of the call; the pointer and length
    // describe a live, writable `c_int` on our stack.
    let rc = unsafe { nix::libc::getsockopt(fd.as_raw_fd(), level, name, (&mut value as *mut i32).cast(), &mut len) };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The accept queue of a TCP listener: connections waiting for `accept()`,
/// and the backlog (the kernel's cap on that queue, after `somaxconn`).
///
/// On a listening socket, Linux fills `TCP_INFO`'s `tcpi_unacked` with the
/// current queue length and `tcpi_sacked` with the backlog.
pub fn accept_queue(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    // SAFETY: tcp_info is plain old data; all zeroes is a valid value.
    let mut info: nix::libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<nix::libc::tcp_info>() as nix::libc::socklen_t;
    // SAFETY: `fd` is open for the duration of the call; the pointer and length
    // describe `info`, which the kernel fills at most `len` bytes of.
    let rc = unsafe {
        nix::libc::getsockopt(
            fd.as_raw_fd(),
            nix::libc::IPPROTO_TCP,
            nix::libc::TCP_INFO,
            (&mut info as *mut nix::libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if info.tcpi_state != 10 {
        // TCP_LISTEN is 10 in the kernel's state numbering.
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a listening TCP socket"));
    }
    Ok((info.tcpi_unacked, info.tcpi_sacked))
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

/// Why a descriptor is not a socket the broker can hold.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The descriptor is a file, pipe or anything but a socket.
    #[error("not a socket")]
    NotASocket,
    /// A family or type the broker does not broker (netlink, raw, …).
    #[error("unsupported socket ({0})")]
    Unsupported(String),
    /// A stream or seqpacket socket that does not listen: it cannot be
    /// shared by accept()ing processes.
    #[error("{0}: a {1} socket that is not listening")]
    NotListening(SocketKey, &'static str),
    /// Not bound to an address anyone could name.
    #[error("not bound to a usable address: {0}")]
    Unbound(#[source] crate::spec::SpecError),
    /// The kernel refused to say.
    #[error("{what}: {source}")]
    Io {
        /// The query that failed.
        what: &'static str,
        /// The kernel's reason.
        #[source]
        source: io::Error,
    },
}

/// Identifies an existing socket from the kernel alone: family, type,
/// whether it listens (`SO_ACCEPTCONN`) and its bound address
/// (`getsockname`, a path or an abstract name for UNIX sockets). Used for
/// descriptors the broker did not make (from systemd or its fd store), so
/// they are held under the key a client would ask for.
pub fn inspect(fd: BorrowedFd<'_>) -> Result<SocketKey, InspectError> {
    let io = |what| move |e: nix::Error| InspectError::Io { what, source: e.into() };
    let st = nix::sys::stat::fstat(fd).map_err(io("fstat()"))?;
    if st.st_mode & nix::libc::S_IFMT != nix::libc::S_IFSOCK {
        return Err(InspectError::NotASocket);
    }
    let ty = nix::sys::socket::getsockopt(&fd, sockopt::SockType).map_err(|e| match e {
        nix::errno::Errno::EINVAL => InspectError::Unsupported("unknown socket type".into()),
        e => io("SO_TYPE")(e),
    })?;
    let listening = nix::sys::socket::getsockopt(&fd, sockopt::AcceptConn).map_err(io("SO_ACCEPTCONN"))?;
    let addr: SockaddrStorage = nix::sys::socket::getsockname(fd.as_raw_fd()).map_err(io("getsockname()"))?;
    let (key, type_name) = if let Some(v4) = addr.as_sockaddr_in() {
        let sa = std::net::SocketAddr::V4(std::net::SocketAddrV4::new(v4.ip(), v4.port()));
        inet_key(ty, sa)?
    } else if let Some(v6) = addr.as_sockaddr_in6() {
        let sa =
            std::net::SocketAddr::V6(std::net::SocketAddrV6::new(v6.ip(), v6.port(), v6.flowinfo(), v6.scope_id()));
        inet_key(ty, sa)?
    } else if let Some(unix) = addr.as_unix_addr() {
        let (kind, type_name) = match ty {
            SockType::Stream => (UnixKind::Stream, "UNIX stream"),
            SockType::Datagram => (UnixKind::Datagram, "UNIX datagram"),
            SockType::SeqPacket => (UnixKind::SeqPacket, "UNIX seqpacket"),
            other => return Err(InspectError::Unsupported(format!("UNIX {other:?}"))),
        };
        let text = if let Some(path) = unix.path() {
            path.to_string_lossy().into_owned()
        } else if let Some(name) = unix.as_abstract() {
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| InspectError::Unsupported("UNIX abstract name that is not UTF-8".into()))?;
            format!("@{name}")
        } else {
            String::new()
        };
        (SocketKey::unix(kind, &text).map_err(InspectError::Unbound)?, type_name)
    } else {
        use nix::sys::socket::SockaddrLike;
        return Err(InspectError::Unsupported(format!("family {:?}", addr.family())));
    };
    if key.is_listening_kind() && !listening {
        return Err(InspectError::NotListening(key, type_name));
    }
    Ok(key)
}

/// Whether a socket is connected to a peer (`getpeername` succeeds): a
/// connected datagram socket is a client's, not a service's, and is never
/// adopted.
pub fn is_connected(fd: BorrowedFd<'_>) -> bool {
    nix::sys::socket::getpeername::<SockaddrStorage>(fd.as_raw_fd()).is_ok()
}

/// The options an existing socket has, read back from the kernel (for a
/// socket the broker adopts and did not make). Nothing is set: the socket
/// keeps exactly what its maker gave it. An option the kernel will not
/// report keeps its default here.
pub fn read_options(fd: BorrowedFd<'_>, key: &SocketKey) -> SocketOptions {
    use nix::libc;
    use nix::sys::socket::getsockopt;
    let int = |level, name| get_int_option(fd, level, name).ok();
    let flag = |level, name| int(level, name).is_some_and(|v| v != 0);
    let positive = |level, name| int(level, name).filter(|v| *v > 0).map(|v| v as u32);
    let mut o = SocketOptions { backlog: 0, ..SocketOptions::default() };
    // The kernel reports buffer sizes doubled (see socket(7)); halve them so
    // the figure matches what a configuration would have asked for.
    o.receive_buffer = getsockopt(&fd, sockopt::RcvBuf).ok().map(|v| (v / 2) as u32);
    o.send_buffer = getsockopt(&fd, sockopt::SndBuf).ok().map(|v| (v / 2) as u32);
    if let SocketKey::Inet { transport, addr } = key {
        o.reuse_addr = Some(flag(libc::SOL_SOCKET, libc::SO_REUSEADDR));
        o.reuse_port = flag(libc::SOL_SOCKET, libc::SO_REUSEPORT);
        o.keepalive = flag(libc::SOL_SOCKET, libc::SO_KEEPALIVE);
        o.broadcast = flag(libc::SOL_SOCKET, libc::SO_BROADCAST);
        o.mark = positive(libc::SOL_SOCKET, libc::SO_MARK);
        if addr.is_ipv6() {
            o.ipv6_only = Some(flag(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY));
            o.freebind = flag(libc::IPPROTO_IPV6, libc::IPV6_FREEBIND);
            o.transparent = flag(libc::IPPROTO_IPV6, libc::IPV6_TRANSPARENT);
        } else {
            o.freebind = flag(libc::IPPROTO_IP, libc::IP_FREEBIND);
            o.transparent = flag(libc::IPPROTO_IP, libc::IP_TRANSPARENT);
        }
        o.bind_to_device = getsockopt(&fd, sockopt::BindToDevice)
            .ok()
            .map(|d| d.to_string_lossy().trim_end_matches('\0').to_string())
            .filter(|d| !d.is_empty());
        if *transport == Transport::Tcp {
            o.no_delay = flag(libc::IPPROTO_TCP, libc::TCP_NODELAY);
            o.defer_accept = positive(libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT);
            o.fast_open = positive(libc::IPPROTO_TCP, libc::TCP_FASTOPEN);
            o.keepalive_idle = positive(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE).filter(|_| o.keepalive);
            o.keepalive_interval = positive(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL).filter(|_| o.keepalive);
            o.keepalive_count = positive(libc::IPPROTO_TCP, libc::TCP_KEEPCNT).filter(|_| o.keepalive);
            if let Ok((_, backlog)) = accept_queue(fd) {
                o.backlog = backlog;
            }
        }
    }
    if let SocketKey::Unix { address: UnixAddress::Path(path), .. } = key {
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            o.mode = Some(meta.mode() & 0o7777);
            o.user = Some(meta.uid());
            o.group = Some(meta.gid());
        }
    }
    if o.backlog == 0 {
        // Only a TCP listener reports its backlog; 0 reads as "unknown".
        o.backlog = crate::spec::DEFAULT_BACKLOG;
    }
    o
}

fn inet_key(ty: SockType, addr: std::net::SocketAddr) -> Result<(SocketKey, &'static str), InspectError> {
    let (transport, name) = match ty {
        SockType::Stream => (Transport::Tcp, "TCP"),
        SockType::Datagram => (Transport::Udp, "UDP"),
        other => return Err(InspectError::Unsupported(format!("IP {other:?}"))),
    };
    // The scope and flow label are not part of a key (spec.rs parses none).
    let addr = match addr {
        std::net::SocketAddr::V6(v6) => {
            std::net::SocketAddr::V6(std::net::SocketAddrV6::new(*v6.ip(), v6.port(), 0, 0))
        }
        v4 => v4,
    };
    Ok((SocketKey::inet(transport, addr).map_err(InspectError::Unbound)?, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspect_finds_the_key_of_every_kind() {
        let dir = std::env::temp_dir().join(format!("sockbroker-inspect-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let uport = std::net::UdpSocket::bind("[::1]:0").unwrap().local_addr().unwrap().port();
        let texts = [
            format!("tcp://127.0.0.1:{port}"),
            format!("udp://[::1]:{uport}"),
            format!("unix:{}/s", dir.display()),
            format!("unix-dgram:{}/d", dir.display()),
            format!("unix-seqpacket:@sockbroker-inspect-{}", std::process::id()),
        ];
        for text in texts {
            let spec: SocketSpec = text.parse().unwrap();
            let fd = open(&spec).unwrap();
            assert_eq!(inspect(fd.as_fd()).unwrap(), spec.key, "{text}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn inspect_refuses_what_cannot_be_shared() {
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(inspect(file.as_fd()), Err(InspectError::NotASocket)));
        // Bound but not listening.
        let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
        bind(fd.as_raw_fd(), &SockaddrStorage::from("127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap())).unwrap();
        let err = inspect(fd.as_fd()).unwrap_err();
        assert!(matches!(err, InspectError::NotListening(..)), "{err}");
        assert!(err.to_string().contains("not listening"), "{err}");
        // Connected, unnamed.
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(matches!(inspect(a.as_fd()), Err(InspectError::Unbound(_))));
    }

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
