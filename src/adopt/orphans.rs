//! Recovering declared sockets a daemon kept while the broker was killed
//! (`serve --adopt-orphans`): the kernel's socket tables (`/proc/net/*`) give
//! the inode bound at each declared address ([`bound_sockets`]), `/proc/*/fd`
//! the processes that hold it ([`find_holders`]), and [`adopt_orphans`] copies
//! each with [`super::copy_one`] into the registry.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, RawFd};

use super::pidfd::{copy_one, socket_inode, why_not_permitted};
use crate::config::Declared;
use crate::fd;
use crate::registry::{Origin, Registry};
use crate::spec::{SocketKey, Transport, UnixKind};

/// For each of `keys`, a process and descriptor that hold a socket bound
/// there (listening, for stream kinds), found by inode: the kernel's socket
/// tables (`/proc/net/*`) give the inode bound at each address, and
/// `/proc/*/fd` the processes that have it open. Keys nobody holds are
/// absent from the result. This process is never a holder.
pub fn find_holders(keys: &[SocketKey]) -> Holders {
    let wanted: HashSet<&SocketKey> = keys.iter().collect();
    let mut by_inode: HashMap<u64, SocketKey> = HashMap::new();
    for (key, inode) in bound_sockets() {
        if wanted.contains(&key) {
            by_inode.insert(inode, key);
        }
    }
    let mut found = Holders { bound: by_inode.values().cloned().collect(), ..Holders::default() };
    if by_inode.is_empty() {
        return found;
    }
    let me = std::process::id() as i32;
    let Ok(procs) = std::fs::read_dir("/proc") else { return found };
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let fds = match std::fs::read_dir(entry.path().join("fd")) {
            Ok(fds) => fds,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                found.unreadable += 1;
                continue;
            }
            Err(_) => continue,
        };
        for f in fds.flatten() {
            let Some(n) = f.file_name().to_str().and_then(|n| n.parse::<RawFd>().ok()) else { continue };
            // The folder may be listable while its links are not (the
            // kernel checks ptrace access on each).
            let link = match std::fs::read_link(f.path()) {
                Ok(link) => link,
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    found.unreadable += 1;
                    break;
                }
                Err(_) => continue,
            };
            let Some(inode) = socket_inode(&link) else { continue };
            if let Some(key) = by_inode.get(&inode) {
                found.holders.entry(key.clone()).or_insert((pid, n));
            }
        }
        if found.holders.len() == by_inode.len() {
            break;
        }
    }
    found
}

/// What [`find_holders`] found.
#[derive(Debug, Default)]
pub struct Holders {
    /// A process and descriptor per key held somewhere.
    pub holders: HashMap<SocketKey, (i32, RawFd)>,
    /// The keys some socket in this network namespace is bound at.
    pub bound: HashSet<SocketKey>,
    /// Processes whose descriptors this process may not list (it lacks
    /// CAP_SYS_PTRACE over them).
    pub unreadable: usize,
}

/// Every listening (stream) or unconnected bound (datagram) socket of this
/// network namespace with its inode, from `/proc/net/{tcp,tcp6,udp,udp6,unix}`.
pub fn bound_sockets() -> Vec<(SocketKey, u64)> {
    let mut out = Vec::new();
    for (file, transport, state) in [
        ("/proc/net/tcp", Transport::Tcp, "0A"),
        ("/proc/net/tcp6", Transport::Tcp, "0A"),
        ("/proc/net/udp", Transport::Udp, "07"),
        ("/proc/net/udp6", Transport::Udp, "07"),
    ] {
        if let Ok(text) = std::fs::read_to_string(file) {
            out.extend(parse_inet_table(&text, transport, state));
        }
    }
    if let Ok(text) = std::fs::read_to_string("/proc/net/unix") {
        out.extend(parse_unix_table(&text));
    }
    out
}

/// Lines of `/proc/net/tcp` and friends: `sl local rem st … uid timeout inode`.
fn parse_inet_table(text: &str, transport: Transport, state: &str) -> Vec<(SocketKey, u64)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.get(3) != Some(&state) {
                return None;
            }
            let (addr, port) = cols.get(1)?.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let inode: u64 = cols.get(9)?.parse().ok()?;
            // The kernel prints each 32-bit word of the address as a
            // native-endian integer.
            let words: Option<Vec<[u8; 4]>> = (0..addr.len() / 8)
                .map(|i| u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok().map(u32::to_ne_bytes))
                .collect();
            let bytes: Vec<u8> = words?.concat();
            let ip = match bytes.len() {
                4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
                16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
                _ => return None,
            };
            Some((SocketKey::inet(transport, std::net::SocketAddr::new(ip, port)).ok()?, inode))
        })
        .collect()
}

