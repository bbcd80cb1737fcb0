//! Adoption: copying live sockets out of a process that holds them, so the
//! broker holds the *same kernel sockets* (same inode, same accept queue)
//! without a moment where nobody listens.
//!
//! Three ways in, one way to the broker:
//! - [`copy_from_pid`] (`sockbroker adopt --pid PID`, run by root): lists
//!   `/proc/PID/fd`, copies each socket with `pidfd_open` + `pidfd_getfd`
//!   ([`crate::fd`]) and keeps those that are listening (stream, seqpacket) or
//!   bound and unconnected (datagram), identified by [`socket::inspect`];
//! - [`copy_from_multibinder`] (`sockbroker adopt --multibinder SOCK
//!   --from-templates …`, no privilege): asks a running multibinder for each
//!   `bind_tcp` of the templates through its own `bind` method;
//! - [`find_holders`] (`serve --adopt-orphans`): finds, for declared sockets
//!   the broker cannot bind, a process that holds a socket with that address
//!   (`/proc/net/{tcp,tcp6,udp,udp6,unix}` give the inode of the socket bound
//!   there, `/proc/*/fd` the processes that have `socket:[inode]` open), and
//!   copies it with [`copy_one`].
//!
//! The first two hand the copies to the running broker with the control
//! method `adopt` ([`Client::adopt`]): the broker itself needs no
//! CAP_SYS_PTRACE; it checks each received descriptor is a socket it
//! supports and derives its key from the socket alone. Only the recovery
//! path copies inside the broker, and so needs CAP_SYS_PTRACE there.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::client::{Client, ClientError};
use crate::fd;
use crate::haproxy::template::{BindRequest, Template, TemplateError};
use crate::protocol::bind::BindParams;
use crate::socket::{self, InspectError};
use crate::spec::{SocketKey, SpecError, Transport, UnixKind};

/// The control method that hands copied sockets to the broker.
pub const METHOD: &str = "adopt";

/// `CAP_SYS_PTRACE`'s bit in the capability sets.
const CAP_SYS_PTRACE: u32 = 19;

/// One socket to adopt, as named on the command line: `SPEC` or `NAME=SPEC`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The name the broker will hold it under.
    pub name: Option<String>,
    /// The socket.
    pub key: SocketKey,
}

impl FromStr for Wanted {
    type Err = SpecError;
    fn from_str(text: &str) -> Result<Self, SpecError> {
        // A spec never contains '=' before its scheme's "://" or ':'.
        match text.split_once('=') {
            Some((name, spec)) if !name.contains(':') && !name.is_empty() => {
                Ok(Wanted { name: Some(name.to_string()), key: spec.parse()? })
            }
            _ => Ok(Wanted { name: None, key: text.parse()? }),
        }
    }
}

/// A socket copied out of another process.
#[derive(Debug)]
pub struct Copied {
    /// Our copy (close-on-exec): the same kernel socket as the holder's.
    pub fd: OwnedFd,
    /// Its identity, read from the socket.
    pub key: SocketKey,
    /// Where it was copied from: `pid 123 fd 5`, `multibinder /run/mb.sock`.
    pub from: String,
    /// The name to hold it under.
    pub name: Option<String>,
}

