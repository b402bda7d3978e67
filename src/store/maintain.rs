//! Maintenance: dropping expired buckets and their index entries, sealing idle segments into
//! tables.

use std::sync::atomic::Ordering as AtomicOrdering;

use crate::clock::duration_to_ms;
use crate::error::{Error, Result};
use crate::log::segment::Segment;
use crate::sealed::TableBounds;

use super::{Inner, sweep_shard};

impl Inner {
    pub(super) fn maintain(&self) -> Result<usize> {
        if self.read_only {
            return Ok(0);
        }
        let _serial = self.maintenance.lock();
        #[cfg(feature = "sim")]
        {
            let fault = self.housekeeper_call.lock().maintenance_fault.clone();
            if let Some(fault) = fault {
                fault().map_err(|e| Error::io("injected maintenance fault", &self.dir, e))?;
            }
        }
        crate::pace::start();
        let now_ms = self.time.now_ms();
        // Before any bucket goes: its records may be what holds the store's time up after a
        // power cut (see `TimeFloor`), so the floor is made durable past `now_ms` first.
        self.save_time(false)?;
        let (buckets, dropped) = self.log.take_expired(now_ms);
        if !dropped.is_empty() {
            let dead: std::collections::HashSet<u32> = dropped.iter().map(|s| s.id()).collect();
            // The sweep takes every shard's lock in turn. A claim reads through its shard's
            // kept segment handles only under that lock, and from now on finds these marked
            // dropped; so once the sweep is through, no read of them is in flight or to come,
            // and their files may be cut (a read of a mapped page past a cut would fault).
            let swept = self.drop_index_entries(|segment| dead.contains(&segment));
            self.counters.keys_expired_total.fetch_add(swept, AtomicOrdering::Relaxed);
            self.counters.buckets_expired_total.fetch_add(buckets as u64, AtomicOrdering::Relaxed);
            let deleted = self.log.delete_segments(&dropped);
            for segment in &dropped {
                segment.release_pages();
            }
            drop(dropped);
            let forgotten = self.forget_tables(&dead).and(self.forget_restart_tables(&dead));
            deleted.and(forgotten)?;
        }
        let sealed = self.seal_idle(now_ms)?;
        self.write_restart_tables(1, self.options.background)?;
        self.flush_history(now_ms, false);
        self.sealed.refresh_union()?;
        if sealed > 0 {
            give_memory_back();
        }
        Ok(buckets)
    }

    /// Drops the sealed tables of dead (expired) segments and deletes their files.
    pub(super) fn forget_tables(&self, dead: &std::collections::HashSet<u32>) -> Result<()> {
        let tables = self.sealed.remove_segments(&|id| dead.contains(&id));
        let sealed_keys: u64 = tables.iter().map(|t| t.len()).sum();
        self.counters.keys_expired_total.fetch_add(sealed_keys, AtomicOrdering::Relaxed);
        for table in &tables {
            self.options.io.remove(&table.path).map_err(|e| Error::io("delete expired table", &table.path, e))?;
        }
        if !tables.is_empty() {
            self.options.io.sync_dir(&self.dir).map_err(|e| Error::io("sync directory", &self.dir, e))?;
        }
        Ok(())
    }

    /// Seals every segment that takes no more appends and has been idle for
    /// `seal_idle_after`: writes its table, then moves its entries out of RAM.
    ///
    /// The entries are collected only after `retire_idle` retired the segments under the
    /// lane locks, so every record they will ever hold is written by then; a writer still
    /// between its append and its index update holds its shard's lock, which the collection
    /// waits for. So the table holds every entry, and none is dropped unsealed.
    pub(super) fn seal_idle(&self, now_ms: u64) -> Result<usize> {
        let idle_before = now_ms.saturating_sub(duration_to_ms(self.options.seal_idle_after));
        let to_seal: Vec<std::sync::Arc<Segment>> =
            // A segment whose header salvage rebuilt never gets a table (`SegmentHeader::rebuilt`).
            self.log
                .retire_idle(idle_before)
                .into_iter()
                .filter(|s| !s.header.rebuilt && !self.sealed.has(s.id()))
                .collect();
        if to_seal.is_empty() {
            return Ok(0);
        }
        let sealing: std::collections::HashSet<u32> = to_seal.iter().map(|s| s.id()).collect();
        let mut entries: crate::hash::IdMap<u32, Vec<(u64, u32)>> = Default::default();
        for locked in self.index.shards() {
            for (hash, loc) in locked.shard.lock().entries() {
                if sealing.contains(&loc.segment) {
                    entries.entry(loc.segment).or_default().push((hash, loc.offset));
                }
            }
            crate::pace::breathe();
        }
        // A table holds only the records the index points at: one a newer record superseded is
        // left out, so that newer record must be durable before the table is (else a power cut
        // loses it and the table hides the older, acknowledged one, its segment unscanned).
        self.sync_all()?;
        // Every record of a retired segment is older than this, and written before now.
        let bounds = TableBounds { max_seq: self.log.last_seq(), latest_ms: now_ms };
        let mut tables = Vec::with_capacity(to_seal.len());
        for segment in &to_seal {
            let list = entries.remove(&segment.id()).unwrap_or_default();
            let hashes: Vec<u64> = list.iter().map(|(hash, _)| *hash).collect();
            tables.push((self.write_table_of(segment, bounds, list)?, hashes));
        }
        self.options.io.sync_dir(&self.dir).map_err(|e| Error::io("sync directory", &self.dir, e))?;
        let sealed = tables.len();
        let mut restart = self.restart_tables.lock();
        for (table, hashes) in tables {
            // Its restart table, if any, was just replaced by this one (same file name).
            restart.remove(&table.segment_id);
            self.sealed.insert(table, &hashes);
        }
        drop(restart);
        // Published: now the RAM entries can go.
        self.drop_index_entries(|segment| sealing.contains(&segment));
        Ok(sealed)
    }

    /// Drops the RAM index entries of the segments `gone` picks and gives the memory back;
    /// returns how many went. One shard at a time, with rests between (see `pace`), so no
    /// claim waits for more than one shard's sweep.
    pub(super) fn drop_index_entries(&self, gone: impl Fn(u32) -> bool) -> u64 {
        let mut dropped = 0u64;
        for locked in self.index.shards() {
            dropped += sweep_shard(&mut locked.shard.lock(), |segment| !gone(segment)) as u64;
            crate::pace::breathe();
            locked.shard.lock().shrink();
            crate::pace::breathe();
        }
        dropped
    }
}

/// Returns memory freed by sealing (index shards shrink) to the operating system: glibc keeps
/// freed heap otherwise, and RAM per key would not fall.
pub(super) fn give_memory_back() {
    crate::io::sys::trim_heap();
}
