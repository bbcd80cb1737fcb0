//! `sockbroker run`: overlapping generations of a LISTEN_FDS daemon that
//! share the broker's sockets, so a reload drops no connection.
//!
//! The story of one `run`:
//! 1. **Starting**: become a child subreaper (orphans of the daemon are
//!    reparented to us and reaped, never left behind), block the signals we
//!    handle (read from a signalfd, with `poll`), fetch the sockets from the
//!    broker once ([`crate::exec::fetch`]), and start generation 1 as `exec`
//!    would ([`crate::exec::Launch::spawn`]): sockets at 3.. in the child only.
//! 2. **Serving**: once generation 1 is ready, tell systemd `READY=1`.
//! 3. **Reloading** (SIGHUP, or a request on the control socket,
//!    [`control`]): `RELOADING=1` + `MONOTONIC_USEC`, stop the oldest
//!    draining generations hard if `--max-generations` would be exceeded,
//!    start generation N+1 with the same sockets, wait until it says it is
//!    ready, then prove it ([`Proof`]: it stays alive `--ready-grace`, passes
//!    `--ready-probe`),
//!    and only then send the retire signal to generation N, which drains
//!    while N+1 already accepts from the same kernel queue (stopped hard at
//!    `--drain-timeout`, [`Drain`]). Then `READY=1`, and the callers waiting
//!    on the control socket get the outcome. If N+1 exits or is not proven
//!    within `--ready-timeout`, it is stopped, N keeps serving (it was never
//!    told to retire), the failure is logged, stays in `STATUS=` until a
//!    reload succeeds, and is the waiting callers' answer. Requests during a
//!    reload coalesce into one more reload after it.
//! 4. **Stopping** (SIGTERM, SIGINT, or the serving generation died):
//!    `STOPPING=1`, SIGTERM to every generation (SIGKILL after the stop
//!    timeout), reap everything, exit with the serving generation's status.
//!
//! Readiness ([`Readiness`]) is a signal, never a guess where the daemon can
//! give one: `notify` gives each generation a private `NOTIFY_SOCKET` (an
//! abstract datagram socket only `run` reads) and waits for `READY=1` sent
//! from that generation's process tree (checked with `SCM_CREDENTIALS`);
//! `pidfile:PATH` waits until PATH names a live process of the new
//! generation; `delay:D` is the last resort for daemons that can do neither.
//!
//! `run` stays the service's main process for systemd throughout, so no
//! `MAINPID=` handover is needed: systemd only sees `RELOADING=1`/`READY=1`.
//!
//! This is the one generation supervisor of the project. What differs
//! between daemons is split out: a [`Daemon`] prepares and starts one
//! generation and words the STATUS= line ([`ListenFdsDaemon`] for `run`:
//! sockets fetched once and placed at 3..; `haproxy::reload::Haproxy` for
//! `haproxy run`: render, `haproxy -c`, start `haproxy -Ws`), and a
//! [`Supervision`] says which signals reload and stop, which signal retires
//! and stops a generation (SIGTERM by default; SIGUSR1, HAProxy's soft stop),
//! whether it is sent again (HAProxy 2.6 can drop one), whether a second stop
//! request is a hard stop, and whether a stopping generation is killed after
//! a timeout. [`Daemon::start`] runs inside the loop: signals that arrive
//! meanwhile wait in the signalfd and are handled as soon as it returns.

use std::ffi::OsString;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::signalfd::SignalFd;
use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::exec::{self, ExecError, Launch, PassedSocket, SocketArg};
use crate::systemd::notify;

pub mod control;
pub mod metrics;

use control::{Connection, GenerationInfo, Reply, Request};

/// Environment variable telling each generation its number (1, 2, …).
pub const GENERATION_ENV: &str = "SOCKBROKER_GENERATION";
/// How often a pidfile is looked at while a generation starts.
pub const PIDFILE_POLL: Duration = Duration::from_millis(10);
/// Default `--ready-grace`: how long a generation that said it is ready must
/// stay alive before the old one is retired. gunicorn says READY=1 before its
/// workers import the application; a broken one makes it exit well within
/// this, on a loaded machine too. Both generations accept meanwhile, so the
/// window costs reload time, never a request's latency.
pub const DEFAULT_READY_GRACE: Duration = Duration::from_secs(2);
/// Default `--max-generations`: generations alive at once (the serving one,
/// one starting, the rest draining). Beyond it the oldest draining one is
/// stopped hard, so frequent reloads with long-lived connections cannot pile
/// up processes, memory and descriptors without bound.
pub const DEFAULT_MAX_GENERATIONS: usize = 8;
/// How long a generation stopped hard with a signal other than SIGKILL (HAProxy's
/// SIGTERM) may take before SIGKILL.
pub const HARD_KILL_AFTER: Duration = Duration::from_secs(5);
/// How soon a failed `--ready-probe` runs again (until the readiness timeout).
pub const PROBE_RETRY: Duration = Duration::from_millis(250);

/// How `run` learns that a generation is ready to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// `READY=1` on the private `NOTIFY_SOCKET` (the sd_notify protocol).
    Notify,
    /// A fixed time after start, for daemons that cannot signal.
    Delay(Duration),
    /// PATH holds the pid of a live process of the new generation.
    PidFile(PathBuf),
}

impl FromStr for Readiness {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if text == "notify" {
            Ok(Readiness::Notify)
        } else if let Some(d) = text.strip_prefix("delay:") {
            Ok(Readiness::Delay(crate::time::parse_duration(d)?))
        } else if let Some(p) = text.strip_prefix("pidfile:") {
            let path = PathBuf::from(p);
            if !path.is_absolute() {
                return Err(format!("'{p}': the pidfile path must be absolute"));
            }
            Ok(Readiness::PidFile(path))
        } else {
            Err(format!("'{text}': expected notify, delay:DURATION or pidfile:PATH"))
        }
    }
}

impl fmt::Display for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Readiness::Notify => f.write_str("notify"),
            Readiness::Delay(d) => write!(f, "delay:{}ms", d.as_millis()),
            Readiness::PidFile(p) => write!(f, "pidfile:{}", p.display()),
        }
    }
}

/// Parses a signal name (`TERM`, `SIGTERM`, `sigusr1`) or number (`15`).
pub fn parse_signal(text: &str) -> Result<Signal, String> {
    if let Ok(n) = text.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| format!("{n}: not a signal number"));
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    name.parse().map_err(|_| format!("'{text}': not a signal name (e.g. TERM, QUIT, USR1)"))
}

