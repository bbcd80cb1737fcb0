//! `--idle-start`: a reload's generation starts at idle CPU priority
//! (SCHED_IDLE) next to the serving one and is raised to normal when it says
//! it is ready, or when its time is up; the first generation starts at
//! normal priority; a supervisor that could not raise it back (no
//! CAP_SYS_NICE, RLIMIT_NICE 0) starts every generation at normal priority
//! and says so. Priorities are read from `/proc/PID/task/*/stat`.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

use common::daemons::*;
use common::metrics::sample;
use common::supervisor::{children, idle_threads, Supervisor};
use common::*;

/// A generation that starts only once `DIR/go-N` exists (N: its number),
/// then serves HTTP on fd 3 and says READY=1.
fn gated_daemon(dir: &Path) -> String {
    format!(
        "while ! test -e {m}/go-$SOCKBROKER_GENERATION; do sleep 0.01; done; exec python3 {d}",
        m = dir.display(),
        d = listen_http().display()
    )
}

/// The pid of generation `number` once `supervisor status --json` names it
/// (bounded).
#[track_caller]
fn generation_pid(run: &Supervisor, number: u64) -> i32 {
    let mut pid = None;
    wait_until(Duration::from_secs(20), &format!("generation {number} started"), || {
        let out = run.supervisor(&["status", "--json"]);
        let Ok(status) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else { return false };
        pid = status["generations"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|g| g["number"] == number)
            .and_then(|g| g["pid"].as_i64());
        pid.is_some()
    });
    pid.unwrap() as i32
}

/// `run` of the gated daemon (generation 1 let through) on a fresh port,
/// under `wrapper` with `args`, serving generation 1. Fields drop in order:
/// the supervisor before its broker.
struct Gated {
    run: Supervisor,
    spec: String,
    marks: PathBuf,
    _held: std::os::fd::OwnedFd,
    _broker: Broker,
}

impl Gated {
    fn start(name: &str, wrapper: &[&str], args: &[&str]) -> Gated {
        let broker = Broker::start(name);
        let (spec, held) = bind_free_tcp(&mut broker.client());
        let marks = broker.dir.join("marks");
        std::fs::create_dir_all(&marks).unwrap();
        std::fs::write(marks.join("go-1"), "").unwrap();
        let run = Supervisor::run(&broker)
            .wrapped(wrapper)
            .args(&["--socket", &spec, "--ready-grace", "0"])
            .args(args)
            .command(&["sh", "-c", &gated_daemon(&marks)])
            .start();
        Gated { run, spec, marks, _held: held, _broker: broker }
    }
}

/// Lets generation `number` through the gate in `marks`.
fn open(marks: &Path, number: u64) {
    std::fs::write(marks.join(format!("go-{number}")), "").unwrap();
}

/// Generation 1 starts at normal priority; generation 2 starts idle (its
/// shell and the `sleep` it runs), serves at normal priority once READY=1
/// came, with no failed connection across the reload. Run as the shipped
/// `sockbroker-run@` unit runs it: root with CAP_SYS_NICE alone.
#[test]
fn a_reload_starts_idle_and_serves_at_normal_priority() {
    // 10 s: time enough to see it idle, and a bound on how long a machine
    // kept busy by other tests can starve it once it is let go.
    let g = Gated::start(
        "idle_start",
        &["setpriv", "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all,+sys_nice"],
        &["--idle-start", "10s"],
    );
    let mut run = g.run;
    let first = generation_pid(&run, 1);
    assert_eq!(idle_threads(first).0, 0, "generation 1 starts at normal priority");
    let metrics = run.metrics();
    assert_eq!(sample(&metrics, "sockbroker_supervisor_idle_start_seconds", &[]), Some(10.0), "{metrics}");
    let load = Load::start(tcp_addr(&g.spec), 2, Duration::from_secs(60));
    load.wait_requests(10);

    run.signal(Signal::SIGHUP);
    let second = generation_pid(&run, 2);
    assert_eq!(idle_threads(second), (1, 1), "generation 2's shell starts idle");
    wait_until(Duration::from_secs(10), "the gate's sleep", || !children(second).is_empty());
    for child in children(second) {
        assert_eq!(idle_threads(child).1, idle_threads(child).0, "its children inherit idle priority");
    }
    assert_eq!(idle_threads(first).0, 0, "the serving generation keeps its priority");

    open(&g.marks, 2);
    let ready = run.next_ready();
    assert!(ready.contains("serving generation 2"), "{ready}");
    let (idle, total) = idle_threads(second);
    assert!(total >= 1 && idle == 0, "generation 2 serves at normal priority: {idle} of {total} threads idle");
    load.wait_requests(10);
    let report = load.finish();
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert!(run.log_text().contains("raised to normal CPU priority"), "{}", run.log_text());
}

