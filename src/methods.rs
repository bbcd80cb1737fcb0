//! The control methods beyond `bind`, as an extension of [`Server`]:
//! `bind_many`, `release`, `reload`, `status` and `adopt` (`list` is in
//! `server/list.rs`). The server's service calls them; each
//! judges the peer with the same rules as `bind` ([`crate::acl`]).
//! `docs/control.md` is the reference for users.

use std::os::fd::{AsFd, OwnedFd};

use serde_json::{json, Value};

use crate::acl::Action;
use crate::fd::PeerCred;
use crate::introspect;
use crate::protocol::bind::{BindParams, BindTarget};
use crate::protocol::{code, RpcError};
use crate::reconfigure;
use crate::registry::Origin;
use crate::server::{invalid, Server};
use crate::spec::SocketKey;

impl Server {
    /// Many sockets in one round trip. Params: an array of `bind` objects.
    /// The result has one entry per item, `{"ok": true}` or `{"error": …}`;
    /// the descriptors of the successful items come in order, split across
    /// messages of at most [`crate::fd::SCM_MAX_FD`].
    pub(crate) fn bind_many(&mut self, peer: PeerCred, params: &Value) -> Result<(Value, Vec<OwnedFd>), RpcError> {
        let Value::Array(items) = params else {
            return Err(invalid(peer, "bind_many", "params".into(), &"an array of bind objects is required"));
        };
        let max = self.limits().max_batch;
        if items.len() > max {
            return Err(invalid(
                peer,
                "bind_many",
                format!("{} sockets", items.len()),
                &format!("at most {max} (limits.max_batch)"),
            ));
        }
        let mut results = Vec::with_capacity(items.len());
        let mut fds = Vec::new();
        // Items are logged at DEBUG; the batch gets one line, so a refused
        // batch looped on costs one (rate-limited) line per request.
        let mut first_error: Option<RpcError> = None;
        for item in items {
            let outcome = BindParams::from_json(item)
                .map_err(|e| RpcError::new(code::INVALID_PARAMS, format!("Invalid params: item: {e}")))
                .and_then(|p| self.bind_one(peer, &p, true));
            match outcome {
                Ok(fd) => {
                    fds.push(fd);
                    results.push(json!({"ok": true}));
                }
                Err(e) => {
                    results.push(json!({"error": e}));
                    first_error.get_or_insert(e);
                }
            }
        }
        let failed = items.len() - fds.len();
        match first_error {
            None => crate::peer_log!(peer, log::Level::Info, "bind_many: {} ok", fds.len()),
            Some(e) => crate::peer_log!(
                peer,
                if e.code == code::ACCESS_DENIED { log::Level::Warn } else { log::Level::Info },
                "bind_many: {} ok, {failed} failed (first: {})",
                fds.len(),
                e.message
            ),
        }
        Ok((Value::Array(results), fds))
    }

    /// Closes the broker's copy of an on-demand socket; clients keep theirs.
    pub(crate) fn release(&mut self, peer: PeerCred, params: &Value) -> Result<(Value, Vec<OwnedFd>), RpcError> {
        let params = BindParams::from_json(params).map_err(|e| invalid(peer, "release", "release".into(), &e))?;
        let target = params.target().map_err(|e| invalid(peer, "release", params.describe(), &e))?;
        let held = match &target {
            BindTarget::Name(name) => self.registry.named(name),
            BindTarget::Spec(spec) => self.registry.get(&spec.key),
        };
        let Some(held) = held else {
            let message = format!("{}: not held", params.describe());
            crate::peer_log!(peer, log::Level::Info, "release {message}");
            return Err(RpcError::new(code::NOT_RELEASABLE, message));
        };
        let key = held.key().clone();
        self.live.policy.check(&peer, Action::Release, held.name.as_deref(), &key).map_err(|denied| {
            crate::peer_log!(peer, log::Level::Warn, "refused: {denied}");
            RpcError::new(code::ACCESS_DENIED, denied.explained(&self.live.source))
        })?;
        // A rule lets a peer have a socket; closing it under everyone else
        // is for the peer that made it (and root and the broker's uid).
        if !self.live.policy.trusts(&peer) && held.creator != Some(peer.uid) {
            let by = held.creator.map_or_else(|| "the broker".to_string(), |uid| format!("uid {uid}"));
            let message = format!(
                "uid {} may not release {key}: it was created by {by}; only its creator, root and uid {} may release it",
                peer.uid,
                self.live.policy.owner()
            );
            crate::peer_log!(peer, log::Level::Warn, "refused: {message}");
            return Err(RpcError::new(code::ACCESS_DENIED, message));
        }
        // Sockets made on demand come back from the fd store after a broker
        // restart (or from multibinder's environment after an upgrade from
        // it) with that origin; they stay releasable unless declared.
        let declared = self.live.config.sockets.iter().any(|d| d.spec.key == key);
        let releasable = match held.origin {
            Origin::OnDemand => true,
            Origin::FdStore | Origin::Upgrade | Origin::Adopted => !declared,
            Origin::Systemd | Origin::Config => false,
        };
        if !releasable {
            let message = format!(
                "{key}: only sockets created on demand can be released (this one comes from {})",
                introspect::origin_name(held.origin)
            );
            crate::peer_log!(peer, log::Level::Info, "release {message}");
            return Err(RpcError::new(code::NOT_RELEASABLE, message));
        }
        if let Some(released) = self.registry.release(&key) {
            crate::systemd::fdstore::remove(&released, &self.registry);
        }
        log::info!("{peer} release {key}: closed the broker's copy");
        Ok((json!(true), Vec::new()))
    }

