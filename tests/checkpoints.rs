//! Promise: recovery points (`Store::checkpoint`).
//!
//! `checkpoint(&token, phase)` records how far the holder got; `get` shows the last one, a
//! holder that takes the claim over (after the lease, or an orphan after a reopen) reads it from
//! its token, it survives reopen, and an over-long checkpoint is refused with nothing written.

use std::time::Duration;

use idemstore::{ClaimOptions, Entry, Error, ManualClock, Options, Store};

mod common;
use common::{START_MS, acquired, open, options};

const LEASE: Duration = Duration::from_secs(10);

fn lease() -> ClaimOptions {
    ClaimOptions { lease: Some(LEASE), ..Default::default() }
}

fn checkpoint_of(store: &Store, key: &str) -> Option<Vec<u8>> {
    match store.get(key).unwrap() {
        Some(Entry::InFlight { checkpoint, .. }) => checkpoint,
        other => panic!("expected {key} in flight, got {other:?}"),
    }
}

#[test]
fn get_shows_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let token = acquired(store.claim("k", b"r").unwrap());
    assert_eq!(checkpoint_of(&store, "k"), None);
    for phase in [&b"reserved stock"[..], b"charged card", &[0u8, 255, 0, 7]] {
        store.checkpoint(&token, phase).unwrap();
        assert_eq!(checkpoint_of(&store, "k").as_deref(), Some(phase));
    }
    assert_eq!(store.stats().checkpoints_total, 3);
}

#[test]
fn lease_taker_reads_the_last_checkpoint_from_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let first = acquired(store.claim_with("k", b"r", lease()).unwrap());
    store.checkpoint(&first, b"step 1").unwrap();
    store.checkpoint(&first, b"step 2").unwrap();
    clock.advance(LEASE);
    let second = acquired(store.claim_with("k", b"r", lease()).unwrap());
    assert!(second.recovered());
    assert_eq!(second.checkpoint(), Some(&b"step 2"[..]));
    assert_eq!(checkpoint_of(&store, "k").as_deref(), Some(&b"step 2"[..]), "a takeover keeps the checkpoint");

    // The second holder moves on; a third holder sees its progress.
    store.checkpoint(&second, b"step 3").unwrap();
    clock.advance(LEASE);
    let third = acquired(store.claim_with("k", b"r", lease()).unwrap());
    assert_eq!(third.checkpoint(), Some(&b"step 3"[..]));
    assert!(matches!(store.checkpoint(&second, b"step 4"), Err(Error::StaleToken)));
    assert_eq!(checkpoint_of(&store, "k").as_deref(), Some(&b"step 3"[..]), "a stale checkpoint changes nothing");
}

#[test]
fn checkpoints_survive_reopen_and_reach_the_orphan_taker() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    {
        let store = open(dir.path(), &clock);
        let a = acquired(store.claim("a", b"r").unwrap());
        let b = acquired(store.claim("b", b"r").unwrap());
        store.checkpoint(&a, b"a: first").unwrap();
        store.checkpoint(&b, b"b: only").unwrap();
        store.checkpoint(&a, b"a: second").unwrap();
        drop(store);
    }
    {
        let store = open(dir.path(), &clock);
        assert_eq!(checkpoint_of(&store, "a").as_deref(), Some(&b"a: second"[..]));
        assert_eq!(checkpoint_of(&store, "b").as_deref(), Some(&b"b: only"[..]));
        store.close().unwrap();
    }
    let store = open(dir.path(), &clock);
    let a = acquired(store.claim("a", b"r").unwrap());
    assert!(a.recovered());
    assert_eq!(a.checkpoint(), Some(&b"a: second"[..]));
    let b = acquired(store.claim("b", b"r").unwrap());
    assert_eq!(b.checkpoint(), Some(&b"b: only"[..]));
}

#[test]
fn completing_replaces_the_checkpoint_with_the_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let token = acquired(store.claim("k", b"r").unwrap());
    store.checkpoint(&token, b"phase").unwrap();
    store.complete(&token, b"outcome").unwrap();
    let Some(Entry::Completed(done)) = store.get("k").unwrap() else { panic!("expected Completed") };
    assert_eq!(done.outcome, b"outcome");
    assert!(matches!(store.checkpoint(&token, b"after"), Err(Error::StaleToken)));
}

#[test]
fn over_long_checkpoint_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = Store::open(dir.path(), Options { max_outcome_len: 100, ..options(&clock) }).unwrap();
    let token = acquired(store.claim("k", b"r").unwrap());
    store.checkpoint(&token, b"good").unwrap();
    let seq = store.stats().last_seq;

    let err = store.checkpoint(&token, vec![7u8; 101]).unwrap_err();
    assert!(matches!(err, Error::OutcomeTooLong { len: 101, max: 100 }), "got {err:?}");
    assert_eq!(store.stats().last_seq, seq, "nothing written");
    assert_eq!(checkpoint_of(&store, "k").as_deref(), Some(&b"good"[..]), "the earlier checkpoint stands");

    // Exactly at the limit is fine, and the token still holds the key.
    store.checkpoint(&token, vec![7u8; 100]).unwrap();
    assert_eq!(checkpoint_of(&store, "k"), Some(vec![7u8; 100]));
}

#[test]
fn checkpoint_over_the_default_one_mib_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let token = acquired(store.claim("k", b"r").unwrap());
    let seq = store.stats().last_seq;
    let err = store.checkpoint(&token, vec![1u8; (1 << 20) + 1]).unwrap_err();
    assert!(matches!(err, Error::OutcomeTooLong { len, max: 1_048_576 } if len == (1 << 20) + 1), "got {err:?}");
    assert_eq!(store.stats().last_seq, seq);
    store.checkpoint(&token, vec![1u8; 1 << 20]).unwrap();
    assert_eq!(checkpoint_of(&store, "k").map(|c| c.len()), Some(1 << 20));
}
