//! sockbroker holds LISTEN sockets and hands them to the daemons that serve
//! them, so that an old and a new generation of a daemon accept() from one
//! kernel listen queue: a reload drops no connection and adds no delay.
//!
//! # Architecture
//!
//! The broker ([`broker`]) owns a [`registry::Registry`] of held sockets and
//! serves a control socket ([`server`]) speaking multibinder's JSON-RPC
//! protocol ([`protocol`]). A `bind` request travels: bytes →
//! [`protocol::framing`] → [`protocol::bind`] (a [`spec::SocketSpec`]) →
//! [`acl::Policy::check`] (the peer's credentials against the allow rules) →
//! [`registry::Registry::get_or_open`] (which calls [`socket::open`] only for
//! a new key) → a reply with the descriptor attached ([`fd`]). Clients use
//! [`client`]. The broker is never in the data path.
//!
//! The broker upgrades itself without closing anything ([`upgrade`]): on
//! SIGUSR1 it re-executes its binary, and `serve --takeover` moves everything
//! to a new process; both carry the held sockets, the control socket and the
//! open client connections.
//! Sockets another process bound can be taken over live ([`adopt`]):
//! `sockbroker adopt` copies them out (`pidfd_getfd`, or multibinder's own
//! `bind`) and hands them to the broker, which then holds the same kernel
//! sockets.
//! The configuration file ([`config`]) declares sockets, which the broker
//! opens at start and on reload ([`reconfigure`]), and the allow rules; the
//! broker describes itself through [`introspect`].
//!
//! Every local peer that can connect may be hostile: what one peer may cost
//! the broker (connections, time, descriptors in flight, memory, log lines)
//! is bounded by [`limits`], applied by [`server`]; lines about peers' requests
//! are rate-limited per uid by [`peerlog`].

#![deny(missing_docs)]
// `unsafe` is fenced into the three modules that need system calls with no
// safe API (descriptor passing, socket options, what runs between fork and
// exec); each block there says why it is sound.
#![deny(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod acl;
pub mod adopt;
pub mod broker;
pub mod channel;
#[allow(unsafe_code)]
pub mod child;
pub mod cli;
pub mod client;
pub mod config;
pub mod exec;
#[allow(unsafe_code)]
pub mod fd;
pub mod haproxy;
pub mod introspect;
pub mod limits;
pub mod logging;
pub mod manual;
pub mod methods;
pub mod metrics;
pub mod multibinder;
pub mod peerlog;
pub mod protocol;
pub mod reconfigure;
pub mod registry;
pub mod server;
pub mod signals;
#[allow(unsafe_code)]
pub mod socket;
pub mod spec;
pub mod supervisor;
pub mod systemd;
pub mod time;
pub mod upgrade;

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
