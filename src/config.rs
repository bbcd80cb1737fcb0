//! The configuration: where it comes from, what it may say, and how it is
//! checked before anything uses it.
//!
//! # Pipeline
//!
//! ```text
//!  --config FILE ─┐
//!  /etc/sockbroker/sockbroker.toml (if it exists) ─┼─▶ Source ──read──▶ text
//!  embedded default (no file at all) ─┘
//!
//!  text ──toml + serde──▶ ConfigFile ──validate──▶ Config ──▶ daemon / reload
//!        syntax, unknown keys,          addresses, names, duplicates,
//!        wrong types: the first         users, groups, modes, ranges,
//!        error, with its position       options that do not fit: every
//!                                       error, each with FILE:LINE:COLUMN
//! ```
//!
//! [`ConfigFile`] mirrors the TOML (`deny_unknown_fields`, and
//! [`toml::Spanned`] on every value a later check may refuse, so an error
//! found after parsing still names its line and column). [`validate`]
//! resolves it into a [`Config`]: socket specs, uids and gids, modes as
//! numbers, allow rules ([`crate::acl`]). Nothing outside this module sees a
//! `ConfigFile`. `sockbroker check` runs the same pipeline and prints every
//! [`Problem`]; `serve` refuses to start, and a reload keeps the old
//! configuration, on any of them. `docs/config.md` documents every key.
//!
//! # Control socket path
//!
//! Order of precedence:
//! - broker: `serve --control PATH`, then `SOCKBROKER_SOCKET`, then
//!   `[control] path` from the configuration, then the default;
//! - clients: `SOCKBROKER_SOCKET`, then `MULTIBINDER_SOCK` (so multibinder
//!   clients and units work unchanged), then the default.
//!
//! The default is `/run/sockbroker/control.sock` for root,
//! `$XDG_RUNTIME_DIR/sockbroker/control.sock` for other users, and
//! `/tmp/sockbroker-UID/control.sock` when `XDG_RUNTIME_DIR` is unset.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::acl::{AddressPattern, PatternError, Rule, UnixFile, Who};
use crate::limits::Limits;
use crate::spec::{SocketKey, SocketOptions, SocketSpec, SpecError, Transport, UnixAddress};

/// Environment variable naming the control socket (broker and clients).
pub const SOCKET_ENV: &str = "SOCKBROKER_SOCKET";
/// multibinder's environment variable, read by clients after [`SOCKET_ENV`].
pub const MULTIBINDER_ENV: &str = "MULTIBINDER_SOCK";
/// File name of the control socket inside its folder.
pub const CONTROL_FILE: &str = "control.sock";
/// Mode of the control socket: owner and group may connect.
pub const CONTROL_MODE: u32 = 0o660;

/// The default control socket path for the current user.
pub fn default_control_path() -> PathBuf {
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return Path::new("/run/sockbroker").join(CONTROL_FILE);
    }
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir.join("sockbroker").join(CONTROL_FILE),
        _ => PathBuf::from(format!("/tmp/sockbroker-{uid}")).join(CONTROL_FILE),
    }
}

/// `$XDG_RUNTIME_DIR` when `path` lies under it and it does not exist: the
/// cause to name instead of a bare "Permission denied" or "No such file".
pub fn missing_runtime_dir(path: &Path) -> Option<PathBuf> {
    let runtime = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from)?;
    (runtime.is_absolute() && path.starts_with(&runtime) && !runtime.exists()).then_some(runtime)
}

/// The control socket path a client uses.
pub fn client_control_path() -> PathBuf {
    [SOCKET_ENV, MULTIBINDER_ENV]
        .iter()
        .filter_map(std::env::var_os)
        .find(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(default_control_path)
}

/// The control socket path the broker listens on, given `--control` (and no
/// configuration file).
pub fn serve_control_path(flag: Option<&Path>) -> PathBuf {
    serve_control_path_with(flag, None)
}

/// The configuration file read when `--config` is not given, if it exists.
pub const SYSTEM_CONFIG: &str = "/etc/sockbroker/sockbroker.toml";

/// The configuration used when there is no file at all: no declared socket,
/// no allow rule (so only root and the broker's own uid are served), the
/// default control socket.
pub const EMBEDDED_DEFAULT: &str = "\
# sockbroker's built-in configuration, used when no file exists.
# No declared socket and no allow rule: root and the broker's own uid only.
";

/// Where the configuration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file.
    File(PathBuf),
    /// [`EMBEDDED_DEFAULT`].
    Embedded,
}

