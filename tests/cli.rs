//! The command line as an operator meets it: `--help` with examples and the
//! environment, `-V` on the top level only, `--socket PATH` before or after
//! a client command, a quiet exit when stdout's reader is gone, and `list`
//! showing each socket's inode and the processes holding it.

mod common;

use std::os::fd::AsFd;
use std::process::{Command, Stdio};

use common::*;

fn sockbroker(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("SOCKBROKER_SOCKET")
        .env_remove("MULTIBINDER_SOCK")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn help_has_examples_and_environment() {
    let out = sockbroker(&["--help"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let help = String::from_utf8_lossy(&out.stdout);
    for want in ["Examples:", "Environment:", "SOCKBROKER_SOCKET", "RUST_LOG", "/tmp/sockbroker-UID", "--socket <PATH>"]
    {
        assert!(help.contains(want), "--help lacks {want}:\n{help}");
    }
    // serve --help names the /tmp fallback too.
    let serve = String::from_utf8_lossy(&sockbroker(&["serve", "--help"]).stdout).to_string();
    assert!(serve.contains("/tmp/sockbroker-UID/control.sock"), "{serve}");
}

#[test]
fn version_is_a_top_level_flag_only() {
    let out = sockbroker(&["-V"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("sockbroker {}", env!("CARGO_PKG_VERSION")));
    for sub in ["list", "serve", "bind"] {
        let out = sockbroker(&[sub, "-V"]);
        assert!(!out.status.success(), "{sub} -V was accepted");
        let help = String::from_utf8_lossy(&sockbroker(&[sub, "--help"]).stdout).to_string();
        assert!(!help.contains("--version"), "{sub} --help lists --version:\n{help}");
    }
}

/// `--socket PATH` names the control socket for client commands, before the
/// subcommand or after it, over the environment.
#[test]
fn socket_flag_names_the_control_socket() {
    let broker = Broker::start("cli-socket");
    let control = broker.control.to_str().unwrap();
    for args in [vec!["--socket", control, "status"], vec!["status", "--socket", control]] {
        let out = Command::new(BIN).args(&args).env("SOCKBROKER_SOCKET", "/nonexistent/control.sock").output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", output_text(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("pid {}", broker.pid())), "{args:?}");
    }
    // A missing one is named in the error.
    let out = sockbroker(&["list", "--socket", "/nonexistent/sb.sock"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/sb.sock"), "{}", output_text(&out));
}

/// A reader that went away (`sockbroker list | head -1`): exit 0 and no
/// message, for the broker's answers and for clap's own help alike.
#[test]
fn closed_stdout_exits_quietly() {
    let broker = Broker::start("cli-epipe");
    let mut client = broker.client();
    for _ in 0..3 {
        bind_free_tcp(&mut client);
    }
    let control = broker.control.to_str().unwrap();
    for args in [
        vec!["--socket", control, "list"],
        vec!["--socket", control, "list", "--json"],
        vec!["--socket", control, "status"],
        vec!["--help"],
    ] {
        let (read, write) = nix::unistd::pipe().unwrap();
        drop(read);
        let out = Command::new(BIN).args(&args).stdout(Stdio::from(write)).stderr(Stdio::piped()).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", output_text(&out));
        assert!(out.stderr.is_empty(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // And through a shell pipe, as an operator types it.
    let out = Command::new("bash")
        .args(["-o", "pipefail", "-c", &format!("'{BIN}' --socket '{control}' list | head -1")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(out.stderr.is_empty(), "{}", output_text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("NAME"));
}

/// `list` shows each socket's inode and the pids holding it now (this test
/// process), not the broker's own; `--json` keeps every field and adds
/// `holders`.
#[test]
fn list_shows_inodes_and_holders() {
    let broker = Broker::start("cli-holders");
    let mut client = broker.client();
    let (spec, fd) = bind_free_tcp(&mut client);
    let ino = inode(fd.as_fd());
    let me = std::process::id() as i64;

    let out = broker.cli(&["list", "--json"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let entry = entries.iter().find(|e| e["address"] == spec.as_str()).expect("the bound socket is listed");
    assert_eq!(entry["inode"], ino);
    assert_eq!(entry["holders"], serde_json::json!([me]), "{entry}");
    for field in ["name", "kind", "origin", "created", "handed_out", "last_pid", "last_uid", "queued", "backlog"] {
        assert!(entry.get(field).is_some(), "--json lost {field}: {entry}");
    }

    let table = String::from_utf8_lossy(&broker.cli(&["list"]).stdout).to_string();
    let header = table.lines().next().unwrap();
    assert!(header.contains("INODE") && header.ends_with("HOLDERS"), "{table}");
    let row = table.lines().find(|l| l.contains(&spec)).unwrap();
    assert!(row.ends_with(&format!("{ino}  {me}")), "{table}");

    // Once this process closes its copy, only the broker holds it: no holder.
    drop(fd);
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&broker.cli(&["list", "--json"]).stdout).unwrap();
    let entry = entries.iter().find(|e| e["address"] == spec.as_str()).unwrap();
    assert_eq!(entry["holders"], serde_json::json!([]), "{entry}");
}
