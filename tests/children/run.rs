//! `sockbroker run`: reloads under a loopback load of new connections, failed
//! reloads, stop, and systemd-socket-proxyd as a generation.

use crate::common;

use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use common::daemons::*;
use common::supervisor::{supervisor_cmd, Supervisor};
use common::*;

/// `sockbroker run ARGS -- COMMAND`, serving generation 1.
#[track_caller]
fn start(broker: &Broker, args: &[&str], command: &[&str]) -> Supervisor {
    let run = Supervisor::run(broker).args(args).command(command).start();
    assert!(field(&run.ready, "STATUS").unwrap().contains("serving generation 1"), "{}", run.ready);
    run
}

/// "… (pid N) …" from a STATUS line: the serving generation's pid.
fn serving_pid(status: &str) -> i32 {
    let rest = status.split("serving generation ").nth(1).unwrap_or_else(|| panic!("{status}"));
    rest.split("(pid ").nth(1).and_then(|r| r.split(')').next()).and_then(|p| p.parse().ok()).unwrap()
}

#[test]
fn twenty_reloads_under_load_fail_no_connection() {
    let broker = Broker::start("run_reloads");
    let (spec, _fd) = bind_free_tcp(&mut broker.client());
    let daemon = listen_http();
    let mut run = start(
        &broker,
        &["--socket", &format!("web={spec}"), "--ready-grace", "300ms"],
        &["python3", daemon.to_str().unwrap()],
    );
    let addr = tcp_addr(&spec);
    let load = Load::start(addr, 2, Duration::from_secs(120));
    load.wait_requests(20);
    let mut pids = vec![];
    for n in 2..=21 {
        let status = run.reload_status();
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
    let mut run = start(
        &broker,
        &["--socket", &spec, "--ready-timeout", "5s"],
        &["python3", daemon.to_str().unwrap(), "--exit-on-gen", "2", "--hang-on-gen", "3"],
    );
    let addr = tcp_addr(&spec);
    let load = Load::start(addr, 2, Duration::from_secs(60));
    load.wait_requests(10);

    let status = run.reload_status();
    assert!(status.contains("serving generation 1 "), "{status}");
    assert!(status.contains("generation 2") && status.contains("exited with status 3"), "{status}");
    load.wait_requests(10);

    let status = run.reload_status();
    assert!(status.contains("serving generation 1 "), "{status}");
    assert!(status.contains("generation 3") && status.contains("not ready within"), "{status}");
    load.wait_requests(10);

    let mid = load.finish();
    assert_eq!(mid.failed, 0, "failed connections: {:?}", mid.errors);
    assert_eq!(mid.generations.iter().copied().collect::<Vec<_>>(), vec![1], "only generation 1 may serve");

    let load = Load::start(addr, 2, Duration::from_secs(60));
    let status = run.reload_status();
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
    let mut run = start(
        &broker,
        &["--socket", &spec, "--ready", &ready],
        &["python3", daemon.to_str().unwrap(), "--pidfile", pidfile.to_str().unwrap()],
    );
    let addr = tcp_addr(&spec);
    let load = Load::start(addr, 2, Duration::from_secs(60));
    for n in 2..=4 {
        let status = run.reload_status();
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
    let mut run = start(&broker, &["--socket", &spec, "--ready", "delay:200ms"], &command);
    let status = run.reload_status();
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
        .output_within(COMMAND_TIMEOUT)
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
    let mut run = start(&broker, &["--socket", &spec, "--ready", "delay:100ms"], &[SOCKET_PROXYD, &backend]);
    let addr = tcp_addr(&spec);
    assert_eq!(http_get(addr).unwrap(), "via-proxy\n");
    let mut previous = None;
    for n in 2..=4 {
        let status = run.reload_status();
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
    let mut run = start(&broker, &["--socket", &spec], &["sh", "-c", &script]);
    let orphan: i32 = std::fs::read_to_string(&orphan_file).unwrap().trim().parse().unwrap();
    assert!(alive(orphan));
    assert!(http_get(tcp_addr(&spec)).unwrap().contains("gen=1"));
    let status = run.stop_with(Signal::SIGINT);
    assert_eq!(status.code(), Some(0));
    assert!(!alive(orphan), "run exited but the daemon's orphan {orphan} lives on");
    let log = std::fs::read_to_string(&run.log).unwrap();
    assert!(log.contains(&format!("orphan pid {orphan}")), "{log}");
}

/// `supervisor reload` returns 0 only once the new generation serves, and
/// non-zero with the reason for a generation that exits before READY=1, one
/// that exits 500 ms after it, and one never ready; the old one serves
/// throughout with no failed request, and STATUS= says so until a success.
#[test]
fn supervisor_reload_waits_for_the_outcome() {
    let broker = Broker::start("run_waitable");
    let (spec, _fd) = bind_free_tcp(&mut broker.client());
    let daemon = listen_http();
    let d = daemon.to_str().unwrap();
    let run = start(
        &broker,
        &["--socket", &spec, "--ready-timeout", "5s", "--ready-grace", "1500ms"],
        &["python3", d, "--exit-on-gen", "2", "--die-after-ready-on-gen", "3", "--hang-on-gen", "4"],
    );
    let addr = tcp_addr(&spec);
    let load = Load::start(addr, 2, Duration::from_secs(120));
    load.wait_requests(10);

    let fails = |needles: &[&str]| {
        let out = run.supervisor(&["reload"]);
        let text = output_text(&out);
        assert_eq!(out.status.code(), Some(1), "{text}");
        for n in needles {
            assert!(text.contains(n), "no {n:?} in: {text}");
        }
        assert!(text.contains("generation 1 (pid") && text.contains("keeps serving"), "{text}");
        let status = run.status();
        assert!(status.contains("serving generation 1 "), "{status}");
        assert!(status.contains("last reload failed: "), "{status}");
        load.wait_requests(10);
    };
    fails(&["generation 2", "exited with status 3 before it was ready"]);
    fails(&["generation 3", "exited with status 4", "after it said it was ready", "--ready-grace"]);
    fails(&["generation 4", "not ready within 5s"]);

    let out = run.supervisor(&["reload"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("generation 5 (pid") && text.contains("serves"), "{text}");
    assert!(text.contains("told generation 1 (pid") && text.contains("to retire (SIGTERM)"), "{text}");
    // The outcome came after the new generation was proven: it serves now.
    let status = run.status();
    assert!(status.contains("serving generation 5 ") && status.contains("generation 5 pid"), "{status}");
    assert!(!status.contains("last reload failed"), "a success clears the failure: {status}");
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    while generation(&http_get(addr).unwrap()) != Some(5) {
        assert!(std::time::Instant::now() < deadline, "generation 5 never answered");
    }
    load.wait_requests(10);
    let report = load.finish();
    assert_eq!(report.failed, 0, "failed connections: {:?}", report.errors);
    assert!(report.generations.iter().all(|g| [1, 5].contains(g)), "served by {:?}", report.generations);
}

/// Requests made while a reload runs wait for the next one, which serves
/// them all; a caller never gets the outcome of a reload that began before
/// its request. SIGHUP joins in the same way.
#[test]
fn concurrent_reload_requests_coalesce() {
    let broker = Broker::start("run_coalesce");
    let (spec, _fd) = bind_free_tcp(&mut broker.client());
    let daemon = listen_http();
    let run = start(&broker, &["--socket", &spec, "--ready-grace", "1s"], &["python3", daemon.to_str().unwrap()]);
    let first = supervisor_cmd(run.pid(), &["reload"]).stdout(Stdio::piped()).spawn().unwrap();
    wait_until(START_TIMEOUT, "generation 2 to start", || run.status().contains("generation 2 pid"));
    let later: Vec<_> =
        (0..3).map(|_| supervisor_cmd(run.pid(), &["reload"]).stdout(Stdio::piped()).spawn().unwrap()).collect();
    run.signal(Signal::SIGHUP);
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success() && output_text(&out).contains("generation 2 (pid"), "{}", output_text(&out));
    for child in later {
        let out = child.wait_with_output().unwrap();
        let text = output_text(&out);
        assert!(out.status.success() && text.contains("generation 3 (pid") && text.contains("serves"), "{text}");
    }
    let status = run.status();
    assert!(status.contains("serving generation 3 "), "{status}");
    assert!(!status.contains("generation 4"), "requests during a reload made more than one more: {status}");
}

/// Only root and the supervisor's own uid may ask; anyone else is told why.
#[test]
fn supervisor_reload_refuses_other_users() {
    let broker = Broker::start("run_control_access");
    let (spec, _fd) = bind_free_tcp(&mut broker.client());
    let daemon = listen_http();
    let run = start(&broker, &["--socket", &spec, "--ready-grace", "0"], &["python3", daemon.to_str().unwrap()]);
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", BIN, "supervisor", "reload", "--pid"])
        .arg(run.pid().to_string())
        .output_within(COMMAND_TIMEOUT)
        .unwrap();
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("may not ask: only root and uid 0"), "{text}");
    assert!(run.status().contains("serving generation 1 "), "a refused request reloaded");
    // A pid that is no supervisor: a clear error, not a hang.
    let out = supervisor_cmd(std::process::id() as i32, &["reload"]).output_within(COMMAND_TIMEOUT).unwrap();
    assert!(!out.status.success());
    assert!(output_text(&out).contains("cannot reach the supervisor of pid"), "{}", output_text(&out));

    // Someone else squatting on another pid's name is not believed.
    use std::os::linux::net::SocketAddrExt;
    let other = Reaped(Command::new("sleep").arg("30").spawn().unwrap());
    let name = format!("sockbroker-supervisor/{}", other.0.id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let _squatter = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    let out = supervisor_cmd(other.0.id() as i32, &["reload"]).output_within(COMMAND_TIMEOUT).unwrap();
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    let want = format!("is served by pid {}, not by {}: refusing to trust it", std::process::id(), other.0.id());
    assert!(text.contains(&want), "{text}");
}

/// Generations alive now: `run`'s children (zombies included, until reaped).
fn children(pid: i32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .map(|text| text.split_whitespace().count())
        .sum()
}

/// Many reloads, each generation holding a silent connection open (as a
/// websocket would), so none finishes draining by itself: never more than
/// --max-generations alive, and --drain-timeout after the last reload only
/// the serving one is left. 200 reloads (SOCKBROKER_TEST_RELOADS overrides),
/// --ready-grace 0 and a 3 s drain deadline keep it within about a minute.
#[test]
fn bounded_draining_over_many_reloads() {
    use std::io::Write;
    let reloads: u64 = std::env::var("SOCKBROKER_TEST_RELOADS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let broker = Broker::start("run_bounded");
    let (spec, _fd) = bind_free_tcp(&mut broker.client());
    let addr = tcp_addr(&spec);
    let daemon = listen_http();
    let cap = 4;
    let mut run = Supervisor::run(&broker)
        .args(&["--socket", &spec, "--ready-grace", "0", "--drain-timeout", "3s"])
        .args(&["--max-generations", &cap.to_string()])
        .command(&["python3", daemon.to_str().unwrap(), "--conn-timeout", "3600"])
        .env("RUST_LOG", "info")
        .no_notify()
        .start();
    let pid = run.pid();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let monitor = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut most = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                most = most.max(children(pid));
                std::thread::sleep(Duration::from_millis(2));
            }
            most
        })
    };
    let mut held = Vec::new();
    let started = std::time::Instant::now();
    for n in 2..=reloads + 1 {
        // Half a request: the serving generation accepts it and waits for
        // the rest, so it cannot finish draining by itself.
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        conn.write_all(b"GET / HTTP/1.0\r\n").unwrap();
        held.push(conn);
        let out = run.supervisor(&["reload"]);
        let text = output_text(&out);
        assert!(out.status.success() && text.contains(&format!("generation {n} (pid")), "reload {n}: {text}");
    }
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let most = monitor.join().unwrap();
    assert!(most <= cap, "{most} generations alive at once, --max-generations {cap}");
    assert!(most >= 2, "the monitor saw no overlap at all ({most}): it measured nothing");

    // After the drain deadline, only the serving generation is left.
    wait_until(Duration::from_secs(3) + START_TIMEOUT, "the drain deadline to stop every old generation", || {
        children(pid) == 1
    });
    let status = run.status();
    assert!(
        status.contains(&format!("serving generation {} ", reloads + 1)) && status.contains("0 draining"),
        "{status}"
    );
    let text = run.log_text();
    assert!(text.contains(&format!("--max-generations is {cap}: stopping it hard (SIGKILL)")), "no WARN for the cap");
    assert!(text.contains("(--drain-timeout): stopping it hard (SIGKILL)"), "no WARN for the drain deadline");
    println!("{reloads} reloads in {took:.1?}, at most {most} generations alive");
    let status = run.stop();
    assert!(status.success(), "{status}");
}

