//! Promise: a token is proof of one holding in one store. Another store refuses it (its ids
//! are numbers another store may hand out too), a checkpoint through it moves its lease on,
//! and a checkpoint never erases the last recovery point.

use std::time::Duration;

use idemstore::{ClaimOptions, Entry, Error, ManualClock};

mod common;
use common::{START_MS, acquired};

#[test]
fn a_store_refuses_a_token_handed_out_by_another_store() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // One clock for both: opened in the same millisecond, they hand out the same ids.
    let clock = ManualClock::new(START_MS);
    let a = common::open(dir_a.path(), &clock);
    let b = common::open(dir_b.path(), &clock);
    let token_a = common::acquire(&a, "payout");
    let token_b = common::acquire(&b, "payout");
    assert_eq!(token_a.id(), token_b.id(), "the premise: both stores handed out the same id");
    assert_ne!(token_a, token_b, "tokens of two stores compare equal");

    for answer in [b.complete(&token_a, "a's outcome"), b.checkpoint(&token_a, "phase"), b.release(&token_a)] {
        assert!(matches!(answer, Err(Error::ForeignToken)), "store B took store A's token: {answer:?}");
    }
    let batch = b.complete_many(&[(&token_a, "a's outcome")]);
    assert!(matches!(batch[0], Err(Error::ForeignToken)), "{:?}", batch[0]);
    b.complete(&token_b, "b's outcome").expect("B's own holder still holds its key");
    a.complete(&token_a, "a's outcome").expect("A's token still holds A's key");
    assert_eq!(common::outcome_of(&b, "payout").as_deref(), Some(&b"b's outcome"[..]));
}

#[test]
fn a_token_still_holds_its_key_after_the_same_store_is_reopened() {
    // The reopen after a `Poisoned` store: a handler holding a token completes through the
    // new open of the same directory.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = common::open(dir.path(), &clock);
    let token = common::acquire(&store, "key");
    drop(store);
    let store = common::open(dir.path(), &clock);
    store.complete(&token, "outcome").expect("a token of an earlier open of this directory");
    assert_eq!(common::outcome_of(&store, "key").as_deref(), Some(&b"outcome"[..]));
}

#[test]
fn a_checkpoint_moves_the_token_lease_on() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = common::open(dir.path(), &clock);
    let lease = Duration::from_secs(30);
    let token = acquired(
        store.claim_with("key", "request", ClaimOptions { lease: Some(lease), ..Default::default() }).unwrap(),
    );
    assert_eq!(token.lease_expires_at(), common::at(START_MS + 30_000));
    clock.advance(Duration::from_secs(20));
    store.checkpoint(&token, "charged").unwrap();
    assert_eq!(token.lease_expires_at(), common::at(START_MS + 50_000), "the token kept the lease of its claim");
    match store.get("key").unwrap() {
        Some(Entry::InFlight { lease_expires_at, .. }) => assert_eq!(lease_expires_at, token.lease_expires_at()),
        other => panic!("expected the key in flight, got {other:?}"),
    }
}

#[test]
fn an_empty_checkpoint_is_refused_and_keeps_the_last_recovery_point() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = common::open(dir.path(), &clock);
    let token = common::acquire(&store, "key");
    store.checkpoint(&token, "charged").unwrap();
    assert!(matches!(store.checkpoint(&token, ""), Err(Error::InvalidArgument(_))));
    match store.get("key").unwrap() {
        Some(Entry::InFlight { checkpoint, .. }) => assert_eq!(checkpoint.as_deref(), Some(&b"charged"[..])),
        other => panic!("expected the key in flight, got {other:?}"),
    }
}

#[test]
fn a_token_holds_its_key_through_any_spelling_of_the_store_directory() {
    let base = tempfile::tempdir().unwrap();
    let real = base.path().join("data");
    std::fs::create_dir(&real).unwrap();
    let link = base.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let clock = ManualClock::new(START_MS);
    let spellings = [base.path().join("data/"), base.path().join("data").join("..").join("data"), link];
    for (i, spelling) in spellings.iter().enumerate() {
        let key = format!("key-{i}");
        let store = common::open(&real, &clock);
        let token = common::acquire(&store, &key);
        drop(store);
        let store = common::open(spelling, &clock);
        store
            .complete(&token, "outcome")
            .unwrap_or_else(|e| panic!("{}: the store refused its own token: {e}", spelling.display()));
    }
}
