//! `sockbroker serve`: the broker's life, as one linear story.
//!
//! 1. **Starting**: take the descriptors systemd passed (`LISTEN_FDS`, read
//!    and unset before any thread exists), block the signals the broker
//!    handles (they are read from a signalfd, so no handler runs at an
//!    arbitrary point) and raise the descriptor limit, since every held
//!    socket is a descriptor.
//! 2. **Adopting**: take the control socket and held sockets carried over by
//!    a re-exec or a takeover ([`upgrade`]); otherwise identify each passed
//!    descriptor from the kernel and hold it: sockets from `.socket` units,
//!    sockets given back by the fd store, and the control socket when systemd
//!    owns it ([`activation`]).
//! 3. **Control socket**: carried over, passed by systemd, or created at the
//!    path (refusing to start when another broker is live on it), with the
//!    owner and group the configuration names.
//! 4. **Declared sockets**: with `--adopt-orphans`, first copy each declared
//!    socket that another process still holds out of it ([`crate::adopt`]);
//!    then open every `[[socket]]` of the configuration that
//!    is not held yet and register it under its name and key
//!    ([`reconfigure::apply`]); adopted sockets with the same address get the
//!    declared name. A socket that cannot be opened stops the start, as a
//!    failing systemd socket unit would.
//! 5. **Serving**: tell systemd READY=1 (only now: every passed and declared
//!    socket is held and the control socket listens), then serve until a
//!    signal, updating STATUS= when the held sockets change and sending
//!    WATCHDOG=1 when systemd asks for it. SIGHUP re-reads the configuration
//!    ([`reconfigure::reload`]): Reloading, then back to Serving whether or not the
//!    new file was valid.
//! 6. **Stopping** (SIGTERM, SIGINT): STOPPING=1, remove the control socket
//!    (unless systemd owns it), exit 0. Held sockets close with the process;
//!    clients keep theirs, and systemd keeps its copies (fd store).
//! 7. **Upgrading**: SIGUSR1 re-executes the binary at the broker's path,
//!    keeping everything; a `takeover` request from a new broker hands
//!    everything over, then this one exits without removing the control
//!    socket (see [`upgrade`]).
//!
//! SIGUSR2 is blocked too, so a stray signal never kills the broker and with
//! it every held socket.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::config::ControlConfig;
use crate::reconfigure::{self, ApplyError, Live};
use crate::registry::{Origin, Registry};
use crate::server::{ControlError, ControlSocket, Server, ServerOptions, Wake};
use crate::systemd::{activation, listen, notify};
use crate::upgrade::{self, ExecTarget, UpgradeError};

/// How `serve` was asked to run.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The control socket path.
    pub control: PathBuf,
    /// Mode of the control socket file.
    pub control_mode: u32,
    /// Idle connections are closed after this long (`--idle-timeout`;
    /// otherwise `limits.idle_timeout`).
    pub idle_timeout: Option<Duration>,
    /// Take over the broker serving on `control` instead of creating it.
    pub takeover: bool,
    /// The configuration, loaded and validated; applied by `serve`.
    pub config: Live,
    /// Before opening declared sockets, copy those another process still
    /// holds out of it ([`crate::adopt::adopt_orphans`]).
    pub adopt_orphans: bool,
}

/// The shortest time between two STATUS= updates.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// The phases of the broker's life, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Taking passed descriptors, setting up signals and limits.
    Starting,
    /// Holding the sockets systemd passed.
    Adopting,
    /// Answering clients.
    Serving,
    /// Re-reading the configuration (SIGHUP).
    Reloading,
    /// Shutting down after SIGTERM or SIGINT.
    Stopping,
    /// A new broker took everything over; exiting without cleanup.
    HandedOver,
}

