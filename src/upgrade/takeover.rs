//! The takeover (`serve --takeover`): the new broker is an ordinary
//! [`Client`] of the old one, calling `takeover` (the reply carries the
//! state and every descriptor, through [`channel`]) and then
//! `takeover-commit`. The old broker's side, [`hand_over`], answers the
//! connection the event loop set aside ([`crate::server::Wake::Takeover`]).

use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::{json, Value};

use super::state::{snapshot, Carried, HandoverState, Numbering};
use super::{UpgradeError, COMMIT_TIMEOUT, MAX_STATE};
use crate::channel::{self, ReadError};
use crate::client::{Client, ClientError};
use crate::protocol::framing::Framer;
use crate::protocol::{Method, Request, Response};
use crate::server::{Server, TakeoverConn};
use crate::systemd::notify;

/// Serves an accepted takeover request (after [`crate::server::Wake::Takeover`]).
/// Returns true when the new broker confirmed and this one must now exit: the
/// control path is then disowned (not removed at exit). Returns false when the
/// takeover failed; this broker then goes on serving, unchanged.
pub fn hand_over(server: &mut Server) -> bool {
    let Some(request) = server.take_takeover() else { return false };
    let peer = request.peer;
    match hand_over_to(server, request) {
        Ok(()) => {
            server.control_mut().set_owned_inode(None);
            notify::main_pid(peer.pid);
            log::info!("handed over to pid {}: exiting without touching the control socket", peer.pid);
            true
        }
        Err(e) => {
            log::warn!("takeover by {peer} failed: {}; still serving", crate::error_chain(&e));
            false
        }
    }
}

fn hand_over_to(server: &Server, request: TakeoverConn) -> Result<(), UpgradeError> {
    let path = server.control().path().to_path_buf();
    let io = |source| UpgradeError::Io { path: path.clone(), source };
    let (state, fds) = snapshot(server, Numbering::Position);
    let counts = (state.sockets.len(), state.connections.len());
    let value =
        serde_json::to_value(&state).map_err(|source| UpgradeError::Json { what: "the takeover state", source })?;
    let bytes = Response::ok(request.id, value).to_bytes();
    let stream = request.stream;
    stream.set_nonblocking(false).map_err(io)?;
    stream.set_write_timeout(Some(COMMIT_TIMEOUT)).map_err(io)?;
    stream.set_read_timeout(Some(COMMIT_TIMEOUT)).map_err(io)?;
    channel::send(stream.as_fd(), bytes, &fds).map_err(io)?;
    log::info!(
        "sent {} sockets and {} connections to pid {}; waiting for its confirmation",
        counts.0,
        counts.1,
        request.peer.pid
    );

    let mut framer = Framer::default();
    let (value, _) = read_value(&stream, &mut framer).map_err(io)?;
    let commit = Request::from_value(value).map_err(|(_, e)| UpgradeError::Protocol(e.message))?;
    if commit.method != Method::TakeoverCommit.name() {
        return Err(UpgradeError::Protocol(format!("expected {}, got {}", Method::TakeoverCommit, commit.method)));
    }
    (&stream).write_all(&Response::ok(commit.id, json!(true)).to_bytes()).map_err(io)?;
    Ok(())
}

/// Reads one JSON value and its descriptors ([`channel::read_value`]), the
/// end of the stream and bad framing as I/O errors naming the other broker.
fn read_value(stream: &UnixStream, framer: &mut Framer) -> io::Result<(Value, Vec<OwnedFd>)> {
    channel::read_value(stream, framer).map_err(|e| match e {
        ReadError::Io(e) => e,
        ReadError::Closed => io::Error::new(io::ErrorKind::UnexpectedEof, "the other broker closed the connection"),
        ReadError::Frame(e) => io::Error::new(io::ErrorKind::InvalidData, e),
    })
}

/// Takes over the broker serving on `path`, as its client: `takeover`
/// brings the state and descriptors, which are adopted; `takeover-commit`
/// confirms, and returns once the old broker has acknowledged (it exits
/// right after). On any error before that, the old broker keeps serving.
pub(super) fn take_over(path: &Path) -> Result<Carried, UpgradeError> {
    let refused = |e: ClientError| match e {
        ClientError::Refused { error, .. } => UpgradeError::Refused { path: path.into(), error },
        other => UpgradeError::Client(other),
    };
    let mut client = Client::connect(path).map_err(refused)?;
    client.set_reply_limits(MAX_STATE, COMMIT_TIMEOUT).map_err(refused)?;
    let old = client.peer_pid().unwrap_or(0);
    let (result, received) =
        client.call(Method::Takeover.name(), json!({"pid": std::process::id()})).map_err(refused)?;
    let state: HandoverState =
        serde_json::from_value(result).map_err(|source| UpgradeError::Json { what: "the takeover state", source })?;
    let fds = received.into_iter().enumerate().map(|(i, fd)| (i as i32, fd)).collect();
    let carried = Carried::from_state(state, fds, format!("takeover from pid {old}"))?;
    let (ack, _) = client.call(Method::TakeoverCommit.name(), Value::Null).map_err(refused)?;
    if ack != json!(true) {
        return Err(UpgradeError::Protocol(format!("commit not acknowledged: {ack}")));
    }
    Ok(carried)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fd;
    use std::os::fd::BorrowedFd;

    #[test]
    fn batches_descriptors_by_scm_max_fd() {
        // 600 descriptors need three messages; the receiver gets them all, in
        // order, and the text intact.
        let (a, b) = UnixStream::pair().unwrap();
        let held: Vec<OwnedFd> = (0..600).map(|_| OwnedFd::from(UnixStream::pair().unwrap().0)).collect();
        let borrowed: Vec<BorrowedFd<'_>> = held.iter().map(|f| f.as_fd()).collect();
        let text = Response::ok(json!(1), json!({"n": 600, "pad": "x".repeat(10)})).to_bytes();
        let sender = std::thread::scope(|s| {
            let h = s.spawn(|| channel::send(a.as_fd(), text.clone(), &borrowed));
            let (value, fds) = read_value(&b, &mut Framer::default()).unwrap();
            assert_eq!(value["result"]["n"], 600);
            assert_eq!(fds.len(), 600);
            for (got, want) in fds.iter().zip(&held) {
                assert_eq!(fd::inode(got.as_fd()).unwrap(), fd::inode(want.as_fd()).unwrap());
                assert!(fd::is_cloexec(got.as_fd()).unwrap());
            }
            h.join().unwrap()
        });
        sender.unwrap();
    }
}
