//! The command line as `clap` types: every subcommand, flag and value parser,
//! nothing that acts. [`super::run`] dispatches a parsed [`Cli`] to the
//! library; `--help`, the man pages and the completions are made from these
//! definitions ([`crate::manual`]).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::exec::SocketArg;
use crate::spec::SocketSpec;
use crate::supervisor::Readiness;
use crate::time::parse_duration;

/// Holds LISTEN sockets and hands them to the daemons that serve them, so
/// old and new generations of a daemon share one kernel listen queue.
///
/// `sockbroker serve` is the broker; the other commands talk to it over its
/// control socket, or run daemons with its sockets.
#[derive(Debug, Parser)]
#[command(name = "sockbroker", version, about, long_about)]
pub struct Cli {
    /// The broker's control socket, for every command that talks to it (and
    /// the one `serve` listens on). Same as SOCKBROKER_SOCKET=PATH, which
    /// `exec` and `run` pass on to their daemons.
    #[arg(long = "socket", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `--socket PATH` after a client command (`sockbroker list --socket PATH`),
/// as well as before it.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ControlArg {
    /// The broker's control socket [default: $SOCKBROKER_SOCKET, else
    /// $MULTIBINDER_SOCK, else /run/sockbroker/control.sock as root,
    /// $XDG_RUNTIME_DIR/sockbroker/control.sock otherwise, or
    /// /tmp/sockbroker-UID/control.sock when XDG_RUNTIME_DIR is unset].
    #[arg(long = "socket", value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker.
    Serve {
        /// Control socket path [default: --socket, else $SOCKBROKER_SOCKET, else [control] path
        /// from the configuration, else /run/sockbroker/control.sock as root,
        /// $XDG_RUNTIME_DIR/sockbroker/control.sock otherwise, or /tmp/sockbroker-UID/control.sock
        /// when XDG_RUNTIME_DIR is unset]
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// Close client connections idle for this long (e.g. 30s, 500ms);
        /// default: limits.idle_timeout of the configuration, 30s.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        idle_timeout: Option<Duration>,
        /// Take over every socket and the control socket of the broker running
        /// on the control path, then serve in its place (it exits).
        #[arg(long)]
        takeover: bool,
        /// Configuration file [default: /etc/sockbroker/sockbroker.toml if it exists, else the built-in default]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Before opening a declared socket, look for a process that still holds it (after a
        /// kill -9 without systemd's fd store) and copy it from there: same socket, no
        /// "Address already in use". Needs CAP_SYS_PTRACE (see docs/adopt.md).
        #[arg(long)]
        adopt_orphans: bool,
    },
    /// Copy the live listening sockets of a running process (or a multibinder) into the
    /// broker: the same kernel sockets, so nothing is refused while the old holder stops.
    ///
    /// With --pid (run as root: copying another process's descriptors needs
    /// CAP_SYS_PTRACE), every listening TCP/UNIX socket and bound UDP/UNIX datagram
    /// socket of PID, or only those named with --socket. With --multibinder, the
    /// socket of every bind_tcp(...) in the templates, asked of multibinder itself
    /// (no privilege needed). Only root or the broker's user may hand sockets to the broker.
    Adopt {
        /// The process to copy sockets from.
        #[arg(long, value_name = "PID", required_unless_present = "multibinder", conflicts_with = "multibinder")]
        pid: Option<i32>,
        /// Only this socket (repeatable), optionally held under NAME.
        #[arg(long = "socket", value_name = "SPEC|NAME=SPEC", requires = "pid")]
        sockets: Vec<crate::adopt::Wanted>,
        /// The control socket of a running multibinder.
        #[arg(long, value_name = "SOCK", requires = "from_templates")]
        multibinder: Option<PathBuf>,
        /// HAProxy ERB templates whose bind_tcp(...) calls name the sockets to copy.
        #[arg(long, value_name = "FILE", num_args = 1.., requires = "multibinder")]
        from_templates: Vec<PathBuf>,
    },
    /// Validate a configuration file; print every problem with FILE:LINE:COLUMN and exit non-zero.
    Check {
        /// Configuration file [default: /etc/sockbroker/sockbroker.toml if it exists, else the built-in default]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Make the running broker re-read its configuration (as SIGHUP does).
    Reload {
        /// The control socket.
        #[command(flatten)]
        control: ControlArg,
    },
    /// List the sockets the broker holds, with their inodes and the processes holding them now.
    ///
    /// HOLDERS are the pids (other than the broker's) with the socket open,
    /// found in /proc/PID/fd with your own privileges: as a user you see your
    /// own processes only. The INODE is what `ss -e` and /proc/PID/fdinfo show.
    List {
        /// Print JSON instead of a table (every field, `holders` included).
        #[arg(long)]
        json: bool,
        /// The control socket.
        #[command(flatten)]
        control: ControlArg,
    },
    /// Show the broker's version, uptime and counts.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The control socket.
        #[command(flatten)]
        control: ControlArg,
    },
    /// Print the broker's metrics in the Prometheus text format (accept queue
    /// per held socket, requests by method and outcome, clients); see docs/metrics.md.
    ///
    /// With --output, write them atomically to FILE instead (a temporary file
    /// renamed over it), for node_exporter's textfile collector.
    Metrics {
        /// Write to this file (e.g. /var/lib/prometheus/node-exporter/sockbroker.prom).
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// The control socket.
        #[command(flatten)]
        control: ControlArg,
    },
    /// Make the broker close its copy of a socket it created on demand.
    ///
    /// Processes that received the socket keep theirs; once none is left the
    /// port is free again.
    Release {
        /// The socket, in its text form.
        #[arg(value_name = "SPEC")]
        spec: SocketSpec,
        /// The control socket.
        #[command(flatten)]
        control: ControlArg,
    },
    /// Ask the broker for a socket and print what was received.
    ///
    /// The broker keeps holding the socket afterwards (that is its job): the
    /// port stays bound until `sockbroker release SPEC`.
    Bind {
        /// The control socket.
        #[command(flatten)]
        control: ControlArg,
        /// The socket: tcp://ADDR:PORT, udp://ADDR:PORT, unix:/PATH, unix:@NAME.
        #[arg(value_name = "SPEC", required_unless_present = "name", conflicts_with = "name")]
        spec: Option<SocketSpec>,
        /// Ask for a socket the broker holds under this name instead.
        #[arg(long)]
        name: Option<String>,
    },
    /// Run COMMAND with the broker's sockets at fds 3, 4, … (LISTEN_FDS), replacing this process.
    Exec {
        /// The sockets for the child.
        #[command(flatten)]
        sockets: SocketArgs,
        /// The daemon and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "COMMAND")]
        command: Vec<OsString>,
    },
    /// Supervise generations of a LISTEN_FDS daemon: SIGHUP starts a new one and
    /// retires the old one once the new one is ready (zero-downtime reload).
    Run {
        /// The sockets for the child.
        #[command(flatten)]
        sockets: SocketArgs,
        /// When a generation counts as ready: notify (READY=1 on NOTIFY_SOCKET),
        /// delay:DURATION, or pidfile:PATH.
        #[arg(long, value_name = "HOW", default_value = "notify")]
        ready: Readiness,
        /// A new generation not ready this long after its start is stopped.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
        ready_timeout: Duration,
        /// Sent to the old generation once the new one is ready.
        #[arg(long, value_name = "SIGNAL", default_value = "TERM", value_parser = crate::supervisor::parse_signal)]
        retire_signal: nix::sys::signal::Signal,
        /// After SIGTERM, how long a generation may take to stop before SIGKILL.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
        stop_timeout: Duration,
        /// Proof of readiness, drain bounds.
        #[command(flatten)]
        reload: ReloadArgs,
        /// The daemon and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "COMMAND")]
        command: Vec<OsString>,
    },
    /// HAProxy with the broker's sockets: templates, checked zero-downtime reloads.
    #[command(subcommand)]
    Haproxy(HaproxyCommand),
    /// Write the man pages (DIR/man1, DIR/man5) and the bash, zsh and fish
    /// completions (DIR/completions) made from this binary's own definitions.
    #[command(hide = true)]
    Generate {
        /// Where to write them.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Talk to a running supervisor (`run`, `haproxy run`) by its pid.
    #[command(subcommand)]
    Supervisor(SupervisorCommand),
}

/// `sockbroker supervisor …`
#[derive(Debug, Subcommand)]
pub enum SupervisorCommand {
    /// Reload and wait for the outcome: exit 0 once the new generation serves
    /// and the old one was told to retire; exit 1 with the reason on stderr
    /// when the reload failed and the old generation serves on.
    ///
    /// For ExecReload=: `sockbroker supervisor reload --pid $MAINPID`. Root
    /// and the supervisor's own user may ask. Requests that arrive during a
    /// reload wait for the next one, which serves them all.
    Reload {
        /// The supervisor's pid (systemd's $MAINPID).
        #[arg(long, value_name = "PID")]
        pid: i32,
        /// Give up waiting after this long (the reload itself goes on) [default: wait for the outcome].
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        timeout: Option<Duration>,
    },
    /// The supervisor's metrics in the Prometheus text format (docs/metrics.md): serving
    /// generation, generations by state, reloads by outcome, the last reload's duration,
    /// readiness wait and deepest accept queue.
    Metrics {
        /// The supervisor's pid.
        #[arg(long, value_name = "PID")]
        pid: i32,
    },
    /// The generations alive and the status line.
    Status {
        /// The supervisor's pid.
        #[arg(long, value_name = "PID")]
        pid: i32,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// How `run` and `haproxy run` prove a new generation and bound old ones.
#[derive(Debug, Clone, clap::Args)]
pub struct ReloadArgs {
    /// After a new generation says it is ready, it must stay alive this long
    /// (and pass --ready-probe) before the old one is retired; both accept meanwhile.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub ready_grace: Duration,
    /// A shell command that must exit 0 before the old generation is retired, run
    /// with SOCKBROKER_GENERATION and SOCKBROKER_GENERATION_PID set; retried until --ready-timeout.
    #[arg(long, value_name = "COMMAND")]
    pub ready_probe: Option<String>,
    /// Stop a retiring generation hard (SIGKILL; HAProxy: hard stop) this long after
    /// the retire signal: `off` lets it drain as long as it needs.
    #[arg(long, value_name = "DURATION|off", default_value = "off", value_parser = parse_optional_duration)]
    pub drain_timeout: MaybeDuration,
    /// A reload's new generation starts at idle CPU priority (SCHED_IDLE), so that its
    /// start takes no CPU time from the serving one, and is raised to normal when it says
    /// it is ready or after this long; `off`: normal priority throughout. Raising needs
    /// CAP_SYS_NICE (the shipped units grant it) or LimitNICE=+0; without them this is off.
    #[arg(long, value_name = "DURATION|off", default_value = "1s", value_parser = parse_optional_duration)]
    pub idle_start: MaybeDuration,
    /// At most this many generations alive at once; beyond it the oldest draining one is stopped hard.
    #[arg(long, value_name = "N", default_value_t = crate::supervisor::DEFAULT_MAX_GENERATIONS,
          value_parser = parse_max_generations)]
    pub max_generations: usize,
    /// Also write the supervisor's metrics (Prometheus text format; docs/metrics.md) to
    /// this file, atomically, on every change and every 10s: for node_exporter's textfile collector.
    #[arg(long, value_name = "FILE")]
    pub metrics_file: Option<PathBuf>,
    /// The `supervisor` label of the metrics [default: the --metrics-file name without .prom, else the pid].
    #[arg(long, value_name = "NAME")]
    pub metrics_name: Option<String>,
}

impl ReloadArgs {
    /// Where the supervisor's metrics go.
    pub fn metrics(&self) -> crate::supervisor::metrics::MetricsOptions {
        crate::supervisor::metrics::MetricsOptions { file: self.metrics_file.clone(), name: self.metrics_name.clone() }
    }

