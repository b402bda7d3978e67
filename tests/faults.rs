//! Disk faults on the simulated disk: a failed fsync, a full disk, the disk budget.
//!
//! Promises checked (README, Guarantees: "Failed fsync", "Full disk"):
//! - a failed fsync poisons the store: the failing call returns an error, every later write
//!   returns `Error::Poisoned` naming the cause, nothing is synced or treated as durable after
//!   it (no retried fsync, "fsyncgate"), reads of durable state keep working or fail with
//!   `Poisoned`, and a reopen after a power cut recovers exactly what was synced;
//! - a full disk makes a claim that cannot get space fail with `Error::NoSpace` (or an `Io`
//!   error of kind `StorageFull`), corrupts nothing, lets reads and replays go on, and writes
//!   work again once space is back, before and after a reopen;
//! - past `Options::max_disk_bytes`, claims fail with `Error::DiskBudgetExceeded`, the budget is
//!   never overrun, replays and reads go on, and dropping expired buckets makes room again.
//!
//! A real read-only directory is not tested here (the tests run as root, which writes anyway).

use std::io;
use std::time::Duration;

use idemstore::sim::SimDisk;
use idemstore::{Claim, ClaimOptions, Durability, Entry, Error, ManualClock, Options, Store};

mod common;
use common::{FSYNC_FAILURE, START_MS, acquire, assert_poisoned_by_fsync, outcome_of, sim_options};

const DIR: &str = "/store";

fn options(disk: &SimDisk, durability: Durability) -> Options {
    Options { segment_bytes_initial: 512, ..sim_options(disk, durability) }
}

