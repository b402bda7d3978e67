//! Edge cases of the async API, the window calls, scans, namespaces and export/import: each
//! test drives the engine to where a promise could break.
//!
//! Each test states one promise (from docs/guide.md, README "Guarantees" or the doc comments)
//! and drives the engine to where it could break. Futures are polled by hand with a waker
//! that reports to a channel, so a test decides exactly where a future stands (pending on its
//! sync, pending on its key) and whether anything woke it. Syncs of the simulated disk are
//! held at a gate where a test needs a record written but not yet durable.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use idemstore::sim::SimDisk;
use idemstore::{Advance, Claim, ClaimOptions, DedupeStore, Durability, Entry, Error, ManualClock, Options, Store};

mod common;
use common::{START_MS, acquired, at};

// ---------------------------------------------------------------------------------------------
// Harness: a waker that reports to a channel, and a gate for the simulated disk's syncs.

struct ChannelWaker(Mutex<Sender<()>>);

impl Wake for ChannelWaker {
    fn wake(self: Arc<Self>) {
        let _ = self.0.lock().unwrap().send(());
    }
}

/// A waker and the channel its wake-ups arrive on.
fn reporting_waker() -> (Waker, Receiver<()>) {
    let (tx, rx) = channel();
    (Waker::from(Arc::new(ChannelWaker(Mutex::new(tx)))), rx)
}

fn poll_once<F: Future>(future: Pin<&mut F>, waker: &Waker) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(waker))
}

/// Holds every sync of a simulated disk at its start while closed (each for at most 20 s, then
/// it goes on and `timed_out` records it), except `allow` of them.
#[derive(Default)]
struct Gate {
    closed: AtomicBool,
    allow: AtomicUsize,
    held: AtomicUsize,
    passed: AtomicUsize,
    timed_out: AtomicBool,
}

impl Gate {
    fn install(disk: &SimDisk) -> Arc<Gate> {
        let gate = Arc::new(Gate::default());
        let hook = Arc::clone(&gate);
        disk.before_each_sync(Some(Arc::new(move || {
            if hook.closed.load(Ordering::SeqCst) {
                hook.held.fetch_add(1, Ordering::SeqCst);
                let started = Instant::now();
                loop {
                    if !hook.closed.load(Ordering::SeqCst) {
                        break;
                    }
                    let allowed = hook.allow.load(Ordering::SeqCst);
                    if allowed > 0
                        && hook.allow.compare_exchange(allowed, allowed - 1, Ordering::SeqCst, Ordering::SeqCst).is_ok()
                    {
                        break;
                    }
                    if started.elapsed() > Duration::from_secs(20) {
                        hook.timed_out.store(true, Ordering::SeqCst);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                hook.held.fetch_sub(1, Ordering::SeqCst);
            }
            hook.passed.fetch_add(1, Ordering::SeqCst);
        })));
        gate
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    fn open(&self) {
        self.closed.store(false, Ordering::SeqCst);
    }

    /// Waits (at most 10 s) until a sync is held at the gate.
    fn wait_for_held(&self) {
        let started = Instant::now();
        while self.held.load(Ordering::SeqCst) == 0 {
            assert!(started.elapsed() < Duration::from_secs(10), "no sync reached the gate");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn sim_options(disk: &SimDisk, clock: &Arc<ManualClock>, durability: Durability) -> Options {
    Options { durability, clock: clock.clone(), io: Arc::new(disk.clone()), background: false, ..Options::default() }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

// ---------------------------------------------------------------------------------------------
// Async API: cancellation.

/// Promise (guide, "Cancellation"): a token handed out and then dropped keeps its key in flight
/// until the lease ends, "the next claim then takes over with `recovered()` and the last
/// checkpoint"; a `claim` future dropped before it returns "leaves nothing held". Here the
/// first holder's lease ran out (it may still be running its effect, or have died); an async
/// claim takes the key over and is dropped before it returns. The next claim must still learn
/// that an earlier holder may have run the effect, and from which checkpoint: the dropped
/// future's caller never saw the token, so it must give back what it took, not erase it.
#[test]
fn a_dropped_takeover_future_keeps_the_earlier_holders_recovery_state() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open("/probe", sim_options(&disk, &clock, Durability::Sync)).unwrap();
    let first =
        acquired(store.claim_with("k", b"req", ClaimOptions { lease: Some(secs(1)), ..Default::default() }).unwrap());
    store.checkpoint(&first, b"card charged").unwrap();
    clock.advance(secs(2)); // the first holder's lease has ended

    let gate = Gate::install(&disk);
    gate.close();
    let (waker, _woken) = reporting_waker();
    let mut takeover = Box::pin(DedupeStore::claim(&store, b"k", b"req"));
    assert!(poll_once(takeover.as_mut(), &waker).is_pending(), "the takeover waits for its sync");
    drop(takeover); // cancelled before it returned: its caller never saw the token
    gate.open();

    let next = acquired(store.claim("k", b"req").unwrap());
    assert!(
        next.recovered() && next.checkpoint() == Some(&b"card charged"[..]),
        "the next claim must take over from the first holder (recovered, checkpoint \"card charged\"); \
         got recovered={} checkpoint={:?}: the dropped future's release erased the earlier holder's state",
        next.recovered(),
        next.checkpoint().map(String::from_utf8_lossy),
    );
}

/// The same through a reopen: an orphan of a dead process, with a checkpoint, is taken over by
/// an async claim that is dropped before it returns; `orphans()` must still list it and the
/// next claim resume from its checkpoint.
#[test]
fn a_dropped_takeover_future_of_an_orphan_keeps_it_an_orphan() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    {
        let store = Store::open("/probe", sim_options(&disk, &clock, Durability::Sync)).unwrap();
        let token = acquired(store.claim("k", b"req").unwrap());
        store.checkpoint(&token, b"step 2").unwrap();
        // The process dies with the claim held.
    }
    let disk = disk.power_cut(None);
    let store = Store::open("/probe", sim_options(&disk, &clock, Durability::Sync)).unwrap();
    assert_eq!(store.orphans().unwrap().len(), 1);
    let gate = Gate::install(&disk);
    gate.close();
    let (waker, _woken) = reporting_waker();
    let mut takeover = Box::pin(DedupeStore::claim(&store, b"k", b"req"));
    assert!(poll_once(takeover.as_mut(), &waker).is_pending());
    drop(takeover);
    gate.open();

    let orphans = store.orphans().unwrap();
    let next = acquired(store.claim("k", b"req").unwrap());
    assert!(
        orphans.len() == 1 && next.recovered() && next.checkpoint() == Some(&b"step 2"[..]),
        "after a cancelled takeover: orphans()={} entries, next claim recovered={} checkpoint={:?}",
        orphans.len(),
        next.recovered(),
        next.checkpoint().map(String::from_utf8_lossy),
    );
}

/// Control: a fresh claim future dropped before it returns leaves the key free (the promise the
/// release exists for), at every poll of a gated sync.
#[test]
fn a_dropped_fresh_claim_future_leaves_the_key_free() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open("/probe", sim_options(&disk, &clock, Durability::Sync)).unwrap();
    let gate = Gate::install(&disk);
    gate.close();
    let (waker, _woken) = reporting_waker();
    let mut claim = Box::pin(DedupeStore::claim(&store, b"k", b"req"));
    assert!(poll_once(claim.as_mut(), &waker).is_pending());
    gate.wait_for_held();
    drop(claim);
    gate.open();
    let next = acquired(store.claim("k", b"req").unwrap());
    assert!(!next.recovered());
}

/// A `claim_with(wait)` future at each of its await points: dropped while it waits for the key,
/// the holder keeps the key; dropped after its wake-up acquired the key but before that record
/// is durable, the key is free again (fresh, not a takeover); once it returned the token,
/// dropping the finished future releases nothing.
#[test]
fn a_waiting_claim_future_dropped_at_each_await_point() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Arc::new(Store::open("/probe", sim_options(&disk, &clock, Durability::Sync)).unwrap());
    let wait = ClaimOptions { wait: Some(secs(30)), ..Default::default() };
    let holder = acquired(store.claim("k", b"req").unwrap());

    // Dropped while it listens: nothing changes for the holder.
    let (waker, _) = reporting_waker();
    let mut waiter = Box::pin(DedupeStore::claim_with(&*store, b"k", b"req", wait.clone()));
    assert!(poll_once(waiter.as_mut(), &waker).is_pending());
    drop(waiter);
    assert!(matches!(store.claim("k", b"req").unwrap(), Claim::InProgress { .. }));

    // Woken by the release, acquires, and is dropped while its record's sync is held.
    let (waker, woken) = reporting_waker();
    let mut waiter = Box::pin(DedupeStore::claim_with(&*store, b"k", b"req", wait.clone()));
    assert!(poll_once(waiter.as_mut(), &waker).is_pending());
    let gate = Gate::install(&disk);
    gate.close();
    let releaser = std::thread::spawn({
        let store = Arc::clone(&store);
        move || store.release(&holder)
    });
    woken.recv_timeout(secs(5)).expect("woken by the release");
    assert!(poll_once(waiter.as_mut(), &waker).is_pending(), "its acquisition waits for the sync");
    drop(waiter);
    gate.open();
    releaser.join().unwrap().unwrap();
    let next = acquired(store.claim("k", b"req").unwrap());
    assert!(!next.recovered(), "the dropped waiter's claim was released");

    // A future that returned its token releases nothing when dropped.
    store.release(&next).unwrap();
    let (waker, _) = reporting_waker();
    let mut claim = Box::pin(DedupeStore::claim_with(&*store, b"k", b"req", wait));
    let token = loop {
        match poll_once(claim.as_mut(), &waker) {
            Poll::Ready(answer) => break acquired(answer.unwrap()),
            Poll::Pending => std::thread::sleep(ms(1)),
        }
    };
    drop(claim);
    assert!(matches!(store.claim("k", b"req").unwrap(), Claim::InProgress { .. }), "the caller holds the key");
    store.complete(&token, b"out").unwrap();
}

/// A waiting claim future forgotten (never dropped) leaves its registration behind; the store
/// must still close, release its directory lock, and reopen.
#[test]
fn a_store_with_a_forgotten_waiting_future_still_closes_and_reopens() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let store = common::open(dir.path(), &clock);
    let _held = acquired(store.claim("k", b"req").unwrap());
    let (waker, _) = reporting_waker();
    let wait = ClaimOptions { wait: Some(secs(30)), ..Default::default() };
    let mut waiter = Box::pin(DedupeStore::claim_with(&store, b"k", b"req", wait));
    assert!(poll_once(waiter.as_mut(), &waker).is_pending());
    std::mem::forget(waiter);
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        drop(store);
        let _ = tx.send(());
    });
    rx.recv_timeout(secs(5)).expect("the store's drop returned");
    let reopened = common::open(dir.path(), &clock);
    assert!(reopened.get("k").unwrap().is_some());
}

