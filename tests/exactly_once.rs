//! Exactly once under contention: 8 threads hammer 16 keys with duplicate claims, completes,
//! releases, abandoned holders whose leases run out (a shared `ManualClock` advanced by some
//! of the threads), late completes by those abandoned holders, and altered requests. Windows
//! roll over as TTLs pass, so every key lives through many windows.
//!
//! An effect counts once its `complete` succeeded. The promise checked:
//! - per (key, window) at most one `complete` succeeds: two successful completes of a key never
//!   share a window (the later one was claimed at or after the earlier one's window ended);
//! - every `Completed` replay is exactly a recorded successful complete of that key and request
//!   (same outcome, claimed_at and window end), and arrives inside that window;
//! - the store's counters agree with what the threads saw.
//!
//! `IDEMSTORE_EXACTLY_ONCE_OPS` sets the operations per thread (default 10,000 in debug builds,
//! 100,000 in release builds).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime};

use idemstore::{
    Claim, ClaimOptions, ClaimToken, Completed, Durability, Entry, Error, ManualClock, Options, Store,
    system_time_to_ms,
};

mod common;
use common::{Rng, START_MS};

const THREADS: usize = 8;
const KEYS: u64 = 16;
/// Threads `0..CLOCK_THREADS` also move the shared clock forward.
const CLOCK_THREADS: usize = 2;
const TTL_MS: u64 = 60;
const LEASE_MS: u64 = 5;
/// Abandoned tokens a thread keeps for late completes and releases.
const ABANDONED_MAX: usize = 4;

fn ops_per_thread() -> usize {
    match std::env::var("IDEMSTORE_EXACTLY_ONCE_OPS") {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("IDEMSTORE_EXACTLY_ONCE_OPS must be a number, got {v:?}")),
        Err(_) if cfg!(debug_assertions) => 10_000,
        Err(_) => 100_000,
    }
}

/// A `complete` that succeeded: the effect of one window of its key.
#[derive(Debug, Clone)]
struct Effect {
    key: String,
    request: &'static str,
    outcome: String,
    claimed_at_ms: u64,
    /// Where the window ends: the last acquisition's claim time plus the TTL (every claim uses
    /// the same TTL and store time never runs backwards, so a takeover's expiry is its own).
    window_end_ms: u64,
}

#[derive(Debug)]
struct Replay {
    key: String,
    request: &'static str,
    completed: Completed,
}

/// What one thread saw.
#[derive(Debug, Default)]
struct Seen {
    effects: Vec<Effect>,
    replays: Vec<Replay>,
    acquired: u64,
    in_progress: u64,
    mismatches: u64,
    stale: u64,
    releases: u64,
    checkpoints: u64,
}

struct Held {
    key: String,
    request: &'static str,
    token: ClaimToken,
    /// When the claim was made (read from the token at acquisition: a checkpoint moves the
    /// token's lease on).
    claimed_at_ms: u64,
}

fn ms(t: SystemTime) -> u64 {
    system_time_to_ms(t)
}

/// Completes `held`; on success records the effect. `StaleToken` is a legitimate answer: the
/// lease ran out and another holder took the key over, or the window ended.
fn try_complete(store: &Store, held: &Held, outcome: String, seen: &mut Seen) {
    match store.complete(&held.token, outcome.as_bytes()) {
        Ok(()) => {
            let claimed_at_ms = held.claimed_at_ms;
            seen.effects.push(Effect {
                key: held.key.clone(),
                request: held.request,
                outcome,
                claimed_at_ms,
                window_end_ms: claimed_at_ms + TTL_MS,
            });
        }
        Err(Error::StaleToken) => seen.stale += 1,
        Err(e) => panic!("complete of {} failed: {e}", held.key),
    }
}

fn try_release(store: &Store, held: &Held, seen: &mut Seen) {
    match store.release(&held.token) {
        Ok(()) => seen.releases += 1,
        Err(Error::StaleToken) => seen.stale += 1,
        Err(e) => panic!("release of {} failed: {e}", held.key),
    }
}