/// Why sockets could not be copied out of a process.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// No process has this pid.
    #[error("pid {0}: no such process")]
    NoSuchProcess(i32),
    /// The kernel refused access to the process's descriptors.
    #[error("pid {pid}: not permitted to copy its descriptors: {why}")]
    NotPermitted {
        /// The process.
        pid: i32,
        /// What is missing, as far as it can be told (Yama, CAP_SYS_PTRACE).
        why: String,
    },
    /// The kernel has no `pidfd_open` / `pidfd_getfd`.
    #[error("{call}: not supported by this kernel (Linux 5.6 or later is needed to copy sockets out of a process): {source}")]
    Unsupported {
        /// The system call.
        call: &'static str,
        /// ENOSYS.
        #[source]
        source: io::Error,
    },
    /// The process holds no socket the broker could adopt.
    #[error("pid {pid}: no listening socket (looked at {sockets} sockets: {detail})")]
    NoListeningSocket {
        /// The process.
        pid: i32,
        /// How many sockets it has.
        sockets: usize,
        /// Why each was skipped, shortened.
        detail: String,
    },
    /// A socket asked for by `--socket` is not among the process's.
    #[error("{key}: pid {pid} holds no such socket (it holds: {held})")]
    NotHeld {
        /// The socket asked for.
        key: SocketKey,
        /// The process.
        pid: i32,
        /// What it holds.
        held: String,
    },
    /// Reading /proc failed.
    #[error("{path}: {source}")]
    Proc {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Copying one descriptor failed.
    #[error("pid {pid} fd {fd}: pidfd_getfd: {source}")]
    Copy {
        /// The process.
        pid: i32,
        /// Its descriptor.
        fd: RawFd,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The copied descriptor is not the socket it was expected to be.
    #[error("{from}: {source}")]
    Inspect {
        /// Where it was copied from: `pid 123 fd 5`, `multibinder PATH`.
        from: String,
        /// Why it is not the expected socket.
        #[source]
        source: InspectError,
    },
    /// A template could not be read.
    #[error("{path}: {source}")]
    Template {
        /// The template.
        path: PathBuf,
        /// The cause.
        #[source]
        source: TemplateIoError,
    },
    /// The templates hold no `bind_tcp` call.
    #[error("the templates hold no bind_tcp(...) call: nothing to copy from multibinder")]
    NoBinds,
    /// multibinder (or the broker) refused or could not be reached.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// multibinder answered a bind without a descriptor.
    #[error("{0}: multibinder answered without a descriptor")]
    NoDescriptor(SocketKey),
}

/// A template that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum TemplateIoError {
    /// Reading the file.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// Its syntax.
    #[error(transparent)]
    Syntax(#[from] TemplateError),
}

/// Maps the kernel's answer to pidfd_open/pidfd_getfd to an error a user can
/// act on.
fn kernel_error(pid: i32, fd: Option<RawFd>, call: &'static str, source: io::Error) -> AdoptError {
    match source.raw_os_error() {
        Some(nix::libc::ESRCH) => AdoptError::NoSuchProcess(pid),
        Some(nix::libc::ENOSYS) => AdoptError::Unsupported { call, source },
        Some(nix::libc::EPERM) | Some(nix::libc::EACCES) => {
            AdoptError::NotPermitted { pid, why: why_not_permitted(Some(pid)) }
        }
        _ => AdoptError::Copy { pid, fd: fd.unwrap_or(-1), source },
    }
}

/// What stands between this process and another's descriptors, as far as
/// /proc tells: Yama's ptrace_scope, our CAP_SYS_PTRACE, the owners.
pub fn why_not_permitted(pid: Option<i32>) -> String {
    let mut reasons = Vec::new();
    match std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").map(|s| s.trim().to_string()) {
        Ok(scope) if scope == "3" => reasons.push(
            "Yama kernel.yama.ptrace_scope is 3: no process may copy another's descriptors, not even root (it can only be lowered by a reboot)".to_string(),
        ),
        Ok(scope) if scope == "2" => {
            reasons.push("Yama kernel.yama.ptrace_scope is 2: only a process with CAP_SYS_PTRACE may".to_string())
        }
        _ => {}
    }
    let has_ptrace = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string())))
        .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
        .map(|caps| caps & (1 << CAP_SYS_PTRACE) != 0);
    if has_ptrace == Some(false) {
        let target = match pid.and_then(|pid| std::fs::metadata(format!("/proc/{pid}")).ok()) {
            Some(m) => format!("a process of uid {}", std::os::unix::fs::MetadataExt::uid(&m)),
            None => "another user's process".to_string(),
        };
        reasons.push(format!(
            "this process (uid {}) lacks CAP_SYS_PTRACE, which reading the descriptors of {target} (or of one with \
             capabilities this process lacks) needs: run it as root with all capabilities",
            nix::unistd::geteuid()
        ));
    }
    if reasons.is_empty() {
        reasons.push("the kernel refused ptrace access (a security module, or a process that is not dumpable)".into());
    }
    reasons.join("; ")
}

