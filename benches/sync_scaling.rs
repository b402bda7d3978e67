//! Durable claims against the disk's own limit.
//!
//! In one run, on one directory, this measures:
//! - the physical limit: one thread appending 64 B to a growing file + `File::sync_data`
//!   (fdatasync) in a loop, and the same overwriting a preallocated, zero-filled file in place;
//! - `Durability::Sync` claims of new random 16-byte keys from 1, 4, 16 and 64 threads
//!   (group commit shares one fdatasync between concurrent callers), then from 1 and 16 threads
//!   through `Store::claim_many`, 64 keys a call (one sync covers the whole call);
//! - a bare group commit with 16 threads (`sync_scaling/bare_commit.rs`): the same handoff
//!   with no store around it (a `pwrite` and a shared `fdatasync`), the ceiling that waking
//!   and rescheduling the writers leaves on this machine;
//! - `Durability::Periodic(100 ms)` and `Durability::None` claims from 1 and 16 threads.
//!
//! It prints one markdown table: ops/s, p50/p99/max latency (hdrhistogram), records per sync,
//! and for `Sync` the ratio `ops/s ÷ (min(threads, 16) / p50 fdatasync)`, the share of the
//! group-commit limit reached. The target is a ratio >= 0.8 at 16 threads.
//!
//! Run: `cargo bench --bench sync_scaling` (about a minute). Knobs: `-- --secs S` or the env var
//! `SYNC_SCALING_SECS` (seconds per row, default 2); `IDEMSTORE_BENCH_DIR` (where the temp dirs
//! go, default the system temp dir; it must be on the disk under test, not a tmpfs).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use idemstore::{Claim, ClaimOptions, Durability, Options, Store};

mod support;
use support::*;

#[path = "sync_scaling/bare_commit.rs"]
mod bare_commit;

/// Bytes of one raw record in the physical-limit loops.
const RAW_RECORD_BYTES: usize = 64;
/// Size of the preallocated, zero-filled file of the in-place loop (wraps around when full).
const INPLACE_FILE_BYTES: u64 = 16 << 20;
/// Thread counts of the `Sync` rows.
const SYNC_THREADS: [usize; 4] = [1, 4, 16, 64];
/// Thread counts of the `Periodic` and `None` rows.
const RELAXED_THREADS: [usize; 2] = [1, 16];
/// Keys per `claim_many` call in the batched `Sync` rows.
const BATCH: usize = 64;
/// Thread counts of the batched `Sync` rows.
const BATCH_THREADS: [usize; 2] = [1, 16];
/// The thread count at which the issue states its target (and caps the limit).
const TARGET_THREADS: usize = 16;
/// The target share of the group-commit limit.
const TARGET_RATIO: f64 = 0.8;
/// Request bytes given to every claim (only their hash is stored).
const REQUEST: &[u8] = b"POST /payments amount=100";

