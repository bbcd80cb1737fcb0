//! What a socket is, as data: [`SocketKey`] (its identity) and [`SocketSpec`]
//! (its identity plus how to open it).
//!
//! Every place that names a socket (the command line, the protocol, the logs,
//! error messages, the systemd fd store) goes through the one text form
//! implemented here, so a socket reads the same everywhere:
//!
//! ```
//! use sockbroker::spec::SocketKey;
//! for text in [
//!     "tcp://127.0.0.1:80",
//!     "tcp://[::1]:8443",
//!     "udp://0.0.0.0:53",
//!     "unix:/run/app.sock",
//!     "unix:@app-abstract",
//!     "unix-dgram:/run/log.sock",
//!     "unix-seqpacket:@seq",
//! ] {
//!     let key: SocketKey = text.parse().unwrap();
//!     assert_eq!(key.to_string(), text);
//! }
//! ```
//!
//! Two requests name the same socket exactly when their keys are equal; the
//! broker then hands out the same kernel socket. Options (such as the backlog)
//! are not part of the key: the first request that creates a socket decides
//! them, as multibinder does.
//!
//! This module makes no system calls.

use std::fmt;
use std::net::{SocketAddr, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The longest UNIX socket path or abstract name the kernel takes
/// (`sun_path` is 108 bytes, one of them the terminating NUL for paths).
pub const UNIX_PATH_MAX: usize = 107;

/// The listen backlog used when a request names none (multibinder's default).
pub const DEFAULT_BACKLOG: u32 = 1000;

/// An IP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// A listening stream socket (`SOCK_STREAM`).
    Tcp,
    /// A bound datagram socket (`SOCK_DGRAM`).
    Udp,
}

/// The socket type of a UNIX socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UnixKind {
    /// `SOCK_STREAM`, listening.
    Stream,
    /// `SOCK_DGRAM`, bound.
    Datagram,
    /// `SOCK_SEQPACKET`, listening.
    SeqPacket,
}

/// Where a UNIX socket lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UnixAddress {
    /// An absolute path in the file system.
    Path(PathBuf),
    /// A name in the abstract namespace (written with a leading `@`).
    Abstract(String),
}

/// The identity of a socket: two requests with equal keys get the same
/// kernel socket.
///
/// A key can only be built through [`SocketKey::inet`], [`SocketKey::unix`] or
/// parsing, which refuse what cannot be shared (port 0, relative paths,
/// over-long names).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SocketKey {
    /// A TCP or UDP socket bound to an address and port.
    Inet {
        /// TCP or UDP.
        transport: Transport,
        /// The bound address; never port 0.
        addr: SocketAddr,
    },
    /// A UNIX socket.
    Unix {
        /// Stream, datagram or seqpacket.
        kind: UnixKind,
        /// The path or abstract name.
        address: UnixAddress,
    },
}

/// Why a socket description was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The text does not start with a known scheme.
    #[error("'{0}': unknown socket form (expected tcp://ADDR:PORT, udp://ADDR:PORT, unix:/PATH, unix:@NAME, unix-dgram:…, unix-seqpacket:…)")]
    UnknownScheme(String),
    /// Not an IP literal.
    #[error("'{0}': not an IP address (an IPv4 or IPv6 literal such as 127.0.0.1 or ::1)")]
    BadAddress(String),
    /// `ADDR:PORT` that does not parse.
    #[error("'{0}': not ADDRESS:PORT (IPv6 addresses go in brackets: [::1]:80)")]
    BadSocketAddress(String),
    /// Port 0 asks the kernel for any port, which nobody else could then name.
    #[error("{0}: port 0 is refused: a shared socket needs a known port")]
    PortZero(String),
    /// A port outside 1–65535.
    #[error("port {0} is out of range (1-65535)")]
    PortRange(i64),
    /// A UNIX path that is not absolute.
    #[error("'{0}': UNIX socket paths must be absolute")]
    RelativePath(PathBuf),
    /// A UNIX path or abstract name longer than the kernel takes.
    #[error("'{0}': longer than {UNIX_PATH_MAX} bytes, the limit of a UNIX socket address")]
    TooLong(String),
    /// An empty UNIX path or abstract name, or a NUL byte in a path.
    #[error("'{0}': empty UNIX socket address or NUL byte in it")]
    BadUnixAddress(String),
}