/// Copies the adoptable sockets of process `pid`: all of them, or those in
/// `wanted` (each must be there). See the module doc.
pub fn copy_from_pid(pid: i32, wanted: &[Wanted]) -> Result<Vec<Copied>, AdoptError> {
    let pidfd = fd::pidfd_open(pid).map_err(|e| kernel_error(pid, None, "pidfd_open", e))?;
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let proc_err = |source: io::Error| match source.kind() {
        io::ErrorKind::NotFound => AdoptError::NoSuchProcess(pid),
        io::ErrorKind::PermissionDenied => AdoptError::NotPermitted { pid, why: why_not_permitted(Some(pid)) },
        _ => AdoptError::Proc { path: dir.clone(), source },
    };
    let mut numbers: Vec<RawFd> = std::fs::read_dir(&dir)
        .map_err(proc_err)?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    numbers.sort_unstable();
    let mut seen = HashSet::new();
    let mut found: Vec<Copied> = Vec::new();
    let mut skipped = Vec::new();
    let mut sockets = 0;
    for n in numbers {
        let link = match std::fs::read_link(dir.join(n.to_string())) {
            Ok(link) => link,
            // The folder may be listable while its links are not (the kernel
            // checks ptrace access on each).
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(AdoptError::NotPermitted { pid, why: why_not_permitted(Some(pid)) })
            }
            Err(_) => continue, // closed since the listing
        };
        let Some(inode) = socket_inode(&link) else { continue };
        sockets += 1;
        if !seen.insert(inode) {
            continue; // a second descriptor for a socket already copied
        }
        let copy = match fd::pidfd_getfd(pidfd.as_fd(), n) {
            Ok(copy) => copy,
            // Closed since the listing: nothing to adopt there.
            Err(e) if e.raw_os_error() == Some(nix::libc::EBADF) => continue,
            Err(e) => return Err(kernel_error(pid, Some(n), "pidfd_getfd", e)),
        };
        match adoptable(copy.as_fd()) {
            Ok(key) => found.push(Copied { fd: copy, key, from: format!("pid {pid} fd {n}"), name: None }),
            Err(why) => skipped.push(format!("fd {n}: {why}")),
        }
    }
    if wanted.is_empty() {
        if found.is_empty() {
            let detail = if skipped.is_empty() {
                "none".to_string()
            } else {
                let more = skipped.len().saturating_sub(3);
                let mut d = skipped.iter().take(3).cloned().collect::<Vec<_>>().join("; ");
                if more > 0 {
                    d.push_str(&format!("; {more} more"));
                }
                d
            };
            return Err(AdoptError::NoListeningSocket { pid, sockets, detail });
        }
        return Ok(found);
    }
    let held = found.iter().map(|c| c.key.to_string()).collect::<Vec<_>>().join(", ");
    let mut by_key: HashMap<SocketKey, Copied> = found.into_iter().map(|c| (c.key.clone(), c)).collect();
    let mut out = Vec::with_capacity(wanted.len());
    for w in wanted {
        let Some(mut c) = by_key.remove(&w.key) else {
            let held = if held.is_empty() { "no listening socket".to_string() } else { held };
            return Err(AdoptError::NotHeld { key: w.key.clone(), pid, held });
        };
        c.name = w.name.clone();
        out.push(c);
    }
    Ok(out)
}

