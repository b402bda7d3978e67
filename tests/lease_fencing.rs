//! Promise: leases and fencing (README, Guarantees: "Lease and fencing").
//!
//! An acquired claim holds a lease; once it ends the next claim takes the key over with a new,
//! larger token that says `recovered()`, and from then on the old token's `complete`, `release`
//! and `checkpoint` fail with `Error::StaleToken`. Until somebody takes over, a late holder may
//! still finish. A checkpoint renews the lease. Time is a `ManualClock`: nothing sleeps.

use std::time::Duration;

use idemstore::{Claim, ClaimOptions, Entry, Error, ManualClock};

mod common;
use common::{START_MS, acquired, at, open};

const LEASE: Duration = Duration::from_secs(10);

fn with_lease(lease: Duration) -> ClaimOptions {
    ClaimOptions { lease: Some(lease), ..Default::default() }
}

#[test]
fn claim_inside_the_lease_waits_and_claim_at_lease_end_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let first = acquired(store.claim_with("k", b"r", with_lease(LEASE)).unwrap());

    clock.advance(LEASE - Duration::from_millis(1));
    assert_eq!(
        common::in_progress_until(store.claim_with("k", b"r", with_lease(LEASE)).unwrap()),
        Some(at(START_MS + 10_000))
    );

    clock.advance(Duration::from_millis(1));
    let second = acquired(store.claim_with("k", b"r", with_lease(Duration::from_secs(7))).unwrap());
    assert!(second.recovered(), "a takeover says so");
    assert!(second.id() > first.id(), "fencing numbers only grow");
    assert_eq!(second.lease_expires_at(), at(START_MS + 10_000 + 7_000), "the taker's own lease");
    assert_eq!(store.stats().lease_takeovers_total, 1);

    // The taker now holds the key like any holder.
    assert_eq!(common::in_progress_until(store.claim("k", b"r").unwrap()), Some(second.lease_expires_at()));
    let Some(Entry::InFlight { claimed_at, lease_expires_at, orphaned, .. }) = store.get("k").unwrap() else {
        panic!("taken-over key is in flight")
    };
    assert_eq!(claimed_at, at(START_MS + 10_000));
    assert_eq!(lease_expires_at, second.lease_expires_at());
    assert!(!orphaned);
}

#[test]
fn old_token_is_stale_for_complete_release_and_checkpoint_after_takeover() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let old = acquired(store.claim_with("k", b"r", with_lease(LEASE)).unwrap());
    clock.advance(LEASE);
    let new = acquired(store.claim_with("k", b"r", with_lease(LEASE)).unwrap());

    let seq = store.stats().last_seq;
    assert!(matches!(store.complete(&old, b"old outcome"), Err(Error::StaleToken)));
    assert!(matches!(store.release(&old), Err(Error::StaleToken)));
    assert!(matches!(store.checkpoint(&old, b"old phase"), Err(Error::StaleToken)));
    assert_eq!(store.stats().last_seq, seq, "stale calls write nothing");
    assert_eq!(store.stats().stale_tokens_total, 3);

    store.complete(&new, b"new outcome").unwrap();
    let Claim::Completed(done) = store.claim("k", b"r").unwrap() else { panic!("expected Completed") };
    assert_eq!(done.outcome, b"new outcome");
    // Still stale after the key completed (and after a reopen).
    assert!(matches!(store.complete(&old, b"old outcome"), Err(Error::StaleToken)));
    drop(store);
    let store = open(dir.path(), &clock);
    assert!(matches!(store.complete(&old, b"old outcome"), Err(Error::StaleToken)));
    assert!(matches!(store.release(&new), Err(Error::StaleToken)), "a completed holding is over");
    let Some(Entry::Completed(done)) = store.get("k").unwrap() else { panic!("expected Completed") };
    assert_eq!(done.outcome, b"new outcome");
}

