//! Putting a configuration into force: at start, on SIGHUP and on the
//! `reload` control method.
//!
//! [`Live`] is the configuration in force: where it was read from, the
//! validated [`Config`] and the access [`Policy`] built from it. [`apply`]
//! moves the registry from one configuration to the next in two stages:
//!
//! 1. **Prepare**, touching nothing: every newly declared address is opened
//!    (with its options) and every name is checked against the sockets held
//!    under names from elsewhere (systemd). Any failure drops what was
//!    opened and leaves the broker exactly as it was.
//! 2. **Commit**, which cannot fail: sockets declared before but not now are
//!    released (the broker closes its copy; processes that received the
//!    socket keep theirs and go on accepting), names move to their new
//!    sockets, an on-demand socket that is now declared becomes a declared
//!    one, and the new sockets are registered under name and key. Rules take
//!    effect with the next request.
//!
//! [`reload`] re-reads the source first: an invalid file changes nothing,
//! and the reason goes to the log and to systemd's STATUS. Sockets from
//! systemd (`Origin::Systemd`) belong to their `.socket` unit and are never
//! closed by a reload. Options of a socket that stays declared at the same
//! address are not re-applied: the kernel socket is kept as it is, and a
//! warning says so.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::time::SystemTime;

use crate::acl::Policy;
use crate::config::{Config, ConfigError, Declared, Source};
use crate::registry::{AdoptConflict, Origin, Registry};
use crate::socket::{self, OpenError};
use crate::spec::SocketKey;
use crate::systemd::notify;

/// The configuration in force.
#[derive(Debug, Clone)]
pub struct Live {
    /// Where it is (re-)read from.
    pub source: Source,
    /// The validated configuration.
    pub config: Config,
    /// The access rules built from it.
    pub policy: Policy,
    /// When it was put into force.
    pub loaded: SystemTime,
    /// Why the last reload failed, until one succeeds (for systemd STATUS
    /// and `status`).
    pub reload_error: Option<String>,
}

impl Live {
    /// A configuration read from `source`, not applied to anything yet.
    pub fn new(source: Source, config: Config) -> Live {
        let policy = Policy::new(config.rules.clone());
        Live { source, config, policy, loaded: SystemTime::now(), reload_error: None }
    }
}

impl Default for Live {
    /// The embedded default: no declared sockets, no rules.
    fn default() -> Self {
        Live::new(Source::Embedded, Config { origin: Source::Embedded.to_string(), ..Config::default() })
    }
}

/// What a configuration change did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Applied {
    /// Sockets opened for new declarations.
    pub opened: Vec<String>,
    /// Sockets no longer declared, closed by the broker.
    pub closed: Vec<String>,
    /// Declared sockets that were already held and are kept.
    pub kept: Vec<String>,
    /// Number of allow rules now in force.
    pub rules: usize,
}

/// Why a configuration could not be put into force; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The file is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A declared socket could not be opened.
    #[error("declared socket '{name}' ({declared_at}): {source}")]
    Open {
        /// Its name.
        name: String,
        /// Where it is declared.
        declared_at: String,
        /// Why.
        #[source]
        source: OpenError,
    },
    /// A declared name is held by another socket (from systemd).
    #[error("declared socket '{name}' ({declared_at}): {source}")]
    Conflict {
        /// Its name.
        name: String,
        /// Where it is declared.
        declared_at: String,
        /// The conflict.
        #[source]
        source: AdoptConflict,
    },
}

