//! Starting a child: what every program the broker's commands start gets,
//! whoever starts it (`exec` and `run` through [`crate::exec`], `haproxy
//! exec` and `haproxy run`, the `haproxy -c` check, a `--ready-probe`).
//!
//! - An empty signal mask. `run` and `haproxy run` block the signals they
//!   read from a signalfd ([`crate::signals`]), and a blocked mask survives
//!   exec: a child would ignore SIGTERM from its supervisor. The standard
//!   library's `Command` empties the mask in the child today (an
//!   implementation detail, not a documented promise); [`prepare`] does it
//!   explicitly, and the raw `execve` path of [`crate::exec`] calls
//!   [`empty_signal_mask`] itself. Tests read `SigBlk` in
//!   `/proc/PID/status` of HAProxy, of a `run` generation and of its probe.
//! - Exactly the descriptors it is given: everything the broker holds is
//!   close-on-exec; [`prepare`] clears the flag on the given descriptors,
//!   after fork, in the child only, so other children started meanwhile
//!   inherit nothing.
//! - Optionally a parent-death signal, refused when the parent already died
//!   between fork and `prctl` (no signal would ever come).
//!
//! [`wait_with_deadline`] is the one loop that waits for one child alone
//! with a time limit. The supervisor's own loop reaps every child at once
//! (`waitpid(-1)`, [`crate::supervisor`]).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::libc;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// In the child, between fork and exec: unblocks every signal.
/// Async-signal-safe (no allocation).
pub fn empty_signal_mask() -> io::Result<()> {
    // SAFETY: an empty set built on the stack; sigprocmask is async-signal-safe.
    unsafe {
        let mut empty = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// In the child, between fork and exec: asks for `signal` when the parent
/// dies. Fails with `ESRCH` when the parent (`parent`, read before the fork)
/// already died: then no signal would ever come, and the child must not
/// start as an orphan. Async-signal-safe.
pub fn die_with_parent(signal: Signal, parent: Pid) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: getppid has no arguments.
    if unsafe { libc::getppid() } != parent.as_raw() {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

/// In the child, between fork and exec: clears `FD_CLOEXEC` on `fds` (open
/// in the parent when the command was built, so open here). Async-signal-safe.
fn keep_open(fds: &[RawFd]) -> io::Result<()> {
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

/// Sets up `cmd` as every child is started (see the module docs): an empty
/// signal mask, `keep` open across exec at the same numbers, and `death`
/// delivered to it when this process dies.
pub fn prepare(cmd: &mut Command, keep: &[BorrowedFd<'_>], death: Option<Signal>) {
    let raw: Vec<RawFd> = keep.iter().map(|fd| fd.as_raw_fd()).collect();
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs between fork and exec and calls only
    // async-signal-safe functions (sigprocmask, fcntl, prctl, getppid) on
    // values captured before the fork; it does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            empty_signal_mask()?;
            keep_open(&raw)?;
            if let Some(signal) = death {
                die_with_parent(signal, parent)?;
            }
            Ok(())
        });
    }
}

/// Waits for the child `pid` alone (not `waitpid(-1)`: other children stay
/// unreaped for their owner), killing it with SIGKILL once `limit` has
/// passed. Returns its status and whether it was killed.
pub fn wait_with_deadline(pid: Pid, limit: Duration) -> nix::Result<(ExitStatus, bool)> {
    let started = Instant::now();
    let mut killed = false;
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) if started.elapsed() < limit => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(WaitStatus::StillAlive) => {
                killed = true;
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            }
            Ok(WaitStatus::Exited(_, code)) => return Ok((ExitStatus::from_raw(code << 8), killed)),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok((ExitStatus::from_raw(sig as i32), killed)),
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A child started with signals blocked in the parent starts with none
    /// blocked, and gets exactly the descriptor it was given.
    #[test]
    fn a_child_starts_with_an_empty_mask_and_the_given_descriptor() {
        let (kept, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let (other, _peer2) = std::os::unix::net::UnixStream::pair().unwrap();
        let script = format!(
            "grep SigBlk /proc/self/status; test -e /proc/self/fd/{} && echo kept; test -e /proc/self/fd/{} && echo leaked; true",
            kept.as_raw_fd(),
            other.as_raw_fd()
        );
        let output = std::thread::spawn(move || {
            let mut blocked = nix::sys::signal::SigSet::empty();
            blocked.add(Signal::SIGTERM);
            blocked.add(Signal::SIGHUP);
            blocked.thread_block().unwrap();
            let mut cmd = Command::new("/bin/sh");
            cmd.args(["-c", &script]);
            prepare(&mut cmd, &[kept.as_fd()], Some(Signal::SIGTERM));
            cmd.output().unwrap()
        })
        .join()
        .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains("SigBlk:\t0000000000000000"), "{text}");
        assert!(text.contains("kept"), "{text}");
        assert!(!text.contains("leaked"), "{text}");
    }

    #[test]
    fn waits_with_a_deadline() {
        // Reaped by wait_with_deadline, not through the handle.
        let pid = Command::new("/bin/sleep").arg("30").spawn().unwrap().id();
        let started = Instant::now();
        let (status, killed) = wait_with_deadline(Pid::from_raw(pid as i32), Duration::from_millis(100)).unwrap();
        assert!(killed && !status.success());
        assert!(started.elapsed() < Duration::from_secs(20));
        let pid = Command::new("/bin/true").spawn().unwrap().id();
        let (status, killed) = wait_with_deadline(Pid::from_raw(pid as i32), Duration::from_secs(20)).unwrap();
        assert!(!killed && status.success());
    }
}
