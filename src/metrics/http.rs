//! `GET /metrics` over HTTP on a socket the operator declares
//! (`[metrics] socket = "NAME"`, a declared TCP or UNIX stream socket), for a
//! Prometheus server that scrapes rather than node_exporter's textfile
//! collector.
//!
//! One thread, apart from the control loop, serves one connection at a
//! time: it reads a request line (bounded in bytes and time), asks the
//! broker for its metrics as any client would (the `metrics` method over the
//! control socket, as the broker's own uid), and answers. The control loop
//! never waits for an HTTP peer: a slow or hostile scraper holds up only
//! this thread, for at most [`READ_TIMEOUT`] and [`WRITE_TIMEOUT`], and the
//! text is built at most once per `limits.metrics_interval` however often
//! the port is asked (later scrapes in the interval get the same text).
//!
//! The listening socket is a held socket like any other: it survives a
//! re-exec, a takeover and a restart through the fd store, and the thread
//! is started again by the new process.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::client::Client;

/// How long a scraper may take to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a scraper may take to read the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest request head read; the rest is ignored.
const MAX_REQUEST: usize = 8 * 1024;

/// Starts the thread serving `listener` (a listening stream socket the
/// broker holds a copy of). `control` is the broker's control socket.
pub fn spawn(listener: OwnedFd, control: PathBuf, interval: Duration) -> io::Result<()> {
    std::thread::Builder::new().name("metrics-http".into()).spawn(move || {
        let mut cache: Option<(Instant, String)> = None;
        loop {
            let stream = match accept(&listener) {
                Ok(stream) => stream,
                Err(e) => {
                    log::warn!("metrics socket: accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if let Err(e) = answer(stream, &control, interval, &mut cache) {
                log::debug!("metrics socket: {e}");
            }
        }
    })?;
    Ok(())
}

/// One connection, TCP or UNIX: `accept4` does not care which, and a
/// stream's reads, writes and timeouts are the same calls for both. The
/// listener's file description may be non-blocking (it is shared with the
/// broker's copy), so the thread waits in poll().
fn accept(listener: &OwnedFd) -> io::Result<UnixStream> {
    use nix::errno::Errno;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::socket::{accept4, SockFlag};
    loop {
        match poll(&mut [PollFd::new(listener.as_fd(), PollFlags::POLLIN)], PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        match accept4(listener.as_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => return Ok(UnixStream::from(fd)),
            Err(Errno::EAGAIN | Errno::EINTR | Errno::ECONNABORTED) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads the request head, answers, closes.
fn answer(
    mut stream: UnixStream,
    control: &Path,
    interval: Duration,
    cache: &mut Option<(Instant, String)>,
) -> io::Result<()> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        if Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "request head not complete in time"));
        }
        match stream.read(&mut buf)? {
            0 => break,
            n => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let mut words = line.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => match text(control, interval, cache) {
            Ok(text) => ("200 OK", text),
            Err(e) => {
                log::warn!("metrics socket: asking the broker: {e}");
                ("503 Service Unavailable", format!("sockbroker: {e}\n"))
            }
        },
        ("GET" | "HEAD", _) => ("404 Not Found", "sockbroker: the metrics are at GET /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "sockbroker: the metrics are at GET /metrics\n".to_string()),
    };
    let kind = if status.starts_with("200") { super::FORMAT } else { "text/plain" };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out)
}

/// The broker's metrics, asked at most once per `interval`.
fn text(control: &Path, interval: Duration, cache: &mut Option<(Instant, String)>) -> Result<String, String> {
    if let Some((at, text)) = cache {
        if at.elapsed() < interval {
            return Ok(text.clone());
        }
    }
    let text = Client::connect(control).and_then(|mut c| c.metrics()).map_err(|e| crate::error_chain(&e))?;
    *cache = Some((Instant::now(), text.clone()));
    Ok(text)
}
