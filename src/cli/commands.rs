//! What each client-side subcommand does once parsed: talk to the broker
//! (`adopt`, `list`), check a configuration, run the HAProxy commands, talk
//! to a supervisor. Output goes through [`super::say`], so a reader that went
//! away ends the command quietly.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::args::{ControlArg, HaproxyCommand, SupervisorCommand};
use super::{say, CliError};
use crate::client::{Client, ClientError};
use crate::config;

impl ControlArg {
    /// Connects to the broker this flag (or the environment, or the default) names.
    pub(super) fn connect(&self) -> Result<Client, ClientError> {
        match &self.socket {
            Some(path) => Client::connect(path),
            None => Client::connect_default(),
        }
    }
}

/// `sockbroker adopt`: copies the sockets out of a process (`--pid`) or a
/// multibinder and hands them to the broker, one line per socket.
pub(super) fn adopt(
    pid: Option<i32>,
    sockets: &[crate::adopt::Wanted],
    multibinder: Option<&Path>,
    from_templates: &[PathBuf],
) -> Result<(), CliError> {
    let broker = config::client_control_path();
    if let Some(mb) = multibinder {
        // MULTIBINDER_SOCK, still set for the old services, would
        // make the broker's path multibinder's own.
        let same = |p: &Path| std::fs::canonicalize(p).ok();
        if same(mb).is_some() && same(mb) == same(&broker) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the broker's control socket resolves to {}, the multibinder socket itself \
                     (MULTIBINDER_SOCK?): set SOCKBROKER_SOCKET to the broker's control socket",
                    mb.display()
                ),
            )
            .into());
        }
    }
    // Connect first: no copying when the broker is not there.
    let mut client = Client::connect(&broker)?;
    let copied = match (pid, multibinder) {
        (Some(pid), _) => crate::adopt::copy_from_pid(pid, sockets)?,
        (None, Some(sock)) => crate::adopt::copy_from_multibinder(sock, from_templates)?,
        (None, None) => unreachable!("clap requires --pid or --multibinder"),
    };
    let from: Vec<String> = copied.iter().map(|c| c.from.clone()).collect();
    for (a, from) in client.adopt(&copied)?.iter().zip(from) {
        match a.outcome {
            crate::adopt::Outcome::Adopted => println!("{}: adopted from {from} (inode {})", a.key, a.inode),
            crate::adopt::Outcome::AlreadyHeld => {
                println!("{}: already held by the broker (the same socket, inode {})", a.key, a.inode)
            }
        }
    }
    Ok(())
}

/// `sockbroker list`: the broker's list, with each socket's holders found
/// here, in /proc, with the caller's own privileges.
pub(super) fn list(control: &ControlArg, json: bool) -> Result<(), CliError> {
    use crate::introspect;
    let mut client = control.connect()?;
    let mut entries = client.list_entries()?;
    let broker = client.peer_pid();
    let sockets: Vec<introspect::SocketInfo> = serde_json::from_value(serde_json::Value::Array(entries.clone()))
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let holders = introspect::holders(sockets.iter().filter_map(|s| s.inode), broker);
    if json {
        // The broker's objects as sent (fields this client does not know
        // included), each with `holders` added.
        for entry in &mut entries {
            let inode = entry.get("inode").and_then(serde_json::Value::as_u64);
            let pids = inode.and_then(|i| holders.get(&i)).cloned().unwrap_or_default();
            if let Some(object) = entry.as_object_mut() {
                object.insert("holders".into(), serde_json::json!(pids));
            }
        }
        say(format_args!("{}\n", serde_json::to_string_pretty(&entries).unwrap_or_default()))
    } else {
        say(format_args!("{}", introspect::table(&sockets, &holders, std::time::SystemTime::now())))
    }
}

/// `sockbroker check`: every problem on stderr, one per line; exit 1 on any.
pub(super) fn check(flag: Option<&std::path::Path>) -> ExitCode {
    let source = config::Source::resolve(flag);
    match source.load() {
        Ok(c) => {
            // A closed stdout changes nothing: the verdict is the exit status.
            let _ = say(format_args!(
                "{source}: ok ({} declared sockets, {} allow rules)\n",
                c.sockets.len(),
                c.rules.len()
            ));
            ExitCode::SUCCESS
        }
        Err(config::ConfigError::Invalid { problems, .. }) => {
            for p in &problems {
                eprintln!("{p}");
            }
            eprintln!("{source}: {} problem{}", problems.len(), if problems.len() == 1 { "" } else { "s" });
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("sockbroker: {}", crate::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

pub(super) fn run_haproxy(command: HaproxyCommand) -> Result<ExitCode, CliError> {
    use crate::haproxy::{self, RenderOptions};
    match command {
        HaproxyCommand::Render { template, output, fallback_bind } => {
            let options = RenderOptions { control: None, fallback_bind, rendered_dir: None };
            let rendered = haproxy::render_template(&template, output.as_deref(), &options)?;
            say(format_args!(
                "{}: {} sockets from the broker, {} direct binds\n",
                rendered.output.display(),
                rendered.fds.len(),
                rendered.direct_binds
            ))?;
        }
        HaproxyCommand::Exec { fallback_bind, rendered_dir, command } => {
            haproxy::exec(&command, &RenderOptions { control: None, fallback_bind, rendered_dir })?;
        }
        HaproxyCommand::Run { fallback_bind, rendered_dir, ready_timeout, ready, reload, command } => {
            let metrics = reload.metrics();
            let idle_start = reload.idle_start();
            let (proof, drain) = reload.split();
            let options = haproxy::run::RunOptions {
                proof,
                drain,
                idle_start,
                render: RenderOptions { control: None, fallback_bind, rendered_dir },
                ready_timeout,
                readiness: ready,
                metrics,
            };
            return Ok(haproxy::run::run(&command, options)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `sockbroker supervisor …`: exit 0 on success, 1 with the reason on stderr.
pub(super) fn supervisor_command(
    command: SupervisorCommand,
) -> Result<ExitCode, crate::supervisor::control::ControlError> {
    use crate::supervisor::control::{self, Request};
    let (pid, request, timeout, json) = match command {
        SupervisorCommand::Reload { pid, timeout } => (pid, Request::Reload, timeout, false),
        SupervisorCommand::Status { pid, json } => (pid, Request::Status, None, json),
        SupervisorCommand::Metrics { pid } => (pid, Request::Metrics, None, false),
    };
    let reply = control::call(nix::unistd::Pid::from_raw(pid), request, timeout)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply).unwrap_or_default());
    } else if let (true, Some(text)) = (reply.ok, &reply.metrics) {
        print!("{text}");
    } else if reply.ok {
        println!("{}", reply.message);
        for g in &reply.generations {
            println!("generation {} pid {} {}", g.number, g.pid, g.state);
        }
    } else {
        eprintln!("sockbroker: {}", reply.message);
    }
    Ok(if reply.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