// ---------------------------------------------------------------------------------------------
// Async API: waits on a key.

/// Promise (README "Window": "a waiting claim wakes at the window's end as well as the
/// lease's"; `DedupeStore::claim_with`: "the future resolves when the holder completes or gives
/// up, its lease or the key's window ends, or the wait runs out"). A key claimed with a window
/// (100 ms) shorter than its lease (60 s): once the window has ended the key is absent, and
/// the waiter must look again then, not at the lease's end or its own 30 s bound.
#[test]
fn an_async_waiter_wakes_when_the_keys_window_ends_before_the_lease() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let store = common::open(dir.path(), &clock);
    let short_window = ClaimOptions { ttl: Some(ms(100)), lease: Some(secs(60)), ..Default::default() };
    let _held = acquired(store.claim_with("k", b"req", short_window).unwrap());

    let (waker, woken) = reporting_waker();
    let wait = ClaimOptions { wait: Some(secs(30)), ..Default::default() };
    let mut waiter = Box::pin(DedupeStore::claim_with(&store, b"k", b"req", wait));
    assert!(poll_once(waiter.as_mut(), &waker).is_pending(), "the key is in flight");
    clock.advance(ms(200)); // the key's window has ended: it is absent now
    assert!(store.get("k").unwrap().is_none());

    // The window ended 100 ms (store time) after the claim: the waiter's timer should fire about
    // 100 ms after it registered. 5 s is far beyond that and far below the 60 s lease.
    let woke = woken.recv_timeout(secs(5)).is_ok();
    assert!(woke, "the waiter was not woken within 5 s of its key's window ending (it sleeps until the lease's end)");
    match poll_once(waiter.as_mut(), &waker) {
        Poll::Ready(Ok(Claim::Acquired(_))) => {}
        other => panic!("after its wake-up: {other:?}"),
    }
}

/// Control for the test above: the blocking waiter does wake at the window's end.
#[test]
fn a_blocking_waiter_wakes_when_the_keys_window_ends_before_the_lease() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(common::open(dir.path(), &clock));
    let short_window = ClaimOptions { ttl: Some(ms(100)), lease: Some(secs(60)), ..Default::default() };
    let _held = acquired(store.claim_with("k", b"req", short_window).unwrap());
    let (tx, rx) = channel();
    let waiter = std::thread::spawn({
        let store = Arc::clone(&store);
        move || {
            let wait = ClaimOptions { wait: Some(secs(30)), ..Default::default() };
            let _ = tx.send(store.claim_with("k", b"req", wait));
        }
    });
    std::thread::sleep(ms(20));
    clock.advance(ms(200));
    let answer = rx.recv_timeout(secs(5)).expect("the blocking waiter woke at the window's end");
    assert!(matches!(answer, Ok(Claim::Acquired(_))), "{answer:?}");
    waiter.join().unwrap();
}

