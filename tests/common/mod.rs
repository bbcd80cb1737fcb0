//! Test fixtures: the real broker binary in a per-test folder, and clients
//! that talk to it the way real clients do.
#![allow(dead_code)]

pub mod daemons;

use std::io::{IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
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
    if let Err(status) = ready_or_exit(notify, child, what) {
        panic!("{what} exited before READY=1: {status}");
    }
}

/// Waits for `READY=1` on a notify socket; `Err` with the exit status when
/// `child` exits first. Fails the test at the deadline.
#[track_caller]
pub fn ready_or_exit(notify: &UnixDatagram, child: &mut Child, what: &str) -> Result<(), ExitStatus> {
    let deadline = Instant::now() + START_TIMEOUT;
    notify.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        if let Ok(n) = notify.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1") {
                return Ok(());
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            return Err(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} not ready after {START_TIMEOUT:?}");
        }
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
        Broker::try_start_in(dir, control, args, env)
            .unwrap_or_else(|log| panic!("broker exited before READY=1:\n{log}"))
    }

    /// Starts the broker in `dir` on `control`; when it exits before READY=1,
    /// returns its log instead (for tests that retry, e.g. on a port taken).
    #[track_caller]
    pub fn try_start_in(dir: PathBuf, control: PathBuf, args: &[&str], env: &[(&str, &str)]) -> Result<Broker, String> {
        Broker::try_start_program(Path::new(BIN), dir, control, args, env)
    }

    /// Starts `program` (a copy of the broker binary, say) in `dir` on
    /// `control`. Several brokers may share a folder: each gets its own notify
    /// socket and log.
    #[track_caller]
    pub fn start_program(
        program: &Path,
        dir: PathBuf,
        control: PathBuf,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Broker {
        Broker::try_start_program(program, dir, control, args, env)
            .unwrap_or_else(|log| panic!("broker exited before READY=1:\n{log}"))
    }

    /// Like [`Broker::start_program`], but returns the log when the broker
    /// exits before READY=1.
    #[track_caller]
    pub fn try_start_program(
        program: &Path,
        dir: PathBuf,
        control: PathBuf,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Broker, String> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let notify_path = dir.join(format!("notify-{n}.sock"));
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        let log = dir.join(format!("broker-{n}.log"));
        let mut all: Vec<String> = vec!["serve".into(), "--control".into(), control.display().to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        let mut cmd = Command::new(program);
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
        let mut child = spawn_fresh_script(&mut cmd);
        match ready_or_exit(&notify, &mut child, "broker") {
            Ok(()) => Ok(Broker { child, dir, control, log, notify, args: all }),
            Err(status) => Err(format!("{all:?}: {status}\n{}", std::fs::read_to_string(&log).unwrap_or_default())),
        }
    }

    /// Starts the broker with a configuration that declares a TCP port:
    /// `toml(port)` with a port that was free, retried when the broker finds
    /// it taken by the time it binds.
    #[track_caller]
    pub fn start_with_config_port(name: &str, toml: impl Fn(u16) -> String) -> (Broker, u16) {
        for _ in 0..10 {
            let port = free_port();
            let dir = test_dir(name);
            let config = dir.join("sockbroker.toml");
            std::fs::write(&config, toml(port)).unwrap();
            let control = dir.join("control.sock");
            match Broker::try_start_in(dir.clone(), control, &["--config", config.to_str().unwrap()], &[]) {
                Ok(broker) => return (broker, port),
                Err(log) if log.contains("Address already in use") => {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                Err(log) => panic!("broker exited before READY=1:\n{log}"),
            }
        }
        panic!("no free port after 10 tries");
    }

    /// Starts the broker with `--config DIR/sockbroker.toml` holding `toml`.
    #[track_caller]
    pub fn start_with_config(name: &str, toml: &str) -> Broker {
        let dir = test_dir(name);
        let control = dir.join("control.sock");
        let config = dir.join("sockbroker.toml");
        std::fs::write(&config, toml).unwrap();
        Broker::start_in(dir, control, &["--config", config.to_str().unwrap()], &[])
    }

    /// The configuration file of [`Broker::start_with_config`].
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("sockbroker.toml")
    }

    /// Replaces the configuration file atomically (write, then rename), so a
    /// reload never reads it half-written.
    pub fn write_config(&self, toml: &str) {
        let tmp = self.dir.join("sockbroker.toml.new");
        std::fs::write(&tmp, toml).unwrap();
        std::fs::rename(&tmp, self.config_path()).unwrap();
    }

    /// Discards the notify messages received so far, so the next
    /// [`Broker::wait_notify`] sees only what follows.
    pub fn drain_notify(&self) {
        self.notify.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4096];
        while self.notify.recv(&mut buf).is_ok() {}
        self.notify.set_nonblocking(false).unwrap();
    }

    /// Runs `sockbroker ARGS` against this broker, as root.
    pub fn cli(&self, args: &[&str]) -> Output {
        run_cli(&self.control, None, args)
    }

    /// Runs `sockbroker ARGS` against this broker as `nobody:nogroup`
    /// (setpriv drops every group and both ids before exec).
    pub fn cli_as_nobody(&self, args: &[&str]) -> Output {
        run_cli(&self.control, Some(&["--reuid=nobody", "--regid=nogroup", "--clear-groups"]), args)
    }

    /// Waits (bounded) for a notify message line starting with `prefix`,
    /// skipping others; returns the line.
    #[track_caller]
    pub fn wait_notify(&self, prefix: &str) -> String {
        let deadline = Instant::now() + START_TIMEOUT;
        self.notify.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                if let Some(line) = text.lines().find(|l| l.starts_with(prefix)) {
                    return line.to_string();
                }
            }
        }
        panic!("no notify message starting with {prefix:?} within {START_TIMEOUT:?}");
    }

    /// Starts the broker under the real `systemd-socket-activate`, which
    /// listens on what `activate_args` says (`-l ADDR`, `--fdname=…`, which
    /// must include `-lCONTROL`) and, on the first connection, execs the
    /// broker in place with LISTEN_FDS. That first connection is made to the
    /// control socket before the broker runs, and returned. `inherit` descriptors are
    /// handed to the activator as its own LISTEN_FDS (3, 4, …), which it
    /// passes through ahead of its sockets, so tests can pass any descriptor
    /// the way systemd would. The activator keeps only a few variables, so
    /// NOTIFY_SOCKET and RUST_LOG travel with `-E`.
    #[track_caller]
    pub fn start_activated(
        dir: PathBuf,
        control: PathBuf,
        activate_args: &[String],
        inherit: Vec<OwnedFd>,
    ) -> (Broker, UnixStream) {
        use std::os::unix::process::CommandExt;
        let notify_path = dir.join(format!("notify-{}.sock", COUNTER.fetch_add(1, Ordering::SeqCst)));
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        let log = dir.join("broker.log");
        let mut all: Vec<String> = vec![
            "-c".into(),
            // $$ is the activator's pid once exec'd: LISTEN_PID must name it.
            format!(r#"if [ {n} -gt 0 ]; then export LISTEN_PID=$$ LISTEN_FDS={n}; fi; exec "$@""#, n = inherit.len()),
            "sh".into(),
            "systemd-socket-activate".into(),
            format!("-ENOTIFY_SOCKET={}", notify_path.display()),
            "-ERUST_LOG=debug".into(),
        ];
        all.extend(activate_args.iter().cloned());
        all.extend([BIN.to_string(), "serve".into(), "--control".into(), control.display().to_string()]);
        let mut cmd = Command::new("sh");
        cmd.args(&all)
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let raw: Vec<RawFd> = inherit.iter().map(|fd| fd.as_raw_fd()).collect();
        assert!(raw.len() <= 16, "at most 16 inherited descriptors");
        // SAFETY: the closure only calls fcntl and dup2 (async-signal-safe) on
        // descriptors that `inherit` keeps open until spawn returns, and
        // allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                let n = raw.len() as RawFd;
                let mut moved = [0 as RawFd; 16];
                // First above the target range, so no dup2 below overwrites a
                // source; the copies are close-on-exec and vanish at exec.
                for (i, fd) in raw.iter().enumerate() {
                    moved[i] = nix::libc::fcntl(*fd, nix::libc::F_DUPFD_CLOEXEC, 3 + n);
                    if moved[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, fd) in moved.iter().take(raw.len()).enumerate() {
                    // dup2 leaves the new descriptor inheritable.
                    if nix::libc::dup2(*fd, 3 + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(inherit);
        // Built at once, so any failure below kills the process and prints
        // its log.
        let mut broker = Broker { child, dir, control, log, notify, args: all };
        // The activator listens, then waits for a connection before it
        // starts the broker: connect as soon as it accepts connections.
        let deadline = Instant::now() + START_TIMEOUT;
        let early = loop {
            match UnixStream::connect(&broker.control) {
                Ok(stream) => break stream,
                Err(e) => {
                    if let Some(status) = broker.child.try_wait().unwrap() {
                        panic!("systemd-socket-activate exited before listening: {status}");
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{}: not listening after {START_TIMEOUT:?}: {e}",
                        broker.control.display()
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        };
        wait_ready(&broker.notify, &mut broker.child, "broker under systemd-socket-activate");
        (broker, early)
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

    /// The broker's descriptor count once start-up has settled, before any
    /// client: the control socket is then its only socket (the one that sent
    /// READY=1 may still be closing when READY=1 arrives, hence the wait).
    #[track_caller]
    pub fn fd_count_at_start(&self) -> usize {
        let sockets = || self.open_fds().iter().filter(|(_, t)| t.starts_with("socket:")).count();
        wait_until(Duration::from_secs(20), "start-up settled", || sockets() == 1);
        self.open_fds().len()
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

/// Runs the CLI with `SOCKBROKER_SOCKET=control`, optionally under
/// `setpriv PRIV…`, with a deadline.
pub fn run_cli(control: &Path, setpriv: Option<&[&str]>, args: &[&str]) -> Output {
    let mut cmd = match setpriv {
        Some(p) => {
            let mut c = Command::new("setpriv");
            c.args(p).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    cmd.args(args)
        .env("SOCKBROKER_SOCKET", control)
        .env_remove("MULTIBINDER_SOCK")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if wait_timeout(&mut child, Duration::from_secs(20)).is_none() {
        let _ = child.kill();
    }
    child.wait_with_output().unwrap()
}

/// The stdout and stderr of a command, for assertion messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `sockbroker check --config FILE` on `toml` in `dir`.
pub fn check(dir: &Path, toml: &str) -> Output {
    let file = dir.join("check.toml");
    std::fs::write(&file, toml).unwrap();
    Command::new(BIN).args(["check", "--config", file.to_str().unwrap()]).output().unwrap()
}

/// `systemd-analyze verify UNITS…` run in `dir`, with `dir` first on the unit
/// path (templates are verified through an instance name): its whole output,
/// since it exits 0 on warnings such as unknown keys. `Documentation=man:`
/// pages are not looked up (`--man=no`): they are installed by the package,
/// and tests/cli.rs renders them.
pub fn systemd_analyze_verify(dir: &Path, units: &[&str]) -> String {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(units)
        .current_dir(dir)
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display()))
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .expect("systemd-analyze (Debian package systemd) must be installed");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Kills and reaps a child when dropped, so a failing test leaves no process.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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

/// A raw connection to the control socket, with a generous read timeout so a
/// wedged broker fails the test instead of hanging it.
#[track_caller]
pub fn connect(control: &Path) -> UnixStream {
    let stream = UnixStream::connect(control).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream
}

/// Reads replies from a connection until `n` complete JSON values have
/// arrived; returns them with every descriptor that came along.
#[track_caller]
pub fn read_replies(stream: &UnixStream, n: usize) -> (Vec<serde_json::Value>, Vec<OwnedFd>) {
    let mut framer = sockbroker::protocol::framing::Framer::default();
    let mut values = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while values.len() < n {
        if let Some(v) = framer.next_value() {
            values.push(v.expect("the broker sent invalid JSON"));
            continue;
        }
        let got = sockbroker::fd::recv_with_fds(stream.as_fd(), &mut buf)
            .unwrap_or_else(|e| panic!("waiting for reply {} of {n}: {e}", values.len() + 1));
        assert!(got.len > 0, "connection closed after {} of {n} replies", values.len());
        fds.extend(got.fds);
        framer.push(&buf[..got.len]);
    }
    (values, fds)
}

/// Reads until the broker closes the connection (EOF), failing the test if
/// that takes longer than `limit`. Returns the bytes read before EOF.
#[track_caller]
pub fn wait_eof(stream: &UnixStream, limit: Duration) -> Vec<u8> {
    use std::io::Read;
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the broker did not close the connection within {limit:?}");
        stream.set_read_timeout(Some(left)).unwrap();
        match (&*stream).read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("reading until EOF: {e}"),
        }
    }
}

/// The `flags` field of /proc/PID/fdinfo/FD (octal open flags).
pub fn fdinfo_flags(pid: i32, fd: RawFd) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix("flags:"))?;
    u32::from_str_radix(line.trim(), 8).ok()
}

/// `O_CLOEXEC` as /proc/PID/fdinfo shows it (octal 02000000).
pub const O_CLOEXEC_FLAG: u32 = 0o2000000;

/// Polls `check` until it returns true, failing the test after `limit`.
/// For conditions the broker reaches asynchronously (closing a connection
/// whose peer left), where no readiness signal exists.
#[track_caller]
pub fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not reached within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Raises this process's soft descriptor limit to the hard limit (tests that
/// open hundreds of connections).
pub fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

/// A bind request in the reference client's form with a chosen id and
/// params object.
pub fn bind_request(id: u64, params: serde_json::Value) -> Vec<u8> {
    serde_json::json!({"jsonrpc": "2.0", "method": "bind", "params": [params], "id": id}).to_string().into_bytes()
}

/// Sends one reference-form request and returns the parsed reply and fds.
#[track_caller]
pub fn rpc(control: &Path, request: &[u8]) -> (serde_json::Value, Vec<OwnedFd>) {
    let (text, fds) = reference_request(control, request);
    (json(&text), fds)
}

/// Asserts that a reply is an error with `code` whose message contains
/// every one of `needles`, and that no descriptor came with it.
#[track_caller]
pub fn assert_rpc_error(reply: &serde_json::Value, fds: &[OwnedFd], code: i64, needles: &[&str]) {
    assert_eq!(reply["error"]["code"], code, "wrong code in {reply}");
    let message = reply["error"]["message"].as_str().unwrap_or_else(|| panic!("no error message in {reply}"));
    for needle in needles {
        assert!(message.contains(needle), "message {message:?} does not mention {needle:?}");
    }
    assert!(reply.get("result").is_none(), "an error reply must not carry a result: {reply}");
    assert!(fds.is_empty(), "a descriptor was attached to an error reply: {reply}");
}

/// The socket type (SO_TYPE) of a descriptor.
pub fn sock_type(fd: BorrowedFd<'_>) -> nix::sys::socket::SockType {
    nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SockType).unwrap()
}

/// Whether a socket is listening (SO_ACCEPTCONN).
pub fn is_listening(fd: BorrowedFd<'_>) -> bool {
    nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::AcceptConn).unwrap()
}

/// Spawns `cmd`, whose program may be a script this process has just
/// written. Another test thread that forks while the script is still open
/// for writing keeps that descriptor until its child execs, and meanwhile
/// execve(2) of the script fails with ETXTBSY: retried, bounded.
#[track_caller]
pub fn spawn_fresh_script(cmd: &mut Command) -> Child {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other.unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}")),
        }
    }
}

/// A shell script in `dir` that runs `prelude`, then execs `exec_prefix`
/// followed by the broker and its arguments (the broker keeps the script's
/// pid): a way to start the broker under `prlimit`, or with variables
/// computed at spawn time, through [`Broker::start_program`].
pub fn broker_wrapper(dir: &Path, name: &str, prelude: &str, exec_prefix: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{prelude}\nexec {exec_prefix} \"{BIN}\" \"$@\"\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A port on 127.0.0.1 that the broker at `control` now holds a `kind`
/// ("tcp" or "udp") socket for, so every later bind of it succeeds: probes
/// a free port and asks the broker for it, retrying when someone else took
/// it in between.
#[track_caller]
pub fn held_port(control: &Path, kind: &str) -> u16 {
    for _ in 0..20 {
        let port = free_port();
        let (reply, _) =
            rpc(control, &bind_request(0, serde_json::json!({"type": kind, "address": "127.0.0.1", "port": port})));
        if reply["result"] == true {
            return port;
        }
        assert_eq!(reply["error"]["code"], 10000, "{reply}");
    }
    panic!("no free {kind} port after 20 tries");
}
