//! The store: claim, complete, checkpoint, release, get, remove, orphans, sync, close.
//!
//! Every decision about a key is made under its index shard's lock, in one step that reads the
//! key's latest record, compares the request hash, and (when it writes) appends the new record
//! and repoints the index. Durability waits happen after the shard lock is released.
//!
//! This file holds `Store`'s public methods and the state they share (`Inner`); the work is
//! split by job: `open` (opening), `lookup` (finding a key's latest record), `claim`,
//! `finish` (complete, checkpoint, release, remove), `batch` (`claim_many`, `complete_many`),
//! `listing` (`get`, keys, orphans), `write` (appending), `durability` (the waits for group
//! commit, the time floor), `maintain` (expiry, sealing), `restart_tables`, `housekeeper` (the
//! background threads) and `stats`.
//!
//! The helpers the claim path calls from one of these files into another (`find`, `current`,
//! `append`, the checks, `token_for`, ...) carry `#[inline]`: each file is compiled apart, and
//! without the hint those calls cost the claim path about 0.5 % more instructions than when
//! all of this was one file (callgrind on `benches/hot_paths.rs`).

mod async_ops;
mod batch;
mod claim;
mod durability;
mod export;
mod finish;
mod history;
mod housekeeper;
mod listing;
mod lookup;
mod maintain;
mod namespaces;
mod open;
mod restart_tables;
mod scan;
mod stats;
mod window_ops;
mod write;

pub use history::KeyHistory;
pub use scan::Scan;
pub use window_ops::Advance;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
#[cfg(feature = "sim")]
use std::time::Duration;

use crate::clock::StoreTime;
use crate::commit::GroupCommit;
use crate::error::{Error, Result};
use crate::io::DirLock;
use crate::log::record::Kind;
use crate::log::segment_cache::SegmentCache;
use crate::log::{Loc, Log};
#[cfg(feature = "sim")]
use crate::options::Durability;
use crate::options::{ClaimOptions, Options};
use crate::recovery::store_dir::take_writer_lock;
use crate::recovery::{self, Mode, VerifyReport};
use crate::sealed::SealedTables;
use crate::stats::{Counters, RecoveryStats, ShardCounters, Stats};
use crate::sync::{Arc, Condvar, Mutex};
use crate::types::{Claim, ClaimToken, Entry, Orphan};

use housekeeper::HousekeeperCall;
#[cfg(feature = "sim")]
use housekeeper::PassAsks;
use open::{new_incarnation, validate_options};

/// An open store. `Send + Sync`: share it as `Arc<Store>`.
pub struct Store {
    inner: Arc<Inner>,
    /// The background threads: the housekeeper and, under `Periodic`, the flusher.
    background: Vec<JoinHandle<()>>,
    /// `close` ran: its sync and time floor need not be written again on drop.
    closed: bool,
}

struct Inner {
    dir: PathBuf,
    options: Options,
    time: StoreTime,
    log: Log,
    index: Index,
    sealed: SealedTables,
    commit: GroupCommit,
    counters: Counters,
    incarnation: u64,
    /// This store's identity, carried by every token it hands out: a token of another store
    /// (whose ids are numbers this store may hand out too) is refused, never taken as proof.
    identity: u64,
    /// How keys are hashed for the index: under the store's secret, or unkeyed in a version 1
    /// store (`Options::key_hash`, a test seam, overrides it).
    index_hash: crate::hash::IndexHash,
    /// What sealed tables record of that hash (see `IndexHash::table_mark`).
    table_mark: u32,
    recovery: RecoveryStats,
    read_only: bool,
    /// What the housekeeper is asked to do now, and the signal that wakes it.
    housekeeper_call: Mutex<HousekeeperCall>,
    housekeeper_signal: Condvar,
    /// Serializes expiry and sealing (the housekeeper and `Store::maintain`).
    maintenance: Mutex<()>,
    /// Segments with a restart table on disk (see `write_restart_tables`) that is not in
    /// `sealed`: their entries are still in RAM, and only the next open reads the table.
    /// Changed under `maintenance`.
    restart_tables: Mutex<HashSet<u32>>,
    /// Async callers' waits: durable writes and keys in flight (see `async_ops`).
    async_waits: std::sync::Arc<async_ops::AsyncWaits>,
    /// Counters of each namespace a handle was made for (see `crate::namespace`).
    namespaces: Mutex<std::collections::HashMap<String, std::sync::Arc<crate::namespace::NamespaceCounters>>>,
    _lock: Option<Box<dyn DirLock>>,
}