/// An async waiter wakes at the holder's lease end, but the holder extended its lease meanwhile:
/// the waiter must look again, see the new lease and keep waiting (no takeover), then get the
/// holder's outcome.
#[test]
fn an_async_waiter_keeps_waiting_when_the_holder_extends_its_lease() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let store = common::open(dir.path(), &clock);
    let holder =
        acquired(store.claim_with("k", b"req", ClaimOptions { lease: Some(ms(100)), ..Default::default() }).unwrap());
    let (waker, woken) = reporting_waker();
    let wait = ClaimOptions { wait: Some(secs(30)), ..Default::default() };
    let mut waiter = Box::pin(DedupeStore::claim_with(&store, b"k", b"req", wait));
    assert!(poll_once(waiter.as_mut(), &waker).is_pending());
    store.extend_lease(&holder, secs(60)).unwrap();
    // The first timer (the old lease's end, 100 ms) fires: the waiter looks again.
    woken.recv_timeout(secs(5)).expect("woken at the old lease's end");
    assert!(poll_once(waiter.as_mut(), &waker).is_pending(), "the lease was extended: still waiting");
    store.complete(&holder, b"out").unwrap();
    woken.recv_timeout(secs(5)).expect("woken by the complete");
    assert!(
        matches!(poll_once(waiter.as_mut(), &waker), Poll::Ready(Ok(Claim::Completed(done))) if done.outcome == b"out")
    );
}

/// Promise (`DedupeStore::claim_with`: resolves when "the wait runs out"; guide: "Wrap it in
/// your runtime's timeout, or drop it"): a wait's own bound does not depend on the disk.
/// Here another write's sync is slow (held at the gate, as a stalled fsync would be): a
/// claim waiting 50 ms for a key in flight must still give up after about 50 ms.
#[test]
fn an_async_waits_bound_fires_while_another_writes_sync_is_slow() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open("/probe", sim_options(&disk, &clock, Durability::Sync)).unwrap();
    let _held = acquired(store.claim("held", b"req").unwrap());

    let gate = Gate::install(&disk);
    gate.close();
    let (write_waker, _) = reporting_waker();
    let mut slow_write = Box::pin(DedupeStore::claim(&store, b"other", b"req"));
    assert!(poll_once(slow_write.as_mut(), &write_waker).is_pending());
    gate.wait_for_held(); // the async committer is inside that sync

    let (waker, woken) = reporting_waker();
    let wait = ClaimOptions { wait: Some(ms(50)), ..Default::default() };
    let mut waiter = Box::pin(DedupeStore::claim_with(&store, b"held", b"req", wait));
    assert!(poll_once(waiter.as_mut(), &waker).is_pending());
    let woke = woken.recv_timeout(secs(3)).is_ok();
    gate.open();
    assert!(woke, "a 50 ms wait was not woken within 3 s: its timer waits for an unrelated sync to end");
    assert!(matches!(poll_once(waiter.as_mut(), &waker), Poll::Ready(Ok(Claim::InProgress { .. }))));
    let _ = woken.recv_timeout(secs(5));
    assert!(!gate.timed_out.load(Ordering::SeqCst));
}

/// Promise (`Stats::duplicates_waited_total`): "Duplicate claims that waited for the holder and
/// then got its outcome (not counted in `duplicates_replayed_total`)". The blocking and the
/// async waiter must count alike: one waited duplicate, nothing in progress, nothing replayed.
#[test]
fn an_async_wait_counts_as_a_waited_duplicate_like_a_blocking_one() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(common::open(dir.path(), &clock));
    let wait = ClaimOptions { wait: Some(secs(30)), ..Default::default() };

    // Blocking waiter.
    let token = acquired(store.claim("blocking", b"req").unwrap());
    let waiter = std::thread::spawn({
        let (store, wait) = (Arc::clone(&store), wait.clone());
        move || store.claim_with("blocking", b"req", wait)
    });
    std::thread::sleep(ms(50));
    store.complete(&token, b"done").unwrap();
    assert!(matches!(waiter.join().unwrap(), Ok(Claim::Completed(_))));
    let blocking = store.stats();

    // Async waiter.
    let token = acquired(store.claim("async", b"req").unwrap());
    let (waker, woken) = reporting_waker();
    let mut waiter = Box::pin(DedupeStore::claim_with(&*store, b"async", b"req", wait));
    assert!(poll_once(waiter.as_mut(), &waker).is_pending());
    store.complete(&token, b"done").unwrap();
    woken.recv_timeout(secs(5)).expect("woken by the complete");
    assert!(matches!(poll_once(waiter.as_mut(), &waker), Poll::Ready(Ok(Claim::Completed(_)))));
    let after = store.stats();

    let delta = |f: fn(&idemstore::Stats) -> u64, a: &idemstore::Stats, b: &idemstore::Stats| f(b) - f(a);
    let base = idemstore::Stats::default();
    let blocking_counts = (
        delta(|s| s.duplicates_waited_total, &base, &blocking),
        delta(|s| s.duplicates_in_progress_total, &base, &blocking),
        delta(|s| s.duplicates_replayed_total, &base, &blocking),
    );
    let async_counts = (
        delta(|s| s.duplicates_waited_total, &blocking, &after),
        delta(|s| s.duplicates_in_progress_total, &blocking, &after),
        delta(|s| s.duplicates_replayed_total, &blocking, &after),
    );
    assert_eq!(blocking_counts, (1, 0, 0), "blocking (waited, in_progress, replayed)");
    assert_eq!(async_counts, blocking_counts, "async (waited, in_progress, replayed) differs from blocking");
}

/// Lost wake-ups: many async waiters, each on its own key, whose holders complete or release
/// (from another thread, blocking and async mixed) at random moments around the registration.
/// Every waiter must resolve with the holder's answer well before its 60 s bound.
#[test]
fn no_async_waiter_misses_its_holders_complete_or_release() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(common::open(dir.path(), &clock));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..400u64 {
            let key = format!("k{i}");
            let token = acquired(store.claim(&key, b"req").unwrap());
            let waiter = tokio::spawn({
                let (store, key) = (Arc::clone(&store), key.clone());
                async move {
                    let wait = ClaimOptions { wait: Some(secs(60)), ..Default::default() };
                    DedupeStore::claim_with(&*store, key.as_bytes(), b"req", wait).await
                }
            });
            let finisher = tokio::task::spawn_blocking({
                let store = Arc::clone(&store);
                move || {
                    for _ in 0..(i * 7919 % 200) {
                        std::hint::spin_loop();
                    }
                    if i % 2 == 0 { store.complete(&token, b"out") } else { store.release(&token) }
                }
            });
            tasks.push((i, waiter, finisher));
        }
        for (i, waiter, finisher) in tasks {
            finisher.await.unwrap().unwrap();
            let answer = tokio::time::timeout(secs(10), waiter)
                .await
                .unwrap_or_else(|_| panic!("waiter {i} was never woken"))
                .unwrap()
                .unwrap();
            match (i % 2, answer) {
                (0, Claim::Completed(done)) => assert_eq!(done.outcome, b"out"),
                (1, Claim::Acquired(t)) => assert!(!t.recovered()),
                (_, other) => panic!("waiter {i}: {other:?}"),
            }
        }
    });
}

