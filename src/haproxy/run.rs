//! `sockbroker haproxy run`: HAProxy in the foreground, reloaded with zero
//! failed connections.
//!
//! This is `sockbroker run`'s generation supervisor ([`crate::supervisor`])
//! with HAProxy as the daemon: every generation is a master-worker instance
//! (`haproxy -Ws`) started from a freshly rendered config.
//!
//! ```text
//! start/reload:  render template (fresh fd@N from the broker)     [Haproxy::start]
//!                → spawn haproxy -Ws, NOTIFY_SOCKET = the supervisor's private socket
//!                → wait for READY=1 (or the pid file)              (exits: haproxy -c says why
//!                                                                   [explain_failure]; old serves on;
//!                                                                   times out: soft-stop it, old serves on)
//!                → --ready-grace, then SIGUSR1 (soft stop) to the previous instance, which drains and exits
//! SIGHUP/SIGUSR2: reload          SIGTERM/SIGINT/SIGUSR1: SIGUSR1 to every instance, wait, exit
//!                                 (a second one: SIGTERM, HAProxy's hard stop)
//! ```
//!
//! Every instance `accept()`s from the broker's sockets, so while the new one
//! starts and the old one drains, connections queue in one kernel listen
//! queue that both serve: none is refused or reset. This process closes its
//! copies of the descriptors as soon as the instance is started; it holds no
//! socket between reloads.
//!
//! The supervisor speaks sd_notify to its own service manager: READY=1 once
//! the first instance is ready, RELOADING=1 (with MONOTONIC_USEC) and READY=1
//! around each reload, STATUS= naming the serving instance or the failed
//! reload ([`Haproxy`]'s status line).

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::args::{ArgsError, HaproxyArgs};
use super::{render_all, HaproxyError, RenderOptions};
use crate::child::Priority;
use crate::supervisor::{self, Daemon, StatusView, Supervision};

/// How long `haproxy -c` may take when it explains a failed start.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// When SIGUSR1 is sent again to an instance still running, counted from the
/// first one. HAProxy 2.6's master sends READY=1 *before* it installs its
/// SIGUSR1 handler (`mworker_loop`), and a SIGUSR1 that arrives in between is
/// dropped; sending it again is harmless (a second soft stop changes nothing).
const SOFT_STOP_RESENDS: [Duration; 3] =
    [Duration::from_millis(100), Duration::from_millis(500), Duration::from_secs(2)];

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
    /// What a new instance must show after READY=1.
    pub proof: supervisor::Proof,
    /// How long and how many old instances may drain.
    pub drain: supervisor::Drain,
    /// How long a reload's instance may start at idle CPU priority.
    pub idle_start: Option<Duration>,
    /// `--metrics-file`, `--metrics-name`.
    pub metrics: supervisor::metrics::MetricsOptions,
}

/// What made one generation fail to start.
#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
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
    /// Setting up the folder for the checks' output failed.
    #[error("{what}: {source}")]
    Setup {
        /// What was being set up.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl From<HaproxyError> for GenerationError {
    fn from(e: HaproxyError) -> Self {
        GenerationError::Render(Box::new(e))
    }
}

fn setup(what: impl Into<String>) -> impl FnOnce(io::Error) -> GenerationError {
    let what = what.into();
    move |source| GenerationError::Setup { what, source }
}

