//! The window numbers: RAM per live key, reopen
//! time, and claim latency while an expired bucket of 1M keys is dropped.
//!
//! - **RAM per live key**: resident memory (`VmRSS` and its anonymous part `RssAnon`, from
//!   `/proc/self/status`) before and after claiming N random 16-byte keys under
//!   `Durability::None`, divided by N. Target: <= 40 B per key at 10M keys.
//! - **Reopen**: the same store closed and opened again (wall time and the store's own
//!   recovery time); the page cache is warm unless `WINDOW_DROP_CACHES=1` (root; drops the whole
//!   machine's caches, so only on a quiet machine).
//! - **Expiry without stalls**: a bucket of 1M keys with a 1-minute TTL, a `ManualClock` moved
//!   2 h past it, then `maintain()` drops the bucket while 2 threads claim new keys; hdrhistogram
//!   of the claims that overlapped the drop. Target: every claim under 1 ms.
//!
//!
//! Sealed buckets (a full 24 h window whose idle segments are sealed into `<id>.tbl`
//! tables with a Bloom filter in RAM). N random 16-byte keys are claimed (`Durability::None`,
//! TTL 24 h, 1-hour buckets, `seal_idle_after` 1 s) in 25 groups with a `ManualClock` moved
//! 24 h / 25 = 57.6 min between groups, so the expiries fall in 25 one-hour buckets that are all
//! still live at the end (a 1 h step would put the first group's expiry exactly at the last
//! group's claim time); 1 key in `SEALED_COMPLETE_EVERY` is completed right after its claim.
//! The clock then moves 2 s and `maintain()` seals every segment. One temp dir per N, shared by
//! three children run in this order:
//!
//! - **RAM per key in sealed buckets** (`sealed_fill`): `RssAnon` growth per key after the fill
//!   and after sealing (also after `malloc_trim(0)`, to tell the allocator's cached free memory
//!   from memory the engine still holds), the filters' RAM per key, and `index_entries` after
//!   sealing. Target: <= 8 B per key.
//! - **Reopen with sealed tables** (`sealed_reopen`): `Store::open` of the sealed store (wall time,
//!   `recovery.tables_loaded`, `recovery.records`), then the same reopen after deleting the
//!   `*.tbl` files (a full scan; up to 10M keys), after which `maintain()` seals again so the
//!   next child finds tables. Target: <= 1 s at 100M keys.
//! - **Claims over a full sealed window** (`sealed_claims`): the reopened sealed store, 1 thread
//!   claiming fresh random keys (ops/s, hdrhistogram p50/p99/max), then replays (same request) of
//!   completed sealed keys in random order. Target: >= 1,000,000 fresh claims/s.
//!
//! Reopen at any moment (restart tables): N random 16-byte keys claimed by 2 threads with
//! `Options::default()` but `Durability::None` (housekeeper on, 1 h buckets), then (a) a clean
//! `close()`, or (b) a SIGKILL after the writers went on claiming new keys for 1.5 s; then a
//! timed `Store::open` in a fresh process, with what recovery scanned and why, and the scan
//! rate (records / scan time). Up to 10M keys, also a reopen with every table deleted (a full
//! scan: the scan rate with nothing mapped). Target: <= 1 s. Knob: `WINDOW_RESTART_KEYS`
//! (comma-separated, default `10000000`; `100000000` takes ~15 GB of disk and ~6 min).
//! `WINDOW_SECTIONS` (comma-separated of `ram,expiry,sealed,restart`, default all; without
//! `ram` the first rows and the expiry rows are skipped) runs only some sections.
//!
//! Each measurement runs in a child process of its own (this binary again), so one
//! measurement's freed memory never hides another's growth.
//!
//! Run: `cargo bench --bench window` (1M keys for the first rows, 1M and 10M sealed keys: about
//! 1-2 minutes on 2 idle cores). Knobs: `WINDOW_KEYS` (comma-separated key counts for RAM and
//! reopen, default `1000000`; e.g. `1000000,10000000`), `WINDOW_EXPIRE_KEYS` (keys in the
//! dropped bucket, default 1,000,000), `WINDOW_SEALED_KEYS` (comma-separated key counts of the
//! sealed rows, default `1000000,10000000`; `100000000` takes ~15 GB of disk, ~6 GB of RAM while
//! filling and a few minutes; a count whose disk estimate does not fit the free space is
//! skipped with a note), `WINDOW_SEALED_CLAIMS` (fresh claims timed, default 1,000,000),
//! `IDEMSTORE_BENCH_DIR` (where the temp dirs go, default the system temp dir).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use idemstore::{Claim, ClaimOptions, Durability, Entry, ManualClock, Options, Store};

mod support;
use support::*;

/// Environment variable that makes this binary run one measurement as a child.
const CHILD_ENV: &str = "WINDOW_CHILD";
/// Request bytes of every claim (only their hash is stored).
const REQUEST: &[u8] = b"POST /payments amount=100";
/// Target RAM per live key.
const TARGET_RAM_BYTES_PER_KEY: f64 = 40.0;
/// Target: no claim slower than this while a bucket is dropped.
const TARGET_CLAIM_MAX_NS: u64 = 1_000_000;
/// Threads claiming while the bucket is dropped.
const EXPIRY_CLAIM_THREADS: usize = 2;
/// TTL of the keys of the bucket that expires.
const SHORT_TTL: Duration = Duration::from_secs(60);
/// How long the claimers run before and after the drop.
const EXPIRY_MARGIN: Duration = Duration::from_millis(300);
/// Keys read back after reopen to check the reopened index.
const REOPEN_SPOT_CHECKS: u64 = 1000;
/// Environment variable that names the store dir of a sealed-window child.
const CHILD_DIR_ENV: &str = "WINDOW_CHILD_DIR";
/// Target RAM per key in sealed buckets.
const TARGET_SEALED_RAM_BYTES_PER_KEY: f64 = 8.0;
/// Target fresh claims per second with a full sealed window.
const TARGET_SEALED_CLAIMS_PER_S: f64 = 1_000_000.0;
/// Target reopen time with sealed tables at `TARGET_SEALED_REOPEN_KEYS` keys.
const TARGET_SEALED_REOPEN_MS: f64 = 1000.0;
/// Key count the reopen target is set for.
const TARGET_SEALED_REOPEN_KEYS: u64 = 100_000_000;
/// TTL of every key of the sealed window.
const SEALED_TTL: Duration = Duration::from_secs(24 * 3600);
/// Expiry bucket width of the sealed window.
const SEALED_BUCKET: Duration = Duration::from_secs(3600);
/// Groups of keys, one per expiry bucket.
const SEALED_GROUPS: u64 = 25;
/// Clock step between groups: 24 h / 25, so all 25 groups are live when the fill ends.
const SEALED_GROUP_STEP: Duration = Duration::from_millis(24 * 3_600_000 / SEALED_GROUPS);
/// `seal_idle_after` of the sealed window's store.
const SEAL_IDLE: Duration = Duration::from_secs(1);
/// 1 key in this many is completed right after its claim (the replays read them).
const SEALED_COMPLETE_EVERY: u64 = 10;
/// Outcome stored by those completes.
const SEALED_OUTCOME: &[u8] = b"201 Created {\"payment\":\"p_1\"}";
/// Seed of the fill keys (every child regenerates them).
const SEALED_SEED: u64 = 31;
/// Seed of the fresh keys claimed over the sealed window.
const SEALED_FRESH_SEED: u64 = 32;
/// Most replays of completed sealed keys timed.
const SEALED_MAX_REPLAYS: u64 = 200_000;
/// Largest key count whose store is also reopened without tables (a full scan).
const NO_TABLE_REOPEN_MAX_KEYS: u64 = 10_000_000;
/// Disk per key assumed before the first sealed row measured it (record, table entry, slack).
const SEALED_DISK_BYTES_PER_KEY_GUESS: f64 = 160.0;