/// A task whose only owner, once its executor let it go, is its waker: waking it drops the
/// task and so its future (as a hand-rolled executor does when its queue is gone). A waker may
/// run any code when woken; the store must not call one while holding its own locks.
type ClaimFuture = Pin<Box<dyn Future<Output = idemstore::Result<Claim>> + Send>>;

struct SelfOwnedTask {
    future: Mutex<Option<ClaimFuture>>,
}

impl Wake for SelfOwnedTask {
    fn wake(self: Arc<Self>) {
        // The executor is gone: nothing will poll the task again, so it is dropped here (the
        // last reference goes with `self`).
        drop(self);
    }
}

/// A claim waiting 50 ms for a key in flight, in a task dropped by its own wake-up: when its
/// timer fires, the store must go on (here: the next durable async write completes, and the
/// store can still be dropped).
#[test]
fn a_waker_that_drops_its_task_does_not_deadlock_the_async_committer() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Arc::new(Store::open("/probe", sim_options(&disk, &clock, Durability::Sync)).unwrap());
    let _held = acquired(store.claim("held", b"req").unwrap());
    let task = Arc::new(SelfOwnedTask {
        future: Mutex::new(Some(Box::pin({
            let store = Arc::clone(&store);
            async move {
                let wait = ClaimOptions { wait: Some(ms(50)), ..Default::default() };
                DedupeStore::claim_with(&*store, b"held", b"req", wait).await
            }
        }))),
    });
    let waker = Waker::from(Arc::clone(&task));
    {
        let mut slot = task.future.lock().unwrap();
        let pending = slot.as_mut().unwrap().as_mut().poll(&mut Context::from_waker(&waker));
        assert!(pending.is_pending());
    }
    drop(waker);
    drop(task); // the executor lets go: the store's copy of the waker is the last owner
    std::thread::sleep(ms(300)); // the 50 ms timer has fired by now

    // Does the store still answer? An async durable write (through the committer thread) and a
    // blocking complete of the key that was waited for, each on a thread of its own.
    let (tx, answers) = channel::<&'static str>();
    std::thread::spawn({
        let (store, tx) = (Arc::clone(&store), tx.clone());
        move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            if rt.block_on(DedupeStore::claim(&*store, b"after", b"req")).is_ok() {
                let _ = tx.send("async claim");
            }
        }
    });
    std::thread::spawn({
        let store = Arc::clone(&store);
        move || {
            if store.complete(&_held, b"done").is_ok() {
                let _ = tx.send("blocking complete");
            }
        }
    });
    let mut answered = Vec::new();
    while let Ok(what) = answers.recv_timeout(secs(5)) {
        answered.push(what);
        if answered.len() == 2 {
            break;
        }
    }
    if answered.len() < 2 {
        // Stuck threads hold the store: dropping it here would join the stuck committer.
        std::mem::forget(store);
        panic!(
            "within 5 s after a waiting claim's task was dropped by its own wake-up, only {answered:?} \
             of [async claim, blocking complete] answered: the store's async state lock is held forever"
        );
    }
}

struct PanickingWaker;

impl Wake for PanickingWaker {
    fn wake(self: Arc<Self>) {
        panic!("a waker that panics");
    }
}

/// README ("No silent background failure"): a panic of a background thread is counted and
/// kept, and a store that can no longer sync says so (`Poisoned`). A waiting claim whose
/// waker panics when its timer fires (user code, run on the async committer thread): later
/// async durable writes must still be answered (or fail), never wait forever.
#[test]
fn a_panicking_waker_does_not_silently_stop_async_durability() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Arc::new(Store::open("/probe", sim_options(&disk, &clock, Durability::Sync)).unwrap());
    let _held = acquired(store.claim("held", b"req").unwrap());
    let waker = Waker::from(Arc::new(PanickingWaker));
    let wait = ClaimOptions { wait: Some(ms(50)), ..Default::default() };
    let mut waiter = Box::pin(DedupeStore::claim_with(&*store, b"held", b"req", wait));
    assert!(poll_once(waiter.as_mut(), &waker).is_pending());
    std::thread::sleep(ms(300)); // the timer fired and the waker panicked

    let (tx, rx) = channel();
    std::thread::spawn({
        let store = Arc::clone(&store);
        move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let answer = rt.block_on(DedupeStore::claim(&*store, b"after", b"req")).map(|c| c.answer());
            let _ = tx.send(answer);
        }
    });
    let answer = rx.recv_timeout(secs(5));
    let stats = store.stats();
    if answer.is_err() {
        std::mem::forget(waiter);
        std::mem::forget(store);
        panic!(
            "an async durable write got no answer within 5 s after a waker panicked on the committer \
             thread (maintenance_errors_total {}, warnings {:?}, last_maintenance_error {:?})",
            stats.maintenance_errors_total, stats.warnings, stats.last_maintenance_error
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Async API: durability.

/// Promise (README `Durability::Sync`): no answer is read from a record that is not durable.
/// An async `get` of a key whose claim record is written but whose sync is held must not
/// answer before that sync.
#[test]
fn an_async_get_does_not_answer_from_a_record_whose_sync_is_held() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open("/probe", sim_options(&disk, &clock, Durability::Sync)).unwrap();
    let gate = Gate::install(&disk);
    gate.close();
    let (waker, _) = reporting_waker();
    let mut claim = Box::pin(DedupeStore::claim(&store, b"k", b"req"));
    assert!(poll_once(claim.as_mut(), &waker).is_pending());
    gate.wait_for_held();
    let (get_waker, _) = reporting_waker();
    let mut get = Box::pin(DedupeStore::get(&store, b"k"));
    let answered = poll_once(get.as_mut(), &get_waker);
    gate.open();
    assert!(answered.is_pending(), "answered {answered:?} while the record it rests on was not durable");
}

/// Promise: a waiter registered while a sync runs is not answered by that sync when its record
/// came after the sync's batch was cut. One sync is let through; the write that registered
/// during it must stay pending until a second sync, and must survive a power cut once answered.
#[test]
fn an_async_write_registered_during_a_sync_waits_for_the_next_one() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open("/probe", sim_options(&disk, &clock, Durability::Sync)).unwrap();
    let gate = Gate::install(&disk);
    gate.close();
    let (waker_a, _) = reporting_waker();
    let mut a = Box::pin(DedupeStore::claim(&store, b"a", b"req"));
    assert!(poll_once(a.as_mut(), &waker_a).is_pending());
    gate.wait_for_held(); // the committer's sync of `a` is cut and held
    let (waker_b, woken_b) = reporting_waker();
    let mut b = Box::pin(DedupeStore::claim(&store, b"b", b"req"));
    assert!(poll_once(b.as_mut(), &waker_b).is_pending());
    let passed_before = gate.passed.load(Ordering::SeqCst);
    gate.allow.store(1, Ordering::SeqCst); // only the held sync goes on
    let early = woken_b.recv_timeout(ms(500)).is_ok();
    let b_early = if early { Some(poll_once(b.as_mut(), &waker_b)) } else { None };
    // If `b` was answered, its record must already be durable: cut the power now.
    let cut = disk.power_cut(None);
    gate.open();
    if let Some(Poll::Ready(Ok(Claim::Acquired(_)))) = b_early {
        let passed = gate.passed.load(Ordering::SeqCst) - passed_before;
        let reopened = Store::open("/probe", sim_options(&cut, &clock, Durability::Sync)).unwrap();
        assert!(
            reopened.get("b").unwrap().is_some(),
            "b was answered Acquired after {passed} sync(s) but its record did not survive a power cut"
        );
    }
}

