//! The layer's behaviour, end to end: an axum server on loopback, driven by a real HTTP client
//! (reqwest). Each test starts its own server over its own store.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Router};

use idemstore::{DedupeStore, Durability, ManualClock, Options, Store};
use idemstore_http::{IdempotencyContext, IdempotencyLayer, Metrics};
use tokio::sync::{Notify, oneshot};

/// What the test handlers share with the test.
#[derive(Default)]
struct World {
    /// Effects run, by every handler.
    effects: AtomicU64,
    /// Opened by a test to let `/gated` finish.
    gate: Notify,
    /// `/gated` increments it once its effect ran (before waiting at the gate).
    entered: Notify,
    /// Calls of `/flaky`, which fails the first time.
    flaky_calls: AtomicU64,
    /// Told when a `/hold` handler's future is dropped.
    dropped: std::sync::Mutex<Option<oneshot::Sender<()>>>,
}

struct DropSignal(Arc<World>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(sender) = self.0.dropped.lock().unwrap().take() {
            let _ = sender.send(());
        }
    }
}

async fn effect(State(world): State<Arc<World>>, body: String) -> Response {
    let n = world.effects.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, format!("effect {n} of {body}")).into_response()
}

async fn gated(State(world): State<Arc<World>>) -> Response {
    let n = world.effects.fetch_add(1, Ordering::SeqCst) + 1;
    world.entered.notify_one();
    world.gate.notified().await;
    (StatusCode::CREATED, format!("gated effect {n}")).into_response()
}

async fn hold(State(world): State<Arc<World>>, claim: Option<Extension<IdempotencyContext>>) -> Response {
    let recovered = claim.is_some_and(|Extension(claim)| claim.recovered());
    if recovered {
        return (StatusCode::CREATED, "recovered").into_response();
    }
    let _signal = DropSignal(world.clone());
    world.effects.fetch_add(1, Ordering::SeqCst);
    world.entered.notify_one();
    std::future::pending::<()>().await;
    unreachable!()
}

async fn panics(State(world): State<Arc<World>>) -> Response {
    if world.flaky_calls.fetch_add(1, Ordering::SeqCst) == 0 {
        panic!("the handler fails on its first call");
    }
    world.effects.fetch_add(1, Ordering::SeqCst);
    (StatusCode::CREATED, "ran after the panic").into_response()
}

async fn flaky(State(world): State<Arc<World>>) -> Response {
    world.effects.fetch_add(1, Ordering::SeqCst);
    if world.flaky_calls.fetch_add(1, Ordering::SeqCst) == 0 {
        return (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response();
    }
    (StatusCode::CREATED, "worked the second time").into_response()
}

async fn cookie(State(world): State<Arc<World>>) -> Response {
    world.effects.fetch_add(1, Ordering::SeqCst);
    let mut headers = HeaderMap::new();
    headers.insert("set-cookie", "session=secret".parse().unwrap());
    headers.insert("www-authenticate", "Bearer".parse().unwrap());
    headers.insert("proxy-authenticate", "Basic".parse().unwrap());
    headers.insert("keep-alive", "timeout=5".parse().unwrap());
    headers.insert("x-custom", "kept".parse().unwrap());
    headers.insert("location", "/things/1".parse().unwrap());
    (StatusCode::CREATED, headers, "made").into_response()
}

/// Checkpoints its first step, then fails (500, or a panic with `?panic`) on the first attempt.
async fn steps(
    State(world): State<Arc<World>>,
    Extension(claim): Extension<IdempotencyContext>,
    uri: axum::http::Uri,
) -> Response {
    let resumed = claim.last_checkpoint();
    if resumed.is_none() {
        world.effects.fetch_add(1, Ordering::SeqCst);
        claim.checkpoint(b"step-1").await.unwrap();
        if uri.query() == Some("panic") {
            panic!("fails after step 1");
        }
        return (StatusCode::BAD_GATEWAY, "step 2 failed").into_response();
    }
    let resumed = String::from_utf8(resumed.unwrap()).unwrap();
    (StatusCode::CREATED, format!("resumed after {resumed}, recovered {}", claim.recovered())).into_response()
}

async fn big(State(world): State<Arc<World>>) -> Response {
    world.effects.fetch_add(1, Ordering::SeqCst);
    (StatusCode::OK, "x".repeat(4096)).into_response()
}

async fn whoami(claim: Option<Extension<IdempotencyContext>>) -> Response {
    match claim {
        Some(Extension(claim)) => {
            (StatusCode::OK, String::from_utf8_lossy(claim.client_key()).into_owned()).into_response()
        }
        None => (StatusCode::OK, "no claim").into_response(),
    }
}

struct Server {
    url: String,
    world: Arc<World>,
    metrics: Arc<Metrics>,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Server {
    fn post(&self, path: &str, key: Option<&str>, body: &'static str) -> reqwest::RequestBuilder {
        let request = self.client.post(format!("{}{path}", self.url)).body(body);
        match key {
            Some(key) => request.header("idempotency-key", key),
            None => request,
        }
    }

    fn effects(&self) -> u64 {
        self.world.effects.load(Ordering::SeqCst)
    }
}

fn store_options() -> Options {
    Options { durability: Durability::None, ..Options::default() }
}

async fn start(options: Options, configure: impl FnOnce(IdempotencyLayer<Store>) -> IdempotencyLayer<Store>) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options).unwrap();
    serve(configure(IdempotencyLayer::new(store)), dir).await
}

