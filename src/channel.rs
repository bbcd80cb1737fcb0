//! "A JSON value plus descriptors" over a UNIX stream: the one way the
//! broker, its clients and both sides of a takeover exchange messages.
//!
//! Sending: [`split`] cuts a message so that no `sendmsg` carries more than
//! the kernel's [`SCM_MAX_FD`] descriptors. Each batch travels with at least
//! one byte of its own slice of the text (the receiving kernel never merges
//! two messages that carry descriptors, and a message with descriptors but
//! no byte is not delivered as such), so the receiver holds every
//! descriptor once it holds the whole text. The server's non-blocking event
//! loop queues the parts ([`crate::server`]); blocking callers (the client,
//! the takeover) use [`send`].
//!
//! Receiving: [`read_value`] reads (`recvmsg` with `MSG_CMSG_CLOEXEC`, see
//! [`fd::recv_with_fds`]) until a [`Framer`] yields one complete value, and
//! returns it with every descriptor that came along. The server reads in its
//! event loop with the same framer and the same `recvmsg`.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use serde_json::Value;

use crate::fd::{self, SCM_MAX_FD};
use crate::protocol::framing::{FrameError, Framer};

/// The parts of a message: each a slice of the text and at most
/// [`SCM_MAX_FD`] descriptors, every part with at least one byte. A message
/// with descriptors to spare is one part. A text shorter than the number of
/// parts gets spaces in front (ignored before a JSON value), so its last
/// byte, which completes the value for the reader, still travels last.
pub fn split<T>(mut bytes: Vec<u8>, mut fds: Vec<T>) -> Vec<(Vec<u8>, Vec<T>)> {
    let parts = fds.len().div_ceil(SCM_MAX_FD).max(1);
    if parts == 1 {
        return vec![(bytes, fds)];
    }
    if bytes.len() < parts {
        bytes.splice(0..0, std::iter::repeat(b' ').take(parts - bytes.len()));
    }
    (0..parts)
        .map(|i| {
            let batch: Vec<T> = fds.drain(..fds.len().min(SCM_MAX_FD)).collect();
            let text = if i + 1 == parts { bytes[i..].to_vec() } else { bytes[i..i + 1].to_vec() };
            (text, batch)
        })
        .collect()
}

/// Sends `bytes` with `fds` attached on a blocking stream, batched by
/// [`split`]; a part's descriptors go with its first `sendmsg`, the rest of
/// its text follows plainly.
pub fn send(sock: BorrowedFd<'_>, bytes: Vec<u8>, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    for (text, batch) in split(bytes, fds.to_vec()) {
        let mut attach = &batch[..];
        let mut sent = 0;
        while sent < text.len() {
            match fd::send_with_fds(sock, &text[sent..], attach) {
                Ok(n) => {
                    sent += n;
                    attach = &[];
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Why [`read_value`] returned no value.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// `recvmsg` failed (a read timeout shows as `WouldBlock`).
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The other end closed the stream before a value was complete.
    #[error("connection closed before a complete message")]
    Closed,
    /// The bytes are not one JSON value within the framer's cap.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Reads from a blocking `stream` until `framer` yields one complete JSON
/// value; returns it and every descriptor received meanwhile, in order.
pub fn read_value(stream: impl AsFd, framer: &mut Framer) -> Result<(Value, Vec<OwnedFd>), ReadError> {
    let mut fds = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(next) = framer.next_value() {
            return Ok((next?, fds));
        }
        let got = match fd::recv_with_fds(stream.as_fd(), &mut buf) {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        fds.extend(got.fds);
        if got.len == 0 {
            return Err(ReadError::Closed);
        }
        framer.push(&buf[..got.len]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn split_gives_every_batch_a_byte() {
        // 5 bytes, 4 batches: the cut that upgrade::send_batched used to make (slices
        // of ceil(5/4) = 2 bytes) gave only three slices and lost a batch.
        let parts = split(b"hello".to_vec(), (0..4 * SCM_MAX_FD).collect::<Vec<_>>());
        assert_eq!(parts.len(), 4);
        assert!(parts.iter().all(|(text, fds)| !text.is_empty() && fds.len() == SCM_MAX_FD));
        let text: Vec<u8> = parts.iter().flat_map(|(t, _)| t.clone()).collect();
        assert_eq!(text, b"hello");
        let fds: Vec<usize> = parts.into_iter().flat_map(|(_, f)| f).collect();
        assert_eq!(fds, (0..4 * SCM_MAX_FD).collect::<Vec<_>>());
        // Shorter text than batches: padded in front, nothing lost, the
        // value's last byte last.
        let parts = split(b"{}".to_vec(), (0..3 * SCM_MAX_FD).collect::<Vec<_>>());
        assert_eq!(parts.len(), 3);
        assert_eq!(parts.last().unwrap().0, b"}");
        assert_eq!(parts.iter().map(|(_, f)| f.len()).sum::<usize>(), 3 * SCM_MAX_FD);
        assert!(parts.iter().all(|(text, _)| !text.is_empty()));
        // No descriptors: one part, the text untouched.
        assert_eq!(split::<()>(b"{}".to_vec(), Vec::new()), vec![(b"{}".to_vec(), Vec::new())]);
    }

    #[test]
    fn a_short_text_with_many_descriptors_arrives_whole() {
        let (a, b) = UnixStream::pair().unwrap();
        let held: Vec<OwnedFd> = (0..3 * SCM_MAX_FD).map(|_| OwnedFd::from(UnixStream::pair().unwrap().0)).collect();
        let borrowed: Vec<BorrowedFd<'_>> = held.iter().map(|f| f.as_fd()).collect();
        std::thread::scope(|s| {
            let h = s.spawn(|| send(a.as_fd(), b"{}".to_vec(), &borrowed));
            let (value, fds) = read_value(&b, &mut Framer::default()).unwrap();
            assert_eq!(value, serde_json::json!({}));
            assert_eq!(fds.len(), held.len());
            for (got, want) in fds.iter().zip(&held) {
                assert_eq!(fd::inode(got.as_fd()).unwrap(), fd::inode(want.as_fd()).unwrap());
            }
            h.join().unwrap().unwrap();
        });
    }
}
