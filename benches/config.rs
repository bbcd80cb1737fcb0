//! Figures for the configuration, reload and batch paths, against the real
//! broker binary (started by the tests' `common::Broker`). Run: `cargo bench
//! --bench config` (prints a table). Under `cargo test` (no `--bench`) the
//! same steps run with a twentieth of the counts, and every call must
//! succeed. Everything is abstract UNIX sockets and bounded.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::Broker;
use sockbroker::spec::SocketSpec;

fn declared(n: usize, tag: &str) -> String {
    let pid = std::process::id();
    (0..n).map(|i| format!("[[socket]]\nname = \"s{i}\"\nlisten = \"unix:@sbb-{tag}-{pid}-{i}\"\n\n")).collect()
}

fn report(what: &str, n: usize, elapsed: Duration) {
    println!(
        "{what:<48} {n:>6}  {:>10.3} ms total  {:>8.2} us each",
        elapsed.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e6 / n as f64
    );
}

fn main() {
    // Under `cargo test` (no `--bench`): the same steps with small counts.
    let full = std::env::args().any(|a| a == "--bench");
    let scale = if full { 1 } else { 20 };

    // Parse and validate a large file (what `sockbroker check` does).
    let n = 2000 / scale;
    let text = declared(n, "parse");
    let start = Instant::now();
    let config = sockbroker::config::parse(&text, "bench.toml").unwrap();
    report("parse + validate, declared sockets", config.sockets.len(), start.elapsed());

    // Start with N declared sockets; reload to a file with the other half.
    let (n, half) = (1000 / scale, 500 / scale);
    let start = Instant::now();
    let broker =
        Broker::builder("bench-config").config(declared(n, "a")).env("RUST_LOG", "warn").drain_notify().start();
    report("start to READY=1, declared sockets", n, start.elapsed());
    broker.write_config(&(declared(half, "a") + &declared(half, "b").replace("name = \"s", "name = \"t")));
    let mut client = broker.client();
    let start = Instant::now();
    client.call("reload", serde_json::Value::Null).unwrap();
    report(&format!("reload: {half} kept, {half} closed, {half} opened"), 3 * half, start.elapsed());

    // One round trip per socket vs one batch.
    let specs: Vec<SocketSpec> =
        (0..n).map(|i| format!("unix:@sbb-a-{}-{i}", std::process::id())).map(|s| s.parse().unwrap()).collect();
    let start = Instant::now();
    for spec in &specs[..half] {
        client.bind(spec).unwrap();
    }
    report("bind, one request per held socket", half, start.elapsed());
    let start = Instant::now();
    let got = client.bind_many(&specs[..half]).unwrap();
    assert!(got.iter().all(Result::is_ok));
    report("bind_many, one request for all (2 SCM messages)", half, start.elapsed());
    drop(broker);
}
