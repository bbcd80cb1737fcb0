//! HAProxy's own argument list, as multibinder's scripts take it: find the
//! templates behind `-f`, the pid file behind `-p`, the mode flags, and
//! multibinder's `--erb-write-only`. Pure; no file is read.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Template suffixes and what they render to: `X.cfg.erb`, `X.cfg.mb` and
/// `X.cfg.sb` all render to `X.cfg`. `.erb` and `.mb` are multibinder's; `.sb`
/// (sockbroker) is the native one. All three take both syntaxes.
pub const TEMPLATE_SUFFIXES: [&str; 3] = [".erb", ".mb", ".sb"];

/// multibinder's flag: render the config and exit without starting HAProxy.
pub const WRITE_ONLY_FLAG: &str = "--erb-write-only";

/// Where a template renders to by default: its path without the template
/// suffix, or `None` when it has none.
pub fn default_output(template: &Path) -> Option<PathBuf> {
    let text = template.as_os_str().to_str()?;
    TEMPLATE_SUFFIXES
        .iter()
        .find_map(|suffix| text.strip_suffix(suffix))
        .filter(|stem| !stem.is_empty() && !stem.ends_with('/'))
        .map(PathBuf::from)
}

/// How HAProxy was asked to run, from its mode flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `-Ws`: master-worker, tells NOTIFY_SOCKET when it is ready.
    MasterWorkerNotify,
    /// `-W`: master-worker without notification.
    MasterWorker,
    /// `-D` or `-Ds`: forks into the background.
    Daemon,
    /// No mode flag (or `-db`): one foreground process.
    Foreground,
}

/// HAProxy's argument list with the parts sockbroker acts on picked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaproxyArgs {
    /// The program (`/usr/sbin/haproxy`).
    pub program: OsString,
    /// Every argument after the program, as given, minus `--erb-write-only`.
    pub args: Vec<OsString>,
    /// Indexes into `args` of the values of `-f` that are templates.
    pub templates: Vec<usize>,
    /// `--erb-write-only` was given.
    pub write_only: bool,
    /// The value of `-p`.
    pub pidfile: Option<PathBuf>,
    /// `-c` (check only) was given.
    pub check: bool,
    /// The mode flag.
    pub mode: Mode,
    /// Write rendered configs here instead of beside their templates (for
    /// a HAProxy user that may not write to /etc/haproxy).
    pub rendered_dir: Option<PathBuf>,
}

/// The argument list cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    /// Nothing to run.
    #[error("no HAProxy command given (expected: -- /usr/sbin/haproxy -f CONFIG.cfg.erb [ARGS])")]
    NoProgram,
    /// A flag that needs a value is last.
    #[error("HAProxy argument {0} needs a value")]
    MissingValue(String),
    /// No `-f` names a template.
    #[error("no template among HAProxy's -f arguments (a template ends in .erb, .mb or .sb)")]
    NoTemplate,
}

impl HaproxyArgs {
    /// Reads `PROGRAM ARGS…`.
    pub fn parse(argv: &[OsString]) -> Result<HaproxyArgs, ArgsError> {
        let (program, rest) = argv.split_first().ok_or(ArgsError::NoProgram)?;
        let mut out = HaproxyArgs {
            program: program.clone(),
            args: Vec::new(),
            templates: Vec::new(),
            write_only: false,
            pidfile: None,
            check: false,
            mode: Mode::Foreground,
            rendered_dir: None,
        };
        let mut iter = rest.iter();
        while let Some(arg) = iter.next() {
            if arg == WRITE_ONLY_FLAG {
                out.write_only = true;
                continue;
            }
            out.args.push(arg.clone());
            match arg.to_str().unwrap_or("") {
                flag @ ("-f" | "-p") => {
                    let value = iter.next().ok_or_else(|| ArgsError::MissingValue(flag.to_string()))?;
                    if flag == "-f" && default_output(Path::new(value)).is_some() {
                        out.templates.push(out.args.len());
                    }
                    if flag == "-p" {
                        out.pidfile = Some(PathBuf::from(value));
                    }
                    out.args.push(value.clone());
                }
                "-c" => out.check = true,
                "-Ws" => out.mode = Mode::MasterWorkerNotify,
                "-W" => out.mode = Mode::MasterWorker,
                "-D" | "-Ds" => out.mode = Mode::Daemon,
                _ => {}
            }
        }
        if out.templates.is_empty() {
            return Err(ArgsError::NoTemplate);
        }
        Ok(out)
    }

    /// The template paths, in order.
    pub fn template_paths(&self) -> impl Iterator<Item = &Path> {
        self.templates.iter().map(|&i| Path::new(&self.args[i]))
    }

    /// Where `template` (one of the `-f` templates) renders to.
    pub fn output_for(&self, template: &Path) -> PathBuf {
        let out = default_output(template).expect("templates have a template suffix");
        match (&self.rendered_dir, out.file_name()) {
            (Some(dir), Some(name)) => dir.join(name),
            _ => out,
        }
    }