/// Moves `registry` from the sockets `old` declares to those `new` declares
/// (see the module doc). On error nothing has changed.
pub fn apply(registry: &mut Registry, old: &Config, new: &Config) -> Result<Applied, ApplyError> {
    let old_keys: HashSet<&SocketKey> = old.sockets.iter().map(|d| &d.spec.key).collect();
    let new_keys: HashSet<&SocketKey> = new.sockets.iter().map(|d| &d.spec.key).collect();
    let leaving = |key: &SocketKey, origin: Origin| {
        old_keys.contains(key) && !new_keys.contains(key) && origin != Origin::Systemd
    };

    // 1. Prepare.
    let mut staged: Vec<(&Declared, OwnedFd)> = Vec::new();
    for d in &new.sockets {
        if let Some(holder) = registry.named(&d.name) {
            let freed = old_keys.contains(holder.key()) || leaving(holder.key(), holder.origin);
            if holder.key() != &d.spec.key && !freed {
                return Err(ApplyError::Conflict {
                    name: d.name.clone(),
                    declared_at: d.source.clone(),
                    source: AdoptConflict::Name(d.name.clone()),
                });
            }
        }
        if registry.get(&d.spec.key).is_none() {
            let fd = socket::open(&d.spec).map_err(|source| ApplyError::Open {
                name: d.name.clone(),
                declared_at: d.source.clone(),
                source,
            })?;
            staged.push((d, fd));
        }
    }

    // 2. Commit. Nothing below can fail for a reason the checks above did not
    // rule out; a failure would be a bug, logged rather than half-applied.
    let mut applied = Applied { rules: new.rules.len(), ..Applied::default() };
    let held: Vec<(SocketKey, Origin)> = registry.iter().map(|h| (h.key().clone(), h.origin)).collect();
    for (key, origin) in &held {
        if leaving(key, *origin) {
            if let Some(released) = registry.release(key) {
                crate::systemd::fdstore::remove(&released, registry);
            }
            log::info!("{key}: no longer declared; closed the broker's copy (clients keep theirs)");
            applied.closed.push(key.to_string());
        } else if old_keys.contains(key) {
            // Names are re-assigned below from the new configuration.
            let _ = registry.set_name(key, None);
        }
    }
    let old_specs: HashMap<&SocketKey, &Declared> = old.sockets.iter().map(|d| (&d.spec.key, d)).collect();
    let staged_keys: HashSet<&SocketKey> = staged.iter().map(|(d, _)| &d.spec.key).collect();
    for d in new.sockets.iter().filter(|d| !staged_keys.contains(&d.spec.key)) {
        if let Some(held) = registry.get_mut(&d.spec.key) {
            if held.origin == Origin::OnDemand {
                held.origin = Origin::Config;
            }
            if old_specs.get(&d.spec.key).is_some_and(|o| o.spec.options != d.spec.options) || held.spec != d.spec {
                log::warn!(
                    "{} ('{}'): options changed; the held socket keeps its old ones (remove it, reload, add it back to apply them)",
                    d.spec.key,
                    d.name
                );
            }
        }
        if let Err(e) = registry.set_name(&d.spec.key, Some(d.name.clone())) {
            log::error!("{} ('{}'): could not name it: {e}", d.spec.key, d.name);
        }
        applied.kept.push(d.spec.key.to_string());
    }
    for (d, fd) in staged {
        match registry.adopt(fd, d.spec.clone(), Some(d.name.clone()), Origin::Config) {
            Ok(held) => {
                // Declared sockets survive a broker restart like on-demand ones.
                crate::systemd::fdstore::store(held);
                log::info!("{} ('{}'): opened, declared at {}", d.spec.key, d.name, d.source);
                applied.opened.push(d.spec.key.to_string());
            }
            Err((_, e)) => log::error!("{} ('{}'): could not register it: {e}", d.spec.key, d.name),
        }
    }
    Ok(applied)
}