fn main() {
    if let Ok(job) = std::env::var(CHILD_ENV) {
        let (kind, count) = job.split_once(':').expect("WINDOW_CHILD is kind:count");
        let count: u64 = count.parse().expect("WINDOW_CHILD count");
        let result = match kind {
            "ram_reopen" => child_ram_and_reopen(count),
            "expiry" => child_expiry(count),
            "floor" => child_floor(count),
            "sealed_fill" => child_sealed_fill(count, &child_dir()),
            "sealed_reopen" => child_sealed_reopen(count, &child_dir()),
            "sealed_claims" => child_sealed_claims(count, &child_dir()),
            "restart_fill" => child_restart_fill(count, &child_dir()),
            "restart_reopen" => child_restart_reopen(count, &child_dir()),
            other => panic!("unknown WINDOW_CHILD job {other}"),
        };
        let line: Vec<String> = result.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("RESULT {}", line.join(" "));
        return;
    }

    let key_counts: Vec<u64> = std::env::var("WINDOW_KEYS")
        .unwrap_or_else(|_| "1000000".into())
        .split(',')
        .map(|n| n.trim().parse().expect("WINDOW_KEYS takes comma-separated key counts"))
        .collect();
    let expire_keys: u64 = std::env::var("WINDOW_EXPIRE_KEYS")
        .map_or(1_000_000, |v| v.parse().expect("WINDOW_EXPIRE_KEYS takes a key count"));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cold = drop_caches_requested();
    let sections = std::env::var("WINDOW_SECTIONS").unwrap_or_else(|_| "ram,expiry,sealed,restart".into());
    if !sections.split(',').any(|s| s == "ram") {
        if sections.split(',').any(|s| s == "sealed") {
            sealed_window_rows(cpus);
        }
        if sections.split(',').any(|s| s == "restart") {
            restart_rows(cpus);
        }
        return;
    }

    println!("# window: RAM per key, reopen time, expiry without stalls");
    println!();
    println!(
        "workload: random 16-byte keys claimed (in flight, no outcome), request {} B (hash stored), \
         Durability::None, 1 thread, one store per row in a fresh temp dir under {}; {cpus} CPUs; \
         each row in its own child process",
        REQUEST.len(),
        bench_parent_dir().display()
    );
    println!();
    println!(
        "| keys | inserts/s | VmRSS Δ B/key | RssAnon Δ B/key | target B/key | index entries | \
         disk B/key (allocated) | reopen ms (wall) | recovery ms (stats) | records scanned | page cache |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    for &keys in &key_counts {
        let r = run_child(&format!("ram_reopen:{keys}"));
        println!(
            "| {keys} | {:.0} | {:.1} | {:.1} | <= {TARGET_RAM_BYTES_PER_KEY:.0} | {} | {:.1} | {:.1} | {:.1} | {} | {} |",
            r["inserts_per_s"],
            r["vmrss_bytes_per_key"],
            r["rssanon_bytes_per_key"],
            r["index_entries"],
            r["disk_bytes_per_key"],
            r["reopen_ms"],
            r["recovery_ms"],
            r["recovery_records"],
            if cold { "cold (dropped)" } else { "warm" },
        );
    }
    println!();

    println!(
        "workload: a bucket of {expire_keys} keys (16 B, TTL {} s, in flight) expired by a ManualClock moved 2 h; \
         maintain() drops it (on the main thread, or the housekeeper if its tick comes first; it runs \
         as in a deployed store) while {EXPIRY_CLAIM_THREADS} threads claim new 16-byte keys \
         (TTL 24 h, Durability::None) for {} ms before and after; a claim counts as 'during' when it overlapped the drop",
        SHORT_TTL.as_secs(),
        EXPIRY_MARGIN.as_millis()
    );
    println!();
    println!(
        "| bucket keys | claim threads | maintain ms | buckets dropped | keys expired | claims during | \
         p50 µs | p99 µs | p99.9 µs | max µs | claims >= 1 ms | all claims | all p99 µs | all max µs | target |"
    );
    println!(
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    let r = run_child(&format!("expiry:{expire_keys}"));
    let verdict = if r["during_max_ns"] < TARGET_CLAIM_MAX_NS as f64 { "met" } else { "NOT met" };
    println!(
        "| {expire_keys} | {EXPIRY_CLAIM_THREADS} | {:.1} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {:.1} | {:.1} | every claim < 1 ms: {verdict} |",
        r["maintain_ms"],
        r["buckets_dropped"],
        r["keys_expired"],
        r["during_count"],
        r["during_p50_ns"] / 1e3,
        r["during_p99_ns"] / 1e3,
        r["during_p999_ns"] / 1e3,
        r["during_max_ns"] / 1e3,
        r["during_over_1ms"],
        r["all_count"],
        r["all_p99_ns"] / 1e3,
        r["all_max_ns"] / 1e3,
    );
    let floor_ms = (2.0 * EXPIRY_MARGIN.as_secs_f64() * 1e3 + r["maintain_ms"]).ceil() as u64;
    let floor = run_child(&format!("floor:{floor_ms}"));
    println!();
    println!(
        "note: with {cpus} CPUs and {} busy threads (claimers + maintain), a claim can also wait for a CPU; \
         compare 'claims during' with 'all claims'. The machine's own floor, same run: {EXPIRY_CLAIM_THREADS} \
         threads doing nothing but reading the clock for {floor_ms} ms saw {} gaps >= 1 ms between two reads \
         (longest {:.1} µs), with no store in the process.",
        EXPIRY_CLAIM_THREADS + 1,
        floor["over_1ms"],
        floor["max_ns"] / 1e3,
    );
    println!();

    sealed_window_rows(cpus);
    restart_rows(cpus);
}

/// Target of every reopen row below: the store answers within 1 s of `Store::open` starting.
const TARGET_RESTART_REOPEN_MS: f64 = 1000.0;
/// Largest key count whose store is also reopened with every table deleted (a full scan, to
/// measure the scan rate with nothing mapped).
const RESTART_FULL_SCAN_MAX_KEYS: u64 = 10_000_000;
/// Environment variable: `close` or `kill`, how the fill child ends.
const RESTART_END_ENV: &str = "WINDOW_RESTART_END";
/// What the fill child prints once its `count` keys are in: the parent then lets it run on
/// under load for `RESTART_KILL_AFTER` and SIGKILLs it.
const RESTART_FILLED: &str = "FILLED";
/// How long the fill child keeps claiming new keys after the fill before it is killed.
const RESTART_KILL_AFTER: Duration = Duration::from_millis(1500);
/// Threads claiming in the fill child.
const RESTART_FILL_THREADS: usize = 2;

/// Default options but `Durability::None` (to fill fast): what a service gets by default.
fn restart_options() -> Options {
    Options { durability: Durability::None, ..Default::default() }
}

/// Reopen at any moment: N fresh keys written in the last minutes (default options but
/// `Durability::None`), then (a) a clean `close()` or (b) a SIGKILL while 2 threads go on
/// claiming new keys, then a timed `Store::open` in a fresh process. Knob: `WINDOW_RESTART_KEYS`
/// (comma-separated, default `10000000`; `100000000` takes ~15 GB of disk).
fn restart_rows(cpus: usize) {
    let key_counts: Vec<u64> = std::env::var("WINDOW_RESTART_KEYS")
        .unwrap_or_else(|_| "10000000".into())
        .split(',')
        .map(|n| n.trim().parse().expect("WINDOW_RESTART_KEYS takes comma-separated key counts"))
        .collect();
    let parent = bench_parent_dir();
    println!(
        "workload: N random 16-byte keys claimed by {RESTART_FILL_THREADS} threads (Options::default() but Durability::None: \
         1 h buckets, 64 MiB segments, active_bytes_max 16 MiB, housekeeper on), in a fresh dir under {}; {cpus} CPUs. \
         'close': close() then reopen. 'SIGKILL under load': after N keys the writers go on claiming new keys for \
         {} ms, then the process is SIGKILLed. Reopen timed in a fresh process (Store::open wall time); page cache warm. \
         'full scan': every *.tbl deleted, then reopened (every segment scanned on up to 2 threads).",
        parent.display(),
        RESTART_KILL_AFTER.as_millis()
    );
    println!();
    println!(
        "| keys | end | fill keys/s | keys at end | reopen ms | recovery ms (stats) | tables loaded | records scanned | \
         scanned: no table / unsealed tail / damaged | scan ms | scan rate keys/s | target |"
    );
    println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |");
    for &keys in &key_counts {
        let needed = keys as f64 * 140.0;
        let free = free_bytes(&parent) as f64;
        if needed > free {
            println!(
                "| {keys} | skipped: needs ~{:.1} GB of disk, {:.1} GB free | | | | | | | | | | |",
                needed / 1e9,
                free / 1e9
            );
            continue;
        }
        for end in ["close", "kill"] {
            let dir = tempfile::tempdir_in(&parent).expect("create bench temp dir");
            let fill = restart_fill(keys, end, dir.path());
            let full_scan = end == "kill" && keys <= RESTART_FULL_SCAN_MAX_KEYS;
            let r = run_child_in_with(
                &format!("restart_reopen:{keys}"),
                dir.path(),
                &[("WINDOW_FULL_SCAN", if full_scan { "1" } else { "0" })],
            );
            let verdict = if r["reopen_ms"] <= TARGET_RESTART_REOPEN_MS { "met" } else { "NOT met" };
            let rate =
                |records: f64, us: f64| if us > 0.0 { format!("{:.0}", records / (us / 1e6)) } else { "-".into() };
            println!(
                "| {keys} | {} | {:.0} | {} | {:.1} | {:.1} | {} | {} | {} / {} / {} | {:.1} | {} | <= 1 s: {verdict} |",
                if end == "close" { "close" } else { "SIGKILL under load" },
                fill.0,
                fill.1,
                r["reopen_ms"],
                r["recovery_ms"],
                r["tables_loaded"],
                r["records"],
                r["no_table"],
                r["unsealed_tail"],
                r["damaged"],
                r["scan_us"] / 1e3,
                rate(r["records"], r["scan_us"]),
            );
            if full_scan {
                println!(
                    "| {keys} | every table deleted (full scan) | | {} | {:.1} | {:.1} | 0 | {} | {} segments | {:.1} | {} | (scan rate) |",
                    fill.1,
                    r["full_reopen_ms"],
                    r["full_recovery_ms"],
                    r["full_records"],
                    r["full_segments"],
                    r["full_scan_us"] / 1e3,
                    rate(r["full_records"], r["full_scan_us"]),
                );
            }
        }
    }
    println!();
}

/// Runs the fill child for `keys` in `dir`, ending it with a clean close or a SIGKILL under
/// load; returns (fill keys/s, keys claimed in all).
fn restart_fill(keys: u64, end: &str, dir: &Path) -> (f64, u64) {
    use std::io::BufRead as _;
    let exe = std::env::current_exe().expect("path of this bench binary");
    let mut child = Command::new(exe)
        .env(CHILD_ENV, format!("restart_fill:{keys}"))
        .env(CHILD_DIR_ENV, dir)
        .env(RESTART_END_ENV, end)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start fill child");
    let stdout = child.stdout.take().expect("child stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut rate = 0.0;
    let mut total = keys;
    for line in lines.by_ref() {
        let line = line.expect("read child stdout");
        if let Some(r) = line.strip_prefix(RESTART_FILLED) {
            rate = r.trim().parse().expect("fill rate");
            if end == "kill" {
                std::thread::sleep(RESTART_KILL_AFTER);
                // SAFETY: a plain signal to our own child's pid.
                #[allow(unsafe_code, reason = "kill of the child, with its SAFETY comment")]
                unsafe {
                    libc::kill(child.id() as i32, libc::SIGKILL);
                }
                break;
            }
        }
        if let Some(r) = line.strip_prefix("RESULT ") {
            for (k, v) in r.split_whitespace().filter_map(|pair| pair.split_once('=')) {
                match k {
                    "keys" => total = v.parse::<f64>().expect("keys") as u64,
                    "rate" => rate = v.parse().expect("rate"),
                    _ => {}
                }
            }
        }
    }
    let status = child.wait().expect("wait for fill child");
    if end == "kill" {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "the fill child was not killed: {status}");
        // Counted by the reopen (index entries and table entries).
        total = 0;
    } else {
        assert!(status.success(), "fill child failed: {status}");
    }
    (rate, total)
}

/// Runs the child `job` on `dir` with extra environment variables.
fn run_child_in_with(job: &str, dir: &Path, env: &[(&str, &str)]) -> BTreeMap<String, f64> {
    let exe = std::env::current_exe().expect("path of this bench binary");
    let mut command = Command::new(exe);
    command.env(CHILD_ENV, job).env(CHILD_DIR_ENV, dir);
    for (k, v) in env {
        command.env(k, v);
    }
    run_child_command(command, &format!("child measurement {job}"))
}

/// Child: claims `count` random keys on 2 threads into the store in `dir`; then either closes
/// it, or prints `FILLED` and goes on claiming new keys until the parent kills it.
fn child_restart_fill(count: u64, dir: &Path) -> Vec<(&'static str, f64)> {
    use std::io::Write as _;
    let kill = std::env::var(RESTART_END_ENV).is_ok_and(|v| v == "kill");
    let store = Arc::new(Store::open(dir, restart_options()).expect("open store"));
    let started = Instant::now();
    let per_thread = count / RESTART_FILL_THREADS as u64;
    let claim_range = |seed: u64, n: u64| {
        let mut keys = KeyGen::new(seed);
        for _ in 0..n {
            let claim = store.claim(keys.next_key(), REQUEST).expect("claim");
            assert!(matches!(claim, Claim::Acquired(_)), "a new random key was not acquired");
        }
    };
    std::thread::scope(|scope| {
        for t in 0..RESTART_FILL_THREADS as u64 {
            scope.spawn(move || claim_range(100 + t, per_thread));
        }
    });
    let rate = (per_thread * RESTART_FILL_THREADS as u64) as f64 / started.elapsed().as_secs_f64();
    if kill {
        println!("{RESTART_FILLED} {rate}");
        std::io::stdout().flush().expect("flush");
        // Sustained load until the SIGKILL: new keys, on every thread.
        std::thread::scope(|scope| {
            for t in 0..RESTART_FILL_THREADS as u64 {
                scope.spawn(move || claim_range(200 + t, u64::MAX));
            }
        });
        unreachable!("killed before the load ends");
    }
    let store = Arc::into_inner(store).expect("the only handle");
    store.close().expect("close");
    vec![("keys", (per_thread * RESTART_FILL_THREADS as u64) as f64), ("rate", rate)]
}

/// Child: times `Store::open` of the store in `dir` and reports what recovery did; with
/// `WINDOW_FULL_SCAN=1`, then deletes every table and times a reopen that scans everything.
fn child_restart_reopen(count: u64, dir: &Path) -> Vec<(&'static str, f64)> {
    let started = Instant::now();
    let store = Store::open(dir, restart_options()).expect("reopen");
    let reopen_ms = started.elapsed().as_secs_f64() * 1e3;
    let stats = store.stats();
    let r = stats.recovery.clone();
    assert!(
        stats.index_entries + stats.sealed_entries >= count,
        "keys lost: {} in RAM + {} in tables < {count}",
        stats.index_entries,
        stats.sealed_entries
    );
    let mut keys = KeyGen::new(100);
    for _ in 0..REOPEN_SPOT_CHECKS.min(count / 2) {
        let entry = store.get(keys.next_key()).expect("get after reopen");
        assert!(matches!(entry, Some(Entry::InFlight { .. })), "a filled key after reopen: {entry:?}");
    }
    let mut result = vec![
        ("reopen_ms", reopen_ms),
        ("recovery_ms", r.duration_us as f64 / 1e3),
        ("tables_loaded", r.tables_loaded as f64),
        ("records", r.records as f64),
        ("no_table", r.segments_scanned_no_table as f64),
        ("unsealed_tail", r.segments_scanned_unsealed_tail as f64),
        ("damaged", r.tables_rebuilt as f64),
        ("scan_us", r.scan_us as f64),
    ];
    // Dropping it writes tables for what this open scanned (as a close would): the next open
    // finds them.
    drop(store);
    if std::env::var("WINDOW_FULL_SCAN").is_ok_and(|v| v == "1") {
        for entry in std::fs::read_dir(dir).expect("list store") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "tbl") {
                std::fs::remove_file(path).expect("remove table");
            }
        }
        let started = Instant::now();
        let store = Store::open(dir, Options { background: false, ..restart_options() }).expect("reopen by scan");
        let full_ms = started.elapsed().as_secs_f64() * 1e3;
        let r = store.stats().recovery;
        result.extend([
            ("full_reopen_ms", full_ms),
            ("full_recovery_ms", r.duration_us as f64 / 1e3),
            ("full_records", r.records as f64),
            ("full_segments", r.segments as f64),
            ("full_scan_us", r.scan_us as f64),
        ]);
        std::mem::forget(store);
    }
    result
}