impl SocketKey {
    /// A TCP or UDP key; refuses port 0. Every key of an IP socket is made
    /// here, in its canonical form: an IPv6 flow label (which `getsockname`
    /// may report and no text form names) is not part of it; the scope
    /// (`%2`, for link-local addresses) is, as `bind()` needs it.
    pub fn inet(transport: Transport, addr: SocketAddr) -> Result<Self, SpecError> {
        let addr = match addr {
            SocketAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(*v6.ip(), v6.port(), 0, v6.scope_id())),
            v4 => v4,
        };
        let key = SocketKey::Inet { transport, addr };
        if addr.port() == 0 {
            return Err(SpecError::PortZero(key.to_string()));
        }
        Ok(key)
    }

    /// A TCP or UDP key from an address literal and a port number, as the
    /// multibinder protocol gives them.
    pub fn inet_parts(transport: Transport, address: &str, port: i64) -> Result<Self, SpecError> {
        let ip = address
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .map_err(|_| SpecError::BadAddress(address.to_string()))?;
        let port = u16::try_from(port).map_err(|_| SpecError::PortRange(port))?;
        Self::inet(transport, SocketAddr::new(ip, port))
    }

    /// A UNIX key from a path (`/run/x.sock`) or an abstract name (`@name`).
    pub fn unix(kind: UnixKind, text: &str) -> Result<Self, SpecError> {
        let address = if let Some(name) = text.strip_prefix('@') {
            if name.is_empty() {
                return Err(SpecError::BadUnixAddress(text.to_string()));
            }
            UnixAddress::Abstract(name.to_string())
        } else {
            let path = Path::new(text);
            if text.is_empty() || text.contains('\0') {
                return Err(SpecError::BadUnixAddress(text.to_string()));
            }
            if !path.is_absolute() {
                return Err(SpecError::RelativePath(path.to_path_buf()));
            }
            UnixAddress::Path(path.to_path_buf())
        };
        let len = match &address {
            UnixAddress::Path(p) => p.as_os_str().len(),
            UnixAddress::Abstract(n) => n.len(),
        };
        if len > UNIX_PATH_MAX {
            return Err(SpecError::TooLong(text.to_string()));
        }
        Ok(SocketKey::Unix { kind, address })
    }

    /// Whether the socket listens (stream and seqpacket) rather than only
    /// being bound (datagram).
    pub fn is_listening_kind(&self) -> bool {
        match self {
            SocketKey::Inet { transport, .. } => *transport == Transport::Tcp,
            SocketKey::Unix { kind, .. } => *kind != UnixKind::Datagram,
        }
    }

    fn scheme(&self) -> &'static str {
        match self {
            SocketKey::Inet { transport: Transport::Tcp, .. } => "tcp://",
            SocketKey::Inet { transport: Transport::Udp, .. } => "udp://",
            SocketKey::Unix { kind: UnixKind::Stream, .. } => "unix:",
            SocketKey::Unix { kind: UnixKind::Datagram, .. } => "unix-dgram:",
            SocketKey::Unix { kind: UnixKind::SeqPacket, .. } => "unix-seqpacket:",
        }
    }
}

impl fmt::Display for SocketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.scheme())?;
        match self {
            SocketKey::Inet { addr, .. } => write!(f, "{addr}"),
            SocketKey::Unix { address: UnixAddress::Path(p), .. } => write!(f, "{}", p.display()),
            SocketKey::Unix { address: UnixAddress::Abstract(n), .. } => write!(f, "@{n}"),
        }
    }
}

impl FromStr for SocketKey {
    type Err = SpecError;

