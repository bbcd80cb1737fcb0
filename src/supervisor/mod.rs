//! `sockbroker run`: overlapping generations of a LISTEN_FDS daemon that
//! share the broker's sockets, so a reload drops no connection.
//!
//! The story of one `run`:
//! 1. **Starting**: become a child subreaper (orphans of the daemon are
//!    reparented to us and reaped, never left behind), block the signals we
//!    handle (read from a signalfd, with `poll`), fetch the sockets from the
//!    broker once ([`crate::exec::fetch`]), and start generation 1 as `exec`
//!    would ([`crate::exec::Launch::spawn`]): sockets at 3.. in the child only.
//! 2. **Serving**: once generation 1 is ready, tell systemd `READY=1`.
//! 3. **Reloading** (SIGHUP, or a request on the control socket,
//!    [`control`]): `RELOADING=1` + `MONOTONIC_USEC`, stop the oldest
//!    draining generations hard if `--max-generations` would be exceeded,
//!    start generation N+1 with the same sockets, wait until it says it is
//!    ready, then prove it ([`Proof`]: it stays alive `--ready-grace`, passes
//!    `--ready-probe`),
//!    and only then send the retire signal to generation N, which drains
//!    while N+1 already accepts from the same kernel queue (stopped hard at
//!    `--drain-timeout`, [`Drain`]). Then `READY=1`, and the callers waiting
//!    on the control socket get the outcome. If N+1 exits or is not proven
//!    within `--ready-timeout`, it is stopped, N keeps serving (it was never
//!    told to retire), the failure is logged, stays in `STATUS=` until a
//!    reload succeeds, and is the waiting callers' answer. Requests during a
//!    reload coalesce into one more reload after it.
//! 4. **Stopping** (SIGTERM, SIGINT, or the serving generation died):
//!    `STOPPING=1`, SIGTERM to every generation (SIGKILL after the stop
//!    timeout), reap everything, exit with the serving generation's status.
//!
//! Readiness ([`Readiness`]) is a signal, never a guess where the daemon can
//! give one: `notify` gives each generation a private `NOTIFY_SOCKET` (an
//! abstract datagram socket only `run` reads) and waits for `READY=1` sent
//! from that generation's process tree (checked with `SCM_CREDENTIALS`);
//! `pidfile:PATH` waits until PATH names a live process of the new
//! generation; `delay:D` is the last resort for daemons that can do neither.
//!
//! `run` stays the service's main process for systemd throughout, so no
//! `MAINPID=` handover is needed: systemd only sees `RELOADING=1`/`READY=1`.
//!
//! This is the one generation supervisor of the project. What differs
//! between daemons is split out: a [`Daemon`] prepares and starts one
//! generation and words the STATUS= line ([`ListenFdsDaemon`] for `run`:
//! sockets fetched once and placed at 3..; `haproxy::run::Haproxy` for
//! `haproxy run`: render, `haproxy -c`, start `haproxy -Ws`), and a
//! [`Supervision`] says which signals reload and stop, which signal retires
//! and stops a generation (SIGTERM by default; SIGUSR1, HAProxy's soft stop),
//! whether it is sent again (HAProxy 2.6 can drop one), whether a second stop
//! request is a hard stop, and whether a stopping generation is killed after
//! a timeout. [`Daemon::start`] runs inside the loop: signals that arrive
//! meanwhile wait in the signalfd and are handled as soon as it returns.

//!
//! # Where each part lives
//!
//! - this file: what a supervision is ([`Supervision`]), what a daemon must
//!   do ([`Daemon`]), the supervisor's state and its phases;
//! - [`mod@run`]: `sockbroker run` itself, a LISTEN_FDS daemon ([`ListenFdsDaemon`]);
//! - `event_loop`: [`supervise`], the poll loop and its timers;
//! - `generations`: one generation's life (start, promote, retire, stop
//!   hard) and the reload's outcome;
//! - `readiness`: how a generation says it is ready ([`Readiness`]) and
//!   proves it ([`Proof`]): the private notify socket, pidfiles, probes;
//! - `requests`: what asks for a reload or a stop (signals, the [`control`]
//!   socket) and the callers waiting for the outcome;
//! - `reaping`: children that exit (generations, probes, adopted orphans).

use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::child::Priority;
use crate::exec::ExecError;

pub mod control;
mod event_loop;
mod generations;
pub mod metrics;
mod readiness;
mod reaping;
mod requests;
pub mod run;

use control::Connection;
use generations::{GenState, Generation, ProbeState};

