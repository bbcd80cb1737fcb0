//! Test fixtures: the real broker binary in a per-test folder, and clients
//! that talk to it the way real clients do.
#![allow(dead_code)]

pub mod accept_queue;
pub mod daemons;
pub mod metrics;
pub mod storm;
pub mod supervisor;

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

/// A running broker, stopped and cleaned up on drop. Made by
/// [`BrokerBuilder`] (`Broker::builder(name)…start()`), the one way tests
/// and benches start a broker; [`Broker::start`] is its shortest form.
pub struct Broker {
    pub child: Child,
    pub dir: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
    pub notify: UnixDatagram,
    args: Vec<String>,
    /// Set on drop: stops the thread of [`BrokerBuilder::drain_notify`].
    draining: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// What `units/sockbroker.service` leaves the broker (CapabilityBoundingSet=).
pub const UNIT_CAPS: &str = "-all,+net_bind_service,+chown,+fowner";
/// Those capabilities as the kernel's mask (CAP_CHOWN 0, CAP_FOWNER 3,
/// CAP_NET_BIND_SERVICE 10), as /proc/PID/status shows CapEff.
pub const UNIT_CAP_MASK: u64 = (1 << 0) | (1 << 3) | (1 << 10);

/// How to start a test broker: `sockbroker serve --control DIR/control.sock`
/// with NOTIFY_SOCKET, RUST_LOG=debug and stderr in a log file, waiting for
/// READY=1. Each setter changes one thing:
///
/// ```ignore
/// let broker = Broker::builder("name").config(TOML).env("RUST_LOG", "info").start();
/// let next = Broker::builder("name").beside(&broker).arg("--takeover").start();
/// let (broker, port) = Broker::builder("name").start_on_free_port(|port| toml(port));
/// ```
#[must_use]
#[derive(Clone)]
pub struct BrokerBuilder {
    name: String,
    program: PathBuf,
    dir: Option<PathBuf>,
    control: Option<PathBuf>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    config: Option<String>,
    prelude: String,
    exec_prefix: Vec<String>,
    drain_notify: bool,
    env_remove: Vec<String>,
    control_flag: bool,
    stderr_pipe: bool,
    inherit: Vec<RawFd>,
}

impl Broker {
    /// A builder for a broker in a fresh folder named after `name`.
    pub fn builder(name: &str) -> BrokerBuilder {
        BrokerBuilder {
            name: name.to_string(),
            program: PathBuf::from(BIN),
            dir: None,
            control: None,
            args: Vec::new(),
            env: Vec::new(),
            config: None,
            prelude: String::new(),
            exec_prefix: Vec::new(),
            drain_notify: false,
            env_remove: Vec::new(),
            control_flag: true,
            stderr_pipe: false,
            inherit: Vec::new(),
        }
    }

    /// `Broker::builder(name).start()`: no configuration, defaults.
    #[track_caller]
    pub fn start(name: &str) -> Broker {
        Broker::builder(name).start()
    }
}

impl BrokerBuilder {
    /// Runs in `dir` (made by the test) instead of a fresh folder. Several
    /// brokers may share a folder: each gets its own notify socket and log.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Listens on `control` instead of DIR/control.sock.
    pub fn control(mut self, control: impl Into<PathBuf>) -> Self {
        self.control = Some(control.into());
        self
    }

    /// The folder and control socket of `other` (a takeover, a restart).
    pub fn beside(self, other: &Broker) -> Self {
        self.dir(other.dir.clone()).control(other.control.clone())
    }

    /// Runs `program` (a copy of the broker binary, say) instead of [`BIN`].
    pub fn program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = program.into();
        self
    }

