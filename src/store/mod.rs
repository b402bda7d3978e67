//! The store: claim, complete, checkpoint, release, get, remove, orphans, sync, close.
//!
//! Every decision about a key is made under its index shard's lock, in one step that reads the
//! key's latest record, compares the request hash, and (when it writes) appends the new record
//! and repoints the index. Durability waits happen after the shard lock is released.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering as AtomicOrdering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::clock::{StoreTime, duration_to_ms, ms_to_system_time};
use crate::commit::GroupCommit;
use crate::error::{Error, Result};
use crate::hash::key_hash;
use crate::io::DirLock;
use crate::log::record::{HEADER_LEN, Header, Kind, VALUE_LEN_FORMAT_MAX, align_up};
use crate::log::segment::{SEGMENT_HEADER_LEN, Segment};
use crate::log::segment_cache::SegmentCache;
use crate::log::{Loc, Log, LogLimits};
use crate::options::{ClaimOptions, Durability, Options, OrphanPolicy};
use crate::recovery::store_dir::take_writer_lock;
use crate::recovery::{self, Mode, VerifyReport};
use crate::sealed::{SealedTables, Table, TableBounds};
use crate::stats::{Counters, RecoveryStats, ShardCounters, Stats};
use crate::sync::{Arc, Condvar, Mutex};
use crate::types::{Claim, ClaimToken, Completed, Entry, Orphan};

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
    _lock: Option<Box<dyn DirLock>>,
}

/// What the store keeps beside each index shard, under the shard's lock: plain counters (so
/// threads on different shards never fight over a counter's cache line) and handles to the
/// segments the shard's records live in (read without the log's map).
#[derive(Default)]
struct ShardLocal {
    segments: SegmentCache,
    counters: ShardCounters,
}

type Index = crate::index::Index<ShardLocal>;
type Shard = crate::index::Shard<ShardLocal>;

/// Drops every entry of `shard` whose segment `is_live` rejects, and its handles to those
/// segments; returns how many entries went.
fn sweep_shard(shard: &mut Shard, is_live: impl Fn(u32) -> bool) -> usize {
    shard.local.segments.retain(&is_live);
    shard.retain_live(is_live)
}

/// A key's latest record, which the record being written supersedes.
#[derive(Debug, Clone, Copy)]
struct Superseded {
    loc: Loc,
    padded_len: u64,
    /// End of the bucket of the segment holding it (read when it was found).
    bucket_end_ms: u64,
}

/// A key's latest record as `find` read it: where it is, its header and its value.
struct Found {
    old: Superseded,
    header: Header,
    value: Vec<u8>,
}

/// The state of a key as its latest record tells it, at a given time. It borrows the record
/// from a slot of the caller's, so a replay's header and outcome are read into place once
/// instead of being moved through every layer between the segment and the answer.
enum Current<'a> {
    Absent,
    /// The record; its value is the last checkpoint.
    InFlight(&'a mut Found),
    /// The record; its value is the outcome.
    Completed(&'a mut Found),
}

fn validate_options(options: &Options) -> Result<()> {
    if options.max_key_len == 0 || options.max_key_len > crate::log::record::KEY_LEN_FORMAT_MAX {
        return Err(Error::InvalidArgument("max_key_len must be 1..=65535"));
    }
    if options.max_outcome_len > VALUE_LEN_FORMAT_MAX {
        return Err(Error::InvalidArgument("max_outcome_len must be at most 64 MiB"));
    }
    if duration_to_ms(options.bucket_width) == 0 {
        return Err(Error::InvalidArgument("bucket_width must be at least 1 ms"));
    }
    if duration_to_ms(options.default_ttl) == 0 || duration_to_ms(options.default_lease) == 0 {
        return Err(Error::InvalidArgument("default_ttl and default_lease must be at least 1 ms"));
    }
    if options.default_ttl > crate::options::TTL_MAX {
        return Err(Error::InvalidArgument("default_ttl must be at most TTL_MAX (10 years)"));
    }
    if u32::try_from(duration_to_ms(options.default_lease)).is_err() {
        return Err(Error::InvalidArgument("default_lease must be under 49 days"));
    }
    if let Durability::Periodic(interval) = options.durability
        && (interval.is_zero() || interval > PERIODIC_INTERVAL_MAX)
    {
        return Err(Error::InvalidArgument("a Periodic interval must be positive and at most a day"));
    }
    let largest_record = align_up((HEADER_LEN + options.max_key_len + options.max_outcome_len) as u64);
    if options.segment_bytes_max > u64::from(u32::MAX)
        || options.segment_bytes_max < SEGMENT_HEADER_LEN + largest_record
    {
        return Err(Error::InvalidArgument("segment_bytes_max must hold the largest record and be at most 4 GiB"));
    }
    Ok(())
}

/// The longest `Durability::Periodic` interval accepted: a day. Longer is `InvalidArgument` (a
/// store synced less than daily is `Durability::None` in all but name, and the flusher adds the
/// interval to the monotonic clock, which an unbounded duration would overflow).
const PERIODIC_INTERVAL_MAX: Duration = Duration::from_secs(24 * 3600);

/// The highest sequence number an open may start from: half of the space above 2^63 stays
/// free for records, so `next_seq += 1` never wraps.
const SEQ_OPEN_MAX: u64 = u64::MAX - (u64::MAX >> 2);

/// Sequence numbers start above store time shifted by this many bits at every open (see
/// `open_inner`).
const SEQ_TIME_SHIFT: u32 = 20;

/// Refuses a store time past [`STORE_TIME_MS_MAX`](crate::clock::STORE_TIME_MS_MAX): sequence
/// numbers (fencing tokens) start above it shifted by `SEQ_TIME_SHIFT` bits, and must not
/// overflow.
fn check_store_time(now_ms: u64) -> Result<()> {
    if now_ms > crate::clock::STORE_TIME_MS_MAX {
        return Err(Error::ClockOutOfRange { now_ms, max_ms: crate::clock::STORE_TIME_MS_MAX });
    }
    Ok(())
}

/// A store's identity: a hash of its directory's absolute path. Tokens carry it, so a token
/// handed out by one store is refused by another (two stores opened in the same millisecond
/// hand out the same ids), while the same directory reopened in the same process (after a
/// `Poisoned` store, say) still accepts the tokens of its earlier opens.
fn store_identity(dir: &Path) -> u64 {
    // The directory itself (device and inode), however it is spelled: through a symlink, with
    // `..` or a trailing slash, or a bind mount. A directory the file system does not know (a
    // simulated disk's) falls back to its absolute path.
    if let Ok(meta) = std::fs::metadata(dir) {
        use std::os::unix::fs::MetadataExt;
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&meta.dev().to_le_bytes());
        id[8..].copy_from_slice(&meta.ino().to_le_bytes());
        return xxhash_rust::xxh3::xxh3_64(&id);
    }
    let absolute = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    xxhash_rust::xxh3::xxh3_64(absolute.as_os_str().as_encoded_bytes())
}

