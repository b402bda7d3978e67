//! The tower layer and its service: one claim per keyed request, then the handler's response
//! stored for replay, or the key released.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, header, request};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use idemstore::{Claim, ClaimOptions, ClaimToken, Clock, DedupeStore, Error, SystemClock};
use tower_layer::Layer;
use tower_service::Service;

use crate::context::{CheckpointSink, IdempotencyContext, StoreSink};
use crate::encoding;
use crate::headers::{self, IDEMPOTENT_REPLAYED};
use crate::key::{self, KeyError};
use crate::metrics::{Event, Metrics};
use crate::problem::{problem, problem_body, types};

/// The error type bodies are boxed into.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body the wrapped service sees: the original body on requests the layer lets
/// through untouched, the buffered body on keyed requests.
pub type LayerRequestBody<B> = Either<B, Full<Bytes>>;

/// The response body the layer answers with: the handler's own body, or a buffered one
/// (a stored or replayed response, or a problem).
pub type LayerResponseBody<B> = Either<B, Full<Bytes>>;

type StorePolicy = Arc<dyn Fn(StatusCode) -> bool + Send + Sync>;
type FingerprintHook = Arc<dyn Fn(&request::Parts, &[u8]) -> Vec<u8> + Send + Sync>;
type ScopeHook = Arc<dyn Fn(&request::Parts) -> Vec<u8> + Send + Sync>;

/// The default storage policy: 2xx and 4xx responses are stored, except 408, 409 and 429,
/// which say "try again" and so must not be replayed; 1xx, 3xx and 5xx release the key, so
/// that the client's retry runs the handler again.
pub fn default_store_policy(status: StatusCode) -> bool {
    (status.is_success() || status.is_client_error())
        && status != StatusCode::REQUEST_TIMEOUT
        && status != StatusCode::CONFLICT
        && status != StatusCode::TOO_MANY_REQUESTS
}

#[derive(Clone)]
struct Config {
    methods: Vec<Method>,
    require_key: bool,
    max_key_len: usize,
    max_request_body_bytes: usize,
    max_response_body_bytes: usize,
    claim: ClaimOptions,
    store_policy: StorePolicy,
    fingerprint: Option<FingerprintHook>,
    scope: Option<ScopeHook>,
    clock: Arc<dyn Clock>,
}

/// A tower [`Layer`] that makes keyed requests idempotent over a [`DedupeStore`].
///
/// See the crate documentation for the behaviour; each builder method documents its default.
/// `S` is the store: `idemstore::Store`, an `Arc` of it, or another backend (an `Arc<PgStore>`
/// of `idemstore-postgres`, say). The store is shared by every service the layer makes.
pub struct IdempotencyLayer<S> {
    store: Arc<S>,
    config: Config,
    metrics: Arc<Metrics>,
}

impl<S> Clone for IdempotencyLayer<S> {
    fn clone(&self) -> Self {
        IdempotencyLayer { store: self.store.clone(), config: self.config.clone(), metrics: self.metrics.clone() }
    }
}

impl<S> std::fmt::Debug for IdempotencyLayer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("methods", &self.config.methods)
            .field("require_key", &self.config.require_key)
            .field("max_key_len", &self.config.max_key_len)
            .field("max_request_body_bytes", &self.config.max_request_body_bytes)
            .field("max_response_body_bytes", &self.config.max_response_body_bytes)
            .field("claim", &self.config.claim)
            .finish_non_exhaustive()
    }
}

/// Default cap on a keyed request's body (1 MiB).
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: usize = 1 << 20;
/// Default cap on a stored response's body (512 KiB: with its headers it stays under the
/// store's default `max_outcome_len` of 1 MiB).
pub const DEFAULT_MAX_RESPONSE_BODY_BYTES: usize = 512 << 10;
/// Default longest key (255 bytes, unquoted).
pub const DEFAULT_MAX_KEY_LEN: usize = 255;