/// What the store keeps beside each index shard, under the shard's lock: plain counters (so
/// threads on different shards never fight over a counter's cache line) and handles to the
/// segments the shard's records live in (read without the log's map).
#[derive(Default)]
struct ShardLocal {
    segments: SegmentCache,
    counters: ShardCounters,
    /// Replays served by each completed record and not yet written into a copy of it (see
    /// `Store::history`): only replayed keys take room, and a record's count goes with its
    /// segment.
    replays: crate::hash::IdMap<u64, history::PendingReplays>,
}

/// A record's location as one integer (the key of `ShardLocal::replays`).
fn loc_id(loc: Loc) -> u64 {
    u64::from(loc.segment) << 32 | u64::from(loc.offset)
}

/// The location `loc_id` made `id` of.
fn loc_of_id(id: u64) -> Loc {
    let [a, b, c, d, e, f, g, h] = id.to_be_bytes();
    Loc { segment: u32::from_be_bytes([a, b, c, d]), offset: u32::from_be_bytes([e, f, g, h]) }
}

type Index = crate::index::Index<ShardLocal>;
type Shard = crate::index::Shard<ShardLocal>;

/// Drops every entry of `shard` whose segment `is_live` rejects, and its handles to those
/// segments; returns how many entries went.
fn sweep_shard(shard: &mut Shard, is_live: impl Fn(u32) -> bool) -> usize {
    shard.local.segments.retain(&is_live);
    shard.local.replays.retain(|&id, _| is_live(loc_of_id(id).segment));
    shard.retain_live(is_live)
}

/// Refuses a store time past [`STORE_TIME_MS_MAX`](crate::clock::STORE_TIME_MS_MAX): sequence
/// numbers (fencing tokens) start above it shifted by `SEQ_TIME_SHIFT` bits, and must not
/// overflow.
fn check_store_time(now_ms: u64) -> Result<()> {
    if now_ms > crate::clock::STORE_TIME_MS_MAX {
        return Err(Error::ClockOutOfRange { now_ms, max_ms: crate::clock::STORE_TIME_MS_MAX });
    }
    Ok(())
}

