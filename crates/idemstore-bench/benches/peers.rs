//! idemstore side by side with Redis, SQLite and redb on one workload.
//!
//! The workload, the same on every engine, is the life of an idempotency key: insert-if-absent
//! of random 16-byte keys with a 24 h TTL (the claim, before the effect), then the 64-byte
//! outcome stored for each (the complete, after it), then replays of the stored outcomes (in
//! the order the keys were written, then in random order, as retries come);
//! durable (every acknowledged write survives power loss) and non-durable; 1 and 16 threads
//! (Redis: 16 clients, each with its own connection). It prints one markdown table with ops/s,
//! p50/p99 latency (hdrhistogram; non-durable rows time one op in [`LATENCY_SAMPLE`], so the
//! clock reads do not count against ops/s), RAM per key, disk per key and the ratio
//! idemstore ÷ peer; a derived row adds insert and complete per key.
//!
//! - **idemstore**: insert = `claim(key, request)` (writes the key and a 128-bit request hash),
//!   complete = `complete(token, outcome)`, replay = `claim` again, answered `Completed` with
//!   the outcome. `Durability::Sync` / `Durability::None`.
//! - **Redis**: insert `SET key pending NX PX 86400000`, complete `SET key outcome XX KEEPTTL`,
//!   replay `GET key`, over loopback through the
//!   `redis` crate. The bench starts its own `redis-server` on a free loopback port in a temp
//!   dir for every row (`--save "" --appendonly no`, or `--appendonly yes --appendfsync always`
//!   for durable) and kills it afterwards; without `redis-server` the Redis rows are skipped.
//! - **SQLite** (rusqlite, bundled): WAL, `synchronous=FULL` / `OFF`, table
//!   `k(key BLOB PRIMARY KEY, val BLOB, exp INTEGER) WITHOUT ROWID`, insert
//!   `INSERT INTO k(key,val,exp) VALUES(?,?,?) ON CONFLICT DO NOTHING` (val `pending`), complete
//!   `UPDATE k SET val=? WHERE key=?`, replay
//!   `SELECT val FROM k WHERE key=? AND exp>?`; one connection per thread, writes serialized by
//!   an in-process mutex (SQLite has one writer; this spares it the busy handler's sleeps).
//! - **redb**: `TableDefinition<&[u8], &[u8]>`, one write transaction per insert (get, insert
//!   if absent, commit) and per complete (rewrite the value), `Durability::Immediate` /
//!   `Durability::None`, value = 8-byte expiry + `pending` or the outcome; replay in a read
//!   transaction, checking the expiry.
//!
//! Two last phases insert fresh keys [`BATCH`] at a time, then complete them as many at a time,
//! the way each engine batches writes: idemstore `claim_many` / `complete_many` (one sync per
//! call under `Sync`), a Redis pipeline of `SET NX PX` / `SET XX KEEPTTL` (one
//! `appendfsync always` write per pipeline), one SQLite transaction, one redb write
//! transaction. Their latency columns are per batch.
//!
//! Every answer is checked (an insert of a new key must insert, a replay must return the
//! outcome), and each row runs in a child process of its own with a fresh data dir, so RAM is
//! measured without another row's leftovers: RSS (`RssAnon`) growth over the insert and complete phases for
//! the in-process engines, `INFO memory` `used_memory` growth for Redis. Disk per key is the
//! allocated size of the data dir after the row, divided by the keys (it includes each
//! engine's preallocation, which dominates at small key counts).
//!
//! Run: `cargo bench -p idemstore-bench --bench peers` (about 2-3 minutes). Knobs: `PEERS_KEYS`
//! (keys per non-durable row, default 200,000), `PEERS_DURABLE_KEYS` (default 5,000),
//! `PEERS_REPLAYS` (replays per row, at least one per key, default 100,000), `PEERS_PHASE_SECS`
//! (cap on the insert and replay phases, default 20), `PEERS_ENGINES` (comma-separated subset of
//! `idemstore,redis,sqlite,redb`), `PEERS_REDIS_SERVER` (path of `redis-server`),
//! `IDEMSTORE_BENCH_DIR` (where the temp dirs go, default the system temp dir).

use std::collections::{BTreeMap, VecDeque};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use idemstore::{Claim, ClaimOptions, ClaimToken, Options, Store};

// The helpers the root crate's benches share (key generation, temp dirs, histograms, disk
// accounting), compiled into this bench too so that both measure alike.
#[path = "../../../benches/support/mod.rs"]
mod support;
use support::*;

/// Environment variable that makes this binary run one row as a child.
const CHILD_ENV: &str = "PEERS_CHILD";
/// What a peer stores at insert, before the outcome exists (idemstore's claim stores the
/// request's hash).
const PENDING: &str = "pending";
/// The outcome stored for every key.
const OUTCOME: [u8; 64] = [0x6F; 64];
/// Request bytes of every idemstore claim (only their hash is stored).
const REQUEST: &[u8] = b"POST /payments amount=100";
/// TTL of every key.
const TTL: Duration = Duration::from_secs(24 * 3600);
/// Thread (client) counts.
const THREADS: [usize; 2] = [1, 16];
/// Keys per call, pipeline or transaction in the batched insert phase.
const BATCH: usize = 64;
/// A non-durable row times one op in this many for its latency figures (see `timed_phase`).
const LATENCY_SAMPLE: usize = 8;
/// Every engine, in table order (the ratios are idemstore's row ÷ each engine's).
const ENGINES: [&str; 4] = ["idemstore", "redis", "sqlite", "redb"];

