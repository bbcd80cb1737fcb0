//! Log set-up, done once by `main`; the library itself only calls `log`.
//!
//! `RUST_LOG` is respected, `info` by default. When stderr is the journal
//! (`JOURNAL_STREAM` names stderr's device and inode), lines carry the
//! `<N>` priority prefixes journald understands and no timestamp of their own.
//!
//! Either way a record is exactly one line: control characters in the
//! message are escaped. Messages carry text from clients (method names,
//! addresses, UNIX paths, socket names), and a newline in one would
//! otherwise end the line and let a client write a line of its own into the
//! audit trail (journald makes every line a separate entry).

use std::borrow::Cow;
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
            writeln!(buf, "<{prio}>{}", one_line(&record.args().to_string()))
        });
    } else {
        // env_logger's default format, one line per record.
        builder.format(|buf, record| {
            let level = record.level();
            let style = buf.default_level_style(level);
            let message = record.args().to_string();
            writeln!(
                buf,
                "[{} {style}{level:<5}{style:#} {}] {}",
                buf.timestamp(),
                record.module_path().unwrap_or(record.target()),
                one_line(&message)
            )
        });
    }
    // Tests and embedders may have set a logger already; keep theirs.
    let _ = builder.try_init();
}

/// `text` with control characters (newlines, carriage returns, escape
/// sequences) escaped as `\n`, `\r`, `\u{1b}`.
pub fn one_line(text: &str) -> Cow<'_, str> {
    if text.chars().any(char::is_control) {
        text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
    } else {
        text.into()
    }
}

/// Whether stderr is connected to the journal.
fn connected_to_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else { return false };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) else { return false };
    dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_escapes_control_characters_only() {
        assert_eq!(one_line("tcp://127.0.0.1:80: ok"), "tcp://127.0.0.1:80: ok");
        assert!(matches!(one_line("plain é ✓"), Cow::Borrowed(_)));
        assert_eq!(one_line("a\nb\r\x1b[31mc\td"), "a\\nb\\r\\u{1b}[31mc\\td");
    }
}
