//! Copying sockets out of a process by pid (`sockbroker adopt --pid PID`,
//! and the recovery path's [`copy_one`]): `/proc/PID/fd` lists the
//! descriptors, `pidfd_open` + `pidfd_getfd` ([`crate::fd`]) copy each, and
//! [`adoptable`] keeps the sockets the broker can hold. A refusal by the
//! kernel becomes an error that says what is missing ([`why_not_permitted`]).

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use super::{AdoptError, Copied, Wanted};
use crate::fd;
use crate::socket::{self, InspectError};
use crate::spec::SocketKey;

/// `CAP_SYS_PTRACE`'s bit in the capability sets.
const CAP_SYS_PTRACE: u32 = 19;

/// Maps the kernel's answer to pidfd_open/pidfd_getfd to an error a user can
/// act on.
fn kernel_error(pid: i32, fd: Option<RawFd>, call: &'static str, source: io::Error) -> AdoptError {
    match source.raw_os_error() {
        Some(nix::libc::ESRCH) => AdoptError::NoSuchProcess(pid),
        Some(nix::libc::ENOSYS) => AdoptError::Unsupported { call, source },
        Some(nix::libc::EPERM) | Some(nix::libc::EACCES) => {
            AdoptError::NotPermitted { pid, why: why_not_permitted(Some(pid)) }
        }
        _ => AdoptError::Copy { pid, fd: fd.unwrap_or(-1), source },
    }
}

/// What stands between this process and another's descriptors, as far as
/// /proc tells: Yama's ptrace_scope, our CAP_SYS_PTRACE, the owners.
pub fn why_not_permitted(pid: Option<i32>) -> String {
    let mut reasons = Vec::new();
    match std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").map(|s| s.trim().to_string()) {
        Ok(scope) if scope == "3" => reasons.push(
            "Yama kernel.yama.ptrace_scope is 3: no process may copy another's descriptors, not even root (it can only be lowered by a reboot)".to_string(),
        ),
        Ok(scope) if scope == "2" => {
            reasons.push("Yama kernel.yama.ptrace_scope is 2: only a process with CAP_SYS_PTRACE may".to_string())
        }
        _ => {}
    }
    let has_ptrace = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string())))
        .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
        .map(|caps| caps & (1 << CAP_SYS_PTRACE) != 0);
    if has_ptrace == Some(false) {
        let target = match pid.and_then(|pid| std::fs::metadata(format!("/proc/{pid}")).ok()) {
            Some(m) => format!("a process of uid {}", std::os::unix::fs::MetadataExt::uid(&m)),
            None => "another user's process".to_string(),
        };
        reasons.push(format!(
            "this process (uid {}) lacks CAP_SYS_PTRACE, which reading the descriptors of {target} (or of one with \
             capabilities this process lacks) needs: run it as root with all capabilities",
            nix::unistd::geteuid()
        ));
    }
    if reasons.is_empty() {
        reasons.push("the kernel refused ptrace access (a security module, or a process that is not dumpable)".into());
    }
    reasons.join("; ")
}

