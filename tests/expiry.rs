//! Promise: the window and TTL-segmented expiry (README, Guarantees: "Window"; ARCHITECTURE.md, invariant 3).
//!
//! A key is absent from `claimed_at + ttl` on, exactly, on every read path and whether or not
//! its file was dropped yet; `maintain()` (and open) delete an expired bucket's segment files
//! whole; a record that shadows another (complete, release, remove, takeover) never expires
//! before what it shadows, so dropping a bucket never resurrects an older state of a key.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use idemstore::sim::SimDisk;
use idemstore::{Claim, ClaimOptions, Entry, Error, ManualClock, Options, Store, ms_to_system_time};

mod common;
use common::{START_MS, acquired};

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

fn options(clock: &Arc<ManualClock>) -> Options {
    Options {
        bucket_width: MINUTE,
        max_key_len: 64,
        max_outcome_len: 512,
        segment_bytes_initial: 1024,
        segment_bytes_max: 2048,
        ..common::options(clock)
    }
}

fn open(dir: &Path, clock: &Arc<ManualClock>) -> Store {
    Store::open(dir, options(clock)).expect("open store")
}

fn ttl(d: Duration) -> ClaimOptions {
    ClaimOptions { ttl: Some(d), ..Default::default() }
}

fn segment_files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".seg"))
        .collect()
}

#[test]
fn expired_in_flight_and_completed_keys_read_as_absent_at_exactly_their_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let held = acquired(store.claim_with("in-flight", b"r", ttl(MINUTE)).unwrap());
    store.checkpoint(&held, b"phase").unwrap();
    let done = acquired(store.claim_with("completed", b"r", ttl(MINUTE)).unwrap());
    store.complete(&done, b"outcome").unwrap();

    clock.advance(MINUTE - Duration::from_millis(1));
    assert!(matches!(store.get("in-flight").unwrap(), Some(Entry::InFlight { .. })));
    assert!(matches!(store.get("completed").unwrap(), Some(Entry::Completed(_))));

    clock.advance(Duration::from_millis(1));
    assert_eq!(store.get("in-flight").unwrap(), None);
    assert_eq!(store.get("completed").unwrap(), None);
    assert!(matches!(store.complete(&held, b"too late"), Err(Error::StaleToken)), "an expired holding is over");

    // A claim after the window is a fresh one, even with another request.
    let fresh = acquired(store.claim("completed", b"another request").unwrap());
    assert!(!fresh.recovered());
    let fresh = acquired(store.claim("in-flight", b"r").unwrap());
    assert!(!fresh.recovered(), "an expired claim is not taken over");
    assert_eq!(fresh.checkpoint(), None, "nor is its checkpoint handed on");
}

#[test]
fn expired_keys_stay_absent_after_maintain_and_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    {
        let store = open(dir.path(), &clock);
        let token = acquired(store.claim_with("k", b"r", ttl(MINUTE)).unwrap());
        store.complete(&token, b"outcome").unwrap();
        let _held = acquired(store.claim_with("orphan", b"r", ttl(MINUTE)).unwrap());
        clock.advance(MINUTE * 3);
        assert_eq!(store.get("k").unwrap(), None, "before maintain");
        assert_eq!(store.maintain().unwrap(), 1);
        assert_eq!(store.get("k").unwrap(), None, "after maintain");
        assert_eq!(store.get("orphan").unwrap(), None);
        let _held = acquired(store.claim("k", b"other request").unwrap());
        drop(store);
    }
    let store = open(dir.path(), &clock);
    assert!(matches!(store.get("k").unwrap(), Some(Entry::InFlight { .. })), "the new claim, not the old outcome");
    assert_eq!(store.get("orphan").unwrap(), None);
    assert_eq!(store.orphans().unwrap().len(), 1, "only the new claim is an orphan");
}