fn main() {
    if let Ok(job) = std::env::var(CHILD_ENV) {
        let row = RowSpec::parse(&job);
        let result = run_row(&row);
        let pairs: Vec<String> = result.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("RESULT {}", pairs.join(" "));
        return;
    }

    let keys_fast = env_u64("PEERS_KEYS", 200_000);
    let keys_durable = env_u64("PEERS_DURABLE_KEYS", 5_000);
    let replays = env_u64("PEERS_REPLAYS", 100_000);
    let phase_secs = env_u64("PEERS_PHASE_SECS", 20);
    let wanted: Vec<String> = std::env::var("PEERS_ENGINES").map_or_else(
        |_| ENGINES.iter().map(|e| e.to_string()).collect(),
        |v| v.split(',').map(str::to_string).collect(),
    );
    let mut engines: Vec<&str> = ENGINES.iter().copied().filter(|e| wanted.iter().any(|w| w == e)).collect();
    if engines.contains(&"redis") && !redis_server_available() {
        println!("redis-server not found: skipping the Redis rows; install it with: apt-get install redis-server");
        engines.retain(|e| *e != "redis");
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());

    println!("# peers: idemstore vs Redis, SQLite and redb");
    println!();
    println!(
        "workload: insert-if-absent of random 16-byte keys, TTL 24 h, outcome 64 B; then replays of the stored outcome \
         ({replays} per row, at least one per key, round-robin). Non-durable rows: {keys_fast} keys; durable rows: \
         {keys_durable} keys; threads/clients 1 and 16 (keys split between them); each timed phase capped at {phase_secs} s; \
         latency of every durable op and of one non-durable op in {LATENCY_SAMPLE}; {cpus} CPUs; data dirs under {}; one child process and a fresh data dir per row",
        bench_parent_dir().display()
    );
    println!(
        "durable = idemstore Sync, Redis appendfsync always, SQLite WAL synchronous=FULL, redb Durability::Immediate; \
         non-durable = idemstore None, Redis without persistence, SQLite WAL synchronous=OFF, redb Durability::None"
    );
    println!();

    let mut table: Vec<TableRow> = Vec::new();
    for durable in [false, true] {
        for threads in THREADS {
            let keys = if durable { keys_durable } else { keys_fast };
            for engine in &engines {
                let spec = RowSpec { engine: engine.to_string(), durable, threads, keys, replays, phase_secs };
                eprintln!("running {}", spec.encode());
                let r = run_child(&spec);
                table.extend(TableRow::from_result(&spec, &r));
            }
        }
    }

    println!(
        "| phase | durability | threads | engine | ops | ops/s | p50 µs | p99 µs | RAM B/key | disk B/key | idemstore ÷ engine |"
    );
    println!("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in &table {
        let ratio = table
            .iter()
            .find(|r| {
                r.engine == "idemstore" && r.durable == row.durable && r.threads == row.threads && r.phase == row.phase
            })
            .map_or_else(|| "—".to_string(), |ours| format!("{:.2}", ours.ops_per_s / row.ops_per_s));
        let opt = |v: Option<f64>| v.map_or_else(|| "—".to_string(), |v| format!("{v:.1}"));
        println!(
            "| {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} |",
            row.phase.label(),
            if row.durable { "durable" } else { "non-durable" },
            row.threads,
            row.engine,
            row.ops,
            row.ops_per_s,
            opt(row.p50_us),
            opt(row.p99_us),
            opt(row.ram_bytes_per_key),
            row.disk.clone(),
            ratio,
        );
    }
    println!();
    println!(
        "RAM B/key: growth over the insert and complete phases of the process's RssAnon (idemstore, SQLite, redb; \
         includes their caches; the bench's own buffers are allocated before and idemstore's tokens freed before it \
         is read) or of Redis used_memory, divided by the keys inserted. disk B/key: allocated bytes of the data dir after \
         the row ÷ every key the row wrote, batched ones included (idemstore's includes its segment preallocation; Redis non-durable persists nothing). \
         claim + complete: an engine's insert and complete times added per key (the whole life of an idempotency key)."
    );
}

/// One row to run: an engine, a durability, a thread count and a key count.
#[derive(Debug, Clone)]
struct RowSpec {
    engine: String,
    durable: bool,
    threads: usize,
    keys: u64,
    replays: u64,
    phase_secs: u64,
}

impl RowSpec {
    fn encode(&self) -> String {
        format!(
            "{}:{}:{}:{}:{}:{}",
            self.engine,
            if self.durable { "durable" } else { "nondurable" },
            self.threads,
            self.keys,
            self.replays,
            self.phase_secs
        )
    }