/// A random incarnation for this open (never 0): claims record it, and a claim of another
/// incarnation is an orphan.
fn new_incarnation(dir: &Path) -> Result<u64> {
    let random = getrandom::u64().map_err(|e| Error::io("draw the incarnation", dir, e.into()))?;
    Ok(random | 1)
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

    fn open_inner(
        dir: PathBuf,
        options: Options,
        lock: Option<Box<dyn DirLock>>,
        mode: Mode,
        incarnation: u64,
    ) -> Result<Store> {
        let started = Instant::now();
        let io = options.io.clone();
        let saved_floor_ms = crate::log::time_floor::read(io.as_ref(), &dir);
        let probe_time = StoreTime::new(options.clock.clone(), saved_floor_ms);
        // Checked before recovery, which deletes the buckets that end before this time: a clock
        // far in the future must not make the whole window expire on disk.
        check_store_time(probe_time.now_ms())?;
        let names = io.list(&dir).map_err(|e| Error::io("list store directory", &dir, e))?;
        // Read (or, for a new store, drawn and written) before any segment is created.
        let index_hash = crate::recovery::meta::load(io.as_ref(), &dir, &names, mode == Mode::Writer)?;
        let table_mark = index_hash.table_mark();
        let key_hash_fn = options.key_hash;
        let hasher = |k: &[u8]| key_hash(key_hash_fn, &index_hash, k);
        let recovered = recovery::recover(
            io.as_ref(),
            &dir,
            &names,
            options.segment_bytes_max,
            probe_time.now_ms(),
            &hasher,
            table_mark,
            mode,
        )?;
        check_store_time(recovered.latest_time_ms)?;
        let limits = LogLimits {
            bucket_width_ms: duration_to_ms(options.bucket_width),
            segment_bytes_max: options.segment_bytes_max,
            segment_bytes_initial: options
                .segment_bytes_initial
                .clamp(SEGMENT_HEADER_LEN + 1, options.segment_bytes_max),
            disk_bytes_max: options.max_disk_bytes,
            open_segments_max: options.max_open_files.max(1),
            paged_zero_fill: options.durability == Durability::Sync,
            active_bytes_max: options.active_bytes_max.max(1),
        };
        // Sequence numbers (and so fencing tokens) never repeat, even when every segment
        // expired and was deleted: they start above the wall clock shifted by 20 bits, which
        // no earlier process can have reached (it would need over a million records per ms).
        // Both times are at most `STORE_TIME_MS_MAX` (2^43), so this is at most 2^63: half the
        // sequence space is left for the records this process writes.
        let time_floor_seq = probe_time.now_ms().max(recovered.latest_time_ms) << SEQ_TIME_SHIFT;
        let next_seq = recovered.next_seq.max(time_floor_seq);
        if next_seq > SEQ_OPEN_MAX {
            // Only a damaged file that still passed its checksum can get here (times are bounded
            // above, and each open starts at most at 2^63): refuse rather than wrap the tokens.
            return Err(Error::Corrupt {
                file: dir.clone(),
                offset: 0,
                reason: "sequence numbers recorded near the end of their range",
            });
        }
        let durable_seq = next_seq - 1;
        let found_records = !recovered.segments.is_empty();
        let log = Log::new(io, dir.clone(), limits, recovered.segments, next_seq, recovered.next_segment_id);
        if mode == Mode::Writer {
            log.load_marks();
        }
        // Recovery synced what it scanned, and tables point only at synced records.
        log.time_floor().note_durable(recovered.latest_time_ms);
        if mode == Mode::Writer && options.durability != Durability::None && found_records {
            // Answers from the records found come at the store's time from the start: its floor
            // is made durable here, at open, not by the first read. (A store with no records
            // has nothing to answer from until a record is written, and that record's sync
            // carries its time.)
            log.time_floor().cover(recovered.latest_time_ms.max(probe_time.now_ms()))?;
        }
        let mut recovery = recovered.stats;
        recovery.duration_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let identity = store_identity(&dir);
        let inner = Arc::new(Inner {
            time: StoreTime::new(options.clock.clone(), recovered.latest_time_ms.max(probe_time.now_ms())),
            dir,
            log,
            index: recovered.index,
            sealed: recovered.sealed,
            commit: GroupCommit::new(durable_seq),
            counters: Counters::default(),
            incarnation,
            identity,
            index_hash,
            table_mark,
            recovery,
            read_only: mode == Mode::ReadOnly,
            housekeeper_call: Mutex::new(HousekeeperCall::default()),
            housekeeper_signal: Condvar::new(),
            maintenance: Mutex::new(()),
            restart_tables: Mutex::new(HashSet::new()),
            _lock: lock,
            options,
        });
        let mut background = Vec::new();
        if inner.options.background && mode == Mode::Writer {
            // The housekeeper renews the time floor ahead of need (see `LEAD_MS`).
            inner.log.time_floor().set_lead(crate::log::time_floor::LEAD_MS);
            let worker = inner.clone();
            background.push(
                std::thread::Builder::new()
                    .name("idemstore-housekeeper".into())
                    .spawn(move || worker.housekeep())
                    .map_err(|e| Error::io("start housekeeper thread", &inner.dir, e))?,
            );
            // Periodic syncs run on their own thread: maintenance (a large bucket dropped, a
            // segment sealed) may take far longer than the interval.
            if let Durability::Periodic(interval) = inner.options.durability {
                let worker = inner.clone();
                let flusher = std::thread::Builder::new()
                    .name("idemstore-flusher".into())
                    .spawn(move || worker.flush_periodically(interval));
                match flusher {
                    Ok(handle) => background.push(handle),
                    Err(e) => {
                        let mut store = Store { inner, background, closed: true };
                        store.stop_background();
                        return Err(Error::io("start flusher thread", &store.inner.dir, e));
                    }
                }
            }
        }
        Ok(Store { inner, background, closed: false })
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
        self.inner.claim(key.as_ref(), request.as_ref(), &options)
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
        self.inner.claim_many(items, &options)
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
        self.inner.sync_all()?;
        // A table that could not be written only means a scan at the next open: the time
        // floor and the durable marks are saved either way, then the failure reported.
        let tables = self.inner.restart_tables_at_close();
        self.inner.save_time(true)?;
        // After the final sync: every record of a closed store is protected (see `marks.rs`).
        self.inner.log.sync_marks()?;
        tables
    }

    /// Stops the background threads and waits for them to end.
    fn stop_background(&mut self) {
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

impl Inner {
    fn key_hash(&self, key: &[u8]) -> u64 {
        key_hash(self.options.key_hash, &self.index_hash, key)
    }

    fn check_key(&self, key: &[u8]) -> Result<()> {
        if key.is_empty() {
            return Err(Error::EmptyKey);
        }
        if key.len() > self.options.max_key_len {
            return Err(Error::KeyTooLong { len: key.len(), max: self.options.max_key_len });
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<()> {
        if value.len() > self.options.max_outcome_len {
            return Err(Error::OutcomeTooLong { len: value.len(), max: self.options.max_outcome_len });
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.commit.check()
    }

    /// Reads the latest record of `key` and its value into `slot`, confirmed against the
    /// stored key (and its CRC); drops index entries whose bucket is gone. `slot` is `None`
    /// afterwards when the key has no record (whatever it held before is cleared first: the
    /// search below stops at the first record it puts there).
    fn find(&self, shard: &mut Shard, hash: u64, key: &[u8], now_ms: u64, slot: &mut Option<Found>) -> Result<()> {
        *slot = None;
        // `None` when the segment is gone (its bucket was dropped, or has ended at `now_ms`);
        // `Some(Ok(true))` when the record at `loc` is the key's, now in `slot`.
        let probe = |loc: Loc, slot: &mut Option<Found>, segments: &mut SegmentCache| {
            self.log.with_segment_cached(segments, loc.segment, |s| -> Option<Result<bool>> {
                if s.header.bucket_end_ms <= now_ms {
                    // Every record in it has expired, and so has every older record of its keys
                    // (invariant 3): it answers nothing, and its bytes are not read. A writer in
                    // another process may be freeing them under a read-only view (a punched
                    // hole reads as zeros, which would fail the record's checks).
                    return None;
                }
                Some(self.read_found(s, loc, key, slot))
            })?
        };

        let mut gone: Option<Vec<Loc>> = None;
        let (candidates, local) = shard.candidates_and_local(hash);
        for loc in candidates {
            match probe(loc, slot, &mut local.segments) {
                None => gone.get_or_insert_with(Vec::new).push(loc),
                Some(Ok(true)) => break,
                Some(Ok(false)) => {}
                Some(Err(e)) => return Err(e),
            }
        }
        for loc in gone.into_iter().flatten() {
            shard.remove(hash, loc);
            shard.local.counters.keys_expired += 1;
        }
        if slot.is_some() {
            // Invariant: a key's entry in RAM is newer than any of its sealed entries.
            return Ok(());
        }
        // Not in RAM: its latest sealed record, if any (usually the filters say no). Tables
        // come newest first, so the first one holding the key holds its latest record.
        let segments = &mut shard.local.segments;
        self.sealed.visit(hash, &mut |loc| Ok(probe(loc, slot, segments).transpose()?.unwrap_or(false)))
    }

    /// Reads the record at `loc` of segment `s` into `slot` if it is `key`'s; true when it is.
    fn read_found(&self, s: &Segment, loc: Loc, key: &[u8], slot: &mut Option<Found>) -> Result<bool> {
        let Some((header, value)) = s.probe_read(u64::from(loc.offset), key)? else {
            return Ok(false);
        };
        let old = Superseded { loc, padded_len: header.padded_len(), bucket_end_ms: s.header.bucket_end_ms };
        *slot = Some(Found { old, header, value });
        Ok(true)
    }

    /// The key's state at `now_ms` (its latest record read into `slot`), the record a new
    /// write supersedes, and that record's seq.
    fn current<'a>(
        &self,
        shard: &mut Shard,
        hash: u64,
        key: &[u8],
        now_ms: u64,
        slot: &'a mut Option<Found>,
    ) -> Result<(Current<'a>, Option<Superseded>, u64)> {
        self.find(shard, hash, key, now_ms, slot)?;
        let Some(found) = slot.as_mut() else {
            return Ok((Current::Absent, None, 0));
        };
        let (old, seq) = (found.old, found.header.seq);
        debug_assert!(seq > 0);
        let state = if found.header.expires_at_ms <= now_ms || found.header.kind.is_absent() {
            Current::Absent
        } else if found.header.kind.is_in_flight() {
            Current::InFlight(found)
        } else {
            Current::Completed(found)
        };
        Ok((state, Some(old), seq))
    }

    /// Under `Sync`, waits until record `seq` (the one an answer was read from or written) is
    /// durable, leading a group-commit sync if nobody else is.
    fn settle(&self, seq: u64) -> Result<()> {
        // Seq 0 (an answer read from no record: a key never written, or whose latest record's
        // bucket has ended) still waits: the answer rests on the store's time, which must be
        // durable before it is given (invariant 7).
        if self.options.durability != Durability::Sync {
            return Ok(());
        }
        self.commit.wait_durable(seq, &LogSyncer(self))
    }

    fn sync_batch(&self) -> std::io::Result<u64> {
        let started = Instant::now();
        let batch = self.log.take_sync_batch();
        self.log.sync_batch(&batch)?;
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.counters.sync_latency_us_total.fetch_add(us, AtomicOrdering::Relaxed);
        self.counters.sync_latency_us_max.fetch_max(us, AtomicOrdering::Relaxed);
        Ok(batch.through_seq)
    }

    /// Saves the store's time as the floor for the next open. With `sync` (close, drop), the
    /// exact time, durably. Otherwise (maintenance, once a second): under `None`, written
    /// without a sync (a power cut may lose anything); under `Sync` and `Periodic`, made
    /// durable, and while the housekeeper runs kept ahead of store time (see
    /// `time_floor::LEAD_MS`) so that answers rarely wait for a sync of the floor. A failed
    /// sync poisons the store.
    fn save_time(&self, sync: bool) -> Result<()> {
        let floor = self.log.time_floor();
        let now_ms = self.time.now_ms();
        if sync {
            return floor.save_final(now_ms);
        }
        if self.options.durability == Durability::None {
            return floor.save_unsynced(now_ms);
        }
        // A poisoned store syncs nothing more (a retried fsync may "succeed" with data lost).
        self.commit.check()?;
        floor.keep_ahead(now_ms).map_err(|e| match e {
            // Nothing was synced: a clock past the last supported time is refused, not a fault.
            Error::ClockOutOfRange { .. } => e,
            e => {
                let cause = format!("time floor sync failed: {e}");
                self.commit.poison(cause.clone());
                Error::Poisoned { cause }
            }
        })
    }

    fn sync_all(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        // Seq 0 (nothing written) is durable at once: this then only reports a poisoned store.
        self.commit.wait_durable(self.log.last_seq(), &LogSyncer(self))
    }

    /// Under `Sync`, keeps one group-commit batch under `batch_bytes_max`.
    fn backpressure(&self) -> Result<()> {
        if self.options.durability == Durability::Sync && self.log.unsynced_bytes() > self.options.batch_bytes_max {
            self.sync_all()?;
        }
        Ok(())
    }

    /// Appends a record for a key whose latest record (if any) is `superseded`.
    ///
    /// Invariant: a key's latest record lies in a bucket that ends no earlier than the bucket
    /// of any older record of that key. So the latest record is never dropped while an older
    /// one survives to be resurrected (by the index falling back to a sealed table, or by a
    /// scan at recovery); reads still expire it exactly at its own `expires_at_ms`.
    fn append(
        &self,
        header: Header,
        key: &[u8],
        value: &[u8],
        superseded: Option<Superseded>,
    ) -> Result<(Header, Loc)> {
        let new_claim = header.kind == Kind::Claim;
        self.check_writable()?;
        // A clock stepped far ahead after open: a record written at that time would make the
        // next open fail (its sequence floor would overflow), so nothing is written.
        check_store_time(header.written_at_ms)?;
        let retain_floor_ms = superseded.map_or(0, |old| old.bucket_end_ms.saturating_sub(1));
        let retain_until_ms = header.expires_at_ms.max(retain_floor_ms);
        let appended = self.log.append(header, key, value, retain_until_ms, new_claim);
        if appended.is_ok()
            && let Some(old) = superseded
        {
            self.log.with_segment(old.loc.segment, |s| s.note_dead(old.padded_len));
        }
        match appended {
            Err(Error::Poisoned { cause }) => {
                self.commit.poison(cause.clone());
                Err(Error::Poisoned { cause })
            }
            other => other,
        }
    }

    /// Chores an append may leave, done once the key's shard lock is released (no claim on
    /// that shard waits for them): growing a segment close to its end, asking for a spare.
    fn after_write(&self) {
        if self.log.growth_wanted() {
            self.log.grow_ahead();
        }
        if self.options.background && self.log.take_spare_wanted() {
            self.wake_housekeeper_for_spare();
        }
        if self.options.background && self.log.take_tables_wanted() {
            self.wake_housekeeper_for_tables();
        }
    }

    fn claim(&self, key: &[u8], request: &[u8], options: &ClaimOptions) -> Result<Claim> {
        let hash = self.key_hash(key);
        // The index slot's cache miss is the largest single cost of a claim over a large
        // index: start it now, so it overlaps the checks, the request hash and the lock.
        // (A batch warms its keys' slots itself, in `warm`.)
        self.index.prefetch_slot(hash);
        let (answer, seq) = self.claim_unsettled(key, hash, request, options)?;
        self.settle(seq)?;
        Ok(answer)
    }

    /// Claims a batch (see `in_windows`); under `Sync` it waits once for the last record any
    /// answer rests on.
    fn claim_many<K: AsRef<[u8]>, R: AsRef<[u8]>>(
        &self,
        items: &[(K, R)],
        options: &ClaimOptions,
    ) -> Vec<Result<Claim>> {
        // With `wait`, a key this batch already acquired must not wait: it would wait on the
        // batch's own claim, whose token the caller does not have yet, until its lease ran out.
        let waits = options.wait.is_some();
        let no_wait = ClaimOptions { wait: None, ..options.clone() };
        let mut acquired_here: HashSet<&[u8]> = HashSet::new();
        self.in_windows(
            items,
            |(key, _)| key.as_ref(),
            |(key, request), hash| {
                let (key, request) = (key.as_ref(), request.as_ref());
                let options = if waits && !acquired_here.contains(key) { options } else { &no_wait };
                let (answer, seq) = self.claim_unsettled(key, hash, request, options)?;
                if waits && matches!(answer, Claim::Acquired(_)) {
                    acquired_here.insert(key);
                }
                Ok((answer, seq))
            },
        )
    }

    /// Completes a batch of held claims (see `in_windows`); under `Sync` it waits once.
    fn complete_many<O: AsRef<[u8]>>(&self, items: &[(&ClaimToken, O)]) -> Vec<Result<()>> {
        // A `StaleToken` is an answer that rests on a record like any other: it stays inside
        // the `Ok` until the batch settles, so a failed sync turns it into `Poisoned` too.
        self.in_windows(
            items,
            |(token, _)| token.key(),
            |(token, outcome), hash| self.finish_unsettled(token, hash, Kind::Complete, outcome.as_ref()),
        )
        .into_iter()
        .map(|answer| answer.and_then(|settled| settled))
        .collect()
    }

    /// Runs a batch a window of keys at a time: warms the window (`warm`), then calls `each`
    /// on its items in order with their key hashes; `each` answers without waiting for
    /// durability and says which seq its answer rests on. The batch then settles once
    /// (`settle_batch`).
    fn in_windows<'a, T, A>(
        &self,
        items: &'a [T],
        key_of: impl Fn(&T) -> &[u8],
        mut each: impl FnMut(&'a T, u64) -> Result<(A, u64)>,
    ) -> Vec<Result<A>> {
        let mut answers = Vec::with_capacity(items.len());
        let mut hashes = [0u64; BATCH_WINDOW];
        for window in items.chunks(BATCH_WINDOW) {
            for (hash, item) in hashes.iter_mut().zip(window) {
                *hash = self.key_hash(key_of(item));
            }
            self.warm(&hashes[..window.len()]);
            for (&hash, item) in hashes.iter().zip(window) {
                answers.push(each(item, hash));
            }
        }
        self.settle_batch(answers)
    }

    /// Starts loading a window of keys' index slots, then (one shard lock each) the records
    /// they point at, so the misses of the whole window overlap.
    fn warm(&self, hashes: &[u64]) {
        for &hash in hashes {
            self.index.prefetch_slot(hash);
        }
        for &hash in hashes {
            let primary = self.index.shard(hash).shard.lock().primary(hash);
            if let Some(loc) = primary {
                self.log.with_segment(loc.segment, |s| s.prefetch(u64::from(loc.offset)));
            }
        }
    }

    /// Under `Sync`, waits once for everything a batch wrote or read (each answer with the
    /// seq it rests on). If that fails, every answer resting on a record that is not durable
    /// becomes the error: its record may be lost at a power cut. Answers read from records
    /// that were already durable stand.
    fn settle_batch<T>(&self, answers: Vec<Result<(T, u64)>>) -> Vec<Result<T>> {
        if answers.is_empty() {
            // Nothing was answered, so nothing rests on a record or on the store's time.
            return Vec::new();
        }
        let through = answers.iter().filter_map(|a| a.as_ref().ok().map(|(_, seq)| *seq)).max().unwrap_or(0);
        let failed = self.settle(through).err();
        let durable_seq = self.commit.durable_seq();
        // Every answer also rests on the store's time (a key read as expired): when the time
        // it was given at is not durable either, no answer stands.
        let time_durable = self.log.time_floor().durable_ms() >= self.time.latest_ms();
        let error = failed.map(|failed| self.commit.check().err().unwrap_or(failed));
        answers
            .into_iter()
            .map(|answer| match (answer, &error) {
                (Ok((_, seq)), Some(error)) if seq > durable_seq || !time_durable => Err(error.clone()),
                (answer, _) => answer.map(|(answer, _)| answer),
            })
            .collect()
    }

    /// A claim up to its answer, with the seq of the record that answer rests on (which
    /// `settle` must see durable before the answer is given out under `Sync`).
    fn claim_unsettled(&self, key: &[u8], hash: u64, request: &[u8], options: &ClaimOptions) -> Result<(Claim, u64)> {
        self.check_key(key)?;
        let ttl = options.ttl.unwrap_or(self.options.default_ttl);
        let ttl_ms = duration_to_ms(ttl);
        let lease_ms = duration_to_ms(options.lease.unwrap_or(self.options.default_lease));
        if ttl_ms == 0 || lease_ms == 0 {
            return Err(Error::InvalidArgument("ttl and lease must be at least 1 ms"));
        }
        if ttl > crate::options::TTL_MAX {
            return Err(Error::InvalidArgument("ttl must be at most TTL_MAX (10 years)"));
        }
        let lease_ms = u32::try_from(lease_ms).map_err(|_| Error::InvalidArgument("lease must be under 49 days"))?;
        self.backpressure()?;
        let request_hash = crate::transfer::request_hash(request);
        // `None`: no waiting. `Some(None)`: a wait with no deadline (longer than the monotonic
        // clock can add), which ends only when the holder does, or its lease or the window.
        let deadline: Option<Option<Instant>> = options.wait.map(|w| Instant::now().checked_add(w));
        let locked = self.index.shard(hash);
        let mut shard = locked.shard.lock();
        let mut waited = false;
        let (answer, seq) = loop {
            let now_ms = self.time.now_ms();
            let mut slot = None;
            let (state, old, seen_seq) = self.current(&mut shard, hash, key, now_ms, &mut slot)?;
            match state {
                Current::Absent => {
                    let header = self.claim_record(key, now_ms, ttl_ms, lease_ms, request_hash);
                    let (written, loc) = self.append(header, key, &[], old)?;
                    shard.set(hash, old.map(|o| o.loc), loc);
                    shard.local.counters.claims_acquired += 1;
                    break (Claim::Acquired(token_for(self.identity, key, &written, false, Vec::new())), written.seq);
                }
                Current::Completed(found) => {
                    if found.header.request_hash != request_hash {
                        shard.local.counters.mismatches += 1;
                        break (Claim::Mismatch, seen_seq);
                    }
                    if waited {
                        shard.local.counters.claims_waited += 1;
                    } else {
                        shard.local.counters.claims_replayed += 1;
                    }
                    let outcome = std::mem::take(&mut found.value);
                    break (Claim::Completed(completed_from(&found.header, outcome)), seen_seq);
                }
                Current::InFlight(found) => {
                    let header = found.header;
                    if header.request_hash != request_hash {
                        shard.local.counters.mismatches += 1;
                        break (Claim::Mismatch, seen_seq);
                    }
                    let orphaned = header.incarnation != self.incarnation;
                    let orphan_takeover = orphaned && self.options.orphans == OrphanPolicy::TakeOver;
                    let lease_over = now_ms >= header.lease_until_ms;
                    if orphan_takeover || lease_over {
                        let checkpoint = std::mem::take(&mut found.value);
                        let takeover = Header {
                            value_len: checkpoint.len() as u32,
                            // A takeover never shortens the window: it shadows the old claim.
                            expires_at_ms: now_ms.saturating_add(ttl_ms).max(header.expires_at_ms),
                            ..self.claim_record(key, now_ms, ttl_ms, lease_ms, request_hash)
                        };
                        let (written, new_loc) = self.append(takeover, key, &checkpoint, old)?;
                        debug_assert!(written.token > header.token, "fencing tokens only grow");
                        shard.set(hash, old.map(|o| o.loc), new_loc);
                        shard.local.counters.claims_acquired += 1;
                        if orphan_takeover && !lease_over {
                            shard.local.counters.orphan_takeovers += 1;
                        } else {
                            shard.local.counters.lease_takeovers += 1;
                        }
                        break (
                            Claim::Acquired(token_for(self.identity, key, &written, true, checkpoint)),
                            written.seq,
                        );
                    }
                    let remaining = match deadline {
                        None => None,
                        Some(None) => Some(Duration::MAX),
                        Some(Some(at)) => at.checked_duration_since(Instant::now()),
                    };
                    match remaining {
                        Some(left) if !left.is_zero() => {
                            // Woken by the holder's complete or release; otherwise the key changes
                            // at its lease end (a takeover) or at its window's end (absent), with
                            // no write to wake anyone: sleep no longer than the first of them.
                            let change_at_ms = header.lease_until_ms.min(header.expires_at_ms);
                            let until_change = Duration::from_millis(change_at_ms.saturating_sub(now_ms).max(1));
                            crate::sync::wait_for(&locked.changed, &mut shard, left.min(until_change));
                            waited = true;
                        }
                        _ => {
                            shard.local.counters.claims_in_progress += 1;
                            let lease_expires_at = ms_to_system_time(header.lease_until_ms);
                            break (Claim::InProgress { lease_expires_at }, seen_seq);
                        }
                    }
                }
            }
        };
        drop(shard);
        // Only an acquisition appended a record; replays and answers of keys in flight leave
        // nothing to grow or replace.
        if matches!(answer, Claim::Acquired(_)) {
            self.after_write();
        }
        Ok((answer, seq))
    }

    /// The record of a new holding of `key` claimed at `now_ms` (a fresh claim, or the base of
    /// a takeover); its token is its own seq, assigned at append.
    fn claim_record(&self, key: &[u8], now_ms: u64, ttl_ms: u64, lease_ms: u32, request_hash: u128) -> Header {
        Header {
            kind: Kind::Claim,
            key_len: key.len() as u16,
            value_len: 0,
            seq: 0,
            expires_at_ms: now_ms.saturating_add(ttl_ms),
            claimed_at_ms: now_ms,
            lease_until_ms: now_ms.saturating_add(u64::from(lease_ms)),
            token: 0,
            incarnation: self.incarnation,
            request_hash,
            written_at_ms: now_ms,
            lease_ms,
        }
    }

    /// complete / checkpoint / release: a write by the holder of `token`.
    fn finish(&self, token: &ClaimToken, kind: Kind, value: &[u8]) -> Result<()> {
        let hash = self.key_hash(token.key());
        self.index.prefetch_slot(hash);
        let (answer, seq) = self.finish_unsettled(token, hash, kind, value)?;
        self.settle(seq)?;
        answer
    }

    /// A complete, checkpoint or release up to its record: its answer (`Ok`, or `StaleToken`
    /// read from the key's latest record) and the seq of the record that answer rests on,
    /// which `settle` must see durable before the answer is given out. A `StaleToken` rests
    /// on the record that superseded the token: told before that record is durable, a holder
    /// could give up a key that a power cut then gives back to it.
    fn finish_unsettled(&self, token: &ClaimToken, hash: u64, kind: Kind, value: &[u8]) -> Result<(Result<()>, u64)> {
        if token.store != self.identity {
            return Err(Error::ForeignToken);
        }
        if kind == Kind::Checkpoint && value.is_empty() {
            // An empty record value reads as "no checkpoint": it would erase the last one.
            return Err(Error::InvalidArgument("a checkpoint phase must not be empty"));
        }
        self.check_value(value)?;
        self.check_writable()?;
        self.backpressure()?;
        let key = token.key();
        let locked = self.index.shard(hash);
        let mut shard = locked.shard.lock();
        let now_ms = self.time.now_ms();
        let mut slot = None;
        let (state, old, seen_seq) = self.current(&mut shard, hash, key, now_ms, &mut slot)?;
        let held = match state {
            Current::InFlight(found) if found.header.token == token.id => found.header,
            _ => {
                shard.local.counters.stale_tokens += 1;
                return Ok((Err(Error::StaleToken), seen_seq));
            }
        };
        // A checkpoint renews the lease (a release comes with no value).
        debug_assert!(kind != Kind::Release || value.is_empty());
        let mut header = Header { kind, value_len: value.len() as u32, seq: 0, written_at_ms: now_ms, ..held };
        if kind == Kind::Checkpoint {
            header.lease_until_ms = now_ms.saturating_add(u64::from(held.lease_ms));
        }
        let (written, new_loc) = self.append(header, key, value, old)?;
        shard.set(hash, old.map(|o| o.loc), new_loc);
        match kind {
            Kind::Complete => shard.local.counters.completes += 1,
            Kind::Checkpoint => {
                shard.local.counters.checkpoints += 1;
                token.lease_until_ms.store(written.lease_until_ms, AtomicOrdering::Relaxed);
            }
            _ => shard.local.counters.releases += 1,
        }
        drop(shard);
        self.after_write();
        if kind != Kind::Checkpoint {
            locked.changed.notify_all();
        }
        Ok((Ok(()), written.seq))
    }

    fn get(&self, key: &[u8]) -> Result<Option<Entry>> {
        self.check_key(key)?;
        self.entry(key)
    }

    /// The state of a key that is known not to be empty. Not held to `max_key_len`: that limit
    /// is for keys given as input, and a key read back from the store may have been written
    /// under a larger one (tools open stores with the default limit).
    fn entry(&self, key: &[u8]) -> Result<Option<Entry>> {
        let hash = self.key_hash(key);
        self.index.prefetch_slot(hash);
        let mut shard = self.index.shard(hash).shard.lock();
        let now_ms = self.time.now_ms();
        let mut slot = None;
        let (state, _, seq) = self.current(&mut shard, hash, key, now_ms, &mut slot)?;
        let entry = match state {
            Current::Absent => None,
            Current::Completed(found) => {
                let outcome = std::mem::take(&mut found.value);
                Some(Entry::Completed(completed_from(&found.header, outcome)))
            }
            Current::InFlight(found) => {
                let (header, checkpoint) = (found.header, std::mem::take(&mut found.value));
                Some(Entry::InFlight {
                    claimed_at: ms_to_system_time(header.claimed_at_ms),
                    lease_expires_at: ms_to_system_time(header.lease_until_ms),
                    expires_at: ms_to_system_time(header.expires_at_ms),
                    checkpoint: (!checkpoint.is_empty()).then_some(checkpoint),
                    orphaned: header.incarnation != self.incarnation,
                })
            }
        };
        drop(shard);
        self.settle(seq)?;
        Ok(entry)
    }

    fn remove(&self, key: &[u8]) -> Result<()> {
        self.check_key(key)?;
        self.check_writable()?;
        let hash = self.key_hash(key);
        let locked = self.index.shard(hash);
        let mut shard = locked.shard.lock();
        let now_ms = self.time.now_ms();
        let mut slot = None;
        let (state, old, seen_seq) = self.current(&mut shard, hash, key, now_ms, &mut slot)?;
        let header = match state {
            Current::Absent => {
                drop(shard);
                return self.settle(seen_seq);
            }
            Current::InFlight(found) | Current::Completed(found) => found.header,
        };
        let tombstone = Header { kind: Kind::Remove, value_len: 0, seq: 0, written_at_ms: now_ms, ..header };
        let (written, new_loc) = self.append(tombstone, key, &[], old)?;
        shard.set(hash, old.map(|o| o.loc), new_loc);
        shard.local.counters.removes += 1;
        drop(shard);
        self.after_write();
        locked.changed.notify_all();
        self.settle(written.seq)
    }

    /// Every distinct key with an index entry, in RAM or sealed (unsorted, deduplicated).
    fn all_keys(&self) -> Result<Vec<Vec<u8>>> {
        let mut locs: Vec<Loc> = Vec::new();
        for locked in self.index.shards() {
            locs.extend(locked.shard.lock().entries().into_iter().map(|(_, loc)| loc));
        }
        for table in self.sealed.all() {
            locs.extend(table.entries()?.into_iter().map(|(_, loc)| loc));
        }
        let mut keys = std::collections::HashSet::new();
        let now_ms = self.time.now_ms();
        for loc in locs {
            // A segment whose bucket has ended holds no live key (and a writer in another
            // process may be freeing its bytes under a read-only view): not read.
            let key = self.log.with_segment(loc.segment, |s| {
                (s.header.bucket_end_ms > now_ms).then(|| s.key_at(u64::from(loc.offset))).transpose()
            });
            if let Some(key) = key.transpose()?.flatten() {
                keys.insert(key);
            }
        }
        Ok(keys.into_iter().collect())
    }

    fn keys(&self) -> Result<Vec<(Vec<u8>, Entry)>> {
        let mut keys = Vec::new();
        for key in self.all_keys()? {
            if let Some(entry) = self.entry(&key)? {
                keys.push((key, entry));
            }
        }
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(keys)
    }

    fn orphans(&self) -> Result<Vec<Orphan>> {
        let mut found = Vec::new();
        for key in self.all_keys()? {
            let hash = self.key_hash(&key);
            let mut shard = self.index.shard(hash).shard.lock();
            let now_ms = self.time.now_ms();
            let mut slot = None;
            let (state, _, seq) = self.current(&mut shard, hash, &key, now_ms, &mut slot)?;
            let Current::InFlight(record) = state else { continue };
            let (header, checkpoint) = (record.header, std::mem::take(&mut record.value));
            if header.incarnation == self.incarnation {
                continue;
            }
            drop(shard);
            self.settle(seq)?;
            found.push(Orphan {
                key,
                claimed_at: ms_to_system_time(header.claimed_at_ms),
                lease_expires_at: ms_to_system_time(header.lease_until_ms),
                checkpoint: (!checkpoint.is_empty()).then_some(checkpoint),
            });
        }
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    fn maintain(&self) -> Result<usize> {
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
            self.counters.keys_expired.fetch_add(swept, AtomicOrdering::Relaxed);
            self.counters.buckets_expired.fetch_add(buckets as u64, AtomicOrdering::Relaxed);
            let deleted = self.log.delete_segments(&dropped);
            for segment in &dropped {
                segment.release_pages();
            }
            drop(dropped);
            let forgotten = self.forget_tables(&dead).and(self.forget_restart_tables(&dead));
            deleted.and(forgotten)?;
        }
        let sealed = self.seal_idle(now_ms)?;
        self.write_restart_tables(1)?;
        self.sealed.refresh_union()?;
        if sealed > 0 {
            give_memory_back();
        }
        Ok(buckets)
    }

    /// Drops the sealed tables of dead (expired) segments and deletes their files.
    fn forget_tables(&self, dead: &std::collections::HashSet<u32>) -> Result<()> {
        let tables = self.sealed.remove_segments(&|id| dead.contains(&id));
        let sealed_keys: u64 = tables.iter().map(|t| t.len()).sum();
        self.counters.keys_expired.fetch_add(sealed_keys, AtomicOrdering::Relaxed);
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
    /// appender lock, so every record they will ever hold is written by then; a writer still
    /// between its append and its index update holds its shard's lock, which the collection
    /// waits for. So the table holds every entry, and none is dropped unsealed.
    fn seal_idle(&self, now_ms: u64) -> Result<usize> {
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

    /// Deletes the restart tables of dead (expired) segments (see `write_restart_tables`).
    fn forget_restart_tables(&self, dead: &std::collections::HashSet<u32>) -> Result<()> {
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
    fn restart_tables_at_close(&self) -> Result<()> {
        if self.read_only || self.commit.poisoned().is_some() {
            return Ok(());
        }
        let _serial = self.maintenance.lock();
        self.log.retire_all();
        self.write_restart_tables(2).map(|_| ())
    }

    /// Syncs `segment`, then writes its table of `entries` (the caller syncs the directory).
    /// The table points at the segment's records: they must be durable before it is; a failed
    /// sync poisons the store.
    fn write_table_of(&self, segment: &Segment, bounds: TableBounds, entries: Vec<(u64, u32)>) -> Result<Table> {
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
    fn write_restart_tables(&self, threads: usize) -> Result<usize> {
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
                crate::pace::breathe();
            }
        };
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

    /// Drops the RAM index entries of the segments `gone` picks and gives the memory back;
    /// returns how many went. One shard at a time, with rests between (see `pace`), so no
    /// claim waits for more than one shard's sweep.
    fn drop_index_entries(&self, gone: impl Fn(u32) -> bool) -> u64 {
        let mut dropped = 0u64;
        for locked in self.index.shards() {
            dropped += sweep_shard(&mut locked.shard.lock(), |segment| !gone(segment)) as u64;
            crate::pace::breathe();
            locked.shard.lock().shrink();
            crate::pace::breathe();
        }
        dropped
    }

    /// The housekeeper: expiry, sealing and the time floor about once a second, spare segments
    /// as soon as an append asks for one. Periodic syncs are not here (see
    /// `flush_periodically`): one maintenance pass may take longer than their interval. No
    /// failure is lost: each pass runs under `housekeeping_pass`, which reports its errors and
    /// panics, and the thread goes on to the next tick.
    fn housekeep(&self) {
        let tick = Duration::from_secs(1);
        // A first pass at once: after an open it builds the sealed tables' union filter.
        self.housekeeping_pass(true);
        let mut next_tick = Instant::now() + tick;
        loop {
            let (spare_wanted, tables_wanted, serving) = {
                let mut call = self.housekeeper_call.lock();
                while !call.stop && !call.spare && !call.tables && !call.passes.pending() && Instant::now() < next_tick
                {
                    let left = next_tick.saturating_duration_since(Instant::now());
                    crate::sync::wait_for(&self.housekeeper_signal, &mut call, left);
                }
                if call.stop {
                    return;
                }
                // A pass asked for is served by a pass that begins now, after the ask.
                let serving = (call.passes.pending() || Instant::now() >= next_tick).then_some(call.passes.asked);
                (std::mem::take(&mut call.spare), std::mem::take(&mut call.tables), serving)
            };
            if tables_wanted {
                self.restart_tables_pass();
            }
            match serving {
                Some(asked) => {
                    next_tick = Instant::now() + tick;
                    self.housekeeping_pass(true);
                    self.background_pass_done(asked, |call| &mut call.passes);
                }
                None if spare_wanted => self.housekeeping_pass(false),
                None => {}
            }
        }
    }

    /// Writes the restart tables of segments that stopped taking appends, at once rather than
    /// at the next tick (see `write_restart_tables`). Reported as a maintenance pass is: a
    /// failure is counted and kept (a failed sync has poisoned the store inside), a panic is
    /// caught, and what is left is written by the next pass.
    fn restart_tables_pass(&self) {
        let was_poisoned = self.commit.poisoned().is_some();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _serial = self.maintenance.lock();
            self.write_restart_tables(1).map(drop)
        }));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.note_maintenance_error(&e, was_poisoned),
            Err(payload) => self.note_background_panic(format!(
                "housekeeping thread panicked writing restart tables: {}",
                crate::commit::panic_message(&*payload)
            )),
        }
    }

    /// One pass of the housekeeper: with `maintenance`, expiry, sealing and the time floor
    /// (`maintain`); then the spare segment. Its outcome is reported (`note_background`); a
    /// panic is caught here, so the thread lives on to the next tick: the state a panic leaves
    /// is one maintenance already recovers from (segments taken out of the log but not yet
    /// deleted are deleted at the next open; retired segments not yet sealed are sealed by the
    /// next pass), and a sync that panicked has poisoned the store in group commit.
    fn housekeeping_pass(&self, maintenance: bool) {
        let was_poisoned = self.commit.poisoned().is_some();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let maintained = if maintenance { self.maintain().map(drop) } else { Ok(()) };
            let spare = self.prepare_spare();
            maintained.and(spare)
        }));
        match outcome {
            Ok(Ok(())) if maintenance => self.counters.maintenance_failures_in_a_row.store(0, AtomicOrdering::Relaxed),
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.note_maintenance_error(&e, was_poisoned),
            Err(payload) => self.note_background_panic(format!(
                "housekeeping thread panicked: {}",
                crate::commit::panic_message(&*payload)
            )),
        }
    }

    /// `Store::maintain`: a maintenance pass on the caller's thread, whose failure is reported
    /// as the housekeeper's are (a panic goes on to the caller, who sees it).
    fn maintain_noted(&self) -> Result<usize> {
        let was_poisoned = self.commit.poisoned().is_some();
        let outcome = self.maintain();
        match &outcome {
            Ok(_) => self.counters.maintenance_failures_in_a_row.store(0, AtomicOrdering::Relaxed),
            Err(e) => self.note_maintenance_error(e, was_poisoned),
        }
        outcome
    }

    /// Reports a failed maintenance pass in `Stats`: counted, kept as the last error, and once
    /// `MAINTENANCE_FAILURES_WARNED` passes in a row have failed, a warning. A pass on a store
    /// that was already poisoned before it began is not counted: it fails at its first sync
    /// with the poison's cause, which `Stats::poisoned` already shows, and would otherwise be
    /// counted once a second for as long as the store stays open. Failures that put durability
    /// at stake (a failed sync of records, of the time floor or of the directory) have
    /// poisoned the store where they happened; the rest (an unlink, a table write) leave
    /// every acknowledged record as durable as it was, so they do not stop writes.
    fn note_maintenance_error(&self, e: &Error, was_poisoned: bool) {
        if was_poisoned {
            return;
        }
        self.counters.maintenance_failures_in_a_row.fetch_add(1, AtomicOrdering::Relaxed);
        self.note_background_error(format!("maintenance failed: {e}"));
    }

    /// Reports a panic of a background thread: counted, kept as the last error, and warned of
    /// at once (a panic is a fault of the code, not a passing one of the disk).
    fn note_background_panic(&self, cause: String) {
        self.counters.maintenance_failures_in_a_row.fetch_max(MAINTENANCE_FAILURES_WARNED, AtomicOrdering::Relaxed);
        self.note_background_error(cause);
    }

    fn note_background_error(&self, cause: String) {
        self.counters.maintenance_errors.fetch_add(1, AtomicOrdering::Relaxed);
        *self.counters.last_maintenance_error.lock() = Some(cause);
    }

    /// The warning `Stats::warnings` carries while maintenance keeps failing.
    fn maintenance_warning(&self) -> Option<String> {
        let in_a_row = self.counters.maintenance_failures_in_a_row.load(AtomicOrdering::Relaxed);
        if in_a_row < MAINTENANCE_FAILURES_WARNED {
            return None;
        }
        let last = self.counters.last_maintenance_error.lock().clone().unwrap_or_default();
        Some(format!(
            "background maintenance has failed {in_a_row} times in a row, so expired buckets may not be \
             dropped nor idle segments sealed; last error: {last}"
        ))
    }

    /// Poisons the store with `cause` and returns the error writers now get. Background work
    /// poisons through here; the flag itself is set in one place, `GroupCommit::poison`.
    fn poison(&self, cause: String) -> Error {
        self.commit.poison(cause.clone());
        Error::Poisoned { cause }
    }

    /// Marks the passes asked for up to `asked` as served and wakes whoever waits for them.
    fn background_pass_done(&self, asked: u64, which: impl Fn(&mut HousekeeperCall) -> &mut PassAsks) {
        let mut call = self.housekeeper_call.lock();
        let asks = which(&mut call);
        asks.done = asks.done.max(asked);
        drop(call);
        self.housekeeper_signal.notify_all();
    }

    /// The flusher of a `Periodic(interval)` store: a sync (records, and the time floor with
    /// them) at least every `interval`, on a thread of its own so that no maintenance pass
    /// delays it. Each sync is due `interval` after the previous one started; one that took
    /// longer is followed by the next at once.
    fn flush_periodically(&self, interval: Duration) {
        let interval = crate::commit::flush_interval(interval);
        // Bounded at open (`PERIODIC_INTERVAL_MAX`): adding it to an instant cannot overflow.
        let mut next_flush = Instant::now() + interval;
        loop {
            let asked = {
                let mut call = self.housekeeper_call.lock();
                while !call.stop && !call.periodic_syncs.pending() && Instant::now() < next_flush {
                    let left = next_flush.saturating_duration_since(Instant::now());
                    crate::sync::wait_for(&self.housekeeper_signal, &mut call, left);
                }
                if call.stop {
                    return;
                }
                call.periodic_syncs.asked
            };
            next_flush = Instant::now() + interval;
            self.periodic_sync_pass();
            self.background_pass_done(asked, |call| &mut call.periodic_syncs);
        }
    }

    /// One sync of the flusher. A failed sync poisons the store inside group commit (writers
    /// see it on their next call). A panic is caught and poisons it too: this store promised
    /// a sync every interval and can no longer keep that promise, so writes must stop rather
    /// than go on being acknowledged with nothing syncing them.
    fn periodic_sync_pass(&self) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            #[cfg(feature = "sim")]
            {
                let fault = self.housekeeper_call.lock().periodic_sync_fault.take();
                if let Some(fault) = fault {
                    fault();
                }
            }
            self.sync_all()
        }));
        if let Err(payload) = outcome {
            let cause = format!("periodic sync thread panicked: {}", crate::commit::panic_message(&*payload));
            self.note_background_panic(cause.clone());
            self.poison(cause);
        }
    }

    /// Makes sure a spare segment file is ready. A failed directory sync poisons the store;
    /// any other failure (no space for the file, say) is returned for the housekeeper to
    /// report, and the spare is tried again at the next pass.
    fn prepare_spare(&self) -> Result<()> {
        if self.read_only || self.commit.poisoned().is_some() {
            return Ok(());
        }
        match self.log.prepare_spare() {
            Err(Error::Poisoned { cause }) => Err(self.poison(cause)),
            other => other,
        }
    }

    /// Asks the housekeeper to write restart tables now (a segment just stopped taking appends).
    fn wake_housekeeper_for_tables(&self) {
        let mut call = self.housekeeper_call.lock();
        if !call.tables {
            call.tables = true;
            drop(call);
            self.housekeeper_signal.notify_all();
        }
    }

    /// Asks the housekeeper to prepare the next spare segment now (an append just used one).
    fn wake_housekeeper_for_spare(&self) {
        let mut call = self.housekeeper_call.lock();
        if !call.spare {
            call.spare = true;
            drop(call);
            self.housekeeper_signal.notify_all();
        }
    }

    /// Bytes of the segment files in the directory whose header was never written: the spare
    /// a writer prepares ahead of need, which a view does not open. Read at each call; a file
    /// that cannot be read counts nothing (a snapshot of figures must not fail).
    fn spare_bytes_on_disk(&self) -> u64 {
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

    fn stats(&self) -> Stats {
        let c = &self.counters;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(AtomicOrdering::Relaxed);
        let mut s = ShardCounters::default();
        let mut index_entries = 0u64;
        for locked in self.index.shards() {
            let shard = locked.shard.lock();
            s.add(&shard.local.counters);
            index_entries += shard.len() as u64;
        }
        let (syncs, synced_records) = self.commit.counters();
        let (sealed_tables, sealed_entries, sealed_filter_bytes) = self.sealed.totals();
        let (live_bytes, dead_bytes) = self.log.live_and_dead_bytes();
        Stats {
            claims_acquired_total: s.claims_acquired,
            duplicates_in_progress_total: s.claims_in_progress,
            duplicates_replayed_total: s.claims_replayed,
            duplicates_waited_total: s.claims_waited,
            mismatches_total: s.mismatches,
            lease_takeovers_total: s.lease_takeovers,
            orphan_takeovers_total: s.orphan_takeovers,
            stale_tokens_total: s.stale_tokens,
            completes_total: s.completes,
            checkpoints_total: s.checkpoints,
            releases_total: s.releases,
            removes_total: s.removes,
            keys_expired_total: load(&c.keys_expired) + s.keys_expired,
            buckets_expired_total: load(&c.buckets_expired),
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
            sync_latency_us_total: load(&c.sync_latency_us_total),
            sync_latency_us_max: load(&c.sync_latency_us_max),
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
            maintenance_errors_total: load(&c.maintenance_errors),
            last_maintenance_error: c.last_maintenance_error.lock().clone(),
            read_only: self.read_only,
        }
    }
}

