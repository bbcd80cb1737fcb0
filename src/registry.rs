//! The sockets the broker holds, and the sole owner of their descriptors.
//!
//! A held socket is found by its [`SocketKey`] or by its name.
//! [`Registry::get_or_open`] is the only path from a request to a descriptor:
//! it returns the held socket for a key, opening it first when it is new.
//! Everything else (the server, the fd store, the upgrade code) borrows the
//! descriptors; nothing but the registry closes them.
//!
//! The registry is used from the broker's single control thread, so the
//! find-or-bind sequence for one key cannot interleave with another request
//! for the same key. Were it ever shared between threads, it would need one
//! lock around that sequence: otherwise two first requests for one address
//! could each bind, and the second would fail with "Address in use" instead of
//! receiving the first one's socket.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::SystemTime;

use crate::fd::PeerCred;
use crate::socket::{self, OpenError};
use crate::spec::{SocketKey, SocketSpec};

/// Where a held socket came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// Passed by systemd socket activation (a `.socket` unit).
    Systemd,
    /// Declared in the configuration file.
    Config,
    /// Created when a client first asked for it.
    OnDemand,
    /// Given back by systemd's file descriptor store after a broker restart.
    FdStore,
    /// Carried over from the previous broker by a re-exec or takeover.
    Upgrade,
    /// Copied out of another process that held it (`sockbroker adopt`, or
    /// `serve --adopt-orphans`): the same kernel socket that process has.
    Adopted,
}

/// A socket the broker holds.
#[derive(Debug)]
pub struct HeldSocket {
    fd: OwnedFd,
    /// How the socket was asked for; its key is the registry key.
    pub spec: SocketSpec,
    /// Its name, when it has one (from systemd or the configuration).
    pub name: Option<String>,
    /// Where it came from.
    pub origin: Origin,
    /// When the broker first held it.
    pub created: SystemTime,
    /// How many times it was handed to a client.
    pub handed_out: u64,
    /// The last client it was handed to.
    pub last_peer: Option<PeerCred>,
    /// The uid of the peer whose request created it (on-demand sockets made
    /// by this broker); it may `release` it.
    pub creator: Option<u32>,
}

impl HeldSocket {
    /// The held descriptor, borrowed.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The socket's identity.
    pub fn key(&self) -> &SocketKey {
        &self.spec.key
    }
}

/// A held socket was asked for by a name nobody gave.
#[derive(Debug, thiserror::Error)]
#[error("no socket named '{0}' (names come from systemd's FileDescriptorName= or the configuration)")]
pub struct UnknownName(pub String);

/// The sockets the broker holds, by key and by name.
#[derive(Debug, Default)]
pub struct Registry {
    /// Boxed: a hash table keeps about 1.5 slots per entry, all of them
    /// resident once spread over by inserts; a slot of a pointer rather than
    /// a whole `HeldSocket` (240 bytes) keeps 10,000 sockets in a few MiB.
    by_key: HashMap<SocketKey, Box<HeldSocket>>,
    names: HashMap<String, SocketKey>,
    /// Socket files this broker created (device and inode): the only stale
    /// files it replaces without a rule for the exact path.
    created_files: std::collections::HashSet<socket::FileId>,
    /// Bumped whenever a socket is added, removed or renamed, so a sorted
    /// listing can be kept until it changes.
    generation: u64,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// The held socket for `spec`'s key, opened on demand when the broker
    /// does not hold it yet. The boolean is true when it was just opened.
    /// A stale socket file at a UNIX path is replaced (a trusted caller).
    pub fn get_or_open(&mut self, spec: &SocketSpec) -> Result<(&mut HeldSocket, bool), OpenError> {
        self.get_or_open_for(spec, None, true)
    }

    /// [`Registry::get_or_open`] for a peer: `creator` is recorded on a new
    /// socket (who may release it), and a stale socket file found at a UNIX
    /// path is replaced only when `replace_any` or when this broker created
    /// that very file.
    pub fn get_or_open_for(
        &mut self,
        spec: &SocketSpec,
        creator: Option<u32>,
        replace_any: bool,
    ) -> Result<(&mut HeldSocket, bool), OpenError> {
        use std::collections::hash_map::Entry;
        match self.by_key.entry(spec.key.clone()) {
            Entry::Occupied(e) => Ok((&mut **e.into_mut(), false)),
            Entry::Vacant(e) => {
                let created = &self.created_files;
                let (fd, file) = socket::open_checked(spec, &|id| replace_any || created.contains(&id))?;
                if let Some(file) = file {
                    self.created_files.insert(file);
                }
                self.generation += 1;
                let held = HeldSocket {
                    creator,
                    fd,
                    spec: spec.clone(),
                    name: None,
                    origin: Origin::OnDemand,
                    created: SystemTime::now(),
                    handed_out: 0,
                    last_peer: None,
                };
                Ok((&mut **e.insert(Box::new(held)), true))
            }
        }
    }

