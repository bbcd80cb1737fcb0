//! A reload storm at GLB's scale: many `sockbroker haproxy run` instances
//! under one broker, each holding its own TCP sockets, all sent SIGHUP at
//! once while clients open a new connection per request over every socket.
//! Used by `benches/scale.rs` (50 x 200 = 10,000 sockets, figures) and by
//! `tests/children/scale.rs` (a few instances, asserts no failed request).
//!
//! Sockets are `127.(10+I).(J/250).(J%250+1):PORT` for instance I and
//! socket J: all of 127/8 is loopback, so one free port serves every
//! address and no other process's ports are touched.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::supervisor::Supervisor;
use super::{free_port, Broker};

/// What to run.
#[derive(Debug, Clone)]
pub struct Storm {
    /// The sockbroker binary.
    pub bin: PathBuf,
    /// HAProxy.
    pub haproxy: PathBuf,
    /// A fresh folder for sockets, templates and logs.
    pub dir: PathBuf,
    /// HAProxy instances (each under its own supervisor).
    pub instances: usize,
    /// Sockets per instance.
    pub sockets: usize,
    /// Storms: every instance reloaded at once, this many times.
    pub storms: u64,
    /// Client threads.
    pub threads: usize,
    /// How long to wait for everything to start, or a storm to be served.
    pub limit: Duration,
}

/// What happened.
#[derive(Debug, Default)]
pub struct Report {
    /// Requests made from the first storm's start to the end.
    pub requests: u64,
    /// Of which failed (refused, reset, timed out, not a 200).
    pub failed: u64,
    /// The first few failures.
    pub errors: Vec<String>,
    /// Per storm: from the signals to every instance answering with the new generation.
    pub all_served: Vec<Duration>,
    /// Storms not served within the limit.
    pub unfinished: u64,
    /// `bind` round trips of a probe client during the storms.
    pub bind_latencies: Vec<Duration>,
    /// How long each new generation's render took (its `bind_many` to the
    /// broker included), from the supervisors' logs.
    pub renders: Vec<Duration>,
    /// The time until all instances served generation 0.
    pub startup: Duration,
    /// The broker's resident memory at the end, in KiB.
    pub broker_rss_kib: u64,
    /// Sockets the broker held at the end (from `status`).
    pub held: u64,
}

fn address(instance: usize, socket: usize, port: u16) -> SocketAddr {
    let ip = std::net::Ipv4Addr::new(127, 10 + instance as u8, (socket / 250) as u8, (socket % 250 + 1) as u8);
    SocketAddr::from((ip, port))
}

fn template(instance: usize, sockets: usize, port: u16, generation: u64) -> String {
    let mut t = String::from(
        "global\n  maxconn 2000\ndefaults\n  mode http\n  timeout client 10s\n  timeout server 10s\n  timeout connect 2s\nfrontend web\n",
    );
    for j in 0..sockets {
        t.push_str(&format!("  bind {{{{ sockbroker \"tcp://{}\" }}}}\n", address(instance, j, port)));
    }
    t.push_str(&format!("  http-request return status 200 content-type text/plain string \"{generation}\"\n"));
    t
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// One request on a new connection: the generation that answered.
fn request(addr: SocketAddr) -> Result<u64, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| format!("{addr}: connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").map_err(|e| format!("{addr}: write: {e}"))?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).map_err(|e| format!("{addr}: read: {e}"))?;
    let text = String::from_utf8_lossy(&reply);
    if !text.starts_with("HTTP/1.0 200") && !text.starts_with("HTTP/1.1 200") {
        return Err(format!("{addr}: {}", text.lines().next().unwrap_or("empty reply")));
    }
    text.rsplit("\r\n\r\n").next().and_then(|b| b.trim().parse().ok()).ok_or_else(|| format!("{addr}: no generation"))
}

