//! Address patterns of `on_demand` lists (`tcp://127.0.0.1:8000-8999`,
//! `unix:/run/app/*`, `*`): parsed once from the configuration's text
//! ([`AddressPattern`]'s `FromStr`), then matched against the canonical
//! [`SocketKey`] of each request by [`super::Policy::check`].

use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::{Component, Path};
use std::str::FromStr;

use crate::spec::{SocketKey, Transport, UnixAddress, UnixKind};

/// An address pattern of an `on_demand` list.
///
/// ```
/// use sockbroker::acl::AddressPattern;
/// for text in [
///     "*",                          // any socket at all
///     "tcp://127.0.0.1:8000-8999",  // a port range on one address
///     "tcp://*:8080",               // one port on any address, IPv4 or IPv6
///     "udp://[::1]:*",              // any port on ::1
///     "unix:/run/app/*",            // any path under /run/app/ (no `..`)
///     "unix:@app-*",                // abstract names starting with app-
///     "unix-dgram:/run/log.sock",   // exactly one path
/// ] {
///     let p: AddressPattern = text.parse().unwrap();
///     assert_eq!(p.to_string(), text);
/// }
/// let p: AddressPattern = "tcp://127.0.0.1:8000-8999".parse().unwrap();
/// assert!(p.matches(&"tcp://127.0.0.1:8080".parse().unwrap()));
/// assert!(!p.matches(&"tcp://127.0.0.1:9000".parse().unwrap()));
/// assert!(!p.matches(&"udp://127.0.0.1:8080".parse().unwrap()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressPattern {
    text: String,
    matcher: Matcher,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Matcher {
    Any,
    Inet { transport: Transport, ip: Option<IpAddr>, ports: RangeInclusive<u16> },
    Unix { kind: UnixKind, abstract_ns: bool, text: String, prefix: bool },
}

/// Why an address pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// Not one of the known schemes.
    #[error("'{0}': unknown address pattern (expected *, tcp://ADDR:PORTS, udp://ADDR:PORTS, unix:/PATH, unix:@NAME; ADDR may be *, PORTS may be *, N or N-M)")]
    Scheme(String),
    /// The address part is neither `*` nor an IP literal.
    #[error("'{0}': not an IP address or * (IPv6 goes in brackets: [::1])")]
    Address(String),
    /// A port outside 1–65535, or a range that ends before it starts.
    #[error("'{0}': port out of range (1-65535, N or N-M with N <= M, or *)")]
    Port(String),
    /// A `*` anywhere but at the end of a UNIX path or name, or a relative path.
    #[error("'{0}': UNIX patterns are an absolute path or @name, with at most one * at the end")]
    Unix(String),
}

impl FromStr for AddressPattern {
    type Err = PatternError;

    fn from_str(text: &str) -> Result<Self, PatternError> {
        let matcher = if text == "*" {
            Matcher::Any
        } else if let Some(rest) = text.strip_prefix("tcp://") {
            inet_pattern(Transport::Tcp, rest, text)?
        } else if let Some(rest) = text.strip_prefix("udp://") {
            inet_pattern(Transport::Udp, rest, text)?
        } else if let Some(rest) = text.strip_prefix("unix-dgram:") {
            unix_pattern(UnixKind::Datagram, rest, text)?
        } else if let Some(rest) = text.strip_prefix("unix-seqpacket:") {
            unix_pattern(UnixKind::SeqPacket, rest, text)?
        } else if let Some(rest) = text.strip_prefix("unix:") {
            unix_pattern(UnixKind::Stream, rest, text)?
        } else {
            return Err(PatternError::Scheme(text.to_string()));
        };
        Ok(AddressPattern { text: text.to_string(), matcher })
    }
}

fn inet_pattern(transport: Transport, rest: &str, text: &str) -> Result<Matcher, PatternError> {
    let (host, ports) = rest.rsplit_once(':').ok_or_else(|| PatternError::Port(text.to_string()))?;
    let ip = match host {
        "*" => None,
        _ => Some(
            host.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host)
                .parse::<IpAddr>()
                .ok()
                .filter(|ip| ip.is_ipv4() != host.starts_with('['))
                .ok_or_else(|| PatternError::Address(text.to_string()))?,
        ),
    };
    let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| PatternError::Port(text.into()));
    let ports = match ports.split_once('-') {
        _ if ports == "*" => 1..=u16::MAX,
        Some((lo, hi)) => {
            let (lo, hi) = (port(lo)?, port(hi)?);
            if lo > hi {
                return Err(PatternError::Port(text.to_string()));
            }
            lo..=hi
        }
        None => {
            let p = port(ports)?;
            p..=p
        }
    };
    Ok(Matcher::Inet { transport, ip, ports })
}

