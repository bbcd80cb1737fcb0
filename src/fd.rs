//! Descriptor primitives: passing descriptors over UNIX sockets (SCM_RIGHTS),
//! the close-on-exec flag, the credentials of a peer or of a datagram's
//! sender (`SCM_CREDENTIALS`, for `run`'s notify socket), and copying a descriptor
//! out of another process (`pidfd_open` + `pidfd_getfd`, for `sockbroker adopt`).
//!
//! Everything here keeps one rule: a descriptor that enters the process is an
//! [`OwnedFd`] with `FD_CLOEXEC` set before anything else can fail, so nothing
//! leaks into a child by accident. Received descriptors come through
//! `recvmsg(MSG_CMSG_CLOEXEC)` and a truncated control message is an error,
//! never a silent loss.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags};

/// The most descriptors the kernel accepts in one SCM_RIGHTS message
/// (`SCM_MAX_FD`).
pub const SCM_MAX_FD: usize = 253;

/// The credentials of the process at the other end of a UNIX socket, as the
/// kernel recorded them when it connected (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerCred {
    /// Process id of the peer.
    pub pid: i32,
    /// Effective user id of the peer.
    pub uid: u32,
    /// Effective group id of the peer.
    pub gid: u32,
}

impl std::fmt::Display for PeerCred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid={} uid={} gid={}", self.pid, self.uid, self.gid)
    }
}

/// Reads the credentials of the peer of a connected UNIX socket.
pub fn peer_credentials(sock: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let cred = getsockopt(&sock, sockopt::PeerCredentials)?;
    Ok(PeerCred { pid: cred.pid(), uid: cred.uid(), gid: cred.gid() })
}

/// Sends `data` with the given descriptors attached in one `sendmsg`.
///
/// Uses `MSG_NOSIGNAL`: a peer that has gone away is an `EPIPE` error, not a
/// signal. Returns how many bytes the kernel took; the descriptors travel with
/// the first byte, so on a partial write they are already sent.
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &[ControlMessage::ScmRights(&raw)] };
    let sent = sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(data)], cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(sent)
}

/// Bytes this end of a UNIX stream socket sent that the peer has not read
/// yet (`SIOCOUTQ`). The descriptors that travelled with them are in
/// flight, charged to the sender's user, until the peer reads them; 0 means
/// the peer has read everything, descriptors included.
pub fn unread_by_peer(sock: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: nix::libc::c_int = 0;
    // SAFETY: `sock` is open for the duration of the call; SIOCOUTQ writes
    // one `int` through the pointer, which points at `n` on our stack.
    let rc = unsafe { nix::libc::ioctl(sock.as_raw_fd(), nix::libc::TIOCOUTQ, &mut n as *mut nix::libc::c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// What one `recvmsg` brought.
#[derive(Debug)]
pub struct Received {
    /// Bytes written into the buffer; 0 means the peer closed.
    pub len: usize,
    /// Descriptors that came with them, close-on-exec.
    pub fds: Vec<OwnedFd>,
}

/// Receives bytes and any SCM_RIGHTS descriptors in one `recvmsg`.
///
/// Descriptors arrive close-on-exec. If the kernel had to drop descriptors
/// because the control buffer was too small (`MSG_CTRUNC`), the ones that did
/// arrive are closed and an error is returned.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: the kernel has just installed this descriptor in our
                // table for us alone; nothing else refers to it yet.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "descriptors were truncated by the kernel (MSG_CTRUNC)",
        ));
    }
    Ok(Received { len: msg.bytes, fds })
}

