//! Promise: store time never goes backwards, across restarts too, power cuts included. Under
//! `Sync` a key the store answered as expired stays expired after a power cut, even when the
//! wall clock is then behind the time of that answer; under `Periodic` the same holds for an
//! answer given before a completed periodic sync (what came after it may be lost, like writes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use idemstore::sim::SimDisk;
use idemstore::{ClaimOptions, Durability, Entry, ManualClock, Options, Store};

mod common;
use common::{START_MS, acquired};

const DIR: &str = "/store";
const MINUTE: Duration = Duration::from_secs(60);

fn options(disk: &SimDisk, clock: &Arc<ManualClock>, durability: Durability, background: bool) -> Options {
    Options { durability, background, clock: clock.clone(), io: Arc::new(disk.clone()), ..Options::default() }
}

/// Claims and completes `key` with a TTL of one minute.
fn complete_for_a_minute(store: &Store, key: &str) {
    let token = acquired(
        store.claim_with(key, "request", ClaimOptions { ttl: Some(MINUTE), ..Default::default() }).expect("claim"),
    );
    store.complete(&token, "outcome").expect("complete");
}

/// What `key` reads in the store a power cut of `disk` leaves, opened with a wall clock back
/// at the time the key was written.
fn after_power_cut_with_the_clock_behind(disk: &SimDisk, key: &str) -> Option<Entry> {
    let image = disk.power_cut(None);
    let behind = ManualClock::new(START_MS);
    let store = Store::open_read_only_with(DIR, options(&image, &behind, Durability::None, false))
        .expect("the image of a power cut opens");
    store.get(key).expect("get")
}

#[test]
fn an_expiry_answered_under_sync_survives_a_power_cut_and_a_clock_stepped_back() {
    for maintained in [false, true] {
        let disk = SimDisk::new();
        let clock = ManualClock::new(START_MS);
        let store = Store::open(DIR, options(&disk, &clock, Durability::Sync, false)).expect("open");
        complete_for_a_minute(&store, "key");
        clock.advance(2 * MINUTE);
        assert_eq!(store.get("key").expect("get"), None, "the key expired");
        if maintained {
            store.maintain().expect("maintain");
        }
        // The power goes out here: no close, no drop.
        let after = after_power_cut_with_the_clock_behind(&disk, "key");
        assert_eq!(after, None, "answered as expired, then (maintain run: {maintained}) back after a power cut");
        std::mem::forget(store);
    }
}

#[test]
fn an_expiry_answered_before_a_periodic_sync_survives_a_power_cut_and_a_clock_stepped_back() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store =
        Store::open(DIR, options(&disk, &clock, Durability::Periodic(Duration::from_millis(20)), true)).expect("open");
    complete_for_a_minute(&store, "key");
    store.sync().expect("sync");
    clock.advance(2 * MINUTE);
    assert_eq!(store.get("key").expect("get"), None, "the key expired");
    // The periodic flusher makes the store's time durable on its own, as it does the writes.
    let deadline = Instant::now() + Duration::from_secs(30);
    while after_power_cut_with_the_clock_behind(&disk, "key").is_some() {
        assert!(Instant::now() < deadline, "no periodic sync made the store's time durable within 30 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    store.close().expect("close");
}
