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
//! - `haproxy run`: the same for `sockbroker haproxy run` (render, `haproxy
//!   -c`, start `haproxy -Ws`, READY=1), with the time of each step from its log;
//! - HAProxy alone: `haproxy -Ws -db` spawned → READY=1 on our NOTIFY_SOCKET,
//!   and `haproxy -c` alone, on an equivalent config.
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
            .args(["run", "--socket", &spec, "--ready-grace", "0", "--"])
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
    let mut run_reloads: Vec<Duration> = windows.iter().map(|(a, b)| *b - *a).collect();
    run_reloads.sort();
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

    let n = env_usize("RELOAD_BENCH_HAPROXY", if full { 50 } else { 3 });
    if !std::path::Path::new(HAPROXY).exists() {
        println!("  {HAPROXY} not found: haproxy figures skipped");
        return;
    }
    let (mut hr, steps) = haproxy_run_reloads(&broker, n);
    let (mut alone, mut check) = haproxy_alone(&broker, n);
    hr.sort();
    alone.sort();
    check.sort();
    let p = |v: &[Duration]| format!("{:7.1} / {:7.1} ms", ms(percentile(v, 50.0)), ms(percentile(v, 99.0)));
    println!();
    println!("reload-to-serving, p50 / p99 (signal -> READY=1 from the supervisor; --ready-grace 0)");
    println!("  sockbroker run (python3 daemon):   {}  ({} reloads)", p(&run_reloads), run_reloads.len());
    println!("  sockbroker haproxy run:            {}  ({} reloads)", p(&hr), hr.len());
    println!("    of which render / haproxy -c / spawn (p50): {steps}");
    println!("  haproxy -Ws start-to-ready alone:  {}  ({} starts)", p(&alone), alone.len());
    println!("  haproxy -c alone:                  {}  ({} checks)", p(&check), check.len());
    println!(
        "  haproxy run / haproxy alone (p50): {:.2}x",
        percentile(&hr, 50.0).as_secs_f64() / percentile(&alone, 50.0).as_secs_f64()
    );
}

const HAPROXY: &str = "/usr/sbin/haproxy";

fn haproxy_config(bind: &str) -> String {
    format!(
        "global\n  maxconn 1000\ndefaults\n  mode http\n  timeout client 10s\n  timeout server 10s\n  timeout connect 2s\n\
         frontend web\n  bind {bind}\n  http-request return status 200 content-type text/plain string ok\n"
    )
}

/// `n` reloads of `sockbroker haproxy run`: signal → READY=1 each, and the
/// p50 of each step of the start, from the supervisor's log.
fn haproxy_run_reloads(broker: &Broker, n: usize) -> (Vec<Duration>, String) {
    let (spec, _fd) = bind_free_tcp(&mut broker.client());
    let template = broker.dir.join("bench.cfg.sb");
    std::fs::write(&template, haproxy_config(&format!("{{{{ sockbroker \"{spec}\" }}}}"))).unwrap();
    let notify = Notify::bind(&broker.dir, "haproxy-run-notify.sock");
    let log = broker.dir.join("haproxy-run.log");
    let mut run = Reaped(
        Command::new(BIN)
            .args(["haproxy", "run", "--ready-grace", "0", "--", HAPROXY, "-f"])
            .arg(&template)
            .env("SOCKBROKER_SOCKET", &broker.control)
            .env("NOTIFY_SOCKET", &notify.path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    notify.wait_line(&mut run.0, "READY=1", START_TIMEOUT);
    let pid = Pid::from_raw(run.0.id() as i32);
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let begin = Instant::now();
        kill(pid, Signal::SIGHUP).unwrap();
        notify.wait_line(&mut run.0, "RELOADING=1", START_TIMEOUT);
        let ready = notify.wait_line(&mut run.0, "READY=1", START_TIMEOUT);
        times.push(begin.elapsed());
        assert!(!ready.contains("reload failed"), "{ready}");
    }
    kill(pid, Signal::SIGTERM).unwrap();
    wait_timeout(&mut run.0, Duration::from_secs(30)).expect("haproxy run did not stop");
    // "(render 1.2ms, haproxy -c 40.1ms, spawn 1.0ms)" per generation.
    let text = std::fs::read_to_string(&log).unwrap();
    let mut steps: [Vec<Duration>; 3] = Default::default();
    for line in text.lines().filter_map(|l| l.split("(render ").nth(1)) {
        for (i, part) in line.trim_end_matches(')').split(", ").enumerate().take(3) {
            if let Some(d) = part.rsplit(' ').next().and_then(parse_debug_duration) {
                steps[i].push(d);
            }
        }
    }
    let p50 = |v: &mut Vec<Duration>| {
        v.sort();
        format!("{:.1}", percentile(v, 50.0).as_secs_f64() * 1000.0)
    };
    let [mut a, mut b, mut c] = steps;
    (times, format!("{} / {} / {} ms", p50(&mut a), p50(&mut b), p50(&mut c)))
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
/// -db` (spawn → READY=1) and `n` runs of `haproxy -c`.
fn haproxy_alone(broker: &Broker, n: usize) -> (Vec<Duration>, Vec<Duration>) {
    let config = broker.dir.join("alone.cfg");
    let port = common::free_port();
    std::fs::write(&config, haproxy_config(&format!("127.0.0.1:{port}"))).unwrap();
    let notify = Notify::bind(&broker.dir, "haproxy-alone-notify.sock");
    let mut starts = Vec::with_capacity(n);
    let mut checks = Vec::with_capacity(n);
    for _ in 0..n {
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
        starts.push(begin.elapsed());
        kill(Pid::from_raw(child.0.id() as i32), Signal::SIGUSR1).unwrap();
        // The master may drop a SIGUSR1 sent before its handler exists:
        // the Reaped guard kills it if it has not stopped by then.
        let _ = wait_timeout(&mut child.0, Duration::from_secs(2));

        let begin = Instant::now();
        let status = Command::new(HAPROXY).args(["-c", "-q", "-f"]).arg(&config).status().unwrap();
        checks.push(begin.elapsed());
        assert!(status.success());
    }
    (starts, checks)
}
