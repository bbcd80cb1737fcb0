//! Cutting a byte stream into JSON values, with a size cap.
//!
//! Clients may split one request over several writes, or send several back
//! to back, with or without whitespace between them; one read is not one
//! message. [`Framer`] buffers bytes and yields each complete JSON value. It
//! does no I/O, so every case is a unit test.

use serde_json::Value;

/// The largest request the broker reads: 64 KiB.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Why the stream cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// More than the cap without a complete value.
    #[error("request larger than {0} bytes")]
    TooLarge(usize),
    /// Not JSON; the stream cannot be resynchronised after this.
    #[error("Parse error: {0}")]
    Syntax(#[from] serde_json::Error),
}

/// Buffers bytes and yields complete JSON values.
#[derive(Debug)]
pub struct Framer {
    buf: Vec<u8>,
    max: usize,
}

impl Default for Framer {
    fn default() -> Self {
        Framer::new(MAX_REQUEST)
    }
}

impl Framer {
    /// A framer that refuses values larger than `max` bytes.
    pub fn new(max: usize) -> Self {
        Framer { buf: Vec::new(), max }
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Whether bytes of an incomplete value are waiting.
    pub fn has_partial(&self) -> bool {
        self.buf.iter().any(|b| !b.is_ascii_whitespace())
    }

    /// The bytes buffered but not yet yielded (an incomplete value), so a
    /// connection can be handed to another broker with nothing lost.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// The next complete value, `None` when more bytes are needed.
    pub fn next_value(&mut self) -> Option<Result<Value, FrameError>> {
        let start = self.buf.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(self.buf.len());
        self.buf.drain(..start);
        if self.buf.is_empty() {
            return None;
        }
        let mut values = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
        match values.next()? {
            Ok(value) => {
                let end = values.byte_offset();
                if end > self.max {
                    return Some(Err(FrameError::TooLarge(self.max)));
                }
                self.buf.drain(..end);
                Some(Ok(value))
            }
            Err(e) if e.is_eof() => {
                if self.buf.len() > self.max {
                    Some(Err(FrameError::TooLarge(self.max)))
                } else {
                    None
                }
            }
            Err(e) => Some(Err(FrameError::Syntax(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn split_and_concatenated() {
        let mut f = Framer::default();
        f.push(br#"{"method":"bi"#);
        assert!(f.next_value().is_none());
        assert!(f.has_partial());
        f.push(br#"nd"}{"method":"a"}"#);
        f.push(b"\n {\"method\":\"b\"}\n");
        assert_eq!(f.next_value().unwrap().unwrap(), json!({"method":"bind"}));
        assert_eq!(f.next_value().unwrap().unwrap(), json!({"method":"a"}));
        assert_eq!(f.next_value().unwrap().unwrap(), json!({"method":"b"}));
        assert!(f.next_value().is_none());
        assert!(!f.has_partial());
    }

    #[test]
    fn byte_at_a_time() {
        let mut f = Framer::default();
        let text = br#"{"a":[1,2,{"b":"}"}]}"#;
        for (i, b) in text.iter().enumerate() {
            f.push(&[*b]);
            let got = f.next_value();
            if i + 1 < text.len() {
                assert!(got.is_none(), "value complete too early at byte {i}");
            } else {
                assert_eq!(got.unwrap().unwrap(), json!({"a":[1,2,{"b":"}"}]}));
            }
        }
    }

    #[test]
    fn syntax_error_and_cap() {
        let mut f = Framer::default();
        f.push(b"{nope}");
        assert!(matches!(f.next_value(), Some(Err(FrameError::Syntax(_)))));

        let mut f = Framer::new(16);
        f.push(b"{\"a\":\"0123456789abcdef");
        assert!(matches!(f.next_value(), Some(Err(FrameError::TooLarge(16)))));

        let mut f = Framer::new(16);
        f.push(b"{\"a\":\"0123456789abcdef\"}");
        assert!(matches!(f.next_value(), Some(Err(FrameError::TooLarge(16)))));
    }
}
