//! HAProxy under the broker: config templates whose binds become `fd@N`, and
//! the entry points multibinder's HAProxy scripts had.
//!
//! The flow: [`template`] parses `X.cfg.erb` / `X.cfg.mb` / `X.cfg.sb` and
//! finds each bind call; [`render_template`] asks the broker
//! ([`crate::client::Client`]) for each socket and writes `X.cfg` (atomically,
//! mode 0640) with `fd@N` where the call was, N being the descriptor this
//! process now holds. Those numbers only mean something in this process, so
//! the process that renders is the one that starts HAProxy: [`exec`] replaces
//! itself with HAProxy (multibinder's `multibinder-haproxy-erb`), and
//! [`run`] (`haproxy run`) keeps running and starts, checks and retires
//! HAProxy generations under the generation supervisor (multibinder's
//! wrapper, made safe). The descriptors stay close-on-exec in
//! this process; [`crate::child::prepare`] clears the flag on exactly those, and
//! only in the child, after fork.
//!
//! Without a broker, `--fallback-bind` writes the plain `ADDRESS:PORT` and
//! warns, as multibinder did: HAProxy binds by itself and reloads may then
//! drop connections.

pub mod args;
pub mod run;
pub mod template;

use std::ffi::OsString;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::client::{Client, ClientError};
use crate::spec::{SocketKey, Transport, UnixAddress, UnixKind};
use args::{ArgsError, HaproxyArgs};
use template::{BindRequest, Position, ResolveError, Template, TemplateError};

/// Mode of a rendered config: HAProxy's group may read it, nobody else (it
/// may hold secrets such as stats passwords).
pub const CONFIG_MODE: u32 = 0o640;

