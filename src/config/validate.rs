//! Validation: a parsed [`ConfigFile`] becomes a [`Config`], or every
//! [`Problem`] in it, each with its place. Addresses become socket specs,
//! user and group names become ids, modes become numbers, allow rules become
//! [`Rule`]s; an option set on a socket it does not apply to is a problem,
//! never silently ignored.

use std::collections::HashMap;
use std::ops::Range;

use toml::Spanned;

use super::file::{AllowFile, ConfigFile, ControlFile, LimitsFile, SocketFile};
use super::problem::{LineIndex, Problem, ProblemKind};
use super::{Config, ConfigError, ControlConfig, Declared};
use crate::acl::{AddressPattern, Rule, UnixFile, Who};
use crate::limits::Limits;
use crate::spec::{SocketKey, SocketOptions, SocketSpec, SpecError, Transport, UnixAddress};

/// Turns a parsed file into a [`Config`], collecting every problem.
pub fn validate(file: ConfigFile, text: &str, origin: &str) -> Result<Config, ConfigError> {
    let mut v = Validator::new(text, origin);
    let control = v.control(&file.control);
    let mut sockets: Vec<Declared> = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut keys: HashMap<SocketKey, usize> = HashMap::new();
    for (i, s) in file.sockets.iter().enumerate() {
        let at = |k: &str| format!("socket[{i}].{k}");
        let name = s.name.get_ref();
        let name_ok = valid_name(name);
        if !name_ok {
            v.push(s.name.span(), at("name"), ProblemKind::BadName(name.clone()));
        } else if let Some(first) = names.get(name) {
            v.push(s.name.span(), at("name"), ProblemKind::DuplicateName { name: name.clone(), first: *first });
        } else {
            names.insert(name.clone(), v.line(s.name.span().start));
        }
        let key = match s.listen.get_ref().parse::<SocketKey>() {
            Ok(key) => key,
            Err(e) => {
                v.push(s.listen.span(), at("listen"), ProblemKind::Address(e));
                continue;
            }
        };
        if let Some(first) = keys.get(&key) {
            v.push(s.listen.span(), at("listen"), ProblemKind::DuplicateAddress { key: key.clone(), first: *first });
        } else {
            keys.insert(key.clone(), v.line(s.listen.span().start));
        }
        let options = v.socket_options(i, s, &key);
        if name_ok {
            let source = format!("{origin}:{}", v.line(s.name.span().start));
            sockets.push(Declared { name: name.clone(), spec: SocketSpec { key, options }, source });
        }
    }
    let rules = file.allow.iter().enumerate().filter_map(|(i, a)| v.rule(i, a)).collect();
    let limits = v.limits(&file.limits);
    let metrics_socket = file.metrics.socket.as_ref().and_then(|name| {
        let stream = sockets.iter().find(|d| &d.name == name.get_ref()).is_some_and(|d| {
            matches!(
                d.spec.key,
                SocketKey::Inet { transport: Transport::Tcp, .. }
                    | SocketKey::Unix { kind: crate::spec::UnixKind::Stream, .. }
            )
        });
        if !stream {
            v.push(name.span(), "metrics.socket".into(), ProblemKind::MetricsSocket(name.get_ref().clone()));
        }
        stream.then(|| name.get_ref().clone())
    });
    if v.problems.is_empty() {
        Ok(Config { origin: origin.to_string(), control, sockets, rules, limits, metrics_socket })
    } else {
        Err(ConfigError::Invalid { origin: origin.to_string(), problems: v.problems })
    }
}

/// A name is FDNAME-compatible (systemd's fd store keeps it) and readable:
/// not empty, no space.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(' ') && crate::systemd::listen::fdname_is_valid(name)
}

/// Collects problems while resolving values.
struct Validator<'a> {
    text: &'a str,
    origin: &'a str,
    lines: LineIndex,
    problems: Vec<Problem>,
}

impl<'a> Validator<'a> {
    fn new(text: &'a str, origin: &'a str) -> Self {
        Validator { text, origin, lines: LineIndex::new(text), problems: Vec::new() }
    }

    fn line(&self, offset: usize) -> usize {
        self.lines.line_col(self.text, offset).0
    }

    fn problem(&self, span: Range<usize>, key: &str, kind: ProblemKind) -> Problem {
        let (line, column) = self.lines.line_col(self.text, span.start);
        Problem { file: self.origin.to_string(), line, column, key: key.to_string(), kind }
    }

    fn push(&mut self, span: Range<usize>, key: String, kind: ProblemKind) {
        let p = self.problem(span, &key, kind);
        self.problems.push(p);
    }