/// How `run` was asked to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The sockets, in order from fd 3.
    pub sockets: Vec<SocketArg>,
    /// Bind directly when the broker is unreachable.
    pub fallback_bind: bool,
    /// How readiness is detected.
    pub ready: Readiness,
    /// How long a new generation may take to become ready.
    pub ready_timeout: Duration,
    /// How a generation proves it is ready after it says so.
    pub proof: Proof,
    /// How old generations are bounded.
    pub drain: Drain,
    /// Sent to the old generation once the new one is ready.
    pub retire_signal: Signal,
    /// After SIGTERM, how long a stopping generation may take before SIGKILL.
    pub stop_timeout: Duration,
    /// The daemon's program and arguments.
    pub command: Vec<OsString>,
    /// `--metrics-file`, `--metrics-name`.
    pub metrics: metrics::MetricsOptions,
}

/// How generations are supervised, whatever the daemon: which signals ask
/// for what, how readiness is seen, how old generations are made to leave.
#[derive(Debug, Clone)]
pub struct Supervision {
    /// How readiness is detected.
    pub ready: Readiness,
    /// How long a new generation may take to become ready.
    pub ready_timeout: Duration,
    /// Signals that start a reload.
    pub reload_signals: &'static [Signal],
    /// Signals that stop every generation and end the supervisor.
    pub stop_signals: &'static [Signal],
    /// Sent to the old generation once the new one is ready.
    pub retire_signal: Signal,
    /// Sent to every generation on stop, and to one that failed to start.
    pub stop_signal: Signal,
    /// Sent to every generation when a stop is asked for again while stopping.
    pub hard_stop_signal: Option<Signal>,
    /// When the retire or stop signal is sent again to a generation still
    /// running, counted from the first one (a daemon may drop a signal that
    /// arrives while it starts; see `haproxy::reload`).
    pub resend_after: &'static [Duration],
    /// How long a stopping generation may take before SIGKILL; `None`: as
    /// long as it needs to drain.
    pub stop_timeout: Option<Duration>,
    /// What a generation must show after it says it is ready.
    pub proof: Proof,
    /// How long and how many old generations may drain.
    pub drain: Drain,
    /// Where the metrics go besides the control socket (`--metrics-file`).
    pub metrics: metrics::MetricsOptions,
}

/// What a new generation must show, after it says it is ready, before the
/// old one is retired. Meanwhile both accept from the shared sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    /// It must stay alive this long (`--ready-grace`).
    pub grace: Duration,
    /// A shell command that must exit 0 (`--ready-probe`), run with
    /// `SOCKBROKER_GENERATION` and `SOCKBROKER_GENERATION_PID` set; run again
    /// every [`PROBE_RETRY`] until it does, or until the readiness timeout.
    pub probe: Option<String>,
}

impl Default for Proof {
    fn default() -> Self {
        Proof { grace: DEFAULT_READY_GRACE, probe: None }
    }
}

/// How old generations are bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    /// A retiring generation still running this long after the retire signal
    /// is stopped hard (`--drain-timeout`); `None`: it drains as long as it
    /// needs (the default, as before: only the operator knows how long a
    /// websocket may legitimately live).
    pub timeout: Option<Duration>,
    /// At most this many generations alive at once (`--max-generations`, at
    /// least 2): before a new one starts, the oldest draining ones are stopped
    /// hard until it fits.
    pub max_generations: usize,
}

impl Default for Drain {
    fn default() -> Self {
        Drain { timeout: None, max_generations: DEFAULT_MAX_GENERATIONS }
    }
}

/// What a STATUS= line is made from.
#[derive(Debug, Clone, Copy)]
pub struct StatusView<'a> {
    /// The serving generation's number and (main) pid.
    pub serving: Option<(u64, Pid)>,
    /// Generations retiring or stopping.
    pub draining: usize,
    /// Reloads that succeeded.
    pub reloads_ok: u64,
    /// Reloads that failed.
    pub reloads_failed: u64,
    /// The last failed reload, until one succeeds.
    pub last_failure: Option<&'a str>,
    /// This line reports the reload that just failed.
    pub failed_now: bool,
    /// A new generation said it is ready and is being proven.
    pub proving: Option<u64>,
}

/// What differs between the daemons the supervisor runs: how one generation
/// is prepared and started, and how the service's status reads.
pub trait Daemon {
    /// Why a generation could not be started.
    type Error: std::error::Error + 'static;

    /// Prepares and starts generation `number` with `env` added to (`Some`) or
    /// removed from (`None`) its environment; returns the started process's
    /// pid. The supervisor reaps it (`waitpid(-1)`); this must reap whatever
    /// else it starts (a config check) before it returns.
    fn start(&mut self, number: u64, env: &[(&str, Option<OsString>)]) -> Result<Pid, Self::Error>;

    /// Generation `number` exited before it said it was ready: the daemon's
    /// own explanation, when it has a better one than the exit status
    /// (HAProxy: what `haproxy -c` says about the config it was given).
    fn explain_failure(&mut self, _number: u64) -> Option<Self::Error> {
        None
    }

    /// Copies of the sockets whose accept queues are sampled during a
    /// reload (the TCP listeners among them; see [`metrics`]), taken after
    /// each start.
    fn watched(&mut self) -> Vec<OwnedFd> {
        Vec::new()
    }

    /// One line about a start failure, for STATUS=.
    fn summary(&self, err: &Self::Error) -> String {
        crate::error_chain(err)
    }

    /// The STATUS= line.
    fn status_line(&self, view: &StatusView<'_>) -> String {
        let mut line = match view.serving {
            Some((number, pid)) => format!("serving generation {number} (pid {pid})"),
            None => "no generation serving".to_string(),
        };
        if let Some(number) = view.proving {
            line.push_str(&format!("; generation {number} said ready, in its grace window"));
        }
        line.push_str(&format!(
            "; {} draining; {} reloads, {} failed",
            view.draining, view.reloads_ok, view.reloads_failed
        ));
        if let Some(f) = view.last_failure {
            line.push_str(&format!("; last reload failed: {f}"));
        }
        line
    }
}

/// Why `run` failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError<E: std::error::Error + 'static = ExecError> {
    /// Preparing the daemon or starting generation 1 failed.
    #[error(transparent)]
    Start(E),
    /// Setting up the supervisor failed.
    #[error("{what}: {source}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Generation 1 never became ready.
    #[error("generation 1 (pid {pid}) {reason}")]
    FirstGeneration {
        /// Its pid.
        pid: Pid,
        /// What happened.
        reason: String,
    },
    /// The event loop failed.
    #[error("supervisor loop: {0}")]
    Loop(#[source] io::Error),
}

