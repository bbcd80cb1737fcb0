//! `sockbroker run`: a LISTEN_FDS daemon under the generation supervisor.
//!
//! The sockets are fetched from the broker once ([`crate::exec::fetch`]) and
//! handed to every generation at 3.. with `LISTEN_*` set
//! ([`crate::exec::Launch::spawn`]); the rest (signals, readiness, drain) is
//! the supervisor's ([`super::supervise`]).

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::{supervise, Daemon, Drain, Proof, Readiness, RunError, Supervision};
use crate::child::Priority;
use crate::exec::{self, ExecError, Launch, PassedSocket, SocketArg};

/// How `run` was asked to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The sockets, in order from fd 3.
    pub sockets: Vec<SocketArg>,
    /// Bind directly when the broker is unreachable.
    pub fallback_bind: bool,
    /// How readiness is detected.
    pub ready: Readiness,
    /// How long a new generation may take to become ready.
    pub ready_timeout: Duration,
    /// How a generation proves it is ready after it says so.
    pub proof: Proof,
    /// How old generations are bounded.
    pub drain: Drain,
    /// How long a reload's generation may start at idle CPU priority.
    pub idle_start: Option<Duration>,
    /// Sent to the old generation once the new one is ready.
    pub retire_signal: Signal,
    /// After SIGTERM, how long a stopping generation may take before SIGKILL.
    pub stop_timeout: Duration,
    /// The daemon's program and arguments.
    pub command: Vec<OsString>,
    /// `--metrics-file`, `--metrics-name`.
    pub metrics: super::metrics::MetricsOptions,
}

/// Runs a LISTEN_FDS daemon under the supervisor until SIGTERM/SIGINT or the
/// daemon's end; the exit code is the serving generation's (0 when it died of
/// our own SIGTERM).
pub fn run(opts: RunOptions) -> Result<ExitCode, RunError> {
    let how = Supervision {
        ready: opts.ready.clone(),
        ready_timeout: opts.ready_timeout,
        reload_signals: &[Signal::SIGHUP],
        stop_signals: &[Signal::SIGTERM, Signal::SIGINT],
        retire_signal: opts.retire_signal,
        stop_signal: Signal::SIGTERM,
        hard_stop_signal: None,
        resend_after: &[],
        stop_timeout: Some(opts.stop_timeout),
        proof: opts.proof.clone(),
        drain: opts.drain,
        idle_start: opts.idle_start,
        metrics: opts.metrics.clone(),
    };
    supervise(how, || ListenFdsDaemon::fetch(&opts.sockets, opts.fallback_bind, opts.command.clone()))
}

/// A daemon that takes its sockets by `LISTEN_FDS`: the sockets are fetched
/// from the broker once and placed at 3.. in every generation, as `exec`
/// would ([`crate::exec::Launch::spawn`]).
#[derive(Debug)]
pub struct ListenFdsDaemon {
    sockets: Vec<PassedSocket>,
    command: Vec<OsString>,
}

impl ListenFdsDaemon {
    /// Gets the sockets from the broker (see [`crate::exec::fetch`]).
    pub fn fetch(args: &[SocketArg], fallback_bind: bool, command: Vec<OsString>) -> Result<Self, ExecError> {
        if let Err(e) = crate::child::seal_inherited_descriptors() {
            log::warn!("could not check inherited descriptors in /proc/self/fd: {e}");
        }
        let sockets = exec::fetch(args, fallback_bind)?;
        for line in exec::slot_lines(&sockets) {
            log::info!("{line}");
        }
        Ok(ListenFdsDaemon { sockets, command })
    }
}

impl Daemon for ListenFdsDaemon {
    type Error = ExecError;

    fn start(&mut self, number: u64, env: &[(&str, Option<OsString>)], priority: Priority) -> Result<Pid, ExecError> {
        let launch = Launch::new(&self.command, &self.sockets, env)?;
        let pid = launch.spawn(&self.sockets, priority)?;
        log::info!("generation {number} (pid {pid}) started: {}", launch.program().display());
        Ok(pid)
    }

    fn watched(&mut self) -> Vec<std::os::fd::OwnedFd> {
        self.sockets.iter().filter_map(|s| s.fd.try_clone().ok()).collect()
    }
}
