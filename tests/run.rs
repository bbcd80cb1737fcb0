//! `sockbroker run`: reloads under a loopback load of new connections, failed
//! reloads, stop, and systemd-socket-proxyd as a generation.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use common::daemons::*;
use common::*;

/// A `sockbroker run` under test, with its own NOTIFY_SOCKET.
struct Run {
    child: Child,
    notify: Notify,
    log: std::path::PathBuf,
    done: bool,
}

impl Run {
    #[track_caller]
    fn start(broker: &Broker, args: &[&str], command: &[&str]) -> Run {
        let notify = Notify::bind(&broker.dir, "run-notify.sock");
        let log = broker.dir.join("run.log");
        let mut child = Command::new(BIN)
            .arg("run")
            .args(args)
            .arg("--")
            .args(command)
            .env("SOCKBROKER_SOCKET", &broker.control)
            .env("NOTIFY_SOCKET", &notify.path)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let ready = notify.wait_line(&mut child, "READY=1", START_TIMEOUT);
        assert!(field(&ready, "STATUS").unwrap().contains("serving generation 1"), "{ready}");
        Run { child, notify, log, done: false }
    }

    fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// SIGHUP, then RELOADING=1 (with MONOTONIC_USEC) and READY=1; returns
    /// READY's STATUS.
    #[track_caller]
    fn reload(&mut self) -> String {
        self.signal(Signal::SIGHUP);
        let reloading = self.notify.wait_line(&mut self.child, "RELOADING=1", START_TIMEOUT);
        let usec: u64 = field(&reloading, "MONOTONIC_USEC").expect("MONOTONIC_USEC").parse().unwrap();
        assert!(usec > 0);
        let ready = self.notify.wait_line(&mut self.child, "READY=1", START_TIMEOUT);
        field(&ready, "STATUS").unwrap_or_default().to_string()
    }

    #[track_caller]
    fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(Signal::SIGTERM);
        let status = wait_timeout(&mut self.child, Duration::from_secs(20)).expect("run did not stop");
        self.done = true;
        status
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if !self.done {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            let _ = wait_timeout(&mut self.child, Duration::from_secs(10));
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- run log:\n{log}");
        }
    }
}

/// "… (pid N) …" from a STATUS line: the serving generation's pid.
fn serving_pid(status: &str) -> i32 {
    let rest = status.split("serving generation ").nth(1).unwrap_or_else(|| panic!("{status}"));
    rest.split("(pid ").nth(1).and_then(|r| r.split(')').next()).and_then(|p| p.parse().ok()).unwrap()
}

fn tcp_addr(spec: &str) -> SocketAddr {
    spec.trim_start_matches("tcp://").parse().unwrap()
}

#[test]
fn twenty_reloads_under_load_fail_no_connection() {
    let broker = Broker::start("run_reloads");
    let (spec, _fd) = bind_free_tcp(&mut broker.client());
    let daemon = listen_http();
    let mut run = Run::start(&broker, &["--socket", &format!("web={spec}")], &["python3", daemon.to_str().unwrap()]);
    let addr = tcp_addr(&spec);
    let load = Load::start(addr, 2, Duration::from_secs(120));
    load.wait_requests(20);
    let mut pids = vec![];
    for n in 2..=21 {
        let status = run.reload();
        assert!(status.contains(&format!("serving generation {n} ")), "reload {n}: {status}");
        pids.push(serving_pid(&status));
        load.wait_requests(5);
    }
    let report = load.finish();
    assert_eq!(report.failed, 0, "failed connections during reloads: {:?}", report.errors);
    assert!(report.ok >= 100, "too little load to mean anything: {report:?}");
    assert!(report.generations.len() >= 10, "served by generations {:?}", report.generations);
    assert!(report.generations.contains(&21));

    // Retired generations are gone (reaped, not zombies); the last one serves.
    let last = *pids.last().unwrap();
    for pid in &pids[..pids.len() - 1] {
        for _ in 0..200 {
            if !alive(*pid) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!alive(*pid), "retired generation pid {pid} still exists");
    }
    assert!(alive(last));
    let status = run.stop();
    assert_eq!(status.code(), Some(0), "run exits with the daemon's status");
    assert!(!alive(last), "run exited but left generation {last} behind");
}

#[test]
fn failed_reloads_leave_the_old_generation_serving() {
    let broker = Broker::start("run_failed");
    let (spec, _fd) = bind_free_tcp(&mut broker.client());
    let daemon = listen_http();
    let mut run = Run::start(
        &broker,
        &["--socket", &spec, "--ready-timeout", "5s"],
        &["python3", daemon.to_str().unwrap(), "--exit-on-gen", "2", "--hang-on-gen", "3"],
    );
    let addr = tcp_addr(&spec);
    let load = Load::start(addr, 2, Duration::from_secs(60));
    load.wait_requests(10);

    let status = run.reload();
    assert!(status.contains("serving generation 1 "), "{status}");
    assert!(status.contains("generation 2") && status.contains("exited with status 3"), "{status}");
    load.wait_requests(10);

    let status = run.reload();
    assert!(status.contains("serving generation 1 "), "{status}");
    assert!(status.contains("generation 3") && status.contains("not ready within"), "{status}");
    load.wait_requests(10);

    let mid = load.finish();
    assert_eq!(mid.failed, 0, "failed connections: {:?}", mid.errors);
    assert_eq!(mid.generations.iter().copied().collect::<Vec<_>>(), vec![1], "only generation 1 may serve");

    let load = Load::start(addr, 2, Duration::from_secs(60));
    let status = run.reload();
    assert!(status.contains("serving generation 4 "), "{status}");
    assert!(status.contains("1 failed") || status.contains("2 failed"), "{status}");
    load.wait_requests(10);
    let report = load.finish();
    assert_eq!(report.failed, 0, "failed connections: {:?}", report.errors);
    assert!(report.generations.contains(&4));
    assert_eq!(run.stop().code(), Some(0));
    let log = std::fs::read_to_string(&run.log).unwrap();
    assert_eq!(log.matches("reload failed").count(), 2, "{log}");
}

