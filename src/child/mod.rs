//! Starting a child: the one way every program the broker's commands start
//! gets what it gets, whoever starts it (`exec` and `run` through
//! [`crate::exec`], `haproxy exec` and `haproxy run`, the `haproxy -c`
//! check, a `--ready-probe`).
//!
//! Between fork and exec, every child runs the same async-signal-safe steps
//! (`Setup::enter`):
//! - An empty signal mask. `run` and `haproxy run` block the signals they
//!   read from a signalfd ([`crate::signals`]), and a blocked mask survives
//!   exec: a child would ignore SIGTERM from its supervisor. The standard
//!   library's `Command` empties the mask in the child today (an
//!   implementation detail, not a documented promise); this does it
//!   explicitly. Tests read `SigBlk` in `/proc/PID/status` of HAProxy, of a
//!   `run` generation and of its probe.
//! - Optionally a parent-death signal, refused when the parent already died
//!   between fork and `prctl` (no signal would ever come).
//! - Exactly the descriptors it is given: everything the broker holds is
//!   close-on-exec; the child clears the flag on the given descriptors only,
//!   after fork, so other children started meanwhile inherit nothing. They
//!   stay at their numbers ([`prepare`]: HAProxy's `fd@N`) or are moved onto
//!   3, 4, … ([`Image`]: the LISTEN_FDS convention; see `descriptors`).
//!
//! Two launchers share those steps: [`prepare`] sets up a `Command` (the
//! program, arguments and environment are `Command`'s); [`Image`] is the raw
//! `execve` path for a child whose environment holds its own pid
//! (`LISTEN_PID`), which only the child knows (see `image`).
//!
//! [`wait_with_deadline`] is the one loop that waits for one child alone
//! with a time limit. The supervisor's own loop reaps every child at once
//! (`waitpid(-1)`, [`crate::supervisor`]).

mod descriptors;
mod image;
pub mod priority;

pub use descriptors::seal_inherited_descriptors;
pub use image::{ExecFailure, Image, NulByte};
pub use priority::Priority;

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
fn empty_signal_mask() -> io::Result<()> {
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
fn die_with_parent(signal: Signal, parent: Pid) -> io::Result<()> {
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

/// How the given descriptors cross exec.
#[derive(Debug, Clone)]
enum Passing {
    /// At the numbers they have (`FD_CLOEXEC` cleared on each).
    Keep(Vec<RawFd>),
    /// Moved onto 3, 4, … in order; `scratch` is room for the high copies,
    /// allocated before the fork.
    FromThree { sources: Vec<RawFd>, scratch: Vec<RawFd> },
}

/// What every child does between fork and exec, prepared before the fork.
#[derive(Debug, Clone)]
struct Setup {
    /// The parent-death signal, and the parent's pid read before the fork.
    death: Option<(Signal, Pid)>,
    fds: Passing,
    priority: Priority,
}

impl Setup {
    fn new(fds: Passing, death: Option<Signal>, priority: Priority) -> Setup {
        Setup { death: death.map(|signal| (signal, nix::unistd::getpid())), fds, priority }
    }

    /// In the child: the empty signal mask, the parent-death signal, the
    /// descriptors. Async-signal-safe: system calls only, into memory
    /// allocated before the fork.
    fn enter(&mut self) -> io::Result<()> {
        empty_signal_mask()?;
        if let Some((signal, parent)) = self.death {
            die_with_parent(signal, parent)?;
        }
        if self.priority == Priority::Idle {
            priority::enter_idle()?;
        }
        match &mut self.fds {
            Passing::Keep(fds) => descriptors::keep_open(fds),
            Passing::FromThree { sources, scratch } => {
                descriptors::place(sources, scratch).map_err(|f| io::Error::from_raw_os_error(f.errno))
            }
        }
    }
}

/// Sets up `cmd` as every child is started (see the module docs): an empty
/// signal mask, `keep` open across exec at the same numbers, and `death`
/// delivered to it when this process dies.
pub fn prepare(cmd: &mut Command, keep: &[BorrowedFd<'_>], death: Option<Signal>) {
    prepare_with(cmd, keep, death, Priority::Inherit);
}

/// [`prepare`], starting the child at `priority` ([`priority`]).
pub fn prepare_with(cmd: &mut Command, keep: &[BorrowedFd<'_>], death: Option<Signal>, priority: Priority) {
    let raw: Vec<RawFd> = keep.iter().map(|fd| fd.as_raw_fd()).collect();
    let mut setup = Setup::new(Passing::Keep(raw), death, priority);
    // SAFETY: the closure runs between fork and exec and calls only
    // async-signal-safe functions (sigprocmask, prctl, getppid,
    // sched_setscheduler, fcntl) on
    // values captured before the fork; it does not allocate.
    unsafe {
        cmd.pre_exec(move || setup.enter());
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