    /// Takes sockets copied out of another process (`sockbroker adopt`).
    /// Params: `{"sockets": [{"name": …, "from": …}, …]}`, one entry per
    /// descriptor attached to the request, in order. Root or the broker's
    /// user only. Every descriptor is checked first (a socket of a supported
    /// kind, listening where it must be; its key free or held as this very
    /// socket, by inode); only when all pass is any adopted, under its key
    /// read from the socket, origin `adopted`, into the fd store like any
    /// other. The result has one `{key, inode, outcome}` per socket.
    pub(crate) fn adopt(
        &mut self,
        peer: PeerCred,
        params: &Value,
        received: &mut std::collections::VecDeque<OwnedFd>,
    ) -> Result<(Value, Vec<OwnedFd>), RpcError> {
        use crate::adopt::{Adopted, Outcome};
        // Every descriptor received on the connection so far is this
        // request's, whatever happens next: a refused request leaves none
        // behind to be mistaken for the next one's. (A client sends one
        // `adopt` at a time and waits for its reply; descriptors attached to
        // anything else make the count below wrong, which is refused.)
        let items = crate::adopt::parse_params(params);
        let fds: Vec<OwnedFd> = received.drain(..).collect();
        self.live.policy.check_admin(&peer, "adopt").map_err(|denied| {
            log::warn!("{peer} refused: {denied}");
            RpcError::new(code::ACCESS_DENIED, denied.to_string())
        })?;
        let items = items.map_err(|e| invalid(peer, "adopt", "params".into(), &e))?;
        if fds.len() != items.len() || items.is_empty() {
            return Err(invalid(
                peer,
                "adopt",
                format!("{} sockets listed", items.len()),
                &format!("{} descriptors attached; one per socket is required", fds.len()),
            ));
        }
        let refuse = |what: String| {
            log::warn!("{peer} adopt: refused: {what}");
            RpcError::new(code::ADOPT_REFUSED, what)
        };
        // 1. Check everything; nothing changes on error.
        let mut plan: Vec<(SocketKey, u64, Outcome)> = Vec::with_capacity(items.len());
        for (item, fd) in items.iter().zip(&fds) {
            let from = item.from.as_deref().unwrap_or("the client");
            let key = crate::adopt::adoptable(fd.as_fd()).map_err(|e| refuse(format!("{from}: {e}")))?;
            let inode = crate::fd::inode(fd.as_fd()).map_err(|e| refuse(format!("{from}: fstat: {e}")))?;
            let held = self.registry.get(&key).map(|h| (crate::fd::inode(h.fd()).ok(), h.origin));
            let earlier = plan.iter().find(|(k, _, _)| *k == key).map(|(_, i, _)| *i);
            let outcome = match (held, earlier) {
                (Some((Some(i), _)), _) | (None, Some(i)) if i == inode => Outcome::AlreadyHeld,
                (Some((held_inode, origin)), _) => {
                    return Err(refuse(format!(
                        "{key} ({from}, inode {inode}): the broker already holds a different socket under this key (inode {}, {}); it is never swapped silently: release it first, or adopt another address",
                        held_inode.map_or("?".to_string(), |i| i.to_string()),
                        crate::systemd::activation::origin_text(origin)
                    )))
                }
                (None, Some(other)) => {
                    return Err(refuse(format!(
                        "{key}: two different sockets (inodes {other} and {inode}) were sent for one key"
                    )))
                }
                (None, None) => Outcome::Adopted,
            };
            if let Some(name) = &item.name {
                if self.registry.named(name).is_some_and(|h| h.key() != &key) {
                    return Err(refuse(format!("{key}: the name '{name}' is already taken by another socket")));
                }
            }
            plan.push((key, inode, outcome));
        }
        // 2. Commit.
        let mut result = Vec::with_capacity(plan.len());
        for ((item, fd), (key, inode, outcome)) in items.into_iter().zip(fds).zip(plan) {
            let from = item.from.unwrap_or_else(|| "the client".into());
            result.push(Adopted { key: key.clone(), inode, outcome });
            if outcome == Outcome::Adopted {
                let spec = crate::spec::SocketSpec { options: crate::socket::read_options(fd.as_fd(), &key), key };
                match self.registry.adopt(fd, spec, item.name, Origin::Adopted) {
                    Ok(held) => {
                        crate::systemd::fdstore::store(held);
                        log::info!("{peer} adopt {}: ok, copied from {from} (inode {inode})", held.key());
                    }
                    Err((_, e)) => return Err(refuse(format!("{e}"))),
                }
            } else {
                log::info!("{peer} adopt {key}: already held (same socket, inode {inode}); nothing to do");
                // A name for a socket held without one is given; a socket's
                // existing name is never changed by adopting it again.
                if let (Some(name), Some(None)) = (item.name, self.registry.get(&key).map(|h| h.name.as_ref())) {
                    if let Err(e) = self.registry.set_name(&key, Some(name)) {
                        log::warn!("{peer} adopt {key}: could not name it: {e}");
                    }
                }
            }
        }
        Ok((json!(result), Vec::new()))
    }

