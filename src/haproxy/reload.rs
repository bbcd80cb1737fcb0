//! `sockbroker haproxy run`: HAProxy in the foreground, reloaded with zero
//! failed connections.
//!
//! One supervisor process (the service's main process) runs generations of
//! HAProxy, each a master-worker instance (`haproxy -Ws`) started from a
//! freshly rendered config:
//!
//! ```text
//! start/reload:  render template (fresh fd@N from the broker)
//!                → haproxy -c with those descriptors open   (fails: old instance serves on)
//!                → spawn haproxy -Ws, NOTIFY_SOCKET = our private socket
//!                → wait for READY=1 (or the pid file)         (exits/times out: soft-stop it, old serves on)
//!                → SIGUSR1 (soft stop) to the previous instance, which drains and exits
//! SIGHUP/SIGUSR2: reload          SIGTERM/SIGINT/SIGUSR1: SIGUSR1 to every instance, wait, exit
//!                                 (a second one: SIGTERM, HAProxy's hard stop)
//! ```
//!
//! Every instance `accept()`s from the broker's sockets, so while the new one
//! starts and the old one drains, connections queue in one kernel listen
//! queue that both serve: none is refused or reset. The supervisor closes its
//! copies of the descriptors as soon as the instance is started; it holds no
//! socket between reloads.
//!
//! It speaks sd_notify to its own service manager: READY=1 once the first
//! instance is ready, RELOADING=1 (with MONOTONIC_USEC) and READY=1 around
//! each reload, STATUS= naming the serving instance or the failed reload.
//!
//! This is HAProxy-specific on purpose (rendering and `haproxy -c` are
//! steps of every generation); the generic `sockbroker run` supervisor
//! (issue 4) shares the readiness protocol.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use libsystemd::daemon::NotifyState;
use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::signalfd::SignalFd;
use nix::unistd::Pid;

use super::args::{ArgsError, HaproxyArgs};
use super::{keep_open_in_child, render_all, HaproxyError, RenderOptions};
use crate::systemd::notify;

/// The nice value of `haproxy -c`.
const CHECK_NICE: i32 = 10;

/// How long HAProxy may take to check a config.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// How the supervisor learns that a new instance serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// READY=1 on the private NOTIFY_SOCKET (`haproxy -Ws`, HAProxy built with systemd support).
    Notify,
    /// The pid file (`-p`) names the new instance's pid.
    Pidfile,
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// How to render the templates.
    pub render: RenderOptions,
    /// How long a new instance may take to become ready.
    pub ready_timeout: Duration,
    /// How readiness is detected.
    pub readiness: Readiness,
}

