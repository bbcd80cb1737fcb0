//! Keeping the broker's own sockets in systemd's file descriptor store, so a
//! restart or a crash of the broker loses none of them.
//!
//! Flow:
//! 1. the broker creates a socket (on demand, from a `bind`) → [`store`] sends
//!    it to systemd with `FDSTORE=1` and `FDNAME=` [`encode`]`(key, name)`;
//! 2. the broker restarts (`systemctl restart`, `kill -9` with `Restart=`) →
//!    systemd passes the stored descriptors back in `LISTEN_FDS`, each under
//!    its FDNAME; [`decode`] recognises ours, and the broker adopts them with
//!    [`Origin::FdStore`]: the same kernel
//!    sockets as before;
//! 3. the broker releases a socket → [`remove`] sends `FDSTOREREMOVE=1` with
//!    its FDNAME, and systemd closes its copy.
//!
//! Sockets systemd passed from `.socket` units are not stored: systemd holds
//! them already. Without `NOTIFY_SOCKET` (not run by systemd) all of this is a
//! no-op; a failure is logged, never fatal, since the socket itself works.
//!
//! # FDNAME encoding
//!
//! systemd takes FDNAMEs of at most 255 ASCII characters, without control
//! characters and without `:` (its separator in `LISTEN_FDNAMES`), and
//! passes every stored socket's FDNAME back in ONE environment variable,
//! `LISTEN_FDNAMES`, which the kernel caps at 128 KiB (`MAX_ARG_STRLEN`):
//! past it `execve` fails with "Argument list too long" and the broker cannot
//! start at all. So the FDNAME is short: `sb-` and a bucket, three hex
//! digits of a hash of the key (the key itself is read back from the socket
//! on restart, [`crate::socket::inspect`]), then `#` and the name, encoded,
//! when the socket has one. Seven bytes a socket: 16,384 unnamed sockets
//! (`FileDescriptorStoreMax=`) take 112 KiB.
//!
//! ```
//! use sockbroker::systemd::fdstore::{decode, encode};
//! let key = "tcp://[::1]:8080".parse().unwrap();
//! let name = encode(&key, Some("web")).unwrap();
//! assert!(name.starts_with("sb-") && name.ends_with("#web") && name.len() == 10);
//! assert_eq!(decode(&name), Some((None, Some("web".to_string()))));
//! assert_eq!(decode("http"), None); // a name from a .socket unit
//! ```
//!
//! Sockets share a bucket's FDNAME, and `FDSTOREREMOVE=1` removes every
//! descriptor of a name: [`remove`] stores the released socket's bucket-mates
//! again. Brokers before this encoding stored `sb.` and the whole key
//! percent-encoded ([`encode_long`]); those are still recognised (with their
//! key), and a socket that came from the store is removed by that name too.

use std::fmt::Write as _;

use libsystemd::daemon::NotifyState;

use super::listen::FDNAME_MAX;
use super::notify;
use crate::registry::{HeldSocket, Origin, Registry};
use crate::spec::SocketKey;

/// Start of every FDNAME the broker gives a stored socket.
pub const PREFIX: &str = "sb-";
/// Start of the FDNAMEs of brokers before the short form ([`encode_long`]).
pub const LONG_PREFIX: &str = "sb.";
/// How many buckets keys are hashed into.
const BUCKETS: u64 = 4096;

/// A key (and name) whose FDNAME would be too long for systemd.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: its fd store name would be {len} characters, over systemd's limit of {FDNAME_MAX}")]
pub struct TooLong {
    /// The socket.
    pub key: SocketKey,
    /// The length its FDNAME would have.
    pub len: usize,
}

/// Whether a byte must be percent-encoded in an FDNAME.
fn escaped(b: u8) -> bool {
    !(0x21..0x7f).contains(&b) || matches!(b, b'%' | b':' | b'#')
}

fn escape(text: &str, out: &mut String) {
    for &b in text.as_bytes() {
        if escaped(b) {
            let _ = write!(out, "%{b:02X}");
        } else {
            out.push(b as char);
        }
    }
}

