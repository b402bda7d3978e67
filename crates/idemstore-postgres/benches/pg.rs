//! `PgStore` beside its peers on the same machine and server, in one run:
//!
//! - the plain SQL baseline: `INSERT .. ON CONFLICT (key) DO NOTHING` into a table of the
//!   same columns and indexes, one prepared statement per connection (what a claim costs at
//!   the least on PostgreSQL);
//! - Redis `SET key value NX PX ttl` (a redis-server started by the bench on a free port;
//!   skipped with a message when `redis-server` is missing);
//! - `PgStore` claims of fresh keys, and replays of completed keys with and without the local
//!   replay cache.
//!
//! Claims/s and latency percentiles from 1 thread (blocking calls) and 16 concurrent tasks
//! (the async trait; the baseline with 16 connections; Redis with 16 threads), under
//! `Durability::Sync` (commit waits for the WAL flush; the baseline's sessions likewise) and
//! `Periodic` (`synchronous_commit = off` for both). From 1 thread every engine is called
//! blocking from the bench's thread; from 16 tasks, async, through two stores: one made by
//! `PgStore::connect` (its own runtime) and one by `PgStore::connect_async` on the bench's
//! runtime (where the baseline's connections run too). Rounds alternate between the engines
//! and the median round is reported, since the machine is shared.
//!
//! Needs `IDEMSTORE_PG_URL` (`.ci/postgres.sh` shows how to start a throwaway server); prints
//! why and exits otherwise. `IDEMSTORE_PG_BENCH_CLAIMS` sets the claims per round (default 4000).
//!
//! Run: `IDEMSTORE_PG_URL=postgres://postgres@127.0.0.1:PORT/postgres cargo bench -p idemstore-postgres --bench pg`

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idemstore::{Claim, DedupeStore, Durability};
use idemstore_postgres::{PgOptions, PgStore, ReplayCacheLimits};

const ROUNDS: usize = 5;
const TASKS: usize = 16;

struct Run {
    ops: usize,
    wall: Duration,
    latencies: Vec<Duration>,
    /// WAL the server wrote during the run, per op (filled in by `measured`).
    wal_per_op: f64,
}

impl Run {
    fn per_op_us(&self) -> f64 {
        self.wall.as_secs_f64() * 1e6 / self.ops as f64
    }
    fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.wall.as_secs_f64()
    }
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
    }
}

/// The median run of several by wall time.
fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by_key(|run| run.wall);
    runs.swap_remove(runs.len() / 2)
}

fn unique(prefix: &str) -> String {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).expect("random bytes");
    format!("{prefix}_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

fn session_url(url: &str, durability: Durability) -> String {
    let commit = if durability == Durability::Sync { "on" } else { "off" };
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options=-c%20synchronous_commit%3D{commit}")
}

// ---------------------------------------------------------------------------------------------
// The plain SQL baseline

const BASELINE_INSERT: &str = "INSERT INTO {t} (key, request_hash, completed, fence, incarnation, recovered,
    claimed_at_ms, lease_ms, lease_until_ms, expires_at_ms)
VALUES ($1, $2, false, nextval('{t}_fence'), $3, false, 0, 30000, 30000, 86400000)
ON CONFLICT (key) DO NOTHING";

struct Baseline {
    url: String,
    table: String,
}

impl Baseline {
    async fn connect(&self) -> (tokio_postgres::Client, tokio_postgres::Statement) {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let statement = client.prepare(&BASELINE_INSERT.replace("{t}", &self.table)).await.expect("prepare");
        (client, statement)
    }

