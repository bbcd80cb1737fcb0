//! What the broker can say about itself: the `list` and `status` control
//! methods, and how `sockbroker list` and `sockbroker status` print them.
//!
//! The server builds [`SocketInfo`]s from the registry (and, for TCP
//! listeners, the kernel's accept queue through `TCP_INFO`,
//! [`socket::accept_queue`]) and [`Status`] from its own counters; both
//! travel as JSON, and the CLI reads them back into the same types, so the
//! wire form has one definition.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::registry::{HeldSocket, Origin, Registry};
use crate::socket;
use crate::spec::{SocketKey, Transport, UnixKind};

/// One held socket, as `list` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketInfo {
    /// Its name, if any.
    pub name: Option<String>,
    /// Its address, in the one text form.
    pub address: SocketKey,
    /// `tcp`, `udp`, `unix`, `unix-dgram` or `unix-seqpacket`.
    pub kind: String,
    /// Where it came from.
    pub origin: Origin,
    /// When the broker first held it, in seconds since the epoch.
    pub created: u64,
    /// How many times it was handed out.
    pub handed_out: u64,
    /// The pid of the last client it was handed to.
    pub last_pid: Option<i32>,
    /// The uid of the last client it was handed to.
    pub last_uid: Option<u32>,
    /// TCP listeners: connections waiting in the accept queue now.
    pub queued: Option<u32>,
    /// TCP listeners: the kernel's cap on that queue (the effective backlog).
    pub backlog: Option<u32>,
    /// The socket's inode: what `ss -e`, /proc/PID/fd (`socket:[INODE]`) and
    /// /proc/PID/fdinfo show, so a daemon's copy can be matched to this one.
    /// Absent from brokers older than the field.
    #[serde(default)]
    pub inode: Option<u64>,
}

impl SocketInfo {
    /// Describes one held socket.
    pub fn of(held: &HeldSocket) -> SocketInfo {
        let (queued, backlog) = match held.key() {
            SocketKey::Inet { transport: Transport::Tcp, .. } => match socket::accept_queue(held.fd()) {
                Ok((q, b)) => (Some(q), Some(b)),
                Err(e) => {
                    log::debug!("{}: TCP_INFO: {e}", held.key());
                    (None, None)
                }
            },
            _ => (None, None),
        };
        SocketInfo {
            name: held.name.clone(),
            address: held.key().clone(),
            kind: kind(held.key()).to_string(),
            origin: held.origin,
            created: epoch_secs(held.created),
            handed_out: held.handed_out,
            last_pid: held.last_peer.map(|p| p.pid),
            last_uid: held.last_peer.map(|p| p.uid),
            queued,
            backlog,
            inode: crate::fd::inode(held.fd()).ok(),
        }
    }
}

/// Which processes hold each of `inodes` now: every `/proc/PID/fd/N` that
/// reads `socket:[INODE]`, except the broker's own (`broker`). It runs in
/// the client with the caller's privileges, so a user sees the processes it
/// may inspect (its own) and root sees all; the broker reveals nothing.
/// Pids come sorted; a socket nobody else holds has no entry.
pub fn holders(inodes: impl IntoIterator<Item = u64>, broker: Option<i32>) -> HashMap<u64, Vec<i32>> {
    let wanted: HashSet<u64> = inodes.into_iter().collect();
    let mut found: HashMap<u64, Vec<i32>> = HashMap::new();
    if wanted.is_empty() {
        return found;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else { return found };
    let mut pids: Vec<i32> =
        procs.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).filter(|p| Some(*p) != broker).collect();
    pids.sort_unstable();
    for pid in pids {
        // Processes of other users (EACCES) and those gone meanwhile are
        // skipped: this is a snapshot, not an audit.
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else { continue };
            let inode = target.to_str().and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok());
            if let Some(inode) = inode.filter(|i| wanted.contains(i)) {
                let pids = found.entry(inode).or_default();
                if pids.last() != Some(&pid) {
                    pids.push(pid);
                }
            }
        }
    }
    found
}

/// Every held socket, sorted by name (unnamed last) then address.
pub fn list(registry: &Registry) -> Vec<SocketInfo> {
    let mut all: Vec<SocketInfo> = registry.iter().map(SocketInfo::of).collect();
    all.sort_by(|a, b| (a.name.is_none(), &a.name, &a.address).cmp(&(b.name.is_none(), &b.name, &b.address)));
    all
}

/// The broker's state, as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The broker's version.
    pub version: String,
    /// Its pid.
    pub pid: u32,
    /// Seconds since it started.
    pub uptime: u64,
    /// The control socket path.
    pub control: String,
    /// Where the configuration in force was read from.
    pub config: String,
    /// When it was loaded, seconds since the epoch.
    pub config_loaded: u64,
    /// Held sockets.
    pub sockets: usize,
    /// Held sockets by origin.
    pub by_origin: std::collections::BTreeMap<String, usize>,
    /// Allow rules in force.
    pub rules: usize,
    /// Connected clients.
    pub clients: usize,
    /// Descriptors handed out, summed over the sockets held now.
    pub handed_out: u64,
    /// Why the last reload failed, when it did (the old configuration is
    /// still in force).
    pub reload_error: Option<String>,
}

