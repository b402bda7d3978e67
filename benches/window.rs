//! The window numbers of issue 4 that exist today (point 8, in part): RAM per live key, reopen
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
//! Each measurement runs in a child process of its own (this binary again), so one
//! measurement's freed memory never hides another's growth.
//!
//! Run: `cargo bench --bench window` (1M keys, well under a minute). Knobs: `WINDOW_KEYS`
//! (comma-separated key counts for RAM and reopen, default `1000000`; e.g. `1000000,10000000`),
//! `WINDOW_EXPIRE_KEYS` (keys in the dropped bucket, default 1,000,000), `IDEMSTORE_BENCH_DIR`
//! (where the temp dirs go, default the system temp dir).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use idemstore::{Claim, ClaimOptions, Durability, Entry, ManualClock, Options, Store};

/// Environment variable that makes this binary run one measurement as a child.
const CHILD_ENV: &str = "WINDOW_CHILD";
/// Request bytes of every claim (only their hash is stored).
const REQUEST: &[u8] = b"POST /payments amount=100";
/// Target RAM per live key (issue 4, point 1).
const TARGET_RAM_BYTES_PER_KEY: f64 = 40.0;
/// Target: no claim slower than this while a bucket is dropped (issue 4, point 4).
const TARGET_CLAIM_MAX_NS: u64 = 1_000_000;
/// Threads claiming while the bucket is dropped.
const EXPIRY_CLAIM_THREADS: usize = 2;
/// TTL of the keys of the bucket that expires.
const SHORT_TTL: Duration = Duration::from_secs(60);
/// How long the claimers run before and after the drop.
const EXPIRY_MARGIN: Duration = Duration::from_millis(300);
/// Keys read back after reopen to check the reopened index.
const REOPEN_SPOT_CHECKS: u64 = 1000;

fn main() {
    if let Ok(job) = std::env::var(CHILD_ENV) {
        let (kind, count) = job.split_once(':').expect("WINDOW_CHILD is kind:count");
        let count: u64 = count.parse().expect("WINDOW_CHILD count");
        let result = match kind {
            "ram_reopen" => child_ram_and_reopen(count),
            "expiry" => child_expiry(count),
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
         maintain() drops it on the main thread while {EXPIRY_CLAIM_THREADS} threads claim new 16-byte keys \
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
    println!();
    println!(
        "note: with {cpus} CPUs and {} busy threads (claimers + maintain), a claim can also wait for a CPU; \
         compare 'claims during' with 'all claims'.",
        EXPIRY_CLAIM_THREADS + 1
    );
}

/// Runs this binary as a child for one job and parses its `RESULT` line.
fn run_child(job: &str) -> BTreeMap<String, f64> {
    let exe = std::env::current_exe().expect("path of this bench binary");
    let output = Command::new(exe).env(CHILD_ENV, job).output().expect("start child measurement");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child measurement {job} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")).expect("child printed no RESULT line");
    line.split_whitespace()
        .map(|pair| {
            let (k, v) = pair.split_once('=').expect("RESULT pairs are key=value");
            (k.to_string(), v.parse().expect("RESULT values are numbers"))
        })
        .collect()
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
    assert_eq!(stats.index_entries, count, "the reopened index does not hold every key");
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
/// while `EXPIRY_CLAIM_THREADS` threads claim and record their latency.
fn child_expiry(count: u64) -> Vec<(&'static str, f64)> {
    const HOUR_MS: u64 = 3_600_000;
    // Start 1 s after an hour boundary so every short-TTL key falls into one 1-hour bucket.
    let start_ms = 1_700_000_000_000 / HOUR_MS * HOUR_MS + 1000;
    let clock = ManualClock::new(start_ms);
    let dir = tempfile::tempdir_in(bench_parent_dir()).expect("create bench temp dir");
    let options = Options {
        durability: Durability::None,
        background: false,
        clock: clock.clone(),
        bucket_width: Duration::from_secs(3600),
        ..Default::default()
    };
    let store = Arc::new(Store::open(dir.path(), options).expect("open store"));
    let short = ClaimOptions { ttl: Some(SHORT_TTL), ..Default::default() };
    let mut keys = KeyGen::new(21);
    let first_key = keys.next_key();
    store.claim_with(first_key, REQUEST, short.clone()).expect("fill claim");
    for _ in 1..count {
        let claim = store.claim_with(keys.next_key(), REQUEST, short.clone()).expect("fill claim");
        assert!(matches!(claim, Claim::Acquired(_)), "a new random key was not acquired: {claim:?}");
    }
    clock.advance(Duration::from_secs(2 * 3600));

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
                    let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1);
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
    let buckets_dropped = store.maintain().expect("maintain");
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

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
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

/// Bytes allocated on disk (blocks, as `du` counts) by the files of `dir`.
fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .expect("list store dir")
        .map(|e| e.expect("dir entry").metadata().expect("file metadata"))
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}

fn drop_caches_requested() -> bool {
    std::env::var("WINDOW_DROP_CACHES").is_ok_and(|v| v == "1")
}

/// Drops the machine's page cache (root only): a cold reopen.
fn drop_page_cache() {
    // SAFETY: sync(2) takes no arguments and touches no memory of ours.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").expect("drop caches (needs root)");
}

/// Parent of the temp dirs: `IDEMSTORE_BENCH_DIR`, else the system temp dir.
fn bench_parent_dir() -> PathBuf {
    std::env::var_os("IDEMSTORE_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from)
}

/// Random 16-byte keys from a seeded splitmix64 (deterministic, no dependency).
struct KeyGen {
    state: u64,
}

impl KeyGen {
    fn new(seed: u64) -> KeyGen {
        KeyGen { state: seed.wrapping_mul(0xD1B5_4A32_D192_ED03) }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn next_key(&mut self) -> [u8; 16] {
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&self.next_u64().to_le_bytes());
        key[8..].copy_from_slice(&self.next_u64().to_le_bytes());
        key
    }
}
