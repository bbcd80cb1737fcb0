//! `list`: one page of the held sockets, in a stable order (by name,
//! unnamed last, then address), built as a [`ListJob`]. For root and the
//! broker's uid the page is built at once; for other peers the event loop
//! builds it a few entries at a time ([`super::budget::LIST_ENTRIES`] a
//! millisecond for all of them together), so a peer pipelining `list` on many
//! connections cannot hold up a bind for more than those few entries.
//! Params `{"offset": N, "limit": M}` give `{"entries": [...], "next":
//! N+M or null, "total": T}`; no params give the first page as a bare array,
//! as before paging, ending with a marker `{"more": true, "next": …,
//! "total": …}` when there are more. Other users' pids and uids are shown to
//! root and the broker's uid only.

use std::os::fd::OwnedFd;
use std::rc::Rc;

use serde_json::{json, Value};

use super::{invalid, Server};
use crate::fd::PeerCred;
use crate::introspect::SocketInfo;
use crate::protocol::{code, Response, RpcError};
use crate::spec::SocketKey;

/// A `list` page in the making.
#[derive(Debug)]
pub(crate) struct ListJob {
    /// The request's id, for the reply.
    id: Value,
    peer: PeerCred,
    /// The keys in `list` order, as they were when the request came.
    order: Rc<Vec<SocketKey>>,
    /// The next position in `order` to describe, and where the page ends.
    pos: usize,
    end: usize,
    offset: usize,
    limit: usize,
    /// Asked with params (the paged form) or without (a bare array).
    paged: bool,
    /// Whether the peer sees other users' pids and uids.
    sees_all: bool,
    entries: Vec<Value>,
}

impl ListJob {
    /// Whether every entry of the page is built.
    pub(crate) fn done(&self) -> bool {
        self.pos >= self.end
    }

    /// The page, in the form the request asked for.
    fn result(self) -> Value {
        let total = self.order.len();
        let next = self.offset.checked_add(self.limit).filter(|n| *n < total);
        if self.paged {
            return json!({"entries": self.entries, "next": next, "total": total});
        }
        let mut items = self.entries;
        if next.is_some() {
            items.push(json!({"more": true, "next": next, "total": total}));
        }
        Value::Array(items)
    }

    /// The reply to the request, once [`ListJob::done`].
    pub(crate) fn into_response(self) -> Response {
        let id = self.id.clone();
        Response::ok(id, self.result())
    }
}

impl Server {
    /// `list`, answered at once.
    pub(crate) fn list(&mut self, peer: PeerCred, params: &Value) -> Result<(Value, Vec<OwnedFd>), RpcError> {
        let mut job = self.start_list(peer, params, Value::Null)?;
        self.build_list(&mut job, usize::MAX);
        Ok((job.result(), Vec::new()))
    }

    /// Judges a `list` request and reads its params; the page is built by
    /// [`Server::build_list`].
    pub(crate) fn start_list(&mut self, peer: PeerCred, params: &Value, id: Value) -> Result<ListJob, RpcError> {
        self.live.policy.check_introspect(&peer, "list").map_err(|denied| {
            crate::peer_log!(peer, log::Level::Warn, "list: refused: {denied}");
            RpcError::new(code::ACCESS_DENIED, denied.to_string())
        })?;
        let page_max = self.limits().list_page_max;
        let object = match params {
            Value::Array(items) => items.first(),
            other => Some(other),
        };
        let (offset, limit, paged) = match object {
            None | Some(Value::Null) => (0, page_max, false),
            Some(Value::Object(o)) => {
                let number = |key: &str, default: usize| match o.get(key) {
                    None | Some(Value::Null) => Ok(default),
                    Some(v) => v
                        .as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| invalid(peer, "list", format!("\"{key}\""), &"a number 0 or more is required")),
                };
                (number("offset", 0)?, number("limit", page_max)?.clamp(1, page_max), true)
            }
            Some(_) => {
                return Err(invalid(peer, "list", "params".into(), &"an object {\"offset\", \"limit\"} or none"))
            }
        };
        let order = self.list_order();
        let (pos, end) = (offset.min(order.len()), offset.saturating_add(limit).min(order.len()));
        let sees_all = self.live.policy.trusts(&peer);
        Ok(ListJob { id, peer, order, pos, end, offset, limit, paged, sees_all, entries: Vec::new() })
    }

    /// Describes up to `budget` more entries of the page; returns how many
    /// positions it used.
    pub(crate) fn build_list(&self, job: &mut ListJob, budget: usize) -> usize {
        let stop = job.end.min(job.pos.saturating_add(budget));
        for key in &job.order[job.pos..stop] {
            // A socket released since the request is left out.
            let Some(held) = self.registry.get(key) else { continue };
            let mut info = SocketInfo::of(held);
            if !job.sees_all && info.last_uid != Some(job.peer.uid) {
                info.last_pid = None;
                info.last_uid = None;
            }
            job.entries.push(json!(info));
        }
        let used = stop - job.pos;
        job.pos = stop;
        used
    }

    /// The held sockets' keys in `list` order, sorted once per change of
    /// the registry.
    fn list_order(&mut self) -> Rc<Vec<SocketKey>> {
        let generation = self.registry.generation();
        if let Some((g, keys)) = &self.list_order {
            if *g == generation {
                return keys.clone();
            }
        }
        let mut all: Vec<(bool, Option<String>, SocketKey)> =
            self.registry.iter().map(|h| (h.name.is_none(), h.name.clone(), h.key().clone())).collect();
        all.sort();
        let keys = Rc::new(all.into_iter().map(|(_, _, k)| k).collect::<Vec<_>>());
        self.list_order = Some((generation, keys.clone()));
        keys
    }
}