/// Promise (README "Clock steps back": under `Sync`, "no answer is given at a time that is not
/// durable"). An async `get` that reads a key as expired answers from the store's time: it
/// must wait for the time floor's sync (held here), not answer at once.
#[test]
fn an_async_get_of_an_expired_key_waits_for_the_time_floor() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open("/probe", sim_options(&disk, &clock, Durability::Sync)).unwrap();
    let t = acquired(store.claim_with("k", b"req", ClaimOptions { ttl: Some(secs(1)), ..Default::default() }).unwrap());
    store.complete(&t, b"out").unwrap();
    clock.advance(secs(3600)); // far past every durable time
    let gate = Gate::install(&disk);
    gate.close();
    let (waker, _) = reporting_waker();
    let mut get = Box::pin(DedupeStore::get(&store, b"k"));
    let answered = poll_once(get.as_mut(), &waker);
    gate.open();
    assert!(answered.is_pending(), "answered {answered:?} at a store time that was not durable");
}

/// Promise (guide, "Cancellation"): a dropped `complete` future may or may not have written
/// its record, as a crash would; a retry with the same token then answers `Ok` (it had not)
/// or `StaleToken` (it had: the token's holding ended with its own complete), and `get`
/// tells which: the key completed with this outcome.
#[test]
fn a_complete_retried_after_its_future_was_dropped_is_told_apart_by_get() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open("/probe", sim_options(&disk, &clock, Durability::Sync)).unwrap();
    let token = acquired(store.claim("k", b"req").unwrap());
    let gate = Gate::install(&disk);
    gate.close();
    let (waker, _) = reporting_waker();
    let mut complete = Box::pin(DedupeStore::complete(&store, &token, b"out"));
    assert!(poll_once(complete.as_mut(), &waker).is_pending(), "the complete waits for its sync");
    drop(complete); // the caller's timeout
    gate.open();
    let retried = store.complete(&token, b"out");
    assert!(matches!(retried, Ok(()) | Err(Error::StaleToken)), "{retried:?}");
    let Some(Entry::Completed(done)) = store.get("k").unwrap() else { panic!("the first complete landed") };
    assert_eq!(done.outcome, b"out", "get tells the caller its own complete landed");
}

/// Promise (`touch`): "a crash before that write is durable leaves the old window". A touch
/// whose sync is held, then a power cut: the key is there with its old window.
#[test]
fn a_touch_lost_to_a_power_cut_leaves_the_old_window() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let options = |disk: &SimDisk| Options { bucket_width: secs(60), ..sim_options(disk, &clock, Durability::Sync) };
    let store = Arc::new(Store::open("/probe", options(&disk)).unwrap());
    let t =
        acquired(store.claim_with("k", b"req", ClaimOptions { ttl: Some(secs(120)), ..Default::default() }).unwrap());
    store.complete(&t, b"out").unwrap();
    let gate = Gate::install(&disk);
    gate.close();
    let toucher = std::thread::spawn({
        let store = Arc::clone(&store);
        move || store.touch("k", secs(3600))
    });
    gate.wait_for_held();
    let cut = disk.power_cut(None);
    gate.open();
    toucher.join().unwrap().unwrap();
    let reopened = Store::open("/probe", options(&cut)).unwrap();
    let Some(Entry::Completed(done)) = reopened.get("k").unwrap() else { panic!("the key was lost") };
    assert_eq!((done.outcome.as_slice(), done.expires_at), (&b"out"[..], at(START_MS + 120_000)));
}

/// Promise (README "Failed fsync"): a failed sync fails every async write that waits on it,
/// durable and key waits alike; none hangs.
#[test]
fn a_failed_sync_fails_every_async_writer_in_its_batch() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open("/probe", sim_options(&disk, &clock, Durability::Sync)).unwrap();
    let gate = Gate::install(&disk);
    gate.close();
    let wakers: Vec<_> = (0..8).map(|_| reporting_waker()).collect();
    let mut futures: Vec<_> =
        (0..8).map(|i| Box::pin(DedupeStore::claim(&store, format!("k{i}").into_bytes().leak(), b"req"))).collect();
    for (f, (w, _)) in futures.iter_mut().zip(&wakers) {
        assert!(poll_once(f.as_mut(), w).is_pending());
    }
    disk.fail_sync_after(0);
    gate.open();
    for (i, (f, (w, rx))) in futures.iter_mut().zip(&wakers).enumerate() {
        let started = Instant::now();
        let answer = loop {
            if let Poll::Ready(answer) = poll_once(f.as_mut(), w) {
                break answer;
            }
            assert!(started.elapsed() < secs(10), "future {i} never resolved");
            let _ = rx.recv_timeout(ms(100));
        };
        common::assert_poisoned_by_fsync("async claim", answer);
    }
}

// ---------------------------------------------------------------------------------------------
// Window calls.

