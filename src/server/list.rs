//! `list`: one page of the held sockets, in a stable order (by name,
//! unnamed last, then address), built as a [`ListJob`] whose entries are
//! written out as they are described, so finishing a page costs no more than
//! a chunk. For root and the broker's uid the page is built at once; for
//! other peers the event loop builds it a few entries at a time ([`super::budget::LIST_ENTRIES`] a
//! millisecond for all of them together), so a peer pipelining `list` on many
//! connections cannot hold up a bind for more than those few entries.
//! Params `{"offset": N, "limit": M}` give `{"entries": [...], "next":
//! N+M or null, "total": T}`; no params give the first page as a bare array,
//! as before paging, ending with a marker `{"more": true, "next": …,
//! "total": …}` when there are more. Other users' pids and uids are shown to
//! root and the broker's uid only.

use std::rc::Rc;

use serde_json::{json, Value};

use super::{invalid, Server};
use crate::fd::PeerCred;
use crate::introspect::SocketInfo;
use crate::protocol::{code, RpcError};
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
    /// The entries built so far, as JSON text separated by commas.
    entries: Vec<u8>,
}

impl ListJob {
    /// Whether every entry of the page is built.
    pub(crate) fn done(&self) -> bool {
        self.pos >= self.end
    }

    /// The reply to the request, once [`ListJob::done`], in the wire form
    /// of [`crate::protocol::Response::to_bytes`]: the page as the request
    /// asked for it, `{"entries": [...], "next": …, "total": …}` or a bare
    /// array (with a `{"more": …}` marker when there are more).
    pub(crate) fn into_reply(self) -> Vec<u8> {
        let total = self.order.len();
        let next = self.offset.checked_add(self.limit).filter(|n| *n < total);
        let mut out = format!(r#"{{"jsonrpc":"2.0","id":{},"result":"#, self.id).into_bytes();
        if self.paged {
            out.extend_from_slice(br#"{"entries":["#);
            out.extend_from_slice(&self.entries);
            out.extend_from_slice(format!(r#"],"next":{},"total":{total}}}"#, json!(next)).as_bytes());
        } else {
            out.push(b'[');
            out.extend_from_slice(&self.entries);
            if next.is_some() {
                if !self.entries.is_empty() {
                    out.push(b',');
                }
                out.extend_from_slice(json!({"more": true, "next": next, "total": total}).to_string().as_bytes());
            }
            out.push(b']');
        }
        out.extend_from_slice(b"}\n");
        out
    }
}

impl Server {
    /// Judges a `list` request and reads its params; the page is built by
    /// [`Server::build_list`] and answered by [`ListJob::into_reply`].
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
            if !job.entries.is_empty() {
                job.entries.push(b',');
            }
            // Through a Value, so the keys come in the order the other
            // replies use.
            serde_json::to_writer(&mut job.entries, &json!(info)).expect("a Value always serialises");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::introspect::SocketInfo;
    use crate::protocol::Response;
    use crate::registry::Registry;
    use crate::server::{ControlSocket, ServerOptions};
    use crate::spec::SocketSpec;

    /// A page built a few entries at a time, as the event loop builds one
    /// for an untrusted peer, is the page built at once, and both are the
    /// reply the protocol describes, in both forms.
    #[test]
    fn a_page_built_in_chunks_is_the_page_built_at_once() {
        let dir = std::env::temp_dir().join(format!("sockbroker-list-chunks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let control = ControlSocket::bind(&dir.join("control.sock"), 0o600).unwrap();
        let mut registry = Registry::new();
        for i in 0..300 {
            let spec: SocketSpec = format!("unix:@sbt-list-chunks-{}-{i:03}", std::process::id()).parse().unwrap();
            registry.get_or_open(&spec).unwrap();
        }
        let mut server = Server::new(control, registry, ServerOptions::default()).unwrap();
        let peer = PeerCred { pid: 1, uid: 0, gid: 0 };
        let limit = server.limits().list_page_max;
        for (params, offset, count, next) in [
            (json!(null), 0, limit, Some(limit)),
            (json!({"offset": 10, "limit": 200}), 10, 200, Some(210)),
            (json!({"offset": 290}), 290, 10, None),
        ] {
            let mut whole = server.start_list(peer, &params, json!(7)).unwrap();
            server.build_list(&mut whole, usize::MAX);
            let mut job = server.start_list(peer, &params, json!(7)).unwrap();
            let mut chunks = 0;
            while !job.done() {
                let before = job.pos;
                let used = server.build_list(&mut job, 32);
                assert!(used > 0 && used <= 32 && job.pos == before + used, "{params}: {used} used");
                chunks += 1;
            }
            assert_eq!(chunks, count.div_ceil(32), "{params}");
            let bytes = job.into_reply();
            assert_eq!(bytes, whole.into_reply(), "{params}");
            assert!(bytes.ends_with(b"}\n"));
            let reply: Response = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(reply.id, json!(7));
            let expected: Vec<Value> = server.list_order()[offset..offset + count]
                .iter()
                .map(|key| json!(SocketInfo::of(server.registry.get(key).unwrap())))
                .collect();
            let result = reply.result.unwrap();
            if params.is_null() {
                let marker = json!({"more": true, "next": next, "total": 300});
                assert_eq!(result, Value::Array(expected.into_iter().chain([marker]).collect()));
            } else {
                assert_eq!(result, json!({"entries": expected, "next": next, "total": 300}), "{params}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
