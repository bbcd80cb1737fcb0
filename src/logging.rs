//! Log set-up, done once by `main`; the library itself only calls `log`.
//!
//! `RUST_LOG` is respected, `info` by default. When stderr is the journal
//! (`JOURNAL_STREAM` names stderr's device and inode), lines carry the
//! `<N>` priority prefixes journald understands and no timestamp of their own.

use std::io::Write;

/// Initialises `env_logger` for the process.
pub fn init() {
    let mut builder = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if connected_to_journal() {
        builder.format(|buf, record| {
            let prio = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(buf, "<{prio}>{}", record.args())
        });
    }
    // Tests and embedders may have set a logger already; keep theirs.
    let _ = builder.try_init();
}

/// Whether stderr is connected to the journal.
fn connected_to_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else { return false };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) else { return false };
    dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino)
}
