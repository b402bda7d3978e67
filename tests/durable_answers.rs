//! Promise: under `Durability::Sync`, an answer given at store time `t` survives a power cut
//! with a clock stepped behind at the next open: whatever told the caller "absent" or
//! "your token is stale" because the key's window ended stays so. An answer rests on a record
//! and on the store's time; both are durable before it is given, including when the answer is
//! read from no record at all (the key's bucket has ended).

use std::sync::Arc;
use std::time::Duration;

use idemstore::sim::SimDisk;
use idemstore::{Claim, ClaimOptions, ClaimToken, Durability, Entry, Error, ManualClock, Options, Store};

mod common;
use common::{START_MS, acquired};

const DIR: &str = "/store";

fn options(disk: &SimDisk, clock: &Arc<ManualClock>, durability: Durability) -> Options {
    Options {
        durability,
        background: false,
        clock: clock.clone(),
        io: Arc::new(disk.clone()),
        bucket_width: Duration::from_secs(60),
        ..Options::default()
    }
}

fn ttl(d: Duration) -> ClaimOptions {
    ClaimOptions { ttl: Some(d), ..Default::default() }
}

/// What a read-only open of a power-cut image, with its clock at `clock_ms`, says of `key`.
fn after_power_cut(disk: &SimDisk, clock_ms: u64, key: &str) -> Option<Entry> {
    let image = disk.power_cut(None);
    let behind = ManualClock::new(clock_ms);
    let view = Store::open_read_only_with(DIR, options(&image, &behind, Durability::None)).expect("the image opens");
    view.get(key).expect("get")
}

/// A store whose key was claimed (and, if `complete`, completed) at START with a 10 s TTL, then
/// read an hour later, once its bucket has ended.
fn store_an_hour_later(disk: &SimDisk, clock: &Arc<ManualClock>, complete: bool) -> (Store, ClaimToken) {
    let store = Store::open(DIR, options(disk, clock, Durability::Sync)).unwrap();
    let token = acquired(store.claim_with("key", "request", ttl(Duration::from_secs(10))).unwrap());
    if complete {
        store.complete(&token, "outcome").unwrap();
    }
    clock.advance(Duration::from_secs(3600));
    (store, token)
}

#[test]
fn a_key_answered_absent_after_its_bucket_ended_stays_absent_after_a_power_cut() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let (store, _) = store_an_hour_later(&disk, &clock, true);
    assert_eq!(store.get("key").unwrap(), None);
    // The cut comes before anything else: no close writes the time floor.
    std::mem::forget(store);
    assert_eq!(after_power_cut(&disk, START_MS + 1_000, "key"), None, "the key came back");

    let behind = ManualClock::new(START_MS + 1_000);
    let reopened = Store::open(DIR, options(&disk.power_cut(None), &behind, Durability::Sync)).unwrap();
    let claim = reopened.claim("key", "request").unwrap();
    assert!(matches!(claim, Claim::Acquired(_)), "answered absent before the cut, replayed after it: {claim:?}");
}

#[test]
fn a_token_told_stale_after_its_bucket_ended_stays_stale_after_a_power_cut() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let (store, token) = store_an_hour_later(&disk, &clock, false);
    assert!(matches!(store.complete(&token, "outcome"), Err(Error::StaleToken)));
    std::mem::forget(store);
    let after = after_power_cut(&disk, START_MS + 1_000, "key");
    assert!(after.is_none(), "told its key was gone, the holder finds it in flight after the cut: {after:?}");
}

#[test]
fn a_batch_answers_as_a_single_complete_when_the_time_cannot_be_made_durable() {
    let answer = |batch: bool| {
        let disk = SimDisk::new();
        let clock = ManualClock::new(START_MS);
        let store = Store::open(DIR, options(&disk, &clock, Durability::Sync)).unwrap();
        let token = acquired(store.claim_with("key", "request", ttl(Duration::from_secs(10))).unwrap());
        // Expired, its bucket still live; the sync that would make this time durable fails.
        clock.advance(Duration::from_secs(20));
        disk.fail_sync_after(0);
        let answer = if batch {
            store.complete_many(&[(&token, "outcome")]).remove(0)
        } else {
            store.complete(&token, "outcome")
        };
        std::mem::forget(store);
        answer
    };
    let (single, batch) = (answer(false), answer(true));
    assert!(matches!(single, Err(Error::Poisoned { .. })), "single: {single:?}");
    assert!(matches!(batch, Err(Error::Poisoned { .. })), "batch: {batch:?}");
}

#[test]
fn a_time_file_first_written_unsynced_gets_a_durable_name_once_synced() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open(DIR, options(&disk, &clock, Durability::None)).unwrap();
    let token = acquired(store.claim_with("key", "request", ttl(Duration::from_secs(60))).unwrap());
    store.complete(&token, "outcome").unwrap();
    store.sync().unwrap();
    clock.advance(Duration::from_secs(1));
    store.maintain().unwrap(); // writes TIME under `None`: unsynced, its name too
    store.close().unwrap();

    let store = Store::open(DIR, options(&disk, &clock, Durability::Sync)).unwrap();
    clock.advance(Duration::from_secs(120));
    assert_eq!(store.get("key").unwrap(), None);
    std::mem::forget(store);
    assert_eq!(after_power_cut(&disk, START_MS + 2_000, "key"), None, "the TIME file's name was never made durable");
}