impl<S: DedupeStore + 'static> IdempotencyLayer<S> {
    /// A layer over `store` with the defaults: POST and PATCH covered, a key optional, keys up
    /// to 255 bytes, request bodies up to 1 MiB, response bodies up to 512 KiB, the store's
    /// TTL and lease, no waiting (409 while the key is in flight).
    pub fn new(store: S) -> Self {
        Self::from_arc(Arc::new(store))
    }

    /// A layer over a store already shared through an `Arc`.
    pub fn from_arc(store: Arc<S>) -> Self {
        IdempotencyLayer {
            store,
            config: Config {
                methods: vec![Method::POST, Method::PATCH],
                require_key: false,
                max_key_len: DEFAULT_MAX_KEY_LEN,
                max_request_body_bytes: DEFAULT_MAX_REQUEST_BODY_BYTES,
                max_response_body_bytes: DEFAULT_MAX_RESPONSE_BODY_BYTES,
                claim: ClaimOptions::default(),
                store_policy: Arc::new(default_store_policy),
                fingerprint: None,
                scope: None,
                clock: Arc::new(SystemClock),
            },
            metrics: Arc::new(Metrics::default()),
        }
    }
}

impl<S> IdempotencyLayer<S> {
    /// The methods whose keyed requests are made idempotent (default POST and PATCH); other
    /// requests pass through untouched, with or without a key.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config.methods = methods.into_iter().collect();
        self
    }

    /// Whether a covered request without a key is refused with 400 (default false: it passes
    /// through, not deduplicated).
    pub fn require_key(mut self, require: bool) -> Self {
        self.config.require_key = require;
        self
    }

    /// The longest key accepted, in bytes after unquoting (default 255); a longer one gets 400.
    /// The store's own `Options::max_key_len` must hold it plus the scope and 8 bytes.
    pub fn max_key_len(mut self, bytes: usize) -> Self {
        self.config.max_key_len = bytes;
        self
    }

    /// The largest keyed request body (default 1 MiB); a larger one gets 413 and the handler
    /// does not run. The body is buffered to be hashed.
    pub fn max_request_body_bytes(mut self, bytes: usize) -> Self {
        self.config.max_request_body_bytes = bytes;
        self
    }

    /// The largest response body stored (default 512 KiB). A handler whose response is larger
    /// has run; its response is replaced with a 500 problem (`response-too-large`) that is
    /// stored, so every retry gets the same answer and the effect never runs twice. Set this
    /// above your largest response, and the store's `Options::max_outcome_len` above it.
    pub fn max_response_body_bytes(mut self, bytes: usize) -> Self {
        self.config.max_response_body_bytes = bytes;
        self
    }

    /// How long a key is kept (default: the store's `default_ttl`): at least the clients'
    /// retry horizon.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.claim.ttl = Some(ttl);
        self
    }

    /// How long a claim is held before a retry may take it over (default: the store's
    /// `default_lease`): above the handler's p99.9 duration, or renewed by checkpoints.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.claim.lease = Some(lease);
        self
    }

    /// When a request's key is in flight, wait up to `bound` for the first request to finish
    /// and answer with its response, instead of 409 at once (default: no wait). This is the
    /// store's `ClaimOptions::wait`: the `DedupeStore` contract has it park no thread, so a
    /// waiting request holds no runtime thread with a backend that keeps the contract.
    pub fn wait_for_in_flight(mut self, bound: Duration) -> Self {
        self.config.claim.wait = Some(bound);
        self
    }

    /// Which responses are stored for replay (default [`default_store_policy`]); the others
    /// release the key so that a retry runs the handler again.
    pub fn store_when(mut self, policy: impl Fn(StatusCode) -> bool + Send + Sync + 'static) -> Self {
        self.config.store_policy = Arc::new(policy);
        self
    }

    /// Chooses what of the body makes two requests the same (default: all its bytes): the hook
    /// returns the bytes to hash in place of the body, such as the fields that matter in a
    /// canonical order. Method and path (with query) always count.
    pub fn fingerprint_body(
        mut self,
        hook: impl Fn(&request::Parts, &[u8]) -> Vec<u8> + Send + Sync + 'static,
    ) -> Self {
        self.config.fingerprint = Some(Arc::new(hook));
        self
    }

    /// Makes the stored key composite: the hook's bytes (a tenant, an authenticated principal)
    /// and the client's key, each length-prefixed, so that two clients who pick the same key
    /// never see each other's responses (the draft's security considerations). The hook sees
    /// the request's parts, extensions included (set by an authentication layer outside this
    /// one).
    pub fn scope(mut self, hook: impl Fn(&request::Parts) -> Vec<u8> + Send + Sync + 'static) -> Self {
        self.config.scope = Some(Arc::new(hook));
        self
    }

    /// The clock `Retry-After` is computed with (default the system clock): give it the
    /// store's clock when the store runs on another one (tests with `ManualClock`).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.config.clock = clock;
        self
    }

    /// The layer's counters, shared by every service it makes and readable at any time.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }
}

