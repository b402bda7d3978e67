//! # idemstore-http
//!
//! An `Idempotency-Key` layer for tower and axum (draft-ietf-httpapi-idempotency-key-header)
//! over any [`idemstore::DedupeStore`].

#![deny(missing_docs)]
#![deny(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod context;
pub mod encoding;
mod headers;
pub mod key;
mod layer;
mod metrics;
pub mod problem;

pub use context::IdempotencyContext;
pub use headers::{IDEMPOTENT_REPLAYED, is_never_stored};
pub use key::{IDEMPOTENCY_KEY, KeyError};
pub use layer::{
    BoxError, DEFAULT_MAX_KEY_LEN, DEFAULT_MAX_REQUEST_BODY_BYTES, DEFAULT_MAX_RESPONSE_BODY_BYTES, IdempotencyLayer,
    IdempotencyService, LayerRequestBody, LayerResponseBody, default_store_policy,
};
pub use metrics::{Metrics, MetricsSnapshot};