/// Every child `run` starts has no signal blocked, though the supervisor
/// blocks the signals it reads from a signalfd: the generation and its
/// `--ready-probe` each record `/proc/self/status` SigBlk as they start.
#[test]
fn children_start_with_an_empty_signal_mask() {
    let broker = Broker::start("run_sigmask");
    let (spec, _fd) = bind_free_tcp(&mut broker.client());
    let daemon = listen_http();
    let marks = broker.dir.join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    // Each shell records its own mask with builtins only: a line read from
    // /proc/$$/status by a forked `grep` could catch the shell inside its
    // own vfork, with every signal blocked for that instant.
    let record = |file: &str| {
        format!(
            "while read -r l; do case \"$l\" in SigBlk:*) printf '%s\\n' \"$l\" > {}/{file};; esac; done < /proc/$$/status",
            marks.display()
        )
    };
    // The probe passes only once the generation has written its line, so
    // READY=1 means both files are there.
    let probe = format!("test -s {}/generation && {}", marks.display(), record("probe-$SOCKBROKER_GENERATION"));
    let generation = format!("{} && exec python3 {}", record("generation"), daemon.display());
    let run = start(&broker, &["--socket", &spec, "--ready-probe", &probe], &["sh", "-c", &generation]);
    for file in ["generation", "probe-1"] {
        let line = std::fs::read_to_string(marks.join(file)).unwrap();
        assert_eq!(line.trim(), "SigBlk:\t0000000000000000", "{file}");
    }
    drop(run);
}

