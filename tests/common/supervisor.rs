//! The supervisors under test: `sockbroker run …` and `sockbroker haproxy
//! run …` started against a test broker, with a NOTIFY_SOCKET the test owns
//! (so READY=1, RELOADING=1 and STATUS= are read as systemd would), a log
//! file, the `sockbroker supervisor … --pid` control commands, and a stop on
//! drop that leaves no generation behind. The one way tests and benches
//! start a supervisor:
//!
//! ```ignore
//! let run = Supervisor::run(&broker).args(&["--socket", &spec]).command(&["python3", d]).start();
//! let web = Supervisor::haproxy_run(&broker).name("web").command(&[HAPROXY, "-f", t]).start();
//! ```

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::daemons::{field, Notify};
use super::{output_text, wait_timeout, wait_until, Broker, OutputWithin, BIN, COMMAND_TIMEOUT};

/// How long a supervisor may take to say READY=1 (first start or reload).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How to start a supervisor: `sockbroker SUBCOMMAND ARGS -- COMMAND` in the
/// broker's folder, SOCKBROKER_SOCKET set to the broker, RUST_LOG=debug,
/// stdout and stderr in `DIR/NAME.log`, NOTIFY_SOCKET at
/// `DIR/NAME-notify.sock`; `start` waits for READY=1.
#[must_use]
pub struct SupervisorBuilder {
    name: String,
    program: PathBuf,
    timeout: Duration,
    dir: PathBuf,
    control: PathBuf,
    args: Vec<String>,
    command: Vec<String>,
    env: Vec<(String, String)>,
    notify: bool,
    /// A command the supervisor is started under (`setpriv …`, `prlimit …`).
    wrapper: Vec<String>,
}

/// A running supervisor, stopped on drop (SIGTERM, then SIGKILL for it and
/// every process under it); its log is printed when the test fails.
pub struct Supervisor {
    pub child: Child,
    /// `None` when started with [`SupervisorBuilder::no_notify`].
    pub notify: Option<Notify>,
    pub log: PathBuf,
    /// READY=1's whole message at start.
    pub ready: String,
    /// How long each wait for a notify message or a start may take.
    timeout: Duration,
    done: bool,
}

impl Supervisor {
    /// `sockbroker run` against `broker`, named "run".
    pub fn run(broker: &Broker) -> SupervisorBuilder {
        SupervisorBuilder::new(broker, "run", &["run"])
    }

    /// `sockbroker haproxy run` against `broker`, named "haproxy-run".
    pub fn haproxy_run(broker: &Broker) -> SupervisorBuilder {
        SupervisorBuilder::new(broker, "haproxy-run", &["haproxy", "run"])
    }
}

impl SupervisorBuilder {
    fn new(broker: &Broker, name: &str, subcommand: &[&str]) -> SupervisorBuilder {
        SupervisorBuilder {
            name: name.to_string(),
            program: PathBuf::from(BIN),
            timeout: READY_TIMEOUT,
            dir: broker.dir.clone(),
            control: broker.control.clone(),
            args: subcommand.iter().map(|s| s.to_string()).collect(),
            command: Vec::new(),
            env: vec![("RUST_LOG".into(), "debug".into())],
            notify: true,
            wrapper: Vec::new(),
        }
    }

    /// Names the log and notify socket (several supervisors may share a broker).
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    /// Keeps its log and notify socket in `dir`, and runs there, instead
    /// of the broker's folder.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = dir.into();
        self
    }

    /// The sockbroker binary to run (the one under test unless set).
    pub fn program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = program.into();
        self
    }

    /// How long the start, and each later wait for a notify message, may
    /// take ([`READY_TIMEOUT`] unless set).
    pub fn ready_timeout(mut self, limit: Duration) -> Self {
        self.timeout = limit;
        self
    }

    /// Supervisor options, before `--`.
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.args.extend(args.iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// The daemon's command line, after `--` (appended on each call).
    pub fn command<S: AsRef<str>>(mut self, command: &[S]) -> Self {
        self.command.extend(command.iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// Sets one environment variable (RUST_LOG=debug unless set here).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Runs it under `wrapper` (which must exec it: its pid is the
    /// supervisor's), e.g. `setpriv` with the shipped unit's capabilities.
    pub fn wrapped<S: AsRef<str>>(mut self, wrapper: &[S]) -> Self {
        self.wrapper = wrapper.iter().map(|a| a.as_ref().to_string()).collect();
        self
    }

    /// No NOTIFY_SOCKET (removed from the environment): `start` waits for
    /// `supervisor status` to name generation 1 serving instead.
    pub fn no_notify(mut self) -> Self {
        self.notify = false;
        self
    }

    /// Starts it and waits (bounded) until generation 1 serves.
    #[track_caller]
    pub fn start(self) -> Supervisor {
        let mut sup = self.spawn();
        sup.wait_started();
        sup
    }

    /// Starts it without waiting, for several started at once: then
    /// [`Supervisor::wait_started`] on each.
    pub fn spawn(self) -> Supervisor {
        let log = self.dir.join(format!("{}.log", self.name));
        let file = std::fs::File::create(&log).unwrap();
        let notify = self.notify.then(|| Notify::bind(&self.dir, &format!("{}-notify.sock", self.name)));
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut cmd = Command::new(first);
                cmd.args(rest).arg(&self.program);
                cmd
            }
            None => Command::new(&self.program),
        };
        cmd.args(&self.args)
            .arg("--")
            .args(&self.command)
            .env("SOCKBROKER_SOCKET", &self.control)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        match &notify {
            Some(n) => cmd.env("NOTIFY_SOCKET", &n.path),
            None => cmd.env_remove("NOTIFY_SOCKET"),
        };
        let child = cmd.spawn().unwrap();
        Supervisor { child, notify, log, ready: String::new(), timeout: self.timeout, done: false }
    }
}

