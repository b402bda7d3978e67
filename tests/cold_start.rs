//! Cold start: a store dropped and reopened (every cache gone, only the files kept) still
//! answers every repeat of its window from disk. Replaying the whole window after the reopen
//! gives each identical request its original outcome (`Completed`, every field equal) and each
//! altered request `Mismatch`; nothing is `Acquired`, so no effect runs twice. Also: a window
//! whose segments filled up reopens, and fencing tokens keep growing across a reopen that
//! found the whole window expired.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use idemstore::sim::SimDisk;
use idemstore::{Claim, ClaimOptions, Completed, Durability, Entry, Error, ManualClock, Options, Store};

mod common;
use common::{Rng, START_MS};

/// One request of the window and the answer its first execution stored.
struct Done {
    key: String,
    request: Vec<u8>,
    completed: Completed,
}

fn options(clock: &Arc<ManualClock>, segment_bytes_max: u64) -> Options {
    Options {
        durability: Durability::None,
        max_key_len: 64,
        max_outcome_len: 1024,
        segment_bytes_max,
        segment_bytes_initial: 1024,
        clock: clock.clone(),
        background: false,
        ..Options::default()
    }
}

/// Claims and completes `count` requests with TTLs from 1 h to 24 h (several expiry buckets)
/// and outcomes of 0 to ~1 KiB, returning what each completion stored, read back with `get`.
fn fill_window(store: &Store, clock: &ManualClock, count: usize, outcome_len: impl Fn(usize) -> usize) -> Vec<Done> {
    let ttls_h = [1u64, 2, 5, 24];
    (0..count)
        .map(|i| {
            let key = format!("payment-{i:05}");
            let request = format!("POST /payments amount={} currency=EUR", 100 + i).into_bytes();
            let ttl = Duration::from_secs(ttls_h[i % ttls_h.len()] * 3600);
            let token = match store.claim_with(&key, &request, ClaimOptions { ttl: Some(ttl), ..Default::default() }) {
                Ok(Claim::Acquired(token)) => token,
                other => panic!("first claim of {key} gave {other:?}"),
            };
            clock.advance(Duration::from_millis(3));
            let mut outcome = format!("201 Created: {key} ").into_bytes();
            outcome.resize(outcome_len(i), b'x');
            store.complete(&token, &outcome).unwrap_or_else(|e| panic!("complete of {key} failed: {e}"));
            let completed = match store.get(&key) {
                Ok(Some(Entry::Completed(completed))) => completed,
                other => panic!("get right after completing {key} gave {other:?}"),
            };
            assert_eq!(completed.outcome, outcome, "get returned another outcome than the one completed");
            Done { key, request, completed }
        })
        .collect()
}

/// Replays every request of the window in a shuffled order, altering every fifth one, and
/// checks each answer: identical requests replay exactly, altered ones are `Mismatch`.
/// Returns how many were altered.
fn replay_window(store: &Store, window: &[Done], seed: u64) -> u64 {
    let mut order: Vec<usize> = (0..window.len()).collect();
    Rng(seed).shuffle(&mut order);
    let mut altered = 0;
    for i in order {
        let done = &window[i];
        if i % 5 == 0 {
            altered += 1;
            let mut changed = done.request.clone();
            changed.extend_from_slice(b" (amount edited)");
            match store.claim(&done.key, &changed) {
                Ok(Claim::Mismatch) => {}
                other => panic!("an altered replay of {} after reopen gave {other:?}, not Mismatch", done.key),
            }
        } else {
            match store.claim(&done.key, &done.request) {
                Ok(Claim::Completed(replayed)) => {
                    assert_eq!(replayed, done.completed, "the replay of {} differs from its first answer", done.key)
                }
                other => panic!("a replay of {} after reopen gave {other:?}, not its stored outcome", done.key),
            }
        }
    }
    altered
}

fn reopen_and_replay_whole_window(segment_bytes_max: u64, count: usize, outcome_len: impl Fn(usize) -> usize) {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let clock = ManualClock::new(START_MS);
    let window = {
        let store = Store::open(dir.path(), options(&clock, segment_bytes_max)).expect("open a new store");
        let window = fill_window(&store, &clock, count, outcome_len);
        assert!(store.stats().segments >= 4, "the window should span several segment files");
        drop(store);
        window
    };
    // Ten minutes later: every request is still inside its window.
    clock.advance(Duration::from_secs(600));
    let store = Store::open(dir.path(), options(&clock, segment_bytes_max)).expect("reopen the store");
    // Dropping the store gave every segment a table: the reopen maps them and scans nothing.
    let recovery = store.stats().recovery;
    assert_eq!(recovery.records, 0, "a cleanly dropped store was scanned: {recovery:?}");
    assert_eq!(recovery.tables_loaded, recovery.segments, "{recovery:?}");
    for pass in 0..2u64 {
        let before = store.stats();
        let altered = replay_window(&store, &window, 7 + pass);
        let after = store.stats();
        assert_eq!(after.claims_acquired_total, 0, "pass {pass}: a replay after reopen re-executed a request");
        assert_eq!(after.duplicates_replayed_total - before.duplicates_replayed_total, count as u64 - altered);
        assert_eq!(after.mismatches_total - before.mismatches_total, altered);
    }
}

#[test]
fn replaying_a_whole_window_after_reopen_replays_or_mismatches_and_never_reexecutes() {
    reopen_and_replay_whole_window(64 << 20, 400, |i| (i * 37) % 1000);
}

/// Segments of 4 KiB that the window fills up: each ends with a zeroed gap shorter than the
/// next record (some shorter than a record header), which recovery must read as the clean end
/// of the file.
#[test]
fn a_window_of_full_segments_reopens_and_replays() {
    reopen_and_replay_whole_window(4096, 200, |i| [120, 300, 17, 644][i % 4]);
}

/// Fencing tokens promise that "a later holder of the key gets a larger one". After the whole
/// window expired and the store was reopened, the new holder's token must still be larger, and
/// a token of the expired holding must stay stale rather than complete the new holder's claim.
#[test]
fn fencing_tokens_keep_growing_across_a_reopen_that_finds_the_window_expired() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let dir = Path::new("/cold-start/fencing");
    let open = || {
        Store::open(
            dir,
            Options { io: Arc::new(disk.clone()), clock: clock.clone(), background: false, ..Options::default() },
        )
        .expect("open the store")
    };
    let short = ClaimOptions { ttl: Some(Duration::from_secs(1)), ..Default::default() };
    let store = open();
    let old_holder = match store.claim_with("invoice-7", b"send", short.clone()) {
        Ok(Claim::Acquired(token)) => token,
        other => panic!("first claim gave {other:?}"),
    };
    drop(store);
    // The window (and its whole bucket) ends; the process restarts the store.
    clock.advance(Duration::from_secs(2 * 3600));
    let store = open();
    let new_holder = match store.claim_with("invoice-7", b"send", short) {
        Ok(Claim::Acquired(token)) => token,
        other => panic!("a claim after the window ended gave {other:?}"),
    };
    assert!(
        new_holder.id() > old_holder.id(),
        "the later holder's token {} is not larger than the expired holder's {}",
        new_holder.id(),
        old_holder.id()
    );
    assert!(
        matches!(store.complete(&old_holder, b"sent twice"), Err(Error::StaleToken)),
        "the expired holder's token completed the new holder's claim"
    );
}
