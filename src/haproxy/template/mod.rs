//! HAProxy config templates: find the bind calls, ask a resolver for each
//! one's replacement text, and put the result together.
//!
//! This module is pure: it reads template text and calls a closure; it opens
//! no socket and touches no file. [`super`] supplies the closure that asks the
//! broker for a descriptor and answers `fd@N`.
//!
//! Two syntaxes are understood, and may be mixed in one file:
//!
//! - **multibinder's ERB call**, exactly as existing `.cfg.erb` files write it:
//!   `<%= bind_tcp('0.0.0.0', 80) %>`, single or double quotes, any spacing,
//!   with or without parentheses, IPv6 literals (`'::'`, `'[::1]'`), the port
//!   as a number or a quoted number. `<%# … %>` is an ERB comment (renders
//!   nothing) and `<%%` a literal `<%`, as in ERB. Any other ERB code
//!   (`<% if … %>`, `<%= ENV['X'] %>`) is an error: it would need Ruby.
//! - **the native form** `{{ sockbroker "NAME-OR-SPEC" }}`: a name the broker
//!   declared (`"https"`) or a socket spec (`"tcp://[::]:443"`,
//!   `"udp://0.0.0.0:514"`, `"unix:/run/haproxy/admin.sock"`). A spec is
//!   recognised by its `:` (names never contain one). `{{ "{{" }}` writes a
//!   literal `{{`. HAProxy itself never uses `{{`, so nothing in a plain
//!   config is mistaken for a call.
//!
//! ```
//! use sockbroker::haproxy::template::{Template, BindRequest};
//! let t = Template::parse("bind <%= bind_tcp('0.0.0.0', 80) %>\nbind {{ sockbroker \"https\" }}\n").unwrap();
//! let out = t.render(|req, _| Ok::<_, std::io::Error>(match req {
//!     BindRequest::Tcp { .. } => "fd@3".to_string(),
//!     _ => "fd@4".to_string(),
//! })).unwrap();
//! assert_eq!(out, "bind fd@3\nbind fd@4\n");
//! ```
//!
//! Errors carry the line and column (1-based, in characters) of the opening
//! `<%` or `{{`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use crate::spec::{SocketKey, SocketSpec, SpecError, Transport};

mod calls;

use calls::{parse_erb, parse_native, Piece};

/// The listen backlog multibinder's renderer asked for on every `bind_tcp`
/// (`MultiBinder.bind ip, port, { :backlog => 10240 }`); kept so a migrated
/// template gets the same sockets.
pub const ERB_BACKLOG: u32 = 10240;

/// A position in the template, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Line number, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// What one call in the template asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindRequest {
    /// multibinder's `bind_tcp(ADDRESS, PORT)`.
    Tcp {
        /// The address literal.
        ip: IpAddr,
        /// The port.
        port: u16,
    },
    /// The native form with a socket spec.
    Spec(SocketSpec),
    /// The native form with the name of a socket the broker declared.
    Name(String),
}

impl BindRequest {
    /// The socket spec to ask the broker for, or `None` for a name.
    /// `bind_tcp` sockets get multibinder's backlog ([`ERB_BACKLOG`]).
    pub fn spec(&self) -> Option<SocketSpec> {
        match self {
            BindRequest::Tcp { ip, port } => {
                let key = SocketKey::Inet { transport: Transport::Tcp, addr: SocketAddr::new(*ip, *port) };
                let mut spec = SocketSpec::new(key);
                spec.options.backlog = ERB_BACKLOG;
                Some(spec)
            }
            BindRequest::Spec(spec) => Some(spec.clone()),
            BindRequest::Name(_) => None,
        }
    }
}

impl fmt::Display for BindRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BindRequest::Tcp { ip, port } => write!(f, "bind_tcp('{ip}', {port})"),
            BindRequest::Spec(spec) => write!(f, "{spec}"),
            BindRequest::Name(name) => write!(f, "socket named '{name}'"),
        }
    }
}

