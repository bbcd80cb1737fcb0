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
//!  text ──toml + serde──▶ ConfigFile ──validate──▶ Config ──▶ broker / reconfigure
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
//! Files: `file` (the TOML as written), `validate` (file → [`Config`]),
//! `problem` (what is wrong, and where); this one holds the sources, the
//! validated types and the control path.
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

use std::fmt;
use std::path::{Path, PathBuf};

use crate::acl::Rule;
use crate::limits::Limits;
use crate::spec::SocketSpec;

mod file;
mod problem;
mod validate;

pub use file::{AllowFile, ConfigFile, ControlFile, LimitsFile, SocketFile};
pub use problem::{Problem, ProblemKind};
pub use validate::validate;

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
    /// The declared socket `GET /metrics` is served on (`[metrics] socket`).
    pub metrics_socket: Option<String>,
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
    /// The file has problems; every one is listed, each with its
    /// FILE:LINE:COLUMN (so the header does not name the file again).
    #[error("invalid configuration ({}):\n{}", count(.problems), list(.problems))]
    Invalid {
        /// The file.
        origin: String,
        /// What is wrong, in file order.
        problems: Vec<Problem>,
    },
}

fn count(problems: &[Problem]) -> String {
    match problems.len() {
        1 => "1 problem".to_string(),
        n => format!("{n} problems"),
    }
}

fn list(problems: &[Problem]) -> String {
    problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n")
}

/// Parses and validates configuration text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let file: ConfigFile = toml::from_str(text).map_err(|e| {
        let problem = Problem::syntax(text, origin, e.span(), e.message().trim());
        ConfigError::Invalid { origin: origin.to_string(), problems: vec![problem] }
    })?;
    validate(file, text, origin)
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
    use crate::acl::{UnixFile, Who};

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
