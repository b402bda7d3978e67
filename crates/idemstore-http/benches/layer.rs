//! Requests per second and p50/p99 latency over loopback, through the `Idempotency-Key` layer
//! and without it, against the same trivial handler; and the same layer over Redis (a small
//! `DedupeStore` on `SET NX` plus a stored response, below) as the peer, in the same run.
//!
//! ```text
//! cargo bench -p idemstore-http --bench layer
//! ```
//!
//! Rows: the handler alone (the baseline, measured just before each layer row), then the layer over an
//! idemstore `Store` under `Durability::Periodic(100 ms)` and `Durability::Sync`, then the layer
//! over Redis without persistence and with `appendfsync always`; each layer row with new keys
//! (every request claims, runs the handler, stores the response) and with replays (every
//! request is a retry of a completed key). The Redis rows are skipped, with a message, when
//! `redis-server` is not installed (`apt-get install redis-server`).
//!
//! Client and server run in this one process on separate runtimes (2 worker threads each) and
//! share the machine's cores: on a small machine the client's own cost is part of every row,
//! so the ratios understate the layer's share of a server that has the cores to itself.
//!
//! Each round measures every row once, with a baseline run just before each layer row; the
//! table gives the median rate over the rounds and each row's median ratio to its neighbouring
//! baseline (the machine's load changes between rows, so ratios of neighbours are steadier
//! than ratios of far-apart runs).
//!
//! A last table calls the router in process (no sockets, one thread) with and without the
//! layer: the layer's own cost per request in nanoseconds, free of the client's share.
//!
//! Environment: `LAYER_BENCH_IN_PROCESS_CALLS` (default 200,000), `LAYER_BENCH_IN_PROCESS_ONLY`
//! (set: only that table), `LAYER_BENCH_ONLY` (only the layer rows whose name holds it), `LAYER_BENCH_REQUESTS` (requests per row, default 20,000),
//! `LAYER_BENCH_DURABLE_REQUESTS` (new keys per durable row, default 4,000; its replay row
//! replays them until it has sent about `LAYER_BENCH_REQUESTS`), `LAYER_BENCH_ROUNDS`
//! (default 3), `LAYER_BENCH_CONNECTIONS` (concurrent client connections, default 32),
//! `LAYER_BENCH_REDIS_SERVER` (path of `redis-server`).

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use hdrhistogram::Histogram;
use idemstore::{Claim, ClaimOptions, ClaimToken, Completed, DedupeStore, Durability, Entry, Options, Store};
use idemstore_http::IdempotencyLayer;

const BODY: &str = r#"{"customer":"c-7","amount_cents":1250}"#;

struct Settings {
    requests: usize,
    durable_requests: usize,
    connections: usize,
    rounds: usize,
}

#[derive(Default)]
struct Row {
    requests_per_sec: Vec<f64>,
    /// Each round's rate over the rate of the baseline measured just before it.
    vs_baseline: Vec<f64>,
    latencies_us: Option<Histogram<u64>>,
}

impl Row {
    fn add(&mut self, measured: Measured, baseline_rps: f64) {
        self.requests_per_sec.push(measured.requests_per_sec);
        self.vs_baseline.push(measured.requests_per_sec / baseline_rps);
        match &mut self.latencies_us {
            Some(all) => all.add(&measured.latencies_us).unwrap(),
            None => self.latencies_us = Some(measured.latencies_us),
        }
    }

