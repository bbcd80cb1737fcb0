//! Re-executing the broker in place (SIGUSR1): the binary checked first
//! ([`validate_binary`]), the state written to a memfd named by
//! [`super::STATE_FD_ENV`], close-on-exec cleared on exactly the descriptors
//! the state names, then `execve`; on failure every flag is restored and the
//! broker carries on. The new image reads the state back ([`inherited`]).

use std::ffi::{CString, OsString};
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::state::{snapshot, Carried, HandoverState, Numbering};
use super::{UpgradeError, STATE_FD_ENV, VALIDATE_TIMEOUT};
use crate::fd;
use crate::server::Server;
use crate::systemd::notify;

/// The state left by a previous image of this process, if any.
pub(super) fn inherited() -> Result<Option<Carried>, UpgradeError> {
    let Some(value) = std::env::var_os(STATE_FD_ENV) else { return Ok(None) };
    // Read once and removed, so a child of the broker never sees it (this
    // runs at start-up, before any thread exists).
    std::env::remove_var(STATE_FD_ENV);
    let raw: RawFd = value
        .to_str()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| UpgradeError::State(format!("{STATE_FD_ENV}={value:?} is not a descriptor number")))?;
    let memfd = fd::take_inherited(&[raw])?.pop().expect("one descriptor asked, one taken");
    let mut text = String::new();
    std::fs::File::from(memfd).read_to_string(&mut text).map_err(UpgradeError::StateRead)?;
    let state: HandoverState =
        serde_json::from_str(&text).map_err(|source| UpgradeError::Json { what: "the re-exec state", source })?;
    let numbers: Vec<RawFd> = std::iter::once(state.control.fd)
        .chain(state.sockets.iter().map(|s| s.fd))
        .chain(state.connections.iter().map(|c| c.fd))
        .collect();
    let fds = numbers.iter().copied().zip(fd::take_inherited(&numbers)?).collect();
    Carried::from_state(state, fds, "re-exec".into()).map(Some)
}

/// The binary and arguments to re-execute, as they were when the broker
/// started: later, the path may hold a new binary (the point of SIGUSR1),
/// while `/proc/self/exe` would still name the old, possibly deleted, file.
#[derive(Debug, Clone)]
pub struct ExecTarget {
    /// The binary's path.
    pub path: PathBuf,
    /// The full argument list, `argv[0]` included.
    pub args: Vec<OsString>,
}

impl ExecTarget {
    /// Reads the path and arguments; call it first thing in `serve`.
    ///
    /// The path is `argv[0]` made absolute (or found in `PATH` when it has no
    /// '/'), without resolving symbolic links, so that switching a symlink to
    /// a new release is picked up by the next re-exec. `/proc/self/exe`
    /// (already resolved) is the fallback.
    pub fn at_start() -> io::Result<ExecTarget> {
        let args: Vec<OsString> = std::env::args_os().collect();
        let path = match args.first().map(Path::new) {
            Some(arg0) if arg0.as_os_str().as_bytes().contains(&b'/') => std::path::absolute(arg0)?,
            Some(arg0) => find_in_path(arg0).map_or_else(std::env::current_exe, Ok)?,
            None => std::env::current_exe()?,
        };
        Ok(ExecTarget { path, args })
    }
}

