//! Criterion benches of each store operation, one thread.
//!
//! Operations: claim of a new key; claim of a key in flight (`InProgress`); replay of a
//! completed key (64 B and 4 KiB outcomes); complete; get of a missing key; remove. Each runs
//! under `Durability::None` and `Durability::Periodic(1 s)`; the write operations (claim of a
//! new key, complete, remove) also under `Durability::Sync`, with few samples.
//!
//! Every group is named `<op>/<durability>` and every bench `k16B_<value>_t1`, and each group
//! prints its whole workload when it starts. Keys are random 16-byte keys generated before the
//! timed loop; each store lives in a fresh temp dir on the real disk (not the simulated one),
//! with the background housekeeping thread on. Every answer is checked (a claim of a new key
//! must be `Acquired`, a replay must return the stored outcome, ...), so a wrong fast path
//! fails the bench instead of flattering it.
//!
//! Run: `cargo bench --bench ops` (or `-- --quick` for a fast pass, a filter such as
//! `-- claim_new` to pick groups). Knobs: `OPS_KEYS` (keys stored before the read benches,
//! default 100,000), `IDEMSTORE_BENCH_DIR` (where the temp dirs go, default the system temp dir).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime};
use idemstore::{Claim, ClaimToken, Durability, Entry, Options, Store};
use tempfile::TempDir;

mod support;
use support::*;

/// Request bytes of every claim (only their 128-bit hash is stored).
const REQUEST: &[u8] = b"POST /payments amount=100";
/// The small outcome (a typical HTTP status line and short JSON body).
const OUTCOME_SMALL_BYTES: usize = 64;
/// The large outcome.
const OUTCOME_LARGE_BYTES: usize = 4096;
/// Lease of every claim: long enough that no claim is taken over during a bench.
const LEASE: Duration = Duration::from_secs(3600);
/// Threads that fill a store before a bench (group commit makes a `Sync` fill fast).
const FILL_THREADS: usize = 8;

/// The durabilities of a read op, and of a write op (`Sync` only for writes).
fn durabilities(write: bool) -> Vec<Durability> {
    let mut all = vec![Durability::None, Durability::Periodic(Duration::from_secs(1))];
    if write {
        all.push(Durability::Sync);
    }
    all
}

/// Keys stored before the read benches: `OPS_KEYS`, default 100,000.
fn stored_keys() -> usize {
    std::env::var("OPS_KEYS").map_or(100_000, |v| v.parse().expect("OPS_KEYS takes a number of keys"))
}

/// A fresh store on the real disk. The `TempDir` must outlive the store.
fn open_store(durability: Durability) -> (TempDir, Store) {
    let dir = tempfile::tempdir_in(bench_parent_dir()).expect("create bench temp dir");
    let options = Options { durability, default_lease: LEASE, ..Default::default() };
    let store = Store::open(dir.path(), options).expect("open store");
    (dir, store)
}

/// A group `<op>/<durability>` with settings that keep the whole run to a few minutes; `Sync`
/// groups take the minimum of 10 samples.
fn group<'a>(c: &'a mut Criterion, op: &str, durability: Durability) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(format!("{op}/{durability:?}"));
    group.throughput(Throughput::Elements(1));
    if durability == Durability::Sync {
        group.sample_size(10);
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(3));
    }
    group
}

fn print_workload(op: &str, durability: Durability, value: &str, stored: &str, store: &Store) {
    println!(
        "workload {op}/{durability:?}: keys 16 B random (pre-generated), request {} B, {value}, 1 thread, \
         durability {durability:?}, {stored}, store dir {} (real disk), background thread on",
        REQUEST.len(),
        store.dir().display()
    );
}

/// Claims every key (and completes it with `outcome` when given) from `FILL_THREADS` threads;
/// returns the tokens in key order.
fn fill(store: &Store, keys: &[[u8; 16]], outcome: Option<&[u8]>) -> Vec<ClaimToken> {
    let chunk = keys.len().div_ceil(FILL_THREADS).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = keys
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|key| {
                            let Claim::Acquired(token) = store.claim(key, REQUEST).expect("fill claim") else {
                                panic!("a new random key was not acquired while filling");
                            };
                            if let Some(outcome) = outcome {
                                store.complete(&token, outcome).expect("fill complete");
                            }
                            token
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("fill thread panicked")).collect()
    })
}

fn bench_claim_new_key(c: &mut Criterion) {
    for durability in durabilities(true) {
        let (_dir, store) = open_store(durability);
        print_workload(
            "claim_new_key",
            durability,
            "no outcome",
            "store starts empty and grows by one key per iteration",
            &store,
        );
        let mut keys = KeyGen::new(1);
        let mut group = group(c, "claim_new_key", durability);
        group.bench_function("k16B_req25B_t1", |b| {
            b.iter_custom(|iters| {
                let batch = keys.keys(iters);
                let started = Instant::now();
                for key in &batch {
                    let claim = store.claim(key, REQUEST).expect("claim");
                    assert!(matches!(claim, Claim::Acquired(_)), "a new key was not acquired: {claim:?}");
                    let _held = black_box(claim);
                }
                started.elapsed()
            });
        });
        group.finish();
    }
}

