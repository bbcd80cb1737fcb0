//! Broker figures: latency, throughput, bind cost and memory of the real
//! (release) broker binary, timed with `Instant`.
//!
//! `cargo bench --bench broker` prints the full figures. Under `cargo test`
//! (no `--bench` argument) it runs every measurement with small counts, so
//! the code stays working without slowing the test suite.
//!
//! The broker runs as in production: default log level (info, one line per
//! request), stderr to a file. `BENCH_RUST_LOG=warn` measures it without
//! the per-request line.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{connect, proc_status, raise_nofile, rss_kib, Broker};
use sockbroker::fd::{recv_with_fds, send_with_fds};
use sockbroker::protocol::framing::Framer;

/// How many of each thing to do.
struct Sizes {
    latency: usize,
    throughput_total: usize,
    distinct: usize,
    held: usize,
}

const FULL: Sizes = Sizes { latency: 10_000, throughput_total: 64_000, distinct: 1_000, held: 10_000 };
const SMOKE: Sizes = Sizes { latency: 200, throughput_total: 640, distinct: 50, held: 200 };

/// The broker as in production: the default log level (info) unless
/// BENCH_RUST_LOG says otherwise (to measure what the per-request log line
/// costs).
fn start_broker(tag: &str) -> Broker {
    let level = std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "info".into());
    Broker::builder(tag).env("RUST_LOG", &level).drain_notify().start()
}

/// Private memory only, KiB: VmRSS also counts the pages of the binary and
/// of libc mapped from files, which are shared and do not grow with sockets.
fn anon_kib(broker: &Broker) -> u64 {
    proc_status(broker.pid(), "RssAnon:").parse().unwrap()
}

fn request(id: usize, params: &str) -> Vec<u8> {
    format!(r#"{{"jsonrpc":"2.0","method":"bind","params":[{params}],"id":{id}}}"#).into_bytes()
}

/// Reads one reply (and its descriptor) from a connection; panics on an
/// error reply, so a figure is never made of failures.
fn read_reply(stream: &UnixStream, framer: &mut Framer) -> OwnedFd {
    let mut fds = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(v) = framer.next_value() {
            let v = v.unwrap();
            assert_eq!(v["result"], true, "the broker refused: {v}");
            return fds.pop().expect("a descriptor with the reply");
        }
        let got = recv_with_fds(stream.as_fd(), &mut buf).unwrap();
        assert!(got.len > 0, "the broker closed the connection");
        fds.extend(got.fds);
        framer.push(&buf[..got.len]);
    }
}

/// The reference client's way: a new connection, one sendmsg, one recvmsg.
fn bind_new_connection(control: &Path, req: &[u8]) -> OwnedFd {
    let stream = connect(control);
    send_with_fds(stream.as_fd(), req, &[]).unwrap();
    read_reply(&stream, &mut Framer::default())
}

fn bind_on(stream: &UnixStream, framer: &mut Framer, req: &[u8]) -> OwnedFd {
    (&*stream).write_all(req).unwrap();
    read_reply(stream, framer)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn report_latency(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "latency {what}: n={} p50={:.1}us p99={:.1}us max={:.1}us",
        samples.len(),
        percentile(&samples, 0.50).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
        samples.last().unwrap().as_secs_f64() * 1e6,
    );
}

/// A port free on every address (nothing bound to the wildcard or to any
/// 127.x address with it a moment ago), for binds on 127.77.x.y.
fn free_port() -> u16 {
    std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)).unwrap().local_addr().unwrap().port()
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes = if full { FULL } else { SMOKE };
    raise_nofile();

    let broker = start_broker("bench-broker");
    let control = broker.control.clone();
    let port = free_port();
    let held = request(0, &format!(r#"{{"address":"127.0.0.1","port":{port}}}"#));
    drop(bind_new_connection(&control, &held));

    // (a) A new connection per request, as the reference client does.
    let mut samples = Vec::with_capacity(sizes.latency);
    for _ in 0..sizes.latency {
        let t = Instant::now();
        let fd = bind_new_connection(&control, &held);
        samples.push(t.elapsed());
        drop(fd);
    }
    report_latency("new connection per request (held socket)", samples);

    // (b) One persistent connection.
    let stream = connect(&control);
    let mut framer = Framer::default();
    let mut samples = Vec::with_capacity(sizes.latency);
    for _ in 0..sizes.latency {
        let t = Instant::now();
        let fd = bind_on(&stream, &mut framer, &held);
        samples.push(t.elapsed());
        drop(fd);
    }
    drop(stream);
    report_latency("persistent connection (held socket)", samples);

    // Throughput with concurrent clients, each on its own persistent connection.
    for clients in [1usize, 8, 32] {
        let per_client = sizes.throughput_total / clients;
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(clients + 1));
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                let control = control.clone();
                let held = held.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let stream = connect(&control);
                    let mut framer = Framer::default();
                    barrier.wait();
                    for _ in 0..per_client {
                        drop(bind_on(&stream, &mut framer, &held));
                    }
                })
            })
            .collect();
        barrier.wait();
        let t = Instant::now();
        for w in workers {
            w.join().unwrap();
        }
        let elapsed = t.elapsed();
        println!(
            "throughput {clients:>2} clients (persistent connections): {:.0} requests/s ({} requests in {:.1} ms)",
            (per_client * clients) as f64 / elapsed.as_secs_f64(),
            per_client * clients,
            elapsed.as_secs_f64() * 1e3
        );
    }

    let busy_rss = rss_kib(broker.pid());

    // Creating and handing out distinct TCP sockets: 127.77.x.y, one port.
    let port = free_port();
    let stream = connect(&control);
    let mut framer = Framer::default();
    let reqs: Vec<Vec<u8>> = (0..sizes.distinct)
        .map(|i| request(i, &format!(r#"{{"address":"127.77.{}.{}","port":{port}}}"#, i / 250, i % 250 + 1)))
        .collect();
    let t = Instant::now();
    for r in &reqs {
        drop(bind_on(&stream, &mut framer, r));
    }
    let elapsed = t.elapsed();
    println!(
        "distinct binds: {} new TCP sockets created and handed out in {:.1} ms ({:.1} us each)",
        sizes.distinct,
        elapsed.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e6 / sizes.distinct as f64
    );
    drop(stream);
    drop(broker);

    // Memory: a fresh broker idle, then holding many sockets.
    let broker = start_broker("bench-rss");
    let idle_fresh = rss_kib(broker.pid());
    let idle_anon = anon_kib(&broker);
    let port = free_port();
    let stream = connect(&broker.control);
    let mut framer = Framer::default();
    for i in 0..sizes.held {
        let r = request(i, &format!(r#"{{"address":"127.78.{}.{}","port":{port}}}"#, i / 250, i % 250 + 1));
        drop(bind_on(&stream, &mut framer, &r));
    }
    drop(stream);
    println!(
        "rss: idle {:.2} MiB; holding {} sockets {:.2} MiB (and after the latency and throughput runs: {:.2} MiB)",
        idle_fresh as f64 / 1024.0,
        sizes.held,
        rss_kib(broker.pid()) as f64 / 1024.0,
        busy_rss as f64 / 1024.0
    );
    println!(
        "rss anonymous (private): idle {:.2} MiB; holding {} sockets {:.2} MiB",
        idle_anon as f64 / 1024.0,
        sizes.held,
        anon_kib(&broker) as f64 / 1024.0
    );
    if !full {
        println!("(smoke run with small counts; `cargo bench --bench broker` for the figures)");
    }
}
