//! A child's program, arguments, environment and sockets under the
//! LISTEN_FDS convention, prepared before any fork ([`Launch::new`]) and
//! started through the one child launcher ([`crate::child::Image`]): in
//! place for `exec`, as a child for each generation of `run`.
//!
//! The environment is ours minus any inherited `LISTEN_*`, with the
//! caller's additions, `LISTEN_FDS` and `LISTEN_FDNAMES`; `LISTEN_PID` is
//! filled in by the child itself (its pid is unknown before the fork).

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::{resolve_program, ExecError, PassedSocket};
use crate::child::{ExecFailure, Image, NulByte};
use crate::systemd::listen::{LISTEN_ENV, LISTEN_FDNAMES, LISTEN_FDS, LISTEN_FDS_START, LISTEN_PID};

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

fn env_entry(key: &OsStr, value: &OsStr) -> OsString {
    let mut entry = key.to_os_string();
    entry.push("=");
    entry.push(value);
    entry
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
            vars.push(format!("{LISTEN_FDS}={}", sockets.len()).into());
            vars.push(format!("{LISTEN_FDNAMES}={}", names.join(":")).into());
        }

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
        let own_pid = (!sockets.is_empty()).then_some(LISTEN_PID);
        let image = Image::new(path.clone(), command, &vars, own_pid).map_err(|NulByte(text)| ExecError::Nul(text))?;
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
    pub fn exec(self, sockets: Vec<PassedSocket>) -> ExecError {
        let fds: Vec<OwnedFd> = sockets.into_iter().map(|s| s.fd).collect();
        let n = fds.len();
        let program = self.program.clone();
        match self.image.exec(fds) {
            ExecFailure::Place { index, step, source } => ExecError::Place {
                slot: LISTEN_FDS_START + index as RawFd,
                role: self.roles.get(index.min(n.saturating_sub(1))).cloned().unwrap_or_default(),
                step,
                source,
            },
            ExecFailure::Exec(source) => ExecError::Exec { program, source },
        }
    }

    /// Starts the program as a child with the sockets at 3, 4, … in the child
    /// only, `LISTEN_PID` set to the child's pid, and `PR_SET_PDEATHSIG`
    /// (SIGTERM) so the child does not outlive this process, at `priority`.
    /// Returns its pid.
    ///
    /// The caller must be single-threaded while this runs (see
    /// [`crate::child::Image::spawn`]).
    pub fn spawn(&self, owner: &[PassedSocket], priority: crate::child::Priority) -> Result<Pid, ExecError> {
        let fds: Vec<BorrowedFd<'_>> = owner.iter().map(|s| s.fd.as_fd()).collect();
        self.image.spawn(&fds, Signal::SIGTERM, priority).map_err(|source: io::Error| ExecError::Spawn {
            program: self.program.clone(),
            roles: self.roles.join(", "),
            source,
        })
    }
}