fn bench_claim_in_flight(c: &mut Criterion) {
    let stored = stored_keys();
    for durability in durabilities(false) {
        let (_dir, store) = open_store(durability);
        let keys = KeyGen::new(2).keys(stored as u64);
        let _tokens = fill(&store, &keys, None);
        print_workload(
            "claim_in_flight",
            durability,
            "no outcome",
            &format!("{stored} keys claimed and in flight (lease 1 h), claimed again round-robin"),
            &store,
        );
        let mut next = 0usize;
        let mut group = group(c, "claim_in_flight", durability);
        group.bench_function("k16B_req25B_t1", |b| {
            b.iter_custom(|iters| {
                let started = Instant::now();
                for _ in 0..iters {
                    let claim = store.claim(keys[next], REQUEST).expect("claim");
                    assert!(matches!(claim, Claim::InProgress { .. }), "an in-flight key answered {claim:?}");
                    let _held = black_box(claim);
                    next = (next + 1) % keys.len();
                }
                started.elapsed()
            });
        });
        group.finish();
    }
}

fn bench_replay(c: &mut Criterion) {
    let stored = stored_keys();
    for durability in durabilities(false) {
        let mut group = group(c, "replay", durability);
        for (label, outcome_len) in [("out64B", OUTCOME_SMALL_BYTES), ("out4KiB", OUTCOME_LARGE_BYTES)] {
            let (_dir, store) = open_store(durability);
            let outcome = vec![0x6Fu8; outcome_len];
            let keys = KeyGen::new(3).keys(stored as u64);
            fill(&store, &keys, Some(&outcome));
            print_workload(
                "replay",
                durability,
                &format!("outcome {outcome_len} B"),
                &format!("{stored} keys completed, claimed again round-robin"),
                &store,
            );
            let mut next = 0usize;
            group.bench_function(format!("k16B_{label}_t1"), |b| {
                b.iter_custom(|iters| {
                    let started = Instant::now();
                    for _ in 0..iters {
                        let claim = store.claim(keys[next], REQUEST).expect("claim");
                        let Claim::Completed(done) = &claim else { panic!("a completed key answered {claim:?}") };
                        assert_eq!(done.outcome.len(), outcome_len, "replayed outcome has the wrong length");
                        let _held = black_box(claim);
                        next = (next + 1) % keys.len();
                    }
                    started.elapsed()
                });
            });
        }
        group.finish();
    }
}

fn bench_complete(c: &mut Criterion) {
    for durability in durabilities(true) {
        let (_dir, store) = open_store(durability);
        print_workload(
            "complete",
            durability,
            "outcome 64 B",
            "each iteration completes a key claimed before the timed loop",
            &store,
        );
        let outcome = vec![0x6Fu8; OUTCOME_SMALL_BYTES];
        let mut keys = KeyGen::new(4);
        let mut group = group(c, "complete", durability);
        group.bench_function("k16B_out64B_t1", |b| {
            b.iter_custom(|iters| {
                let tokens = fill(&store, &keys.keys(iters), None);
                let started = Instant::now();
                for token in &tokens {
                    store.complete(token, &outcome).expect("complete");
                }
                started.elapsed()
            });
        });
        group.finish();
    }
}

fn bench_get_missing(c: &mut Criterion) {
    let stored = stored_keys();
    for durability in durabilities(false) {
        let (_dir, store) = open_store(durability);
        let present = KeyGen::new(5).keys(stored as u64);
        fill(&store, &present, Some(&[0x6Fu8; OUTCOME_SMALL_BYTES]));
        print_workload(
            "get_missing",
            durability,
            "no outcome",
            &format!("{stored} other keys completed with 64 B outcomes; gets of keys never stored"),
            &store,
        );
        let mut missing = KeyGen::new(6);
        let mut group = group(c, "get_missing", durability);
        group.bench_function("k16B_t1", |b| {
            b.iter_custom(|iters| {
                let batch = missing.keys(iters);
                let started = Instant::now();
                for key in &batch {
                    let entry: Option<Entry> = store.get(key).expect("get");
                    assert!(entry.is_none(), "a key never stored was found");
                    black_box(entry);
                }
                started.elapsed()
            });
        });
        group.finish();
    }
}

fn bench_remove(c: &mut Criterion) {
    for durability in durabilities(true) {
        let (_dir, store) = open_store(durability);
        print_workload(
            "remove",
            durability,
            "outcome 64 B",
            "each iteration removes a key claimed and completed before the timed loop",
            &store,
        );
        let outcome = vec![0x6Fu8; OUTCOME_SMALL_BYTES];
        let mut keys = KeyGen::new(7);
        let mut group = group(c, "remove", durability);
        group.bench_function("k16B_out64B_t1", |b| {
            b.iter_custom(|iters| {
                let batch = keys.keys(iters);
                fill(&store, &batch, Some(&outcome));
                let started = Instant::now();
                for key in &batch {
                    store.remove(key).expect("remove");
                }
                let elapsed = started.elapsed();
                if let Some(key) = batch.first() {
                    assert!(store.get(key).expect("get").is_none(), "a removed key is still there");
                }
                elapsed
            });
        });
        group.finish();
    }
}

fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = ops;
    config = config();
    targets = bench_claim_new_key, bench_claim_in_flight, bench_replay, bench_complete, bench_get_missing, bench_remove
}
criterion_main!(ops);
