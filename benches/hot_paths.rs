//! The claim and replay hot paths on one thread, `Durability::None`, as a plain binary so it
//! can run under a profiler with stable counts:
//!
//! ```sh
//! cargo bench --bench hot_paths                          # ops/s
//! cargo build --release --benches && valgrind --tool=callgrind \
//!     target/release/deps/hot_paths-* --keys 100000 --no-crafted  # instructions per op
//! ```
//!
//! Workload: N random 16-byte keys (default 1,000,000), a 3-byte request; claims of new keys,
//! repeat claims of keys in flight, then replays of completed keys with a 64-byte outcome, in
//! the order they were written and in random order (as retries come), and the memory floor
//! under a random-order replay on this machine (two dependent cache misses, no other work).
//!
//! Then the threads table: new-key claims and random-order replays from 1, 2, 4 and 16
//! threads, with the ratio to one thread and the cores the process kept busy, in a process of
//! its own (`--no-threads` leaves it out, `--threads-only` runs it alone). The `claim_many`
//! rows run in a process of their own too (`--batches-only` runs them alone).
//!
//! Then a second table: claims of the 3000 keys of `tests/fixtures/crafted_keys.txt` (crafted to
//! share one shard and home slot under the unkeyed hash) against 3000 random keys of the same
//! length, in a store hashing keys with no secret (`Options::key_hash = xxh3_64`, as format
//! version 1 stores do) and in a store with its own secret (the default).

use std::time::Instant;

use idemstore::{Claim, ClaimOptions, Durability, Options, Store};

mod support;
use support::bench_parent_dir;

fn keys(n: usize, salt: u64) -> Vec<[u8; 16]> {
    (0..n as u64)
        .map(|i| {
            let mut key = [0u8; 16];
            key[..8].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(&(i ^ salt).to_le_bytes()).to_le_bytes());
            key[8..].copy_from_slice(&i.to_le_bytes());
            key
        })
        .collect()
}

fn rate(label: &str, n: usize, started: Instant) {
    let secs = started.elapsed().as_secs_f64();
    println!("| {label} | {n} | {:.0} | {:.0} |", n as f64 / secs, secs * 1e9 / n as f64);
}

fn options() -> Options {
    Options { durability: Durability::None, ..Default::default() }
}

/// A fresh store in the bench directory with every key of `keys` claimed and completed with
/// a 64-byte outcome (the replay rows' setup, untimed).
fn completed_store(keys: &[[u8; 16]]) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir_in(bench_parent_dir()).expect("tempdir");
    let store = Store::open(dir.path(), options()).expect("open");
    for key in keys {
        let Ok(Claim::Acquired(token)) = store.claim(key, b"req") else { panic!("fresh key") };
        store.complete(&token, [7u8; 64]).expect("complete");
    }
    (dir, store)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n = args
        .iter()
        .position(|a| a == "--keys")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000usize);
    if args.iter().any(|a| a == "--threads-only") {
        threads_table(n);
        return;
    }
    if args.iter().any(|a| a == "--batches-only") {
        batch_rows(n);
        return;
    }
    println!("hot paths: {n} random 16-byte keys, 3-byte request, 64-byte outcome, Durability::None, 1 thread");
    println!();
    println!("| path | ops | ops/s | ns/op |");
    println!("| --- | ---: | ---: | ---: |");

    let dir = tempfile::tempdir_in(bench_parent_dir()).expect("tempdir");
    let store = Store::open(dir.path(), options()).expect("open");
    let fresh = keys(n, 1);
    let started = Instant::now();
    for key in &fresh {
        let Ok(Claim::Acquired(_)) = store.claim(key, b"req") else { panic!("fresh key") };
    }
    rate("claim of a new key", n, started);
    let started = Instant::now();
    for key in &fresh {
        let Ok(Claim::InProgress { .. }) = store.claim(key, b"req") else { panic!("in flight") };
    }
    rate("claim of a key in flight", n, started);
    drop(store);

    let done = keys(n, 2);
    let (_dir, store) = completed_store(&done);
    let started = Instant::now();
    for key in &done {
        let Ok(Claim::Completed(c)) = store.claim(key, b"req") else { panic!("completed") };
        debug_assert_eq!(c.outcome.len(), 64);
    }
    rate("replay of a completed key (64 B)", n, started);
    // Retries come back in no particular order: the same replays, keys shuffled.
    let mut shuffled = done.clone();
    shuffle(&mut shuffled, 0x5eed);
    let started = Instant::now();
    for key in &shuffled {
        let Ok(Claim::Completed(c)) = store.claim(key, b"req") else { panic!("completed") };
        debug_assert_eq!(c.outcome.len(), 64);
    }
    rate("replay in random order (64 B)", n, started);
    drop(store);
    replay_floor(_dir.path(), n);

    // The batch rows, and the threads table below, each in a process of their own: rows run
    // after the ones above in the same process ran slower than in a fresh one (a one-thread
    // claim row at 1.38-1.48 M/s against 2.83-2.97 over 1M keys; `claim_many` of new keys at
    // 1.6-2.2 M/s here against 3.5 in a fresh process), the cause not found (see
    // docs/performance.md, "Lanes").
    run_in_own_process(n, "--batches-only");

    if !args.iter().any(|a| a == "--no-threads") {
        run_in_own_process(n, "--threads-only");
    }

    // Left out under a profiler: its crafted rounds walk millions of slots, which would swamp
    // the counts of the rows above.
    if !args.iter().any(|a| a == "--no-crafted") {
        crafted_against_random();
    }
}

