//! Reading the Prometheus text format the broker and the supervisors write:
//! one sample's value, and `promtool check metrics` (Debian package
//! `prometheus`) as the format's judge.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{output_text, wait_timeout};

/// The value of the sample `name` whose labels include every `labels` pair
/// (`key="value"` text), if there is one.
pub fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        (metric == name && labels.iter().all(|l| rest.contains(l))).then(|| value.parse().ok())?
    })
}

/// `promtool check metrics` on `text`; fails the test with promtool's
/// findings and the text when it does not pass, or when it runs over 60 s.
#[track_caller]
pub fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test installs it)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    assert!(wait_timeout(&mut child, Duration::from_secs(60)).is_some(), "promtool did not finish within 60s");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "promtool check metrics:\n{}\n{text}", output_text(&out));
}
