//! A supervisor's metrics (`run`, `haproxy run`) and the accept-queue depth
//! sampled while a reload is in progress, so "zero added delay" can be read
//! on every reload in production, not only in a benchmark.
//!
//! While a reload runs (from the reload request to the new generation
//! serving, or to the failure) the supervisor reads, every
//! [`QUEUE_SAMPLE_INTERVAL`], the accept queue of every TCP listener its
//! daemon was given (`TCP_INFO`, as the broker's metrics do) and keeps the
//! deepest. When the reload ends, that maximum goes to the log line, to
//! `STATUS=` (`systemctl status`) and to the metrics:
//!
//! - `sockbroker supervisor metrics --pid PID` asks over the supervisor's
//!   control socket ([`super::control`]);
//! - `--metrics-file PATH` writes them atomically for node_exporter's
//!   textfile collector on every change of state and every
//!   [`FILE_REFRESH`].
//!
//! Every sample carries a `supervisor` label (`--metrics-name`, else the
//! metrics file's name without `.prom`, else the pid), so the files of many
//! instances on one host do not collide in the collector.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use crate::metrics::exposition::{write_atomically, Exposition, Kind};

use super::{Daemon, GenState, Phase, Supervisor};

/// How often the accept queues are read during a reload.
pub const QUEUE_SAMPLE_INTERVAL: Duration = Duration::from_millis(20);
/// How often `--metrics-file` is rewritten when nothing changes (the
/// current queue depth moves without an event).
pub const FILE_REFRESH: Duration = Duration::from_secs(10);

/// Where a supervisor's metrics go besides its control socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsOptions {
    /// `--metrics-file`: written atomically.
    pub file: Option<PathBuf>,
    /// `--metrics-name`: the `supervisor` label.
    pub name: Option<String>,
}

impl MetricsOptions {
    /// The `supervisor` label: the name, the file's stem, or the pid.
    pub fn label(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        if let Some(stem) = self.file.as_ref().and_then(|f| f.file_name()) {
            let stem = stem.to_string_lossy();
            return stem.strip_suffix(".prom").unwrap_or(&stem).to_string();
        }
        std::process::id().to_string()
    }
}

/// The reload in progress.
#[derive(Debug, Clone, Copy)]
struct InProgress {
    number: u64,
    started: Instant,
    queue_max: u32,
    samples: u64,
    ready_wait: Option<Duration>,
}

/// The last reload that ended.
#[derive(Debug, Clone, Copy)]
pub struct LastReload {
    /// Its number (1 for the first reload after the start).
    pub number: u64,
    /// It succeeded.
    pub ok: bool,
    /// From the request to the new generation serving (or the failure).
    pub duration: Duration,
    /// From the new generation's start to its readiness (READY=1, pidfile,
    /// delay), if it got there.
    pub ready_wait: Option<Duration>,
    /// The deepest accept queue seen on any of the sockets meanwhile.
    pub queue_max: u32,
    /// How many times the queues were read.
    pub samples: u64,
    /// When it ended.
    pub ended: SystemTime,
}

/// What the supervisor keeps for its metrics.
#[derive(Debug)]
pub struct Telemetry {
    options: MetricsOptions,
    label: String,
    /// Copies of the daemon's TCP listeners (close-on-exec; the broker
    /// holds them too) with their address.
    sockets: Vec<(String, OwnedFd)>,
    reload: Option<InProgress>,
    last: Option<LastReload>,
    next_file: Option<Instant>,
    file_failed: bool,
}

impl Telemetry {
    /// Nothing measured yet.
    pub fn new(options: MetricsOptions) -> Telemetry {
        let label = options.label();
        Telemetry { options, label, sockets: Vec::new(), reload: None, last: None, next_file: None, file_failed: false }
    }

    /// Keeps the TCP listeners among `fds` to sample (copies of the
    /// daemon's sockets for the generation just started, close-on-exec);
    /// the others are closed.
    pub fn watch(&mut self, fds: Vec<OwnedFd>) {
        self.sockets = fds
            .into_iter()
            .filter(|fd| crate::socket::accept_queue(fd.as_fd()).is_ok())
            .map(|fd| (address(fd.as_fd()), fd))
            .collect();
    }

    /// The deepest accept queue of the watched sockets now.
    fn depth_now(&self) -> u32 {
        self.sockets
            .iter()
            .filter_map(|(_, fd)| crate::socket::accept_queue(fd.as_fd()).ok())
            .map(|(q, _)| q)
            .max()
            .unwrap_or(0)
    }

