//! The two call syntaxes of a template, each cut from the text between its
//! delimiters by [`super::Template::parse`]: multibinder's ERB
//! `<%= bind_tcp('ADDRESS', PORT) %>` ([`parse_erb`]) and the native
//! `{{ sockbroker "NAME-OR-SPEC" }}` ([`parse_native`]), read with a tiny
//! lexer. Each call becomes a [`Piece`]: nothing (a comment), literal text
//! (an escape) or a [`BindRequest`].

use super::{BindRequest, Position, TemplateError};
use crate::spec::{SocketKey, SocketSpec, SpecError, Transport};

/// What one call renders as.
pub(super) enum Piece {
    /// An ERB comment.
    Nothing,
    /// An escaped delimiter.
    Literal(String),
    /// A socket to ask for.
    Bind(BindRequest),
}

/// The inside of `<% … %>`.
pub(super) fn parse_erb(inner: &str, at: Position) -> Result<Piece, TemplateError> {
    if inner.starts_with('#') {
        return Ok(Piece::Nothing);
    }
    let unsupported = || TemplateError::UnsupportedErb { at, code: format!("<%{inner}%>") };
    let expr = inner.strip_prefix('=').ok_or_else(unsupported)?;
    let mut lex = Lexer::new(expr);
    if lex.ident() != Some("bind_tcp") {
        return Err(unsupported());
    }
    let parens = lex.eat('(');
    let address = lex.string().ok_or_else(unsupported)?;
    if !lex.eat(',') {
        return Err(unsupported());
    }
    let port = lex.integer().or_else(|| lex.string()).ok_or_else(unsupported)?;
    if parens && !lex.eat(')') {
        return Err(unsupported());
    }
    if !lex.at_end() {
        return Err(unsupported());
    }
    let call = format!("bind_tcp('{address}', {port})");
    let bad = |source| TemplateError::BadSocket { at, call: call.clone(), source };
    let port: i64 = port.parse().map_err(|_| bad(SpecError::BadSocketAddress(format!("{address}:{port}"))))?;
    match SocketKey::inet_parts(Transport::Tcp, address, port).map_err(bad)? {
        SocketKey::Inet { addr, .. } => Ok(Piece::Bind(BindRequest::Tcp { ip: addr.ip(), port: addr.port() })),
        SocketKey::Unix { .. } => unreachable!("inet_parts makes inet keys"),
    }
}

/// The inside of `{{ … }}`.
pub(super) fn parse_native(inner: &str, at: Position) -> Result<Piece, TemplateError> {
    let unsupported = || TemplateError::UnsupportedNative { at, code: format!("{{{{{inner}}}}}") };
    let mut lex = Lexer::new(inner);
    let piece = match lex.ident() {
        Some("sockbroker") => {
            let arg = lex.string().ok_or_else(unsupported)?;
            if arg.contains(':') {
                let spec: SocketSpec = arg.parse().map_err(|source| TemplateError::BadSocket {
                    at,
                    call: format!("sockbroker \"{arg}\""),
                    source,
                })?;
                Piece::Bind(BindRequest::Spec(spec))
            } else if arg.is_empty() || arg.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(unsupported());
            } else {
                Piece::Bind(BindRequest::Name(arg.to_string()))
            }
        }
        Some(_) => return Err(unsupported()),
        None => Piece::Literal(lex.string().ok_or_else(unsupported)?.to_string()),
    };
    if !lex.at_end() {
        return Err(unsupported());
    }
    Ok(piece)
}

/// A tiny tokenizer for the inside of a call: identifiers, quoted strings
/// without escapes, integers and single punctuation, whitespace between.
struct Lexer<'a> {
    rest: &'a str,
}

impl<'a> Lexer<'a> {
    fn new(text: &'a str) -> Self {
        Lexer { rest: text }
    }

    fn skip_space(&mut self) {
        self.rest = self.rest.trim_start();
    }

    fn take_while(&mut self, pred: impl Fn(char) -> bool) -> Option<&'a str> {
        self.skip_space();
        let end = self.rest.find(|c: char| !pred(c)).unwrap_or(self.rest.len());
        if end == 0 {
            return None;
        }
        let (token, rest) = self.rest.split_at(end);
        self.rest = rest;
        Some(token)
    }

    fn ident(&mut self) -> Option<&'a str> {
        self.skip_space();
        if !self.rest.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
            return None;
        }
        self.take_while(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    fn integer(&mut self) -> Option<&'a str> {
        self.take_while(|c| c.is_ascii_digit())
    }

    /// A string in single or double quotes; backslashes are refused, as no
    /// address, port, name or spec needs one.
    fn string(&mut self) -> Option<&'a str> {
        self.skip_space();
        let quote = self.rest.chars().next().filter(|c| *c == '\'' || *c == '"')?;
        let body = &self.rest[1..];
        let end = body.find(quote)?;
        let value = &body[..end];
        if value.contains('\\') {
            return None;
        }
        self.rest = &body[end + 1..];
        Some(value)
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_space();
        match self.rest.strip_prefix(c) {
            Some(rest) => {
                self.rest = rest;
                true
            }
            None => false,
        }
    }

    fn at_end(&mut self) -> bool {
        self.skip_space();
        self.rest.is_empty()
    }
}
