//! Promise: a read-only view (the CLI, `verify`, a sidecar) opened before the writer drops an
//! expired bucket answers for the keys of that bucket as absent, never `Corrupt`: the writer
//! frees the bucket's blocks by punching holes, which read as zeros through the view's map.

use std::time::Duration;

use idemstore::{ClaimOptions, ManualClock, Options, Store};

mod common;
use common::START_MS;

#[test]
fn a_view_reads_keys_of_a_bucket_the_writer_dropped_as_absent() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let options = Options { bucket_width: Duration::from_secs(1), ..common::options(&clock) };
    let writer = Store::open(dir.path(), options.clone()).unwrap();
    let short = ClaimOptions { ttl: Some(Duration::from_millis(500)), ..Default::default() };
    let keys: Vec<String> = (0..4_000).map(|i| format!("key-{i:05}")).collect();
    for key in &keys {
        let token = common::acquired(writer.claim_with(key, "request", short.clone()).unwrap());
        writer.complete(&token, "x".repeat(100)).unwrap();
    }
    let kept = common::acquire(&writer, "kept");
    writer.complete(&kept, "outcome").unwrap();
    writer.sync().unwrap();

    let view = Store::open_read_only_with(dir.path(), options).unwrap();
    clock.advance(Duration::from_secs(3));
    assert_eq!(writer.maintain().unwrap(), 1, "the writer dropped the expired bucket");
    for key in &keys {
        assert_eq!(view.get(key).unwrap_or_else(|e| panic!("{key}: {e}")), None, "{key}");
    }
    let listed = view.keys().expect("keys() of a view while the writer drops a bucket");
    assert_eq!(listed.iter().map(|(k, _)| k.as_slice()).collect::<Vec<_>>(), vec![&b"kept"[..]]);
    assert!(view.orphans().expect("orphans() of the view").is_empty());
    assert_eq!(common::outcome_of(&view, "kept").as_deref(), Some(&b"outcome"[..]));
}