/// The `claim_many` rows of the first table (new keys, keys in flight, replays in written and
/// in random order), a batch at a time.
fn batch_rows(n: usize) {
    // The same three paths through `claim_many`, a batch at a time, on fresh keys.
    let dir = tempfile::tempdir_in(bench_parent_dir()).expect("tempdir");
    let store = Store::open(dir.path(), options()).expect("open");
    let batched = keys(n, 3);
    // Built before any timer starts: the rows time the calls, not the bench's own buffers.
    let batches: Vec<Vec<([u8; 16], &[u8; 3])>> =
        batched.chunks(BATCH).map(|keys| keys.iter().map(|k| (*k, b"req")).collect()).collect();
    batch_row(&store, &batches, &format!("claim_many of new keys ({BATCH} a batch)"), "fresh key", |answer| {
        matches!(answer, Claim::Acquired(_))
    });
    batch_row(&store, &batches, &format!("claim_many of keys in flight ({BATCH} a batch)"), "in flight", |answer| {
        matches!(answer, Claim::InProgress { .. })
    });
    drop(store);
    let (_dir, store) = completed_store(&batched);
    let replayed = |answer: &Claim| {
        let Claim::Completed(c) = answer else { return false };
        debug_assert_eq!(c.outcome.len(), 64);
        true
    };
    let label = format!("claim_many replays of completed keys (64 B, {BATCH} a batch)");
    batch_row(&store, &batches, &label, "completed", replayed);
    // The same batches with their keys in random order: the batch overlaps the keys' misses.
    let mut shuffled = batched.clone();
    shuffle(&mut shuffled, 0x5eed);
    let random_batches: Vec<Vec<([u8; 16], &[u8; 3])>> =
        shuffled.chunks(BATCH).map(|keys| keys.iter().map(|k| (*k, b"req")).collect()).collect();
    let label = format!("claim_many replays in random order (64 B, {BATCH} a batch)");
    batch_row(&store, &random_batches, &label, "completed", replayed);
    drop(store);
}

/// One timed row: every batch through `claim_many`, each answer checked by `expected`.
fn batch_row(
    store: &Store,
    batches: &[Vec<([u8; 16], &[u8; 3])>],
    label: &str,
    what: &str,
    expected: impl Fn(&Claim) -> bool,
) {
    let started = Instant::now();
    for batch in batches {
        for answer in store.claim_many(batch, ClaimOptions::default()) {
            assert!(answer.as_ref().is_ok_and(&expected), "expected {what}, got {answer:?}");
        }
    }
    rate(label, batches.iter().map(Vec::len).sum(), started);
}

/// Runs this bench again with `--keys n` and `flag` in a fresh process, its output inline.
fn run_in_own_process(n: usize, flag: &str) {
    let status = std::process::Command::new(std::env::current_exe().expect("the bench's path"))
        .args(["--keys", &n.to_string(), flag])
        .status()
        .unwrap_or_else(|e| panic!("run the bench with {flag}: {e}"));
    assert!(status.success(), "the bench with {flag} failed: {status}");
}

