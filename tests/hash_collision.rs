//! Promise: two keys with one 64-bit hash stay two keys.
//!
//! `Options::key_hash` forces every key onto one index hash; claims, completions, removes,
//! orphans, reopen and bucket expiry must still treat each key on its own, confirmed against
//! the key stored on disk.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use idemstore::{Claim, ClaimOptions, ClaimToken, Entry, Error, ManualClock, Options, Store};

mod common;
use common::{START_MS, acquired};

/// Keys of equal and of different lengths, and one a prefix of another.
const KEYS: [&str; 6] = ["alpha", "delta", "omega", "ab", "abc", "a much longer key than the rest"];

fn one_hash_for_all(_key: &[u8]) -> u64 {
    0x0123_4567_89ab_cdef
}

fn options(clock: &Arc<ManualClock>) -> Options {
    Options {
        key_hash: Some(one_hash_for_all),
        bucket_width: Duration::from_secs(60),
        segment_bytes_initial: 4096,
        ..common::options(clock)
    }
}

fn open(dir: &Path, clock: &Arc<ManualClock>) -> Store {
    Store::open(dir, options(clock)).expect("open store")
}

fn request(key: &str) -> Vec<u8> {
    format!("request for {key}").into_bytes()
}

fn outcome(key: &str) -> Vec<u8> {
    format!("outcome of {key}").into_bytes()
}

fn assert_completed(store: &Store, key: &str) {
    match store.claim(key, request(key)).unwrap() {
        Claim::Completed(done) => assert_eq!(done.outcome, outcome(key), "{key}"),
        other => panic!("{key}: expected Completed, got {other:?}"),
    }
}

/// Claims every key of `KEYS` and completes all of them but "omega", which stays in flight.
fn claim_all_and_complete_all_but_omega(store: &Store) {
    for key in KEYS {
        let token = acquired(store.claim(key, request(key)).unwrap());
        if key != "omega" {
            store.complete(&token, outcome(key)).unwrap();
        }
    }
}

#[test]
fn colliding_keys_are_claimed_and_completed_separately() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let tokens: Vec<ClaimToken> = KEYS.iter().map(|k| acquired(store.claim(k, request(k)).unwrap())).collect();
    for (key, token) in KEYS.iter().zip(&tokens) {
        assert_eq!(token.key(), key.as_bytes());
        assert!(matches!(store.claim(key, request(key)).unwrap(), Claim::InProgress { .. }), "{key}");
    }
    for (key, token) in KEYS.iter().zip(&tokens).step_by(2) {
        store.complete(token, outcome(key)).unwrap();
    }
    for (i, key) in KEYS.iter().enumerate() {
        if i % 2 == 0 {
            assert_completed(&store, key);
        } else {
            assert!(matches!(store.get(key).unwrap(), Some(Entry::InFlight { .. })), "{key} still in flight");
        }
        // Each key checks its own request, not a colliding key's.
        let other = KEYS[(i + 1) % KEYS.len()];
        assert_eq!(store.claim(key, request(other)).unwrap(), Claim::Mismatch, "{key}");
    }
    assert_eq!(store.get("never claimed").unwrap(), None, "a colliding absent key stays absent");
    assert_eq!(store.stats().index_entries, KEYS.len() as u64);
}

#[test]
fn removing_one_colliding_key_leaves_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    for key in KEYS {
        let token = acquired(store.claim(key, request(key)).unwrap());
        store.complete(&token, outcome(key)).unwrap();
    }
    store.remove("abc").unwrap();
    store.remove("zzz").unwrap(); // an absent colliding key
    assert_eq!(store.get("abc").unwrap(), None);
    for key in KEYS.iter().filter(|k| **k != "abc") {
        assert_completed(&store, key);
    }
    let again = acquired(store.claim("abc", b"new request").unwrap());
    assert!(!again.recovered());
    assert_completed(&store, "ab");
}

#[test]
fn colliding_tokens_fence_only_their_own_key() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let lease = ClaimOptions { lease: Some(Duration::from_secs(5)), ..Default::default() };
    let a = acquired(store.claim_with("alpha", b"r", lease.clone()).unwrap());
    let d = acquired(store.claim_with("delta", b"r", lease.clone()).unwrap());
    clock.advance(Duration::from_secs(5));
    let a2 = acquired(store.claim_with("alpha", b"r", lease).unwrap());
    assert!(a2.recovered());
    assert!(matches!(store.complete(&a, b"x"), Err(Error::StaleToken)));
    store.complete(&d, b"delta done").unwrap(); // delta's holder was not taken over
    store.complete(&a2, b"alpha done").unwrap();
    let Some(Entry::Completed(done)) = store.get("delta").unwrap() else { panic!("delta completed") };
    assert_eq!(done.outcome, b"delta done");
    let Some(Entry::Completed(done)) = store.get("alpha").unwrap() else { panic!("alpha completed") };
    assert_eq!(done.outcome, b"alpha done");
}