    /// Whether `peer` may call `adopt` (and so send descriptors).
    pub(crate) fn may_adopt(&self, peer: PeerCred) -> bool {
        self.live.policy.check_admin(&peer, "adopt").is_ok()
    }

    pub(crate) fn reload(&mut self, peer: PeerCred) -> Result<(Value, Vec<OwnedFd>), RpcError> {
        self.live.policy.check_admin(&peer, "reload").map_err(|denied| {
            crate::peer_log!(peer, log::Level::Warn, "refused: {denied}");
            RpcError::new(code::ACCESS_DENIED, denied.to_string())
        })?;
        log::info!("{peer} reload");
        match reconfigure::reload(&mut self.live, &mut self.registry) {
            Ok(applied) => Ok((json!(applied), Vec::new())),
            Err(e) => Err(RpcError::new(code::RELOAD_FAILED, crate::error_chain(&e))),
        }
    }

    /// `status`, for a peer allowed to see it.
    pub(crate) fn status_for(&mut self, peer: PeerCred) -> Result<(Value, Vec<OwnedFd>), RpcError> {
        self.live.policy.check_introspect(&peer, "status").map_err(|denied| {
            crate::peer_log!(peer, log::Level::Warn, "refused: {denied}");
            RpcError::new(code::ACCESS_DENIED, denied.to_string())
        })?;
        Ok((json!(self.status()), Vec::new()))
    }

    /// The broker's state for the `status` method.
    pub fn status(&self) -> introspect::Status {
        let mut by_origin = std::collections::BTreeMap::new();
        for held in self.registry.iter() {
            *by_origin.entry(introspect::origin_name(held.origin)).or_insert(0) += 1;
        }
        introspect::Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime: self.started.elapsed().as_secs(),
            control: self.control().path().display().to_string(),
            config: self.live.source.to_string(),
            config_loaded: introspect::epoch_secs(self.live.loaded),
            sockets: self.registry.len(),
            by_origin,
            rules: self.live.policy.rules().len(),
            clients: self.clients(),
            handed_out: self.registry.iter().map(|h| h.handed_out).sum(),
            reload_error: self.live.reload_error.clone(),
        }
    }
}
