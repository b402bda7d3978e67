//! Error answers as problem details (RFC 9457, `application/problem+json`).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

/// The `type` URIs of the layer's problems: stable, so clients can match on them.
pub mod types {
    /// The request needs an `Idempotency-Key` header and has none (400).
    pub const KEY_MISSING: &str = "urn:idemstore:problem:idempotency-key-missing";
    /// The `Idempotency-Key` header cannot be used (400).
    pub const KEY_INVALID: &str = "urn:idemstore:problem:idempotency-key-invalid";
    /// The key is being used by a request still running (409).
    pub const KEY_IN_USE: &str = "urn:idemstore:problem:idempotency-key-in-use";
    /// The key was used with a different request (422).
    pub const KEY_REUSED: &str = "urn:idemstore:problem:idempotency-key-reused";
    /// The request body is over the layer's cap (413).
    pub const BODY_TOO_LARGE: &str = "urn:idemstore:problem:request-body-too-large";
    /// The request body could not be read (400).
    pub const BODY_UNREADABLE: &str = "urn:idemstore:problem:request-body-unreadable";
    /// The dedupe store failed; nothing ran (503, or 500 for a setting or a bug).
    pub const STORE_UNAVAILABLE: &str = "urn:idemstore:problem:store-unavailable";
    /// The handler panicked or its response body failed; the key was released (500).
    pub const HANDLER_FAILED: &str = "urn:idemstore:problem:handler-failed";
    /// The handler's response was over the layer's response cap; it ran, and its response was
    /// replaced by this one, which every retry gets too (500).
    pub const RESPONSE_TOO_LARGE: &str = "urn:idemstore:problem:response-too-large";
    /// The stored response could not be read back (500).
    pub const STORED_RESPONSE_CORRUPT: &str = "urn:idemstore:problem:stored-response-corrupt";
}

/// A problem-details response with `type`, `title`, `status` and `detail`.
pub fn problem(status: StatusCode, type_uri: &str, title: &str, detail: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(problem_body(status, type_uri, title, detail)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    response
}

/// The JSON body of a problem.
pub fn problem_body(status: StatusCode, type_uri: &str, title: &str, detail: &str) -> Bytes {
    Bytes::from(format!(
        r#"{{"type":"{}","title":"{}","status":{},"detail":"{}"}}"#,
        json_escape(type_uri),
        json_escape(title),
        status.as_u16(),
        json_escape(detail)
    ))
}

fn json_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_escaped_json_with_the_status() {
        let response = problem(StatusCode::CONFLICT, types::KEY_IN_USE, "In use", "a \"quoted\"\nline\u{1}");
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/problem+json");
        let body = problem_body(StatusCode::CONFLICT, types::KEY_IN_USE, "In use", "d");
        assert_eq!(
            &body[..],
            br#"{"type":"urn:idemstore:problem:idempotency-key-in-use","title":"In use","status":409,"detail":"d"}"#
        );
        assert_eq!(json_escape("a \"quoted\"\nline\u{1}\\"), r#"a \"quoted\"\nline\u0001\\"#);
    }
}
