//! One generation's life under the supervisor, and a reload's outcome.
//!
//! A generation is `Starting` → `Proving` (said ready, proving it) →
//! `Serving` → `Retiring` (the retire signal sent; drains) or `Stopping` (the
//! stop signal sent; SIGKILL at a deadline). A reload starts one more
//! generation once there is room under `--max-generations`
//! ([`Drain`]), promotes it when proven, and retires the old; a start that
//! fails leaves the old one serving and is the waiting callers' answer.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::control::GenerationInfo;
use super::{Daemon, Phase, RunError, Supervisor};
use crate::systemd::notify;

/// Default `--max-generations`: generations alive at once (the serving one,
/// one starting, the rest draining). Beyond it the oldest draining one is
/// stopped hard, so frequent reloads with long-lived connections cannot pile
/// up processes, memory and descriptors without bound.
pub const DEFAULT_MAX_GENERATIONS: usize = 8;
/// How long a generation stopped hard with a signal other than SIGKILL (HAProxy's
/// SIGTERM) may take before SIGKILL.
pub const HARD_KILL_AFTER: Duration = Duration::from_secs(5);

/// How old generations are bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    /// A retiring generation still running this long after the retire signal
    /// is stopped hard (`--drain-timeout`); `None`: it drains as long as it
    /// needs (the default, as before: only the operator knows how long a
    /// websocket may legitimately live).
    pub timeout: Option<Duration>,
    /// At most this many generations alive at once (`--max-generations`, at
    /// least 2): before a new one starts, the oldest draining ones are stopped
    /// hard until it fits.
    pub max_generations: usize,
}

impl Default for Drain {
    fn default() -> Self {
        Drain { timeout: None, max_generations: DEFAULT_MAX_GENERATIONS }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GenState {
    /// Started, not ready yet.
    Starting,
    /// Said it is ready at `ready_at`; serves next to the old one while it
    /// proves it ([`Proof`]).
    Proving { ready_at: Instant },
    /// Ready and serving.
    Serving,
    /// Sent the retire signal; draining, stopped hard at `until`.
    Retiring { until: Option<Instant> },
    /// Sent the stop signal; SIGKILL at the deadline, if there is one.
    Stopping { kill_at: Option<Instant> },
}

/// The last signal sent to make a generation leave.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sent {
    pub(super) signal: Signal,
    pub(super) first: Instant,
    /// How many times it was sent again.
    pub(super) resent: usize,
}

#[derive(Debug)]
pub(super) struct Generation {
    pub(super) number: u64,
    /// The process we started.
    pub(super) pid: Pid,
    /// The daemon's main process when a pidfile names another one (a daemon
    /// that forks); signals go there.
    pub(super) main: Option<Pid>,
    pub(super) state: GenState,
    pub(super) started: Instant,
    /// The started process exited with status 0 while a pidfile daemon forked.
    pub(super) launcher_exited: bool,
    pub(super) sent: Option<Sent>,
    /// Stopped hard (drain deadline, generation cap): not chosen again.
    pub(super) hard: bool,
    /// The readiness probe: running now, passed, next run.
    pub(super) probe: ProbeState,
    /// Started at idle CPU priority: raised when it says it is ready, is
    /// told to leave, or at this instant (`--idle-start`).
    pub(super) idle_until: Option<Instant>,
}

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ProbeState {
    pub(super) running: Option<Pid>,
    pub(super) passed: bool,
    pub(super) next: Option<Instant>,
}

impl Generation {
    pub(super) fn target(&self) -> Pid {
        self.main.unwrap_or(self.pid)
    }

    pub(super) fn label(&self) -> String {
        format!("generation {} (pid {})", self.number, self.target())
    }

    pub(super) fn info(&self) -> GenerationInfo {
        let state = match self.state {
            GenState::Starting => "starting",
            GenState::Proving { .. } => "proving",
            GenState::Serving => "serving",
            GenState::Retiring { .. } => "retiring",
            GenState::Stopping { .. } => "stopping",
        };
        GenerationInfo { number: self.number, pid: self.target().as_raw(), state: state.into() }
    }