/// The memory floor under a random-order replay, in the same run: a replay needs at least two
/// loads that miss the caches, the second waiting on the first (the key's index slot, then
/// the record the slot points at). Here they are with none of a replay's work: a random
/// 16-byte slot in a table as large as the store's index (256 shards, each a power of two of
/// slots at most 3/4 full), whose value is a position in the store's own segment files, mapped
/// read-only, then 8 bytes read there. Each load waits for the one before it, as one call
/// after another does.
#[allow(unsafe_code, reason = "maps the bench's own segment files read-only, with its SAFETY comment")]
fn replay_floor(dir: &std::path::Path, n: usize) {
    let mut maps = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read the store directory") {
        let path = entry.expect("directory entry").path();
        if path.extension().is_some_and(|e| e == "seg") {
            let file = std::fs::File::open(&path).expect("open a segment");
            // SAFETY: the files belong to this bench's closed store: nothing writes or truncates
            // them while they are mapped.
            let map = unsafe { memmap2::Mmap::map(&file) }.expect("map a segment");
            if map.len() >= 4096 {
                maps.push(map);
            }
        }
    }
    let shard_slots = ((n / 256).max(1) * 4).div_ceil(3).next_power_of_two();
    let slots = shard_slots * 256;
    let positions: Vec<[u64; 2]> = (0..slots as u64)
        .map(|i| {
            let r = xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes());
            let map = &maps[(r % maps.len() as u64) as usize];
            [r % maps.len() as u64, ((r >> 20) % (map.len() as u64 / 8)) * 8]
        })
        .collect();
    let mask = slots - 1;
    let mut seen = 0u64;
    let started = Instant::now();
    for i in 0..n as u64 {
        let slot = positions[(xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()).wrapping_add(seen >> 63) as usize) & mask];
        let map = &maps[slot[0] as usize];
        let at = slot[1] as usize;
        seen = u64::from_le_bytes(map[at..at + 8].try_into().expect("8 bytes"));
    }
    std::hint::black_box(seen);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "| floor: a random {} MiB slot table, then a random read in {} MiB of mapped segments, each load after the last (no replay work) | {n} | {:.0} | {:.0} |",
        (slots * 16) >> 20,
        maps.iter().map(|m| m.len()).sum::<usize>() >> 20,
        n as f64 / secs,
        secs * 1e9 / n as f64
    );
}

/// A Fisher-Yates shuffle driven by xxh3 of a counter (no rand dependency for one shuffle).
fn shuffle<T>(items: &mut [T], seed: u64) {
    for i in (1..items.len()).rev() {
        let r = xxhash_rust::xxh3::xxh3_64(&(seed ^ i as u64).to_le_bytes());
        items.swap(i, (r % (i as u64 + 1)) as usize);
    }
}

/// Runs `work` on each of `threads` chunks of `keys` at once; returns ops/s over all of them
/// and how many cores the whole process kept busy meanwhile (its CPU time over the wall time:
/// the store's housekeeper included).
fn parallel_rate(keys: &[[u8; 16]], threads: usize, work: impl Fn(&[[u8; 16]]) + Sync) -> (f64, f64) {
    let chunk = keys.len().div_ceil(threads);
    flush_earlier_writes();
    let cpu_before = process_cpu_secs();
    let started = Instant::now();
    std::thread::scope(|s| {
        for part in keys.chunks(chunk) {
            let work = &work;
            s.spawn(move || work(part));
        }
    });
    let wall = started.elapsed().as_secs_f64();
    (keys.len() as f64 / wall, (process_cpu_secs() - cpu_before) / wall)
}

/// Writes out the dirty pages of the bench's earlier stores (`Durability::None` leaves them to
/// the kernel), so that their writeback does not take a core from the row that follows.
fn flush_earlier_writes() {
    let status = std::process::Command::new("sync").status().expect("run sync");
    assert!(status.success(), "sync failed: {status}");
}

/// CPU time (user and system) of every thread of this process so far, from `/proc/self/stat`
/// (in clock ticks of 10 ms: the rows it is used for run for a second or more).
fn process_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after_name = &stat[stat.rfind(')').expect("a command name") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks as f64 / 100.0
}

