//! The unit files in `units/` pass `systemd-analyze verify` with no output at
//! all (it exits 0 on warnings such as unknown keys, so the output decides).

mod common;

use std::path::Path;

/// The shipped units, with ExecStart= pointing at the binary under test, so
/// the executable check passes too.
#[test]
fn units_verify_cleanly() {
    let dir = common::test_dir("units");
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("units");
    let service = std::fs::read_to_string(units.join("sockbroker.service")).unwrap();
    assert!(service.contains("ExecStart=/usr/local/bin/sockbroker serve"), "ExecStart changed: update this test");
    std::fs::write(dir.join("sockbroker.service"), service.replace("/usr/local/bin/sockbroker", common::BIN)).unwrap();
    std::fs::copy(units.join("sockbroker.socket"), dir.join("sockbroker.socket")).unwrap();
    let output = common::systemd_analyze_verify(&dir, &["sockbroker.socket", "sockbroker.service"]);
    assert!(output.trim().is_empty(), "systemd-analyze verify:\n{output}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The units as shipped: the only message allowed is the one about the
/// binary not being installed on this machine.
#[test]
fn shipped_units_verify() {
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("units");
    let output = common::systemd_analyze_verify(&units, &["sockbroker.socket", "sockbroker.service"]);
    let installed = Path::new("/usr/local/bin/sockbroker").exists();
    let unexpected: Vec<&str> = output
        .lines()
        .filter(|l| {
            installed
                || *l != "sockbroker.service: Command /usr/local/bin/sockbroker is not executable: No such file or directory"
        })
        .collect();
    assert!(unexpected.is_empty(), "systemd-analyze verify:\n{output}");
}
