//! # idemstore-http
//!
//! An `Idempotency-Key` layer for [tower] and [axum], following the IETF draft *The
//! Idempotency-Key HTTP Header Field* (draft-ietf-httpapi-idempotency-key-header), over any
//! [`idemstore::DedupeStore`]: the embedded [`idemstore::Store`], or another backend that
//! implements the trait (the PostgreSQL one of `idemstore-postgres`).
//!
//! A client sends `Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"` with a POST; if the
//! connection drops, it sends the same request with the same key again. The layer runs the
//! handler for the first request only and answers every retry with the first response,
//! marked `Idempotent-Replayed: true`.
//!
//! [tower]: https://docs.rs/tower
//! [axum]: https://docs.rs/axum
//!
//! ```
//! use std::time::Duration;
//! use axum::{Extension, Router, routing::post, http::StatusCode};
//! use idemstore::{Durability, Options, Store};
//! use idemstore_http::{IdempotencyContext, IdempotencyLayer};
//! use tower::ServiceExt; // oneshot, to call the router without a socket here
//!
//! async fn charge(Extension(claim): Extension<IdempotencyContext>, body: String) -> (StatusCode, String) {
//!     if claim.last_checkpoint().is_none() {
//!         // ... charge the card, passing claim.client_key() on as the provider's key ...
//!         claim.checkpoint(b"charged").await.expect("checkpoint");
//!     }
//!     (StatusCode::CREATED, format!("charged: {body}"))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(dir.path(), Options { durability: Durability::Sync, ..Options::default() })?;
//! let layer = IdempotencyLayer::new(store)
//!     .require_key(true)                      // a POST without a key gets 400
//!     .lease(Duration::from_secs(30))         // a crashed attempt's key is taken over after 30 s
//!     .ttl(Duration::from_secs(24 * 3600));   // retries within a day are replays
//! let metrics = layer.metrics();
//! let app = Router::new().route("/charges", post(charge)).layer(layer);
//!
//! let request = || {
//!     axum::http::Request::post("/charges")
//!         .header("idempotency-key", "\"order-42\"")
//!         .body(axum::body::Body::from("1200 EUR"))
//! };
//! let first = app.clone().oneshot(request()?).await?;
//! assert_eq!(first.status(), StatusCode::CREATED);
//! let retry = app.clone().oneshot(request()?).await?;
//! assert_eq!(retry.status(), StatusCode::CREATED);
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! assert_eq!(metrics.replayed(), 1);
//! // Serve it with `axum::serve(listener, app)`.
//! # Ok(())
//! # }
//! ```
//!
//! # What each request gets
//!
//! | request | answer |
//! | --- | --- |
//! | a method not covered (default: all but POST and PATCH) | passes through untouched |
//! | no key | passes through; 400 `idempotency-key-missing` with [`require_key`](IdempotencyLayer::require_key) |
//! | a key that is malformed, repeated, or over [`max_key_len`](IdempotencyLayer::max_key_len) (255) | 400 `idempotency-key-invalid` |
//! | a body over [`max_request_body_bytes`](IdempotencyLayer::max_request_body_bytes) (1 MiB) | 413 `request-body-too-large`; the handler does not run |
//! | the first request with its key | runs the handler; its response is stored or the key released (below) |
//! | a retry after a stored response | the stored status, headers and body, with `Idempotent-Replayed: true` |
//! | a retry while the first still runs | 409 `idempotency-key-in-use` with `Retry-After` (seconds to the end of the lease); or, with [`wait_for_in_flight`](IdempotencyLayer::wait_for_in_flight), the first's response once it finishes (409 if it does not within the bound) |
//! | the same key with another method, path or body | 422 `idempotency-key-reused`; nothing runs |
//! | a store error | 503 `store-unavailable` with `Retry-After: 1` (500 for a setting or a bug: `ReadOnly`, `InvalidArgument`, ...); the handler does not run |
//! | a stored response that cannot be decoded | 500 `stored-response-corrupt` |
//!
//! Error answers are problem details (RFC 9457, `application/problem+json`) whose `type` is one
//! of the stable URIs in [`problem::types`].
//!
//! # Keys
//!
//! The draft defines the header's value as a structured-field string (`"..."`); a bare token
//! (`Idempotency-Key: 8e03978e-...`) is accepted too, and both forms of the same characters are
//! the same key. Keys up to 255 bytes are accepted by default.
//!
//! The key the store keeps is composite: a **scope** and the client's key, each
//! length-prefixed (so no two pairs collide). Without a [`scope`](IdempotencyLayer::scope) hook
//! the scope is empty and every client shares one key space; the draft's security section
//! asks for keys per client, so give the hook the tenant or the authenticated principal (from a
//! header, or from an extension an authentication layer outside this one set):
//!
//! ```
//! # let dir = tempfile::tempdir().unwrap();
//! # let store = idemstore::Store::open(dir.path(), Default::default()).unwrap();
//! let layer = idemstore_http::IdempotencyLayer::new(store)
//!     .scope(|parts| parts.headers.get("x-account").map(|v| v.as_bytes().to_vec()).unwrap_or_default());
//! ```
//!
//! # Fingerprint
//!
//! Two requests with one key are "the same" when their method, path with query, and a 128-bit
//! hash (xxh3) of the body are. A [`fingerprint_body`](IdempotencyLayer::fingerprint_body) hook
//! chooses what of the body counts (the fields that matter, canonicalised), so that a client
//! timestamp in the body does not make a retry a 422.
//!
//! # What is stored
//!
//! The [`store_when`](IdempotencyLayer::store_when) policy decides from the status; by default
//! ([`default_store_policy`]) 2xx and 4xx responses are stored except 408, 409 and 429 (which
//! tell the client to try again). Any other response **releases** the key, so the client's
//! retry runs the handler again: a 5xx, and also a handler that **panics** (the panic is caught
//! and answered 500 `handler-failed`) or whose response body fails.
//!
//! Except after a checkpoint: a claim that carries one (recorded by this attempt, or inherited
//! by a recovered claim) says effects ran, and a release would drop the checkpoint with the
//! key, so the retry would run them again. Such a failed attempt leaves the key in flight
//! instead (counted in `kept_for_resume`): retries get 409 until the lease ends, then the next
//! one takes the claim over with `recovered()` and the checkpoint, and skips those effects.
//!
//! A stored response keeps the status, the headers and the body in a small versioned binary
//! format ([`encoding`]; every length is checked when read back). `Set-Cookie`,
//! `WWW-Authenticate`, `Date`, `Content-Length` (recomputed) and the hop-by-hop headers
//! (`Connection` and those it names, `Keep-Alive`, `Transfer-Encoding`, `TE`, `Trailer`,
//! `Upgrade`, `Proxy-*`) are never stored nor replayed; the first response carries them as
//! the handler set them.
//!
//! **A response over [`max_response_body_bytes`](IdempotencyLayer::max_response_body_bytes)**
//! (512 KiB): the handler has run, so releasing the key would let the retry run the effect
//! again. Instead the layer answers 500 `response-too-large` (naming the handler's status) and
//! stores that answer: every retry gets it, and the effect runs once. Raise the cap (and the
//! store's `Options::max_outcome_len` above it) for endpoints with large responses.
//!
//! **If storing the response fails** (a store error after the handler ran), the client still
//! gets the handler's response; the key stays in flight until its lease ends, then a retry
//! takes it over as a recovered claim (below). It is counted in `store_errors`.
//!
//! # The handler's claim: recovery and checkpoints
//!
//! Each request that acquired its key carries an [`IdempotencyContext`] extension
//! (`Extension<IdempotencyContext>` in axum). When an earlier attempt with the same key died
//! part way (its process was killed, or it outlived its lease), the retry's claim is a
//! takeover: [`recovered`](IdempotencyContext::recovered) is true and
//! [`last_checkpoint`](IdempotencyContext::last_checkpoint) says how far the earlier attempt
//! got. Record a checkpoint after each effect with
//! [`checkpoint`](IdempotencyContext::checkpoint) (an async store write that also renews the
//! lease), and skip the effects a checkpoint covers: an effect that ran before a crash is then
//! not run again. The window between an effect and its checkpoint remains; close it by passing
//! [`client_key`](IdempotencyContext::client_key) on as the downstream system's own key.
//!
//! # Cancellation
//!
//! When the client disconnects mid-handler, the server drops the service future, handler
//! included. The layer cannot know whether the effect ran, so it does **not** release the key:
//! it stays in flight until its lease ends (retries meanwhile get 409), and the next retry
//! after that takes it over with `recovered()` set and the last checkpoint. Keep the lease
//! short enough for clients' retries, long enough for the handler (or checkpoint, which renews
//! it).
//!
//! # Counters, metrics, tracing
//!
//! [`IdempotencyLayer::metrics`] hands out the layer's [`Metrics`]: atomics for replays,
//! conflicts (409), mismatches (422), stored responses, releases, store errors, panics, and
//! failed attempts kept in flight for a resume.
//! With the feature `metrics`, each is also counted through the `metrics` facade under a stable
//! name (`idemstore_http_replays_total`, `idemstore_http_conflicts_total`,
//! `idemstore_http_mismatches_total`, `idemstore_http_stored_total`,
//! `idemstore_http_released_total`, `idemstore_http_store_errors_total`,
//! `idemstore_http_panics_total`, `idemstore_http_kept_for_resume_total`). With the feature `tracing`, each store call runs in a debug
//! span `idemstore_http` with the operation and a hash of the key (never the key itself: a
//! key may be a secret of the client's).
//!
//! # Stores
//!
//! `IdempotencyLayer::new(store)` takes any `S: DedupeStore + 'static` by value (a `Store`,
//! a `PgStore`); [`IdempotencyLayer::from_arc`] takes an `Arc<S>` already shared with the
//! rest of the service. The layer awaits the store's futures and never blocks a thread
//! itself; a `wait` or a durable write costs the runtime a parked task (`Store`'s futures are
//! woken by the store once their record is durable or their key changes).
//!
//! [`IdempotencyLayer::metrics`]: IdempotencyLayer::metrics

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
