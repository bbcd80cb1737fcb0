//! Sockets passed in by systemd (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`).
//!
//! Two parts:
//! - [`ListenEnv::parse`]: a pure parser of the three values, as data, tested
//!   without touching the environment;
//! - [`take_from_env`]: reads and unsets the variables once, at start, and
//!   turns descriptors 3, 4, … into [`OwnedFd`]s marked close-on-exec, each
//!   with its name. What the sockets are is decided elsewhere, from the
//!   kernel ([`crate::socket::inspect`]), never from their position.
//!
//! `libsystemd`'s activation API is not used: it yields nothing when
//! `LISTEN_FDNAMES` is absent (as with `systemd-socket-activate` without
//! `--fdname`) and hands out raw descriptors that can be cloned.

use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::fd;

/// The first passed descriptor (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;
/// Environment variable: the pid the descriptors are meant for.
pub const LISTEN_PID: &str = "LISTEN_PID";
/// Environment variable: how many descriptors were passed.
pub const LISTEN_FDS: &str = "LISTEN_FDS";
/// Environment variable: their names, `:`-separated.
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// The convention's three variables: a process that hands descriptors on
/// (`sockbroker exec`, `run`) replaces inherited values, one that does not
/// (HAProxy's `fd@N`, a re-exec) removes them.
pub const LISTEN_ENV: [&str; 3] = [LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES];
/// The name `sd_listen_fds_with_names()` reports for a socket nobody named.
pub const UNNAMED: &str = "unknown";
/// The longest descriptor name systemd takes (its `FDNAME_MAX`), in
/// `LISTEN_FDNAMES` and in the fd store's `FDNAME=`.
pub const FDNAME_MAX: usize = 255;

/// systemd's `fdname_is_valid`: at most [`FDNAME_MAX`] printable ASCII
/// characters, without `:` (the separator in `LISTEN_FDNAMES`). systemd
/// accepts the empty name; callers that give names to sockets refuse it.
pub fn fdname_is_valid(name: &str) -> bool {
    name.len() <= FDNAME_MAX && name.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b':')
}

/// What the three variables say, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenEnv {
    /// One entry per passed descriptor, in order from fd 3: its name, or
    /// `None` when it has none (empty, `unknown`, or names were unusable).
    pub names: Vec<Option<String>>,
    /// `LISTEN_FDNAMES` was set but did not have one name per descriptor:
    /// names are then dropped (a name given to the wrong socket is worse than
    /// none) and the descriptors are identified by address only.
    pub ignored_names: Option<String>,
}

/// Why the variables are not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenEnvError {
    /// `LISTEN_FDS` is set but `LISTEN_PID` is not.
    #[error("LISTEN_FDS={fds} is set without LISTEN_PID; ignoring the passed descriptors")]
    NoPid {
        /// The `LISTEN_FDS` value.
        fds: String,
    },
    /// `LISTEN_PID` is not a pid.
    #[error("LISTEN_PID='{0}' is not a process id; ignoring the passed descriptors")]
    BadPid(String),
    /// The descriptors are meant for another process (an ancestor that
    /// forgot to unset the variables).
    #[error(
        "LISTEN_PID={listen_pid} is not our pid {pid}: the descriptors are meant for another process; ignoring them"
    )]
    NotOurs {
        /// The pid in `LISTEN_PID`.
        listen_pid: u32,
        /// Our pid.
        pid: u32,
    },
    /// `LISTEN_FDS` is not a count.
    #[error("LISTEN_FDS='{0}' is not a number of descriptors; ignoring the passed descriptors")]
    BadCount(String),
}

impl ListenEnv {
    /// Parses the values of `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`
    /// (each `None` when unset) for the process `pid`.
    ///
    /// `Ok(None)` means nothing was passed (`LISTEN_FDS` unset or `0`).
    pub fn parse(
        pid: u32,
        listen_pid: Option<&str>,
        listen_fds: Option<&str>,
        listen_fdnames: Option<&str>,
    ) -> Result<Option<ListenEnv>, ListenEnvError> {
        let Some(fds) = listen_fds else { return Ok(None) };
        let Some(listen_pid) = listen_pid else { return Err(ListenEnvError::NoPid { fds: fds.to_string() }) };
        let listen_pid: u32 = listen_pid.trim().parse().map_err(|_| ListenEnvError::BadPid(listen_pid.to_string()))?;
        if listen_pid != pid {
            return Err(ListenEnvError::NotOurs { listen_pid, pid });
        }
        let count: u32 = fds.trim().parse().map_err(|_| ListenEnvError::BadCount(fds.to_string()))?;
        // Descriptors are numbers from 3; the count must keep them in range.
        if count > (RawFd::MAX - LISTEN_FDS_START) as u32 {
            return Err(ListenEnvError::BadCount(fds.to_string()));
        }
        if count == 0 {
            return Ok(None);
        }
        let count = count as usize;
        let mut env = ListenEnv { names: vec![None; count], ignored_names: None };
        if let Some(text) = listen_fdnames {
            let names: Vec<&str> = text.split(':').collect();
            if names.len() == count {
                env.names = names.into_iter().map(|n| (!n.is_empty() && n != UNNAMED).then(|| n.to_string())).collect();
            } else {
                env.ignored_names = Some(text.to_string());
            }
        }
        Ok(Some(env))
    }

    /// How many descriptors were passed.
    pub fn count(&self) -> usize {
        self.names.len()
    }
}

