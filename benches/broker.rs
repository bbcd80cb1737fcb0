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

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sockbroker::fd::{recv_with_fds, send_with_fds};
use sockbroker::protocol::framing::Framer;

/// The broker binary (release profile under `cargo bench`).
const BIN: &str = env!("CARGO_BIN_EXE_sockbroker");

/// How many of each thing to do.
struct Sizes {
    latency: usize,
    throughput_total: usize,
    distinct: usize,
    held: usize,
}

const FULL: Sizes = Sizes { latency: 10_000, throughput_total: 64_000, distinct: 1_000, held: 10_000 };
const SMOKE: Sizes = Sizes { latency: 200, throughput_total: 640, distinct: 50, held: 200 };

struct Broker {
    child: Child,
    dir: PathBuf,
    control: PathBuf,
}

impl Broker {
    fn start(tag: &str) -> Broker {
        let dir = std::env::temp_dir().join(format!("sockbroker-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let control = dir.join("control.sock");
        let notify_path = dir.join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut child = Command::new(BIN)
            .args(["serve", "--control"])
            .arg(&control)
            .env("NOTIFY_SOCKET", &notify_path)
            // The default log level unless BENCH_RUST_LOG says otherwise
            // (to measure what the per-request log line costs).
            .env("RUST_LOG", std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("broker.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 512];
        loop {
            if let Ok(n) = notify.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1") {
                    break;
                }
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("broker exited before READY=1: {status}");
            }
            assert!(Instant::now() < deadline, "broker not ready after 20s");
        }
        Broker { child, dir, control }
    }

    fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// Private memory only: VmRSS also counts the pages of the binary and of
    /// libc mapped from files, which are shared and do not grow with sockets.
    fn anon_kib(&self) -> u64 {
        self.status_kib("RssAnon:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
    let stream = UnixStream::connect(control).unwrap();
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
/// 127.x address with it a moment ago).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap().local_addr().unwrap().port()
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes = if full { FULL } else { SMOKE };
    raise_nofile();

    let broker = Broker::start("main");
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
    let stream = UnixStream::connect(&control).unwrap();
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
                    let stream = UnixStream::connect(&control).unwrap();
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

    let busy_rss = broker.rss_kib();

    // Creating and handing out distinct TCP sockets: 127.77.x.y, one port.
    let port = free_port();
    let stream = UnixStream::connect(&control).unwrap();
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
    let broker = Broker::start("rss");
    let idle_fresh = broker.rss_kib();
    let idle_anon = broker.anon_kib();
    let port = free_port();
    let stream = UnixStream::connect(&broker.control).unwrap();
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
        broker.rss_kib() as f64 / 1024.0,
        busy_rss as f64 / 1024.0
    );
    println!(
        "rss anonymous (private): idle {:.2} MiB; holding {} sockets {:.2} MiB",
        idle_anon as f64 / 1024.0,
        sizes.held,
        broker.anon_kib() as f64 / 1024.0
    );
    if !full {
        println!("(smoke run with small counts; `cargo bench --bench broker` for the figures)");
    }
}

/// The bench holds thousands of descriptors briefly; use the hard limit.
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
