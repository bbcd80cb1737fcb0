//! What one local peer may cost the broker: every limit of the control
//! socket, with its default and its `[limits]` key.
//!
//! The broker is shared by every local process that can reach its control
//! socket, and the whole point of it (no reload ever drops a connection)
//! holds only while it keeps answering. [`Limits`] is read from the
//! configuration (`[limits]`, see `docs/config.md`) and applied by the
//! control loop ([`crate::server`]) at each use, so a reload changes them
//! for the connections to come and for the requests not yet read.
//!
//! Root and the broker's own uid are *trusted*: they are not held to the
//! per-uid caps (they could take the sockets from the broker's memory
//! anyway), and they, with the peers a rule names by uid or group, may use
//! the [`Limits::reserved_clients`] slots when the table is nearly full.

use std::time::Duration;

/// The limits in force. `Default` gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once (`max_clients`); beyond, new ones wait in
    /// the kernel's accept queue.
    pub max_clients: usize,
    /// Of [`Limits::max_clients`], slots only root, the broker's uid and
    /// peers a rule names by uid or group may take (`reserved_clients`).
    pub reserved_clients: usize,
    /// Connections one uid may hold at once (`max_clients_per_uid`); not
    /// for trusted peers.
    pub max_clients_per_uid: usize,
    /// A connection with no complete request and no reply written for this
    /// long is closed (`idle_timeout`; `serve --idle-timeout` wins).
    pub idle_timeout: Duration,
    /// A request must be complete this long after its first byte
    /// (`request_timeout`); more partial bytes do not extend it.
    pub request_timeout: Duration,
    /// The largest request, in bytes (`max_request_bytes`).
    pub max_request_bytes: usize,
    /// Most items in one `bind_many` (`max_batch`); the request must also
    /// fit in [`Limits::max_request_bytes`] (about 1,700 items of multibinder's
    /// form in 64 KiB).
    pub max_batch: usize,
    /// Descriptors sent to one connection and not yet read by it
    /// (`max_fds_in_flight_per_connection`): above, the broker reads no
    /// further request from it until it reads its replies.
    pub max_fds_in_flight_per_connection: usize,
    /// The same, summed over the connections of one uid
    /// (`max_fds_in_flight_per_uid`); not for trusted peers.
    pub max_fds_in_flight_per_uid: usize,
    /// A connection that leaves descriptors unread this long without reading
    /// any is shut down (`unread_timeout`).
    pub unread_timeout: Duration,
    /// Reply bytes queued in the broker for one connection before it stops
    /// reading that connection's requests (`max_queued_bytes_per_connection`).
    pub max_queued_bytes_per_connection: usize,
    /// Reply bytes queued in the broker for all untrusted connections
    /// together (`max_queued_bytes`).
    pub max_queued_bytes: usize,
    /// Most sockets in one `list` page (`list_page_max`); also the page a
    /// `list` without params gets.
    pub list_page_max: usize,
    /// One `metrics` answer per this long for each untrusted uid (a rule's
    /// `introspect`) (`metrics_interval`): with 10,000 held sockets the text
    /// is about 4 MB, built in one turn, so a peer asking in a loop on many
    /// connections would cost the broker that much CPU and memory each time.
    pub metrics_interval: Duration,
    /// Log lines about one uid's refused or failed requests allowed in a
    /// burst (`log_burst`) ...
    pub log_burst: u32,
    /// ... and then this many per minute (`log_per_minute`); the rest are
    /// counted and reported as "N more suppressed".
    pub log_per_minute: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_clients: 4096,
            reserved_clients: 64,
            max_clients_per_uid: 128,
            idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            max_request_bytes: 64 * 1024,
            max_batch: 2048,
            max_fds_in_flight_per_connection: 1024,
            max_fds_in_flight_per_uid: 4096,
            unread_timeout: Duration::from_secs(10),
            max_queued_bytes_per_connection: 256 * 1024,
            max_queued_bytes: 8 * 1024 * 1024,
            list_page_max: 256,
            metrics_interval: Duration::from_secs(1),
            log_burst: 20,
            log_per_minute: 60,
        }
    }
}