/// The key of a socket the broker can hold, or why it cannot: not a
/// supported kind, not listening, or a connected (client) datagram socket.
pub fn adoptable(fd: BorrowedFd<'_>) -> Result<SocketKey, String> {
    let key = socket::inspect(fd).map_err(|e| e.to_string())?;
    if !key.is_listening_kind() && socket::is_connected(fd) {
        return Err(format!("{key}: a connected datagram socket (a client's, not a service's)"));
    }
    Ok(key)
}

/// `socket:[12345]` → 12345.
fn socket_inode(link: &Path) -> Option<u64> {
    link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// Copies descriptor `target` of `pid` and checks it is the socket `key`.
pub fn copy_one(pid: i32, target: RawFd, key: &SocketKey) -> Result<OwnedFd, AdoptError> {
    let pidfd = fd::pidfd_open(pid).map_err(|e| kernel_error(pid, None, "pidfd_open", e))?;
    let copy = fd::pidfd_getfd(pidfd.as_fd(), target).map_err(|e| kernel_error(pid, Some(target), "pidfd_getfd", e))?;
    let from = || format!("pid {pid} fd {target}");
    let got = socket::inspect(copy.as_fd()).map_err(|source| AdoptError::Inspect { from: from(), source })?;
    if &got != key {
        let source = InspectError::Unsupported(format!("it is {got}, not {key} (the process changed it meanwhile)"));
        return Err(AdoptError::Inspect { from: from(), source });
    }
    Ok(copy)
}

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

/// Copies the sockets of every `bind_tcp(...)` call in `templates` out of
/// the multibinder serving on `sock`, through its own `bind` method (what
/// its HAProxy renderer does): the same kernel sockets, no privilege needed.
pub fn copy_from_multibinder(sock: &Path, templates: &[PathBuf]) -> Result<Vec<Copied>, AdoptError> {
    let mut keys: Vec<(SocketKey, u32)> = Vec::new();
    for path in templates {
        let terr = |source: TemplateIoError| AdoptError::Template { path: path.clone(), source };
        let text = std::fs::read_to_string(path).map_err(|e| terr(e.into()))?;
        let template = Template::parse(&text).map_err(|e| terr(e.into()))?;
        for (request, _) in template.binds() {
            if let (BindRequest::Tcp { .. }, Some(spec)) = (request, request.spec()) {
                if !keys.iter().any(|(k, _)| *k == spec.key) {
                    keys.push((spec.key, spec.options.backlog));
                }
            }
        }
    }
    if keys.is_empty() {
        return Err(AdoptError::NoBinds);
    }
    let mut client = Client::connect(sock)?;
    let mut out = Vec::with_capacity(keys.len());
    for (key, backlog) in keys {
        let SocketKey::Inet { addr, .. } = &key else { continue };
        // multibinder's own request, byte for byte the fields its client sends.
        let params = BindParams {
            address: Some(addr.ip().to_string()),
            port: Some(i64::from(addr.port())),
            backlog: Some(i64::from(backlog)),
            ..BindParams::default()
        };
        let (_, fds) = client.call("bind", params.to_json())?;
        let fd = fds.into_iter().next().ok_or_else(|| AdoptError::NoDescriptor(key.clone()))?;
        let from = || format!("multibinder {}", sock.display());
        let got = socket::inspect(fd.as_fd()).map_err(|source| AdoptError::Inspect { from: from(), source })?;
        if got != key {
            let source = InspectError::Unsupported(format!("it answered {key} with {got}"));
            return Err(AdoptError::Inspect { from: from(), source });
        }
        out.push(Copied { fd, key, from: format!("multibinder {}", sock.display()), name: None });
    }
    Ok(out)
}

/// `serve --adopt-orphans`: for each declared socket the broker does not
/// hold, a process that holds a socket bound at its address (a daemon that
/// kept its copy while the broker was killed) is found with [`find_holders`]
/// and the socket copied from it, so the declared socket comes back as the
/// same kernel socket instead of failing with "Address already in use".
/// Needs CAP_SYS_PTRACE (or the holder's uid) in the broker. Failures are
/// logged; the declared socket is then opened as usual (and that bind reports
/// the conflict). Returns how many were adopted.
pub fn adopt_orphans(registry: &mut crate::registry::Registry, declared: &[crate::config::Declared]) -> usize {
    let missing: Vec<&crate::config::Declared> =
        declared.iter().filter(|d| registry.get(&d.spec.key).is_none()).collect();
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
        match registry.adopt(fd, d.spec.clone(), Some(d.name.clone()), crate::registry::Origin::Adopted) {
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

/// How the broker answered for one adopted socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adopted {
    /// The socket's key.
    pub key: SocketKey,
    /// Its inode.
    pub inode: u64,
    /// `adopted`, or `already-held` when the broker held that very socket.
    pub outcome: Outcome,
}

/// What `adopt` did with one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The broker holds it now.
    Adopted,
    /// The broker already held this very socket (same inode): nothing changed.
    AlreadyHeld,
}

/// One entry of the `adopt` params; the descriptors travel with the request,
/// in the same order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptItem {
    /// The name to hold the socket under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where it comes from, for the broker's log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

impl Client {
    /// Hands copied sockets to the broker (method `adopt`; root or the
    /// broker's user only). The broker answers for each, in order.
    pub fn adopt(&mut self, sockets: &[Copied]) -> Result<Vec<Adopted>, ClientError> {
        // One request per SCM_RIGHTS message's worth of descriptors.
        if sockets.len() > fd::SCM_MAX_FD {
            let mut all = Vec::with_capacity(sockets.len());
            for chunk in sockets.chunks(fd::SCM_MAX_FD) {
                all.extend(self.adopt(chunk)?);
            }
            return Ok(all);
        }
        let items: Vec<AdoptItem> =
            sockets.iter().map(|c| AdoptItem { name: c.name.clone(), from: Some(c.from.clone()) }).collect();
        let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|c| c.fd.as_fd()).collect();
        let (result, _) = self.call_with_fds(METHOD, json!({ "sockets": items }), &fds)?;
        serde_json::from_value::<Vec<Adopted>>(result.clone()).map_err(|e| ClientError::Protocol {
            path: self.path().to_path_buf(),
            detail: format!("adopt: unexpected result {result}: {e}"),
        })
    }
}

