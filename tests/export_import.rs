//! Promise: a window carried from one store to another (`Store::export_entries`, then
//! `Store::import_entry`) keeps every stored outcome and every in-flight claim: a retry after
//! the move is replayed the original outcome, a different request is still a `Mismatch`, and
//! an in-flight claim is taken over with its last checkpoint (its holder lived in the other
//! store), as after a crash. Nothing expired, released or removed travels.

use std::sync::Arc;
use std::time::Duration;

use idemstore::{Claim, ClaimOptions, Entry, ExportedEntry, ManualClock, Options, OrphanPolicy, Store, request_hash};

mod common;
use common::{START_MS, acquired, at};

/// A source store with one key in each state; returns its export.
fn source_export(clock: &Arc<ManualClock>) -> Vec<ExportedEntry> {
    let dir = tempfile::tempdir().unwrap();
    let store = common::open(dir.path(), clock);
    let done = acquired(store.claim("done", b"charge 10").unwrap());
    store.complete(&done, b"201 charged").unwrap();
    let held = acquired(
        store
            .claim_with(
                "held",
                b"charge 20",
                ClaimOptions { lease: Some(Duration::from_secs(60)), ..Default::default() },
            )
            .unwrap(),
    );
    clock.advance(Duration::from_secs(1));
    store.checkpoint(&held, b"card charged").unwrap();
    let freed = acquired(store.claim("freed", b"r").unwrap());
    store.release(&freed).unwrap();
    let removed = acquired(store.claim("removed", b"r").unwrap());
    store.complete(&removed, b"x").unwrap();
    store.remove("removed").unwrap();
    let short = acquired(
        store
            .claim_with("short", b"r", ClaimOptions { ttl: Some(Duration::from_secs(5)), ..Default::default() })
            .unwrap(),
    );
    store.complete(&short, b"gone soon").unwrap();
    let exported = store.export_entries().unwrap();
    drop(held); // its holder "dies" with the source store
    exported
}

#[test]
fn an_export_holds_each_live_key_with_its_request_hash_in_key_order() {
    let clock = ManualClock::new(START_MS);
    let exported = source_export(&clock);
    let keys: Vec<&[u8]> = exported.iter().map(|e| e.key.as_slice()).collect();
    assert_eq!(keys, vec![&b"done"[..], b"held", b"short"]);
    assert_eq!(exported[0].request_hash, request_hash(b"charge 10"));
    assert_eq!(exported[1].request_hash, request_hash(b"charge 20"));
    let Entry::InFlight { checkpoint, lease_expires_at, .. } = &exported[1].entry else { panic!("{:?}", exported[1]) };
    assert_eq!(checkpoint.as_deref(), Some(&b"card charged"[..]));
    assert_eq!(*lease_expires_at, at(START_MS + 1_000 + 60_000), "the checkpoint renewed the lease");
}

#[test]
fn an_imported_window_replays_outcomes_refuses_mismatches_and_resumes_claims_after_a_reopen() {
    let clock = ManualClock::new(START_MS);
    let exported = source_export(&clock);
    clock.advance(Duration::from_secs(10)); // `short` expires on the way
    let dir = tempfile::tempdir().unwrap();
    let target = common::open(dir.path(), &clock);
    let written: Vec<bool> = exported.iter().map(|e| target.import_entry(e).unwrap()).collect();
    assert_eq!(written, vec![true, true, false], "the expired entry is not written");
    drop(target);
    let target = common::open(dir.path(), &clock);

    let Claim::Completed(done) = target.claim("done", b"charge 10").unwrap() else { panic!("no replay") };
    assert_eq!(done.outcome, b"201 charged");
    assert_eq!(done.claimed_at, at(START_MS));
    assert_eq!(target.claim("done", b"charge 11").unwrap(), Claim::Mismatch);
    assert_eq!(target.claim("held", b"charge 21").unwrap(), Claim::Mismatch);

    let token = acquired(target.claim("held", b"charge 20").unwrap());
    assert!(token.recovered(), "an imported claim is an orphan: taken over");
    assert_eq!(token.checkpoint(), Some(&b"card charged"[..]));
    target.complete(&token, b"201 charged 20").unwrap();
    assert!(target.get("freed").unwrap().is_none());
    assert!(target.get("removed").unwrap().is_none());
}

#[test]
fn an_imported_claim_waits_for_its_lease_when_orphans_wait() {
    let clock = ManualClock::new(START_MS);
    let exported = source_export(&clock);
    let dir = tempfile::tempdir().unwrap();
    let target =
        Store::open(dir.path(), Options { orphans: OrphanPolicy::WaitForLease, ..common::options(&clock) }).unwrap();
    for e in &exported {
        target.import_entry(e).unwrap();
    }
    assert_eq!(common::in_progress_until(target.claim("held", b"charge 20").unwrap()), Some(at(START_MS + 61_000)));
    clock.advance(Duration::from_secs(61));
    assert!(acquired(target.claim("held", b"charge 20").unwrap()).recovered());
}

#[test]
fn an_import_never_overwrites_a_live_key_and_refuses_what_it_cannot_store() {
    let clock = ManualClock::new(START_MS);
    let exported = source_export(&clock);
    let dir = tempfile::tempdir().unwrap();
    let target = common::open(dir.path(), &clock);
    let mine = acquired(target.claim("done", b"another request").unwrap());
    assert!(!target.import_entry(&exported[0]).unwrap(), "a live key is kept");
    target.complete(&mine, b"mine").unwrap();
    assert_eq!(common::outcome_of(&target, "done"), Some(b"mine".to_vec()));

    let mut far = exported[0].clone();
    far.key = b"far".to_vec();
    if let Entry::Completed(done) = &mut far.entry {
        done.expires_at = at(START_MS) + Duration::from_secs(20 * 365 * 24 * 3600);
    }
    assert!(matches!(target.import_entry(&far), Err(idemstore::Error::InvalidArgument(_))));
    let mut empty = exported[0].clone();
    empty.key.clear();
    assert!(matches!(target.import_entry(&empty), Err(idemstore::Error::EmptyKey)));
    assert!(target.get("far").unwrap().is_none());
}
