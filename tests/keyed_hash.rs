//! Promise: keys chosen by clients cannot be crafted offline to pile up in one probe run of the
//! index. Each store hashes keys under a secret of its own, drawn when it is created and kept in
//! `META`; a damaged `META` is refused, never replaced (a new secret would move every key).
//!
//! `tests/fixtures/crafted_keys.txt` holds 3000 keys made by `examples/craft_colliding_keys.rs`
//! that share one shard and one home slot under the unkeyed hash (xxh3-64 with no secret).

use std::path::Path;

use idemstore::internals::place_in_index;
use idemstore::{Claim, Error, Store};

mod common;
use common::START_MS;

fn crafted_keys() -> Vec<&'static str> {
    include_str!("fixtures/crafted_keys.txt").lines().collect()
}

fn options() -> idemstore::Options {
    common::options(&idemstore::ManualClock::new(START_MS))
}

/// Claims every key (each must be new) and completes it; returns the index's (longest, mean)
/// walk past a home slot.
fn claim_all(store: &Store, keys: &[&str]) -> (usize, f64) {
    for key in keys {
        match store.claim(key, "request").expect("claim") {
            Claim::Acquired(token) => store.complete(&token, key).expect("complete"),
            other => panic!("{key}: expected a new key, got {other:?}"),
        }
    }
    for key in keys {
        match store.claim(key, "request").expect("claim") {
            Claim::Completed(done) => assert_eq!(done.outcome, key.as_bytes()),
            other => panic!("{key}: expected its outcome, got {other:?}"),
        }
    }
    store.index_probe_stats()
}

#[test]
fn crafted_keys_pile_up_under_the_unkeyed_hash_and_spread_under_the_keyed_one() {
    let keys = crafted_keys();
    assert_eq!(keys.len(), 3000);
    // The premise: one shard, one home slot in a shard table of 4096 slots (the size 3000 keys
    // grow it to), so one probe run.
    let places: std::collections::HashSet<(usize, usize)> =
        keys.iter().map(|k| place_in_index(xxhash_rust::xxh3::xxh3_64(k.as_bytes()), 4096)).collect();
    assert_eq!(places.len(), 1, "the crafted keys share a shard and a home slot: {places:?}");

    let dir = tempfile::tempdir().expect("tempdir");
    let unkeyed =
        Store::open(dir.path(), idemstore::Options { key_hash: Some(xxhash_rust::xxh3::xxh3_64), ..options() })
            .expect("open");
    let (longest, mean) = claim_all(&unkeyed, &keys);
    assert!(longest >= 2900 && mean >= 1000.0, "unkeyed: every claim walks the pile ({longest}, {mean:.1})");

    let dir = tempfile::tempdir().expect("tempdir");
    let keyed = Store::open(dir.path(), options()).expect("open");
    let (longest, mean) = claim_all(&keyed, &keys);
    assert!(longest <= 32 && mean <= 3.0, "keyed: walks as short as random keys' ({longest}, {mean:.2})");
}

/// The secret in a store's `META`.
fn secret_of(dir: &Path) -> Vec<u8> {
    let meta = std::fs::read(dir.join("META")).expect("read META");
    assert_eq!(meta.len(), 212);
    assert_eq!(&meta[0..8], b"IDEMMETA");
    assert_eq!(u32::from_le_bytes(meta[8..12].try_into().expect("4 bytes")), 2, "format version 2");
    meta[16..208].to_vec()
}

#[test]
fn each_new_store_draws_a_secret_of_its_own() {
    let (a, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    for dir in [&a, &b] {
        Store::open(dir.path(), options()).expect("open").close().expect("close");
    }
    let (secret_a, secret_b) = (secret_of(a.path()), secret_of(b.path()));
    assert_ne!(secret_a, secret_b);
    assert!(secret_a.iter().any(|&x| x != 0));
    // Reopened, a store keeps its secret.
    Store::open(a.path(), options()).expect("reopen").close().expect("close");
    assert_eq!(secret_of(a.path()), secret_a);
}

#[test]
fn a_directory_with_only_lock_and_time_is_a_new_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("LOCK"), b"").expect("write LOCK");
    std::fs::write(dir.path().join("TIME"), b"").expect("write TIME");
    Store::open(dir.path(), options()).expect("open").close().expect("close");
    secret_of(dir.path());
}

#[test]
fn a_read_only_view_of_a_new_store_writes_no_meta() {
    let dir = tempfile::tempdir().expect("tempdir");
    let view = Store::open_read_only_with(dir.path(), options()).expect("open a view");
    assert!(view.get("anything").expect("get").is_none());
    view.close().expect("close");
    assert!(!dir.path().join("META").exists());
}

/// A store with one completed key, closed, and its `META`'s bytes.
fn store_with_a_key() -> (tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), options()).expect("open");
    let Claim::Acquired(token) = store.claim("key", "request").expect("claim") else { panic!("a new key") };
    store.complete(&token, "outcome").expect("complete");
    store.close().expect("close");
    let meta = std::fs::read(dir.path().join("META")).expect("read META");
    (dir, meta)
}

#[test]
fn a_damaged_meta_is_corrupt_and_never_written_again() {
    for (at, what) in [(20, "the secret"), (208, "the checksum"), (12, "the flags"), (3, "the magic")] {
        let (dir, mut meta) = store_with_a_key();
        meta[at] ^= 0x40;
        std::fs::write(dir.path().join("META"), &meta).expect("write META");
        match Store::open(dir.path(), options()) {
            Err(Error::Corrupt { file, .. }) => assert_eq!(file, dir.path().join("META"), "{what}"),
            other => panic!("{what}: expected Corrupt, got {other:?}"),
        }
        assert!(matches!(Store::open_read_only_with(dir.path(), options()), Err(Error::Corrupt { .. })), "{what}");
        assert_eq!(std::fs::read(dir.path().join("META")).expect("read META"), meta, "{what}: META was rewritten");
    }
    // Cut short.
    let (dir, meta) = store_with_a_key();
    std::fs::write(dir.path().join("META"), &meta[..100]).expect("write META");
    assert!(matches!(Store::open(dir.path(), options()), Err(Error::Corrupt { .. })));
    std::fs::write(dir.path().join("META"), &meta[..5]).expect("write META");
    assert!(matches!(Store::open(dir.path(), options()), Err(Error::Corrupt { .. })));
}

#[test]
fn a_meta_of_another_version_is_unsupported() {
    let (dir, mut meta) = store_with_a_key();
    meta[8..12].copy_from_slice(&3u32.to_le_bytes());
    std::fs::write(dir.path().join("META"), &meta).expect("write META");
    match Store::open(dir.path(), options()) {
        Err(Error::UnsupportedVersion { found: 3, supported: 2, file }) => assert_eq!(file, dir.path().join("META")),
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
}