    fn parse(job: &str) -> RowSpec {
        let parts: Vec<&str> = job.split(':').collect();
        assert_eq!(parts.len(), 6, "PEERS_CHILD is engine:durability:threads:keys:replays:phase_secs");
        RowSpec {
            engine: parts[0].to_string(),
            durable: parts[1] == "durable",
            threads: parts[2].parse().expect("threads"),
            keys: parts[3].parse().expect("keys"),
            replays: parts[4].parse().expect("replays"),
            phase_secs: parts[5].parse().expect("phase secs"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Insert,
    Complete,
    Both,
    Replay,
    RandomReplay,
    BatchInsert,
    BatchComplete,
    BatchBoth,
}

impl Phase {
    fn label(self) -> String {
        match self {
            Phase::Insert => "insert-if-absent".into(),
            Phase::Complete => "complete (store the outcome)".into(),
            Phase::Both => "claim + complete (derived)".into(),
            Phase::Replay => format!("replay {} B", OUTCOME.len()),
            Phase::RandomReplay => format!("replay {} B, keys in random order", OUTCOME.len()),
            Phase::BatchInsert => format!("insert-if-absent, {BATCH} a batch (latency per batch)"),
            Phase::BatchComplete => format!("complete, {BATCH} a batch (latency per batch)"),
            Phase::BatchBoth => format!("claim + complete, {BATCH} a batch (derived)"),
        }
    }
}

/// One line of the printed table.
struct TableRow {
    phase: Phase,
    durable: bool,
    threads: usize,
    engine: String,
    ops: u64,
    ops_per_s: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    ram_bytes_per_key: Option<f64>,
    disk: String,
}

impl TableRow {
    fn from_result(spec: &RowSpec, r: &BTreeMap<String, f64>) -> Vec<TableRow> {
        let keys = r["inserted"].max(1.0);
        let ram = r.get("ram_bytes").map(|b| b / keys);
        // The data dir is measured after the row: it holds the batched phases' keys too.
        let keys_on_disk = (r["inserted"] + r["batch_ops"]).max(1.0);
        let disk = if spec.engine == "redis" && !spec.durable {
            "0 (not persisted)".to_string()
        } else {
            format!("{:.1}", r["disk_bytes"] / keys_on_disk)
        };
        let row = |phase: Phase, prefix: &str, ram: Option<f64>, disk: String| TableRow {
            phase,
            durable: spec.durable,
            threads: spec.threads,
            engine: spec.engine.clone(),
            ops: r[&format!("{prefix}_ops")] as u64,
            ops_per_s: r[&format!("{prefix}_ops_per_s")],
            p50_us: Some(r[&format!("{prefix}_p50_ns")] / 1e3),
            p99_us: Some(r[&format!("{prefix}_p99_ns")] / 1e3),
            ram_bytes_per_key: ram,
            disk,
        };
        // Insert and complete per key, added: the whole life of a key.
        let both = |phase: Phase, insert: &str, complete: &str| TableRow {
            phase,
            durable: spec.durable,
            threads: spec.threads,
            engine: spec.engine.clone(),
            ops: r[&format!("{complete}_ops")] as u64,
            ops_per_s: 1.0 / (1.0 / r[&format!("{insert}_ops_per_s")] + 1.0 / r[&format!("{complete}_ops_per_s")]),
            p50_us: None,
            p99_us: None,
            ram_bytes_per_key: None,
            disk: "—".into(),
        };
        vec![
            row(Phase::Insert, "insert", ram, disk),
            row(Phase::Complete, "complete", None, "—".into()),
            both(Phase::Both, "insert", "complete"),
            row(Phase::Replay, "replay", None, "—".into()),
            row(Phase::RandomReplay, "random_replay", None, "—".into()),
            row(Phase::BatchInsert, "batch", None, "—".into()),
            row(Phase::BatchComplete, "batch_complete", None, "—".into()),
            both(Phase::BatchBoth, "batch", "batch_complete"),
        ]
    }
}

/// Runs this binary as a child for one row and parses its `RESULT` line.
fn run_child(spec: &RowSpec) -> BTreeMap<String, f64> {
    let mut command = Command::new(std::env::current_exe().expect("path of this bench binary"));
    command.env(CHILD_ENV, spec.encode());
    run_child_command(command, &format!("row {}", spec.encode()))
}

/// What each engine does; a `Handle` is one thread's connection or state.
trait Engine: Sync {
    type Handle;
    fn handle(&self) -> Self::Handle;
    /// Inserts `key` if absent; true when it was inserted.
    fn insert(&self, handle: &mut Self::Handle, key: &[u8; 16]) -> bool;
    /// Stores the outcome of `key`, which this handle inserted.
    fn complete(&self, handle: &mut Self::Handle, key: &[u8; 16]);
    /// Frees what the bench itself kept in `handle` for the complete phase, once it has ended
    /// (untimed, before the RAM figure is read).
    fn completes_done(&self, _handle: &mut Self::Handle) {}
    /// Inserts every absent key of `keys` in one batch (see [`BATCH`]); returns how many.
    fn insert_batch(&self, handle: &mut Self::Handle, keys: &[[u8; 16]]) -> usize;
    /// Stores the outcome of `keys`, the next ones this handle inserted by batch, in one batch.
    fn complete_batch(&self, handle: &mut Self::Handle, keys: &[[u8; 16]]);
    /// The stored outcome of `key`, if any.
    fn replay(&self, handle: &mut Self::Handle, key: &[u8; 16]) -> Option<Vec<u8>>;
    /// The engine's own memory figure (Redis `used_memory`), when RSS of this process is not it.
    fn memory_bytes(&self) -> Option<u64> {
        None
    }
}

fn run_row(spec: &RowSpec) -> Vec<(String, f64)> {
    let dir = tempfile::tempdir_in(bench_parent_dir()).expect("create data dir");
    let mut result = match spec.engine.as_str() {
        "idemstore" => run_phases(&Idemstore::new(dir.path(), spec.durable), spec),
        "redis" => run_phases(&Redis::start(dir.path(), spec.durable), spec),
        "sqlite" => run_phases(&Sqlite::new(dir.path(), spec.durable), spec),
        "redb" => run_phases(&Redb::new(dir.path(), spec.durable), spec),
        other => panic!("unknown engine {other}"),
    };
    result.push(("disk_bytes".into(), allocated_bytes(dir.path()) as f64));
    result
}

/// What one bench thread did: its counts, latencies and the time span of each phase.
struct WorkerReport {
    inserted: u64,
    completed: u64,
    replayed: u64,
    random_replayed: u64,
    batch_inserted: u64,
    batch_completed: u64,
    latency: [Histogram<u64>; 6],
    spans: [(Instant, Instant); 6],
}

/// A Fisher-Yates shuffle from the key generator's stream (the same order for every engine).
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = KeyGen::new(seed);
    for i in (1..items.len()).rev() {
        items.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
}

/// Insert phase, (idemstore) complete phase, replay phases (in written order, then in random
/// order); every thread in step via barriers.
/// A phase lasts from the first thread's start to the last thread's end, as the threads saw it.
fn run_phases<E: Engine>(engine: &E, spec: &RowSpec) -> Vec<(String, f64)> {
    let threads = spec.threads;
    let keys_per_thread = spec.keys.div_ceil(threads as u64);
    let replays_per_thread = spec.replays.max(spec.keys).div_ceil(threads as u64);
    let cap = Duration::from_secs(spec.phase_secs);
    // Durable ops take ~100 µs, so every one is timed; a non-durable op one in `LATENCY_SAMPLE`.
    let sample_every = if spec.durable { 1 } else { LATENCY_SAMPLE };
    let barrier = Barrier::new(threads + 1);
    let mut out = Vec::new();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                scope.spawn(move || {
                    let keys = KeyGen::new(1000 + t as u64).keys(keys_per_thread);
                    let mut handle = engine.handle();
                    let fresh = KeyGen::new(5000 + t as u64).keys(keys_per_thread);
                    let mut latency = [
                        new_histogram(),
                        new_histogram(),
                        new_histogram(),
                        new_histogram(),
                        new_histogram(),
                        new_histogram(),
                    ];
                    barrier.wait(); // prepared: the "before" RAM figure is taken now
                    barrier.wait(); // start of the insert phase
                    let [l_insert, l_complete, l_replay, l_batch, l_batch_complete, l_random] = &mut latency;
                    let (insert_span, inserted) = timed_phase(&keys, cap, sample_every, l_insert, |key| {
                        assert!(engine.insert(&mut handle, key), "a new random key was not inserted");
                        1
                    });
                    let inserted = inserted as usize;
                    barrier.wait(); // end of the insert phase, start of the complete phase
                    // Every key this handle inserted, in insertion order: one write (and, durable,
                    // one commit) per key.
                    let (complete_span, completed) =
                        timed_phase(&keys[..inserted], Duration::MAX, sample_every, l_complete, |key| {
                            engine.complete(&mut handle, key);
                            1
                        });
                    engine.completes_done(&mut handle);
                    barrier.wait(); // end of the complete phase: the "after" RAM figure is taken now
                    barrier.wait(); // start of the replay phase
                    let (replay_span, replayed) =
                        timed_phase(0..replays_per_thread, cap, sample_every, l_replay, |i| {
                            let key = &keys[(i % inserted as u64) as usize];
                            let outcome = engine.replay(&mut handle, key);
                            assert_eq!(outcome.as_deref(), Some(&OUTCOME[..]), "a replay did not return the outcome");
                            1
                        });
                    // Retries come in no particular order: the same keys again, shuffled, so each
                    // replay's index entry and record are a cache miss of their own.
                    let mut order: Vec<u32> = (0..inserted as u32).collect();
                    shuffle(&mut order, 0xfeed + t as u64);
                    barrier.wait(); // start of the random-order replay phase
                    let (random_span, random_replayed) =
                        timed_phase(0..replays_per_thread, cap, sample_every, l_random, |i| {
                            let key = &keys[order[(i % inserted as u64) as usize] as usize];
                            let outcome = engine.replay(&mut handle, key);
                            assert_eq!(outcome.as_deref(), Some(&OUTCOME[..]), "a replay did not return the outcome");
                            1
                        });
                    drop(order);
                    barrier.wait(); // start of the batched insert phase
                    let (batch_span, batch_inserted) = timed_phase(fresh.chunks(BATCH), cap, 1, l_batch, |batch| {
                        let n = engine.insert_batch(&mut handle, batch);
                        assert_eq!(n, batch.len(), "a batch of new random keys was not all inserted");
                        n as u64
                    });
                    barrier.wait(); // start of the batched complete phase
                    let batches = fresh[..batch_inserted as usize].chunks(BATCH);
                    let (batch_complete_span, batch_completed) =
                        timed_phase(batches, cap, 1, l_batch_complete, |batch| {
                            engine.complete_batch(&mut handle, batch);
                            batch.len() as u64
                        });
                    WorkerReport {
                        inserted: inserted as u64,
                        completed,
                        replayed,
                        random_replayed,
                        batch_inserted,
                        batch_completed,
                        latency,
                        spans: [insert_span, complete_span, replay_span, batch_span, batch_complete_span, random_span],
                    }
                })
            })
            .collect();

        barrier.wait();
        let ram_before = engine.memory_bytes().unwrap_or_else(rss_anon_bytes);
        barrier.wait();
        barrier.wait();
        barrier.wait();
        let ram_after = engine.memory_bytes().unwrap_or_else(rss_anon_bytes);
        barrier.wait();
        barrier.wait();
        barrier.wait();
        barrier.wait();

        let reports: Vec<WorkerReport> =
            workers.into_iter().map(|w| w.join().expect("bench thread panicked")).collect();
        let span_seconds = |phase: usize| {
            let first = reports.iter().map(|r| r.spans[phase].0).min().expect("at least one thread");
            let last = reports.iter().map(|r| r.spans[phase].1).max().expect("at least one thread");
            (last - first).as_secs_f64()
        };
        let merged = |phase: usize| {
            let mut hist = new_histogram();
            for r in &reports {
                hist.add(&r.latency[phase]).expect("merge histograms");
            }
            hist
        };
        let inserted: u64 = reports.iter().map(|r| r.inserted).sum();
        let replayed: u64 = reports.iter().map(|r| r.replayed).sum();
        let completed: u64 = reports.iter().map(|r| r.completed).sum();
        out.push(("inserted".into(), inserted as f64));
        out.push(("ram_bytes".into(), ram_after.saturating_sub(ram_before) as f64));
        out.extend(phase_figures("insert", inserted, span_seconds(0), &merged(0)));
        out.extend(phase_figures("complete", completed, span_seconds(1), &merged(1)));
        out.extend(phase_figures("replay", replayed, span_seconds(2), &merged(2)));
        let random_replayed: u64 = reports.iter().map(|r| r.random_replayed).sum();
        out.extend(phase_figures("random_replay", random_replayed, span_seconds(5), &merged(5)));
        let batch_inserted: u64 = reports.iter().map(|r| r.batch_inserted).sum();
        out.extend(phase_figures("batch", batch_inserted, span_seconds(3), &merged(3)));
        let batch_completed: u64 = reports.iter().map(|r| r.batch_completed).sum();
        out.extend(phase_figures("batch_complete", batch_completed, span_seconds(4), &merged(4)));
    });
    out
}

