//! The service: one request judged and answered, apart from the event loop
//! that reads and writes it. [`Server::answer`] checks the request's shape,
//! parses its [`Method`] once, charges the uid's share of the turn
//! ([`super::budget::cost`]) and routes it; a `bind` goes params ([`BindParams`]) → target → the
//! allow rules in force ([`crate::acl::Policy::check`], before anything is
//! opened) → [`crate::registry::Registry::get_or_open_for`] → a duplicate
//! of the held descriptor for the reply. The other methods are in
//! [`crate::methods`]; reading, queueing and writing are the event loop's
//! ([`super::Server`]).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use serde_json::{json, Value};

use super::budget::cost;
use super::conn::Conn;
use super::{invalid, Server};
use crate::acl::Action;
use crate::fd::PeerCred;
use crate::protocol::bind::{BindParams, BindTarget};
use crate::protocol::{code, Method, Request, Response, RpcError};
use crate::spec::{SocketKey, UnixAddress};

impl Server {
    /// Judges and answers one complete request of `conn`: its shape, its
    /// method, the peer's right to it; `None` when there is nothing to send
    /// yet (a takeover leaves the loop; a `list` page is built by the loop). Only a success carries descriptors.
    pub(super) fn answer(&mut self, conn: &mut Conn, value: Value) -> Option<(Response, Vec<OwnedFd>)> {
        let peer = conn.peer;
        let req = match Request::from_value(value) {
            Ok(req) => req,
            Err((id, error)) => {
                crate::peer_log!(peer, log::Level::Info, "{}", error.message);
                return Some((Response::err(id, error), Vec::new()));
            }
        };
        // `Ok(None)`: accepted, answered later (a takeover leaves the loop,
        // a `list` page is built by the loop). Counted here either way.
        let result = match Method::parse(&req.method) {
            Err(e) => {
                crate::peer_log!(peer, log::Level::Info, "{}: method not found", req.method);
                *self.turn_spent.entry(peer.uid).or_default() += 1;
                Err(e)
            }
            Ok(Method::Takeover) => crate::acl::authorize_takeover(peer, conn.outbox.is_empty()).map(|()| {
                conn.takeover = Some(req.id.clone());
                None
            }),
            Ok(Method::Adopt) => self.adopt(peer, &req.params, &mut conn.received).map(Some),
            Ok(method) => {
                *self.turn_spent.entry(peer.uid).or_default() += cost(method, &req, self.limits());
                if method == Method::List {
                    // Built by the loop: at once for root and the broker's
                    // uid, a few entries a millisecond for the others.
                    self.start_list(peer, &req.params, req.id.clone()).map(|job| {
                        conn.list_job = Some(job);
                        None
                    })
                } else {
                    self.dispatch(peer, method, &req.params).map(Some)
                }
            }
        };
        self.counters.request(&req.method, result.as_ref().err().map(|e| e.code));
        match result {
            Ok(None) => None,
            Ok(Some((value, fds))) => Some((Response::ok(req.id, value), fds)),
            Err(e) => Some((Response::err(req.id, e), Vec::new())),
        }
    }

    /// Runs one method of the loop (not `takeover` nor `adopt`, which need
    /// the connection).
    fn dispatch(&mut self, peer: PeerCred, method: Method, params: &Value) -> Result<(Value, Vec<OwnedFd>), RpcError> {
        match method {
            Method::Bind => self.bind(peer, params),
            Method::BindMany => self.bind_many(peer, params),
            Method::Release => self.release(peer, params),
            Method::Status => self.status_for(peer),
            Method::Reload => self.reload(peer),
            Method::Metrics => self.metrics(peer),
            // `list` is a job of the loop; `takeover` and `adopt` need the
            // connection; `takeover-commit` is read by hand_over alone.
            Method::List | Method::Takeover | Method::Adopt | Method::TakeoverCommit => {
                crate::peer_log!(peer, log::Level::Info, "{method}: method not found");
                Err(RpcError::new(code::METHOD_NOT_FOUND, format!("Method not found: {method}")))
            }
        }
    }

    fn bind(&mut self, peer: PeerCred, params: &Value) -> Result<(Value, Vec<OwnedFd>), RpcError> {
        let params = BindParams::from_json(params).map_err(|e| invalid(peer, "bind", "bind".into(), &e))?;
        let fd = self.bind_one(peer, &params, false)?;
        Ok((json!(true), vec![fd]))
    }

