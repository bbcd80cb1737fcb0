//! The control methods beyond `bind`, as an extension of [`Server`]:
//! `bind_many`, `release`, `reload` and `status` (`list` is
//! [`introspect::list`] directly). The server's dispatch calls them; each
//! judges the peer with the same rules as `bind` ([`crate::acl`]).
//! `docs/control.md` is the reference for users.

use std::os::fd::OwnedFd;

use serde_json::{json, Value};

use crate::acl::Action;
use crate::fd::PeerCred;
use crate::introspect;
use crate::protocol::bind::{BindParams, BindTarget};
use crate::protocol::{code, RpcError};
use crate::registry::Origin;
use crate::reload;
use crate::server::{invalid, Server, MAX_BATCH};

impl Server {
    /// Many sockets in one round trip. Params: an array of `bind` objects.
    /// The result has one entry per item, `{"ok": true}` or `{"error": …}`;
    /// the descriptors of the successful items come in order, split across
    /// messages of at most [`crate::fd::SCM_MAX_FD`].
    pub(crate) fn bind_many(&mut self, peer: PeerCred, params: &Value) -> Result<(Value, Vec<OwnedFd>), RpcError> {
        let Value::Array(items) = params else {
            return Err(invalid(peer, "bind_many", "params".into(), &"an array of bind objects is required"));
        };
        if items.len() > MAX_BATCH {
            return Err(invalid(
                peer,
                "bind_many",
                format!("{} sockets", items.len()),
                &format!("at most {MAX_BATCH}"),
            ));
        }
        let mut results = Vec::with_capacity(items.len());
        let mut fds = Vec::new();
        for item in items {
            let outcome = BindParams::from_json(item)
                .map_err(|e| invalid(peer, "bind_many", "item".into(), &e))
                .and_then(|p| self.bind_one(peer, &p));
            match outcome {
                Ok(fd) => {
                    fds.push(fd);
                    results.push(json!({"ok": true}));
                }
                Err(e) => results.push(json!({"error": e})),
            }
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
            log::info!("{peer} release {message}");
            return Err(RpcError::new(code::NOT_RELEASABLE, message));
        };
        let key = held.key().clone();
        self.live.policy.check(&peer, Action::Release, held.name.as_deref(), &key).map_err(|denied| {
            log::warn!("{peer} release {key}: refused: {denied}");
            RpcError::new(code::ACCESS_DENIED, denied.explained(&self.live.source))
        })?;
        // Sockets made on demand come back from the fd store after a broker
        // restart (or from multibinder's environment after an upgrade from
        // it) with that origin; they stay releasable unless declared.
        let declared = self.live.config.sockets.iter().any(|d| d.spec.key == key);
        let releasable = match held.origin {
            Origin::OnDemand => true,
            Origin::FdStore | Origin::Upgrade => !declared,
            Origin::Systemd | Origin::Config => false,
        };
        if !releasable {
            let message = format!(
                "{key}: only sockets created on demand can be released (this one comes from {})",
                introspect::origin_name(held.origin)
            );
            log::info!("{peer} release {message}");
            return Err(RpcError::new(code::NOT_RELEASABLE, message));
        }
        self.registry.release(&key);
        log::info!("{peer} release {key}: closed the broker's copy");
        Ok((json!(true), Vec::new()))
    }

    pub(crate) fn reload(&mut self, peer: PeerCred) -> Result<(Value, Vec<OwnedFd>), RpcError> {
        self.live.policy.check_admin(&peer, "reload").map_err(|denied| {
            log::warn!("{peer} reload: refused: {denied}");
            RpcError::new(code::ACCESS_DENIED, denied.to_string())
        })?;
        log::info!("{peer} reload");
        match reload::reload(&mut self.live, &mut self.registry) {
            Ok(applied) => Ok((json!(applied), Vec::new())),
            Err(e) => Err(RpcError::new(code::RELOAD_FAILED, crate::error_chain(&e))),
        }
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
