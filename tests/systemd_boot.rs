//! Under a real systemd (252, Debian 12), booted in a container: the units
//! from `units/`, socket activation of the broker, sockets declared in a
//! `.socket` unit, the fd store across `systemctl restart` and `kill -9`, and
//! a daemon that keeps serving the brokered sockets the whole time.
//!
//! The container: `systemd-nspawn --boot --volatile=overlay` over a minimal
//! Debian tree made once with `debootstrap` and cached (see
//! ../shared/systemd-testing.md), with the broker binary under test and the
//! unit files bound read-only into it. Commands run inside with `nsenter`;
//! the test's client enters the container's private network from a thread.
//!
//! What is checked:
//! 1. clients get the declared socket by name and by address, and on-demand
//!    sockets, and every one is a socket systemd itself holds (PID 1's fds);
//! 2. after `systemctl restart sockbroker` and after `kill -9` of the broker
//!    (Restart=always), clients get the same kernel sockets (same inodes);
//! 3. a client connecting to the consumer all along, through both restarts
//!    and a restart of the consumer itself, sees zero failed connections;
//! 4. `units/sockbroker-run@.service`, with its instance file in
//!    /etc/sockbroker/run/, fronts a LISTEN_FDS daemon: `systemctl reload`
//!    under a client load fails no connection and keeps the socket (inode);
//! 5. `units/haproxy@.service` (user haproxy, template in /etc/haproxy/,
//!    the control socket's group set up as docs/haproxy.md says) serves,
//!    reloads under load with zero failed connections, and a broken template
//!    fails `systemctl reload` while the running instance serves on;
//! 6. `systemctl reload` of `sockbroker-run@` returns only once the new
//!    generation serves, and fails (the unit active, the old generation
//!    serving, no failed request, `systemctl status` saying why) for a daemon
//!    that exits before READY=1 and one that exits 500 ms after it;
//! 7. the recipes of docs/generic-daemons.md, copied from the doc: gunicorn
//!    with and without `--preload` and uWSGI, reloaded under load, and a
//!    broken application failing `systemctl reload` with no failed request.
//! 8. in a second, fresh container: the Debian package and the recipes of
//!    README.md and docs/haproxy.md, run as written (tests/systemd/package.rs).
//!
//! Runs as root (CI); skipped otherwise, or with SOCKBROKER_TEST_SYSTEMD=0.
//! The container is stopped on every path: on drop, on panic, and by the
//! kernel (PR_SET_PDEATHSIG) if this process dies; the suite has a deadline.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_sockbroker");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Where the Debian trees are cached between runs, one folder per package
/// list (override: SOCKBROKER_TEST_TREE), so branches with other lists on one
/// machine do not rebuild each other's tree.
const TREES: &str = "/var/cache/sockbroker-test";
/// What the tree holds; a tree made with another list is made again.
const PACKAGES: &str =
    "systemd,systemd-sysv,dbus,python3,curl,iproute2,procps,haproxy,gunicorn,uwsgi-core,uwsgi-plugin-python3";
const STAMP: &str = ".sockbroker-test-tree";
/// The whole suite, tree building included (about a minute the first time).
const SUITE_DEADLINE: Duration = Duration::from_secs(600);
/// One command inside the container.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
const PATH: &str = "PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The sockets the suite asks for: how `sockbroker bind` names them.
const SOCKETS: [&str; 5] = [
    "--name=http",
    "tcp://127.0.0.1:8081",
    "tcp://127.0.0.1:8080",
    "udp://127.0.0.1:5353",
    "unix:/run/sbtest-app.sock",
];

fn main() {
    if std::env::var("SOCKBROKER_TEST_SYSTEMD").as_deref() == Ok("0") {
        println!("systemd_boot: skipped (SOCKBROKER_TEST_SYSTEMD=0)");
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        println!("systemd_boot: skipped: needs root (systemd-nspawn, debootstrap)");
        return;
    }
    for tool in ["systemd-nspawn", "debootstrap", "nsenter"] {
        assert!(
            Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap().status.success(),
            "{tool} is missing: apt-get install systemd-container debootstrap util-linux (scripts/test does)"
        );
    }
    let started = Instant::now();
    // A deadline for everything: past it, the process exits, and the
    // container goes with it (PR_SET_PDEATHSIG).
    std::thread::spawn(|| {
        std::thread::sleep(SUITE_DEADLINE);
        eprintln!("systemd_boot: FAILED: not done after {SUITE_DEADLINE:?}");
        std::process::exit(1);
    });
    let tree = std::env::var_os("SOCKBROKER_TEST_TREE").map(PathBuf::from).unwrap_or_else(default_tree);
    ensure_tree(&tree);
    println!("systemd_boot: tree ready after {:.1?}", started.elapsed());
    let machine = Machine::boot(&tree);
    println!("systemd_boot: container up after {:.1?}", started.elapsed());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| suite(&machine)));
    if result.is_err() {
        eprintln!("--- journal of sockbroker in the container:");
        let units = [
            "sockbroker",
            "sbtest-consumer",
            "sockbroker-run@web",
            "sockbroker-run@flaky",
            "sockbroker-run@gunicorn",
            "sockbroker-run@gunicorn-preload",
            "sockbroker-run@uwsgi",
            "haproxy@web",
        ];
        let args: Vec<&str> = units.iter().flat_map(|u| ["-u", *u]).collect();
        eprintln!("{}", machine.run(&[&["journalctl", "--no-pager"], &args[..]].concat()).1);
    }
    drop(machine);
    let result = result.and_then(|()| {
        std::panic::catch_unwind(|| package::suite(&tree)).inspect(|()| {
            println!("systemd_boot: package and recipes ok after {:.1?}", started.elapsed());
        })
    });
    match result {
        Ok(()) => println!("systemd_boot: ok in {:.1?}", started.elapsed()),
        Err(_) => {
            eprintln!("systemd_boot: FAILED");
            std::process::exit(1);
        }
    }
}

