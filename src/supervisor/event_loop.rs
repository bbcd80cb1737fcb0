//! The supervisor's loop: [`supervise`] sets up (subreaper, signals into a
//! signalfd, the notify and control sockets, generation 1), then one `poll`
//! over the signalfd, the notify socket and the control connections wakes
//! for events or for the next timer ([`Supervisor::next_deadline`]); each
//! turn reads every source, then checks the timers (readiness by delay or
//! pidfile, timeouts, grace windows, probes, resends, drain and stop
//! deadlines). Everything runs in this one thread.

use std::os::fd::AsFd;
use std::process::ExitCode;
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::WaitStatus;

use super::readiness::notify_socket;
use super::{control, Daemon, GenState, Phase, Readiness, RunError, Supervision, Supervisor, PIDFILE_POLL};

fn setup<E: std::error::Error>(what: &'static str) -> impl FnOnce(nix::Error) -> RunError<E> {
    move |e| RunError::Setup { what, source: e.into() }
}

/// Runs generations of `daemon` (made by `prepare` once signals are routed
/// to the supervisor) until a stop signal or the daemon's end; the exit code
/// is the serving generation's (0 when it died of our own stop signal).
pub fn supervise<D: Daemon>(
    how: Supervision,
    prepare: impl FnOnce() -> Result<D, D::Error>,
) -> Result<ExitCode, RunError<D::Error>> {
    nix::sys::prctl::set_child_subreaper(true).map_err(setup("becoming a child subreaper"))?;
    let mut handled = vec![Signal::SIGCHLD];
    handled.extend(how.reload_signals.iter().chain(how.stop_signals));
    let signals = crate::signals::block_into_signalfd(&handled).map_err(setup("setting up signal handling"))?;
    let daemon = prepare().map_err(RunError::Start)?;
    let notify_sock = match how.ready {
        Readiness::Notify => Some(notify_socket().map_err(|source| RunError::Setup { what: "notify socket", source })?),
        _ => None,
    };
    // Without it, SIGHUP still reloads; only waiting for the outcome is lost.
    let control = match control::Server::bind() {
        Ok(server) => {
            log::info!(
                "control socket {}: `sockbroker supervisor reload --pid {}`",
                server.address(),
                std::process::id()
            );
            Some(server)
        }
        Err(e) => {
            log::error!("control socket @{}: {e}; reloads by signal only", control::name(nix::unistd::getpid()));
            None
        }
    };
    let mut how = how;
    if how.idle_start.is_some() && !crate::child::priority::can_raise() {
        log::info!(
            "--idle-start is off: raising a new generation back from idle CPU priority needs \
             CAP_SYS_NICE (the shipped units grant it) or an RLIMIT_NICE of 20 (LimitNICE=+0); reloads start it \
             at normal priority"
        );
        how.idle_start = None;
    }
    if let Some(limit) = how.idle_start {
        log::info!(
            "a reload's generation starts at idle CPU priority until it is ready, at most {limit:?} (--idle-start)"
        );
    }
    let telemetry = super::metrics::Telemetry::new(how.metrics.clone());
    let mut sup = Supervisor {
        how,
        daemon,
        signals,
        notify_sock,
        gens: Vec::new(),
        next_number: 1,
        phase: Phase::Starting,
        reload_queued: false,
        reloads_begun: 0,
        start_pending: false,
        control,
        reading: Vec::new(),
        waiters: Vec::new(),
        stop_requests: 0,
        reloads_ok: 0,
        reloads_failed: 0,
        last_failure: None,
        serving_at_stop: None,
        final_status: None,
        start_failure: None,
        telemetry,
    };
    sup.start_generation().map_err(RunError::Start)?;
    sup.event_loop()?;
    sup.reap_orphans();
    if let Some(err) = sup.start_failure.take() {
        return Err(err);
    }
    Ok(sup.exit_code())
}