impl Store {
    /// Opens the store in `dir` and recovers its state; creates it when `dir` is missing or
    /// empty and `Options::create_if_missing` is set (the default).
    ///
    /// Fails with `NotAStore` when `dir` is a file, a directory of other files (no `META`,
    /// segment, or `LOCK` and `TIME`), or holds no store and `create_if_missing` is false.
    /// Fails with `Locked` when another open store holds the directory, `UnsupportedVersion`
    /// for files of another format version, `Corrupt` when a record that is not a torn tail is
    /// damaged (nothing is deleted then), `UnsafePermissions` when other users can write the
    /// directory, and `Io` when the directory cannot be created, locked or written.
    ///
    /// A missing directory is created with the mode of `Options::file_access` (0700 by
    /// default), and so is every file; an existing directory and its files keep their modes.
    pub fn open(dir: impl AsRef<Path>, options: Options) -> Result<Store> {
        validate_options(&options)?;
        let dir = dir.as_ref().to_path_buf();
        let mut options = options;
        // The disk is given the modes once, here: every file the store creates goes through
        // `Io::create`, which then applies them, with no mode passed by each caller.
        if let Some(io) = options.io.with_access(options.file_access) {
            options.io = io;
        }
        let io = options.io.clone();
        // Before anything is created: a typo'd path, a file or another program's directory is
        // an error, not a new empty store (which would dedupe nothing that came before).
        match io.list(&dir) {
            Ok(names) => match crate::recovery::store_dir::classify(&names) {
                crate::recovery::store_dir::Contents::Store => {}
                crate::recovery::store_dir::Contents::Empty if options.create_if_missing => {}
                contents => return Err(crate::recovery::store_dir::not_a_store(&dir, &contents)),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && options.create_if_missing => {}
            Err(e) => return Err(crate::recovery::store_dir::unlistable(&dir, e)),
        }
        io.create_dir_all(&dir).map_err(|e| Error::io("create store directory", &dir, e))?;
        // Before the lock file: nothing is created in a directory others can write.
        crate::io::permissions::refuse_unsafe(io.as_ref(), &dir)?;
        let lock = take_writer_lock(io.as_ref(), &dir)?;
        let incarnation = new_incarnation(&dir)?;
        let store = Self::open_inner(dir, options, Some(lock), Mode::Writer, incarnation)?;
        // Only an open that succeeded writes anything (a refused open changes no file).
        if let Some(lock) = &store.inner._lock {
            lock.set_owner(crate::io::LockOwner { incarnation, pid: std::process::id() })
                .map_err(|e| Error::io("write lock file", store.inner.dir.join(crate::io::LOCK_FILE_NAME), e))?;
        }
        Ok(store)
    }

    /// `Ok` when `dir` holds a store (`META`, a segment or table file, or `LOCK` and `TIME`),
    /// without opening it; else `Error::NotAStore` saying what is there instead (nothing, a
    /// file, an empty directory or other files). The writer's `open` decides with the same
    /// rule; the `idemstore` command line checks every path with it.
    pub fn check_is_store(dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let names =
            crate::io::Io::list(&crate::io::RealIo, dir).map_err(|e| crate::recovery::store_dir::unlistable(dir, e))?;
        match crate::recovery::store_dir::classify(&names) {
            crate::recovery::store_dir::Contents::Store => Ok(()),
            contents => Err(crate::recovery::store_dir::not_a_store(dir, &contents)),
        }
    }

    /// Opens a read-only view of the store in `dir`, without taking the writer's lock and
    /// without changing a byte, even while another process writes it. The view is the state
    /// at open; a tail being written is not an error, it is simply not visible. Writes fail
    /// with `Error::ReadOnly`.
    pub fn open_read_only(dir: impl AsRef<Path>) -> Result<Store> {
        Self::open_read_only_with(dir, Options::default())
    }

    /// [`Store::open_read_only`] with explicit options (clock, I/O, limits).
    ///
    /// A view of a directory that holds no store yet is an empty view (a writer may be about
    /// to create it); [`Store::check_is_store`] tells the two apart first.
    pub fn open_read_only_with(dir: impl AsRef<Path>, options: Options) -> Result<Store> {
        validate_options(&options)?;
        let dir = dir.as_ref().to_path_buf();
        // Claims of the live writer (if any) are in flight, not orphans.
        let incarnation = match options.io.lock_owner(&dir) {
            Some(owner) => owner.incarnation,
            None => new_incarnation(&dir)?,
        };
        Self::open_inner(dir, Options { background: false, ..options }, None, Mode::ReadOnly, incarnation)
    }

    /// Claims `key` for the request `request` (only its 128-bit hash is kept), with the
    /// store's default TTL and lease. See [`Store::claim_with`].
    pub fn claim(&self, key: impl AsRef<[u8]>, request: impl AsRef<[u8]>) -> Result<Claim> {
        self.claim_with(key, request, ClaimOptions::default())
    }

    /// Claims `key`: exactly one concurrent caller gets `Acquired`; a repeat gets
    /// `InProgress` while the holder's lease runs, `Completed` with the stored outcome once it
    /// completed, and `Mismatch` on every branch when its request differs. An in-flight claim
    /// whose lease ended, or (by default) whose holder died with an earlier process, is taken
    /// over: the new token says `recovered()` and carries the last checkpoint.
    ///
    /// With `options.wait`, an in-flight key blocks the caller (on a condition, no polling)
    /// until the holder completes, releases, or its lease ends, or the wait runs out.
    ///
    /// Fails on an empty or over-long key, a zero TTL or lease, a full disk or disk budget,
    /// a poisoned or read-only store. Under `Durability::Sync` it returns only once the record
    /// behind its answer is durable.
    pub fn claim_with(&self, key: impl AsRef<[u8]>, request: impl AsRef<[u8]>, options: ClaimOptions) -> Result<Claim> {
        let answer = self.inner.claim(key.as_ref(), request.as_ref(), &options);
        self.inner.report_claim(key.as_ref(), &answer);
        answer
    }

    /// Claims a batch of keys, each with its request, as [`Store::claim_with`] would one after
    /// the other; returns one answer per item, in order. Faster than single claims on two
    /// counts: the index slots and records of a window of keys are loaded into cache together
    /// (their memory misses overlap instead of queueing), and under `Durability::Sync` the
    /// batch waits for one sync, not one per claim. A key that appears twice is claimed twice,
    /// in order: when the first acquired it, the second answer is `InProgress` (at once, even
    /// with `options.wait`: it would otherwise wait on the batch's own claim).
    ///
    /// Each item fails on its own as a single claim would (empty key, bad options, full disk);
    /// the others go on. Under `Sync`, a failed sync fails with `Poisoned` every answer that
    /// rests on a record not yet durable (every acquisition of the batch, and every answer read
    /// from one): none of those can be trusted. `options.wait` makes
    /// each key held by someone else block the rest of the batch, while the leases of the keys
    /// the batch acquired before it run (and, under `Sync`, none of its answers is returned).
    pub fn claim_many<K: AsRef<[u8]>, R: AsRef<[u8]>>(
        &self,
        items: &[(K, R)],
        options: ClaimOptions,
    ) -> Vec<Result<Claim>> {
        let answers = self.inner.claim_many(items, &options);
        for ((key, _), answer) in items.iter().zip(&answers) {
            self.inner.report_claim(key.as_ref(), answer);
        }
        answers
    }

    /// Completes a batch of held claims, each with its outcome, as [`Store::complete`] would
    /// one after the other; returns one answer per item, in order. Under `Durability::Sync`
    /// the batch waits for one sync, not one per complete, and the keys' lookups are prefetched
    /// together (see [`Store::claim_many`]).
    ///
    /// Each item fails on its own as a single complete would (`StaleToken`, `OutcomeTooLong`,
    /// a full disk); the others go on. Under `Sync`, a failed sync fails with `Poisoned` every
    /// answer that rests on a record not yet durable: every complete of the batch, and a
    /// `StaleToken` read from a record that superseded the token but was never synced.
    pub fn complete_many<O: AsRef<[u8]>>(&self, items: &[(&ClaimToken, O)]) -> Vec<Result<()>> {
        self.inner.complete_many(items)
    }

    /// Completes the claim held by `token`, storing `outcome` for every later repeat. Fails
    /// with `StaleToken` when the token no longer holds the key (taken over, removed,
    /// released, already completed, expired), `OutcomeTooLong` over `max_outcome_len`.
    pub fn complete(&self, token: &ClaimToken, outcome: impl AsRef<[u8]>) -> Result<()> {
        self.inner.finish(token, Kind::Complete, outcome.as_ref())
    }

    /// Records how far the holder got (`phase`, bytes of the caller's choosing) and renews
    /// the lease. A later holder that takes the claim over reads it from its token.
    pub fn checkpoint(&self, token: &ClaimToken, phase: impl AsRef<[u8]>) -> Result<()> {
        self.inner.finish(token, Kind::Checkpoint, phase.as_ref())
    }

    /// Gives the claim up (the effect failed in a retryable way): the key is free again.
    pub fn release(&self, token: &ClaimToken) -> Result<()> {
        self.inner.finish(token, Kind::Release, &[])
    }

    /// The state of `key`: `None` when absent, released, removed or expired.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Entry>> {
        self.inner.get(key.as_ref())
    }

