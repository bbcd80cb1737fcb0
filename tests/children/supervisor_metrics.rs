//! A supervisor's metrics (`sockbroker supervisor metrics --pid PID`,
//! `--metrics-file`): generations, reloads by outcome, and the deepest
//! accept queue seen during each reload, in the log, STATUS= and the
//! metrics. The queue is made to fill for real: the serving generation is
//! stopped (SIGSTOP) and connections wait unaccepted until the new one
//! takes them.

use crate::common;

use std::net::TcpStream;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use common::daemons::*;
use common::metrics::{promtool_check, sample};
use common::supervisor::Supervisor;
use common::*;

#[test]
fn a_reload_reports_the_deepest_accept_queue_it_saw() {
    let broker = Broker::start("sup-metrics");
    let (spec, _fd) = bind_free_tcp(&mut broker.client());
    let addr = tcp_addr(&spec);
    let file = broker.dir.join("run-web.prom");
    let daemon = listen_http();
    let mut run = Supervisor::run(&broker)
        .args(&["--socket", &format!("web={spec}"), "--ready-grace", "200ms"])
        .args(&["--metrics-file", file.to_str().unwrap()])
        .command(&["python3", daemon.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .start();
    let who = "supervisor=\"run-web\"";

    let text = run.metrics();
    promtool_check(&text);
    assert_eq!(sample(&text, "sockbroker_supervisor_serving_generation", &[who]), Some(1.0), "{text}");
    assert_eq!(sample(&text, "sockbroker_supervisor_reloads_total", &[who, "outcome=\"ok\""]), Some(0.0), "{text}");
    assert_eq!(sample(&text, "sockbroker_supervisor_generations", &[who, "state=\"serving\""]), Some(1.0), "{text}");
    let queue = format!("address=\"{spec}\"");
    assert_eq!(sample(&text, "sockbroker_supervisor_socket_accept_queue_length", &[who, &queue]), Some(0.0), "{text}");
    assert!(!text.contains("last_reload"), "no reload yet: {text}");
    let first = std::fs::read_to_string(&file).expect("--metrics-file written once generation 1 serves");
    assert!(first.contains("sockbroker_supervisor_serving_generation{supervisor=\"run-web\"} 1"), "{first}");

    // Generation 1 stops accepting; three connections wait in the queue.
    let old = http_get(addr).ok().and_then(|b| b.split("pid=").nth(1)?.split_whitespace().next()?.parse::<i32>().ok());
    let old = Pid::from_raw(old.expect("generation 1 answers with its pid"));
    kill(old, Signal::SIGSTOP).unwrap();
    let waiting: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
    wait_until(Duration::from_secs(10), "three connections queued", || {
        sample(&run.metrics(), "sockbroker_supervisor_socket_accept_queue_length", &[who, &queue]) == Some(3.0)
    });
    let out = run.supervisor(&["reload"]);
    let _ = kill(old, Signal::SIGCONT);
    assert!(out.status.success(), "{}", output_text(&out));
    drop(waiting);
    let status = run.next_ready();
    assert!(status.contains("accept queue max 3") || status.contains("accept queue max 4"), "STATUS=: {status}");

    let text = run.metrics();
    promtool_check(&text);
    assert_eq!(sample(&text, "sockbroker_supervisor_serving_generation", &[who]), Some(2.0), "{text}");
    assert_eq!(sample(&text, "sockbroker_supervisor_reloads_total", &[who, "outcome=\"ok\""]), Some(1.0), "{text}");
    assert_eq!(sample(&text, "sockbroker_supervisor_last_reload_success", &[who]), Some(1.0), "{text}");
    assert!(sample(&text, "sockbroker_supervisor_last_reload_accept_queue_max", &[who]) >= Some(3.0), "{text}");
    assert!(sample(&text, "sockbroker_supervisor_last_reload_duration_seconds", &[who]) > Some(0.0), "{text}");
    let wait = sample(&text, "sockbroker_supervisor_last_reload_ready_wait_seconds", &[who]).expect("a readiness wait");
    assert!(wait > 0.0, "{text}");
    let logged = run.log_text();
    assert!(logged.contains("reload 1 done after"), "{logged}");
    assert!(logged.contains("accept queue max during the reload: 3"), "{logged}");

    // A reload with nothing waiting: its own maximum, not the last one's.
    let out = run.supervisor(&["reload"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let text = run.metrics();
    assert_eq!(sample(&text, "sockbroker_supervisor_last_reload_accept_queue_max", &[who]), Some(0.0), "{text}");
    assert_eq!(sample(&text, "sockbroker_supervisor_reloads_total", &[who, "outcome=\"ok\""]), Some(2.0), "{text}");
    let written = std::fs::read_to_string(&file).unwrap();
    promtool_check(&written);
    assert!(
        written.contains("sockbroker_supervisor_reloads_total{supervisor=\"run-web\",outcome=\"ok\"} 2"),
        "{written}"
    );
}
