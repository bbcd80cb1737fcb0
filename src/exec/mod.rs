//! `sockbroker exec`: the LISTEN_FDS convention, out.
//!
//! A daemon that calls `sd_listen_fds()` expects its sockets at descriptors
//! 3, 4, … and three variables: `LISTEN_FDS` (how many), `LISTEN_PID` (its own
//! pid, so a grandchild does not take them by mistake) and `LISTEN_FDNAMES`
//! (`:`-separated names). This module produces exactly that, for `exec` (the
//! process replaces itself, so `LISTEN_PID` is its own pid) and for the
//! supervisor's generations (a forked child, whose pid only the child knows).
//!
//! Data flow:
//! 1. [`SocketArg`]s (from `--socket`) → [`fetch`] asks the broker (or, with
//!    `--fallback-bind`, [`crate::socket::open`]) → [`PassedSocket`]s, each an
//!    `OwnedFd` with `FD_CLOEXEC` set and a role for error messages.
//! 2. [`Launch::new`] prepares everything the child needs *before* any fork:
//!    the resolved program path, `argv`, the environment, a buffer for
//!    `LISTEN_PID`. Nothing after the fork allocates.
//! 3. In the child ([`Launch::spawn`]) or in place ([`Launch::exec`]), the
//!    `pre_exec` hook moves the sockets onto 3.. (dup high first, then dup2
//!    down, so sockets already sitting in 3..N are never clobbered), which
//!    clears `FD_CLOEXEC` on exactly those descriptors, marks every other
//!    descriptor close-on-exec, writes its own pid into `LISTEN_PID=` and
//!    calls `execve`.
//!
//! Why `execve` inside `pre_exec` (instead of letting `Command` exec): the
//! child's environment must contain its own pid, which is unknown until after
//! `fork()`, and `Command` builds `envp` in the parent. Setting it with
//! `setenv()` in the child is not async-signal-safe (it allocates), and a
//! re-exec of `sockbroker` just to learn the pid costs a second `execve` per
//! generation. So the parent prepares `envp` with a fixed-size `LISTEN_PID`
//! slot, and the child fills the digits in with `getpid()` and calls `execve`
//! itself: only async-signal-safe system calls run between fork and exec.
//! `Command` still does the rest (fork, reporting an exec error to the parent
//! through its close-on-exec pipe, restoring SIGPIPE); the hook empties the
//! signal mask, which `Command` leaves as the parent's.

use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use nix::libc;

use crate::client::{Client, ClientError};
use crate::socket::OpenError;
use crate::spec::{SocketSpec, SpecError};

/// The first descriptor of the LISTEN_FDS convention (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;
/// The name `sd_listen_fds_with_names()` reports for a socket nobody named.
pub const UNNAMED: &str = "unknown";
/// The longest descriptor name systemd accepts.
pub const FDNAME_MAX: usize = 255;
/// Environment variables of the convention; inherited values are always replaced.
pub const LISTEN_ENV: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// Where a socket handed to the child comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketSource {
    /// A socket spec: the broker finds or creates it.
    Spec(SocketSpec),
    /// A name the broker already holds a socket under.
    Name(String),
}

/// One `--socket` argument: `SPEC`, `NAME` or `NAME=SPEC`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketArg {
    /// What to ask the broker for.
    pub source: SocketSource,
    /// The name in `LISTEN_FDNAMES`; a bare spec has none ([`UNNAMED`]).
    pub fdname: Option<String>,
}

/// Why a `--socket` argument or a descriptor name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocketArgError {
    /// The spec part does not parse.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The name is not a valid `LISTEN_FDNAMES` entry.
    #[error("'{0}': not a valid descriptor name (1-255 printable ASCII characters, no ':')")]
    FdName(String),
}