/// Results of the three sealed-window children for one key count.
struct SealedRun {
    keys: u64,
    fill: BTreeMap<String, f64>,
    reopen: BTreeMap<String, f64>,
    claims: BTreeMap<String, f64>,
}

/// Fills, seals, reopens and claims over a sealed window for every `WINDOW_SEALED_KEYS` count,
/// then prints the three sealed tables.
fn sealed_window_rows(cpus: usize) {
    let key_counts: Vec<u64> = std::env::var("WINDOW_SEALED_KEYS")
        .unwrap_or_else(|_| "1000000,10000000".into())
        .split(',')
        .map(|n| n.trim().parse().expect("WINDOW_SEALED_KEYS takes comma-separated key counts"))
        .collect();
    let fresh_claims = sealed_fresh_claims();
    let parent = bench_parent_dir();
    let mut runs = Vec::new();
    let mut skipped = Vec::new();
    let mut disk_per_key = SEALED_DISK_BYTES_PER_KEY_GUESS;
    for &keys in &key_counts {
        assert!(keys >= SEALED_GROUPS, "WINDOW_SEALED_KEYS: at least {SEALED_GROUPS} keys (one group per bucket)");
        let needed = keys as f64 * disk_per_key * 1.2;
        let free = free_bytes(&parent) as f64;
        if needed > free {
            skipped.push(format!(
                "{keys} keys skipped: needs ~{:.1} GB of disk ({disk_per_key:.0} B/key + 20 %), {:.1} GB free under {}",
                needed / 1e9,
                free / 1e9,
                parent.display()
            ));
            continue;
        }
        let dir = tempfile::tempdir_in(&parent).expect("create bench temp dir");
        eprintln!("sealed window: filling {keys} keys in {}", dir.path().display());
        let fill = run_child_in(&format!("sealed_fill:{keys}"), Some(dir.path()));
        disk_per_key = disk_per_key.max(fill["disk_bytes_per_key"] * 1.05);
        eprintln!("sealed window: {keys} keys filled and sealed; reopening");
        let reopen = run_child_in(&format!("sealed_reopen:{keys}"), Some(dir.path()));
        eprintln!("sealed window: {keys} keys reopened; claiming");
        let claims = run_child_in(&format!("sealed_claims:{keys}"), Some(dir.path()));
        runs.push(SealedRun { keys, fill, reopen, claims });
    }

    println!("# window: sealed buckets (24 h window of sealed tables)");
    println!();
    println!(
        "workload: N random 16-byte keys claimed (request {} B, hash stored), 1 in {SEALED_COMPLETE_EVERY} completed \
         ({} B outcome), Durability::None, TTL {} h, bucket_width {} h, seal_idle_after {} s, ManualClock moved {:.1} min \
         after each N/{SEALED_GROUPS} claims (expiries in {SEALED_GROUPS} one-hour buckets, all live), then 2 s and \
         maintain() seals every segment; 1 thread; one store per N in a fresh temp dir under {}; {cpus} CPUs; \
         fill+seal, reopen and claims each in its own child process",
        REQUEST.len(),
        SEALED_OUTCOME.len(),
        SEALED_TTL.as_secs() / 3600,
        SEALED_BUCKET.as_secs() / 3600,
        SEAL_IDLE.as_secs(),
        SEALED_GROUP_STEP.as_secs_f64() / 60.0,
        parent.display()
    );
    println!();
    println!("## RAM per key in sealed buckets");
    println!();
    println!(
        "workload: RssAnon (/proc/self/status) growth over the open store divided by N: after the fill \
         (entries in RAM), after maintain() sealed everything, and after malloc_trim(0) (freed memory the \
         allocator kept); filter B/key = sealed_filter_bytes / N"
    );
    println!();
    println!(
        "| keys | fill claims/s | RssAnon B/key before sealing | seal ms | RssAnon B/key after sealing | \
         after malloc_trim | filter B/key | target B/key | index entries after | sealed tables | sealed entries | \
         segments | disk B/key (allocated) | table B/key |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for run in &runs {
        let f = &run.fill;
        let verdict =
            if f["rssanon_after_seal_bytes_per_key"] <= TARGET_SEALED_RAM_BYTES_PER_KEY { "met" } else { "NOT met" };
        println!(
            "| {} | {:.0} | {:.1} | {:.0} | {:.1} | {:.1} | {:.2} | <= {TARGET_SEALED_RAM_BYTES_PER_KEY:.0}: {verdict} | {} | {} | {} | {} | {:.1} | {:.1} |",
            run.keys,
            f["fill_claims_per_s"],
            f["rssanon_before_seal_bytes_per_key"],
            f["seal_ms"],
            f["rssanon_after_seal_bytes_per_key"],
            f["rssanon_after_trim_bytes_per_key"],
            f["filter_bytes_per_key"],
            f["index_entries_after_seal"],
            f["sealed_tables"],
            f["sealed_entries"],
            f["segments"],
            f["disk_bytes_per_key"],
            f["table_bytes_per_key"],
        );
    }
    println!();

    println!("## Claims of new keys over a full sealed window");
    println!();
    println!(
        "workload: the sealed store reopened (tables mapped), 1 thread claims {fresh_claims} fresh random 16-byte \
         keys (pre-generated; each claim timed with two clock reads, included in claims/s; 'empty store' = the \
         same claims on a fresh store with no table, same child, as a baseline under the same load), then claims again \
         (same request) up to {SEALED_MAX_REPLAYS} completed sealed keys in random order (each answered \
         Completed with the stored outcome); page cache warm"
    );
    println!();
    println!(
        "| keys sealed | sealed tables at open | index entries at open | fresh claims | claims/s | p50 µs | p99 µs | \
         p99.9 µs | max µs | target | empty store claims/s | empty p50 µs | empty p99 µs | replays | replays/s | \
         replay p50 µs | replay p99 µs | replay max µs |"
    );
    println!(
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for run in &runs {
        let c = &run.claims;
        let verdict = if c["fresh_per_s"] >= TARGET_SEALED_CLAIMS_PER_S { "met" } else { "NOT met" };
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | >= 1M/s: {verdict} | {:.0} | {:.2} | {:.2} | {} | {:.0} | {:.2} | {:.2} | {:.1} |",
            run.keys,
            c["sealed_tables_at_open"],
            c["index_entries_at_open"],
            c["fresh_count"],
            c["fresh_per_s"],
            c["fresh_p50_ns"] / 1e3,
            c["fresh_p99_ns"] / 1e3,
            c["fresh_p999_ns"] / 1e3,
            c["fresh_max_ns"] / 1e3,
            c["empty_per_s"],
            c["empty_p50_ns"] / 1e3,
            c["empty_p99_ns"] / 1e3,
            c["replay_count"],
            c["replay_per_s"],
            c["replay_p50_ns"] / 1e3,
            c["replay_p99_ns"] / 1e3,
            c["replay_max_ns"] / 1e3,
        );
    }
    println!();

    println!("## Reopen with sealed tables");
    println!();
    println!(
        "workload: the sealed store closed and opened again (wall time of Store::open; RssAnon growth over the \
         open divided by N); then the *.tbl files deleted and the store opened again (every segment scanned, \
         only up to {NO_TABLE_REOPEN_MAX_KEYS} keys), after which maintain() seals again; page cache warm"
    );
    println!();
    println!(
        "| keys | reopen ms (tables) | recovery ms (stats) | tables loaded | records scanned | index entries | \
         RssAnon B/key after open | target | reopen ms (no tables) | records scanned (no tables) | \
         index entries (no tables) | re-seal ms |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |");
    for run in &runs {
        let r = &run.reopen;
        let verdict = if run.keys < TARGET_SEALED_REOPEN_KEYS {
            "n/a below 100M"
        } else if r["reopen_ms"] <= TARGET_SEALED_REOPEN_MS {
            "met"
        } else {
            "NOT met"
        };
        let (scan_ms, scan_records, scan_entries, reseal_ms) = if r["scan_done"] > 0.0 {
            (
                format!("{:.1}", r["scan_reopen_ms"]),
                format!("{}", r["scan_records"]),
                format!("{}", r["scan_index_entries"]),
                format!("{:.0}", r["reseal_ms"]),
            )
        } else {
            ("-".into(), "-".into(), "-".into(), "-".into())
        };
        println!(
            "| {} | {:.1} | {:.1} | {} | {} | {} | {:.2} | <= 1 s at 100M keys: {verdict} | {scan_ms} | {scan_records} | {scan_entries} | {reseal_ms} |",
            run.keys,
            r["reopen_ms"],
            r["recovery_ms"],
            r["tables_loaded"],
            r["records"],
            r["index_entries"],
            r["rssanon_bytes_per_key"],
        );
    }
    println!();
    for note in &skipped {
        println!("note: {note}");
    }
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        println!("note: load average at the end: {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    }
}

/// Runs this binary as a child for one job and parses its `RESULT` line.
fn run_child(job: &str) -> BTreeMap<String, f64> {
    run_child_in(job, None)
}

/// Runs this binary as a child for one job on the store in `dir` (if any) and parses its
/// `RESULT` line.
fn run_child_in(job: &str, dir: Option<&Path>) -> BTreeMap<String, f64> {
    let exe = std::env::current_exe().expect("path of this bench binary");
    let mut command = Command::new(exe);
    command.env(CHILD_ENV, job);
    if let Some(dir) = dir {
        command.env(CHILD_DIR_ENV, dir);
    }
    run_child_command(command, &format!("child measurement {job}"))
}

/// Child: claims `count` keys, measures RSS growth, closes, and times a reopen.
fn child_ram_and_reopen(count: u64) -> Vec<(&'static str, f64)> {
    let dir = tempfile::tempdir_in(bench_parent_dir()).expect("create bench temp dir");
    let options = || Options { durability: Durability::None, background: false, ..Default::default() };
    let store = Store::open(dir.path(), options()).expect("open store");
    let before = MemoryStatus::read();
    let mut keys = KeyGen::new(11);
    let started = Instant::now();
    for _ in 0..count {
        let claim = store.claim(keys.next_key(), REQUEST).expect("claim");
        assert!(matches!(claim, Claim::Acquired(_)), "a new random key was not acquired: {claim:?}");
    }
    let insert_s = started.elapsed().as_secs_f64();
    let after = MemoryStatus::read();
    let index_entries = store.stats().index_entries;
    assert_eq!(index_entries, count, "the index does not hold every claimed key");
    store.close().expect("close store");
    let disk_bytes = allocated_bytes(dir.path());

    if drop_caches_requested() {
        drop_page_cache();
    }
    let started = Instant::now();
    let store = Store::open(dir.path(), options()).expect("reopen store");
    let reopen_s = started.elapsed().as_secs_f64();
    let stats = store.stats();
    // A clean close gave every segment a table: the keys are in the mapped tables, not RAM.
    assert_eq!(stats.index_entries + stats.sealed_entries, count, "the reopened store does not hold every key");
    let mut keys = KeyGen::new(11);
    let stride = (count / REOPEN_SPOT_CHECKS).max(1);
    for i in 0..count {
        let key = keys.next_key();
        if i % stride == 0 {
            let entry = store.get(key).expect("get after reopen");
            assert!(matches!(entry, Some(Entry::InFlight { .. })), "key {i} after reopen: {entry:?}");
        }
    }
    drop(store);

    let per_key = |delta_kib: u64| (delta_kib * 1024) as f64 / count.max(1) as f64;
    vec![
        ("inserts_per_s", count as f64 / insert_s),
        ("vmrss_bytes_per_key", per_key(after.vm_rss_kib.saturating_sub(before.vm_rss_kib))),
        ("rssanon_bytes_per_key", per_key(after.rss_anon_kib.saturating_sub(before.rss_anon_kib))),
        ("index_entries", index_entries as f64),
        ("disk_bytes_per_key", disk_bytes as f64 / count.max(1) as f64),
        ("reopen_ms", reopen_s * 1e3),
        ("recovery_ms", stats.recovery.duration_us as f64 / 1e3),
        ("recovery_records", stats.recovery.records as f64),
    ]
}

/// Child: fills a bucket of `count` short-TTL keys, expires it, and drops it with `maintain()`
/// while `EXPIRY_CLAIM_THREADS` threads claim and record their latency. The store runs its
/// housekeeper as a deployed store does (it prepares spare segments ahead of need); the clock
/// moves past the bucket only when the drop is due, so whichever of the housekeeper and the
/// explicit `maintain()` gets there first, the drop falls inside the timed phase. Sealing is
/// held off (`seal_idle_after` 48 h) so the phase holds the drop alone.
fn child_expiry(count: u64) -> Vec<(&'static str, f64)> {
    const HOUR_MS: u64 = 3_600_000;
    // Start 1 s after an hour boundary so every short-TTL key falls into one 1-hour bucket.
    let start_ms = 1_700_000_000_000 / HOUR_MS * HOUR_MS + 1000;
    let clock = ManualClock::new(start_ms);
    let dir = tempfile::tempdir_in(bench_parent_dir()).expect("create bench temp dir");
    let options = Options {
        durability: Durability::None,
        clock: clock.clone(),
        bucket_width: Duration::from_secs(3600),
        // Only the drop is measured here: the claimers' own segments, 2 h old once the clock
        // moves, are not sealed during it (sealing is timed in the sealed-window rows).
        seal_idle_after: Duration::from_secs(48 * 3600),
        ..Default::default()
    };
    let store = Arc::new(Store::open(dir.path(), options).expect("open store"));
    let short = ClaimOptions { ttl: Some(SHORT_TTL), ..Default::default() };
    let mut keys = KeyGen::new(21);
    let first_key = keys.next_key();
    let _held = store.claim_with(first_key, REQUEST, short.clone()).expect("fill claim");
    for _ in 1..count {
        let claim = store.claim_with(keys.next_key(), REQUEST, short.clone()).expect("fill claim");
        assert!(matches!(claim, Claim::Acquired(_)), "a new random key was not acquired: {claim:?}");
    }

    // 0 = before the drop, 1 = dropping, 2 = after.
    let phase = Arc::new(AtomicU8::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let claimers: Vec<_> = (0..EXPIRY_CLAIM_THREADS)
        .map(|t| {
            let store = store.clone();
            let phase = phase.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut keys = KeyGen::new(100 + t as u64);
                let mut during = new_histogram();
                let mut all = new_histogram();
                while !stop.load(Ordering::Relaxed) {
                    let key = keys.next_key();
                    let phase_before = phase.load(Ordering::SeqCst);
                    let started = Instant::now();
                    let claim = store.claim(key, REQUEST).expect("claim during expiry");
                    let nanos = duration_nanos(started.elapsed());
                    let phase_after = phase.load(Ordering::SeqCst);
                    assert!(matches!(claim, Claim::Acquired(_)), "a new random key was not acquired: {claim:?}");
                    all.saturating_record(nanos);
                    if phase_before <= 1 && phase_after >= 1 {
                        during.saturating_record(nanos);
                    }
                }
                (during, all)
            })
        })
        .collect();
    std::thread::sleep(EXPIRY_MARGIN);
    phase.store(1, Ordering::SeqCst);
    let started = Instant::now();
    clock.advance(Duration::from_secs(2 * 3600));
    store.maintain().expect("maintain");
    let maintain_s = started.elapsed().as_secs_f64();
    phase.store(2, Ordering::SeqCst);
    std::thread::sleep(EXPIRY_MARGIN);
    stop.store(true, Ordering::Relaxed);
    let mut during = new_histogram();
    let mut all = new_histogram();
    for claimer in claimers {
        let (d, a) = claimer.join().expect("claim thread panicked");
        during.add(d).expect("merge histograms");
        all.add(a).expect("merge histograms");
    }
    let stats = store.stats();
    let buckets_dropped = stats.buckets_expired_total;
    assert!(buckets_dropped >= 1, "maintain dropped no bucket");
    assert!(stats.keys_expired_total >= count, "maintain expired {} keys, expected {count}", stats.keys_expired_total);
    assert!(store.get(first_key).expect("get").is_none(), "a key of the dropped bucket is still readable");

    vec![
        ("maintain_ms", maintain_s * 1e3),
        ("buckets_dropped", buckets_dropped as f64),
        ("keys_expired", stats.keys_expired_total as f64),
        ("during_count", during.len() as f64),
        ("during_p50_ns", during.value_at_quantile(0.5) as f64),
        ("during_p99_ns", during.value_at_quantile(0.99) as f64),
        ("during_p999_ns", during.value_at_quantile(0.999) as f64),
        ("during_max_ns", during.max() as f64),
        ("during_over_1ms", during.count_between(TARGET_CLAIM_MAX_NS, u64::MAX) as f64),
        ("all_count", all.len() as f64),
        ("all_p99_ns", all.value_at_quantile(0.99) as f64),
        ("all_max_ns", all.max() as f64),
    ]
}