    /// The held socket called `name`.
    pub fn by_name(&mut self, name: &str) -> Result<&mut HeldSocket, UnknownName> {
        self.names
            .get(name)
            .and_then(|key| self.by_key.get_mut(key))
            .map(|held| &mut **held)
            .ok_or_else(|| UnknownName(name.to_string()))
    }

    /// The held socket with this key.
    pub fn get(&self, key: &SocketKey) -> Option<&HeldSocket> {
        self.by_key.get(key).map(|held| &**held)
    }

    /// Takes ownership of a socket that already exists (from systemd, the fd
    /// store or a previous broker). Returns the descriptor back when the key
    /// or the name is already held, so the caller can report it.
    pub fn adopt(
        &mut self,
        fd: OwnedFd,
        spec: SocketSpec,
        name: Option<String>,
        origin: Origin,
    ) -> Result<&mut HeldSocket, (OwnedFd, AdoptConflict)> {
        if self.by_key.contains_key(&spec.key) {
            return Err((fd, AdoptConflict::Key(spec.key)));
        }
        if let Some(n) = &name {
            if self.names.contains_key(n) {
                return Err((fd, AdoptConflict::Name(n.clone())));
            }
            self.names.insert(n.clone(), spec.key.clone());
        }
        let key = spec.key.clone();
        self.generation += 1;
        let held = HeldSocket {
            fd,
            spec,
            name,
            origin,
            created: SystemTime::now(),
            handed_out: 0,
            last_peer: None,
            creator: None,
        };
        Ok(&mut **self.by_key.entry(key).or_insert(Box::new(held)))
    }

    /// The held socket called `name`, read-only.
    pub fn named(&self, name: &str) -> Option<&HeldSocket> {
        self.names.get(name).and_then(|key| self.by_key.get(key)).map(|held| &**held)
    }

    /// The held socket with this key, to update its bookkeeping.
    pub fn get_mut(&mut self, key: &SocketKey) -> Option<&mut HeldSocket> {
        self.by_key.get_mut(key).map(|held| &mut **held)
    }

    /// Gives the held socket `key` a name, or takes its name away (`None`).
    /// A name held by another socket is a conflict; nothing changes then.
    pub fn set_name(&mut self, key: &SocketKey, name: Option<String>) -> Result<(), AdoptConflict> {
        if let Some(n) = &name {
            if self.names.get(n).is_some_and(|k| k != key) {
                return Err(AdoptConflict::Name(n.clone()));
            }
        }
        let held = self.by_key.get_mut(key).ok_or_else(|| AdoptConflict::NotHeld(key.clone()))?;
        if let Some(old) = held.name.take() {
            self.names.remove(&old);
        }
        if let Some(n) = &name {
            self.names.insert(n.clone(), key.clone());
        }
        held.name = name;
        self.generation += 1;
        Ok(())
    }

    /// Stops holding a socket; the broker's descriptor is closed when the
    /// returned value drops, while processes that received it keep theirs.
    /// The caller takes it out of systemd's fd store too
    /// ([`crate::systemd::fdstore::remove`]); the registry knows nothing of
    /// the store.
    pub fn release(&mut self, key: &SocketKey) -> Option<HeldSocket> {
        let held = *self.by_key.remove(key)?;
        self.generation += 1;
        if let Some(name) = &held.name {
            self.names.remove(name);
        }
        Some(held)
    }

    /// Every held socket, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &HeldSocket> {
        self.by_key.values().map(|held| &**held)
    }

    /// Changes whenever the set of held sockets or their names change.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How many sockets are held.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether no socket is held.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// Why a socket could not be adopted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdoptConflict {
    /// Another held socket has the same key.
    #[error("{0} is already held")]
    Key(SocketKey),
    /// Another held socket has the same name.
    #[error("the name '{0}' is already taken")]
    Name(String),
    /// The socket to name is not held.
    #[error("{0} is not held")]
    NotHeld(SocketKey),
}
