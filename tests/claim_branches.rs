//! Promise: every branch of `Store::claim` answers as the README's "Use" and "Guarantees" say.
//!
//! `Acquired` for a free key, `InProgress` (with the holder's lease end) while it is held,
//! `Completed` with the stored outcome and times replayed byte for byte, and `Mismatch` on every
//! branch when the request differs (in flight, completed, after a lease takeover, for an orphan
//! after a reopen). `release` frees the key, `remove` tombstones it (absent keys are fine) and
//! makes the holder's token stale, and `get` reports each state.

use std::time::Duration;

use idemstore::{Claim, ClaimOptions, Entry, Error, ManualClock};

mod common;
use common::{START_MS, acquired, at, open};

#[test]
fn first_claim_of_a_key_is_acquired_with_a_fresh_token() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);

    let token = acquired(store.claim("order-1", b"request").unwrap());
    assert_eq!(token.key(), b"order-1");
    assert!(!token.recovered(), "a first claim takes nothing over");
    assert_eq!(token.checkpoint(), None);
    assert_eq!(token.lease_expires_at(), at(START_MS + 30_000), "default lease is 30 s");

    let custom = acquired(
        store
            .claim_with(
                "order-2",
                b"request",
                ClaimOptions { lease: Some(Duration::from_secs(5)), ..Default::default() },
            )
            .unwrap(),
    );
    assert_eq!(custom.lease_expires_at(), at(START_MS + 5_000));
    assert_ne!(custom.id(), token.id(), "two holdings never share a fencing number");
}

#[test]
fn repeat_while_in_flight_is_in_progress_with_the_holders_lease_end() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);

    let token = acquired(
        store
            .claim_with("k", b"req", ClaimOptions { lease: Some(Duration::from_secs(10)), ..Default::default() })
            .unwrap(),
    );
    clock.advance(Duration::from_millis(9_999));
    for _ in 0..3 {
        assert_eq!(
            common::in_progress_until(store.claim("k", b"req").unwrap()),
            Some(token.lease_expires_at()),
            "a repeat inside the lease must not take the key"
        );
    }
    assert_eq!(token.lease_expires_at(), at(START_MS + 10_000));
    assert_eq!(store.stats().duplicates_in_progress_total, 3);
}

#[test]
fn repeat_after_complete_replays_outcome_and_times_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let outcome: Vec<u8> = (0..=255u8).chain([0, 0, 0xff, b'\n']).collect();
    {
        let store = open(dir.path(), &clock);
        let token = acquired(store.claim("pay-7", b"POST /pay 7").unwrap());
        clock.advance(Duration::from_millis(1_234));
        store.complete(&token, &outcome).unwrap();
        clock.advance(Duration::from_secs(60));

        let expected = idemstore::Completed {
            outcome: outcome.clone(),
            completed_at: at(START_MS + 1_234),
            claimed_at: at(START_MS),
            expires_at: at(START_MS + 24 * 3600 * 1000),
        };
        for _ in 0..3 {
            assert_eq!(store.claim("pay-7", b"POST /pay 7").unwrap(), Claim::Completed(expected.clone()));
        }
        assert_eq!(store.get("pay-7").unwrap(), Some(Entry::Completed(expected)));
        assert_eq!(store.stats().duplicates_replayed_total, 3);
        store.close().unwrap();
    }
    // The same replay after a reopen.
    let store = open(dir.path(), &clock);
    let Claim::Completed(done) = store.claim("pay-7", b"POST /pay 7").unwrap() else {
        panic!("completed key must replay after reopen")
    };
    assert_eq!(done.outcome, outcome);
    assert_eq!(done.completed_at, at(START_MS + 1_234));
    assert_eq!(done.claimed_at, at(START_MS));
}

#[test]
fn empty_outcome_is_replayed_as_empty() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let token = acquired(store.claim("k", b"r").unwrap());
    store.complete(&token, b"").unwrap();
    let Claim::Completed(done) = store.claim("k", b"r").unwrap() else { panic!("expected Completed") };
    assert!(done.outcome.is_empty());
}

#[test]
fn different_request_while_in_flight_is_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let token = acquired(store.claim("k", b"request A").unwrap());
    assert_eq!(store.claim("k", b"request B").unwrap(), Claim::Mismatch);
    assert_eq!(store.claim("k", b"").unwrap(), Claim::Mismatch);
    // The holder is untouched by the mismatching repeats.
    store.complete(&token, b"done").unwrap();
    assert_eq!(store.stats().mismatches_total, 2);
}