impl<S: DedupeStore + 'static, I> Layer<I> for IdempotencyLayer<S> {
    type Service = IdempotencyService<S, I>;

    fn layer(&self, inner: I) -> Self::Service {
        IdempotencyService {
            inner,
            shared: Arc::new(Shared {
                store: self.store.clone(),
                sink: Arc::new(StoreSink(self.store.clone())),
                config: self.config.clone(),
                metrics: self.metrics.clone(),
            }),
        }
    }
}

struct Shared<S> {
    store: Arc<S>,
    sink: Arc<dyn CheckpointSink>,
    config: Config,
    metrics: Arc<Metrics>,
}

/// The service [`IdempotencyLayer`] wraps around a handler.
pub struct IdempotencyService<S, I> {
    inner: I,
    shared: Arc<Shared<S>>,
}

impl<S, I: Clone> Clone for IdempotencyService<S, I> {
    fn clone(&self) -> Self {
        IdempotencyService { inner: self.inner.clone(), shared: self.shared.clone() }
    }
}

impl<S, I: std::fmt::Debug> std::fmt::Debug for IdempotencyService<S, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyService").field("inner", &self.inner).finish_non_exhaustive()
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// What the service's future resolves to.
type Answer<B, E> = Result<Response<LayerResponseBody<B>>, E>;

impl<S, I, ReqB, ResB> Service<Request<ReqB>> for IdempotencyService<S, I>
where
    S: DedupeStore + 'static,
    I: Service<Request<LayerRequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    I::Future: Send + 'static,
    I::Error: Send + 'static,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<LayerResponseBody<ResB>>;
    type Error = I::Error;
    type Future = BoxFuture<Result<Self::Response, I::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        // The clone that was made ready is the one called (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        let config = &shared.config;
        if !config.methods.contains(request.method()) {
            return pass_through(&mut inner, request);
        }
        let client_key = match key::key_from_headers(request.headers(), config.max_key_len) {
            Ok(Some(client_key)) => client_key,
            Ok(None) if !config.require_key => return pass_through(&mut inner, request),
            Ok(None) => {
                return ready(problem(
                    StatusCode::BAD_REQUEST,
                    types::KEY_MISSING,
                    "Idempotency-Key is missing",
                    "this operation requires an Idempotency-Key header",
                ));
            }
            Err(error) => return ready(key_problem(&error)),
        };
        Box::pin(async move { shared.handle(inner, request, client_key).await })
    }
}

fn pass_through<I, ReqB, ResB>(inner: &mut I, request: Request<ReqB>) -> BoxFuture<Answer<ResB, I::Error>>
where
    I: Service<Request<LayerRequestBody<ReqB>>, Response = Response<ResB>>,
    I::Future: Send + 'static,
{
    let future = inner.call(request.map(Either::Left));
    Box::pin(async move { future.await.map(|response| response.map(Either::Left)) })
}

