//! The five attacks of issue 10, each against the real binary, by a real
//! user made with `useradd`, with the broker run under the shipped unit's
//! capability set (`setpriv`, as `units/sockbroker.service` grants) and as
//! full root. Each test shows the property holds while the attack runs (a
//! legitimate peer is served; the broker's descriptors and memory stay
//! within a stated bound) and that everything is given back after it.
//!
//! The hostile peer is `tests/hostile/peer.py`, run with `setpriv --reuid`.
//! Latency here is checked with generous bounds (the machine is shared);
//! the figures are for `cargo bench --bench hostile`.

use crate::common;

use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// The attacker's account.
const ATTACKER: &str = "sbtatk";
/// A legitimate, unprivileged daemon's account.
const APP: &str = "sbtapp";
/// A legitimate bind must answer within this, attack or not (generous: the
/// machine is shared; the 100 ms p99 target is the bench's).
const ANSWER_WITHIN: Duration = Duration::from_secs(3);

/// How the broker runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Privilege {
    /// Root with only the capabilities of the shipped unit.
    Unit,
    /// Full root.
    Root,
}

/// Starts the broker with `toml` (plus an open control socket) as `how`,
/// with `RLIMIT_NOFILE` at `nofile` when given.
fn start(name: &str, toml: &str, how: Privilege, nofile: Option<u64>) -> Broker {
    let mut builder = Broker::builder(name).config(format!("[control]\nmode = \"0666\"\n{toml}"));
    if let Some(n) = nofile {
        builder = builder.nofile(n);
    }
    if how == Privilege::Unit {
        builder = builder.unit_capabilities();
    }
    let broker = builder.start();
    if how == Privilege::Unit {
        assert_eq!(cap_eff(broker.pid()), UNIT_CAP_MASK, "the broker runs with the unit's capabilities only");
    }
    broker
}

/// A hostile peer running as [`ATTACKER`], killed when dropped.
struct Attack {
    child: KillOnDrop,
    /// Connections it holds, as far as it can tell.
    holds: usize,
}

/// Starts `peer.py CONTROL MODE CONNS ARG` as `who` and waits for its
/// "ready" line.
fn attack(broker: &Broker, who: &str, mode: &str, conns: usize, arg: usize) -> Attack {
    let (child, line) = hostile_peer(&broker.control, who, mode, conns, arg);
    let holds = line.trim().strip_prefix("ready ").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{line:?}"));
    Attack { child, holds }
}

impl Attack {
    fn stop(mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }
}

/// One legitimate bind by name as root, in-process: it must answer, with
/// the descriptor, within [`ANSWER_WITHIN`].
#[track_caller]
fn legit_bind(broker: &Broker, name: &str) -> Duration {
    let start = Instant::now();
    let stream = connect(&broker.control);
    stream.set_read_timeout(Some(ANSWER_WITHIN * 2)).unwrap();
    send_raw(stream.as_fd(), &bind_request(1, json!({ "name": name })));
    let (reply, fds) = read_replies(&stream, 1);
    let took = start.elapsed();
    assert_eq!(reply[0]["result"], true, "{reply:?}");
    assert_eq!(fds.len(), 1);
    assert!(took < ANSWER_WITHIN, "a legitimate bind took {took:?}");
    took
}

/// One legitimate bind by name as [`APP`], through the CLI.
#[track_caller]
fn app_bind(broker: &Broker, name: &str) {
    let args = as_user(APP);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_cli(&broker.control, Some(&args), &["bind", "--name", name]);
    assert!(out.status.success(), "{}", output_text(&out));
}

fn fd_count(broker: &Broker) -> usize {
    broker.open_fds().len()
}

const WEB: &str = "[[socket]]\nname = \"web\"\nlisten = \"unix:@sbt-hostile-web-PID\"\n";

fn web(tag: &str) -> String {
    WEB.replace("PID", &format!("{tag}-{}", std::process::id()))
}

// ---------------------------------------------------------------------------
// 1. A symbolic link inside a granted UNIX prefix.

