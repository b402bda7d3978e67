//! Promise: orphans (README, Guarantees: "Orphans").
//!
//! An in-flight claim whose holder died with its process (the store was dropped without a
//! complete or release) is an orphan after a reopen: `orphans()` lists it with its key, claim
//! time and last checkpoint; by default the next claim takes it over at once with a
//! `recovered()` token carrying that checkpoint, and with `OrphanPolicy::WaitForLease` the next
//! claim is `InProgress` until the dead holder's lease ends.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use idemstore::{Claim, ClaimOptions, Entry, ManualClock, Options, Orphan, OrphanPolicy, Store};

mod common;
use common::{START_MS, acquired, at};

fn options(clock: &Arc<ManualClock>, orphans: OrphanPolicy) -> Options {
    Options { orphans, ..common::options(clock) }
}

fn open(dir: &Path, clock: &Arc<ManualClock>) -> Store {
    Store::open(dir, options(clock, OrphanPolicy::TakeOver)).expect("open store")
}

/// One process's life: `orphan-a` claimed with a checkpoint, `orphan-b` claimed bare, `done`
/// completed and `freed` released; then the process "dies" (the store is dropped).
fn leave_orphans(dir: &Path, clock: &Arc<ManualClock>) {
    let store = open(dir, clock);
    let lease = ClaimOptions { lease: Some(Duration::from_secs(60)), ..Default::default() };
    let a = acquired(store.claim_with("orphan-a", b"req-a", lease).unwrap());
    clock.advance(Duration::from_secs(1));
    store.checkpoint(&a, b"charged card").unwrap();
    let _held = acquired(store.claim("orphan-b", b"req-b").unwrap());
    let done = acquired(store.claim("done", b"req").unwrap());
    store.complete(&done, b"outcome").unwrap();
    let freed = acquired(store.claim("freed", b"req").unwrap());
    store.release(&freed).unwrap();
    assert_eq!(store.orphans().unwrap(), vec![], "claims of the live process are not orphans");
    drop(store);
}

#[test]
fn reopen_lists_in_flight_claims_of_the_dead_process() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    leave_orphans(dir.path(), &clock);
    clock.advance(Duration::from_secs(2));
    let store = open(dir.path(), &clock);
    assert_eq!(
        store.orphans().unwrap(),
        vec![
            Orphan {
                key: b"orphan-a".to_vec(),
                claimed_at: at(START_MS),
                lease_expires_at: at(START_MS + 1_000 + 60_000),
                checkpoint: Some(b"charged card".to_vec()),
            },
            Orphan {
                key: b"orphan-b".to_vec(),
                claimed_at: at(START_MS + 1_000),
                lease_expires_at: at(START_MS + 1_000 + 30_000),
                checkpoint: None,
            },
        ]
    );
    assert!(matches!(store.get("orphan-a").unwrap(), Some(Entry::InFlight { orphaned: true, .. })));
    assert!(matches!(store.get("done").unwrap(), Some(Entry::Completed(_))));
    assert_eq!(store.get("freed").unwrap(), None);
}

#[test]
fn next_claim_takes_an_orphan_over_at_once_with_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    leave_orphans(dir.path(), &clock);
    let store = open(dir.path(), &clock); // the clock has not moved: both leases still run

    let token = acquired(store.claim("orphan-a", b"req-a").unwrap());
    assert!(token.recovered());
    assert_eq!(token.checkpoint(), Some(&b"charged card"[..]));
    let bare = acquired(store.claim("orphan-b", b"req-b").unwrap());
    assert!(bare.recovered());
    assert_eq!(bare.checkpoint(), None);
    assert_eq!(store.stats().orphan_takeovers_total, 2);
    assert_eq!(store.stats().lease_takeovers_total, 0);

    // Taken over: no longer orphans, and held by this process like any claim.
    assert_eq!(store.orphans().unwrap(), vec![]);
    assert!(matches!(store.claim("orphan-a", b"req-a").unwrap(), Claim::InProgress { .. }));
    assert!(matches!(store.get("orphan-a").unwrap(), Some(Entry::InFlight { orphaned: false, .. })));
    store.complete(&token, b"finished by the successor").unwrap();
    let Claim::Completed(done) = store.claim("orphan-a", b"req-a").unwrap() else { panic!("expected Completed") };
    assert_eq!(done.outcome, b"finished by the successor");
}

