//! docs/metrics.md says what is true: its alert rules pass `promtool check
//! rules`, and its tables name exactly the families a real broker and a real
//! supervisor (after a reload) write.

use crate::common;

use std::collections::BTreeSet;
use std::process::Command;

use common::daemons::*;
use common::supervisor::Supervisor;
use common::*;

fn doc() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap()
}

#[test]
fn the_alert_rules_pass_promtool() {
    let doc = doc();
    let after = doc.split("## Example alert rules").nth(1).expect("an alert rules section");
    let rules = after.split("```yaml\n").nth(1).and_then(|b| b.split("```").next()).expect("a yaml block");
    let dir = test_dir("metrics-rules");
    let path = dir.join("rules.yml");
    std::fs::write(&path, rules).unwrap();
    let out = Command::new("promtool").args(["check", "rules"]).arg(&path).output_within(COMMAND_TIMEOUT).unwrap();
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

    let daemon = listen_http();
    let run = Supervisor::run(&broker)
        .args(&["--socket", &spec, "--ready-grace", "0"])
        .command(&["python3", daemon.to_str().unwrap()])
        .start();
    let reload = run.supervisor(&["reload"]);
    let metrics = run.supervisor(&["metrics"]);
    drop(run);
    assert!(reload.status.success(), "{}", output_text(&reload));
    assert!(metrics.status.success(), "{}", output_text(&metrics));
    written.extend(families(&String::from_utf8_lossy(&metrics.stdout)));

    let documented = documented(&doc());
    let undocumented: Vec<_> = written.difference(&documented).collect();
    let unwritten: Vec<_> = documented.difference(&written).collect();
    assert!(undocumented.is_empty(), "written but not in docs/metrics.md: {undocumented:?}");
    assert!(unwritten.is_empty(), "in docs/metrics.md but never written: {unwritten:?}");
}