/// Runs `op` on each item in turn until the items run out or `cap` has passed; returns the
/// phase's span (first start to last end) and the ops `op` counted. One call in
/// `sample_every`, on average, is timed alone into `latency`: reading the clock costs ~35 ns
/// here, a tenth of a non-durable op, so timing every call would charge the stopwatch to the
/// engine's ops/s.
fn timed_phase<T>(
    items: impl IntoIterator<Item = T>,
    cap: Duration,
    sample_every: usize,
    latency: &mut Histogram<u64>,
    mut op: impl FnMut(T) -> u64,
) -> ((Instant, Instant), u64) {
    let started = Instant::now();
    let mut ops = 0;
    // The gap to the next timed call is drawn from 1 ..= 2 * sample_every - 1 (mean
    // `sample_every`), so the timed calls do not fall in step with anything periodic.
    let mut next_timed = 0;
    let mut draw = 0x9E37_79B9_7F4A_7C15u64;
    for (i, item) in items.into_iter().enumerate() {
        if i != next_timed {
            ops += op(item);
            continue;
        }
        let before = Instant::now();
        ops += op(item);
        let after = Instant::now();
        latency.saturating_record(duration_nanos(after - before));
        if after - started > cap {
            break;
        }
        draw ^= draw << 13;
        draw ^= draw >> 7;
        draw ^= draw << 17;
        next_timed = i + 1 + (draw % (2 * sample_every as u64 - 1)) as usize;
    }
    ((started, Instant::now()), ops)
}