#[test]
fn different_request_after_complete_is_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let token = acquired(store.claim("k", b"request A").unwrap());
    store.complete(&token, b"outcome A").unwrap();
    assert_eq!(store.claim("k", b"request B").unwrap(), Claim::Mismatch);
    // ...and still Mismatch with a wait, which must not block on a completed key.
    assert_eq!(
        store
            .claim_with("k", b"request B", ClaimOptions { wait: Some(Duration::from_secs(60)), ..Default::default() })
            .unwrap(),
        Claim::Mismatch
    );
    let Claim::Completed(done) = store.claim("k", b"request A").unwrap() else { panic!("expected Completed") };
    assert_eq!(done.outcome, b"outcome A");
}

#[test]
fn different_request_after_lease_ended_is_mismatch_not_a_takeover() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let lease = ClaimOptions { lease: Some(Duration::from_secs(10)), ..Default::default() };
    let first = acquired(store.claim_with("k", b"request A", lease.clone()).unwrap());
    clock.advance(Duration::from_secs(11));
    assert_eq!(store.claim_with("k", b"request B", lease.clone()).unwrap(), Claim::Mismatch);
    // The mismatching claim took nothing over: the original holder still holds the key.
    store.checkpoint(&first, b"still mine").unwrap();
    assert_eq!(store.stats().lease_takeovers_total, 0);
}

#[test]
fn different_request_after_a_lease_takeover_is_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let lease = ClaimOptions { lease: Some(Duration::from_secs(10)), ..Default::default() };
    let _held = acquired(store.claim_with("k", b"request A", lease.clone()).unwrap());
    clock.advance(Duration::from_secs(10));
    let second = acquired(store.claim_with("k", b"request A", lease.clone()).unwrap());
    assert!(second.recovered());
    assert_eq!(store.claim("k", b"request B").unwrap(), Claim::Mismatch, "in flight after takeover");
    clock.advance(Duration::from_secs(10));
    assert_eq!(store.claim("k", b"request B").unwrap(), Claim::Mismatch, "lease of the taker ended too");
    let third = acquired(store.claim_with("k", b"request A", lease).unwrap());
    store.complete(&third, b"ok").unwrap();
    assert_eq!(store.claim("k", b"request B").unwrap(), Claim::Mismatch, "completed after takeover");
}

#[test]
fn different_request_for_an_orphan_after_reopen_is_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    {
        let store = open(dir.path(), &clock);
        let _held = acquired(store.claim("k", b"request A").unwrap());
        drop(store); // the holder dies without completing
    }
    let store = open(dir.path(), &clock);
    assert_eq!(store.orphans().unwrap().len(), 1);
    assert_eq!(store.claim("k", b"request B").unwrap(), Claim::Mismatch);
    // The mismatch did not consume the orphan: the right request takes it over.
    assert_eq!(store.orphans().unwrap().len(), 1);
    let token = acquired(store.claim("k", b"request A").unwrap());
    assert!(token.recovered());
    assert_eq!(store.stats().orphan_takeovers_total, 1);
}

#[test]
fn release_makes_the_key_free_again() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let token = acquired(store.claim("k", b"request A").unwrap());
    store.checkpoint(&token, b"phase 1").unwrap();
    store.release(&token).unwrap();
    assert_eq!(store.get("k").unwrap(), None);

    let again = acquired(store.claim("k", b"request A").unwrap());
    assert!(!again.recovered(), "a released key is free, not taken over");
    assert_eq!(again.checkpoint(), None, "release forgets the checkpoint");
    assert!(again.id() > token.id());
    assert!(matches!(store.complete(&token, b"late"), Err(Error::StaleToken)));
    store.release(&again).unwrap();
    // Once free, any request may claim it.
    let _held = acquired(store.claim("k", b"request B").unwrap());
    assert_eq!(store.stats().releases_total, 2);
}

#[test]
fn remove_of_an_absent_key_is_ok_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let seq = store.stats().last_seq;
    store.remove("never-claimed").unwrap();
    store.remove("never-claimed").unwrap();
    assert_eq!(store.stats().last_seq, seq);
    assert_eq!(store.get("never-claimed").unwrap(), None);
}

#[test]
fn removed_completed_key_is_absent_and_claimable() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let token = acquired(store.claim("k", b"request A").unwrap());
    store.complete(&token, b"out").unwrap();
    store.remove("k").unwrap();
    assert_eq!(store.get("k").unwrap(), None);
    store.remove("k").unwrap(); // removing again is fine
    let fresh = acquired(store.claim("k", b"request B").unwrap());
    assert!(!fresh.recovered());
    drop(store);
    let store = open(dir.path(), &clock);
    assert!(matches!(store.get("k").unwrap(), Some(Entry::InFlight { .. })), "the new claim survives reopen");
}