fn unescape(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The FDNAME under which a socket is stored: `sb-` and its bucket, then
/// `#` and its name.
pub fn encode(key: &SocketKey, name: Option<&str>) -> Result<String, TooLong> {
    with_name(key, format!("{PREFIX}{:03x}", bucket(key)), name)
}

/// `head`, then `#` and the name, checked against systemd's FDNAME limit.
fn with_name(key: &SocketKey, mut out: String, name: Option<&str>) -> Result<String, TooLong> {
    if let Some(name) = name {
        out.push('#');
        escape(name, &mut out);
    }
    if out.len() > FDNAME_MAX {
        return Err(TooLong { key: key.clone(), len: out.len() });
    }
    Ok(out)
}

/// A key's bucket: FNV-1a of its text form (stable across builds and
/// versions, unlike `std`'s hasher).
fn bucket(key: &SocketKey) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.to_string().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h % BUCKETS
}

/// The FDNAME brokers before the short form gave a socket: `sb.`, the key
/// text percent-encoded, then `#` and the name.
pub fn encode_long(key: &SocketKey, name: Option<&str>) -> Result<String, TooLong> {
    let mut out = String::from(LONG_PREFIX);
    escape(&key.to_string(), &mut out);
    with_name(key, out, name)
}

/// The key (long form only) and name of a socket the broker stored, or
/// `None` when `fdname` is not one of the broker's (a name from a `.socket`
/// unit, say).
pub fn decode(fdname: &str) -> Option<(Option<SocketKey>, Option<String>)> {
    if let Some(rest) = fdname.strip_prefix(PREFIX) {
        let (bucket, name) = match rest.split_once('#') {
            Some((bucket, name)) => (bucket, Some(unescape(name)?)),
            None => (rest, None),
        };
        let ok = bucket.len() == 3 && u64::from_str_radix(bucket, 16).is_ok_and(|b| b < BUCKETS);
        return ok.then_some((None, name));
    }
    let rest = fdname.strip_prefix(LONG_PREFIX)?;
    let (key, name) = match rest.split_once('#') {
        Some((key, name)) => (key, Some(unescape(name)?)),
        None => (rest, None),
    };
    Some((Some(unescape(key)?.parse().ok()?), name))
}

/// Whether the broker runs under a service manager that may keep descriptors.
fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some_and(|v| !v.is_empty())
}

/// Sends a socket the broker created to systemd's fd store.
pub fn store(held: &HeldSocket) {
    if !enabled() {
        return;
    }
    let fdname = match encode(held.key(), held.name.as_deref()) {
        Ok(fdname) => fdname,
        Err(e) => {
            log::warn!("{e}; it will not survive a broker restart");
            return;
        }
    };
    let states = [NotifyState::Fdstore, NotifyState::Fdname(fdname.clone())];
    match notify::send_with_fds(&states, &[held.fd()]) {
        Ok(_) => log::info!("{}: kept in systemd's fd store as '{fdname}'", held.key()),
        Err(e) => log::warn!("{}: could not send to systemd's fd store: {e}", held.key()),
    }
}

