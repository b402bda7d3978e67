//! Live and dead bytes: a record superseded by a later record of its key is dead space (given
//! back only when its bucket drops); the latest record of each key is live. The scan at open
//! counts the same way as the running store.

use std::time::Duration;

use idemstore::{Claim, ManualClock, Store};

mod common;
use common::options;

#[test]
fn superseded_records_are_dead_and_the_latest_are_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(1_700_000_000_000);
    let store = Store::open(dir.path(), options(&clock)).expect("open");
    let empty = store.stats();
    assert_eq!((empty.live_bytes, empty.dead_bytes), (0, 0));

    let Claim::Acquired(token) = store.claim("k", "req").expect("claim") else { panic!("fresh key") };
    let after_claim = store.stats();
    assert_eq!(after_claim.dead_bytes, 0);
    assert_eq!(after_claim.live_bytes, after_claim.appended_bytes_total);

    store.complete(&token, [1u8; 100]).expect("complete");
    let after_complete = store.stats();
    assert_eq!(after_complete.dead_bytes, after_claim.live_bytes, "the claim record is superseded");
    assert_eq!(after_complete.live_bytes + after_complete.dead_bytes, after_complete.appended_bytes_total);
    assert!(after_complete.live_bytes > after_claim.live_bytes, "the outcome makes the live record larger");

    store.remove("k").expect("remove");
    let after_remove = store.stats();
    assert_eq!(after_remove.dead_bytes, after_claim.live_bytes + after_complete.live_bytes);
    drop(store);
    // Dropping the store wrote its segment a table, and a segment with a table is mapped at
    // open, not scanned; the table goes so the scan counts it.
    for entry in std::fs::read_dir(dir.path()).expect("list") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "tbl") {
            std::fs::remove_file(path).expect("remove table");
        }
    }

    let store = Store::open(dir.path(), options(&clock)).expect("reopen");
    let reopened = store.stats();
    assert_eq!((reopened.live_bytes, reopened.dead_bytes), (after_remove.live_bytes, after_remove.dead_bytes));

    clock.advance(Duration::from_secs(49 * 3600));
    store.maintain().expect("maintain");
    let expired = store.stats();
    assert_eq!((expired.live_bytes, expired.dead_bytes), (0, 0), "the bucket dropped with everything in it");
}
