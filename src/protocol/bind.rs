//! The params of method `bind`: multibinder's, and sockbroker's additions.
//!
//! multibinder sends `[{"address": "127.0.0.1", "port": 80, "backlog": 1000}]`.
//! sockbroker also takes, in the same object:
//! - `"type"`: `"tcp"` (default), `"udp"`, `"unix"`, `"unix-dgram"` or
//!   `"unix-seqpacket"`; UNIX types take `"path"` (absolute, or `@name` for
//!   the abstract namespace) instead of address and port;
//! - `"name"`: a socket the broker holds under that name;
//! - `"spec"`: the socket in its text form, `"tcp://[::1]:80"`.
//!
//! Unknown keys are ignored, as the reference server does. Params may be the
//! object itself or an array whose first element is the object.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::spec::{SocketKey, SocketSpec, SpecError, Transport, UnixKind};

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindTarget {
    /// A socket held under a name.
    Name(String),
    /// A socket by its key, created on demand with these options.
    Spec(SocketSpec),
}

/// The `bind` params as they travel on the wire.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BindParams {
    /// Socket type; `tcp` when absent.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// IP literal, for tcp and udp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Port, for tcp and udp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    /// Listen backlog for a socket created by this request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<i64>,
    /// UNIX path or `@abstract` name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Name of a held socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The socket in text form (`tcp://127.0.0.1:80`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<String>,
}

/// Why `bind` params were refused.
#[derive(Debug, thiserror::Error)]
pub enum ParamError {
    /// Params missing or not an object.
    #[error("bind takes an object, or an array holding one, as params")]
    NotAnObject,
    /// A key has the wrong JSON type.
    #[error("\"{key}\": {source}")]
    Shape {
        /// The offending key.
        key: String,
        /// serde's description of the mismatch.
        #[source]
        source: serde_json::Error,
    },
    /// A required key is missing.
    #[error("{kind} socket needs \"{key}\"")]
    Missing {
        /// The socket type.
        kind: String,
        /// The missing key.
        key: &'static str,
    },
    /// An unknown `type`.
    #[error("unknown socket type '{0}' (tcp, udp, unix, unix-dgram, unix-seqpacket)")]
    UnknownType(String),
    /// The address, port or path is impossible.
    #[error("{0}")]
    Spec(#[from] SpecError),
    /// A backlog outside 1..=2^31-1.
    #[error("backlog {0} is out of range (1-2147483647)")]
    Backlog(i64),
}

impl BindParams {
    /// Params that ask for a socket by key, with its options.
    pub fn from_spec(spec: &SocketSpec) -> Self {
        BindParams {
            spec: Some(spec.key.to_string()),
            backlog: Some(i64::from(spec.options.backlog)),
            ..BindParams::default()
        }
    }

    /// Params that ask for a socket by name.
    pub fn from_name(name: &str) -> Self {
        BindParams { name: Some(name.to_string()), ..BindParams::default() }
    }

    /// Reads params as multibinder sends them (`[{…}]`) or as a bare object.
    pub fn from_json(params: &Value) -> Result<Self, ParamError> {
        let obj = match params {
            Value::Array(items) => items.first().ok_or(ParamError::NotAnObject)?,
            Value::Object(_) => params,
            _ => return Err(ParamError::NotAnObject),
        };
        if !obj.is_object() {
            return Err(ParamError::NotAnObject);
        }
        BindParams::deserialize(obj).map_err(|source| {
            // serde's message ("invalid type: string \"80\", expected i64")
            // does not say which key is wrong: find it by trying each alone.
            let key = obj
                .as_object()
                .into_iter()
                .flatten()
                .find(|(k, v)| BindParams::deserialize(serde_json::json!({ k.as_str(): v })).is_err())
                .map_or_else(|| "params".to_string(), |(k, _)| k.clone());
            ParamError::Shape { key, source }
        })
    }

    /// The params as `[{…}]`, the form multibinder uses.
    pub fn to_json(&self) -> Value {
        Value::Array(vec![serde_json::to_value(self).expect("BindParams always serialise")])
    }