/// `touch` on an in-flight key, then the holder completes; the record lands in the bucket of
/// its new expiry; the old window's bucket dropping must not lose it, and after a power cut the
/// touched (durable) window is kept.
#[test]
fn a_touched_in_flight_key_keeps_its_window_through_completion_expiry_and_a_power_cut() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let options = || Options { bucket_width: secs(60), ..sim_options(&disk, &clock, Durability::Sync) };
    let store = Store::open("/probe", options()).unwrap();
    let token =
        acquired(store.claim_with("k", b"req", ClaimOptions { ttl: Some(secs(60)), ..Default::default() }).unwrap());
    let new_expiry = store.touch("k", secs(3600)).unwrap().unwrap();
    assert_eq!(new_expiry, at(START_MS + 3_600_000));
    store.complete(&token, b"out").unwrap();
    clock.advance(secs(180)); // the first window and its bucket have passed
    assert!(store.maintain().unwrap() >= 1, "the old bucket was dropped");
    assert_eq!(common::outcome_of(&store, "k"), Some(b"out".to_vec()));
    drop(store);
    let disk = disk.power_cut(None);
    let store =
        Store::open("/probe", Options { bucket_width: secs(60), ..sim_options(&disk, &clock, Durability::Sync) })
            .unwrap();
    let Some(Entry::Completed(done)) = store.get("k").unwrap() else { panic!("the touched key was lost") };
    assert_eq!((done.outcome.as_slice(), done.expires_at), (&b"out"[..], new_expiry));
    clock.advance(secs(3600));
    assert!(store.get("k").unwrap().is_none(), "expires at its touched time");
    store.maintain().unwrap();
    drop(store);
    let store =
        Store::open("/probe", Options { bucket_width: secs(60), ..sim_options(&disk, &clock, Durability::Sync) })
            .unwrap();
    assert!(store.get("k").unwrap().is_none(), "no record of the key comes back after expiry");
}

/// Invariant 3 with sealed tables: a completed key sealed in a table, touched (newer record in
/// RAM, later bucket), then sealed again; once the touched window ends and every bucket is
/// dropped, neither a reopen nor a lookup brings the old record back, and before that the
/// touched record wins over the sealed one.
#[test]
fn a_touched_key_never_falls_back_to_its_older_sealed_record() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open("/probe", common::sealing_sim_options(&disk, &clock)).unwrap();
    let token =
        acquired(store.claim_with("k", b"req", ClaimOptions { ttl: Some(secs(600)), ..Default::default() }).unwrap());
    store.complete(&token, b"out").unwrap();
    clock.advance(secs(10));
    store.maintain().unwrap(); // sealed
    assert!(store.stats().sealed_tables >= 1);
    store.touch("k", secs(60)).unwrap(); // shorter than what is left: nothing written
    let Some(Entry::Completed(done)) = store.get("k").unwrap() else { panic!() };
    assert_eq!(done.expires_at, at(START_MS + 600_000));
    store.touch("k", secs(7200)).unwrap();
    store.remove("k").unwrap(); // the tombstone keeps the touched window
    clock.advance(secs(700)); // past the first window: the first record's bucket goes
    store.maintain().unwrap();
    assert!(store.get("k").unwrap().is_none(), "removed stays removed");
    drop(store);
    let store = Store::open("/probe", common::sealing_sim_options(&disk, &clock)).unwrap();
    assert!(store.get("k").unwrap().is_none(), "removed stays removed after a reopen");
    assert!(acquired(store.claim("k", b"other").unwrap()).checkpoint().is_none());
}

/// `extend_lease` fences: a token of another store is `ForeignToken`; after the holder's own
/// complete or release it is `StaleToken`; the extension survives a power cut under `Sync`.
#[test]
fn extend_lease_fences_foreign_and_finished_tokens_and_survives_a_power_cut() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open("/probe", sim_options(&disk, &clock, Durability::Sync)).unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let other = common::open(other_dir.path(), &clock);
    let foreign = acquired(other.claim("k", b"req").unwrap());
    assert!(matches!(store.extend_lease(&foreign, secs(60)), Err(Error::ForeignToken)));

    let done = acquired(store.claim("done", b"req").unwrap());
    store.complete(&done, b"out").unwrap();
    assert!(matches!(store.extend_lease(&done, secs(60)), Err(Error::StaleToken)));
    let freed = acquired(store.claim("freed", b"req").unwrap());
    store.release(&freed).unwrap();
    assert!(matches!(store.extend_lease(&freed, secs(60)), Err(Error::StaleToken)));
    assert!(store.get("freed").unwrap().is_none(), "a stale extend_lease writes nothing");

    let held = acquired(store.claim("held", b"req").unwrap());
    store.checkpoint(&held, b"phase").unwrap();
    store.extend_lease(&held, secs(3600)).unwrap();
    assert_eq!(held.lease_expires_at(), at(START_MS + 3_600_000));
    drop(store);
    let disk = disk.power_cut(None);
    let store = Store::open("/probe", sim_options(&disk, &clock, Durability::Sync)).unwrap();
    let Some(Entry::InFlight { lease_expires_at, checkpoint, .. }) = store.get("held").unwrap() else { panic!() };
    assert_eq!((lease_expires_at, checkpoint.as_deref()), (at(START_MS + 3_600_000), Some(&b"phase"[..])));
}

/// Promise (guide, "Long effects: `extend_lease`"): `extend_lease` moves the lease on for a
/// long effect, "a lease already running longer is kept"; `checkpoint` "renews the lease too"
/// (README: "a checkpoint renews the lease"). A holder that extended its lease to an hour and
/// then records a checkpoint must still hold the key for that hour: a checkpoint that cut the
/// lease back to the claim's 10 s would let another claim take the key over (and run the effect
/// again) while the holder is still at work.
#[test]
fn a_checkpoint_after_extend_lease_does_not_shorten_the_lease() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let store = common::open(dir.path(), &clock);
    let token =
        acquired(store.claim_with("k", b"req", ClaimOptions { lease: Some(secs(10)), ..Default::default() }).unwrap());
    store.extend_lease(&token, secs(3600)).unwrap();
    assert_eq!(token.lease_expires_at(), at(START_MS + 3_600_000));
    clock.advance(secs(1));
    store.checkpoint(&token, b"half way").unwrap();
    clock.advance(secs(60)); // well inside the extended hour
    let other = store.claim("k", b"req").unwrap();
    assert!(
        matches!(other, Claim::InProgress { .. }),
        "a minute into an hour-long extended lease, after a checkpoint, another claim got {:?} \
         (the holder's token now says its lease ends at {:?}, 11 s after the claim)",
        other.answer(),
        token.lease_expires_at().duration_since(at(START_MS)).unwrap(),
    );
}

/// `advance` at the ends of the version range, and beside claims of the same key.
#[test]
fn advance_at_version_zero_and_u64_max() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let store = common::open(dir.path(), &clock);
    assert_eq!(store.advance("z", 0).unwrap(), Advance::Newer { previous: None });
    assert_eq!(store.advance("z", 0).unwrap(), Advance::Stale { current: 0 });
    assert_eq!(store.advance("z", u64::MAX).unwrap(), Advance::Newer { previous: Some(0) });
    assert_eq!(store.advance("z", u64::MAX).unwrap(), Advance::Stale { current: u64::MAX });
    assert_eq!(store.advance("z", u64::MAX - 1).unwrap(), Advance::Stale { current: u64::MAX });
    assert_eq!(store.claim("z", b"req").unwrap(), Claim::Mismatch);
    let Claim::Mismatch =
        store.claim_with("z", b"req", ClaimOptions { wait: Some(ms(10)), ..Default::default() }).unwrap()
    else {
        panic!("a waiting claim of an advance key")
    };
    store.touch("z", secs(48 * 3600)).unwrap();
    drop(store);
    let store = common::open(dir.path(), &clock);
    assert_eq!(store.advance("z", 5).unwrap(), Advance::Stale { current: u64::MAX });
}

