//! How a generation says it is ready ([`Readiness`]) and proves it
//! ([`Proof`]) before the old one retires.
//!
//! `notify`: each generation gets the supervisor's private `NOTIFY_SOCKET`
//! (an abstract datagram socket with `SO_PASSCRED`); a `READY=1` counts only
//! from a process of that generation's tree (its pid walked up through
//! /proc). `pidfile:PATH`: PATH names a live process of the new generation.
//! `delay:D`: a fixed time. Then the proof: alive for `--ready-grace`, and
//! `--ready-probe` exits 0 (run again every [`PROBE_RETRY`]).

use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use super::reaping::describe;
use super::{Daemon, GenState, Supervisor, GENERATION_ENV};
use crate::systemd::notify;

/// How often a pidfile is looked at while a generation starts.
pub const PIDFILE_POLL: Duration = Duration::from_millis(10);
/// Default `--ready-grace`: how long a generation that said it is ready must
/// stay alive before the old one is retired. gunicorn says READY=1 before its
/// workers import the application; a broken one makes it exit well within
/// this, on a loaded machine too. Both generations accept meanwhile, so the
/// window costs reload time, never a request's latency.
pub const DEFAULT_READY_GRACE: Duration = Duration::from_secs(2);
/// How soon a failed `--ready-probe` runs again (until the readiness timeout).
pub const PROBE_RETRY: Duration = Duration::from_millis(250);

/// How `run` learns that a generation is ready to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// `READY=1` on the private `NOTIFY_SOCKET` (the sd_notify protocol).
    Notify,
    /// A fixed time after start, for daemons that cannot signal.
    Delay(Duration),
    /// PATH holds the pid of a live process of the new generation.
    PidFile(PathBuf),
}

impl FromStr for Readiness {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if text == "notify" {
            Ok(Readiness::Notify)
        } else if let Some(d) = text.strip_prefix("delay:") {
            Ok(Readiness::Delay(crate::time::parse_duration(d)?))
        } else if let Some(p) = text.strip_prefix("pidfile:") {
            let path = PathBuf::from(p);
            if !path.is_absolute() {
                return Err(format!("'{p}': the pidfile path must be absolute"));
            }
            Ok(Readiness::PidFile(path))
        } else {
            Err(format!("'{text}': expected notify, delay:DURATION or pidfile:PATH"))
        }
    }
}

impl fmt::Display for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Readiness::Notify => f.write_str("notify"),
            Readiness::Delay(d) => write!(f, "delay:{}ms", d.as_millis()),
            Readiness::PidFile(p) => write!(f, "pidfile:{}", p.display()),
        }
    }
}

/// What a new generation must show, after it says it is ready, before the
/// old one is retired. Meanwhile both accept from the shared sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    /// It must stay alive this long (`--ready-grace`).
    pub grace: Duration,
    /// A shell command that must exit 0 (`--ready-probe`), run with
    /// `SOCKBROKER_GENERATION` and `SOCKBROKER_GENERATION_PID` set; run again
    /// every [`PROBE_RETRY`] until it does, or until the readiness timeout.
    pub probe: Option<String>,
}

impl Default for Proof {
    fn default() -> Self {
        Proof { grace: DEFAULT_READY_GRACE, probe: None }
    }
}

/// Binds the private notify socket: an abstract datagram socket (no file to
/// clean up, no permissions to get wrong for a daemon that changes user),
/// with `SO_PASSCRED` so every message carries the sender's pid, which is
/// how messages are attributed and strangers ignored.
pub(super) fn notify_socket() -> io::Result<(OwnedFd, String)> {
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let name = format!("@sockbroker-run/{}/{:x}", std::process::id(), nonce & 0xffff_ffff_ffff);
    let spec = format!("unix-dgram:{name}").parse().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let fd = crate::socket::open(&spec).map_err(|e| io::Error::new(e.source.kind(), e))?;
    setsockopt(&fd, sockopt::PassCred, &true)?;
    Ok((fd, name))
}

/// The parent pid of `pid`, from /proc/PID/stat.
pub(super) fn parent_of(pid: Pid) -> Option<Pid> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and ')'; fields after
    // the last ')' are: state ppid ...
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok().map(Pid::from_raw)
}

impl<D: Daemon> Supervisor<D> {
    /// Raises generation `idx` from idle CPU priority; when that is refused,
    /// stops it and fails the reload (at idle priority it would starve on a
    /// busy machine), and turns `--idle-start` off for the next reloads.
    /// Returns whether it is still starting.
    pub(super) fn leave_idle_or_stop(&mut self, idx: usize, why: &str) -> bool {
        let Err(e) = self.gens[idx].leave_idle(why) else { return true };
        self.how.idle_start = None;
        let (number, target) = (self.gens[idx].number, self.gens[idx].target());
        self.abandon(idx);
        self.fail_start(
            number,
            target,
            format!(
                "could not be raised from idle CPU priority ({e}: a process of it changed its user, and raising \
                 it needs CAP_SYS_NICE); stopped it. --idle-start is now off: reload again"
            ),
        );
        false
    }

