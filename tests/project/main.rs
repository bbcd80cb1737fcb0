//! What ships besides the server, one test binary: the command line (help,
//! man pages, completions), the unit files under `systemd-analyze verify`,
//! and the shape of `src/` (no import cycle).

#[path = "../common/mod.rs"]
mod common;

mod architecture;
mod cli;
mod run_unit;
mod units;