    /// Removes `key` (a tombstone that lasts as long as what it removes). Removing an absent
    /// key is `Ok`. An in-flight holder's token becomes stale.
    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<()> {
        self.inner.remove(key.as_ref())
    }

    /// Every key in the window with its entry, sorted by key (absent, released, removed and
    /// expired keys are left out). Reads the whole index: meant for tools, not hot paths.
    pub fn keys(&self) -> Result<Vec<(Vec<u8>, Entry)>> {
        self.inner.keys()
    }

    /// Checks every checksum of every segment file in `dir` without changing a byte and
    /// without taking the lock, so it works on a live store. Torn tails are reported, not
    /// counted as problems.
    pub fn verify(dir: impl AsRef<Path>) -> Result<VerifyReport> {
        let options = Options::default();
        recovery::verify(options.io.as_ref(), dir.as_ref(), options.segment_bytes_max)
    }

    /// What is wrong with the mode of the store directory `dir` for a store meant to be read
    /// with `access`: the sentences `Stats::warnings` would carry (each ends with the `chmod`
    /// that fixes it); empty when nothing is. Reads the directory's mode only, without opening
    /// the store, so it works on a live or damaged one (`idemstore verify` prints them).
    pub fn permission_warnings(dir: impl AsRef<Path>, access: crate::io::permissions::FileAccess) -> Vec<String> {
        crate::io::permissions::warnings(Options::default().io.as_ref(), dir.as_ref(), access)
    }

