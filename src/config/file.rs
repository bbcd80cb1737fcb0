//! The configuration file as written: every key the TOML may hold, nothing
//! else (`deny_unknown_fields`), with [`toml::Spanned`] on every value a later
//! check may refuse, so that [`super::validate`] can name its line and column.
//! Data flows one way: TOML text → these structs (serde) → `validate` →
//! [`super::Config`]. Nothing outside `config` uses them.

use serde::Deserialize;
use toml::Spanned;

#[cfg(doc)]
use crate::acl::AddressPattern;
#[cfg(doc)]
use crate::limits::Limits;

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
    /// `[metrics]`: where the broker's metrics are served over HTTP.
    #[serde(default)]
    pub metrics: MetricsFile,
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
    pub metrics_interval: Option<Spanned<String>>,
    pub log_burst: Option<Spanned<i64>>,
    pub log_per_minute: Option<Spanned<i64>>,
}

/// `[metrics]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    /// The name of a declared TCP or UNIX stream socket to serve
    /// `GET /metrics` on.
    pub socket: Option<Spanned<String>>,
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
