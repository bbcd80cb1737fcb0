//! GLB's scale on one host: 50 `sockbroker haproxy run` instances under one
//! broker, 200 sockets each (10,000), all reloaded at once 10 times while 8
//! client threads open a new connection per request over every socket
//! (loopback). Prints failed requests, the time until all 50 serve their
//! new generation, the broker's `bind` p99 during the storms (a probe
//! client) and each generation's render time (its `bind_many` of 200
//! sockets included), and the broker's memory.
//!
//! Run: `cargo bench --bench scale`. `SCALE_INSTANCES`, `SCALE_SOCKETS`,
//! `SCALE_STORMS`, `SCALE_THREADS` override 50, 200, 10, 8. Without
//! `--bench` (as `cargo test --all-targets` runs it) a smoke run of 3 x 20.

#[path = "../tests/common/mod.rs"]
mod common;

use common::storm;

use std::time::Duration;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let haproxy = std::path::PathBuf::from("/usr/sbin/haproxy");
    if !haproxy.exists() {
        eprintln!("scale bench: {} not found (apt-get install haproxy); skipped", haproxy.display());
        return;
    }
    let smoke = !std::env::args().any(|a| a == "--bench");
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map(|(_, h)| h);
    if let Ok(hard) = nofile {
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let s = storm::Storm {
        bin: env!("CARGO_BIN_EXE_sockbroker").into(),
        haproxy,
        dir: std::env::temp_dir().join(format!("sb-scale-bench-{}", std::process::id())),
        instances: env_or("SCALE_INSTANCES", if smoke { 3 } else { 50 }),
        sockets: env_or("SCALE_SOCKETS", if smoke { 20 } else { 200 }),
        storms: env_or("SCALE_STORMS", if smoke { 2 } else { 10 }) as u64,
        threads: env_or("SCALE_THREADS", if smoke { 2 } else { 8 }),
        limit: Duration::from_secs(180),
    };
    println!(
        "scale benchmark: {} haproxy instances x {} sockets = {} under one broker; {} storms (all reloaded at once); {} client threads, a new connection per request, loopback",
        s.instances,
        s.sockets,
        s.instances * s.sockets,
        s.storms,
        s.threads
    );
    let r = s.run();
    let mut served = r.all_served.clone();
    served.sort();
    println!("start: all {} instances ready in {}", s.instances, ms(r.startup));
    println!("broker holds {} sockets, RSS {:.1} MiB", r.held, r.broker_rss_kib as f64 / 1024.0);
    println!("requests during the storms: {} failed of {}", r.failed, r.requests);
    for e in &r.errors {
        println!("  failure: {e}");
    }
    println!(
        "all {} serving their new generation after: median {}, max {} ({} storms, {} not served within {:?})",
        s.instances,
        ms(storm::percentile(&served, 0.5)),
        ms(served.last().copied().unwrap_or_default()),
        s.storms,
        r.unfinished,
        s.limit
    );
    println!(
        "broker bind round trip during the storms (probe client): p50 {}, p99 {}, max {} ({} samples)",
        ms(storm::percentile(&r.bind_latencies, 0.5)),
        ms(storm::percentile(&r.bind_latencies, 0.99)),
        ms(storm::percentile(&r.bind_latencies, 1.0)),
        r.bind_latencies.len()
    );
    println!(
        "render per new generation (bind_many of {} sockets + template): p50 {}, p99 {}, max {} ({} generations)",
        s.sockets,
        ms(storm::percentile(&r.renders, 0.5)),
        ms(storm::percentile(&r.renders, 0.99)),
        ms(storm::percentile(&r.renders, 1.0)),
        r.renders.len()
    );
    if smoke {
        assert_eq!(r.failed, 0, "failed requests: {:?}", r.errors);
        assert_eq!(r.unfinished, 0, "storms not served");
    }
    let _ = std::fs::remove_dir_all(&s.dir);
}
