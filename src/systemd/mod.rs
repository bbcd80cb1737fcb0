//! What the broker takes from systemd and gives back to it.
//!
//! - [`listen`]: the descriptors systemd passes (`LISTEN_FDS`), taken once;
//! - [`activation`]: what those descriptors become (held sockets, the
//!   control socket), identified from the kernel;
//! - [`fdstore`]: the broker's own sockets kept in systemd's fd store across
//!   broker restarts;
//! - [`notify`]: readiness, status and watchdog (`sd_notify`), a no-op
//!   without `NOTIFY_SOCKET`.

pub mod activation;
pub mod fdstore;
pub mod listen;
pub mod notify;