impl Source {
    /// `--config FILE` when given; else [`SYSTEM_CONFIG`] when it exists;
    /// else the embedded default.
    pub fn resolve(flag: Option<&Path>) -> Source {
        match flag {
            Some(path) => Source::File(path.to_path_buf()),
            None if Path::new(SYSTEM_CONFIG).exists() => Source::File(SYSTEM_CONFIG.into()),
            None => Source::Embedded,
        }
    }

    /// Reads and validates the configuration.
    pub fn load(&self) -> Result<Config, ConfigError> {
        match self {
            Source::File(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                parse(&text, &path.display().to_string())
            }
            Source::Embedded => parse(EMBEDDED_DEFAULT, &self.to_string()),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(path) => write!(f, "{}", path.display()),
            Source::Embedded => f.write_str("(built-in default)"),
        }
    }
}

/// The file as written: every key the TOML may hold, nothing else.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `[control]`: the control socket.
    #[serde(default)]
    pub control: ControlFile,
    /// `[[socket]]`: the sockets the broker opens at start and holds.
    #[serde(default, rename = "socket")]
    pub sockets: Vec<SocketFile>,
    /// `[[allow]]`: who may have what.
    #[serde(default)]
    pub allow: Vec<AllowFile>,
    /// `[limits]`: what one peer may cost the broker ([`Limits`]).
    #[serde(default)]
    pub limits: LimitsFile,
}

/// `[limits]`: every key is optional; see [`Limits`] for meaning and default.
/// Durations are strings (`"10s"`, `"500ms"`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct LimitsFile {
    pub max_clients: Option<Spanned<i64>>,
    pub reserved_clients: Option<Spanned<i64>>,
    pub max_clients_per_uid: Option<Spanned<i64>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub request_timeout: Option<Spanned<String>>,
    pub max_request_bytes: Option<Spanned<i64>>,
    pub max_batch: Option<Spanned<i64>>,
    pub max_fds_in_flight_per_connection: Option<Spanned<i64>>,
    pub max_fds_in_flight_per_uid: Option<Spanned<i64>>,
    pub unread_timeout: Option<Spanned<String>>,
    pub max_queued_bytes_per_connection: Option<Spanned<i64>>,
    pub max_queued_bytes: Option<Spanned<i64>>,
    pub list_page_max: Option<Spanned<i64>>,
    pub log_burst: Option<Spanned<i64>>,
    pub log_per_minute: Option<Spanned<i64>>,
}

/// `[control]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlFile {
    /// Path of the control socket. Default: see the module doc.
    pub path: Option<Spanned<String>>,
    /// Permission bits, an octal string. Default `"0660"`: owner and group
    /// may connect, so access to the broker is given by group membership.
    pub mode: Option<Spanned<String>>,
    /// Owner (name or number). Default: the broker's user.
    pub owner: Option<Spanned<String>>,
    /// Group (name or number). Default: the broker's group.
    pub group: Option<Spanned<String>>,
}

/// One `[[socket]]`: a socket the broker opens at start and holds under a
/// name. Option defaults are the kernel's unless said otherwise.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketFile {
    /// The name clients (and `[[allow]] sockets`) use. Required.
    pub name: Spanned<String>,
    /// The address, in the one text form (`tcp://[::]:443`). Required.
    pub listen: Spanned<String>,
    /// `listen()` backlog. Default 1000, as multibinder.
    pub backlog: Option<Spanned<i64>>,
    /// `SO_REUSEADDR`. Default on for TCP (as multibinder), off otherwise.
    pub reuse_addr: Option<Spanned<bool>>,
    /// `SO_REUSEPORT`. Default off.
    pub reuse_port: Option<Spanned<bool>>,
    /// `IPV6_V6ONLY`, IPv6 addresses only. Default: `net.ipv6.bindv6only`.
    pub ipv6_only: Option<Spanned<bool>>,
    /// `IP_FREEBIND`. Default off.
    pub freebind: Option<Spanned<bool>>,
    /// `IP_TRANSPARENT`. Default off.
    pub transparent: Option<Spanned<bool>>,
    /// `SO_BINDTODEVICE`, an interface name. Default: none.
    pub bind_to_device: Option<Spanned<String>>,
    /// `TCP_DEFER_ACCEPT`, seconds. Default: none.
    pub defer_accept: Option<Spanned<i64>>,
    /// `TCP_FASTOPEN` queue length. Default: none.
    pub fast_open: Option<Spanned<i64>>,
    /// `SO_KEEPALIVE`. Default off.
    pub keepalive: Option<Spanned<bool>>,
    /// `TCP_KEEPIDLE`, seconds.
    pub keepalive_idle: Option<Spanned<i64>>,
    /// `TCP_KEEPINTVL`, seconds.
    pub keepalive_interval: Option<Spanned<i64>>,
    /// `TCP_KEEPCNT`.
    pub keepalive_count: Option<Spanned<i64>>,
    /// `TCP_NODELAY`. Default off.
    pub no_delay: Option<Spanned<bool>>,
    /// `SO_RCVBUF`, bytes.
    pub receive_buffer: Option<Spanned<i64>>,
    /// `SO_SNDBUF`, bytes.
    pub send_buffer: Option<Spanned<i64>>,
    /// `SO_MARK`.
    pub mark: Option<Spanned<i64>>,
    /// `SO_BROADCAST`, UDP only. Default off.
    pub broadcast: Option<Spanned<bool>>,
    /// UNIX socket file mode, octal string. Default: 0777 minus the umask.
    pub mode: Option<Spanned<String>>,
    /// UNIX socket file owner. Default: the broker's user.
    pub user: Option<Spanned<String>>,
    /// UNIX socket file group. Default: the broker's group.
    pub group: Option<Spanned<String>>,
}

