//! The raw `execve` path: a child whose environment holds its own pid
//! (`LISTEN_PID`), which is unknown until after `fork()`.
//!
//! Why `execve` inside `pre_exec` (instead of letting `Command` exec):
//! `Command` builds `envp` in the parent. Setting the variable with
//! `setenv()` in the child is not async-signal-safe (it allocates), and a
//! re-exec just to learn the pid costs a second `execve` per generation. So
//! [`Image::new`] prepares `argv` and `envp` with a fixed-size slot for that
//! variable, and the child (after the steps every child takes, see
//! [`super`]) writes its pid's digits into it and calls `execve` itself:
//! only async-signal-safe system calls run between fork and exec. `Command`
//! still does the rest (fork, reporting an exec error to the parent through
//! its close-on-exec pipe, restoring SIGPIPE).

use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::libc;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::descriptors::{place, plug_slots, seal_inherited_descriptors};
use super::{Passing, Priority, Setup};
use crate::systemd::listen::LISTEN_FDS_START;

/// An argument or environment entry with a NUL byte: `execve` cannot take it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: contains a NUL byte")]
pub struct NulByte(pub OsString);

/// Why [`Image::exec`] returned.
#[derive(Debug)]
pub enum ExecFailure {
    /// Moving descriptor `index` (in slot order) onto its slot failed.
    Place {
        /// Which descriptor.
        index: usize,
        /// The system call that failed.
        step: &'static str,
        /// The cause.
        source: io::Error,
    },
    /// `execve` failed.
    Exec(io::Error),
}

/// A program, its arguments and environment, prepared before the fork so
/// that the child only makes async-signal-safe system calls; the descriptors
/// it gets at 3, 4, … are given to [`Image::spawn`] or [`Image::exec`].
pub struct Image {
    program: PathBuf,
    path: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// Index of the own-pid entry in `envp_ptrs`, if there is one.
    pid_slot: Option<usize>,
    /// `NAME=` followed by room for the digits and the NUL.
    pid_buf: Vec<u8>,
}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image").field("program", &self.program).finish()
    }
}

fn cstring(text: &OsStr) -> Result<CString, NulByte> {
    CString::new(text.as_bytes()).map_err(|_| NulByte(text.to_os_string()))
}

impl Image {
    /// Prepares `program` (a resolved path) with `argv` and `env` (`NAME=VALUE`
    /// entries, the whole environment); with `own_pid_var`, the child also
    /// gets that variable set to its own pid.
    pub fn new(
        program: PathBuf,
        argv: &[OsString],
        env: &[OsString],
        own_pid_var: Option<&str>,
    ) -> Result<Image, NulByte> {
        let path = cstring(program.as_os_str())?;
        let argv: Vec<CString> = argv.iter().map(|a| cstring(a)).collect::<Result<_, _>>()?;
        let envp: Vec<CString> = env.iter().map(|v| cstring(v)).collect::<Result<_, _>>()?;
        let mut argv_ptrs: Vec<_> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut envp_ptrs: Vec<_> = envp.iter().map(|e| e.as_ptr()).collect();
        let mut pid_buf = Vec::new();
        let pid_slot = own_pid_var.map(|name| {
            pid_buf.extend_from_slice(name.as_bytes());
            pid_buf.push(b'=');
            // Room for a u32's ten digits and the NUL.
            pid_buf.resize(pid_buf.len() + 11, 0);
            envp_ptrs.push(std::ptr::null()); // replaced by pid_buf in the child
            envp_ptrs.len() - 1
        });
        envp_ptrs.push(std::ptr::null());
        Ok(Image { program, path, _argv: argv, argv_ptrs, _envp: envp, envp_ptrs, pid_slot, pid_buf })
    }

    /// The program's path.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// What the child runs: `setup`, then `execve` of this image. The
    /// pointer arrays point into this image's strings, which must outlive
    /// the fork (the child has its own copy of the memory).
    fn hook(&self, setup: Setup) -> Hook {
        Hook {
            setup,
            path: self.path.as_ptr(),
            argv_ptrs: self.argv_ptrs.clone(),
            envp_ptrs: self.envp_ptrs.clone(),
            pid_slot: self.pid_slot,
            pid_prefix: self.pid_buf.len().saturating_sub(11),
            pid_buf: self.pid_buf.clone(),
        }
    }