/// Work handed to the housekeeper thread (and the flusher) between their ticks.
#[derive(Default)]
struct HousekeeperCall {
    /// The store is closing: stop.
    stop: bool,
    /// An append used up the spare segment: prepare the next one now.
    spare: bool,
    /// A segment stopped taking appends: write its restart table now.
    tables: bool,
    /// Housekeeping passes asked for now (a test seam, `Store::run_housekeeping_pass`).
    passes: PassAsks,
    /// Periodic syncs asked for now (a test seam, `Store::run_periodic_sync`).
    periodic_syncs: PassAsks,
    /// Runs at the start of every maintenance pass (`Store::set_maintenance_fault`).
    #[cfg(feature = "sim")]
    maintenance_fault: Option<std::sync::Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>>,
    /// Runs in the flusher's next sync (`Store::on_next_periodic_sync`).
    #[cfg(feature = "sim")]
    periodic_sync_fault: Option<Box<dyn FnOnce() + Send>>,
}

/// Passes of a background thread asked for, and how far they are served: `done` is the
/// highest `asked` that a pass which began after it has ended.
#[derive(Default)]
struct PassAsks {
    asked: u64,
    done: u64,
}

impl PassAsks {
    /// True while some ask is unserved: no pass that began after it has ended yet.
    fn pending(&self) -> bool {
        self.asked > self.done
    }
}

