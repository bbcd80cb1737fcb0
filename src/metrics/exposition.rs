//! The Prometheus text exposition format (version 0.0.4), written by hand:
//! it is a few lines of escaping, and the broker must not pull an HTTP or
//! registry framework into a process that holds every socket of the host.
//!
//! A [`Exposition`] is a string being built, one metric family at a time:
//! [`Exposition::family`] writes the `# HELP` and `# TYPE` lines and returns
//! a [`Family`] that writes its samples, so every family's samples stay
//! together and each family is declared once (which `promtool check metrics`
//! requires). Names and label names are checked against the format's
//! grammar in debug builds; label values and help texts are escaped.

use std::fmt::Write as _;

/// The kind of a metric family, as `# TYPE` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (reset when the process restarts); its name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// A metric value: counts stay integers, durations and ratios are floats.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// A count.
    Int(u64),
    /// Seconds, a ratio.
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(v)
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Value {
        Value::Int(u64::from(v))
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Value {
        Value::Int(v as u64)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Int(u64::from(v))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Float(v)
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) if v.is_nan() => f.write_str("NaN"),
            Value::Float(v) if v == f64::INFINITY => f.write_str("+Inf"),
            Value::Float(v) if v == f64::NEG_INFINITY => f.write_str("-Inf"),
            Value::Float(v) => write!(f, "{v}"),
        }
    }
}

/// A metrics text being written.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
    #[cfg(debug_assertions)]
    declared: std::collections::HashSet<String>,
}

impl Exposition {
    /// An empty text.
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Declares a family (`# HELP`, `# TYPE`) and returns its sample writer.
    /// A counter's name ends in `_total`; units go in the name
    /// (`_seconds`, `_bytes`).
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> Family<'_> {
        debug_assert!(valid_name(name, true), "metric name {name:?}");
        debug_assert!(kind != Kind::Counter || name.ends_with("_total"), "counter {name} must end in _total");
        #[cfg(debug_assertions)]
        debug_assert!(self.declared.insert(name.to_string()), "family {name} declared twice");
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
        Family { out: &mut self.out, name: name.to_string() }
    }

    /// The text, ending with a newline when not empty.
    pub fn finish(self) -> String {
        self.out
    }
}

/// The samples of one family.
#[derive(Debug)]
pub struct Family<'a> {
    out: &'a mut String,
    name: String,
}

impl Family<'_> {
    /// One sample: `name{label="value",…} value`.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl Into<Value>) -> &mut Self {
        self.out.push_str(&self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (label, text)) in labels.iter().enumerate() {
                debug_assert!(valid_name(label, false) && !label.starts_with("__"), "label name {label:?}");
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(label);
                self.out.push_str("=\"");
                escape_label_into(self.out, text);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", value.into());
        self
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*` for metric names; no `:` in label names.
pub fn valid_name(name: &str, metric: bool) -> bool {
    let ok = |c: char, first: bool| {
        c == '_' || c.is_ascii_alphabetic() || (!first && c.is_ascii_digit()) || (metric && c == ':')
    };
    let mut chars = name.chars();
    chars.next().is_some_and(|c| ok(c, true)) && chars.all(|c| ok(c, false))
}

/// A label value: `\` → `\\`, `"` → `\"`, newline → `\n`.
fn escape_label_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A help text: `\` → `\\`, newline → `\n`.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Writes `text` to `path` atomically for node_exporter's textfile
/// collector: a temporary file in the same folder, then `rename`, so the
/// collector never reads half a file.
pub fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{}: not a file path", path.display()))
    })?;
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_escaping() {
        let mut e = Exposition::new();
        e.family("x_requests_total", Kind::Counter, "Requests.\nBy \\method.")
            .sample(&[("method", "bind"), ("outcome", "ok")], 3u64)
            .sample(&[("method", "a\"b\\c\nd"), ("outcome", "ok")], 0u64);
        e.family("x_up", Kind::Gauge, "Up.").sample(&[], 1u64);
        e.family("x_seconds", Kind::Gauge, "Time.").sample(&[], 0.25).sample(&[("k", "nan")], f64::NAN);
        assert_eq!(
            e.finish(),
            "# HELP x_requests_total Requests.\\nBy \\\\method.\n# TYPE x_requests_total counter\n\
             x_requests_total{method=\"bind\",outcome=\"ok\"} 3\n\
             x_requests_total{method=\"a\\\"b\\\\c\\nd\",outcome=\"ok\"} 0\n\
             # HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n\
             # HELP x_seconds Time.\n# TYPE x_seconds gauge\nx_seconds 0.25\nx_seconds{k=\"nan\"} NaN\n"
        );
    }

    #[test]
    fn names() {
        assert!(valid_name("sockbroker_up", true));
        assert!(valid_name("a:b", true));
        assert!(!valid_name("a:b", false));
        assert!(!valid_name("1a", true));
        assert!(!valid_name("", true));
        assert!(!valid_name("a-b", true));
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = std::env::temp_dir().join(format!("sockbroker-expo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.prom");
        write_atomically(&path, "a 1\n").unwrap();
        write_atomically(&path, "a 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 2\n");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
