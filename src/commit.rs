//! Group commit: callers that need their record durable wait here; the first of them becomes
//! the leader, takes everything written so far as one batch and syncs it with no lock held;
//! the others sleep and are released only once a sync that covers their sequence number has
//! succeeded. No timer delays a lone caller: it leads at once.
//!
//! Waiters sleep in a [`WaitQueue`], not on a condition variable: when a sync ends the leader
//! wakes them all with one system call, and each checks two atomics, so nobody queues behind a
//! mutex to learn it is free. Waiters the sync did not cover race to lead the next batch; one
//! wins and the rest sleep again. With writers that each wait for their own record, almost
//! every sleeper was covered (the leader gathers the writers it released before cutting a
//! batch), so one call beat waking exactly the covered ones by one call each (docs/performance.md,
//! "Group commit against the disk's own limit").
//!
//! A failed sync poisons the store: every later wait fails with the original cause, and
//! nothing is ever treated as durable after it (the page cache may have dropped the dirty
//! pages, so a retried fsync could "succeed" without the data: "fsyncgate"). A sync that
//! panics poisons it the same way: its batch was taken and may never be written, and a leader
//! that never returned would leave every later waiter asleep. The poison flag is set in one
//! place, `GroupCommit::set_poisoned`.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sync::{AtomicBool, AtomicU64, Mutex, Ordering, WaitQueue};

/// What only the leader and the stats read: kept off the waiters' path.
struct Detail {
    poisoned: Option<String>,
    syncs: u64,
    batches_records: u64,
    /// Records the last sync covered: the writers it released, who will soon append again.
    last_batch_records: u64,
    /// How long the last sync took.
    last_sync: Duration,
}

/// The handoff between writers waiting for durability and the one syncing for them.
pub struct GroupCommit {
    durable: AtomicU64,
    leader_active: AtomicBool,
    poisoned: AtomicBool,
    /// Where waiters sleep until a leader ends its sync.
    sleepers: WaitQueue,
    detail: Mutex<Detail>,
}

/// What the leader does: sync everything written so far and return the highest sequence
/// number it covered.
pub trait Syncer {
    /// Syncs everything written so far; returns the highest seq covered.
    fn sync_all(&self) -> std::io::Result<u64>;
    /// The highest seq written so far (synced or not), when cheap to read; lets a leader see
    /// whether other writers are still arriving.
    fn written_seq(&self) -> Option<u64> {
        None
    }
    /// Makes the store's time durable as far as any answer given so far (see
    /// `time_floor::TimeFloor`); called once the record an answer rests on is durable. The
    /// default has no time to keep.
    fn cover_time(&self) -> Result<()> {
        Ok(())
    }
}

impl<F: Fn() -> std::io::Result<u64>> Syncer for F {
    fn sync_all(&self) -> std::io::Result<u64> {
        self()
    }
}

/// Most times a leader yields while waiting for the writers the last sync released.
const GATHER_YIELDS_MAX: u32 = 1024;

/// Longest a leader waits for them, however long the last sync took: returning writers need
/// a wake-up and a claim (tens of µs), so one slow sync must not make the next batch wait as
/// long as it did.
const GATHER_BUDGET_MAX: Duration = Duration::from_millis(1);

impl GroupCommit {
    /// `durable_seq`: everything at or below it is already on stable storage (after recovery,
    /// everything found on disk).
    pub fn new(durable_seq: u64) -> Self {
        GroupCommit {
            durable: AtomicU64::new(durable_seq),
            leader_active: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            sleepers: WaitQueue::new(),
            detail: Mutex::new(Detail {
                poisoned: None,
                syncs: 0,
                batches_records: 0,
                last_batch_records: 0,
                last_sync: Duration::ZERO,
            }),
        }
    }

    /// Highest sequence number known durable.
    pub fn durable_seq(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// The poison cause, if a write or sync failed.
    pub fn poisoned(&self) -> Option<String> {
        if !self.poisoned.load(Ordering::Acquire) {
            return None;
        }
        self.detail.lock().poisoned.clone()
    }

    /// Fails with `Poisoned` when an earlier write or sync failed.
    pub fn check(&self) -> Result<()> {
        match self.poisoned() {
            Some(cause) => Err(Error::Poisoned { cause }),
            None => Ok(()),
        }
    }

    /// Marks the store poisoned with `cause` and wakes every waiter so it fails.
    pub fn poison(&self, cause: String) {
        let mut detail = self.detail.lock();
        self.set_poisoned(&mut detail, cause);
        drop(detail);
        self.sleepers.wake_all();
    }

    /// The one place the poison flag is set. The first cause is kept: what failed first is
    /// what the user must see, not the failures it led to. The caller wakes the waiters once
    /// the lock is let go.
    fn set_poisoned(&self, detail: &mut Detail, cause: String) {
        if detail.poisoned.is_none() {
            crate::observe::poisoned(&cause);
        }
        detail.poisoned.get_or_insert(cause);
        self.poisoned.store(true, Ordering::Release);
    }

    /// Returns once `seq` is durable, leading a sync if nobody else is.
    pub fn wait_durable(&self, seq: u64, syncer: &dyn Syncer) -> Result<()> {
        loop {
            self.check()?;
            if self.durable.load(Ordering::Acquire) >= seq {
                // The answer also rests on the store's time (a key read as expired): that time
                // must survive a power cut too, or a clock behind at the next open would bring
                // the key back. A failure is a failed sync like any other.
                return syncer.cover_time().map_err(|e| match e {
                    // A clock past the last time a store accepts: nothing was synced, nothing
                    // failed; the answer is refused, and the store stays usable once the clock
                    // is mended (by a reopen).
                    Error::ClockOutOfRange { .. } => e,
                    e => {
                        let cause = format!("time floor sync failed: {e}");
                        self.poison(cause.clone());
                        Error::Poisoned { cause }
                    }
                });
            }
            if self.leader_active.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                self.lead(syncer);
                continue;
            }
            // Sleep only while a leader is still at work and will wake us when it ends. No wake
            // is lost: `park` reads the queue's generation before this check, and the leader
            // publishes `durable` and clears `leader_active` before `wake_all` bumps it, so a
            // wake after the check finds the generation changed and the sleep returns at once.
            self.sleepers.park(|| {
                self.leader_active.load(Ordering::Acquire)
                    && self.durable.load(Ordering::Acquire) < seq
                    && !self.poisoned.load(Ordering::Acquire)
            });
        }
    }