#[path = "systemd/package.rs"]
mod package;

fn suite(m: &Machine) {
    setup(m);
    restarts(m);
    run_unit(m);
    run_failures(m);
    recipes(m);
    haproxy_unit(m);
    adopt_haproxy(m);
    fd_store_at_scale(m);
}

/// How many sockets the fd store must carry across a restart (GLB's scale:
/// 50 HAProxy instances of 200 sockets).
const AT_SCALE: usize = 10_000;

/// 10,000 sockets made on demand survive `systemctl restart sockbroker`
/// through systemd's fd store (FileDescriptorStoreMax=16384), every one the
/// same socket (inode) afterwards; `list`, `status` and `metrics` answer.
fn fd_store_at_scale(m: &Machine) {
    let inodes = |m: &Machine| -> BTreeMap<String, u64> {
        let out = m.ok(&["sockbroker", "list", "--json"]);
        let entries: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("list --json: {e}"));
        entries
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["address"].as_str().is_some_and(|a| a.starts_with("tcp://127.20.")))
            .map(|e| (e["address"].as_str().unwrap().to_string(), e["inode"].as_u64().unwrap()))
            .collect()
    };
    let t = Instant::now();
    // 23-46 s on 2 cores (systemd takes each descriptor into its store), up
    // to a minute when other work shares them: a limit of its own.
    let (ok, out) =
        m.run_within(&["python3", "/opt/sbtest/hold_many.py", &AT_SCALE.to_string(), "9500"], Duration::from_secs(240));
    assert!(ok && out.trim() == format!("held {AT_SCALE}"), "{out}");
    let made = t.elapsed();
    let before = inodes(m);
    assert_eq!(before.len(), AT_SCALE);
    let t = Instant::now();
    m.ok(&["systemctl", "restart", "sockbroker"]);
    let restart = t.elapsed();
    let after = inodes(m);
    assert_eq!(after.len(), AT_SCALE, "sockets after the restart");
    let changed = before.iter().filter(|(a, i)| after.get(*a) != Some(i)).count();
    assert_eq!(changed, 0, "{changed} of {AT_SCALE} sockets are not the same socket after the restart");
    let status = m.ok(&["sockbroker", "status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert!(status["sockets"].as_u64() >= Some(AT_SCALE as u64), "{status}");
    assert!(status["by_origin"]["fd-store"].as_u64() >= Some(AT_SCALE as u64), "{status}");
    let metrics = m.ok(&["sockbroker", "metrics"]);
    let series = metrics.lines().filter(|l| l.starts_with("sockbroker_socket_info{address=\"tcp://127.20.")).count();
    assert_eq!(series, AT_SCALE, "metrics series for the sockets");
    println!(
        "systemd_boot: {AT_SCALE} sockets held in {made:.1?}; systemctl restart sockbroker with them took {restart:.1?}, same inodes"
    );
}

/// What an administrator sets up before starting anything, as the docs say:
/// a group that may reach the control socket (docs/haproxy.md), an allow rule
/// for user haproxy, the run@ instance file and the HAProxy template.
fn setup(m: &Machine) {
    // Debian's own haproxy.service (its default config): not under test, and
    // its processes would mix with the instance's.
    m.ok(&["systemctl", "disable", "--now", "haproxy.service"]);
    m.ok(&["groupadd", "--system", "sockbroker"]);
    m.write("/etc/systemd/system/sockbroker.socket.d/sbtest.conf", "[Socket]\nSocketGroup=sockbroker\n");
    m.write(
        "/etc/systemd/system/haproxy@.service.d/sbtest.conf",
        "[Service]\nSupplementaryGroups=sockbroker\nEnvironment=CONFIG=/etc/haproxy/%i.cfg.erb\n",
    );
    m.write(
        "/etc/sockbroker/sockbroker.toml",
        "[[allow]]\nuser = \"haproxy\"\non_demand = [\"tcp://127.0.0.1:8095\"]\n",
    );
    m.write(
        "/etc/sockbroker/run/web.env",
        "SOCKETS=--socket http=tcp://127.0.0.1:8090\nCOMMAND=/usr/bin/python3 /opt/sbdaemons/listen_http.py\n",
    );
    m.write("/etc/haproxy/web.cfg.erb", HAPROXY_TEMPLATE);
    m.ok(&["systemctl", "daemon-reload"]);
}

/// An HTTP frontend that answers every request itself with its worker's pid,
/// on a socket from the broker (multibinder's ERB form).
const HAPROXY_TEMPLATE: &str = "global\n  maxconn 1000\n\
defaults\n  mode http\n  timeout client 10s\n  timeout server 10s\n  timeout connect 2s\n\
frontend web\n  bind <%= bind_tcp('127.0.0.1', 8095) %>\n\
  http-request return status 200 content-type text/plain lf-string \"haproxy %pid\"\n";

/// The broker's own restarts, with a consumer of its sockets serving all along.
fn restarts(m: &Machine) {
    m.ok(&["systemctl", "start", "sockbroker.socket", "sockbroker-http.socket"]);
    let mode = m.ok(&["stat", "-c", "%a %G", "/run/sockbroker/control.sock"]);
    assert_eq!(mode.trim(), "660 sockbroker", "the drop-in's SocketGroup=");
    let link = m.ok(&["readlink", "/run/multibinder.sock"]);
    assert_eq!(link.trim(), "/run/sockbroker/control.sock");

    // The first request starts the broker (socket activation).
    let before = m.inodes();
    assert_eq!(before["--name=http"], before["tcp://127.0.0.1:8081"], "name and address must give one socket");
    let systemd_held = m.pid1_sockets();
    for (what, inode) in &before {
        assert!(systemd_held.contains(inode), "{what} (inode {inode}) is not held by systemd: {systemd_held:?}");
    }
    // STATUS= is rate-limited (at most one update a second): poll for it.
    let want = "holding 4 sockets (1 from systemd, 0 from the fd store, 3 on demand, 0 declared)";
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = m.ok(&["systemctl", "show", "-p", "StatusText", "--value", "sockbroker"]);
        if status.contains(want) || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.contains(want), "{status}");
    // multibinder clients, unchanged: MULTIBINDER_SOCK and the symlink.
    let via_link =
        m.ok(&["env", "MULTIBINDER_SOCK=/run/multibinder.sock", "sockbroker", "bind", "tcp://127.0.0.1:8080"]);
    assert!(via_link.contains(&format!("inode {}", before["tcp://127.0.0.1:8080"])), "{via_link}");

    m.ok(&["systemctl", "start", "sbtest-consumer"]);
    let client = Client::start(m.leader, &[(8080, Proto::Line), (8081, Proto::Line)]);
    client.wait_for(20);

    let t = Instant::now();
    m.ok(&["systemctl", "restart", "sockbroker"]);
    let restart = t.elapsed();
    assert_eq!(m.inodes(), before, "other sockets after systemctl restart");
    client.wait_for(client.ok() + 20);

    let pid = m.ok(&["systemctl", "show", "-p", "MainPID", "--value", "sockbroker"]).trim().to_string();
    let t = Instant::now();
    m.ok(&["kill", "-9", &pid]);
    // The control socket is systemd's: this request waits in its queue until
    // the restarted broker answers it.
    let after_kill = m.inodes();
    let recovery = t.elapsed();
    assert_eq!(after_kill, before, "other sockets after kill -9");
    let new_pid = m.ok(&["systemctl", "show", "-p", "MainPID", "--value", "sockbroker"]).trim().to_string();
    assert_ne!(new_pid, pid, "the broker was not restarted");
    let restarts = m.ok(&["systemctl", "show", "-p", "NRestarts", "--value", "sockbroker"]);
    assert_eq!(restarts.trim(), "1", "Restart=always should have restarted it once");
    client.wait_for(client.ok() + 20);

    // A new generation of the consumer gets the sockets from the restarted
    // broker: the same listen queues, so no connection fails in between.
    let consumers_before = client.servers();
    m.ok(&["systemctl", "restart", "sbtest-consumer"]);
    client.wait_for(client.ok() + 20);
    let servers = client.servers();
    assert!(servers.len() > consumers_before.len(), "the new consumer answered nothing: {servers:?}");

    let journal = m.ok(&["journalctl", "--no-pager", "-o", "cat", "-u", "sockbroker"]);
    assert_eq!(journal.matches("holding tcp://127.0.0.1:8080 (from the fd store)").count(), 2, "{journal}");
    assert!(!journal.contains("; skipped"), "{journal}");

    let (ok, failed, errors) = client.stop();
    println!(
        "systemd_boot: {ok} connections answered, {failed} failed; systemctl restart sockbroker took {restart:.1?}, \
         kill -9 to answered request {recovery:.1?}"
    );
    assert_eq!(failed, 0, "failed connections: {errors:?}");
}

