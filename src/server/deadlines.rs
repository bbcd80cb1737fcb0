//! The clocks of the event loop: when it must wake next (idle, request and
//! unread deadlines, a pause in accepting, a recheck, a log report), and
//! what it does when one passes: close the connection, or shut it down and
//! keep it as a zombie while the peer holds descriptors it never read.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::sys::epoll::Epoll;

use super::conn::Conn;
use super::event_loop::LOG_REPORT;
use super::Server;

/// How often zombie connections and held-back connections are looked at
/// again when nothing else wakes the loop.
pub(super) const RECHECK: Duration = Duration::from_millis(20);

impl Server {
    /// The next instant something is due: an idle, request or unread
    /// deadline, the end of a pause in accepting, or a recheck.
    pub(super) fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let l = self.limits();
        let idle = self.idle_timeout();
        let pause_end = self.accept_paused_until.filter(|t| now < *t);
        let recheck = self.conns.values().any(|c| c.held || c.zombie || c.sent_fds > 0).then(|| now + RECHECK);
        // Suppressed log lines are reported even if no peer wakes the loop.
        let report = crate::peerlog::pending().then(|| self.last_log_report + LOG_REPORT);
        self.conns
            .values()
            .filter(|c| !c.zombie)
            .flat_map(|c| {
                [
                    Some(c.last_active + idle),
                    c.request_started.filter(|_| !c.held).map(|t| t + l.request_timeout),
                    c.unread_since.map(|t| t + l.unread_timeout),
                ]
            })
            .flatten()
            .chain(pause_end)
            .chain(recheck)
            .chain(report)
            .min()
    }

    /// Closes idle connections, requests not complete in time, and peers
    /// that leave descriptors unread; drops zombies whose descriptors are
    /// gone.
    pub(super) fn expire(&mut self, now: Instant) {
        let idle = self.idle_timeout();
        let (request_timeout, unread_timeout) = (self.limits().request_timeout, self.limits().unread_timeout);
        let mut gone = Vec::new();
        for (id, c) in self.conns.iter_mut() {
            if c.zombie {
                c.refresh_unread(now);
                if c.sent_fds == 0 {
                    log::info!("{}: the descriptors it left unread are gone; connection closed", c.peer);
                    gone.push(*id);
                }
                continue;
            }
            if c.unread_since.is_some_and(|t| now.duration_since(t) >= unread_timeout) && c.sent_fds > 0 {
                crate::peer_log!(
                    c.peer,
                    log::Level::Warn,
                    "left {} descriptors unread for {:?}: shutting the connection down (limits.unread_timeout)",
                    c.sent_fds,
                    unread_timeout
                );
                c.make_zombie();
                unwatch(&self.epoll, c);
                continue;
            }
            if c.request_started.is_some_and(|t| !c.held && now.duration_since(t) >= request_timeout) {
                crate::peer_log!(
                    c.peer,
                    log::Level::Info,
                    "request not complete after {:?}: closing (limits.request_timeout)",
                    request_timeout
                );
                gone.push(*id);
            } else if now.duration_since(c.last_active) >= idle && c.outbox.is_empty() {
                log::debug!("{}: closing idle connection after {:?}", c.peer, idle);
                gone.push(*id);
            } else if now.duration_since(c.last_active) >= idle {
                crate::peer_log!(
                    c.peer,
                    log::Level::Info,
                    "did not read its replies for {idle:?}: closing (limits.idle_timeout)"
                );
                gone.push(*id);
            }
        }
        for id in gone {
            if let Some(conn) = self.conns.remove(&id) {
                self.close(id, conn);
            }
        }
    }

    /// Lets a connection go: closed at once, unless the peer still has
    /// descriptors of ours unread; then it is shut down and kept, so they
    /// stay counted against its uid until it reads them or closes.
    pub(super) fn close(&mut self, id: u64, mut conn: Conn) {
        conn.refresh_unread(Instant::now());
        if conn.sent_fds > 0 && !conn.zombie {
            conn.make_zombie();
        }
        unwatch(&self.epoll, &mut conn);
        if conn.zombie && conn.sent_fds > 0 {
            self.conns.insert(id, conn);
        }
    }
}

/// Takes a connection out of the epoll before it leaves the loop or is
/// shut down.
pub(super) fn unwatch(epoll: &Epoll, conn: &mut Conn) {
    if conn.interest.take().is_some() {
        let _ = epoll.delete(conn.stream.as_fd());
    }
}
