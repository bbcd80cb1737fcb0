//! Who may have which socket: allow rules judged against a peer's credentials.
//!
//! A request reaches [`Policy::check`] with the credentials the kernel
//! recorded when the client connected (`SO_PEERCRED`, captured at accept by
//! the server) and the socket it concerns: its name, when it is held under
//! one, and its [`SocketKey`]. The decision:
//!
//! 1. root, and the broker's own uid, may do anything (they could take the
//!    sockets from the broker's memory anyway);
//! 2. otherwise a rule must match the peer — `anyone`, its uid, or one of its
//!    groups: the gid the kernel recorded plus the supplementary groups the
//!    user database gives for its user name (`getgrouplist`) — and grant the
//!    socket, by name (`sockets`) or by address (`on_demand`, which also
//!    covers sockets that already exist at a matching address);
//! 3. nothing matched: a [`Denied`] error naming the user and the socket.
//!
//! With no rule at all, only root and the broker's uid are served. The one
//! line that opens the broker to everyone, as multibinder was:
//!
//! ```toml
//! allow = [{ anyone = true, sockets = ["*"], on_demand = ["*"] }]
//! ```
//!
//! The user database is read per refused-by-uid request that a group rule
//! could still allow, from the control thread: with a slow NSS backend (LDAP)
//! prefer `uid`/`user` rules or a local group.
//!
//! The `on_demand` address patterns live in `pattern`.

use std::fmt;

use crate::fd::PeerCred;
use crate::protocol::{code, RpcError, TAKEOVER_METHOD};
use crate::spec::SocketKey;

mod pattern;

pub use pattern::{AddressPattern, PatternError};

/// Whom a rule is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    /// Every peer.
    Anyone,
    /// A peer with this uid.
    Uid(u32),
    /// A peer in this group (primary or supplementary).
    Gid(u32),
}

/// One allow rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Whom it allows.
    pub who: Who,
    /// Names of held sockets it grants; `*` grants every name.
    pub sockets: Vec<String>,
    /// Addresses it grants, created on demand when not held yet.
    pub on_demand: Vec<AddressPattern>,
    /// Whether it grants `list` and `status`.
    pub introspect: bool,
    /// What an on-demand UNIX socket file made under this rule gets.
    pub unix_file: UnixFile,
    /// Where the rule was written (`FILE:LINE`), for the log.
    pub source: String,
}

/// Owner, group and mode for the UNIX socket files a rule's `on_demand`
/// creates (`socket_owner`, `socket_group`, `socket_mode`); each `None`
/// means the default of [`UnixFile::for_peer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnixFile {
    /// Owner uid.
    pub owner: Option<u32>,
    /// Group gid.
    pub group: Option<u32>,
    /// Permission bits.
    pub mode: Option<u32>,
}

/// The mode of an on-demand UNIX socket file when the rule sets none: the
/// owner (the peer that asked) and its group may connect, as with the
/// control socket; others need a rule that says `socket_mode`.
pub const DEFAULT_UNIX_MODE: u32 = 0o660;

impl UnixFile {
    /// Owner, group and mode for a file made for `peer`: the rule's values,
    /// else the peer's uid and gid and [`DEFAULT_UNIX_MODE`]. Connecting to
    /// a UNIX socket needs write permission on its file, so the default
    /// lets the daemon that asked (and its group) use what it asked for.
    pub fn for_peer(self, peer: &PeerCred) -> (u32, u32, u32) {
        (self.owner.unwrap_or(peer.uid), self.group.unwrap_or(peer.gid), self.mode.unwrap_or(DEFAULT_UNIX_MODE))
    }
}

/// Why a request was allowed.
#[derive(Debug, Clone, Copy)]
pub enum Grant<'a> {
    /// Root or the broker's own uid.
    Trusted,
    /// This rule.
    Rule(&'a Rule),
}

