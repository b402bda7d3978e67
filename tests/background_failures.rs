//! No background failure is silent. What the user sees when maintenance or a background thread
//! fails:
//! - a failed maintenance pass (an unlink, a table write) is counted in
//!   `Stats::maintenance_errors_total` and kept in `Stats::last_maintenance_error`, and writes
//!   go on (no acknowledged record is less durable for it);
//! - three failed passes in a row put a warning in `Stats::warnings`, gone once a pass succeeds;
//! - a panic of the housekeeping thread is counted, kept and warned of at once, and the thread
//!   lives on: the next pass drops expired buckets;
//! - a panic of the flusher of a `Periodic` store, which can then no longer sync, poisons it:
//!   every write fails with `Error::Poisoned` naming the panic.

use std::time::Duration;

use idemstore::sim::SimDisk;
use idemstore::{Durability, Error, ManualClock, Options, Store};

mod common;
use common::{START_MS, acquire, outcome_of, sealing_sim_options, sim_options};

const DIR: &str = "/store";

#[test]
fn a_failing_unlink_in_maintenance_is_counted_and_kept_in_stats_and_writes_go_on() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store =
        Store::open(DIR, Options { clock: clock.clone(), ..sim_options(&disk, Durability::Sync) }).expect("open");
    let token = acquire(&store, "old");
    store.complete(&token, "done").expect("complete");
    disk.fail_removes(true);
    clock.advance(Duration::from_secs(2 * 24 * 3600));
    let error = store.maintain().expect_err("the unlink fails");
    assert!(error.to_string().contains("simulated unlink failure"), "{error}");

    let stats = store.stats();
    assert_eq!(stats.maintenance_errors_total, 1);
    let kept = stats.last_maintenance_error.expect("the failure is kept");
    assert!(kept.contains("delete expired segment") && kept.contains("simulated unlink failure"), "{kept}");
    assert!(stats.warnings.is_empty(), "one failure is no warning yet: {:?}", stats.warnings);
    assert_eq!(stats.poisoned, None, "no acknowledged record is at stake");
    disk.fail_removes(false);
    let token = acquire(&store, "new");
    store.complete(&token, "ok").expect("writes go on");
    assert!(store.stats().to_prometheus().contains("idemstore_maintenance_errors_total 1"));
}

#[test]
fn table_writes_failing_three_passes_in_a_row_raise_a_warning_that_a_successful_pass_clears() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open(DIR, sealing_sim_options(&disk, &clock)).expect("open");
    for i in 0..10 {
        let token = acquire(&store, &format!("key-{i}"));
        store.complete(&token, "outcome").expect("complete");
    }
    clock.advance(Duration::from_secs(6));
    // Three more writes are allowed: the time floor's (saved by the pass, then made durable by
    // the sync before sealing; at this time only once) and the durable marks' after that sync
    // (later passes find them failing, which only leaves them out of date): the table's
    // write fails.
    disk.fail_writes_after(3);
    for pass in 1..=3u64 {
        let error = store.maintain().expect_err("the table write fails");
        assert!(error.to_string().contains("simulated write failure"), "pass {pass}: {error}");
        let stats = store.stats();
        assert_eq!(stats.maintenance_errors_total, pass);
        let kept = stats.last_maintenance_error.expect("kept");
        assert!(kept.contains("write table"), "pass {pass}: {kept}");
        assert_eq!(stats.warnings.len(), usize::from(pass == 3), "pass {pass}: {:?}", stats.warnings);
        assert_eq!(stats.poisoned, None);
    }
    let warning = &store.stats().warnings[0];
    assert!(warning.contains("3 times in a row") && warning.contains("write table"), "{warning}");

    disk.heal_writes();
    store.maintain().expect("the next pass seals");
    let stats = store.stats();
    assert_eq!(stats.sealed_tables, 1);
    assert!(stats.warnings.is_empty(), "a successful pass clears the warning: {:?}", stats.warnings);
    assert_eq!(stats.maintenance_errors_total, 3, "the count stays");
    assert!(stats.last_maintenance_error.is_some_and(|e| e.contains("write table")), "the last error stays");
    assert_eq!(outcome_of(&store, "key-3").as_deref(), Some(&b"outcome"[..]));
}

#[test]
fn a_panic_of_the_housekeeping_thread_is_counted_kept_and_warned_of_and_the_thread_goes_on() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let options = Options { clock: clock.clone(), background: true, ..sim_options(&disk, Durability::Sync) };
    let store = Store::open(DIR, options).expect("open");
    let token = acquire(&store, "old");
    store.complete(&token, "done").expect("complete");

    // Every pass from here on panics: whichever ran last before the check, it panicked.
    store.set_maintenance_fault(|| panic!("injected housekeeping panic"));
    assert!(store.run_housekeeping_pass(), "the housekeeper runs");
    let stats = store.stats();
    assert!(stats.maintenance_errors_total >= 1, "the panic is counted");
    let kept = stats.last_maintenance_error.expect("the panic is kept");
    assert!(kept.contains("housekeeping thread panicked: injected housekeeping panic"), "{kept}");
    assert_eq!(stats.warnings.len(), 1, "a panic is warned of at once");
    assert!(stats.warnings[0].contains("injected housekeeping panic"), "{:?}", stats.warnings);
    assert_eq!(stats.poisoned, None, "syncs do not depend on the housekeeper");

    // The thread lives on: its next pass drops the expired bucket.
    store.clear_maintenance_fault();
    clock.advance(Duration::from_secs(2 * 24 * 3600));
    assert!(store.run_housekeeping_pass());
    let stats = store.stats();
    assert_eq!(stats.buckets_expired_total, 1, "expiry goes on after the panic");
    assert!(stats.warnings.is_empty(), "{:?}", stats.warnings);
    let token = acquire(&store, "new");
    store.complete(&token, "ok").expect("writes go on");
    store.close().expect("close");
}

#[test]
fn a_panic_of_the_periodic_flusher_poisons_the_store_and_every_write_names_it() {
    let disk = SimDisk::new();
    let options = Options { background: true, ..sim_options(&disk, Durability::Periodic(Duration::from_secs(3600))) };
    let store = Store::open(DIR, options).expect("open");
    let token = acquire(&store, "written");
    store.complete(&token, "kept").expect("complete");
    let held = acquire(&store, "held");

    store.on_next_periodic_sync(|| panic!("injected flusher panic"));
    assert!(store.run_periodic_sync(), "the flusher runs");
    let named = |what: &str, e: Error| match e {
        Error::Poisoned { cause } => {
            assert!(cause.contains("periodic sync thread panicked: injected flusher panic"), "{what}: {cause}")
        }
        other => panic!("{what}: expected Poisoned, got {other:?}"),
    };
    named("claim", store.claim("next", "request").expect_err("a claim after the flusher died"));
    named("complete", store.complete(&held, "late").expect_err("a complete after the flusher died"));
    named("sync", store.sync().expect_err("a sync after the flusher died"));
    let stats = store.stats();
    assert!(stats.poisoned.is_some_and(|c| c.contains("injected flusher panic")));
    assert_eq!(stats.maintenance_errors_total, 1);
    assert!(stats.last_maintenance_error.is_some_and(|c| c.contains("periodic sync thread panicked")));
    assert_eq!(outcome_of(&store, "written").as_deref(), Some(&b"kept"[..]), "reads go on");
}