    /// One thread: a blocking call per insert from the bench's thread (`block_on`, as
    /// `PgStore`'s blocking methods do), so both pay the same hand-over to the runtime that
    /// drives the connection. 16 tasks: async on the bench's runtime, one connection each.
    fn run(&self, runtime: &tokio::runtime::Runtime, tasks: usize, claims: usize, round: usize) -> Run {
        if tasks == 1 {
            let (client, statement) = runtime.block_on(self.connect());
            let mut latencies = Vec::with_capacity(claims);
            let started = Instant::now();
            for i in 0..claims {
                let key = format!("r{round}-{i}").into_bytes();
                let hash = [7u8; 16];
                let at = Instant::now();
                runtime.block_on(client.execute(&statement, &[&key, &&hash[..], &1i64])).expect("insert");
                latencies.push(at.elapsed());
            }
            return Run { ops: claims, wall: started.elapsed(), latencies, wal_per_op: 0.0 };
        }
        runtime.block_on(async {
            let per_task = claims / tasks;
            let mut connections = Vec::new();
            for _ in 0..tasks {
                connections.push(self.connect().await);
            }
            let started = Instant::now();
            let mut handles = Vec::new();
            for (t, (client, statement)) in connections.into_iter().enumerate() {
                handles.push(tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(per_task);
                    for i in 0..per_task {
                        let key = format!("r{round}-t{t}-{i}").into_bytes();
                        let hash = [7u8; 16];
                        let at = Instant::now();
                        client.execute(&statement, &[&key, &&hash[..], &1i64]).await.expect("insert");
                        latencies.push(at.elapsed());
                    }
                    latencies
                }));
            }
            let mut latencies = Vec::new();
            for handle in handles {
                latencies.extend(handle.await.unwrap());
            }
            Run { ops: latencies.len(), wall: started.elapsed(), latencies, wal_per_op: 0.0 }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// PgStore

fn pg_claims_1(store: &PgStore, claims: usize, round: usize, prefix: &str) -> Run {
    let mut latencies = Vec::with_capacity(claims);
    let started = Instant::now();
    for i in 0..claims {
        let key = format!("{prefix}{round}-{i}");
        let at = Instant::now();
        let claim = store.claim(&key, b"POST /orders").expect("claim");
        latencies.push(at.elapsed());
        assert!(matches!(claim, Claim::Acquired(_)));
    }
    Run { ops: claims, wall: started.elapsed(), latencies, wal_per_op: 0.0 }
}

fn pg_claims_n(
    runtime: &tokio::runtime::Runtime,
    store: &Arc<PgStore>,
    claims: usize,
    round: usize,
    prefix: &'static str,
) -> Run {
    runtime.block_on(async {
        let per_task = claims / TASKS;
        let started = Instant::now();
        let handles: Vec<_> = (0..TASKS)
            .map(|t| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(per_task);
                    for i in 0..per_task {
                        let key = format!("{prefix}{round}-t{t}-{i}");
                        let at = Instant::now();
                        let claim = DedupeStore::claim(&*store, key.as_bytes(), b"POST /orders").await.expect("claim");
                        latencies.push(at.elapsed());
                        assert!(matches!(claim, Claim::Acquired(_)));
                    }
                    latencies
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for handle in handles {
            latencies.extend(handle.await.unwrap());
        }
        Run { ops: latencies.len(), wall: started.elapsed(), latencies, wal_per_op: 0.0 }
    })
}

fn replays(store: &PgStore, keys: &[String], passes: usize) -> Run {
    let mut latencies = Vec::with_capacity(keys.len() * passes);
    let started = Instant::now();
    for _ in 0..passes {
        for key in keys {
            let at = Instant::now();
            let claim = store.claim(key, b"POST /orders").expect("replay");
            latencies.push(at.elapsed());
            assert!(matches!(claim, Claim::Completed(_)));
        }
    }
    Run { ops: latencies.len(), wall: started.elapsed(), latencies, wal_per_op: 0.0 }
}

// ---------------------------------------------------------------------------------------------
// Redis

struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_redis() -> Option<Redis> {
    let dir = tempfile::tempdir().ok()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let redis = Redis { child, port, _dir: dir };
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(redis);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn redis_setnx(port: u16, threads: usize, claims: usize, round: usize) -> Run {
    let per_thread = claims / threads;
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
                stream.set_nodelay(true).unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                let mut line = String::new();
                let mut latencies = Vec::with_capacity(per_thread);
                for i in 0..per_thread {
                    let key = format!("r{round}-t{t}-{i}");
                    let command = format!(
                        "*6\r\n$3\r\nSET\r\n${}\r\n{key}\r\n$16\r\n0123456789abcdef\r\n$2\r\nNX\r\n$2\r\nPX\r\n$8\r\n86400000\r\n",
                        key.len()
                    );
                    let at = Instant::now();
                    writer.write_all(command.as_bytes()).unwrap();
                    line.clear();
                    reader.read_line(&mut line).unwrap();
                    latencies.push(at.elapsed());
                    assert_eq!(line, "+OK\r\n");
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for handle in handles {
        latencies.extend(handle.join().unwrap());
    }
    Run { ops: latencies.len(), wall: started.elapsed(), latencies, wal_per_op: 0.0 }
}

// ---------------------------------------------------------------------------------------------

fn report(name: &str, run: &Run) {
    println!(
        "{name:<56} {:>9.0} ops/s  {:>8.1} us/op  p50 {:>7.1} us  p99 {:>8.1} us  WAL {:>5.0} B/op",
        run.ops_per_s(),
        run.per_op_us(),
        run.percentile(0.50).as_secs_f64() * 1e6,
        run.percentile(0.99).as_secs_f64() * 1e6,
        run.wal_per_op
    );
}

/// The server's WAL insert position, in bytes.
fn wal_position(runtime: &tokio::runtime::Runtime, admin: &tokio_postgres::Client) -> i64 {
    runtime
        .block_on(admin.query_one("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8", &[]))
        .map(|row| row.get(0))
        .unwrap_or(0)
}

/// Runs `run` and notes the WAL the server wrote meanwhile.
fn measured(runtime: &tokio::runtime::Runtime, admin: &tokio_postgres::Client, run: impl FnOnce() -> Run) -> Run {
    let before = wal_position(runtime, admin);
    let mut result = run();
    result.wal_per_op = (wal_position(runtime, admin) - before) as f64 / result.ops as f64;
    result
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run a tiny round then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let Ok(url) = std::env::var("IDEMSTORE_PG_URL") else {
        println!("SKIPPED bench pg: IDEMSTORE_PG_URL is not set (see .ci/postgres.sh for a throwaway server)");
        return;
    };
    let claims: usize = std::env::var("IDEMSTORE_PG_BENCH_CLAIMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 160 } else { 4000 });
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let redis = start_redis();
    if redis.is_none() {
        println!("Redis: redis-server is missing or did not start; its rows are skipped");
    }
    println!("{claims} claims per round, median of {ROUNDS} rounds; {TASKS} tasks for the concurrent rows\n");

    let admin = runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    });
    let mut tables = Vec::new();
    for durability in [Durability::Sync, Durability::Periodic(Duration::from_secs(1))] {
        let label = if durability == Durability::Sync { "Sync" } else { "Periodic" };
        let table = unique("bench");
        let base_table = unique("bench_base");
        tables.push(table.clone());
        tables.push(base_table.clone());
        let options = PgOptions {
            table: table.clone(),
            durability,
            reap_interval: None,
            pool_size: TASKS,
            ..PgOptions::default()
        };
        let store = Arc::new(PgStore::connect(&url, options.clone()).expect("connect PgStore"));
        let store_async =
            Arc::new(runtime.block_on(PgStore::connect_async(&url, options)).expect("connect_async PgStore"));
        // The baseline's table: the same columns and indexes, made by the same schema script.
        runtime
            .block_on(admin.batch_execute(&idemstore_postgres::schema_sql(&base_table, durability).unwrap()))
            .unwrap();
        let baseline = Baseline { url: session_url(&url, durability), table: base_table };

        println!("== Durability::{label} ==");
        for (tasks, name) in [(1, "1 thread"), (TASKS, "16 tasks")] {
            let (mut base_runs, mut pg_runs, mut redis_runs) = (Vec::new(), Vec::new(), Vec::new());
            let mut pg_async_runs = Vec::new();
            for round in 0..ROUNDS {
                base_runs
                    .push(measured(&runtime, &admin, || baseline.run(&runtime, tasks, claims, round + 10 * tasks)));
                pg_runs.push(measured(&runtime, &admin, || {
                    if tasks == 1 {
                        pg_claims_1(&store, claims, round, "r")
                    } else {
                        pg_claims_n(&runtime, &store, claims, round + 100, "r")
                    }
                }));
                if tasks > 1 {
                    pg_async_runs.push(measured(&runtime, &admin, || {
                        pg_claims_n(&runtime, &store_async, claims, round + 200, "r")
                    }));
                }
                if let Some(redis) = &redis
                    && durability == Durability::Sync
                {
                    redis_runs.push(redis_setnx(redis.port, tasks, claims, round + 10 * tasks));
                }
            }
            let (base, pg) = (median(base_runs), median(pg_runs));
            report(&format!("plain SQL INSERT ON CONFLICT DO NOTHING, {name}"), &base);
            report(&format!("PgStore claim, {name}"), &pg);
            if !redis_runs.is_empty() {
                let redis = median(redis_runs);
                report(&format!("Redis SET NX PX, {name}"), &redis);
                println!("  ratio PgStore / Redis per claim: {:.2}x", pg.per_op_us() / redis.per_op_us());
            }
            println!(
                "  ratio PgStore / plain SQL per claim: {:.2}x (target <= 1.20x); p99 {:.2}x",
                pg.per_op_us() / base.per_op_us(),
                pg.percentile(0.99).as_secs_f64() / base.percentile(0.99).as_secs_f64()
            );
            if !pg_async_runs.is_empty() {
                let pg_async = median(pg_async_runs);
                report(&format!("PgStore claim, connect_async, {name}"), &pg_async);
                println!(
                    "  ratio PgStore (connect_async) / plain SQL per claim: {:.2}x (target <= 1.20x); p99 {:.2}x",
                    pg_async.per_op_us() / base.per_op_us(),
                    pg_async.percentile(0.99).as_secs_f64() / base.percentile(0.99).as_secs_f64()
                );
            }
        }
        println!();
    }

    // Replays: keys completed through one replica, replayed through another without and with
    // the local cache (whose first replay of each key goes to the database).
    let table = unique("bench_replay");
    tables.push(table.clone());
    let plain_options = PgOptions { table: table.clone(), reap_interval: None, ..PgOptions::default() };
    let writer = PgStore::connect(&url, plain_options.clone()).expect("connect");
    let keys: Vec<String> = (0..(claims / 4).max(10)).map(|i| format!("replay-{i}")).collect();
    for key in &keys {
        let Claim::Acquired(token) = writer.claim(key, b"POST /orders").unwrap() else { panic!("fresh key") };
        writer.complete(&token, vec![b'x'; 200]).unwrap();
    }
    let uncached = PgStore::connect(&url, plain_options.clone()).expect("connect");
    let cached =
        PgStore::connect(&url, PgOptions { replay_cache: Some(ReplayCacheLimits::default()), ..plain_options })
            .expect("connect");
    let passes = 10;
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        without.push(measured(&runtime, &admin, || replays(&uncached, &keys, passes)));
        with.push(measured(&runtime, &admin, || replays(&cached, &keys, passes)));
    }
    let (without, with) = (median(without), median(with));
    println!("== Replays of completed keys ({} keys x {passes} passes) ==", keys.len());
    report("PgStore replay, no cache (a round trip)", &without);
    report("PgStore replay, local replay cache", &with);
    let stats = cached.stats();
    let hit_rate = stats.cache_hits_total as f64 / (stats.cache_hits_total + stats.cache_misses_total) as f64;
    println!(
        "  cache hit rate {:.1}% ({} hits, {} misses over all rounds); replay through the cache {:.1}x faster than a round trip (target >= 10x)",
        hit_rate * 100.0,
        stats.cache_hits_total,
        stats.cache_misses_total,
        without.per_op_us() / with.per_op_us()
    );

    // The reaper: expired rows deleted per second, in batches of 1000.
    let reap_table = unique("bench_reap");
    tables.push(reap_table.clone());
    let reaper = PgStore::connect(
        &url,
        PgOptions {
            table: reap_table.clone(),
            reap_interval: None,
            durability: Durability::Periodic(Duration::from_secs(1)),
            ..PgOptions::default()
        },
    )
    .expect("connect");
    let rows = claims * 5;
    runtime
        .block_on(admin.execute(
            &format!(
                "INSERT INTO {reap_table} (key, request_hash, completed, fence, incarnation, recovered, claimed_at_ms,
                     lease_ms, lease_until_ms, expires_at_ms, value)
                 SELECT ('k' || g)::bytea, '\\x00000000000000000000000000000000', true, g, 1, false, 0, 1, 1, 1, 'x'
                 FROM generate_series(1, $1::int) g"
            ),
            &[&(rows as i32)],
        ))
        .unwrap();
    let started = Instant::now();
    let reaped = reaper.reap_expired().unwrap();
    let took = started.elapsed();
    println!(
        "\n== Expiry ==\nreaper: {reaped} expired rows deleted in {:.1} ms ({:.0} rows/s, batches of 1000)",
        took.as_secs_f64() * 1e3,
        reaped as f64 / took.as_secs_f64()
    );

    drop((writer, uncached, cached, reaper));
    runtime.block_on(async {
        for table in &tables {
            let _ = admin
                .batch_execute(&format!(
                    "DROP TABLE IF EXISTS {table}, {table}_identity, {table}_migrations; DROP SEQUENCE IF EXISTS {table}_fence;
                     DROP FUNCTION IF EXISTS {table}_claim; DROP TYPE IF EXISTS {table}_claim_result;"
                ))
                .await;
        }
    });
}
