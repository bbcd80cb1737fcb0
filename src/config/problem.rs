//! What is wrong in a configuration file, and where: a [`Problem`] is one
//! fault with its FILE:LINE:COLUMN and the key at fault (`socket[0].listen`),
//! a [`ProblemKind`] what is wrong with the value. Spans (byte offsets from
//! [`toml::Spanned`]) become lines and columns through a [`LineIndex`];
//! a TOML syntax error's key is found by [`key_at`].

use std::collections::HashMap;
use std::ops::Range;

use crate::acl::PatternError;
use crate::spec::{SocketKey, SpecError};

/// One thing wrong in a file, where it is, and the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}:{column}: {key}: {kind}")]
pub struct Problem {
    /// The file.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The key at fault, as a path (`socket[0].listen`).
    pub key: String,
    /// What is wrong.
    pub kind: ProblemKind,
}

impl Problem {
    /// A TOML syntax error (or unknown key, or wrong type) at `span`: the
    /// key is the one written on that line, under its table.
    pub(super) fn syntax(text: &str, origin: &str, span: Option<Range<usize>>, message: &str) -> Problem {
        let (line, column) = line_col(text, span.clone().unwrap_or(0..0).start);
        let key = key_at(text, span);
        Problem { file: origin.to_string(), line, column, key, kind: ProblemKind::Syntax(message.to_string()) }
    }
}

/// What is wrong with a value.
#[derive(Debug, thiserror::Error)]
pub enum ProblemKind {
    /// TOML syntax, an unknown key or a value of the wrong type.
    #[error("{0}")]
    Syntax(String),
    /// An address that is not a socket.
    #[error("{0}")]
    Address(#[source] SpecError),
    /// An `on_demand` pattern that does not parse.
    #[error("{0}")]
    Pattern(#[source] PatternError),
    /// A name declared twice.
    #[error("name '{name}' is already declared on line {first}")]
    DuplicateName {
        /// The name.
        name: String,
        /// The line of the first declaration.
        first: usize,
    },
    /// An address declared twice.
    #[error("{key} is already declared on line {first}")]
    DuplicateAddress {
        /// The address.
        key: SocketKey,
        /// The line of the first declaration.
        first: usize,
    },
    /// A number outside its range.
    #[error("{value} is out of range ({min}-{max})")]
    Range {
        /// The value written.
        value: i64,
        /// Smallest allowed.
        min: i64,
        /// Largest allowed.
        max: i64,
    },
    /// A user that the user database does not know.
    #[error("unknown user '{0}'")]
    UnknownUser(String),
    /// A group that the group database does not know.
    #[error("unknown group '{0}'")]
    UnknownGroup(String),
    /// A mode that is not an octal string up to 07777.
    #[error("'{0}' is not a mode (an octal string such as \"0660\")")]
    BadMode(String),
    /// A socket name unusable as a key or systemd FDNAME.
    #[error("'{0}' is not a socket name (1-255 printable ASCII characters, no ':' or spaces)")]
    BadName(String),
    /// An option set on a socket it does not apply to.
    #[error("applies to {applies} sockets only, not {key}")]
    NotApplicable {
        /// Which sockets it is for.
        applies: &'static str,
        /// The socket it was set on.
        key: SocketKey,
    },
    /// A rule that names nobody, or more than one kind of peer.
    #[error("a rule takes exactly one of anyone = true, user, uid, group, gid")]
    Who,
    /// A rule that grants nothing.
    #[error("a rule grants nothing: give sockets = [names], on_demand = [patterns] and/or introspect = true")]
    Grants,
    /// A duration that does not parse.
    #[error("{0}")]
    BadDuration(String),
    /// `[metrics] socket` names no declared stream socket.
    #[error("'{0}' is not the name of a declared TCP or UNIX stream socket (a [[socket]] with this name)")]
    MetricsSocket(String),
    /// An interface name the kernel would refuse.
    #[error("'{0}' is not an interface name (1-15 characters, no '/', ':' or spaces)")]
    BadInterface(String),
}

/// Where each line starts, so that every span becomes a line and column in
/// O(log n): a large file has one span per value.
pub(super) struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    pub(super) fn new(text: &str) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub(super) fn line_col(&self, text: &str, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.starts.partition_point(|&start| start <= offset);
        let start = self.starts[line - 1];
        (line, text[start..offset].chars().count() + 1)
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    LineIndex::new(text).line_col(text, offset)
}

/// The key at a syntax error's position, as a path (`socket[1].backlog`):
/// the enclosing table header, and the key written on the error's line.
fn key_at(text: &str, span: Option<Range<usize>>) -> String {
    let Some(span) = span else { return "(file)".into() };
    let (line, _) = line_col(text, span.start);
    let mut table = String::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut key = None;
    for (n, raw) in text.lines().enumerate().take(line) {
        let l = raw.trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let idx = counts.entry(name.clone()).and_modify(|c| *c += 1).or_insert(0);
            table = format!("{name}[{idx}]");
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = name.trim().to_string();
        } else if n + 1 == line {
            key = l.split_once('=').map(|(k, _)| k.trim().trim_matches('"').to_string());
        }
    }
    match (table.is_empty(), key) {
        (true, Some(k)) => k,
        (false, Some(k)) => format!("{table}.{k}"),
        (false, None) => table,
        (true, None) => "(file)".into(),
    }
}
