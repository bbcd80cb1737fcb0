//! Samples the accept queue of every TCP listener on a port, whoever holds
//! it (HAProxy's own sockets included), from `/proc/net/tcp` and
//! `/proc/net/tcp6`: for a socket in LISTEN state the kernel prints the
//! accept queue's length (`sk_ack_backlog`) as `rx_queue`, the number
//! `ss -lt` shows as Recv-Q. The queues of all listeners on the port are
//! summed (HAProxy's classic reload has two SO_REUSEPORT listeners for a
//! while).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The summed accept queue of the TCP listeners on `port` now.
pub fn depth(port: u16) -> u32 {
    let mut total = 0;
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        for line in text.lines().skip(1) {
            let mut fields = line.split_whitespace();
            let (Some(local), Some(_remote), Some(state), Some(queues)) =
                (fields.nth(1), fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let local_port = local.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if state != "0A" || local_port != Some(port) {
                continue;
            }
            if let Some(rx) = queues.split(':').nth(1).and_then(|q| u32::from_str_radix(q, 16).ok()) {
                total += rx;
            }
        }
    }
    total
}

/// A thread sampling [`depth`] until stopped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, u32)>>,
}

impl Sampler {
    /// Samples the listeners of `ports` (summed) every `every`.
    pub fn start(ports: Vec<u16>, every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let at = Instant::now();
                samples.push((at, ports.iter().map(|p| depth(*p)).sum()));
                std::thread::sleep(every);
            }
            samples
        });
        Sampler { stop, thread }
    }

    /// Stops and returns `(when, depth)` samples.
    pub fn finish(self) -> Vec<(Instant, u32)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// The deepest sample whose instant `keep` accepts (0 when none does).
pub fn max_where(samples: &[(Instant, u32)], keep: impl Fn(Instant) -> bool) -> u32 {
    samples.iter().filter(|(t, _)| keep(*t)).map(|(_, d)| *d).max().unwrap_or(0)
}