/// Re-reads `live.source` and puts it into force. On any error the old
/// configuration stays, and the reason is logged and sent as systemd STATUS.
///
/// A broker started without any file looks again for
/// [`crate::config::SYSTEM_CONFIG`], so creating it and reloading works.
pub fn reload(live: &mut Live, registry: &mut Registry) -> Result<Applied, ApplyError> {
    notify::send(&reloading());
    let source = match &live.source {
        Source::Embedded => Source::resolve(None),
        file => file.clone(),
    };
    let result = source.load().map_err(ApplyError::from).and_then(|new| {
        let applied = apply(registry, &live.config, &new)?;
        if new.control != live.config.control {
            log::warn!("{}: [control] changed; it takes effect at the next start", new.origin);
        }
        *live = Live::new(source, new);
        Ok(applied)
    });
    match &result {
        Ok(a) => {
            log::info!(
                "reloaded {}: {} opened, {} closed, {} kept, {} rules",
                live.source,
                a.opened.len(),
                a.closed.len(),
                a.kept.len(),
                a.rules
            );
            notify::send(&[
                libsystemd::daemon::NotifyState::Ready,
                libsystemd::daemon::NotifyState::Status(format!("reloaded {}", live.source)),
            ]);
        }
        Err(e) => {
            let why = crate::error_chain(e);
            log::error!("reload failed, keeping the configuration in force: {why}");
            let first_line = why.lines().take(2).map(str::trim).collect::<Vec<_>>().join(" ");
            live.reload_error = Some(first_line.clone());
            notify::send(&[
                libsystemd::daemon::NotifyState::Ready,
                libsystemd::daemon::NotifyState::Status(format!("reload failed, old configuration kept: {first_line}")),
            ]);
        }
    }
    result
}

/// RELOADING=1 with MONOTONIC_USEC, which systemd (Type=notify-reload, v253+)
/// uses to tell this reload from an earlier one.
fn reloading() -> Vec<libsystemd::daemon::NotifyState> {
    use libsystemd::daemon::NotifyState;
    let mut states = vec![NotifyState::Reloading];
    if let Ok(now) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        let usec = now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1000;
        states.push(NotifyState::Other(format!("MONOTONIC_USEC={usec}")));
    }
    states
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn config(text: &str) -> Config {
        parse(text, "t.toml").unwrap()
    }

    #[test]
    fn a_name_held_by_systemd_is_a_conflict_and_nothing_changes() {
        let pid = std::process::id();
        let mut registry = Registry::new();
        let sys: crate::spec::SocketSpec = format!("unix:@sbt-unit-sys-{pid}").parse().unwrap();
        let fd = socket::open(&sys).unwrap();
        registry.adopt(fd, sys.clone(), Some("web".into()), Origin::Systemd).unwrap();
        let new = config(&format!(
            "[[socket]]\nname = \"other\"\nlisten = \"unix:@sbt-unit-a-{pid}\"\n\
             [[socket]]\nname = \"web\"\nlisten = \"unix:@sbt-unit-b-{pid}\"\n"
        ));
        let err = apply(&mut registry, &Config::default(), &new).unwrap_err();
        assert!(err.to_string().contains("declared socket 'web' (t.toml:5): the name 'web' is already taken"), "{err}");
        assert_eq!(registry.len(), 1, "the socket opened for 'other' was dropped again");
        assert_eq!(registry.named("web").unwrap().key(), &sys.key);
    }

    #[test]
    fn an_on_demand_socket_that_gets_declared_becomes_a_config_socket() {
        let pid = std::process::id();
        let mut registry = Registry::new();
        let spec: crate::spec::SocketSpec = format!("unix:@sbt-unit-od-{pid}").parse().unwrap();
        registry.get_or_open(&spec).unwrap();
        let declared = config(&format!("[[socket]]\nname = \"od\"\nlisten = \"{spec}\"\n"));
        let applied = apply(&mut registry, &Config::default(), &declared).unwrap();
        assert_eq!((applied.opened.len(), applied.kept.len()), (0, 1));
        assert_eq!(registry.named("od").unwrap().origin, Origin::Config);
        // Removing it again closes the broker's copy.
        let applied = apply(&mut registry, &declared, &Config::default()).unwrap();
        assert_eq!(applied.closed, [spec.to_string()]);
        assert!(registry.is_empty());
    }
}
