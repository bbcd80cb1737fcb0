//! What the tool says about itself beyond the flags: the EXAMPLES and
//! ENVIRONMENT of `--help`, the man pages and the shell completions.
//!
//! Everything is made from one source so it cannot drift from the binary:
//! `sockbroker(1)` and one page per subcommand come from the clap definition
//! ([`crate::cli::command`], through `clap_mangen`) plus [`EXAMPLES`] and
//! [`ENVIRONMENT`], which `--help` prints too; `sockbroker.toml(5)` is
//! `docs/config.md` (which documents every key of the configuration
//! schema, and whose keys a test feeds to the parser) turned into roff; the
//! completions come from the clap definition through `clap_complete`.
//! `sockbroker generate DIR` (hidden) writes them all; the Debian package
//! (`scripts/deb`) installs what it wrote.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Command lines worth copying, with what they do: `--help` and the
/// EXAMPLES of sockbroker(1).
pub const EXAMPLES: &[(&str, &str)] = &[
    ("Run the broker with the built-in configuration (root and its own uid only):", "sockbroker serve"),
    ("Validate the configuration before a reload:", "sockbroker check --config /etc/sockbroker/sockbroker.toml"),
    ("What the broker holds, who holds it now, as JSON:", "sockbroker list --json"),
    (
        "Ask a broker on another control socket for a socket (it stays held until released):",
        "sockbroker --socket /run/other/control.sock bind tcp://127.0.0.1:8081",
    ),
    ("Close the broker's copy of an on-demand socket:", "sockbroker release tcp://127.0.0.1:8081"),
    (
        "Supervise a LISTEN_FDS daemon; SIGHUP reloads it with no failed connection:",
        "sockbroker run --socket http=tcp://[::]:8080 -- /usr/bin/mydaemon",
    ),
    (
        "HAProxy from a multibinder template, reloaded on SIGHUP:",
        "sockbroker haproxy run -- haproxy -f /etc/haproxy/www.cfg.erb",
    ),
    (
        "As root, take over the live listener of a running process (same kernel socket, no gap):",
        "sockbroker adopt --pid 4242 --socket web=tcp://0.0.0.0:80",
    ),
];

/// The environment variables the binary reads, with their meaning.
pub const ENVIRONMENT: &[(&str, &str)] = &[
    (
        "SOCKBROKER_SOCKET",
        "The control socket (as --socket). Default: /run/sockbroker/control.sock as root, \
         $XDG_RUNTIME_DIR/sockbroker/control.sock for other users, and /tmp/sockbroker-UID/control.sock \
         when XDG_RUNTIME_DIR is unset.",
    ),
    ("MULTIBINDER_SOCK", "multibinder's name for the control socket, read by clients after SOCKBROKER_SOCKET."),
    ("XDG_RUNTIME_DIR", "The per-user folder of the default control socket for users other than root; it must exist."),
    (
        "RUST_LOG",
        "Log level: error, warn, info (the default), debug or trace; per module too \
         (RUST_LOG=info,sockbroker::server=debug).",
    ),
    (
        "LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID",
        "Sockets passed by systemd (socket activation): serve holds them, and finds its control socket \
         by the name \"control\".",
    ),
    ("NOTIFY_SOCKET", "serve, run and haproxy run send READY=1, RELOADING=1 and STATUS= there."),
];

/// Files the binary reads.
const FILES: &[(&str, &str)] = &[
    ("/etc/sockbroker/sockbroker.toml", "The configuration, if it exists; see sockbroker.toml(5)."),
    ("/run/sockbroker/control.sock", "The control socket of a broker run by root (sockbroker.socket)."),
    ("/etc/sockbroker/run/NAME.env", "The instance file of sockbroker-run@NAME.service."),
];

/// The EXAMPLES and ENVIRONMENT text of `--help`.
fn help_sections() -> String {
    let mut text = String::from("Examples:\n");
    for (what, line) in EXAMPLES {
        text.push_str(&format!("  # {what}\n  {line}\n"));
    }
    text.push_str("\nEnvironment:\n");
    for (name, meaning) in ENVIRONMENT {
        text.push_str(&format!("  {name}\n      {meaning}\n"));
    }
    text.push_str("\nSee sockbroker(1) and sockbroker.toml(5).");
    text
}

/// The derived command with the sections of `--help` that are not flags.
pub fn decorate(cmd: clap::Command) -> clap::Command {
    cmd.after_help("Examples and environment: sockbroker --help").after_long_help(help_sections())
}

