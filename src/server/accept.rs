//! Accepting control connections: a bounded number per turn, each peer's
//! credentials read once, and the slot limits applied at the door (per uid,
//! the reserve for root, the broker's uid and peers a rule names, and the
//! descriptors left below `RLIMIT_NOFILE`). A refused peer gets an error
//! naming the limit and is closed; an accepted one joins the event loop
//! ([`Server::insert`]) and its first request is read at once.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::PollFlags;
use serde_json::Value;

use super::conn::Conn;
use super::Server;
use crate::fd;
use crate::protocol::{code, Response, RpcError};

/// How long to stop accepting after accept() fails for lack of resources
/// (EMFILE, ENFILE, ENOMEM): the listener stays readable, so accepting again
/// at once would spin, logging a failure each turn.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

impl Server {
    /// Accepts waiting connections (a bounded number per turn), refusing
    /// those over a limit with an error, and reads each one's first request
    /// at once: a client that connects per request (multibinder's) is then
    /// answered in the turn that accepts it.
    pub(super) fn accept_all(&mut self) {
        let uid_conns: HashMap<u32, usize> = self.uid_use.iter().map(|(uid, u)| (*uid, u.conns)).collect();
        let mut uid_conns = uid_conns;
        // Bounded, so a flood of connections cannot keep the loop from
        // serving the ones it already has.
        for _ in 0..64 {
            let l = self.limits().clone();
            if self.conns.len() >= l.max_clients {
                return;
            }
            let stream = match self.control.listener.accept() {
                Ok((stream, _)) => {
                    if self.accept_paused_until.take().is_some() {
                        log::info!("{}: accepting connections again", self.control.path.display());
                    }
                    stream
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // A connection that was reset while queued, or a signal.
                Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted) => continue,
                Err(e) => {
                    // EMFILE and friends: leave the rest queued in the kernel
                    // and try again later. Warn once per episode, not each retry.
                    let level = if self.accept_paused_until.is_some() { log::Level::Debug } else { log::Level::Warn };
                    log::log!(
                        level,
                        "{}: accept failed: {e}; retrying every {ACCEPT_BACKOFF:?}",
                        self.control.path.display()
                    );
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            };
            let peer = match fd::peer_credentials(stream.as_fd()) {
                Ok(peer) => peer,
                Err(e) => {
                    log::warn!("control connection without credentials, closing: {e}");
                    continue;
                }
            };
            let trusted = self.live.policy.trusts(&peer);
            let mine = uid_conns.get(&peer.uid).copied().unwrap_or(0);
            let refusal = if !trusted && mine >= l.max_clients_per_uid {
                Some((
                    0,
                    format!(
                        "too many connections from uid {} ({mine}, limits.max_clients_per_uid is {})",
                        peer.uid, l.max_clients_per_uid
                    ),
                ))
            } else if self.conns.len() + l.reserved_clients >= l.max_clients && !self.live.policy.names_peer(&peer) {
                Some((1, format!(
                    "the broker serves {} connections; the last {} of limits.max_clients = {} are kept for root, uid {} and peers a rule names",
                    self.conns.len(),
                    l.reserved_clients,
                    l.max_clients,
                    self.live.policy.owner()
                )))
            } else if self.fds_in_use() + l.reserved_clients >= self.nofile && !self.live.policy.names_peer(&peer) {
                // Near RLIMIT_NOFILE the same reserve holds: idle strangers
                // must not take the last descriptors, or accept() and every
                // bind's duplicate would fail for everyone.
                Some((2, format!(
                    "the broker uses about {} of its {} descriptors; the last {} are kept for root, uid {} and peers a rule names",
                    self.fds_in_use(),
                    self.nofile,
                    l.reserved_clients,
                    self.live.policy.owner()
                )))
            } else {
                None
            };
            if let Some((limit, why)) = refusal {
                // Indexes of metrics::counters::REFUSALS.
                self.counters.connections_refused[limit] += 1;
                crate::peer_log!(peer, log::Level::Warn, "connection refused: {why}");
                // Best effort, never blocking: tell the client why.
                let reply = Response::err(Value::Null, RpcError::new(code::TOO_MANY, why)).to_bytes();
                let _ = stream.set_nonblocking(true);
                let _ = fd::send_with_fds(stream.as_fd(), &reply, &[]);
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("{peer}: could not make the connection non-blocking, closing: {e}");
                continue;
            }
            *uid_conns.entry(peer.uid).or_default() += 1;
            self.counters.connections_accepted += 1;
            self.uid_use.entry(peer.uid).or_default().conns += 1;
            let id = self.insert(Conn::new(stream, peer, l.max_request_bytes));
            self.service(id, PollFlags::POLLIN);
            if self.takeover.is_some() {
                return;
            }
        }
    }
}
