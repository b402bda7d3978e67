//! Promise: streaming scans and namespaces (README, "Use").
//!
//! `scan(prefix)` yields every live key with the prefix exactly once, with the entry `get`
//! gives, from RAM and from sealed tables alike, in the same order every time, on a live store
//! and on a read-only view. A namespace's keys never meet another namespace's (or plain keys
//! of other bytes); each namespace has its own default TTL and lease, and its own counters.

use std::collections::BTreeMap;
use std::time::Duration;

use idemstore::sim::SimDisk;
use idemstore::{Claim, ClaimOptions, Entry, ManualClock, Store, namespaced_key, split_namespaced_key};

mod common;
use common::{START_MS, acquired, at};

fn scan_all(store: &Store, prefix: &str) -> Vec<(Vec<u8>, Entry)> {
    store.scan(prefix).collect::<idemstore::Result<Vec<_>>>().unwrap()
}

#[test]
fn a_scan_yields_each_live_key_once_from_ram_and_sealed_tables_in_a_stable_order() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open("/scan", common::sealing_sim_options(&disk, &clock)).unwrap();
    for i in 0..3000 {
        let key = format!("{}-{i:05}", if i % 3 == 0 { "order" } else { "user" });
        let token = acquired(store.claim(&key, b"req").unwrap());
        if i % 10 != 0 {
            store.complete(&token, format!("out {i}")).unwrap();
        }
        if i == 1500 {
            // Seal the first half: its keys are then found through sealed tables.
            clock.advance(Duration::from_secs(10));
            store.maintain().unwrap();
        }
    }
    // Rewritten after sealing: the newer record is in RAM, the older one in a table.
    store.remove("order-00003").unwrap();
    let t = acquired(store.claim("order-00003", b"req").unwrap());
    store.complete(&t, b"rewritten").unwrap();
    for i in (1..3000).step_by(7) {
        store.remove(format!("{}-{i:05}", if i % 3 == 0 { "order" } else { "user" })).unwrap();
    }
    assert!(store.stats().sealed_tables > 0, "some keys live in sealed tables");

    let keys = store.keys().unwrap();
    let scanned = scan_all(&store, "");
    let as_map = |list: &[(Vec<u8>, Entry)]| list.iter().cloned().collect::<BTreeMap<_, _>>();
    assert_eq!(scanned.len(), keys.len(), "each key exactly once");
    assert_eq!(as_map(&scanned), as_map(&keys), "the same keys and entries as keys()");
    assert!(
        scanned
            .iter()
            .any(|(k, e)| k == b"order-00003" && matches!(e, Entry::Completed(c) if c.outcome == b"rewritten"))
    );
    assert_eq!(scan_all(&store, ""), scanned, "the same order every time");

    let orders = scan_all(&store, "order-");
    assert!(!orders.is_empty() && orders.iter().all(|(k, _)| k.starts_with(b"order-")));
    assert_eq!(orders.len(), keys.iter().filter(|(k, _)| k.starts_with(b"order-")).count());
    assert!(scan_all(&store, "nothing").is_empty());

    // The iterator reads lazily: taking a few stops early.
    assert_eq!(store.scan("").take(5).count(), 5);
}

#[test]
fn a_scan_on_a_read_only_view_sees_what_the_writer_wrote() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let store = common::open(dir.path(), &clock);
    for i in 0..100 {
        let token = acquired(store.claim(format!("k{i}"), b"req").unwrap());
        store.complete(&token, b"v").unwrap();
    }
    store.sync().unwrap();
    let view = Store::open_read_only_with(dir.path(), common::options(&clock)).unwrap();
    assert_eq!(view.scan("k").count(), 100);
    assert_eq!(scan_all(&view, "").len(), store.scan("").count());
}