/// How many `systemctl reload`s each unit gets under load.
const RELOADS: u64 = 5;

/// `sockbroker-run@web` fronting tests/daemons/listen_http.py.
fn run_unit(m: &Machine) {
    let unit = "sockbroker-run@web";
    m.ok(&["systemctl", "start", unit]);
    let inode = m.inode("tcp://127.0.0.1:8090");
    let main_pid = m.ok(&["systemctl", "show", "-p", "MainPID", "--value", unit]);
    let client = Client::start(m.leader, &[(8090, Proto::Http)]);
    client.wait_for(20);
    let t = Instant::now();
    for n in 2..RELOADS + 2 {
        m.ok(&["systemctl", "reload", unit]);
        // `systemctl reload` returned: the new generation serves already.
        let status = m.ok(&["systemctl", "show", "-p", "StatusText", "--value", unit]);
        assert!(status.starts_with(&format!("serving generation {n} (pid ")), "reload {n} returned early: {status}");
        // The old generation may still win a few accepts from the shared
        // queue while it retires; the new one answers soon after.
        let gen = format!("gen={n}");
        client.wait_for_server(|s| s.ends_with(&gen));
    }
    let per_reload = t.elapsed() / RELOADS as u32;
    client.wait_for(client.ok() + 20);
    let answered = client.servers();
    let (ok, failed, errors) = client.stop();
    assert_eq!(failed, 0, "{unit}: failed connections over {RELOADS} reloads: {errors:?}");
    let last = format!("gen={}", RELOADS + 1);
    // A reload, not a restart: the same `run`, the same kernel socket, and
    // the serving generation holds it at fd 3.
    assert_eq!(m.ok(&["systemctl", "show", "-p", "MainPID", "--value", unit]), main_pid);
    assert_eq!(m.inode("tcp://127.0.0.1:8090"), inode, "another socket after the reloads");
    let status = m.ok(&["systemctl", "show", "-p", "StatusText", "--value", unit]);
    assert!(status.contains(&format!("serving generation {}", RELOADS + 1)), "{status}");
    let pid = answered.iter().find(|s| s.ends_with(&last)).and_then(|s| s.strip_prefix("pid=")?.split(' ').next());
    let fd3 = m.ok(&["readlink", &format!("/proc/{}/fd/3", pid.unwrap())]);
    assert_eq!(fd3.trim(), format!("socket:[{inode}]"), "the serving generation's fd 3");
    println!(
        "systemd_boot: {unit}: {RELOADS} reloads, {ok} connections answered, {failed} failed, \
         {per_reload:.1?} per systemctl reload"
    );
    m.ok(&["systemctl", "stop", unit]);
}