    fn control(&mut self, c: &ControlFile) -> ControlConfig {
        let mut out = ControlConfig::default();
        if let Some(path) = &c.path {
            match SocketKey::unix(crate::spec::UnixKind::Stream, path.get_ref()) {
                Ok(SocketKey::Unix { address: UnixAddress::Path(p), .. }) => out.path = Some(p),
                Ok(_) => self.push(
                    path.span(),
                    "control.path".into(),
                    ProblemKind::Address(SpecError::RelativePath(path.get_ref().into())),
                ),
                Err(e) => self.push(path.span(), "control.path".into(), ProblemKind::Address(e)),
            }
        }
        out.mode = c.mode.as_ref().and_then(|m| self.mode(m, "control.mode"));
        out.owner = c.owner.as_ref().and_then(|u| self.user(u, "control.owner"));
        out.group = c.group.as_ref().and_then(|g| self.group(g, "control.group"));
        out
    }

    fn mode(&mut self, m: &Spanned<String>, key: &str) -> Option<u32> {
        let text = m.get_ref();
        match u32::from_str_radix(text, 8) {
            Ok(mode) if mode <= 0o7777 && !text.is_empty() => Some(mode),
            _ => {
                self.push(m.span(), key.into(), ProblemKind::BadMode(text.clone()));
                None
            }
        }
    }

    fn user(&mut self, u: &Spanned<String>, key: &str) -> Option<u32> {
        let by_name = |name: &str| Some(nix::unistd::User::from_name(name).ok()??.uid.as_raw());
        self.id(u, key, by_name, ProblemKind::UnknownUser)
    }

    fn group(&mut self, g: &Spanned<String>, key: &str) -> Option<u32> {
        let by_name = |name: &str| Some(nix::unistd::Group::from_name(name).ok()??.gid.as_raw());
        self.id(g, key, by_name, ProblemKind::UnknownGroup)
    }

    /// A uid or gid: a number as written, else the name looked up in the
    /// user or group database; a name it does not know is a problem.
    fn id(
        &mut self,
        value: &Spanned<String>,
        key: &str,
        by_name: impl Fn(&str) -> Option<u32>,
        unknown: fn(String) -> ProblemKind,
    ) -> Option<u32> {
        let name = value.get_ref();
        let id = name.parse::<u32>().ok().or_else(|| by_name(name));
        if id.is_none() {
            self.push(value.span(), key.into(), unknown(name.clone()));
        }
        id
    }

    fn int(&mut self, value: &Option<Spanned<i64>>, key: String, min: i64, max: i64) -> Option<u32> {
        let v = value.as_ref()?;
        let n = *v.get_ref();
        if (min..=max).contains(&n) {
            u32::try_from(n).ok()
        } else {
            self.push(v.span(), key, ProblemKind::Range { value: n, min, max });
            None
        }
    }

    fn socket_options(&mut self, i: usize, s: &SocketFile, key: &SocketKey) -> SocketOptions {
        let at = |k: &str| format!("socket[{i}].{k}");
        let (tcp, udp, v6, unix_path) = match key {
            SocketKey::Inet { transport, addr } => {
                (*transport == Transport::Tcp, *transport == Transport::Udp, addr.is_ipv6(), false)
            }
            SocketKey::Unix { address, .. } => (false, false, false, matches!(address, UnixAddress::Path(_))),
        };
        let inet = tcp || udp;
        // Options that do not fit the socket are errors, not silently ignored:
        // someone expected them to do something.
        let fits = |v: &mut Self, span: Option<Range<usize>>, name: &str, ok: bool, applies: &'static str| {
            if let (Some(span), false) = (span, ok) {
                v.push(span, at(name), ProblemKind::NotApplicable { applies, key: key.clone() });
            }
        };
        let b = |x: &Option<Spanned<bool>>| x.as_ref().map(|v| *v.get_ref());
        let sp_b = |x: &Option<Spanned<bool>>| x.as_ref().map(Spanned::span);
        let sp_i = |x: &Option<Spanned<i64>>| x.as_ref().map(Spanned::span);
        let sp_s = |x: &Option<Spanned<String>>| x.as_ref().map(Spanned::span);
        let listening = key.is_listening_kind();
        fits(self, sp_i(&s.backlog), "backlog", listening, "listening (tcp, unix, unix-seqpacket)");
        for (name, x) in [
            ("reuse_addr", &s.reuse_addr),
            ("reuse_port", &s.reuse_port),
            ("freebind", &s.freebind),
            ("transparent", &s.transparent),
        ] {
            fits(self, sp_b(x), name, inet, "tcp and udp");
        }
        fits(self, sp_b(&s.ipv6_only), "ipv6_only", v6, "IPv6");
        fits(self, sp_s(&s.bind_to_device), "bind_to_device", inet, "tcp and udp");
        for (name, x) in [("keepalive", &s.keepalive), ("no_delay", &s.no_delay)] {
            fits(self, sp_b(x), name, tcp, "tcp");
        }
        for (name, x) in [
            ("defer_accept", &s.defer_accept),
            ("fast_open", &s.fast_open),
            ("keepalive_idle", &s.keepalive_idle),
            ("keepalive_interval", &s.keepalive_interval),
            ("keepalive_count", &s.keepalive_count),
        ] {
            fits(self, sp_i(x), name, tcp, "tcp");
        }
        fits(self, sp_i(&s.mark), "mark", inet, "tcp and udp");
        fits(self, sp_b(&s.broadcast), "broadcast", udp, "udp");
        for (name, x) in [("mode", &s.mode), ("user", &s.user), ("group", &s.group)] {
            fits(self, sp_s(x), name, unix_path, "UNIX path (not @abstract)");
        }