/// Receives one datagram without waiting (`MSG_DONTWAIT`) and the sender's
/// pid (`SCM_CREDENTIALS`, on a socket with `SO_PASSCRED`; `None` without
/// it). Descriptors the sender attached are closed at once: nobody may park
/// descriptors with us. Returns the length and the pid.
pub fn recv_with_sender(sock: BorrowedFd<'_>, buf: &mut [u8]) -> nix::Result<(usize, Option<i32>)> {
    let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials, [RawFd; 16]);
    let mut iov = [IoSliceMut::new(buf)];
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
    let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), flags)?;
    let mut sender = None;
    for c in msg.cmsgs().into_iter().flatten() {
        match c {
            ControlMessageOwned::ScmCredentials(cred) => sender = Some(cred.pid()),
            ControlMessageOwned::ScmRights(fds) => {
                for fd in fds {
                    // SAFETY: the kernel just installed it in our table for
                    // us alone; dropping the OwnedFd closes it.
                    drop(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
            _ => {}
        }
    }
    Ok((msg.bytes, sender))
}

/// Sets or clears `FD_CLOEXEC` on one descriptor.
pub fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let mut flags = FdFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFD)?);
    flags.set(FdFlag::FD_CLOEXEC, on);
    fcntl(fd, FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// Whether `FD_CLOEXEC` is set on a descriptor.
pub fn is_cloexec(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let flags = FdFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFD)?);
    Ok(flags.contains(FdFlag::FD_CLOEXEC))
}

/// Takes ownership of descriptors this process image inherited across
/// `execve` (numbers written down by the previous image of the broker, or by
/// multibinder in `MULTIBINDER_BIND__…`), setting `FD_CLOEXEC` on each at once.
///
/// A number is refused when it is stdin/stdout/stderr, listed twice, not open,
/// or close-on-exec: every descriptor this process opens itself is born
/// close-on-exec, so one that is not can only have come through the exec. That
/// check is what makes taking ownership of a bare number sound.
pub fn take_inherited(raws: &[RawFd]) -> Result<Vec<OwnedFd>, InheritError> {
    let mut seen = std::collections::HashSet::new();
    for &raw in raws {
        if raw < 3 {
            return Err(InheritError { fd: raw, reason: "a standard stream (0, 1, 2) is never a handed-over socket" });
        }
        if !seen.insert(raw) {
            return Err(InheritError { fd: raw, reason: "listed twice" });
        }
        // SAFETY: F_GETFD only reads the descriptor flags; on a number that is
        // not open it fails with EBADF and has no effect.
        let flags = unsafe { nix::libc::fcntl(raw, nix::libc::F_GETFD) };
        if flags < 0 {
            return Err(InheritError { fd: raw, reason: "not an open descriptor" });
        }
        if flags & nix::libc::FD_CLOEXEC != 0 {
            return Err(InheritError { fd: raw, reason: "close-on-exec is set, so it was not handed over by exec" });
        }
    }
    let mut owned = Vec::with_capacity(raws.len());
    for &raw in raws {
        // SAFETY: the number is open, was not opened by this image (it is not
        // close-on-exec, see above) and is taken exactly once (no duplicates),
        // so no other owner exists in this process.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        set_cloexec(fd.as_fd(), true).map_err(|_| InheritError { fd: raw, reason: "could not set close-on-exec" })?;
        owned.push(fd);
    }
    Ok(owned)
}

/// An inherited descriptor number that cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("inherited descriptor {fd}: {reason}")]
pub struct InheritError {
    /// The number.
    pub fd: RawFd,
    /// Why it is refused.
    pub reason: &'static str,
}

/// Whether a descriptor is a socket.
pub fn is_socket(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mode = nix::sys::stat::fstat(fd)?.st_mode;
    Ok(mode & nix::libc::S_IFMT == nix::libc::S_IFSOCK)
}

/// The inode of the open file behind a descriptor: two descriptors with the
/// same inode (on sockfs) are the same kernel socket.
pub fn inode(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(nix::sys::stat::fstat(fd)?.st_ino)
}

/// `pidfd_open(2)`: a descriptor that refers to process `pid` (Linux 5.3+),
/// close-on-exec. nix 0.32 has no wrapper, hence the raw system call.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and a flags word and no pointers; on
    // success the kernel returns a new descriptor that nothing else owns.
    let rc = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `rc` is a descriptor the kernel has just created for us alone
    // (pidfds are always close-on-exec).
    Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
}

