//! Access control through the real binary: the client runs as `nobody`
//! (setpriv drops uid, gid and every supplementary group before exec), the
//! broker judges it by SO_PEERCRED and the user database.

use crate::common;

use std::os::fd::AsFd;
use std::time::Duration;

use common::*;

/// The control socket must be reachable by nobody for the rules to matter.
const OPEN_CONTROL: &str = "[control]\nmode = \"0666\"\n";

fn bind_as_nobody(broker: &Broker, what: &[&str]) -> std::process::Output {
    let mut args = vec!["bind"];
    args.extend_from_slice(what);
    broker.cli_as_nobody(&args)
}

#[track_caller]
fn assert_refused(out: &std::process::Output, message: &str) {
    assert!(!out.status.success(), "{}", output_text(out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(message), "expected {message:?}\n{}", output_text(out));
    assert!(err.contains("code 10003"), "{}", output_text(out));
}

#[track_caller]
fn assert_allowed(out: &std::process::Output) {
    assert!(out.status.success(), "{}", output_text(out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("received socket inode"), "{}", output_text(out));
}

#[test]
fn without_rules_only_root_and_the_broker_uid_are_served() {
    let broker = Broker::builder("acldefault").config(OPEN_CONTROL).start();
    let port = free_port();
    let spec = format!("tcp://127.0.0.1:{port}");
    let out = bind_as_nobody(&broker, &[&spec]);
    assert_refused(&out, &format!("uid 65534 (nobody) may not bind {spec}"));
    // Each fact once: the address is not repeated as a prefix.
    assert_eq!(String::from_utf8_lossy(&out.stderr).matches(spec.as_str()).count(), 1, "{}", output_text(&out));
    // Refused before anything was opened: the broker holds nothing, the port
    // is free. (Bounded wait: on a loaded machine the broker may not have
    // seen the refused client hang up yet, nor closed its start-up notify
    // socket.)
    let sockets = || broker.open_fds().iter().filter(|(_, t)| t.starts_with("socket:")).count();
    wait_until(Duration::from_secs(20), "only the control socket left", || sockets() == 1);
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the refused request created no socket");
    // The refusal names the file whose rules refused.
    let rules_from = format!("no [[allow]] rule in {} grants it", broker.config_path().display());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&rules_from), "{}", output_text(&out));
    assert!(
        broker.log_text().contains(&format!("refused: uid 65534 (nobody) may not bind {spec}")),
        "{}",
        broker.log_text()
    );
    // Root is served.
    assert_allowed(&broker.cli(&["bind", &format!("unix:@sbt-acldefault-{}", std::process::id())]));
}