/// `haproxy@web`: HAProxy as user haproxy, its socket from the broker.
fn haproxy_unit(m: &Machine) {
    let unit = "haproxy@web";
    m.ok(&["systemctl", "start", unit]);
    let inode = m.inode("tcp://127.0.0.1:8095");
    let main_pid = m.ok(&["systemctl", "show", "-p", "MainPID", "--value", unit]);
    // The supervisor and every HAProxy process run as haproxy, not root.
    let users = m.ok(&["ps", "-o", "user=,pid=,args=", "-p", main_pid.trim(), "-C", "haproxy"]);
    assert!(users.lines().count() >= 3, "the supervisor, HAProxy's master and worker: {users}");
    assert!(users.lines().all(|l| l.starts_with("haproxy ")), "{users}");
    let client = Client::start(m.leader, &[(8095, Proto::Http)]);
    client.wait_for(20);
    let t = Instant::now();
    for _ in 0..RELOADS {
        let before = client.servers();
        m.ok(&["systemctl", "reload", unit]);
        // Each reload starts a new HAProxy, whose worker answers: the only
        // new pid there can be, since retired workers accept no more.
        client.wait_for_server(|s| !before.contains(s));
    }
    let per_reload = t.elapsed() / RELOADS as u32;
    client.wait_for(client.ok() + 20);
    let workers = client.servers();
    // The unit's CAP_SYS_NICE: each instance started at idle CPU priority
    // and was raised once ready; none is left idle (ps: IDL).
    let journal = m.ok(&["journalctl", "--no-pager", "-o", "cat", "-u", unit]);
    assert!(journal.contains("starts at idle CPU priority until it is ready"), "{journal}");
    let classes = m.ok(&["ps", "-L", "-o", "cls=,pid=,comm=", "-C", "haproxy"]);
    assert!(!classes.contains("IDL"), "a HAProxy thread left at idle priority:\n{classes}");
    assert_eq!(workers.len() as u64, RELOADS + 1, "one worker per instance: {workers:?}");

    // A template HAProxy refuses: the reload fails loudly, nothing new starts,
    // and the running instance serves on.
    m.write("/etc/haproxy/web.cfg.erb", &HAPROXY_TEMPLATE.replace("mode http", "mode http\n  no-such-keyword on"));
    let (reloaded, out) = m.run(&["systemctl", "reload", unit]);
    assert!(!reloaded, "a broken template was reloaded: {out}");
    client.wait_for(client.ok() + 50);
    assert_eq!(client.servers(), workers, "a new HAProxy answered after a failed reload");
    let journal = m.ok(&["journalctl", "--no-pager", "-o", "cat", "-u", unit]);
    assert!(journal.contains("unknown keyword 'no-such-keyword'"), "HAProxy's alert in the journal: {journal}");
    assert_eq!(m.ok(&["systemctl", "is-active", unit]).trim(), "active");
    // `systemctl status` says why, and that the old instance serves.
    let status = m.ok(&["systemctl", "status", "--no-pager", "-n", "20", unit]);
    assert!(status.contains("reload failed, serving: generation 6"), "{status}");
    assert!(status.contains("no-such-keyword"), "{status}");

    // Fixed: the next reload goes through.
    m.write("/etc/haproxy/web.cfg.erb", HAPROXY_TEMPLATE);
    m.ok(&["systemctl", "reload", unit]);
    let status = m.ok(&["systemctl", "show", "-p", "StatusText", "--value", unit]);
    // The refused config used up number 7.
    assert!(status.starts_with("serving: generation 8 "), "a success clears the failure: {status}");
    client.wait_for_server(|s| !workers.contains(s));
    client.wait_for(client.ok() + 20);
    let (ok, failed, errors) = client.stop();
    assert_eq!(failed, 0, "{unit}: failed connections over {} reloads: {errors:?}", RELOADS + 2);
    assert_eq!(m.ok(&["systemctl", "show", "-p", "MainPID", "--value", unit]), main_pid);
    assert_eq!(m.inode("tcp://127.0.0.1:8095"), inode, "another socket after the reloads");
    println!(
        "systemd_boot: {unit}: {} reloads (one refused), {ok} connections answered, {failed} failed, \
         {per_reload:.1?} per systemctl reload",
        RELOADS + 2
    );
    m.ok(&["systemctl", "stop", unit]);
}