/// Runs HAProxy under the supervisor until SIGTERM/SIGINT/SIGUSR1; returns
/// the exit code of the last serving instance.
pub fn run(argv: &[OsString], options: RunOptions) -> Result<ExitCode, HaproxyError> {
    let mut args = HaproxyArgs::parse(argv).map_err(GenerationError::from)?;
    args.rendered_dir = options.render.rendered_dir.clone();
    let ready = match options.readiness {
        Readiness::Notify => supervisor::Readiness::Notify,
        Readiness::Pidfile => supervisor::Readiness::PidFile(args.pidfile.clone().ok_or(GenerationError::NoPidfile)?),
    };
    let how = Supervision {
        ready,
        ready_timeout: options.ready_timeout,
        reload_signals: &[Signal::SIGHUP, Signal::SIGUSR2],
        // SIGUSR1 is HAProxy's own soft stop: a script that sends it to the
        // service's main process gets the same graceful stop.
        stop_signals: &[Signal::SIGTERM, Signal::SIGINT, Signal::SIGUSR1],
        retire_signal: Signal::SIGUSR1,
        stop_signal: Signal::SIGUSR1,
        hard_stop_signal: Some(Signal::SIGTERM),
        resend_after: &SOFT_STOP_RESENDS,
        // HAProxy drains as long as its connections last (hard-stop-after
        // bounds it, and --drain-timeout), and systemd's TimeoutStopSec=
        // bounds the service.
        stop_timeout: None,
        proof: options.proof.clone(),
        drain: options.drain,
        idle_start: options.idle_start,
        metrics: options.metrics.clone(),
    };
    let render = options.render;
    Ok(supervisor::supervise(how, move || Haproxy::new(args, render))?)
}

/// HAProxy as a daemon of the generation supervisor: each generation renders
/// the templates, checks the result with `haproxy -c` and starts
/// `haproxy -Ws -db` holding the rendered descriptors at their numbers.
#[derive(Debug)]
pub struct Haproxy {
    args: HaproxyArgs,
    render: RenderOptions,
    /// A folder only this process can enter, for the checks' output.
    dir: PathBuf,
    /// Copies of the last started instance's sockets, for the supervisor's
    /// accept-queue samples ([`supervisor::metrics`]).
    watched: Vec<OwnedFd>,
}

impl Haproxy {
    /// Prepares the private folder; nothing is rendered yet.
    pub fn new(args: HaproxyArgs, render: RenderOptions) -> Result<Haproxy, GenerationError> {
        Ok(Haproxy { args, render, dir: private_dir()?, watched: Vec::new() })
    }

