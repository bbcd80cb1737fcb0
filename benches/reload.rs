//! Reload figures for `sockbroker run`: reloads under a loopback load of new
//! connections (one request each, then close), against the Python LISTEN_FDS
//! test daemon with `--ready notify`.
//!
//! `cargo bench --bench reload` does 200 back-to-back reloads and prints:
//! failed connections, reloads per second sustained, and p50/p99
//! connect+response latency of requests that started inside reload windows
//! (SIGHUP sent → READY=1 received from `run`) against a steady-state phase
//! with no reload. Under `cargo test` (no `--bench` argument) it does 5
//! reloads, so the code keeps working without slowing the suite.
//! `RELOAD_BENCH_RELOADS=N` and `RELOAD_BENCH_CLIENTS=N` override the sizes.
//!
//! Then, in the same run, reload-to-serving time, p50/p99, side by side:
//! - `run`: signal → READY=1 from `run` (the new generation said READY=1 and
//!   the old one was told to retire), from the reloads above;
//! - `haproxy run`: for `sockbroker haproxy run` (render, start `haproxy
//!   -Ws`; no separate `haproxy -c` on a successful reload): signal → first
//!   response from the new config (each reload's config answers with its own
//!   string), and signal → READY=1 from the supervisor (the old instance was
//!   told to retire), with the render and HAProxy's start from its log;
//! - HAProxy alone: `haproxy -Ws -db` spawned → READY=1 on our NOTIFY_SOCKET
//!   and → first response, and `haproxy -c` alone, on an equivalent config.
//!
//! Both supervisors run with `--ready-grace 0`: the grace window delays only
//! the old generation's retirement (both serve meanwhile), and back-to-back
//! reloads would queue behind it. `RELOAD_BENCH_HAPROXY=N` sets the number of
//! HAProxy reloads and starts (default 50, 3 under `cargo test`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemons::*;
use common::supervisor::Supervisor;
use common::{bind_free_tcp, tcp_addr, wait_timeout, Broker, START_TIMEOUT};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let reloads = env_usize("RELOAD_BENCH_RELOADS", if full { 200 } else { 5 });
    let clients = env_usize("RELOAD_BENCH_CLIENTS", 2);
    let steady = if full { Duration::from_secs(3) } else { Duration::from_millis(300) };

    let broker = Broker::start("bench_reload");
    let (spec, _fd) = bind_free_tcp(&mut broker.client());
    let addr = tcp_addr(&spec);
    let mut run = Supervisor::run(&broker)
        .args(&["--socket", &spec, "--ready-grace", "0"])
        .command(&["python3", listen_http().to_str().unwrap()])
        .env("RUST_LOG", "info")
        .start();

    let limit = steady + Duration::from_secs(600);
    let load = Load::start(addr, clients, limit);
    let steady_start = Instant::now();
    std::thread::sleep(steady); // a measurement period, not synchronisation
    let steady_end = Instant::now();

    let mut windows = Vec::with_capacity(reloads);
    let reload_start = Instant::now();
    for n in 0..reloads {
        let begin = Instant::now();
        let ready = run.reload();
        let expected = format!("serving generation {} ", n + 2);
        assert!(ready.contains(&expected), "reload {}: {ready}", n + 1);
        windows.push((begin, Instant::now()));
    }
    let mut run_reloads: Vec<Duration> = windows.iter().map(|(a, b)| *b - *a).collect();
    run_reloads.sort();
    let reload_time = reload_start.elapsed();
    let report = load.finish();

    run.signal(Signal::SIGTERM);
    let status = run.wait_exit(Duration::from_secs(30), "run did not stop");

    let in_window = |t: Instant| windows.iter().any(|(a, b)| t >= *a && t < *b);
    let mut steady_lat: Vec<Duration> =
        report.samples.iter().filter(|(t, _)| *t >= steady_start && *t < steady_end).map(|(_, d)| *d).collect();
    let mut reload_lat: Vec<Duration> = report.samples.iter().filter(|(t, _)| in_window(*t)).map(|(_, d)| *d).collect();
    steady_lat.sort();
    reload_lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;

    println!("sockbroker run reload benchmark ({} mode)", if full { "full" } else { "smoke" });
    println!("  daemon: python3 tests/daemons/listen_http.py, --ready notify, {clients} client threads");
    println!("  reloads:                    {reloads} in {:.2} s", reload_time.as_secs_f64());
    println!("  reloads per second:         {:.2}", reloads as f64 / reload_time.as_secs_f64());
    println!("  mean reload (HUP->READY):   {:.1} ms", ms(reload_time) / reloads as f64);
    println!("  requests ok / failed:       {} / {}", report.ok, report.failed);
    println!("  generations seen serving:   {}", report.generations.len());
    println!(
        "  steady state  p50 / p99:    {:.2} / {:.2} ms  ({} requests)",
        ms(percentile(&steady_lat, 50.0)),
        ms(percentile(&steady_lat, 99.0)),
        steady_lat.len()
    );
    println!(
        "  reload window p50 / p99:    {:.2} / {:.2} ms  ({} requests)",
        ms(percentile(&reload_lat, 50.0)),
        ms(percentile(&reload_lat, 99.0)),
        reload_lat.len()
    );
    println!("  run exit status:            {status}");
    if !report.errors.is_empty() {
        println!("  first errors: {:?}", report.errors);
    }
    assert_eq!(report.failed, 0, "failed connections during reloads");
    assert!(status.success());

    let n = env_usize("RELOAD_BENCH_HAPROXY", if full { 50 } else { 3 });
    if !std::path::Path::new(HAPROXY).exists() {
        println!("  {HAPROXY} not found: haproxy figures skipped");
        return;
    }
    let hr = haproxy_run_reloads(&broker, n);
    let alone = haproxy_alone(&broker, n);
    let p = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        format!("{:7.1} / {:7.1} ms", ms(percentile(&v, 50.0)), ms(percentile(&v, 99.0)))
    };
    let p50 = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        percentile(&v, 50.0).as_secs_f64()
    };
    println!();
    println!("reload-to-serving, p50 / p99 (--ready-grace 0)");
    println!("  run, signal -> READY=1 from run:            {}  ({} reloads)", p(&run_reloads), run_reloads.len());
    println!("  haproxy run, signal -> new config answers:  {}  ({} reloads)", p(&hr.serving), hr.serving.len());
    println!("  haproxy run, signal -> READY=1 from run:    {}", p(&hr.ready));
    println!("    its render, in the supervisor:            {}", p(&hr.render));
    println!("    its haproxy -Ws start -> READY=1:         {}", p(&hr.start));
    println!("  HAProxy alone, spawn -> READY=1:            {}  ({} starts)", p(&alone.ready), alone.ready.len());
    println!("  HAProxy alone, spawn -> first answer:       {}", p(&alone.serving));
    println!("  HAProxy alone, haproxy -c:                  {}", p(&alone.check));
    println!(
        "  ratios (p50): haproxy run serving / HAProxy alone ready {:.2}x, haproxy run READY / HAProxy alone ready {:.2}x",
        p50(&hr.serving) / p50(&alone.ready),
        p50(&hr.ready) / p50(&alone.ready)
    );
}