/// Debian's own haproxy.service serving a port it binds itself, with the
/// stats socket of Debian's default config.
const SELF_BOUND_HAPROXY: &str =
    "global\n  maxconn 1000\n  stats socket /run/haproxy/admin.sock mode 660 level admin\n\
defaults\n  mode http\n  timeout client 10s\n  timeout server 10s\n  timeout connect 2s\n\
frontend web\n  bind 127.0.0.1:8096\n\
  http-request return status 200 content-type text/plain lf-string \"haproxy %pid\"\n";

/// docs/adopt.md, "A HAProxy that binds its ports itself", with the real
/// units: Debian's haproxy.service moves to haproxy@web2 under load. The
/// broker (shipped unit: no CAP_SYS_PTRACE) adopts what root's `sockbroker
/// adopt` copies, keeps it in the fd store across its restart, and no request
/// fails.
fn adopt_haproxy(m: &Machine) {
    m.ok(&["mkdir", "-p", "/run/haproxy"]);
    m.write("/etc/haproxy/haproxy.cfg", SELF_BOUND_HAPROXY);
    m.ok(&["systemctl", "start", "haproxy.service"]);
    let client = Client::start(m.leader, &[(8096, Proto::Http)]);
    client.wait_for(20);

    // 1. Adopt the listener from HAProxy's worker (its master has none).
    let master = m.ok(&["systemctl", "show", "-p", "MainPID", "--value", "haproxy"]).trim().to_string();
    let worker = m.ok(&["pgrep", "-n", "-P", &master]).trim().to_string();
    let out = m.ok(&["sockbroker", "adopt", "--pid", &worker, "--socket", "web2=tcp://127.0.0.1:8096"]);
    assert!(out.contains(&format!("tcp://127.0.0.1:8096: adopted from pid {worker}")), "{out}");
    let inode: u64 = out.rsplit("inode ").next().unwrap().trim().trim_end_matches(')').parse().unwrap();
    assert_eq!(m.inode("tcp://127.0.0.1:8096"), inode);
    let broker = m.ok(&["systemctl", "show", "-p", "MainPID", "--value", "sockbroker"]).trim().to_string();
    let caps = m.ok(&["grep", "CapEff", &format!("/proc/{broker}/status")]);
    let caps = u64::from_str_radix(caps.split_whitespace().nth(1).unwrap(), 16).unwrap();
    assert_eq!(caps & (1 << 19), 0, "the broker adopted without CAP_SYS_PTRACE");

    // 2. HAProxy under the broker from a template, as user haproxy.
    let rules = "[[allow]]\nuser = \"haproxy\"\non_demand = [\"tcp://127.0.0.1:8095\", \"tcp://127.0.0.1:8096\"]\n";
    m.write("/etc/sockbroker/sockbroker.toml", rules);
    m.ok(&["sockbroker", "reload"]);
    m.write("/etc/haproxy/web2.cfg.erb", &HAPROXY_TEMPLATE.replace("8095", "8096"));
    let before = client.servers();
    m.ok(&["systemctl", "start", "haproxy@web2"]);
    client.wait_for_server(|s| !before.contains(s));

    // 3. The old HAProxy soft-stops, and Debian's Restart=always must not
    // bring it back (it would bind a second socket: SO_REUSEPORT).
    m.write("/run/systemd/system/haproxy.service.d/no-restart.conf", "[Service]\nRestart=no\n");
    m.ok(&["systemctl", "daemon-reload"]);
    m.ok(&["systemctl", "kill", "-s", "USR1", "--kill-whom=main", "haproxy"]);
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    while m.run(&["systemctl", "is-active", "haproxy"]).0 {
        assert!(Instant::now() < deadline, "the old HAProxy did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    client.wait_for(client.ok() + 50);

    // 4. The adopted socket survives a restart of the broker (fd store).
    m.ok(&["systemctl", "restart", "sockbroker"]);
    assert_eq!(m.inode("tcp://127.0.0.1:8096"), inode, "the adopted socket after systemctl restart");
    let list = m.ok(&["sockbroker", "list"]);
    assert!(list.lines().any(|l| l.contains("web2") && l.contains("fd-store")), "{list}");
    client.wait_for(client.ok() + 20);
    let (ok, failed, errors) = client.stop();
    println!(
        "systemd_boot: haproxy.service moved to haproxy@web2 by adoption: {ok} connections answered, {failed} failed"
    );
    assert_eq!(failed, 0, "failed connections while moving HAProxy: {errors:?}");
    m.ok(&["systemctl", "stop", "haproxy@web2"]);
}

/// `systemctl reload` fails for a generation that exits before READY=1 and
/// for one that exits 500 ms after it; the unit stays active, the old
/// generation serves on with no failed request, and `systemctl status` says
/// why until a reload succeeds.
fn run_failures(m: &Machine) {
    let unit = "sockbroker-run@flaky";
    m.write(
        "/etc/sockbroker/run/flaky.env",
        "SOCKETS=--socket http=tcp://127.0.0.1:8094\n\
         COMMAND=/usr/bin/python3 /opt/sbdaemons/listen_http.py --exit-on-gen 2 --die-after-ready-on-gen 3\n",
    );
    m.ok(&["systemctl", "start", unit]);
    let main_pid = m.ok(&["systemctl", "show", "-p", "MainPID", "--value", unit]);
    let client = Client::start(m.leader, &[(8094, Proto::Http)]);
    client.wait_for(20);
    for (gen, why) in [(2, "exited with status 3 before it was ready"), (3, "exited with status 4 ")] {
        let (reloaded, out) = m.run(&["systemctl", "reload", unit]);
        assert!(!reloaded, "generation {gen} failed, yet systemctl reload succeeded: {out}");
        assert_eq!(m.ok(&["systemctl", "is-active", unit]).trim(), "active");
        let status = m.ok(&["systemctl", "status", "--no-pager", "-n", "30", unit]);
        assert!(status.contains("serving generation 1 (pid"), "{status}");
        assert!(status.contains(&format!("last reload failed: generation {gen} (pid")), "{status}");
        assert!(status.contains(why), "{status}");
        client.wait_for(client.ok() + 20);
    }
    let journal = m.ok(&["journalctl", "--no-pager", "-o", "cat", "-u", unit]);
    assert!(journal.contains("after it said it was ready, inside its 2s --ready-grace window"), "{journal}");
    m.ok(&["systemctl", "reload", unit]);
    let status = m.ok(&["systemctl", "show", "-p", "StatusText", "--value", unit]);
    assert!(status.starts_with("serving generation 4 ") && !status.contains("last reload failed"), "{status}");
    client.wait_for_server(|s| s.ends_with("gen=4"));
    client.wait_for(client.ok() + 20);
    let servers = client.servers();
    let (ok, failed, errors) = client.stop();
    assert_eq!(failed, 0, "{unit}: failed connections: {errors:?}");
    assert!(servers.iter().all(|s| s.ends_with("gen=1") || s.ends_with("gen=4")), "{servers:?}");
    assert_eq!(m.ok(&["systemctl", "show", "-p", "MainPID", "--value", unit]), main_pid);
    assert_eq!(m.ok(&["systemctl", "show", "-p", "NRestarts", "--value", unit]).trim(), "0");
    println!("systemd_boot: {unit}: 2 failed reloads and 1 good one, {ok} connections answered, {failed} failed");
    m.ok(&["systemctl", "stop", unit]);
}

/// The file docs/generic-daemons.md shows for `path`: its fenced block
/// marked `<!-- recipe: PATH -->`.
fn recipe(path: &str) -> String {
    package::recipe("docs/generic-daemons.md", path)
}

/// The recipes of docs/generic-daemons.md, as the doc shows them.
fn recipes(m: &Machine) {
    let app = recipe("/srv/myapp/app.py");
    m.write("/srv/myapp/app.py", &app);
    for path in [
        "/etc/sockbroker/run/gunicorn.env",
        "/etc/sockbroker/run/gunicorn-preload.env",
        "/etc/sockbroker/run/uwsgi.ini",
        "/etc/sockbroker/run/uwsgi.env",
    ] {
        m.write(path, &recipe(path));
    }
    let broken = "raise RuntimeError('a broken deploy')\n";
    for (name, port, why) in [
        ("gunicorn", 8091, "exited with status 3 "),
        ("gunicorn-preload", 8092, "exited with status 1 before it was ready"),
        ("uwsgi", 8093, "before it was ready"),
    ] {
        let unit = format!("sockbroker-run@{name}");
        m.ok(&["systemctl", "start", &unit]);
        let client = Client::start(m.leader, &[(port, Proto::Http)]);
        client.wait_for(20);
        let t = Instant::now();
        for n in 2..RELOADS + 2 {
            m.ok(&["systemctl", "reload", &unit]);
            let gen = format!("gen={n}");
            client.wait_for_server(|s| s.ends_with(&gen));
        }
        let per_reload = t.elapsed() / RELOADS as u32;
        // A broken deploy: the reload fails, the old generation serves on.
        m.write("/srv/myapp/app.py", broken);
        let (reloaded, out) = m.run(&["systemctl", "reload", &unit]);
        assert!(!reloaded, "{unit}: a broken app was reloaded: {out}");
        assert_eq!(m.ok(&["systemctl", "is-active", &unit]).trim(), "active");
        let status = m.ok(&["systemctl", "status", "--no-pager", "-n", "30", &unit]);
        let serving = format!("serving generation {} (pid", RELOADS + 1);
        assert!(status.contains(&serving) && status.contains("last reload failed"), "{status}");
        assert!(status.contains(why), "{unit}: {why:?} not in: {status}");
        client.wait_for(client.ok() + 50);
        m.write("/srv/myapp/app.py", &app);
        m.ok(&["systemctl", "reload", &unit]);
        let gen = format!("gen={}", RELOADS + 3);
        client.wait_for_server(|s| s.ends_with(&gen));
        client.wait_for(client.ok() + 20);
        let (ok, failed, errors) = client.stop();
        // uWSGI 2.0.21 can drop a connection one of its workers accepted just
        // as the graceful stop reached it (docs/generic-daemons.md, "uWSGI",
        // says so with the figures); gunicorn never may.
        let tolerated = if name == "uwsgi" { 2 } else { 0 };
        assert!(failed <= tolerated, "{unit}: {failed} failed connections (at most {tolerated}): {errors:?}");
        assert_eq!(m.ok(&["systemctl", "show", "-p", "NRestarts", "--value", &unit]).trim(), "0");
        println!(
            "systemd_boot: {unit}: {} reloads (one broken app refused), {ok} connections answered, {failed} failed, \
             {per_reload:.1?} per systemctl reload",
            RELOADS + 2
        );
        m.ok(&["systemctl", "stop", &unit]);
    }
}

/// The cached tree for PACKAGES: its folder is named by a hash of the list.
fn default_tree() -> PathBuf {
    // FNV-1a: stable across Rust releases, unlike DefaultHasher.
    let hash = PACKAGES.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    Path::new(TREES).join(format!("bookworm-{hash:08x}"))
}

/// Makes the Debian tree once (`debootstrap`, about a minute), under a lock
/// so parallel runs share it.
fn ensure_tree(tree: &Path) {
    let stamp = tree.join(STAMP);
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == PACKAGES) {
        return;
    }
    let parent = tree.parent().unwrap();
    std::fs::create_dir_all(parent).unwrap();
    let lock = std::fs::File::create(parent.join(".lock")).unwrap();
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).unwrap();
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == PACKAGES) {
        return;
    }
    let tmp = parent.join(format!("tree.tmp-{}", std::process::id()));
    println!("systemd_boot: making the Debian tree with debootstrap (once per machine) ...");
    let out = Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={PACKAGES}"), "bookworm"])
        .arg(&tmp)
        .arg("http://deb.debian.org/debian")
        .output()
        .unwrap();
    assert!(out.status.success(), "debootstrap failed: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(tmp.join(STAMP), PACKAGES).unwrap();
    if tree.exists() {
        std::fs::rename(tree, parent.join(format!("tree.old-{}", std::process::id()))).unwrap();
    }
    std::fs::rename(&tmp, tree).unwrap();
}

