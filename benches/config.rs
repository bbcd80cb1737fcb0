//! Figures for the configuration, reload and batch paths, against the real
//! broker binary. Run: `cargo bench --bench config` (prints a table; no
//! assertions). Everything is loopback or abstract UNIX sockets and bounded.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sockbroker::client::Client;
use sockbroker::spec::SocketSpec;

const BIN: &str = env!("CARGO_BIN_EXE_sockbroker");

struct Broker {
    child: Child,
    /// Kept open: the broker notifies it again on reload.
    _notify: UnixDatagram,
    dir: PathBuf,
    control: PathBuf,
}

impl Broker {
    fn start(dir: &Path, config: &Path) -> Broker {
        let notify_path = dir.join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let control = dir.join("control.sock");
        let child = Command::new(BIN)
            .args(["serve", "--control", control.to_str().unwrap(), "--config", config.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &notify_path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut buf = [0u8; 4096];
        loop {
            let n = notify.recv(&mut buf).expect("broker READY=1 within 30s");
            if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1") {
                break;
            }
        }
        Broker { child, _notify: notify, dir: dir.to_path_buf(), control }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn declared(n: usize, tag: &str) -> String {
    let pid = std::process::id();
    (0..n).map(|i| format!("[[socket]]\nname = \"s{i}\"\nlisten = \"unix:@sbb-{tag}-{pid}-{i}\"\n\n")).collect()
}

fn report(what: &str, n: usize, elapsed: Duration) {
    println!(
        "{what:<48} {n:>6}  {:>10.3} ms total  {:>8.2} us each",
        elapsed.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e6 / n as f64
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("sbb-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // Parse and validate a large file (what `sockbroker check` does).
    let n = 2000;
    let text = declared(n, "parse");
    let start = Instant::now();
    let config = sockbroker::config::parse(&text, "bench.toml").unwrap();
    report("parse + validate, declared sockets", config.sockets.len(), start.elapsed());

    // Start with 1000 declared sockets; reload to a file with the other half.
    let config_path = dir.join("sockbroker.toml");
    std::fs::write(&config_path, declared(1000, "a")).unwrap();
    let start = Instant::now();
    let broker = Broker::start(&dir, &config_path);
    report("start to READY=1, declared sockets", 1000, start.elapsed());
    std::fs::write(&config_path, declared(500, "a") + &declared(500, "b").replace("name = \"s", "name = \"t")).unwrap();
    let mut client = Client::connect(&broker.control).unwrap();
    let start = Instant::now();
    client.call("reload", serde_json::Value::Null).unwrap();
    report("reload: 500 kept, 500 closed, 500 opened", 1500, start.elapsed());

    // One round trip per socket vs one batch.
    let specs: Vec<SocketSpec> =
        (0..1000).map(|i| format!("unix:@sbb-a-{}-{i}", std::process::id())).map(|s| s.parse().unwrap()).collect();
    let start = Instant::now();
    for spec in &specs[..500] {
        client.bind(spec).unwrap();
    }
    report("bind, one request per held socket", 500, start.elapsed());
    let start = Instant::now();
    let got = client.bind_many(&specs[..500]).unwrap();
    assert!(got.iter().all(Result::is_ok));
    report("bind_many, one request for all (2 SCM messages)", 500, start.elapsed());
    drop(broker);
}