#[test]
fn pidfile_readiness() {
    let broker = Broker::start("run_pidfile");
    let (spec, _fd) = bind_free_tcp(&mut broker.client());
    let pidfile = broker.dir.join("daemon.pid");
    let ready = format!("pidfile:{}", pidfile.display());
    let daemon = listen_http();
    let mut run = Run::start(
        &broker,
        &["--socket", &spec, "--ready", &ready],
        &["python3", daemon.to_str().unwrap(), "--pidfile", pidfile.to_str().unwrap()],
    );
    let addr = tcp_addr(&spec);
    let load = Load::start(addr, 2, Duration::from_secs(60));
    for n in 2..=4 {
        let status = run.reload();
        assert!(status.contains(&format!("serving generation {n} ")), "{status}");
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        assert_eq!(serving_pid(&status), pid);
        load.wait_requests(5);
    }
    let report = load.finish();
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert_eq!(run.stop().code(), Some(0));
}

#[test]
fn delay_readiness_and_a_first_generation_that_fails() {
    let broker = Broker::start("run_delay");
    let (spec, _fd) = bind_free_tcp(&mut broker.client());
    let daemon = listen_http();
    let command = ["python3", daemon.to_str().unwrap(), "--term-status", "7"];
    let mut run = Run::start(&broker, &["--socket", &spec, "--ready", "delay:200ms"], &command);
    let status = run.reload();
    assert!(status.contains("serving generation 2 "), "{status}");
    // A delay says nothing about the daemon itself: wait until generation 2
    // answers (so its SIGTERM handler is installed) before stopping.
    let addr = tcp_addr(&spec);
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    while generation(&http_get(addr).unwrap()) != Some(2) {
        assert!(std::time::Instant::now() < deadline, "generation 2 never answered");
    }
    // run exits with the serving generation's status.
    assert_eq!(run.stop().code(), Some(7));

    // Generation 1 exiting before it is ready: run fails with a clear error.
    let out = Command::new(BIN)
        .args(["run", "--socket", &spec, "--", "python3", daemon.to_str().unwrap(), "--exit-on-gen", "1"])
        .env("SOCKBROKER_SOCKET", &broker.control)
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("generation 1") && stderr.contains("exited with status 3 before it was ready"), "{stderr}");
}

#[test]
fn socket_proxyd_generations() {
    let broker = Broker::start("run_proxyd");
    let backend = http_backend("via-proxy\n");
    let (spec, _fd) = bind_free_tcp(&mut broker.client());
    let backend = backend.to_string();
    // proxyd sends no READY=1: readiness by delay (the queue holds new
    // connections meanwhile, so the delay costs latency, never a connection).
    let mut run = Run::start(&broker, &["--socket", &spec, "--ready", "delay:100ms"], &[SOCKET_PROXYD, &backend]);
    let addr = tcp_addr(&spec);
    assert_eq!(http_get(addr).unwrap(), "via-proxy\n");
    let mut previous = None;
    for n in 2..=4 {
        let status = run.reload();
        assert!(status.contains(&format!("serving generation {n} ")), "{status}");
        let pid = serving_pid(&status);
        assert_ne!(Some(pid), previous);
        previous = Some(pid);
        assert_eq!(http_get(addr).unwrap(), "via-proxy\n");
    }
    let status = run.stop();
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(!alive(previous.unwrap()));
}

#[test]
fn sigint_stops_everything_and_reaps_orphans() {
    let broker = Broker::start("run_orphans");
    let (spec, _fd) = bind_free_tcp(&mut broker.client());
    let orphan_file = broker.dir.join("orphan.pid");
    // The daemon leaves a child behind: `sleep` outlives the Python process
    // that becomes its parent (sh execs python, keeping the pid run started).
    let script = format!("sleep 1000 & echo $! > {}; exec python3 {}", orphan_file.display(), listen_http().display());
    let mut run = Run::start(&broker, &["--socket", &spec], &["sh", "-c", &script]);
    let orphan: i32 = std::fs::read_to_string(&orphan_file).unwrap().trim().parse().unwrap();
    assert!(alive(orphan));
    assert!(http_get(tcp_addr(&spec)).unwrap().contains("gen=1"));
    run.signal(Signal::SIGINT);
    let status = wait_timeout(&mut run.child, Duration::from_secs(20)).expect("run did not stop on SIGINT");
    run.done = true;
    assert_eq!(status.code(), Some(0));
    assert!(!alive(orphan), "run exited but the daemon's orphan {orphan} lives on");
    let log = std::fs::read_to_string(&run.log).unwrap();
    assert!(log.contains(&format!("orphan pid {orphan}")), "{log}");
}
