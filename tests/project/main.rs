//! What ships besides the server, one test binary: the command line (help,
//! man pages, completions), the unit files under `systemd-analyze verify`,
//! the shape of `src/` (no import cycle), and the docs' markers and figures.

#[path = "../common/mod.rs"]
mod common;

mod architecture;
mod cli;
mod docs;
mod metrics_docs;
mod run_unit;
mod units;