fn ready<B, E: Send + 'static>(response: Response<Full<Bytes>>) -> BoxFuture<Answer<B, E>>
where
    B: Send + 'static,
{
    Box::pin(std::future::ready(Ok(response.map(Either::Right))))
}

fn key_problem(error: &KeyError) -> Response<Full<Bytes>> {
    problem(StatusCode::BAD_REQUEST, types::KEY_INVALID, "Idempotency-Key is invalid", &error.to_string())
}

/// The answer to a store error (as the core's documentation maps them): the client's key
/// unusable is 400, a setting or a bug 500, a store that cannot write now 503.
fn store_problem(error: &Error) -> Response<Full<Bytes>> {
    let status = match error {
        Error::EmptyKey | Error::KeyTooLong { .. } => StatusCode::BAD_REQUEST,
        Error::StaleToken
        | Error::OutcomeTooLong { .. }
        | Error::InvalidArgument(_)
        | Error::ForeignToken
        | Error::ReadOnly => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let type_uri = if status == StatusCode::BAD_REQUEST { types::KEY_INVALID } else { types::STORE_UNAVAILABLE };
    let mut response =
        problem(status, type_uri, "The dedupe store failed; the request did not run", &error.to_string());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// Whole seconds until `until` (rounded up, at least 1): the `Retry-After` of a 409.
fn retry_after_secs(clock: &dyn Clock, until: SystemTime) -> u64 {
    let now_ms = clock.now_ms();
    let until_ms = idemstore::system_time_to_ms(until);
    until_ms.saturating_sub(now_ms).div_ceil(1000).max(1)
}

/// The bytes that make two requests "the same": method, path with query, and a 128-bit hash
/// of the body (or of what the fingerprint hook chose from it).
fn fingerprint(parts: &request::Parts, body: &[u8], hook: Option<&FingerprintHook>) -> Vec<u8> {
    let body_hash = match hook {
        Some(hook) => xxhash_rust::xxh3::xxh3_128(&hook(parts, body)),
        None => xxhash_rust::xxh3::xxh3_128(body),
    };
    let method = parts.method.as_str().as_bytes();
    let target = parts.uri.path_and_query().map_or("/", |target| target.as_str()).as_bytes();
    let mut out = Vec::with_capacity(method.len() + target.len() + 18);
    out.extend_from_slice(method);
    out.push(b' ');
    out.extend_from_slice(target);
    out.push(0);
    out.extend_from_slice(&body_hash.to_be_bytes());
    out
}

#[cfg(feature = "tracing")]
fn traced<F: Future>(future: F, operation: &'static str, store_key: &[u8]) -> impl Future<Output = F::Output> {
    use tracing::Instrument;
    // The key may be a secret of the client's (some use it as a bearer of the request): only
    // a hash of it goes into spans.
    let key_hash = xxhash_rust::xxh3::xxh3_64(store_key);
    future.instrument(tracing::debug_span!("idemstore_http", operation, key_hash = format_args!("{key_hash:016x}")))
}

#[cfg(not(feature = "tracing"))]
fn traced<F: Future>(future: F, _operation: &'static str, _store_key: &[u8]) -> F {
    future
}

impl<S: DedupeStore + 'static> Shared<S> {
    async fn handle<I, ReqB, ResB>(
        self: Arc<Self>,
        inner: I,
        request: Request<ReqB>,
        client_key: Vec<u8>,
    ) -> Result<Response<LayerResponseBody<ResB>>, I::Error>
    where
        I: Service<Request<LayerRequestBody<ReqB>>, Response = Response<ResB>>,
        ReqB: Body<Data = Bytes>,
        ReqB::Error: Into<BoxError>,
        ResB: Body<Data = Bytes>,
        ResB::Error: Into<BoxError>,
    {
        let config = &self.config;
        let (parts, body) = request.into_parts();
        let body = match Limited::new(body, config.max_request_body_bytes).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
                let detail = format!(
                    "a request with an Idempotency-Key carries at most {} bytes",
                    config.max_request_body_bytes
                );
                return Ok(right(problem(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    types::BODY_TOO_LARGE,
                    "Request body too large",
                    &detail,
                )));
            }
            Err(error) => {
                return Ok(right(problem(
                    StatusCode::BAD_REQUEST,
                    types::BODY_UNREADABLE,
                    "Request body unreadable",
                    &error.to_string(),
                )));
            }
        };
        let request_fingerprint = fingerprint(&parts, &body, config.fingerprint.as_ref());
        let scope = config.scope.as_ref().map(|hook| hook(&parts)).unwrap_or_default();
        let store_key = key::composite_key(&scope, &client_key);

        let claim =
            traced(self.store.claim_with(&store_key, &request_fingerprint, config.claim.clone()), "claim", &store_key)
                .await;
        let token = match claim {
            Ok(Claim::Acquired(token)) => token,
            Ok(Claim::Completed(completed)) => return Ok(right(self.replay(completed.outcome))),
            Ok(Claim::InProgress { lease_expires_at }) => {
                self.metrics.count(Event::Conflict);
                let mut response = problem(
                    StatusCode::CONFLICT,
                    types::KEY_IN_USE,
                    "A request with this Idempotency-Key is still being processed",
                    "retry after the time in Retry-After",
                );
                let seconds = retry_after_secs(config.clock.as_ref(), lease_expires_at);
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
                return Ok(right(response));
            }
            Ok(Claim::Mismatch) => {
                self.metrics.count(Event::Mismatch);
                return Ok(right(problem(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    types::KEY_REUSED,
                    "Idempotency-Key reused with a different request",
                    "this key was first used with another method, path or body; use a new key for a new request",
                )));
            }
            Err(error) => {
                self.metrics.count(Event::StoreError);
                return Ok(right(store_problem(&error)));
            }
        };

        // Boxed apart, so that the handler's future (often kilobytes) is not part of the
        // future of every request, replays and conflicts included.
        Box::pin(self.run_handler(inner, token, client_key, parts, body)).await
    }

    /// Runs the handler of a request that acquired its key, then stores its response or gives
    /// the key up.
    async fn run_handler<I, ReqB, ResB>(
        &self,
        mut inner: I,
        token: ClaimToken,
        client_key: Vec<u8>,
        parts: request::Parts,
        body: Bytes,
    ) -> Result<Response<LayerResponseBody<ResB>>, I::Error>
    where
        I: Service<Request<LayerRequestBody<ReqB>>, Response = Response<ResB>>,
        ResB: Body<Data = Bytes>,
        ResB::Error: Into<BoxError>,
    {
        let config = &self.config;
        let context = IdempotencyContext::new(token, client_key, self.sink.clone());
        let mut request = Request::from_parts(parts, Either::Right(Full::new(body)));
        request.extensions_mut().insert(context.clone());
        // A panic while the handler is called or polled is caught here and answered 500; the
        // key is given up (`give_up`) so that the client's retry runs again. If this future is
        // dropped instead (the client went away), nothing below runs: the key stays in flight
        // until its lease ends, then a retry takes it over, recovered.
        let outcome = AssertUnwindSafe(async { inner.call(request).await }).catch_unwind().await;
        let response = match outcome {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                self.give_up(&context).await;
                return Err(error);
            }
            Err(_panic) => {
                self.metrics.count(Event::Panic);
                self.give_up(&context).await;
                return Ok(right(handler_failed("the handler panicked")));
            }
        };
        let (mut parts, body) = response.into_parts();
        if !(config.store_policy)(parts.status) {
            self.give_up(&context).await;
            return Ok(Response::from_parts(parts, Either::Left(body)));
        }
        let collected =
            AssertUnwindSafe(Limited::new(body, config.max_response_body_bytes).collect()).catch_unwind().await;
        let body = match collected {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => {
                return Ok(right(self.store_oversized(&context, parts.status).await));
            }
            Ok(Err(_)) | Err(_) => {
                if collected.is_err() {
                    self.metrics.count(Event::Panic);
                }
                self.give_up(&context).await;
                return Ok(right(handler_failed("the handler's response body failed")));
            }
        };
        let hop_by_hop = headers::connection_options(&parts.headers);
        let keep = |name: &HeaderName| !headers::is_never_stored(name) && !hop_by_hop.contains(name);
        match encoding::encode(parts.status, &parts.headers, keep, &body) {
            Ok(outcome) => self.complete(&context, &outcome).await,
            // Not storable (a header over 64 KiB, more than `HEADERS_MAX` headers): the effect
            // ran, so the key is left in flight rather than released; a retry after the lease
            // is a recovered claim.
            Err(encoding::EncodeError(_)) => self.metrics.count(Event::StoreError),
        }
        parts.headers.remove(header::CONTENT_LENGTH);
        Ok(Response::from_parts(parts, Either::Right(Full::new(body))))
    }

    fn replay(&self, outcome: Vec<u8>) -> Response<Full<Bytes>> {
        match encoding::decode(outcome) {
            Ok(stored) => {
                self.metrics.count(Event::Replayed);
                let mut response = Response::new(Full::new(stored.body));
                *response.status_mut() = stored.status;
                *response.headers_mut() = stored.headers;
                response
                    .headers_mut()
                    .insert(HeaderName::from_static(IDEMPOTENT_REPLAYED), HeaderValue::from_static("true"));
                response
            }
            Err(error) => problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                types::STORED_RESPONSE_CORRUPT,
                "The stored response for this Idempotency-Key cannot be read",
                &error.to_string(),
            ),
        }
    }

    /// Stores the handler's answer. A failure leaves the key in flight (the effect ran, so a
    /// release would let a retry run it again at once); the client still gets its answer.
    async fn complete(&self, context: &IdempotencyContext, outcome: &[u8]) {
        let token = context.token();
        match traced(self.store.complete(token, outcome), "complete", token.key()).await {
            Ok(()) => self.metrics.count(Event::Stored),
            Err(_) => self.metrics.count(Event::StoreError),
        }
    }

    /// After a failed attempt (a response the policy does not store, a panic, a failed body):
    /// releases the key so that the retry runs at once, unless the claim carries a checkpoint.
    /// A checkpoint says effects ran, and a release would drop it with the key, so that the
    /// retry would run them again; such a claim is left in flight instead, and the retry after
    /// its lease takes it over with the checkpoint (`recovered()`), skipping those effects.
    async fn give_up(&self, context: &IdempotencyContext) {
        if context.last_checkpoint().is_some() {
            self.metrics.count(Event::KeptForResume);
        } else {
            self.release(context).await;
        }
    }

    async fn release(&self, context: &IdempotencyContext) {
        let token = context.token();
        match traced(self.store.release(token), "release", token.key()).await {
            Ok(()) => self.metrics.count(Event::Released),
            // The key stays in flight until its lease ends; nothing else to do.
            Err(_) => self.metrics.count(Event::StoreError),
        }
    }

    async fn store_oversized(&self, context: &IdempotencyContext, status: StatusCode) -> Response<Full<Bytes>> {
        let detail = format!(
            "the request ran (status {}), but its response is over the {} bytes this service stores; \
             every retry of this key gets this answer",
            status.as_u16(),
            self.config.max_response_body_bytes
        );
        let (status, title) = (StatusCode::INTERNAL_SERVER_ERROR, "Response too large to store");
        let body = problem_body(status, types::RESPONSE_TOO_LARGE, title, &detail);
        let mut response = Response::new(Full::new(body.clone()));
        *response.status_mut() = status;
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        match encoding::encode(status, response.headers(), |_| true, &body) {
            Ok(outcome) => self.complete(context, &outcome).await,
            Err(_) => self.metrics.count(Event::StoreError),
        }
        response
    }
}