    /// One sync as the leader: gather the writers that are taking turns, sync, publish, and
    /// wake everyone (waiters the sync covered return; the rest elect the next leader).
    fn lead(&self, syncer: &dyn Syncer) {
        let before = self.durable.load(Ordering::Acquire);
        let (returning, budget) = {
            let detail = self.detail.lock();
            (detail.last_batch_records, detail.last_sync.min(GATHER_BUDGET_MAX))
        };
        // (Not under loom: gathering waits on the wall clock, which a model cannot replay, and
        // it only shapes batches; what a sync covers is decided by the syncer either way.)
        if returning > 1 && !cfg!(loom) {
            gather(syncer, before, returning, budget);
        }
        let started = Instant::now();
        // A panicking sync is a failed sync: caught here, it poisons the store and the leader's
        // duties below (clearing `leader_active`, waking the waiters) still run.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| syncer.sync_all()))
            .unwrap_or_else(|payload| Err(std::io::Error::other(format!("panicked: {}", panic_message(&*payload)))));
        let took = started.elapsed();
        let mut detail = self.detail.lock();
        match outcome {
            Ok(through) if detail.poisoned.is_none() => {
                debug_assert!(through >= before || through == 0, "a sync never covers less than before");
                let durable = self.durable.load(Ordering::Acquire);
                if through > durable {
                    detail.last_batch_records = through - durable;
                    detail.batches_records += through - durable;
                    self.durable.store(through, Ordering::Release);
                }
                detail.last_sync = took;
                detail.syncs += 1;
            }
            Ok(_) => {}
            // The store may already be poisoned by a failed write: its cause is kept.
            Err(e) => self.set_poisoned(&mut detail, format!("sync failed: {e}")),
        }
        drop(detail);
        self.leader_active.store(false, Ordering::Release);
        self.sleepers.wake_all();
    }

    /// Number of syncs done and records they covered, for stats.
    pub fn counters(&self) -> (u64, u64) {
        let detail = self.detail.lock();
        (detail.syncs, detail.batches_records)
    }
}

/// When the last sync covered several writers, lets them append again before the batch is
/// cut: yields until the records already pending plus one from each writer the last sync
/// released (less the leader itself) are written, or `budget` has passed (as long as the last
/// sync took, at most `GATHER_BUDGET_MAX`). Without it, writers released by one sync miss the
/// next and settle into two half-size batches per round. A lone writer never gets here (its
/// batches hold one record each), so no timer ever delays it; writers that do other work
/// between claims cost a batch at most `budget` of waiting.
fn gather(syncer: &dyn Syncer, before: u64, returning: u64, budget: Duration) {
    let started = Instant::now();
    let Some(pending) = syncer.written_seq() else { return };
    let expected = (pending.saturating_sub(before) + returning).saturating_sub(1);
    for _ in 0..GATHER_YIELDS_MAX {
        let Some(written) = syncer.written_seq() else { return };
        if written.saturating_sub(before) >= expected || started.elapsed() >= budget {
            return;
        }
        std::thread::yield_now();
    }
}

/// The message a panic was raised with (`panic!("...")` gives a `&str` or a `String`).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => (*s).to_owned(),
        (None, Some(s)) => s.clone(),
        (None, None) => "a panic without a message".to_owned(),
    }
}

/// How long the periodic flusher sleeps between syncs, at most.
pub fn flush_interval(interval: Duration) -> Duration {
    interval.max(Duration::from_millis(1))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_sync_that_panics_poisons_the_store_and_leaves_no_waiter_asleep() {
        let commit = std::sync::Arc::new(GroupCommit::new(0));
        let panicking = || -> std::io::Result<u64> { panic!("injected sync panic") };
        match commit.wait_durable(1, &panicking) {
            Err(Error::Poisoned { cause }) => assert!(cause.contains("panicked: injected sync panic"), "{cause}"),
            other => panic!("the leader whose sync panicked: {other:?}"),
        }
        // Another waiter neither hangs behind a leader that never returned nor syncs again.
        let synced = std::sync::atomic::AtomicBool::new(false);
        let syncer = || -> std::io::Result<u64> {
            synced.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(1)
        };
        assert!(matches!(commit.wait_durable(1, &syncer), Err(Error::Poisoned { .. })));
        assert!(!synced.load(std::sync::atomic::Ordering::SeqCst), "a poisoned store syncs nothing more");
        assert!(commit.poisoned().is_some_and(|c| c.contains("injected sync panic")));
    }
}