        let defaults = SocketOptions::default();
        let max = i64::from(i32::MAX);
        let bind_to_device = s.bind_to_device.as_ref().and_then(|d| {
            let name = d.get_ref();
            let ok =
                (1..=15).contains(&name.len()) && name.bytes().all(|c| c.is_ascii_graphic() && c != b'/' && c != b':');
            if !ok {
                self.push(d.span(), at("bind_to_device"), ProblemKind::BadInterface(name.clone()));
            }
            ok.then(|| name.clone())
        });
        SocketOptions {
            backlog: self.int(&s.backlog, at("backlog"), 1, max).unwrap_or(defaults.backlog),
            reuse_addr: b(&s.reuse_addr),
            reuse_port: b(&s.reuse_port).unwrap_or(false),
            ipv6_only: b(&s.ipv6_only),
            freebind: b(&s.freebind).unwrap_or(false),
            transparent: b(&s.transparent).unwrap_or(false),
            bind_to_device,
            defer_accept: self.int(&s.defer_accept, at("defer_accept"), 0, max),
            fast_open: self.int(&s.fast_open, at("fast_open"), 0, max),
            keepalive: b(&s.keepalive).unwrap_or(false),
            keepalive_idle: self.int(&s.keepalive_idle, at("keepalive_idle"), 1, 32767),
            keepalive_interval: self.int(&s.keepalive_interval, at("keepalive_interval"), 1, 32767),
            keepalive_count: self.int(&s.keepalive_count, at("keepalive_count"), 1, 127),
            no_delay: b(&s.no_delay).unwrap_or(false),
            receive_buffer: self.int(&s.receive_buffer, at("receive_buffer"), 1, max / 2),
            send_buffer: self.int(&s.send_buffer, at("send_buffer"), 1, max / 2),
            mark: self.int(&s.mark, at("mark"), 0, i64::from(u32::MAX)),
            broadcast: b(&s.broadcast).unwrap_or(false),
            mode: s.mode.as_ref().and_then(|m| self.mode(m, &at("mode"))),
            user: s.user.as_ref().and_then(|u| self.user(u, &at("user"))),
            group: s.group.as_ref().and_then(|g| self.group(g, &at("group"))),
        }
    }

    fn rule(&mut self, i: usize, a: &AllowFile) -> Option<Rule> {
        let at = |k: &str| format!("allow[{i}].{k}");
        let mut who = Vec::new();
        let mut first_span = None;
        let mut note = |span: Range<usize>| {
            first_span.get_or_insert(span);
        };
        if let Some(x) = &a.anyone {
            note(x.span());
            if *x.get_ref() {
                who.push(Some(Who::Anyone));
            }
        }
        if let Some(u) = &a.user {
            note(u.span());
            who.push(self.user(u, &at("user")).map(Who::Uid));
        }
        if let Some(u) = &a.uid {
            note(u.span());
            who.push(self.int(&a.uid, at("uid"), 0, i64::from(u32::MAX)).map(Who::Uid));
        }
        if let Some(g) = &a.group {
            note(g.span());
            who.push(self.group(g, &at("group")).map(Who::Gid));
        }
        if let Some(g) = &a.gid {
            note(g.span());
            who.push(self.int(&a.gid, at("gid"), 0, i64::from(u32::MAX)).map(Who::Gid));
        }
        // A rule without any who-key has no span of its own; point at its grants.
        let span = first_span
            .or_else(|| a.sockets.first().map(Spanned::span))
            .or_else(|| a.on_demand.first().map(Spanned::span))
            .unwrap_or(0..0);
        if who.len() != 1 {
            self.push(span.clone(), format!("allow[{i}]"), ProblemKind::Who);
        }
        let introspect = a.introspect.as_ref().is_some_and(|x| *x.get_ref());
        if a.sockets.is_empty() && a.on_demand.is_empty() && !introspect {
            self.push(span.clone(), format!("allow[{i}]"), ProblemKind::Grants);
        }
        let mut sockets = Vec::new();
        for (j, s) in a.sockets.iter().enumerate() {
            if s.get_ref() == "*" || valid_name(s.get_ref()) {
                sockets.push(s.get_ref().clone());
            } else {
                self.push(s.span(), format!("allow[{i}].sockets[{j}]"), ProblemKind::BadName(s.get_ref().clone()));
            }
        }
        let mut on_demand = Vec::new();
        for (j, p) in a.on_demand.iter().enumerate() {
            match p.get_ref().parse::<AddressPattern>() {
                Ok(p) => on_demand.push(p),
                Err(e) => self.push(p.span(), format!("allow[{i}].on_demand[{j}]"), ProblemKind::Pattern(e)),
            }
        }
        let unix_file = UnixFile {
            owner: a.socket_owner.as_ref().and_then(|u| self.user(u, &at("socket_owner"))),
            group: a.socket_group.as_ref().and_then(|g| self.group(g, &at("socket_group"))),
            mode: a.socket_mode.as_ref().and_then(|m| self.mode(m, &at("socket_mode"))),
        };
        let who = who.into_iter().next().flatten()?;
        let source = format!("{}:{}", self.origin, self.line(span.start));
        Some(Rule { who, sockets, on_demand, introspect, unix_file, source })
    }

    fn limits(&mut self, l: &LimitsFile) -> Limits {
        let d = Limits::default();
        let max = i64::from(i32::MAX);
        let mut n = |v: &Option<Spanned<i64>>, key: &str, min: i64, default: usize| {
            self.int(v, format!("limits.{key}"), min, max).map_or(default, |x| x as usize)
        };
        let mut out = Limits {
            max_clients: n(&l.max_clients, "max_clients", 1, d.max_clients),
            reserved_clients: n(&l.reserved_clients, "reserved_clients", 0, d.reserved_clients),
            max_clients_per_uid: n(&l.max_clients_per_uid, "max_clients_per_uid", 1, d.max_clients_per_uid),
            max_request_bytes: n(&l.max_request_bytes, "max_request_bytes", 1024, d.max_request_bytes),
            max_batch: n(&l.max_batch, "max_batch", 1, d.max_batch),
            max_fds_in_flight_per_connection: n(
                &l.max_fds_in_flight_per_connection,
                "max_fds_in_flight_per_connection",
                1,
                d.max_fds_in_flight_per_connection,
            ),
            max_fds_in_flight_per_uid: n(
                &l.max_fds_in_flight_per_uid,
                "max_fds_in_flight_per_uid",
                1,
                d.max_fds_in_flight_per_uid,
            ),
            max_queued_bytes_per_connection: n(
                &l.max_queued_bytes_per_connection,
                "max_queued_bytes_per_connection",
                1,
                d.max_queued_bytes_per_connection,
            ),
            max_queued_bytes: n(&l.max_queued_bytes, "max_queued_bytes", 1, d.max_queued_bytes),
            list_page_max: n(&l.list_page_max, "list_page_max", 1, d.list_page_max),
            log_burst: n(&l.log_burst, "log_burst", 1, d.log_burst as usize) as u32,
            log_per_minute: n(&l.log_per_minute, "log_per_minute", 1, d.log_per_minute as usize) as u32,
            ..d
        };
        for (value, key, slot) in [
            (&l.idle_timeout, "idle_timeout", &mut out.idle_timeout),
            (&l.request_timeout, "request_timeout", &mut out.request_timeout),
            (&l.unread_timeout, "unread_timeout", &mut out.unread_timeout),
            (&l.metrics_interval, "metrics_interval", &mut out.metrics_interval),
        ] {
            if let Some(v) = value {
                match crate::time::parse_duration(v.get_ref()) {
                    Ok(t) if !t.is_zero() => *slot = t,
                    Ok(_) => {
                        self.push(v.span(), format!("limits.{key}"), ProblemKind::BadDuration("must not be 0".into()))
                    }
                    Err(e) => self.push(v.span(), format!("limits.{key}"), ProblemKind::BadDuration(e)),
                }
            }
        }
        if out.reserved_clients >= out.max_clients {
            if let Some(v) = &l.reserved_clients {
                self.push(
                    v.span(),
                    "limits.reserved_clients".into(),
                    ProblemKind::Range { value: *v.get_ref(), min: 0, max: out.max_clients as i64 - 1 },
                );
            } else {
                out.reserved_clients = out.max_clients / 2;
            }
        }
        out
    }
}