impl Grant<'_> {
    /// What an on-demand UNIX socket file made under this grant gets.
    pub fn unix_file(&self) -> UnixFile {
        match self {
            Grant::Trusted => UnixFile::default(),
            Grant::Rule(rule) => rule.unix_file,
        }
    }

    /// Whether a stale socket file at `key`'s path, which the broker did not
    /// create, may be replaced: by trusted peers, and under a rule that names
    /// this exact path (no `*`).
    pub fn may_replace(&self, key: &SocketKey) -> bool {
        match self {
            Grant::Trusted => true,
            Grant::Rule(rule) => rule.on_demand.iter().any(|p| p.is_exact() && p.matches(key)),
        }
    }
}

/// What a peer is trying to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Receive a socket (creating it if needed).
    Bind,
    /// Make the broker close an on-demand socket.
    Release,
    /// Administrative methods (reload).
    Admin,
    /// `list` and `status`.
    Introspect,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Bind => "bind",
            Action::Release => "release",
            Action::Admin => "use",
            Action::Introspect => "use",
        })
    }
}

/// A refusal: "uid 1001 (www) may not bind tcp://0.0.0.0:80".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("uid {uid} ({user}) may not {action} {what}")]
pub struct Denied {
    /// The peer's uid.
    pub uid: u32,
    /// Its user name, or `unknown user` when the database has none.
    pub user: String,
    /// What it tried.
    pub action: Action,
    /// The socket (or method) concerned.
    pub what: String,
}

impl Denied {
    /// The refusal as a client reads it (code 10003): which configuration
    /// file's rules refused, so an operator knows what to edit.
    pub fn explained(&self, rules_from: &dyn std::fmt::Display) -> String {
        format!("{self}: no [[allow]] rule in {rules_from} grants it")
    }
}

/// The rules in force, and the broker's own uid.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
    owner: u32,
    /// User names of refused uids, read once per policy: a peer looping on
    /// a refused 2,000-item `bind_many` must not cost 2,000 user database
    /// lookups a request.
    names: std::cell::RefCell<std::collections::HashMap<u32, String>>,
}

impl Policy {
    /// A policy with these rules for a broker running as the current euid.
    pub fn new(rules: Vec<Rule>) -> Policy {
        Policy { rules, owner: nix::unistd::geteuid().as_raw(), names: Default::default() }
    }