/// Maintenance passes failed in a row before `Stats::warnings` says maintenance is failing.
/// One failure is often passing (an unlink that met a busy file, a table write that met a
/// full disk that expiry is about to relieve) and is retried at the next tick a second later;
/// three in a row, about three seconds, is a fault that stays, yet is reported long before
/// the disk fills for want of expiry or RAM for want of sealing.
const MAINTENANCE_FAILURES_WARNED: u64 = 3;

/// Keys a batch (`claim_many`, `complete_many`) warms together: enough memory misses in flight
/// to cover their latency, few enough that the first key's lines are still cached at its turn.
const BATCH_WINDOW: usize = 16;

/// Group commit's view of the store: sync the log, and see how far it has been written.
struct LogSyncer<'a>(&'a Inner);

impl crate::commit::Syncer for LogSyncer<'_> {
    fn sync_all(&self) -> std::io::Result<u64> {
        self.0.sync_batch()
    }

    fn written_seq(&self) -> Option<u64> {
        Some(self.0.log.last_seq())
    }

    fn cover_time(&self) -> Result<()> {
        if self.0.read_only {
            return Ok(());
        }
        self.0.log.time_floor().cover(self.0.time.latest_ms())
    }
}

/// The token of the claim record `written` (its checkpoint carried over on a takeover).
fn token_for(store: u64, key: &[u8], written: &Header, recovered: bool, checkpoint: Vec<u8>) -> ClaimToken {
    ClaimToken {
        key: key.into(),
        id: written.token,
        store,
        recovered,
        checkpoint: (!checkpoint.is_empty()).then_some(checkpoint),
        lease_until_ms: std::sync::atomic::AtomicU64::new(written.lease_until_ms),
    }
}

fn completed_from(header: &Header, outcome: Vec<u8>) -> Completed {
    Completed {
        outcome,
        completed_at: ms_to_system_time(header.written_at_ms),
        claimed_at: ms_to_system_time(header.claimed_at_ms),
        expires_at: ms_to_system_time(header.expires_at_ms),
    }
}

/// Returns memory freed by sealing (index shards shrink) to the operating system: glibc keeps
/// freed heap otherwise, and RAM per key would not fall.
fn give_memory_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
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