fn worker(store: &Store, clock: &ManualClock, thread_no: usize, ops: usize) -> Seen {
    let mut rng = Rng(0xC0FFEE + thread_no as u64);
    let mut seen = Seen::default();
    let mut abandoned: Vec<Held> = Vec::new();
    let claim_options = ClaimOptions {
        ttl: Some(Duration::from_millis(TTL_MS)),
        lease: Some(Duration::from_millis(LEASE_MS)),
        wait: None,
    };
    for op in 0..ops {
        let roll = rng.below(100);
        if thread_no < CLOCK_THREADS && roll < 6 {
            clock.advance(Duration::from_millis(1 + rng.below(10)));
            continue;
        }
        if thread_no == CLOCK_THREADS && op % 500 == 0 {
            store.maintain().unwrap_or_else(|e| panic!("maintain failed: {e}"));
        }
        if roll >= 94 && !abandoned.is_empty() {
            // A slow holder comes back after its lease may have run out.
            let held = abandoned.swap_remove(rng.below(abandoned.len() as u64) as usize);
            if rng.below(3) == 0 {
                try_release(store, &held, &mut seen);
            } else {
                let outcome = format!("late {} by thread {thread_no} op {op}", held.key);
                try_complete(store, &held, outcome, &mut seen);
            }
            continue;
        }
        let key = format!("key-{}", rng.below(KEYS));
        let request = if rng.below(20) == 0 { "POST altered" } else { "POST original" };
        let claim = store
            .claim_with(&key, request, claim_options.clone())
            .unwrap_or_else(|e| panic!("claim of {key} failed: {e}"));
        match claim {
            Claim::Acquired(token) => {
                seen.acquired += 1;
                let claimed_at_ms = ms(token.lease_expires_at()) - LEASE_MS;
                let held = Held { key, request, token, claimed_at_ms };
                match rng.below(10) {
                    0..=5 => {
                        if rng.below(3) == 0 {
                            match store.checkpoint(&held.token, b"charged card") {
                                Ok(()) => seen.checkpoints += 1,
                                Err(Error::StaleToken) => seen.stale += 1,
                                Err(e) => panic!("checkpoint of {} failed: {e}", held.key),
                            }
                        }
                        let outcome = format!("{} by thread {thread_no} op {op}", held.key);
                        try_complete(store, &held, outcome, &mut seen);
                    }
                    6..=7 => try_release(store, &held, &mut seen),
                    _ => {
                        if abandoned.len() == ABANDONED_MAX {
                            abandoned.remove(0);
                        }
                        abandoned.push(held);
                    }
                }
            }
            Claim::Completed(completed) => seen.replays.push(Replay { key, request, completed }),
            Claim::InProgress { .. } => seen.in_progress += 1,
            Claim::Mismatch => seen.mismatches += 1,
        }
    }
    seen
}

