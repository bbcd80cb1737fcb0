//! What asks the supervisor to act: the signals it reads from its signalfd
//! (reload, stop, SIGCHLD) and the requests on its [`super::control`]
//! socket (`status`, `reload`, whose callers wait for the reload's outcome).
//! Requests that arrive during a start or a reload coalesce into one more
//! reload after it.

use nix::sys::signal::Signal;

use super::control::{self, Reply, Request};
use super::{Daemon, Generation, Phase, Supervisor};

/// Parses a signal name (`TERM`, `SIGTERM`, `sigusr1`) or number (`15`).
pub fn parse_signal(text: &str) -> Result<Signal, String> {
    if let Ok(n) = text.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| format!("{n}: not a signal number"));
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    name.parse().map_err(|_| format!("'{text}': not a signal name (e.g. TERM, QUIT, USR1)"))
}

impl<D: Daemon> Supervisor<D> {
    pub(super) fn read_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else { continue };
            if sig == Signal::SIGCHLD {
                self.reap();
            } else if self.how.stop_signals.contains(&sig) {
                self.stop_requests += 1;
                match self.how.hard_stop_signal {
                    Some(hard) if self.stop_requests > 1 => {
                        log::info!("{sig}: stopping now (hard stop: {hard} to every generation)");
                        self.gens.iter_mut().for_each(|g| g.send(hard));
                    }
                    _ => {
                        log::info!("{sig}: stopping every generation");
                        self.begin_stop();
                    }
                }
            } else if self.how.reload_signals.contains(&sig) {
                self.request_reload(sig.as_ref());
            } else {
                log::debug!("{sig}: ignored");
            }
        }
        // SIGCHLD coalesces; reaping on every wake also catches a child that
        // exited between a read and the next poll.
        self.reap();
    }

    /// A reload asked for by a signal or a control request: now, or after
    /// the start or reload in progress (requests meanwhile coalesce into
    /// one). Returns the number of the reload whose outcome answers it.
    pub(super) fn request_reload(&mut self, why: &str) -> Option<u64> {
        let number = self.reloads_begun + 1;
        match self.phase {
            Phase::Serving => self.begin_reload_by(why),
            Phase::Starting | Phase::Reloading => {
                log::info!("{why}: a reload will follow the current one");
                self.reload_queued = true;
            }
            Phase::Stopping => {
                log::info!("{why}: ignored while stopping");
                return None;
            }
        }
        Some(number)
    }

    /// Accepts control connections, reads their requests and answers or
    /// queues them.
    pub(super) fn read_control(&mut self) {
        let Some(server) = &self.control else { return };
        let room = control::MAX_CONNECTIONS.saturating_sub(self.reading.len() + self.waiters.len());
        let new = server.accept(room);
        self.reading.extend(new);
        let mut i = 0;
        while i < self.reading.len() {
            match self.reading[i].read_request() {
                Ok(None) => i += 1,
                Ok(Some(_)) if self.reading[i].refused.is_some() => {
                    let conn = self.reading.swap_remove(i);
                    let why = conn.refused.clone().unwrap_or_default();
                    conn.answer(&Reply::new(false, why));
                }
                Err(why) => {
                    let conn = self.reading.swap_remove(i);
                    log::debug!("control client (uid {}): {why}", conn.uid);
                    conn.answer(&Reply::new(false, why));
                }
                Ok(Some(Request::Status)) => {
                    let conn = self.reading.swap_remove(i);
                    let mut reply = Reply::new(true, self.status_line(false));
                    reply.generations = self.gens.iter().map(Generation::info).collect();
                    conn.answer(&reply);
                }
                Ok(Some(Request::Metrics)) => {
                    let conn = self.reading.swap_remove(i);
                    let mut reply = Reply::new(true, self.status_line(false));
                    reply.metrics = Some(self.metrics_text());
                    conn.answer(&reply);
                }
                Ok(Some(Request::Reload)) => {
                    let conn = self.reading.swap_remove(i);
                    let why = format!("reload requested on the control socket (uid {})", conn.uid);
                    // Registered before the reload begins: a start that fails
                    // at once answers it.
                    let number = self.reloads_begun + 1;
                    self.waiters.push((conn, number));
                    if self.request_reload(&why).is_none() {
                        self.answer_waiters(u64::MAX, false, "the supervisor is stopping");
                    }
                }
            }
        }
    }

    /// Answers every caller waiting for reload `number` or an earlier one.
    pub(super) fn answer_waiters(&mut self, number: u64, ok: bool, message: &str) {
        let (due, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.waiters).into_iter().partition(|(_, n)| *n <= number);
        self.waiters = rest;
        for (conn, _) in due {
            conn.answer(&Reply::new(ok, message));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert_eq!(parse_signal("TERM").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("sigusr1").unwrap(), Signal::SIGUSR1);
        assert_eq!(parse_signal("3").unwrap(), Signal::SIGQUIT);
        assert!(parse_signal("NOPE").is_err());
    }
}
