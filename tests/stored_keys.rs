//! Promise: limits are for input, not for what is stored. A store written with a larger
//! `max_key_len` is listed whole by a reader (the CLI, a view) that opens it with the default.

use idemstore::{Entry, Error, ManualClock, Options, Store};

mod common;
use common::START_MS;

#[test]
fn keys_written_under_a_larger_limit_are_listed_under_the_default_one() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let long_key = "k".repeat(2_000);
    let roomy = Options { max_key_len: 4_000, ..common::options(&clock) };
    let store = Store::open(dir.path(), roomy).unwrap();
    let token = common::acquire(&store, &long_key);
    store.complete(&token, "outcome").unwrap();
    let _held = common::acquire(&store, "short");
    drop(store);

    let default_limit = common::options(&clock);
    assert!(default_limit.max_key_len < long_key.len(), "the premise: the default limit is smaller");
    let store = Store::open(dir.path(), default_limit.clone()).unwrap();
    let keys: Vec<Vec<u8>> =
        store.keys().expect("keys() of a store with a long key").into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec![long_key.clone().into_bytes(), b"short".to_vec()]);
    let listed = store.keys().unwrap();
    assert!(matches!(&listed[0].1, Entry::Completed(done) if done.outcome == b"outcome"));
    assert_eq!(store.orphans().expect("orphans() of a store with a long key").len(), 1);
    // As input, the key is still held to the limit of this open.
    assert!(matches!(store.get(&long_key), Err(Error::KeyTooLong { .. })));
    drop(store);

    let view = Store::open_read_only_with(dir.path(), default_limit).unwrap();
    assert_eq!(view.keys().expect("a view lists the long key").len(), 2);
}