/// Checks a `LISTEN_FDNAMES` entry as systemd does: 1 to 255 printable ASCII
/// characters, and no `:` (the separator).
pub fn validate_fdname(name: &str) -> Result<(), SocketArgError> {
    let ok =
        !name.is_empty() && name.len() <= FDNAME_MAX && name.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b':');
    if ok {
        Ok(())
    } else {
        Err(SocketArgError::FdName(name.to_string()))
    }
}

impl FromStr for SocketArg {
    type Err = SocketArgError;

    /// `NAME=SPEC` names a spec; text with a `:` is a spec; anything else is
    /// the name of a socket the broker holds (and its `LISTEN_FDNAMES` entry).
    fn from_str(text: &str) -> Result<Self, SocketArgError> {
        // A spec may contain '=' (unix:/a=b) but a name never contains ':',
        // so "NAME=" is only a name when the part before '=' has no ':'.
        if let Some((name, spec)) = text.split_once('=').filter(|(name, _)| !name.contains(':')) {
            validate_fdname(name)?;
            return Ok(SocketArg { source: SocketSource::Spec(spec.parse()?), fdname: Some(name.to_string()) });
        }
        if text.contains(':') {
            return Ok(SocketArg { source: SocketSource::Spec(text.parse()?), fdname: None });
        }
        validate_fdname(text)?;
        Ok(SocketArg { source: SocketSource::Name(text.to_string()), fdname: Some(text.to_string()) })
    }
}

impl fmt::Display for SocketArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.source, &self.fdname) {
            (SocketSource::Spec(spec), Some(name)) => write!(f, "{name}={spec}"),
            (SocketSource::Spec(spec), None) => write!(f, "{spec}"),
            (SocketSource::Name(name), _) => write!(f, "socket named '{name}'"),
        }
    }
}

/// A socket on its way to a child: close-on-exec until it is placed.
#[derive(Debug)]
pub struct PassedSocket {
    /// The socket.
    pub fd: OwnedFd,
    /// Its `LISTEN_FDNAMES` entry.
    pub fdname: String,
    /// What it is, for messages: the argument it came from.
    pub role: String,
}