fn handler_failed(detail: &str) -> Response<Full<Bytes>> {
    problem(StatusCode::INTERNAL_SERVER_ERROR, types::HANDLER_FAILED, "The request failed; retry it", detail)
}

fn right<B>(response: Response<Full<Bytes>>) -> Response<Either<B, Full<Bytes>>> {
    response.map(Either::Right)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_policy_stores_2xx_and_4xx_but_not_retry_later_answers() {
        for stored in [200, 201, 204, 400, 404, 410, 422] {
            assert!(default_store_policy(StatusCode::from_u16(stored).unwrap()), "{stored}");
        }
        for released in [100, 301, 304, 408, 409, 429, 500, 502, 503] {
            assert!(!default_store_policy(StatusCode::from_u16(released).unwrap()), "{released}");
        }
    }

    #[test]
    fn retry_after_rounds_up_and_is_at_least_one_second() {
        let clock = idemstore::ManualClock::new(10_000);
        let at = |ms| idemstore::ms_to_system_time(ms);
        assert_eq!(retry_after_secs(clock.as_ref(), at(10_000)), 1);
        assert_eq!(retry_after_secs(clock.as_ref(), at(5_000)), 1);
        assert_eq!(retry_after_secs(clock.as_ref(), at(10_001)), 1);
        assert_eq!(retry_after_secs(clock.as_ref(), at(12_001)), 3);
    }

    #[test]
    fn the_fingerprint_separates_method_target_and_body() {
        let parts =
            |method: &str, uri: &str| Request::builder().method(method).uri(uri).body(()).unwrap().into_parts().0;
        let base = fingerprint(&parts("POST", "/a?x=1"), b"body", None);
        assert_eq!(base, fingerprint(&parts("POST", "/a?x=1"), b"body", None));
        assert_ne!(base, fingerprint(&parts("PATCH", "/a?x=1"), b"body", None));
        assert_ne!(base, fingerprint(&parts("POST", "/a?x=2"), b"body", None));
        assert_ne!(base, fingerprint(&parts("POST", "/a?x=1"), b"bodY", None));
        let hook: FingerprintHook = Arc::new(|_, _| b"same".to_vec());
        assert_eq!(
            fingerprint(&parts("POST", "/a"), b"one", Some(&hook)),
            fingerprint(&parts("POST", "/a"), b"two", Some(&hook))
        );
    }
}

