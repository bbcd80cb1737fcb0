//! `sockbroker serve`: the broker's life, as one linear story.
//!
//! 1. **Starting**: block the signals the broker handles (they are read from a
//!    signalfd, so no handler runs at an arbitrary point) and raise the
//!    descriptor limit, since every held socket is a descriptor.
//! 2. **Control socket**: take the control socket and held sockets carried
//!    over by a re-exec or a takeover ([`upgrade`]), or else create it
//!    (refusing to start when another broker is live on the path).
//! 3. **Serving**: tell systemd READY=1, then serve until a signal.
//! 4. **Stopping** (SIGTERM, SIGINT): STOPPING=1, remove the control socket,
//!    exit 0. Held sockets close with the process; clients keep theirs.
//! 5. **Upgrading**: SIGUSR1 re-executes the binary at the broker's path,
//!    keeping everything; a `takeover` request from a new broker hands
//!    everything over, then this one exits without removing the control
//!    socket (see [`upgrade`]).
//!
//! SIGHUP and SIGUSR2 are blocked too, so a stray signal never kills the
//! broker and with it every held socket.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::registry::Registry;
use crate::server::{ControlError, ControlSocket, Server, ServerOptions, Wake};
use crate::systemd::notify;
use crate::upgrade::{self, ExecTarget, UpgradeError};

/// How `serve` was asked to run.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The control socket path.
    pub control: PathBuf,
    /// Mode of the control socket file.
    pub control_mode: u32,
    /// Idle connections are closed after this long.
    pub idle_timeout: Duration,
    /// Take over the broker serving on `control` instead of creating it.
    pub takeover: bool,
}

/// The phases of the broker's life, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Setting up signals and limits.
    Starting,
    /// Answering clients.
    Serving,
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
    // Read before anything else: later, the path may hold a newer binary.
    let exec_target = ExecTarget::at_start();
    let signals = block_signals().map_err(ServeError::Signals)?;
    raise_nofile_limit();

    let server_options = ServerOptions { idle_timeout: options.idle_timeout, ..ServerOptions::default() };
    let mut server = match upgrade::carried_in(&options.control, options.takeover)? {
        Some(carried) => carried.into_server(server_options),
        None => {
            let control = ControlSocket::bind(&options.control, options.control_mode)?;
            let mut registry = Registry::new();
            upgrade::adopt_multibinder_env(&mut registry);
            Server::new(control, registry, server_options)
        }
    };

    phase = Phase::Serving;
    log::info!("serving on {} (pid {})", server.control().path().display(), std::process::id());
    notify::ready(&status_line(&server));

    while phase == Phase::Serving {
        if server.serve_until(signals.as_fd()).map_err(ServeError::Loop)? == Wake::Takeover {
            if upgrade::hand_over(&mut server) {
                phase = Phase::HandedOver;
                break;
            }
            continue;
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
                Ok(sig) => log::info!("{sig}: ignored (nothing to do for it yet)"),
                Err(_) => {}
            }
        }
        notify::status(&status_line(&server));
    }
    if phase == Phase::HandedOver {
        return Ok(());
    }
    notify::stopping();
    log::info!("stopped; {} held sockets closed by exit", server.registry.len());
    Ok(())
}

fn status_line(server: &Server) -> String {
    format!(
        "serving on {}; holding {} sockets; {} clients",
        server.control().path().display(),
        server.registry.len(),
        server.clients()
    )
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