#[test]
fn maintain_drops_an_expired_bucket_whole_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let outcome = vec![b'x'; 300];

    // Twenty short-lived keys: one bucket, spread over several small segment files.
    for i in 0..20 {
        let token = acquired(store.claim_with(format!("short-{i}"), b"r", ttl(Duration::from_secs(30))).unwrap());
        store.complete(&token, &outcome).unwrap();
    }
    let short_files = segment_files(dir.path());
    assert!(short_files.len() >= 3, "the bucket should span several files: {short_files:?}");
    for i in 0..5 {
        let token = acquired(store.claim_with(format!("long-{i}"), b"r", ttl(HOUR)).unwrap());
        store.complete(&token, &outcome).unwrap();
    }
    let long_files: BTreeSet<String> = segment_files(dir.path()).difference(&short_files).cloned().collect();
    assert!(!long_files.is_empty());
    let segments_before = store.stats().segments;

    clock.advance(MINUTE * 2);
    assert_eq!(store.maintain().unwrap(), 1, "one bucket dropped");
    assert_eq!(segment_files(dir.path()), long_files, "every file of the expired bucket is gone, no other");
    let stats = store.stats();
    assert_eq!(stats.buckets_expired_total, 1);
    assert_eq!(stats.keys_expired_total, 20);
    assert_eq!(stats.segments, segments_before - short_files.len() as u64);
    for i in 0..20 {
        assert_eq!(store.get(format!("short-{i}")).unwrap(), None);
    }
    for i in 0..5 {
        let Some(Entry::Completed(done)) = store.get(format!("long-{i}")).unwrap() else { panic!("long-{i} lives") };
        assert_eq!(done.outcome, outcome);
    }
    assert_eq!(store.maintain().unwrap(), 0, "nothing left to drop");
}

#[test]
fn maintain_keeps_a_bucket_until_its_end_has_passed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let _held = acquired(store.claim_with("k", b"r", ttl(Duration::from_secs(1))).unwrap());
    let files = segment_files(dir.path());
    // The record expires after 1 s, but its bucket ends at the next minute boundary after that.
    let expires_ms = START_MS + 1_000;
    let bucket_end_ms = (expires_ms / 60_000 + 1) * 60_000;
    clock.set_ms(bucket_end_ms - 1);
    assert_eq!(store.get("k").unwrap(), None);
    assert_eq!(store.maintain().unwrap(), 0);
    assert_eq!(segment_files(dir.path()), files);
    clock.set_ms(bucket_end_ms);
    assert_eq!(store.maintain().unwrap(), 1);
    assert!(segment_files(dir.path()).is_empty());
}

#[test]
fn open_deletes_expired_buckets_whole() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let short_files;
    {
        let store = open(dir.path(), &clock);
        for i in 0..10 {
            let token = acquired(store.claim_with(format!("short-{i}"), b"r", ttl(Duration::from_secs(30))).unwrap());
            store.complete(&token, vec![b'y'; 300]).unwrap();
        }
        short_files = segment_files(dir.path());
        let token = acquired(store.claim_with("long", b"r", ttl(HOUR)).unwrap());
        store.complete(&token, b"kept").unwrap();
        store.close().unwrap();
    }
    clock.advance(MINUTE * 2);
    let store = open(dir.path(), &clock);
    assert!(segment_files(dir.path()).is_disjoint(&short_files), "expired files deleted at open");
    assert!(store.stats().recovery.expired_buckets_deleted > 0);
    assert_eq!(store.get("short-0").unwrap(), None);
    let Some(Entry::Completed(done)) = store.get("long").unwrap() else { panic!("long lives") };
    assert_eq!(done.outcome, b"kept");
}

