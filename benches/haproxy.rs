//! HAProxy reloads under load, side by side: the same HTTP frontend, the same
//! rate of new connections, 100 reloads each, reloaded four ways:
//!
//! - (a) classic: HAProxy binds the port itself; a reload starts a new process
//!   with `-sf OLD` (the new one binds with SO_REUSEPORT, the old one closes);
//! - (b) seamless: the old process exposes its listeners (`stats socket …
//!   expose-fd listeners`) and the new one takes them with `-x`, then `-sf`;
//! - (b2) master-worker: `haproxy -W`, reload by SIGUSR2 to the master;
//! - (c) sockbroker: `sockbroker haproxy run`, reload by SIGHUP; the new
//!   instance starts at idle CPU priority until READY=1 (`--idle-start`,
//!   the default);
//! - (c0) the same with `--idle-start off`: what the idle start is worth.
//!
//! Each response names the config generation that served it (the config is
//! rewritten before each reload), so "reload time" is from the reload signal
//! to the first response of the new generation. Requests are "in a reload
//! window" from the signal until 50 ms after that first response; their p99
//! connect+response latency is set against steady state: the requests of a
//! phase before any reload and of the quiet gap after each window (from
//! 100 ms past its end to the next signal; see [`GAP`]). So is the deepest
//! accept queue of the port's listeners (sampled every 2 ms with a
//! sock_diag dump of the listeners, summed over every listener on the port:
//! see `tests/common/accept_queue.rs`). "CPU busy" is how busy all cores
//! were over the run (/proc/stat).
//!
//! Run: `cargo bench --bench haproxy` (needs /usr/sbin/haproxy; loopback only).
//! `HAPROXY_BENCH_RELOADS` and `HAPROXY_BENCH_RATE` (connections/s) override
//! the defaults (100, 4000); `HAPROXY_BENCH_ONLY=c,c0` runs those scenarios
//! alone; `HAPROXY_BENCH_DUMP=PATH` writes every request's timing (see
//! `dump`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::supervisor::Supervisor;
use common::{free_port, wait_timeout, Broker};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use common::accept_queue;

const HAPROXY: &str = "/usr/sbin/haproxy";
const THREADS: usize = 4;
const STEADY: Duration = Duration::from_secs(2);
const SETTLE: Duration = Duration::from_millis(50);
/// After each reload window, a quiet gap before the next reload; from
/// [`QUIET_AFTER`] past the window's end its requests count as steady
/// state. Steady samples are thus taken all along the run, in the same
/// conditions as the reload windows between them (a machine shared with
/// other work drifts: a steady phase at the start alone gave p99s from 0.3
/// to 2.5 ms in runs minutes apart).
const GAP: Duration = Duration::from_millis(250);
const QUIET_AFTER: Duration = Duration::from_millis(100);