/// One `[[allow]]` rule: exactly one of `anyone`, `user`, `uid`, `group`,
/// `gid`, and at least one of `sockets`, `on_demand`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowFile {
    /// Every peer.
    pub anyone: Option<Spanned<bool>>,
    /// A user name.
    pub user: Option<Spanned<String>>,
    /// A uid.
    pub uid: Option<Spanned<i64>>,
    /// A group name (primary or supplementary membership).
    pub group: Option<Spanned<String>>,
    /// A gid.
    pub gid: Option<Spanned<i64>>,
    /// Names of held sockets granted; `"*"` for all.
    #[serde(default)]
    pub sockets: Vec<Spanned<String>>,
    /// Address patterns granted, created on demand ([`AddressPattern`]).
    #[serde(default)]
    pub on_demand: Vec<Spanned<String>>,
    /// Grants `list` and `status`. Default false.
    pub introspect: Option<Spanned<bool>>,
    /// Mode of the UNIX socket files `on_demand` creates, octal string.
    /// Default `"0660"`.
    pub socket_mode: Option<Spanned<String>>,
    /// Owner of those files (name or number). Default: the uid that asked.
    pub socket_owner: Option<Spanned<String>>,
    /// Group of those files (name or number). Default: the gid that asked.
    pub socket_group: Option<Spanned<String>>,
}

/// The validated configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Where it was read from, for messages.
    pub origin: String,
    /// The control socket.
    pub control: ControlConfig,
    /// Declared sockets, in file order.
    pub sockets: Vec<Declared>,
    /// Allow rules, in file order.
    pub rules: Vec<Rule>,
    /// The limits of the control socket.
    pub limits: Limits,
}

/// The control socket settings; `None` means the default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControlConfig {
    /// Path.
    pub path: Option<PathBuf>,
    /// Permission bits.
    pub mode: Option<u32>,
    /// Owner uid.
    pub owner: Option<u32>,
    /// Group gid.
    pub group: Option<u32>,
}

/// A declared socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    /// Its name.
    pub name: String,
    /// What to open.
    pub spec: SocketSpec,
    /// Where it was declared (`FILE:LINE`).
    pub source: String,
}

/// The configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file has problems; every one is listed.
    #[error("{origin}: invalid configuration:\n{}", list(.problems))]
    Invalid {
        /// The file.
        origin: String,
        /// What is wrong, in file order.
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n")
}

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
    /// An interface name the kernel would refuse.
    #[error("'{0}' is not an interface name (1-15 characters, no '/', ':' or spaces)")]
    BadInterface(String),
}

/// Parses and validates configuration text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let file: ConfigFile = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let problem = Validator::new(text, origin).problem(
            span,
            &key_at(text, e.span()),
            ProblemKind::Syntax(e.message().trim().to_string()),
        );
        ConfigError::Invalid { origin: origin.to_string(), problems: vec![problem] }
    })?;
    validate(file, text, origin)
}