    /// `--idle-start`: how long a reload's generation may start at idle priority.
    pub fn idle_start(&self) -> Option<Duration> {
        self.idle_start.0.filter(|d| !d.is_zero())
    }

    /// The supervisor's view of these options.
    pub fn split(self) -> (crate::supervisor::Proof, crate::supervisor::Drain) {
        (
            crate::supervisor::Proof { grace: self.ready_grace, probe: self.ready_probe },
            crate::supervisor::Drain { timeout: self.drain_timeout.0, max_generations: self.max_generations },
        )
    }
}

/// A duration, or `off` (no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaybeDuration(pub Option<Duration>);

fn parse_optional_duration(text: &str) -> Result<MaybeDuration, String> {
    match text {
        "off" | "none" | "infinity" => Ok(MaybeDuration(None)),
        _ => parse_duration(text).map(|d| MaybeDuration(Some(d))),
    }
}

fn parse_max_generations(text: &str) -> Result<usize, String> {
    let n: usize = text.parse().map_err(|_| format!("'{text}': not a number"))?;
    if n < 2 {
        return Err(format!("{n}: at least 2 (the serving generation and the one starting)"));
    }
    Ok(n)
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
    /// Renders, starts `haproxy -Ws` and waits for READY=1 and --ready-grace.
    /// A reload (`sockbroker supervisor reload --pid PID`, which waits for the
    /// outcome, or SIGHUP/SIGUSR2): a new instance is rendered and started, and
    /// only once it is proven ready does the old one get SIGUSR1 (soft stop).
    /// A config HAProxy refuses never replaces the running instance; `haproxy -c`
    /// then says why. SIGTERM, SIGINT or SIGUSR1 soft-stop everything and exit.
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
        ready: crate::haproxy::run::Readiness,
        /// Proof of readiness, drain bounds.
        #[command(flatten)]
        reload: ReloadArgs,
        /// The HAProxy command: /usr/sbin/haproxy -f X.cfg.erb [ARGS]
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "HAPROXY")]
        command: Vec<std::ffi::OsString>,
    },
}

