//! Descriptors across exec, in the child between fork and exec (system
//! calls only, no allocation): kept at their numbers ([`keep_open`]) or
//! moved onto 3, 4, … ([`place`]), with `FD_CLOEXEC` clear on exactly those
//! and set on every other descriptor. In the parent: [`plug_slots`] keeps
//! `Command`'s own exec-error pipe out of the slots, and
//! [`seal_inherited_descriptors`] marks close-on-exec what our own parent
//! leaked to us.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::libc;

use crate::systemd::listen::LISTEN_FDS_START;

/// In the child, between fork and exec: clears `FD_CLOEXEC` on `fds` (open
/// in the parent when the command was built, so open here). Async-signal-safe.
pub(super) fn keep_open(fds: &[RawFd]) -> io::Result<()> {
    for &raw_fd in fds {
        // SAFETY: open in the parent when the command was built, so open in
        // the child, which runs nothing else until exec.
        let fd = unsafe { BorrowedFd::borrow_raw(raw_fd) };
        let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD)?;
        let flags = nix::fcntl::FdFlag::from_bits_retain(flags) - nix::fcntl::FdFlag::FD_CLOEXEC;
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(flags))?;
    }
    Ok(())
}

/// Where placing the sockets failed.
#[derive(Debug, Clone, Copy)]
pub(super) struct PlaceFailure {
    /// Which descriptor, in slot order.
    pub(super) index: usize,
    /// The system call that failed.
    pub(super) step: &'static str,
    /// Its errno.
    pub(super) errno: i32,
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// Moves `sources[i]` to descriptor `3 + i` for every i, with `FD_CLOEXEC`
/// clear on exactly those, and marks every descriptor above them close-on-exec.
///
/// Async-signal-safe: system calls only, no allocation. Overlaps are handled
/// by copying every source above the slot range first (F_DUPFD_CLOEXEC), so
/// no dup2 onto a slot can close a source that has not been copied yet.
pub(super) fn place(sources: &[RawFd], scratch: &mut [RawFd]) -> Result<(), PlaceFailure> {
    let end = LISTEN_FDS_START + sources.len() as RawFd;
    for (i, (&src, high)) in sources.iter().zip(scratch.iter_mut()).enumerate() {
        // SAFETY: fcntl on a descriptor number takes no pointers.
        let fd = unsafe { libc::fcntl(src, libc::F_DUPFD_CLOEXEC, end) };
        if fd < 0 {
            return Err(PlaceFailure { index: i, step: "fcntl(F_DUPFD_CLOEXEC)", errno: errno() });
        }
        *high = fd;
    }
    for (i, &high) in scratch.iter().enumerate() {
        let slot = LISTEN_FDS_START + i as RawFd;
        // dup2 leaves FD_CLOEXEC clear on the new descriptor: this is what
        // hands the socket to the exec'd program, and only these slots get it.
        // SAFETY: dup2 takes no pointers; `slot` is either free or holds a
        // close-on-exec descriptor that dies at exec anyway.
        if unsafe { libc::dup2(high, slot) } < 0 {
            return Err(PlaceFailure { index: i, step: "dup2", errno: errno() });
        }
        // SAFETY: closing our own high copy, made just above.
        unsafe { libc::close(high) };
    }
    // Everything else is close-on-exec by construction; this makes sure of
    // it even for descriptors inherited from our own parent. An old kernel
    // without close_range(CLOSE_RANGE_CLOEXEC) (< 5.11) leaves that to
    // `seal_inherited_descriptors`.
    // SAFETY: close_range takes no pointers.
    unsafe { libc::syscall(libc::SYS_close_range, end as libc::c_uint, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC) };
    Ok(())
}

/// Occupies every free descriptor number in 3..3+n (n = `fds.len()`) with a
/// close-on-exec copy of one of `fds`, until the returned guards drop.
///
/// Why: `Command::spawn` opens its exec-error pipe at the lowest free
/// numbers; if that landed in 3..3+n, the child's dup2 onto the slots would
/// replace it, and a failed exec would look like a success to the parent.
pub(super) fn plug_slots(fds: &[BorrowedFd<'_>]) -> io::Result<Vec<OwnedFd>> {
    let mut plugs = Vec::new();
    let Some(first) = fds.first() else { return Ok(plugs) };
    let end = LISTEN_FDS_START + fds.len() as RawFd;
    loop {
        // try_clone is F_DUPFD_CLOEXEC from 3: the lowest free number >= 3.
        let plug = first.try_clone_to_owned()?;
        if plug.as_raw_fd() >= end {
            return Ok(plugs);
        }
        plugs.push(plug);
    }
}

/// Marks every descriptor above 2 that is not close-on-exec as close-on-exec,
/// warning about each: such a descriptor was inherited from whoever started
/// us, and would otherwise leak into the child. Returns the ones it fixed.
pub fn seal_inherited_descriptors() -> io::Result<Vec<RawFd>> {
    let mut fixed = Vec::new();
    let numbers: Vec<RawFd> =
        std::fs::read_dir("/proc/self/fd")?.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    for raw in numbers.into_iter().filter(|&fd| fd > 2) {
        // SAFETY: fcntl on a descriptor number takes no pointers. A number
        // that is no longer open (the listing's own handle) fails with EBADF
        // and is skipped; nothing here takes ownership of any descriptor.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
        if flags < 0 || flags & libc::FD_CLOEXEC != 0 {
            continue;
        }
        log::info!("fd {raw} was inherited without close-on-exec; closing it on exec so the child does not get it");
        // SAFETY: as above.
        if unsafe { libc::fcntl(raw, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        fixed.push(raw);
    }
    Ok(fixed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, AsRawFd};

    /// The adversarial layout: socket A sits where B must go and B where A
    /// must go (a naive dup2 in order would overwrite B with A before B is
    /// copied). Runs `place` in a forked child, which reports by exit code.
    #[test]
    fn place_handles_overlapping_slots() {
        use std::os::unix::net::UnixDatagram;
        let socks: Vec<UnixDatagram> = (0..3).map(|_| UnixDatagram::unbound().unwrap()).collect();
        let raw: Vec<RawFd> = socks.iter().map(|s| s.as_raw_fd()).collect();
        let inodes: Vec<u64> = socks.iter().map(|s| crate::fd::inode(s.as_fd()).unwrap()).collect();
        let mut scratch = vec![-1; 3];
        // SAFETY: the child makes only async-signal-safe calls (dup2, fcntl,
        // fstat, _exit) on memory allocated before the fork.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = (|| {
                    // Park A at 4, B at 3, C at 5, high above the test's own fds first.
                    // SAFETY: dup2 takes no pointers; only the child's table changes.
                    let park = |src: RawFd, at: RawFd| unsafe { libc::dup2(src, at) } == at;
                    let (a, b, c) = (100, 101, 102);
                    if !(park(raw[0], a) && park(raw[1], b) && park(raw[2], c)) {
                        return 10;
                    }
                    if !(park(a, 4) && park(b, 3) && park(c, 5)) {
                        return 11;
                    }
                    if place(&[4, 3, 5], &mut scratch).is_err() {
                        return 12;
                    }
                    for (i, want) in inodes.iter().enumerate() {
                        let slot = 3 + i as RawFd;
                        // SAFETY: a plain C struct, all zeroes is a valid value.
                        let mut st = unsafe { std::mem::zeroed::<libc::stat>() };
                        // SAFETY: `st` is valid and writable for the call.
                        if unsafe { libc::fstat(slot, &mut st) } != 0 || st.st_ino != *want {
                            return 20 + i as i32;
                        }
                        // SAFETY: fcntl(F_GETFD) takes no pointers.
                        if unsafe { libc::fcntl(slot, libc::F_GETFD) } & libc::FD_CLOEXEC != 0 {
                            return 30 + i as i32;
                        }
                    }
                    // Everything above the slots is close-on-exec now.
                    // SAFETY: fcntl(F_GETFD) takes no pointers.
                    if unsafe { libc::fcntl(a, libc::F_GETFD) } & libc::FD_CLOEXEC == 0 {
                        return 40;
                    }
                    0
                })();
                // SAFETY: leave the forked child without running the test harness's destructors.
                unsafe { libc::_exit(code) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0), "see the codes in the test");
            }
        }
    }
}