/// Turns a parsed file into a [`Config`], collecting every problem.
pub fn validate(file: ConfigFile, text: &str, origin: &str) -> Result<Config, ConfigError> {
    let mut v = Validator::new(text, origin);
    let control = v.control(&file.control);
    let mut sockets: Vec<Declared> = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut keys: HashMap<SocketKey, usize> = HashMap::new();
    for (i, s) in file.sockets.iter().enumerate() {
        let at = |k: &str| format!("socket[{i}].{k}");
        let name = s.name.get_ref();
        let name_ok = valid_name(name);
        if !name_ok {
            v.push(s.name.span(), at("name"), ProblemKind::BadName(name.clone()));
        } else if let Some(first) = names.get(name) {
            v.push(s.name.span(), at("name"), ProblemKind::DuplicateName { name: name.clone(), first: *first });
        } else {
            names.insert(name.clone(), v.line(s.name.span().start));
        }
        let key = match s.listen.get_ref().parse::<SocketKey>() {
            Ok(key) => key,
            Err(e) => {
                v.push(s.listen.span(), at("listen"), ProblemKind::Address(e));
                continue;
            }
        };
        if let Some(first) = keys.get(&key) {
            v.push(s.listen.span(), at("listen"), ProblemKind::DuplicateAddress { key: key.clone(), first: *first });
        } else {
            keys.insert(key.clone(), v.line(s.listen.span().start));
        }
        let options = v.socket_options(i, s, &key);
        if name_ok {
            let source = format!("{origin}:{}", v.line(s.name.span().start));
            sockets.push(Declared { name: name.clone(), spec: SocketSpec { key, options }, source });
        }
    }
    let rules = file.allow.iter().enumerate().filter_map(|(i, a)| v.rule(i, a)).collect();
    let limits = v.limits(&file.limits);
    if v.problems.is_empty() {
        Ok(Config { origin: origin.to_string(), control, sockets, rules, limits })
    } else {
        Err(ConfigError::Invalid { origin: origin.to_string(), problems: v.problems })
    }
}

/// A name is FDNAME-compatible (systemd's fd store keeps it) and readable:
/// not empty, no space.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(' ') && crate::systemd::listen::fdname_is_valid(name)
}

/// Collects problems while resolving values.
struct Validator<'a> {
    text: &'a str,
    origin: &'a str,
    lines: LineIndex,
    problems: Vec<Problem>,
}

impl<'a> Validator<'a> {
    fn new(text: &'a str, origin: &'a str) -> Self {
        Validator { text, origin, lines: LineIndex::new(text), problems: Vec::new() }
    }

    fn line(&self, offset: usize) -> usize {
        self.lines.line_col(self.text, offset).0
    }

    fn problem(&self, span: Range<usize>, key: &str, kind: ProblemKind) -> Problem {
        let (line, column) = self.lines.line_col(self.text, span.start);
        Problem { file: self.origin.to_string(), line, column, key: key.to_string(), kind }
    }

    fn push(&mut self, span: Range<usize>, key: String, kind: ProblemKind) {
        let p = self.problem(span, &key, kind);
        self.problems.push(p);
    }

    fn control(&mut self, c: &ControlFile) -> ControlConfig {
        let mut out = ControlConfig::default();
        if let Some(path) = &c.path {
            match SocketKey::unix(crate::spec::UnixKind::Stream, path.get_ref()) {
                Ok(SocketKey::Unix { address: UnixAddress::Path(p), .. }) => out.path = Some(p),
                Ok(_) => self.push(
                    path.span(),
                    "control.path".into(),
                    ProblemKind::Address(SpecError::RelativePath(path.get_ref().into())),
                ),
                Err(e) => self.push(path.span(), "control.path".into(), ProblemKind::Address(e)),
            }
        }
        out.mode = c.mode.as_ref().and_then(|m| self.mode(m, "control.mode"));
        out.owner = c.owner.as_ref().and_then(|u| self.user(u, "control.owner"));
        out.group = c.group.as_ref().and_then(|g| self.group(g, "control.group"));
        out
    }

    fn mode(&mut self, m: &Spanned<String>, key: &str) -> Option<u32> {
        let text = m.get_ref();
        match u32::from_str_radix(text, 8) {
            Ok(mode) if mode <= 0o7777 && !text.is_empty() => Some(mode),
            _ => {
                self.push(m.span(), key.into(), ProblemKind::BadMode(text.clone()));
                None
            }
        }
    }

    fn user(&mut self, u: &Spanned<String>, key: &str) -> Option<u32> {
        let name = u.get_ref();
        if let Ok(uid) = name.parse::<u32>() {
            return Some(uid);
        }
        match nix::unistd::User::from_name(name) {
            Ok(Some(user)) => Some(user.uid.as_raw()),
            _ => {
                self.push(u.span(), key.into(), ProblemKind::UnknownUser(name.clone()));
                None
            }
        }
    }