/// Why a template could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `<%` or `{{` without its closing `%>` or `}}`.
    #[error("{at}: '{opener}' is never closed with '{closer}'")]
    Unterminated {
        /// Where the opener is.
        at: Position,
        /// `<%` or `{{`.
        opener: &'static str,
        /// `%>` or `}}`.
        closer: &'static str,
    },
    /// ERB code other than `<%= bind_tcp(…) %>` and comments.
    #[error("{at}: unsupported ERB code {code}: only <%= bind_tcp('ADDRESS', PORT) %> and <%# comments %> are understood (write a literal '<%' as '<%%')")]
    UnsupportedErb {
        /// Where it starts.
        at: Position,
        /// The code between the delimiters.
        code: String,
    },
    /// A native block that is not `sockbroker "…"` or a string literal.
    #[error("{at}: unsupported template code {code}: expected {{{{ sockbroker \"NAME\" }}}} or {{{{ sockbroker \"SPEC\" }}}} (write a literal '{{{{' as {{{{ \"{{{{\" }}}})")]
    UnsupportedNative {
        /// Where it starts.
        at: Position,
        /// The code between the delimiters.
        code: String,
    },
    /// An address that is not an IP literal, or a port out of range.
    #[error("{at}: {call}: {source}")]
    BadSocket {
        /// Where the call starts.
        at: Position,
        /// The call as written.
        call: String,
        /// What is wrong.
        #[source]
        source: SpecError,
    },
}

impl TemplateError {
    /// Where in the template the problem is.
    pub fn position(&self) -> Position {
        match self {
            TemplateError::Unterminated { at, .. }
            | TemplateError::UnsupportedErb { at, .. }
            | TemplateError::UnsupportedNative { at, .. }
            | TemplateError::BadSocket { at, .. } => *at,
        }
    }
}

/// The resolver refused a call: its error, with where the call is.
#[derive(Debug, thiserror::Error)]
#[error("{at}: {request}: {source}")]
pub struct ResolveError<E: std::error::Error + 'static> {
    /// Where the call is.
    pub at: Position,
    /// What it asked for.
    pub request: BindRequest,
    /// The resolver's error.
    #[source]
    pub source: E,
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Text copied as it is.
    Text(String),
    /// A call, replaced by the resolver's answer.
    Bind {
        /// What it asks for.
        request: BindRequest,
        /// Where it is.
        at: Position,
    },
}

/// A parsed template: text and calls, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The pieces, in order.
    pub segments: Vec<Segment>,
}

impl Template {
    /// Parses template text. Fails on the first piece of template code it
    /// does not understand.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        let offset = |rest: &str| text.len() - rest.len();
        loop {
            let next = [rest.find("<%"), rest.find("{{")].into_iter().flatten().min();
            let Some(i) = next else {
                literal.push_str(rest);
                break;
            };
            literal.push_str(&rest[..i]);
            let at = position(text, offset(rest) + i);
            let block = &rest[i..];
            if let Some(after) = block.strip_prefix("<%%") {
                literal.push_str("<%");
                rest = after;
                continue;
            }
            let (opener, closer) = if block.starts_with("<%") { ("<%", "%>") } else { ("{{", "}}") };
            let inner_start = opener.len();
            let Some(len) = block[inner_start..].find(closer) else {
                return Err(TemplateError::Unterminated { at, opener, closer });
            };
            let inner = &block[inner_start..inner_start + len];
            rest = &block[inner_start + len + closer.len()..];
            let piece = if opener == "<%" { parse_erb(inner, at)? } else { parse_native(inner, at)? };
            match piece {
                Piece::Nothing => {}
                Piece::Literal(s) => literal.push_str(&s),
                Piece::Bind(request) => {
                    if !literal.is_empty() {
                        segments.push(Segment::Text(std::mem::take(&mut literal)));
                    }
                    segments.push(Segment::Bind { request, at });
                }
            }
        }
        if !literal.is_empty() {
            segments.push(Segment::Text(literal));
        }
        Ok(Template { segments })
    }

    /// The calls, in order, with where they are.
    pub fn binds(&self) -> impl Iterator<Item = (&BindRequest, Position)> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Bind { request, at } => Some((request, *at)),
            Segment::Text(_) => None,
        })
    }

    /// Produces the config: each call is replaced by what `resolve` answers
    /// for it (`fd@N`, or `ADDRESS:PORT` for a direct bind). Stops at the
    /// first refusal. The error is boxed: it carries the resolver's own
    /// error (a broker error can be large) and is the rare path.
    pub fn render<E, F>(&self, mut resolve: F) -> Result<String, Box<ResolveError<E>>>
    where
        E: std::error::Error + 'static,
        F: FnMut(&BindRequest, Position) -> Result<String, E>,
    {
        let mut out = String::new();
        for segment in &self.segments {
            match segment {
                Segment::Text(text) => out.push_str(text),
                Segment::Bind { request, at } => {
                    let text = resolve(request, *at)
                        .map_err(|source| Box::new(ResolveError { at: *at, request: request.clone(), source }))?;
                    out.push_str(&text);
                }
            }
        }
        Ok(out)
    }
}