/// The machine's own floor for the expiry row: `EXPIRY_CLAIM_THREADS` threads that only read
/// the clock for `ms` milliseconds, timing the gap between consecutive reads. A gap is time the
/// thread was not running (preempted by other threads, kernel work or the hypervisor); a claim
/// that spans one takes at least that long, whatever the store does.
fn child_floor(ms: u64) -> Vec<(&'static str, f64)> {
    let spinners: Vec<_> = (0..EXPIRY_CLAIM_THREADS)
        .map(|_| {
            std::thread::spawn(move || {
                let mut gaps = new_histogram();
                let started = Instant::now();
                let mut last = started;
                while last - started < Duration::from_millis(ms) {
                    let now = Instant::now();
                    gaps.saturating_record(duration_nanos(now - last));
                    last = now;
                }
                gaps
            })
        })
        .collect();
    let mut gaps = new_histogram();
    for spinner in spinners {
        gaps.add(spinner.join().expect("spinner panicked")).expect("merge histograms");
    }
    vec![("over_1ms", gaps.count_between(TARGET_CLAIM_MAX_NS, u64::MAX) as f64), ("max_ns", gaps.max() as f64)]
}

/// The store dir a sealed-window child works on.
fn child_dir() -> PathBuf {
    std::env::var_os(CHILD_DIR_ENV).map(PathBuf::from).expect("WINDOW_CHILD_DIR names the store dir")
}