fn phase_figures(prefix: &str, ops: u64, seconds: f64, hist: &Histogram<u64>) -> Vec<(String, f64)> {
    vec![
        (format!("{prefix}_ops"), ops as f64),
        (format!("{prefix}_ops_per_s"), ops as f64 / seconds.max(1e-9)),
        (format!("{prefix}_p50_ns"), hist.value_at_quantile(0.5) as f64),
        (format!("{prefix}_p99_ns"), hist.value_at_quantile(0.99) as f64),
    ]
}

// ---------------------------------------------------------------------------------------------
// idemstore

struct Idemstore {
    store: Store,
}

impl Idemstore {
    fn new(dir: &Path, durable: bool) -> Idemstore {
        let durability = if durable { idemstore::Durability::Sync } else { idemstore::Durability::None };
        let options =
            Options { durability, default_ttl: TTL, default_lease: Duration::from_secs(3600), ..Default::default() };
        Idemstore { store: Store::open(dir.join("idemstore"), options).expect("open idemstore") }
    }
}

impl Engine for Idemstore {
    /// The tokens of this thread's claims, oldest first, completed in the complete phases.
    type Handle = VecDeque<ClaimToken>;

    fn handle(&self) -> VecDeque<ClaimToken> {
        VecDeque::new()
    }