fn main() {
    let secs = seconds_per_row();
    let parent = bench_parent_dir();
    let run_dir = tempfile::tempdir_in(&parent).expect("create bench temp dir");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("# sync_scaling: durable claims vs the disk's fdatasync limit");
    println!();
    println!(
        "workload: claims of new random 16-byte keys, request {} B (hash stored), no outcome; \
         a fresh store per row; {secs:.1} s per row; {cpus} CPUs; directory {}",
        REQUEST.len(),
        run_dir.path().display()
    );
    println!(
        "physical limit: 1 thread, {RAW_RECORD_BYTES} B write + File::sync_data per op, \
         (a) appended to a growing file, (b) overwriting a zero-filled {} MiB file in place",
        INPLACE_FILE_BYTES >> 20
    );
    println!();

    let duration = Duration::from_secs_f64(secs);
    let mut rows = Vec::new();
    rows.push(raw_append_row(run_dir.path(), duration, "start"));
    rows.push(raw_inplace_row(run_dir.path(), duration, "start"));
    for threads in SYNC_THREADS {
        rows.push(claims_row(run_dir.path(), Durability::Sync, threads, 1, duration));
    }
    for threads in BATCH_THREADS {
        rows.push(claims_row(run_dir.path(), Durability::Sync, threads, BATCH, duration));
    }
    rows.push(bare_commit::row(run_dir.path(), TARGET_THREADS, duration));
    rows.push(raw_append_row(run_dir.path(), duration, "end"));
    rows.push(raw_inplace_row(run_dir.path(), duration, "end"));
    // The limit takes the faster of the two measurements of each raw loop (run before and
    // after the Sync rows), so a disk that was busy during one of them does not flatter the
    // engine: a faster fdatasync means a higher limit and a lower ratio.
    let fastest_p50 = |raw: RawKind| {
        rows.iter().filter(|r| r.kind == RowKind::Raw(raw)).map(Row::p50_seconds).fold(f64::INFINITY, f64::min)
    };
    let append_p50_s = fastest_p50(RawKind::Append);
    let inplace_p50_s = fastest_p50(RawKind::InPlace);
    for durability in [Durability::Periodic(Duration::from_millis(100)), Durability::None] {
        for threads in RELAXED_THREADS {
            rows.push(claims_row(run_dir.path(), durability, threads, 1, duration));
        }
    }

    println!(
        "| row | durability | threads | ops | ops/s | p50 µs | p99 µs | max µs | records/sync | \
         mean sync µs | KiB to disk/sync | limit ops/s (append) | ratio vs append | ratio vs in-place |"
    );
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in &rows {
        let (limit, ratio_append, ratio_inplace) = if row.kind.shares_syncs() {
            let capped = row.threads.min(TARGET_THREADS) as f64;
            let limit_append = capped / append_p50_s;
            let limit_inplace = capped / inplace_p50_s;
            (
                format!("{limit_append:.0}"),
                format!("{:.2}", row.ops_per_second() / limit_append),
                format!("{:.2}", row.ops_per_second() / limit_inplace),
            )
        } else {
            ("—".to_string(), "—".to_string(), "—".to_string())
        };
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} |",
            row.name,
            row.durability,
            row.threads,
            row.ops,
            row.ops_per_second(),
            row.quantile_us(0.5),
            row.quantile_us(0.99),
            row.hist.max() as f64 / 1000.0,
            row.records_per_sync.map_or_else(|| "—".to_string(), |r| format!("{r:.1}")),
            row.mean_sync_us.map_or_else(|| "—".to_string(), |us| format!("{us:.0}")),
            row.kib_per_sync.map_or_else(|| "—".to_string(), |kib| format!("{kib:.1}")),
            limit,
            ratio_append,
            ratio_inplace,
        );
    }
    println!();
    println!(
        "limit = min(threads, {TARGET_THREADS}) / p50 of one raw op, the faster of its two runs \
         (append: {:.1} µs, in place: {:.1} µs); the ratio is ops/s ÷ limit. \
         records/sync and mean sync µs come from the store's stats (syncs by group commit or the flusher); \
         KiB to disk/sync: bytes written to the directory's block device during the row ÷ its syncs \
         (whole device, from /sys/dev/block; zero-fill of new space included).",
        append_p50_s * 1e6,
        inplace_p50_s * 1e6
    );
    if let Some(row) = rows.iter().find(|r| r.kind == RowKind::SyncClaims && r.threads == TARGET_THREADS) {
        let ratio_append = row.ops_per_second() / (TARGET_THREADS as f64 / append_p50_s);
        let ratio_inplace = row.ops_per_second() / (TARGET_THREADS as f64 / inplace_p50_s);
        let verdict = |ratio: f64| if ratio >= TARGET_RATIO { "met" } else { "NOT met" };
        println!(
            "target: Sync with {TARGET_THREADS} threads >= {TARGET_RATIO} x ({TARGET_THREADS} / one fdatasync): \
             {ratio_append:.2} vs append ({}), {ratio_inplace:.2} vs in-place ({})",
            verdict(ratio_append),
            verdict(ratio_inplace)
        );
        if let Some(bare) = rows.iter().find(|r| r.kind == RowKind::BareCommit) {
            println!(
                "bare group commit with {TARGET_THREADS} threads, same run: {:.2} x the append limit; \
                 the store's Sync claims ÷ the bare group commit: {:.2}",
                bare.ops_per_second() / (TARGET_THREADS as f64 / append_p50_s),
                row.ops_per_second() / bare.ops_per_second()
            );
        }
    }
    // The limit assumes one raw fdatasync is as fast as the disk gets. When the store's own
    // syncs run much faster than that, the disk was not in one steady state during the run
    // (a busy or throttled device, or one that completes lone flushes on a timer tick), and
    // every ratio above is inflated.
    let raw_p50_us = append_p50_s.min(inplace_p50_s) * 1e6;
    let fastest_store_sync_us = rows
        .iter()
        .filter(|r| r.kind == RowKind::SyncClaims)
        .filter_map(|r| r.mean_sync_us)
        .fold(f64::INFINITY, f64::min);
    if fastest_store_sync_us < 0.5 * raw_p50_us {
        println!(
            "WARNING: the store's mean sync ({fastest_store_sync_us:.0} µs) is under half the raw loops' p50 \
             ({raw_p50_us:.0} µs): the disk was not steady during this run, so the ratios are inflated; \
             rerun on a quiet machine."
        );
    }
}