/// Fresh claims timed over the sealed window: `WINDOW_SEALED_CLAIMS`, default 1,000,000.
fn sealed_fresh_claims() -> u64 {
    std::env::var("WINDOW_SEALED_CLAIMS")
        .map_or(1_000_000, |v| v.parse().expect("WINDOW_SEALED_CLAIMS takes a claim count"))
}

/// Store time when the sealed-window fill starts: 59 min into an hour, so the 25 groups'
/// expiries (57.6 min apart) land in 25 distinct one-hour buckets.
fn sealed_start_ms() -> u64 {
    const HOUR_MS: u64 = 3_600_000;
    1_700_000_000_000 / HOUR_MS * HOUR_MS + 59 * 60_000
}

/// Store time after the fill and the move past `seal_idle_after`: where the later children
/// start their clocks.
fn sealed_end_ms() -> u64 {
    sealed_start_ms() + (SEALED_GROUPS - 1) * duration_ms(SEALED_GROUP_STEP) + duration_ms(SEAL_IDLE) + 1000
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).expect("duration fits in u64 ms")
}

fn sealed_options(clock: Arc<ManualClock>) -> Options {
    Options {
        durability: Durability::None,
        background: false,
        clock,
        default_ttl: SEALED_TTL,
        bucket_width: SEALED_BUCKET,
        seal_idle_after: SEAL_IDLE,
        ..Default::default()
    }
}