impl std::fmt::Display for Status {
    /// The `sockbroker status` text.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let origins: Vec<String> = self.by_origin.iter().map(|(o, n)| format!("{n} {o}")).collect();
        let origins = if origins.is_empty() { "none".to_string() } else { origins.join(", ") };
        writeln!(
            f,
            "sockbroker {} (pid {}), up {}",
            self.version,
            self.pid,
            short_duration(Duration::from_secs(self.uptime))
        )?;
        writeln!(f, "control:  {}", self.control)?;
        writeln!(f, "config:   {} ({} allow rules)", self.config, self.rules)?;
        writeln!(f, "sockets:  {} held ({origins})", self.sockets)?;
        writeln!(f, "clients:  {} connected; {} descriptors handed out", self.clients, self.handed_out)?;
        if let Some(why) = &self.reload_error {
            writeln!(f, "reload:   FAILED, old configuration kept: {why}")?;
        }
        Ok(())
    }
}

/// An origin as the protocol spells it: `systemd`, `config`, `on-demand`,
/// `fd-store`, `upgrade`.
pub fn origin_name(origin: Origin) -> String {
    serde_json::to_value(origin).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

/// The kind column: the scheme of the text form.
pub fn kind(key: &SocketKey) -> &'static str {
    match key {
        SocketKey::Inet { transport: Transport::Tcp, .. } => "tcp",
        SocketKey::Inet { transport: Transport::Udp, .. } => "udp",
        SocketKey::Unix { kind: UnixKind::Stream, .. } => "unix",
        SocketKey::Unix { kind: UnixKind::Datagram, .. } => "unix-dgram",
        SocketKey::Unix { kind: UnixKind::SeqPacket, .. } => "unix-seqpacket",
    }
}

/// Seconds since the epoch.
pub fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// `3d4h`, `5m12s`, `40s`: a short age for tables.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// The `sockbroker list` table: one aligned row per socket, with the pids
/// [`holders`] found for it.
pub fn table(sockets: &[SocketInfo], holders: &HashMap<u64, Vec<i32>>, now: SystemTime) -> String {
    let header = ["NAME", "ADDRESS", "KIND", "ORIGIN", "AGE", "HANDED", "LAST PEER", "QUEUE", "INODE", "HOLDERS"];
    let now = epoch_secs(now);
    let rows: Vec<[String; 10]> = sockets
        .iter()
        .map(|s| {
            [
                s.name.clone().unwrap_or_else(|| "-".into()),
                s.address.to_string(),
                s.kind.clone(),
                origin_name(s.origin),
                short_duration(Duration::from_secs(now.saturating_sub(s.created))),
                s.handed_out.to_string(),
                match (s.last_pid, s.last_uid) {
                    (Some(pid), Some(uid)) => format!("pid {pid} uid {uid}"),
                    _ => "-".into(),
                },
                match (s.queued, s.backlog) {
                    (Some(q), Some(b)) => format!("{q}/{b}"),
                    _ => "-".into(),
                },
                s.inode.map_or_else(|| "-".into(), |i| i.to_string()),
                match s.inode.and_then(|i| holders.get(&i)) {
                    Some(pids) if !pids.is_empty() => pids.iter().map(i32::to_string).collect::<Vec<_>>().join(","),
                    _ => "-".into(),
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_aligned() {
        let info = |name: Option<&str>, addr: &str| SocketInfo {
            name: name.map(String::from),
            address: addr.parse().unwrap(),
            kind: "tcp".into(),
            origin: Origin::Config,
            created: 1000,
            handed_out: 3,
            last_pid: Some(42),
            last_uid: Some(0),
            queued: Some(0),
            backlog: Some(128),
            inode: Some(4711),
        };
        let holders = HashMap::from([(4711, vec![12, 345])]);
        let t = table(
            &[info(Some("web"), "tcp://127.0.0.1:80"), info(None, "tcp://[::1]:8080")],
            &holders,
            UNIX_EPOCH + Duration::from_secs(1090),
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        let col = lines[0].find("ADDRESS").unwrap();
        assert_eq!(lines[1].find("tcp://127").unwrap(), col);
        assert_eq!(lines[2].find("tcp://[::1]").unwrap(), col);
        assert!(lines[1].contains("1m30s") && lines[1].contains("0/128"), "{t}");
        assert!(lines[1].ends_with("4711   12,345"), "{t}");
    }

    /// A socket this process holds is found under this pid, by inode; one
    /// held by no process has no entry.
    #[test]
    fn holders_are_found_in_proc() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let inode = crate::fd::inode(std::os::fd::AsFd::as_fd(&listener)).unwrap();
        let me = std::process::id() as i32;
        let found = holders([inode, u64::MAX], None);
        assert_eq!(found.get(&inode), Some(&vec![me]));
        assert!(!found.contains_key(&u64::MAX));
        assert!(holders([inode], Some(me)).is_empty(), "the broker's own pid is left out");
    }
}