/// The guide says `max_disk_bytes` refuses new claims only ("replays, reads and completes go
/// on"). `touch` of a key already held is no new claim: it must behave the same for a key in
/// flight as for a completed one once the budget is reached.
#[test]
fn touch_is_not_held_to_the_disk_budget_differently_for_in_flight_keys() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let options = || Options {
        bucket_width: secs(60),
        segment_bytes_initial: 4096,
        max_disk_bytes: 1 << 20,
        ..common::options(&clock)
    };
    let store = Store::open(dir.path(), options()).unwrap();
    let held = acquired(store.claim("held", b"req").unwrap());
    let checkpointed = acquired(store.claim("checkpointed", b"req").unwrap());
    store.checkpoint(&checkpointed, b"phase").unwrap();
    let done = acquired(store.claim("done", b"req").unwrap());
    store.complete(&done, b"out").unwrap();
    // Fill the budget with claims in many buckets.
    let mut i = 0u64;
    loop {
        let ttl = ClaimOptions { ttl: Some(secs(60 * (2 + i % 500))), ..Default::default() };
        match store.claim_with(format!("fill{i}"), b"req", ttl) {
            Ok(_) => i += 1,
            Err(Error::DiskBudgetExceeded { .. }) => break,
            Err(e) => panic!("{e:?}"),
        }
        assert!(i < 100_000, "the budget was never reached");
    }
    // Each touch moves its key into a bucket no file holds yet (one week, and one week and a
    // day): each needs a new segment.
    let held_touch = store.touch("held", secs(8 * 24 * 3600));
    let done_touch = store.touch("done", secs(7 * 24 * 3600));
    let checkpointed_touch = store.touch("checkpointed", secs(9 * 24 * 3600));
    assert!(done_touch.is_ok(), "touch of a completed key past the budget: {done_touch:?}");
    assert!(checkpointed_touch.is_ok(), "touch of an in-flight key with a checkpoint: {checkpointed_touch:?}");
    assert!(
        held_touch.is_ok(),
        "touch of an in-flight key without a checkpoint past the budget: {held_touch:?} (a completed key's, \
         and an in-flight one's with a checkpoint: Ok)"
    );
    store.complete(&held, b"out").unwrap();
}

// ---------------------------------------------------------------------------------------------
// Scans.

fn one_hash(_key: &[u8]) -> u64 {
    0x0123_4567_89ab_cdef
}

/// Keys whose hashes all collide, some sealed, some rewritten after sealing (newer in RAM,
/// older in a table), some removed: each live key exactly once, with `get`'s entry.
#[test]
fn a_scan_of_colliding_keys_in_ram_and_sealed_tables_yields_each_once() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let options = Options { key_hash: Some(one_hash), ..common::sealing_sim_options(&disk, &clock) };
    let store = Store::open("/probe", options.clone()).unwrap();
    for i in 0..40 {
        let t = acquired(store.claim(format!("key-{i}"), b"req").unwrap());
        if i % 4 != 0 {
            store.complete(&t, format!("v{i}")).unwrap();
        }
    }
    clock.advance(secs(10));
    store.maintain().unwrap();
    assert!(store.stats().sealed_tables >= 1);
    for i in (0..40).step_by(3) {
        store.remove(format!("key-{i}")).unwrap();
    }
    for i in (0..40).step_by(5) {
        if let Claim::Acquired(t) = store.claim(format!("key-{i}"), b"req").unwrap() {
            store.complete(&t, b"rewritten").unwrap();
        }
    }
    let scanned: Vec<(Vec<u8>, Entry)> = store.scan("key-").collect::<idemstore::Result<_>>().unwrap();
    let keys = store.keys().unwrap();
    let mut names: Vec<&Vec<u8>> = scanned.iter().map(|(k, _)| k).collect();
    names.sort();
    let before = names.len();
    names.dedup();
    assert_eq!(before, names.len(), "a key came twice");
    let mut sorted = scanned.clone();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(sorted, keys);
    // A read-only view sees the same.
    store.sync().unwrap();
    let view = Store::open_read_only_with("/probe", options).unwrap();
    let mut in_view: Vec<(Vec<u8>, Entry)> = view.scan("key-").collect::<idemstore::Result<_>>().unwrap();
    in_view.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(in_view, keys);
}

/// Each key at most once while writers claim, rewrite and remove keys and the window expires
/// and seals under the scan.
#[test]
fn a_scan_during_writes_sealing_and_expiry_yields_each_key_at_most_once() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open("/probe", common::sealing_sim_options(&disk, &clock)).unwrap();
    for i in 0..4000 {
        let ttl = ClaimOptions { ttl: Some(secs(60 + (i % 5) * 60)), ..Default::default() };
        let t = acquired(store.claim_with(format!("k{i}"), b"req", ttl).unwrap());
        store.complete(&t, b"v").unwrap();
    }
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let key = format!("k{}", n % 6000);
                match store.claim(&key, b"req").unwrap() {
                    Claim::Acquired(t) => store.complete(&t, b"w").unwrap(),
                    _ => store.remove(&key).unwrap(),
                }
                if n.is_multiple_of(500) {
                    clock.advance(secs(3));
                    store.maintain().unwrap();
                }
                n += 1;
            }
        });
        for _ in 0..20 {
            let mut seen = std::collections::HashSet::new();
            for item in store.scan("") {
                let (key, _) = item.unwrap();
                assert!(seen.insert(key.clone()), "{} seen twice in one scan", String::from_utf8_lossy(&key));
            }
        }
        stop.store(true, Ordering::SeqCst);
    });
}

/// After a clean close every segment has a restart table, mapped as a sealed table at reopen;
/// keys rewritten after the reopen are in RAM as well. Each live key once, with `get`'s entry.
#[test]
fn a_scan_after_a_reopen_with_restart_tables_yields_each_key_once() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    {
        let store = common::open(dir.path(), &clock);
        for i in 0..500 {
            let t = acquired(store.claim(format!("k{i}"), b"req").unwrap());
            store.complete(&t, b"v1").unwrap();
        }
        store.close().unwrap();
    }
    let store = common::open(dir.path(), &clock);
    for i in (0..500).step_by(3) {
        store.remove(format!("k{i}")).unwrap();
        let t = acquired(store.claim(format!("k{i}"), b"req2").unwrap());
        store.complete(&t, b"v2").unwrap();
    }
    let scanned: Vec<(Vec<u8>, Entry)> = store.scan("").collect::<idemstore::Result<_>>().unwrap();
    assert_eq!(scanned.len(), 500, "each key once");
    let mut sorted = scanned;
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(sorted, store.keys().unwrap());
}