fn main() {
    // `cargo test --benches` (scripts/test) runs this binary without
    // `--bench`: then a short smoke run checks that every scenario still
    // works, and that sockbroker's reloads lose nothing.
    let smoke = !std::env::args().any(|a| a == "--bench");
    if !Path::new(HAPROXY).exists() {
        // The smoke run is a test: scripts/test installs HAProxy.
        assert!(!smoke, "haproxy bench: {HAPROXY} not found (apt-get install haproxy)");
        eprintln!("haproxy bench: {HAPROXY} not found (apt-get install haproxy); skipped");
        return;
    }
    let reloads: u64 = env_or("HAPROXY_BENCH_RELOADS", if smoke { 3 } else { 100 });
    let rate: u64 = env_or("HAPROXY_BENCH_RATE", if smoke { 500 } else { 4000 });
    let steady = if smoke { Duration::from_millis(300) } else { STEADY };
    let dir = std::env::temp_dir().join(format!("sb-haproxy-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    println!("HAProxy reload benchmark: {reloads} reloads per scenario, {rate} new connections/s ({THREADS} clients), loopback");
    let mut rows = Vec::new();
    let only = std::env::var("HAPROXY_BENCH_ONLY").unwrap_or_default();
    for kind in [Kind::Classic, Kind::Seamless, Kind::MasterWorker, Kind::SockbrokerNormalStart, Kind::Sockbroker] {
        if !only.is_empty() && !only.split(',').any(|s| s == kind.slug()) {
            continue;
        }
        let sub = dir.join(kind.slug());
        std::fs::create_dir_all(&sub).unwrap();
        let row = run_scenario(kind, &sub, reloads, rate, steady);
        eprintln!("{}: done", kind.label());
        rows.push(row);
    }
    print_table(&rows);
    if smoke {
        // HAProxy's own reloads may drop a connection or a reload (that is
        // what the figures measure); sockbroker's must do neither.
        for r in rows.iter().filter(|r| r.label.starts_with("(c")) {
            assert_eq!(r.unfinished, 0, "{}: reloads never served", r.label);
            assert_eq!(r.failed, 0, "{}: failed connections", r.label);
        }
    }
    if std::env::var_os("HAPROXY_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Classic,
    Seamless,
    MasterWorker,
    SockbrokerNormalStart,
    Sockbroker,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Classic => "(a) classic -sf",
            Kind::Seamless => "(b) seamless -x + -sf",
            Kind::MasterWorker => "(b2) master-worker SIGUSR2",
            Kind::SockbrokerNormalStart => "(c0) sockbroker, no idle start",
            Kind::Sockbroker => "(c) sockbroker haproxy run",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Kind::Classic => "a",
            Kind::Seamless => "b",
            Kind::MasterWorker => "b2",
            Kind::SockbrokerNormalStart => "c0",
            Kind::Sockbroker => "c",
        }
    }
}

/// The config (or template) for generation `generation`.
fn config(kind: Kind, dir: &Path, port: u16, generation: u64) -> String {
    let bind = match kind {
        Kind::Sockbroker | Kind::SockbrokerNormalStart => format!("{{{{ sockbroker \"tcp://127.0.0.1:{port}\" }}}}"),
        _ => format!("127.0.0.1:{port}"),
    };
    let stats = match kind {
        Kind::Seamless | Kind::MasterWorker => {
            format!("  stats socket {}/admin.sock mode 600 level admin expose-fd listeners\n", dir.display())
        }
        _ => String::new(),
    };
    format!(
        "global\n  maxconn 4000\n{stats}defaults\n  mode http\n  timeout client 10s\n  timeout server 10s\n  timeout connect 2s\n\
         frontend web\n  bind {bind}\n  http-request return status 200 content-type text/plain string \"{generation}\"\n"
    )
}

/// The HAProxy processes of one scenario and how to reload them.
struct Instances {
    kind: Kind,
    dir: PathBuf,
    config: PathBuf,
    children: Vec<Child>,
    /// (c)'s supervisor; declared before its broker, so dropped first.
    supervisor: Option<Supervisor>,
    broker: Option<Broker>,
    /// Tells the thread that reads the supervisor's notify messages to end.
    done: Arc<AtomicBool>,
}

impl Instances {
    fn start(kind: Kind, dir: &Path, port: u16) -> Instances {
        let config = match kind {
            Kind::Sockbroker | Kind::SockbrokerNormalStart => dir.join("web.cfg.sb"),
            _ => dir.join("web.cfg"),
        };
        std::fs::write(&config, self::config(kind, dir, port, 0)).unwrap();
        let mut me = Instances {
            kind,
            dir: dir.to_path_buf(),
            config,
            children: Vec::new(),
            supervisor: None,
            broker: None,
            done: Arc::new(AtomicBool::new(false)),
        };
        match kind {
            Kind::Classic | Kind::Seamless => me.spawn_haproxy(&["-db"]),
            Kind::MasterWorker => me.spawn_haproxy(&["-W", "-db"]),
            Kind::Sockbroker | Kind::SockbrokerNormalStart => {
                let broker = Broker::builder("bench-haproxy").env("RUST_LOG", "warn").start();
                // No grace window: it only delays the old instance's
                // retirement, and these back-to-back reloads would queue
                // behind it.
                let mut args = vec!["--ready-grace", "0"];
                if kind == Kind::SockbrokerNormalStart {
                    args.extend(["--idle-start", "off"]);
                }
                let mut supervisor = Supervisor::haproxy_run(&broker)
                    .args(&args)
                    .command(&[HAPROXY, "-f", me.config.to_str().unwrap()])
                    .env("RUST_LOG", "info")
                    .start();
                let notify = supervisor.notify.take().unwrap().sock;
                me.supervisor = Some(supervisor);
                me.broker = Some(broker);
                // Read what the supervisor says, as systemd would: a full
                // datagram queue blocks the sender. Until the scenario stops.
                let done = me.done.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    notify.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                    while !done.load(Ordering::Relaxed) {
                        let _ = notify.recv(&mut buf);
                    }
                });
            }
        }
        me
    }

    fn spawn_haproxy(&mut self, args: &[&str]) {
        let child = Command::new(HAPROXY)
            .args(args)
            .arg("-f")
            .arg(&self.config)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    fn live_pids(&mut self) -> Vec<String> {
        self.children.retain_mut(|c| c.try_wait().ok().flatten().is_none());
        self.children.iter().map(|c| c.id().to_string()).collect()
    }

    /// Writes generation `generation`'s config and triggers the reload;
    /// returns when the trigger was sent.
    fn reload(&mut self, port: u16, generation: u64) -> Instant {
        let text = config(self.kind, &self.dir, port, generation);
        let tmp = self.dir.join(".next.cfg");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
        let old = self.live_pids();
        let old: Vec<&str> = old.iter().map(String::as_str).collect();
        let t0 = Instant::now();
        match self.kind {
            Kind::Classic => {
                let mut args = vec!["-db", "-sf"];
                args.extend(&old);
                self.spawn_haproxy(&args);
            }
            Kind::Seamless => {
                let sock = self.dir.join("admin.sock");
                let sock = sock.to_str().unwrap().to_string();
                let mut args = vec!["-db", "-x", sock.as_str(), "-sf"];
                args.extend(&old);
                self.spawn_haproxy(&args);
            }
            Kind::MasterWorker => kill(Pid::from_raw(self.children[0].id() as i32), Signal::SIGUSR2).unwrap(),
            Kind::Sockbroker | Kind::SockbrokerNormalStart => self.supervisor.as_ref().unwrap().signal(Signal::SIGHUP),
        }
        t0
    }

    fn stop(mut self) {
        // HAProxy's soft stop is SIGUSR1; the supervisor stops (SIGTERM,
        // bounded) as it is dropped.
        drop(self.supervisor.take());
        for c in &self.children {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGUSR1);
        }
        for c in &mut self.children {
            if wait_timeout(c, Duration::from_secs(15)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.done.store(true, Ordering::Relaxed);
        if let Some(mut broker) = self.broker.take() {
            broker.stop();
        }
    }
}

/// One request's outcome.
#[derive(Debug, Clone, Copy)]
struct Sample {
    start: Instant,
    latency: Duration,
    /// The generation that answered, or None on failure.
    generation: Option<u64>,
}

fn request(addr: SocketAddr) -> Option<u64> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).ok()?;
    let text = String::from_utf8_lossy(&reply);
    if !text.starts_with("HTTP/1.0 200") && !text.starts_with("HTTP/1.1 200") {
        return None;
    }
    text.rsplit("\r\n\r\n").next()?.trim().parse().ok()
}