/// Parses the `adopt` params.
pub fn parse_params(params: &Value) -> Result<Vec<AdoptItem>, String> {
    let items = params.get("sockets").ok_or("\"sockets\" (an array) is required")?;
    serde_json::from_value(items.clone()).map_err(|e| format!("\"sockets\": {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_forms() {
        let w: Wanted = "web=tcp://127.0.0.1:80".parse().unwrap();
        assert_eq!(w.name.as_deref(), Some("web"));
        assert_eq!(w.key.to_string(), "tcp://127.0.0.1:80");
        let w: Wanted = "unix:/run/a=b.sock".parse().unwrap();
        assert_eq!((w.name, w.key.to_string()), (None, "unix:/run/a=b.sock".to_string()));
        assert!("web=nonsense".parse::<Wanted>().is_err());
    }

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
    fn kernel_refusals_become_errors_a_user_can_act_on() {
        let err = |errno| kernel_error(1, Some(3), "pidfd_getfd", io::Error::from_raw_os_error(errno));
        let text = err(nix::libc::ENOSYS).to_string();
        assert!(text.contains("pidfd_getfd") && text.contains("Linux 5.6"), "{text}");
        assert!(matches!(err(nix::libc::ESRCH), AdoptError::NoSuchProcess(1)));
        assert!(matches!(err(nix::libc::EPERM), AdoptError::NotPermitted { pid: 1, .. }));
        assert!(matches!(err(nix::libc::EINVAL), AdoptError::Copy { pid: 1, fd: 3, .. }));
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