/// The kernel counts descriptors in flight (sent, not yet read) per *user*
/// across all processes, against the sender's RLIMIT_NOFILE: every broker
/// these tests start runs as root, so one test's unread replies count
/// against another broker's limit. The test that gives its broker only 512
/// descriptors runs alone; the others share.
static IN_FLIGHT: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn in_flight_shared() -> std::sync::RwLockReadGuard<'static, ()> {
    IN_FLIGHT.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn in_flight_alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    IN_FLIGHT.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn symlinked_folder_in_a_granted_prefix_is_refused() {
    let _shared = in_flight_shared();
    let (app_uid, app_gid) = system_user(APP);
    let dir = test_dir("hostile-link");
    let granted = dir.join("app");
    let secret = dir.join("secret");
    std::fs::create_dir(&granted).unwrap();
    std::fs::create_dir(&secret).unwrap();
    // The user's folder; the broker (root without CAP_DAC_OVERRIDE under the
    // unit) writes in it through its group.
    nix::unistd::chown(&granted, Some(app_uid.into()), Some(0.into())).unwrap();
    std::fs::set_permissions(&granted, std::os::unix::fs::PermissionsExt::from_mode(0o770)).unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    // A stopped service's stale socket in root's private folder.
    let stale = secret.join("x.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let stale_ino = std::fs::symlink_metadata(&stale).unwrap().ino_();

    let rule = format!("[[allow]]\nuser = \"{APP}\"\non_demand = [\"unix:{}/*\"]\n", granted.display());
    for how in [Privilege::Unit, Privilege::Root] {
        let broker = start("hostile-link", &rule, how, None);
        let app = as_user(APP);
        let app: Vec<&str> = app.iter().map(String::as_str).collect();
        // The user plants a link to root's folder inside its own.
        let link = granted.join("l");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let out = run_cli(&broker.control, Some(&app), &["bind", &format!("unix:{}/x.sock", link.display())]);
        assert!(!out.status.success(), "{}", output_text(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains("is a symbolic link"), "{how:?}: {}", output_text(&out));
        // A real folder the user made inside its own can be swapped later:
        // refused too.
        let sub = granted.join(format!("sub-{how:?}"));
        std::fs::create_dir(&sub).unwrap();
        nix::unistd::chown(&sub, Some(app_uid.into()), Some(app_gid.into())).unwrap();
        let out = run_cli(&broker.control, Some(&app), &["bind", &format!("unix:{}/y.sock", sub.display())]);
        assert!(!out.status.success(), "{}", output_text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&format!("can be changed by uid {app_uid}")),
            "{how:?}: {}",
            output_text(&out)
        );
        // Nothing was created or unlinked outside the granted folder.
        let names: Vec<_> = std::fs::read_dir(&secret).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.sock")]);
        assert_eq!(
            std::fs::symlink_metadata(&stale).unwrap().ino_(),
            stale_ino,
            "{how:?}: the stale socket was replaced"
        );
        assert_eq!(std::fs::read_dir(&sub).unwrap().count(), 0);

        // Directly in the granted folder: served, and the file is the
        // user's, 0660, so the user can connect to what it asked for.
        let path = granted.join(format!("ok-{how:?}.sock"));
        let out = run_cli(&broker.control, Some(&app), &["bind", &format!("unix:{}", path.display())]);
        assert!(out.status.success(), "{how:?}: {}", output_text(&out));
        let meta = std::fs::symlink_metadata(&path).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (app_uid, app_gid, 0o660), "{how:?}");
        let connect = Command::new("setpriv")
            .args(as_user(APP))
            .args([
                "/usr/bin/python3",
                "-c",
                "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])",
            ])
            .arg(&path)
            .output_within(COMMAND_TIMEOUT)
            .unwrap();
        assert!(
            connect.status.success(),
            "{how:?}: the user cannot connect to its own on-demand socket: {}",
            output_text(&connect)
        );

        // A stale socket the broker did not make, in the granted folder, is
        // not replaced for a wildcard rule.
        let foreign = granted.join(format!("foreign-{how:?}.sock"));
        drop(std::os::unix::net::UnixListener::bind(&foreign).unwrap());
        let foreign_ino = std::fs::symlink_metadata(&foreign).unwrap().ino();
        let out = run_cli(&broker.control, Some(&app), &["bind", &format!("unix:{}", foreign.display())]);
        assert!(!out.status.success(), "{}", output_text(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains("did not create"), "{}", output_text(&out));
        assert_eq!(std::fs::symlink_metadata(&foreign).unwrap().ino(), foreign_ino);
        assert!(broker.log_text().contains("is a symbolic link"), "{}", broker.log_text());
    }
}

trait InoExt {
    fn ino_(&self) -> u64;
}

impl InoExt for std::fs::Metadata {
    fn ino_(&self) -> u64 {
        std::os::unix::fs::MetadataExt::ino(self)
    }
}

// ---------------------------------------------------------------------------
// 2. Descriptors left unread.

#[test]
fn unread_descriptors_do_not_stop_hand_outs() {
    let _shared = in_flight_shared();
    system_user(ATTACKER);
    system_user(APP);
    for how in [Privilege::Unit, Privilege::Root] {
        let toml = format!(
            "{}[limits]\nunread_timeout = \"2s\"\n\
             [[allow]]\nuser = \"{ATTACKER}\"\nsockets = [\"web\"]\n\
             [[allow]]\nuser = \"{APP}\"\nsockets = [\"web\"]\n",
            web("unread")
        );
        // A low descriptor limit, so the kernel's in-flight limit (which is
        // RLIMIT_NOFILE) is within an attacker's reach in a test.
        let broker = start("hostile-unread", &toml, how, Some(4096));
        legit_bind(&broker, "web");
        let baseline = fd_count(&broker);
        // 20 connections x 1,000 descriptors, never read: 20,000 in flight
        // would be far over the kernel's limit of 4,096 for the broker's user.
        let a = attack(&broker, ATTACKER, "unread", 20, 1000);
        assert_eq!(a.holds, 20);
        for _ in 0..5 {
            legit_bind(&broker, "web");
            app_bind(&broker, "web");
        }
        // Bounded: 20 connections, and at most a quarter of the limit (plus
        // one batch) in duplicates waiting to be sent.
        let during = fd_count(&broker);
        assert!(during <= baseline + 20 + 1024 + 1000, "{how:?}: {during} descriptors (baseline {baseline})");
        // Past limits.unread_timeout the connections are shut down, still
        // counted until the peer reads or closes.
        wait_until(Duration::from_secs(30), "unread connections shut down", || {
            broker.log_text().contains("descriptors unread for")
        });
        legit_bind(&broker, "web");
        a.stop();
        wait_until(Duration::from_secs(30), "descriptors given back", || fd_count(&broker) <= baseline);
        legit_bind(&broker, "web");
        let log = broker.log_text();
        assert!(!log.contains("Too many references"), "{how:?}: a sendmsg failed with ETOOMANYREFS:\n{log}");
    }
}

// ---------------------------------------------------------------------------
// 3. Slowloris and idle floods.

#[test]
fn slowloris_and_idle_floods_leave_slots_for_others() {
    let _shared = in_flight_shared();
    system_user(ATTACKER);
    let (app_uid, _) = system_user(APP);
    let toml = format!(
        "{}[limits]\nrequest_timeout = \"2s\"\n\
         [[allow]]\nanyone = true\nsockets = [\"web\"]\n\
         [[allow]]\nuid = {app_uid}\nsockets = [\"web\"]\n",
        web("slow")
    );
    let broker = start("hostile-slow", &toml, Privilege::Unit, None);
    legit_bind(&broker, "web");
    let baseline = fd_count(&broker);
    let rss_before = rss_kib(broker.pid());
    // 4,200 connections of one uid: past limits.max_clients_per_uid (128)
    // they are refused at once.
    let slow = attack(&broker, ATTACKER, "slowloris", 2100, 0);
    let idle = attack(&broker, ATTACKER, "idle", 2100, 0);
    assert!(idle.holds + slow.holds > 128, "the flood connected");
    for _ in 0..5 {
        legit_bind(&broker, "web");
        app_bind(&broker, "web");
    }
    let during = fd_count(&broker);
    assert!(during <= baseline + 128 + 8, "{during} descriptors with a flood from one uid (baseline {baseline})");
    // Bytes that are not a complete request do not keep a slot: the
    // slowloris connections go at limits.request_timeout.
    wait_until(Duration::from_secs(30), "slowloris connections closed", || {
        broker.log_text().contains("request not complete after")
    });
    assert!(broker.log_text().contains("connection refused: too many connections from uid"));
    // The metrics count them under the limit that refused them.
    assert!(refused(&broker, "max_clients_per_uid") >= 1.0);
    assert_eq!(refused(&broker, "max_clients"), 0.0);
    let rss_during = rss_kib(broker.pid());
    assert!(rss_during < rss_before + 32 * 1024, "RSS {rss_before} KiB -> {rss_during} KiB");
    idle.stop();
    slow.stop();
    wait_until(Duration::from_secs(30), "slots given back", || fd_count(&broker) <= baseline);
    legit_bind(&broker, "web");
}

#[test]
fn a_full_table_still_serves_peers_a_rule_names() {
    let _shared = in_flight_shared();
    system_user(ATTACKER);
    let (app_uid, _) = system_user(APP);
    let toml = format!(
        "{}[limits]\nmax_clients = 64\nreserved_clients = 8\nmax_clients_per_uid = 1000\n\
         [[allow]]\nanyone = true\nsockets = [\"web\"]\n\
         [[allow]]\nuid = {app_uid}\nsockets = [\"web\"]\n",
        web("full")
    );
    let broker = start("hostile-full", &toml, Privilege::Unit, None);
    let a = attack(&broker, ATTACKER, "idle", 200, 0);
    wait_until(Duration::from_secs(20), "the table filled up", || broker.log_text().contains("are kept for root"));
    // The attacker got no more than the unreserved slots; the app and root
    // are still served.
    app_bind(&broker, "web");
    legit_bind(&broker, "web");
    let attacker_conns = fd_count(&broker);
    assert!(attacker_conns < 64 + 16, "{attacker_conns} descriptors");
    assert!(refused(&broker, "max_clients") >= 1.0);
    assert_eq!(refused(&broker, "max_clients_per_uid"), 0.0);
    a.stop();
}

/// `sockbroker_connections_refused_total{limit="LIMIT"}`, from `sockbroker metrics`.
fn refused(broker: &Broker, limit: &str) -> f64 {
    let out = broker.cli(&["metrics"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let metrics = String::from_utf8_lossy(&out.stdout);
    let label = format!("limit=\"{limit}\"");
    common::metrics::sample(&metrics, "sockbroker_connections_refused_total", &[&label])
        .unwrap_or_else(|| panic!("no {label} series in:\n{metrics}"))
}

// ---------------------------------------------------------------------------
// 4. `list` amplification, and `list` with 10,000 sockets.

/// Makes the broker hold `n` abstract UNIX sockets (bind_many, 100 a time).
fn hold_many(broker: &Broker, tag: &str, n: usize) {
    let pid = std::process::id();
    let mut client = broker.client();
    for chunk in 0..n.div_ceil(100) {
        let specs: Vec<sockbroker::spec::SocketSpec> = (chunk * 100..((chunk + 1) * 100).min(n))
            .map(|i| format!("unix:@sbt-{tag}-{pid}-{i}").parse().unwrap())
            .collect();
        let got = client.bind_many(&specs).unwrap();
        assert!(got.iter().all(|r| r.is_ok()));
    }
}

/// `metrics` names every held socket (about 4 MB with 10,000), so a peer a
/// rule grants `introspect` gets one answer per `limits.metrics_interval`;
/// root is not limited.
#[test]
fn metrics_for_an_introspect_rule_is_rate_limited_per_uid() {
    let _shared = in_flight_shared();
    system_user(ATTACKER);
    let toml = format!(
        "[limits]\nmetrics_interval = \"1h\"\n{}[[allow]]\nuser = \"{ATTACKER}\"\nsockets = [\"web\"]\nintrospect = true\n",
        web("metrics")
    );
    let broker = start("hostile-metrics", &toml, Privilege::Unit, None);
    let attacker = as_user(ATTACKER);
    let attacker: Vec<&str> = attacker.iter().map(String::as_str).collect();
    let out = run_cli(&broker.control, Some(&attacker), &["metrics"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("sockbroker_sockets_held"), "{}", output_text(&out));
    let out = run_cli(&broker.control, Some(&attacker), &["metrics"]);
    assert!(!out.status.success(), "a second metrics within the interval is refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("limits.metrics_interval"), "{err}");
    for _ in 0..2 {
        let out = run_cli(&broker.control, None, &["metrics"]);
        assert!(out.status.success(), "root is not limited: {}", output_text(&out));
    }
}

#[test]
fn list_floods_are_bounded_and_list_needs_a_rule() {
    let _shared = in_flight_shared();
    system_user(ATTACKER);
    let (app_uid, _) = system_user(APP);
    let toml = format!(
        "{}[[allow]]\nuser = \"{ATTACKER}\"\nsockets = [\"web\"]\nintrospect = true\n\
         [[allow]]\nuid = {app_uid}\nsockets = [\"web\"]\n",
        web("list")
    );
    let broker = start("hostile-list", &toml, Privilege::Unit, None);
    hold_many(&broker, "list", 1000);
    legit_bind(&broker, "web");
    let baseline = fd_count(&broker);
    let rss_before = rss_kib(broker.pid());

    // Without a rule, list and status are refused; with one, other users'
    // pids and uids are hidden.
    let app = as_user(APP);
    let app: Vec<&str> = app.iter().map(String::as_str).collect();
    let out = run_cli(&broker.control, Some(&app), &["list"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("may not use method 'list'"), "{}", output_text(&out));
    let out = run_cli(&broker.control, Some(&app), &["status"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("may not use method 'status'"), "{}", output_text(&out));
    let attacker = as_user(ATTACKER);
    let attacker: Vec<&str> = attacker.iter().map(String::as_str).collect();
    let out = run_cli(&broker.control, Some(&attacker), &["list", "--json"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen.as_array().unwrap().len(), 1001);
    assert!(seen.as_array().unwrap().iter().all(|s| s["last_pid"].is_null() && s["last_uid"].is_null()));

    // 128 connections (the per-uid cap) pipelining 40 lists each, never
    // reading.
    let a = attack(&broker, ATTACKER, "list", 128, 40);
    for _ in 0..5 {
        legit_bind(&broker, "web");
        app_bind(&broker, "web");
    }
    let rss_during = rss_kib(broker.pid());
    // limits.max_queued_bytes (8 MiB) for all untrusted peers, plus a page
    // per connection over it and the allocator's slack.
    assert!(rss_during < rss_before + 32 * 1024, "RSS {rss_before} KiB -> {rss_during} KiB under a list flood");
    a.stop();
    wait_until(Duration::from_secs(30), "descriptors given back", || fd_count(&broker) <= baseline);
    legit_bind(&broker, "web");
}

#[test]
fn list_pages_through_ten_thousand_sockets() {
    let _shared = in_flight_shared();
    let broker = start("hostile-10k", "", Privilege::Root, None);
    hold_many(&broker, "10k", 10_000);
    let rss_before = rss_kib(broker.pid());
    let out = run_cli(&broker.control, None, &["list", "--json"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 10_000);
    let out = run_cli(&broker.control, None, &["list"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 10_001);
    // One page at a time: the broker never builds the whole listing.
    let rss_after = rss_kib(broker.pid());
    assert!(rss_after < rss_before + 16 * 1024, "RSS {rss_before} KiB -> {rss_after} KiB");
    // A request without params (as before paging) gets the first page and
    // a marker saying there is more.
    let (reply, _) = rpc(&broker.control, br#"{"jsonrpc":"2.0","method":"list","id":1}"#);
    let items = reply["result"].as_array().unwrap();
    assert_eq!(items.len(), 257, "256 entries (limits.list_page_max) and the marker");
    assert_eq!(items[256], json!({"more": true, "next": 256, "total": 10_000}));
    let (reply, _) =
        rpc(&broker.control, br#"{"jsonrpc":"2.0","method":"list","params":{"offset":9990,"limit":50},"id":2}"#);
    assert_eq!(reply["result"]["entries"].as_array().unwrap().len(), 10);
    assert_eq!(reply["result"]["next"], serde_json::Value::Null);
    assert_eq!(reply["result"]["total"], 10_000);
}

// ---------------------------------------------------------------------------
// 5. `release` of another user's socket, and log floods.

#[test]
fn release_is_for_the_creator_and_refusals_do_not_flood_the_log() {
    let _shared = in_flight_shared();
    system_user(ATTACKER);
    system_user(APP);
    let pid = std::process::id();
    let toml = format!(
        "[[allow]]\nanyone = true\nsockets = [\"*\"]\non_demand = [\"unix:@sbt-rel2-{pid}-*\"]\n{}\
         [limits]\nlog_burst = 3\nlog_per_minute = 6\n",
        web("rel")
    );
    let broker = start("hostile-release", &toml, Privilege::Unit, None);
    let spec = format!("unix:@sbt-rel2-{pid}-app");
    let app = as_user(APP);
    let app: Vec<&str> = app.iter().map(String::as_str).collect();
    let attacker = as_user(ATTACKER);
    let attacker: Vec<&str> = attacker.iter().map(String::as_str).collect();
    let out = run_cli(&broker.control, Some(&app), &["bind", &spec]);
    assert!(out.status.success(), "{}", output_text(&out));
    let out = run_cli(&broker.control, Some(&attacker), &["release", &spec]);
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("may not release"), "{}", output_text(&out));
    let out = run_cli(&broker.control, Some(&app), &["release", &spec]);
    assert!(out.status.success(), "{}", output_text(&out));

    // A refused 1,000-item bind_many in a loop for 3 seconds (and at least
    // 10 times: the machine may be slow), with a log budget of 3 lines at
    // once, then 6 a minute.
    let log_before = std::fs::metadata(&broker.log).unwrap().len();
    let a = attack(&broker, ATTACKER, "refused", 1, 1000);
    let start = Instant::now();
    let refused = |log: &str| log.matches("may not bind tcp://127.0.0.1:1").count();
    while start.elapsed() < Duration::from_secs(3) || refused(&broker.log_text()) < 10 * 1000 {
        legit_bind(&broker, "web");
        std::thread::sleep(Duration::from_millis(100));
        assert!(start.elapsed() < Duration::from_secs(60), "the attacker did not get going");
    }
    a.stop();
    let grown = std::fs::metadata(&broker.log).unwrap().len() - log_before;
    let log = broker.log_text();
    let lines = log.lines().filter(|l| l.contains(&format!("uid={}", system_user(ATTACKER).0))).count();
    // RUST_LOG=debug writes every item at DEBUG (not limited: tests only);
    // the WARN/INFO lines about the attacker stay within the burst and rate.
    let loud = log
        .lines()
        .filter(|l| {
            (l.contains(" WARN ") || l.contains(" INFO ")) && l.contains(&format!("uid={}", system_user(ATTACKER).0))
        })
        .count();
    let minutes = start.elapsed().as_secs_f64() / 60.0;
    let allowed = 3 + (6.0 * minutes).ceil() as usize + 2;
    assert!(loud <= allowed, "{loud} WARN/INFO lines about the attacker ({lines} in all, {grown} bytes)");
    wait_until(Duration::from_secs(30), "the suppressed lines reported", || {
        let log = broker.log_text();
        log.contains("more suppressed") || log.contains("more messages about its requests suppressed")
    });
}

// ---------------------------------------------------------------------------
// The bind_many limits, as docs/control.md states them.

#[test]
fn bind_many_limits_are_what_the_docs_say() {
    let _shared = in_flight_shared();
    let broker = start("hostile-batch", &web("batch"), Privilege::Root, None);
    let port = held_port(&broker.control, "tcp");
    // multibinder's form of an item, and the short form.
    let long = json!({"address": "127.0.0.1", "port": port});
    let short = json!({"name": "web"});
    let request = |item: &serde_json::Value, n: usize| {
        let items: Vec<serde_json::Value> = (0..n).map(|_| item.clone()).collect();
        json!({"jsonrpc": "2.0", "method": "bind_many", "params": items, "id": 1}).to_string().into_bytes()
    };
    // About 1,700 items of multibinder's form fit in the default 64 KiB.
    let stream = connect(&broker.control);
    send_raw(stream.as_fd(), &request(&long, 1700));
    let mut fds = 0;
    let mut text = Vec::new();
    while serde_json::from_slice::<serde_json::Value>(&text).is_err() {
        let mut buf = vec![0u8; 1 << 16];
        let got = sockbroker::fd::recv_with_fds(stream.as_fd(), &mut buf).unwrap();
        assert!(got.len > 0, "EOF after {} bytes", text.len());
        fds += got.fds.len();
        text.extend_from_slice(&buf[..got.len]);
    }
    assert_eq!(fds, 1700);
    // 1,900 do not: refused, naming the key.
    let (reply, fds) = rpc(&broker.control, &request(&long, 1900));
    assert_rpc_error(&reply, &fds, -32600, &["larger than 65536 bytes (limits.max_request_bytes)"]);
    // Past max_batch (2048), even when it fits: refused, naming the key.
    let (reply, fds) = rpc(&broker.control, &request(&short, 2049));
    assert_rpc_error(&reply, &fds, -32602, &["2049 sockets", "at most 2048 (limits.max_batch)"]);
    // Both are configurable.
    let mut config = std::fs::read_to_string(broker.config_path()).unwrap();
    config.push_str("[limits]\nmax_request_bytes = 131072\nmax_batch = 4096\n");
    broker.write_config(&config);
    assert!(broker.cli(&["reload"]).status.success());
    let stream = connect(&broker.control);
    send_raw(stream.as_fd(), &request(&long, 3000));
    let (reply, fds) = read_replies(&stream, 1);
    assert_eq!(reply[0]["result"].as_array().map(Vec::len), Some(3000), "{reply:?}");
    assert_eq!(fds.len(), 3000);
}

// ---------------------------------------------------------------------------
// Idle strangers near RLIMIT_NOFILE.

#[test]
fn idle_strangers_do_not_take_the_last_descriptors() {
    let _alone = in_flight_alone();
    system_user(ATTACKER);
    let (app_uid, _) = system_user(APP);
    let toml = format!(
        "{}[[allow]]\nanyone = true\nsockets = [\"web\"]\n[[allow]]\nuid = {app_uid}\nsockets = [\"web\"]\n",
        web("nofile")
    );
    // 512 descriptors, 400 of them held sockets: 128 idle connections (one
    // uid's cap) would leave none for accept() or a bind's duplicate.
    let broker = start("hostile-nofile", &toml, Privilege::Unit, Some(512));
    hold_many(&broker, "nofile", 400);
    let a = attack(&broker, ATTACKER, "idle", 128, 0);
    for _ in 0..5 {
        legit_bind(&broker, "web");
        app_bind(&broker, "web");
    }
    assert!(broker.log_text().contains("of its 512 descriptors; the last 64 are kept"), "{}", broker.log_text());
    assert!(fd_count(&broker) < 512 - 32, "{} descriptors of 512", fd_count(&broker));
    a.stop();
}
