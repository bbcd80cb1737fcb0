//! The operator's first hour, in a fresh container: the Debian package built
//! by `scripts/deb` installs with `apt-get install ./sockbroker_*.deb` (no
//! network: its dependencies are in the tree), then the recipes of README.md
//! and docs/haproxy.md, extracted from the docs (fenced blocks after a
//! `<!-- recipe: NAME -->` line), run as written, line by line (`bash -ex`,
//! `sudo` being root already), bring `sockbroker-run@hello` and `haproxy@www`
//! up on the first try; their reload recipes, run under load, fail no
//! request. `systemd-analyze security` rates the installed units.

use super::*;

/// The limits of the issue for each unit's exposure.
const SECURITY: [(&str, f64); 3] =
    [("sockbroker.service", 2.5), ("haproxy@www.service", 2.5), ("sockbroker-run@hello.service", 5.0)];

pub fn suite(tree: &Path) {
    let out = tempfile_path("deb");
    std::fs::create_dir_all(&out).unwrap();
    let built =
        Command::new(format!("{ROOT}/scripts/deb")).args(["--binary", BIN, "--out"]).arg(&out).output().unwrap();
    assert!(built.status.success(), "scripts/deb: {}", String::from_utf8_lossy(&built.stderr));
    let m = Machine::boot_with(tree, "sbt13", false, &[(out.to_str().unwrap(), "/opt/sbdeb")]);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| first_hour(&m)));
    if result.is_err() {
        let units = ["sockbroker", "sockbroker-run@hello", "haproxy@www"];
        let args: Vec<&str> = units.iter().flat_map(|u| ["-u", *u]).collect();
        eprintln!("--- journal:\n{}", m.run(&[&["journalctl", "--no-pager"], &args[..]].concat()).1);
    }
    drop(m);
    let _ = std::fs::remove_dir_all(&out);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// The fenced blocks of `doc` marked `<!-- recipe: NAME -->` (the one doc
/// marker convention, checked by tests/project/docs.rs), joined: a script
/// to run, or a file to install as written.
pub fn recipe(doc: &str, name: &str) -> String {
    let text = std::fs::read_to_string(format!("{ROOT}/{doc}")).unwrap();
    let marker = format!("<!-- recipe: {name} -->");
    let mut script = String::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() != marker {
            continue;
        }
        assert!(lines.next().is_some_and(|l| l.starts_with("```")), "{doc}: {marker} must precede a fenced block");
        for line in lines.by_ref().take_while(|l| !l.starts_with("```")) {
            script.push_str(line);
            script.push('\n');
        }
    }
    assert!(!script.is_empty(), "{doc} has no recipe '{name}'");
    script
}

/// Runs a recipe inside the container from /opt/sbdeb (where the .deb is),
/// stopping at its first failing line.
#[track_caller]
fn run_recipe(m: &Machine, doc: &str, name: &str) -> String {
    let script = format!("sudo() {{ \"$@\"; }}\ncd /opt/sbdeb\n{}", recipe(doc, name));
    let (ok, out) = m.run(&["env", "DEBIAN_FRONTEND=noninteractive", "bash", "-exo", "pipefail", "-c", &script]);
    assert!(ok, "{doc}, recipe '{name}', failed on its first try:\n{out}");
    out
}

fn first_hour(m: &Machine) {
    // Debian's own haproxy.service: not part of the recipe, and its processes
    // would mix with the instance's.
    m.ok(&["systemctl", "disable", "--now", "haproxy.service"]);
    let out = run_recipe(m, "README.md", "readme");
    assert!(out.contains("hello from pid"), "{out}");
    // What the package put in place.
    let group = m.ok(&["stat", "-c", "%a %G", "/run/sockbroker/control.sock"]);
    assert_eq!(group.trim(), "660 sockbroker");
    let conffiles = m.ok(&["dpkg-query", "-W", "-f", "${Conffiles}", "sockbroker"]);
    assert!(conffiles.contains("/etc/sockbroker/sockbroker.toml"), "{conffiles}");
    for path in ["/usr/share/man/man1/sockbroker.1.gz", "/usr/share/man/man5/sockbroker.toml.5.gz"] {
        m.ok(&["test", "-s", path]);
    }
    // `list` shows the daemon's pid among the socket's holders.
    let list = m.ok(&["sockbroker", "list", "--json"]);
    let entries: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    let http = entries.iter().find(|e| e["address"] == "tcp://127.0.0.1:8080").expect("hello's socket listed");
    assert!(http["holders"].as_array().is_some_and(|h| !h.is_empty()), "{list}");

    run_recipe(m, "docs/haproxy.md", "haproxy");

    let client = Client::start(m.leader, &[(8080, Proto::Http), (80, Proto::Http)]);
    client.wait_for(20);
    for _ in 0..RELOADS {
        let before = client.servers();
        run_recipe(m, "README.md", "readme-reload");
        run_recipe(m, "docs/haproxy.md", "haproxy-reload");
        // A new hello generation and a new HAProxy worker answer.
        client.wait_for_server(|s| s.starts_with("hello") && !before.contains(s));
        client.wait_for_server(|s| s.starts_with("served by haproxy") && !before.contains(s));
    }
    // sockbroker.service's own ExecReload= (sockbroker reload) under load.
    m.ok(&["systemctl", "reload", "sockbroker"]);
    client.wait_for(client.ok() + 20);
    let (ok, failed, errors) = client.stop();
    println!(
        "systemd_boot: package recipes: {RELOADS} reloads of each daemon, {ok} requests answered, {failed} failed"
    );
    assert_eq!(failed, 0, "failed requests: {errors:?}");

    for (unit, limit) in SECURITY {
        let text = m.ok(&["systemd-analyze", "security", "--no-pager", unit]);
        let score: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{unit}: no score:\n{text}"));
        println!("systemd_boot: systemd-analyze security {unit}: {score} (limit {limit})");
        assert!(score <= limit, "{unit}: {score} > {limit}:\n{text}");
    }
}