    /// A starting generation said it is ready (or its delay or pidfile
    /// says so): promoted now, or proven first ([`Proof`]) while the old
    /// one still serves.
    pub(super) fn signalled_ready(&mut self, idx: usize) {
        // It accepts from the shared queues now: it serves at normal
        // priority, or not at all.
        if !self.leave_idle_or_stop(idx, "said it is ready") {
            return;
        }
        if self.phase == super::Phase::Reloading {
            self.reload_ready(self.gens[idx].started.elapsed());
        }
        let proof = &self.how.proof;
        if proof.grace.is_zero() && proof.probe.is_none() {
            self.promote(idx);
            return;
        }
        let now = Instant::now();
        let g = &mut self.gens[idx];
        g.state = GenState::Proving { ready_at: now };
        g.probe.next = proof.probe.as_ref().map(|_| now);
        log::info!(
            "{} says it is ready after {:?}; proving it (grace {:?}{}) before anything retires",
            g.label(),
            g.started.elapsed(),
            proof.grace,
            if proof.probe.is_some() { ", probe" } else { "" }
        );
        notify::status(&self.status_line(false));
    }

    pub(super) fn read_notify(&mut self) {
        loop {
            let Some((sock, _)) = &self.notify_sock else { return };
            let mut buf = [0u8; 4096];
            let (len, sender) = match crate::fd::recv_with_sender(sock.as_fd(), &mut buf) {
                Ok((len, sender)) => (len, sender.map(Pid::from_raw)),
                Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    log::warn!("notify socket: {e}");
                    return;
                }
            };
            let text = String::from_utf8_lossy(&buf[..len]).into_owned();
            let Some(sender) = sender else { continue };
            self.on_notify(sender, &text);
        }
    }

    pub(super) fn on_notify(&mut self, sender: Pid, text: &str) {
        let Some(idx) = self.generation_of(sender) else {
            log::warn!("notify message from pid {sender}, which belongs to no generation: ignored");
            return;
        };
        for line in text.lines() {
            match line.split_once('=') {
                Some(("READY", "1")) if self.gens[idx].state == GenState::Starting => {
                    log::debug!("{}: READY=1 from pid {sender}", self.gens[idx].label());
                    self.signalled_ready(idx);
                }
                Some(("STATUS", status)) => log::info!("{}: {status}", self.gens[idx].label()),
                _ => log::debug!("{}: {line}", self.gens[idx].label()),
            }
        }
    }

    /// Which generation a process belongs to: itself, or a descendant.
    pub(super) fn generation_of(&self, pid: Pid) -> Option<usize> {
        let mut p = pid;
        for _ in 0..64 {
            if let Some(i) = self.gens.iter().position(|g| g.pid == p || g.main == Some(p)) {
                return Some(i);
            }
            p = parent_of(p)?;
            if p.as_raw() <= 1 || p == nix::unistd::getpid() {
                return None;
            }
        }
        None
    }

    /// Whether the pidfile names a live process of generation `idx` (not a
    /// stale pid left by an older generation); records it as the main pid.
    pub(super) fn pidfile_ready(&mut self, path: &std::path::Path, idx: usize) -> bool {
        let Ok(text) = std::fs::read_to_string(path) else { return false };
        let Ok(raw) = text.trim().parse::<i32>() else { return false };
        if raw <= 0 {
            return false;
        }
        let pid = Pid::from_raw(raw);
        let g = &self.gens[idx];
        let mine = pid == g.pid
            || self.generation_of(pid) == Some(idx)
            // A forked daemon whose launcher exited was reparented to us.
            || (g.launcher_exited && parent_of(pid) == Some(nix::unistd::getpid())
                && self.generation_of(pid).is_none());
        if !mine || kill(pid, None).is_err() {
            return false;
        }
        if pid != g.pid {
            self.gens[idx].main = Some(pid);
        }
        true
    }

    /// Runs the `--ready-probe` command for generation `idx`.
    pub(super) fn run_probe(&mut self, idx: usize) {
        let Some(command) = self.how.proof.probe.clone() else { return };
        let g = &mut self.gens[idx];
        g.probe.next = None;
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(&command)
            .env(GENERATION_ENV, g.number.to_string())
            .env("SOCKBROKER_GENERATION_PID", g.target().to_string())
            .env_remove("NOTIFY_SOCKET")
            .stdin(std::process::Stdio::null());
        crate::child::prepare(&mut cmd, &[], None);
        let spawned = cmd.spawn();
        match spawned {
            // Reaped by waitpid(-1) in `reap`; dropping the handle neither waits nor kills.
            Ok(child) => g.probe.running = Some(Pid::from_raw(child.id() as i32)),
            Err(e) => {
                log::warn!("{}: --ready-probe: cannot run /bin/sh: {e}", g.label());
                g.probe.next = Some(Instant::now() + PROBE_RETRY);
            }
        }
    }

    pub(super) fn on_probe_exit(&mut self, idx: usize, status: &WaitStatus) {
        let g = &mut self.gens[idx];
        g.probe.running = None;
        if matches!(status, WaitStatus::Exited(_, 0)) {
            log::info!("{}: --ready-probe passed", g.label());
            g.probe.passed = true;
        } else {
            log::info!("{}: --ready-probe {}; again in {PROBE_RETRY:?}", g.label(), describe(status));
            g.probe.next = Some(Instant::now() + PROBE_RETRY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_forms() {
        assert_eq!("notify".parse::<Readiness>().unwrap(), Readiness::Notify);
        assert_eq!("delay:250ms".parse::<Readiness>().unwrap(), Readiness::Delay(Duration::from_millis(250)));
        assert_eq!("pidfile:/run/x.pid".parse::<Readiness>().unwrap(), Readiness::PidFile("/run/x.pid".into()));
        assert!("pidfile:x.pid".parse::<Readiness>().is_err());
        assert!("soon".parse::<Readiness>().is_err());
    }

    #[test]
    fn parent_of_self() {
        let me = nix::unistd::getpid();
        assert_eq!(parent_of(me), Some(nix::unistd::getppid()));
    }
}