#[test]
fn remove_of_an_in_flight_key_makes_the_holder_token_stale() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    let token = acquired(store.claim("k", b"request").unwrap());
    store.remove("k").unwrap();
    assert_eq!(store.get("k").unwrap(), None);
    assert!(matches!(store.complete(&token, b"out"), Err(Error::StaleToken)));
    assert!(matches!(store.checkpoint(&token, b"p"), Err(Error::StaleToken)));
    assert!(matches!(store.release(&token), Err(Error::StaleToken)));
    assert_eq!(store.get("k").unwrap(), None, "a stale complete must not resurrect the key");
    drop(store);
    let store = open(dir.path(), &clock);
    assert_eq!(store.get("k").unwrap(), None, "the tombstone survives reopen");
}

#[test]
fn get_reports_each_state() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = open(dir.path(), &clock);
    assert_eq!(store.get("k").unwrap(), None, "absent");

    let opts = ClaimOptions { ttl: Some(Duration::from_secs(3600)), lease: Some(Duration::from_secs(20)), wait: None };
    let token = acquired(store.claim_with("k", b"r", opts).unwrap());
    assert_eq!(
        store.get("k").unwrap(),
        Some(Entry::InFlight {
            claimed_at: at(START_MS),
            lease_expires_at: at(START_MS + 20_000),
            expires_at: at(START_MS + 3_600_000),
            checkpoint: None,
            orphaned: false,
        }),
        "in flight"
    );

    clock.advance(Duration::from_secs(5));
    store.checkpoint(&token, b"step 2").unwrap();
    assert_eq!(
        store.get("k").unwrap(),
        Some(Entry::InFlight {
            claimed_at: at(START_MS),
            lease_expires_at: at(START_MS + 25_000),
            expires_at: at(START_MS + 3_600_000),
            checkpoint: Some(b"step 2".to_vec()),
            orphaned: false,
        }),
        "in flight with a checkpoint (which renewed the lease)"
    );

    clock.advance(Duration::from_secs(5));
    store.complete(&token, b"the outcome").unwrap();
    assert_eq!(
        store.get("k").unwrap(),
        Some(Entry::Completed(idemstore::Completed {
            outcome: b"the outcome".to_vec(),
            completed_at: at(START_MS + 10_000),
            claimed_at: at(START_MS),
            expires_at: at(START_MS + 3_600_000),
        })),
        "completed"
    );

    store.remove("k").unwrap();
    assert_eq!(store.get("k").unwrap(), None, "removed");

    let token = acquired(store.claim("k", b"r").unwrap());
    store.release(&token).unwrap();
    assert_eq!(store.get("k").unwrap(), None, "released");
}

#[test]
fn get_marks_an_in_flight_claim_of_an_earlier_process_as_orphaned() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    drop(acquired(open(dir.path(), &clock).claim("k", b"r").unwrap()));
    let store = open(dir.path(), &clock);
    let Some(Entry::InFlight { orphaned, claimed_at, .. }) = store.get("k").unwrap() else {
        panic!("expected the claim to survive reopen in flight")
    };
    assert!(orphaned);
    assert_eq!(claimed_at, at(START_MS));
}

/// A replay reads its record into a stack buffer up to a size and into a heap buffer past it;
/// outcomes on both sides of that edge (and empty, and large) come back byte for byte, from
/// the live store and after a reopen, through `claim`, `claim_many` and `get`.
#[test]
fn outcomes_of_every_size_replay_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    // Record = 96-byte header + 1-byte key + outcome: 640 bytes at 543, the stack buffer's size.
    let sizes = [0usize, 1, 542, 543, 544, 545, 1_000, 5_000, 100_000];
    let outcome = |len: usize| (0..len).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>();
    let key = |i: usize| format!("{}", (b'a' + i as u8) as char);
    let check = |store: &idemstore::Store| {
        for (i, &len) in sizes.iter().enumerate() {
            match store.claim(key(i), b"request").unwrap() {
                Claim::Completed(done) => assert_eq!(done.outcome, outcome(len), "claim, outcome of {len} bytes"),
                other => panic!("outcome of {len} bytes: {other:?}"),
            }
            match store.get(key(i)).unwrap() {
                Some(Entry::Completed(done)) => assert_eq!(done.outcome, outcome(len), "get, outcome of {len} bytes"),
                other => panic!("get, outcome of {len} bytes: {other:?}"),
            }
        }
        let batch: Vec<(String, &[u8])> = (0..sizes.len()).map(|i| (key(i), &b"request"[..])).collect();
        for (answer, &len) in store.claim_many(&batch, ClaimOptions::default()).into_iter().zip(&sizes) {
            match answer.unwrap() {
                Claim::Completed(done) => assert_eq!(done.outcome, outcome(len), "claim_many, outcome of {len} bytes"),
                other => panic!("claim_many, outcome of {len} bytes: {other:?}"),
            }
        }
    };
    let store = open(dir.path(), &clock);
    for (i, &len) in sizes.iter().enumerate() {
        let token = acquired(store.claim(key(i), b"request").unwrap());
        store.complete(&token, outcome(len)).unwrap();
    }
    check(&store);
    drop(store);
    check(&open(dir.path(), &clock));
}