impl Supervisor {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits (bounded) until generation 1 serves: READY=1 (kept in
    /// `ready`), or without a notify socket, `supervisor status` saying so.
    #[track_caller]
    pub fn wait_started(&mut self) {
        if self.notify.is_some() {
            self.ready = self.wait_line("READY=1");
        } else {
            wait_until(self.timeout, "generation 1 serving", || {
                let out = self.supervisor(&["status"]);
                out.status.success() && String::from_utf8_lossy(&out.stdout).contains("serving generation 1 ")
            });
        }
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits (bounded) for a notify message with the line `line`; returns
    /// it whole. Fails if the supervisor exits first.
    #[track_caller]
    pub fn wait_line(&mut self, line: &str) -> String {
        let notify = self.notify.as_ref().expect("a supervisor started with a NOTIFY_SOCKET");
        notify.wait_line(&mut self.child, line, self.timeout)
    }

    /// The next READY=1 message, whole.
    #[track_caller]
    pub fn next_ready(&mut self) -> String {
        self.wait_line("READY=1")
    }

    /// SIGHUP, then RELOADING=1 (with a MONOTONIC_USEC) and the READY=1
    /// that ends the reload; returns READY's message whole.
    #[track_caller]
    pub fn reload(&mut self) -> String {
        self.signal(Signal::SIGHUP);
        let reloading = self.wait_line("RELOADING=1");
        let usec: u64 = field(&reloading, "MONOTONIC_USEC").expect("MONOTONIC_USEC").parse().unwrap();
        assert!(usec > 0, "{reloading}");
        self.next_ready()
    }

    /// [`Supervisor::reload`]'s STATUS=.
    #[track_caller]
    pub fn reload_status(&mut self) -> String {
        let ready = self.reload();
        field(&ready, "STATUS").unwrap_or_default().to_string()
    }

    /// `sockbroker supervisor ARGS --pid PID` (bounded).
    pub fn supervisor(&self, args: &[&str]) -> Output {
        supervisor_cmd(self.pid(), args).output_within(COMMAND_TIMEOUT).unwrap()
    }

    /// `supervisor status`: the status line, from its control socket.
    #[track_caller]
    pub fn status(&self) -> String {
        let out = self.supervisor(&["status"]);
        assert!(out.status.success(), "{}", output_text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `supervisor metrics`: the Prometheus text.
    #[track_caller]
    pub fn metrics(&self) -> String {
        let out = self.supervisor(&["metrics"]);
        assert!(out.status.success(), "{}", output_text(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    /// The processes it started (generations, HAProxy masters).
    pub fn generation_pids(&self) -> Vec<i32> {
        children(self.pid())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded by `limit`) for it to exit by itself.
    #[track_caller]
    pub fn wait_exit(&mut self, limit: Duration, what: &str) -> ExitStatus {
        let status = wait_timeout(&mut self.child, limit).unwrap_or_else(|| panic!("{what} within {limit:?}"));
        self.done = true;
        status
    }

    /// `sig`, then its exit status (bounded: 20 s).
    #[track_caller]
    pub fn stop_with(&mut self, sig: Signal) -> ExitStatus {
        self.signal(sig);
        self.wait_exit(Duration::from_secs(20), &format!("the supervisor did not stop on {sig}"))
    }

    /// SIGTERM, then its exit status (bounded: 20 s).
    #[track_caller]
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_with(Signal::SIGTERM)
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} log:\n{}", self.log.display(), self.log_text());
        }
        if self.done || self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let pids = descendants(self.pid());
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        if wait_timeout(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// `sockbroker supervisor ARGS --pid PID`, to run or spawn.
pub fn supervisor_cmd(pid: i32, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("supervisor").args(args).args(["--pid", &pid.to_string()]).stdin(Stdio::null());
    cmd
}

/// Processes whose parent is `pid`, in pid order.
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        // pid (comm) state ppid …: comm may hold spaces, so split after the last ')'.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out.sort();
    out
}

/// How many threads of `pid` run at `SCHED_IDLE`, of how many: the policy
/// is field 41 of `/proc/PID/task/TID/stat`.
pub fn idle_threads(pid: i32) -> (usize, usize) {
    let (mut idle, mut total) = (0, 0);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return (0, 0) };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        // Fields after the last ')' start at field 3 (state): 41 is the 39th.
        let policy = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(38)?.parse::<u32>().ok());
        total += 1;
        if policy == Some(5) {
            idle += 1;
        }
    }
    (idle, total)
}

/// Every process under `pid`: its children, theirs, and so on.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut queue = vec![pid];
    while let Some(parent) = queue.pop() {
        for child in children(parent) {
            out.push(child);
            queue.push(child);
        }
    }
    out
}