/// A generation still starting when `--idle-start` is up is raised then,
/// and says so in the log; the reload still succeeds.
#[test]
fn a_slow_start_is_raised_when_its_idle_time_is_up() {
    let g = Gated::start("idle_cap", &[], &["--idle-start", "200ms"]);
    let mut run = g.run;
    run.signal(Signal::SIGHUP);
    let second = generation_pid(&run, 2);
    wait_until(Duration::from_secs(20), "the --idle-start log line", || {
        run.log_text().contains("generation 2 (pid") && run.log_text().contains("still starting after 200ms")
    });
    assert_eq!(idle_threads(second).0, 0, "raised while it still starts");
    open(&g.marks, 2);
    assert!(run.next_ready().contains("serving generation 2"));
}

/// Where raising is refused (root without capabilities, RLIMIT_NICE 0),
/// `--idle-start` is off, said at start, and a reload's generation starts
/// at normal priority.
#[test]
fn without_the_right_to_raise_it_starts_at_normal_priority() {
    let g = Gated::start("idle_off", &["setpriv", "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all"], &[]);
    let mut run = g.run;
    assert!(run.log_text().contains("--idle-start is off"), "{}", run.log_text());
    let metrics = run.metrics();
    assert_eq!(sample(&metrics, "sockbroker_supervisor_idle_start_seconds", &[]), Some(0.0), "{metrics}");
    run.signal(Signal::SIGHUP);
    let second = generation_pid(&run, 2);
    assert_eq!(idle_threads(second).0, 0, "generation 2 starts at normal priority");
    open(&g.marks, 2);
    assert!(run.next_ready().contains("serving generation 2"));
}

/// `haproxy run`: a reload's HAProxy starts idle (a wrapper records the
/// policy it was started with) and, once READY=1 came, no thread of the
/// new master or its worker is idle.
#[test]
fn haproxy_reload_raises_master_and_worker() {
    let (broker, _addr, template) = crate::haproxy::web_setup("idle_haproxy");
    let marks = broker.dir.join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let wrapper = broker.dir.join("haproxy-wrapper");
    // Field 41 of /proc/$$/stat (the 39th word after the last ')'), read
    // by the shell itself before it becomes HAProxy.
    let script = format!(
        "#!/bin/sh\nread -r stat < /proc/$$/stat\nfield() {{ shift 38; echo \"$1\"; }}\n\
         field ${{stat##*)}} > {m}/policy-$SOCKBROKER_GENERATION\nexec /usr/sbin/haproxy \"$@\"\n",
        m = marks.display()
    );
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut run = Supervisor::haproxy_run(&broker)
        .args(&["--ready-timeout", "20s", "--ready-grace", "0", "--idle-start", "10s"])
        .command(&[wrapper.to_str().unwrap(), "-f", template.to_str().unwrap()])
        .start();
    let status = run.reload_status();
    assert!(status.contains("serving: generation 2"), "{status}");
    let policy = |n: u32| std::fs::read_to_string(marks.join(format!("policy-{n}"))).unwrap().trim().to_string();
    assert_eq!(policy(1), "0", "generation 1 starts at normal priority");
    assert_eq!(policy(2), "5", "generation 2 starts idle (SCHED_IDLE)");
    let master = generation_pid(&run, 2);
    let mut pids = vec![master];
    pids.extend(children(master));
    assert!(pids.len() >= 2, "master and worker: {pids:?}");
    for pid in pids {
        let (idle, total) = idle_threads(pid);
        assert!(total >= 1 && idle == 0, "haproxy pid {pid}: {idle} of {total} threads idle after READY=1");
    }
}