/// A `Duration` as Debug prints it (`12.3ms`, `1.2s`, `850.1µs`, `90ns`).
fn parse_debug_duration(text: &str) -> Option<Duration> {
    let units = [("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9), ("s", 1.0)];
    let (number, scale) = units.iter().find_map(|(u, scale)| text.strip_suffix(u).map(|n| (n, *scale)))?;
    number.parse::<f64>().ok().map(|n| Duration::from_secs_f64(n * scale))
}

impl Storm {
    /// Runs it; panics only when something cannot start.
    pub fn run(&self) -> Report {
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir).unwrap();
        let port = free_port();
        // The broker's notify messages are read on a thread, as systemd
        // reads them: one FDSTORE=1 goes out per new socket.
        let broker =
            Broker::builder("storm").dir(&self.dir).program(&self.bin).env("RUST_LOG", "warn").drain_notify().start();
        let control = broker.control.clone();
        let broker_pid = broker.pid();

        let started = Instant::now();
        let mut supervisors = Vec::new();
        let mut configs = Vec::new();
        for i in 0..self.instances {
            let sub = self.dir.join(format!("i{i}"));
            std::fs::create_dir_all(&sub).unwrap();
            let config = sub.join("haproxy.cfg.sb");
            write_atomically(&config, &template(i, self.sockets, port, 0));
            let supervisor = Supervisor::haproxy_run(&broker)
                .program(&self.bin)
                .dir(&sub)
                .name("run")
                .args(&["--ready-grace", "0"])
                .command(&[self.haproxy.to_str().unwrap(), "-f", config.to_str().unwrap()])
                .env("RUST_LOG", "info")
                .ready_timeout(self.limit)
                .spawn();
            supervisors.push(supervisor);
            configs.push(config);
        }
        for supervisor in &mut supervisors {
            supervisor.wait_started();
            // Read on, as systemd would: a full queue blocks the sender.
            let notify = supervisor.notify.take().unwrap().sock;
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                notify.set_read_timeout(None).unwrap();
                while notify.recv(&mut buf).is_ok() {}
            });
        }
        let startup = started.elapsed();

        // Clients: a new connection per request, round-robin over every socket.
        let total = self.instances * self.sockets;
        let halt = Arc::new(AtomicBool::new(false));
        let newest: Arc<Vec<AtomicU64>> = Arc::new((0..self.instances).map(|_| AtomicU64::new(0)).collect());
        let counting = Arc::new(AtomicBool::new(false));
        let (instances, sockets, threads) = (self.instances, self.sockets, self.threads);
        let clients: Vec<_> = (0..threads)
            .map(|t| {
                let (halt, newest, counting) = (halt.clone(), newest.clone(), counting.clone());
                std::thread::spawn(move || {
                    let (mut ok, mut failed, mut errors) = (0u64, 0u64, Vec::new());
                    let mut k = t;
                    while !halt.load(Ordering::Relaxed) {
                        let (i, j) = (k % instances, (k / instances) % sockets);
                        k = (k + threads) % total.max(1);
                        let result = request(address(i, j, port));
                        let counted = counting.load(Ordering::Relaxed);
                        match result {
                            Ok(g) => {
                                newest[i].fetch_max(g, Ordering::Relaxed);
                                ok += u64::from(counted);
                            }
                            Err(e) if counted => {
                                failed += 1;
                                if errors.len() < 5 {
                                    errors.push(e);
                                }
                            }
                            Err(_) => {}
                        }
                    }
                    (ok, failed, errors)
                })
            })
            .collect();

        // A probe asks the broker for a held socket in a loop, timing it.
        let probe_stop = Arc::new(AtomicBool::new(false));
        let probe = {
            let (stop, control) = (probe_stop.clone(), control.clone());
            let spec: sockbroker::spec::SocketSpec = format!("tcp://{}", address(0, 0, port)).parse().unwrap();
            std::thread::spawn(move || {
                let mut client = sockbroker::client::Client::connect(&control).unwrap();
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    if client.bind(&spec).is_ok() {
                        samples.push((t, t.elapsed()));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                samples
            })
        };

        let pids: Vec<Pid> = supervisors.iter().map(|s| Pid::from_raw(s.pid())).collect();
        let mut report = Report { startup, ..Report::default() };
        let mut windows = Vec::new();
        counting.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(500));
        for storm in 1..=self.storms {
            for (i, config) in configs.iter().enumerate() {
                write_atomically(config, &template(i, self.sockets, port, storm));
            }
            let t0 = Instant::now();
            for pid in &pids {
                let _ = kill(*pid, Signal::SIGHUP);
            }
            let deadline = t0 + self.limit;
            while newest.iter().any(|g| g.load(Ordering::Relaxed) < storm) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            let served = t0.elapsed();
            if newest.iter().any(|g| g.load(Ordering::Relaxed) < storm) {
                report.unfinished += 1;
            } else {
                report.all_served.push(served);
            }
            windows.push((t0, t0 + served));
            // Let the supervisors finish (READY=1 follows the first answers
            // by little) before the next storm.
            std::thread::sleep(Duration::from_millis(500));
        }
        halt.store(true, Ordering::Relaxed);
        probe_stop.store(true, Ordering::Relaxed);
        for c in clients {
            let (ok, failed, errors) = c.join().unwrap();
            report.requests += ok + failed;
            report.failed += failed;
            report.errors.extend(errors);
        }
        report.bind_latencies = probe
            .join()
            .unwrap()
            .into_iter()
            .filter(|(t, _)| windows.iter().any(|(a, b)| t >= a && t <= b))
            .map(|(_, d)| d)
            .collect();
        for supervisor in &supervisors {
            let log = supervisor.log_text();
            for line in log.lines().filter(|l| l.contains("started haproxy pid") && !l.contains("generation 1:")) {
                if let Some(d) = line.split("(render ").nth(1).and_then(|r| r.split(',').next()) {
                    report.renders.extend(parse_debug_duration(d));
                }
            }
        }
        let status = std::fs::read_to_string(format!("/proc/{broker_pid}/status")).unwrap_or_default();
        report.broker_rss_kib = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
        if let Ok(mut client) = sockbroker::client::Client::connect(&control) {
            if let Ok((status, _)) = client.call("status", serde_json::Value::Null) {
                report.held = status["sockets"].as_u64().unwrap_or(0);
            }
        }
        // Every supervisor is told at once; each drop then waits (bounded)
        // for its own, and the broker goes last.
        for supervisor in &supervisors {
            supervisor.signal(Signal::SIGTERM);
        }
        drop(supervisors);
        drop(broker);
        report
    }
}

/// The `p` quantile of `v` (0 when empty).
pub fn percentile(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}