    /// The rules.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether `peer` may act on the socket `key` (held under `name`, if any).
    pub fn check(
        &self,
        peer: &PeerCred,
        action: Action,
        name: Option<&str>,
        key: &SocketKey,
    ) -> Result<Grant<'_>, Denied> {
        if self.is_trusted(peer) {
            return Ok(Grant::Trusted);
        }
        let grants = |rule: &Rule| {
            let by_name =
                action == Action::Bind && name.is_some_and(|n| rule.sockets.iter().any(|s| s == "*" || s == n));
            by_name || rule.on_demand.iter().any(|p| p.matches(key))
        };
        let mut groups: Option<Vec<u32>> = None;
        for rule in self.rules.iter().filter(|r| grants(r)) {
            if self.member(rule, peer, &mut groups) {
                log::debug!("{peer} {action} {key}: allowed by the rule at {}", rule.source);
                return Ok(Grant::Rule(rule));
            }
        }
        let what = match name {
            Some(n) => format!("{key} (socket '{n}')"),
            None => key.to_string(),
        };
        Err(self.denied(peer, action, what))
    }

    fn member(&self, rule: &Rule, peer: &PeerCred, groups: &mut Option<Vec<u32>>) -> bool {
        match rule.who {
            Who::Anyone => true,
            Who::Uid(uid) => uid == peer.uid,
            Who::Gid(gid) => {
                gid == peer.gid || groups.get_or_insert_with(|| supplementary_groups(peer.uid)).contains(&gid)
            }
        }
    }

    /// Whether `peer` may use `list` and `status`: root, the broker's uid,
    /// and peers of a rule with `introspect = true`.
    pub fn check_introspect(&self, peer: &PeerCred, method: &str) -> Result<(), Denied> {
        if self.is_trusted(peer) {
            return Ok(());
        }
        let mut groups = None;
        if self.rules.iter().filter(|r| r.introspect).any(|r| self.member(r, peer, &mut groups)) {
            return Ok(());
        }
        Err(self.denied(peer, Action::Introspect, format!("method '{method}' (needs a rule with introspect = true)")))
    }

    /// Whether a rule names `peer` by its uid or one of its groups (not
    /// `anyone`): such peers may use the slots kept in reserve when the
    /// connection table is nearly full.
    pub fn names_peer(&self, peer: &PeerCred) -> bool {
        if self.is_trusted(peer) {
            return true;
        }
        let mut groups = None;
        self.rules.iter().filter(|r| r.who != Who::Anyone).any(|r| self.member(r, peer, &mut groups))
    }

    /// Whether `peer` is root or the broker's own uid.
    pub fn trusts(&self, peer: &PeerCred) -> bool {
        self.is_trusted(peer)
    }

    /// The broker's own uid.
    pub fn owner(&self) -> u32 {
        self.owner
    }

    /// Whether `peer` may use an administrative method: root and the
    /// broker's own uid only.
    pub fn check_admin(&self, peer: &PeerCred, method: &str) -> Result<(), Denied> {
        if self.is_trusted(peer) {
            Ok(())
        } else {
            Err(self.denied(peer, Action::Admin, format!("method '{method}' (root or uid {} only)", self.owner)))
        }
    }

    fn is_trusted(&self, peer: &PeerCred) -> bool {
        peer.uid == 0 || peer.uid == self.owner
    }

    fn denied(&self, peer: &PeerCred, action: Action, what: String) -> Denied {
        let mut names = self.names.borrow_mut();
        if names.len() > 4096 {
            names.clear();
        }
        let user = names
            .entry(peer.uid)
            .or_insert_with(|| match nix::unistd::User::from_uid(peer.uid.into()) {
                Ok(Some(u)) => u.name,
                _ => "unknown user".to_string(),
            })
            .clone();
        Denied { uid: peer.uid, user, action, what }
    }
}

impl Default for Policy {
    /// No rules: root and the broker's uid only.
    fn default() -> Self {
        Policy::new(Vec::new())
    }
}

/// The groups the user database gives the user with this uid (primary and
/// supplementary); empty when the uid has no entry.
pub fn supplementary_groups(uid: u32) -> Vec<u32> {
    let user = match nix::unistd::User::from_uid(uid.into()) {
        Ok(Some(user)) => user,
        Ok(None) => return Vec::new(),
        Err(e) => {
            log::warn!("uid {uid}: could not read the user database: {e}");
            return Vec::new();
        }
    };
    let Ok(name) = std::ffi::CString::new(user.name.clone()) else { return Vec::new() };
    match nix::unistd::getgrouplist(&name, user.gid) {
        Ok(groups) => groups.into_iter().map(|g| g.as_raw()).collect(),
        Err(e) => {
            log::warn!("user {}: could not list its groups: {e}", user.name);
            vec![user.gid.as_raw()]
        }
    }
}

