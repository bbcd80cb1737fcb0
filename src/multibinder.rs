//! multibinder's hand-over convention, outside its wire format: a process
//! (multibinder itself, or a wrapper speaking its convention) passes
//! sockets in `MULTIBINDER_BIND__tcp__<address>__<port>=<fd>` variables;
//! the broker adopts them at start ([`adopt_multibinder_env`], called by
//! [`crate::broker`] when no upgrade state was carried in) and removes the
//! variables. The wire protocol is [`crate::protocol`]; copying sockets out
//! of a running multibinder is [`crate::adopt`].

use std::os::fd::{AsFd, RawFd};

use crate::fd;
use crate::registry::{Origin, Registry};
use crate::spec::{SocketKey, SocketSpec, Transport};

/// multibinder's variables: `MULTIBINDER_BIND__tcp__<address>__<port>=<fd>`.
pub const MULTIBINDER_BIND_PREFIX: &str = "MULTIBINDER_BIND__";

/// Parses one of multibinder's variables,
/// `MULTIBINDER_BIND__tcp__<address>__<port>=<fd>`. multibinder wrote the
/// address with its first '.' replaced by '_', so both forms are read.
/// `None` when the name is not one of them.
pub fn parse_multibinder_var(name: &str, value: &str) -> Option<Result<(SocketKey, RawFd), String>> {
    let rest = name.strip_prefix(MULTIBINDER_BIND_PREFIX)?;
    let parse = || -> Result<(SocketKey, RawFd), String> {
        let mut parts = rest.splitn(3, "__");
        let (Some("tcp"), Some(address), Some(port)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("{name}: expected {MULTIBINDER_BIND_PREFIX}tcp__ADDRESS__PORT"));
        };
        let port: i64 = port.parse().map_err(|_| format!("{name}: '{port}' is not a port"))?;
        let key = SocketKey::inet_parts(Transport::Tcp, address, port)
            .or_else(|_| SocketKey::inet_parts(Transport::Tcp, &address.replace('_', "."), port))
            .map_err(|e| format!("{name}: {e}"))?;
        let fd: RawFd = value.trim().parse().map_err(|_| format!("{name}={value}: not a descriptor number"))?;
        Ok((key, fd))
    };
    Some(parse())
}

/// Adopts the sockets a multibinder process (or a wrapper speaking its
/// convention) handed over in `MULTIBINDER_BIND__…` variables, and removes the
/// variables. A bad variable is logged and skipped: it must not stop the
/// broker from serving the others.
pub fn adopt_multibinder_env(registry: &mut Registry) {
    let vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with(MULTIBINDER_BIND_PREFIX))
        .collect();
    for (name, value) in vars {
        std::env::remove_var(&name);
        let adopted = parse_multibinder_var(&name, &value).expect("filtered on the prefix").and_then(|(key, raw)| {
            let fd = fd::take_inherited(&[raw]).map_err(|e| e.to_string())?.pop().expect("one asked, one taken");
            if !fd::is_socket(fd.as_fd()).unwrap_or(false) {
                return Err(format!("{name}: descriptor {raw} is not a socket"));
            }
            registry.adopt(fd, SocketSpec::new(key.clone()), None, Origin::Upgrade).map_err(|(_, e)| e.to_string())?;
            Ok(key)
        });
        match adopted {
            Ok(key) => log::info!("adopted {key} from multibinder's {name}"),
            Err(e) => log::warn!("not adopting {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multibinder_variables() {
        let (key, fd) = parse_multibinder_var("MULTIBINDER_BIND__tcp__127_0.0.1__8000", "5").unwrap().unwrap();
        assert_eq!((key.to_string(), fd), ("tcp://127.0.0.1:8000".to_string(), 5));
        let (key, _) = parse_multibinder_var("MULTIBINDER_BIND__tcp__0.0.0.0__80", "7").unwrap().unwrap();
        assert_eq!(key.to_string(), "tcp://0.0.0.0:80");
        let (key, _) = parse_multibinder_var("MULTIBINDER_BIND__tcp__::1__443", "7").unwrap().unwrap();
        assert_eq!(key.to_string(), "tcp://[::1]:443");
        assert!(parse_multibinder_var("PATH", "/bin").is_none());
        let err = parse_multibinder_var("MULTIBINDER_BIND__udp__1.2.3.4__53", "3").unwrap().unwrap_err();
        assert!(err.contains("expected"), "{err}");
        let err = parse_multibinder_var("MULTIBINDER_BIND__tcp__1.2.3.4__http", "3").unwrap().unwrap_err();
        assert!(err.contains("not a port"), "{err}");
        let err = parse_multibinder_var("MULTIBINDER_BIND__tcp__1.2.3.4__80", "three").unwrap().unwrap_err();
        assert!(err.contains("not a descriptor"), "{err}");
    }
}