/// Paced clients: each thread opens `rate / THREADS` connections a second.
struct Load {
    stop: Arc<AtomicBool>,
    newest: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Vec<Sample>>>,
}

impl Load {
    fn start(addr: SocketAddr, rate: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let newest = Arc::new(AtomicU64::new(0));
        let interval = Duration::from_secs_f64(THREADS as f64 / rate as f64);
        let threads = (0..THREADS)
            .map(|i| {
                let (stop, newest) = (stop.clone(), newest.clone());
                std::thread::spawn(move || {
                    let mut samples = Vec::new();
                    let mut next = Instant::now() + interval.mul_f64(i as f64 / THREADS as f64);
                    while !stop.load(Ordering::Relaxed) {
                        let now = Instant::now();
                        if now < next {
                            std::thread::sleep(next - now);
                        }
                        next += interval;
                        let start = Instant::now();
                        let generation = request(addr);
                        if let Some(g) = generation {
                            newest.fetch_max(g, Ordering::Relaxed);
                        }
                        samples.push(Sample { start, latency: start.elapsed(), generation });
                    }
                    samples
                })
            })
            .collect();
        Load { stop, newest, threads }
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all: Vec<Sample> = self.threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        all.sort_by_key(|s| s.start);
        all
    }
}

struct Row {
    label: &'static str,
    requests: usize,
    failed: usize,
    reloads: u64,
    unfinished: u64,
    p99_steady: Duration,
    p99_reload: Duration,
    queue_steady: u32,
    queue_reload: u32,
    /// How busy every core was over the whole run, in percent.
    cpu: f64,
    reload_p50: Duration,
    reload_max: Duration,
}