    /// In-flight claims whose holder belonged to an earlier process.
    pub fn orphans(&self) -> Result<Vec<Orphan>> {
        self.inner.orphans()
    }

    /// Makes every write so far durable (one fsync round, shared with concurrent callers).
    pub fn sync(&self) -> Result<()> {
        self.inner.sync_all()
    }

    /// Drops every expired bucket now and cleans its index entries, seals segments idle for
    /// `Options::seal_idle_after`, writes restart tables for segments that stopped taking
    /// appends (so a reopen maps them instead of scanning), and saves the store's time floor (the background thread does
    /// this on its own about once a second). Returns the number of buckets dropped.
    ///
    /// A failure is returned, and also counted in `Stats::maintenance_errors_total` and kept
    /// in `Stats::last_maintenance_error`, as the housekeeper's are.
    pub fn maintain(&self) -> Result<usize> {
        self.inner.maintain_noted()
    }

    /// Test seam: `fault` runs at the start of every maintenance pass (the housekeeper's or
    /// `maintain`'s), with the maintenance lock held, until `clear_maintenance_fault`. An error
    /// fails the pass as a failed step of it would; a panic is a panic of the pass. Every pass
    /// from the next on meets it, so a test needs no timing to see what a failing pass leaves.
    #[cfg(feature = "sim")]
    #[doc(hidden)]
    pub fn set_maintenance_fault(&self, fault: impl Fn() -> std::io::Result<()> + Send + Sync + 'static) {
        self.inner.housekeeper_call.lock().maintenance_fault = Some(std::sync::Arc::new(fault));
    }

    /// Test seam: maintenance passes run without the fault of `set_maintenance_fault` again.
    #[cfg(feature = "sim")]
    #[doc(hidden)]
    pub fn clear_maintenance_fault(&self) {
        self.inner.housekeeper_call.lock().maintenance_fault = None;
    }

    /// Test seam: `fault` runs once, in the flusher's next periodic sync, before it syncs.
    #[cfg(feature = "sim")]
    #[doc(hidden)]
    pub fn on_next_periodic_sync(&self, fault: impl FnOnce() + Send + 'static) {
        self.inner.housekeeper_call.lock().periodic_sync_fault = Some(Box::new(fault));
    }

    /// Test seam: has the housekeeper thread run a pass (maintenance, then the spare segment)
    /// now, and returns once a pass that began after this call has ended, so a test needs no
    /// timing. False at once when the store runs no housekeeper.
    #[cfg(feature = "sim")]
    #[doc(hidden)]
    pub fn run_housekeeping_pass(&self) -> bool {
        self.wait_for_background_pass(|call| &mut call.passes)
    }

    /// Test seam: has the flusher of a `Periodic` store sync now, and returns once a sync that
    /// began after this call has ended. False at once when the store runs no flusher.
    #[cfg(feature = "sim")]
    #[doc(hidden)]
    pub fn run_periodic_sync(&self) -> bool {
        if !matches!(self.inner.options.durability, Durability::Periodic(_)) {
            return false;
        }
        self.wait_for_background_pass(|call| &mut call.periodic_syncs)
    }