    fn from_str(text: &str) -> Result<Self, SpecError> {
        let inet = |transport, rest: &str| {
            let addr = rest.parse::<SocketAddr>().map_err(|_| {
                // Name the port when it is the part at fault: "port 70000 is out of range".
                match rest.rsplit_once(':').map(|(_, p)| p.parse::<i64>()) {
                    Some(Ok(port)) if !(0..=65535).contains(&port) => SpecError::PortRange(port),
                    _ => SpecError::BadSocketAddress(rest.to_string()),
                }
            })?;
            SocketKey::inet(transport, addr)
        };
        // Longest prefixes first: "unix:" is a prefix of neither other UNIX form,
        // but keeping the order explicit avoids surprises when forms are added.
        if let Some(rest) = text.strip_prefix("tcp://") {
            inet(Transport::Tcp, rest)
        } else if let Some(rest) = text.strip_prefix("udp://") {
            inet(Transport::Udp, rest)
        } else if let Some(rest) = text.strip_prefix("unix-dgram:") {
            SocketKey::unix(UnixKind::Datagram, rest)
        } else if let Some(rest) = text.strip_prefix("unix-seqpacket:") {
            SocketKey::unix(UnixKind::SeqPacket, rest)
        } else if let Some(rest) = text.strip_prefix("unix:") {
            SocketKey::unix(UnixKind::Stream, rest)
        } else {
            Err(SpecError::UnknownScheme(text.to_string()))
        }
    }
}

impl TryFrom<String> for SocketKey {
    type Error = SpecError;
    fn try_from(text: String) -> Result<Self, SpecError> {
        text.parse()
    }
}

impl From<SocketKey> for String {
    fn from(key: SocketKey) -> String {
        key.to_string()
    }
}

/// How a socket is opened, beyond its identity.
///
/// Every option is applied by [`crate::socket::open`] before `bind()` (UNIX
/// owner and group right after it); `None` or `false` leaves the kernel's
/// default. `docs/config.md` maps each one to its systemd.socket equivalent.
/// Serialised field by field (in the upgrade state); a missing field is its
/// default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SocketOptions {
    /// `listen()` backlog for stream and seqpacket sockets; the kernel caps
    /// it at `net.core.somaxconn`.
    pub backlog: u32,
    /// `SO_REUSEADDR`; `None` means on for TCP (as multibinder), off otherwise.
    pub reuse_addr: Option<bool>,
    /// `SO_REUSEPORT`.
    pub reuse_port: bool,
    /// `IPV6_V6ONLY` for IPv6 sockets; `None` follows `net.ipv6.bindv6only`.
    pub ipv6_only: Option<bool>,
    /// `IP_FREEBIND` / `IPV6_FREEBIND`: bind to an address not (yet) configured.
    pub freebind: bool,
    /// `IP_TRANSPARENT` / `IPV6_TRANSPARENT` (needs CAP_NET_ADMIN).
    pub transparent: bool,
    /// `SO_BINDTODEVICE`: only traffic through this interface.
    pub bind_to_device: Option<String>,
    /// `TCP_DEFER_ACCEPT`, in seconds.
    pub defer_accept: Option<u32>,
    /// `TCP_FASTOPEN`: the queue length of pending TFO requests.
    pub fast_open: Option<u32>,
    /// `SO_KEEPALIVE`.
    pub keepalive: bool,
    /// `TCP_KEEPIDLE`, in seconds.
    pub keepalive_idle: Option<u32>,
    /// `TCP_KEEPINTVL`, in seconds.
    pub keepalive_interval: Option<u32>,
    /// `TCP_KEEPCNT`.
    pub keepalive_count: Option<u32>,
    /// `TCP_NODELAY` (inherited by accepted connections).
    pub no_delay: bool,
    /// `SO_RCVBUF`, in bytes (the kernel doubles it).
    pub receive_buffer: Option<u32>,
    /// `SO_SNDBUF`, in bytes (the kernel doubles it).
    pub send_buffer: Option<u32>,
    /// `SO_MARK` (needs CAP_NET_ADMIN).
    pub mark: Option<u32>,
    /// `SO_BROADCAST`, for UDP.
    pub broadcast: bool,
    /// Permission bits of a UNIX socket file; the file is created with them.
    pub mode: Option<u32>,
    /// Owner (uid) of a UNIX socket file.
    pub user: Option<u32>,
    /// Group (gid) of a UNIX socket file.
    pub group: Option<u32>,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            backlog: DEFAULT_BACKLOG,
            reuse_addr: None,
            reuse_port: false,
            ipv6_only: None,
            freebind: false,
            transparent: false,
            bind_to_device: None,
            defer_accept: None,
            fast_open: None,
            keepalive: false,
            keepalive_idle: None,
            keepalive_interval: None,
            keepalive_count: None,
            no_delay: false,
            receive_buffer: None,
            send_buffer: None,
            mark: None,
            broadcast: false,
            mode: None,
            user: None,
            group: None,
        }
    }
}

