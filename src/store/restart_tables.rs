//! Restart tables: a table for every segment that stops taking appends, so a reopen maps instead of
//! scanning (see ARCHITECTURE.md, "Restart tables").

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::log::segment::Segment;
use crate::recovery::{self};
use crate::sealed::{Table, TableBounds};

use super::Inner;

impl Inner {
    /// Deletes the restart tables of dead (expired) segments (see `write_restart_tables`).
    pub(super) fn forget_restart_tables(&self, dead: &std::collections::HashSet<u32>) -> Result<()> {
        let gone: Vec<u32> = {
            let mut restart = self.restart_tables.lock();
            let gone = restart.iter().copied().filter(|id| dead.contains(id)).collect();
            restart.retain(|id| !dead.contains(id));
            gone
        };
        for &id in &gone {
            let path = self.dir.join(crate::sealed::table_file_name(id));
            match self.options.io.remove(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io("delete expired table", &path, e));
                }
                _ => {}
            }
        }
        if !gone.is_empty() {
            self.options.io.sync_dir(&self.dir).map_err(|e| Error::io("sync directory", &self.dir, e))?;
        }
        Ok(())
    }

    /// At close (and drop): retires every segment still taking appends and writes a restart
    /// table for every live segment without one, so the next open maps them all and scans
    /// nothing. Nothing is appended after this (the store is going away).
    pub(super) fn restart_tables_at_close(&self) -> Result<()> {
        if self.read_only || self.commit.poisoned().is_some() {
            return Ok(());
        }
        let _serial = self.maintenance.lock();
        self.log.retire_all();
        self.write_restart_tables(2, false).map(|_| ())
    }

    /// Syncs `segment`, then writes its table of `entries` (the caller syncs the directory).
    /// The table points at the segment's records: they must be durable before it is; a failed
    /// sync poisons the store.
    pub(super) fn write_table_of(
        &self,
        segment: &Segment,
        bounds: TableBounds,
        entries: Vec<(u64, u32)>,
    ) -> Result<Table> {
        // Its page-table entries go first, a slice at a time (one TLB flush each; it takes no
        // more appends, and a later read faults its pages back in, clean): writeback then finds
        // no page mapped writable to write-protect with a cross-CPU TLB flush each, which
        // interrupts every thread of the process (in a profile of new-key claims from two
        // threads, 23 % of all samples were the housekeeper sending those interrupts).
        segment.release_pages();
        if let Err(e) = segment.sync_gradually() {
            let cause = format!("sync failed: {e}");
            self.commit.poison(cause.clone());
            return Err(Error::Poisoned { cause });
        }
        Table::write(
            self.options.io.as_ref(),
            &self.dir,
            segment.id(),
            segment.header.bucket_end_ms,
            bounds,
            self.table_mark,
            entries,
        )
    }

    /// Writes a restart table for every live segment that takes no more appends and has no
    /// table yet (neither sealed nor a restart table), on up to `threads` threads; returns how
    /// many were written. Runs under `maintenance` (so no bucket is dropped meanwhile).
    ///
    /// A restart table has the format of a sealed table, but is not published: the segment's
    /// entries stay in RAM (claims and replays of recent keys are served from there, and
    /// invariant 2 holds: lookups never see this table before RAM), and only the next open
    /// maps it instead of scanning the segment. The idle seal later writes the sealed table
    /// over it. Its entries are read from the segment (see `recovery::restart_entries`):
    /// every key's latest record in it, so only the segment itself must be durable before the
    /// table is, which `Table::write` callers ensure here.
    ///
    /// `keep_spares`: between two tables, top up the spare segment files the lanes use up (the
    /// housekeeper's pass: a table takes long enough that lanes rolling over meanwhile would
    /// otherwise create their files, and sync the directory, under their locks).
    pub(super) fn write_restart_tables(&self, threads: usize, keep_spares: bool) -> Result<usize> {
        if self.read_only || self.commit.poisoned().is_some() {
            return Ok(0);
        }
        let to_write: Vec<std::sync::Arc<Segment>> = {
            let restart = self.restart_tables.lock();
            let sealed: HashSet<u32> = self.sealed.all().iter().map(|t| t.segment_id).collect();
            self.log
                .retired_segments()
                .into_iter()
                .filter(|s| !s.header.rebuilt && !sealed.contains(&s.id()) && !restart.contains(&s.id()))
                .collect()
        };
        if to_write.is_empty() {
            return Ok(0);
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let one = |segment: &Segment| -> Result<bool> {
            let hash = |key: &[u8]| self.key_hash(key);
            let Some((entries, bounds)) = recovery::restart_entries(segment, &hash)? else {
                return Ok(false);
            };
            drop(self.write_table_of(segment, bounds, entries)?);
            Ok(true)
        };
        let worker = || -> Result<Vec<u32>> {
            let mut written = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(segment) = to_write.get(i) else { return Ok(written) };
                if one(segment)? {
                    written.push(segment.id());
                }
                if keep_spares && self.log.spares_missing() {
                    // A failure here is the spare's own business: the housekeeper reports it
                    // when it prepares spares itself; the tables go on.
                    let _ = self.prepare_spare();
                }
                crate::pace::breathe();
            }
        };
        // (The loom models run every thread of theirs on one: no thread of the store's own.)
        let threads = if cfg!(loom) { 1 } else { threads };
        let results: Vec<Result<Vec<u32>>> = if threads <= 1 || to_write.len() == 1 {
            vec![worker()]
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = (0..threads.min(to_write.len())).map(|_| scope.spawn(worker)).collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or(Err(Error::InvalidArgument("table writer panicked"))))
                    .collect()
            })
        };
        let mut written = Vec::new();
        let mut first_error = None;
        for result in results {
            match result {
                Ok(ids) => written.extend(ids),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if !written.is_empty() {
            // Makes the new names durable; a table whose name is lost to a power cut before
            // this only means its segment is scanned at the next open.
            self.options.io.sync_dir(&self.dir).map_err(|e| Error::io("sync directory", &self.dir, e))?;
            self.restart_tables.lock().extend(written.iter().copied());
        }
        first_error.map_or(Ok(written.len()), Err)
    }
}