    /// The last reload that ended.
    pub fn last(&self) -> Option<&LastReload> {
        self.last.as_ref()
    }

    /// The next moment something is due: a sample, a file refresh.
    pub fn next_due(&self) -> Option<Instant> {
        let sample = self.reload.map(|_| Instant::now() + QUEUE_SAMPLE_INTERVAL);
        sample.into_iter().chain(self.next_file).min()
    }

    /// Words for the end of the `STATUS=` line.
    pub fn status_note(&self) -> Option<String> {
        let last = self.last?;
        Some(format!(
            "; last reload {} in {:.2}s, accept queue max {}",
            if last.ok { "ok" } else { "failed" },
            last.duration.as_secs_f64(),
            last.queue_max
        ))
    }
}

/// `tcp://ADDRESS:PORT` of a TCP listener, `?` if it cannot be read.
fn address(fd: BorrowedFd<'_>) -> String {
    use nix::sys::socket::{getsockname, SockaddrLike, SockaddrStorage};
    let Ok(addr) = getsockname::<SockaddrStorage>(std::os::fd::AsRawFd::as_raw_fd(&fd)) else { return "?".into() };
    let text = match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
        (Some(v4), _) => std::net::SocketAddr::from(std::net::SocketAddrV4::from(*v4)).to_string(),
        (_, Some(v6)) => std::net::SocketAddr::from(std::net::SocketAddrV6::from(*v6)).to_string(),
        _ => return format!("family {:?}", addr.family()),
    };
    format!("tcp://{text}")
}

impl<D: Daemon> Supervisor<D> {
    /// A reload began: sampling starts.
    pub(super) fn reload_began(&mut self) {
        let t = &mut self.telemetry;
        t.reload = Some(InProgress {
            number: self.reloads_begun,
            started: Instant::now(),
            queue_max: 0,
            samples: 0,
            ready_wait: None,
        });
        self.sample_queues();
        self.write_metrics_file();
    }

    /// The new generation says it is ready, `wait` after its start.
    pub(super) fn reload_ready(&mut self, wait: Duration) {
        if let Some(r) = &mut self.telemetry.reload {
            r.ready_wait.get_or_insert(wait);
        }
    }

    /// The reload ended: its figures go to the log and the metrics (the
    /// caller's `STATUS=` line reads them through [`Telemetry::status_note`]).
    pub(super) fn reload_ended(&mut self, ok: bool) {
        self.sample_queues();
        let Some(r) = self.telemetry.reload.take() else { return };
        let last = LastReload {
            number: r.number,
            ok,
            duration: r.started.elapsed(),
            ready_wait: r.ready_wait,
            queue_max: r.queue_max,
            samples: r.samples,
            ended: SystemTime::now(),
        };
        log::info!(
            "reload {} {} after {:.3}s (readiness wait {}); accept queue max during the reload: {} ({} samples over {} sockets)",
            last.number,
            if ok { "done" } else { "failed" },
            last.duration.as_secs_f64(),
            last.ready_wait.map_or_else(|| "-".to_string(), |w| format!("{:.3}s", w.as_secs_f64())),
            last.queue_max,
            last.samples,
            self.telemetry.sockets.len()
        );
        self.telemetry.last = Some(last);
        self.write_metrics_file();
    }

    /// Reads the queues when a reload is in progress; rewrites the metrics
    /// file when due. Called on every turn of the event loop.
    pub(super) fn telemetry_tick(&mut self) {
        if self.phase == Phase::Reloading || self.telemetry.reload.is_some() {
            self.sample_queues();
        }
        if self.telemetry.next_file.is_some_and(|t| t <= Instant::now()) {
            self.write_metrics_file();
        }
    }

    fn sample_queues(&mut self) {
        let depth = self.telemetry.depth_now();
        if let Some(r) = &mut self.telemetry.reload {
            r.queue_max = r.queue_max.max(depth);
            r.samples += 1;
        }
    }

    /// Rewrites `--metrics-file`, if there is one. A failure is logged once
    /// until a write succeeds again.
    pub(super) fn write_metrics_file(&mut self) {
        let Some(path) = self.telemetry.options.file.clone() else { return };
        self.telemetry.next_file = Some(Instant::now() + FILE_REFRESH);
        match write_atomically(&path, &self.metrics_text()) {
            Ok(()) => self.telemetry.file_failed = false,
            Err(e) => {
                if !self.telemetry.file_failed {
                    log::warn!("--metrics-file {}: {e}", path.display());
                }
                self.telemetry.file_failed = true;
            }
        }
    }