    fn insert(&self, tokens: &mut VecDeque<ClaimToken>, key: &[u8; 16]) -> bool {
        match self.store.claim(key, REQUEST).expect("idemstore claim") {
            Claim::Acquired(token) => {
                tokens.push_back(token);
                true
            }
            _ => false,
        }
    }

    fn complete(&self, tokens: &mut VecDeque<ClaimToken>, key: &[u8; 16]) {
        // Keys are completed in the order they were inserted: the oldest token is this key's.
        let token = tokens.pop_front().expect("a token for every key inserted");
        debug_assert_eq!(token.key(), key);
        self.store.complete(&token, OUTCOME).expect("idemstore complete");
    }

    fn completes_done(&self, tokens: &mut VecDeque<ClaimToken>) {
        // The tokens are the bench's memory, not the store's: freed before RAM is measured.
        debug_assert!(tokens.is_empty(), "every inserted key was completed");
        tokens.shrink_to_fit();
    }

    fn insert_batch(&self, tokens: &mut VecDeque<ClaimToken>, keys: &[[u8; 16]]) -> usize {
        let items: Vec<(&[u8; 16], &[u8])> = keys.iter().map(|k| (k, REQUEST)).collect();
        let before = tokens.len();
        for answer in self.store.claim_many(&items, ClaimOptions::default()) {
            if let Claim::Acquired(token) = answer.expect("idemstore claim_many") {
                tokens.push_back(token);
            }
        }
        tokens.len() - before
    }

    fn complete_batch(&self, tokens: &mut VecDeque<ClaimToken>, keys: &[[u8; 16]]) {
        // A deque: taking the oldest tokens costs the batch, not a shift of every token left.
        let held: Vec<ClaimToken> = tokens.drain(..keys.len()).collect();
        let items: Vec<(&ClaimToken, &[u8])> = held.iter().map(|t| (t, &OUTCOME[..])).collect();
        for done in self.store.complete_many(&items) {
            done.expect("idemstore complete_many");
        }
    }

