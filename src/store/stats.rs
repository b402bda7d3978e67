//! Assembling `Stats` from the index shards, the log, group commit and the sealed tables.

use std::sync::atomic::Ordering as AtomicOrdering;

use crate::log::segment::Segment;
use crate::stats::{ShardCounters, Stats};

use super::Inner;

impl Inner {
    /// Bytes of the segment files in the directory whose header was never written: the spare
    /// a writer prepares ahead of need, which a view does not open. Read at each call; a file
    /// that cannot be read counts nothing (a snapshot of figures must not fail).
    pub(super) fn spare_bytes_on_disk(&self) -> u64 {
        let io = self.options.io.as_ref();
        let Ok(names) = io.list(&self.dir) else { return 0 };
        let mut bytes = 0;
        for name in names {
            let Some(id) = crate::log::segment::parse_segment_file_name(&name) else { continue };
            if self.log.holds_segment(id) {
                continue;
            }
            let path = self.dir.join(&name);
            if let Ok(None) = Segment::open(io, &path, self.options.segment_bytes_max, false)
                && let Ok(file) = io.open(&path, self.options.segment_bytes_max, false)
            {
                bytes += file.len();
            }
        }
        bytes
    }

    pub(super) fn stats(&self) -> Stats {
        let c = &self.counters;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(AtomicOrdering::Relaxed);
        let mut shards = ShardCounters::default();
        let mut index_entries = 0u64;
        for locked in self.index.shards() {
            let shard = locked.shard.lock();
            shards.add(&shard.local.counters);
            index_entries += shard.len() as u64;
        }
        let (syncs, synced_records) = self.commit.counters();
        let (sealed_tables, sealed_entries, sealed_filter_bytes) = self.sealed.totals();
        let (live_bytes, dead_bytes) = self.log.live_and_dead_bytes();
        let (sync_latency_us_total, sync_latency_us_max) = self.log.sync_latency_us();
        let mut stats = Stats {
            // Expired by bucket drops; `shards` adds those found expired by a claim.
            keys_expired_total: load(&c.keys_expired_total),
            buckets_expired_total: load(&c.buckets_expired_total),
            index_entries,
            sealed_tables,
            sealed_entries,
            sealed_filter_bytes,
            segments: self.log.segment_count() as u64,
            open_files: self.log.open_files() as u64 + u64::from(self._lock.is_some()),
            appended_bytes_total: self.log.appended_bytes(),
            live_bytes,
            dead_bytes,
            // The writer counts its spare segment; a view, which opens no spare, counts the one
            // it finds on disk, so both report the same bytes for the same files.
            disk_bytes: self.log.disk_bytes() + if self.read_only { self.spare_bytes_on_disk() } else { 0 },
            syncs_total: syncs,
            synced_records_total: synced_records,
            sync_latency_us_total,
            sync_latency_us_max,
            last_seq: self.log.last_seq(),
            durable_seq: self.commit.durable_seq(),
            // Read at each call (one `stat`): a `chmod` that fixes the directory shows at once.
            warnings: {
                let mut warnings =
                    crate::io::permissions::warnings(self.options.io.as_ref(), &self.dir, self.options.file_access);
                warnings.extend(self.maintenance_warning());
                warnings
            },
            recovery: self.recovery.clone(),
            poisoned: self.commit.poisoned(),
            maintenance_errors_total: load(&c.maintenance_errors_total),
            last_maintenance_error: c.last_maintenance_error.lock().clone(),
            read_only: self.read_only,
            // The counters kept per shard are added below.
            ..Stats::default()
        };
        shards.add_to(&mut stats);
        stats
    }
}