pub use event_loop::supervise;
pub use generations::{Drain, DEFAULT_MAX_GENERATIONS, HARD_KILL_AFTER};
pub use readiness::{Proof, Readiness, DEFAULT_READY_GRACE, PIDFILE_POLL, PROBE_RETRY};
pub use requests::parse_signal;
pub use run::{run, ListenFdsDaemon, RunOptions};

/// Environment variable telling each generation its number (1, 2, …).
pub const GENERATION_ENV: &str = "SOCKBROKER_GENERATION";

/// How generations are supervised, whatever the daemon: which signals ask
/// for what, how readiness is seen, how old generations are made to leave.
#[derive(Debug, Clone)]
pub struct Supervision {
    /// How readiness is detected.
    pub ready: Readiness,
    /// How long a new generation may take to become ready.
    pub ready_timeout: Duration,
    /// Signals that start a reload.
    pub reload_signals: &'static [Signal],
    /// Signals that stop every generation and end the supervisor.
    pub stop_signals: &'static [Signal],
    /// Sent to the old generation once the new one is ready.
    pub retire_signal: Signal,
    /// Sent to every generation on stop, and to one that failed to start.
    pub stop_signal: Signal,
    /// Sent to every generation when a stop is asked for again while stopping.
    pub hard_stop_signal: Option<Signal>,
    /// When the retire or stop signal is sent again to a generation still
    /// running, counted from the first one (a daemon may drop a signal that
    /// arrives while it starts; see `haproxy::run`).
    pub resend_after: &'static [Duration],
    /// How long a stopping generation may take before SIGKILL; `None`: as
    /// long as it needs to drain.
    pub stop_timeout: Option<Duration>,
    /// What a generation must show after it says it is ready.
    pub proof: Proof,
    /// How long and how many old generations may drain.
    pub drain: Drain,
    /// A reload's generation starts at idle CPU priority and is raised when
    /// it says it is ready or after this long ([`crate::child::priority`]);
    /// `None`: normal priority throughout.
    pub idle_start: Option<Duration>,
    /// Where the metrics go besides the control socket (`--metrics-file`).
    pub metrics: metrics::MetricsOptions,
}

/// What a STATUS= line is made from.
#[derive(Debug, Clone, Copy)]
pub struct StatusView<'a> {
    /// The serving generation's number and (main) pid.
    pub serving: Option<(u64, Pid)>,
    /// Generations retiring or stopping.
    pub draining: usize,
    /// Reloads that succeeded.
    pub reloads_ok: u64,
    /// Reloads that failed.
    pub reloads_failed: u64,
    /// The last failed reload, until one succeeds.
    pub last_failure: Option<&'a str>,
    /// This line reports the reload that just failed.
    pub failed_now: bool,
    /// A new generation said it is ready and is being proven.
    pub proving: Option<u64>,
}

/// What differs between the daemons the supervisor runs: how one generation
/// is prepared and started, and how the service's status reads.
pub trait Daemon {
    /// Why a generation could not be started.
    type Error: std::error::Error + 'static;

    /// Prepares and starts generation `number` with `env` added to (`Some`) or
    /// removed from (`None`) its environment, at `priority`
    /// ([`crate::child::priority`]); returns the started process's pid. The
    /// supervisor reaps it (`waitpid(-1)`); this must reap whatever else it
    /// starts (a config check) before it returns.
    fn start(&mut self, number: u64, env: &[(&str, Option<OsString>)], priority: Priority) -> Result<Pid, Self::Error>;

    /// Generation `number` exited before it said it was ready: the daemon's
    /// own explanation, when it has a better one than the exit status
    /// (HAProxy: what `haproxy -c` says about the config it was given).
    fn explain_failure(&mut self, _number: u64) -> Option<Self::Error> {
        None
    }

    /// Copies of the sockets whose accept queues are sampled during a
    /// reload (the TCP listeners among them; see [`metrics`]), taken after
    /// each start.
    fn watched(&mut self) -> Vec<OwnedFd> {
        Vec::new()
    }

    /// One line about a start failure, for STATUS=.
    fn summary(&self, err: &Self::Error) -> String {
        crate::error_chain(err)
    }

    /// The STATUS= line.
    fn status_line(&self, view: &StatusView<'_>) -> String {
        let mut line = match view.serving {
            Some((number, pid)) => format!("serving generation {number} (pid {pid})"),
            None => "no generation serving".to_string(),
        };
        if let Some(number) = view.proving {
            line.push_str(&format!("; generation {number} said ready, in its grace window"));
        }
        line.push_str(&format!(
            "; {} draining; {} reloads, {} failed",
            view.draining, view.reloads_ok, view.reloads_failed
        ));
        if let Some(f) = view.last_failure {
            line.push_str(&format!("; last reload failed: {f}"));
        }
        line
    }
}