/// The 1-based line and character column of byte `offset` in `text`.
fn position(text: &str, offset: usize) -> Position {
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Position { line, column: before[line_start..].chars().count() + 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders with a resolver that numbers the calls from 3 and records them.
    fn render(text: &str) -> (String, Vec<BindRequest>) {
        let template = Template::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        let mut seen = Vec::new();
        let out = template
            .render(|req, _| {
                seen.push(req.clone());
                Ok::<_, std::io::Error>(format!("fd@{}", seen.len() + 2))
            })
            .unwrap();
        (out, seen)
    }

    fn tcp(ip: &str, port: u16) -> BindRequest {
        BindRequest::Tcp { ip: ip.parse().unwrap(), port }
    }

    fn error(text: &str) -> TemplateError {
        Template::parse(text).expect_err(text)
    }

    #[test]
    fn erb_calls_as_multibinder_users_write_them() {
        let cases = [
            ("bind <%= bind_tcp('0.0.0.0', 80) %>", tcp("0.0.0.0", 80)),
            ("bind <%= bind_tcp(\"0.0.0.0\", 80) %>", tcp("0.0.0.0", 80)),
            ("bind <%=bind_tcp('127.0.0.1',8080)%>", tcp("127.0.0.1", 8080)),
            ("bind <%=   bind_tcp (  '10.0.0.1' ,\t443  )   %>", tcp("10.0.0.1", 443)),
            ("bind <%= bind_tcp '0.0.0.0', 80 %>", tcp("0.0.0.0", 80)),
            ("bind <%= bind_tcp('::', 443) %>", tcp("::", 443)),
            ("bind <%= bind_tcp('[::1]', 443) %>", tcp("::1", 443)),
            ("bind <%= bind_tcp('2001:db8::7', 80) %>", tcp("2001:db8::7", 80)),
            ("bind <%= bind_tcp('0.0.0.0', '80') %>", tcp("0.0.0.0", 80)),
        ];
        for (text, want) in cases {
            let (out, seen) = render(text);
            assert_eq!(out, "bind fd@3", "{text}");
            assert_eq!(seen, vec![want], "{text}");
        }
    }

    #[test]
    fn native_names_and_specs() {
        let (out, seen) = render(
            "frontend a\n  bind {{ sockbroker \"https\" }} ssl crt x.pem\n  bind {{sockbroker 'tcp://[::]:443'}}\nlog-forward l\n  dgram-bind {{ sockbroker \"udp://127.0.0.1:514\" }}\n",
        );
        assert_eq!(out, "frontend a\n  bind fd@3 ssl crt x.pem\n  bind fd@4\nlog-forward l\n  dgram-bind fd@5\n");
        assert_eq!(
            seen,
            vec![
                BindRequest::Name("https".into()),
                BindRequest::Spec("tcp://[::]:443".parse().unwrap()),
                BindRequest::Spec("udp://127.0.0.1:514".parse().unwrap()),
            ]
        );
    }

    #[test]
    fn both_syntaxes_mix_and_text_is_kept_byte_for_byte() {
        let text =
            "# é ünïcode %[src] ${HOME} { acl } %> }}\nbind <%= bind_tcp('1.2.3.4', 1) %>,{{ sockbroker \"x\" }}\n";
        let (out, seen) = render(text);
        assert_eq!(out, "# é ünïcode %[src] ${HOME} { acl } %> }}\nbind fd@3,fd@4\n");
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn comments_and_escapes() {
        assert_eq!(render("a<%# bind_tcp('x', 1) %>b").0, "ab");
        assert_eq!(render("a <%% b").0, "a <% b");
        assert_eq!(render("a {{ \"{{\" }} b").0, "a {{ b");
        assert_eq!(render("").0, "");
        assert!(Template::parse("plain\n").unwrap().binds().next().is_none());
    }

    #[test]
    fn other_template_code_is_an_error_with_line_and_column() {
        let e = error("global\n  x <% if true %>\n");
        assert!(matches!(e, TemplateError::UnsupportedErb { .. }), "{e}");
        assert_eq!(e.position(), Position { line: 2, column: 5 });
        assert!(e.to_string().starts_with("2:5: unsupported ERB code <% if true %>:"), "{e}");

        let e = error("ab\ncd\n\n é {{ range .x }}");
        assert!(matches!(e, TemplateError::UnsupportedNative { .. }), "{e}");
        assert_eq!(e.position(), Position { line: 4, column: 4 });
        assert!(e.to_string().starts_with("4:4: unsupported template code {{ range .x }}:"), "{e}");

        for text in [
            "<%= ENV['PORT'] %>",
            "<%= bind_tcp('1.2.3.4') %>",
            "<%= bind_tcp('1.2.3.4', 80 %>",
            "<%= bind_tcp('1.2.3.4', 80) + 'x' %>",
            "<%= bind_udp('1.2.3.4', 80) %>",
            "<%= bind_tcp(1.2.3.4, 80) %>",
            "<%- bind_tcp('1.2.3.4', 80) %>",
            "<%= bind_tcp('1.2.3.4', 80) -%>",
            "<%= bind_tcp('a\\'b', 80) %>",
        ] {
            assert!(matches!(error(text), TemplateError::UnsupportedErb { .. }), "{text}");
        }
        for text in ["{{ }}", "{{ sockbroker }}", "{{ sockbroker https }}", "{{ sockbroker \"a b\" }}", "{{ x \"y\" }}"]
        {
            assert!(matches!(error(text), TemplateError::UnsupportedNative { .. }), "{text}");
        }
    }

    #[test]
    fn unterminated_blocks() {
        let e = error("x\n  bind <%= bind_tcp('1.2.3.4', 80)\n");
        assert_eq!(e, TemplateError::Unterminated { at: Position { line: 2, column: 8 }, opener: "<%", closer: "%>" });
        assert!(matches!(error("{{ sockbroker \"a\" }"), TemplateError::Unterminated { opener: "{{", .. }));
    }

    #[test]
    fn bad_addresses_and_ports() {
        for text in [
            "<%= bind_tcp('localhost', 80) %>",
            "<%= bind_tcp('0.0.0.0', 0) %>",
            "<%= bind_tcp('0.0.0.0', 65536) %>",
            "<%= bind_tcp('0.0.0.0', 'http') %>",
            "{{ sockbroker \"tcp://0.0.0.0\" }}",
            "{{ sockbroker \"sctp://1.2.3.4:5\" }}",
        ] {
            let e = error(text);
            assert!(matches!(e, TemplateError::BadSocket { .. }), "{text}: {e}");
            assert_eq!(e.position(), Position { line: 1, column: 1 });
        }
    }

    #[test]
    fn resolver_errors_carry_the_position() {
        let t = Template::parse("a\nb {{ sockbroker \"nope\" }}").unwrap();
        let e = t.render(|_, _| Err(std::io::Error::other("no socket named 'nope'"))).unwrap_err();
        assert_eq!(e.at, Position { line: 2, column: 3 });
        assert_eq!(e.to_string(), "2:3: socket named 'nope': no socket named 'nope'");
    }

    #[test]
    fn erb_sockets_get_multibinders_backlog() {
        let spec = tcp("0.0.0.0", 80).spec().unwrap();
        assert_eq!(spec.options.backlog, ERB_BACKLOG);
        assert_eq!(spec.to_string(), "tcp://0.0.0.0:80");
        assert!(BindRequest::Name("x".into()).spec().is_none());
    }
}