/// The first executable file called `name` in `PATH`, as a shell finds it.
fn find_in_path(name: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Re-executes the broker, keeping every held socket, the control socket and
/// the idle client connections. Returns only on failure, after restoring
/// every flag it changed, and logging why: the broker then carries on as
/// before.
///
/// The service manager is told RELOADING=1 first, and READY=1 afterwards by
/// the new image or, on failure, by this one.
pub fn reexec(server: &Server, target: &ExecTarget) -> UpgradeError {
    notify::reloading("re-executing");
    let err = try_reexec(server, target);
    // Logged before READY=1, so whoever waits for READY finds the reason.
    log::error!("re-exec failed, still serving: {}", crate::error_chain(&err));
    notify::ready("serving (re-exec failed)");
    err
}

fn try_reexec(server: &Server, target: &ExecTarget) -> UpgradeError {
    if let Err(e) = validate_binary(&target.path) {
        return e;
    }
    let (state, fds) = snapshot(server, Numbering::Raw);
    let memfd = match write_state(&state) {
        Ok(fd) => fd,
        Err(source) => return UpgradeError::Prepare { what: "writing the state to a memfd", source },
    };
    // The new image learns about its descriptors from the state alone:
    // socket-activation or multibinder variables left in the environment
    // would name descriptors it already takes from the state.
    let stale = |k: &std::ffi::OsStr| {
        k == STATE_FD_ENV
            || crate::systemd::listen::LISTEN_ENV.iter().any(|v| k == *v)
            || k.as_bytes().starts_with(crate::multibinder::MULTIBINDER_BIND_PREFIX.as_bytes())
    };
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !stale(k))
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    env.push(CString::new(format!("{STATE_FD_ENV}={}", memfd.as_raw_fd())).expect("no NUL in a number"));
    let args: Vec<CString> = target.args.iter().filter_map(|a| CString::new(a.as_bytes()).ok()).collect();
    let Ok(path) = CString::new(target.path.as_os_str().as_bytes()) else {
        return UpgradeError::Binary { path: target.path.clone(), problem: "NUL byte in the path".into() };
    };

    // Exactly these descriptors cross the exec; everything else stays
    // close-on-exec.
    let crossing: Vec<BorrowedFd<'_>> = fds.iter().copied().chain(std::iter::once(memfd.as_fd())).collect();
    let mut cleared = Vec::with_capacity(crossing.len());
    for fd in &crossing {
        if let Err(source) = fd::set_cloexec(*fd, false) {
            restore_cloexec(&cleared);
            return UpgradeError::Prepare { what: "clearing close-on-exec", source };
        }
        cleared.push(*fd);
    }
    log::info!(
        "re-executing {} (generation {}): {} sockets, {} client connections carried over, {} with a reply in \
         flight left to close",
        target.path.display(),
        state.generation,
        state.sockets.len(),
        state.connections.len(),
        server.clients() - state.connections.len()
    );
    let err = match nix::unistd::execve(&path, &args, &env) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    restore_cloexec(&cleared);
    UpgradeError::Exec { path: target.path.clone(), source: err }
}

fn restore_cloexec(fds: &[BorrowedFd<'_>]) {
    for fd in fds {
        if let Err(e) = fd::set_cloexec(*fd, true) {
            log::error!("descriptor {}: could not restore close-on-exec: {e}", fd.as_raw_fd());
        }
    }
}

/// Writes the state into a fresh memfd (close-on-exec until the exec), read
/// position at the start.
fn write_state(state: &HandoverState) -> io::Result<OwnedFd> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let fd = memfd_create(c"sockbroker-upgrade", MFdFlags::MFD_CLOEXEC)?;
    let mut file = std::fs::File::from(fd);
    serde_json::to_writer(&mut file, state)?;
    file.flush()?;
    file.rewind()?;
    Ok(OwnedFd::from(file))
}

/// Checks that `path` is a sockbroker binary that runs: `path --version` must
/// exit 0 within [`VALIDATE_TIMEOUT`] and print `sockbroker VERSION`.
pub fn validate_binary(path: &Path) -> Result<(), UpgradeError> {
    let bad = |problem: String| UpgradeError::Binary { path: path.to_path_buf(), problem };
    // Started as every child is (child::prepare: an empty signal mask); it
    // inherits nothing, as every descriptor the broker holds is close-on-exec.
    let mut cmd = Command::new(path);
    cmd.arg("--version").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    crate::child::prepare(&mut cmd, &[], None);
    let mut child = cmd.spawn().map_err(|e| bad(format!("cannot run it: {e}")))?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let status = match crate::child::wait_with_deadline(pid, VALIDATE_TIMEOUT) {
        Ok((_, true)) => return Err(bad(format!("`--version` did not finish within {VALIDATE_TIMEOUT:?}"))),
        Ok((status, false)) => status,
        Err(e) => return Err(bad(format!("waiting for `--version`: {e}"))),
    };
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    if !status.success() {
        return Err(bad(format!("`--version` failed ({status})")));
    }
    if !out.starts_with("sockbroker ") {
        return Err(bad(format!("`--version` printed {:?}, not \"sockbroker VERSION\"", out.trim())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_a_broken_binary() {
        let err = validate_binary(Path::new("/nonexistent/sockbroker")).unwrap_err();
        assert!(err.to_string().contains("cannot run it"), "{err}");
        let err = validate_binary(Path::new("/bin/false")).unwrap_err();
        assert!(err.to_string().contains("failed"), "{err}");
        let err = validate_binary(Path::new("/bin/true")).unwrap_err();
        assert!(err.to_string().contains("not \"sockbroker VERSION\""), "{err}");
    }
}
