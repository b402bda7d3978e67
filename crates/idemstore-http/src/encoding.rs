//! The stored response: a small versioned binary format, decoded with a bounds check on every
//! read, so a damaged or foreign outcome is an error, never a panic.
//!
//! Layout (integers big-endian):
//!
//! ```text
//! magic   2 B   "IH"
//! version 1 B   1
//! status  2 B   100..=999
//! count   2 B   number of headers
//! count × { name_len 2 B, name, value_len 2 B, value }
//! body_len 4 B, body
//! ```
//!
//! Nothing may follow the body. Names and values are checked as `http` checks them, so a
//! replay never carries a header the original response could not have had.

use bytes::Bytes;
use http::StatusCode;
use http::header::{HeaderMap, HeaderName, HeaderValue};

const MAGIC: &[u8; 2] = b"IH";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Most headers a stored response holds (more than any real response; a count above it is
/// damage). `HeaderMap` itself refuses more than 32,768.
pub const HEADERS_MAX: u16 = 1024;

/// Why a stored outcome could not be read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stored response is unreadable: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

/// Why a response could not be encoded (a field too long for its length prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeError(pub &'static str);

/// A response as stored: what a replay sends back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers kept (see `headers::is_stored`).
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

/// Encodes `status`, the headers for which `keep` is true, and `body`.
pub fn encode(
    status: StatusCode,
    headers: &HeaderMap,
    keep: impl Fn(&HeaderName) -> bool,
    body: &[u8],
) -> Result<Vec<u8>, EncodeError> {
    let kept: Vec<(&HeaderName, &HeaderValue)> = headers.iter().filter(|(name, _)| keep(name)).collect();
    let size = 2 + 1 + 2 + 2 + kept.iter().map(|(n, v)| 4 + n.as_str().len() + v.len()).sum::<usize>() + 4 + body.len();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(MAGIC);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&status.as_u16().to_be_bytes());
    let count = u16::try_from(kept.len())
        .ok()
        .filter(|count| *count <= HEADERS_MAX)
        .ok_or(EncodeError("more headers than HEADERS_MAX"))?;
    out.extend_from_slice(&count.to_be_bytes());
    for (name, value) in kept {
        let name_len = u16::try_from(name.as_str().len()).map_err(|_| EncodeError("a header name over 64 KiB"))?;
        let value_len = u16::try_from(value.len()).map_err(|_| EncodeError("a header value over 64 KiB"))?;
        out.extend_from_slice(&name_len.to_be_bytes());
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(&value_len.to_be_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    let body_len = u32::try_from(body.len()).map_err(|_| EncodeError("a body over 4 GiB"))?;
    out.extend_from_slice(&body_len.to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Decodes what [`encode`] wrote, checking every length against what is left. The body and
/// the header values are slices of `stored` (no copy).
pub fn decode(stored: impl Into<Bytes>) -> Result<StoredResponse, DecodeError> {
    let stored: Bytes = stored.into();
    let mut reader = Reader { stored: &stored, at: 0 };
    if reader.take(2)? != MAGIC {
        return Err(DecodeError("bad magic (not written by this layer)"));
    }
    let version = reader.take(1)?[0];
    if version != FORMAT_VERSION {
        return Err(DecodeError("unknown format version (written by a newer build?)"));
    }
    let status = StatusCode::from_u16(reader.u16()?).map_err(|_| DecodeError("status out of range"))?;
    let count = reader.u16()?;
    if count > HEADERS_MAX {
        return Err(DecodeError("more headers than HEADERS_MAX"));
    }
    let mut headers = HeaderMap::with_capacity(usize::from(count));
    for _ in 0..count {
        let name_len = usize::from(reader.u16()?);
        let name = HeaderName::from_bytes(reader.take(name_len)?).map_err(|_| DecodeError("bad header name"))?;
        let value_len = usize::from(reader.u16()?);
        let value = HeaderValue::from_maybe_shared(reader.take_shared(value_len)?)
            .map_err(|_| DecodeError("bad header value"))?;
        headers.append(name, value);
    }
    let body_len = usize::try_from(reader.u32()?).map_err(|_| DecodeError("body length overflows"))?;
    let body = reader.take_shared(body_len)?;
    if reader.at != stored.len() {
        return Err(DecodeError("bytes follow the body"));
    }
    Ok(StoredResponse { status, headers, body })
}

struct Reader<'a> {
    stored: &'a Bytes,
    at: usize,
}

impl<'a> Reader<'a> {
    fn range(&mut self, len: usize) -> Result<std::ops::Range<usize>, DecodeError> {
        let end = self.at.checked_add(len).filter(|end| *end <= self.stored.len()).ok_or(DecodeError("truncated"))?;
        let range = self.at..end;
        self.at = end;
        Ok(range)
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        let range = self.range(len)?;
        let stored: &'a [u8] = self.stored;
        stored.get(range).ok_or(DecodeError("truncated"))
    }

    fn take_shared(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        let range = self.range(len)?;
        Ok(self.stored.slice(range))
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let bytes = self.take(4)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut headers = HeaderMap::new();
        headers.append("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("1"));
        headers.append("x-multi", HeaderValue::from_static("2"));
        headers.append("set-cookie", HeaderValue::from_static("s=1"));
        (StatusCode::CREATED, headers, br#"{"id":"ch_1"}"#.to_vec())
    }

    #[test]
    fn a_response_round_trips_with_only_the_kept_headers() {
        let (status, headers, body) = sample();
        let encoded = encode(status, &headers, |name| name != "set-cookie", &body).unwrap();
        let decoded = decode(encoded).unwrap();
        assert_eq!(decoded.status, StatusCode::CREATED);
        assert_eq!(decoded.body, body);
        assert_eq!(decoded.headers.get("content-type").unwrap(), "application/json");
        let multi: Vec<_> = decoded.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["1", "2"]);
        assert!(decoded.headers.get("set-cookie").is_none());
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_an_error_or_a_valid_response_never_a_panic() {
        let (status, headers, body) = sample();
        let encoded = encode(status, &headers, |_| true, &body).unwrap();
        for len in 0..encoded.len() {
            assert!(decode(encoded[..len].to_vec()).is_err(), "prefix of {len} bytes decoded");
        }
        for at in 0..encoded.len() {
            for bit in 0..8 {
                let mut damaged = encoded.clone();
                damaged[at] ^= 1 << bit;
                let _ = decode(damaged);
            }
        }
        let mut longer = encoded.clone();
        longer.push(0);
        assert_eq!(decode(longer), Err(DecodeError("bytes follow the body")));
    }

    #[test]
    fn foreign_bytes_and_other_versions_are_refused() {
        assert!(decode(&b"201 Created"[..]).is_err());
        let (status, headers, body) = sample();
        let mut encoded = encode(status, &headers, |_| true, &body).unwrap();
        encoded[2] = FORMAT_VERSION + 1;
        assert_eq!(decode(encoded).unwrap_err().0, "unknown format version (written by a newer build?)");
        let mut bad_status = encode(status, &headers, |_| true, &body).unwrap();
        bad_status[3..5].copy_from_slice(&1000u16.to_be_bytes());
        assert!(decode(bad_status).is_err());
    }
}
