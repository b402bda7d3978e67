//! How a store zero-fills new segment space: a page per write call when every record is
//! synced at once (`Durability::Sync`, so each fdatasync writes back a page, not a large
//! folio: see `IoFile::reserve_paged`), in bulk otherwise. The simulated disk counts the
//! paged reservations.

use std::time::Duration;

use idemstore::sim::SimDisk;
use idemstore::{Durability, Store};

mod common;
use common::{acquire, sim_options};

/// Paged reservations a fresh store under `durability` makes while it claims enough keys to
/// grow its segment past the first step.
fn paged_reserves_under(durability: Durability) -> u64 {
    let disk = SimDisk::new();
    let options = idemstore::Options { segment_bytes_initial: 4096, ..sim_options(&disk, durability) };
    let store = Store::open("/store", options).expect("open");
    for i in 0..200 {
        let _held = acquire(&store, &format!("key-{i}"));
    }
    store.close().expect("close");
    disk.paged_reserves()
}

#[test]
fn a_sync_store_zero_fills_segment_space_a_page_at_a_time() {
    assert!(paged_reserves_under(Durability::Sync) > 1, "creation and growth steps of a Sync store go paged");
}

#[test]
fn stores_that_sync_later_zero_fill_in_bulk() {
    assert_eq!(paged_reserves_under(Durability::None), 0);
    assert_eq!(paged_reserves_under(Durability::Periodic(Duration::from_secs(3600))), 0);
}
