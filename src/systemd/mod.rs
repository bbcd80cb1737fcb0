//! What the broker takes from systemd and gives back to it.
//!
//! - [`notify`]: readiness and status (`sd_notify`), a no-op without
//!   `NOTIFY_SOCKET`.

pub mod notify;