#[test]
fn with_no_configuration_at_all_strangers_are_refused() {
    // The built-in default (no file): control socket 0660 root:root, so the
    // stranger keeps gid root to reach it, and no rule gives it anything.
    assert!(!std::path::Path::new(sockbroker::config::SYSTEM_CONFIG).exists(), "test needs no system config");
    let broker = Broker::start("aclnofile");
    let spec = format!("unix:@sbt-nofile-{}", std::process::id());
    let out = run_cli(&broker.control, Some(&["--reuid=nobody", "--regid=root", "--clear-groups"]), &["bind", &spec]);
    assert_refused(&out, &format!("uid 65534 (nobody) may not bind {spec}"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no [[allow]] rule in (built-in default) grants it"),
        "{}",
        output_text(&out)
    );
}

fn rules_config(low: u16, high: u16, who: &str, tag: &str) -> String {
    let pid = format!("{tag}-{}", std::process::id());
    format!(
        r#"{OPEN_CONTROL}
[[socket]]
name = "web"
listen = "unix:@sbt-web-{pid}"

[[socket]]
name = "db"
listen = "unix:@sbt-db-{pid}"

[[allow]]
{who}
sockets = ["web"]
on_demand = ["tcp://127.0.0.1:{low}-{high}", "unix:@sbt-app-{pid}-*"]
"#
    )
}

fn check_rules(name: &str, who: &str) {
    let port = free_port();
    let (low, high) = (port.saturating_sub(5).max(1024), port);
    let broker = Broker::builder(name).config(rules_config(low, high, who, name)).start();
    let pid = format!("{name}-{}", std::process::id());
    assert_allowed(&bind_as_nobody(&broker, &["--name", "web"]));
    // The declared socket by its address counts as the named socket.
    assert_allowed(&bind_as_nobody(&broker, &[&format!("unix:@sbt-web-{pid}")]));
    assert_refused(
        &bind_as_nobody(&broker, &["--name", "db"]),
        &format!("uid 65534 (nobody) may not bind unix:@sbt-db-{pid} (socket 'db')"),
    );
    assert_allowed(&bind_as_nobody(&broker, &[&format!("unix:@sbt-app-{pid}-1")]));
    assert_refused(
        &bind_as_nobody(&broker, &[&format!("unix:@sbt-other-{pid}")]),
        &format!("may not bind unix:@sbt-other-{pid}"),
    );
    let outside = format!("tcp://127.0.0.1:{}", high as u32 + 1);
    assert_refused(&bind_as_nobody(&broker, &[&outside]), &format!("may not bind {outside}"));
    // Inside the range: every port is granted (a port someone else took
    // meanwhile fails with "in use", code 10000, never with a refusal), and
    // at least one is bound, or the check has checked nothing.
    let mut taken = Vec::new();
    for port in low..=high {
        let inside = format!("tcp://127.0.0.1:{port}");
        let out = bind_as_nobody(&broker, &[&inside]);
        if String::from_utf8_lossy(&out.stderr).contains("code 10000") {
            taken.push(inside);
        } else {
            assert_allowed(&out);
        }
    }
    assert!(
        taken.len() < usize::from(high - low) + 1,
        "every port of the granted range was in use, so the grant was never tried: {taken:?}"
    );
}

#[test]
fn a_group_rule_grants_names_and_address_ranges() {
    check_rules("aclgroup", "group = \"nogroup\"");
}

#[test]
fn a_user_rule_grants_names_and_address_ranges() {
    check_rules("acluser", "user = \"nobody\"");
}

#[test]
fn a_uid_rule_grants_names_and_address_ranges() {
    check_rules("acluid", "uid = 65534");
}

#[test]
fn a_gid_rule_grants_names_and_address_ranges() {
    check_rules("aclgid", "gid = 65534");
}

#[test]
fn changed_rules_apply_at_once_on_reload() {
    let pid = std::process::id();
    let spec = format!("unix:@sbt-aclreload-{pid}");
    let broker = Broker::builder("aclreload").config(OPEN_CONTROL).start();
    assert_refused(&bind_as_nobody(&broker, &[&spec]), &format!("uid 65534 (nobody) may not bind {spec}"));

    broker.write_config(&format!("{OPEN_CONTROL}\n[[allow]]\nuser = \"nobody\"\non_demand = [\"{spec}\"]\n"));
    assert!(broker.cli(&["reload"]).status.success());
    assert_allowed(&bind_as_nobody(&broker, &[&spec]));

    // Taken away again: the socket exists, but nobody may no longer have it.
    broker.drain_notify();
    broker.write_config(OPEN_CONTROL);
    broker.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(broker.wait_notify("STATUS=reload").starts_with("STATUS=reloaded"));
    assert_refused(&bind_as_nobody(&broker, &[&spec]), &format!("uid 65534 (nobody) may not bind {spec}"));
}

#[test]
fn group_membership_comes_from_the_user_database() {
    // The client runs as nobody with gid root: the kernel reports gid 0, and
    // only the group database says nobody belongs to nogroup.
    let pid = std::process::id();
    let config = format!("{OPEN_CONTROL}\n[[allow]]\ngroup = \"nogroup\"\non_demand = [\"unix:@sbt-db-{pid}-*\"]\n");
    let broker = Broker::builder("acldb").config(config).start();
    let out = run_cli(
        &broker.control,
        Some(&["--reuid=nobody", "--regid=root", "--clear-groups"]),
        &["bind", &format!("unix:@sbt-db-{pid}-1")],
    );
    assert_allowed(&out);
    assert!(broker.log_text().contains("uid=65534 gid=0 bind"), "{}", broker.log_text());
}

#[test]
fn one_line_opens_the_broker_to_everyone() {
    // The documented line; a top-level key, so it goes before any [table].
    let config = format!("allow = [{{ anyone = true, sockets = [\"*\"], on_demand = [\"*\"] }}]\n{OPEN_CONTROL}");
    let broker = Broker::builder("aclopen").config(config).start();
    assert_allowed(&bind_as_nobody(&broker, &[&format!("unix:@sbt-open-{}", std::process::id())]));
}

#[test]
fn release_and_reload_are_judged_too() {
    let pid = std::process::id();
    let config = format!("{OPEN_CONTROL}\n[[allow]]\nuser = \"nobody\"\non_demand = [\"unix:@sbt-rel-{pid}-mine\"]\n");
    let broker = Broker::builder("aclrel").config(&config).start();
    let mut root = broker.client();
    let theirs: sockbroker::spec::SocketSpec = format!("unix:@sbt-rel-{pid}-theirs").parse().unwrap();
    let mine: sockbroker::spec::SocketSpec = format!("unix:@sbt-rel-{pid}-mine").parse().unwrap();
    let theirs_fd = root.bind(&theirs).unwrap();
    assert_allowed(&bind_as_nobody(&broker, &[&mine.to_string()]));

    let out = broker.cli_as_nobody(&["release", &theirs.to_string()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("uid 65534 (nobody) may not release {theirs}")));
    assert_eq!(root.bind(&theirs).map(|fd| inode(fd.as_fd())).unwrap(), inode(theirs_fd.as_fd()), "still held");

    // Its creator may release it.
    let out = broker.cli_as_nobody(&["release", &mine.to_string()]);
    assert!(out.status.success(), "{}", output_text(&out));

    // A rule that grants a socket does not let a peer close it under the
    // peer that made it: only its creator (and root) may release it.
    let ours: sockbroker::spec::SocketSpec = format!("unix:@sbt-rel-{pid}-mine2").parse().unwrap();
    let config = format!("{config}\n[[allow]]\nuser = \"nobody\"\non_demand = [\"{ours}\"]\n");
    broker.write_config(&config);
    assert!(broker.cli(&["reload"]).status.success());
    let ours_fd = root.bind(&ours).unwrap();
    let out = broker.cli_as_nobody(&["release", &ours.to_string()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("created by uid 0") && err.contains("code 10003"), "{}", output_text(&out));
    assert_eq!(root.bind(&ours).map(|fd| inode(fd.as_fd())).unwrap(), inode(ours_fd.as_fd()), "still held");

    let out = broker.cli_as_nobody(&["reload"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("uid 65534 (nobody) may not use method 'reload'"),
        "{}",
        output_text(&out)
    );
    assert!(broker.cli(&["reload"]).status.success());
}

/// Each fact once: a refused bind names its address once in the client's
/// error and once in the broker's log line for it, whether the rules refused
/// it or the kernel did.
#[test]
fn a_refused_bind_names_its_address_once() {
    let broker = Broker::builder("aclonce")
        .config(format!("{OPEN_CONTROL}[[allow]]\nuser = \"nobody\"\non_demand = [\"unix:@sbt-aclonce-*\"]\n"))
        .start();
    let once = |text: &str, spec: &str, what: &str| {
        assert_eq!(text.matches(spec).count(), 1, "{what}: {spec} should appear once in:\n{text}");
    };
    let log_line = |needle: &str| {
        let log = broker.log_text();
        log.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no {needle:?} line in:\n{log}")).to_string()
    };

    // Refused by the rules.
    let spec = format!("tcp://127.0.0.1:{}", free_port());
    let out = bind_as_nobody(&broker, &[&spec]);
    assert_refused(&out, &format!("uid 65534 (nobody) may not bind {spec}"));
    once(&String::from_utf8_lossy(&out.stderr), &spec, "client error");
    once(&log_line(&format!("may not bind {spec}")), &spec, "broker log");

    // Refused by the kernel: the address is taken by another process.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let spec = format!("tcp://{}", taken.local_addr().unwrap());
    let out = broker.cli(&["bind", &spec]);
    assert!(!out.status.success(), "{}", output_text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Address already in use") && err.contains("code 10000"), "{}", output_text(&out));
    once(&err, &spec, "client error");
    once(&log_line(&format!("bind {spec}: could not bind")), &spec, "broker log");
}
