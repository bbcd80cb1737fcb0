//! The command line: `clap` types and the dispatch to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::client::{Client, ClientError};
use crate::config;
use crate::daemon::{self, ServeError, ServeOptions};
use crate::spec::SocketSpec;

/// Holds LISTEN sockets and hands them to the daemons that serve them, so
/// old and new generations of a daemon share one kernel listen queue.
#[derive(Debug, Parser)]
#[command(name = "sockbroker", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker.
    Serve {
        /// Control socket path [default: $SOCKBROKER_SOCKET, else
        /// /run/sockbroker/control.sock as root, $XDG_RUNTIME_DIR/sockbroker/control.sock otherwise]
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// Close client connections idle for this long (e.g. 30s, 500ms).
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
        idle_timeout: Duration,
    },
    /// Ask the broker for a socket and print what was received.
    Bind {
        /// The socket: tcp://ADDR:PORT, udp://ADDR:PORT, unix:/PATH, unix:@NAME.
        #[arg(value_name = "SPEC", required_unless_present = "name", conflicts_with = "name")]
        spec: Option<SocketSpec>,
        /// Ask for a socket the broker holds under this name instead.
        #[arg(long)]
        name: Option<String>,
    },
    /// HAProxy with the broker's sockets: templates, checked zero-downtime reloads.
    #[command(subcommand)]
    Haproxy(HaproxyCommand),
}

/// `sockbroker haproxy …`
#[derive(Debug, Subcommand)]
pub enum HaproxyCommand {
    /// Render a config template: each bind call becomes fd@N for a socket from the broker.
    ///
    /// The fd@N numbers are this process's descriptors: the written file is for
    /// reading and diffing. To check or start HAProxy, use `exec` or `run`,
    /// which render and start HAProxy in one process.
    Render {
        /// The template: X.cfg.erb, X.cfg.mb or X.cfg.sb.
        template: PathBuf,
        /// Where to write [default: the template path without .erb/.mb/.sb].
        #[arg(short, long, value_name = "OUT")]
        output: Option<PathBuf>,
        /// If the broker is unreachable, write plain ADDRESS:PORT binds (with a warning) instead of failing.
        #[arg(long)]
        fallback_bind: bool,
    },
    /// multibinder-haproxy-erb: render every -f template, then exec HAProxy with the sockets open.
    ///
    /// Takes HAProxy's own command line; with --erb-write-only among its
    /// arguments, renders and exits. `exec -- haproxy -c -f X.cfg.erb` checks a template.
    #[command(visible_alias = "erb")]
    Exec {
        /// If the broker is unreachable, write plain ADDRESS:PORT binds (with a warning) instead of failing.
        #[arg(long)]
        fallback_bind: bool,
        /// Write rendered configs into DIR instead of beside their templates.
        #[arg(long, value_name = "DIR")]
        rendered_dir: Option<PathBuf>,
        /// The HAProxy command: /usr/sbin/haproxy -f X.cfg.erb [ARGS]
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "HAPROXY")]
        command: Vec<std::ffi::OsString>,
    },
    /// Run HAProxy in the foreground and reload it with zero failed connections.
    ///
    /// Renders, checks with `haproxy -c`, starts `haproxy -Ws` and waits for
    /// READY=1. SIGHUP or SIGUSR2 reloads: a new instance is rendered,
    /// checked and started, and only once it is ready does the old one get
    /// SIGUSR1 (soft stop). A config that fails the check never replaces the
    /// running instance. SIGTERM, SIGINT or SIGUSR1 soft-stop everything and exit.
    Run {
        /// If the broker is unreachable, write plain ADDRESS:PORT binds (with a warning) instead of failing.
        #[arg(long)]
        fallback_bind: bool,
        /// Write rendered configs into DIR instead of beside their templates.
        #[arg(long, value_name = "DIR")]
        rendered_dir: Option<PathBuf>,
        /// How long a new instance may take to become ready.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
        ready_timeout: Duration,
        /// How a new instance is known to serve: `notify` (READY=1 from `haproxy -Ws`)
        /// or `pidfile` (HAProxy's -p file names it; for builds without systemd support).
        #[arg(long, value_name = "HOW", default_value = "notify", value_parser = parse_readiness)]
        ready: crate::haproxy::reload::Readiness,
        /// The HAProxy command: /usr/sbin/haproxy -f X.cfg.erb [ARGS]
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "HAPROXY")]
        command: Vec<std::ffi::OsString>,
    },
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
    /// The HAProxy commands failed.
    #[error(transparent)]
    Haproxy(#[from] crate::haproxy::HaproxyError),
    /// Any other I/O failure.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Serve { control, idle_timeout } => {
            daemon::serve(ServeOptions {
                control: config::serve_control_path(control.as_deref()),
                control_mode: config::CONTROL_MODE,
                idle_timeout,
            })?;
        }
        Command::Bind { spec, name } => {
            let mut client = Client::connect_default()?;
            let (what, fd) = match (spec, name) {
                (_, Some(name)) => (format!("name '{name}'"), client.bind_name(&name)?),
                (Some(spec), None) => (spec.to_string(), client.bind(&spec)?),
                (None, None) => unreachable!("clap requires a spec or a name"),
            };
            let inode = crate::fd::inode(std::os::fd::AsFd::as_fd(&fd))?;
            println!("{what}: received socket inode {inode}");
        }
        Command::Haproxy(command) => return run_haproxy(command),
    }
    Ok(ExitCode::SUCCESS)
}

fn run_haproxy(command: HaproxyCommand) -> Result<ExitCode, CliError> {
    use crate::haproxy::{self, RenderOptions};
    match command {
        HaproxyCommand::Render { template, output, fallback_bind } => {
            let options = RenderOptions { control: None, fallback_bind, rendered_dir: None };
            let rendered = haproxy::render_template(&template, output.as_deref(), &options)?;
            println!(
                "{}: {} sockets from the broker, {} direct binds",
                rendered.output.display(),
                rendered.fds.len(),
                rendered.direct_binds
            );
        }
        HaproxyCommand::Exec { fallback_bind, rendered_dir, command } => {
            haproxy::exec(&command, &RenderOptions { control: None, fallback_bind, rendered_dir })?;
        }
        HaproxyCommand::Run { fallback_bind, rendered_dir, ready_timeout, ready, command } => {
            let options = haproxy::reload::RunOptions {
                render: RenderOptions { control: None, fallback_bind, rendered_dir },
                ready_timeout,
                readiness: ready,
            };
            return Ok(haproxy::reload::run(&command, options).map_err(haproxy::HaproxyError::from)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_readiness(text: &str) -> Result<crate::haproxy::reload::Readiness, String> {
    use crate::haproxy::reload::Readiness;
    match text {
        "notify" => Ok(Readiness::Notify),
        "pidfile" => Ok(Readiness::Pidfile),
        other => Err(format!("'{other}': expected notify or pidfile")),
    }
}

/// Parses `500ms`, `30s`, `2m`, `1h`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("'{text}': not a duration (e.g. 500ms, 30s, 2m)"))?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("'{text}': unknown unit '{other}' (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("'{text}': {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3 parsecs").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
