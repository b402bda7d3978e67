//! The bare group commit: the store's own group commit (`GroupCommit`, the handoff
//! `Durability::Sync` makes) with no store around it, as the practical ceiling to read the
//! store's ratio against. The limit in the table assumes each of 16 writers costs nothing
//! between syncs; on a machine with fewer cores than writers, waking them and letting each
//! write again takes time the disk then sits idle for.
//!
//! Each writer appends 64 B under a mutex (a `pwrite` at the next offset of a preallocated,
//! zero-filled file), then waits in `GroupCommit::wait_durable` until a sync covers it; the
//! sync is one `fdatasync`. Nothing else: no index, no records, no checksums, no map.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idemstore::internals::{GroupCommit, Syncer};

use super::support::duration_nanos;
use super::{Row, RowKind};

/// Bytes each writer appends per op, as in the raw loops.
const RECORD: [u8; 64] = [0x3Cu8; 64];
/// Size of the preallocated file; offsets wrap around.
const FILE_BYTES: u64 = 64 << 20;

/// The writers' file, and what a sync needs to know of it.
struct Writes {
    file: File,
    /// The last written sequence number, under the lock that orders the writes.
    written: Mutex<u64>,
    /// Mirrors `written` for the syncing leader, which does not take the lock.
    written_seen: AtomicU64,
    sync_ns_total: AtomicU64,
}

impl Writes {
    /// Writes one record; returns its sequence number.
    fn write(&self) -> u64 {
        let mut written = self.written.lock().expect("written lock");
        *written += 1;
        let offset = (*written * RECORD.len() as u64) % FILE_BYTES;
        self.file.write_all_at(&RECORD, offset).expect("bare commit: write");
        self.written_seen.store(*written, Ordering::Release);
        *written
    }
}

impl Syncer for Writes {
    fn sync_all(&self) -> io::Result<u64> {
        // Every record up to here is in the page cache, so the fdatasync below covers it.
        let through = self.written_seen.load(Ordering::Acquire);
        let started = Instant::now();
        self.file.sync_data()?;
        self.sync_ns_total.fetch_add(duration_nanos(started.elapsed()), Ordering::Relaxed);
        Ok(through)
    }

    fn written_seq(&self) -> Option<u64> {
        Some(self.written_seen.load(Ordering::Acquire))
    }
}

/// The bare group commit's row: `threads` writers for `duration`.
pub fn row(dir: &Path, threads: usize, duration: Duration) -> Row {
    let path = dir.join("bare-commit.bin");
    let writes = Arc::new(Writes {
        file: super::zero_filled_file(&path, FILE_BYTES),
        written: Mutex::new(0),
        written_seen: AtomicU64::new(0),
        sync_ns_total: AtomicU64::new(0),
    });
    let commit = Arc::new(GroupCommit::new(0));
    let written_before = super::device_bytes_written(dir);
    let (ops, elapsed, hist) = super::run_workers(threads, duration, |_| {
        let (writes, commit) = (writes.clone(), commit.clone());
        move || {
            let seq = writes.write();
            commit.wait_durable(seq, writes.as_ref()).expect("bare commit: fdatasync");
            1
        }
    });
    let (syncs, records) = commit.counters();
    let kib_per_sync = super::kib_per_sync(written_before, super::device_bytes_written(dir), syncs);
    let sync_ns_total = writes.sync_ns_total.load(Ordering::Relaxed);
    std::fs::remove_file(&path).expect("remove bare commit file");
    Row {
        name: "bare group commit (no store: pwrite + shared fdatasync, see bare_commit.rs)".into(),
        durability: "fdatasync".into(),
        threads,
        ops,
        elapsed,
        hist,
        records_per_sync: (syncs > 0).then(|| records as f64 / syncs as f64),
        mean_sync_us: (syncs > 0).then(|| sync_ns_total as f64 / syncs as f64 / 1000.0),
        kib_per_sync,
        kind: RowKind::BareCommit,
    }
}