async fn serve<S: DedupeStore + 'static>(layer: IdempotencyLayer<S>, dir: tempfile::TempDir) -> Server {
    let metrics = layer.metrics();
    let world = Arc::new(World::default());
    let router = Router::new()
        .route("/effect", post(effect))
        .route("/other", post(effect))
        .route("/gated", post(gated))
        .route("/hold", post(hold))
        .route("/panic", post(panics))
        .route("/flaky", post(flaky))
        .route("/cookie", post(cookie))
        .route("/big", post(big))
        .route("/steps", post(steps))
        .route("/whoami", post(whoami).get(whoami))
        .route("/any", axum::routing::patch(effect).put(effect))
        .with_state(world.clone())
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    Server { url, world, metrics, client, _dir: dir }
}

async fn text(response: reqwest::Response) -> (StatusCode, HeaderMap, String) {
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
    let mut headers = HeaderMap::new();
    for (name, value) in response.headers() {
        headers.append(
            axum::http::HeaderName::from_bytes(name.as_str().as_bytes()).unwrap(),
            axum::http::HeaderValue::from_bytes(value.as_bytes()).unwrap(),
        );
    }
    (status, headers, response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_gets_the_stored_response_marked_replayed_and_the_effect_runs_once() {
    let server = start(store_options(), |layer| layer).await;
    let (status, headers, body) = text(server.post("/effect", Some("\"k-1\""), "pay 10").send().await.unwrap()).await;
    assert_eq!((status, body.as_str()), (StatusCode::CREATED, "effect 1 of pay 10"));
    assert!(headers.get("idempotent-replayed").is_none());
    // The bare-token form of the same key is the same key.
    for key in ["\"k-1\"", "k-1"] {
        let (status, headers, body) = text(server.post("/effect", Some(key), "pay 10").send().await.unwrap()).await;
        assert_eq!((status, body.as_str()), (StatusCode::CREATED, "effect 1 of pay 10"));
        assert_eq!(headers["idempotent-replayed"], "true");
    }
    assert_eq!(server.effects(), 1);
    let counts = server.metrics.snapshot();
    assert_eq!((counts.stored, counts.replayed), (1, 2));
    // PATCH is covered too; a PUT (not covered by default) runs every time.
    for method in [reqwest::Method::PATCH, reqwest::Method::PATCH, reqwest::Method::PUT, reqwest::Method::PUT] {
        let url = format!("{}/any", server.url);
        let response = server.client.request(method, url).header("idempotency-key", "k-2").send().await.unwrap();
        assert_eq!(response.status(), 201);
    }
    assert_eq!(server.effects(), 1 + 1 + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_run_the_effect_once_and_the_others_get_409_with_retry_after() {
    let server = start(store_options(), |layer| layer.lease(Duration::from_secs(30))).await;
    let server = Arc::new(server);
    let first = {
        let server = server.clone();
        tokio::spawn(async move { text(server.post("/gated", Some("dup"), "").send().await.unwrap()).await })
    };
    server.world.entered.notified().await;
    let duplicates: Vec<_> = (0..8)
        .map(|_| {
            let server = server.clone();
            tokio::spawn(async move { text(server.post("/gated", Some("dup"), "").send().await.unwrap()).await })
        })
        .collect();
    for duplicate in duplicates {
        let (status, headers, body) = duplicate.await.unwrap();
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(headers["content-type"], "application/problem+json");
        let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=30).contains(&retry_after), "Retry-After {retry_after}");
    }
    server.world.gate.notify_one();
    let (status, _, body) = first.await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::CREATED, "gated effect 1"));
    let (status, headers, body) = text(server.post("/gated", Some("dup"), "").send().await.unwrap()).await;
    assert_eq!(
        (status, body.as_str(), headers["idempotent-replayed"].to_str().unwrap()),
        (StatusCode::CREATED, "gated effect 1", "true")
    );
    assert_eq!(server.effects(), 1);
    assert_eq!(server.metrics.snapshot().conflicts, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_wait_concurrent_duplicates_all_get_the_first_response() {
    let dir = tempfile::tempdir().unwrap();
    // Plain `Store`: a waiting claim is a parked task, not a blocked runtime thread, so the
    // first request's handler runs on while eight duplicates wait.
    let store = Store::open(dir.path(), store_options()).unwrap();
    let layer = IdempotencyLayer::new(store).wait_for_in_flight(Duration::from_secs(15));
    let server = Arc::new(serve(layer, dir).await);
    let first = {
        let server = server.clone();
        tokio::spawn(async move { text(server.post("/gated", Some("wait"), "").send().await.unwrap()).await })
    };
    server.world.entered.notified().await;
    let duplicates: Vec<_> = (0..6)
        .map(|_| {
            let server = server.clone();
            tokio::spawn(async move { text(server.post("/gated", Some("wait"), "").send().await.unwrap()).await })
        })
        .collect();
    // Whether a duplicate is still waiting or arrives after the first finished, it gets the
    // first response: no timing assumption.
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.world.gate.notify_one();
    assert_eq!(first.await.unwrap().2, "gated effect 1");
    for duplicate in duplicates {
        let (status, headers, body) = duplicate.await.unwrap();
        assert_eq!(
            (status, body.as_str(), headers["idempotent-replayed"].to_str().unwrap()),
            (StatusCode::CREATED, "gated effect 1", "true")
        );
    }
    assert_eq!(server.effects(), 1);
    assert_eq!(server.metrics.snapshot().conflicts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_with_another_body_or_path_is_422_and_nothing_runs() {
    let server = start(store_options(), |layer| layer).await;
    assert_eq!(server.post("/effect", Some("m"), "pay 10").send().await.unwrap().status(), 201);
    for (path, body) in [("/effect", "pay 11"), ("/other", "pay 10"), ("/effect?x=1", "pay 10")] {
        let (status, headers, problem) = text(server.post(path, Some("m"), body).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{path} {body}");
        assert_eq!(headers["content-type"], "application/problem+json");
        assert!(problem.contains("idempotency-key-reused"), "{problem}");
    }
    assert_eq!(server.effects(), 1);
    assert_eq!(server.metrics.snapshot().mismatches, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fingerprint_hook_decides_which_fields_make_requests_the_same() {
    // Only the first line of the body counts (say, the amount; the rest a client timestamp).
    let server = start(store_options(), |layer| {
        layer.fingerprint_body(|_, body| body.split(|b| *b == b'\n').next().unwrap_or_default().to_vec())
    })
    .await;
    assert_eq!(server.post("/effect", Some("f"), "amount=5\nsent=1").send().await.unwrap().status(), 201);
    let (status, headers, body) =
        text(server.post("/effect", Some("f"), "amount=5\nsent=2").send().await.unwrap()).await;
    assert_eq!(
        (status, headers["idempotent-replayed"].to_str().unwrap(), body.as_str()),
        (StatusCode::CREATED, "true", "effect 1 of amount=5\nsent=1")
    );
    assert_eq!(server.post("/effect", Some("f"), "amount=6\nsent=1").send().await.unwrap().status(), 422);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_passes_through_or_is_400_with_require_key_and_other_methods_pass() {
    let open = start(store_options(), |layer| layer).await;
    assert_eq!(open.post("/effect", None, "a").send().await.unwrap().status(), 201);
    assert_eq!(open.post("/effect", None, "a").send().await.unwrap().status(), 201);
    assert_eq!(open.effects(), 2, "requests without a key are not deduplicated");

    let strict = start(store_options(), |layer| layer.require_key(true)).await;
    let (status, headers, body) = text(strict.post("/effect", None, "a").send().await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(body.contains("idempotency-key-missing"), "{body}");
    assert_eq!(strict.effects(), 0);
    // GET is not covered: it runs, key or not, and the handler sees no claim.
    let response = strict.client.get(format!("{}/whoami", strict.url)).header("idempotency-key", "g").send().await;
    assert_eq!(response.unwrap().text().await.unwrap(), "no claim");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_up_to_the_limit_are_accepted_and_longer_or_malformed_ones_are_400() {
    let server = start(store_options(), |layer| layer).await;
    let longest = "k".repeat(255);
    let response =
        server.client.post(format!("{}/whoami", server.url)).header("idempotency-key", format!("\"{longest}\""));
    assert_eq!(response.send().await.unwrap().text().await.unwrap(), longest);
    let too_long = "k".repeat(256);
    for key in [too_long.as_str(), "\"unterminated", "two words", "\"\""] {
        let (status, _, body) = text(server.post("/effect", Some(key), "").send().await.unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{key}: {body}");
        assert!(body.contains("idempotency-key-invalid"), "{body}");
    }
    let repeated = server
        .client
        .post(format!("{}/effect", server.url))
        .header("idempotency-key", "a")
        .header("idempotency-key", "b");
    assert_eq!(repeated.send().await.unwrap().status(), 400);
    assert_eq!(server.effects(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_over_the_cap_is_413_and_the_handler_does_not_run() {
    let server = start(store_options(), |layer| layer.max_request_body_bytes(1024)).await;
    let body: &'static str = Box::leak("b".repeat(1025).into_boxed_str());
    let (status, headers, problem) = text(server.post("/effect", Some("big"), body).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{problem}");
    assert_eq!(headers["content-type"], "application/problem+json");
    let at_cap: &'static str = Box::leak("b".repeat(1024).into_boxed_str());
    assert_eq!(server.post("/effect", Some("big"), at_cap).send().await.unwrap().status(), 201);
    assert_eq!(server.effects(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_answers_500_and_releases_the_key_so_the_retry_runs() {
    let server = start(store_options(), |layer| layer).await;
    let (status, _, body) = text(server.post("/panic", Some("p"), "").send().await.unwrap()).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(body.contains("handler-failed"), "{body}");
    let (status, headers, body) = text(server.post("/panic", Some("p"), "").send().await.unwrap()).await;
    assert_eq!((status, body.as_str()), (StatusCode::CREATED, "ran after the panic"));
    assert!(headers.get("idempotent-replayed").is_none(), "the retry ran, it was not a replay");
    let counts = server.metrics.snapshot();
    assert_eq!((counts.panics, counts.released, counts.stored), (1, 1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_is_passed_on_and_releases_the_key() {
    let server = start(store_options(), |layer| layer).await;
    let (status, _, body) = text(server.post("/flaky", Some("f"), "").send().await.unwrap()).await;
    assert_eq!((status, body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "try again"));
    let (status, _, body) = text(server.post("/flaky", Some("f"), "").send().await.unwrap()).await;
    assert_eq!((status, body.as_str()), (StatusCode::CREATED, "worked the second time"));
    let (_, headers, body) = text(server.post("/flaky", Some("f"), "").send().await.unwrap()).await;
    assert_eq!((headers["idempotent-replayed"].to_str().unwrap(), body.as_str()), ("true", "worked the second time"));
    assert_eq!(server.effects(), 2);
    assert_eq!(server.metrics.snapshot().released, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_dates_and_hop_by_hop_headers_are_not_replayed() {
    let server = start(store_options(), |layer| layer).await;
    let (_, first, _) = text(server.post("/cookie", Some("c"), "").send().await.unwrap()).await;
    assert_eq!(first["set-cookie"], "session=secret", "the first answer is the handler's own");
    let (status, replay, body) = text(server.post("/cookie", Some("c"), "").send().await.unwrap()).await;
    assert_eq!((status, body.as_str()), (StatusCode::CREATED, "made"));
    assert_eq!(replay["idempotent-replayed"], "true");
    assert_eq!(replay["x-custom"], "kept");
    assert_eq!(replay["location"], "/things/1");
    for stripped in ["set-cookie", "www-authenticate", "proxy-authenticate", "keep-alive"] {
        assert!(replay.get(stripped).is_none(), "{stripped} was replayed");
    }
    // The server sets a fresh Date on the replay: the first answer's is never stored.
    assert_eq!(replay.get_all("date").iter().count(), 1);
    assert_eq!(server.effects(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_over_the_cap_is_answered_500_to_every_retry_and_never_runs_twice() {
    let server = start(store_options(), |layer| layer.max_response_body_bytes(1024)).await;
    for attempt in 0..2 {
        let (status, headers, body) = text(server.post("/big", Some("b"), "").send().await.unwrap()).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "attempt {attempt}");
        assert!(body.contains("response-too-large"), "{body}");
        assert_eq!(headers.get("idempotent-replayed").is_some(), attempt == 1);
    }
    assert_eq!(server.effects(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_keeps_the_same_key_of_two_accounts_apart() {
    // Over an `Arc<Store>` this time: the store shared with the rest of the service.
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<Store> = Arc::new(Store::open(dir.path(), store_options()).unwrap());
    let layer = IdempotencyLayer::from_arc(store.clone())
        .scope(|parts| parts.headers.get("x-account").map(|v| v.as_bytes().to_vec()).unwrap_or_default());
    let server = serve(layer, dir).await;
    for account in ["alice", "bob", "alice"] {
        let response = server.post("/effect", Some("same"), "pay").header("x-account", account).send().await;
        assert_eq!(response.unwrap().status(), 201);
    }
    assert_eq!(server.effects(), 2, "alice's retry was a replay; bob's request ran");
    assert_eq!(server.metrics.snapshot().replayed, 1);
    // The stored keys are the composite ones, not the client's bare key.
    let alice = idemstore_http::key::composite_key(b"alice", b"same");
    assert!(matches!(Store::get(&store, &alice).unwrap(), Some(idemstore::Entry::Completed(_))));
    assert!(Store::get(&store, b"same").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_error_answers_503_and_the_handler_does_not_run() {
    // A disk budget smaller than one segment: every new claim is refused by the store.
    let options = Options { max_disk_bytes: 1, ..store_options() };
    let server = start(options, |layer| layer).await;
    let (status, headers, body) = text(server.post("/effect", Some("e"), "").send().await.unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(server.effects(), 0);
    assert_eq!(server.metrics.snapshot().store_errors, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_stored_response_is_a_500_problem_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), store_options()).unwrap());
    // The key and fingerprint the layer computes for `POST /effect` with an empty body and key
    // "c", completed with bytes the layer did not write.
    let key = idemstore_http::key::composite_key(b"", b"c");
    let mut request = b"POST /effect\0".to_vec();
    request.extend_from_slice(&xxhash_rust::xxh3::xxh3_128(b"").to_be_bytes());
    let idemstore::Claim::Acquired(token) = Store::claim(&store, &key, &request).unwrap() else { panic!() };
    Store::complete(&store, &token, b"IH\x01\x00").unwrap();

    let world = Arc::new(World::default());
    let router =
        Router::new().route("/effect", post(effect)).with_state(world.clone()).layer(IdempotencyLayer::from_arc(store));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/effect", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let response = reqwest::Client::new().post(url).header("idempotency-key", "c").send().await.unwrap();
    let (status, _, body) = text(response).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(body.contains("stored-response-corrupt"), "{body}");
    assert_eq!(world.effects.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_handler_leaves_the_key_in_flight_until_the_lease_ends() {
    let clock = ManualClock::new(1_800_000_000_000);
    let options = Options { clock: clock.clone(), background: false, ..store_options() };
    let server = start(options, |layer| layer.lease(Duration::from_secs(60)).clock(clock.clone())).await;
    let (dropped_tx, dropped_rx) = oneshot::channel();
    *server.world.dropped.lock().unwrap() = Some(dropped_tx);

    // The client gives up while the handler runs: its connection closes.
    let gives_up = server.post("/hold", Some("h"), "").timeout(Duration::from_millis(300)).send();
    let entered = server.world.entered.notified();
    let (result, ()) = tokio::join!(gives_up, entered);
    assert!(result.is_err(), "the client timed out");
    tokio::time::timeout(Duration::from_secs(10), dropped_rx)
        .await
        .expect("the server drops the handler's future when the client goes away")
        .unwrap();

    // The effect may have run, so the key stays claimed: a retry within the lease is 409...
    let (status, headers, _) = text(server.post("/hold", Some("h"), "").send().await.unwrap()).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(headers["retry-after"], "60");
    // ...and after it, the retry takes the claim over, told that it is recovering.
    clock.advance(Duration::from_secs(61));
    let (status, _, body) = text(server.post("/hold", Some("h"), "").send().await.unwrap()).await;
    assert_eq!((status, body.as_str()), (StatusCode::CREATED, "recovered"));
    assert_eq!(server.effects(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_after_a_checkpoint_keeps_the_key_for_a_resume_instead_of_releasing_it() {
    for path in ["/steps", "/steps?panic"] {
        let clock = ManualClock::new(1_800_000_000_000);
        let options = Options { clock: clock.clone(), background: false, ..store_options() };
        let server = start(options, |layer| layer.lease(Duration::from_secs(20)).clock(clock.clone())).await;
        let (status, _, _) = text(server.post(path, Some("s"), "").send().await.unwrap()).await;
        assert!(status.is_server_error(), "{path}: {status}");
        // Step 1 ran: releasing would drop its checkpoint and let the retry run it again.
        let (status, headers, _) = text(server.post(path, Some("s"), "").send().await.unwrap()).await;
        assert_eq!((status, headers["retry-after"].to_str().unwrap()), (StatusCode::CONFLICT, "20"), "{path}");
        clock.advance(Duration::from_secs(21));
        let (status, _, body) = text(server.post(path, Some("s"), "").send().await.unwrap()).await;
        assert_eq!((status, body.as_str()), (StatusCode::CREATED, "resumed after step-1, recovered true"), "{path}");
        assert_eq!(server.effects(), 1, "{path}");
        let counts = server.metrics.snapshot();
        assert_eq!((counts.kept_for_resume, counts.released, counts.stored), (1, 0, 1), "{path}");
    }
}