    /// Starts the program as a child with `fds` at 3, 4, … in the child only
    /// and `death` delivered to it when this process dies, at `priority`.
    /// Returns its pid.
    ///
    /// The caller must be single-threaded while this runs (see `plug_slots`).
    pub fn spawn(&self, fds: &[BorrowedFd<'_>], death: Signal, priority: Priority) -> io::Result<Pid> {
        let _plugs = plug_slots(fds)?;
        let sources: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let scratch = vec![-1; sources.len()];
        let mut hook = self.hook(Setup::new(Passing::FromThree { sources, scratch }, Some(death), priority));
        let mut cmd = Command::new(&self.program);
        // SAFETY: `Hook::enter` makes only async-signal-safe system calls
        // (sigprocmask, prctl, getppid, sched_setscheduler, fcntl, dup2,
        // close, close_range, getpid, execve) and writes only into memory allocated before the fork.
        unsafe {
            cmd.pre_exec(move || hook.enter());
        }
        let child = cmd.spawn()?;
        // The caller reaps (the supervisor, with waitpid(-1)); dropping the
        // Child handle neither waits nor kills.
        Ok(Pid::from_raw(child.id() as i32))
    }

    /// Replaces this process with the program, `fds` at 3, 4, …. Returns
    /// only on failure.
    ///
    /// Takes the descriptors: once they are moved onto 3, 4, … their old
    /// numbers may name other descriptors, so nothing may own them any more;
    /// they die with the process image (close-on-exec).
    pub fn exec(self, fds: Vec<OwnedFd>) -> ExecFailure {
        let mut sources: Vec<RawFd> = fds.into_iter().map(IntoRawFd::into_raw_fd).collect();
        if let Err(e) = seal_inherited_descriptors() {
            log::warn!("could not check inherited descriptors in /proc/self/fd: {e}");
        }
        // Place the descriptors in ordinary code first, so a failure names
        // the descriptor and the step; the hook then finds them in place.
        let mut scratch = vec![-1; sources.len()];
        if let Err(fail) = place(&sources, &mut scratch) {
            let source = io::Error::from_raw_os_error(fail.errno);
            return ExecFailure::Place { index: fail.index, step: fail.step, source };
        }
        for (i, src) in sources.iter_mut().enumerate() {
            *src = LISTEN_FDS_START + i as RawFd;
        }
        let mut hook = self.hook(Setup::new(Passing::FromThree { sources, scratch }, None, Priority::Inherit));
        let mut cmd = Command::new(&self.program);
        // SAFETY: as in `spawn`; here no fork even happens, Command::exec
        // runs the hook in this process, and `self` (the strings the hook
        // points into) lives until this function returns.
        unsafe {
            cmd.pre_exec(move || hook.enter());
        }
        ExecFailure::Exec(cmd.exec())
    }
}

/// The child's side of an [`Image`]: the steps every child takes, then its
/// own pid into the environment, then `execve`.
struct Hook {
    setup: Setup,
    path: *const libc::c_char,
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
    pid_slot: Option<usize>,
    /// Where the digits go in `pid_buf`.
    pid_prefix: usize,
    pid_buf: Vec<u8>,
}

// SAFETY: the raw pointers point into the CStrings of the Image the hook was
// made from (heap buffers that outlive the spawn or exec) and are only read,
// by execve, in the process that is about to replace itself.
unsafe impl Send for Hook {}
// SAFETY: as above; `&Hook` gives no access to the pointers.
unsafe impl Sync for Hook {}

impl Hook {
    /// Runs in the child (or in place). Returns only on failure, with the
    /// errno (the only thing `Command` can carry back to the parent).
    fn enter(&mut self) -> io::Result<()> {
        self.setup.enter()?;
        if let Some(slot) = self.pid_slot {
            // SAFETY: getpid has no arguments.
            let pid = unsafe { libc::getpid() };
            write_decimal(&mut self.pid_buf[self.pid_prefix..], pid as u32);
            self.envp_ptrs[slot] = self.pid_buf.as_ptr().cast();
        }
        // SAFETY: path, argv and envp are NUL-terminated strings in
        // NULL-terminated arrays, all alive for the call (owned by the Image
        // the parent keeps, or by this Hook); execve does not return on success.
        unsafe { libc::execve(self.path, self.argv_ptrs.as_ptr(), self.envp_ptrs.as_ptr()) };
        Err(io::Error::last_os_error())
    }
}

/// Writes `n` in decimal and a NUL into `buf` without allocating.
fn write_decimal(buf: &mut [u8], mut n: u32) {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[i] = digits[len - 1 - i];
    }
    buf[len] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_without_allocation() {
        let mut buf = [0xffu8; 12];
        write_decimal(&mut buf, 4194304);
        assert_eq!(&buf[..8], b"4194304\0");
        write_decimal(&mut buf, 0);
        assert_eq!(&buf[..2], b"0\0");
        write_decimal(&mut buf, u32::MAX);
        assert_eq!(&buf[..11], b"4294967295\0");
    }

    /// Through the real fork and exec: the variable holds the child's own
    /// pid, the descriptor sits at 3, nothing else is inherited, no signal
    /// is blocked.
    #[test]
    fn the_child_gets_its_own_pid_and_the_descriptor_at_three() {
        let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let out = std::env::temp_dir().join(format!("sockbroker-image-test.{}", std::process::id()));
        let script = format!(
            "{{ echo \"$LISTEN_PID $$\"; test -S /proc/self/fd/3 && echo three; grep SigBlk /proc/self/status; }} > {}",
            out.display()
        );
        let argv: Vec<OsString> = ["sh", "-c", &script].iter().map(OsString::from).collect();
        let image = Image::new("/bin/sh".into(), &argv, &[], Some("LISTEN_PID")).unwrap();
        let pid = image.spawn(&[std::os::fd::AsFd::as_fd(&sock)], Signal::SIGTERM, Priority::Inherit).unwrap();
        let (status, killed) = super::super::wait_with_deadline(pid, std::time::Duration::from_secs(30)).unwrap();
        assert!(status.success() && !killed, "{status:?}");
        let text = std::fs::read_to_string(&out).unwrap();
        let _ = std::fs::remove_file(&out);
        assert!(text.starts_with(&format!("{pid} {pid}\n")), "{text}");
        assert!(text.contains("three\n"), "{text}");
        assert!(text.contains("SigBlk:\t0000000000000000"), "{text}");
    }

    #[test]
    fn a_nul_byte_is_refused_before_any_fork() {
        let argv = vec![OsString::from("sh"), OsString::from("a\0b")];
        assert_eq!(Image::new("/bin/sh".into(), &argv, &[], None).unwrap_err(), NulByte("a\0b".into()));
    }
}