/// `--ready-probe`: the old generation retires only once the probe passes
/// for the new one (run with its number and pid); a probe that keeps
/// failing fails the reload at the readiness timeout.
#[test]
fn ready_probe_gates_the_retirement() {
    let broker = Broker::start("run_probe");
    let (spec, _fd) = bind_free_tcp(&mut broker.client());
    let daemon = listen_http();
    let marks = broker.dir.join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    // Passes once a file names this generation, and only for a live pid.
    let probe = format!(
        "kill -0 $SOCKBROKER_GENERATION_PID && echo $SOCKBROKER_GENERATION_PID > {m}/probed-$SOCKBROKER_GENERATION \
         && test -e {m}/ok-$SOCKBROKER_GENERATION",
        m = marks.display()
    );
    std::fs::write(marks.join("ok-1"), "").unwrap();
    let run = start(
        &broker,
        &["--socket", &spec, "--ready-grace", "0", "--ready-timeout", "3s", "--ready-probe", &probe],
        &["python3", daemon.to_str().unwrap()],
    );
    let load = Load::start(tcp_addr(&spec), 2, Duration::from_secs(60));
    load.wait_requests(10);

    let out = run.supervisor(&["reload"]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("generation 2 (pid") && text.contains("did not pass --ready-probe within 3s"), "{text}");
    assert!(marks.join("probed-2").exists(), "the probe never ran for generation 2");
    assert!(run.status().contains("serving generation 1 "));

    std::fs::write(marks.join("ok-3"), "").unwrap();
    let out = run.supervisor(&["reload"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let probed: i32 = std::fs::read_to_string(marks.join("probed-3")).unwrap().trim().parse().unwrap();
    let status = run.status();
    assert!(status.contains(&format!("generation 3 pid {probed} serving")), "the probe got another pid: {status}");
    load.wait_requests(10);
    let report = load.finish();
    assert_eq!(report.failed, 0, "{:?}", report.errors);
}