#[test]
fn each_key_window_completes_at_most_once_and_every_replay_is_its_recorded_outcome() {
    let ops = ops_per_thread();
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let clock = ManualClock::new(START_MS);
    let options = Options {
        durability: Durability::None,
        bucket_width: Duration::from_millis(20),
        segment_bytes_initial: 16 << 10,
        clock: clock.clone(),
        background: false,
        ..Options::default()
    };
    let store = Arc::new(Store::open(dir.path(), options).expect("open the store"));
    let results = Arc::new(Mutex::new(Vec::new()));
    thread::scope(|scope| {
        for thread_no in 0..THREADS {
            let (store, clock, results) = (store.clone(), clock.clone(), results.clone());
            scope.spawn(move || {
                let seen = worker(&store, &clock, thread_no, ops);
                results.lock().expect("results lock").push(seen);
            });
        }
    });
    let seen: Vec<Seen> = std::mem::take(&mut *results.lock().expect("results lock"));
    assert_eq!(seen.len(), THREADS, "a worker thread died");

    // The effect counter per (key, window): two successful completes of one key must lie in
    // disjoint windows, so each window's effect ran at most once.
    let mut effects_by_key: HashMap<&str, Vec<&Effect>> = HashMap::new();
    for effect in seen.iter().flat_map(|s| &s.effects) {
        effects_by_key.entry(effect.key.as_str()).or_default().push(effect);
    }
    let mut windows_completed = 0;
    for (key, effects) in &mut effects_by_key {
        effects.sort_by_key(|e| e.claimed_at_ms);
        windows_completed += effects.len();
        for pair in effects.windows(2) {
            assert!(
                pair[1].claimed_at_ms >= pair[0].window_end_ms,
                "key {key}: two completes succeeded in one window:\n  {:?}\n  {:?}",
                pair[0],
                pair[1]
            );
        }
    }
    let by_outcome: HashMap<&[u8], &Effect> =
        seen.iter().flat_map(|s| &s.effects).map(|e| (e.outcome.as_bytes(), e)).collect();
    assert_eq!(by_outcome.len(), windows_completed, "outcomes are unique per complete");

    // Every replay is one recorded effect of the same key and request, inside its window.
    let mut replays = 0u64;
    for replay in seen.iter().flat_map(|s| &s.replays) {
        replays += 1;
        let Some(effect) = by_outcome.get(replay.completed.outcome.as_slice()) else {
            panic!("{} replayed an outcome no successful complete stored: {:?}", replay.key, replay.completed);
        };
        assert_eq!(effect.key, replay.key, "a replay of {} carried another key's outcome", replay.key);
        assert_eq!(effect.request, replay.request, "{}: a replay answered a different request", replay.key);
        assert_eq!(ms(replay.completed.claimed_at), effect.claimed_at_ms, "{}: replay claimed_at", replay.key);
        assert_eq!(ms(replay.completed.expires_at), effect.window_end_ms, "{}: replay window end", replay.key);
        let completed_at_ms = ms(replay.completed.completed_at);
        assert!(
            (effect.claimed_at_ms..effect.window_end_ms).contains(&completed_at_ms),
            "{}: completed_at {completed_at_ms} lies outside its window {effect:?}",
            replay.key
        );
    }
    assert!(windows_completed > 100 && replays > 100, "the run should complete and replay many windows");

    // The latest state of each key is its last effect, while that window lasts.
    let now_ms = idemstore::Clock::now_ms(clock.as_ref());
    for k in 0..KEYS {
        let key = format!("key-{k}");
        if let Some(Entry::Completed(done)) = store.get(&key).expect("get") {
            let last = effects_by_key.get(key.as_str()).and_then(|e| e.last()).expect("a completed key has an effect");
            assert_eq!(done.outcome, last.outcome.as_bytes(), "{key}: the stored outcome is not the last effect");
            assert!(now_ms < last.window_end_ms, "{key}: an expired window is still visible");
        }
    }

    // The counters agree with what the threads saw.
    let stats = store.stats();
    let total = |f: fn(&Seen) -> u64| seen.iter().map(f).sum::<u64>();
    assert_eq!(stats.completes_total, windows_completed as u64, "completes_total");
    assert_eq!(stats.claims_acquired_total, total(|s| s.acquired), "claims_acquired_total");
    assert_eq!(stats.duplicates_replayed_total, replays, "duplicates_replayed_total");
    assert_eq!(stats.duplicates_in_progress_total, total(|s| s.in_progress), "duplicates_in_progress_total");
    assert_eq!(stats.mismatches_total, total(|s| s.mismatches), "mismatches_total");
    assert_eq!(stats.stale_tokens_total, total(|s| s.stale), "stale_tokens_total");
    assert_eq!(stats.releases_total, total(|s| s.releases), "releases_total");
    assert_eq!(stats.checkpoints_total, total(|s| s.checkpoints), "checkpoints_total");
}