fn setup<E: std::error::Error>(what: &'static str) -> impl FnOnce(nix::Error) -> RunError<E> {
    move |e| RunError::Setup { what, source: e.into() }
}

/// The phases of `run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Generation 1 is starting.
    Starting,
    /// One generation serves.
    Serving,
    /// A new generation is starting next to the serving one.
    Reloading,
    /// Every generation is being stopped.
    Stopping,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GenState {
    /// Started, not ready yet.
    Starting,
    /// Said it is ready at `ready_at`; serves next to the old one while it
    /// proves it ([`Proof`]).
    Proving { ready_at: Instant },
    /// Ready and serving.
    Serving,
    /// Sent the retire signal; draining, stopped hard at `until`.
    Retiring { until: Option<Instant> },
    /// Sent the stop signal; SIGKILL at the deadline, if there is one.
    Stopping { kill_at: Option<Instant> },
}

/// The last signal sent to make a generation leave.
#[derive(Debug, Clone, Copy)]
struct Sent {
    signal: Signal,
    first: Instant,
    /// How many times it was sent again.
    resent: usize,
}

#[derive(Debug)]
struct Generation {
    number: u64,
    /// The process we started.
    pid: Pid,
    /// The daemon's main process when a pidfile names another one (a daemon
    /// that forks); signals go there.
    main: Option<Pid>,
    state: GenState,
    started: Instant,
    /// The started process exited with status 0 while a pidfile daemon forked.
    launcher_exited: bool,
    sent: Option<Sent>,
    /// Stopped hard (drain deadline, generation cap): not chosen again.
    hard: bool,
    /// The readiness probe: running now, passed, next run.
    probe: ProbeState,
}

#[derive(Debug, Clone, Copy, Default)]
struct ProbeState {
    running: Option<Pid>,
    passed: bool,
    next: Option<Instant>,
}

impl Generation {
    fn target(&self) -> Pid {
        self.main.unwrap_or(self.pid)
    }

    fn label(&self) -> String {
        format!("generation {} (pid {})", self.number, self.target())
    }

    fn info(&self) -> GenerationInfo {
        let state = match self.state {
            GenState::Starting => "starting",
            GenState::Proving { .. } => "proving",
            GenState::Serving => "serving",
            GenState::Retiring { .. } => "retiring",
            GenState::Stopping { .. } => "stopping",
        };
        GenerationInfo { number: self.number, pid: self.target().as_raw(), state: state.into() }
    }

    /// Sends `signal` now; the retire and stop signals are sent again on schedule.
    fn send(&mut self, signal: Signal) {
        if let Err(e) = kill(self.target(), signal) {
            log::warn!("{}: sending {signal}: {e}", self.label());
        }
        self.sent = Some(Sent { signal, first: Instant::now(), resent: 0 });
    }

    fn resend_due(&self, schedule: &[Duration]) -> Option<Instant> {
        if !matches!(self.state, GenState::Retiring { .. } | GenState::Stopping { .. }) {
            return None;
        }
        let sent = self.sent?;
        schedule.get(sent.resent).map(|after| sent.first + *after)
    }
}

/// The supervisor's state: the daemon, the generations, the event sources.
struct Supervisor<D: Daemon> {
    how: Supervision,
    daemon: D,
    signals: SignalFd,
    notify_sock: Option<(OwnedFd, String)>,
    gens: Vec<Generation>,
    next_number: u64,
    phase: Phase,
    reload_queued: bool,
    /// Reloads begun so far: the number of the current or last one.
    reloads_begun: u64,
    /// The reload began, but its generation waits for room under the cap.
    start_pending: bool,
    /// The control socket, and the connections whose request is being read.
    control: Option<control::Server>,
    reading: Vec<Connection>,
    /// Callers waiting for the outcome of reload number >= theirs.
    waiters: Vec<(Connection, u64)>,
    stop_requests: u32,
    reloads_ok: u64,
    reloads_failed: u64,
    last_failure: Option<String>,
    /// The generation that was serving when stopping began.
    serving_at_stop: Option<u64>,
    /// The exit status of the serving generation: `run`'s own.
    final_status: Option<WaitStatus>,
    /// Set when generation 1 fails before it is ready.
    start_failure: Option<RunError<D::Error>>,
    /// Reload figures and the sockets sampled ([`metrics`]).
    telemetry: metrics::Telemetry,
}

/// Runs a LISTEN_FDS daemon under the supervisor until SIGTERM/SIGINT or the
/// daemon's end; the exit code is the serving generation's (0 when it died of
/// our own SIGTERM).
pub fn run(opts: RunOptions) -> Result<ExitCode, RunError> {
    let how = Supervision {
        ready: opts.ready.clone(),
        ready_timeout: opts.ready_timeout,
        reload_signals: &[Signal::SIGHUP],
        stop_signals: &[Signal::SIGTERM, Signal::SIGINT],
        retire_signal: opts.retire_signal,
        stop_signal: Signal::SIGTERM,
        hard_stop_signal: None,
        resend_after: &[],
        stop_timeout: Some(opts.stop_timeout),
        proof: opts.proof.clone(),
        drain: opts.drain,
        metrics: opts.metrics.clone(),
    };
    supervise(how, || ListenFdsDaemon::fetch(&opts.sockets, opts.fallback_bind, opts.command.clone()))
}

/// A daemon that takes its sockets by `LISTEN_FDS`: the sockets are fetched
/// from the broker once and placed at 3.. in every generation, as `exec`
/// would ([`crate::exec::Launch::spawn`]).
#[derive(Debug)]
pub struct ListenFdsDaemon {
    sockets: Vec<PassedSocket>,
    command: Vec<OsString>,
}

impl ListenFdsDaemon {
    /// Gets the sockets from the broker (see [`crate::exec::fetch`]).
    pub fn fetch(args: &[SocketArg], fallback_bind: bool, command: Vec<OsString>) -> Result<Self, ExecError> {
        if let Err(e) = exec::seal_inherited_descriptors() {
            log::warn!("could not check inherited descriptors in /proc/self/fd: {e}");
        }
        let sockets = exec::fetch(args, fallback_bind)?;
        for (i, s) in sockets.iter().enumerate() {
            log::info!("fd {} = {} (LISTEN_FDNAMES '{}')", exec::LISTEN_FDS_START + i as RawFd, s.role, s.fdname);
        }
        Ok(ListenFdsDaemon { sockets, command })
    }
}

impl Daemon for ListenFdsDaemon {
    type Error = ExecError;