/// Claims per group of the sealed fill (the last group may be shorter).
fn sealed_group_len(count: u64) -> u64 {
    count.div_ceil(SEALED_GROUPS)
}

/// Checks `REOPEN_SPOT_CHECKS` fill keys spread over the whole fill: completed keys replay their
/// outcome, the others are in flight.
fn check_sealed_keys(store: &Store, count: u64, when: &str) {
    let mut keys = KeyGen::new(SEALED_SEED);
    let stride = (count / REOPEN_SPOT_CHECKS).max(1);
    for i in 0..count {
        let key = keys.next_key();
        if i % stride != 0 {
            continue;
        }
        let entry = store.get(key).expect("get a sealed key");
        if i % SEALED_COMPLETE_EVERY == 0 {
            assert!(
                matches!(&entry, Some(Entry::Completed(c)) if c.outcome == SEALED_OUTCOME),
                "fill key {i} {when}: expected its outcome, got {entry:?}"
            );
        } else {
            assert!(
                matches!(entry, Some(Entry::InFlight { .. })),
                "fill key {i} {when}: expected in flight, got {entry:?}"
            );
        }
    }
}

/// Child: fills the sealed window into `dir`, seals it, and measures RAM per key before and
/// after sealing.
fn child_sealed_fill(count: u64, dir: &Path) -> Vec<(&'static str, f64)> {
    let clock = ManualClock::new(sealed_start_ms());
    let before = MemoryStatus::read();
    let store = Store::open(dir, sealed_options(clock.clone())).expect("open store");
    let group = sealed_group_len(count);
    let mut keys = KeyGen::new(SEALED_SEED);
    let started = Instant::now();
    for i in 0..count {
        if i > 0 && i % group == 0 {
            clock.advance(SEALED_GROUP_STEP);
        }
        match store.claim(keys.next_key(), REQUEST).expect("fill claim") {
            Claim::Acquired(token) => {
                if i % SEALED_COMPLETE_EVERY == 0 {
                    store.complete(&token, SEALED_OUTCOME).expect("fill complete");
                }
            }
            other => panic!("fill key {i} was not acquired: {other:?}"),
        }
    }
    let fill_s = started.elapsed().as_secs_f64();
    let filled = MemoryStatus::read();
    let entries_before = store.stats().index_entries;
    assert_eq!(entries_before, count, "the index does not hold every claimed key before sealing");

    clock.set_ms(sealed_end_ms());
    let started = Instant::now();
    store.maintain().expect("maintain seals the idle segments");
    let seal_s = started.elapsed().as_secs_f64();
    let sealed = MemoryStatus::read();
    trim_allocator();
    let trimmed = MemoryStatus::read();
    let stats = store.stats();
    check_sealed_keys(&store, count, "after sealing");
    store.close().expect("close store");
    let disk_bytes = allocated_bytes(dir);
    let table_bytes = allocated_bytes_with_ext(dir, "tbl");

    let per_key =
        |after: &MemoryStatus| (after.rss_anon_kib.saturating_sub(before.rss_anon_kib) * 1024) as f64 / count as f64;
    vec![
        ("fill_claims_per_s", count as f64 / fill_s),
        ("rssanon_before_seal_bytes_per_key", per_key(&filled)),
        ("seal_ms", seal_s * 1e3),
        ("rssanon_after_seal_bytes_per_key", per_key(&sealed)),
        ("rssanon_after_trim_bytes_per_key", per_key(&trimmed)),
        ("filter_bytes_per_key", stats.sealed_filter_bytes as f64 / count as f64),
        ("index_entries_after_seal", stats.index_entries as f64),
        ("sealed_tables", stats.sealed_tables as f64),
        ("sealed_entries", stats.sealed_entries as f64),
        ("segments", stats.segments as f64),
        ("disk_bytes_per_key", disk_bytes as f64 / count as f64),
        ("table_bytes_per_key", table_bytes as f64 / count as f64),
    ]
}