/// Everything that can stop `exec` (or a generation's start).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The broker could not be reached.
    #[error("cannot get sockets from the broker (start it, or pass --fallback-bind to bind directly): {0}")]
    Unreachable(#[source] ClientError),
    /// The broker refused or failed one socket; the argument is named
    /// unless the cause already names it.
    #[error("getting {} from the broker: {source}", if source.to_string().contains(role.as_str()) { "a socket" } else { role.as_str() })]
    Fetch {
        /// The argument.
        role: String,
        /// The cause.
        #[source]
        source: ClientError,
    },
    /// `--fallback-bind` cannot bind a name: only the broker knows what it means.
    #[error("{role}: cannot bind a socket name directly; give a spec (NAME=SPEC) to use --fallback-bind")]
    FallbackName {
        /// The argument.
        role: String,
    },
    /// `--fallback-bind` failed to bind.
    #[error("binding {role} directly: {source}")]
    FallbackOpen {
        /// The argument.
        role: String,
        /// The cause.
        #[source]
        source: OpenError,
    },
    /// The program is not an executable file, or not found in `PATH`.
    #[error("{}: command not found (not an executable file, nor in PATH)", .0.display())]
    NotFound(PathBuf),
    /// An argument or environment entry contains a NUL byte.
    #[error("{0:?}: contains a NUL byte")]
    Nul(OsString),
    /// A descriptor to pass is not usable.
    #[error("fd {fd} ({role}): {source}")]
    BadDescriptor {
        /// The descriptor number.
        fd: RawFd,
        /// Which socket it is.
        role: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Moving a socket onto its slot failed (exec in place).
    #[error("placing {role} at fd {slot}: {step}: {source}")]
    Place {
        /// The target descriptor number.
        slot: RawFd,
        /// Which socket it is.
        role: String,
        /// The system call that failed.
        step: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `execve` failed (exec in place).
    #[error("executing {}: {source}", .program.display())]
    Exec {
        /// The program.
        program: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// fork or the child's preparation failed (spawn); the child reports only an errno.
    #[error("starting {} with {roles}: {source}", .program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The sockets it was to get, with their descriptor numbers.
        roles: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Gets the sockets for `args`, in order, from the broker at the client
/// default path. With `fallback_bind`, an unreachable broker is a warning and
/// the sockets are bound directly.
pub fn fetch(args: &[SocketArg], fallback_bind: bool) -> Result<Vec<PassedSocket>, ExecError> {
    let mut client = match Client::connect_default() {
        Ok(client) => Some(client),
        Err(e @ ClientError::Connect { .. }) if fallback_bind => {
            log::warn!(
                "{}; binding the sockets directly (--fallback-bind): they are not shared, so a reload or \
                 restart may drop connections",
                crate::error_chain(&e)
            );
            None
        }
        Err(e) => return Err(ExecError::Unreachable(e)),
    };
    let mut out = Vec::with_capacity(args.len());
    for arg in args {
        let role = arg.to_string();
        let fetch_err = |source| ExecError::Fetch { role: role.clone(), source };
        let fd = match (&mut client, &arg.source) {
            (Some(c), SocketSource::Spec(spec)) => c.bind(spec).map_err(fetch_err)?,
            (Some(c), SocketSource::Name(name)) => c.bind_name(name).map_err(fetch_err)?,
            (None, SocketSource::Spec(spec)) => {
                crate::socket::open(spec).map_err(|source| ExecError::FallbackOpen { role: role.clone(), source })?
            }
            (None, SocketSource::Name(_)) => return Err(ExecError::FallbackName { role }),
        };
        let fdname = arg.fdname.clone().unwrap_or_else(|| UNNAMED.to_string());
        out.push(PassedSocket { fd, fdname, role });
    }
    Ok(out)
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

/// Finds `program` as `execvp` would: a name with a `/` is used as it is,
/// anything else is searched in `PATH`.
pub fn resolve_program(program: &OsStr) -> Result<PathBuf, ExecError> {
    let is_exec = |p: &Path| nix::unistd::access(p, nix::unistd::AccessFlags::X_OK).is_ok() && p.is_file();
    if program.as_bytes().contains(&b'/') {
        let path = PathBuf::from(program);
        return if is_exec(&path) { Ok(path) } else { Err(ExecError::NotFound(path)) };
    }
    let path_var = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path_var)
        .map(|dir| dir.join(program))
        .find(|p| is_exec(p))
        .ok_or_else(|| ExecError::NotFound(PathBuf::from(program)))
}

/// A child's program, arguments, environment and sockets, prepared before the
/// fork so that the child only makes async-signal-safe system calls.
pub struct Launch {
    program: PathBuf,
    roles: Vec<String>,
    image: Image,
}

impl fmt::Debug for Launch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Launch").field("program", &self.program).field("roles", &self.roles).finish()
    }
}

/// The raw material of `execve`, owned in one place.
struct Image {
    path: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// Index of the `LISTEN_PID=` entry in `envp_ptrs`, if there are sockets.
    pid_slot: Option<usize>,
    /// `LISTEN_PID=` followed by room for the digits and the NUL.
    pid_buf: [u8; 32],
    /// The sockets' current descriptor numbers, in slot order.
    sources: Vec<RawFd>,
    /// Room for the high copies, so the child does not allocate.
    scratch: Vec<RawFd>,
    /// The parent's pid, for the death-signal race check (spawn only).
    parent: Option<libc::pid_t>,
}

// SAFETY: the raw pointers point into the CStrings owned by the same Image
// (heap buffers that do not move when the Image moves) and are only read, by
// execve, in the process that is about to replace itself.
unsafe impl Send for Image {}
// SAFETY: as above; `&Image` gives no access to the pointers.
unsafe impl Sync for Image {}

const PID_PREFIX: &[u8] = b"LISTEN_PID=";

fn env_entry(key: &OsStr, value: &OsStr) -> OsString {
    let mut entry = key.to_os_string();
    entry.push("=");
    entry.push(value);
    entry
}

fn cstring(text: &OsStr) -> Result<CString, ExecError> {
    CString::new(text.as_bytes()).map_err(|_| ExecError::Nul(text.to_os_string()))
}

impl Launch {
    /// Prepares `command` (program and arguments) to run with `sockets` at
    /// 3, 4, …, and the current environment minus any inherited `LISTEN_*`,
    /// with `env` applied on top (`None` removes a variable).
    pub fn new(
        command: &[OsString],
        sockets: &[PassedSocket],
        env: &[(&str, Option<OsString>)],
    ) -> Result<Launch, ExecError> {
        let (program, _) = command.split_first().ok_or_else(|| ExecError::NotFound(PathBuf::new()))?;
        let path = resolve_program(program)?;
        let argv: Vec<CString> = command.iter().map(|a| cstring(a)).collect::<Result<_, _>>()?;

        let overridden = |k: &OsStr| LISTEN_ENV.iter().chain(env.iter().map(|(k, _)| k)).any(|name| k == *name);
        let mut vars: Vec<OsString> =
            std::env::vars_os().filter(|(k, _)| !overridden(k)).map(|(k, v)| env_entry(&k, &v)).collect();
        for (k, v) in env {
            if let Some(v) = v {
                vars.push(env_entry(OsStr::new(k), v));
            }
        }
        if !sockets.is_empty() {
            let names: Vec<&str> = sockets.iter().map(|s| s.fdname.as_str()).collect();
            vars.push(format!("LISTEN_FDS={}", sockets.len()).into());
            vars.push(format!("LISTEN_FDNAMES={}", names.join(":")).into());
        }
        let envp: Vec<CString> = vars.iter().map(|v| cstring(v)).collect::<Result<_, _>>()?;

        let mut roles = Vec::with_capacity(sockets.len());
        for (i, s) in sockets.iter().enumerate() {
            let slot = LISTEN_FDS_START + i as RawFd;
            crate::fd::is_cloexec(s.fd.as_fd()).map_err(|source| ExecError::BadDescriptor {
                fd: s.fd.as_raw_fd(),
                role: s.role.clone(),
                source,
            })?;
            roles.push(format!("fd {slot} = {} ({})", s.role, s.fdname));
        }

        let mut argv_ptrs: Vec<_> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut envp_ptrs: Vec<_> = envp.iter().map(|e| e.as_ptr()).collect();
        let pid_slot = if sockets.is_empty() {
            None
        } else {
            envp_ptrs.push(std::ptr::null()); // replaced by pid_buf in the child
            Some(envp_ptrs.len() - 1)
        };
        envp_ptrs.push(std::ptr::null());
        let mut pid_buf = [0u8; 32];
        pid_buf[..PID_PREFIX.len()].copy_from_slice(PID_PREFIX);

        let image = Image {
            path: cstring(path.as_os_str())?,
            _argv: argv,
            argv_ptrs,
            _envp: envp,
            envp_ptrs,
            pid_slot,
            pid_buf,
            sources: sockets.iter().map(|s| s.fd.as_raw_fd()).collect(),
            scratch: vec![-1; sockets.len()],
            parent: None,
        };
        Ok(Launch { program: path, roles, image })
    }

    /// The resolved program path.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Replaces this process with the program. Returns only on failure.
    ///
    /// Takes the sockets passed to [`Launch::new`]: once they are moved onto
    /// 3, 4, … their old numbers may name other sockets, so nothing may own
    /// them any more; they die with the process image (close-on-exec).
    pub fn exec(mut self, sockets: Vec<PassedSocket>) -> ExecError {
        let _raw: Vec<RawFd> = sockets.into_iter().map(|s| s.fd.into_raw_fd()).collect();
        if let Err(e) = seal_inherited_descriptors() {
            log::warn!("could not check inherited descriptors in /proc/self/fd: {e}");
        }
        // Place the sockets in ordinary code first, so a failure names the
        // descriptor and the step; the pre_exec hook then finds them in place.
        let n = self.image.sources.len();
        if let Err(fail) = place(&self.image.sources, &mut self.image.scratch) {
            let role = self.roles.get(fail.index.min(n.saturating_sub(1))).cloned().unwrap_or_default();
            return ExecError::Place {
                slot: LISTEN_FDS_START + fail.index as RawFd,
                role,
                step: fail.step,
                source: io::Error::from_raw_os_error(fail.errno),
            };
        }
        for (i, src) in self.image.sources.iter_mut().enumerate() {
            *src = LISTEN_FDS_START + i as RawFd;
        }
        let program = self.program.clone();
        let mut image = self.image;
        let mut cmd = Command::new(&program);
        // SAFETY: the hook only makes async-signal-safe system calls on
        // memory prepared before (see `Image::enter`); here no fork even
        // happens, Command::exec runs it in this process.
        unsafe {
            cmd.pre_exec(move || image.enter());
        }
        let source = cmd.exec();
        ExecError::Exec { program, source }
    }

    /// Starts the program as a child with the sockets at 3, 4, … in the child
    /// only, `LISTEN_PID` set to the child's pid, and `PR_SET_PDEATHSIG`
    /// (SIGTERM) so the child does not outlive this process. Returns its pid.
    ///
    /// The caller must be single-threaded while this runs (see `plug_slots`).
    pub fn spawn(&self, owner: &[PassedSocket]) -> Result<nix::unistd::Pid, ExecError> {
        let spawn_err =
            |source| ExecError::Spawn { program: self.program.clone(), roles: self.roles.join(", "), source };
        let _plugs = plug_slots(owner, self.image.sources.len()).map_err(spawn_err)?;
        let mut image = Image {
            path: self.image.path.clone(),
            _argv: Vec::new(),
            argv_ptrs: self.image.argv_ptrs.clone(),
            _envp: Vec::new(),
            envp_ptrs: self.image.envp_ptrs.clone(),
            pid_slot: self.image.pid_slot,
            pid_buf: self.image.pid_buf,
            sources: self.image.sources.clone(),
            scratch: self.image.scratch.clone(),
            parent: Some(nix::unistd::getpid().as_raw()),
        };
        // The pointer arrays still point into self.image's CStrings, which
        // outlive the spawn (the child has its own copy of the memory).
        let mut cmd = Command::new(&self.program);
        // SAFETY: `Image::enter` makes only async-signal-safe system calls
        // (fcntl, dup2, close, close_range, prctl, getppid, getpid, execve)
        // and writes only into memory allocated before the fork.
        unsafe {
            cmd.pre_exec(move || image.enter());
        }
        let child = cmd.spawn().map_err(spawn_err)?;
        // The supervisor reaps with waitpid(-1); the Child handle is not used
        // for waiting, and dropping it neither waits nor kills.
        Ok(nix::unistd::Pid::from_raw(child.id() as i32))
    }
}

/// Occupies every free descriptor number in 3..3+n with a close-on-exec
/// copy of one of the sockets, until the returned guards drop.
///
/// Why: `Command::spawn` opens its exec-error pipe at the lowest free
/// numbers; if that landed in 3..3+n, the child's dup2 onto the slots would
/// replace it, and a failed exec would look like a success to the parent.
fn plug_slots(owner: &[PassedSocket], n: usize) -> io::Result<Vec<OwnedFd>> {
    let mut plugs = Vec::new();
    let Some(first) = owner.first() else { return Ok(plugs) };
    let end = LISTEN_FDS_START + n as RawFd;
    loop {
        // try_clone is F_DUPFD_CLOEXEC from 3: the lowest free number >= 3.
        let plug = first.fd.try_clone()?;
        if plug.as_raw_fd() >= end {
            return Ok(plugs);
        }
        plugs.push(plug);
    }
}

/// Where placing the sockets failed.
#[derive(Debug, Clone, Copy)]
struct PlaceFailure {
    index: usize,
    step: &'static str,
    errno: i32,
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
fn place(sources: &[RawFd], scratch: &mut [RawFd]) -> Result<(), PlaceFailure> {
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

impl Image {
    /// Runs in the child (or in place): place the sockets, set the death
    /// signal, fill in `LISTEN_PID`, `execve`. Returns only on failure, with
    /// the errno (the only thing `Command` can carry back to the parent).
    fn enter(&mut self) -> io::Result<()> {
        // Every generation starts with no signal blocked, whatever the
        // supervisor blocks for its signalfd (see crate::child).
        crate::child::empty_signal_mask()?;
        if let Some(parent) = self.parent {
            crate::child::die_with_parent(nix::sys::signal::Signal::SIGTERM, nix::unistd::Pid::from_raw(parent))?;
        }
        place(&self.sources, &mut self.scratch).map_err(|f| io::Error::from_raw_os_error(f.errno))?;
        if let Some(slot) = self.pid_slot {
            // SAFETY: getpid has no arguments.
            let pid = unsafe { libc::getpid() };
            write_decimal(&mut self.pid_buf[PID_PREFIX.len()..], pid as u32);
            self.envp_ptrs[slot] = self.pid_buf.as_ptr().cast();
        }
        // SAFETY: path, argv and envp are NUL-terminated strings in
        // NULL-terminated arrays, all alive for the call (owned by the Launch
        // the parent keeps, or by this Image); execve does not return on success.
        unsafe { libc::execve(self.path.as_ptr(), self.argv_ptrs.as_ptr(), self.envp_ptrs.as_ptr()) };
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

/// `sockbroker exec`: fetch the sockets and replace this process with `command`.
pub fn run(args: &[SocketArg], fallback_bind: bool, command: &[OsString]) -> ExecError {
    let sockets = match fetch(args, fallback_bind) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let launch = match Launch::new(command, &sockets, &[]) {
        Ok(l) => l,
        Err(e) => return e,
    };
    for (i, s) in sockets.iter().enumerate() {
        log::debug!("fd {} = {} (LISTEN_FDNAMES '{}')", LISTEN_FDS_START + i as RawFd, s.role, s.fdname);
    }
    launch.exec(sockets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_args() {
        let a: SocketArg = "web=tcp://127.0.0.1:80".parse().unwrap();
        assert_eq!(a.fdname.as_deref(), Some("web"));
        assert!(matches!(a.source, SocketSource::Spec(_)));
        assert_eq!(a.to_string(), "web=tcp://127.0.0.1:80");

        let b: SocketArg = "unix:/run/a=b.sock".parse().unwrap();
        assert_eq!(b.fdname, None);
        assert_eq!(b.to_string(), "unix:/run/a=b.sock");

        let c: SocketArg = "admin".parse().unwrap();
        assert_eq!(c.source, SocketSource::Name("admin".into()));
        assert_eq!(c.fdname.as_deref(), Some("admin"));

        assert!(matches!("tcp://127.0.0.1:0".parse::<SocketArg>(), Err(SocketArgError::Spec(_))));
        assert!(matches!("bad\tname".parse::<SocketArg>(), Err(SocketArgError::FdName(_))));
        assert!(matches!("=tcp://127.0.0.1:80".parse::<SocketArg>(), Err(SocketArgError::FdName(_))));
        assert!(validate_fdname(&"x".repeat(FDNAME_MAX)).is_ok());
        assert!(validate_fdname(&"x".repeat(FDNAME_MAX + 1)).is_err());
    }

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

    #[test]
    fn resolves_like_execvp() {
        assert!(resolve_program(OsStr::new("sh")).unwrap().is_absolute());
        assert!(matches!(resolve_program(OsStr::new("no-such-program-xyz")), Err(ExecError::NotFound(_))));
        assert!(matches!(resolve_program(OsStr::new("/etc/passwd")), Err(ExecError::NotFound(_))));
    }
}
