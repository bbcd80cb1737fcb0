//! `units/sockbroker-run@.service` passes `systemd-analyze verify` on an
//! instance, with no output at all (verify exits 0 on warnings such as
//! unknown keys, so the output decides).

use crate::common;

use std::path::Path;

#[test]
fn run_template_instance_verifies_cleanly() {
    let dir = common::test_dir("run_unit");
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("units");
    let template = std::fs::read_to_string(units.join("sockbroker-run@.service")).unwrap();
    assert!(template.contains("ExecStart=/usr/bin/sockbroker run "), "ExecStart changed: update this test");
    assert!(template.contains("EnvironmentFile=/etc/sockbroker/run/%i.env"));
    assert!(template.contains("ExecReload=/usr/bin/sockbroker supervisor reload --pid $MAINPID"));
    // ExecStart= pointing at the binary under test, so the executable check passes too.
    std::fs::write(dir.join("sockbroker-run@.service"), template.replace("/usr/bin/sockbroker", common::BIN)).unwrap();
    let output = common::systemd_analyze_verify(&dir, &["sockbroker-run@myapp.service"]);
    assert!(output.trim().is_empty(), "systemd-analyze verify:\n{output}");

    // The check itself can fail: a bad key is reported.
    std::fs::write(dir.join("sockbroker-run@.service"), format!("{template}\n[Service]\nNoSuchKey=1\n")).unwrap();
    let output = common::systemd_analyze_verify(&dir, &["sockbroker-run@myapp.service"]);
    assert!(output.contains("NoSuchKey"), "systemd-analyze verify did not report a bad key:\n{output}");
    std::fs::remove_dir_all(&dir).unwrap();
}