/// Why the broker could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Signals could not be routed to the signalfd.
    #[error("setting up signal handling: {0}")]
    Signals(#[source] nix::Error),
    /// The control socket could not be created.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The configuration could not be put into force.
    #[error(transparent)]
    Config(#[from] ApplyError),
    /// The control socket could not be given its owner and group.
    #[error("control socket {path}: setting owner and group: {source}")]
    ControlOwner {
        /// The control socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The control loop failed.
    #[error("control loop: {0}")]
    Loop(#[source] std::io::Error),
    /// What a previous broker handed over could not be taken.
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
}

/// Runs the broker until SIGTERM or SIGINT.
pub fn serve(options: ServeOptions) -> Result<(), ServeError> {
    let mut phase = Phase::Starting;
    log::debug!("phase {phase:?}");
    // First, while the broker is still single-threaded: take_from_env
    // changes the environment.
    let passed = listen::take_from_env();
    // Read before anything else: later, the path may hold a newer binary.
    let exec_target = ExecTarget::at_start();
    let signals = crate::signals::block_into_signalfd(&SIGNALS).map_err(ServeError::Signals)?;
    raise_nofile_limit();

    phase = Phase::Adopting;
    log::debug!("phase {phase:?}");
    let server_options = ServerOptions { idle_timeout: options.idle_timeout };
    let control_path = ControlSocket::absolute(&options.control)?;
    let mut server = match upgrade::carried_in(&control_path, options.takeover)? {
        Some(carried) => {
            if !passed.is_empty() {
                // systemd keeps its own copies; the carried registry is the
                // broker's state and already holds what it had adopted.
                log::warn!("{} passed descriptors ignored: sockets were carried over by an upgrade", passed.len());
            }
            let server = carried.into_server(server_options).map_err(ServeError::Loop)?;
            log::info!(
                "serving on {} (pid {}) after an upgrade; {} sockets carried over",
                server.control().path().display(),
                std::process::id(),
                server.registry.len()
            );
            server
        }
        None => {
            let mut registry = Registry::new();
            let adopted = activation::adopt(passed, &mut registry, &control_path);
            let control = match adopted.control {
                // systemd made the socket file and removes it: owned_inode None.
                Some((listener, path)) => ControlSocket::from_listener(listener, path, None)?,
                None => {
                    let control = ControlSocket::bind(&control_path, options.control_mode)?;
                    chown_control(control.path(), &options.config.config.control)?;
                    control
                }
            };
            crate::multibinder::adopt_multibinder_env(&mut registry);
            let server = Server::new(control, registry, server_options).map_err(ServeError::Loop)?;
            log::info!(
                "serving on {} (pid {}); {} sockets from systemd, {} from the fd store, {} passed descriptors skipped",
                server.control().path().display(),
                std::process::id(),
                adopted.from_systemd,
                adopted.from_fdstore,
                adopted.skipped
            );
            server
        }
    };
    if options.adopt_orphans {
        let n = crate::adopt::adopt_orphans(&mut server.registry, &options.config.config.sockets);
        log::info!("--adopt-orphans: {n} declared sockets copied from the processes that held them");
    }
    let metrics_socket = options.config.config.metrics_socket.clone();
    let metrics_interval = options.config.config.limits.metrics_interval;
    put_in_force(&mut server, options.config)?;
    if let Some(name) = metrics_socket {
        serve_metrics(&server, &name, metrics_interval);
    }

    phase = Phase::Serving;
    let watchdog = notify::watchdog_interval();
    if let Some(every) = watchdog {
        log::info!("systemd watchdog: pinging every {every:?}");
    }
    let mut status = status_line(&server);
    notify::ready(&status);
    let mut status_sent = Instant::now();
    // A STATUS= line lists what the broker holds, which costs O(n log n) to
    // build: when sockets change quickly (a template with 1,000 binds), it is
    // sent at most once per STATUS_INTERVAL rather than once per socket.
    let mut status_due: Option<Instant> = None;
    let mut next_ping = watchdog.map(|every| Instant::now() + every);
    if watchdog.is_some() {
        notify::watchdog();
    }

    while phase == Phase::Serving {
        let deadline = next_ping.into_iter().chain(status_due).min();
        let wake = server.serve_until_deadline(signals.as_fd(), deadline).map_err(ServeError::Loop)?;
        if wake == Wake::Takeover {
            if upgrade::hand_over(&mut server) {
                phase = Phase::HandedOver;
                break;
            }
            continue;
        }
        let now = Instant::now();
        if let (Some(every), Some(due)) = (watchdog, next_ping) {
            if now >= due {
                notify::watchdog();
                next_ping = Some(now + every);
            }
        }
        if wake == Wake::Changed && status_due.is_none() {
            status_due = Some(status_sent + STATUS_INTERVAL);
        }
        if status_due.is_some_and(|due| now >= due) {
            status_due = None;
            let now_status = status_line(&server);
            if now_status != status {
                status = now_status;
                notify::status(&status);
                status_sent = now;
            }
        }
        while let Ok(Some(info)) = signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(sig @ (Signal::SIGTERM | Signal::SIGINT)) => {
                    log::info!("{sig}: stopping");
                    phase = Phase::Stopping;
                }
                Ok(Signal::SIGUSR1) => match &exec_target {
                    // Returns only when the re-exec did not happen.
                    Ok(target) => {
                        upgrade::reexec(&server, target);
                    }
                    Err(e) => log::error!("SIGUSR1: cannot re-exec: the binary's path was unknown at start: {e}"),
                },
                Ok(Signal::SIGHUP) => {
                    phase = Phase::Reloading;
                    log::info!("SIGHUP: reloading {} (phase {phase:?})", server.live.source);
                    // Failure is logged and reported to systemd by reload();
                    // the old configuration stays in force.
                    let _ = reconfigure::reload(&mut server.live, &mut server.registry);
                    phase = Phase::Serving;
                    status_due = Some(now);
                }
                Ok(sig) => log::info!("{sig}: ignored (nothing to do for it yet)"),
                Err(_) => {}
            }
        }
    }
    if phase == Phase::HandedOver {
        return Ok(());
    }
    notify::stopping();
    log::info!("stopped; {} held sockets closed by exit", server.registry.len());
    Ok(())
}

/// STATUS=: where the broker serves and what it holds, by origin, with the
/// first few sockets by name or key (`systemctl status` shows one line).
fn status_line(server: &Server) -> String {
    let count = |origin| server.registry.iter().filter(|h| h.origin == origin).count();
    let mut sockets: Vec<String> = server
        .registry
        .iter()
        .map(|h| match &h.name {
            Some(name) => format!("{name}={}", h.key()),
            None => h.key().to_string(),
        })
        .collect();
    sockets.sort();
    let shown = sockets.len().min(4);
    let more = if sockets.len() > shown { format!(", +{} more", sockets.len() - shown) } else { String::new() };
    let adopted = match count(Origin::Adopted) {
        0 => String::new(),
        n => format!(", {n} adopted"),
    };
    let line = format!(
        "serving on {}; holding {} sockets ({} from systemd, {} from the fd store, {} on demand, {} declared{adopted}){}{}{}",
        server.control().path().display(),
        server.registry.len(),
        count(Origin::Systemd),
        count(Origin::FdStore),
        count(Origin::OnDemand),
        count(Origin::Config),
        if shown > 0 { ": " } else { "" },
        sockets[..shown].join(", "),
        more
    );
    // A failed reload stays visible in `systemctl status` until a good one.
    match &server.live.reload_error {
        Some(why) => format!("{line}; last reload failed, old configuration kept: {why}"),
        None => line,
    }
}

/// Opens the declared sockets and puts the access rules into force.
fn put_in_force(server: &mut Server, live: Live) -> Result<(), ApplyError> {
    let applied = reconfigure::apply(&mut server.registry, &server.live.config, &live.config)?;
    log::info!(
        "configuration {}: {} declared sockets held, {} allow rules",
        live.source,
        applied.opened.len() + applied.kept.len(),
        applied.rules
    );
    server.live = live;
    Ok(())
}

/// Starts `GET /metrics` on the declared socket `name` (`[metrics] socket`);
/// a failure is logged, and the broker serves on without it.
fn serve_metrics(server: &Server, name: &str, interval: std::time::Duration) {
    let Some(held) = server.registry.named(name) else {
        log::warn!("[metrics] socket: '{name}' is not held; metrics are not served over HTTP");
        return;
    };
    let started = held
        .fd()
        .try_clone_to_owned()
        .and_then(|fd| crate::metrics::http::spawn(fd, server.control().path().to_path_buf(), interval));
    match started {
        Ok(()) => log::info!("serving GET /metrics on {} ('{name}')", held.key()),
        Err(e) => log::warn!("[metrics] socket {}: {e}; metrics are not served over HTTP", held.key()),
    }
}

/// Gives the control socket the owner and group the configuration names.
/// The file was created with its final mode, so until this runs it is only
/// more restricted (owned by the broker's user), never less.
fn chown_control(path: &std::path::Path, control: &ControlConfig) -> Result<(), ServeError> {
    if control.owner.is_none() && control.group.is_none() {
        return Ok(());
    }
    std::os::unix::fs::lchown(path, control.owner, control.group)
        .map_err(|source| ServeError::ControlOwner { path: path.to_path_buf(), source })
}

/// The signals the broker handles, read from a signalfd.
const SIGNALS: [Signal; 5] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGUSR1, Signal::SIGUSR2];

/// Raises the soft limit on open descriptors to the hard limit: the broker
/// holds one descriptor per socket, and the default soft limit (1024) is far
/// below what a busy host needs.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                log::warn!("could not raise the descriptor limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => log::warn!("could not read the descriptor limit: {e}"),
    }
}