/// Everything that can go wrong between a template and a running HAProxy.
#[derive(Debug, thiserror::Error)]
pub enum HaproxyError {
    /// The template file could not be read.
    #[error("cannot read template {path}: {source}")]
    Read {
        /// The template.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The template has code we do not understand.
    #[error("{path}:{source}")]
    Template {
        /// The template.
        path: PathBuf,
        /// What and where.
        #[source]
        source: TemplateError,
    },
    /// The broker refused a socket, or could not be reached.
    #[error("{path}:{source}")]
    Bind {
        /// The template.
        path: PathBuf,
        /// The call and the broker's answer.
        #[source]
        source: Box<ResolveError<BindError>>,
    },
    /// The rendered config could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The output path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// No output path given and the template has no template suffix.
    #[error("{0}: cannot tell where to write the config (the template does not end in .erb, .mb or .sb); use -o")]
    NoOutput(PathBuf),
    /// HAProxy's argument list is unusable.
    #[error(transparent)]
    Args(#[from] ArgsError),
    /// HAProxy could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A generation of `haproxy run` could not be prepared.
    #[error(transparent)]
    Generation(#[from] run::GenerationError),
    /// The supervisor failed.
    #[error(transparent)]
    Run(#[from] Box<crate::supervisor::RunError<run::GenerationError>>),
}

impl From<crate::supervisor::RunError<run::GenerationError>> for HaproxyError {
    fn from(e: crate::supervisor::RunError<run::GenerationError>) -> Self {
        HaproxyError::Run(Box::new(e))
    }
}

/// Why one bind call could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The broker said no, or could not be reached.
    #[error(transparent)]
    Broker(#[from] ClientError),
    /// `--fallback-bind`, but the call names something HAProxy cannot bind by
    /// itself from text.
    #[error("the broker is unreachable and this socket has no direct-bind form for HAProxy")]
    NoFallback,
    /// Raising the descriptor limit failed.
    #[error("cannot raise the open-file limit for another descriptor: {0}")]
    Limit(#[source] io::Error),
}

/// How to render.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// Control socket; the client default (SOCKBROKER_SOCKET, MULTIBINDER_SOCK, …) when `None`.
    pub control: Option<PathBuf>,
    /// When the broker cannot be reached, write the plain address and warn
    /// instead of failing.
    pub fallback_bind: bool,
    /// For `exec` and `run`: write rendered configs into this folder instead
    /// of beside their templates.
    pub rendered_dir: Option<PathBuf>,
}

/// A rendered config and the descriptors its `fd@N` refer to.
#[derive(Debug)]
pub struct Rendered {
    /// Where the config was written.
    pub output: PathBuf,
    /// The received descriptors, close-on-exec, in template order.
    pub fds: Vec<OwnedFd>,
    /// Calls rendered as direct binds because the broker was unreachable.
    pub direct_binds: usize,
}

/// Renders `template` to `output` (default: the template path without its
/// suffix), asking the broker for every bind.
pub fn render_template(
    template: &Path,
    output: Option<&Path>,
    options: &RenderOptions,
) -> Result<Rendered, HaproxyError> {
    let output = match output {
        Some(path) => path.to_path_buf(),
        None => args::default_output(template).ok_or_else(|| HaproxyError::NoOutput(template.to_path_buf()))?,
    };
    let text = std::fs::read_to_string(template)
        .map_err(|source| HaproxyError::Read { path: template.to_path_buf(), source })?;
    let parsed =
        Template::parse(&text).map_err(|source| HaproxyError::Template { path: template.to_path_buf(), source })?;
    let mut broker = BrokerResolver::new(options.clone());
    let config = parsed
        .render(|request, at| broker.resolve(request, at))
        .map_err(|source| HaproxyError::Bind { path: template.to_path_buf(), source })?;
    write_atomic(&output, config.as_bytes(), CONFIG_MODE)
        .map_err(|source| HaproxyError::Write { path: output.clone(), source })?;
    Ok(Rendered { output, fds: broker.fds, direct_binds: broker.direct })
}

/// Asks the broker for each call, connecting on the first one (a template
/// with no bind needs no broker).
struct BrokerResolver {
    options: RenderOptions,
    client: Option<Client>,
    unreachable: bool,
    fds: Vec<OwnedFd>,
    direct: usize,
}

impl BrokerResolver {
    fn new(options: RenderOptions) -> Self {
        BrokerResolver { options, client: None, unreachable: false, fds: Vec::new(), direct: 0 }
    }

    fn resolve(&mut self, request: &BindRequest, at: Position) -> Result<String, BindError> {
        if self.client.is_none() && !self.unreachable {
            let connected = match &self.options.control {
                Some(path) => Client::connect(path),
                None => Client::connect_default(),
            };
            match connected {
                Ok(client) => self.client = Some(client),
                Err(e @ ClientError::Connect { .. }) if self.options.fallback_bind => {
                    log::warn!(
                        "{}; --fallback-bind: HAProxy binds directly, so reloads may drop connections",
                        crate::error_chain(&e)
                    );
                    self.unreachable = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let Some(client) = self.client.as_mut() else {
            let text = direct_bind(request).ok_or(BindError::NoFallback)?;
            log::warn!("{at}: {request} rendered as the direct bind {text}");
            self.direct += 1;
            return Ok(text);
        };
        ensure_fd_room(self.fds.len() + 1).map_err(BindError::Limit)?;
        let fd = match request.spec() {
            Some(spec) => client.bind(&spec)?,
            None => match request {
                BindRequest::Name(name) => client.bind_name(name)?,
                _ => unreachable!("only names have no spec"),
            },
        };
        let text = format!("fd@{}", fd.as_raw_fd());
        log::debug!("{at}: {request} -> {text}");
        self.fds.push(fd);
        Ok(text)
    }
}

/// What HAProxy binds by itself for a call, when there is no broker: the
/// address as HAProxy writes it, or `None` when only the broker can say.
pub fn direct_bind(request: &BindRequest) -> Option<String> {
    let spec = request.spec()?;
    match spec.key {
        SocketKey::Inet { transport: Transport::Tcp, addr } => Some(addr.to_string()),
        SocketKey::Inet { transport: Transport::Udp, addr } => Some(format!("udp@{addr}")),
        SocketKey::Unix { kind: UnixKind::Stream, address: UnixAddress::Path(path) } => {
            Some(format!("unix@{}", path.display()))
        }
        SocketKey::Unix { kind: UnixKind::Stream, address: UnixAddress::Abstract(name) } => {
            Some(format!("abns@{name}"))
        }
        SocketKey::Unix { .. } => None,
    }
}

/// Raises the soft open-file limit to the hard one when `held` more
/// descriptors might not fit (a template with a thousand binds meets the
/// common soft limit of 1024). HAProxy inherits the raised limit.
fn ensure_fd_room(held: usize) -> io::Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    // Room for stdio, the control connection and whatever the process holds.
    let wanted = held as u64 + 64;
    if wanted <= soft {
        return Ok(());
    }
    if wanted > hard {
        return Err(io::Error::other(format!("{held} descriptors would exceed the hard limit of {hard}")));
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    log::debug!("raised the open-file limit from {soft} to {hard}");
    Ok(())
}

/// Writes `contents` to `path` atomically: a temporary file beside it, with
/// its final mode, synced, then renamed over `path`. Readers see the old
/// file or the new one, never a part.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| io::Error::other("not a file path"))?;
    let tmp = dir.join(format!(".{}.tmp.{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        // The umask may have taken bits off; the mode is part of the contract.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Renders every template among HAProxy's `-f` arguments.
pub fn render_all(args: &HaproxyArgs, options: &RenderOptions) -> Result<Vec<Rendered>, HaproxyError> {
    args.template_paths().map(|template| render_template(template, Some(&args.output_for(template)), options)).collect()
}

/// multibinder-haproxy-erb: renders the templates among HAProxy's `-f`
/// arguments, then replaces this process with HAProxy (templates replaced by
/// the rendered paths, descriptors left open), or exits after writing with
/// `--erb-write-only`. Returns only on failure or with `--erb-write-only`.
pub fn exec(argv: &[OsString], options: &RenderOptions) -> Result<(), HaproxyError> {
    // As `sockbroker exec` does: a descriptor our own parent leaked to us
    // (not close-on-exec) must not reach HAProxy, which gets exactly the
    // sockets its configuration names.
    if let Err(e) = crate::child::seal_inherited_descriptors() {
        log::warn!("could not check inherited descriptors in /proc/self/fd: {e}");
    }
    let mut args = HaproxyArgs::parse(argv)?;
    args.rendered_dir = options.rendered_dir.clone();
    let rendered = render_all(&args, options)?;
    if args.write_only {
        for r in &rendered {
            println!("{}: {} sockets from the broker", r.output.display(), r.fds.len());
        }
        return Ok(());
    }
    let fds: Vec<BorrowedFd<'_>> = rendered.iter().flat_map(|r| r.fds.iter().map(|fd| fd.as_fd())).collect();
    let mut cmd = Command::new(&args.program);
    cmd.args(args.rendered_args());
    crate::child::prepare(&mut cmd, &fds, None);
    let source = cmd.exec();
    Err(HaproxyError::Spawn { program: args.program.to_string_lossy().into_owned(), source })
}