#[test]
fn colliding_keys_stay_separate_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    {
        let store = open(dir.path(), &clock);
        claim_all_and_complete_all_but_omega(&store);
        store.remove("delta").unwrap();
        drop(store); // omega is left in flight: an orphan
    }
    let store = open(dir.path(), &clock);
    for key in KEYS.iter().filter(|k| !["delta", "omega"].contains(k)) {
        assert_completed(&store, key);
    }
    assert_eq!(store.get("delta").unwrap(), None);
    let orphans = store.orphans().unwrap();
    assert_eq!(orphans.len(), 1);
    assert_eq!(orphans[0].key, b"omega");
    let omega = acquired(store.claim("omega", request("omega")).unwrap());
    assert!(omega.recovered());
}

#[test]
fn expiry_of_one_colliding_key_leaves_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    // Three buckets: one minute, one hour, one day.
    let ttls = [("alpha", 60u64), ("delta", 3_600), ("omega", 86_400), ("ab", 60), ("abc", 3_600)];
    for (key, ttl) in ttls {
        let opts = ClaimOptions { ttl: Some(Duration::from_secs(ttl)), ..Default::default() };
        let token = acquired(store.claim_with(key, request(key), opts).unwrap());
        store.complete(&token, outcome(key)).unwrap();
    }
    clock.advance(Duration::from_secs(3 * 60));
    assert_eq!(store.get("alpha").unwrap(), None, "expired before the bucket is dropped");
    assert!(store.maintain().unwrap() >= 1);
    assert_eq!(store.get("alpha").unwrap(), None);
    assert_eq!(store.get("ab").unwrap(), None);
    for key in ["delta", "omega", "abc"] {
        assert_completed(&store, key);
    }
    drop(store);

    clock.advance(Duration::from_secs(2 * 3_600));
    let store = open(dir.path(), &clock);
    for key in ["alpha", "ab", "delta", "abc"] {
        assert_eq!(store.get(key).unwrap(), None, "{key} expired");
    }
    assert_completed(&store, "omega");
    let fresh = acquired(store.claim("delta", b"a new request").unwrap());
    assert!(!fresh.recovered());
    assert_completed(&store, "omega");
}

#[test]
fn many_colliding_keys_in_mixed_states() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let keys: Vec<String> = (0..40).map(|i| format!("key-{i:02}")).collect();
    {
        let store = open(dir.path(), &clock);
        for (i, key) in keys.iter().enumerate() {
            let token = acquired(store.claim(key, request(key)).unwrap());
            match i % 4 {
                0 => store.complete(&token, outcome(key)).unwrap(),
                1 => store.release(&token).unwrap(),
                2 => store.checkpoint(&token, key.as_bytes()).unwrap(),
                _ => store.remove(key).unwrap(),
            }
        }
        store.close().unwrap();
    }
    let store = open(dir.path(), &clock);
    for (i, key) in keys.iter().enumerate() {
        match (i % 4, store.get(key).unwrap()) {
            (0, Some(Entry::Completed(done))) => assert_eq!(done.outcome, outcome(key)),
            (1 | 3, None) => {}
            (2, Some(Entry::InFlight { checkpoint, .. })) => assert_eq!(checkpoint.as_deref(), Some(key.as_bytes())),
            (kind, other) => panic!("{key} (kind {kind}): unexpected {other:?}"),
        }
    }
}

/// Segments idle for a while are sealed by `maintain` (their index moves to a table on disk);
/// colliding keys must stay apart there too, and after a reopen that maps those tables.
#[test]
fn colliding_keys_stay_separate_in_sealed_segments() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    {
        let store = open(dir.path(), &clock);
        claim_all_and_complete_all_but_omega(&store);
        // Long idle: the segment stops taking writes and is sealed by maintain.
        clock.advance(Duration::from_secs(2 * 3600));
        store.maintain().unwrap();
        assert!(store.stats().sealed_tables >= 1, "maintain sealed nothing: {:?}", store.stats());
        for key in KEYS.iter().filter(|k| **k != "omega") {
            assert_completed(&store, key);
        }
        assert!(matches!(store.get("omega").unwrap(), Some(Entry::InFlight { .. })));
        // New writes for colliding keys go to a new segment and shadow the sealed ones.
        store.remove("abc").unwrap();
        let fresh = acquired(store.claim("abc", b"second life").unwrap());
        store.complete(&fresh, b"second outcome").unwrap();
        store.close().unwrap();
    }
    let store = open(dir.path(), &clock);
    for key in KEYS.iter().filter(|k| !["omega", "abc"].contains(k)) {
        assert_completed(&store, key);
    }
    let Claim::Completed(done) = store.claim("abc", b"second life").unwrap() else { panic!("abc replays") };
    assert_eq!(done.outcome, b"second outcome");
    assert_eq!(store.claim("abc", request("abc")).unwrap(), Claim::Mismatch, "the old request is gone with the remove");
    let orphans = store.orphans().unwrap();
    assert_eq!(orphans.iter().map(|o| o.key.clone()).collect::<Vec<_>>(), vec![b"omega".to_vec()]);
    assert_eq!(store.get("never claimed").unwrap(), None);
}
