//! Spare segments: the housekeeper keeps a segment file created, zero-filled and durable in
//! the directory ahead of need for each of the log's lanes, so an append that opens a bucket
//! (or continues a full one) never creates a file and syncs the directory under its lane's
//! lock. When an append uses
//! the spare up, the housekeeper is woken to prepare the next one at once, not at its next
//! tick (1 s): at a full claim rate a 64 MiB segment fills in about half a second.

use std::time::{Duration, Instant};

use idemstore::{ClaimOptions, ManualClock, Options, Store};

mod common;
use common::START_MS;

/// Waits until the store holds `files` open descriptors (the lock file, segments taking
/// appends, and the spare); returns how long that took.
fn wait_for_open_files(store: &Store, files: u64) -> Duration {
    let started = Instant::now();
    while store.stats().open_files != files {
        assert!(started.elapsed() < Duration::from_secs(20), "open files stayed at {}", store.stats().open_files);
        std::thread::sleep(Duration::from_millis(1));
    }
    started.elapsed()
}

#[test]
fn a_spare_used_up_by_a_new_bucket_is_replaced_before_the_housekeepers_next_tick() {
    spares_are_replaced_at_once(1);
}

#[test]
fn each_lane_has_a_spare_and_a_used_one_is_replaced_at_once() {
    spares_are_replaced_at_once(2);
}

fn spares_are_replaced_at_once(lanes: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(START_MS);
    let options = Options {
        // The housekeeper is what prepares spares.
        background: true,
        bucket_width: Duration::from_secs(60),
        // Small spares: the timed replacement is then mostly the wake-up, not disk work.
        segment_bytes_initial: 4096,
        log_lanes: lanes as usize,
        ..common::options(&clock)
    };
    let store = Store::open(dir.path(), options).expect("open");
    // The lock file and the spares the housekeeper prepares as it starts, one per lane.
    wait_for_open_files(&store, 1 + lanes);
    for bucket in 1..=3u64 {
        let ttl = ClaimOptions { ttl: Some(Duration::from_secs(60 * bucket * 10)), ..Default::default() };
        let _held = store.claim_with(format!("key-{bucket}"), b"req", ttl).expect("claim");
        // The new bucket took the spare; the next spare must follow within milliseconds. Without
        // the wake-up it would come with the next tick, up to a second later.
        let replaced_after = wait_for_open_files(&store, 1 + lanes + bucket);
        assert!(
            replaced_after < Duration::from_millis(500),
            "bucket {bucket}: the spare was replaced only after {replaced_after:?}"
        );
    }
    assert_eq!(store.stats().segments, 3, "each bucket holds one segment");
}