    /// One socket: parse, judge, find or open, duplicate. Access is judged
    /// before anything is opened, so a refused peer creates nothing. In a
    /// batch (`quiet`), each item is logged at DEBUG only; the batch gets
    /// one line.
    pub(crate) fn bind_one(&mut self, peer: PeerCred, params: &BindParams, quiet: bool) -> Result<OwnedFd, RpcError> {
        // In a batch, items go to DEBUG without touching the peer's log
        // budget; the batch's own line is rate-limited.
        macro_rules! note {
            ($level:expr, $($arg:tt)+) => {
                if quiet {
                    log::debug!("{peer} {}", format_args!($($arg)+));
                } else {
                    crate::peer_log!(peer, $level, $($arg)+);
                }
            };
        }
        let target = params.target().map_err(|e| {
            let message = format!("Invalid params: {}: {e}", params.describe());
            note!(log::Level::Info, "bind: {message}");
            RpcError::new(code::INVALID_PARAMS, message)
        })?;
        let unknown = |name: &str| {
            note!(log::Level::Info, "bind name '{name}': unknown name");
            RpcError::new(code::UNKNOWN_NAME, crate::registry::UnknownName(name.to_string()).to_string())
        };
        let (name, key) = match &target {
            BindTarget::Name(name) => {
                let held = self.registry.named(name).ok_or_else(|| unknown(name))?;
                (Some(name.clone()), held.key().clone())
            }
            BindTarget::Spec(spec) => (self.registry.get(&spec.key).and_then(|h| h.name.clone()), spec.key.clone()),
        };
        let grant = self.live.policy.check(&peer, Action::Bind, name.as_deref(), &key).map_err(|denied| {
            // The denial names the action and the key: say them once.
            note!(log::Level::Warn, "refused: {denied}");
            RpcError::new(code::ACCESS_DENIED, denied.explained(&self.live.source))
        })?;
        let (may_replace, unix_file) = (grant.may_replace(&key), grant.unix_file());
        let (held, new) = match &target {
            BindTarget::Name(name) => (self.registry.by_name(name).map_err(|_| unknown(name))?, false),
            BindTarget::Spec(spec) => {
                let mut spec = spec.clone();
                if let SocketKey::Unix { address: UnixAddress::Path(_), .. } = &spec.key {
                    // Made for this peer: its owner and mode let it (and,
                    // by default, its group) connect.
                    let (owner, group, mode) = unix_file.for_peer(&peer);
                    spec.options.user = Some(owner);
                    spec.options.group = Some(group);
                    spec.options.mode = Some(mode);
                }
                let new = match self.registry.get_or_open_for(&spec, Some(peer.uid), may_replace) {
                    Ok((_, new)) => new,
                    Err(e) => {
                        let hint = in_use_by_broker(&self.registry, &e);
                        note!(log::Level::Warn, "bind {}: could not bind: {}{hint}", spec.key, e.cause());
                        return Err(RpcError::new(code::BIND_FAILED, format!("Could not bind: {e}{hint}")));
                    }
                };
                (self.registry.get_mut(&spec.key).expect("held: just found or opened"), new)
            }
        };
        if new {
            // A socket the broker made itself: systemd keeps a copy, so a
            // broker restart or crash does not lose it.
            crate::systemd::fdstore::store(held);
        }
        let dup = held.fd().try_clone_to_owned().map_err(|e| {
            log::error!("{peer} bind {}: could not duplicate the held descriptor: {e}", held.key());
            RpcError::new(code::BIND_FAILED, format!("Could not bind: {}: {e}", held.key()))
        })?;
        held.handed_out += 1;
        held.last_peer = Some(peer);
        let (key, raw) = (held.key().clone(), held.fd().as_raw_fd());
        note!(log::Level::Info, "bind {key}: ok ({}, fd {raw})", if new { "new socket" } else { "held socket" });
        Ok(dup)
    }
}

/// For a bind that failed with "Address already in use": the sockets the
/// broker itself holds on that port and transport (a `sockbroker bind`
/// earlier, say, keeps 127.0.0.1:8080 bound while 0.0.0.0:8080 is asked
/// for), named with how to free them. Empty otherwise.
fn in_use_by_broker(registry: &crate::registry::Registry, e: &crate::socket::OpenError) -> String {
    use crate::spec::SocketKey;
    let SocketKey::Inet { transport, addr } = &e.key else { return String::new() };
    if e.source.kind() != io::ErrorKind::AddrInUse {
        return String::new();
    }
    let mine: Vec<String> = registry
        .iter()
        .filter(|h| matches!(h.key(), SocketKey::Inet { transport: t, addr: a } if t == transport && a.port() == addr.port()))
        .map(|h| h.key().to_string())
        .collect();
    if mine.is_empty() {
        return String::new();
    }
    format!(
        " (this broker holds {} on that port; `sockbroker release ADDRESS` closes a socket it made on demand, \
         `sockbroker list` shows who else holds it)",
        mine.join(", ")
    )
}
