//! The `Idempotency-Key` header's value, and the composite key the store keeps.

use http::HeaderMap;

/// The header that carries the key (lower case, as `http` spells header names).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Why a request's key cannot be used; each is answered 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The header appears more than once.
    Repeated,
    /// The value is empty (`""` or nothing).
    Empty,
    /// The value is longer than the layer's `max_key_len`.
    TooLong {
        /// Bytes in the key (unquoted).
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// The value is neither a structured-field string (`"..."`) nor a bare token of visible
    /// ASCII characters.
    Malformed(&'static str),
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyError::Repeated => write!(f, "the Idempotency-Key header appears more than once"),
            KeyError::Empty => write!(f, "the Idempotency-Key header is empty"),
            KeyError::TooLong { len, max } => {
                write!(f, "the Idempotency-Key is {len} bytes; the limit is {max}")
            }
            KeyError::Malformed(why) => write!(f, "the Idempotency-Key header is malformed: {why}"),
        }
    }
}

/// Reads the key from `headers`: `Ok(None)` when the header is absent.
///
/// The draft defines the value as a structured-field string (RFC 8941, `"..."` with `\"` and
/// `\\` escapes); a bare token (`Idempotency-Key: 8e03978e-...`) is accepted as well, since
/// many clients send one. Both forms of the same characters are the same key.
pub fn key_from_headers(headers: &HeaderMap, max_key_len: usize) -> Result<Option<Vec<u8>>, KeyError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(KeyError::Repeated);
    }
    parse_key(value.as_bytes(), max_key_len).map(Some)
}

/// Parses one header value (see [`key_from_headers`]).
pub fn parse_key(raw: &[u8], max_key_len: usize) -> Result<Vec<u8>, KeyError> {
    let value = trim_ows(raw);
    let key = match value.first() {
        Some(b'"') => parse_sf_string(value, max_key_len)?,
        Some(_) => {
            if let Some(bad) = value.iter().find(|b| !is_token_byte(**b)) {
                return Err(if *bad == b' ' || *bad == b'\t' {
                    KeyError::Malformed("a bare key holds no whitespace; quote it")
                } else {
                    KeyError::Malformed("a bare key holds only visible ASCII other than '\"', '\\' and ','")
                });
            }
            value.to_vec()
        }
        None => return Err(KeyError::Empty),
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > max_key_len {
        return Err(KeyError::TooLong { len: key.len(), max: max_key_len });
    }
    Ok(key)
}

fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// Visible ASCII except the characters that delimit or escape in structured fields.
fn is_token_byte(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\' && b != b','
}

/// RFC 8941 section 4.2.5: `"` then printable ASCII with `\"` and `\\` escapes, then `"`.
fn parse_sf_string(value: &[u8], max_key_len: usize) -> Result<Vec<u8>, KeyError> {
    let mut out = Vec::with_capacity(value.len().min(max_key_len.saturating_add(1)));
    let mut bytes = value.iter().skip(1);
    loop {
        match bytes.next() {
            None => return Err(KeyError::Malformed("the quoted key has no closing quote")),
            Some(b'"') => break,
            Some(b'\\') => match bytes.next() {
                Some(escaped @ (b'"' | b'\\')) => out.push(*escaped),
                _ => return Err(KeyError::Malformed("a quoted key escapes only '\"' and '\\'")),
            },
            Some(b) if (0x20..=0x7e).contains(b) => out.push(*b),
            Some(_) => return Err(KeyError::Malformed("a quoted key holds only printable ASCII")),
        }
        // Stop reading a hostile header early; the length check below names the limit.
        if out.len() > max_key_len {
            return Err(KeyError::TooLong { len: value.len().saturating_sub(2), max: max_key_len });
        }
    }
    if bytes.next().is_some() {
        return Err(KeyError::Malformed("characters follow the quoted key"));
    }
    Ok(out)
}

/// The key the store keeps: the scope and the client's key, each prefixed with its length
/// (u32, big-endian), so that no two (scope, key) pairs give the same bytes (`"ab" + "c"` and
/// `"a" + "bc"` differ). Without a scope hook the scope is empty.
pub fn composite_key(scope: &[u8], client_key: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + scope.len() + client_key.len());
    push_len_prefixed(&mut key, scope);
    push_len_prefixed(&mut key, client_key);
    key
}

fn push_len_prefixed(out: &mut Vec<u8>, part: &[u8]) {
    // Parts come from headers (bounded by the server's header limits, far below 4 GiB); a
    // longer one saturates, and its bytes still follow in full, so keys remain distinct.
    let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(part);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_and_bare_keys_parse_to_the_same_bytes() {
        assert_eq!(parse_key(b"\"abc-123\"", 255).unwrap(), b"abc-123");
        assert_eq!(parse_key(b"abc-123", 255).unwrap(), b"abc-123");
        assert_eq!(parse_key(b"  \"a b\"  ", 255).unwrap(), b"a b");
        assert_eq!(parse_key(br#""a\"b\\c""#, 255).unwrap(), br#"a"b\c"#);
    }

    #[test]
    fn malformed_keys_are_refused_with_a_reason() {
        assert_eq!(parse_key(b"\"\"", 255), Err(KeyError::Empty));
        assert_eq!(parse_key(b"   ", 255), Err(KeyError::Empty));
        assert!(matches!(parse_key(b"\"abc", 255), Err(KeyError::Malformed(_))));
        assert!(matches!(parse_key(b"\"a\"b", 255), Err(KeyError::Malformed(_))));
        assert!(matches!(parse_key(b"\"a\\x\"", 255), Err(KeyError::Malformed(_))));
        assert!(matches!(parse_key(b"a b", 255), Err(KeyError::Malformed(_))));
        assert!(matches!(parse_key(b"a,b", 255), Err(KeyError::Malformed(_))));
        assert!(matches!(parse_key(b"\"\x01\"", 255), Err(KeyError::Malformed(_))));
    }

    #[test]
    fn the_length_limit_counts_unquoted_bytes() {
        let key = "k".repeat(255);
        assert_eq!(parse_key(format!("\"{key}\"").as_bytes(), 255).unwrap().len(), 255);
        assert_eq!(parse_key(key.as_bytes(), 255).unwrap().len(), 255);
        let long = "k".repeat(256);
        assert!(matches!(parse_key(long.as_bytes(), 255), Err(KeyError::TooLong { len: 256, max: 255 })));
        assert!(matches!(parse_key(format!("\"{long}\"").as_bytes(), 255), Err(KeyError::TooLong { .. })));
    }

    #[test]
    fn composite_keys_of_different_splits_differ() {
        assert_ne!(composite_key(b"ab", b"c"), composite_key(b"a", b"bc"));
        assert_ne!(composite_key(b"", b"abc"), composite_key(b"abc", b""));
        assert_eq!(composite_key(b"t1", b"k"), composite_key(b"t1", b"k"));
    }

    #[test]
    fn a_repeated_header_is_refused() {
        let mut headers = HeaderMap::new();
        headers.append(IDEMPOTENCY_KEY, "a".parse().unwrap());
        assert_eq!(key_from_headers(&headers, 255), Ok(Some(b"a".to_vec())));
        headers.append(IDEMPOTENCY_KEY, "b".parse().unwrap());
        assert_eq!(key_from_headers(&headers, 255), Err(KeyError::Repeated));
        assert_eq!(key_from_headers(&HeaderMap::new(), 255), Ok(None));
    }
}