    /// `haproxy -c` on the rendered config, with its descriptors open; run
    /// only to explain a failed start, so it may block the supervisor (at
    /// most [`CHECK_TIMEOUT`]).
    fn check(&self, number: u64, fds: &[BorrowedFd<'_>]) -> Result<(), GenerationError> {
        let program = self.args.program.to_string_lossy().into_owned();
        let spawn_err = |source| GenerationError::Spawn { generation: number, program: program.clone(), source };
        // Output to a file, not a pipe: nothing to drain while waiting with a deadline.
        let log_path = self.dir.join(format!("check-{number}.log"));
        let log = std::fs::File::create(&log_path).map_err(setup(format!("creating {}", log_path.display())))?;
        let mut cmd = Command::new(&self.args.program);
        cmd.args(self.args.check_args())
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(setup("check log"))?)
            .stderr(log);
        crate::child::prepare(&mut cmd, fds, None);
        let started = Instant::now();
        let child = cmd.spawn().map_err(spawn_err)?;
        let pid = Pid::from_raw(child.id() as i32);
        // This pid alone: the supervisor's waitpid(-1) is not running
        // meanwhile (one thread), and its generations stay unreaped.
        let (status, killed) = crate::child::wait_with_deadline(pid, CHECK_TIMEOUT).map_err(|e| spawn_err(e.into()))?;
        log::info!("generation {number}: haproxy -c took {:.1?}", started.elapsed());
        let output = std::fs::read_to_string(&log_path).unwrap_or_default();
        let _ = std::fs::remove_file(&log_path);
        if !status.success() {
            let output = if killed { format!("killed after {CHECK_TIMEOUT:?}\n{output}") } else { output };
            return Err(GenerationError::Check { generation: number, status, output: output.trim_end().into() });
        }
        Ok(())
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Daemon for Haproxy {
    type Error = GenerationError;

    /// Renders generation `number` and starts it. There is no `haproxy -c`
    /// first: the new master parses the config before it says READY=1 and
    /// exits if it refuses it, so a check would only parse it a second time
    /// on the reload's path (it did: about half of a reload's time). A
    /// refused config fails the reload all the same, and the old instance
    /// was never touched; [`Daemon::explain_failure`] then runs `haproxy -c`
    /// to say why, with HAProxy's own words.
    fn start(
        &mut self,
        number: u64,
        env: &[(&str, Option<OsString>)],
        priority: Priority,
    ) -> Result<Pid, GenerationError> {
        let t0 = Instant::now();
        let rendered = render_all(&self.args, &self.render)?;
        let fds: Vec<BorrowedFd<'_>> = rendered.iter().flat_map(|r| r.fds.iter().map(|fd| fd.as_fd())).collect();
        let t1 = Instant::now();

        let mut cmd = Command::new(&self.args.program);
        cmd.args(self.args.supervised_args()).stdin(Stdio::null());
        // HAProxy takes its sockets as fd@N, never by LISTEN_FDS.
        for key in crate::systemd::listen::LISTEN_ENV {
            cmd.env_remove(key);
        }
        for (key, value) in env {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        // See SOFT_STOP_WITH_PARENT for why SIGUSR1.
        crate::child::prepare_with(&mut cmd, &fds, Some(SOFT_STOP_WITH_PARENT), priority);
        let program = self.args.program.to_string_lossy().into_owned();
        let child = cmd.spawn().map_err(|source| GenerationError::Spawn { generation: number, program, source })?;
        self.watched = fds
            .iter()
            .filter(|fd| crate::socket::accept_queue(**fd).is_ok())
            .filter_map(|fd| fd.try_clone_to_owned().ok())
            .collect();
        // The instance has its own copies now; ours go. The supervisor reaps
        // it with waitpid(-1): dropping `child` neither waits nor kills.
        drop(fds);
        drop(rendered);
        log::info!(
            "generation {number}: started haproxy pid {} (render {:.1?}, spawn {:.1?})",
            child.id(),
            t1 - t0,
            t1.elapsed()
        );
        Ok(Pid::from_raw(child.id() as i32))
    }

    fn watched(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.watched)
    }

    fn explain_failure(&mut self, number: u64) -> Option<GenerationError> {
        let rendered = match render_all(&self.args, &self.render) {
            Ok(r) => r,
            Err(e) => return Some(e.into()),
        };
        let fds: Vec<BorrowedFd<'_>> = rendered.iter().flat_map(|r| r.fds.iter().map(|fd| fd.as_fd())).collect();
        self.check(number, &fds).err()
    }

    /// HAProxy's first alert when the check failed, else the first line of the error.
    fn summary(&self, e: &GenerationError) -> String {
        let text = crate::error_chain(e);
        let alert = match e {
            GenerationError::Check { output, .. } => output.lines().find(|l| l.contains("[ALERT]")),
            _ => None,
        };
        alert.or_else(|| text.lines().next()).unwrap_or("").trim().to_string()
    }

    fn status_line(&self, view: &StatusView<'_>) -> String {
        let status = match view.serving {
            Some((number, pid)) => {
                format!("serving: generation {number} (haproxy pid {pid}), {} draining", view.draining)
            }
            None => "starting".to_string(),
        };
        // Until a reload succeeds, the line says the last one failed: the
        // serving instance is the old one, whatever else changed since.
        match view.last_failure {
            Some(failure) => format!("reload failed, {status}: {failure}"),
            None => status,
        }
    }
}

/// The signal an instance gets when the supervisor dies: SIGUSR1, a soft
/// stop (drain, then exit), so no HAProxy is left running unmanaged and
/// none drops the connections it holds. Best effort: HAProxy 2.6 drops a
/// SIGUSR1 that arrives while its master is still starting (see
/// [`SOFT_STOP_RESENDS`]), and a parent-death signal cannot be sent again;
/// such an instance keeps serving until it is stopped (under systemd, with
/// the unit's cgroup).
const SOFT_STOP_WITH_PARENT: Signal = Signal::SIGUSR1;

/// A folder only this process can enter, for the checks' output: under
/// `$RUNTIME_DIRECTORY` (systemd's RuntimeDirectory=) or the temp folder.
fn private_dir() -> Result<PathBuf, GenerationError> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|v| v.to_str().and_then(|s| s.split(':').next()).map(PathBuf::from))
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("sockbroker-haproxy.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(setup(format!("creating {}", dir.display())))?;
    Ok(dir)
}
