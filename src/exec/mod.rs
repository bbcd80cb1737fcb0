//! `sockbroker exec`: the LISTEN_FDS convention, out.
//!
//! A daemon that calls `sd_listen_fds()` expects its sockets at descriptors
//! 3, 4, … and three variables: `LISTEN_FDS` (how many), `LISTEN_PID` (its own
//! pid, so a grandchild does not take them by mistake) and `LISTEN_FDNAMES`
//! (`:`-separated names); the names and rules are [`crate::systemd::listen`]'s.
//! This module produces exactly that, for `exec` (the process replaces
//! itself, so `LISTEN_PID` is its own pid) and for the supervisor's
//! generations (a forked child, whose pid only the child knows).
//!
//! Data flow:
//! 1. [`SocketArg`]s (from `--socket`, [`socket_arg`]) → [`fetch`] asks the
//!    broker (or, with `--fallback-bind`, [`crate::socket::open`]) →
//!    [`PassedSocket`]s, each an `OwnedFd` with `FD_CLOEXEC` set and a role
//!    for error messages.
//! 2. [`Launch::new`] ([`launch`]) prepares everything the child needs
//!    *before* any fork: the resolved program path, `argv`, the environment.
//! 3. [`crate::child::Image`], the one child launcher, runs it in place
//!    ([`Launch::exec`]) or as a child ([`Launch::spawn`]): the sockets moved
//!    onto 3.. with `FD_CLOEXEC` clear on exactly those, an empty signal
//!    mask, its own pid in `LISTEN_PID=`, `execve`.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::client::{Client, ClientError};
use crate::socket::OpenError;
use crate::systemd::listen::{LISTEN_FDS_START, UNNAMED};

pub mod launch;
pub mod socket_arg;

pub use launch::Launch;
pub use socket_arg::{validate_fdname, SocketArg, SocketArgError, SocketSource};

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

/// One log line a socket: `fd 3 = web=tcp://… (LISTEN_FDNAMES 'web')`, in
/// slot order.
pub fn slot_lines(sockets: &[PassedSocket]) -> impl Iterator<Item = String> + '_ {
    sockets
        .iter()
        .enumerate()
        .map(|(i, s)| format!("fd {} = {} (LISTEN_FDNAMES '{}')", LISTEN_FDS_START + i as RawFd, s.role, s.fdname))
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
    /// The message names the argument and the cause, once: the error's own
    /// text would name the address again.
    #[error("binding {role} directly: {}", error.cause())]
    FallbackOpen {
        /// The argument.
        role: String,
        /// What failed.
        error: OpenError,
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
            (None, SocketSource::Spec(spec)) => crate::socket::open(spec)
                .map_err(|source| ExecError::FallbackOpen { role: role.clone(), error: source })?,
            (None, SocketSource::Name(_)) => return Err(ExecError::FallbackName { role }),
        };
        let fdname = arg.fdname.clone().unwrap_or_else(|| UNNAMED.to_string());
        out.push(PassedSocket { fd, fdname, role });
    }
    Ok(out)
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
    for line in slot_lines(&sockets) {
        log::debug!("{line}");
    }
    launch.exec(sockets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_like_execvp() {
        assert!(resolve_program(OsStr::new("sh")).unwrap().is_absolute());
        assert!(matches!(resolve_program(OsStr::new("no-such-program-xyz")), Err(ExecError::NotFound(_))));
        assert!(matches!(resolve_program(OsStr::new("/etc/passwd")), Err(ExecError::NotFound(_))));
    }
}
