//! The programs the broker's commands start, supervise or adopt, one test
//! binary: `exec`, `run`, `haproxy` (real HAProxy), `adopt` (real nginx,
//! HAProxy, Python daemons), each against a real broker from `common::Broker`.

#[path = "../common/mod.rs"]
mod common;

mod adopt;
mod exec;
mod haproxy;
mod idle_start;
mod run;
mod scale;
mod supervisor_metrics;