    fn median_rps(&self) -> f64 {
        median(&self.requests_per_sec)
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

struct Measured {
    requests_per_sec: f64,
    requests: usize,
    elapsed_secs: f64,
    latencies_us: Histogram<u64>,
}

/// The trivial handler of every row: it takes the body (as any POST handler does; the layer
/// reads it anyway, to hash it, and a baseline that never read it would charge the body's read
/// to the layer) and answers a fixed 201.
async fn trivial(body: axum::body::Bytes) -> (StatusCode, &'static str) {
    assert_eq!(body.len(), BODY.len());
    (StatusCode::CREATED, r#"{"id":"ch_1","status":"succeeded"}"#)
}

/// One server under test, kept for every round.
struct Target {
    name: String,
    addr: SocketAddr,
    durable: bool,
    metrics: Option<Arc<idemstore_http::Metrics>>,
    /// What must outlive the server (its store directory, its redis-server).
    _keep: Box<dyn std::any::Any>,
}

fn main() {
    let settings = Settings {
        requests: env_usize("LAYER_BENCH_REQUESTS", 20_000),
        durable_requests: env_usize("LAYER_BENCH_DURABLE_REQUESTS", 4_000),
        connections: env_usize("LAYER_BENCH_CONNECTIONS", 32),
        rounds: env_usize("LAYER_BENCH_ROUNDS", 3).max(1),
    };
    println!(
        "workload: POST with a {} B JSON body and a 36 B key, a trivial handler answering 201 with 34 B; \
         {} requests per row ({} for the durable rows' new keys) over {} keep-alive connections, {} rounds; \
         server and client runtimes of 2 worker threads each, in one process on {} cores",
        BODY.len(),
        settings.requests,
        settings.durable_requests,
        settings.connections,
        settings.rounds,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    if std::env::var_os("LAYER_BENCH_IN_PROCESS_ONLY").is_some() {
        in_process(&settings);
        return;
    }
    let server_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let client_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let bench = Bench { server_rt, client_rt, settings };

    let baseline = bench.target_plain();
    let mut targets = Vec::new();
    for (name, durability) in
        [("Periodic(100ms)", Durability::Periodic(Duration::from_millis(100))), ("Sync", Durability::Sync)]
    {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Options { durability, ..Options::default() }).unwrap();
        let durable = matches!(durability, Durability::Sync);
        targets.push(bench.target_layer(
            format!("idemstore {name}"),
            IdempotencyLayer::new(store),
            durable,
            Box::new(dir),
        ));
    }
    if redis_server_available() {
        for (name, durable) in [("no persistence", false), ("appendfsync always", true)] {
            let dir = tempfile::tempdir().unwrap();
            let server = RedisServer::start(dir.path(), durable);
            let store = bench.client_rt.block_on(RedisStore::connect(&server.url));
            targets.push(bench.target_layer(
                format!("Redis {name}"),
                IdempotencyLayer::new(store),
                durable,
                Box::new((server, dir)),
            ));
        }
    } else {
        println!("redis-server not found: skipping the Redis rows (install it with: apt-get install redis-server)");
    }

    if let Ok(only) = std::env::var("LAYER_BENCH_ONLY") {
        targets.retain(|target| target.name.contains(only.as_str()));
    }
    // Warm every server (connections, allocator, the store's first segment) before measuring.
    for target in std::iter::once(&baseline).chain(&targets) {
        bench.drive(target.addr, &format!("{}-warmup", target.name), bench.settings.requests / 10);
    }

    let mut rows: Vec<(String, Row)> = Vec::new();
    let mut row = |name: String| -> usize {
        if let Some(at) = rows.iter().position(|(other, _)| *other == name) {
            return at;
        }
        rows.push((name, Row::default()));
        rows.len() - 1
    };
    let baseline_row = row("no layer".into());
    let mut plan = Vec::new();
    for target in &targets {
        plan.push((row(format!("layer, {}, new keys", target.name)), row(format!("layer, {}, replays", target.name))));
    }
    for round in 0..bench.settings.rounds {
        for (target, (new_row, replay_row)) in targets.iter().zip(&plan) {
            // A baseline just before each layer row, so each ratio compares neighbours in time
            // on a machine whose load changes.
            let base = bench.drive(baseline.addr, &format!("base-{round}-{}", target.name), bench.settings.requests);
            let base_rps = base.requests_per_sec;
            rows[baseline_row].1.add(base, base_rps);
            let new_keys = if target.durable { bench.settings.durable_requests } else { bench.settings.requests };
            let tag = format!("{}-{round}", target.name);
            rows[*new_row].1.add(bench.drive(target.addr, &tag, new_keys), base_rps);
            // The same keys again: every request is a replay (a full row of them).
            let mut replays = bench.drive(target.addr, &tag, new_keys);
            for _ in 1..(bench.settings.requests / new_keys.max(1)) {
                let more = bench.drive(target.addr, &tag, new_keys);
                replays.latencies_us.add(&more.latencies_us).unwrap();
                replays.requests += more.requests;
                replays.elapsed_secs += more.elapsed_secs;
                replays.requests_per_sec = replays.requests as f64 / replays.elapsed_secs;
            }
            rows[*replay_row].1.add(replays, base_rps);
        }
    }
    for target in &targets {
        if let Some(metrics) = &target.metrics {
            let counts = metrics.snapshot();
            assert_eq!(
                counts.conflicts + counts.mismatches + counts.released + counts.store_errors,
                0,
                "{}",
                target.name
            );
            assert!(counts.replayed > 0 && counts.stored > 0, "{}: {counts:?}", target.name);
        }
    }

    println!();
    println!(
        "{:<46} {:>9} {:>8} {:>8} {:>10} {:>8}",
        "row (median of rounds; latency over all)", "req/s", "p50 us", "p99 us", "/no layer", "/redis"
    );
    for (name, measured) in &rows {
        let peer = redis_peer(name).and_then(|peer| rows.iter().find(|(other, _)| *other == peer));
        let vs_redis =
            peer.map_or(String::from("-"), |(_, redis)| format!("{:.2}", measured.median_rps() / redis.median_rps()));
        let latencies = measured.latencies_us.as_ref();
        println!(
            "{:<46} {:>9.0} {:>8} {:>8} {:>10.2} {:>8}",
            name,
            measured.median_rps(),
            latencies.map_or(0, |h| h.value_at_quantile(0.5)),
            latencies.map_or(0, |h| h.value_at_quantile(0.99)),
            median(&measured.vs_baseline),
            vs_redis
        );
    }
    println!(
        "(/no layer: median over rounds of the row's rate over the baseline run just before it; \
         /redis: medians, against the Redis row of the same durability class)"
    );
    in_process(&bench.settings);
}

/// The layer's own CPU cost per request, without sockets: the router called in process
/// (`tower::ServiceExt::oneshot`) on one thread, with and without the layer. Steadier than the
/// loopback rows on a busy machine, and it says how many microseconds the layer adds.
fn in_process(settings: &Settings) {
    use tower::ServiceExt;
    let calls = env_usize("LAYER_BENCH_IN_PROCESS_CALLS", 200_000);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let durability = Durability::Periodic(Duration::from_millis(100));
    let store = Store::open(dir.path(), Options { durability, ..Options::default() }).unwrap();
    // `with_state` turns the handlers into routes once, as `axum::serve` does; a bare
    // `Router<()>` called with `oneshot` would build them (and apply the layer) on every call.
    let plain = Router::new().route("/charges", post(trivial)).with_state(());
    let layered = Router::new().route("/charges", post(trivial)).layer(IdempotencyLayer::new(store)).with_state(());
    let run = |router: &Router, prefix: &str| -> f64 {
        runtime.block_on(async {
            let start = Instant::now();
            for i in 0..calls {
                let request = axum::http::Request::post("/charges")
                    .header("idempotency-key", format!("{prefix}-{i:020}"))
                    .body(axum::body::Body::from(BODY))
                    .unwrap();
                let response = router.clone().oneshot(request).await.unwrap();
                assert_eq!(response.status(), StatusCode::CREATED);
                let _ = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
            }
            start.elapsed().as_nanos() as f64 / calls as f64
        })
    };
    let (mut plain_ns, mut new_ns, mut replay_ns) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..settings.rounds {
        plain_ns.push(run(&plain, &format!("p{round}")));
        new_ns.push(run(&layered, &format!("l{round}")));
        replay_ns.push(run(&layered, &format!("l{round}")));
    }
    let (plain_ns, new_ns, replay_ns) = (median(&plain_ns), median(&new_ns), median(&replay_ns));
    println!();
    println!("in process, no sockets, 1 thread, {calls} calls per row, median of {} rounds:", settings.rounds);
    println!("{:<46} {:>9} {:>12}", "row", "ns/call", "layer adds");
    println!("{:<46} {:>9.0} {:>12}", "no layer", plain_ns, "-");
    println!("{:<46} {:>9.0} {:>9.0} ns", "layer, idemstore Periodic(100ms), new keys", new_ns, new_ns - plain_ns);
    println!("{:<46} {:>9.0} {:>9.0} ns", "layer, idemstore Periodic(100ms), replays", replay_ns, replay_ns - plain_ns);
}

/// The Redis row an idemstore row is compared with: no persistence for `Periodic`,
/// `appendfsync always` for `Sync`.
fn redis_peer(row: &str) -> Option<String> {
    let phase = if row.ends_with("new keys") { "new keys" } else { "replays" };
    if row.contains("idemstore Periodic") {
        Some(format!("layer, Redis no persistence, {phase}"))
    } else if row.contains("idemstore Sync") {
        Some(format!("layer, Redis appendfsync always, {phase}"))
    } else {
        None
    }
}

struct Bench {
    server_rt: tokio::runtime::Runtime,
    client_rt: tokio::runtime::Runtime,
    settings: Settings,
}

impl Bench {
    fn serve(&self, router: Router) -> SocketAddr {
        self.server_rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
            addr
        })
    }

    fn target_plain(&self) -> Target {
        let addr = self.serve(Router::new().route("/charges", post(trivial)));
        Target { name: "no layer".into(), addr, durable: false, metrics: None, _keep: Box::new(()) }
    }

    fn target_layer<S: DedupeStore + 'static>(
        &self,
        name: String,
        layer: IdempotencyLayer<S>,
        durable: bool,
        keep: Box<dyn std::any::Any>,
    ) -> Target {
        let metrics = layer.metrics();
        let addr = self.serve(Router::new().route("/charges", post(trivial)).layer(layer));
        Target { name, addr, durable, metrics: Some(metrics), _keep: keep }
    }

