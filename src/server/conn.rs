//! One client connection of the event loop ([`super::Server`]): its
//! stream and peer, the [`Framer`] its request bytes go into, the replies
//! queued for it (cut by [`channel::split`] so no message carries more than
//! [`crate::fd::SCM_MAX_FD`] descriptors) and the clocks and counters the limits read.
//! Bytes come in through the loop; replies go out through [`Conn::flush`].

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use nix::sys::epoll::EpollFlags;
use serde_json::Value;

use super::list::ListJob;
use crate::channel;
use crate::fd::{self, PeerCred};
use crate::protocol::framing::Framer;

/// Replies queued for one connection before the broker stops reading its
/// requests (back-pressure on a client that does not read); the bytes and
/// descriptors they may hold are capped by [`crate::limits::Limits`] too.
pub(super) const MAX_QUEUED_REPLIES: usize = 16;

/// A reply waiting to be written.
pub(super) struct Outgoing {
    pub(super) bytes: Vec<u8>,
    pub(super) sent: usize,
    /// Duplicates of the descriptors to attach, closed once sent.
    pub(super) fds: Vec<OwnedFd>,
}

/// One client connection.
pub(super) struct Conn {
    pub(super) stream: UnixStream,
    pub(super) peer: PeerCred,
    pub(super) framer: Framer,
    pub(super) outbox: VecDeque<Outgoing>,
    /// Reply bytes in `outbox` not written yet.
    pub(super) queued_bytes: usize,
    /// Descriptors in `outbox` not sent yet (duplicates the broker holds).
    pub(super) queued_fds: usize,
    /// Descriptors sent that the peer may not have read yet: reset to 0 when
    /// the kernel says the peer has read everything (`SIOCOUTQ` is 0).
    pub(super) sent_fds: usize,
    /// `SIOCOUTQ` when last looked at.
    pub(super) last_unread: usize,
    /// Since when the peer has left descriptors unread without reading.
    pub(super) unread_since: Option<Instant>,
    /// The last complete request or written reply (the idle clock).
    pub(super) last_active: Instant,
    /// When the first byte of the request not yet complete came.
    pub(super) request_started: Option<Instant>,
    /// Requests are waiting but a limit holds them back: the connection is
    /// not read from until it is looked at again.
    pub(super) held: bool,
    /// The peer has shut down its side: answer what is complete, then close.
    pub(super) read_closed: bool,
    /// An unrecoverable protocol error: flush the error reply, then close.
    pub(super) closing: bool,
    /// Shut down, kept only to know when the descriptors the peer left
    /// unread are gone (they stay charged to the broker's user until then).
    pub(super) zombie: bool,
    /// The id of an accepted `takeover` request: the connection leaves the
    /// loop for [`crate::upgrade::hand_over`].
    pub(super) takeover: Option<Value>,
    /// Descriptors the peer attached to its requests (SCM_RIGHTS), in order,
    /// until an `adopt` request takes them; at most [`crate::fd::SCM_MAX_FD`].
    pub(super) received: VecDeque<OwnedFd>,
    /// A `list` page being built a few entries per turn (untrusted peers):
    /// until it is done, no further request of the connection is read.
    pub(super) list_job: Option<ListJob>,
    /// What the event loop's epoll watches the stream for; `None` when it
    /// is not registered (a zombie).
    pub(super) interest: Option<EpollFlags>,
}

impl Conn {
    pub(super) fn new(stream: UnixStream, peer: PeerCred, max_request: usize) -> Conn {
        Conn {
            stream,
            peer,
            framer: Framer::new(max_request),
            outbox: VecDeque::new(),
            queued_bytes: 0,
            queued_fds: 0,
            sent_fds: 0,
            last_unread: 0,
            unread_since: None,
            last_active: Instant::now(),
            request_started: None,
            held: false,
            read_closed: false,
            closing: false,
            zombie: false,
            takeover: None,
            received: VecDeque::new(),
            list_job: None,
            interest: None,
        }
    }

    /// Descriptors the peer has not read yet, sent or still queued.
    pub(super) fn in_flight(&self) -> usize {
        self.sent_fds + self.queued_fds
    }

    /// Asks the kernel what the peer has read, and updates the count of
    /// descriptors in flight and the unread clock.
    pub(super) fn refresh_unread(&mut self, now: Instant) {
        if self.sent_fds == 0 {
            self.unread_since = None;
            return;
        }
        match fd::unread_by_peer(self.stream.as_fd()) {
            Ok(0) => {
                self.sent_fds = 0;
                self.last_unread = 0;
                self.unread_since = None;
            }
            Ok(n) => {
                // Any progress restarts the clock: a slow reader is not a
                // stuck one.
                if n < self.last_unread || self.unread_since.is_none() {
                    self.unread_since = Some(now);
                }
                self.last_unread = n;
            }
            Err(e) => {
                log::debug!("{}: SIOCOUTQ: {e}", self.peer);
            }
        }
    }

    /// What epoll should watch for: writable while replies wait, readable
    /// while requests may be read; nothing when a limit holds it back (it is
    /// looked at again each turn) or it is done reading.
    pub(super) fn wanted(&self) -> EpollFlags {
        if !self.outbox.is_empty() {
            EpollFlags::EPOLLOUT
        } else if !self.read_closed && !self.closing && !self.held {
            EpollFlags::EPOLLIN
        } else {
            EpollFlags::empty()
        }
    }

    /// Shuts the connection down for good, keeping it only to watch the
    /// descriptors its peer left unread.
    pub(super) fn make_zombie(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.zombie = true;
        self.held = false;
        self.list_job = None;
        // Unsent replies (and their duplicates) are dropped now.
        self.outbox.clear();
        self.queued_bytes = 0;
        self.queued_fds = 0;
    }

    /// Queues a reply, cut by [`channel::split`] so no message carries more
    /// than [`crate::fd::SCM_MAX_FD`] descriptors.
    pub(super) fn queue(&mut self, bytes: Vec<u8>, fds: Vec<OwnedFd>) {
        self.queued_bytes += bytes.len();
        self.queued_fds += fds.len();
        for (bytes, fds) in channel::split(bytes, fds) {
            self.outbox.push_back(Outgoing { bytes, sent: 0, fds });
        }
    }

    /// Writes queued replies, adding the bytes written to `written`.
    /// Ok(true) when everything is written, Ok(false) when the socket is full.
    pub(super) fn flush(&mut self, written: &mut usize) -> io::Result<bool> {
        while let Some(out) = self.outbox.front_mut() {
            let fds: Vec<BorrowedFd<'_>> = out.fds.iter().map(|f| f.as_fd()).collect();
            match fd::send_with_fds(self.stream.as_fd(), &out.bytes[out.sent..], &fds) {
                Ok(n) => {
                    // The descriptors travelled with the first byte.
                    let k = out.fds.len();
                    out.fds.clear();
                    self.queued_fds -= k;
                    self.sent_fds += k;
                    out.sent += n;
                    self.queued_bytes -= n;
                    *written += n;
                    self.last_active = Instant::now();
                    if self.unread_since.is_none() && k > 0 {
                        self.unread_since = Some(Instant::now());
                    }
                    if out.sent == out.bytes.len() {
                        self.outbox.pop_front();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}