    /// The supervisor's metrics in the Prometheus text format.
    pub(super) fn metrics_text(&self) -> String {
        let t = &self.telemetry;
        let who = ("supervisor", t.label.as_str());
        let mut e = Exposition::new();
        e.family(
            "sockbroker_supervisor_serving_generation",
            Kind::Gauge,
            "The number of the generation serving (1, 2, …; 0 when none serves).",
        )
        .sample(&[who], self.serving().map_or(0, |g| g.number));
        {
            let mut f = e.family("sockbroker_supervisor_generations", Kind::Gauge, "Generations alive, by state.");
            for state in ["starting", "proving", "serving", "retiring", "stopping"] {
                let n = self.gens.iter().filter(|g| g.info().state == state).count();
                f.sample(&[who, ("state", state)], n);
            }
        }
        let draining = self
            .gens
            .iter()
            .filter(|g| matches!(g.state, GenState::Retiring { .. } | GenState::Stopping { .. }))
            .count();
        e.family(
            "sockbroker_supervisor_generations_draining",
            Kind::Gauge,
            "Old generations told to leave and still running (retiring or stopping).",
        )
        .sample(&[who], draining);
        e.family("sockbroker_supervisor_reload_in_progress", Kind::Gauge, "1 while a reload is in progress.")
            .sample(&[who], self.phase == Phase::Reloading);
        e.family(
            "sockbroker_supervisor_idle_start_seconds",
            Kind::Gauge,
            "How long a reload's generation may start at idle CPU priority (--idle-start); 0 when it starts at normal priority.",
        )
        .sample(&[who], self.how.idle_start.unwrap_or_default().as_secs_f64());
        e.family("sockbroker_supervisor_reloads_total", Kind::Counter, "Reloads that ended, by outcome.")
            .sample(&[who, ("outcome", "ok")], self.reloads_ok)
            .sample(&[who, ("outcome", "failed")], self.reloads_failed);
        if let Some(last) = t.last {
            e.family(
                "sockbroker_supervisor_last_reload_success",
                Kind::Gauge,
                "1 when the last reload succeeded, 0 when it failed (the old generation serves on).",
            )
            .sample(&[who], last.ok);
            e.family(
                "sockbroker_supervisor_last_reload_timestamp_seconds",
                Kind::Gauge,
                "When the last reload ended, seconds since the epoch.",
            )
            .sample(&[who], last.ended.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64());
            e.family(
                "sockbroker_supervisor_last_reload_duration_seconds",
                Kind::Gauge,
                "How long the last reload took, from the request to the new generation serving (or the failure).",
            )
            .sample(&[who], last.duration.as_secs_f64());
            if let Some(wait) = last.ready_wait {
                e.family(
                    "sockbroker_supervisor_last_reload_ready_wait_seconds",
                    Kind::Gauge,
                    "How long the last reload's new generation took from its start to saying it is ready.",
                )
                .sample(&[who], wait.as_secs_f64());
            }
            e.family(
                "sockbroker_supervisor_last_reload_accept_queue_max",
                Kind::Gauge,
                "The deepest accept queue seen on any of the daemon's TCP listeners during the last reload (sampled every 20ms).",
            )
            .sample(&[who], last.queue_max);
        }
        {
            let mut f = e.family(
                "sockbroker_supervisor_socket_accept_queue_length",
                Kind::Gauge,
                "The daemon's TCP listeners: connections waiting in the accept queue now (TCP_INFO tcpi_unacked).",
            );
            for (address, fd) in &t.sockets {
                if let Ok((q, _)) = crate::socket::accept_queue(fd.as_fd()) {
                    f.sample(&[who, ("address", address)], q);
                }
            }
        }
        {
            let mut f = e.family(
                "sockbroker_supervisor_socket_accept_queue_backlog",
                Kind::Gauge,
                "The daemon's TCP listeners: the most connections the accept queue holds (TCP_INFO tcpi_sacked).",
            );
            for (address, fd) in &t.sockets {
                if let Ok((_, b)) = crate::socket::accept_queue(fd.as_fd()) {
                    f.sample(&[who, ("address", address)], b);
                }
            }
        }
        e.finish()
    }
}