/// The sockets handed to a child (`exec`, `run`).
#[derive(Debug, clap::Args)]
pub struct SocketArgs {
    /// A socket for the child, in order from fd 3: SPEC (tcp://127.0.0.1:80, unix:/run/x.sock, …),
    /// NAME (a socket the broker holds under that name) or NAME=SPEC; NAME goes to LISTEN_FDNAMES.
    #[arg(long = "socket", value_name = "SPEC|NAME|NAME=SPEC")]
    pub sockets: Vec<SocketArg>,
    /// If the broker is unreachable, bind the sockets directly (with a warning: reloads may then drop connections).
    #[arg(long)]
    pub fallback_bind: bool,
}

fn parse_readiness(text: &str) -> Result<crate::haproxy::run::Readiness, String> {
    use crate::haproxy::run::Readiness;
    match text {
        "notify" => Ok(Readiness::Notify),
        "pidfile" => Ok(Readiness::Pidfile),
        other => Err(format!("'{other}': expected notify or pidfile")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_options() {
        let parse = |extra: &[&str]| {
            let args = [&["sockbroker", "run", "--socket", "web"][..], extra, &["--", "true"]].concat();
            match Cli::try_parse_from(args).map_err(|e| e.to_string())?.command {
                Command::Run { reload, .. } => Ok::<_, String>(reload.split()),
                other => panic!("{other:?}"),
            }
        };
        let (proof, drain) = parse(&[]).unwrap();
        assert_eq!(proof.grace, crate::supervisor::DEFAULT_READY_GRACE);
        assert_eq!(drain, crate::supervisor::Drain::default());
        let (proof, drain) =
            parse(&["--ready-grace", "0", "--drain-timeout", "90s", "--max-generations", "3", "--ready-probe", "true"])
                .unwrap();
        assert_eq!((proof.grace, proof.probe.as_deref()), (Duration::ZERO, Some("true")));
        assert_eq!((drain.timeout, drain.max_generations), (Some(Duration::from_secs(90)), 3));
        assert_eq!(parse(&["--drain-timeout", "off"]).unwrap().1.timeout, None);
        assert!(parse(&["--max-generations", "1"]).unwrap_err().contains("at least 2"));
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