    /// Sends `requests` POSTs with keys `{prefix}-{i}` over the configured number of
    /// connections; the same prefix sends the same keys, so a second call replays.
    fn drive(&self, addr: SocketAddr, prefix: &str, requests: usize) -> Measured {
        let connections = self.settings.connections;
        let url = Arc::new(format!("http://{addr}/charges"));
        // Row names hold spaces and parentheses; a bare key holds neither.
        let prefix = Arc::new(prefix.replace(|c: char| !c.is_ascii_alphanumeric(), "-"));
        self.client_rt.block_on(async {
            let start = Instant::now();
            let tasks: Vec<_> = (0..connections)
                .map(|connection| {
                    let (url, prefix) = (url.clone(), prefix.clone());
                    tokio::spawn(async move {
                        let client = reqwest::Client::builder().pool_max_idle_per_host(1).build().unwrap();
                        let mut latencies = Histogram::<u64>::new(3).unwrap();
                        for i in (connection..requests).step_by(connections) {
                            let key = format!("{prefix}-{i:020}");
                            let sent = Instant::now();
                            let response = client
                                .post(url.as_str())
                                .header("idempotency-key", key)
                                .body(BODY)
                                .send()
                                .await
                                .unwrap();
                            assert_eq!(response.status().as_u16(), 201);
                            let _ = response.bytes().await.unwrap();
                            latencies.record(sent.elapsed().as_micros() as u64).unwrap();
                        }
                        latencies
                    })
                })
                .collect();
            let mut latencies_us = Histogram::<u64>::new(3).unwrap();
            for task in tasks {
                latencies_us.add(task.await.unwrap()).unwrap();
            }
            let elapsed_secs = start.elapsed().as_secs_f64();
            Measured { requests_per_sec: requests as f64 / elapsed_secs, requests, elapsed_secs, latencies_us }
        })
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// The peer: the same layer over Redis.

/// A `DedupeStore` on Redis, enough for the layer's calls: a claim is one script (`SET NX PX`
/// of an in-flight value, or the value already there), a completion one script (the in-flight
/// value replaced by the stored response, keeping its request hash), a release a `DEL`. Values:
/// `I` + request hash (16 B) + lease end (ms, 8 B), or `D` + request hash + outcome. No fencing
/// of stale holders and no checkpoints: it is a peer for throughput, not a second backend.
struct RedisStore {
    connection: redis::aio::MultiplexedConnection,
    claim: redis::Script,
    complete: redis::Script,
}

const TTL_MS: u64 = 24 * 3600 * 1000;
const LEASE_MS: u64 = 30_000;
const REDIS_BACKEND_ID: u64 = 0x7265_6469_735f_6265;

const CLAIM_SCRIPT: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return redis.call('GET', KEYS[1])
";

const COMPLETE_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 1) ~= 'I' then return 0 end
redis.call('SET', KEYS[1], 'D' .. string.sub(v, 2, 17) .. ARGV[1], 'PX', ARGV[2])
return 1
";

fn redis_error(error: redis::RedisError) -> idemstore::Error {
    idemstore::Error::Io {
        context: "redis",
        path: "redis".into(),
        source: Arc::new(std::io::Error::other(error.to_string())),
    }
}

impl RedisStore {
    async fn connect(url: &str) -> RedisStore {
        let client = redis::Client::open(url).unwrap();
        let connection = client.get_multiplexed_async_connection().await.unwrap();
        RedisStore {
            connection,
            claim: redis::Script::new(CLAIM_SCRIPT),
            complete: redis::Script::new(COMPLETE_SCRIPT),
        }
    }
}

impl DedupeStore for RedisStore {
    fn claim_with(
        &self,
        key: &[u8],
        request: &[u8],
        options: ClaimOptions,
    ) -> impl Future<Output = idemstore::Result<Claim>> + Send {
        let mut connection = self.connection.clone();
        let mut invocation = self.claim.key(key);
        let hash = xxhash_rust::xxh3::xxh3_128(request).to_be_bytes();
        let lease_ms = options.lease.map_or(LEASE_MS, |lease| lease.as_millis() as u64);
        let lease_until = idemstore::system_time_to_ms(SystemTime::now()) + lease_ms;
        let mut in_flight = vec![b'I'];
        in_flight.extend_from_slice(&hash);
        in_flight.extend_from_slice(&lease_until.to_be_bytes());
        invocation.arg(in_flight).arg(options.ttl.map_or(TTL_MS, |ttl| ttl.as_millis() as u64));
        let key = key.to_vec();
        async move {
            let reply: redis::Value = invocation.invoke_async(&mut connection).await.map_err(redis_error)?;
            let value = match reply {
                redis::Value::Int(1) => {
                    let lease = idemstore::ms_to_system_time(lease_until);
                    return Ok(Claim::Acquired(ClaimToken::for_backend(REDIS_BACKEND_ID, &key, 1, false, None, lease)));
                }
                redis::Value::BulkString(value) => value,
                // Expired between the SET and the GET: as good as in flight for a moment.
                _ => return Ok(Claim::InProgress { lease_expires_at: SystemTime::now() }),
            };
            if value.len() < 17 || value[1..17] != hash {
                return Ok(Claim::Mismatch);
            }
            let now = SystemTime::now();
            match value[0] {
                b'D' => Ok(Claim::Completed(Completed {
                    outcome: value[17..].to_vec(),
                    completed_at: now,
                    claimed_at: now,
                    expires_at: now,
                })),
                _ => {
                    let lease_until = value.get(17..25).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes);
                    Ok(Claim::InProgress { lease_expires_at: idemstore::ms_to_system_time(lease_until) })
                }
            }
        }
    }

