//! The state one broker hands to the next ([`HandoverState`]): the control
//! socket, every held socket with its full spec and counters, and the client
//! connections with no reply in flight. [`snapshot`] writes it from a
//! running [`Server`], numbering descriptors by number (re-exec) or by
//! position (takeover); [`Carried::from_state`] reads it back with the
//! descriptors it names, and [`Carried::into_server`] serves what came.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{UpgradeError, GENERATION, STATE_VERSION};
use crate::fd::{self, PeerCred};
use crate::registry::{Origin, Registry};
use crate::server::{ControlSocket, Server, ServerOptions};
use crate::spec::{SocketKey, SocketOptions, SocketSpec};

/// One held socket as handed over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SocketState {
    /// Descriptor: its number (re-exec) or its position among the passed
    /// descriptors (takeover).
    pub fd: i32,
    /// The socket's identity.
    pub key: SocketKey,
    /// The backlog it was opened with (also in `options`; kept for brokers
    /// that read only this).
    pub backlog: u32,
    /// Every option it was opened with, so the next broker compares the
    /// declared spec with the held one truthfully (absent in the state of
    /// older brokers: then only the backlog is known).
    #[serde(default)]
    pub options: Option<SocketOptions>,
    /// Its name, if any.
    pub name: Option<String>,
    /// Where it first came from (kept: a re-exec does not make a systemd
    /// socket an "upgrade" one).
    pub origin: Origin,
    /// When the first broker held it.
    pub created: SystemTime,
    /// How many times it was handed out, over all generations.
    pub handed_out: u64,
    /// The last client it went to.
    pub last_peer: Option<PeerCred>,
    /// The uid whose request created it, who may release it (absent in
    /// the state of older brokers).
    #[serde(default)]
    pub creator: Option<u32>,
}

/// The control socket as handed over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlState {
    /// Descriptor number or position, as for [`SocketState::fd`].
    pub fd: i32,
    /// The path clients connect to.
    pub path: PathBuf,
    /// Inode of the socket file to remove when the broker finally stops.
    pub owned_inode: Option<u64>,
}

/// A client connection as handed over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnState {
    /// Descriptor number or position, as for [`SocketState::fd`].
    pub fd: i32,
    /// The client, as read at accept.
    pub peer: PeerCred,
    /// Bytes of a request not yet complete.
    pub pending: Vec<u8>,
}

/// Everything one broker hands to the next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandoverState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Who wrote it.
    pub from_pid: u32,
    /// Upgrades so far, this one included.
    pub generation: u64,
    /// The control socket.
    pub control: ControlState,
    /// The held sockets.
    pub sockets: Vec<SocketState>,
    /// The client connections.
    pub connections: Vec<ConnState>,
    /// The request and connection counters of `metrics` (absent from a
    /// broker that had none: they start at zero).
    #[serde(default)]
    pub counters: crate::metrics::counters::CountersState,
}

/// How descriptors are referred to in a [`HandoverState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Numbering {
    /// By their number in this process (kept by `execve`).
    Raw,
    /// By their position in the list passed over SCM_RIGHTS.
    Position,
}

/// The state of `server` and the descriptors it refers to, in order.
pub(super) fn snapshot<'a>(server: &'a Server, numbering: Numbering) -> (HandoverState, Vec<BorrowedFd<'a>>) {
    let mut fds: Vec<BorrowedFd<'a>> = Vec::new();
    // Records a descriptor and returns how the state refers to it.
    let mut add = |fd: BorrowedFd<'a>| -> i32 {
        let n = match numbering {
            Numbering::Raw => fd.as_raw_fd(),
            Numbering::Position => fds.len() as i32,
        };
        fds.push(fd);
        n
    };
    let control = ControlState {
        fd: add(server.control().listener_fd()),
        path: server.control().path().to_path_buf(),
        owned_inode: server.control().owned_inode(),
    };
    let sockets = server
        .registry
        .iter()
        .map(|held| SocketState {
            fd: add(held.fd()),
            key: held.key().clone(),
            backlog: held.spec.options.backlog,
            options: Some(held.spec.options.clone()),
            name: held.name.clone(),
            origin: held.origin,
            created: held.created,
            handed_out: held.handed_out,
            last_peer: held.last_peer,
            creator: held.creator,
        })
        .collect();
    let connections = server
        .movable_connections()
        .into_iter()
        .map(|conn| ConnState { fd: add(conn.fd), peer: conn.peer, pending: conn.pending.to_vec() })
        .collect();
    let state = HandoverState {
        version: STATE_VERSION,
        from_pid: std::process::id(),
        generation: GENERATION.load(Ordering::Relaxed) + 1,
        control,
        sockets,
        connections,
        counters: server.counters.to_state(),
    };
    (state, fds)
}

/// What a broker received from its predecessor, ready to serve.
#[derive(Debug)]
pub struct Carried {
    control: ControlSocket,
    owned_inode: Option<u64>,
    registry: Registry,
    conns: Vec<(UnixStream, PeerCred, Vec<u8>)>,
    generation: u64,
    from: String,
    counters: crate::metrics::counters::CountersState,
}