    /// Raises it from idle CPU priority, if it started there
    /// ([`crate::child::priority`]): every thread of its processes. An
    /// error means some thread stays at idle priority (a process of it that
    /// changed its user, with no CAP_SYS_NICE here); it is logged here.
    pub(super) fn leave_idle(&mut self, why: &str) -> std::io::Result<()> {
        if self.idle_until.take().is_none() {
            return Ok(());
        }
        let label = self.label();
        let after = self.started.elapsed();
        let pids = std::iter::once(self.pid).chain(self.main.filter(|&m| m != self.pid));
        match pids.map(crate::child::priority::raise).sum::<std::io::Result<usize>>() {
            Ok(threads) => {
                log::debug!("{label}: {why}: {threads} threads raised to normal CPU priority after {after:?}");
                Ok(())
            }
            Err(e) => {
                log::error!("{label}: {why}: raising it from idle CPU priority: {e}");
                Err(e)
            }
        }
    }

    /// Sends `signal` now; the retire and stop signals are sent again on schedule.
    pub(super) fn send(&mut self, signal: Signal) {
        // It must get the CPU to leave as it is told (logged on failure).
        let _ = self.leave_idle("told to leave");
        if let Err(e) = kill(self.target(), signal) {
            log::warn!("{}: sending {signal}: {e}", self.label());
        }
        self.sent = Some(Sent { signal, first: Instant::now(), resent: 0 });
    }

    pub(super) fn resend_due(&self, schedule: &[Duration]) -> Option<Instant> {
        if !matches!(self.state, GenState::Retiring { .. } | GenState::Stopping { .. }) {
            return None;
        }
        let sent = self.sent?;
        schedule.get(sent.resent).map(|after| sent.first + *after)
    }
}

impl<D: Daemon> Supervisor<D> {
    pub(super) fn begin_reload_by(&mut self, why: &str) {
        self.phase = Phase::Reloading;
        self.reloads_begun += 1;
        self.reload_began();
        let old = self.serving().map(Generation::label).unwrap_or_default();
        log::info!("{why}: reload {}: starting generation {} next to {old}", self.reloads_begun, self.next_number);
        notify::reload_started(Some(format!("reloading: starting generation {}; {old} serving", self.next_number)));
        self.make_room();
        self.start_pending = true;
        self.start_when_room();
    }

    /// Stops the oldest draining generations hard until a new one fits
    /// under `--max-generations`.
    pub(super) fn make_room(&mut self) {
        let cap = self.how.drain.max_generations.max(2);
        loop {
            let alive = self.gens.iter().filter(|g| !g.hard).count();
            if alive < cap {
                return;
            }
            let oldest = self
                .gens
                .iter()
                .enumerate()
                .filter(|(_, g)| !g.hard && matches!(g.state, GenState::Retiring { .. } | GenState::Stopping { .. }))
                .min_by_key(|(_, g)| g.number)
                .map(|(i, _)| i);
            let Some(idx) = oldest else { return };
            self.stop_hard(idx, &format!("{alive} generations alive, --max-generations is {cap}"));
        }
    }

    /// Starts the reload's generation once the generations stopped hard for
    /// room have exited.
    pub(super) fn start_when_room(&mut self) {
        let cap = self.how.drain.max_generations.max(2);
        if self.gens.len() >= cap {
            log::debug!("{} generations alive: the new one waits for a hard-stopped one to exit", self.gens.len());
            return;
        }
        self.start_pending = false;
        if let Err(e) = self.start_generation() {
            let number = self.next_number - 1;
            log::error!("generation {number} could not start: {}", crate::error_chain(&e));
            let detail = format!("generation {number} could not start: {}", crate::error_chain(&e));
            self.reload_failed(format!("generation {number} could not start: {}", self.daemon.summary(&e)), detail);
        }
    }

    /// A generation's drain deadline passed, or the cap needs its place:
    /// the hard stop signal (SIGKILL, or the daemon's own hard stop, then
    /// SIGKILL after [`HARD_KILL_AFTER`]).
    pub(super) fn stop_hard(&mut self, idx: usize, why: &str) {
        let signal = self.how.hard_stop_signal.unwrap_or(Signal::SIGKILL);
        let g = &mut self.gens[idx];
        log::warn!("{}: {why}: stopping it hard ({signal})", g.label());
        g.hard = true;
        g.state = GenState::Stopping { kill_at: (signal != Signal::SIGKILL).then(|| Instant::now() + HARD_KILL_AFTER) };
        g.send(signal);
    }