    /// One more `serve` argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// More `serve` arguments.
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.args.extend(args.iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// An environment variable (RUST_LOG overrides the default `debug`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Removes a variable from the broker's environment.
    pub fn env_remove(mut self, key: &str) -> Self {
        self.env_remove.push(key.to_string());
        self
    }

    /// Leaves `--control` out: the broker finds its path as a deployment
    /// would (SOCKBROKER_SOCKET, XDG_RUNTIME_DIR, …); [`Self::control`]
    /// says where that is.
    pub fn no_control_flag(mut self) -> Self {
        self.control_flag = false;
        self
    }

    /// The broker's stderr as a pipe in `broker.child.stderr` instead of the
    /// log file (a test of the log's reader going away).
    pub fn stderr_pipe(mut self) -> Self {
        self.stderr_pipe = true;
        self
    }

    /// Lets `fd`, open in this process, cross into the broker at the same
    /// number (its close-on-exec flag cleared in the child only), as an old
    /// process hands a socket down.
    pub fn inherit_fd(mut self, fd: RawFd) -> Self {
        self.inherit.push(fd);
        self
    }

    /// `--config DIR/sockbroker.toml`, written with `toml` at start
    /// ([`Broker::write_config`] replaces it later).
    pub fn config(mut self, toml: impl Into<String>) -> Self {
        self.config = Some(toml.into());
        self
    }

    /// Shell lines run just before the broker is exec'd, in its process
    /// (e.g. `export VAR=…` computed at spawn time).
    pub fn prelude(mut self, shell: &str) -> Self {
        self.prelude = shell.to_string();
        self
    }

    /// Runs the broker under `command…` (which execs it, so the broker keeps
    /// the pid), e.g. `prlimit --nofile=10:10`.
    pub fn exec_under(mut self, command: &str) -> Self {
        self.exec_prefix.push(command.to_string());
        self
    }

    /// `RLIMIT_NOFILE` soft and hard at `n` (prlimit).
    pub fn nofile(self, n: u64) -> Self {
        self.exec_under(&format!("prlimit --nofile={n}:{n}"))
    }

    /// Root with only the shipped unit's capabilities ([`UNIT_CAPS`], as
    /// `units/sockbroker.service` grants) and no new privileges (setpriv).
    pub fn unit_capabilities(self) -> Self {
        self.exec_under(&format!("setpriv --no-new-privs --inh-caps=-all --bounding-set={UNIT_CAPS}"))
    }

    /// After READY=1, a thread reads and discards the broker's notify
    /// messages until the broker is dropped, as systemd reads them (for
    /// benches: one FDSTORE=1 message goes out per new socket, and a full
    /// queue would make the broker wait on each send).
    pub fn drain_notify(mut self) -> Self {
        self.drain_notify = true;
        self
    }

    /// Starts the broker and waits for READY=1; fails the test with the
    /// broker's log when it exits first.
    #[track_caller]
    pub fn start(self) -> Broker {
        self.try_start().unwrap_or_else(|log| panic!("broker exited before READY=1:\n{log}"))
    }

    /// Starts the broker; when it exits before READY=1, returns its command
    /// line, exit status and log instead (for tests of a refused start).
    #[track_caller]
    pub fn try_start(self) -> Result<Broker, String> {
        let dir = self.dir.clone().unwrap_or_else(|| test_dir(&self.name));
        let control = self.control.clone().unwrap_or_else(|| dir.join("control.sock"));
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let mut all: Vec<String> = vec!["serve".into()];
        if self.control_flag {
            all.extend(["--control".into(), control.display().to_string()]);
        }
        if let Some(toml) = &self.config {
            let file = dir.join("sockbroker.toml");
            std::fs::write(&file, toml).unwrap();
            all.extend(["--config".into(), file.display().to_string()]);
        }
        all.extend(self.args.iter().cloned());
        let program = if self.prelude.is_empty() && self.exec_prefix.is_empty() {
            self.program.clone()
        } else {
            self.wrapper(&dir, n)
        };
        let notify_path = dir.join(format!("notify-{n}.sock"));
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        // Writable by a broker run as another user (exec_under setpriv).
        std::fs::set_permissions(&notify_path, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
        let log = dir.join(format!("broker-{n}.log"));
        let mut cmd = Command::new(&program);
        cmd.args(&all)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("RUST_LOG", "debug")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if self.stderr_pipe { Stdio::piped() } else { Stdio::from(std::fs::File::create(&log).unwrap()) });
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for k in &self.env_remove {
            cmd.env_remove(k);
        }
        if !self.inherit.is_empty() {
            use std::os::unix::process::CommandExt;
            let fds = self.inherit.clone();
            // SAFETY: between fork and exec only fcntl (async-signal-safe)
            // runs, on descriptors this process keeps open until spawn
            // returns; nothing is allocated.
            unsafe {
                cmd.pre_exec(move || {
                    for &fd in &fds {
                        let flags = nix::libc::fcntl(fd, nix::libc::F_GETFD);
                        if flags < 0 || nix::libc::fcntl(fd, nix::libc::F_SETFD, flags & !nix::libc::FD_CLOEXEC) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let mut child = spawn_fresh_script(&mut cmd);
        match ready_or_exit(&notify, &mut child, "broker") {
            Ok(()) => {
                let draining = self.drain_notify.then(|| {
                    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let (reader, stop2) = (notify.try_clone().unwrap(), stop.clone());
                    reader.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 4096];
                        while !stop2.load(Ordering::Relaxed) {
                            let _ = reader.recv(&mut buf);
                        }
                    });
                    stop
                });
                Ok(Broker { child, dir, control, log, notify, args: all, draining })
            }
            Err(status) => {
                let text = format!("{all:?}: {status}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
                if self.dir.is_none() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                Err(text)
            }
        }
    }

    /// Starts the broker with `.config(toml(port))` on a loopback TCP port
    /// that was free, retried in a fresh folder (up to 10 times) when the
    /// port is taken by the time the broker binds it.
    #[track_caller]
    pub fn start_on_free_port(self, toml: impl Fn(u16) -> String) -> (Broker, u16) {
        for _ in 0..10 {
            let port = free_port();
            let dir = self.dir.clone().unwrap_or_else(|| test_dir(&self.name));
            match self.clone().dir(dir.clone()).config(toml(port)).try_start() {
                Ok(broker) => return (broker, port),
                Err(log) if log.contains("Address already in use") => {
                    if self.dir.is_none() {
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                }
                Err(log) => panic!("broker exited before READY=1:\n{log}"),
            }
        }
        panic!("no free port after 10 tries");
    }

    /// A shell script in `dir` that runs the prelude, then execs the exec
    /// prefix followed by the program and its arguments (the broker keeps
    /// the script's pid).
    fn wrapper(&self, dir: &Path, n: usize) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(format!("broker-{n}.sh"));
        let prefix = self.exec_prefix.join(" ");
        let script = format!("#!/bin/sh\n{}\nexec {prefix} \"{}\" \"$@\"\n", self.prelude, self.program.display());
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// Starts the broker under the real `systemd-socket-activate`, which
    /// listens on what `activate_args` says (`-l ADDR`, `--fdname=…`, which
    /// must include `-lCONTROL`) and, on the first connection, execs the
    /// broker in place with LISTEN_FDS. That first connection is made to the
    /// control socket before the broker runs, and returned. `inherit`
    /// descriptors are handed to the activator as its own LISTEN_FDS (3, 4,
    /// …), which it passes through ahead of its sockets, so tests can pass
    /// any descriptor the way systemd would. The activator keeps only a few
    /// variables, so NOTIFY_SOCKET and RUST_LOG travel with `-E`. Uses the
    /// builder's folder and control socket; other settings do not apply.
    #[track_caller]
    pub fn start_activated(self, activate_args: &[String], inherit: Vec<OwnedFd>) -> (Broker, UnixStream) {
        use std::os::unix::process::CommandExt;
        assert!(
            self.args.is_empty()
                && self.env.is_empty()
                && self.config.is_none()
                && self.exec_prefix.is_empty()
                && self.inherit.is_empty(),
            "start_activated takes its arguments from activate_args and its descriptors from inherit"
        );
        let dir = self.dir.clone().unwrap_or_else(|| test_dir(&self.name));
        let control = self.control.clone().unwrap_or_else(|| dir.join("control.sock"));
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
        let mut broker = Broker { child, dir, control, log, notify, args: all, draining: None };
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
}

impl Broker {
    /// The configuration file of [`BrokerBuilder::config`].
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
        if let Some(stop) = &self.draining {
            stop.store(true, Ordering::Relaxed);
        }
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

/// How long a command a test runs to completion (`sockbroker check`, `haproxy
/// -c`, `man`, `supervisor reload`…) may take before the test fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// [`Command::output`] with a deadline: stdin from /dev/null, stdout and
/// stderr captured (read while the command runs, so a large output cannot
/// stall it); a command still running at the deadline, or whose output is
/// still held open by a child it left behind, is killed and the call
/// returns `TimedOut` naming the command.
pub trait OutputWithin {
    fn output_within(&mut self, limit: Duration) -> std::io::Result<Output>;
}

impl OutputWithin for Command {
    fn output_within(&mut self, limit: Duration) -> std::io::Result<Output> {
        use std::io::Read;
        let deadline = Instant::now() + limit;
        let mut child = self.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let (tx, rx) = std::sync::mpsc::channel();
        for (i, mut pipe) in
            [Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stderr.take().unwrap())]
                .into_iter()
                .enumerate()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                let _ = tx.send((i, bytes));
            });
        }
        let timed_out = |what: &str| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{self:?}: {what} within {limit:?}"))
        };
        let Some(status) = wait_timeout(&mut child, limit) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(timed_out("did not exit"));
        };
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        for _ in 0..2 {
            let left = deadline.saturating_duration_since(Instant::now());
            let (i, bytes) = rx.recv_timeout(left).map_err(|_| timed_out("left its output open"))?;
            if i == 0 {
                stdout = bytes;
            } else {
                stderr = bytes;
            }
        }
        Ok(Output { status, stdout, stderr })
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
    cmd.args(args).env("SOCKBROKER_SOCKET", control).env_remove("MULTIBINDER_SOCK");
    cmd.output_within(COMMAND_TIMEOUT).unwrap()
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
    Command::new(BIN).args(["check", "--config", file.to_str().unwrap()]).output_within(COMMAND_TIMEOUT).unwrap()
}

/// `systemd-analyze verify UNITS…` run in `dir`, with `dir` first on the unit
/// path (templates are verified through an instance name): its whole output,
/// since it exits 0 on warnings such as unknown keys. `Documentation=man:`
/// pages are not looked up (`--man=no`): they are installed by the package,
/// and tests/project/cli.rs renders them.
pub fn systemd_analyze_verify(dir: &Path, units: &[&str]) -> String {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(units)
        .current_dir(dir)
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display()))
        .env("SYSTEMD_LOG_COLOR", "0")
        .output_within(COMMAND_TIMEOUT)
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

/// The address of a `tcp://HOST:PORT` spec (as [`bind_free_tcp`] gives).
#[track_caller]
pub fn tcp_addr(spec: &str) -> std::net::SocketAddr {
    spec.trim_start_matches("tcp://").parse().unwrap()
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

/// A field of /proc/PID/status (`VmRSS:`, `CapEff:`…): its first word.
#[track_caller]
pub fn proc_status(pid: i32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line =
        status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap_or_default().to_string()
}

/// A process's resident memory, KiB (`VmRSS:`; `RssAnon:` for private pages
/// only: VmRSS also counts the shared pages of the binary and libc).
pub fn rss_kib(pid: i32) -> u64 {
    proc_status(pid, "VmRSS:").parse().unwrap()
}

/// A process's effective capabilities (`CapEff:`), as a mask.
pub fn cap_eff(pid: i32) -> u64 {
    u64::from_str_radix(&proc_status(pid, "CapEff:"), 16).unwrap()
}

/// Makes a system user (and its group) once; returns uid and gid.
pub fn system_user(name: &str) -> (u32, u32) {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if nix::unistd::User::from_name(name).unwrap().is_none() {
        let status = Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", name])
            .status()
            .expect("useradd (Debian package passwd) must be installed");
        // 9: made meanwhile by another test binary or a bench.
        assert!(status.success() || status.code() == Some(9), "useradd {name}: {status}");
    }
    let u = nix::unistd::User::from_name(name).unwrap().unwrap();
    (u.uid.as_raw(), u.gid.as_raw())
}

/// `setpriv` arguments that run a command as `name`, with its group only.
pub fn as_user(name: &str) -> Vec<String> {
    vec![format!("--reuid={name}"), format!("--regid={name}"), "--clear-groups".into()]
}

/// The first line a child writes to `stdout`, waiting at most `limit` (a
/// thread reads, so a silent child cannot hang the caller).
#[track_caller]
pub fn first_line_within(stdout: std::process::ChildStdout, limit: Duration, what: &str) -> String {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("{what}: no line within {limit:?}"))
}

/// Starts `tests/hostile/peer.py CONTROL MODE CONNS ARG` (the hostile or the
/// measuring local peer) as user `who` (setpriv), and returns it, killed
/// when dropped, with the first line it prints: `ready N` once its attack
/// holds N connections, or `measure`'s latencies. That line must come
/// within 120 s.
#[track_caller]
pub fn hostile_peer(control: &Path, who: &str, mode: &str, conns: usize, arg: usize) -> (KillOnDrop, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile/peer.py");
    let mut child = Command::new("setpriv")
        .args(as_user(who))
        .arg("/usr/bin/python3")
        .arg(script)
        .arg(control)
        .args([mode, &conns.to_string(), &arg.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let child = KillOnDrop(child);
    let line = first_line_within(stdout, Duration::from_secs(120), &format!("tests/hostile/peer.py {mode}"));
    (child, line)
}