fn unix_pattern(kind: UnixKind, rest: &str, whole: &str) -> Result<Matcher, PatternError> {
    let bad = || PatternError::Unix(whole.to_string());
    let (abstract_ns, body) = match rest.strip_prefix('@') {
        Some(name) => (true, name),
        None if rest.starts_with('/') => (false, rest),
        None => return Err(bad()),
    };
    let (text, prefix) = match body.strip_suffix('*') {
        Some(p) => (p, true),
        None => (body, false),
    };
    if text.contains('*') || (text.is_empty() && !prefix) {
        return Err(bad());
    }
    Ok(Matcher::Unix { kind, abstract_ns, text: text.to_string(), prefix })
}

impl AddressPattern {
    /// Whether the socket `key` falls under this pattern.
    pub fn matches(&self, key: &SocketKey) -> bool {
        match (&self.matcher, key) {
            (Matcher::Any, _) => true,
            (Matcher::Inet { transport, ip, ports }, SocketKey::Inet { transport: t, addr }) => {
                transport == t && ip.map_or(true, |ip| ip == addr.ip()) && ports.contains(&addr.port())
            }
            (Matcher::Unix { kind, abstract_ns, text, prefix }, SocketKey::Unix { kind: k, address }) => {
                if kind != k {
                    return false;
                }
                let candidate = match (address, abstract_ns) {
                    (UnixAddress::Abstract(name), true) => name.as_str(),
                    (UnixAddress::Path(path), false) => {
                        // "/run/app/*" must not reach "/run/app/../../etc/x".
                        if Path::new(path).components().any(|c| c == Component::ParentDir) {
                            return false;
                        }
                        match path.to_str() {
                            Some(p) => p,
                            None => return false,
                        }
                    }
                    _ => return false,
                };
                if *prefix {
                    candidate.starts_with(text.as_str())
                } else {
                    candidate == text
                }
            }
            _ => false,
        }
    }
}

impl AddressPattern {
    /// Whether the pattern names one UNIX path or name exactly (no `*`).
    pub fn is_exact(&self) -> bool {
        matches!(self.matcher, Matcher::Unix { prefix: false, .. })
    }
}

impl fmt::Display for AddressPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> SocketKey {
        text.parse().unwrap()
    }

    #[test]
    fn patterns() {
        let p = |t: &str| t.parse::<AddressPattern>().unwrap();
        assert!(p("tcp://*:80").matches(&key("tcp://[::]:80")));
        assert!(p("tcp://*:80").matches(&key("tcp://0.0.0.0:80")));
        assert!(!p("tcp://0.0.0.0:80").matches(&key("tcp://127.0.0.1:80")));
        assert!(p("udp://[::1]:*").matches(&key("udp://[::1]:53")));
        assert!(p("unix:/run/app/*").matches(&key("unix:/run/app/x.sock")));
        assert!(!p("unix:/run/app/*").matches(&key("unix:/run/app/../../etc/x")));
        assert!(!p("unix:/run/app/*").matches(&key("unix-dgram:/run/app/x")));
        assert!(!p("unix:/run/app/*").matches(&key("unix:@/run/app/x")));
        assert!(p("unix:@app-*").matches(&key("unix:@app-1")));
        assert!(p("*").matches(&key("unix:@x")));
        for bad in ["tcp://127.0.0.1:0", "tcp://127.0.0.1:9-8", "tcp://127.0.0.1:70000", "tcp://::1:80", "tcp://x:1"] {
            assert!(bad.parse::<AddressPattern>().is_err(), "{bad}");
        }
        for bad in ["unix:rel/*", "unix:/a*/b", "http://x", "tcp://[127.0.0.1]:1", "unix:"] {
            assert!(bad.parse::<AddressPattern>().is_err(), "{bad}");
        }
    }
}