/// What made the supervisor, or one reload, fail.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// HAProxy's argument list is unusable.
    #[error(transparent)]
    Args(#[from] ArgsError),
    /// `--ready pidfile` without `-p`.
    #[error("--ready pidfile needs HAProxy's -p PIDFILE argument")]
    NoPidfile,
    /// Rendering failed.
    #[error(transparent)]
    Render(Box<HaproxyError>),
    /// `haproxy -c` refused the rendered config.
    #[error("generation {generation}: haproxy -c refused the config ({status}):\n{output}")]
    Check {
        /// The generation that was refused.
        generation: u64,
        /// haproxy -c's exit status.
        status: ExitStatus,
        /// What it printed.
        output: String,
    },
    /// HAProxy could not be started.
    #[error("generation {generation}: cannot run {program}: {source}")]
    Spawn {
        /// The generation.
        generation: u64,
        /// The program.
        program: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The instance exited.
    #[error("generation {generation} (pid {pid}) exited: {status}")]
    Exited {
        /// The generation.
        generation: u64,
        /// Its pid.
        pid: u32,
        /// How it ended.
        status: ExitStatus,
    },
    /// The instance did not become ready in time.
    #[error("generation {generation} (pid {pid}) not ready after {timeout:?}")]
    NotReady {
        /// The generation.
        generation: u64,
        /// Its pid.
        pid: u32,
        /// The limit.
        timeout: Duration,
    },
    /// Stopped by a signal while starting.
    #[error("generation {0}: start interrupted by a stop request")]
    Interrupted(u64),
    /// Setting up the signals, the notify socket or its folder failed.
    #[error("{what}: {source}")]
    Setup {
        /// What was being set up.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl From<HaproxyError> for ReloadError {
    fn from(e: HaproxyError) -> Self {
        ReloadError::Render(Box::new(e))
    }
}

fn setup(what: impl Into<String>) -> impl FnOnce(io::Error) -> ReloadError {
    let what = what.into();
    move |source| ReloadError::Setup { what, source }
}

/// One HAProxy instance.
#[derive(Debug)]
struct Generation {
    number: u64,
    child: Child,
    notify: UnixDatagram,
    notify_path: PathBuf,
    /// When SIGUSR1 was first sent, and how many times it was sent again.
    soft_stop: Option<(Instant, usize)>,
}

/// When SIGUSR1 is sent again to an instance still running, counted from the
/// first one. HAProxy 2.6's master sends READY=1 *before* it installs its
/// SIGUSR1 handler (`mworker_loop`), and a SIGUSR1 that arrives in between is
/// dropped; sending it again is harmless (a second soft stop changes nothing).
const SOFT_STOP_RESENDS: [Duration; 3] =
    [Duration::from_millis(100), Duration::from_millis(500), Duration::from_secs(2)];

impl Generation {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGUSR1 (HAProxy's soft stop) and schedules the resends.
    fn soft_stop(&mut self) {
        self.signal(Signal::SIGUSR1);
        self.soft_stop = Some((Instant::now(), 0));
    }

    /// When the next resend is due, if one is.
    fn resend_due(&self) -> Option<Instant> {
        let (first, sent) = self.soft_stop?;
        SOFT_STOP_RESENDS.get(sent).map(|after| first + *after)
    }

    /// Sends SIGUSR1 again if it is time.
    fn resend_if_due(&mut self, now: Instant) {
        if let (Some(due), Some((first, sent))) = (self.resend_due(), self.soft_stop) {
            if now >= due {
                log::debug!("generation {} (pid {}): SIGUSR1 again", self.number, self.pid());
                self.signal(Signal::SIGUSR1);
                self.soft_stop = Some((first, sent + 1));
            }
        }
    }

    fn signal(&self, sig: Signal) {
        if let Err(e) = kill(Pid::from_raw(self.pid() as i32), sig) {
            log::warn!("generation {} (pid {}): {sig}: {e}", self.number, self.pid());
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.notify_path);
    }
}

/// What the signals asked for since they were last looked at.
#[derive(Debug, Default)]
struct Requests {
    reload: bool,
    stop: u32,
}

struct Supervisor {
    args: HaproxyArgs,
    options: RunOptions,
    signals: SignalFd,
    requests: Requests,
    dir: PathBuf,
    next: u64,
    current: Option<Generation>,
    retiring: Vec<Generation>,
}

/// Runs HAProxy under the supervisor until SIGTERM/SIGINT; returns the exit
/// code of the last serving instance.
pub fn run(argv: &[OsString], options: RunOptions) -> Result<ExitCode, ReloadError> {
    let mut args = HaproxyArgs::parse(argv)?;
    args.rendered_dir = options.render.rendered_dir.clone();
    if options.readiness == Readiness::Pidfile && args.pidfile.is_none() {
        return Err(ReloadError::NoPidfile);
    }
    let signals = crate::signals::block_into_signalfd(&SIGNALS).map_err(|e| setup("blocking signals")(e.into()))?;
    let dir = private_dir()?;
    let mut sup = Supervisor {
        args,
        options,
        signals,
        requests: Requests::default(),
        dir,
        next: 1,
        current: None,
        retiring: Vec::new(),
    };
    let result = sup.main();
    let _ = std::fs::remove_dir_all(&sup.dir);
    result
}

impl Supervisor {
    fn main(&mut self) -> Result<ExitCode, ReloadError> {
        let first = match self.start() {
            Ok(generation) => generation,
            Err(e) => {
                self.stop_all();
                return Err(e);
            }
        };
        self.serving(first);
        notify::ready(&self.status());
        loop {
            if self.requests.stop > 0 {
                notify::stopping();
                return Ok(self.stop_all());
            }
            if std::mem::take(&mut self.requests.reload) {
                self.reload();
                continue;
            }
            if let Some(failure) = self.reap() {
                log::error!("{failure}; stopping");
                notify::status(&failure.to_string());
                self.stop_all();
                return Err(failure);
            }
            let wake = self.resend_soft_stops();
            self.wait_signal(None, wake);
        }
    }

    /// One reload: start the next generation; on success retire the current one.
    fn reload(&mut self) {
        log::info!("reload requested");
        notify::reload_started(None);
        match self.start() {
            Ok(generation) => {
                let number = generation.number;
                self.serving(generation);
                log::info!("reload done: generation {number} serves");
            }
            Err(ReloadError::Interrupted(n)) => log::info!("reload of generation {n} abandoned: stopping"),
            Err(e) => {
                let text = crate::error_chain(&e);
                log::error!("reload failed, the running instance serves on: {text}");
                notify::send(&[
                    NotifyState::Ready,
                    NotifyState::Status(format!("reload failed, {}: {}", self.status(), summary(&e, &text))),
                ]);
                return;
            }
        }
        notify::ready(&self.status());
    }

    /// Makes `generation` the serving one and soft-stops the one it replaces.
    fn serving(&mut self, generation: Generation) {
        if let Some(mut old) = self.current.replace(generation) {
            log::info!("generation {} (pid {}): SIGUSR1, soft stop", old.number, old.pid());
            old.soft_stop();
            self.retiring.push(old);
        }
    }

    fn status(&self) -> String {
        match &self.current {
            Some(g) => {
                format!("serving: generation {} (haproxy pid {}), {} draining", g.number, g.pid(), self.retiring.len())
            }
            None => "starting".to_string(),
        }
    }

    /// Renders, checks and starts the next generation, and waits until it is ready.
    fn start(&mut self) -> Result<Generation, ReloadError> {
        let number = self.next;
        self.next += 1;
        let rendered = render_all(&self.args, &self.options.render)?;
        let fds: Vec<BorrowedFd<'_>> = rendered.iter().flat_map(|r| r.fds.iter().map(|fd| fd.as_fd())).collect();
        let program = self.args.program.to_string_lossy().into_owned();

        self.check(number, &fds)?;

        let notify_path = self.dir.join(format!("notify-{number}.sock"));
        let _ = std::fs::remove_file(&notify_path);
        let notify_sock =
            UnixDatagram::bind(&notify_path).map_err(setup(format!("binding {}", notify_path.display())))?;
        notify_sock.set_nonblocking(true).map_err(setup("notify socket"))?;
        let mut cmd = Command::new(&self.args.program);
        cmd.args(self.args.supervised_args())
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null());
        keep_open_in_child(&mut cmd, &fds);
        soft_stop_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|source| ReloadError::Spawn { generation: number, program, source })?;
        // The instance has its own copies now; ours go.
        drop(fds);
        drop(rendered);
        let mut generation = Generation { number, child, notify: notify_sock, notify_path, soft_stop: None };
        log::info!("generation {number}: started haproxy pid {}", generation.pid());
        match self.wait_ready(&mut generation) {
            Ok(()) => {
                log::info!("generation {number} (pid {}) is ready", generation.pid());
                Ok(generation)
            }
            Err(e) => {
                // It may already accept from the shared queues: a soft stop lets
                // it finish what it took, where a kill would reset it.
                if generation.child.try_wait().ok().flatten().is_none() {
                    generation.soft_stop();
                    self.retiring.push(generation);
                }
                Err(e)
            }
        }
    }

    /// `haproxy -c` on the rendered config, with its descriptors open.
    fn check(&mut self, number: u64, fds: &[BorrowedFd<'_>]) -> Result<(), ReloadError> {
        let program = self.args.program.to_string_lossy().into_owned();
        let spawn_err = |source| ReloadError::Spawn { generation: number, program: program.clone(), source };
        // Output to a file, not a pipe: nothing to drain while waiting with a deadline.
        let log_path = self.dir.join(format!("check-{number}.log"));
        let log = std::fs::File::create(&log_path).map_err(setup(format!("creating {}", log_path.display())))?;
        let mut cmd = Command::new(&self.args.program);
        cmd.args(self.args.check_args())
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(setup("check log"))?)
            .stderr(log);
        keep_open_in_child(&mut cmd, fds);
        lower_priority(&mut cmd);
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let status = loop {
            if let Some(status) = child.try_wait().map_err(spawn_err)? {
                break status;
            }
            let Some(left) = CHECK_TIMEOUT.checked_sub(started.elapsed()) else {
                let _ = child.kill();
                break child.wait().map_err(spawn_err)?;
            };
            // SIGCHLD wakes this up as soon as the check exits.
            self.wait_signal(None, Some(left));
        };
        log::debug!("generation {number}: haproxy -c took {:?}", started.elapsed());
        let output = std::fs::read_to_string(&log_path).unwrap_or_default();
        let _ = std::fs::remove_file(&log_path);
        if !status.success() {
            let output = if started.elapsed() >= CHECK_TIMEOUT {
                format!("killed after {CHECK_TIMEOUT:?}\n{output}")
            } else {
                output
            };
            return Err(ReloadError::Check { generation: number, status, output: output.trim_end().into() });
        }
        Ok(())
    }

    /// Waits for READY=1 (or the pid file), the instance's exit, or the deadline;
    /// handles signals meanwhile.
    fn wait_ready(&mut self, generation: &mut Generation) -> Result<(), ReloadError> {
        let timeout = self.options.ready_timeout;
        let deadline = Instant::now() + timeout;
        let (number, pid) = (generation.number, generation.pid());
        loop {
            if let Some(status) = generation.child.try_wait().ok().flatten() {
                return Err(ReloadError::Exited { generation: number, pid, status });
            }
            if self.requests.stop > 0 {
                return Err(ReloadError::Interrupted(number));
            }
            if self.options.readiness == Readiness::Pidfile && pidfile_names(self.args.pidfile.as_deref(), pid) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ReloadError::NotReady { generation: number, pid, timeout });
            }
            let mut wait = deadline - now;
            if let Some(resend) = self.resend_soft_stops() {
                wait = wait.min(resend);
            }
            if self.options.readiness == Readiness::Pidfile {
                // The pid file gives no event to wait for.
                wait = wait.min(Duration::from_millis(20));
            }
            if self.wait_signal(Some(generation.notify.as_fd()), Some(wait)) && got_ready(&generation.notify) {
                return Ok(());
            }
        }
    }

    /// Waits for a signal (handled here) or for `extra` to be readable; returns
    /// whether `extra` is readable.
    fn wait_signal(&mut self, extra: Option<BorrowedFd<'_>>, timeout: Option<Duration>) -> bool {
        let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
        if let Some(fd) = extra {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
        }
        match poll(&mut fds, crate::signals::poll_timeout(timeout)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => log::warn!("poll: {e}"),
        }
        let extra_ready = fds.get(1).and_then(|f| f.revents()).is_some_and(|r| !r.is_empty());
        let signalled = fds[0].revents().is_some_and(|r| !r.is_empty());
        drop(fds);
        if signalled {
            self.read_signals();
        }
        extra_ready
    }

    fn read_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(sig @ (Signal::SIGHUP | Signal::SIGUSR2)) => {
                    log::info!("{sig}: reload");
                    self.requests.reload = true;
                }
                // SIGUSR1 is HAProxy's own soft stop: a script that sends it to
                // the service's main process gets the same graceful stop.
                Ok(sig @ (Signal::SIGTERM | Signal::SIGINT | Signal::SIGUSR1)) => {
                    self.requests.stop += 1;
                    log::info!("{sig}: stopping{}", if self.requests.stop > 1 { " now (hard stop)" } else { "" });
                    if self.requests.stop > 1 {
                        self.for_each(|g| g.signal(Signal::SIGTERM));
                    }
                }
                Ok(Signal::SIGCHLD) => {}
                Ok(sig) => log::debug!("{sig}: ignored"),
                Err(_) => {}
            }
        }
    }

    fn for_each(&self, f: impl Fn(&Generation)) {
        self.current.iter().chain(self.retiring.iter()).for_each(f);
    }

    /// Collects exited retired instances; returns the serving one's exit as an error.
    fn reap(&mut self) -> Option<ReloadError> {
        let draining = self.retiring.len();
        self.retiring.retain_mut(|g| match g.child.try_wait() {
            Ok(Some(status)) => {
                log::info!("generation {} (pid {}) finished draining: {status}", g.number, g.pid());
                false
            }
            _ => true,
        });
        if self.retiring.len() != draining && self.current.is_some() {
            notify::status(&self.status());
        }
        let current = self.current.as_mut()?;
        let status = current.child.try_wait().ok().flatten()?;
        let g = self.current.take()?;
        Some(ReloadError::Exited { generation: g.number, pid: g.pid(), status })
    }

    /// Sends the SIGUSR1s that are due again; how long until the next one.
    fn resend_soft_stops(&mut self) -> Option<Duration> {
        let now = Instant::now();
        self.retiring.iter_mut().for_each(|g| g.resend_if_due(now));
        self.retiring.iter().filter_map(Generation::resend_due).min().map(|due| due.saturating_duration_since(now))
    }

    /// Soft-stops every instance and waits for all of them; the exit code of
    /// the serving one.
    fn stop_all(&mut self) -> ExitCode {
        log::info!("stopping: SIGUSR1 (soft stop) to every instance");
        let serving = self.current.as_ref().map(|g| g.number);
        if let Some(current) = self.current.take() {
            self.retiring.insert(0, current);
        }
        self.retiring.iter_mut().filter(|g| g.soft_stop.is_none()).for_each(Generation::soft_stop);
        let mut code = ExitCode::SUCCESS;
        while !self.retiring.is_empty() {
            self.retiring.retain_mut(|g| match g.child.try_wait() {
                Ok(Some(status)) => {
                    log::info!("generation {} (pid {}) stopped: {status}", g.number, g.pid());
                    if Some(g.number) == serving && !status.success() {
                        code = ExitCode::from(status.code().and_then(|c| u8::try_from(c).ok()).unwrap_or(1));
                    }
                    false
                }
                _ => true,
            });
            if !self.retiring.is_empty() {
                // A second SIGTERM/SIGINT is handled in read_signals (hard stop).
                let wake = self.resend_soft_stops();
                self.wait_signal(None, wake);
            }
        }
        code
    }
}