/// A descriptor passed by systemd, owned and close-on-exec.
#[derive(Debug)]
pub struct PassedFd {
    /// The descriptor.
    pub fd: OwnedFd,
    /// The number it arrived as (3, 4, …), for log lines.
    pub number: RawFd,
    /// Its name from `LISTEN_FDNAMES`, if any.
    pub name: Option<String>,
}

impl PassedFd {
    /// `fd 4 ('http')` or `fd 4`, for log lines.
    pub fn describe(&self) -> String {
        match &self.name {
            Some(name) => format!("fd {} ('{name}')", self.number),
            None => format!("fd {}", self.number),
        }
    }
}

/// Set once the variables have been taken, so descriptors 3.. are never
/// wrapped in an [`OwnedFd`] twice.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Reads and unsets `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`, and
/// takes ownership of the descriptors they describe.
///
/// Call it once, at start, **before any other thread exists**: changing the
/// environment while another thread reads it (libc's `getenv`, called by
/// `getaddrinfo`, locale code and the like) is undefined behaviour, which is
/// why edition 2024 makes `remove_var` unsafe. The variables are unset
/// whatever they say, so no child of the broker inherits them. A second call
/// returns nothing.
///
/// Problems are logged, never fatal: variables meant for another process are
/// ignored with a warning, and a number that is not an open descriptor is
/// skipped.
pub fn take_from_env() -> Vec<PassedFd> {
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Vec::new();
    }
    let var = |name| std::env::var(name).ok();
    let (pid, fds, names) = (var(LISTEN_PID), var(LISTEN_FDS), var(LISTEN_FDNAMES));
    for name in LISTEN_ENV {
        std::env::remove_var(name);
    }
    let env = match ListenEnv::parse(std::process::id(), pid.as_deref(), fds.as_deref(), names.as_deref()) {
        Ok(Some(env)) => env,
        Ok(None) => return Vec::new(),
        Err(e) => {
            log::warn!("{e}");
            return Vec::new();
        }
    };
    if let Some(names) = &env.ignored_names {
        log::warn!(
            "LISTEN_FDNAMES='{names}' does not name each of the {} passed descriptors; identifying them by address only",
            env.count()
        );
    }
    let mut passed = Vec::with_capacity(env.count());
    for (i, name) in env.names.into_iter().enumerate() {
        let number = LISTEN_FDS_START + i as RawFd;
        // LISTEN_PID names this process, so the service manager passed
        // descriptors 3..3+LISTEN_FDS to us; TAKEN guarantees they are taken
        // once. take_inherited refuses any number this image opened itself.
        match fd::take_inherited(&[number]) {
            Ok(mut fds) => passed.push(PassedFd { fd: fds.pop().expect("one asked, one taken"), number, name }),
            Err(e) => {
                let what = name.map(|n| format!(" ('{n}')")).unwrap_or_default();
                log::warn!("LISTEN_FDS: fd {number}{what} is not usable ({e}); skipped");
            }
        }
    }
    passed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pid: Option<&str>, fds: Option<&str>, names: Option<&str>) -> Result<Option<ListenEnv>, ListenEnvError> {
        ListenEnv::parse(42, pid, fds, names)
    }

    #[test]
    fn nothing_passed() {
        assert_eq!(parse(None, None, None), Ok(None));
        assert_eq!(parse(Some("42"), None, Some("a")), Ok(None));
        assert_eq!(parse(Some("42"), Some("0"), None), Ok(None));
    }

    #[test]
    fn names_follow_descriptors() {
        let env = parse(Some("42"), Some("3"), Some("http:unknown:")).unwrap().unwrap();
        assert_eq!(env.names, vec![Some("http".to_string()), None, None]);
        assert_eq!(env.ignored_names, None);
        let env = parse(Some("42"), Some("2"), None).unwrap().unwrap();
        assert_eq!(env.names, vec![None, None]);
    }

    #[test]
    fn a_wrong_number_of_names_drops_them_all() {
        let env = parse(Some("42"), Some("2"), Some("a:b:c")).unwrap().unwrap();
        assert_eq!(env.names, vec![None, None]);
        assert_eq!(env.ignored_names.as_deref(), Some("a:b:c"));
    }

    #[test]
    fn refuses_what_is_not_ours_or_not_numbers() {
        assert_eq!(parse(Some("41"), Some("1"), None), Err(ListenEnvError::NotOurs { listen_pid: 41, pid: 42 }));
        assert!(matches!(parse(None, Some("1"), None), Err(ListenEnvError::NoPid { .. })));
        assert!(matches!(parse(Some("x"), Some("1"), None), Err(ListenEnvError::BadPid(_))));
        assert!(matches!(parse(Some("42"), Some("-1"), None), Err(ListenEnvError::BadCount(_))));
        assert!(matches!(parse(Some("42"), Some("two"), None), Err(ListenEnvError::BadCount(_))));
        assert!(matches!(parse(Some("42"), Some("4294967295"), None), Err(ListenEnvError::BadCount(_))));
    }

    #[test]
    fn fdnames_as_systemd_checks_them() {
        assert!(fdname_is_valid("http") && fdname_is_valid("with space") && fdname_is_valid(""));
        assert!(fdname_is_valid(&"x".repeat(FDNAME_MAX)));
        assert!(!fdname_is_valid(&"x".repeat(FDNAME_MAX + 1)));
        assert!(!fdname_is_valid("a:b") && !fdname_is_valid("tab\there") && !fdname_is_valid("é"));
    }
}
