//! Upgrading the broker itself without losing a socket or refusing a client:
//! re-exec on SIGUSR1, and `serve --takeover`.
//!
//! Both carry the same [`HandoverState`]: the control socket's listening
//! descriptor, every held socket with its state (key, backlog, name, origin,
//! creation time, hand-out count, last peer), and every client connection that
//! has no reply in flight, with the bytes of any half-read request. The control
//! socket is never closed nor unlinked on the way, so a client connecting
//! during the upgrade waits in the kernel's listen backlog instead of getting
//! "connection refused", and connections already open keep working.
//!
//! # Re-exec (SIGUSR1)
//!
//! 1. [`reexec`] runs `<binary> --version` and requires `sockbroker …`: a
//!    missing or broken binary is caught here, while the broker can still
//!    carry on (after `execve` there is no old process left to fall back to).
//! 2. The state is written as JSON to a memfd, whose number travels in
//!    `SOCKBROKER_UPGRADE_FD`; descriptors are referred to by their numbers,
//!    which `execve` keeps. A memfd rather than an environment variable: the
//!    state grows with the number of sockets, and one environment string is
//!    limited to 128 KiB.
//! 3. `FD_CLOEXEC` is cleared on exactly those descriptors (and the memfd),
//!    then `execve` runs the binary now at the path the broker was started
//!    from, with the same arguments. The signal mask is kept across `execve`,
//!    so a signal arriving meanwhile stays pending for the new image's
//!    signalfd instead of killing it.
//! 4. If `execve` fails, the flags are restored and the broker carries on.
//! 5. The new image finds the variable ([`carried_in`]), takes the numbers
//!    ([`fd::take_inherited`] refuses any that it opened itself), adopts them
//!    with their original origin, and serves. Same pid; READY=1 again.
//!
//! multibinder's form, `MULTIBINDER_BIND__tcp__<address>__<port>=<fd>`, is also
//! adopted at start ([`crate::multibinder`]).
//!
//! # Takeover (`serve --takeover`)
//!
//! ```text
//!  new broker B                         old broker A (serving)
//!  connect(control path) ────────────►  accept (queued like any client)
//!  {"method":"takeover"}  ───────────►  peer is root or A's uid? else refuse
//!                                       leave the poll loop: accept nothing more
//!  adopt state + fds      ◄───────────  reply: state JSON, fds in batches of
//!                                       ≤ SCM_MAX_FD over SCM_RIGHTS
//!  {"method":"takeover-commit"} ─────►  ack; disown the control path; exit 0
//!  own the control path; READY=1; serve (queued clients are accepted now)
//! ```
//!
//! Until A acknowledges the commit, B serves nothing and A keeps its own
//! descriptors: if B dies or the commit does not come within
//! [`COMMIT_TIMEOUT`], A logs why and goes back to serving as if nothing
//! happened. B reads no client byte before the ack, so nothing is consumed by
//! a broker that then disappears.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::fd;
use crate::protocol::RpcError;

mod reexec;
mod state;
mod takeover;
pub use reexec::{reexec, validate_binary, ExecTarget};
pub use state::{Carried, ConnState, ControlState, HandoverState, SocketState};
pub use takeover::hand_over;

/// Environment variable naming the memfd that holds the state across a re-exec.
pub const STATE_FD_ENV: &str = "SOCKBROKER_UPGRADE_FD";
/// Version of [`HandoverState`]; a broker refuses a state it does not know.
pub const STATE_VERSION: u32 = 1;
/// How long the old broker waits for the new one to confirm a takeover.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `<binary> --version` may take.
pub const VALIDATE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest state read from another broker (about 100 bytes per socket).
const MAX_STATE: usize = 64 * 1024 * 1024;

/// How many re-execs and takeovers this broker's sockets have been through.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Why an upgrade step failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The binary to re-execute failed the `--version` check.
    #[error("{path}: not a working sockbroker binary: {problem}")]
    Binary {
        /// The binary.
        path: PathBuf,
        /// What went wrong.
        problem: String,
    },
    /// A descriptor could not be prepared for exec, or the state not written.
    #[error("preparing the re-exec: {what}: {source}")]
    Prepare {
        /// The step.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `execve` itself failed.
    #[error("execve {path}: {source}")]
    Exec {
        /// The binary.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// The state handed over is inconsistent.
    #[error("the state handed over: {0}")]
    State(String),
    /// The state memfd could not be read.
    #[error("reading the state handed over: {0}")]
    StateRead(#[source] io::Error),
    /// A message between brokers is not the JSON expected.
    #[error("{what}: {source}")]
    Json {
        /// Which message.
        what: &'static str,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The control socket handed over could not be set up.
    #[error(transparent)]
    Control(#[from] crate::server::ControlError),
    /// An inherited descriptor was refused.
    #[error(transparent)]
    Inherit(#[from] fd::InheritError),
    /// The new broker's call to the running one failed.
    #[error("takeover: {0}")]
    Client(#[source] crate::client::ClientError),
    /// Talking to the other broker failed.
    #[error("takeover over {path}: {source}")]
    Io {
        /// The control socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The running broker refused.
    #[error("the broker at {path} refused the takeover: {error}")]
    Refused {
        /// The control socket path.
        path: PathBuf,
        /// Its answer.
        error: RpcError,
    },
    /// The peer broke the takeover protocol.
    #[error("takeover: {0}")]
    Protocol(String),
}

/// What the broker should start from: the state of a previous image of this
/// process (re-exec, always checked first), or, with `takeover`, the state
/// taken over from the broker serving on `control`. `None`: start afresh.
pub fn carried_in(control: &Path, takeover: bool) -> Result<Option<Carried>, UpgradeError> {
    if let Some(carried) = reexec::inherited()? {
        if takeover {
            log::info!("--takeover ignored: this process was re-executed and already holds the sockets");
        }
        return Ok(Some(carried));
    }
    if takeover {
        return takeover::take_over(control).map(Some);
    }
    Ok(None)
}