/// A socket to open: its key and its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketSpec {
    /// The identity of the socket.
    pub key: SocketKey,
    /// How it is opened when it does not exist yet.
    pub options: SocketOptions,
}

impl SocketSpec {
    /// A spec with default options.
    pub fn new(key: SocketKey) -> Self {
        SocketSpec { key, options: SocketOptions::default() }
    }
}

impl From<SocketKey> for SocketSpec {
    fn from(key: SocketKey) -> Self {
        SocketSpec::new(key)
    }
}

impl FromStr for SocketSpec {
    type Err = SpecError;
    fn from_str(text: &str) -> Result<Self, SpecError> {
        Ok(SocketSpec::new(text.parse()?))
    }
}

impl fmt::Display for SocketSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.key.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for text in [
            "tcp://0.0.0.0:80",
            "tcp://[::]:443",
            "udp://[::1]:53",
            "unix:/run/x.sock",
            "unix:@abs",
            "unix-dgram:@d",
            "unix-seqpacket:/run/s",
        ] {
            let key: SocketKey = text.parse().unwrap();
            assert_eq!(key.to_string(), text);
            let json = serde_json::to_string(&key).unwrap();
            assert_eq!(serde_json::from_str::<SocketKey>(&json).unwrap(), key);
        }
    }

    #[test]
    fn refuses_what_cannot_be_shared() {
        assert!(matches!("tcp://127.0.0.1:0".parse::<SocketKey>(), Err(SpecError::PortZero(_))));
        assert!(matches!("unix:run/x".parse::<SocketKey>(), Err(SpecError::RelativePath(_))));
        assert!(matches!("unix:@".parse::<SocketKey>(), Err(SpecError::BadUnixAddress(_))));
        assert!(matches!("http://x".parse::<SocketKey>(), Err(SpecError::UnknownScheme(_))));
        assert!(matches!("tcp://::1:80".parse::<SocketKey>(), Err(SpecError::BadSocketAddress(_))));
        assert!(matches!("tcp://127.0.0.1:70000".parse::<SocketKey>(), Err(SpecError::PortRange(70000))));
        let long = format!("unix:/{}", "a".repeat(UNIX_PATH_MAX));
        assert!(matches!(long.parse::<SocketKey>(), Err(SpecError::TooLong(_))));
        assert!(matches!(SocketKey::inet_parts(Transport::Tcp, "127.0.0.1", 70000), Err(SpecError::PortRange(70000))));
        assert!(matches!(SocketKey::inet_parts(Transport::Tcp, "localhost", 80), Err(SpecError::BadAddress(_))));
    }

    #[test]
    fn ip_keys_are_canonical() {
        let with_flow = SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 80, 7, 2));
        let key = SocketKey::inet(Transport::Tcp, with_flow).unwrap();
        assert_eq!(key, "tcp://[fe80::1%2]:80".parse().unwrap());
        assert_eq!(key.to_string(), "tcp://[fe80::1%2]:80");
        assert_ne!(key, "tcp://[fe80::1]:80".parse().unwrap(), "the scope is part of the address bound");
    }

    #[test]
    fn inet_parts_takes_bare_and_bracketed_v6() {
        let a = SocketKey::inet_parts(Transport::Tcp, "::1", 80).unwrap();
        let b = SocketKey::inet_parts(Transport::Tcp, "[::1]", 80).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "tcp://[::1]:80");
    }
}