/// Tells systemd to close its stored copy of a socket the broker released,
/// or the next broker would get it back. A socket systemd passed in
/// (origin [`Origin::Systemd`]) is systemd's own, not a stored copy: nothing
/// to remove. `FDSTOREREMOVE=1` closes every copy stored under the FDNAME,
/// so the sockets of `registry` that share it are stored again.
pub fn remove(held: &HeldSocket, registry: &Registry) {
    if !enabled() || held.origin == Origin::Systemd {
        return;
    }
    let Ok(fdname) = encode(held.key(), held.name.as_deref()) else { return };
    // Only a socket that came from the store may sit there under an older
    // broker's long name; one this broker stored has the short one only.
    let long = (held.origin == Origin::FdStore).then(|| encode_long(held.key(), held.name.as_deref()).ok()).flatten();
    for name in std::iter::once(fdname.clone()).chain(long) {
        let states = [NotifyState::FdstoreRemove, NotifyState::Fdname(name.clone())];
        match notify::send_with_fds(&states, &[]) {
            Ok(_) => log::info!("{}: removed from systemd's fd store ('{name}')", held.key()),
            Err(e) => log::warn!("{}: could not remove from systemd's fd store: {e}", held.key()),
        }
    }
    let mates = registry.iter().filter(|h| {
        h.origin != Origin::Systemd
            && h.key() != held.key()
            && encode(h.key(), h.name.as_deref()).is_ok_and(|n| n == fdname)
    });
    for mate in mates {
        store(mate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::systemd::listen::fdname_is_valid;

    #[test]
    fn every_kind_round_trips_within_systemd_rules() {
        let long_path = format!("unix:/{}", "p".repeat(106));
        for (text, name) in [
            ("tcp://127.0.0.1:80", None),
            ("tcp://0.0.0.0:80", Some("http")),
            ("tcp://[::]:443", Some("with:colon #and %percent")),
            ("udp://[::1]:53", None),
            ("unix:/run/odd:path#with%everything ünïcode", Some("é")),
            ("unix:@abstract", None),
            ("unix-dgram:/run/log.sock", None),
            ("unix-seqpacket:@seq", Some("seq")),
            (long_path.as_str(), None),
        ] {
            let key: SocketKey = text.parse().unwrap();
            let fdname = encode(&key, name).unwrap();
            assert!(fdname_is_valid(&fdname), "{fdname}");
            assert_eq!(decode(&fdname), Some((None, name.map(String::from))), "{fdname}");
            if name.is_none() {
                assert_eq!(fdname.len(), 6, "{fdname}");
            }
            let long = encode_long(&key, name).unwrap();
            assert!(fdname_is_valid(&long), "{long}");
            assert_eq!(decode(&long), Some((Some(key), name.map(String::from))), "{long}");
        }
    }

    #[test]
    fn names_from_socket_units_are_not_ours() {
        for name in [
            "http",
            "control",
            "stored",
            "sockbroker.socket",
            "sb.",
            "sb.tcp%3A//x",
            "sb.%ZZ",
            "sb.%4",
            "sb-",
            "sb-fffff",
            "sb-zzz",
        ] {
            assert_eq!(decode(name), None, "{name}");
        }
    }

    /// systemd passes every FDNAME in one LISTEN_FDNAMES, at most 128 KiB
    /// (MAX_ARG_STRLEN) with its `LISTEN_FDNAMES=` and separators: 16,384
    /// unnamed sockets (FileDescriptorStoreMax=) fit.
    #[test]
    fn the_largest_fd_store_fits_in_one_environment_string() {
        let names: Vec<String> = (0..16_384u32)
            .map(|i| {
                let key: SocketKey =
                    format!("tcp://127.{}.{}.{}:65535", 1 + i / 62_500, i / 250 % 250, i % 250 + 1).parse().unwrap();
                encode(&key, None).unwrap()
            })
            .collect();
        let env = format!("LISTEN_FDNAMES={}", names.join(":"));
        assert!(env.len() < 128 * 1024, "{} bytes", env.len());
    }

    #[test]
    fn keys_spread_over_the_buckets() {
        let mut seen = std::collections::HashMap::new();
        for port in 1..=10_000u32 {
            let key: SocketKey = format!("tcp://127.0.0.1:{port}").parse().unwrap();
            *seen.entry(bucket(&key)).or_insert(0) += 1;
        }
        assert!(seen.len() > 3500, "{} buckets used", seen.len());
        assert!(seen.values().all(|n| *n <= 16), "a bucket holds {:?}", seen.values().max());
    }

    #[test]
    fn too_long_is_an_error_naming_the_socket() {
        let key: SocketKey = "tcp://127.0.0.1:80".parse().unwrap();
        let err = encode(&key, Some(&"é".repeat(50))).unwrap_err();
        assert!(err.len > FDNAME_MAX);
        assert!(err.to_string().contains("over systemd's limit"), "{err}");
    }
}
