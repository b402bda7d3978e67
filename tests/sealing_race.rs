//! Promise: a segment that still takes appends is never sealed. Sealing moves a segment's
//! index entries out of RAM into a table, and a table is trusted at open instead of a scan;
//! so a segment sealed while it takes appends would lose every record written after its
//! entries were collected (in RAM, and for good after a reopen).
//!
//! The race: a writer reads the store's time, stalls (here: its record read is held on the
//! simulated disk) while the clock moves past `seal_idle_after`, and appends into a new
//! segment of a bucket whose last segment maintenance just retired. That new segment's only
//! write time is the writer's stale one, so it looks idle; it must still not be sealed, since
//! it was not retired when maintenance decided what to seal.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use idemstore::sim::SimDisk;
use idemstore::{Claim, Entry, ManualClock, Options, Store};

mod common;
use common::{START_MS, acquired};

const DIR: &str = "/store";
const SEAL_IDLE_AFTER: Duration = Duration::from_secs(600);

fn options(disk: &SimDisk, clock: &Arc<ManualClock>) -> Options {
    Options {
        bucket_width: Duration::from_secs(3600),
        default_ttl: Duration::from_secs(24 * 3600),
        seal_idle_after: SEAL_IDLE_AFTER,
        segment_bytes_initial: Options::default().segment_bytes_initial,
        segment_bytes_max: Options::default().segment_bytes_max,
        ..common::sealing_sim_options(disk, clock)
    }
}

#[test]
fn a_segment_taking_appends_is_never_sealed() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Arc::new(Store::open(DIR, options(&disk, &clock)).expect("open"));
    // "late" has a record in RAM that reads as absent, so the next claim of it reads that
    // record (which the test holds) and then appends a fresh claim.
    let first = acquired(store.claim("late", "request").expect("claim"));
    store.release(&first).expect("release");

    disk.hold_next_read();
    let writer = std::thread::spawn({
        let store = store.clone();
        move || store.claim("late", "request")
    });
    // The writer has read the store's time and stalls on its read.
    disk.wait_for_held_read();
    clock.advance(SEAL_IDLE_AFTER + Duration::from_secs(60));

    // Maintenance stops right after it decided what to seal; the stalled writer appends then.
    let at_hook = Arc::new(Barrier::new(2));
    let go_on = Arc::new(Barrier::new(2));
    store.on_next_retire({
        let (at_hook, go_on) = (at_hook.clone(), go_on.clone());
        move || {
            at_hook.wait();
            go_on.wait();
        }
    });
    let maintainer = std::thread::spawn({
        let store = store.clone();
        move || store.maintain()
    });
    at_hook.wait();
    disk.release_held_read();
    let late = acquired(writer.join().expect("writer thread").expect("claim"));
    go_on.wait();
    maintainer.join().expect("maintenance thread").expect("maintain");

    // Writes after that sealing pass go to the bucket's newest segment.
    store.complete(&late, "late outcome").expect("complete");
    assert!(matches!(store.claim("after", "request").expect("claim"), Claim::Acquired(_)));
    for (key, what) in [("late", "completed"), ("after", "in flight")] {
        let entry = store.get(key).expect("get");
        assert!(entry.is_some(), "{key} ({what}) reads as absent before the reopen");
    }

    let store = Arc::into_inner(store).expect("the only handle");
    store.close().expect("close");
    let reopened = Store::open(DIR, options(&disk, &clock)).expect("reopen");
    match reopened.get("late").expect("get") {
        Some(Entry::Completed(done)) => assert_eq!(done.outcome, b"late outcome"),
        other => panic!("a completed key written to a segment sealed under it reads {other:?}"),
    }
    assert!(
        matches!(reopened.get("after").expect("get"), Some(Entry::InFlight { orphaned: true, .. })),
        "a claim written to a segment sealed under it was lost"
    );
}