/// Lines of `/proc/net/unix`: `Num RefCount Protocol Flags Type St Inode Path`.
fn parse_unix_table(text: &str) -> Vec<(SocketKey, u64)> {
    const ACCEPTCON: u32 = 0x0001_0000;
    text.lines()
        .skip(1)
        .filter_map(|line| {
            // Seven space-separated columns (the inode is padded), then the
            // path, which may itself hold spaces.
            let mut rest = line;
            let mut cols: Vec<&str> = Vec::with_capacity(8);
            for _ in 0..7 {
                rest = rest.trim_start();
                let end = rest.find(' ').unwrap_or(rest.len());
                cols.push(&rest[..end]);
                rest = &rest[end..];
            }
            cols.push(rest.trim_start());
            let flags = u32::from_str_radix(cols.get(3)?, 16).ok()?;
            let kind = match *cols.get(4)? {
                "0001" => UnixKind::Stream,
                "0002" => UnixKind::Datagram,
                "0005" => UnixKind::SeqPacket,
                _ => return None,
            };
            let listening = flags & ACCEPTCON != 0;
            if (kind == UnixKind::Datagram && *cols.get(5)? != "01") || (kind != UnixKind::Datagram && !listening) {
                return None;
            }
            let inode: u64 = cols.get(6)?.parse().ok()?;
            let path = cols.get(7)?.trim_end();
            if path.is_empty() {
                return None;
            }
            Some((SocketKey::unix(kind, path).ok()?, inode))
        })
        .collect()
}

/// `serve --adopt-orphans`: for each declared socket the broker does not
/// hold, a process that holds a socket bound at its address (a daemon that
/// kept its copy while the broker was killed) is found with [`find_holders`]
/// and the socket copied from it, so the declared socket comes back as the
/// same kernel socket instead of failing with "Address already in use".
/// Needs CAP_SYS_PTRACE (or the holder's uid) in the broker. Failures are
/// logged; the declared socket is then opened as usual (and that bind reports
/// the conflict). Returns how many were adopted.
pub fn adopt_orphans(registry: &mut Registry, declared: &[Declared]) -> usize {
    let missing: Vec<&Declared> = declared.iter().filter(|d| registry.get(&d.spec.key).is_none()).collect();
    if missing.is_empty() {
        return 0;
    }
    let keys: Vec<SocketKey> = missing.iter().map(|d| d.spec.key.clone()).collect();
    let holders = find_holders(&keys);
    let mut adopted = 0;
    for d in missing {
        let Some(&(pid, target)) = holders.holders.get(&d.spec.key) else {
            if holders.bound.contains(&d.spec.key) && holders.unreadable > 0 {
                log::error!(
                    "{} ('{}'): a socket is bound there, but its holder is not among the processes whose descriptors \
                     the broker may read ({} may not be read): {}",
                    d.spec.key,
                    d.name,
                    holders.unreadable,
                    why_not_permitted(None)
                );
            } else {
                log::info!("{} ('{}'): no process holds it; it will be opened", d.spec.key, d.name);
            }
            continue;
        };
        let fd = match copy_one(pid, target, &d.spec.key) {
            Ok(fd) => fd,
            Err(e) => {
                log::error!("{} ('{}'): held by pid {pid} fd {target}, but cannot be copied: {e}", d.spec.key, d.name);
                continue;
            }
        };
        let inode = fd::inode(fd.as_fd()).unwrap_or(0);
        match registry.adopt(fd, d.spec.clone(), Some(d.name.clone()), Origin::Adopted) {
            Ok(held) => {
                crate::systemd::fdstore::store(held);
                log::info!(
                    "{} ('{}'): adopted from pid {pid} fd {target} (inode {inode}), the socket it kept",
                    d.spec.key,
                    d.name
                );
                adopted += 1;
            }
            Err((_, e)) => log::error!("{} ('{}'): could not hold the copy: {e}", d.spec.key, d.name),
        }
    }
    adopted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernels_socket_tables() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n\
           1: 0100007F:1F91 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4243 1 0 100 0 0 10 0\n";
        let got = parse_inet_table(tcp, Transport::Tcp, "0A");
        if cfg!(target_endian = "little") {
            assert_eq!(got, vec![("tcp://127.0.0.1:8080".parse().unwrap(), 4242)]);
        }
        let tcp6 = "header\n   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0\n";
        if cfg!(target_endian = "little") {
            assert_eq!(parse_inet_table(tcp6, Transport::Tcp, "0A"), vec![("tcp://[::1]:80".parse().unwrap(), 77)]);
        }
        let unix = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 100 /run/a.sock\n\
            0000000000000000: 00000002 00000000 00000000 0001 03 101 /run/a.sock\n\
            0000000000000000: 00000002 00000000 00000000 0002 01   102 @dgram name\n\
            0000000000000000: 00000002 00000000 00010000 0005 01 103 @seq\n\
            0000000000000000: 00000002 00000000 00000000 0001 03 104\n";
        assert_eq!(
            parse_unix_table(unix),
            vec![
                ("unix:/run/a.sock".parse().unwrap(), 100),
                ("unix-dgram:@dgram name".parse().unwrap(), 102),
                ("unix-seqpacket:@seq".parse().unwrap(), 103),
            ]
        );
    }

    #[test]
    fn finds_the_holder_of_a_live_socket_in_the_tables() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        let u6 = std::net::UdpSocket::bind("[::1]:0").unwrap();
        let dir = std::env::temp_dir().join(format!("sockbroker-adopt-table-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let x = std::os::unix::net::UnixListener::bind(dir.join("with space.sock")).unwrap();
        let table = bound_sockets();
        for (text, fd) in [
            (format!("tcp://{}", l.local_addr().unwrap()), l.as_fd()),
            (format!("tcp://{}", l6.local_addr().unwrap()), l6.as_fd()),
            (format!("udp://{}", u6.local_addr().unwrap()), u6.as_fd()),
            (format!("unix:{}", dir.join("with space.sock").display()), x.as_fd()),
        ] {
            let key: SocketKey = text.parse().unwrap();
            assert!(table.contains(&(key, fd::inode(fd).unwrap())), "{text}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