/// The scenario of the brief: a long claim, a remove, a short claim that expires and whose
/// bucket is dropped; the key must stay absent, never fall back to the long claim.
#[test]
fn dropping_a_short_bucket_does_not_resurrect_a_removed_long_claim() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    {
        let store = open(dir.path(), &clock);
        let long = acquired(store.claim_with("k", b"r", ttl(HOUR * 10)).unwrap());
        store.complete(&long, b"old outcome").unwrap();
        clock.advance(MINUTE);
        store.remove("k").unwrap();
        let short = acquired(store.claim_with("k", b"r", ttl(MINUTE)).unwrap());
        store.complete(&short, b"short outcome").unwrap();
        clock.advance(MINUTE * 3);
        assert_eq!(store.get("k").unwrap(), None);
        // Drops whatever has expired: the short claim's bucket, unless the store keeps a
        // shadowing record as long as what it shadows (then nothing is due yet).
        store.maintain().unwrap();
        assert_eq!(store.get("k").unwrap(), None, "not the old outcome after the drop");
        store.close().unwrap();
    }
    {
        let store = open(dir.path(), &clock);
        assert_eq!(store.get("k").unwrap(), None, "not resurrected by reopen");
        store.close().unwrap();
    }
    // Past the long window everything is due: still absent, and free for a fresh claim.
    clock.advance(HOUR * 10);
    let store = open(dir.path(), &clock);
    store.maintain().unwrap();
    assert_eq!(store.get("k").unwrap(), None);
    assert!(!acquired(store.claim("k", b"a new request").unwrap()).recovered());
}

#[test]
fn short_claim_after_release_of_a_long_claim_does_not_resurrect_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    {
        let store = open(dir.path(), &clock);
        let long = acquired(store.claim_with("k", b"r", ttl(HOUR * 10)).unwrap());
        store.checkpoint(&long, b"old phase").unwrap();
        store.release(&long).unwrap();
        let _held = acquired(store.claim_with("k", b"r", ttl(MINUTE)).unwrap());
        drop(store);
    }
    // Reopen after the short claim expired, without any maintain: open drops its bucket.
    clock.advance(MINUTE * 3);
    let store = open(dir.path(), &clock);
    assert_eq!(store.get("k").unwrap(), None, "the released long claim must not come back");
    assert_eq!(store.orphans().unwrap(), vec![]);
    let token = acquired(store.claim("k", b"r").unwrap());
    assert!(!token.recovered());
    assert_eq!(token.checkpoint(), None);
}

#[test]
fn shadowing_records_keep_the_expiry_of_what_they_shadow() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let claim_expiry = ms_to_system_time(START_MS + 3_600_000);
    let token = acquired(store.claim_with("k", b"r", ttl(HOUR)).unwrap());
    clock.advance(MINUTE * 10);
    store.checkpoint(&token, b"p").unwrap();
    let Some(Entry::InFlight { expires_at, .. }) = store.get("k").unwrap() else { panic!("in flight") };
    assert_eq!(expires_at, claim_expiry, "a checkpoint does not move the window");
    clock.advance(MINUTE * 10);
    store.complete(&token, b"o").unwrap();
    let Some(Entry::Completed(done)) = store.get("k").unwrap() else { panic!("completed") };
    assert_eq!(done.expires_at, claim_expiry, "a complete does not move the window");
    clock.set_ms(START_MS + 3_600_000 - 1);
    assert!(store.get("k").unwrap().is_some());
    clock.advance(Duration::from_millis(1));
    assert_eq!(store.get("k").unwrap(), None);
}

#[test]
fn lease_takeover_with_a_shorter_ttl_never_shortens_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    {
        let store = open(dir.path(), &clock);
        let opts = ClaimOptions { ttl: Some(HOUR), lease: Some(Duration::from_secs(1)), wait: None };
        let _held = acquired(store.claim_with("k", b"r", opts).unwrap());
        clock.advance(Duration::from_secs(1));
        let taker = acquired(store.claim_with("k", b"r", ttl(MINUTE)).unwrap());
        assert!(taker.recovered());
        store.complete(&taker, b"done").unwrap();
        clock.advance(MINUTE * 3);
        store.maintain().unwrap();
        let Some(Entry::Completed(done)) = store.get("k").unwrap() else { panic!("still in the window") };
        assert_eq!(done.expires_at, ms_to_system_time(START_MS + 3_600_000));
        store.close().unwrap();
    }
    let store = open(dir.path(), &clock);
    let Claim::Completed(done) = store.claim("k", b"r").unwrap() else { panic!("still completed after reopen") };
    assert_eq!(done.outcome, b"done");
}