    fn start(&mut self, number: u64, env: &[(&str, Option<OsString>)]) -> Result<Pid, ExecError> {
        let launch = Launch::new(&self.command, &self.sockets, env)?;
        let pid = launch.spawn(&self.sockets)?;
        log::info!("generation {number} (pid {pid}) started: {}", launch.program().display());
        Ok(pid)
    }

    fn watched(&mut self) -> Vec<OwnedFd> {
        self.sockets.iter().filter_map(|s| s.fd.try_clone().ok()).collect()
    }
}

/// Runs generations of `daemon` (made by `prepare` once signals are routed
/// to the supervisor) until a stop signal or the daemon's end; the exit code
/// is the serving generation's (0 when it died of our own stop signal).
pub fn supervise<D: Daemon>(
    how: Supervision,
    prepare: impl FnOnce() -> Result<D, D::Error>,
) -> Result<ExitCode, RunError<D::Error>> {
    nix::sys::prctl::set_child_subreaper(true).map_err(setup("becoming a child subreaper"))?;
    let mut handled = vec![Signal::SIGCHLD];
    handled.extend(how.reload_signals.iter().chain(how.stop_signals));
    let signals = crate::signals::block_into_signalfd(&handled).map_err(setup("setting up signal handling"))?;
    let daemon = prepare().map_err(RunError::Start)?;
    let notify_sock = match how.ready {
        Readiness::Notify => Some(notify_socket().map_err(|source| RunError::Setup { what: "notify socket", source })?),
        _ => None,
    };
    // Without it, SIGHUP still reloads; only waiting for the outcome is lost.
    let control = match control::Server::bind() {
        Ok(server) => {
            log::info!(
                "control socket {}: `sockbroker supervisor reload --pid {}`",
                server.address(),
                std::process::id()
            );
            Some(server)
        }
        Err(e) => {
            log::error!("control socket @{}: {e}; reloads by signal only", control::name(nix::unistd::getpid()));
            None
        }
    };
    let telemetry = metrics::Telemetry::new(how.metrics.clone());
    let mut sup = Supervisor {
        how,
        daemon,
        signals,
        notify_sock,
        gens: Vec::new(),
        next_number: 1,
        phase: Phase::Starting,
        reload_queued: false,
        reloads_begun: 0,
        start_pending: false,
        control,
        reading: Vec::new(),
        waiters: Vec::new(),
        stop_requests: 0,
        reloads_ok: 0,
        reloads_failed: 0,
        last_failure: None,
        serving_at_stop: None,
        final_status: None,
        start_failure: None,
        telemetry,
    };
    sup.start_generation().map_err(RunError::Start)?;
    sup.event_loop()?;
    sup.reap_orphans();
    if let Some(err) = sup.start_failure.take() {
        return Err(err);
    }
    Ok(sup.exit_code())
}

/// Binds the private notify socket: an abstract datagram socket (no file to
/// clean up, no permissions to get wrong for a daemon that changes user),
/// with `SO_PASSCRED` so every message carries the sender's pid, which is
/// how messages are attributed and strangers ignored.
fn notify_socket() -> io::Result<(OwnedFd, String)> {
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let name = format!("@sockbroker-run/{}/{:x}", std::process::id(), nonce & 0xffff_ffff_ffff);
    let spec = format!("unix-dgram:{name}").parse().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let fd = crate::socket::open(&spec).map_err(|e| io::Error::new(e.source.kind(), e))?;
    setsockopt(&fd, sockopt::PassCred, &true)?;
    Ok((fd, name))
}

/// The parent pid of `pid`, from /proc/PID/stat.
fn parent_of(pid: Pid) -> Option<Pid> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and ')'; fields after
    // the last ')' are: state ppid ...
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok().map(Pid::from_raw)
}

fn describe(status: &WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, sig, _) => format!("was killed by {sig}"),
        other => format!("{other:?}"),
    }
}

impl<D: Daemon> Supervisor<D> {
    fn serving(&self) -> Option<&Generation> {
        self.gens.iter().find(|g| g.state == GenState::Serving)
    }

    fn status_line(&self, failed_now: bool) -> String {
        let mut line = self.daemon_status_line(failed_now);
        line.push_str(&self.telemetry.status_note().unwrap_or_default());
        line
    }

    fn daemon_status_line(&self, failed_now: bool) -> String {
        let draining = self
            .gens
            .iter()
            .filter(|g| matches!(g.state, GenState::Retiring { .. } | GenState::Stopping { .. }))
            .count();
        self.daemon.status_line(&StatusView {
            serving: self.serving().map(|g| (g.number, g.target())),
            draining,
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
            last_failure: self.last_failure.as_deref(),
            failed_now,
            proving: self.gens.iter().find(|g| matches!(g.state, GenState::Proving { .. })).map(|g| g.number),
        })
    }

    /// Starts the next generation with its own `NOTIFY_SOCKET` and number.
    fn start_generation(&mut self) -> Result<(), D::Error> {
        let number = self.next_number;
        self.next_number += 1;
        let notify_env = self.notify_sock.as_ref().map(|(_, name)| OsString::from(name));
        let env = [(GENERATION_ENV, Some(OsString::from(number.to_string()))), ("NOTIFY_SOCKET", notify_env)];
        let pid = self.daemon.start(number, &env)?;
        self.telemetry.watch(self.daemon.watched());
        self.gens.push(Generation {
            number,
            pid,
            main: None,
            state: GenState::Starting,
            started: Instant::now(),
            launcher_exited: false,
            sent: None,
            hard: false,
            probe: ProbeState::default(),
        });
        Ok(())
    }

