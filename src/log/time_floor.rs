//! The store's latest time, kept in a small file (`TIME`) so that a wall clock stepped back
//! across a restart cannot bring an expired key back or shorten a lease: at open the store's
//! time starts no earlier than what the last process saw.
//!
//! The layout: ARCHITECTURE.md, "On disk", "TIME". A missing, torn or damaged file reads as 0
//! (the floor then comes from the records alone).
//!
//! While the store runs, [`TimeFloor`] keeps the durable part of that promise: what is known
//! durable (the file, synced, or a synced record's time) and the rule that an answer given at
//! store time `t` under `Sync` waits until that is at least `t`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::bytes::usize_from;
use crate::error::{Error, Result};
use crate::io::Io;

/// Name of the time floor file in a store directory.
pub const TIME_FILE_NAME: &str = "TIME";
const MAGIC: [u8; 4] = *b"IDTM";
const LEN: u64 = 16;

/// The time floor saved in `dir`, or 0.
pub fn read(io: &dyn Io, dir: &Path) -> u64 {
    let Ok(file) = io.open(&dir.join(TIME_FILE_NAME), LEN, false) else {
        return 0;
    };
    let mut raw = [0u8; usize_from(LEN)];
    if file.len() < LEN || file.read_at(0, &mut raw).is_err() || raw[12..16] != MAGIC {
        return 0;
    }
    let ms = crate::bytes::u64_at(&raw, 0);
    let crc = crate::bytes::u32_at(&raw, 8);
    if crc32fast::hash(&raw[0..8]) == crc { ms } else { 0 }
}

/// Saves `ms` as the time floor of `dir`; with `sync`, durably.
pub fn write(io: &dyn Io, dir: &Path, ms: u64, sync: bool) -> Result<()> {
    if ms > crate::clock::STORE_TIME_MS_MAX {
        // A clock stepped that far ahead is refused at open: saved as the floor, it would keep
        // the store from opening after the clock is mended.
        return Err(Error::ClockOutOfRange { now_ms: ms, max_ms: crate::clock::STORE_TIME_MS_MAX });
    }
    let path = dir.join(TIME_FILE_NAME);
    let (file, created) = match io.open(&path, LEN, true) {
        Ok(file) => (file, false),
        Err(_) => (io.create(&path, LEN).map_err(|e| Error::io("create time file", &path, e))?, true),
    };
    let mut raw = [0u8; usize_from(LEN)];
    raw[0..8].copy_from_slice(&ms.to_le_bytes());
    let crc = crc32fast::hash(&raw[0..8]);
    raw[8..12].copy_from_slice(&crc.to_le_bytes());
    raw[12..16].copy_from_slice(&MAGIC);
    file.reserve(LEN)
        .and_then(|()| file.write_at(0, &raw))
        .and_then(|()| if sync { file.sync() } else { Ok(()) })
        .map_err(|e| Error::io("write time file", &path, e))?;
    if created && sync {
        io.sync_dir(dir).map_err(|e| Error::io("sync directory", dir, e))?;
    }
    Ok(())
}

/// How far ahead of store time the floor is written while the housekeeper runs. A floor
/// written exactly at store time needs a sync whenever an answer comes at a later millisecond
/// than any durable one; one written 2 s ahead needs one every second or so, which the
/// housekeeper makes before the store's time reaches the floor, so answers rarely wait for
/// it. The cost: after a crash the store's time may start up to this far past the last
/// answer, as after a forward step of the wall clock (keys that had under 2 s left expire at
/// once, leases end up to 2 s early). A clean close writes the exact time, so a clean restart
/// moves nothing; without the housekeeper the floor is written exactly (no lead).
pub const LEAD_MS: u64 = 2_000;

/// The durable floor of the store's time, kept while a writer runs.
///
/// Store time never goes backwards across restarts only if, whenever an answer was given at
/// store time `t`, something on disk that survives a power cut holds a time of at least `t`:
/// the `TIME` file (synced), or a synced record (recovery takes the latest record time as a
/// floor too). This keeps the highest such time known, raises it by writing and syncing the
/// file ([`TimeFloor::cover`]), and never writes the file lower than it was made durable while
/// the store runs.
pub struct TimeFloor {
    io: Arc<dyn Io>,
    dir: PathBuf,
    /// The highest time known durable: in the synced file, or in a synced record.
    durable_ms: AtomicU64,
    /// How far past the time asked for the floor is written (`LEAD_MS` or 0).
    lead_ms: AtomicU64,
    /// Serializes writes of the file and holds the highest value written by this process, so
    /// two writers never race a smaller value over a larger one.
    written_ms: Mutex<u64>,
    /// The file's directory entry was made durable by this process. A file created by an
    /// unsynced write (under `Durability::None`, maybe by an earlier process) may exist only in
    /// the page cache's view of the directory: the first synced write syncs the directory too.
    name_durable: std::sync::atomic::AtomicBool,
}