    /// What the params ask for.
    pub fn target(&self) -> Result<BindTarget, ParamError> {
        if let Some(name) = &self.name {
            return Ok(BindTarget::Name(name.clone()));
        }
        let key = if let Some(text) = &self.spec {
            text.parse::<SocketKey>()?
        } else {
            let kind = self.kind.as_deref().unwrap_or("tcp");
            let missing = |key| ParamError::Missing { kind: kind.to_string(), key };
            let unix =
                |k| SocketKey::unix(k, self.path.as_deref().ok_or_else(|| missing("path"))?).map_err(ParamError::from);
            let inet = |t| {
                let address = self.address.as_deref().ok_or_else(|| missing("address"))?;
                let port = self.port.ok_or_else(|| missing("port"))?;
                SocketKey::inet_parts(t, address, port).map_err(ParamError::from)
            };
            match kind {
                "tcp" => inet(Transport::Tcp)?,
                "udp" => inet(Transport::Udp)?,
                "unix" => unix(UnixKind::Stream)?,
                "unix-dgram" => unix(UnixKind::Datagram)?,
                "unix-seqpacket" => unix(UnixKind::SeqPacket)?,
                other => return Err(ParamError::UnknownType(other.to_string())),
            }
        };
        let mut spec = SocketSpec::new(key);
        if let Some(backlog) = self.backlog {
            spec.options.backlog = u32::try_from(backlog)
                .ok()
                .filter(|b| (1..=i32::MAX as u32).contains(b))
                .ok_or(ParamError::Backlog(backlog))?;
        }
        Ok(BindTarget::Spec(spec))
    }

    /// A short description of what was asked, for error messages that must
    /// name the socket even when the params do not make one.
    pub fn describe(&self) -> String {
        if let Some(n) = &self.name {
            return format!("name '{n}'");
        }
        if let Some(s) = &self.spec {
            return s.clone();
        }
        let kind = self.kind.as_deref().unwrap_or("tcp");
        match (&self.path, &self.address, self.port) {
            (Some(p), _, _) => format!("{kind} {p}"),
            (None, Some(a), Some(port)) => format!("{kind} {a} port {port}"),
            (None, Some(a), None) => format!("{kind} {a}"),
            _ => kind.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn target(v: Value) -> Result<BindTarget, ParamError> {
        BindParams::from_json(&v)?.target()
    }

    #[test]
    fn multibinder_form() {
        let t = target(json!([{"address":"127.0.0.1","port":8000,"backlog":10240,"extra":1}])).unwrap();
        let BindTarget::Spec(spec) = t else { panic!() };
        assert_eq!(spec.key.to_string(), "tcp://127.0.0.1:8000");
        assert_eq!(spec.options.backlog, 10240);
    }

    #[test]
    fn extensions() {
        let t = |v| match target(v).unwrap() {
            BindTarget::Spec(s) => s.key.to_string(),
            BindTarget::Name(n) => format!("name:{n}"),
        };
        assert_eq!(t(json!({"type":"udp","address":"::","port":53})), "udp://[::]:53");
        assert_eq!(t(json!([{"type":"unix","path":"@x"}])), "unix:@x");
        assert_eq!(t(json!([{"name":"http"}])), "name:http");
        assert_eq!(t(json!([{"spec":"unix-dgram:/run/d"}])), "unix-dgram:/run/d");
    }

    #[test]
    fn refusals_name_the_problem() {
        let e = |v| target(v).unwrap_err().to_string();
        assert!(e(json!([{"address":"127.0.0.1","port":70000}])).contains("70000"));
        assert!(e(json!([{"address":"127.0.0.1","port":0}])).contains("port 0"));
        assert!(e(json!([{"address":"nope","port":80}])).contains("'nope'"));
        assert!(e(json!([{"address":"127.0.0.1","port":"80"}])).starts_with("\"port\": invalid type"));
        assert!(e(json!({"address":1,"port":80})).starts_with("\"address\": invalid type"));
        assert!(e(json!([{"type":"unix","path":"rel/x"}])).contains("absolute"));
        assert!(e(json!([{"address":"127.0.0.1"}])).contains("\"port\""));
        assert!(e(json!([{"type":"sctp","address":"127.0.0.1","port":1}])).contains("sctp"));
        assert!(e(json!([{"address":"127.0.0.1","port":1,"backlog":-1}])).contains("backlog"));
        assert!(e(json!(["x"])).contains("object"));
        assert!(e(json!(null)).contains("object"));
    }

    #[test]
    fn client_form_round_trips() {
        let spec: SocketSpec = "tcp://[::1]:8080".parse().unwrap();
        let params = BindParams::from_spec(&spec);
        assert_eq!(target(params.to_json()).unwrap(), BindTarget::Spec(spec));
    }
}