    fn event_loop(&mut self) -> Result<(), RunError<D::Error>> {
        loop {
            if self.phase == Phase::Stopping && self.gens.is_empty() {
                self.answer_waiters(u64::MAX, false, "the supervisor stopped");
                return Ok(());
            }
            let due = self.next_deadline().into_iter().chain(self.telemetry.next_due()).min();
            let timeout = crate::signals::poll_timeout(due.map(|at| at.saturating_duration_since(Instant::now())));
            let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
            if let Some((sock, _)) = &self.notify_sock {
                fds.push(PollFd::new(sock.as_fd(), PollFlags::POLLIN));
            }
            if let Some(server) = &self.control {
                fds.push(PollFd::new(server.as_fd(), PollFlags::POLLIN));
            }
            for conn in &self.reading {
                fds.push(PollFd::new(conn.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(RunError::Loop(e.into())),
            }
            drop(fds);
            self.read_signals();
            self.read_notify();
            self.read_control();
            self.check_timers();
            self.telemetry_tick();
            if self.phase == Phase::Serving && self.reload_queued {
                self.reload_queued = false;
                self.begin_reload_by("queued request");
            }
            if self.phase == Phase::Reloading && self.start_pending {
                self.start_when_room();
            }
        }
    }

    /// The earliest moment something must be checked without an event.
    fn next_deadline(&self) -> Option<Instant> {
        self.gens
            .iter()
            .filter_map(|g| {
                let own = match g.state {
                    GenState::Starting => {
                        let timeout = g.started + self.how.ready_timeout;
                        Some(match &self.how.ready {
                            Readiness::Notify => timeout,
                            Readiness::Delay(d) => timeout.min(g.started + *d),
                            Readiness::PidFile(_) => timeout.min(Instant::now() + PIDFILE_POLL),
                        })
                    }
                    GenState::Proving { ready_at } => {
                        let timeout = g.started + self.how.ready_timeout;
                        let mut at = timeout.min(g.probe.next.unwrap_or(timeout));
                        // A running probe ends with SIGCHLD, not a deadline.
                        let waiting = self.how.proof.probe.is_some() && !g.probe.passed;
                        if !waiting {
                            at = at.min(ready_at + self.how.proof.grace);
                        }
                        Some(at)
                    }
                    GenState::Stopping { kill_at } => kill_at,
                    GenState::Retiring { until } => until,
                    GenState::Serving => None,
                };
                own.into_iter().chain(g.resend_due(self.how.resend_after)).min()
            })
            .min()
    }

    fn read_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else { continue };
            if sig == Signal::SIGCHLD {
                self.reap();
            } else if self.how.stop_signals.contains(&sig) {
                self.stop_requests += 1;
                match self.how.hard_stop_signal {
                    Some(hard) if self.stop_requests > 1 => {
                        log::info!("{sig}: stopping now (hard stop: {hard} to every generation)");
                        self.gens.iter_mut().for_each(|g| g.send(hard));
                    }
                    _ => {
                        log::info!("{sig}: stopping every generation");
                        self.begin_stop();
                    }
                }
            } else if self.how.reload_signals.contains(&sig) {
                self.request_reload(sig.as_ref());
            } else {
                log::debug!("{sig}: ignored");
            }
        }
        // SIGCHLD coalesces; reaping on every wake also catches a child that
        // exited between a read and the next poll.
        self.reap();
    }

    /// A reload asked for by a signal or a control request: now, or after
    /// the start or reload in progress (requests meanwhile coalesce into
    /// one). Returns the number of the reload whose outcome answers it.
    fn request_reload(&mut self, why: &str) -> Option<u64> {
        let number = self.reloads_begun + 1;
        match self.phase {
            Phase::Serving => self.begin_reload_by(why),
            Phase::Starting | Phase::Reloading => {
                log::info!("{why}: a reload will follow the current one");
                self.reload_queued = true;
            }
            Phase::Stopping => {
                log::info!("{why}: ignored while stopping");
                return None;
            }
        }
        Some(number)
    }

    /// Accepts control connections, reads their requests and answers or
    /// queues them.
    fn read_control(&mut self) {
        let Some(server) = &self.control else { return };
        let room = control::MAX_CONNECTIONS.saturating_sub(self.reading.len() + self.waiters.len());
        let new = server.accept(room);
        self.reading.extend(new);
        let mut i = 0;
        while i < self.reading.len() {
            match self.reading[i].read_request() {
                Ok(None) => i += 1,
                Ok(Some(_)) if self.reading[i].refused.is_some() => {
                    let conn = self.reading.swap_remove(i);
                    let why = conn.refused.clone().unwrap_or_default();
                    conn.answer(&Reply::new(false, why));
                }
                Err(why) => {
                    let conn = self.reading.swap_remove(i);
                    log::debug!("control client (uid {}): {why}", conn.uid);
                    conn.answer(&Reply::new(false, why));
                }
                Ok(Some(Request::Status)) => {
                    let conn = self.reading.swap_remove(i);
                    let mut reply = Reply::new(true, self.status_line(false));
                    reply.generations = self.gens.iter().map(Generation::info).collect();
                    conn.answer(&reply);
                }
                Ok(Some(Request::Metrics)) => {
                    let conn = self.reading.swap_remove(i);
                    let mut reply = Reply::new(true, self.status_line(false));
                    reply.metrics = Some(self.metrics_text());
                    conn.answer(&reply);
                }
                Ok(Some(Request::Reload)) => {
                    let conn = self.reading.swap_remove(i);
                    let why = format!("reload requested on the control socket (uid {})", conn.uid);
                    // Registered before the reload begins: a start that fails
                    // at once answers it.
                    let number = self.reloads_begun + 1;
                    self.waiters.push((conn, number));
                    if self.request_reload(&why).is_none() {
                        self.answer_waiters(u64::MAX, false, "the supervisor is stopping");
                    }
                }
            }
        }
    }

    /// Answers every caller waiting for reload `number` or an earlier one.
    fn answer_waiters(&mut self, number: u64, ok: bool, message: &str) {
        let (due, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.waiters).into_iter().partition(|(_, n)| *n <= number);
        self.waiters = rest;
        for (conn, _) in due {
            conn.answer(&Reply::new(ok, message));
        }
    }

    fn begin_reload_by(&mut self, why: &str) {
        self.phase = Phase::Reloading;
        self.reloads_begun += 1;
        self.reload_began();
        let old = self.serving().map(Generation::label).unwrap_or_default();
        log::info!("{why}: reload {}: starting generation {} next to {old}", self.reloads_begun, self.next_number);
        notify::reload_started(Some(format!("reloading: starting generation {}; {old} serving", self.next_number)));
        self.make_room();
        self.start_pending = true;
        self.start_when_room();
    }

    /// Stops the oldest draining generations hard until a new one fits
    /// under `--max-generations`.
    fn make_room(&mut self) {
        let cap = self.how.drain.max_generations.max(2);
        loop {
            let alive = self.gens.iter().filter(|g| !g.hard).count();
            if alive < cap {
                return;
            }
            let oldest = self
                .gens
                .iter()
                .enumerate()
                .filter(|(_, g)| !g.hard && matches!(g.state, GenState::Retiring { .. } | GenState::Stopping { .. }))
                .min_by_key(|(_, g)| g.number)
                .map(|(i, _)| i);
            let Some(idx) = oldest else { return };
            self.stop_hard(idx, &format!("{alive} generations alive, --max-generations is {cap}"));
        }
    }