    fn replay(&self, _tokens: &mut VecDeque<ClaimToken>, key: &[u8; 16]) -> Option<Vec<u8>> {
        match self.store.claim(key, REQUEST).expect("idemstore replay") {
            Claim::Completed(done) => Some(done.outcome),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Redis

/// A `redis-server` of our own, killed on drop.
struct Redis {
    server: Child,
    url: String,
    monitor: Mutex<redis::Connection>,
}

impl Redis {
    fn start(dir: &Path, durable: bool) -> Redis {
        let port = free_loopback_port();
        let mut args: Vec<String> = vec![
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--save".into(),
            String::new(),
            "--daemonize".into(),
            "no".into(),
            "--loglevel".into(),
            "warning".into(),
        ];
        if durable {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"].map(String::from));
        } else {
            args.extend(["--appendonly", "no"].map(String::from));
        }
        let server = Command::new(redis_server_path())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start redis-server");
        let url = format!("redis://127.0.0.1:{port}/");
        let client = redis::Client::open(url.as_str()).expect("redis url");
        let deadline = Instant::now() + Duration::from_secs(10);
        let monitor = loop {
            if let Ok(mut con) = client.get_connection()
                && redis::cmd("PING").query::<String>(&mut con).is_ok()
            {
                break con;
            }
            assert!(Instant::now() < deadline, "redis-server on port {port} did not answer within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        };
        Redis { server, url, monitor: Mutex::new(monitor) }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

impl Engine for Redis {
    type Handle = redis::Connection;

    fn handle(&self) -> redis::Connection {
        redis::Client::open(self.url.as_str()).expect("redis url").get_connection().expect("connect to redis")
    }

    fn insert(&self, con: &mut redis::Connection, key: &[u8; 16]) -> bool {
        let reply: Option<String> = redis::cmd("SET")
            .arg(&key[..])
            .arg(PENDING)
            .arg("NX")
            .arg("PX")
            .arg(TTL.as_millis() as u64)
            .query(con)
            .expect("redis SET NX PX");
        reply.is_some()
    }

    fn insert_batch(&self, con: &mut redis::Connection, keys: &[[u8; 16]]) -> usize {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("SET").arg(&key[..]).arg(PENDING).arg("NX").arg("PX").arg(TTL.as_millis() as u64);
        }
        let replies: Vec<Option<String>> = pipe.query(con).expect("redis pipelined SET NX PX");
        replies.iter().filter(|r| r.is_some()).count()
    }

    fn complete_batch(&self, con: &mut redis::Connection, keys: &[[u8; 16]]) {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("SET").arg(&key[..]).arg(&OUTCOME[..]).arg("XX").arg("KEEPTTL");
        }
        let replies: Vec<Option<String>> = pipe.query(con).expect("redis pipelined SET XX");
        assert!(replies.iter().all(Option::is_some), "redis complete of keys it holds did not store");
    }

    fn complete(&self, con: &mut redis::Connection, key: &[u8; 16]) {
        let reply: Option<String> = redis::cmd("SET")
            .arg(&key[..])
            .arg(&OUTCOME[..])
            .arg("XX")
            .arg("KEEPTTL")
            .query(con)
            .expect("redis SET XX");
        assert!(reply.is_some(), "redis complete of a key it holds did not store");
    }

    fn replay(&self, con: &mut redis::Connection, key: &[u8; 16]) -> Option<Vec<u8>> {
        redis::cmd("GET").arg(&key[..]).query(con).expect("redis GET")
    }

    fn memory_bytes(&self) -> Option<u64> {
        let mut con = self.monitor.lock().expect("monitor connection");
        let info: String = redis::cmd("INFO").arg("memory").query(&mut *con).expect("redis INFO memory");
        info.lines().find_map(|l| l.strip_prefix("used_memory:")).map(|v| v.trim().parse().expect("used_memory"))
    }
}

fn redis_server_path() -> String {
    std::env::var("PEERS_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

fn redis_server_available() -> bool {
    Command::new(redis_server_path())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_loopback_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local addr").port()
}

// ---------------------------------------------------------------------------------------------
// SQLite

struct Sqlite {
    path: PathBuf,
    durable: bool,
    /// SQLite has one writer at a time; taking turns here spares it the busy handler's sleeps.
    write_turn: Mutex<()>,
}

impl Sqlite {
    fn new(dir: &Path, durable: bool) -> Sqlite {
        let sqlite = Sqlite { path: dir.join("peers.sqlite"), durable, write_turn: Mutex::new(()) };
        let con = sqlite.handle();
        con.execute_batch("CREATE TABLE k(key BLOB PRIMARY KEY, val BLOB, exp INTEGER) WITHOUT ROWID")
            .expect("create sqlite table");
        sqlite
    }
}

impl Engine for Sqlite {
    type Handle = rusqlite::Connection;

    fn handle(&self) -> rusqlite::Connection {
        let con = rusqlite::Connection::open(&self.path).expect("open sqlite");
        con.busy_timeout(Duration::from_secs(60)).expect("sqlite busy_timeout");
        let mode: String = con.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).expect("sqlite WAL");
        assert_eq!(mode.to_lowercase(), "wal", "sqlite did not switch to WAL");
        con.execute_batch(if self.durable { "PRAGMA synchronous=FULL" } else { "PRAGMA synchronous=OFF" })
            .expect("sqlite synchronous");
        con
    }

    fn insert(&self, con: &mut rusqlite::Connection, key: &[u8; 16]) -> bool {
        let exp = now_ms() + TTL.as_millis() as i64;
        let _turn = self.write_turn.lock().expect("sqlite write turn");
        let mut stmt = con
            .prepare_cached("INSERT INTO k(key,val,exp) VALUES(?1,?2,?3) ON CONFLICT DO NOTHING")
            .expect("prepare sqlite insert");
        stmt.execute(rusqlite::params![&key[..], PENDING, exp]).expect("sqlite insert") == 1
    }

    fn insert_batch(&self, con: &mut rusqlite::Connection, keys: &[[u8; 16]]) -> usize {
        let exp = now_ms() + TTL.as_millis() as i64;
        let _turn = self.write_turn.lock().expect("sqlite write turn");
        let txn = con.transaction().expect("sqlite begin");
        let mut inserted = 0;
        {
            let mut stmt = txn
                .prepare_cached("INSERT INTO k(key,val,exp) VALUES(?1,?2,?3) ON CONFLICT DO NOTHING")
                .expect("prepare sqlite insert");
            for key in keys {
                inserted += stmt.execute(rusqlite::params![&key[..], PENDING, exp]).expect("sqlite insert");
            }
        }
        txn.commit().expect("sqlite commit");
        inserted
    }

    fn complete_batch(&self, con: &mut rusqlite::Connection, keys: &[[u8; 16]]) {
        let _turn = self.write_turn.lock().expect("sqlite write turn");
        let txn = con.transaction().expect("sqlite begin");
        {
            let mut stmt = txn.prepare_cached("UPDATE k SET val=?1 WHERE key=?2").expect("prepare sqlite update");
            for key in keys {
                let updated = stmt.execute(rusqlite::params![&OUTCOME[..], &key[..]]).expect("sqlite update");
                assert_eq!(updated, 1, "sqlite complete of a key it holds did not store");
            }
        }
        txn.commit().expect("sqlite commit");
    }

    fn complete(&self, con: &mut rusqlite::Connection, key: &[u8; 16]) {
        let _turn = self.write_turn.lock().expect("sqlite write turn");
        let mut stmt = con.prepare_cached("UPDATE k SET val=?1 WHERE key=?2").expect("prepare sqlite update");
        let updated = stmt.execute(rusqlite::params![&OUTCOME[..], &key[..]]).expect("sqlite update");
        assert_eq!(updated, 1, "sqlite complete of a key it holds did not store");
    }

    fn replay(&self, con: &mut rusqlite::Connection, key: &[u8; 16]) -> Option<Vec<u8>> {
        use rusqlite::OptionalExtension;
        let mut stmt = con.prepare_cached("SELECT val FROM k WHERE key=?1 AND exp>?2").expect("prepare sqlite select");
        stmt.query_row(rusqlite::params![&key[..], now_ms()], |r| r.get(0)).optional().expect("sqlite select")
    }
}

// ---------------------------------------------------------------------------------------------
// redb

const REDB_TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("k");

struct Redb {
    db: redb::Database,
    durability: redb::Durability,
}

impl Redb {
    fn new(dir: &Path, durable: bool) -> Redb {
        let db = redb::Database::create(dir.join("peers.redb")).expect("create redb");
        let txn = db.begin_write().expect("redb begin_write");
        txn.open_table(REDB_TABLE).expect("create redb table");
        txn.commit().expect("redb commit");
        let durability = if durable { redb::Durability::Immediate } else { redb::Durability::None };
        Redb { db, durability }
    }
}

impl Engine for Redb {
    type Handle = ();

    fn handle(&self) {}

    fn insert(&self, handle: &mut (), key: &[u8; 16]) -> bool {
        self.insert_batch(handle, std::slice::from_ref(key)) == 1
    }

    fn insert_batch(&self, _: &mut (), keys: &[[u8; 16]]) -> usize {
        use redb::ReadableTable;
        let mut value = Vec::with_capacity(8 + PENDING.len());
        value.extend_from_slice(&(now_ms() + TTL.as_millis() as i64).to_le_bytes());
        value.extend_from_slice(PENDING.as_bytes());
        let mut txn = self.db.begin_write().expect("redb begin_write");
        txn.set_durability(self.durability).expect("redb set_durability");
        let mut inserted = 0;
        {
            let mut table = txn.open_table(REDB_TABLE).expect("redb open_table");
            for key in keys {
                if table.get(&key[..]).expect("redb get").is_none() {
                    table.insert(&key[..], &value[..]).expect("redb insert");
                    inserted += 1;
                }
            }
        }
        txn.commit().expect("redb commit");
        inserted
    }

    fn complete(&self, handle: &mut (), key: &[u8; 16]) {
        self.complete_batch(handle, std::slice::from_ref(key));
    }

    fn complete_batch(&self, _: &mut (), keys: &[[u8; 16]]) {
        use redb::ReadableTable;
        let mut txn = self.db.begin_write().expect("redb begin_write");
        txn.set_durability(self.durability).expect("redb set_durability");
        {
            let mut table = txn.open_table(REDB_TABLE).expect("redb open_table");
            for key in keys {
                let mut value =
                    table.get(&key[..]).expect("redb get").expect("redb complete of a key it holds").value()[..8]
                        .to_vec();
                value.extend_from_slice(&OUTCOME);
                table.insert(&key[..], &value[..]).expect("redb insert");
            }
        }
        txn.commit().expect("redb commit");
    }

    fn replay(&self, _: &mut (), key: &[u8; 16]) -> Option<Vec<u8>> {
        use redb::ReadableDatabase;
        let txn = self.db.begin_read().expect("redb begin_read");
        let table = txn.open_table(REDB_TABLE).expect("redb open_table");
        let guard = table.get(&key[..]).expect("redb get")?;
        let value = guard.value();
        let (exp, outcome) = value.split_at(8);
        let exp = i64::from_le_bytes(exp.try_into().expect("8-byte expiry"));
        (exp > now_ms()).then(|| outcome.to_vec())
    }
}

// ---------------------------------------------------------------------------------------------
// helpers

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number")))
}

/// Anonymous resident memory of this process (`RssAnon` in `/proc/self/status`), in bytes,
/// after handing freed heap memory back to the OS.
fn rss_anon_bytes() -> u64 {
    trim_allocator();
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("/proc/self/status has RssAnon");
    kib * 1024
}
