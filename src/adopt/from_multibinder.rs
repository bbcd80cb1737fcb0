//! Copying sockets out of a running multibinder (`sockbroker adopt
//! --multibinder SOCK --from-templates …`, no privilege needed): every
//! `bind_tcp(...)` of the templates is asked for through multibinder's own
//! `bind` method, and each answer checked to be the socket asked for.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use super::{AdoptError, Copied, TemplateIoError};
use crate::client::Client;
use crate::haproxy::template::{BindRequest, Template};
use crate::protocol::bind::BindParams;
use crate::socket::{self, InspectError};
use crate::spec::SocketKey;

/// Copies the sockets of every `bind_tcp(...)` call in `templates` out of
/// the multibinder serving on `sock`, through its own `bind` method (what
/// its HAProxy renderer does): the same kernel sockets, no privilege needed.
pub fn copy_from_multibinder(sock: &Path, templates: &[PathBuf]) -> Result<Vec<Copied>, AdoptError> {
    let mut keys: Vec<(SocketKey, u32)> = Vec::new();
    for path in templates {
        let terr = |source: TemplateIoError| AdoptError::Template { path: path.clone(), source };
        let text = std::fs::read_to_string(path).map_err(|e| terr(e.into()))?;
        let template = Template::parse(&text).map_err(|e| terr(e.into()))?;
        for (request, _) in template.binds() {
            if let (BindRequest::Tcp { .. }, Some(spec)) = (request, request.spec()) {
                if !keys.iter().any(|(k, _)| *k == spec.key) {
                    keys.push((spec.key, spec.options.backlog));
                }
            }
        }
    }
    if keys.is_empty() {
        return Err(AdoptError::NoBinds);
    }
    let mut client = Client::connect(sock)?;
    let mut out = Vec::with_capacity(keys.len());
    for (key, backlog) in keys {
        let SocketKey::Inet { addr, .. } = &key else { continue };
        // multibinder's own request, byte for byte the fields its client sends.
        let params = BindParams {
            address: Some(addr.ip().to_string()),
            port: Some(i64::from(addr.port())),
            backlog: Some(i64::from(backlog)),
            ..BindParams::default()
        };
        let (_, fds) = client.call("bind", params.to_json())?;
        let fd = fds.into_iter().next().ok_or_else(|| AdoptError::NoDescriptor(key.clone()))?;
        let from = || format!("multibinder {}", sock.display());
        let got = socket::inspect(fd.as_fd()).map_err(|source| AdoptError::Inspect { from: from(), source })?;
        if got != key {
            let source = InspectError::Unsupported(format!("it answered {key} with {got}"));
            return Err(AdoptError::Inspect { from: from(), source });
        }
        out.push(Copied { fd, key, from: format!("multibinder {}", sock.display()), name: None });
    }
    Ok(out)
}