    /// Starts the reload's generation once the generations stopped hard for
    /// room have exited.
    fn start_when_room(&mut self) {
        let cap = self.how.drain.max_generations.max(2);
        if self.gens.len() >= cap {
            log::debug!("{} generations alive: the new one waits for a hard-stopped one to exit", self.gens.len());
            return;
        }
        self.start_pending = false;
        if let Err(e) = self.start_generation() {
            let number = self.next_number - 1;
            log::error!("generation {number} could not start: {}", crate::error_chain(&e));
            let detail = format!("generation {number} could not start: {}", crate::error_chain(&e));
            self.reload_failed(format!("generation {number} could not start: {}", self.daemon.summary(&e)), detail);
        }
    }

    /// A generation's drain deadline passed, or the cap needs its place:
    /// the hard stop signal (SIGKILL, or the daemon's own hard stop, then
    /// SIGKILL after [`HARD_KILL_AFTER`]).
    fn stop_hard(&mut self, idx: usize, why: &str) {
        let signal = self.how.hard_stop_signal.unwrap_or(Signal::SIGKILL);
        let g = &mut self.gens[idx];
        log::warn!("{}: {why}: stopping it hard ({signal})", g.label());
        g.hard = true;
        g.state = GenState::Stopping { kill_at: (signal != Signal::SIGKILL).then(|| Instant::now() + HARD_KILL_AFTER) };
        g.send(signal);
    }

    /// `reason` goes to STATUS= and the log, `detail` (with a config
    /// check's whole output) to the callers waiting for this reload.
    fn reload_failed(&mut self, reason: String, detail: String) {
        self.reloads_failed += 1;
        self.reload_ended(false);
        let serving = self.serving().map(Generation::label).unwrap_or_else(|| "nothing".into());
        log::error!("reload failed: {reason}; {serving} keeps serving");
        let message = format!("reload failed: {detail}\n{serving} keeps serving");
        self.last_failure = Some(reason);
        // systemd gets STATUS= before the waiting callers (ExecReload=) exit,
        // so `systemctl status` right after a failed `systemctl reload` says why.
        if self.serving().is_some() {
            self.phase = Phase::Serving;
            notify::ready(&self.status_line(true));
            self.answer_waiters(self.reloads_begun, false, &message);
        } else {
            // The old generation died during the reload and the new one failed.
            self.answer_waiters(self.reloads_begun, false, &message);
            self.begin_stop();
        }
    }

    /// A starting generation said it is ready (or its delay or pidfile
    /// says so): promoted now, or proven first ([`Proof`]) while the old
    /// one still serves.
    fn signalled_ready(&mut self, idx: usize) {
        if self.phase == Phase::Reloading {
            self.reload_ready(self.gens[idx].started.elapsed());
        }
        let proof = &self.how.proof;
        if proof.grace.is_zero() && proof.probe.is_none() {
            self.promote(idx);
            return;
        }
        let now = Instant::now();
        let g = &mut self.gens[idx];
        g.state = GenState::Proving { ready_at: now };
        g.probe.next = proof.probe.as_ref().map(|_| now);
        log::info!(
            "{} says it is ready after {:?}; proving it (grace {:?}{}) before anything retires",
            g.label(),
            g.started.elapsed(),
            proof.grace,
            if proof.probe.is_some() { ", probe" } else { "" }
        );
        notify::status(&self.status_line(false));
    }

    /// A starting generation is ready: it serves, and every other serving
    /// generation retires.
    fn promote(&mut self, idx: usize) {
        let elapsed = self.gens[idx].started.elapsed();
        self.gens[idx].state = GenState::Serving;
        let label = self.gens[idx].label();
        log::info!("{label} ready after {elapsed:?}");
        let signal = self.how.retire_signal;
        let until = self.how.drain.timeout.map(|t| Instant::now() + t);
        let mut retired = Vec::new();
        for (i, g) in self.gens.iter_mut().enumerate() {
            if i != idx && g.state == GenState::Serving {
                log::info!("{} retiring with {signal}", g.label());
                g.state = GenState::Retiring { until };
                g.send(signal);
                retired.push(g.label());
            }
        }
        let reloaded = self.phase == Phase::Reloading;
        if reloaded {
            self.reloads_ok += 1;
            self.last_failure = None;
            self.reload_ended(true);
        } else {
            self.write_metrics_file();
        }
        self.phase = Phase::Serving;
        notify::ready(&self.status_line(false));
        if reloaded {
            let mut message = format!("{label} serves");
            if !retired.is_empty() {
                message.push_str(&format!("; told {} to retire ({signal})", retired.join(", ")));
            }
            self.answer_waiters(self.reloads_begun, true, &message);
        }
    }

    /// Stops a generation that failed to start with the stop signal: it may
    /// already accept from the shared queues, and a graceful stop lets it
    /// finish what it took.
    fn abandon(&mut self, idx: usize) {
        let kill_at = self.how.stop_timeout.map(|t| Instant::now() + t);
        let g = &mut self.gens[idx];
        g.state = GenState::Stopping { kill_at };
        g.send(self.how.stop_signal);
        if let Some(probe) = g.probe.running.take() {
            let _ = kill(probe, Signal::SIGKILL);
        }
    }

    fn fail_start(&mut self, number: u64, pid: Pid, reason: String) {
        let label = format!("generation {number} (pid {pid})");
        let reason = format!("{label} {reason}");
        self.fail_start_with(number, pid, reason.clone(), reason);
    }

    /// `reason` for STATUS= and the log, `detail` for the waiting callers.
    fn fail_start_with(&mut self, number: u64, pid: Pid, reason: String, detail: String) {
        if number == 1 && self.phase == Phase::Starting {
            log::error!("{detail}");
            self.start_failure = Some(RunError::FirstGeneration { pid, reason: detail });
            self.begin_stop();
        } else if self.phase != Phase::Stopping {
            self.reload_failed(reason, detail);
        }
    }

    fn begin_stop(&mut self) {
        if self.phase != Phase::Stopping {
            self.phase = Phase::Stopping;
            self.serving_at_stop = self.serving().map(|g| g.number);
            notify::stopping();
            self.answer_waiters(u64::MAX, false, "the supervisor is stopping");
        }
        let kill_at = self.how.stop_timeout.map(|t| Instant::now() + t);
        let signal = self.how.stop_signal;
        for g in &mut self.gens {
            if !matches!(g.state, GenState::Stopping { .. }) {
                log::info!("{}: sending {signal}", g.label());
                g.state = GenState::Stopping { kill_at };
                g.send(signal);
            }
        }
    }