/// Child: reopens the sealed store in `dir` (timed), then (up to `NO_TABLE_REOPEN_MAX_KEYS`)
/// deletes its tables, reopens it again with a full scan, and seals it again.
fn child_sealed_reopen(count: u64, dir: &Path) -> Vec<(&'static str, f64)> {
    if drop_caches_requested() {
        drop_page_cache();
    }
    let clock = ManualClock::new(sealed_end_ms());
    let before = MemoryStatus::read();
    let started = Instant::now();
    let store = Store::open(dir, sealed_options(clock.clone())).expect("reopen the sealed store");
    let reopen_s = started.elapsed().as_secs_f64();
    let opened = MemoryStatus::read();
    let stats = store.stats();
    check_sealed_keys(&store, count, "after reopen with tables");
    store.close().expect("close store");
    let mut result = vec![
        ("reopen_ms", reopen_s * 1e3),
        ("recovery_ms", stats.recovery.duration_us as f64 / 1e3),
        ("tables_loaded", stats.recovery.tables_loaded as f64),
        ("records", stats.recovery.records as f64),
        ("index_entries", stats.index_entries as f64),
        (
            "rssanon_bytes_per_key",
            (opened.rss_anon_kib.saturating_sub(before.rss_anon_kib) * 1024) as f64 / count as f64,
        ),
    ];
    if count > NO_TABLE_REOPEN_MAX_KEYS {
        result.push(("scan_done", 0.0));
        return result;
    }

    let tables: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list store dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "tbl"))
        .collect();
    assert!(!tables.is_empty(), "the sealed store has no *.tbl file to delete");
    for table in &tables {
        std::fs::remove_file(table).expect("delete a table file");
    }
    if drop_caches_requested() {
        drop_page_cache();
    }
    let started = Instant::now();
    let store = Store::open(dir, sealed_options(clock)).expect("reopen without tables");
    let scan_s = started.elapsed().as_secs_f64();
    let scan = store.stats();
    check_sealed_keys(&store, count, "after reopen without tables");
    let started = Instant::now();
    store.maintain().expect("maintain seals the scanned segments again");
    let reseal_s = started.elapsed().as_secs_f64();
    let resealed = store.stats();
    assert_eq!(
        resealed.sealed_entries, count,
        "maintain after the scan did not seal every key again (sealed tables {}, index entries {})",
        resealed.sealed_tables, resealed.index_entries
    );
    store.close().expect("close store");
    result.extend([
        ("scan_done", 1.0),
        ("scan_reopen_ms", scan_s * 1e3),
        ("scan_records", scan.recovery.records as f64),
        ("scan_index_entries", scan.index_entries as f64),
        ("reseal_ms", reseal_s * 1e3),
    ]);
    result
}