fn run_scenario(kind: Kind, dir: &Path, reloads: u64, rate: u64, steady: Duration) -> Row {
    let port = free_port();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut instances = Instances::start(kind, dir, port);
    let deadline = Instant::now() + Duration::from_secs(10);
    while request(addr).is_none() {
        assert!(Instant::now() < deadline, "{}: never served", kind.label());
        std::thread::sleep(Duration::from_millis(10));
    }
    let sampler = accept_queue::Sampler::start(vec![port], Duration::from_millis(2));
    let load = Load::start(addr, rate);
    let steady_start = Instant::now();
    let cpu_start = cpu_times();
    std::thread::sleep(steady);
    let steady_end = Instant::now();
    let mut triggers = Vec::new();
    let mut unfinished = 0;
    for generation in 1..=reloads {
        let t0 = instances.reload(port, generation);
        let deadline = t0 + Duration::from_secs(10);
        while load.newest.load(Ordering::Relaxed) < generation && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if load.newest.load(Ordering::Relaxed) < generation {
            unfinished += 1;
        }
        triggers.push((generation, t0));
        std::thread::sleep(SETTLE + GAP);
    }
    let (reloads_end, cpu_end) = (Instant::now(), cpu_times());
    std::thread::sleep(Duration::from_millis(300));
    let samples = load.finish();
    let queue = sampler.finish();
    instances.stop();

    // Reload time: signal → first response of the new generation.
    let mut windows = Vec::new();
    let mut times = Vec::new();
    for &(generation, t0) in &triggers {
        let first = samples.iter().filter(|s| s.generation == Some(generation)).map(|s| s.start + s.latency).min();
        if let Some(first) = first {
            times.push(first.saturating_duration_since(t0));
            windows.push((t0, first + SETTLE));
        }
    }
    if let Ok(path) = std::env::var("HAPROXY_BENCH_DUMP") {
        dump(&format!("{path}.{}", kind.slug()), &samples, &triggers);
    }
    // Steady: the phase before the first reload, and each gap from
    // QUIET_AFTER past a window's end to the next reload signal.
    let mut quiet = vec![(steady_start, steady_end)];
    for (i, &(_, end)) in windows.iter().enumerate() {
        let next = windows.get(i + 1).map_or(reloads_end, |&(t0, _)| t0);
        quiet.push((end + QUIET_AFTER, next));
    }
    let in_window = |s: &Sample| windows.iter().any(|&(a, b)| s.start >= a && s.start <= b);
    let is_quiet = |t: Instant| quiet.iter().any(|&(a, b)| t >= a && t < b);
    let queue_steady = accept_queue::max_where(&queue, is_quiet);
    let queue_reload = accept_queue::max_where(&queue, |t| windows.iter().any(|&(a, b)| t >= a && t <= b));
    let steady: Vec<Duration> =
        samples.iter().filter(|s| is_quiet(s.start) && s.generation.is_some()).map(|s| s.latency).collect();
    let during: Vec<Duration> = samples.iter().filter(|s| in_window(s)).map(|s| s.latency).collect();
    let reload_phase: Vec<&Sample> = samples.iter().filter(|s| s.start >= steady_end).collect();
    times.sort();
    Row {
        label: kind.label(),
        requests: reload_phase.len(),
        failed: reload_phase.iter().filter(|s| s.generation.is_none()).count(),
        reloads,
        unfinished,
        p99_steady: percentile(steady, 0.99),
        p99_reload: percentile(during, 0.99),
        queue_steady,
        queue_reload,
        cpu: busy(cpu_start, cpu_end),
        reload_p50: times.get(times.len() / 2).copied().unwrap_or_default(),
        reload_max: times.last().copied().unwrap_or_default(),
    }
}

