//! Legitimate-bind latency while a hostile local peer attacks the control
//! socket: p50/p99 with no attack and during an idle flood, a slowloris, an
//! unread `bind_many` flood and a `list` flood, side by side in one run.
//! Target (issue 10): p99 under attack at most 2x p99 without, and within
//! 100 ms.
//!
//! The broker is the release binary run as the shipped unit runs it: root
//! with only `CAP_NET_BIND_SERVICE CAP_CHOWN CAP_FOWNER` (setpriv) and
//! `LimitNOFILE=65536` (prlimit), default limits, log level info. The
//! attacker is `tests/hostile/peer.py` as a user made with `useradd`; the
//! legitimate peer is another such user, named by an allow rule, binding a
//! declared socket on a new connection per request (multibinder's client),
//! timed by `peer.py measure`. A root client in this process is timed too.
//!
//! Needs root (useradd, setpriv); otherwise it says so and exits. Under
//! `cargo test` (no `--bench`) it runs with small counts.

#[path = "../tests/common/mod.rs"]
mod common;

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use common::{connect, hostile_peer, rss_kib, system_user, wait_timeout, Broker, KillOnDrop};
use sockbroker::fd::{recv_with_fds, send_with_fds};

const ATTACKER: &str = "sbtatk";
const APP: &str = "sbtapp";

/// The broker as the shipped unit runs it: the unit's capabilities,
/// LimitNOFILE=65536 (or what this machine allows), log level info.
fn start_broker() -> Broker {
    let (app, _) = system_user(APP);
    system_user(ATTACKER);
    let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(65536, |(_, h)| h);
    let pid = std::process::id();
    Broker::builder("bench-hostile")
        .config(format!(
            "[control]\nmode = \"0666\"\n\
             [[socket]]\nname = \"web\"\nlisten = \"unix:@sbt-bench-hostile-{pid}\"\n\
             [[allow]]\nuser = \"{ATTACKER}\"\nsockets = [\"web\"]\non_demand = [\"unix:@sbt-bench-many-*\"]\nintrospect = true\n\
             [[allow]]\nuid = {app}\nsockets = [\"web\"]\n"
        ))
        .nofile(hard.min(65536))
        .unit_capabilities()
        .env("RUST_LOG", "info")
        .drain_notify()
        .start()
}

fn fds(broker: &Broker) -> usize {
    broker.open_fds().len()
}

/// A hostile peer as [`ATTACKER`], killed when dropped, once it is ready.
fn attack(broker: &Broker, mode: &str, conns: usize, arg: usize) -> KillOnDrop {
    let (child, line) = hostile_peer(&broker.control, ATTACKER, mode, conns, arg);
    assert!(line.starts_with("ready"), "{mode}: {line:?}");
    child
}

/// Latencies (µs, sorted) of `n` binds by the legitimate user.
fn measure_app(broker: &Broker, n: usize) -> Vec<u64> {
    let (mut child, line) = hostile_peer(&broker.control, APP, "measure", n, 0);
    let _ = wait_timeout(&mut child.0, Duration::from_secs(60));
    let v: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    assert_eq!(v.len(), n, "measure: {line:?}");
    v
}

/// Latencies (µs, sorted) of `n` binds by root from this process.
fn measure_root(broker: &Broker, n: usize) -> Vec<u64> {
    let request = br#"{"jsonrpc":"2.0","method":"bind","params":[{"name":"web"}],"id":1}"#;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let s = connect(&broker.control);
        send_with_fds(s.as_fd(), request, &[]).unwrap();
        let mut buf = [0u8; 4096];
        let got = recv_with_fds(s.as_fd(), &mut buf).unwrap();
        assert_eq!(got.fds.len(), 1, "{}", String::from_utf8_lossy(&buf[..got.len]));
        out.push(t.elapsed().as_micros() as u64);
    }
    out.sort_unstable();
    out
}

fn pct(v: &[u64], p: f64) -> f64 {
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i] as f64 / 1000.0
}

fn wait_fds(broker: &Broker, at_most: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while fds(broker) > at_most && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    if !nix::unistd::geteuid().is_root() {
        // The smoke run is a test (scripts/test runs as root): it fails.
        assert!(full, "hostile: needs root (useradd, setpriv)");
        println!("hostile: needs root (useradd, setpriv); skipped");
        return;
    }
    let n = if full { 2000 } else { 100 };
    let broker = start_broker();
    // Sockets for `list` to page through.
    let held = if full { 1000 } else { 100 };
    let many: Vec<String> =
        (0..held).map(|i| format!("{{\"spec\":\"unix:@sbt-bench-many-{}-{i}\"}}", std::process::id())).collect();
    let req = format!("{{\"jsonrpc\":\"2.0\",\"method\":\"bind_many\",\"params\":[{}],\"id\":1}}", many.join(","));
    {
        let s = connect(&broker.control);
        send_with_fds(s.as_fd(), req.as_bytes(), &[]).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut text = Vec::new();
        while serde_json::from_slice::<serde_json::Value>(&text).is_err() {
            let got = recv_with_fds(s.as_fd(), &mut buf).unwrap();
            assert!(got.len > 0);
            text.extend_from_slice(&buf[..got.len]);
        }
    }
    let baseline_fds = fds(&broker);

    let phases: [(&str, &str, usize, usize); 5] = [
        ("no attack", "", 0, 0),
        ("idle flood (4,200 conns)", "idle", 4200, 0),
        ("slowloris (4,200 conns)", "slowloris", 4200, 0),
        ("unread bind_many (20 x 1,000)", "unread", 20, 1000),
        ("list flood (128 x 40 lists)", "list", 128, 40),
    ];
    println!("legitimate bind latency, ms ({n} binds per column; broker under the unit's capabilities)");
    println!(
        "{:<32} {:>9} {:>9} {:>10} {:>10} {:>8} {:>9}",
        "attack", "app p50", "app p99", "root p50", "root p99", "fds", "RSS MiB"
    );
    for (label, mode, conns, arg) in phases {
        let attack = (!mode.is_empty()).then(|| attack(&broker, mode, conns, arg));
        let app = measure_app(&broker, n);
        let root = measure_root(&broker, n);
        println!(
            "{:<32} {:>9.2} {:>9.2} {:>10.2} {:>10.2} {:>8} {:>9.1}",
            label,
            pct(&app, 0.5),
            pct(&app, 0.99),
            pct(&root, 0.5),
            pct(&root, 0.99),
            fds(&broker),
            rss_kib(broker.pid()) as f64 / 1024.0
        );
        drop(attack);
        wait_fds(&broker, baseline_fds);
    }
}