fn is_no_space(e: &Error) -> bool {
    match e {
        Error::NoSpace { .. } => true,
        Error::Io { source, .. } => source.kind() == io::ErrorKind::StorageFull,
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// fsync failure

#[test]
fn failed_fsync_poisons_the_store_and_no_later_write_or_fsync_is_attempted() {
    let disk = SimDisk::new();
    let store = Store::open(DIR, options(&disk, Durability::Sync)).expect("open");
    let done = acquire(&store, "done");
    store.complete(&done, "outcome").expect("complete");
    let held = acquire(&store, "held");

    disk.fail_sync_after(0);
    // The call whose fsync fails reports it.
    assert_poisoned_by_fsync("the claim whose fsync failed", store.claim("unsynced", "request"));
    // Even once fsync would work again, the store refuses writes: a retried fsync could report
    // success for pages the kernel already dropped.
    disk.heal_syncs();
    let syncs_after_failure = disk.syncs();
    assert_poisoned_by_fsync("claim of a new key", store.claim("another", "request"));
    assert_poisoned_by_fsync("complete", store.complete(&held, "late outcome"));
    assert_poisoned_by_fsync("checkpoint", store.checkpoint(&held, "phase"));
    assert_poisoned_by_fsync("release", store.release(&held));
    assert_poisoned_by_fsync("remove", store.remove("done"));
    assert_poisoned_by_fsync("sync", store.sync());
    assert_eq!(disk.syncs(), syncs_after_failure, "a poisoned store must not fsync again");
    let cause = store.stats().poisoned.expect("stats report the poison");
    assert!(cause.contains(FSYNC_FAILURE), "{cause}");

    // Reads of durable state work or fail clearly; the record whose sync failed is never
    // answered from as if it were durable.
    match store.get("done") {
        Ok(Some(Entry::Completed(c))) => assert_eq!(c.outcome, b"outcome"),
        Err(Error::Poisoned { .. }) => {}
        other => panic!("get of a durable key on a poisoned store: {other:?}"),
    }
    match store.claim("done", "request") {
        Ok(Claim::Completed(c)) => assert_eq!(c.outcome, b"outcome"),
        Err(Error::Poisoned { .. }) => {}
        other => panic!("replay on a poisoned store: {other:?}"),
    }
    match store.get("unsynced") {
        Ok(None) | Err(Error::Poisoned { .. }) => {}
        other => panic!("a record whose fsync failed was read as durable: {other:?}"),
    }
    drop(store);

    // A power cut keeps what was synced; the store reopens and takes writes again.
    let image = disk.power_cut(None);
    let store = Store::open(DIR, options(&image, Durability::Sync)).expect("reopen after the power cut");
    assert_eq!(outcome_of(&store, "done").as_deref(), Some(&b"outcome"[..]));
    assert!(matches!(store.get("held").expect("get"), Some(Entry::InFlight { orphaned: true, .. })));
    assert_eq!(store.get("unsynced").expect("get"), None, "its fsync failed and the power went");
    assert_eq!(store.get("another").expect("get"), None);
    let fresh = acquire(&store, "after reopen");
    store.complete(&fresh, "works").expect("writes work after the reopen");
}

#[test]
fn fsync_failing_at_any_point_of_a_sequence_keeps_every_acknowledged_operation() {
    for good_syncs in 0..12 {
        let disk = SimDisk::new();
        let store = Store::open(DIR, options(&disk, Durability::Sync)).expect("open");
        disk.fail_sync_after(good_syncs);
        let mut acknowledged: Vec<String> = Vec::new();
        let mut failed = false;
        for i in 0..12 {
            let key = format!("key-{i}");
            // Three expiry buckets, so some fsyncs are of new segments' directory entries.
            let ttl = ClaimOptions { ttl: Some(Duration::from_secs((1 + i % 3) * 24 * 3600)), ..Default::default() };
            let step = store.claim_with(&key, "request", ttl).and_then(|claim| match claim {
                Claim::Acquired(token) => store.complete(&token, format!("outcome of {key}")),
                other => panic!("fresh key {key}: {other:?}"),
            });
            match &step {
                Ok(()) => {
                    assert!(!failed, "{good_syncs} good syncs: {key} was written after a failed fsync");
                    acknowledged.push(key);
                }
                Err(Error::Poisoned { cause }) => assert!(cause.contains(FSYNC_FAILURE), "{cause}"),
                // A failed directory fsync is reported as an I/O error (see the regression test
                // below); no write succeeds after any failure.
                Err(_) => {}
            }
            failed |= step.is_err();
        }
        assert!(failed, "{good_syncs} good syncs: the fsync failure was never reported");
        drop(store);
        let image = disk.power_cut(None);
        let store = Store::open(DIR, options(&image, Durability::Sync)).expect("reopen");
        assert_all_completed(&store, &acknowledged);
    }
}

#[test]
fn failed_fsync_under_periodic_poisons_and_a_power_cut_keeps_the_last_completed_sync() {
    let disk = SimDisk::new();
    let store = Store::open(DIR, options(&disk, Durability::Periodic(Duration::from_secs(3600)))).expect("open");
    let synced = acquire(&store, "synced");
    store.complete(&synced, "kept").expect("complete");
    store.sync().expect("sync");
    let _held = acquire(&store, "written after the sync");
    disk.fail_sync_after(0);
    assert_poisoned_by_fsync("the failing sync", store.sync());
    disk.heal_syncs();
    assert_poisoned_by_fsync("claim after the failed sync", store.claim("later", "request"));
    assert_eq!(outcome_of(&store, "synced").as_deref(), Some(&b"kept"[..]), "reads of synced state go on");
    drop(store);
    let image = disk.power_cut(None);
    let store = Store::open(DIR, options(&image, Durability::Sync)).expect("reopen");
    assert_eq!(outcome_of(&store, "synced").as_deref(), Some(&b"kept"[..]));
    assert_eq!(store.get("written after the sync").expect("get"), None);
}

/// Regression: a failed directory fsync (made when a new segment file is created) must poison
/// the store like any failed fsync, not be reported once as an I/O error and forgotten.
#[test]
fn failed_directory_fsync_when_a_segment_is_created_poisons_the_store() {
    let disk = SimDisk::new();
    let store = Store::open(DIR, options(&disk, Durability::Sync)).expect("open");
    let _held = acquire(&store, "first");
    disk.fail_sync_after(0);
    // Another expiry bucket: a new segment file, whose directory entry needs an fsync.
    let other_bucket = ClaimOptions { ttl: Some(Duration::from_secs(3 * 24 * 3600)), ..Default::default() };
    let failed = store.claim_with("second", "request", other_bucket);
    assert!(failed.is_err(), "the claim whose directory fsync failed returned {failed:?}");
    disk.heal_syncs();
    assert_poisoned_by_fsync("claim after a failed directory fsync", store.claim("third", "request"));
}

// ---------------------------------------------------------------------------------------------
// Write failure

/// A failed write poisons the store like a failed fsync.
#[test]
fn failed_record_write_poisons_the_store() {
    let disk = SimDisk::new();
    let store = Store::open(DIR, options(&disk, Durability::Sync)).expect("open");
    // Two writes succeed after the open (which wrote the store's META): the new segment's
    // header and the first claim.
    disk.fail_writes_after(2);
    let token = acquire(&store, "first");
    let failed = store.complete(&token, "outcome");
    assert!(failed.is_err(), "the complete whose write failed returned {failed:?}");
    disk.heal_writes();
    match store.claim("second", "request") {
        Err(Error::Poisoned { cause }) => assert!(cause.contains("simulated write failure"), "{cause}"),
        other => panic!("a write after a failed write: expected Poisoned, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Full disk

/// What `fill` did before the disk or the budget refused a write.
struct Filled {
    /// Keys claimed and completed.
    completed: Vec<String>,
    /// Keys claimed whose complete was refused: still in flight.
    held: Vec<String>,
    /// The key whose claim was refused, and the error.
    refused: String,
    error: Error,
}

/// Claims and completes new keys until a claim is refused (a refused complete leaves its key
/// held and goes on). Panics if nothing is refused within 1,000 keys.
fn fill(store: &Store, prefix: &str) -> Filled {
    let (mut completed, mut held) = (Vec::new(), Vec::new());
    for i in 0..1_000 {
        let key = format!("{prefix}-{i}");
        match store.claim(&key, "request") {
            Ok(Claim::Acquired(token)) => match store.complete(&token, format!("outcome of {key}")) {
                Ok(()) => completed.push(key),
                Err(_) => held.push(key),
            },
            Ok(other) => panic!("fresh key {key}: {other:?}"),
            Err(error) => return Filled { completed, held, refused: key, error },
        }
    }
    panic!("1,000 claims were never refused");
}

fn assert_all_held(store: &Store, keys: &[String]) {
    for key in keys {
        assert!(matches!(store.get(key).expect("get"), Some(Entry::InFlight { .. })), "{key} lost");
        assert!(matches!(store.claim(key, "request").expect("claim"), Claim::InProgress { .. }), "{key}");
    }
}

fn assert_all_completed(store: &Store, keys: &[String]) {
    for key in keys {
        let want = format!("outcome of {key}").into_bytes();
        assert_eq!(outcome_of(store, key), Some(want.clone()), "{key} lost or damaged");
        match store.claim(key, "request").expect("replay") {
            Claim::Completed(done) => assert_eq!(done.outcome, want),
            other => panic!("replay of {key}: {other:?}"),
        }
    }
}

#[test]
fn full_disk_fails_the_claim_clearly_keeps_everything_and_recovers_when_space_returns() {
    let disk = SimDisk::new();
    let store = Store::open(DIR, options(&disk, Durability::Sync)).expect("open");
    let held = acquire(&store, "held");
    let mut kept = Vec::new();
    for i in 0..3 {
        let key = format!("before-{i}");
        let token = acquire(&store, &key);
        store.complete(&token, format!("outcome of {key}")).expect("complete");
        kept.push(key);
    }
    disk.set_space_limit(disk.used_bytes());

    let filled = fill(&store, "full");
    assert!(is_no_space(&filled.error), "a claim without space must fail with NoSpace, got {:?}", filled.error);
    kept.extend(filled.completed);
    // Nothing of the refused claim was stored; everything else reads and replays.
    assert_eq!(store.get(&filled.refused).expect("get"), None);
    assert_all_completed(&store, &kept);
    assert_all_held(&store, &filled.held);
    assert!(matches!(store.get("held").expect("get"), Some(Entry::InFlight { .. })));
    assert!(store.stats().poisoned.is_none(), "a full disk is not a failed fsync");

    // Space comes back: writes work again without a reopen.
    disk.set_space_limit(u64::MAX);
    let token = acquire(&store, &filled.refused);
    store.complete(&token, format!("outcome of {}", filled.refused)).expect("complete after space returned");
    store.complete(&held, "held outcome").expect("complete of the held claim");
    kept.push(filled.refused);
    drop(store);

    // Nothing stored was damaged: a power cut and a reopen find it all.
    let image = disk.power_cut(None);
    let store = Store::open(DIR, options(&image, Durability::Sync)).expect("reopen");
    assert_all_completed(&store, &kept);
    assert_eq!(outcome_of(&store, "held").as_deref(), Some(&b"held outcome"[..]));
}

#[test]
fn store_reopened_on_a_full_disk_reads_refuses_claims_clearly_and_writes_once_space_returns() {
    let disk = SimDisk::new();
    let store = Store::open(DIR, options(&disk, Durability::Sync)).expect("open");
    let mut kept = Vec::new();
    for i in 0..5 {
        let key = format!("key-{i}");
        let token = acquire(&store, &key);
        store.complete(&token, format!("outcome of {key}")).expect("complete");
        kept.push(key);
    }
    store.close().expect("close");
    disk.set_space_limit(disk.used_bytes());

    let store = Store::open(DIR, options(&disk, Durability::Sync)).expect("open on a full disk");
    assert_all_completed(&store, &kept);
    let filled = fill(&store, "new");
    assert!(is_no_space(&filled.error), "expected NoSpace, got {:?}", filled.error);
    drop(store);

    disk.set_space_limit(u64::MAX);
    let store = Store::open(DIR, options(&disk, Durability::Sync)).expect("reopen with space");
    assert_all_completed(&store, &kept);
    assert_all_completed(&store, &filled.completed);
    let token = acquire(&store, &filled.refused);
    store.complete(&token, "finally").expect("writes work once space is back");
}

// ---------------------------------------------------------------------------------------------
// Disk budget

#[test]
fn past_the_disk_budget_claims_fail_while_reads_and_replays_go_on() {
    let disk = SimDisk::new();
    let budget = 4096;
    let store = Store::open(DIR, Options { max_disk_bytes: budget, ..options(&disk, Durability::Sync) }).expect("open");
    let held = acquire(&store, "held");
    let filled = fill(&store, "key");
    match filled.error {
        Error::DiskBudgetExceeded { used_bytes, max_bytes } => {
            assert_eq!(max_bytes, budget);
            assert!(used_bytes <= budget, "the budget was overrun: {used_bytes} > {budget}");
        }
        ref other => panic!("expected DiskBudgetExceeded, got {other:?}"),
    }
    assert!(!filled.completed.is_empty(), "the budget held at least one key");
    assert!(store.stats().disk_bytes <= budget, "disk bytes {} over the budget", store.stats().disk_bytes);
    assert!(disk.used_bytes() <= budget, "the disk holds {} bytes, over the budget", disk.used_bytes());
    assert_eq!(store.get(&filled.refused).expect("get"), None);
    assert_all_completed(&store, &filled.completed);
    assert_all_held(&store, &filled.held);
    assert!(matches!(store.claim("held", "request"), Ok(Claim::InProgress { .. })));
    assert!(matches!(store.claim("held", "other request"), Ok(Claim::Mismatch)));
    assert!(matches!(store.claim(&filled.refused, "request"), Err(Error::DiskBudgetExceeded { .. })));
    drop(held);
}

/// Past the budget, a holder must still be able to record the outcome of the effect it already
/// performed: otherwise its lease runs out, the next claim takes the key over and the effect
/// runs twice. (Only new claims are refused by the budget.)
#[test]
fn past_the_disk_budget_a_held_claim_can_still_complete() {
    let disk = SimDisk::new();
    let store = Store::open(DIR, Options { max_disk_bytes: 4096, ..options(&disk, Durability::Sync) }).expect("open");
    let mut tokens = Vec::new();
    loop {
        match store.claim(format!("key-{}", tokens.len()), "request") {
            Ok(Claim::Acquired(token)) => tokens.push(token),
            Ok(other) => panic!("fresh key: {other:?}"),
            Err(Error::DiskBudgetExceeded { .. }) => break,
            Err(other) => panic!("expected DiskBudgetExceeded, got {other:?}"),
        }
        assert!(tokens.len() < 1_000, "the budget never ran out");
    }
    for token in &tokens {
        let outcome = vec![7u8; 200];
        store.complete(token, &outcome).unwrap_or_else(|e| {
            panic!("complete of held claim {:?} past the budget: {e}", String::from_utf8_lossy(token.key()))
        });
    }
}

#[test]
fn dropping_expired_buckets_makes_room_under_the_disk_budget_again() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let short = ClaimOptions { ttl: Some(Duration::from_secs(60)), ..Default::default() };
    let options = Options {
        max_disk_bytes: 4096,
        clock: clock.clone(),
        bucket_width: Duration::from_secs(60),
        ..options(&disk, Durability::Sync)
    };
    let store = Store::open(DIR, options.clone()).expect("open");
    let mut refused = None;
    for i in 0..1_000 {
        match store.claim_with(format!("short-{i}"), "request", short.clone()) {
            Ok(Claim::Acquired(_)) => {}
            Ok(other) => panic!("fresh key: {other:?}"),
            Err(Error::DiskBudgetExceeded { .. }) => {
                refused = Some(format!("short-{i}"));
                break;
            }
            Err(other) => panic!("expected DiskBudgetExceeded, got {other:?}"),
        }
    }
    let refused = refused.expect("the budget ran out");
    clock.advance(Duration::from_secs(3 * 60));
    assert!(store.maintain().expect("maintain") > 0, "the expired bucket was dropped");
    assert!(matches!(store.claim(&refused, "request"), Ok(Claim::Acquired(_))), "room again after expiry");
    drop(store);
    // And across a reopen, which also drops expired buckets.
    let store = Store::open(DIR, options).expect("reopen");
    assert!(matches!(store.get(&refused).expect("get"), Some(Entry::InFlight { .. })));
}
