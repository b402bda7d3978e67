//! Group commit: callers that need their record durable wait here; the first of them becomes
//! the leader, takes everything written so far as one batch and syncs it with no lock held;
//! the others sleep on a condition variable and are released only once a sync that covers
//! their sequence number has succeeded. No timer delays a lone caller: it leads at once.
//!
//! A failed sync poisons the store: every later wait fails with the original cause, and
//! nothing is ever treated as durable after it (the page cache may have dropped the dirty
//! pages, so a retried fsync could "succeed" without the data: "fsyncgate").

use std::time::Duration;

use crate::error::{Error, Result};
use crate::sync::{AtomicU64, Condvar, Mutex, Ordering};

struct State {
    durable_seq: u64,
    leader_active: bool,
    poisoned: Option<String>,
    syncs: u64,
    batches_records: u64,
    /// Records the last sync covered: more than one means writers are concurrent.
    last_batch_records: u64,
}

/// The handoff between writers waiting for durability and the one syncing for them.
pub struct GroupCommit {
    state: Mutex<State>,
    synced: Condvar,
    durable_fast: AtomicU64,
    poisoned_fast: crate::sync::AtomicBool,
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
}

impl<F: Fn() -> std::io::Result<u64>> Syncer for F {
    fn sync_all(&self) -> std::io::Result<u64> {
        self()
    }
}

/// Most times a leader yields to let concurrent writers join its batch.
const GATHER_YIELDS_MAX: u32 = 64;

impl GroupCommit {
    /// `durable_seq`: everything at or below it is already on stable storage (after recovery,
    /// everything found on disk).
    pub fn new(durable_seq: u64) -> Self {
        GroupCommit {
            state: Mutex::new(State {
                durable_seq,
                leader_active: false,
                poisoned: None,
                syncs: 0,
                batches_records: 0,
                last_batch_records: 0,
            }),
            synced: Condvar::new(),
            durable_fast: AtomicU64::new(durable_seq),
            poisoned_fast: crate::sync::AtomicBool::new(false),
        }
    }

    /// Highest sequence number known durable.
    pub fn durable_seq(&self) -> u64 {
        self.durable_fast.load(Ordering::Acquire)
    }

    /// The poison cause, if a write or sync failed.
    pub fn poisoned(&self) -> Option<String> {
        if !self.poisoned_fast.load(Ordering::Acquire) {
            return None;
        }
        self.state.lock().poisoned.clone()
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
        let mut state = self.state.lock();
        if state.poisoned.is_none() {
            state.poisoned = Some(cause);
        }
        self.poisoned_fast.store(true, Ordering::Release);
        drop(state);
        self.synced.notify_all();
    }

    /// Returns once `seq` is durable, leading a sync if nobody else is.
    pub fn wait_durable(&self, seq: u64, syncer: &dyn Syncer) -> Result<()> {
        if self.durable_fast.load(Ordering::Acquire) >= seq && !self.poisoned_fast.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut state = self.state.lock();
        loop {
            if let Some(cause) = &state.poisoned {
                return Err(Error::Poisoned { cause: cause.clone() });
            }
            if state.durable_seq >= seq {
                return Ok(());
            }
            if state.leader_active {
                self.synced.wait(&mut state);
                continue;
            }
            state.leader_active = true;
            let before = state.durable_seq;
            let concurrent = state.last_batch_records > 1;
            drop(state);
            if concurrent {
                gather(syncer);
            }
            let outcome = syncer.sync_all();
            state = self.state.lock();
            state.leader_active = false;
            match outcome {
                Ok(through) => {
                    debug_assert!(through >= before || through == 0, "a sync never covers less than before");
                    if through > state.durable_seq {
                        state.last_batch_records = through - state.durable_seq;
                        state.batches_records += through - state.durable_seq;
                        state.durable_seq = through;
                        self.durable_fast.store(through, Ordering::Release);
                    }
                    state.syncs += 1;
                }
                Err(e) => {
                    if state.poisoned.is_none() {
                        state.poisoned = Some(format!("sync failed: {e}"));
                    }
                    self.poisoned_fast.store(true, Ordering::Release);
                }
            }
            self.synced.notify_all();
        }
    }

    /// Number of syncs done and records they covered, for stats.
    pub fn counters(&self) -> (u64, u64) {
        let state = self.state.lock();
        (state.syncs, state.batches_records)
    }
}

/// When the last batch showed concurrent writers, lets the ones already running finish their
/// appends before the batch is cut: yields while the written seq keeps moving. A lone writer
/// never gets here (its last batch held one record), so no timer ever delays it.
fn gather(syncer: &dyn Syncer) {
    let Some(mut seen) = syncer.written_seq() else { return };
    for _ in 0..GATHER_YIELDS_MAX {
        std::thread::yield_now();
        let now = syncer.written_seq().unwrap_or(seen);
        if now == seen {
            return;
        }
        seen = now;
    }
}

/// How long the periodic flusher sleeps between syncs, at most.
pub fn flush_interval(interval: Duration) -> Duration {
    interval.max(Duration::from_millis(1))
}