    /// `reason` goes to STATUS= and the log, `detail` (with a config
    /// check's whole output) to the callers waiting for this reload.
    pub(super) fn reload_failed(&mut self, reason: String, detail: String) {
        self.reloads_failed += 1;
        self.reload_ended(false);
        let serving = self.serving().map(Generation::label).unwrap_or_else(|| "nothing".into());
        log::error!("reload failed: {reason}; {serving} keeps serving");
        let message = format!("reload failed: {detail}\n{serving} keeps serving");
        self.last_failure = Some(reason);
        // systemd gets STATUS= before the waiting callers (ExecReload=) exit,
        // so `systemctl status` right after a failed `systemctl reload` says why.
        if self.serving().is_some() {
            self.phase = Phase::Serving;
            notify::ready(&self.status_line(true));
            self.answer_waiters(self.reloads_begun, false, &message);
        } else {
            // The old generation died during the reload and the new one failed.
            self.answer_waiters(self.reloads_begun, false, &message);
            self.begin_stop();
        }
    }

    /// A starting generation is ready: it serves, and every other serving
    /// generation retires.
    pub(super) fn promote(&mut self, idx: usize) {
        let elapsed = self.gens[idx].started.elapsed();
        self.gens[idx].state = GenState::Serving;
        let label = self.gens[idx].label();
        log::info!("{label} ready after {elapsed:?}");
        let signal = self.how.retire_signal;
        let until = self.how.drain.timeout.map(|t| Instant::now() + t);
        let mut retired = Vec::new();
        for (i, g) in self.gens.iter_mut().enumerate() {
            if i != idx && g.state == GenState::Serving {
                log::info!("{} retiring with {signal}", g.label());
                g.state = GenState::Retiring { until };
                g.send(signal);
                retired.push(g.label());
            }
        }
        let reloaded = self.phase == Phase::Reloading;
        if reloaded {
            self.reloads_ok += 1;
            self.last_failure = None;
            self.reload_ended(true);
        } else {
            self.write_metrics_file();
        }
        self.phase = Phase::Serving;
        notify::ready(&self.status_line(false));
        if reloaded {
            let mut message = format!("{label} serves");
            if !retired.is_empty() {
                message.push_str(&format!("; told {} to retire ({signal})", retired.join(", ")));
            }
            self.answer_waiters(self.reloads_begun, true, &message);
        }
    }

    /// Stops a generation that failed to start with the stop signal: it may
    /// already accept from the shared queues, and a graceful stop lets it
    /// finish what it took.
    pub(super) fn abandon(&mut self, idx: usize) {
        let kill_at = self.how.stop_timeout.map(|t| Instant::now() + t);
        let g = &mut self.gens[idx];
        g.state = GenState::Stopping { kill_at };
        g.send(self.how.stop_signal);
        if let Some(probe) = g.probe.running.take() {
            let _ = kill(probe, Signal::SIGKILL);
        }
    }

    pub(super) fn fail_start(&mut self, number: u64, pid: Pid, reason: String) {
        let label = format!("generation {number} (pid {pid})");
        let reason = format!("{label} {reason}");
        self.fail_start_with(number, pid, reason.clone(), reason);
    }

    /// `reason` for STATUS= and the log, `detail` for the waiting callers.
    pub(super) fn fail_start_with(&mut self, number: u64, pid: Pid, reason: String, detail: String) {
        if number == 1 && self.phase == Phase::Starting {
            log::error!("{detail}");
            self.start_failure = Some(RunError::FirstGeneration { pid, reason: detail });
            self.begin_stop();
        } else if self.phase != Phase::Stopping {
            self.reload_failed(reason, detail);
        }
    }

    pub(super) fn begin_stop(&mut self) {
        if self.phase != Phase::Stopping {
            self.phase = Phase::Stopping;
            self.serving_at_stop = self.serving().map(|g| g.number);
            notify::stopping();
            self.answer_waiters(u64::MAX, false, "the supervisor is stopping");
        }
        let kill_at = self.how.stop_timeout.map(|t| Instant::now() + t);
        let signal = self.how.stop_signal;
        for g in &mut self.gens {
            if !matches!(g.state, GenState::Stopping { .. }) {
                log::info!("{}: sending {signal}", g.label());
                g.state = GenState::Stopping { kill_at };
                g.send(signal);
            }
        }
    }
}
