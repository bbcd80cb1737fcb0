//! The command line as an operator meets it: `--help` with examples and the
//! environment, `-V` on the top level only, `--socket PATH` before or after
//! a client command, a quiet exit when stdout's reader is gone, and `list`
//! showing each socket's inode and the processes holding it.

use crate::common;

use std::os::fd::AsFd;
use std::process::{Command, Stdio};

use common::*;

fn sockbroker(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("SOCKBROKER_SOCKET")
        .env_remove("MULTIBINDER_SOCK")
        .stdin(Stdio::null())
        .output_within(COMMAND_TIMEOUT)
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
        let out = Command::new(BIN)
            .args(&args)
            .env("SOCKBROKER_SOCKET", "/nonexistent/control.sock")
            .output_within(COMMAND_TIMEOUT)
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", output_text(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("pid {}", broker.pid())), "{args:?}");
    }
    // A missing one is named in the error; before the subcommand it reaches
    // every command that talks to the broker, `exec` (whose own --socket
    // names the child's sockets) included.
    let out = sockbroker(&["list", "--socket", "/nonexistent/sb.sock"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/sb.sock"), "{}", output_text(&out));
    let out = sockbroker(&["--socket", "/nonexistent/sb.sock", "exec", "--socket", "tcp://127.0.0.1:9", "--", "true"]);
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
        .output_within(COMMAND_TIMEOUT)
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

    // Another test thread's child, between its fork and its exec, holds a
    // copy of every descriptor of this process for a moment: a holder too.
    // Such a copy goes at once, so look again, bounded.
    let entry_when = |want: serde_json::Value| {
        let mut entry = serde_json::Value::Null;
        for _ in 0..100 {
            let out = broker.cli(&["list", "--json"]);
            assert!(out.status.success(), "{}", output_text(&out));
            let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
            entry = entries.into_iter().find(|e| e["address"] == spec.as_str()).expect("the bound socket is listed");
            if entry["holders"] == want {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        entry
    };
    let entry = entry_when(serde_json::json!([me]));
    assert_eq!(entry["inode"], ino);
    assert_eq!(entry["holders"], serde_json::json!([me]), "{entry}");
    for field in ["name", "kind", "origin", "created", "handed_out", "last_pid", "last_uid", "queued", "backlog"] {
        assert!(entry.get(field).is_some(), "--json lost {field}: {entry}");
    }

    let want_row = format!("{ino}  {me}");
    let mut table = String::new();
    for _ in 0..100 {
        table = String::from_utf8_lossy(&broker.cli(&["list"]).stdout).to_string();
        if table.lines().any(|l| l.contains(&spec) && l.ends_with(&want_row)) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let header = table.lines().next().unwrap();
    assert!(header.contains("INODE") && header.ends_with("HOLDERS"), "{table}");
    let row = table.lines().find(|l| l.contains(&spec)).unwrap();
    assert!(row.ends_with(&want_row), "{table}");

    // Once this process closes its copy, only the broker holds it: no holder.
    drop(fd);
    let entry = entry_when(serde_json::json!([]));
    assert_eq!(entry["holders"], serde_json::json!([]), "{entry}");
}

/// `sockbroker generate DIR`: every man page renders with `man -l` without
/// a warning, and the completions pass `bash -n` and `zsh -n`.
#[test]
fn man_pages_render_and_completions_parse() {
    let dir = test_dir("cli-generate");
    let out = sockbroker(&["generate", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", output_text(&out));
    let written: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
    let pages: Vec<&String> = written.iter().filter(|p| p.ends_with(".1") || p.ends_with(".5")).collect();
    for want in
        ["man1/sockbroker.1", "man1/sockbroker-list.1", "man1/sockbroker-haproxy-run.1", "man5/sockbroker.toml.5"]
    {
        assert!(pages.iter().any(|p| p.ends_with(want)), "{want} not written: {written:?}");
    }
    for page in &pages {
        let out = Command::new("man")
            .args(["--warnings", "-l", page])
            .env("MANWIDTH", "80")
            .output_within(COMMAND_TIMEOUT)
            .expect("man (apt-get install man-db; scripts/test does)");
        assert!(out.status.success(), "man -l {page}: {}", output_text(&out));
        assert!(out.stderr.is_empty(), "man -l {page}: {}", String::from_utf8_lossy(&out.stderr));
        let text = plain(&out.stdout);
        assert!(text.contains("NAME") && text.len() > 300, "man -l {page}:\n{text}");
    }
    let top = Command::new("man")
        .args(["-l", &format!("{}/man1/sockbroker.1", dir.display())])
        .output_within(COMMAND_TIMEOUT)
        .unwrap();
    let top = plain(&top.stdout);
    for section in ["EXAMPLES", "ENVIRONMENT", "SOCKBROKER_SOCKET", "SUBCOMMANDS"] {
        assert!(top.contains(section), "sockbroker(1) lacks {section}:\n{top}");
    }
    for (shell, file) in [("bash", "sockbroker.bash"), ("zsh", "_sockbroker")] {
        let path = dir.join("completions").join(file);
        let out = Command::new(shell)
            .arg("-n")
            .arg(&path)
            .output_within(COMMAND_TIMEOUT)
            .unwrap_or_else(|e| panic!("{shell}: {e} (scripts/test installs it)"));
        assert!(out.status.success(), "{shell} -n {}: {}", path.display(), output_text(&out));
    }
    let fish = std::fs::read_to_string(dir.join("completions/sockbroker.fish")).unwrap();
    assert!(fish.contains("complete -c sockbroker") && fish.contains("list"), "{fish}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// man's output without overstrike (`N\bN` for bold, `_\bx` for underline).
fn plain(bytes: &[u8]) -> String {
    let mut out: Vec<char> = Vec::new();
    for c in String::from_utf8_lossy(bytes).chars() {
        if c == '\u{8}' {
            out.pop();
            continue;
        }
        out.push(c);
    }
    // After a backspace the next char replaces the popped one: `N\bN` -> `N`.
    out.into_iter().collect()
}

/// XDG_RUNTIME_DIR set but missing, and a symlink squatting the control
/// path: errors that name the cause, not "Permission denied" or "File exists".
#[test]
fn control_path_errors_name_the_cause() {
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", BIN, "serve"])
        .env("XDG_RUNTIME_DIR", "/run/user/4242424")
        .env_remove("SOCKBROKER_SOCKET")
        .output_within(COMMAND_TIMEOUT)
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("XDG_RUNTIME_DIR=/run/user/4242424 does not exist"), "{err}");
    assert!(err.contains("/tmp/sockbroker-UID"), "{err}");

    let dir = test_dir("cli-symlink");
    let path = dir.join("control.sock");
    std::os::unix::fs::symlink("/nonexistent/elsewhere", &path).unwrap();
    let out = sockbroker(&["serve", "--control", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a symbolic link (to /nonexistent/elsewhere)"), "{err}");
    assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_symlink(), "the link was left alone");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// "Address already in use" because the broker itself holds the port (a
/// `sockbroker bind` earlier): the error says so and how to free it.
#[test]
fn address_in_use_by_the_broker_says_so() {
    let broker = Broker::start("cli-inuse");
    let (spec, _fd) = bind_free_tcp(&mut broker.client());
    let port = spec.rsplit(':').next().unwrap();
    let out = broker.cli(&["bind", &format!("tcp://0.0.0.0:{port}")]);
    assert!(!out.status.success(), "{}", output_text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Could not bind: ") && err.contains("ddress already in use"), "{err}");
    assert!(err.contains(&format!("this broker holds {spec} on that port")), "{err}");
    assert!(err.contains("sockbroker release"), "{err}");
}