/// `pidfd_getfd(2)`: a copy of descriptor `target` of the process behind
/// `pidfd`, in this process (Linux 5.6+). The copy refers to the same open
/// file (for a socket: the same kernel socket, same inode, same queue) and
/// is close-on-exec. The caller needs ptrace-attach rights over the process
/// (`PTRACE_MODE_ATTACH_REALCREDS`: same user or CAP_SYS_PTRACE, subject to
/// Yama's `ptrace_scope`).
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, target: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes two descriptor numbers and a flags word, no
    // pointers; `pidfd` stays open for the duration of the call.
    let rc = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel has just installed this descriptor (with
    // FD_CLOEXEC) in our table for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn passes_descriptors_cloexec() {
        let (a, b) = UnixStream::pair().unwrap();
        let (x, _y) = UnixStream::pair().unwrap();
        set_cloexec(x.as_fd(), false).unwrap();
        assert!(!is_cloexec(x.as_fd()).unwrap());
        assert_eq!(send_with_fds(a.as_fd(), b"hi", &[x.as_fd()]).unwrap(), 2);
        let mut buf = [0u8; 16];
        let got = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..got.len], b"hi");
        assert_eq!(got.fds.len(), 1);
        assert!(is_cloexec(got.fds[0].as_fd()).unwrap());
        assert_eq!(inode(got.fds[0].as_fd()).unwrap(), inode(x.as_fd()).unwrap());
        // Sent, not read yet: SIOCOUTQ counts it until the peer reads.
        assert_eq!(send_with_fds(a.as_fd(), b"again", &[x.as_fd()]).unwrap(), 5);
        assert!(unread_by_peer(a.as_fd()).unwrap() > 0);
        let got = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(got.fds.len(), 1);
        assert_eq!(unread_by_peer(a.as_fd()).unwrap(), 0);
        let cred = peer_credentials(a.as_fd()).unwrap();
        assert_eq!(cred.pid, std::process::id() as i32);
    }

    #[test]
    fn pidfd_getfd_copies_the_same_socket() {
        let (a, _b) = UnixStream::pair().unwrap();
        let pidfd = pidfd_open(std::process::id() as i32).unwrap();
        let copy = pidfd_getfd(pidfd.as_fd(), a.as_raw_fd()).unwrap();
        assert_eq!(inode(copy.as_fd()).unwrap(), inode(a.as_fd()).unwrap());
        assert!(is_cloexec(copy.as_fd()).unwrap());
        assert!(is_cloexec(pidfd.as_fd()).unwrap());
        assert_eq!(pidfd_getfd(pidfd.as_fd(), 100_000).unwrap_err().raw_os_error(), Some(nix::libc::EBADF));
    }

    #[test]
    fn takes_only_descriptors_that_came_through_exec() {
        use std::os::fd::IntoRawFd;
        let (a, _b) = UnixStream::pair().unwrap();
        // Ours, close-on-exec: refused, and left open.
        let err = take_inherited(&[a.as_raw_fd()]).unwrap_err();
        assert!(err.reason.contains("close-on-exec"), "{err}");
        assert!(is_cloexec(a.as_fd()).unwrap());
        assert_eq!(take_inherited(&[1]).unwrap_err().fd, 1);
        assert_eq!(take_inherited(&[100_000]).unwrap_err().reason, "not an open descriptor");
        // As an exec would leave it: taken once, close-on-exec again.
        set_cloexec(a.as_fd(), false).unwrap();
        let raw = a.into_raw_fd();
        assert_eq!(take_inherited(&[raw, raw]).unwrap_err().reason, "listed twice");
        let taken = take_inherited(&[raw]).unwrap();
        assert!(is_cloexec(taken[0].as_fd()).unwrap());
    }
}