/// Writes the man pages into `dir/man1`, `dir/man5` and the completions
/// into `dir/completions`; the paths written.
pub fn generate(cmd: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let man1 = dir.join("man1");
    let man5 = dir.join("man5");
    let completions = dir.join("completions");
    for d in [&man1, &man5, &completions] {
        std::fs::create_dir_all(d)?;
    }
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    command_pages(&cmd, true, &man1, &mut written)?;
    let page = man5.join("sockbroker.toml.5");
    std::fs::write(&page, config_page(include_str!("../docs/config.md")))?;
    written.push(page);
    for (shell, file) in [
        (clap_complete::Shell::Bash, "sockbroker.bash"),
        (clap_complete::Shell::Zsh, "_sockbroker"),
        (clap_complete::Shell::Fish, "sockbroker.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "sockbroker", &mut out);
        let path = completions.join(file);
        std::fs::write(&path, out)?;
        written.push(path);
    }
    Ok(written)
}

/// sockbroker(1) (with EXAMPLES, ENVIRONMENT, FILES, SEE ALSO) and
/// sockbroker-SUB(1) for each visible subcommand, recursively.
fn command_pages(cmd: &clap::Command, top: bool, dir: &Path, written: &mut Vec<PathBuf>) -> io::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    if cmd.has_subcommands() {
        man.render_subcommands_section(&mut out)?;
    }
    if top {
        writeln!(out, ".SH EXAMPLES")?;
        for (what, line) in EXAMPLES {
            writeln!(out, ".PP\n{}\n.PP\n.RS 4\n.nf\n{}\n.fi\n.RE", roff_text(what), roff_text(line))?;
        }
        writeln!(out, ".SH ENVIRONMENT")?;
        for (name, meaning) in ENVIRONMENT {
            writeln!(out, ".TP\n\\fB{}\\fR\n{}", roff_text(name), roff_text(meaning))?;
        }
        writeln!(out, ".SH FILES")?;
        for (name, meaning) in FILES {
            writeln!(out, ".TP\n\\fI{}\\fR\n{}", roff_text(name), roff_text(meaning))?;
        }
        writeln!(
            out,
            ".SH EXIT STATUS\n0 on success, 1 on any error (with a message on standard error); \
             exec and run exit as their daemon does."
        )?;
    }
    writeln!(
        out,
        ".SH SEE ALSO\n\\fBsockbroker\\fR(1), \\fBsockbroker.toml\\fR(5), \\fBsystemd.socket\\fR(5), \
         \\fBsd_listen_fds\\fR(3), \\fBhaproxy\\fR(1)"
    )?;
    let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name()).to_string();
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, out)?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        command_pages(sub, false, dir, written)?;
    }
    Ok(())
}