#[test]
fn orphan_of_an_orphan_is_listed_again_after_the_next_crash() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    leave_orphans(dir.path(), &clock);
    clock.advance(Duration::from_secs(5));
    {
        let store = open(dir.path(), &clock);
        let token = acquired(store.claim("orphan-a", b"req-a").unwrap());
        store.checkpoint(&token, b"refunded").unwrap();
        drop(store); // the successor dies too
    }
    let store = open(dir.path(), &clock);
    let orphans = store.orphans().unwrap();
    let a = orphans.iter().find(|o| o.key == b"orphan-a").expect("orphan-a is an orphan again");
    assert_eq!(a.claimed_at, at(START_MS + 1_000 + 5_000), "the successor's claim time");
    assert_eq!(a.checkpoint.as_deref(), Some(&b"refunded"[..]));
    assert_eq!(orphans.len(), 2, "orphan-b stays an orphan too");
    let token = acquired(store.claim("orphan-a", b"req-a").unwrap());
    assert!(token.recovered());
    assert_eq!(token.checkpoint(), Some(&b"refunded"[..]));
}

#[test]
fn wait_for_lease_policy_keeps_an_orphan_in_progress_until_its_lease_ends() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    leave_orphans(dir.path(), &clock);
    let store = Store::open(dir.path(), options(&clock, OrphanPolicy::WaitForLease)).unwrap();
    assert_eq!(store.orphans().unwrap().len(), 2, "still listed under either policy");

    let lease_end = at(START_MS + 61_000);
    assert_eq!(common::in_progress_until(store.claim("orphan-a", b"req-a").unwrap()), Some(lease_end));
    clock.set_ms(START_MS + 61_000 - 1);
    assert_eq!(common::in_progress_until(store.claim("orphan-a", b"req-a").unwrap()), Some(lease_end));
    clock.advance(Duration::from_millis(1));
    let token = acquired(store.claim("orphan-a", b"req-a").unwrap());
    assert!(token.recovered());
    assert_eq!(token.checkpoint(), Some(&b"charged card"[..]));
    assert_eq!(store.orphans().unwrap().len(), 1);
}

#[test]
fn expired_orphans_are_neither_listed_nor_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    {
        let store = open(dir.path(), &clock);
        let short = ClaimOptions { ttl: Some(Duration::from_secs(60)), ..Default::default() };
        let token = acquired(store.claim_with("short-lived", b"r", short).unwrap());
        store.checkpoint(&token, b"half way").unwrap();
        drop(store);
    }
    clock.advance(Duration::from_secs(60));
    let store = open(dir.path(), &clock);
    assert_eq!(store.orphans().unwrap(), vec![]);
    let token = acquired(store.claim("short-lived", b"r").unwrap());
    assert!(!token.recovered(), "an expired claim is absent, not an orphan");
    assert_eq!(token.checkpoint(), None);
}

#[test]
fn orphans_survive_a_clean_close_and_several_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    {
        let store = open(dir.path(), &clock);
        let token = acquired(store.claim("k", b"r").unwrap());
        store.checkpoint(&token, b"p").unwrap();
        store.close().unwrap(); // a clean close without finishing leaves an orphan too
    }
    for _ in 0..3 {
        let store = open(dir.path(), &clock);
        let orphans = store.orphans().unwrap();
        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans[0].key, b"k");
        assert_eq!(orphans[0].checkpoint.as_deref(), Some(&b"p"[..]));
        store.close().unwrap();
    }
}
