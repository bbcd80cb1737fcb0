//! The control protocol: JSON-RPC 2.0 over a UNIX stream socket, with
//! descriptors passed as SCM_RIGHTS on the reply.
//!
//! The multibinder part (method `bind` with `address`, `port`, `backlog`) is
//! kept byte for byte; sockbroker's additions live in the same `bind` params
//! (see [`bind`]). `docs/protocol.md` is the reference for users.
//!
//! Data flow: the server feeds bytes to a [`framing::Framer`], which yields
//! one JSON value per request; [`Request::from_value`] checks its shape and
//! [`Method::parse`] names the method once; the server dispatches on the
//! [`Method`] and answers with a [`Response`] (and, on
//! success only, the descriptor).

pub mod bind;
pub mod framing;
pub mod method;

pub use method::Method;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// JSON-RPC and sockbroker error codes.
pub mod code {
    /// The bytes are not JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// JSON, but not a request object (or too large).
    pub const INVALID_REQUEST: i64 = -32600;
    /// No such method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// The params are missing, of the wrong JSON type, or name an impossible socket.
    pub const INVALID_PARAMS: i64 = -32602;
    /// The broker could not create the socket (multibinder's code).
    pub const BIND_FAILED: i64 = 10000;
    /// A socket was asked for by a name the broker does not hold.
    pub const UNKNOWN_NAME: i64 = 10001;
    /// The allow rules do not give this peer this socket (or method).
    pub const ACCESS_DENIED: i64 = 10003;
    /// `release` of a socket that is not held, or not created on demand.
    pub const NOT_RELEASABLE: i64 = 10004;
    /// `reload` found the configuration invalid (or a declared socket could
    /// not be opened); the old configuration stays in force.
    pub const RELOAD_FAILED: i64 = 10005;
    /// A connection refused for a limit (per-uid connections, or the slots
    /// kept in reserve); the message names the limit.
    pub const TOO_MANY: i64 = 10006;
    /// `adopt` refused a descriptor: not a socket the broker can hold, or
    /// its key (or name) is held by a different socket. Nothing was adopted.
    pub const ADOPT_REFUSED: i64 = 10014;
    /// A `takeover` refused: the peer is neither root nor the broker's
    /// user, or replies are still pending on its connection (see
    /// docs/upgrades.md).
    pub const TAKEOVER_REFUSED: i64 = 10010;
}

/// The control method a new broker calls to take over (`serve --takeover`).
pub const TAKEOVER_METHOD: &str = Method::Takeover.name();
/// The method that confirms a takeover; the old broker exits once it answers.
pub const COMMIT_METHOD: &str = Method::TakeoverCommit.name();

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} (code {code})")]
pub struct RpcError {
    /// One of [`code`].
    pub code: i64,
    /// What went wrong, naming the socket.
    pub message: String,
}

impl RpcError {
    /// An error with a code and message.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError { code, message: message.into() }
    }
}

/// A request whose shape has been checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The id to echo; `null` when the client sent none.
    pub id: Value,
    /// The method name.
    pub method: String,
    /// The params; `null` when absent.
    pub params: Value,
}

impl Request {
    /// Checks that a JSON value is a request object. On failure returns the
    /// id (when one could be read) and an invalid-request error.
    pub fn from_value(value: Value) -> Result<Request, (Value, RpcError)> {
        let Value::Object(mut obj) = value else {
            return Err((Value::Null, RpcError::new(code::INVALID_REQUEST, "Invalid request: not a JSON object")));
        };
        let id = obj.remove("id").unwrap_or(Value::Null);
        let method = match obj.remove("method") {
            Some(Value::String(m)) => m,
            Some(_) => {
                return Err((id, RpcError::new(code::INVALID_REQUEST, "Invalid request: \"method\" must be a string")))
            }
            None => return Err((id, RpcError::new(code::INVALID_REQUEST, "Invalid request: no \"method\""))),
        };
        let params = obj.remove("params").unwrap_or(Value::Null);
        if !matches!(params, Value::Null | Value::Array(_) | Value::Object(_)) {
            return Err((
                id,
                RpcError::new(code::INVALID_REQUEST, "Invalid request: \"params\" must be an array or an object"),
            ));
        }
        Ok(Request { id, method, params })
    }

    /// The request as JSON text, for clients.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "jsonrpc": "2.0",
            "method": self.method,
            "params": self.params,
            "id": self.id,
        })
        .to_string()
    }
}

/// A JSON-RPC response: exactly one of `result` and `error` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Always "2.0".
    pub jsonrpc: String,
    /// The request's id.
    pub id: Value,
    /// The result, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The error, on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
}

impl Response {
    /// A success.
    pub fn ok(id: Value, result: Value) -> Self {
        Response { jsonrpc: "2.0".into(), id, result: Some(result), error: None }
    }

    /// A failure.
    pub fn err(id: Value, error: RpcError) -> Self {
        Response { jsonrpc: "2.0".into(), id, result: None, error: Some(error) }
    }

    /// The wire form: the JSON text and a newline (harmless to the reference
    /// client's `JSON.parse`, and a delimiter for line-oriented tools).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec(self).expect("a Response always serialises");
        bytes.push(b'\n');
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn checks_request_shape() {
        let r = Request::from_value(json!({"jsonrpc":"2.0","method":"bind","id":"x","params":[{}]})).unwrap();
        assert_eq!(r.method, "bind");
        assert_eq!(r.id, json!("x"));
        let (id, e) = Request::from_value(json!({"method": 3, "id": 7})).unwrap_err();
        assert_eq!((id, e.code), (json!(7), code::INVALID_REQUEST));
        assert_eq!(Request::from_value(json!([1])).unwrap_err().1.code, code::INVALID_REQUEST);
        assert_eq!(Request::from_value(json!({"method":"a","params":1})).unwrap_err().1.code, code::INVALID_REQUEST);
    }

    #[test]
    fn response_wire_form() {
        let ok = Response::ok(json!("id1"), json!(true));
        assert_eq!(ok.to_bytes(), b"{\"jsonrpc\":\"2.0\",\"id\":\"id1\",\"result\":true}\n");
        let err = Response::err(json!(null), RpcError::new(code::METHOD_NOT_FOUND, "Method not found"));
        let text = String::from_utf8(err.to_bytes()).unwrap();
        assert!(text.contains("\"error\":{\"code\":-32601"), "{text}");
        assert!(!text.contains("result"));
    }
}
