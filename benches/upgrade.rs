//! How long the broker's own upgrades take, holding many sockets: SIGUSR1 to
//! READY=1 (re-exec) and `serve --takeover` start to READY=1 (takeover).
//!
//! Run: `cargo bench --bench upgrade`. Prints one line per figure. Under
//! `cargo test` (no `--bench`): 100 sockets, 3 re-execs, 2 takeovers.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{wait_ready, wait_timeout, Broker};
use nix::sys::signal::Signal;

/// Held sockets, re-execs, takeovers.
const FULL: (usize, usize, usize) = (1000, 20, 5);
const SMOKE: (usize, usize, usize) = (100, 3, 2);

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (sockets, re_execs, takeovers) = if full { FULL } else { SMOKE };
    let mut broker = Broker::start("bench_upgrade");
    let (dir, control) = (broker.dir.clone(), broker.control.clone());
    let mut client = broker.client();
    for i in 0..sockets {
        client.bind(&format!("unix:@sockbroker-bench-{}-{i}", std::process::id()).parse().unwrap()).unwrap();
    }
    drop(client);

    let mut reexec = Vec::new();
    for _ in 0..re_execs {
        let t = Instant::now();
        broker.signal(Signal::SIGUSR1);
        wait_ready(&broker.notify, &mut broker.child, "broker after SIGUSR1");
        reexec.push(t.elapsed());
    }
    let mut takeover = Vec::new();
    let mut retired = Vec::new();
    for _ in 0..takeovers {
        let t = Instant::now();
        let new = Broker::builder("takeover").dir(dir.clone()).control(control.clone()).arg("--takeover").start();
        takeover.push(t.elapsed());
        let mut old = std::mem::replace(&mut broker, new);
        wait_timeout(&mut old.child, Duration::from_secs(10)).expect("old broker exits after a takeover");
        retired.push(old);
    }
    report("re-exec (SIGUSR1 to READY=1)", sockets, &mut reexec);
    report("takeover (spawn to READY=1 of the new broker)", sockets, &mut takeover);
    broker.stop();
}

fn report(what: &str, sockets: usize, samples: &mut [Duration]) {
    samples.sort();
    let median = samples[samples.len() / 2];
    let max = samples[samples.len() - 1];
    println!("{what}, {sockets} held sockets, {} runs: median {median:?}, max {max:?}", samples.len());
}
