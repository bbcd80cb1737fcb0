//! The broker through its control socket, one test binary: the real
//! `sockbroker serve` (started by `common::Broker`), judged by what a client,
//! the kernel and /proc see. One module per concern.

#[path = "../common/mod.rs"]
mod common;

mod access;
mod config;
mod descriptors;
mod hostile;
mod introspect;
mod lifecycle;
mod metrics;
mod metrics_http;
mod multibinder_compat;
mod options;
mod protocol;
mod sockets;
mod systemd_activate;
mod upgrade;
