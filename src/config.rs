//! Where things are when nobody says otherwise: the embedded default
//! configuration.
//!
//! Order of precedence for the control socket path:
//! - broker: `serve --control PATH`, then `SOCKBROKER_SOCKET`, then the default;
//! - clients: `SOCKBROKER_SOCKET`, then `MULTIBINDER_SOCK` (so multibinder
//!   clients and units work unchanged), then the default.
//!
//! The default is `/run/sockbroker/control.sock` for root,
//! `$XDG_RUNTIME_DIR/sockbroker/control.sock` for other users, and
//! `/tmp/sockbroker-UID/control.sock` when `XDG_RUNTIME_DIR` is unset.

use std::path::{Path, PathBuf};

/// Environment variable naming the control socket (broker and clients).
pub const SOCKET_ENV: &str = "SOCKBROKER_SOCKET";
/// multibinder's environment variable, read by clients after [`SOCKET_ENV`].
pub const MULTIBINDER_ENV: &str = "MULTIBINDER_SOCK";
/// File name of the control socket inside its folder.
pub const CONTROL_FILE: &str = "control.sock";
/// Mode of the control socket: owner and group may connect.
pub const CONTROL_MODE: u32 = 0o660;

/// The default control socket path for the current user.
pub fn default_control_path() -> PathBuf {
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return Path::new("/run/sockbroker").join(CONTROL_FILE);
    }
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir.join("sockbroker").join(CONTROL_FILE),
        _ => PathBuf::from(format!("/tmp/sockbroker-{uid}")).join(CONTROL_FILE),
    }
}

/// The control socket path a client uses.
pub fn client_control_path() -> PathBuf {
    [SOCKET_ENV, MULTIBINDER_ENV]
        .iter()
        .filter_map(std::env::var_os)
        .find(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(default_control_path)
}

/// The control socket path the broker listens on, given `--control`.
pub fn serve_control_path(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| std::env::var_os(SOCKET_ENV).filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(default_control_path)
}