    fn group(&mut self, g: &Spanned<String>, key: &str) -> Option<u32> {
        let name = g.get_ref();
        if let Ok(gid) = name.parse::<u32>() {
            return Some(gid);
        }
        match nix::unistd::Group::from_name(name) {
            Ok(Some(group)) => Some(group.gid.as_raw()),
            _ => {
                self.push(g.span(), key.into(), ProblemKind::UnknownGroup(name.clone()));
                None
            }
        }
    }

    fn int(&mut self, value: &Option<Spanned<i64>>, key: String, min: i64, max: i64) -> Option<u32> {
        let v = value.as_ref()?;
        let n = *v.get_ref();
        if (min..=max).contains(&n) {
            u32::try_from(n).ok()
        } else {
            self.push(v.span(), key, ProblemKind::Range { value: n, min, max });
            None
        }
    }

    fn socket_options(&mut self, i: usize, s: &SocketFile, key: &SocketKey) -> SocketOptions {
        let at = |k: &str| format!("socket[{i}].{k}");
        let (tcp, udp, v6, unix_path) = match key {
            SocketKey::Inet { transport, addr } => {
                (*transport == Transport::Tcp, *transport == Transport::Udp, addr.is_ipv6(), false)
            }
            SocketKey::Unix { address, .. } => (false, false, false, matches!(address, UnixAddress::Path(_))),
        };
        let inet = tcp || udp;
        // Options that do not fit the socket are errors, not silently ignored:
        // someone expected them to do something.
        let fits = |v: &mut Self, span: Option<Range<usize>>, name: &str, ok: bool, applies: &'static str| {
            if let (Some(span), false) = (span, ok) {
                v.push(span, at(name), ProblemKind::NotApplicable { applies, key: key.clone() });
            }
        };
        let b = |x: &Option<Spanned<bool>>| x.as_ref().map(|v| *v.get_ref());
        let sp_b = |x: &Option<Spanned<bool>>| x.as_ref().map(Spanned::span);
        let sp_i = |x: &Option<Spanned<i64>>| x.as_ref().map(Spanned::span);
        let sp_s = |x: &Option<Spanned<String>>| x.as_ref().map(Spanned::span);
        let listening = key.is_listening_kind();
        fits(self, sp_i(&s.backlog), "backlog", listening, "listening (tcp, unix, unix-seqpacket)");
        for (name, x) in [
            ("reuse_addr", &s.reuse_addr),
            ("reuse_port", &s.reuse_port),
            ("freebind", &s.freebind),
            ("transparent", &s.transparent),
        ] {
            fits(self, sp_b(x), name, inet, "tcp and udp");
        }
        fits(self, sp_b(&s.ipv6_only), "ipv6_only", v6, "IPv6");
        fits(self, sp_s(&s.bind_to_device), "bind_to_device", inet, "tcp and udp");
        for (name, x) in [("keepalive", &s.keepalive), ("no_delay", &s.no_delay)] {
            fits(self, sp_b(x), name, tcp, "tcp");
        }
        for (name, x) in [
            ("defer_accept", &s.defer_accept),
            ("fast_open", &s.fast_open),
            ("keepalive_idle", &s.keepalive_idle),
            ("keepalive_interval", &s.keepalive_interval),
            ("keepalive_count", &s.keepalive_count),
        ] {
            fits(self, sp_i(x), name, tcp, "tcp");
        }
        fits(self, sp_i(&s.mark), "mark", inet, "tcp and udp");
        fits(self, sp_b(&s.broadcast), "broadcast", udp, "udp");
        for (name, x) in [("mode", &s.mode), ("user", &s.user), ("group", &s.group)] {
            fits(self, sp_s(x), name, unix_path, "UNIX path (not @abstract)");
        }

