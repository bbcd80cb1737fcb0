//! Metrics in the Prometheus text format: the broker's (`sockbroker
//! metrics`, the `metrics` control method: [`broker`]) and each
//! supervisor's (`sockbroker supervisor metrics --pid PID`,
//! `--metrics-file`: `crate::supervisor::metrics`).
//!
//! Data flows one way: the control loop increments [`counters`]; a scrape
//! reads them, the registry and the kernel (`TCP_INFO`, `/proc/self`)
//! into an [`exposition::Exposition`], which is the text. Nothing is kept
//! between scrapes. `docs/metrics.md` is the operator's reference.

pub mod broker;
pub mod counters;
pub mod exposition;
pub mod http;

use exposition::{Exposition, Kind};

/// The broker's control method.
pub const METHOD: &str = crate::protocol::Method::Metrics.name();

/// The format name in the reply, as Prometheus' Content-Type spells it.
pub const FORMAT: &str = "text/plain; version=0.0.4";

/// The process's descriptors against its limit (the broker holds every
/// socket of the host, so running out is its failure mode) and resident
/// memory: the conventional `process_*` families under the broker's prefix,
/// since node_exporter, which reads `--output` files, exports its own
/// `process_*` series and would refuse duplicates.
pub fn process(e: &mut Exposition) {
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        // The read_dir handle itself is one of them.
        let open = dir.count().saturating_sub(1);
        e.family("sockbroker_process_open_fds", Kind::Gauge, "Number of open file descriptors.").sample(&[], open);
    }
    if let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        e.family(
            "sockbroker_process_max_fds",
            Kind::Gauge,
            "Maximum number of open file descriptors (soft RLIMIT_NOFILE).",
        )
        .sample(&[], soft);
    }
    if let Some(rss) = resident_bytes() {
        e.family("sockbroker_process_resident_memory_bytes", Kind::Gauge, "Resident memory size in bytes.")
            .sample(&[], rss);
    }
}

/// VmRSS from /proc/self/status, in bytes.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