/// One line of the table.
struct Row {
    name: String,
    durability: String,
    threads: usize,
    ops: u64,
    elapsed: Duration,
    /// Latency of each op in nanoseconds.
    hist: Histogram<u64>,
    records_per_sync: Option<f64>,
    /// Mean fdatasync time: of the store (from its stats), or of the raw loop.
    mean_sync_us: Option<f64>,
    /// Bytes written to the disk during the row per sync, in KiB (see `device_bytes_written`).
    kib_per_sync: Option<f64>,
    kind: RowKind,
}

/// What a row measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowKind {
    /// A raw single-thread loop: the physical limit.
    Raw(RawKind),
    /// `Sync` claims, one per call: the rows the target is read from.
    SyncClaims,
    /// The bare group commit (`bare_commit.rs`).
    BareCommit,
    /// Any other store row.
    Other,
}

impl RowKind {
    /// One sync shared by concurrent writers, one record each: the ratio columns apply.
    fn shares_syncs(self) -> bool {
        matches!(self, RowKind::SyncClaims | RowKind::BareCommit)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RawKind {
    Append,
    InPlace,
}

impl Row {
    fn ops_per_second(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn quantile_us(&self, quantile: f64) -> f64 {
        self.hist.value_at_quantile(quantile) as f64 / 1000.0
    }

    fn p50_seconds(&self) -> f64 {
        (self.hist.value_at_quantile(0.5) as f64 / 1e9).max(1e-9)
    }
}

/// One thread: append 64 B to a growing file, then fdatasync, until `duration` has passed.
fn raw_append_row(dir: &Path, duration: Duration, when: &str) -> Row {
    let path = dir.join("raw-append.bin");
    let file = OpenOptions::new().create(true).append(true).open(&path).expect("create raw append file");
    file.sync_all().expect("sync new file");
    sync_dir(dir);
    let record = [0xA5u8; RAW_RECORD_BYTES];
    let written_before = device_bytes_written(dir);
    let (ops, elapsed, hist) = run_workers(1, duration, |_| {
        let mut file = file.try_clone().expect("clone raw append file");
        move || {
            file.write_all(&record).expect("append raw record");
            file.sync_data().expect("fdatasync raw file");
            1
        }
    });
    let kib = kib_per_sync(written_before, device_bytes_written(dir), ops);
    std::fs::remove_file(&path).expect("remove raw append file");
    raw_row(format!("raw append + fdatasync ({when})"), RawKind::Append, ops, elapsed, hist, kib)
}

/// One thread: overwrite 64 B at a time of a preallocated zero-filled file, then fdatasync.
fn raw_inplace_row(dir: &Path, duration: Duration, when: &str) -> Row {
    let path = dir.join("raw-inplace.bin");
    let file = zero_filled_file(&path, INPLACE_FILE_BYTES);
    sync_dir(dir);
    let record = [0x5Au8; RAW_RECORD_BYTES];
    let written_before = device_bytes_written(dir);
    let (ops, elapsed, hist) = run_workers(1, duration, |_| {
        let file = file.try_clone().expect("clone raw in-place file");
        let mut op = 0u64;
        move || {
            let offset = (op * RAW_RECORD_BYTES as u64) % INPLACE_FILE_BYTES;
            op += 1;
            file.write_all_at(&record, offset).expect("overwrite raw record");
            file.sync_data().expect("fdatasync in-place file");
            1
        }
    });
    let kib = kib_per_sync(written_before, device_bytes_written(dir), ops);
    std::fs::remove_file(&path).expect("remove raw in-place file");
    raw_row(format!("raw overwrite in place + fdatasync ({when})"), RawKind::InPlace, ops, elapsed, hist, kib)
}

/// A physical-limit row: one op is one write and one fdatasync.
fn raw_row(
    name: String,
    kind: RawKind,
    ops: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
    kib_per_sync: Option<f64>,
) -> Row {
    let mean_us = hist.mean() / 1000.0;
    Row {
        name,
        durability: "fdatasync".into(),
        threads: 1,
        ops,
        elapsed,
        hist,
        records_per_sync: Some(1.0),
        mean_sync_us: Some(mean_us),
        kib_per_sync,
        kind: RowKind::Raw(kind),
    }
}

/// `threads` threads claim new random keys on a fresh store until `duration` has passed.
/// A store row: `threads` threads claiming new keys, one at a time (`batch` 1) or `batch` keys
/// per `claim_many` call; latency is per call.
fn claims_row(parent: &Path, durability: Durability, threads: usize, batch: usize, duration: Duration) -> Row {
    let dir = tempfile::tempdir_in(parent).expect("create store dir");
    let options = Options { durability, ..Default::default() };
    let store = Arc::new(Store::open(dir.path(), options).expect("open store"));
    let written_before = device_bytes_written(dir.path());
    let (ops, elapsed, hist) = run_workers(threads, duration, |t| {
        let store = store.clone();
        let mut keys = KeyGen::from_state(0x5EED_0000 + t as u64 * 7919 + threads as u64);
        let mut items = Vec::with_capacity(batch);
        move || {
            if batch == 1 {
                expect_acquired(store.claim(keys.next_key(), REQUEST));
            } else {
                items.clear();
                items.extend((0..batch).map(|_| (keys.next_key(), REQUEST)));
                store.claim_many(&items, ClaimOptions::default()).into_iter().for_each(expect_acquired);
            }
            batch as u64
        }
    });
    let stats = store.stats();
    let kib_per_sync = kib_per_sync(written_before, device_bytes_written(dir.path()), stats.syncs_total);
    let records_per_sync =
        (stats.syncs_total > 0).then(|| stats.synced_records_total as f64 / stats.syncs_total as f64);
    let mean_sync_us = (stats.syncs_total > 0).then(|| stats.sync_latency_us_total as f64 / stats.syncs_total as f64);
    drop(store);
    Row {
        name: if batch == 1 {
            "claims (new keys)".into()
        } else {
            format!("claim_many (new keys, {batch} a call; latency per call)")
        },
        durability: format!("{durability:?}"),
        threads,
        ops,
        elapsed,
        hist,
        records_per_sync,
        mean_sync_us,
        kib_per_sync,
        kind: if durability == Durability::Sync && batch == 1 { RowKind::SyncClaims } else { RowKind::Other },
    }
}

/// Bytes written so far to the block device that holds `dir` (sectors written, from
/// `/sys/dev/block/MAJOR:MINOR/stat`): what really went to the disk, whoever wrote it, so the
/// machine should be otherwise quiet. `None` where that file does not exist.
fn device_bytes_written(dir: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).ok()?.dev();
    let stat =
        std::fs::read_to_string(format!("/sys/dev/block/{}:{}/stat", libc::major(dev), libc::minor(dev))).ok()?;
    let sectors: u64 = stat.split_whitespace().nth(6)?.parse().ok()?;
    Some(sectors * 512)
}

/// KiB written per sync between two `device_bytes_written` readings.
fn kib_per_sync(before: Option<u64>, after: Option<u64>, syncs: u64) -> Option<f64> {
    let (before, after) = (before?, after?);
    (syncs > 0).then(|| after.saturating_sub(before) as f64 / 1024.0 / syncs as f64)
}

/// Runs `threads` workers, made by `worker(thread index)`, together until `duration` has
/// passed. Each call of a worker does one timed op (a claim, a batch, a write and its wait)
/// and returns how many records it covered. Returns (records, elapsed, latency per call).
fn run_workers<W>(threads: usize, duration: Duration, worker: impl Fn(usize) -> W) -> (u64, Duration, Histogram<u64>)
where
    W: FnMut() -> u64 + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let mut op = worker(t);
            let (stop, start) = (stop.clone(), start.clone());
            std::thread::spawn(move || {
                let mut hist = new_histogram();
                let mut ops = 0u64;
                start.wait();
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    ops += op();
                    let now = Instant::now();
                    hist.saturating_record(duration_nanos(now - last));
                    last = now;
                }
                (ops, hist)
            })
        })
        .collect();
    start.wait();
    let started = Instant::now();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut hist = new_histogram();
    let mut ops = 0;
    for worker in workers {
        let (n, h) = worker.join().expect("worker thread panicked");
        ops += n;
        hist.add(h).expect("merge histograms");
    }
    (ops, started.elapsed(), hist)
}

/// A new file of `bytes` (whole MiB), written with zeros and synced, for loops that
/// overwrite in place.
fn zero_filled_file(path: &Path, bytes: u64) -> File {
    let file = File::create(path).expect("create zero-filled file");
    let zeros = vec![0u8; 1 << 20];
    for chunk in 0..(bytes >> 20) {
        file.write_all_at(&zeros, chunk << 20).expect("zero-fill file");
    }
    file.sync_all().expect("sync zero-filled file");
    file
}

fn sync_dir(dir: &Path) {
    File::open(dir).and_then(|d| d.sync_all()).expect("fsync directory");
}

/// Seconds per row: `--secs S` on the command line, else `SYNC_SCALING_SECS`, else 2.
fn seconds_per_row() -> f64 {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--secs" {
            let value = args.next().expect("--secs needs a value");
            return value.parse().expect("--secs takes a number of seconds");
        }
    }
    std::env::var("SYNC_SCALING_SECS").map_or(2.0, |v| v.parse().expect("SYNC_SCALING_SECS takes a number"))
}

fn expect_acquired(answer: idemstore::Result<Claim>) {
    match answer.expect("claim") {
        Claim::Acquired(_) => {}
        other => panic!("a new random key was not acquired: {other:?}"),
    }
}
