//! Fixtures for `exec` and `run`: the test daemon, a notify listener, an HTTP
//! client and a bounded load generator.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The Python test daemon (reads LISTEN_FDS, answers "pid=P gen=G").
pub fn listen_http() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/daemons/listen_http.py")
}

/// systemd's LISTEN_FDS proxy.
pub const SOCKET_PROXYD: &str = "/usr/lib/systemd/systemd-socket-proxyd";

/// A NOTIFY_SOCKET the test owns.
pub struct Notify {
    pub path: PathBuf,
    pub sock: UnixDatagram,
}

impl Notify {
    /// Binds `DIR/name`.
    pub fn bind(dir: &Path, name: &str) -> Notify {
        let path = dir.join(name);
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        Notify { path, sock }
    }

    /// Waits (at most `timeout`) for a message with the line `line`; returns
    /// the whole message. Fails if `child` exits first.
    #[track_caller]
    pub fn wait_line(&self, child: &mut Child, line: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 8192];
        loop {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if text.lines().any(|l| l == line) {
                    return text;
                }
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("process exited ({status}) while waiting for {line}");
            }
            assert!(Instant::now() < deadline, "no {line} within {timeout:?}");
        }
    }
}

/// The value of `KEY=` in a notify message.
pub fn field<'a>(message: &'a str, key: &str) -> Option<&'a str> {
    message.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// One HTTP/1.0 request on a new connection: the body of a 200 (HTTP/1.0,
/// or 1.1 as nginx and HAProxy answer), else what went wrong.
pub fn http_get(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&reply);
    if !(text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200")) {
        return Err(format!("reply: {text:?}"));
    }
    Ok(text.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}

/// [`http_get`] for a request loop: Ok on a 200.
pub fn http_ok(addr: SocketAddr) -> Result<(), String> {
    http_get(addr).map(drop)
}

/// `gen=N` from a test daemon's response body.
pub fn generation(body: &str) -> Option<u64> {
    body.split_whitespace().find_map(|w| w.strip_prefix("gen=")?.parse().ok())
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    pub errors: Vec<String>,
    pub generations: BTreeSet<u64>,
    /// (start instant, connect+response latency) of every successful request.
    pub samples: Vec<(Instant, Duration)>,
}

/// Clients that each open a new connection per request (one request, then
/// close) in a loop, until stopped or `limit` has passed.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<LoadReport>>,
    pub done: Arc<AtomicU64>,
}

impl Load {
    /// Starts `clients` client threads against `addr`.
    pub fn start(addr: SocketAddr, clients: usize, limit: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|_| {
                let stop = stop.clone();
                let done = done.clone();
                std::thread::spawn(move || {
                    let end = Instant::now() + limit;
                    let mut r = LoadReport::default();
                    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                        let start = Instant::now();
                        match http_get(addr) {
                            Ok(body) => {
                                r.ok += 1;
                                r.samples.push((start, start.elapsed()));
                                r.generations.extend(generation(&body));
                            }
                            Err(e) => {
                                r.failed += 1;
                                if r.errors.len() < 10 {
                                    r.errors.push(e);
                                }
                            }
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        Load { stop, threads, done }
    }

    /// Waits until at least `n` more requests completed (bounded).
    #[track_caller]
    pub fn wait_requests(&self, n: u64) {
        let target = self.done.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.done.load(Ordering::Relaxed) < target {
            assert!(Instant::now() < deadline, "load made no progress");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops the clients and merges their reports.
    pub fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = LoadReport::default();
        for t in self.threads {
            let r = t.join().unwrap();
            all.ok += r.ok;
            all.failed += r.failed;
            all.errors.extend(r.errors);
            all.generations.extend(r.generations);
            all.samples.extend(r.samples);
        }
        all
    }
}

/// A loopback TCP backend answering every connection with a fixed HTTP
/// response; serves until the process ends (threads are detached).
pub fn http_backend(body: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                let _ = conn.write_all(resp.as_bytes());
            });
        }
    });
    addr
}

/// The inode behind /proc/PID/fd/N (the socket itself, for a socket).
pub fn proc_fd_inode(pid: i32, fd: i32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).unwrap().ino()
}

/// The environment a process was exec'd with.
pub fn proc_environ(pid: i32) -> Vec<(String, String)> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|b| *b == 0)
        .filter(|e| !e.is_empty())
        .filter_map(|e| {
            let text = String::from_utf8_lossy(e);
            let (k, v) = text.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// The value of one variable in `proc_environ`.
pub fn env_of(env: &[(String, String)], key: &str) -> Option<String> {
    env.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// The p-th percentile (0-100) of durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Kills (SIGKILL) and reaps a child when dropped, so a failing test leaves
/// no daemon behind.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Client threads each running `request` (one request on a new connection,
/// say) in a loop until finished, dropped, or 300 s have passed: counts and
/// the first errors. [`Load`] is the HTTP one with latencies.
pub struct RequestLoop {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl RequestLoop {
    pub fn start(threads: usize, request: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> RequestLoop {
        let request = Arc::new(request);
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let threads = (0..threads)
            .map(|_| {
                let (stop, ok, failed, errors, request) =
                    (stop.clone(), ok.clone(), failed.clone(), errors.clone(), request.clone());
                std::thread::spawn(move || {
                    let end = Instant::now() + Duration::from_secs(300);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                        match request() {
                            Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                errors.lock().unwrap().push(e);
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        RequestLoop { stop, ok, failed, errors, threads }
    }

    /// Waits (bounded) until `n` more requests succeeded.
    #[track_caller]
    pub fn wait_for(&self, n: u64) {
        let target = self.ok.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.ok.load(Ordering::Relaxed) < target {
            assert!(Instant::now() < deadline, "load stalled: {:?}", self.errors.lock().unwrap());
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops the clients; (succeeded, failed, first errors).
    pub fn finish(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        let errors = self.errors.lock().unwrap().iter().take(5).cloned().collect();
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed), errors)
    }
}

impl Drop for RequestLoop {
    /// A test that fails before [`RequestLoop::finish`] leaves no client running.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
