//! Group commit's view of the log: what a leader syncs, how far the log has been written, and
//! the time floor raised once an answer's record is durable. The store hands group commit a
//! [`LogSyncer`]; group commit knows only the `Syncer` trait, so a sync runs one way: store ->
//! group commit -> log, never back into the store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::Log;
use crate::clock::StoreTime;
use crate::commit::Syncer;
use crate::error::Result;

/// Time spent in syncs of the log, in microseconds (`Stats::sync_latency_us_*`).
#[derive(Debug, Default)]
pub struct SyncLatency {
    total_us: AtomicU64,
    max_us: AtomicU64,
}

/// The log as group commit syncs it, with the store's time to make durable after each sync.
pub struct LogSyncer<'a> {
    log: &'a Log,
    time: &'a StoreTime,
    /// False for a read-only view: it writes no time floor.
    covers_time: bool,
}

impl Log {
    /// Group commit's view of this log; `covers_time`: raise the time floor to `time`'s
    /// latest answer after each sync (a writer), or not (a read-only view).
    pub fn syncer<'a>(&'a self, time: &'a StoreTime, covers_time: bool) -> LogSyncer<'a> {
        LogSyncer { log: self, time, covers_time }
    }

    /// Syncs everything written so far (see `take_sync_batch`, `sync_batch`) and returns the
    /// highest seq it covered; the time it took goes into the sync latency.
    pub fn sync_pending(&self) -> std::io::Result<u64> {
        let started = Instant::now();
        let batch = self.take_sync_batch();
        self.sync_batch(&batch)?;
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.sync_latency.total_us.fetch_add(us, Ordering::Relaxed);
        self.sync_latency.max_us.fetch_max(us, Ordering::Relaxed);
        Ok(batch.through_seq)
    }

    /// (total, slowest) time spent in syncs since open, in microseconds.
    pub fn sync_latency_us(&self) -> (u64, u64) {
        (self.sync_latency.total_us.load(Ordering::Relaxed), self.sync_latency.max_us.load(Ordering::Relaxed))
    }
}

impl Syncer for LogSyncer<'_> {
    fn sync_all(&self) -> std::io::Result<u64> {
        self.log.sync_pending()
    }

    fn written_seq(&self) -> Option<u64> {
        Some(self.log.last_seq())
    }

    fn cover_time(&self) -> Result<()> {
        if !self.covers_time {
            return Ok(());
        }
        self.log.time_floor().cover(self.time.latest_ms())
    }
}