/// `HAPROXY_BENCH_DUMP=PATH`: one line per request into PATH.SLUG, to see
/// where in a reload the slow ones fall: the reload it started in (-1:
/// before the first), ms from that reload's signal, latency in ms, the
/// generation that answered (-1: failed), ms from the signal to the new
/// generation's first response (-1: none).
fn dump(path: &str, samples: &[Sample], triggers: &[(u64, Instant)]) {
    let first = |generation: u64, t0: Instant| {
        samples
            .iter()
            .filter(|s| s.generation == Some(generation))
            .map(|s| (s.start + s.latency).saturating_duration_since(t0).as_secs_f64() * 1e3)
            .reduce(f64::min)
            .unwrap_or(-1.0)
    };
    let firsts: Vec<f64> = triggers.iter().map(|&(g, t0)| first(g, t0)).collect();
    let mut out = String::new();
    for s in samples {
        let i = triggers.iter().rposition(|&(_, t0)| t0 <= s.start);
        let (reload, offset, first) = match i {
            Some(i) => (triggers[i].0 as i64, (s.start - triggers[i].1).as_secs_f64() * 1e3, firsts[i]),
            None => (-1, 0.0, -1.0),
        };
        let served = s.generation.map_or(-1, |g| g as i64);
        out.push_str(&format!("{reload} {offset:.3} {:.3} {served} {first:.3}\n", s.latency.as_secs_f64() * 1e3));
    }
    std::fs::write(path, out).unwrap();
}

/// (busy, total) jiffies of all cores, from /proc/stat's first line.
fn cpu_times() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> =
        stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let total: u64 = fields.iter().take(8).sum();
    // idle and iowait are the 4th and 5th.
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// How busy the cores were between two [`cpu_times`], in percent.
fn busy(a: (u64, u64), b: (u64, u64)) -> f64 {
    100.0 * (b.0 - a.0) as f64 / (b.1 - a.1).max(1) as f64
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<30} {:>18} {:>8} {:>12} {:>15} {:>9} {:>13} {:>13} {:>9} {:>13} {:>13}",
        "scenario",
        "failed / requests",
        "reloads",
        "p99 steady",
        "p99 in reloads",
        "p99 ratio",
        "queue steady",
        "queue reloads",
        "CPU busy",
        "reload p50",
        "reload max"
    );
    for r in rows {
        let reloads =
            if r.unfinished > 0 { format!("{} ({} stuck)", r.reloads, r.unfinished) } else { r.reloads.to_string() };
        let ratio = r.p99_reload.as_secs_f64() / r.p99_steady.as_secs_f64().max(1e-9);
        println!(
            "{:<30} {:>18} {:>8} {:>12} {:>15} {:>9} {:>13} {:>13} {:>9} {:>13} {:>13}",
            r.label,
            format!("{} / {}", r.failed, r.requests),
            reloads,
            ms(r.p99_steady),
            ms(r.p99_reload),
            format!("{ratio:.2}x"),
            r.queue_steady,
            r.queue_reload,
            format!("{:.0}%", r.cpu),
            ms(r.reload_p50),
            ms(r.reload_max)
        );
    }
}