// ---------------------------------------------------------------------------------------------
// Namespaces.

/// A namespace's TTL and lease defaults reach every call that takes them; a per-call option
/// wins; `advance` keeps the namespace's TTL.
#[test]
fn a_namespace_applies_its_defaults() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let store = common::open(dir.path(), &clock);
    let ns = store.namespace("n").unwrap().with_ttl(secs(30)).with_lease(secs(3));
    let t = acquired(ns.claim("k", b"r").unwrap());
    assert_eq!(t.lease_expires_at(), at(START_MS + 3_000));
    let Some(Entry::InFlight { expires_at, .. }) = ns.get("k").unwrap() else { panic!() };
    assert_eq!(expires_at, at(START_MS + 30_000));
    assert_eq!(ns.advance("v", 1).unwrap(), Advance::Newer { previous: None });
    let Some(Entry::Completed(done)) = ns.get("v").unwrap() else { panic!() };
    assert_eq!(done.expires_at, at(START_MS + 30_000));
    clock.advance(secs(4));
    let t2 = acquired(ns.claim("k", b"r").unwrap());
    assert!(t2.recovered());
    ns.complete(&t2, b"o").unwrap();
    let waited = ns.claim_with("k", b"r", ClaimOptions { wait: Some(ms(5)), ..Default::default() }).unwrap();
    assert!(matches!(waited, Claim::Completed(_)));
    let stats = ns.stats();
    assert_eq!((stats.claims_acquired_total, stats.duplicates_replayed_total), (2, 1));
}

/// A namespace's keys are stored with its prefix (2 bytes and the name), so a caller's key may
/// be that much shorter than `max_key_len`; a longer one is `KeyTooLong` in the caller's terms
/// (its own length, and the limit it has), never a length the caller did not send.
#[test]
fn a_namespace_key_past_its_limit_is_told_in_the_callers_terms() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let store = common::open(dir.path(), &clock);
    let limit = store.options().max_key_len;
    let ns = store.namespace("payments").unwrap();
    let room = limit - 2 - "payments".len();
    assert!(ns.claim(vec![b'k'; room], b"r").is_ok(), "a key that fits with the prefix");
    match ns.claim(vec![b'k'; limit], b"r") {
        Err(Error::KeyTooLong { len, max }) => assert_eq!((len, max), (limit, room)),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Export and import.

/// Promise (README `Durability::Sync`: "no answer is read from a record that is not durable";
/// `import_entry`: "Returns `Ok(false)`, writing nothing, when the key already has a live entry
/// here (it is kept)"). While the target's own record of the key is written but its sync is
/// still held, `import_entry` must not answer "kept": a power cut can still take that record.
#[test]
fn import_does_not_answer_kept_from_a_record_that_is_not_durable() {
    let clock = ManualClock::new(START_MS);
    let src_dir = tempfile::tempdir().unwrap();
    let source = common::open(src_dir.path(), &clock);
    let t = acquired(source.claim("k", b"req").unwrap());
    source.complete(&t, b"from the source").unwrap();
    let exported = source.export_entries().unwrap();

    let disk = SimDisk::new();
    let target = Arc::new(Store::open("/probe", sim_options(&disk, &clock, Durability::Sync)).unwrap());
    let gate = Gate::install(&disk);
    gate.close();
    // The target's own claim of `k`: written, its sync held (its caller has no answer yet).
    let claimer = std::thread::spawn({
        let target = Arc::clone(&target);
        move || target.claim("k", b"req").map(|c| c.answer())
    });
    gate.wait_for_held();
    let (tx, rx) = channel();
    let importer = std::thread::spawn({
        let (target, exported) = (Arc::clone(&target), exported[0].clone());
        move || {
            let _ = tx.send(target.import_entry(&exported));
        }
    });
    let early = rx.recv_timeout(ms(500)).ok();
    let cut = disk.power_cut(None); // what survives if the power fails now
    gate.open();
    claimer.join().unwrap().unwrap();
    importer.join().unwrap();
    if let Some(answer) = early {
        let reopened = Store::open("/probe", sim_options(&cut, &clock, Durability::Sync)).unwrap();
        panic!(
            "import answered {answer:?} while the record it rests on was not durable; after a power cut \
             at that moment the key is {:?} (neither the target's claim nor the import)",
            reopened.get("k").unwrap()
        );
    }
}

/// Imports at the edges: an in-flight entry with its times in the future; an entry expiring
/// exactly at `TTL_MAX` from now; one past it; one already expired.
#[test]
fn import_takes_future_times_and_refuses_windows_past_ttl_max() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let target = common::open(dir.path(), &clock);
    let future = at(START_MS + 3_600_000);
    let in_flight = idemstore::ExportedEntry {
        key: b"future".to_vec(),
        request_hash: idemstore::request_hash(b"req"),
        entry: Entry::InFlight {
            claimed_at: future,
            lease_expires_at: future + secs(60),
            expires_at: future + secs(3600),
            checkpoint: Some(b"cp".to_vec()),
            orphaned: false,
        },
    };
    assert!(target.import_entry(&in_flight).unwrap());
    let Some(Entry::InFlight { claimed_at, orphaned, .. }) = target.get("future").unwrap() else { panic!() };
    assert!(claimed_at <= at(START_MS) && orphaned, "claimed_at {claimed_at:?}, orphaned {orphaned}");
    let t = acquired(target.claim("future", b"req").unwrap());
    assert_eq!((t.recovered(), t.checkpoint()), (true, Some(&b"cp"[..])));

    let ttl_max_ms = idemstore::TTL_MAX.as_millis() as u64;
    let mut edge = in_flight.clone();
    edge.key = b"edge".to_vec();
    edge.entry = Entry::InFlight {
        claimed_at: at(START_MS),
        lease_expires_at: at(START_MS + 1000),
        expires_at: at(START_MS + ttl_max_ms),
        checkpoint: None,
        orphaned: false,
    };
    assert!(target.import_entry(&edge).unwrap());
    let mut past = edge.clone();
    past.key = b"past".to_vec();
    if let Entry::InFlight { expires_at, .. } = &mut past.entry {
        *expires_at = at(START_MS + ttl_max_ms + 1);
    }
    assert!(matches!(target.import_entry(&past), Err(Error::InvalidArgument(_))));
    let mut expired = edge.clone();
    expired.key = b"expired".to_vec();
    if let Entry::InFlight { expires_at, .. } = &mut expired.entry {
        *expires_at = at(START_MS);
    }
    assert!(!target.import_entry(&expired).unwrap());
    drop(target);
    let target = common::open(dir.path(), &clock);
    assert!(target.get("edge").unwrap().is_some());
}