#[test]
fn mixed_ttls_expire_each_at_its_own_time() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let ttls_ms: [u64; 6] = [1, 1_000, 30_000, 300_000, 7_200_000, 86_400_000];
    let mut store = open(dir.path(), &clock);
    for (i, ttl_ms) in ttls_ms.iter().enumerate() {
        let token = acquired(store.claim_with(format!("k{i}"), b"r", ttl(Duration::from_millis(*ttl_ms))).unwrap());
        if i % 2 == 0 {
            store.complete(&token, format!("outcome {i}")).unwrap();
        }
    }
    let check = |store: &Store, when: &str| {
        let now_ms = clock_ms(&clock);
        for (i, ttl_ms) in ttls_ms.iter().enumerate() {
            let live = now_ms < START_MS + ttl_ms;
            let entry = store.get(format!("k{i}")).unwrap();
            match (live, entry, i % 2 == 0) {
                (false, None, _) => {}
                (true, Some(Entry::Completed(done)), true) => {
                    assert_eq!(done.outcome, format!("outcome {i}").as_bytes())
                }
                (true, Some(Entry::InFlight { .. }), false) => {}
                (live, entry, _) => {
                    panic!("k{i} (ttl {ttl_ms} ms) at +{} ms {when}: live={live}, got {entry:?}", now_ms - START_MS)
                }
            }
        }
    };
    let steps_ms: [u64; 9] = [0, 1, 999, 1, 30_000, 300_000, 7_200_000, 80_000_000, 7_000_000];
    for (step, advance_ms) in steps_ms.iter().enumerate() {
        clock.advance(Duration::from_millis(*advance_ms));
        check(&store, "before maintain");
        store.maintain().unwrap();
        check(&store, "after maintain");
        if step % 2 == 1 {
            drop(store);
            store = open(dir.path(), &clock);
            check(&store, "after reopen");
        }
    }
    assert!(segment_files(dir.path()).is_empty(), "every bucket dropped once everything expired");
}

fn clock_ms(clock: &ManualClock) -> u64 {
    use idemstore::Clock;
    clock.now_ms()
}

/// A read through a segment handle kept by the key's shard is in flight while the key's bucket
/// is dropped: the segment's file must not be deleted until that read is over (deleting a
/// large segment first cuts it, and a mapped read past the cut faults the whole process).
/// Maintenance waits for the shard's lock, which the read holds, before it deletes.
#[test]
fn a_bucket_s_files_are_not_deleted_while_a_read_of_them_is_in_flight() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let options = Options { io: Arc::new(disk.clone()), ..options(&clock) };
    let store = Arc::new(Store::open("/store", options).unwrap());
    let token = acquired(store.claim_with("key", b"r", ttl(MINUTE)).unwrap());
    store.complete(&token, b"outcome").unwrap();
    assert!(store.get("key").unwrap().is_some(), "the read that keeps the segment's handle");

    // The read starts while the bucket is live (a segment whose bucket has ended is not read
    // at all); the bucket ends while the read is in flight.
    disk.hold_next_read();
    let reader = std::thread::spawn({
        let store = store.clone();
        move || store.get("key")
    });
    disk.wait_for_held_read();
    clock.advance(2 * MINUTE);
    let maintainer = std::thread::spawn({
        let store = store.clone();
        move || store.maintain()
    });
    // Time for a maintenance that does not wait for the read to delete the file.
    std::thread::sleep(Duration::from_millis(200));
    let removed_under_the_read = disk.removed_during_held_read();
    disk.release_held_read();
    assert!(!removed_under_the_read, "a segment file was deleted under a read in flight");
    let read = reader.join().unwrap().unwrap();
    assert!(matches!(read, Some(Entry::Completed(ref done)) if done.outcome == b"outcome"), "{read:?}");
    assert_eq!(store.get("key").unwrap(), None, "the expired key read as present");
    assert_eq!(maintainer.join().unwrap().unwrap(), 1, "the expired bucket was not dropped");
    assert!(!disk.removed_during_held_read());
}
