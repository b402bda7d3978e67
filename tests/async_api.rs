//! Promise: the async API (`idemstore::DedupeStore`, README "Async and HTTP").
//!
//! The same contract as the blocking calls; a durable write under `Durability::Sync` waits
//! for its fsync without holding a runtime thread (a task on a one-thread runtime keeps
//! running while a sync is held); a claim with `wait` is woken by the holder's complete or
//! release, or by its lease's end, and can be dropped or wrapped in a timeout; a claim future
//! dropped before it returns leaves its key free, while a dropped token keeps it in flight
//! until the lease ends. Run on tokio's multi-thread runtime unless a test needs one thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use idemstore::sim::SimDisk;
use idemstore::{Claim, ClaimOptions, DedupeStore, Durability, Entry, Error, ManualClock, Store};

mod common;
use common::{START_MS, acquired};

/// A gate for the simulated disk's syncs: while closed, a sync waits at its start (up to 10 s,
/// then goes on and records that it had to: a test that held a runtime thread would otherwise
/// hang instead of failing).
#[derive(Default)]
struct SyncGate {
    closed: AtomicBool,
    held: AtomicUsize,
    timed_out: AtomicBool,
}

impl SyncGate {
    fn install(self: &Arc<Self>, disk: &SimDisk) {
        let gate = Arc::clone(self);
        disk.before_each_sync(Some(Arc::new(move || {
            if !gate.closed.load(Ordering::SeqCst) {
                return;
            }
            gate.held.fetch_add(1, Ordering::SeqCst);
            let started = std::time::Instant::now();
            while gate.closed.load(Ordering::SeqCst) {
                if started.elapsed() > Duration::from_secs(10) {
                    gate.timed_out.store(true, Ordering::SeqCst);
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })));
    }
}

fn sync_store(disk: &SimDisk) -> Store {
    Store::open("/async", common::sim_options(disk, Durability::Sync)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_async_calls_keep_the_contract() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(common::open(dir.path(), &clock));
    let token = acquired(DedupeStore::claim(&*store, b"k", b"req").await.unwrap());
    assert!(matches!(DedupeStore::claim(&*store, b"k", b"req").await.unwrap(), Claim::InProgress { .. }));
    assert_eq!(DedupeStore::claim(&*store, b"k", b"other").await.unwrap(), Claim::Mismatch);
    DedupeStore::checkpoint(&*store, &token, b"step 1").await.unwrap();
    assert!(
        matches!(DedupeStore::get(&*store, b"k").await.unwrap(), Some(Entry::InFlight { checkpoint: Some(c), .. }) if c == b"step 1")
    );
    DedupeStore::complete(&*store, &token, b"done").await.unwrap();
    let Claim::Completed(done) = DedupeStore::claim(&*store, b"k", b"req").await.unwrap() else { panic!("no replay") };
    assert_eq!(done.outcome, b"done");
    assert!(matches!(DedupeStore::complete(&*store, &token, b"again").await, Err(Error::StaleToken)));
    DedupeStore::remove(&*store, b"k").await.unwrap();
    assert_eq!(DedupeStore::get(&*store, b"k").await.unwrap(), None);
    let token = acquired(DedupeStore::claim(&*store, b"k", b"req2").await.unwrap());
    DedupeStore::release(&*store, &token).await.unwrap();
    assert!(matches!(DedupeStore::claim(&*store, b"", b"req").await, Err(Error::EmptyKey)));
    // The blocking calls see what the async ones wrote.
    assert_eq!(store.get("k").unwrap(), None);
}

/// One runtime thread: if a durable claim held it for the fsync, the task that opens the gate
/// could never run.
#[tokio::test(flavor = "current_thread")]
async fn a_durable_write_waits_for_its_sync_without_holding_the_runtime_thread() {
    let disk = SimDisk::new();
    let store = Arc::new(sync_store(&disk));
    let gate = Arc::new(SyncGate::default());
    gate.install(&disk);
    gate.closed.store(true, Ordering::SeqCst);
    let claiming = tokio::spawn({
        let store = Arc::clone(&store);
        async move { DedupeStore::claim(&*store, b"k", b"req").await }
    });
    // Runs on the same thread while the claim's sync is held.
    let opener = tokio::spawn({
        let gate = Arc::clone(&gate);
        async move {
            while gate.held.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            gate.closed.store(false, Ordering::SeqCst);
        }
    });
    let token = acquired(claiming.await.unwrap().unwrap());
    opener.await.unwrap();
    assert!(
        !gate.timed_out.load(Ordering::SeqCst),
        "the sync was held until its timeout: the runtime thread was blocked"
    );
    assert!(gate.held.load(Ordering::SeqCst) >= 1, "the claim waited for a sync");
    DedupeStore::complete(&*store, &token, b"done").await.unwrap();
    drop(store);
    // What the claim answered was durable: it survives a power cut.
    let after = disk.power_cut(None);
    let store = sync_store(&after);
    assert_eq!(common::outcome_of(&store, "k"), Some(b"done".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_durable_claims_share_syncs_and_each_key_is_acquired_once() {
    let disk = SimDisk::new();
    let store = Arc::new(sync_store(&disk));
    let mut tasks = Vec::new();
    for task in 0..16 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut acquired = 0;
            for i in 0..50 {
                // Every key is claimed by two tasks.
                let key = format!("key-{}-{i}", task % 8);
                if let Claim::Acquired(token) = DedupeStore::claim(&*store, key.as_bytes(), b"req").await.unwrap() {
                    acquired += 1;
                    DedupeStore::complete(&*store, &token, b"ok").await.unwrap();
                }
            }
            acquired
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    assert_eq!(total, 8 * 50, "each key acquired exactly once");
    let syncs = store.stats().syncs_total;
    assert!(syncs < 2 * 8 * 50, "{syncs} syncs for {} durable writes: none shared", 2 * 8 * 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_fails_every_async_write_waiting_for_it() {
    let disk = SimDisk::new();
    let store = Arc::new(sync_store(&disk));
    let token = acquired(DedupeStore::claim(&*store, b"a", b"req").await.unwrap());
    disk.fail_sync_after(0);
    let answer = DedupeStore::complete(&*store, &token, b"done").await;
    common::assert_poisoned_by_fsync("complete", answer);
    common::assert_poisoned_by_fsync("claim", DedupeStore::claim(&*store, b"b", b"req").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_claim_is_woken_by_the_holders_complete_and_release() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(common::open(dir.path(), &clock));
    let wait = ClaimOptions { wait: Some(Duration::from_secs(30)), ..Default::default() };

    let token = acquired(DedupeStore::claim(&*store, b"done", b"req").await.unwrap());
    let waiter = tokio::spawn({
        let (store, wait) = (Arc::clone(&store), wait.clone());
        async move { DedupeStore::claim_with(&*store, b"done", b"req", wait).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiter.is_finished(), "the waiter waits while the holder runs");
    DedupeStore::complete(&*store, &token, b"outcome").await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken by the complete").unwrap();
    assert!(matches!(answer.unwrap(), Claim::Completed(done) if done.outcome == b"outcome"));

    // A holder using the blocking API wakes async waiters too.
    let token = acquired(store.claim("freed", b"req").unwrap());
    let waiter = tokio::spawn({
        let (store, wait) = (Arc::clone(&store), wait.clone());
        async move { DedupeStore::claim_with(&*store, b"freed", b"req", wait).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.release(&token).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken by the release").unwrap();
    assert!(matches!(answer.unwrap(), Claim::Acquired(t) if !t.recovered()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_claim_takes_over_when_the_holders_lease_ends_and_gives_up_at_its_bound() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(common::open(dir.path(), &clock));
    let short_lease = ClaimOptions { lease: Some(Duration::from_millis(30)), ..Default::default() };
    let _held = acquired(DedupeStore::claim_with(&*store, b"k", b"req", short_lease).await.unwrap());

    // Bounded: the wait ends with `InProgress` when the bound passes first.
    let bounded = ClaimOptions { wait: Some(Duration::from_millis(10)), ..Default::default() };
    assert!(matches!(DedupeStore::claim_with(&*store, b"k", b"req", bounded).await.unwrap(), Claim::InProgress { .. }));

    // The lease ends (store time moves on): a waiter that looks again at the lease's end takes over.
    let waiter = tokio::spawn({
        let store = Arc::clone(&store);
        let wait = ClaimOptions { wait: Some(Duration::from_secs(30)), ..Default::default() };
        async move { DedupeStore::claim_with(&*store, b"k", b"req", wait).await }
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    clock.advance(Duration::from_millis(31));
    let answer = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken at the lease's end").unwrap();
    assert!(matches!(answer.unwrap(), Claim::Acquired(t) if t.recovered()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_wrapped_in_a_timeout_can_be_dropped_and_the_store_goes_on() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(common::open(dir.path(), &clock));
    let token = acquired(DedupeStore::claim(&*store, b"k", b"req").await.unwrap());
    let wait = ClaimOptions { wait: Some(Duration::from_secs(60)), ..Default::default() };
    for _ in 0..100 {
        let gave_up = tokio::time::timeout(
            Duration::from_millis(1),
            DedupeStore::claim_with(&*store, b"k", b"req", wait.clone()),
        )
        .await;
        assert!(gave_up.is_err(), "the caller's timeout ends the wait");
    }
    DedupeStore::complete(&*store, &token, b"done").await.unwrap();
    let Claim::Completed(done) = DedupeStore::claim_with(&*store, b"k", b"req", wait).await.unwrap() else { panic!() };
    assert_eq!(done.outcome, b"done");
}

/// A claim whose future is dropped while its record's sync is held: its caller never saw the
/// token, so the key is released, not left in flight until the lease ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_future_dropped_before_it_returns_leaves_the_key_free() {
    let disk = SimDisk::new();
    let store = Arc::new(sync_store(&disk));
    let gate = Arc::new(SyncGate::default());
    gate.install(&disk);
    gate.closed.store(true, Ordering::SeqCst);
    let claiming = tokio::spawn({
        let store = Arc::clone(&store);
        async move { DedupeStore::claim(&*store, b"k", b"req").await }
    });
    while gate.held.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    claiming.abort();
    assert!(claiming.await.unwrap_err().is_cancelled());
    gate.closed.store(false, Ordering::SeqCst);
    let token = acquired(DedupeStore::claim(&*store, b"k", b"req").await.unwrap());
    assert!(!token.recovered(), "the dropped claim was released, not taken over");

    // A token that was handed out and then dropped keeps its key in flight: the effect may
    // have started.
    drop(token);
    assert!(matches!(DedupeStore::claim(&*store, b"k", b"req").await.unwrap(), Claim::InProgress { .. }));
    assert!(!gate.timed_out.load(Ordering::SeqCst));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_claims_are_reported_to_the_claim_hook() {
    let reported = Arc::new(AtomicUsize::new(0));
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let counter = Arc::clone(&reported);
    let options = idemstore::Options {
        on_claim: Some(Arc::new(move |event: &idemstore::ClaimEvent<'_>| {
            if event.answer == idemstore::Answer::Replayed {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        })),
        ..common::options(&clock)
    };
    let store = Arc::new(Store::open(dir.path(), options).unwrap());
    let token = acquired(DedupeStore::claim(&*store, b"k", b"r").await.unwrap());
    DedupeStore::complete(&*store, &token, b"done").await.unwrap();
    for _ in 0..3 {
        assert_eq!(DedupeStore::claim(&*store, b"k", b"r").await.unwrap().answer(), idemstore::Answer::Replayed);
    }
    assert_eq!(reported.load(Ordering::SeqCst), 3);
}
