//! The command line: [`parse`] reads it into the `clap` types of `args`, and
//! [`run`] dispatches the parsed [`Cli`] to the library (`serve`, `exec`,
//! `run`) or to the client-side commands of `commands`. `main` does nothing
//! else: parse, run, print the error chain.

use std::process::ExitCode;

use crate::broker::{self, ServeError, ServeOptions};
use crate::client::ClientError;
use crate::config;
use crate::exec::ExecError;
use crate::supervisor::{RunError, RunOptions};

mod args;
mod commands;

pub use args::{Cli, Command, ControlArg, HaproxyCommand, MaybeDuration, ReloadArgs, SocketArgs, SupervisorCommand};

/// Parses the command line, with the examples and the environment in
/// `--help` (see [`crate::manual`]).
pub fn parse() -> Cli {
    use clap::FromArgMatches;
    let matches = command().get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// The full clap command: the derive plus the EXAMPLES and ENVIRONMENT
/// sections of `--help`. Man pages and completions are made from this.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    crate::manual::decorate(Cli::command())
}

/// Everything that can make the command fail.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// `serve` failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// Talking to the broker failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The configuration is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// `exec` failed.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// `run` failed.
    #[error(transparent)]
    Run(#[from] RunError),
    /// The HAProxy commands failed.
    #[error(transparent)]
    Haproxy(#[from] crate::haproxy::HaproxyError),
    /// `adopt` could not copy the sockets.
    #[error(transparent)]
    Adopt(#[from] crate::adopt::AdoptError),
    /// Talking to a supervisor failed.
    #[error(transparent)]
    Supervisor(#[from] crate::supervisor::control::ControlError),
    /// Any other I/O failure.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl CliError {
    /// Whether stdout's reader went away (EPIPE): `sockbroker list | head -1`
    /// then exits 0 with no message, as `cat` and `ls` do.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, CliError::Io(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    if let Some(path) = &cli.socket {
        // Before any thread exists (main calls this first). Every path
        // lookup (the client library, `serve`, the HAProxy renderer) and
        // the daemons of `exec` and `run` read it from there.
        std::env::set_var(config::SOCKET_ENV, path);
    }
    match cli.command {
        Command::Serve { control, idle_timeout, takeover, config, adopt_orphans } => {
            let source = config::Source::resolve(config.as_deref());
            let loaded = source.load()?;
            let control_config = loaded.control.clone();
            broker::serve(ServeOptions {
                control: config::serve_control_path_with(control.as_deref(), control_config.path.as_deref()),
                control_mode: control_config.mode.unwrap_or(config::CONTROL_MODE),
                idle_timeout,
                takeover,
                config: crate::reconfigure::Live::new(source, loaded),
                adopt_orphans,
            })?;
        }
        Command::Adopt { pid, sockets, multibinder, from_templates } => {
            commands::adopt(pid, &sockets, multibinder.as_deref(), &from_templates)?
        }
        Command::Check { config } => return Ok(commands::check(config.as_deref())),
        Command::Reload { control } => {
            let (result, _) = control.connect()?.call("reload", serde_json::Value::Null)?;
            let applied: crate::reconfigure::Applied = serde_json::from_value(result).unwrap_or_default();
            say(format_args!(
                "reloaded: {} opened, {} closed, {} kept, {} rules\n",
                applied.opened.len(),
                applied.closed.len(),
                applied.kept.len(),
                applied.rules
            ))?;
        }
        Command::List { json, control } => commands::list(&control, json)?,
        Command::Status { json, control } => {
            let (result, _) = control.connect()?.call("status", serde_json::Value::Null)?;
            if json {
                say(format_args!("{}\n", serde_json::to_string_pretty(&result).unwrap_or_default()))?;
            } else {
                let s: crate::introspect::Status = serde_json::from_value(result)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                say(format_args!("{s}"))?;
            }
        }
        Command::Metrics { output, control } => {
            let text = control.connect()?.metrics()?;
            match output {
                Some(path) => crate::metrics::exposition::write_atomically(&path, &text).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("writing the metrics to {}: {e}", path.display()))
                })?,
                None => say(format_args!("{text}"))?,
            }
        }
        Command::Release { spec, control } => {
            control.connect()?.release(&spec)?;
            say(format_args!("{spec}: released\n"))?;
        }
        Command::Bind { spec, name, control } => {
            let mut client = control.connect()?;
            let (what, fd) = match (spec, name) {
                (_, Some(name)) => (format!("name '{name}'"), client.bind_name(&name)?),
                (Some(spec), None) => (spec.to_string(), client.bind(&spec)?),
                (None, None) => unreachable!("clap requires a spec or a name"),
            };
            let inode = crate::fd::inode(std::os::fd::AsFd::as_fd(&fd))?;
            say(format_args!("{what}: received socket inode {inode}\n"))?;
        }
        Command::Exec { sockets, command } => {
            return Err(crate::exec::run(&sockets.sockets, sockets.fallback_bind, &command).into());
        }
        Command::Run { sockets, ready, ready_timeout, retire_signal, stop_timeout, reload, command } => {
            let metrics = reload.metrics();
            let idle_start = reload.idle_start();
            let (proof, drain) = reload.split();
            return Ok(crate::supervisor::run(RunOptions {
                proof,
                drain,
                idle_start,
                sockets: sockets.sockets,
                fallback_bind: sockets.fallback_bind,
                ready,
                ready_timeout,
                retire_signal,
                stop_timeout,
                command,
                metrics,
            })?);
        }
        Command::Haproxy(command) => return commands::run_haproxy(command),
        Command::Generate { dir } => {
            for path in crate::manual::generate(command(), &dir)? {
                say(format_args!("{}\n", path.display()))?;
            }
        }
        Command::Supervisor(command) => return Ok(commands::supervisor_command(command)?),
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes to stdout. A reader that went away (`sockbroker list | head -1`)
/// makes this fail with EPIPE, which `main` turns into a quiet exit 0
/// ([`CliError::is_broken_pipe`]).
fn say(args: std::fmt::Arguments<'_>) -> Result<(), CliError> {
    use std::io::Write;
    std::io::stdout().lock().write_fmt(args)?;
    Ok(())
}
