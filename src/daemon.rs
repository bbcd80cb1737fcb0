//! `sockbroker serve`: the broker's life, as one linear story.
//!
//! 1. **Starting**: block the signals the broker handles (they are read from a
//!    signalfd, so no handler runs at an arbitrary point) and raise the
//!    descriptor limit, since every held socket is a descriptor.
//! 2. **Control socket**: create it (refusing to start when another broker
//!    is live on the path), with the owner and group the configuration names.
//! 3. **Declared sockets**: open every `[[socket]]` of the configuration and
//!    register it under its name and key ([`reload::apply`]); a socket that
//!    cannot be opened stops the start, as a failing systemd socket unit.
//! 4. **Serving**: tell systemd READY=1, then serve until a signal. SIGHUP
//!    re-reads the configuration ([`reload::reload`]): Reloading, then back
//!    to Serving whether or not the new file was valid.
//! 5. **Stopping** (SIGTERM, SIGINT): STOPPING=1, remove the control socket,
//!    exit 0. Held sockets close with the process; clients keep theirs.
//!
//! SIGUSR1/SIGUSR2 are blocked too, so a stray signal never kills
//! the broker and with it every held socket.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::config::ControlConfig;
use crate::registry::Registry;
use crate::reload::{self, ApplyError, Live};
use crate::server::{ControlError, ControlSocket, Server, ServerOptions};
use crate::systemd::notify;

/// How `serve` was asked to run.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The control socket path.
    pub control: PathBuf,
    /// Mode of the control socket file.
    pub control_mode: u32,
    /// Idle connections are closed after this long.
    pub idle_timeout: Duration,
    /// The configuration, loaded and validated; applied by `serve`.
    pub config: Live,
}

/// The phases of the broker's life, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Setting up signals and limits.
    Starting,
    /// Answering clients.
    Serving,
    /// Re-reading the configuration (SIGHUP).
    Reloading,
    /// Shutting down after SIGTERM or SIGINT.
    Stopping,
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
}

/// Runs the broker until SIGTERM or SIGINT.
pub fn serve(options: ServeOptions) -> Result<(), ServeError> {
    let mut phase = Phase::Starting;
    log::debug!("phase {phase:?}");
    let signals = block_signals().map_err(ServeError::Signals)?;
    raise_nofile_limit();

    let control = ControlSocket::bind(&options.control, options.control_mode)?;
    chown_control(control.path(), &options.config.config.control)?;
    let registry = Registry::new();
    let server_options = ServerOptions { idle_timeout: options.idle_timeout, ..ServerOptions::default() };
    let mut server = Server::new(control, registry, server_options);
    put_in_force(&mut server, options.config)?;

    phase = Phase::Serving;
    log::info!("serving on {} (pid {})", server.control().path().display(), std::process::id());
    notify::ready(&status_line(&server));

    while phase == Phase::Serving {
        server.serve_until(signals.as_fd()).map_err(ServeError::Loop)?;
        while let Ok(Some(info)) = signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(sig @ (Signal::SIGTERM | Signal::SIGINT)) => {
                    log::info!("{sig}: stopping");
                    phase = Phase::Stopping;
                }
                Ok(Signal::SIGHUP) => {
                    phase = Phase::Reloading;
                    log::info!("SIGHUP: reloading {} (phase {phase:?})", server.live.source);
                    // Failure is logged and reported to systemd by reload();
                    // the old configuration stays in force.
                    let _ = reload::reload(&mut server.live, &mut server.registry);
                    phase = Phase::Serving;
                }
                Ok(sig) => log::info!("{sig}: ignored (nothing to do for it yet)"),
                Err(_) => {}
            }
        }
        notify::status(&status_line(&server));
    }
    notify::stopping();
    log::info!("stopped; {} held sockets closed by exit", server.registry.len());
    Ok(())
}

/// Opens the declared sockets and puts the access rules into force.
fn put_in_force(server: &mut Server, live: Live) -> Result<(), ApplyError> {
    let applied = reload::apply(&mut server.registry, &server.live.config, &live.config)?;
    log::info!(
        "configuration {}: {} declared sockets held, {} allow rules",
        live.source,
        applied.opened.len() + applied.kept.len(),
        applied.rules
    );
    server.live = live;
    Ok(())
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

fn status_line(server: &Server) -> String {
    let line = format!(
        "serving on {}; holding {} sockets; {} clients",
        server.control().path().display(),
        server.registry.len(),
        server.clients()
    );
    // A failed reload stays visible in `systemctl status` until a good one.
    match &server.live.reload_error {
        Some(why) => format!("{line}; last reload failed, old configuration kept: {why}"),
        None => line,
    }
}

/// Blocks the signals the broker handles and returns a signalfd for them.
fn block_signals() -> nix::Result<SignalFd> {
    let mut mask = SigSet::empty();
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGUSR1, Signal::SIGUSR2] {
        mask.add(sig);
    }
    mask.thread_block()?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
}

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
