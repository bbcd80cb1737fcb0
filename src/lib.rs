//! sockbroker holds LISTEN sockets and hands them to the daemons that serve
//! them, so that an old and a new generation of a daemon accept() from one
//! kernel listen queue: a reload drops no connection and adds no delay.
//!
//! # Architecture
//!
//! The broker ([`daemon`]) owns a [`registry::Registry`] of held sockets and
//! serves a control socket ([`server`]) speaking multibinder's JSON-RPC
//! protocol ([`protocol`]). A `bind` request travels: bytes →
//! [`protocol::framing`] → [`protocol::bind`] (a [`spec::SocketSpec`]) →
//! [`registry::Registry::get_or_open`] (which calls [`socket::open`] only for
//! a new key) → a reply with the descriptor attached ([`fd`]). Clients use
//! [`client`]. The broker is never in the data path.

#![deny(missing_docs)]

pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod fd;
pub mod haproxy;
pub mod logging;
pub mod protocol;
pub mod registry;
pub mod server;
pub mod socket;
pub mod spec;
pub mod systemd;

/// Formats an error with its chain of causes: `a: b: c`, skipping causes
/// whose text the error already includes.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