        let defaults = SocketOptions::default();
        let max = i64::from(i32::MAX);
        let bind_to_device = s.bind_to_device.as_ref().and_then(|d| {
            let name = d.get_ref();
            let ok =
                (1..=15).contains(&name.len()) && name.bytes().all(|c| c.is_ascii_graphic() && c != b'/' && c != b':');
            if !ok {
                self.push(d.span(), at("bind_to_device"), ProblemKind::BadInterface(name.clone()));
            }
            ok.then(|| name.clone())
        });
        SocketOptions {
            backlog: self.int(&s.backlog, at("backlog"), 1, max).unwrap_or(defaults.backlog),
            reuse_addr: b(&s.reuse_addr),
            reuse_port: b(&s.reuse_port).unwrap_or(false),
            ipv6_only: b(&s.ipv6_only),
            freebind: b(&s.freebind).unwrap_or(false),
            transparent: b(&s.transparent).unwrap_or(false),
            bind_to_device,
            defer_accept: self.int(&s.defer_accept, at("defer_accept"), 0, max),
            fast_open: self.int(&s.fast_open, at("fast_open"), 0, max),
            keepalive: b(&s.keepalive).unwrap_or(false),
            keepalive_idle: self.int(&s.keepalive_idle, at("keepalive_idle"), 1, 32767),
            keepalive_interval: self.int(&s.keepalive_interval, at("keepalive_interval"), 1, 32767),
            keepalive_count: self.int(&s.keepalive_count, at("keepalive_count"), 1, 127),
            no_delay: b(&s.no_delay).unwrap_or(false),
            receive_buffer: self.int(&s.receive_buffer, at("receive_buffer"), 1, max / 2),
            send_buffer: self.int(&s.send_buffer, at("send_buffer"), 1, max / 2),
            mark: self.int(&s.mark, at("mark"), 0, i64::from(u32::MAX)),
            broadcast: b(&s.broadcast).unwrap_or(false),
            mode: s.mode.as_ref().and_then(|m| self.mode(m, &at("mode"))),
            user: s.user.as_ref().and_then(|u| self.user(u, &at("user"))),
            group: s.group.as_ref().and_then(|g| self.group(g, &at("group"))),
        }
    }

    fn rule(&mut self, i: usize, a: &AllowFile) -> Option<Rule> {
        let at = |k: &str| format!("allow[{i}].{k}");
        let mut who = Vec::new();
        let mut first_span = None;
        let mut note = |span: Range<usize>| {
            first_span.get_or_insert(span);
        };
        if let Some(x) = &a.anyone {
            note(x.span());
            if *x.get_ref() {
                who.push(Some(Who::Anyone));
            }
        }
        if let Some(u) = &a.user {
            note(u.span());
            who.push(self.user(u, &at("user")).map(Who::Uid));
        }
        if let Some(u) = &a.uid {
            note(u.span());
            who.push(self.int(&a.uid, at("uid"), 0, i64::from(u32::MAX)).map(Who::Uid));
        }
        if let Some(g) = &a.group {
            note(g.span());
            who.push(self.group(g, &at("group")).map(Who::Gid));
        }
        if let Some(g) = &a.gid {
            note(g.span());
            who.push(self.int(&a.gid, at("gid"), 0, i64::from(u32::MAX)).map(Who::Gid));
        }
        // A rule without any who-key has no span of its own; point at its grants.
        let span = first_span
            .or_else(|| a.sockets.first().map(Spanned::span))
            .or_else(|| a.on_demand.first().map(Spanned::span))
            .unwrap_or(0..0);
        if who.len() != 1 {
            self.push(span.clone(), format!("allow[{i}]"), ProblemKind::Who);
        }
        let introspect = a.introspect.as_ref().is_some_and(|x| *x.get_ref());
        if a.sockets.is_empty() && a.on_demand.is_empty() && !introspect {
            self.push(span.clone(), format!("allow[{i}]"), ProblemKind::Grants);
        }
        let mut sockets = Vec::new();
        for (j, s) in a.sockets.iter().enumerate() {
            if s.get_ref() == "*" || valid_name(s.get_ref()) {
                sockets.push(s.get_ref().clone());
            } else {
                self.push(s.span(), format!("allow[{i}].sockets[{j}]"), ProblemKind::BadName(s.get_ref().clone()));
            }
        }
        let mut on_demand = Vec::new();
        for (j, p) in a.on_demand.iter().enumerate() {
            match p.get_ref().parse::<AddressPattern>() {
                Ok(p) => on_demand.push(p),
                Err(e) => self.push(p.span(), format!("allow[{i}].on_demand[{j}]"), ProblemKind::Pattern(e)),
            }
        }
        let unix_file = UnixFile {
            owner: a.socket_owner.as_ref().and_then(|u| self.user(u, &at("socket_owner"))),
            group: a.socket_group.as_ref().and_then(|g| self.group(g, &at("socket_group"))),
            mode: a.socket_mode.as_ref().and_then(|m| self.mode(m, &at("socket_mode"))),
        };
        let who = who.into_iter().next().flatten()?;
        let source = format!("{}:{}", self.origin, self.line(span.start));
        Some(Rule { who, sockets, on_demand, introspect, unix_file, source })
    }

    fn limits(&mut self, l: &LimitsFile) -> Limits {
        let d = Limits::default();
        let max = i64::from(i32::MAX);
        let mut n = |v: &Option<Spanned<i64>>, key: &str, min: i64, default: usize| {
            self.int(v, format!("limits.{key}"), min, max).map_or(default, |x| x as usize)
        };
        let mut out = Limits {
            max_clients: n(&l.max_clients, "max_clients", 1, d.max_clients),
            reserved_clients: n(&l.reserved_clients, "reserved_clients", 0, d.reserved_clients),
            max_clients_per_uid: n(&l.max_clients_per_uid, "max_clients_per_uid", 1, d.max_clients_per_uid),
            max_request_bytes: n(&l.max_request_bytes, "max_request_bytes", 1024, d.max_request_bytes),
            max_batch: n(&l.max_batch, "max_batch", 1, d.max_batch),
            max_fds_in_flight_per_connection: n(
                &l.max_fds_in_flight_per_connection,
                "max_fds_in_flight_per_connection",
                1,
                d.max_fds_in_flight_per_connection,
            ),
            max_fds_in_flight_per_uid: n(
                &l.max_fds_in_flight_per_uid,
                "max_fds_in_flight_per_uid",
                1,
                d.max_fds_in_flight_per_uid,
            ),
            max_queued_bytes_per_connection: n(
                &l.max_queued_bytes_per_connection,
                "max_queued_bytes_per_connection",
                1,
                d.max_queued_bytes_per_connection,
            ),
            max_queued_bytes: n(&l.max_queued_bytes, "max_queued_bytes", 1, d.max_queued_bytes),
            list_page_max: n(&l.list_page_max, "list_page_max", 1, d.list_page_max),
            log_burst: n(&l.log_burst, "log_burst", 1, d.log_burst as usize) as u32,
            log_per_minute: n(&l.log_per_minute, "log_per_minute", 1, d.log_per_minute as usize) as u32,
            ..d
        };
        for (value, key, slot) in [
            (&l.idle_timeout, "idle_timeout", &mut out.idle_timeout),
            (&l.request_timeout, "request_timeout", &mut out.request_timeout),
            (&l.unread_timeout, "unread_timeout", &mut out.unread_timeout),
        ] {
            if let Some(v) = value {
                match crate::time::parse_duration(v.get_ref()) {
                    Ok(t) if !t.is_zero() => *slot = t,
                    Ok(_) => {
                        self.push(v.span(), format!("limits.{key}"), ProblemKind::BadDuration("must not be 0".into()))
                    }
                    Err(e) => self.push(v.span(), format!("limits.{key}"), ProblemKind::BadDuration(e)),
                }
            }
        }
        if out.reserved_clients >= out.max_clients {
            if let Some(v) = &l.reserved_clients {
                self.push(
                    v.span(),
                    "limits.reserved_clients".into(),
                    ProblemKind::Range { value: *v.get_ref(), min: 0, max: out.max_clients as i64 - 1 },
                );
            } else {
                out.reserved_clients = out.max_clients / 2;
            }
        }
        out
    }
}