#[test]
fn namespaces_keep_their_keys_defaults_and_counters_apart() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let store = common::open(dir.path(), &clock);
    let payments =
        store.namespace("payments").unwrap().with_ttl(Duration::from_secs(60)).with_lease(Duration::from_secs(5));
    let webhooks = store.namespace("webhooks").unwrap();

    let p = acquired(payments.claim("evt-1", b"charge").unwrap());
    assert_eq!(p.lease_expires_at(), at(START_MS + 5_000), "the namespace's lease");
    // The same client key in another namespace, or without one, is another key.
    let w = acquired(webhooks.claim("evt-1", b"deliver").unwrap());
    let plain = acquired(store.claim("evt-1", b"anything").unwrap());
    payments.complete(&p, b"charged").unwrap();
    webhooks.complete(&w, b"delivered").unwrap();
    store.complete(&plain, b"plain").unwrap();

    let Claim::Completed(done) = payments.claim("evt-1", b"charge").unwrap() else { panic!() };
    assert_eq!((done.outcome.as_slice(), done.expires_at), (&b"charged"[..], at(START_MS + 60_000)));
    assert_eq!(payments.claim("evt-1", b"deliver").unwrap(), Claim::Mismatch);
    let Claim::Completed(done) = webhooks.claim("evt-1", b"deliver").unwrap() else { panic!() };
    assert_eq!(done.expires_at, at(START_MS + 24 * 3600 * 1000), "the store's TTL where the namespace sets none");
    // A per-claim option still wins.
    let q = acquired(
        payments
            .claim_with("evt-2", b"c", ClaimOptions { ttl: Some(Duration::from_secs(7)), ..Default::default() })
            .unwrap(),
    );
    payments.release(&q).unwrap();

    let keys: Vec<Vec<u8>> = payments.scan("").map(|r| r.unwrap().0).collect();
    assert_eq!(keys, vec![b"evt-1".to_vec()], "a namespace scans its own keys, without its prefix");
    assert_eq!(webhooks.get("evt-1").unwrap().map(|e| matches!(e, Entry::Completed(_))), Some(true));
    payments.remove("evt-1").unwrap();
    assert!(payments.get("evt-1").unwrap().is_none());
    assert!(webhooks.get("evt-1").unwrap().is_some(), "removing in one namespace leaves the other");

    let stats = store.namespace_stats();
    let names: Vec<&str> = stats.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["payments", "webhooks"]);
    assert_eq!(
        (stats[0].1.claims_acquired_total, stats[0].1.duplicates_replayed_total, stats[0].1.mismatches_total),
        (2, 1, 1)
    );
    assert_eq!(store.namespace("payments").unwrap().stats(), stats[0].1, "handles share their namespace's counters");

    // Stored keys tell their namespace.
    let stored = namespaced_key("webhooks", b"evt-1").unwrap();
    assert_eq!(split_namespaced_key(&stored), Some(("webhooks", &b"evt-1"[..])));
    assert_eq!(split_namespaced_key(b"evt-1"), None);
    assert!(store.get(&stored).unwrap().is_some());
    assert!(store.namespace("").is_err() && store.namespace(&"n".repeat(65)).is_err());
    assert!(matches!(payments.claim("", b"r"), Err(idemstore::Error::EmptyKey)));
}

#[test]
fn namespace_encodings_never_collide() {
    // A name that is a prefix of another, and keys that would join up without the length.
    let a = namespaced_key("ab", b"c").unwrap();
    let b = namespaced_key("a", b"bc").unwrap();
    assert_ne!(a, b);
    for (name, key) in [("a", &b"\x02abc"[..]), ("x", b""), ("\u{e9}", b"k")] {
        let stored = namespaced_key(name, key).unwrap();
        assert_eq!(split_namespaced_key(&stored), Some((name, key)));
    }
}

#[test]
fn the_claim_hook_tells_fresh_runs_resumes_replays_and_refusals_apart() {
    use idemstore::{Answer, Options};
    use std::sync::{Arc, Mutex};
    type Seen = Arc<Mutex<Vec<(Vec<u8>, Answer)>>>;
    let seen: Seen = Arc::default();
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let hook_seen = Arc::clone(&seen);
    let options = Options {
        on_claim: Some(Arc::new(move |event: &idemstore::ClaimEvent<'_>| {
            hook_seen.lock().unwrap().push((event.key.to_vec(), event.answer));
        })),
        default_lease: Duration::from_secs(5),
        ..common::options(&clock)
    };
    let store = Store::open(dir.path(), options).unwrap();
    let t = acquired(store.claim("a", b"r").unwrap());
    assert!(matches!(store.claim("a", b"r"), Ok(Claim::InProgress { .. })));
    store.complete(&t, b"done").unwrap();
    assert_eq!(store.claim("a", b"r").unwrap().answer(), Answer::Replayed);
    assert_eq!(store.claim("a", b"other").unwrap(), Claim::Mismatch);
    let _held = acquired(store.claim("b", b"r").unwrap());
    clock.advance(Duration::from_secs(6));
    let many = store.claim_many(&[("b", "r"), ("c", "r")], ClaimOptions::default());
    assert_eq!(many.len(), 2);
    assert!(store.claim("", b"r").is_err(), "errors are not reported");
    let ns = store.namespace("n").unwrap();
    let _t = acquired(ns.claim("k", b"r").unwrap());
    let seen = seen.lock().unwrap().clone();
    let expected: Vec<(Vec<u8>, Answer)> = vec![
        (b"a".to_vec(), Answer::Fresh),
        (b"a".to_vec(), Answer::InProgress),
        (b"a".to_vec(), Answer::Replayed),
        (b"a".to_vec(), Answer::Mismatch),
        (b"b".to_vec(), Answer::Fresh),
        (b"b".to_vec(), Answer::Resumed),
        (b"c".to_vec(), Answer::Fresh),
        (namespaced_key("n", b"k").unwrap(), Answer::Fresh),
    ];
    assert_eq!(seen, expected);
}