/// Child: on the reopened sealed store in `dir`, times fresh claims on 1 thread, then replays of
/// completed sealed keys.
fn child_sealed_claims(count: u64, dir: &Path) -> Vec<(&'static str, f64)> {
    // Baseline under the same machine load: the same claims on an empty store (no table).
    let fresh_count = sealed_fresh_claims();
    let empty_dir = tempfile::tempdir_in(bench_parent_dir()).expect("create bench temp dir");
    let empty = Store::open(empty_dir.path(), sealed_options(ManualClock::new(sealed_end_ms()))).expect("open store");
    let (empty_hist, empty_s) = time_fresh_claims(&empty, fresh_count, SEALED_FRESH_SEED + 1);
    empty.close().expect("close store");
    drop(empty_dir);

    let clock = ManualClock::new(sealed_end_ms());
    let store = Store::open(dir, sealed_options(clock)).expect("reopen the sealed store");
    let at_open = store.stats();
    // Steady state: the housekeeper's first pass (here by hand: background is off) builds the
    // union filter over all sealed tables.
    store.maintain().expect("maintain after reopen");

    let (fresh_hist, fresh_s) = time_fresh_claims(&store, fresh_count, SEALED_FRESH_SEED);

    // Completed fill keys, spread over every group, in random order.
    let completed = count.div_ceil(SEALED_COMPLETE_EVERY);
    let stride = completed.div_ceil(SEALED_MAX_REPLAYS).max(1) * SEALED_COMPLETE_EVERY;
    let mut fill_keys = KeyGen::new(SEALED_SEED);
    let mut replay_keys: Vec<[u8; 16]> = Vec::new();
    for i in 0..count {
        let key = fill_keys.next_key();
        if i % stride == 0 {
            replay_keys.push(key);
        }
    }
    let mut shuffle = KeyGen::new(SEALED_SEED + 1000);
    for i in (1..replay_keys.len()).rev() {
        let j = (shuffle.next_u64() % (i as u64 + 1)) as usize;
        replay_keys.swap(i, j);
    }
    let mut replay_hist = new_histogram();
    let started = Instant::now();
    for key in &replay_keys {
        let t = Instant::now();
        let claim = store.claim(key, REQUEST).expect("replay claim");
        let nanos = duration_nanos(t.elapsed());
        assert!(
            matches!(&claim, Claim::Completed(c) if c.outcome == SEALED_OUTCOME),
            "a completed sealed key did not replay its outcome: {claim:?}"
        );
        replay_hist.saturating_record(nanos);
    }
    let replay_s = started.elapsed().as_secs_f64();
    drop(store);

    vec![
        ("sealed_tables_at_open", at_open.sealed_tables as f64),
        ("index_entries_at_open", at_open.index_entries as f64),
        ("empty_per_s", fresh_count as f64 / empty_s),
        ("empty_p50_ns", empty_hist.value_at_quantile(0.5) as f64),
        ("empty_p99_ns", empty_hist.value_at_quantile(0.99) as f64),
        ("fresh_count", fresh_count as f64),
        ("fresh_per_s", fresh_count as f64 / fresh_s),
        ("fresh_p50_ns", fresh_hist.value_at_quantile(0.5) as f64),
        ("fresh_p99_ns", fresh_hist.value_at_quantile(0.99) as f64),
        ("fresh_p999_ns", fresh_hist.value_at_quantile(0.999) as f64),
        ("fresh_max_ns", fresh_hist.max() as f64),
        ("replay_count", replay_keys.len() as f64),
        ("replay_per_s", replay_keys.len() as f64 / replay_s),
        ("replay_p50_ns", replay_hist.value_at_quantile(0.5) as f64),
        ("replay_p99_ns", replay_hist.value_at_quantile(0.99) as f64),
        ("replay_max_ns", replay_hist.max() as f64),
    ]
}

/// Claims `count` fresh random keys (pre-generated from `seed`) on 1 thread, each timed; the
/// latency histogram and the wall time of the loop.
fn time_fresh_claims(store: &Store, count: u64, seed: u64) -> (Histogram<u64>, f64) {
    let mut keys = KeyGen::new(seed);
    let fresh: Vec<[u8; 16]> = (0..count).map(|_| keys.next_key()).collect();
    let mut histogram = new_histogram();
    let started = Instant::now();
    for key in &fresh {
        let t = Instant::now();
        let claim = store.claim(key, REQUEST).expect("fresh claim");
        let nanos = duration_nanos(t.elapsed());
        assert!(matches!(claim, Claim::Acquired(_)), "a fresh random key was not acquired: {claim:?}");
        histogram.saturating_record(nanos);
    }
    (histogram, started.elapsed().as_secs_f64())
}

/// Bytes free for an unprivileged user on the file system of `dir`.
#[allow(unsafe_code, reason = "statvfs, with its SAFETY comments")]
fn free_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).expect("bench dir path has no NUL");
    // SAFETY: statvfs is plain old data; an all-zero value is valid and is overwritten below.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `stat` a valid out pointer.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
    assert_eq!(rc, 0, "statvfs {}: {}", dir.display(), std::io::Error::last_os_error());
    stat.f_bavail as u64 * stat.f_frsize as u64
}

/// Resident memory of this process, from `/proc/self/status`.
struct MemoryStatus {
    vm_rss_kib: u64,
    rss_anon_kib: u64,
}

impl MemoryStatus {
    fn read() -> MemoryStatus {
        let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or_else(|| panic!("/proc/self/status has no {name}"))
        };
        MemoryStatus { vm_rss_kib: field("VmRSS:"), rss_anon_kib: field("RssAnon:") }
    }
}

/// Bytes allocated on disk by the files of `dir` whose extension is `ext`.
fn allocated_bytes_with_ext(dir: &Path, ext: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .expect("list store dir")
        .map(|e| e.expect("dir entry"))
        .filter(|e| e.path().extension().is_some_and(|x| x == ext))
        .map(|e| e.metadata().expect("file metadata").blocks() * 512)
        .sum()
}

fn drop_caches_requested() -> bool {
    std::env::var("WINDOW_DROP_CACHES").is_ok_and(|v| v == "1")
}

/// Drops the machine's page cache (root only): a cold reopen.
#[allow(unsafe_code, reason = "sync(2), with its SAFETY comment")]
fn drop_page_cache() {
    // SAFETY: sync(2) takes no arguments and touches no memory of ours.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").expect("drop caches (needs root)");
}