#[cfg(all(test, feature = "tracing"))]
mod tracing_tests {
    use std::fmt::Write as _;
    use std::sync::{Arc, Mutex};

    use futures_util::FutureExt;
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};

    /// Writes down every span's name and fields.
    struct Spans(Arc<Mutex<String>>);

    struct Fields<'a>(&'a mut String);

    impl Visit for Fields<'_> {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            let _ = write!(self.0, " {}={:?}", field.name(), value);
        }
    }

    impl Subscriber for Spans {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, span: &Attributes<'_>) -> Id {
            let mut seen = self.0.lock().unwrap();
            seen.push_str(span.metadata().name());
            span.record(&mut Fields(&mut seen));
            seen.push('\n');
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, _: &Event<'_>) {}
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    #[test]
    fn a_store_call_span_names_the_operation_and_a_hash_of_the_key_never_the_key() {
        let seen = Arc::new(Mutex::new(String::new()));
        let key = crate::key::composite_key(b"tenant-a", b"secret-client-key-1234");
        tracing::subscriber::with_default(Spans(seen.clone()), || {
            let answer = super::traced(async { 7 }, "claim", &key).now_or_never();
            assert_eq!(answer, Some(7));
        });
        let seen = seen.lock().unwrap().clone();
        let hash = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&key));
        assert!(seen.contains("idemstore_http") && seen.contains("claim") && seen.contains(&hash), "{seen}");
        assert!(!seen.contains("secret-client-key") && !seen.contains("tenant-a"), "{seen}");
    }
}
