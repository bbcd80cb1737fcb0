//! `--socket` arguments of `exec` and `run`: `SPEC`, `NAME` or `NAME=SPEC`,
//! each what to ask the broker for and the socket's `LISTEN_FDNAMES` entry.

use std::fmt;
use std::str::FromStr;

use crate::spec::{SocketSpec, SpecError};
use crate::systemd::listen::fdname_is_valid;

/// Where a socket handed to the child comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketSource {
    /// A socket spec: the broker finds or creates it.
    Spec(SocketSpec),
    /// A name the broker already holds a socket under.
    Name(String),
}

/// One `--socket` argument: `SPEC`, `NAME` or `NAME=SPEC`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketArg {
    /// What to ask the broker for.
    pub source: SocketSource,
    /// The name in `LISTEN_FDNAMES`; a bare spec has none
    /// ([`crate::systemd::listen::UNNAMED`]).
    pub fdname: Option<String>,
}

/// Why a `--socket` argument or a descriptor name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocketArgError {
    /// The spec part does not parse.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The name is not a valid `LISTEN_FDNAMES` entry.
    #[error("'{0}': not a valid descriptor name (1-255 printable ASCII characters, no ':')")]
    FdName(String),
}

/// Checks a `--socket` name, its `LISTEN_FDNAMES` entry: not empty (an
/// empty entry means "unnamed") and valid for systemd
/// ([`fdname_is_valid`]: 1 to 255 printable ASCII characters, no `:`).
pub fn validate_fdname(name: &str) -> Result<(), SocketArgError> {
    if !name.is_empty() && fdname_is_valid(name) {
        Ok(())
    } else {
        Err(SocketArgError::FdName(name.to_string()))
    }
}

impl FromStr for SocketArg {
    type Err = SocketArgError;

    /// `NAME=SPEC` names a spec; text with a `:` is a spec; anything else is
    /// the name of a socket the broker holds (and its `LISTEN_FDNAMES` entry).
    fn from_str(text: &str) -> Result<Self, SocketArgError> {
        // A spec may contain '=' (unix:/a=b) but a name never contains ':',
        // so "NAME=" is only a name when the part before '=' has no ':'.
        if let Some((name, spec)) = text.split_once('=').filter(|(name, _)| !name.contains(':')) {
            validate_fdname(name)?;
            return Ok(SocketArg { source: SocketSource::Spec(spec.parse()?), fdname: Some(name.to_string()) });
        }
        if text.contains(':') {
            return Ok(SocketArg { source: SocketSource::Spec(text.parse()?), fdname: None });
        }
        validate_fdname(text)?;
        Ok(SocketArg { source: SocketSource::Name(text.to_string()), fdname: Some(text.to_string()) })
    }
}

impl fmt::Display for SocketArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.source, &self.fdname) {
            (SocketSource::Spec(spec), Some(name)) => write!(f, "{name}={spec}"),
            (SocketSource::Spec(spec), None) => write!(f, "{spec}"),
            (SocketSource::Name(name), _) => write!(f, "socket named '{name}'"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::systemd::listen::FDNAME_MAX;

    #[test]
    fn socket_args() {
        let a: SocketArg = "web=tcp://127.0.0.1:80".parse().unwrap();
        assert_eq!(a.fdname.as_deref(), Some("web"));
        assert!(matches!(a.source, SocketSource::Spec(_)));
        assert_eq!(a.to_string(), "web=tcp://127.0.0.1:80");

        let b: SocketArg = "unix:/run/a=b.sock".parse().unwrap();
        assert_eq!(b.fdname, None);
        assert_eq!(b.to_string(), "unix:/run/a=b.sock");

        let c: SocketArg = "admin".parse().unwrap();
        assert_eq!(c.source, SocketSource::Name("admin".into()));
        assert_eq!(c.fdname.as_deref(), Some("admin"));

        assert!(matches!("tcp://127.0.0.1:0".parse::<SocketArg>(), Err(SocketArgError::Spec(_))));
        assert!(matches!("bad\tname".parse::<SocketArg>(), Err(SocketArgError::FdName(_))));
        assert!(matches!("=tcp://127.0.0.1:80".parse::<SocketArg>(), Err(SocketArgError::FdName(_))));
        assert!(validate_fdname(&"x".repeat(FDNAME_MAX)).is_ok());
        assert!(validate_fdname(&"x".repeat(FDNAME_MAX + 1)).is_err());
    }
}