/// New-key claims and random-order replays from 1, 2, 4 and 16 threads, with each rate's
/// ratio to one thread's, and the cores the process kept busy. The machine bounds the ratios:
/// when one claiming thread already keeps more than one core busy (the housekeeper writes
/// restart tables and syncs beside it), no number of threads can reach `cores` times its rate;
/// the line under the table prints that ceiling, measured in the same run.
fn threads_table(n: usize) {
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    println!();
    println!("threads: {n} keys split between the threads; {cores} cores here");
    println!();
    println!("| threads | new-key claims/s | × 1 thread | cores busy | random-order replays/s | × 1 thread |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    // Every claim row first, each store dropped before the next row: the replay store's own
    // background work (restart tables of its 2n records) must not run beside a claim row.
    let mut claim_rows = Vec::new();
    for threads in THREADS {
        let dir = tempfile::tempdir_in(bench_parent_dir()).expect("tempdir");
        let store = Store::open(dir.path(), options()).expect("open");
        let fresh = keys(n, 100 + threads as u64);
        claim_rows.push(parallel_rate(&fresh, threads, |part| {
            for key in part {
                let Ok(Claim::Acquired(_)) = store.claim(key, b"req") else { panic!("fresh key") };
            }
        }));
    }
    let mut done = keys(n, 20);
    let (_dir, replay_store) = completed_store(&done);
    shuffle(&mut done, 0xfeed);
    let (claims_one, busy_one) = claim_rows[0];
    let mut replays_one = 0.0;
    for (threads, (claims, busy)) in THREADS.into_iter().zip(claim_rows) {
        let (replays, _) = parallel_rate(&done, threads, |part| {
            for key in part {
                let Ok(Claim::Completed(_)) = replay_store.claim(key, b"req") else { panic!("completed") };
            }
        });
        if threads == 1 {
            replays_one = replays;
        }
        println!(
            "| {threads} | {claims:.0} | {:.2} | {busy:.2} | {replays:.0} | {:.2} |",
            claims / claims_one,
            replays / replays_one
        );
    }
    println!();
    println!(
        "ceiling of new-key claims × 1 thread on this machine: {cores} cores / {busy_one:.2} cores busy at 1 thread = {:.2}",
        cores as f64 / busy_one
    );
}

/// The thread counts of the threads table.
const THREADS: [usize; 4] = [1, 2, 4, 16];

/// Claims of the crafted keys against random ones, under both hashes: each round claims every
/// key of a set in a fresh store (opening it is not timed).
fn crafted_against_random() {
    const ROUNDS: usize = 20;
    let crafted: Vec<&str> = include_str!("../tests/fixtures/crafted_keys.txt").lines().collect();
    // Random keys of the crafted keys' shape: 16 hex digits.
    let random: Vec<String> = keys(crafted.len(), 4)
        .iter()
        .map(|k| format!("{:016x}", u64::from_le_bytes(k[..8].try_into().expect("8 bytes"))))
        .collect();
    let random: Vec<&str> = random.iter().map(String::as_str).collect();
    println!();
    println!("claims of {} new keys a round, {ROUNDS} rounds, each in a fresh store", crafted.len());
    println!();
    println!("| index hash | keys | claims/s | ns/claim | longest walk | mean walk |");
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    let unkeyed: idemstore::KeyHashFn = xxhash_rust::xxh3::xxh3_64;
    for (hash, key_hash) in [("unkeyed (v1)", Some(unkeyed)), ("keyed (v2)", None)] {
        let mut rates = Vec::new();
        for (label, set) in [("crafted", &crafted), ("random", &random)] {
            let mut secs = 0.0;
            let mut walk = (0, 0.0);
            for _ in 0..ROUNDS {
                let dir = tempfile::tempdir_in(bench_parent_dir()).expect("tempdir");
                let store = Store::open(dir.path(), Options { key_hash, ..options() }).expect("open");
                let started = Instant::now();
                for key in set.iter() {
                    let Ok(Claim::Acquired(_)) = store.claim(key, b"req") else { panic!("fresh key") };
                }
                secs += started.elapsed().as_secs_f64();
                walk = store.index_probe_stats();
            }
            let claims = (ROUNDS * set.len()) as f64;
            rates.push(claims / secs);
            println!(
                "| {hash} | {label} | {:.0} | {:.0} | {} | {:.2} |",
                claims / secs,
                secs * 1e9 / claims,
                walk.0,
                walk.1
            );
        }
        println!("| {hash} | crafted / random | {:.3} | | | |", rates[0] / rates[1]);
    }
}

/// Keys per `claim_many` call in the batched rows.
const BATCH: usize = 64;