/// Copies the adoptable sockets of process `pid`: all of them, or those in
/// `wanted` (each must be there). See the module doc.
pub fn copy_from_pid(pid: i32, wanted: &[Wanted]) -> Result<Vec<Copied>, AdoptError> {
    let pidfd = fd::pidfd_open(pid).map_err(|e| kernel_error(pid, None, "pidfd_open", e))?;
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let proc_err = |source: io::Error| match source.kind() {
        io::ErrorKind::NotFound => AdoptError::NoSuchProcess(pid),
        io::ErrorKind::PermissionDenied => AdoptError::NotPermitted { pid, why: why_not_permitted(Some(pid)) },
        _ => AdoptError::Proc { path: dir.clone(), source },
    };
    let mut numbers: Vec<RawFd> = std::fs::read_dir(&dir)
        .map_err(proc_err)?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    numbers.sort_unstable();
    let mut seen = HashSet::new();
    let mut found: Vec<Copied> = Vec::new();
    let mut skipped = Vec::new();
    let mut sockets = 0;
    for n in numbers {
        let link = match std::fs::read_link(dir.join(n.to_string())) {
            Ok(link) => link,
            // The folder may be listable while its links are not (the kernel
            // checks ptrace access on each).
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(AdoptError::NotPermitted { pid, why: why_not_permitted(Some(pid)) })
            }
            Err(_) => continue, // closed since the listing
        };
        let Some(inode) = socket_inode(&link) else { continue };
        sockets += 1;
        if !seen.insert(inode) {
            continue; // a second descriptor for a socket already copied
        }
        let copy = match fd::pidfd_getfd(pidfd.as_fd(), n) {
            Ok(copy) => copy,
            // Closed since the listing: nothing to adopt there.
            Err(e) if e.raw_os_error() == Some(nix::libc::EBADF) => continue,
            Err(e) => return Err(kernel_error(pid, Some(n), "pidfd_getfd", e)),
        };
        match adoptable(copy.as_fd()) {
            Ok(key) => found.push(Copied { fd: copy, key, from: format!("pid {pid} fd {n}"), name: None }),
            Err(why) => skipped.push(format!("fd {n}: {why}")),
        }
    }
    if wanted.is_empty() {
        if found.is_empty() {
            let detail = if skipped.is_empty() {
                "none".to_string()
            } else {
                let more = skipped.len().saturating_sub(3);
                let mut d = skipped.iter().take(3).cloned().collect::<Vec<_>>().join("; ");
                if more > 0 {
                    d.push_str(&format!("; {more} more"));
                }
                d
            };
            return Err(AdoptError::NoListeningSocket { pid, sockets, detail });
        }
        return Ok(found);
    }
    let held = found.iter().map(|c| c.key.to_string()).collect::<Vec<_>>().join(", ");
    let mut by_key: HashMap<SocketKey, Copied> = found.into_iter().map(|c| (c.key.clone(), c)).collect();
    let mut out = Vec::with_capacity(wanted.len());
    for w in wanted {
        let Some(mut c) = by_key.remove(&w.key) else {
            let held = if held.is_empty() { "no listening socket".to_string() } else { held };
            return Err(AdoptError::NotHeld { key: w.key.clone(), pid, held });
        };
        c.name = w.name.clone();
        out.push(c);
    }
    Ok(out)
}

/// The key of a socket the broker can hold, or why it cannot: not a
/// supported kind, not listening, or a connected (client) datagram socket.
pub fn adoptable(fd: BorrowedFd<'_>) -> Result<SocketKey, String> {
    let key = socket::inspect(fd).map_err(|e| e.to_string())?;
    if !key.is_listening_kind() && socket::is_connected(fd) {
        return Err(format!("{key}: a connected datagram socket (a client's, not a service's)"));
    }
    Ok(key)
}

/// `socket:[12345]` → 12345.
pub(super) fn socket_inode(link: &Path) -> Option<u64> {
    link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// Copies descriptor `target` of `pid` and checks it is the socket `key`.
pub fn copy_one(pid: i32, target: RawFd, key: &SocketKey) -> Result<OwnedFd, AdoptError> {
    let pidfd = fd::pidfd_open(pid).map_err(|e| kernel_error(pid, None, "pidfd_open", e))?;
    let copy = fd::pidfd_getfd(pidfd.as_fd(), target).map_err(|e| kernel_error(pid, Some(target), "pidfd_getfd", e))?;
    let from = || format!("pid {pid} fd {target}");
    let got = socket::inspect(copy.as_fd()).map_err(|source| AdoptError::Inspect { from: from(), source })?;
    if &got != key {
        let source = InspectError::Unsupported(format!("it is {got}, not {key} (the process changed it meanwhile)"));
        return Err(AdoptError::Inspect { from: from(), source });
    }
    Ok(copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_refusals_become_errors_a_user_can_act_on() {
        let err = |errno| kernel_error(1, Some(3), "pidfd_getfd", io::Error::from_raw_os_error(errno));
        let text = err(nix::libc::ENOSYS).to_string();
        assert!(text.contains("pidfd_getfd") && text.contains("Linux 5.6"), "{text}");
        assert!(matches!(err(nix::libc::ESRCH), AdoptError::NoSuchProcess(1)));
        assert!(matches!(err(nix::libc::EPERM), AdoptError::NotPermitted { pid: 1, .. }));
        assert!(matches!(err(nix::libc::EINVAL), AdoptError::Copy { pid: 1, fd: 3, .. }));
    }
}
