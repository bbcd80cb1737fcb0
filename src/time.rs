//! Durations as operators write them (`500ms`, `30s`, `2m`, `1h`): a leaf
//! parser shared by the command line ([`crate::cli`]), the configuration
//! ([`crate::config`]) and the supervisor's readiness rules
//! ([`crate::supervisor`]). It imports nothing from the crate, so every
//! module may use it without making an import cycle.

use std::time::Duration;

/// Parses a duration: a number (decimals allowed) and a unit (`ms`, `s` or
/// none, `m`/`min`, `h`). The error names the text and what was wrong.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("'{text}': not a duration (e.g. 500ms, 30s, 2m)"))?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("'{text}': unknown unit '{other}' (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("'{text}': {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3 parsecs").is_err());
    }
}