    /// The arguments with each template replaced by its rendered path.
    pub fn rendered_args(&self) -> Vec<OsString> {
        let mut args = self.args.clone();
        for &i in &self.templates {
            args[i] = self.output_for(Path::new(&self.args[i])).into_os_string();
        }
        args
    }

    /// The arguments for a supervised, foreground HAProxy: the rendered
    /// paths, `-Ws -db` instead of any other mode flag (sockbroker is the
    /// foreground process systemd watches; `-Ds`/`-D`, or `daemon` in the
    /// config, would fork away; `-db` overrides the `daemon` keyword), and
    /// without `-sf`/`-st` lists (the supervisor retires old instances).
    pub fn supervised_args(&self) -> Vec<OsString> {
        let mut out = vec![OsString::from("-Ws"), OsString::from("-db")];
        let mut skipping_pids = false;
        for arg in self.rendered_args() {
            let text = arg.to_str().unwrap_or("");
            if skipping_pids {
                if text.parse::<u32>().is_ok() {
                    continue;
                }
                skipping_pids = false;
            }
            match text {
                "-Ws" | "-W" | "-D" | "-Ds" | "-db" => {}
                "-sf" | "-st" => skipping_pids = true,
                _ => out.push(arg),
            }
        }
        out
    }

    /// The arguments for `haproxy -c` of the rendered config.
    pub fn check_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = self.supervised_args().into_iter().skip(2).collect();
        args.push("-c".into());
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(items: &[&str]) -> Vec<OsString> {
        items.iter().map(OsString::from).collect()
    }

    #[test]
    fn outputs() {
        assert_eq!(default_output(Path::new("/etc/haproxy/a.cfg.erb")), Some(PathBuf::from("/etc/haproxy/a.cfg")));
        assert_eq!(default_output(Path::new("a.cfg.mb")), Some(PathBuf::from("a.cfg")));
        assert_eq!(default_output(Path::new("x/a.cfg.sb")), Some(PathBuf::from("x/a.cfg")));
        assert_eq!(default_output(Path::new("a.cfg")), None);
        assert_eq!(default_output(Path::new(".erb")), None);
        assert_eq!(default_output(Path::new("dir/.erb")), None);
    }

    #[test]
    fn multibinder_unit_arguments() {
        let a = HaproxyArgs::parse(&argv(&[
            "/usr/sbin/haproxy",
            "-Ds",
            "-f",
            "/etc/haproxy/foo.cfg.erb",
            "-p",
            "/run/haproxy-foo.pid",
            "--erb-write-only",
        ]))
        .unwrap();
        assert_eq!(a.program, "/usr/sbin/haproxy");
        assert!(a.write_only);
        assert_eq!(a.mode, Mode::Daemon);
        assert_eq!(a.pidfile, Some(PathBuf::from("/run/haproxy-foo.pid")));
        assert_eq!(a.template_paths().collect::<Vec<_>>(), vec![Path::new("/etc/haproxy/foo.cfg.erb")]);
        assert_eq!(a.rendered_args(), argv(&["-Ds", "-f", "/etc/haproxy/foo.cfg", "-p", "/run/haproxy-foo.pid"]));
        assert_eq!(
            a.supervised_args(),
            argv(&["-Ws", "-db", "-f", "/etc/haproxy/foo.cfg", "-p", "/run/haproxy-foo.pid"])
        );
        assert_eq!(a.check_args(), argv(&["-f", "/etc/haproxy/foo.cfg", "-p", "/run/haproxy-foo.pid", "-c"]));
    }

    #[test]
    fn several_configs_and_old_pids() {
        let a = HaproxyArgs::parse(&argv(&[
            "haproxy", "-f", "base.cfg", "-f", "a.cfg.sb", "-c", "-q", "-sf", "12", "13", "-f", "b.cfg.mb",
        ]))
        .unwrap();
        assert!(a.check);
        assert_eq!(a.mode, Mode::Foreground);
        assert_eq!(a.templates.len(), 2);
        assert_eq!(
            a.supervised_args(),
            argv(&["-Ws", "-db", "-f", "base.cfg", "-f", "a.cfg", "-c", "-q", "-f", "b.cfg"])
        );
    }

    #[test]
    fn rendered_dir() {
        let mut a = HaproxyArgs::parse(&argv(&["haproxy", "-f", "/etc/haproxy/x.cfg.sb"])).unwrap();
        a.rendered_dir = Some(PathBuf::from("/run/haproxy-x"));
        assert_eq!(a.output_for(Path::new("/etc/haproxy/x.cfg.sb")), Path::new("/run/haproxy-x/x.cfg"));
        assert_eq!(a.rendered_args(), argv(&["-f", "/run/haproxy-x/x.cfg"]));
    }

    #[test]
    fn refusals() {
        assert_eq!(HaproxyArgs::parse(&[]), Err(ArgsError::NoProgram));
        assert_eq!(HaproxyArgs::parse(&argv(&["haproxy", "-f"])), Err(ArgsError::MissingValue("-f".into())));
        assert_eq!(HaproxyArgs::parse(&argv(&["haproxy", "-f", "a.cfg"])), Err(ArgsError::NoTemplate));
    }
}