/// Text for roff: backslashes escaped, and no line starting with a dot or
/// an apostrophe (a request).
fn roff_text(text: &str) -> String {
    let text = text.replace('\\', "\\e").replace('-', "\\-");
    text.lines()
        .map(|l| if l.starts_with('.') || l.starts_with('\'') { format!("\\&{l}") } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Inline markdown to roff: `code` bold, **strong** bold, links as their text.
fn roff_inline(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if c == '`' {
            if let Some(end) = rest[1..].find('`') {
                out.push_str(&format!("\\fB{}\\fR", roff_text(&rest[1..1 + end])));
                rest = &rest[end + 2..];
                continue;
            }
        }
        if let Some(after) = rest.strip_prefix("**") {
            if let Some(end) = after.find("**") {
                out.push_str(&format!("\\fB{}\\fR", roff_inline(&after[..end])));
                rest = &after[end + 2..];
                continue;
            }
        }
        if c == '[' {
            if let Some((label, tail)) = rest[1..].split_once("](") {
                if let Some(end) = tail.find(')') {
                    out.push_str(&roff_inline(label));
                    rest = &tail[end + 1..];
                    continue;
                }
            }
        }
        out.push_str(&roff_text(&c.to_string()));
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// sockbroker.toml(5): `docs/config.md` in roff. Headings become sections,
/// fenced blocks literal displays, table rows tagged paragraphs (first cell
/// as the tag), list items indented paragraphs.
pub fn config_page(markdown: &str) -> String {
    let mut out = format!(
        ".TH SOCKBROKER.TOML 5 \"\" \"sockbroker {}\" \"File Formats\"\n\
         .SH NAME\nsockbroker.toml \\- configuration of the sockbroker socket broker\n\
         .SH SYNOPSIS\n\\fI/etc/sockbroker/sockbroker.toml\\fR\n",
        env!("CARGO_PKG_VERSION")
    );
    let mut in_code = false;
    let mut header: Option<Vec<String>> = None;
    // The text of the paragraph (or list item) being read: markdown wraps
    // lines anywhere, even inside `code`, so it is converted whole.
    let mut para = String::new();
    let flush = |out: &mut String, para: &mut String| {
        if !para.is_empty() {
            out.push_str(&roff_inline(para));
            out.push('\n');
            para.clear();
        }
    };
    for line in markdown.lines() {
        let text_line = !in_code
            && !line.starts_with("```")
            && !line.starts_with('|')
            && !line.starts_with('#')
            && !line.trim().is_empty()
            && !line.starts_with("- ")
            && line.split_once(". ").filter(|(n, _)| n.parse::<u32>().is_ok()).is_none();
        if text_line {
            if !para.is_empty() {
                para.push(' ');
            }
            para.push_str(line.trim());
            continue;
        }
        flush(&mut out, &mut para);
        if line.starts_with("```") {
            out.push_str(if in_code { ".fi\n.RE\n" } else { ".PP\n.RS 4\n.nf\n" });
            in_code = !in_code;
            continue;
        }
        if in_code {
            out.push_str(&roff_text(line));
            out.push('\n');
            continue;
        }
        let cells: Vec<String> = line.trim().trim_matches('|').split('|').map(|c| c.trim().to_string()).collect();
        if line.starts_with('|') {
            if cells.iter().all(|c| c.chars().all(|ch| ch == '-' || ch == ':')) {
                continue;
            }
            match &header {
                None => header = Some(cells),
                Some(names) => {
                    out.push_str(&format!(".TP\n{}\n", roff_inline(&cells[0])));
                    let described: Vec<String> = names
                        .iter()
                        .zip(&cells)
                        .skip(1)
                        .map(|(n, c)| {
                            if names.len() > 2 && n != "meaning" {
                                format!("{}: {}", roff_text(n), roff_inline(c))
                            } else {
                                roff_inline(c)
                            }
                        })
                        .collect();
                    out.push_str(&described.join(". "));
                    out.push('\n');
                }
            }
            continue;
        }
        header = None;
        if let Some(title) = line.strip_prefix("# ") {
            // The page's title; the body starts as DESCRIPTION.
            let _ = title;
            out.push_str(".SH DESCRIPTION\n");
        } else if let Some(title) = line.strip_prefix("## ") {
            out.push_str(&format!(".SH \"{}\"\n", roff_inline(title).to_uppercase().replace('"', "")));
        } else if let Some(title) = line.strip_prefix("### ") {
            out.push_str(&format!(".SS \"{}\"\n", roff_inline(title).replace('"', "")));
        } else if line.trim().is_empty() {
            out.push_str(".PP\n");
        } else if let Some(item) = line.strip_prefix("- ") {
            out.push_str(".IP \\(bu 2\n");
            para.push_str(item.trim());
        } else if let Some((n, item)) = line.split_once(". ").filter(|(n, _)| n.parse::<u32>().is_ok()) {
            out.push_str(&format!(".IP {n}. 4\n"));
            para.push_str(item.trim());
        }
    }
    flush(&mut out, &mut para);
    out.push_str(".SH SEE ALSO\n\\fBsockbroker\\fR(1), \\fBsystemd.socket\\fR(5)\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_markdown() {
        assert_eq!(roff_inline("a `b-c` **d** [e](f.md)"), "a \\fBb\\-c\\fR \\fBd\\fR e");
        assert_eq!(roff_text(".x\n'y\\"), "\\&.x\n\\&'y\\e");
    }

    /// Every key the reference tables of docs/config.md (and so the man
    /// page) list is one the parser knows: a key set in a file it accepts,
    /// or, for one it rejects, refused for its value and not as unknown.
    #[test]
    fn documented_keys_exist() {
        let doc = include_str!("../docs/config.md");
        let mut section = "";
        let mut keys = Vec::new();
        for line in doc.lines() {
            if line.starts_with("## ") {
                section = if line.contains("[control]") {
                    "control"
                } else if line.contains("[[socket]]") {
                    "socket"
                } else if line.contains("[[allow]]") {
                    "allow"
                } else {
                    ""
                };
            }
            if let Some(cell) = line.strip_prefix("| `") {
                let key = cell.split(['`', ' ']).next().unwrap_or_default();
                if !section.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    keys.push((section, key.to_string()));
                }
            }
        }
        assert!(keys.len() > 25, "keys found in docs/config.md: {keys:?}");
        for (section, key) in keys {
            let table = match section {
                "control" => "[control]\n".to_string(),
                "socket" => "[[socket]]\nname = \"x\"\nlisten = \"tcp://127.0.0.1:1\"\n".to_string(),
                _ => "[[allow]]\n".to_string(),
            };
            if matches!((section, key.as_str()), ("socket", "name" | "listen")) {
                continue;
            }
            // A value of the wrong type: an existing key is refused for its
            // type, an unknown one as unknown.
            let text = format!("{table}{key} = [[]]\n");
            let err = crate::config::parse(&text, "doc.toml").map(|_| ()).unwrap_err().to_string();
            assert!(
                !err.contains("unknown field"),
                "docs/config.md documents {section}.{key}, unknown to the parser: {err}"
            );
        }
    }
}
