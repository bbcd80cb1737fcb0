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

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemons::*;
use common::{bind_free_tcp, wait_timeout, Broker, BIN, START_TIMEOUT};
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
    let addr = spec.trim_start_matches("tcp://").parse().unwrap();
    let notify = Notify::bind(&broker.dir, "run-notify.sock");
    let log = broker.dir.join("run.log");
    let mut run = Reaped(
        Command::new(BIN)
            .args(["run", "--socket", &spec, "--"])
            .arg("python3")
            .arg(listen_http())
            .env("SOCKBROKER_SOCKET", &broker.control)
            .env("NOTIFY_SOCKET", &notify.path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    notify.wait_line(&mut run.0, "READY=1", START_TIMEOUT);
    let run_pid = Pid::from_raw(run.0.id() as i32);

    let limit = steady + Duration::from_secs(600);
    let load = Load::start(addr, clients, limit);
    let steady_start = Instant::now();
    std::thread::sleep(steady); // a measurement period, not synchronisation
    let steady_end = Instant::now();

    let mut windows = Vec::with_capacity(reloads);
    let reload_start = Instant::now();
    for n in 0..reloads {
        let begin = Instant::now();
        kill(run_pid, Signal::SIGHUP).unwrap();
        notify.wait_line(&mut run.0, "RELOADING=1", START_TIMEOUT);
        let ready = notify.wait_line(&mut run.0, "READY=1", START_TIMEOUT);
        let expected = format!("serving generation {} ", n + 2);
        assert!(ready.contains(&expected), "reload {}: {ready}", n + 1);
        windows.push((begin, Instant::now()));
    }
    let reload_time = reload_start.elapsed();
    let report = load.finish();

    kill(run_pid, Signal::SIGTERM).unwrap();
    let status = wait_timeout(&mut run.0, Duration::from_secs(30)).expect("run did not stop");

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
}