impl TimeFloor {
    /// A floor for the store in `dir`; nothing is known durable yet.
    pub fn new(io: Arc<dyn Io>, dir: PathBuf) -> Self {
        TimeFloor {
            io,
            dir,
            durable_ms: AtomicU64::new(0),
            lead_ms: AtomicU64::new(0),
            written_ms: Mutex::new(0),
            name_durable: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// From now on, a floor that must be raised is written `lead_ms` past the time asked for
    /// (see `LEAD_MS`).
    pub fn set_lead(&self, lead_ms: u64) {
        self.lead_ms.store(lead_ms, Ordering::Relaxed);
    }

    /// The highest store time known durable.
    pub fn durable_ms(&self) -> u64 {
        self.durable_ms.load(Ordering::Acquire)
    }

    /// Records holding times up to `ms` are durable (a sync covered them, or recovery found and
    /// synced them): after a power cut the store's time starts no earlier than `ms`.
    pub fn note_durable(&self, ms: u64) {
        self.durable_ms.fetch_max(ms, Ordering::AcqRel);
    }

    /// Makes sure a store time of at least `at_least_ms` is durable; when it is not yet, writes
    /// and syncs `at_least_ms` plus the lead as the floor. No lock may be held by the caller:
    /// this may fsync.
    pub fn cover(&self, at_least_ms: u64) -> Result<()> {
        self.raise(at_least_ms, at_least_ms)
    }

    /// Keeps the durable floor at least half the lead ahead of `now_ms`, renewing it to
    /// `now_ms` plus the lead when it falls closer (without a lead: covers `now_ms`).
    pub fn keep_ahead(&self, now_ms: u64) -> Result<()> {
        let lead = self.lead_ms.load(Ordering::Relaxed);
        // Ahead, but not past the last supported time (unless `now_ms` itself is).
        let needed_ms = now_ms.saturating_add(lead / 2).min(crate::clock::STORE_TIME_MS_MAX.max(now_ms));
        self.raise(needed_ms, now_ms)
    }

    /// When less than `needed_ms` is durable, writes and syncs `from_ms` plus the lead.
    fn raise(&self, needed_ms: u64, from_ms: u64) -> Result<()> {
        if self.durable_ms() >= needed_ms {
            return Ok(());
        }
        let mut written = self.written_ms.lock();
        // Another caller may have raised it while this one waited for the lock.
        if self.durable_ms() >= needed_ms {
            return Ok(());
        }
        // The lead never carries the floor past the last time a store accepts (a floor there
        // would keep the store from opening); a time past it is refused by `write` itself.
        let ahead = from_ms.saturating_add(self.lead_ms.load(Ordering::Relaxed)).min(crate::clock::STORE_TIME_MS_MAX);
        let floor = ahead.max(needed_ms).max(*written);
        self.write_synced(floor)?;
        *written = floor;
        self.note_durable(floor);
        Ok(())
    }

    /// Writes and syncs `ms` as the floor; the first time in this process, syncs the directory
    /// too (see `name_durable`). The caller holds `written_ms`.
    fn write_synced(&self, ms: u64) -> Result<()> {
        write(self.io.as_ref(), &self.dir, ms, true)?;
        if !self.name_durable.load(Ordering::Acquire) {
            self.io.sync_dir(&self.dir).map_err(|e| Error::io("sync directory", &self.dir, e))?;
            self.name_durable.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Writes `now_ms` as the floor without a sync (`Durability::None`: a power cut may lose
    /// anything), unless a higher value was written already.
    pub fn save_unsynced(&self, now_ms: u64) -> Result<()> {
        let mut written = self.written_ms.lock();
        if now_ms <= *written {
            return Ok(());
        }
        write(self.io.as_ref(), &self.dir, now_ms, false)?;
        *written = now_ms;
        Ok(())
    }

    /// Writes and syncs exactly `now_ms`, the store's time at close, even below what was
    /// written ahead: no answer comes after the close, and every answer before it was given at
    /// a time at most `now_ms`, so the next open starts where this process stopped, not up to
    /// `LEAD_MS` later.
    pub fn save_final(&self, now_ms: u64) -> Result<()> {
        let mut written = self.written_ms.lock();
        // Lowered first: should anything still ask for a later time, it waits for this lock
        // and then writes a floor of its own.
        self.durable_ms.store(now_ms, Ordering::Release);
        self.write_synced(now_ms)?;
        *written = now_ms;
        Ok(())
    }
}