/// Why `run` failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError<E: std::error::Error + 'static = ExecError> {
    /// Preparing the daemon or starting generation 1 failed.
    #[error(transparent)]
    Start(E),
    /// Setting up the supervisor failed.
    #[error("{what}: {source}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Generation 1 never became ready.
    #[error("generation 1 (pid {pid}) {reason}")]
    FirstGeneration {
        /// Its pid.
        pid: Pid,
        /// What happened.
        reason: String,
    },
    /// The event loop failed.
    #[error("supervisor loop: {0}")]
    Loop(#[source] io::Error),
}

/// The phases of `run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Generation 1 is starting.
    Starting,
    /// One generation serves.
    Serving,
    /// A new generation is starting next to the serving one.
    Reloading,
    /// Every generation is being stopped.
    Stopping,
}

/// The supervisor's state: the daemon, the generations, the event sources.
struct Supervisor<D: Daemon> {
    how: Supervision,
    daemon: D,
    signals: SignalFd,
    notify_sock: Option<(OwnedFd, String)>,
    gens: Vec<Generation>,
    next_number: u64,
    phase: Phase,
    reload_queued: bool,
    /// Reloads begun so far: the number of the current or last one.
    reloads_begun: u64,
    /// The reload began, but its generation waits for room under the cap.
    start_pending: bool,
    /// The control socket, and the connections whose request is being read.
    control: Option<control::Server>,
    reading: Vec<Connection>,
    /// Callers waiting for the outcome of reload number >= theirs.
    waiters: Vec<(Connection, u64)>,
    stop_requests: u32,
    reloads_ok: u64,
    reloads_failed: u64,
    last_failure: Option<String>,
    /// The generation that was serving when stopping began.
    serving_at_stop: Option<u64>,
    /// The exit status of the serving generation: `run`'s own.
    final_status: Option<WaitStatus>,
    /// Set when generation 1 fails before it is ready.
    start_failure: Option<RunError<D::Error>>,
    /// Reload figures and the sockets sampled ([`metrics`]).
    telemetry: metrics::Telemetry,
}

impl<D: Daemon> Supervisor<D> {
    pub(super) fn serving(&self) -> Option<&Generation> {
        self.gens.iter().find(|g| g.state == GenState::Serving)
    }

    pub(super) fn status_line(&self, failed_now: bool) -> String {
        let mut line = self.daemon_status_line(failed_now);
        line.push_str(&self.telemetry.status_note().unwrap_or_default());
        line
    }

    fn daemon_status_line(&self, failed_now: bool) -> String {
        let draining = self
            .gens
            .iter()
            .filter(|g| matches!(g.state, GenState::Retiring { .. } | GenState::Stopping { .. }))
            .count();
        self.daemon.status_line(&StatusView {
            serving: self.serving().map(|g| (g.number, g.target())),
            draining,
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
            last_failure: self.last_failure.as_deref(),
            failed_now,
            proving: self.gens.iter().find(|g| matches!(g.state, GenState::Proving { .. })).map(|g| g.number),
        })
    }

    /// Starts the next generation with its own `NOTIFY_SOCKET` and number.
    pub(super) fn start_generation(&mut self) -> Result<(), D::Error> {
        let number = self.next_number;
        self.next_number += 1;
        let notify_env = self.notify_sock.as_ref().map(|(_, name)| OsString::from(name));
        let env = [(GENERATION_ENV, Some(OsString::from(number.to_string()))), ("NOTIFY_SOCKET", notify_env)];
        // Only next to a serving generation: a first start (or one with
        // nothing serving) has nobody's CPU time to spare.
        let idle = self.how.idle_start.filter(|_| self.serving().is_some());
        let priority = if idle.is_some() { Priority::Idle } else { Priority::Inherit };
        let pid = self.daemon.start(number, &env, priority)?;
        self.telemetry.watch(self.daemon.watched());
        self.gens.push(Generation {
            number,
            pid,
            main: None,
            state: GenState::Starting,
            started: Instant::now(),
            launcher_exited: false,
            sent: None,
            hard: false,
            probe: ProbeState::default(),
            idle_until: idle.map(|d| Instant::now() + d),
        });
        Ok(())
    }
}