/// Polls until the server answers `want` (bounded); when it did.
fn until_answer(addr: std::net::SocketAddr, want: &str) -> Instant {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if http_get(addr).is_ok_and(|body| body.trim() == want) {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "{want} never answered");
        // Polling flat out would take a core from the HAProxy starting.
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[derive(Default)]
struct HaproxyRun {
    serving: Vec<Duration>,
    ready: Vec<Duration>,
    render: Vec<Duration>,
    start: Vec<Duration>,
}

#[derive(Default)]
struct HaproxyAlone {
    ready: Vec<Duration>,
    serving: Vec<Duration>,
    check: Vec<Duration>,
}

const HAPROXY: &str = "/usr/sbin/haproxy";

fn haproxy_config(bind: &str, answer: &str) -> String {
    format!(
        "global\n  maxconn 1000\ndefaults\n  mode http\n  timeout client 10s\n  timeout server 10s\n  timeout connect 2s\n\
         frontend web\n  bind {bind}\n  http-request return status 200 content-type text/plain string {answer}\n"
    )
}

/// `n` reloads of `sockbroker haproxy run`, each with a config that answers
/// its own string: signal → first answer and → READY=1, and each step's
/// time from the supervisor's log.
fn haproxy_run_reloads(broker: &Broker, n: usize) -> HaproxyRun {
    let (spec, _fd) = bind_free_tcp(&mut broker.client());
    let addr = tcp_addr(&spec);
    let template = broker.dir.join("bench.cfg.sb");
    let bind = format!("{{{{ sockbroker \"{spec}\" }}}}");
    std::fs::write(&template, haproxy_config(&bind, "gen-1")).unwrap();
    let mut run = Supervisor::haproxy_run(broker)
        .args(&["--ready-grace", "0"])
        .command(&[HAPROXY, "-f", template.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .start();
    let mut out = HaproxyRun::default();
    for i in 0..n {
        // Generation 1 serves; reload i starts generation i + 2.
        let want = format!("gen-{}", i + 2);
        std::fs::write(&template, haproxy_config(&bind, &want)).unwrap();
        let begin = Instant::now();
        run.signal(Signal::SIGHUP);
        out.serving.push(until_answer(addr, &want) - begin);
        run.wait_line("RELOADING=1");
        let ready = run.next_ready();
        out.ready.push(begin.elapsed());
        assert!(!ready.contains("reload failed"), "{ready}");
    }
    run.signal(Signal::SIGTERM);
    run.wait_exit(Duration::from_secs(30), "haproxy run did not stop");
    // The supervisor's log, per generation: "(render 1.2ms, …" and "ready
    // after 60.2ms" (since its spawn).
    let text = run.log_text();
    let after = |line: &str, marker: &str| {
        line.split(marker).nth(1)?.split([' ', ',', ';', ')']).next().and_then(parse_debug_duration)
    };
    // With no grace window, a generation whose check passed first logs only
    // "(pid P) ready after X"; one still waiting for its check logs "says it
    // is ready after X" first: the first of the two per generation counts.
    let mut seen = std::collections::HashSet::new();
    for line in text.lines().skip_while(|l| !l.contains("reload 1:")) {
        out.render.extend(after(line, "(render "));
        let generation = line.split("generation ").nth(1).and_then(|r| r.split(' ').next()).unwrap_or("");
        if let Some(d) = after(line, " ready after ") {
            if seen.insert(generation.to_string()) {
                out.start.push(d);
            }
        }
    }
    out
}

/// "1.2ms", "40.1µs", "1.5s" as Debug prints a Duration.
fn parse_debug_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (value, unit) = text.split_at(split);
    let value: f64 = value.parse().ok()?;
    let scale = match unit {
        "ns" => 1e-9,
        "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(value * scale))
}

/// HAProxy by itself on an equivalent config: `n` starts of `haproxy -Ws
/// -db` (spawn → READY=1, spawn → first answer) and `n` runs of `haproxy -c`.
fn haproxy_alone(broker: &Broker, n: usize) -> HaproxyAlone {
    let config = broker.dir.join("alone.cfg");
    let port = common::free_port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let notify = Notify::bind(&broker.dir, "haproxy-alone-notify.sock");
    let mut out = HaproxyAlone::default();
    for i in 0..n {
        let want = format!("alone-{i}");
        std::fs::write(&config, haproxy_config(&format!("127.0.0.1:{port}"), &want)).unwrap();
        let begin = Instant::now();
        let mut child = Reaped(
            Command::new(HAPROXY)
                .args(["-Ws", "-db", "-f"])
                .arg(&config)
                .env("NOTIFY_SOCKET", &notify.path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        notify.wait_line(&mut child.0, "READY=1", START_TIMEOUT);
        out.ready.push(begin.elapsed());
        out.serving.push(until_answer(addr, &want) - begin);
        kill(Pid::from_raw(child.0.id() as i32), Signal::SIGUSR1).unwrap();
        // The master may drop a SIGUSR1 sent before its handler exists:
        // the Reaped guard kills it if it has not stopped by then.
        let _ = wait_timeout(&mut child.0, Duration::from_secs(2));

        let begin = Instant::now();
        let status = Command::new(HAPROXY).args(["-c", "-q", "-f"]).arg(&config).status().unwrap();
        out.check.push(begin.elapsed());
        assert!(status.success());
    }
    out
}
