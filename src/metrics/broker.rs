//! The broker's metrics, as the `metrics` control method answers them and
//! `sockbroker metrics` prints them: per held socket its accept queue
//! (`TCP_INFO` on a TCP listener: `tcpi_unacked` connections waiting,
//! `tcpi_sacked` the effective backlog, the two numbers `ss -lt` shows as
//! Recv-Q and Send-Q), hand-outs and origin; the control loop's
//! [`Counters`](super::counters::Counters); the process's descriptors and
//! memory. `docs/metrics.md` lists every family.
//!
//! UDP and UNIX sockets have no accept queue the kernel reports this way:
//! they get `sockbroker_socket_info` and `sockbroker_socket_handouts_total`
//! only.

use std::os::fd::OwnedFd;

use serde_json::{json, Value};

use super::exposition::{Exposition, Kind};
use super::{FORMAT, METHOD};
use crate::fd::PeerCred;
use crate::introspect;
use crate::protocol::{code, RpcError};
use crate::registry::HeldSocket;
use crate::server::Server;
use crate::spec::{SocketKey, Transport};

impl Server {
    /// `metrics`: `{"format": FORMAT, "text": "…"}` for a peer allowed to
    /// `list` (root, the broker's uid, a rule with `introspect`).
    pub(crate) fn metrics(&mut self, peer: PeerCred) -> Result<(Value, Vec<OwnedFd>), RpcError> {
        self.live.policy.check_introspect(&peer, METHOD).map_err(|denied| {
            crate::peer_log!(peer, log::Level::Warn, "refused: {denied}");
            RpcError::new(code::ACCESS_DENIED, denied.to_string())
        })?;
        if !self.live.policy.trusts(&peer) {
            let interval = self.limits().metrics_interval;
            let now = std::time::Instant::now();
            match self.metrics_answered.get(&peer.uid) {
                Some(last) if now.duration_since(*last) < interval => {
                    let message = format!("metrics at most once every {interval:?} per uid (limits.metrics_interval)");
                    crate::peer_log!(peer, log::Level::Info, "refused: {message}");
                    return Err(RpcError::new(code::TOO_MANY, message));
                }
                _ => {
                    self.metrics_answered.insert(peer.uid, now);
                }
            }
        }
        Ok((json!({"format": FORMAT, "text": self.metrics_text()}), Vec::new()))
    }

    /// The broker's metrics in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        let mut e = Exposition::new();
        let status = self.status();
        e.family("sockbroker_build_info", Kind::Gauge, "The broker's version (always 1).")
            .sample(&[("version", &status.version)], 1u64);
        e.family(
            "sockbroker_start_time_seconds",
            Kind::Gauge,
            "When this broker process started, seconds since the epoch.",
        )
        .sample(&[], introspect::epoch_secs(std::time::SystemTime::now()).saturating_sub(status.uptime));
        e.family(
            "sockbroker_config_last_reload_successful",
            Kind::Gauge,
            "1 when the last configuration reload succeeded (or none was tried), 0 while the old configuration is kept after a failed one.",
        )
        .sample(&[], status.reload_error.is_none());
        e.family(
            "sockbroker_config_loaded_timestamp_seconds",
            Kind::Gauge,
            "When the configuration in force was loaded, seconds since the epoch.",
        )
        .sample(&[], status.config_loaded);
        {
            let mut f = e.family("sockbroker_sockets_held", Kind::Gauge, "Sockets the broker holds, by origin.");
            for origin in ["systemd", "config", "on-demand", "fd-store", "upgrade", "adopted"] {
                f.sample(&[("origin", origin)], status.by_origin.get(origin).copied().unwrap_or(0));
            }
        }
        e.family("sockbroker_clients_connected", Kind::Gauge, "Client connections open on the control socket.")
            .sample(&[], status.clients);
        e.family(
            "sockbroker_connections_accepted_total",
            Kind::Counter,
            "Client connections accepted on the control socket.",
        )
        .sample(&[], self.counters.connections_accepted);
        {
            let mut f = e.family(
                "sockbroker_connections_refused_total",
                Kind::Counter,
                "Client connections refused on accept, by the limit (limits.max_clients_per_uid, the reserve of limits.max_clients, the reserve of descriptors).",
            );
            for (limit, n) in super::counters::REFUSALS.iter().zip(self.counters.connections_refused) {
                f.sample(&[("limit", limit)], n);
            }
        }
        {
            let mut f = e.family(
                "sockbroker_requests_total",
                Kind::Counter,
                "Control requests answered, by method (unknown methods as other) and outcome (ok or the error's name).",
            );
            for (method, outcome, n) in self.counters.requests() {
                f.sample(&[("method", method), ("outcome", outcome)], n);
            }
        }
        {
            let mut f = e.family(
                "sockbroker_request_refusals_total",
                Kind::Counter,
                "Requests refused by the allow rules (outcome access_denied), by method.",
            );
            for (method, n) in self.counters.refusals() {
                f.sample(&[("method", method)], n);
            }
        }
        super::process(&mut e);
        sockets(&mut e, self.registry.iter());
        e.finish()
    }
}

/// The per-socket families, sorted by address so two scrapes line up.
fn sockets<'a>(e: &mut Exposition, held: impl Iterator<Item = &'a HeldSocket>) {
    let mut held: Vec<&HeldSocket> = held.collect();
    held.sort_by(|a, b| a.key().cmp(b.key()));
    let rows: Vec<(String, &str, &HeldSocket)> =
        held.iter().map(|h| (h.key().to_string(), h.name.as_deref().unwrap_or(""), *h)).collect();
    {
        let mut f = e.family(
            "sockbroker_socket_info",
            Kind::Gauge,
            "One per held socket (always 1): its address, name, kind and origin.",
        );
        for (address, name, h) in &rows {
            let origin = introspect::origin_name(h.origin);
            f.sample(
                &[("address", address), ("name", name), ("kind", introspect::kind(h.key())), ("origin", &origin)],
                1u64,
            );
        }
    }
    {
        let mut f = e.family(
            "sockbroker_socket_handouts_total",
            Kind::Counter,
            "Times the socket was handed to a client (bind, bind_many).",
        );
        for (address, name, h) in &rows {
            f.sample(&[("address", address), ("name", name)], h.handed_out);
        }
    }
    let queues: Vec<(&str, &str, u32, u32)> = rows
        .iter()
        .filter(|(_, _, h)| matches!(h.key(), SocketKey::Inet { transport: Transport::Tcp, .. }))
        .filter_map(|(address, name, h)| match crate::socket::accept_queue(h.fd()) {
            Ok((q, b)) => Some((address.as_str(), *name, q, b)),
            Err(e) => {
                log::debug!("{address}: TCP_INFO: {e}");
                None
            }
        })
        .collect();
    {
        let mut f = e.family(
            "sockbroker_socket_accept_queue_length",
            Kind::Gauge,
            "TCP listeners: connections established and waiting in the accept queue now (TCP_INFO tcpi_unacked, ss -lt Recv-Q).",
        );
        for (address, name, q, _) in &queues {
            f.sample(&[("address", address), ("name", name)], *q);
        }
    }
    {
        let mut f = e.family(
            "sockbroker_socket_accept_queue_backlog",
            Kind::Gauge,
            "TCP listeners: the most connections the accept queue holds (TCP_INFO tcpi_sacked, ss -lt Send-Q).",
        );
        for (address, name, _, b) in &queues {
            f.sample(&[("address", address), ("name", name)], *b);
        }
    }
}