/// A booted container, stopped on drop.
struct Machine {
    nspawn: Child,
    leader: i32,
    log: PathBuf,
}

impl Machine {
    fn boot(tree: &Path) -> Machine {
        Machine::boot_with(tree, "sbt7", true, &[])
    }

    /// Boots `tree` as machine NAME-PID; `units`: with the binary and the
    /// units under test bound in (else only `binds`, HOST:INSIDE).
    fn boot_with(tree: &Path, name: &str, units: bool, binds: &[(&str, &str)]) -> Machine {
        let name = format!("{name}-{}", std::process::id());
        let log = std::env::temp_dir().join(format!("{name}-nspawn.log"));
        let bind = |host: &str, inside: &str| format!("--bind-ro={host}:{inside}");
        let mut cmd = Command::new("systemd-nspawn");
        cmd.arg("-D")
            .arg(tree)
            .args(["-M", &name, "--boot", "--register=no", "--keep-unit", "--volatile=overlay"])
            .args(["--private-network", "--console=read-only"]);
        for (host, inside) in binds {
            cmd.arg(bind(host, inside));
        }
        if units {
            cmd.arg(bind(BIN, "/usr/bin/sockbroker"))
                .arg(bind(&format!("{ROOT}/units/sockbroker.socket"), "/etc/systemd/system/sockbroker.socket"))
                .arg(bind(&format!("{ROOT}/units/sockbroker.service"), "/etc/systemd/system/sockbroker.service"))
                .arg(bind(&format!("{ROOT}/tests/systemd"), "/opt/sbtest"))
                .arg(bind(&format!("{ROOT}/tests/daemons"), "/opt/sbdaemons"))
                .arg(bind(
                    &format!("{ROOT}/units/sockbroker-run@.service"),
                    "/etc/systemd/system/sockbroker-run@.service",
                ))
                .arg(bind(&format!("{ROOT}/units/haproxy@.service"), "/etc/systemd/system/haproxy@.service"))
                .arg(bind(
                    &format!("{ROOT}/tests/systemd/sockbroker-http.socket"),
                    "/etc/systemd/system/sockbroker-http.socket",
                ))
                .arg(bind(
                    &format!("{ROOT}/tests/systemd/sbtest-consumer.service"),
                    "/etc/systemd/system/sbtest-consumer.service",
                ));
        }
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::from(std::fs::File::options().append(true).open(&log).unwrap()));
        // SAFETY: setsid and prctl are async-signal-safe and touch no memory
        // of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // Its own session (nspawn wants no controlling terminal), and
                // SIGTERM (a clean container stop) if this test dies.
                nix::libc::setsid();
                if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let nspawn = cmd.spawn().unwrap();
        let mut machine = Machine { leader: 0, log, nspawn };
        machine.leader = machine.find_leader();
        // Booted when PID 1 says so; its bus may not answer the first tries.
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let (_, out) = machine.run(&["systemctl", "is-system-running", "--wait"]);
            if matches!(out.trim(), "running" | "degraded") {
                break;
            }
            assert!(Instant::now() < deadline, "container not up: {out}");
            std::thread::sleep(Duration::from_millis(50));
        }
        machine
    }

    /// The container's PID 1 as seen from the host: nspawn's child.
    fn find_leader(&mut self) -> i32 {
        let pid = self.nspawn.id();
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
            for child in children.split_whitespace() {
                let status = std::fs::read_to_string(format!("/proc/{child}/status")).unwrap_or_default();
                let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:")).unwrap_or("");
                if nspid.split_whitespace().last() == Some("1") {
                    return child.parse().unwrap();
                }
            }
            if let Some(status) = self.nspawn.try_wait().unwrap() {
                panic!("systemd-nspawn exited: {status}: {}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "no container PID 1 after {COMMAND_TIMEOUT:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs a command inside the container; its status and output. Killed
    /// (and the suite failed) past COMMAND_TIMEOUT, so nothing entered with
    /// nsenter outlives the call and blocks the container's stop.
    fn run(&self, args: &[&str]) -> (bool, String) {
        self.run_within(args, COMMAND_TIMEOUT)
    }

    /// [`Machine::run`] with its own time limit.
    fn run_within(&self, args: &[&str], limit: Duration) -> (bool, String) {
        let out = tempfile_path("out");
        let file = std::fs::File::create(&out).unwrap();
        let mut child = Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a", "env", "-i", PATH])
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{args:?}: no answer within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let _ = std::fs::remove_file(&out);
        (status.success(), text)
    }

    /// Runs a command that must succeed; its output.
    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.run(args);
        assert!(ok, "{args:?} failed: {out}");
        out
    }

    /// Writes a file inside the container (through its root as the host sees
    /// it: the volatile overlay, so the tree stays pristine).
    fn write(&self, path: &str, text: &str) {
        let host = PathBuf::from(format!("/proc/{}/root{path}", self.leader));
        std::fs::create_dir_all(host.parent().unwrap()).unwrap();
        std::fs::write(&host, text).unwrap_or_else(|e| panic!("{}: {e}", host.display()));
    }

    /// The inode of one socket, as a client receives it.
    #[track_caller]
    fn inode(&self, what: &str) -> u64 {
        let out = self.ok(&["sockbroker", "bind", what]);
        let inode = out.rsplit("inode ").next().and_then(|n| n.trim().parse().ok());
        inode.unwrap_or_else(|| panic!("bind {what}: {out}"))
    }

    /// The inode of each of SOCKETS, as a client receives it.
    #[track_caller]
    fn inodes(&self) -> BTreeMap<&'static str, u64> {
        SOCKETS.iter().map(|what| (*what, self.inode(what))).collect()
    }

    /// Socket inodes held by the container's systemd (its fd store and
    /// socket units).
    fn pid1_sockets(&self) -> Vec<u64> {
        let out = self.ok(&["ls", "-l", "/proc/1/fd"]);
        out.split("socket:[").skip(1).filter_map(|s| s.split(']').next()?.parse().ok()).collect()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.nspawn.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.nspawn.try_wait().ok().flatten().is_none() {
            if Instant::now() >= deadline {
                eprintln!("systemd-nspawn did not stop within 20s of SIGTERM; killing it");
                let _ = self.nspawn.kill();
                let _ = self.nspawn.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

fn tempfile_path(what: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!("sbt7-{}-{what}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)))
}

/// What a server on a port speaks.
#[derive(Clone, Copy, Debug)]
enum Proto {
    /// tests/systemd/consumer.py: "ok PID" on connect, nothing read.
    Line,
    /// HTTP/1.0: one GET, a 200 whose body names the server.
    Http,
}

/// Connects to servers in turn (for the consumer: the on-demand socket 8080,
/// kept in the fd store, and the declared one 8081), from inside the
/// container's network, until stopped.
struct Client {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    state: Arc<Mutex<ClientState>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct ClientState {
    failed: u64,
    errors: Vec<String>,
    /// Which consumer processes answered ("ok PID").
    servers: std::collections::BTreeSet<String>,
}

impl Client {
    fn start(leader: i32, targets: &[(u16, Proto)]) -> Client {
        let targets = targets.to_vec();
        let netns = std::fs::File::open(format!("/proc/{leader}/ns/net")).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let state = Arc::new(Mutex::new(ClientState::default()));
        let (s, o, st) = (stop.clone(), ok.clone(), state.clone());
        let thread = std::thread::spawn(move || {
            // SAFETY: setns on this thread only (network namespaces are per
            // thread); `netns` is an open namespace file.
            let rc = unsafe { nix::libc::setns(netns.as_raw_fd(), nix::libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let mut n = 0usize;
            while !s.load(Ordering::SeqCst) {
                let (port, proto) = targets[n % targets.len()];
                n += 1;
                match request(port, proto) {
                    Ok(reply) => {
                        o.fetch_add(1, Ordering::SeqCst);
                        st.lock().unwrap().servers.insert(reply);
                    }
                    Err(e) => {
                        let mut st = st.lock().unwrap();
                        st.failed += 1;
                        if st.errors.len() < 10 {
                            st.errors.push(format!("port {port}: {e}"));
                        }
                    }
                }
            }
        });
        Client { stop, ok, state, thread: Some(thread) }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    fn servers(&self) -> std::collections::BTreeSet<String> {
        self.state.lock().unwrap().servers.clone()
    }

    /// Waits until `n` connections were answered (bounded).
    #[track_caller]
    fn wait_for(&self, n: u64) {
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        while self.ok() < n {
            let st = self.state.lock().unwrap();
            assert!(Instant::now() < deadline, "only {} answered, {} failed: {:?}", self.ok(), st.failed, st.errors);
            drop(st);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until a server whose answer satisfies `want` has answered
    /// (bounded).
    #[track_caller]
    fn wait_for_server(&self, want: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        while !self.servers().iter().any(|s| want(s)) {
            let st = self.state.lock().unwrap();
            assert!(Instant::now() < deadline, "not answered; answered: {:?}, {} failed", st.servers, st.failed);
            drop(st);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stop(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        let st = self.state.lock().unwrap();
        (self.ok(), st.failed, st.errors.clone())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One connection; what the server says about itself ("ok PID", or the
/// HTTP body).
fn request(port: u16, proto: Proto) -> std::io::Result<String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    if let Proto::Http = proto {
        stream.write_all(b"GET / HTTP/1.0\r\nHost: sbtest\r\n\r\n")?;
    }
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let answer = match proto {
        Proto::Line => reply.starts_with("ok ").then(|| reply.trim()),
        Proto::Http => reply
            .starts_with("HTTP/1.")
            .then(|| reply.split_once("\r\n\r\n"))
            .flatten()
            .filter(|_| reply.lines().next().is_some_and(|l| l.contains(" 200 ")))
            .map(|(_, body)| body.trim()),
    };
    answer.map(String::from).ok_or_else(|| std::io::Error::other(format!("unexpected reply {reply:?}")))
}