    /// Reaps every exited child (ours or adopted) and updates the generations.
    fn reap(&mut self) {
        loop {
            let status = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    log::warn!("waitpid: {e}");
                    return;
                }
                Ok(status) => status,
            };
            let Some(pid) = status.pid() else { continue };
            self.on_exit(pid, status);
        }
    }

    fn on_exit(&mut self, pid: Pid, status: WaitStatus) {
        if let Some(idx) = self.gens.iter().position(|g| g.probe.running == Some(pid)) {
            self.on_probe_exit(idx, &status);
            return;
        }
        let Some(idx) = self.gens.iter().position(|g| g.pid == pid || g.main == Some(pid)) else {
            log::debug!("reaped pid {pid} (adopted orphan): {}", describe(&status));
            return;
        };
        let g = &mut self.gens[idx];
        if g.main.is_some_and(|m| m != pid) {
            // The launcher of a forking daemon; the generation lives on in `main`.
            g.launcher_exited = true;
            return;
        }
        let forking = matches!(self.how.ready, Readiness::PidFile(_)) && g.main.is_none();
        if forking && g.state == GenState::Starting && matches!(status, WaitStatus::Exited(_, 0)) {
            log::debug!("{}: launcher exited with status 0; waiting for the pidfile", g.label());
            g.launcher_exited = true;
            return;
        }
        let g = self.gens.remove(idx);
        if let Some(probe) = g.probe.running {
            let _ = kill(probe, Signal::SIGKILL);
        }
        if g.state == GenState::Starting && self.phase != Phase::Stopping {
            if let Some(e) = self.daemon.explain_failure(g.number) {
                log::error!("{} {}: {}", g.label(), describe(&status), crate::error_chain(&e));
                let summary = self.daemon.summary(&e);
                self.fail_start_with(g.number, g.target(), summary, crate::error_chain(&e));
                if self.phase != Phase::Stopping {
                    notify::status(&self.status_line(false));
                }
                return;
            }
        }
        let what = describe(&status);
        match g.state {
            GenState::Starting => self.fail_start(g.number, g.target(), format!("{what} before it was ready")),
            GenState::Proving { ready_at } => {
                let reason = format!(
                    "{what} {:.1?} after it said it was ready, inside its {:?} --ready-grace window",
                    ready_at.elapsed(),
                    self.how.proof.grace
                );
                self.fail_start(g.number, g.target(), reason);
            }
            GenState::Serving => {
                log::error!("{} {what} while serving", g.label());
                self.final_status = Some(status);
                if self.phase == Phase::Reloading {
                    log::warn!("waiting for the starting generation to take over");
                } else {
                    self.begin_stop();
                }
            }
            GenState::Retiring { .. } => log::info!("{} retired: {what}", g.label()),
            GenState::Stopping { .. } => {
                log::info!("{} stopped: {what}", g.label());
                if self.serving_at_stop == Some(g.number) {
                    self.final_status = Some(status);
                }
            }
        }
        if self.phase != Phase::Stopping {
            notify::status(&self.status_line(false));
        }
    }

    fn on_probe_exit(&mut self, idx: usize, status: &WaitStatus) {
        let g = &mut self.gens[idx];
        g.probe.running = None;
        if matches!(status, WaitStatus::Exited(_, 0)) {
            log::info!("{}: --ready-probe passed", g.label());
            g.probe.passed = true;
        } else {
            log::info!("{}: --ready-probe {}; again in {PROBE_RETRY:?}", g.label(), describe(status));
            g.probe.next = Some(Instant::now() + PROBE_RETRY);
        }
    }

    /// Runs the `--ready-probe` command for generation `idx`.
    fn run_probe(&mut self, idx: usize) {
        let Some(command) = self.how.proof.probe.clone() else { return };
        let g = &mut self.gens[idx];
        g.probe.next = None;
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(&command)
            .env(GENERATION_ENV, g.number.to_string())
            .env("SOCKBROKER_GENERATION_PID", g.target().to_string())
            .env_remove("NOTIFY_SOCKET")
            .stdin(std::process::Stdio::null());
        crate::child::prepare(&mut cmd, &[], None);
        let spawned = cmd.spawn();
        match spawned {
            // Reaped by waitpid(-1) in `reap`; dropping the handle neither waits nor kills.
            Ok(child) => g.probe.running = Some(Pid::from_raw(child.id() as i32)),
            Err(e) => {
                log::warn!("{}: --ready-probe: cannot run /bin/sh: {e}", g.label());
                g.probe.next = Some(Instant::now() + PROBE_RETRY);
            }
        }
    }

    fn read_notify(&mut self) {
        let Some((sock, _)) = &self.notify_sock else { return };
        let raw = sock.as_raw_fd();
        loop {
            let mut buf = [0u8; 4096];
            let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials, [RawFd; 16]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
            let (len, sender) = match recvmsg::<()>(raw, &mut iov, Some(&mut cmsg), flags) {
                Ok(msg) => {
                    let mut sender = None;
                    for c in msg.cmsgs().into_iter().flatten() {
                        match c {
                            ControlMessageOwned::ScmCredentials(cred) => sender = Some(Pid::from_raw(cred.pid())),
                            ControlMessageOwned::ScmRights(fds) => {
                                // Nobody may park descriptors with us: close them.
                                for fd in fds {
                                    // SAFETY: the kernel just installed it for us alone.
                                    drop(unsafe { OwnedFd::from_raw_fd(fd) });
                                }
                            }
                            _ => {}
                        }
                    }
                    (msg.bytes, sender)
                }
                Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    log::warn!("notify socket: {e}");
                    return;
                }
            };
            let text = String::from_utf8_lossy(&buf[..len]).into_owned();
            let Some(sender) = sender else { continue };
            self.on_notify(sender, &text);
        }
    }

    /// Which generation a process belongs to: itself, or a descendant.
    fn generation_of(&self, pid: Pid) -> Option<usize> {
        let mut p = pid;
        for _ in 0..64 {
            if let Some(i) = self.gens.iter().position(|g| g.pid == p || g.main == Some(p)) {
                return Some(i);
            }
            p = parent_of(p)?;
            if p.as_raw() <= 1 || p == nix::unistd::getpid() {
                return None;
            }
        }
        None
    }

    fn on_notify(&mut self, sender: Pid, text: &str) {
        let Some(idx) = self.generation_of(sender) else {
            log::warn!("notify message from pid {sender}, which belongs to no generation: ignored");
            return;
        };
        for line in text.lines() {
            match line.split_once('=') {
                Some(("READY", "1")) if self.gens[idx].state == GenState::Starting => {
                    log::debug!("{}: READY=1 from pid {sender}", self.gens[idx].label());
                    self.signalled_ready(idx);
                }
                Some(("STATUS", status)) => log::info!("{}: {status}", self.gens[idx].label()),
                _ => log::debug!("{}: {line}", self.gens[idx].label()),
            }
        }
    }

    /// Delay and pidfile readiness, readiness timeouts, grace windows and
    /// probes, signals sent again, drain and stop deadlines.
    fn check_timers(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.gens.len() {
            let (state, started, number, target) = {
                let g = &self.gens[i];
                (g.state, g.started, g.number, g.target())
            };
            if self.gens[i].resend_due(self.how.resend_after).is_some_and(|due| now >= due) {
                let g = &mut self.gens[i];
                if let Some(sent) = g.sent.as_mut() {
                    log::debug!("generation {number} (pid {target}): {} again", sent.signal);
                    let _ = kill(target, sent.signal);
                    sent.resent += 1;
                }
            }
            let timeout = self.how.ready_timeout;
            match state {
                GenState::Starting => {
                    let ready = match self.how.ready.clone() {
                        Readiness::Notify => false,
                        Readiness::Delay(d) => now >= started + d,
                        Readiness::PidFile(path) => self.pidfile_ready(&path, i),
                    };
                    if ready {
                        self.signalled_ready(i);
                    } else if now >= started + timeout {
                        self.abandon(i);
                        self.fail_start(number, target, format!("was not ready within {timeout:?}; stopped it"));
                    }
                }
                GenState::Proving { ready_at } => {
                    let probe = self.gens[i].probe;
                    let proven = self.how.proof.probe.is_none() || probe.passed;
                    if proven && now >= ready_at + self.how.proof.grace {
                        self.promote(i);
                    } else if now >= started + timeout {
                        self.abandon(i);
                        let why = if proven { "was not proven ready" } else { "did not pass --ready-probe" };
                        self.fail_start(number, target, format!("{why} within {timeout:?}; stopped it"));
                    } else if probe.running.is_none() && probe.next.is_some_and(|at| now >= at) {
                        self.run_probe(i);
                    }
                }
                GenState::Retiring { until: Some(until) } if now >= until => {
                    let drain = self.how.drain.timeout.unwrap_or_default();
                    self.stop_hard(i, &format!("still draining {drain:?} after the retire signal (--drain-timeout)"));
                }
                GenState::Stopping { kill_at: Some(kill_at) } if now >= kill_at => {
                    log::warn!(
                        "generation {number} (pid {target}) still running after {}: SIGKILL",
                        self.how.stop_signal
                    );
                    let _ = kill(target, Signal::SIGKILL);
                    self.gens[i].state = GenState::Stopping { kill_at: self.how.stop_timeout.map(|t| now + t) };
                }
                _ => {}
            }
            i += 1;
        }
    }

    /// Whether the pidfile names a live process of generation `idx` (not a
    /// stale pid left by an older generation); records it as the main pid.
    fn pidfile_ready(&mut self, path: &std::path::Path, idx: usize) -> bool {
        let Ok(text) = std::fs::read_to_string(path) else { return false };
        let Ok(raw) = text.trim().parse::<i32>() else { return false };
        if raw <= 0 {
            return false;
        }
        let pid = Pid::from_raw(raw);
        let g = &self.gens[idx];
        let mine = pid == g.pid
            || self.generation_of(pid) == Some(idx)
            // A forked daemon whose launcher exited was reparented to us.
            || (g.launcher_exited && parent_of(pid) == Some(nix::unistd::getpid())
                && self.generation_of(pid).is_none());
        if !mine || kill(pid, None).is_err() {
            return false;
        }
        if pid != g.pid {
            self.gens[idx].main = Some(pid);
        }
        true
    }

    /// After the generations are gone: stop and reap any orphans the daemon
    /// left behind (they were reparented to us as subreaper): the stop
    /// signal, then SIGKILL after the stop timeout, if there is one.
    fn reap_orphans(&mut self) {
        let deadline = self.how.stop_timeout.map(|t| Instant::now() + t);
        let mut signalled = std::collections::HashSet::new();
        loop {
            self.reap();
            let children = own_children();
            if children.is_empty() {
                return;
            }
            let late = deadline.is_some_and(|d| Instant::now() >= d);
            let signal = if late { Signal::SIGKILL } else { self.how.stop_signal };
            for pid in children {
                if signalled.insert((pid, signal)) {
                    log::info!("orphan pid {pid} left by the daemon: {signal}");
                    let _ = kill(pid, signal);
                }
            }
            let mut fds = [PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(100u16));
            while let Ok(Some(_)) = self.signals.read_signal() {}
        }
    }

    fn exit_code(&self) -> ExitCode {
        match self.final_status {
            Some(WaitStatus::Exited(_, code)) => ExitCode::from(code.clamp(0, 255) as u8),
            // Death by the signal we sent to stop it is a clean stop, as systemd counts it.
            Some(WaitStatus::Signaled(_, sig, _)) if sig == Signal::SIGTERM || sig == self.how.stop_signal => {
                ExitCode::SUCCESS
            }
            Some(WaitStatus::Signaled(_, sig, _)) => ExitCode::from(128u8.saturating_add(sig as u8)),
            _ => ExitCode::SUCCESS,
        }
    }
}

/// Our live children, from /proc/self/task/*/children.
fn own_children() -> Vec<Pid> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return Vec::new() };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|text| text.split_whitespace().filter_map(|p| p.parse().ok()).map(Pid::from_raw).collect::<Vec<_>>())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_forms() {
        assert_eq!("notify".parse::<Readiness>().unwrap(), Readiness::Notify);
        assert_eq!("delay:250ms".parse::<Readiness>().unwrap(), Readiness::Delay(Duration::from_millis(250)));
        assert_eq!("pidfile:/run/x.pid".parse::<Readiness>().unwrap(), Readiness::PidFile("/run/x.pid".into()));
        assert!("pidfile:x.pid".parse::<Readiness>().is_err());
        assert!("soon".parse::<Readiness>().is_err());
    }

    #[test]
    fn signals() {
        assert_eq!(parse_signal("TERM").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("sigusr1").unwrap(), Signal::SIGUSR1);
        assert_eq!(parse_signal("3").unwrap(), Signal::SIGQUIT);
        assert!(parse_signal("NOPE").is_err());
    }

    #[test]
    fn parent_of_self() {
        let me = nix::unistd::getpid();
        assert_eq!(parent_of(me), Some(nix::unistd::getppid()));
    }
}