#[test]
fn chain_of_takeovers_fences_every_earlier_holder() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let mut holders = vec![acquired(store.claim_with("k", b"r", with_lease(LEASE)).unwrap())];
    for round in 1..5 {
        clock.advance(LEASE);
        let next = acquired(store.claim_with("k", b"r", with_lease(LEASE)).unwrap());
        assert!(next.recovered());
        assert!(next.id() > holders.last().unwrap().id(), "round {round}");
        holders.push(next);
        for stale in &holders[..holders.len() - 1] {
            assert!(matches!(store.checkpoint(stale, b"x"), Err(Error::StaleToken)), "round {round}");
        }
    }
    store.complete(holders.last().unwrap(), b"done").unwrap();
    assert_eq!(store.stats().lease_takeovers_total, 4);
}

#[test]
fn late_complete_is_allowed_while_nobody_took_over() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let token = acquired(store.claim_with("k", b"r", with_lease(LEASE)).unwrap());
    clock.advance(LEASE * 3);
    store.complete(&token, b"late but first").unwrap();
    let Claim::Completed(done) = store.claim("k", b"r").unwrap() else {
        panic!("a late complete with nobody taking over must count")
    };
    assert_eq!(done.outcome, b"late but first");
    assert_eq!(done.completed_at, at(START_MS + 30_000));
}

#[test]
fn late_release_and_checkpoint_are_allowed_while_nobody_took_over() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let token = acquired(store.claim_with("k", b"r", with_lease(LEASE)).unwrap());
    clock.advance(LEASE * 2);
    store.checkpoint(&token, b"resumed").unwrap();
    // The late checkpoint renewed the lease from now: the key is held again.
    assert_eq!(common::in_progress_until(store.claim("k", b"r").unwrap()), Some(at(START_MS + 30_000)));
    clock.advance(LEASE * 2);
    store.release(&token).unwrap();
    assert_eq!(store.get("k").unwrap(), None);
}

#[test]
fn checkpoint_renews_the_lease_by_the_claims_lease_length() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let token = acquired(store.claim_with("k", b"r", with_lease(LEASE)).unwrap());

    clock.advance(Duration::from_secs(8));
    store.checkpoint(&token, b"step 1").unwrap();
    clock.advance(Duration::from_secs(8)); // 16 s after the claim: past the first lease
    assert_eq!(
        common::in_progress_until(store.claim("k", b"r").unwrap()),
        Some(at(START_MS + 18_000)),
        "the checkpoint at 8 s holds the key until 18 s"
    );

    store.checkpoint(&token, b"step 2").unwrap(); // at 16 s: until 26 s
    clock.advance(Duration::from_millis(9_999));
    assert!(matches!(store.claim("k", b"r").unwrap(), Claim::InProgress { .. }));
    clock.advance(Duration::from_millis(1));
    let taker = acquired(store.claim("k", b"r").unwrap());
    assert!(taker.recovered());
    assert_eq!(taker.checkpoint(), Some(&b"step 2"[..]), "the taker resumes from the last checkpoint");
    assert!(matches!(store.checkpoint(&token, b"step 3"), Err(Error::StaleToken)));
}

#[test]
fn takeover_keeps_the_original_request_check_and_window() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let opts = ClaimOptions { ttl: Some(Duration::from_secs(3600)), lease: Some(LEASE), wait: None };
    let _held = acquired(store.claim_with("k", b"r", opts).unwrap());
    clock.advance(LEASE);
    // A takeover asking for a shorter window never shortens the original one.
    let short = ClaimOptions { ttl: Some(Duration::from_secs(60)), lease: Some(LEASE), wait: None };
    let taker = acquired(store.claim_with("k", b"r", short).unwrap());
    let Some(Entry::InFlight { expires_at, .. }) = store.get("k").unwrap() else { panic!("in flight") };
    assert_eq!(expires_at, at(START_MS + 3_600_000));
    store.complete(&taker, b"ok").unwrap();
    assert_eq!(store.claim("k", b"another request").unwrap(), Claim::Mismatch);
}