/// Makes the instance soft-stop (SIGUSR1: drain, then exit) if the
/// supervisor dies, so no HAProxy is left running unmanaged and none drops
/// the connections it holds. Best effort: HAProxy 2.6 drops a SIGUSR1 that
/// arrives while its master is still starting (see [`SOFT_STOP_RESENDS`]),
/// and a parent-death signal cannot be sent again; such an instance keeps
/// serving until it is stopped (under systemd, with the unit's cgroup).
fn soft_stop_with_parent(cmd: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: runs between fork and exec; prctl and getppid are async-signal-safe
    // system calls and nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGUSR1)?;
            // The supervisor may have died before the prctl took effect.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::other("the supervisor exited"));
            }
            Ok(())
        });
    }
}

/// Runs the check at a lower CPU priority (nice +10): it competes for the CPU
/// with the instance that serves meanwhile, and a slower check costs only
/// reload time, never a connection's latency.
fn lower_priority(cmd: &mut Command) {
    // SAFETY: runs between fork and exec; setpriority is an async-signal-safe
    // system call on the calling process and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, CHECK_NICE) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Whether a notify datagram said READY=1 (reads every queued one).
fn got_ready(sock: &UnixDatagram) -> bool {
    let mut buf = [0u8; 4096];
    let mut ready = false;
    while let Ok(n) = sock.recv(&mut buf) {
        let text = String::from_utf8_lossy(&buf[..n]);
        log::debug!("notify: {}", text.replace('\n', " "));
        ready |= text.lines().any(|l| l == "READY=1");
    }
    ready
}

/// Whether the pid file's first word is `pid`.
fn pidfile_names(path: Option<&Path>, pid: u32) -> bool {
    path.and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| text.split_whitespace().next().and_then(|w| w.parse::<u32>().ok()))
        == Some(pid)
}

/// One line for STATUS=: HAProxy's first alert when the check failed, else
/// the first line of the error.
fn summary<'a>(e: &'a ReloadError, text: &'a str) -> &'a str {
    let alert = match e {
        ReloadError::Check { output, .. } => output.lines().find(|l| l.contains("[ALERT]")),
        _ => None,
    };
    alert.or_else(|| text.lines().next()).unwrap_or("").trim()
}

/// The signals the supervisor handles, read from a signalfd.
const SIGNALS: [Signal; 6] =
    [Signal::SIGTERM, Signal::SIGINT, Signal::SIGUSR1, Signal::SIGHUP, Signal::SIGUSR2, Signal::SIGCHLD];

/// A folder only this process can enter, for the private notify sockets:
/// under `$RUNTIME_DIRECTORY` (systemd's RuntimeDirectory=) or the temp folder.
fn private_dir() -> Result<PathBuf, ReloadError> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|v| v.to_str().and_then(|s| s.split(':').next()).map(PathBuf::from))
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("sockbroker-haproxy.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(setup(format!("creating {}", dir.display())))?;
    Ok(dir)
}
