//! Children that exit: every one is reaped with `waitpid(-1)` (the
//! supervisor is a child subreaper, so a daemon's orphans come here too) and
//! matched to a generation, a probe, or nothing (an adopted orphan). At the
//! end, orphans the daemon left behind are stopped and reaped.

use std::os::fd::AsFd;
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::{Daemon, GenState, Phase, Readiness, Supervisor};
use crate::systemd::notify;

pub(super) fn describe(status: &WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, sig, _) => format!("was killed by {sig}"),
        other => format!("{other:?}"),
    }
}

/// Our live children, from /proc/self/task/*/children.
fn own_children() -> Vec<Pid> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return Vec::new() };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|text| text.split_whitespace().filter_map(|p| p.parse().ok()).map(Pid::from_raw).collect::<Vec<_>>())
        .collect()
}

impl<D: Daemon> Supervisor<D> {
    /// Reaps every exited child (ours or adopted) and updates the generations.
    pub(super) fn reap(&mut self) {
        loop {
            let status = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    log::warn!("waitpid: {e}");
                    return;
                }
                Ok(status) => status,
            };
            let Some(pid) = status.pid() else { continue };
            self.on_exit(pid, status);
        }
    }

    pub(super) fn on_exit(&mut self, pid: Pid, status: WaitStatus) {
        if let Some(idx) = self.gens.iter().position(|g| g.probe.running == Some(pid)) {
            self.on_probe_exit(idx, &status);
            return;
        }
        let Some(idx) = self.gens.iter().position(|g| g.pid == pid || g.main == Some(pid)) else {
            log::debug!("reaped pid {pid} (adopted orphan): {}", describe(&status));
            return;
        };
        let g = &mut self.gens[idx];
        if g.main.is_some_and(|m| m != pid) {
            // The launcher of a forking daemon; the generation lives on in `main`.
            g.launcher_exited = true;
            return;
        }
        let forking = matches!(self.how.ready, Readiness::PidFile(_)) && g.main.is_none();
        if forking && g.state == GenState::Starting && matches!(status, WaitStatus::Exited(_, 0)) {
            log::debug!("{}: launcher exited with status 0; waiting for the pidfile", g.label());
            g.launcher_exited = true;
            return;
        }
        let g = self.gens.remove(idx);
        if let Some(probe) = g.probe.running {
            let _ = kill(probe, Signal::SIGKILL);
        }
        if g.state == GenState::Starting && self.phase != Phase::Stopping {
            if let Some(e) = self.daemon.explain_failure(g.number) {
                log::error!("{} {}: {}", g.label(), describe(&status), crate::error_chain(&e));
                let summary = self.daemon.summary(&e);
                self.fail_start_with(g.number, g.target(), summary, crate::error_chain(&e));
                if self.phase != Phase::Stopping {
                    notify::status(&self.status_line(false));
                }
                return;
            }
        }
        let what = describe(&status);
        match g.state {
            GenState::Starting => self.fail_start(g.number, g.target(), format!("{what} before it was ready")),
            GenState::Proving { ready_at } => {
                let reason = format!(
                    "{what} {:.1?} after it said it was ready, inside its {:?} --ready-grace window",
                    ready_at.elapsed(),
                    self.how.proof.grace
                );
                self.fail_start(g.number, g.target(), reason);
            }
            GenState::Serving => {
                log::error!("{} {what} while serving", g.label());
                self.final_status = Some(status);
                if self.phase == Phase::Reloading {
                    log::warn!("waiting for the starting generation to take over");
                } else {
                    self.begin_stop();
                }
            }
            GenState::Retiring { .. } => log::info!("{} retired: {what}", g.label()),
            GenState::Stopping { .. } => {
                log::info!("{} stopped: {what}", g.label());
                if self.serving_at_stop == Some(g.number) {
                    self.final_status = Some(status);
                }
            }
        }
        if self.phase != Phase::Stopping {
            notify::status(&self.status_line(false));
        }
    }

    /// After the generations are gone: stop and reap any orphans the daemon
    /// left behind (they were reparented to us as subreaper): the stop
    /// signal, then SIGKILL after the stop timeout, if there is one.
    pub(super) fn reap_orphans(&mut self) {
        let deadline = self.how.stop_timeout.map(|t| Instant::now() + t);
        let mut signalled = std::collections::HashSet::new();
        loop {
            self.reap();
            let children = own_children();
            if children.is_empty() {
                return;
            }
            let late = deadline.is_some_and(|d| Instant::now() >= d);
            let signal = if late { Signal::SIGKILL } else { self.how.stop_signal };
            for pid in children {
                if signalled.insert((pid, signal)) {
                    log::info!("orphan pid {pid} left by the daemon: {signal}");
                    let _ = kill(pid, signal);
                }
            }
            let mut fds = [PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(100u16));
            while let Ok(Some(_)) = self.signals.read_signal() {}
        }
    }
}