    /// Asks a background thread for a pass (through the asks `which` picks) and waits until a
    /// pass that began after the ask has ended, or the thread is gone.
    #[cfg(feature = "sim")]
    fn wait_for_background_pass(&self, which: impl Fn(&mut HousekeeperCall) -> &mut PassAsks) -> bool {
        if self.background.is_empty() {
            return false;
        }
        let mut call = self.inner.housekeeper_call.lock();
        let asks = which(&mut call);
        asks.asked += 1;
        let want = asks.asked;
        self.inner.housekeeper_signal.notify_all();
        while which(&mut call).done < want {
            if call.stop || self.background.iter().any(JoinHandle::is_finished) {
                return false;
            }
            // Woken when the pass ends; the timeout only rechecks that the thread still lives.
            crate::sync::wait_for(&self.inner.housekeeper_signal, &mut call, Duration::from_millis(50));
        }
        true
    }

    /// Test seam: `hook` runs once, inside the next sealing pass, right after the segments to
    /// seal are chosen and before their index entries are collected.
    #[cfg(feature = "sim")]
    #[doc(hidden)]
    pub fn on_next_retire(&self, hook: impl FnOnce() + Send + 'static) {
        self.inner.log.on_next_retire(Box::new(hook));
    }

    /// Test seam: holds maintenance (expiry, sealing) off until the returned guard drops, as a
    /// long bucket drop would; background work that is not maintenance must go on meanwhile.
    #[cfg(feature = "sim")]
    #[doc(hidden)]
    #[must_use = "maintenance is held only while the guard lives"]
    pub fn hold_maintenance(&self) -> impl Sized + '_ {
        self.inner.maintenance.lock()
    }

    /// Test and bench seam: (longest, mean) distance of the RAM index's entries from their home
    /// slots, the slots a lookup of a stored key walks past. Keys piled on one home slot show
    /// as a long walk.
    #[doc(hidden)]
    pub fn index_probe_stats(&self) -> (usize, f64) {
        self.inner.index.probe_stats()
    }

    /// A snapshot of the store's counters.
    pub fn stats(&self) -> Stats {
        self.inner.stats()
    }

    /// The directory of the store.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Stops the background thread, syncs everything written, writes a restart table for
    /// every segment that has none (so the next open maps them and scans nothing), and
    /// releases the lock.
    pub fn close(mut self) -> Result<()> {
        self.stop_background();
        self.closed = true;
        if self.inner.read_only {
            return Ok(());
        }
        self.inner.flush_history(self.inner.time.now_ms(), true);
        self.inner.sync_all()?;
        // A table that could not be written only means a scan at the next open: the time
        // floor and the durable marks are saved either way, then the failure reported.
        let tables = self.inner.restart_tables_at_close();
        self.inner.save_time(true)?;
        // After the final sync: every record of a closed store is protected (see `log/marks.rs`).
        self.inner.log.sync_marks()?;
        tables
    }

    /// Stops the background threads and waits for them to end.
    fn stop_background(&mut self) {
        self.inner.async_waits.stop();
        if self.background.is_empty() {
            return;
        }
        self.inner.housekeeper_call.lock().stop = true;
        self.inner.housekeeper_signal.notify_all();
        for handle in self.background.drain(..) {
            let _ = handle.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.stop_background();
        if !self.closed && !self.inner.read_only && self.inner.commit.poisoned().is_none() {
            self.inner.flush_history(self.inner.time.now_ms(), true);
            let _ = self.inner.sync_all();
            let _ = self.inner.restart_tables_at_close();
            let _ = self.inner.save_time(true);
            let _ = self.inner.log.sync_marks();
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.inner.dir).field("read_only", &self.inner.read_only).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_lets_go_of_the_handles_of_dead_segments() {
        use crate::io::Io;
        let disk = crate::io::sim::SimDisk::new();
        let dir = std::path::Path::new("/store");
        disk.create_dir_all(dir).unwrap();
        let mut shard = Shard::default();
        for id in [1, 2] {
            let header = crate::log::segment::SegmentHeader {
                id,
                bucket_start_ms: 0,
                bucket_end_ms: 1,
                created_at_ms: 0,
                rebuilt: false,
            };
            let segment = crate::log::segment::Segment::create(&disk, dir, header, 4096, 4096, false).unwrap();
            shard.local.segments.way_mut(id).replace(std::sync::Arc::new(segment));
        }
        sweep_shard(&mut shard, |s| s == 2);
        assert!(shard.local.segments.way_mut(1).is_none(), "the dead segment's handle stayed");
        assert!(shard.local.segments.way_mut(2).is_some(), "the live segment's handle went");
    }
}