/// Where each line starts, so that every span becomes a line and column in
/// O(log n): a large file has one span per value.
struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    /// 1-based line and column (in characters) of a byte offset.
    fn line_col(&self, text: &str, offset: usize) -> (usize, usize) {
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

/// The control socket path the broker listens on: `--control`, then
/// `SOCKBROKER_SOCKET`, then the configuration, then the default.
pub fn serve_control_path_with(flag: Option<&Path>, config: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| std::env::var_os(SOCKET_ENV).filter(|v| !v.is_empty()).map(PathBuf::from))
        .or_else(|| config.map(Path::to_path_buf))
        .unwrap_or_else(default_control_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match parse(text, "t.toml") {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems, .. }) => problems.iter().map(|p| p.to_string()).collect(),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn full_example() {
        let c = parse(
            r#"
[control]
path = "/run/x/control.sock"
mode = "0640"
group = "root"

[[socket]]
name = "https"
listen = "tcp://[::]:443"
backlog = 4096
ipv6_only = false

[[socket]]
name = "app"
listen = "unix:/run/app.sock"
mode = "0600"
user = "root"

[[allow]]
group = "root"
sockets = ["https"]
on_demand = ["tcp://127.0.0.1:8000-8999"]
"#,
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.control.mode, Some(0o640));
        assert_eq!(c.control.group, Some(0));
        assert_eq!(c.sockets.len(), 2);
        assert_eq!(c.sockets[0].spec.options.backlog, 4096);
        assert_eq!(c.sockets[0].spec.options.ipv6_only, Some(false));
        assert_eq!(c.sockets[1].spec.options.mode, Some(0o600));
        assert_eq!(c.rules[0].who, Who::Gid(0));
        assert_eq!(c.rules[0].source, "t.toml:20");
    }

    #[test]
    fn every_problem_with_its_place() {
        let p = problems("[[socket]]\nname = \"a\"\nlisten = \"tcp://127.0.0.1:70000\"\n");
        assert_eq!(p, ["t.toml:3:10: socket[0].listen: port 70000 is out of range (1-65535)"]);
        let p = problems("[[socket]]\nname = \"a\"\nlisten = \"tcp://127.0.0.1:80\"\nbogus = 1\n");
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("t.toml:4:1: socket[0].bogus: unknown field `bogus`"), "{p:?}");
        let p = problems(
            "[[socket]]\nname = \"a\"\nlisten = \"udp://127.0.0.1:80\"\nno_delay = true\n\
             [[socket]]\nname = \"a\"\nlisten = \"udp://127.0.0.1:80\"\n",
        );
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("socket[0].no_delay: applies to tcp sockets only"), "{p:?}");
        assert!(p[1].contains("t.toml:6:8: socket[1].name: name 'a' is already declared on line 2"), "{p:?}");
        assert!(p[2].contains("socket[1].listen: udp://127.0.0.1:80 is already declared on line 3"), "{p:?}");
        let p = problems("[control]\nmode = \"999\"\nowner = \"no-such-user-x\"\n");
        assert_eq!(p.len(), 2);
        assert!(p[0].contains("control.mode: '999' is not a mode"), "{p:?}");
        assert!(p[1].contains("control.owner: unknown user 'no-such-user-x'"), "{p:?}");
        let p = problems("[[allow]]\ngroup = \"no-such-group-x\"\nuser = \"root\"\non_demand = [\"tcp://*:0\"]\n");
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("allow[0].group: unknown group"), "{p:?}");
        assert!(p[1].contains("allow[0]: a rule takes exactly one of"), "{p:?}");
        assert!(p[2].contains("allow[0].on_demand[0]: 'tcp://*:0'"), "{p:?}");
    }

    #[test]
    fn limits_and_rule_file_keys() {
        let c = parse(
            "[limits]\nmax_clients_per_uid = 7\nrequest_timeout = \"500ms\"\nmax_batch = 2048\n\
             [[allow]]\nuser = \"root\"\nintrospect = true\n\
             [[allow]]\nuid = 5\non_demand = [\"unix:/run/a/*\"]\nsocket_mode = \"0600\"\nsocket_owner = \"root\"\n",
            "t.toml",
        )
        .unwrap();
        let d = Limits::default();
        assert_eq!(c.limits.max_clients_per_uid, 7);
        assert_eq!(c.limits.request_timeout, std::time::Duration::from_millis(500));
        assert_eq!(c.limits.max_batch, 2048);
        assert_eq!(c.limits.unread_timeout, d.unread_timeout);
        assert!(c.rules[0].introspect && c.rules[0].sockets.is_empty());
        assert_eq!(c.rules[1].unix_file, UnixFile { owner: Some(0), group: None, mode: Some(0o600) });
        let p = problems("[limits]\nrequest_timeout = \"soon\"\nmax_clients = 10\nreserved_clients = 10\nbogus = 1\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("limits.bogus: unknown field"), "{p:?}");
        let p = problems("[limits]\nrequest_timeout = \"soon\"\nmax_clients = 10\nreserved_clients = 10\n");
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("limits.request_timeout: 'soon'"), "{p:?}");
        assert!(p[1].contains("limits.reserved_clients: 10 is out of range (0-9)"), "{p:?}");
    }

    #[test]
    fn open_to_everyone_in_one_line() {
        let c = parse(r#"allow = [{ anyone = true, sockets = ["*"], on_demand = ["*"] }]"#, "t").unwrap();
        assert_eq!(c.rules[0].who, Who::Anyone);
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = Source::Embedded.load().unwrap();
        assert!(c.sockets.is_empty() && c.rules.is_empty());
    }
}