impl<D: Daemon> Supervisor<D> {
    pub(super) fn event_loop(&mut self) -> Result<(), RunError<D::Error>> {
        loop {
            if self.phase == Phase::Stopping && self.gens.is_empty() {
                self.answer_waiters(u64::MAX, false, "the supervisor stopped");
                return Ok(());
            }
            let due = self.next_deadline().into_iter().chain(self.telemetry.next_due()).min();
            let timeout = crate::signals::poll_timeout(due.map(|at| at.saturating_duration_since(Instant::now())));
            let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
            if let Some((sock, _)) = &self.notify_sock {
                fds.push(PollFd::new(sock.as_fd(), PollFlags::POLLIN));
            }
            if let Some(server) = &self.control {
                fds.push(PollFd::new(server.as_fd(), PollFlags::POLLIN));
            }
            for conn in &self.reading {
                fds.push(PollFd::new(conn.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(RunError::Loop(e.into())),
            }
            drop(fds);
            self.read_signals();
            self.read_notify();
            self.read_control();
            self.check_timers();
            self.telemetry_tick();
            if self.phase == Phase::Serving && self.reload_queued {
                self.reload_queued = false;
                self.begin_reload_by("queued request");
            }
            if self.phase == Phase::Reloading && self.start_pending {
                self.start_when_room();
            }
        }
    }

    /// The earliest moment something must be checked without an event.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.gens
            .iter()
            .filter_map(|g| {
                let own = match g.state {
                    GenState::Starting => {
                        let timeout = g.started + self.how.ready_timeout;
                        Some(
                            match &self.how.ready {
                                Readiness::Notify => timeout,
                                Readiness::Delay(d) => timeout.min(g.started + *d),
                                Readiness::PidFile(_) => timeout.min(Instant::now() + PIDFILE_POLL),
                            }
                            .min(g.idle_until.unwrap_or(timeout)),
                        )
                    }
                    GenState::Proving { ready_at } => {
                        let timeout = g.started + self.how.ready_timeout;
                        let mut at = timeout.min(g.probe.next.unwrap_or(timeout));
                        // A running probe ends with SIGCHLD, not a deadline.
                        let waiting = self.how.proof.probe.is_some() && !g.probe.passed;
                        if !waiting {
                            at = at.min(ready_at + self.how.proof.grace);
                        }
                        Some(at)
                    }
                    GenState::Stopping { kill_at } => kill_at,
                    GenState::Retiring { until } => until,
                    GenState::Serving => None,
                };
                own.into_iter().chain(g.resend_due(self.how.resend_after)).min()
            })
            .min()
    }

    /// Delay and pidfile readiness, readiness timeouts, grace windows and
    /// probes, signals sent again, drain and stop deadlines.
    pub(super) fn check_timers(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.gens.len() {
            let (state, started, number, target) = {
                let g = &self.gens[i];
                (g.state, g.started, g.number, g.target())
            };
            if self.gens[i].resend_due(self.how.resend_after).is_some_and(|due| now >= due) {
                let g = &mut self.gens[i];
                if let Some(sent) = g.sent.as_mut() {
                    log::debug!("generation {number} (pid {target}): {} again", sent.signal);
                    let _ = kill(target, sent.signal);
                    sent.resent += 1;
                }
            }
            let timeout = self.how.ready_timeout;
            match state {
                GenState::Starting => {
                    if self.gens[i].idle_until.is_some_and(|at| now >= at) {
                        let limit = self.how.idle_start.unwrap_or_default();
                        log::info!(
                            "generation {number} (pid {target}): still starting after {limit:?} at idle CPU \
                             priority (--idle-start); raising it to normal"
                        );
                        if !self.leave_idle_or_stop(i, "--idle-start") {
                            i += 1;
                            continue;
                        }
                    }
                    let ready = match self.how.ready.clone() {
                        Readiness::Notify => false,
                        Readiness::Delay(d) => now >= started + d,
                        Readiness::PidFile(path) => self.pidfile_ready(&path, i),
                    };
                    if ready {
                        self.signalled_ready(i);
                    } else if now >= started + timeout {
                        self.abandon(i);
                        self.fail_start(number, target, format!("was not ready within {timeout:?}; stopped it"));
                    }
                }
                GenState::Proving { ready_at } => {
                    let probe = self.gens[i].probe;
                    let proven = self.how.proof.probe.is_none() || probe.passed;
                    if proven && now >= ready_at + self.how.proof.grace {
                        self.promote(i);
                    } else if now >= started + timeout {
                        self.abandon(i);
                        let why = if proven { "was not proven ready" } else { "did not pass --ready-probe" };
                        self.fail_start(number, target, format!("{why} within {timeout:?}; stopped it"));
                    } else if probe.running.is_none() && probe.next.is_some_and(|at| now >= at) {
                        self.run_probe(i);
                    }
                }
                GenState::Retiring { until: Some(until) } if now >= until => {
                    let drain = self.how.drain.timeout.unwrap_or_default();
                    self.stop_hard(i, &format!("still draining {drain:?} after the retire signal (--drain-timeout)"));
                }
                GenState::Stopping { kill_at: Some(kill_at) } if now >= kill_at => {
                    log::warn!(
                        "generation {number} (pid {target}) still running after {}: SIGKILL",
                        self.how.stop_signal
                    );
                    let _ = kill(target, Signal::SIGKILL);
                    self.gens[i].state = GenState::Stopping { kill_at: self.how.stop_timeout.map(|t| now + t) };
                }
                _ => {}
            }
            i += 1;
        }
    }

    pub(super) fn exit_code(&self) -> ExitCode {
        match self.final_status {
            Some(WaitStatus::Exited(_, code)) => ExitCode::from(code.clamp(0, 255) as u8),
            // Death by the signal we sent to stop it is a clean stop, as systemd counts it.
            Some(WaitStatus::Signaled(_, sig, _)) if sig == Signal::SIGTERM || sig == self.how.stop_signal => {
                ExitCode::SUCCESS
            }
            Some(WaitStatus::Signaled(_, sig, _)) => ExitCode::from(128u8.saturating_add(sig as u8)),
            _ => ExitCode::SUCCESS,
        }
    }
}
