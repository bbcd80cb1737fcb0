//! The control methods, typed: a request's `method` string is parsed once
//! into a [`Method`] ([`Method::parse`]), and the server's service, its
//! per-turn costs and the client all match on the enum, never on the text.
//! An unknown name is the method-not-found error, with its code.

use super::{code, RpcError};

/// A control method of the broker. `docs/control.md` describes each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// One socket (multibinder's method).
    Bind,
    /// Many sockets in one round trip.
    BindMany,
    /// Close the broker's copy of an on-demand socket.
    Release,
    /// One page of the held sockets.
    List,
    /// The broker's counters.
    Status,
    /// Re-read the configuration.
    Reload,
    /// The broker's metrics in the Prometheus text format.
    Metrics,
    /// Take sockets copied out of another process (descriptors attached).
    Adopt,
    /// A new broker asks for everything (`serve --takeover`).
    Takeover,
    /// The new broker confirms a takeover; the old one exits once it answers.
    TakeoverCommit,
}

impl Method {
    /// Every method, for tables and tests.
    pub const ALL: [Method; 10] = [
        Method::Bind,
        Method::BindMany,
        Method::Release,
        Method::List,
        Method::Status,
        Method::Reload,
        Method::Metrics,
        Method::Adopt,
        Method::Takeover,
        Method::TakeoverCommit,
    ];

    /// The method's name on the wire.
    pub const fn name(self) -> &'static str {
        match self {
            Method::Bind => "bind",
            Method::BindMany => "bind_many",
            Method::Release => "release",
            Method::List => "list",
            Method::Status => "status",
            Method::Reload => "reload",
            Method::Metrics => "metrics",
            Method::Adopt => "adopt",
            Method::Takeover => "takeover",
            Method::TakeoverCommit => "takeover-commit",
        }
    }

    /// The method a request names, or the method-not-found error
    /// (`-32601`, naming it).
    pub fn parse(name: &str) -> Result<Method, RpcError> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| RpcError::new(code::METHOD_NOT_FOUND, format!("Method not found: {name}")))
    }

    /// Whether asking twice has the effect of asking once, so a client may
    /// send it again when the connection broke before the reply.
    pub fn idempotent(self) -> bool {
        matches!(self, Method::Bind)
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_is_method_not_found() {
        for m in Method::ALL {
            assert_eq!(Method::parse(m.name()).unwrap(), m);
        }
        let e = Method::parse("frobnicate").unwrap_err();
        assert_eq!(e.code, code::METHOD_NOT_FOUND);
        assert!(e.message.contains("frobnicate"), "{e}");
        assert!(Method::parse("Bind").is_err(), "names are case-sensitive");
    }
}