/// Whether `peer` may take over this broker: root or the broker's own user,
/// on a connection with no reply in flight (the takeover reply must be the
/// next thing it reads).
pub fn authorize_takeover(peer: PeerCred, alone: bool) -> Result<(), RpcError> {
    let me = nix::unistd::geteuid().as_raw();
    if peer.uid != 0 && peer.uid != me {
        log::warn!("{peer} {TAKEOVER_METHOD}: refused: only root or uid {me} may take over this broker");
        return Err(RpcError::new(
            code::TAKEOVER_REFUSED,
            format!("Takeover refused: uid {} is neither root nor the broker's uid {me}", peer.uid),
        ));
    }
    if !alone {
        return Err(RpcError::new(
            code::TAKEOVER_REFUSED,
            "Takeover refused: replies are still pending on this connection",
        ));
    }
    log::info!("{peer} {TAKEOVER_METHOD}: handing over");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> SocketKey {
        text.parse().unwrap()
    }

    #[test]
    fn only_exact_patterns_replace_stale_files() {
        let rule = |p: &str| Rule {
            who: Who::Anyone,
            sockets: vec![],
            on_demand: vec![p.parse().unwrap()],
            introspect: false,
            unix_file: UnixFile::default(),
            source: "t:1".into(),
        };
        let k = key("unix:/run/app/x.sock");
        assert!(Grant::Trusted.may_replace(&k));
        assert!(Grant::Rule(&rule("unix:/run/app/x.sock")).may_replace(&k));
        assert!(!Grant::Rule(&rule("unix:/run/app/*")).may_replace(&k));
        assert!(!Grant::Rule(&rule("*")).may_replace(&k));
        let peer = PeerCred { pid: 1, uid: 1001, gid: 1002 };
        assert_eq!(UnixFile::default().for_peer(&peer), (1001, 1002, 0o660));
        assert_eq!(UnixFile { owner: Some(0), group: None, mode: Some(0o666) }.for_peer(&peer), (0, 1002, 0o666));
    }

    #[test]
    fn rules_decide() {
        let me = nix::unistd::geteuid().as_raw();
        let stranger = if me == 12345 { 12346 } else { 12345 };
        let peer = PeerCred { pid: 1, uid: stranger, gid: 54321 };
        let policy = Policy::new(vec![
            Rule {
                who: Who::Gid(54321),
                sockets: vec!["web".into()],
                on_demand: vec!["tcp://127.0.0.1:8000-8999".parse().unwrap()],
                introspect: false,
                unix_file: UnixFile::default(),
                source: "t:1".into(),
            },
            Rule {
                who: Who::Uid(1),
                sockets: vec!["*".into()],
                on_demand: vec![],
                introspect: false,
                unix_file: UnixFile::default(),
                source: "t:2".into(),
            },
        ]);
        let k = key("tcp://127.0.0.1:80");
        assert!(policy.check(&peer, Action::Bind, Some("web"), &k).is_ok());
        assert!(policy.check(&peer, Action::Bind, Some("db"), &k).is_err());
        assert!(policy.check(&peer, Action::Bind, None, &key("tcp://127.0.0.1:8080")).is_ok());
        assert!(policy.check(&peer, Action::Release, Some("web"), &k).is_err());
        let e = policy.check(&peer, Action::Bind, None, &k).unwrap_err();
        assert_eq!(e.to_string(), format!("uid {stranger} ({}) may not bind tcp://127.0.0.1:80", e.user));
        let owner = PeerCred { pid: 1, uid: me, gid: 0 };
        assert!(policy.check(&owner, Action::Bind, None, &k).is_ok());
        assert!(policy.check_admin(&peer, "reload").is_err());
        assert!(Policy::default().check(&peer, Action::Bind, None, &k).is_err());
    }

    #[test]
    fn refuses_another_user() {
        let me = nix::unistd::geteuid().as_raw();
        assert!(authorize_takeover(PeerCred { pid: 1, uid: me, gid: 0 }, true).is_ok());
        assert!(authorize_takeover(PeerCred { pid: 1, uid: 0, gid: 0 }, true).is_ok());
        assert!(authorize_takeover(PeerCred { pid: 1, uid: me, gid: 0 }, false).is_err());
        let other = if me == 12345 { 12346 } else { 12345 };
        assert_eq!(
            authorize_takeover(PeerCred { pid: 1, uid: other, gid: 0 }, true).unwrap_err().code,
            code::TAKEOVER_REFUSED
        );
    }
}
