//! Turning the descriptors systemd passed ([`super::listen::take_from_env`]) into
//! held sockets and, possibly, the control socket.
//!
//! Each descriptor is identified from the kernel ([`socket::inspect`]), never
//! by its position (the order differs between systemd versions when several
//! socket units feed one service). Then, in this order:
//! 1. the UNIX stream socket named `control`, or bound at the `--control`
//!    path, becomes the broker's control socket (systemd owns its file);
//! 2. a descriptor whose FDNAME the broker gave it ([`fdstore::decode`])
//!    comes back from the fd store: held with [`Origin::FdStore`];
//! 3. any other socket was declared in a `.socket` unit: held with
//!    [`Origin::Systemd`] under its address key and under its FDNAME, so a
//!    `bind` for `0.0.0.0:80` and a `bind` by name `http` get the same socket.
//!
//! A descriptor the broker cannot use (not a socket, a stream socket that is
//! not listening, a name or address already held) is logged with its number
//! and name, closed, and skipped: the broker carries on with the rest.

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use crate::registry::{Origin, Registry};
use crate::socket;
use crate::spec::{SocketKey, SocketSpec, UnixAddress, UnixKind};
use crate::systemd::fdstore;
use crate::systemd::listen::PassedFd;

/// The FDNAME that marks the control socket (`FileDescriptorName=control`).
pub const CONTROL_NAME: &str = "control";

/// What the passed descriptors became.
#[derive(Debug, Default)]
pub struct Adopted {
    /// The control socket and its path, when systemd passed it.
    pub control: Option<(UnixListener, PathBuf)>,
    /// Sockets held from `.socket` units.
    pub from_systemd: usize,
    /// Sockets held from the fd store.
    pub from_fdstore: usize,
    /// Descriptors skipped.
    pub skipped: usize,
}

/// Adopts every passed descriptor into `registry`; `control_path` is the
/// `--control` path (absolute).
pub fn adopt(passed: Vec<PassedFd>, registry: &mut Registry, control_path: &Path) -> Adopted {
    let mut adopted = Adopted::default();
    for p in passed {
        let what = p.describe();
        let key = match socket::inspect(p.fd.as_fd()) {
            Ok(key) => key,
            Err(e) => {
                log::warn!("LISTEN_FDS: {what}: unusable: {e}; skipped");
                adopted.skipped += 1;
                continue;
            }
        };
        if is_control(&key, p.name.as_deref(), control_path) {
            let SocketKey::Unix { address: UnixAddress::Path(path), .. } = &key else { unreachable!() };
            if adopted.control.is_some() {
                log::warn!("LISTEN_FDS: {what}: {key}: a second control socket; skipped");
                adopted.skipped += 1;
                continue;
            }
            if path != control_path {
                log::info!(
                    "control socket {} from systemd ({what}); --control {} is not used",
                    path.display(),
                    control_path.display()
                );
            }
            adopted.control = Some((UnixListener::from(p.fd), path.clone()));
            continue;
        }
        let (origin, name) = match p.name.as_deref().and_then(fdstore::decode) {
            Some((stored_key, name)) => {
                if let Some(stored_key) = stored_key.filter(|k| *k != key) {
                    log::warn!("LISTEN_FDS: {what}: stored as {stored_key} but the kernel says {key}; held as {key}");
                }
                (Origin::FdStore, name)
            }
            None => (Origin::Systemd, p.name.clone()),
        };
        match registry.adopt(p.fd, SocketSpec::new(key.clone()), name, origin) {
            Ok(_) => {
                log::info!("LISTEN_FDS: {what}: holding {key} ({})", origin_text(origin));
                match origin {
                    Origin::FdStore => adopted.from_fdstore += 1,
                    _ => adopted.from_systemd += 1,
                }
            }
            Err((_fd, conflict)) => {
                log::warn!("LISTEN_FDS: {what}: {key}: {conflict}; skipped");
                adopted.skipped += 1;
            }
        }
    }
    adopted
}

fn is_control(key: &SocketKey, name: Option<&str>, control_path: &Path) -> bool {
    let SocketKey::Unix { kind: UnixKind::Stream, address: UnixAddress::Path(path) } = key else {
        if name == Some(CONTROL_NAME) {
            log::warn!("LISTEN_FDS: the socket named '{CONTROL_NAME}' is {key}, not a UNIX stream socket at a path");
        }
        return false;
    };
    name == Some(CONTROL_NAME) || path == control_path
}

/// How an origin reads in log lines and the status.
pub fn origin_text(origin: Origin) -> &'static str {
    match origin {
        Origin::Systemd => "from systemd",
        Origin::Config => "from the configuration",
        Origin::OnDemand => "on demand",
        Origin::FdStore => "from the fd store",
        Origin::Upgrade => "from the previous broker",
        Origin::Adopted => "copied from another process",
    }
}
