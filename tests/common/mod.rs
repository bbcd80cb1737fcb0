//! Test fixtures: the real broker binary in a per-test folder, and clients
//! that talk to it the way real clients do.
#![allow(dead_code)]

pub mod daemons;

use std::io::{IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessageOwned, MsgFlags};
use sockbroker::client::Client;

/// The broker binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_sockbroker");

/// How long a broker may take to say READY=1.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh, short folder for one test (UNIX socket paths are limited to 107
/// bytes, so the cargo target folder may be too deep).
pub fn test_dir(name: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("sbt-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits for `READY=1` on a notify socket, failing the test at the deadline
/// or when `child` exits first.
#[track_caller]
pub fn wait_ready(notify: &UnixDatagram, child: &mut Child, what: &str) {
    let deadline = Instant::now() + START_TIMEOUT;
    notify.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        if let Ok(n) = notify.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1") {
                return;
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what} exited before READY=1: {status}");
        }
        assert!(Instant::now() < deadline, "{what} not ready after {START_TIMEOUT:?}");
    }
}

/// A running broker, stopped and cleaned up on drop.
pub struct Broker {
    pub child: Child,
    pub dir: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
    pub notify: UnixDatagram,
    args: Vec<String>,
}

impl Broker {
    /// Starts `sockbroker serve --control DIR/control.sock` and waits for READY=1.
    #[track_caller]
    pub fn start(name: &str) -> Broker {
        Broker::start_with(name, &[], &[])
    }

    /// Starts the broker with extra `serve` arguments and environment.
    #[track_caller]
    pub fn start_with(name: &str, args: &[&str], env: &[(&str, &str)]) -> Broker {
        let dir = test_dir(name);
        let control = dir.join("control.sock");
        Broker::start_in(dir, control, args, env)
    }

    /// Starts the broker in `dir` on `control`.
    #[track_caller]
    pub fn start_in(dir: PathBuf, control: PathBuf, args: &[&str], env: &[(&str, &str)]) -> Broker {
        let notify_path = dir.join(format!("notify-{}.sock", COUNTER.fetch_add(1, Ordering::SeqCst)));
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        let log = dir.join("broker.log");
        let mut all: Vec<String> = vec!["serve".into(), "--control".into(), control.display().to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        let mut cmd = Command::new(BIN);
        cmd.args(&all)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("RUST_LOG", "debug")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        wait_ready(&notify, &mut child, "broker");
        Broker { child, dir, control, log, notify, args: all }
    }

    /// The broker's pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// A library client connected to this broker.
    #[track_caller]
    pub fn client(&self) -> Client {
        Client::connect(&self.control).unwrap()
    }

    /// What the broker logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The broker's open descriptors: number and link target.
    pub fn open_fds(&self) -> Vec<(RawFd, String)> {
        open_fds(self.pid())
    }

    /// Sends a signal to the broker.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    #[track_caller]
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        wait_timeout(&mut self.child, Duration::from_secs(10)).expect("broker did not exit within 10s of SIGTERM")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- broker {:?} ({}), last log lines:", self.args, self.child.id());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Waits for a child to exit, at most `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A loopback TCP port that was free a moment ago. Tests that ask the
/// broker for it retry with another port on "Address in use".
pub fn free_port() -> u16 {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port()
}

/// Asks the broker for a fresh TCP socket on 127.0.0.1, retrying on ports
/// taken between the probe and the bind. Returns the spec text and the fd.
#[track_caller]
pub fn bind_free_tcp(client: &mut Client) -> (String, OwnedFd) {
    for _ in 0..20 {
        let spec = format!("tcp://127.0.0.1:{}", free_port());
        match client.bind(&spec.parse().unwrap()) {
            Ok(fd) => return (spec, fd),
            Err(e) if e.code() == Some(10000) => continue,
            Err(e) => panic!("bind {spec}: {e}"),
        }
    }
    panic!("no free port after 20 tries");
}

/// The inode of a descriptor's open file.
pub fn inode(fd: BorrowedFd<'_>) -> u64 {
    nix::sys::stat::fstat(fd).unwrap().st_ino
}

/// Whether `FD_CLOEXEC` is set.
pub fn is_cloexec(fd: BorrowedFd<'_>) -> bool {
    sockbroker::fd::is_cloexec(fd).unwrap()
}

/// Open descriptors of a process, from /proc/PID/fd.
pub fn open_fds(pid: i32) -> Vec<(RawFd, String)> {
    let mut fds: Vec<(RawFd, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((n, target.display().to_string()))
        })
        .collect();
    fds.sort();
    fds
}

/// Exactly what multibinder's Ruby client does: connect, ONE sendmsg of the
/// JSON text with no terminator, ONE recvmsg for the reply and descriptors.
pub fn reference_request(control: &Path, request: &[u8]) -> (String, Vec<OwnedFd>) {
    let stream = UnixStream::connect(control).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    send_raw(stream.as_fd(), request);
    recv_raw(stream.as_fd())
}

/// One sendmsg of `bytes`, no descriptors.
pub fn send_raw(sock: BorrowedFd<'_>, bytes: &[u8]) {
    let n = sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(bytes)], &[], MsgFlags::empty(), None).unwrap();
    assert_eq!(n, bytes.len());
}

/// One recvmsg: the text and any descriptors.
pub fn recv_raw(sock: BorrowedFd<'_>) -> (String, Vec<OwnedFd>) {
    let mut buf = vec![0u8; 65536];
    let mut cmsg = nix::cmsg_space!([RawFd; 8]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC).unwrap();
    let n = msg.bytes;
    let mut fds = Vec::new();
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just gave us these descriptors.
            fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    (String::from_utf8(buf[..n].to_vec()).unwrap(), fds)
}

/// The reference client's request for `bind(address, port)`.
pub fn multibinder_bind_request(address: &str, port: u16) -> Vec<u8> {
    format!(
        r#"{{"jsonrpc":"2.0","method":"bind","params":[{{"address":"{address}","port":{port}}}],"id":"c0ffee00-0000-4000-8000-000000000001"}}"#
    )
    .into_bytes()
}

/// Parses a reply's JSON.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
}