    fn complete(&self, token: &ClaimToken, outcome: &[u8]) -> impl Future<Output = idemstore::Result<()>> + Send {
        let mut connection = self.connection.clone();
        let mut invocation = self.complete.key(token.key());
        invocation.arg(outcome).arg(TTL_MS);
        async move {
            let stored: i64 = invocation.invoke_async(&mut connection).await.map_err(redis_error)?;
            if stored == 1 { Ok(()) } else { Err(idemstore::Error::StaleToken) }
        }
    }

    fn checkpoint(&self, _token: &ClaimToken, _phase: &[u8]) -> impl Future<Output = idemstore::Result<()>> + Send {
        std::future::ready(Ok(()))
    }

    fn release(&self, token: &ClaimToken) -> impl Future<Output = idemstore::Result<()>> + Send {
        let mut connection = self.connection.clone();
        let key = token.key().to_vec();
        async move {
            redis::cmd("DEL").arg(key).query_async::<i64>(&mut connection).await.map_err(redis_error)?;
            Ok(())
        }
    }

    fn get(&self, _key: &[u8]) -> impl Future<Output = idemstore::Result<Option<Entry>>> + Send {
        // The layer never reads a key's state on its own; the bench needs no more.
        std::future::ready(Ok(None))
    }

    fn remove(&self, key: &[u8]) -> impl Future<Output = idemstore::Result<()>> + Send {
        let mut connection = self.connection.clone();
        let key = key.to_vec();
        async move {
            redis::cmd("DEL").arg(key).query_async::<i64>(&mut connection).await.map_err(redis_error)?;
            Ok(())
        }
    }
}

/// A `redis-server` of our own on a free loopback port, killed on drop.
struct RedisServer {
    server: Child,
    url: String,
}

impl RedisServer {
    fn start(dir: &Path, durable: bool) -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut args: Vec<String> =
            ["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"].iter().map(|s| s.to_string()).collect();
        args.extend([dir.display().to_string(), "--save".into(), String::new(), "--loglevel".into(), "warning".into()]);
        if durable {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"].map(String::from));
        } else {
            args.extend(["--appendonly", "no"].map(String::from));
        }
        let server =
            Command::new(redis_server_path()).args(&args).stdout(Stdio::null()).spawn().expect("start redis-server");
        let url = format!("redis://127.0.0.1:{port}/");
        let client = redis::Client::open(url.as_str()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut connection) = client.get_connection()
                && redis::cmd("PING").query::<String>(&mut connection).is_ok()
            {
                break;
            }
            assert!(Instant::now() < deadline, "redis-server on port {port} did not answer within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisServer { server, url }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

fn redis_server_path() -> String {
    std::env::var("LAYER_BENCH_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

fn redis_server_available() -> bool {
    Command::new(redis_server_path())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}
