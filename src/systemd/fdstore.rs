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
//! characters and without `:` (its separator in `LISTEN_FDNAMES`). A key's
//! text form has colons, so the FDNAME is `sb.` followed by the key text with
//! `%`, `:`, `#`, space, control and non-ASCII bytes percent-encoded, then
//! `#` and the encoded name when the socket has one:
//!
//! ```
//! use sockbroker::systemd::fdstore::{decode, encode};
//! let key = "tcp://[::1]:8080".parse().unwrap();
//! let name = encode(&key, Some("web")).unwrap();
//! assert_eq!(name, "sb.tcp%3A//[%3A%3A1]%3A8080#web");
//! assert_eq!(decode(&name), Some((key, Some("web".to_string()))));
//! assert_eq!(decode("http"), None); // a name from a .socket unit
//! ```
//!
//! The encoding is reversible for every key; a key whose encoding exceeds 255
//! characters (a long UNIX path full of non-ASCII bytes) cannot be stored,
//! which is logged.

use std::fmt::Write as _;

use libsystemd::daemon::NotifyState;

use super::listen::FDNAME_MAX;
use super::notify;
use crate::registry::{HeldSocket, Origin};
use crate::spec::SocketKey;

/// Start of every FDNAME the broker gives a stored socket.
pub const PREFIX: &str = "sb.";

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

/// The FDNAME under which a socket is stored.
pub fn encode(key: &SocketKey, name: Option<&str>) -> Result<String, TooLong> {
    let mut out = String::from(PREFIX);
    escape(&key.to_string(), &mut out);
    if let Some(name) = name {
        out.push('#');
        escape(name, &mut out);
    }
    if out.len() > FDNAME_MAX {
        return Err(TooLong { key: key.clone(), len: out.len() });
    }
    Ok(out)
}

/// The key and name of a socket the broker stored, or `None` when `fdname`
/// is not one of the broker's (a name from a `.socket` unit, say).
pub fn decode(fdname: &str) -> Option<(SocketKey, Option<String>)> {
    let rest = fdname.strip_prefix(PREFIX)?;
    let (key, name) = match rest.split_once('#') {
        Some((key, name)) => (key, Some(unescape(name)?)),
        None => (rest, None),
    };
    Some((unescape(key)?.parse().ok()?, name))
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
/// to remove.
pub fn remove(held: &HeldSocket) {
    if !enabled() || held.origin == Origin::Systemd {
        return;
    }
    let Ok(fdname) = encode(held.key(), held.name.as_deref()) else { return };
    let states = [NotifyState::FdstoreRemove, NotifyState::Fdname(fdname.clone())];
    match notify::send_with_fds(&states, &[]) {
        Ok(_) => log::info!("{}: removed from systemd's fd store ('{fdname}')", held.key()),
        Err(e) => log::warn!("{}: could not remove from systemd's fd store: {e}", held.key()),
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
            assert_eq!(decode(&fdname), Some((key, name.map(String::from))), "{fdname}");
        }
    }

    #[test]
    fn names_from_socket_units_are_not_ours() {
        for name in ["http", "control", "stored", "sockbroker.socket", "sb.", "sb.tcp%3A//x", "sb.%ZZ", "sb.%4"] {
            assert_eq!(decode(name), None, "{name}");
        }
    }

    #[test]
    fn too_long_is_an_error_naming_the_socket() {
        let key: SocketKey = format!("unix:/{}", "é".repeat(50)).parse().unwrap();
        let err = encode(&key, None).unwrap_err();
        assert!(err.len > FDNAME_MAX);
        assert!(err.to_string().contains("over systemd's limit"), "{err}");
    }
}
