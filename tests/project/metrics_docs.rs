//! docs/metrics.md says what is true: its alert rules pass `promtool check
//! rules`, and its tables name exactly the families a real broker and a real
//! supervisor (after a reload) write.

use crate::common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::daemons::*;
use common::*;

fn doc() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap()
}

fn run(cmd: &mut Command) -> std::process::Output {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    assert!(wait_timeout(&mut child, Duration::from_secs(60)).is_some(), "{cmd:?} hangs");
    child.wait_with_output().unwrap()
}

#[test]
fn the_alert_rules_pass_promtool() {
    let doc = doc();
    let after = doc.split("## Example alert rules").nth(1).expect("an alert rules section");
    let rules = after.split("```yaml\n").nth(1).and_then(|b| b.split("```").next()).expect("a yaml block");
    let dir = test_dir("metrics-rules");
    let path = dir.join("rules.yml");
    std::fs::write(&path, rules).unwrap();
    let out = run(Command::new("promtool").args(["check", "rules"]).arg(&path));
    assert!(out.status.success(), "promtool check rules:\n{}\n{rules}", output_text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("SUCCESS: 7 rules found"), "{}", output_text(&out));
}

/// Every family name in the tables: a backquoted word starting `sockbroker_`
/// at the start of a table row.
fn documented(doc: &str) -> BTreeSet<String> {
    doc.lines()
        .filter(|l| l.starts_with("| `sockbroker_"))
        .flat_map(|l| {
            let first = l.split(" | ").next().unwrap_or("");
            first.split('`').filter(|w| w.starts_with("sockbroker_")).map(String::from).collect::<Vec<_>>()
        })
        .collect()
}

fn families(text: &str) -> BTreeSet<String> {
    text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next().map(String::from)).collect()
}

#[test]
fn the_tables_name_every_family_written() {
    let broker = Broker::start("metrics-docs");
    let (spec, _fd) = bind_free_tcp(&mut broker.client());
    let out = broker.cli(&["metrics"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let mut written = families(&String::from_utf8_lossy(&out.stdout));

    let notify = Notify::bind(&broker.dir, "run-notify.sock");
    let daemon = listen_http();
    let mut child = Command::new(BIN)
        .args(["run", "--socket", &spec, "--ready-grace", "0", "--", "python3", daemon.to_str().unwrap()])
        .env("SOCKBROKER_SOCKET", &broker.control)
        .env("NOTIFY_SOCKET", &notify.path)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    notify.wait_line(&mut child, "READY=1", START_TIMEOUT);
    let pid = child.id().to_string();
    let reload = run(Command::new(BIN).args(["supervisor", "reload", "--pid", &pid]));
    let metrics = run(Command::new(BIN).args(["supervisor", "metrics", "--pid", &pid]));
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    let _ = wait_timeout(&mut child, Duration::from_secs(20));
    assert!(reload.status.success(), "{}", output_text(&reload));
    assert!(metrics.status.success(), "{}", output_text(&metrics));
    written.extend(families(&String::from_utf8_lossy(&metrics.stdout)));

    let documented = documented(&doc());
    let undocumented: Vec<_> = written.difference(&documented).collect();
    let unwritten: Vec<_> = documented.difference(&written).collect();
    assert!(undocumented.is_empty(), "written but not in docs/metrics.md: {undocumented:?}");
    assert!(unwritten.is_empty(), "in docs/metrics.md but never written: {unwritten:?}");
}