impl Carried {
    /// Builds the broker's state from a handed-over state and the descriptors
    /// it refers to (by number or position). Descriptors the state does not
    /// mention are closed; one it mentions but that did not come is an error.
    pub(super) fn from_state(
        state: HandoverState,
        mut fds: HashMap<i32, OwnedFd>,
        from: String,
    ) -> Result<Carried, UpgradeError> {
        if state.version != STATE_VERSION {
            return Err(UpgradeError::State(format!(
                "state version {} from pid {}, this broker reads version {STATE_VERSION}",
                state.version, state.from_pid
            )));
        }
        let mut take = |n: i32, role: &dyn std::fmt::Display| -> Result<OwnedFd, UpgradeError> {
            let fd = fds.remove(&n).ok_or_else(|| UpgradeError::State(format!("{role}: descriptor {n} missing")))?;
            match fd::is_socket(fd.as_fd()) {
                Ok(true) => Ok(fd),
                Ok(false) => Err(UpgradeError::State(format!("{role}: descriptor {n} is not a socket"))),
                Err(e) => Err(UpgradeError::State(format!("{role}: descriptor {n}: {e}"))),
            }
        };
        let listener = UnixListener::from(take(state.control.fd, &"control socket")?);
        // The socket file becomes ours to remove only in into_server(): until
        // then, a failure must leave the path to the broker still serving.
        let control = ControlSocket::from_listener(listener, state.control.path.clone(), None)?;
        let mut registry = Registry::new();
        for s in state.sockets {
            let fd = take(s.fd, &s.key)?;
            let mut spec = SocketSpec::new(s.key.clone());
            match s.options {
                Some(options) => spec.options = options,
                None => spec.options.backlog = s.backlog,
            }
            match registry.adopt(fd, spec, s.name, s.origin) {
                Ok(held) => {
                    held.created = s.created;
                    held.handed_out = s.handed_out;
                    held.last_peer = s.last_peer;
                    held.creator = s.creator;
                }
                Err((_, conflict)) => {
                    return Err(UpgradeError::State(format!("{}: {conflict}", s.key)));
                }
            }
        }
        let mut conns = Vec::with_capacity(state.connections.len());
        for c in state.connections {
            let fd = take(c.fd, &format_args!("connection of {}", c.peer))?;
            conns.push((UnixStream::from(fd), c.peer, c.pending));
        }
        if !fds.is_empty() {
            log::warn!("{} descriptors handed over but not described in the state; closed", fds.len());
        }
        Ok(Carried {
            control,
            owned_inode: state.control.owned_inode,
            registry,
            conns,
            generation: state.generation,
            from,
            counters: state.counters,
        })
    }

    /// The server, serving what was carried over. Only now does the control
    /// socket file become this broker's to remove when it stops.
    /// Fails only when the loop cannot be set up (no epoll instance).
    pub fn into_server(mut self, options: ServerOptions) -> io::Result<Server> {
        GENERATION.store(self.generation, Ordering::Relaxed);
        self.control.set_owned_inode(self.owned_inode);
        let (sockets, conns) = (self.registry.len(), self.conns.len());
        let mut server = Server::new(self.control, self.registry, options)?;
        server.counters = crate::metrics::counters::Counters::from_state(&self.counters);
        for (stream, peer, pending) in self.conns {
            if let Err(e) = server.adopt_connection(stream, peer, &pending) {
                log::warn!("{peer}: could not resume the connection: {e}");
            }
        }
        log::info!(
            "resumed after {} (generation {}): holding {sockets} sockets, {conns} client connections carried over",
            self.from,
            self.generation
        );
        Ok(server)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn state_round_trips_as_json() {
        let state = HandoverState {
            version: STATE_VERSION,
            from_pid: 42,
            generation: 3,
            control: ControlState { fd: 0, path: "/run/x.sock".into(), owned_inode: Some(7) },
            sockets: vec![SocketState {
                fd: 1,
                key: "tcp://127.0.0.1:80".parse().unwrap(),
                backlog: 128,
                options: Some(SocketOptions { backlog: 128, keepalive: true, ..SocketOptions::default() }),
                name: Some("web".into()),
                origin: Origin::Systemd,
                created: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
                handed_out: 9,
                last_peer: Some(PeerCred { pid: 1, uid: 2, gid: 3 }),
                creator: Some(2),
            }],
            connections: vec![ConnState {
                fd: 2,
                peer: PeerCred { pid: 4, uid: 5, gid: 6 },
                pending: b"{\"me".to_vec(),
            }],
            counters: crate::metrics::counters::CountersState {
                accepted: 11,
                refused: [("max_clients".to_string(), 2)].into(),
                ..Default::default()
            },
        };
        let text = serde_json::to_string(&state).unwrap();
        assert!(text.contains("\"tcp://127.0.0.1:80\""), "{text}");
        assert_eq!(serde_json::from_str::<HandoverState>(&text).unwrap(), state);
        // The state of an older broker has no options: read as absent.
        let mut old: serde_json::Value = serde_json::from_str(&text).unwrap();
        old["sockets"][0].as_object_mut().unwrap().remove("options");
        old.as_object_mut().unwrap().remove("counters");
        let old: HandoverState = serde_json::from_value(old).unwrap();
        assert_eq!((old.sockets[0].options.as_ref(), old.sockets[0].backlog), (None, 128));
        assert_eq!(old.counters, Default::default(), "no counters: they start at zero");
    }
}
