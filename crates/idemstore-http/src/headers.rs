//! Which response headers a replay may carry.

use http::HeaderMap;
use http::header::{self, HeaderName};

/// Marks a replayed response (`Idempotent-Replayed: true`).
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// Headers never stored nor replayed: credentials and challenges meant for the first
/// exchange only (`Set-Cookie`, `WWW-Authenticate`), the time of the first answer (`Date`,
/// which the server sets anew), the length (recomputed from the stored body), and the
/// hop-by-hop headers of RFC 9110 section 7.6.1 (`Connection`, `Keep-Alive`,
/// `Transfer-Encoding`, `TE`, `Trailer`, `Upgrade`, `Proxy-*`).
pub fn is_never_stored(name: &HeaderName) -> bool {
    name == header::SET_COOKIE
        || name == header::WWW_AUTHENTICATE
        || name == header::DATE
        || name == header::CONTENT_LENGTH
        || name == header::CONNECTION
        || name == "keep-alive"
        || name == header::TRANSFER_ENCODING
        || name == header::TE
        || name == header::TRAILER
        || name == header::UPGRADE
        || name.as_str().starts_with("proxy-")
        || name == IDEMPOTENT_REPLAYED
}

/// The headers a response's `Connection` header names: hop-by-hop too (RFC 9110 7.6.1).
pub fn connection_options(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|option| HeaderName::from_bytes(option.trim().as_bytes()).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_dates_and_hop_by_hop_headers_are_never_stored() {
        for name in [
            "set-cookie",
            "www-authenticate",
            "date",
            "connection",
            "keep-alive",
            "transfer-encoding",
            "te",
            "trailer",
            "upgrade",
            "proxy-authenticate",
            "proxy-connection",
        ] {
            assert!(is_never_stored(&HeaderName::from_static(name)), "{name}");
        }
        for name in ["content-type", "location", "etag", "x-request-id"] {
            assert!(!is_never_stored(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn headers_named_by_connection_are_found() {
        let mut headers = HeaderMap::new();
        headers.append(header::CONNECTION, "close, X-Hop".parse().unwrap());
        let names = connection_options(&headers);
        assert!(names.contains(&HeaderName::from_static("x-hop")));
    }
}
