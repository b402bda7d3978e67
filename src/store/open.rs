//! Opening a store: checking the options, taking the lock, recovering the directory, starting the
//! background threads.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::clock::{StoreTime, duration_to_ms};
use crate::commit::GroupCommit;
use crate::error::{Error, Result};
use crate::hash::key_hash;
use crate::io::DirLock;
use crate::log::record::{HEADER_LEN, VALUE_LEN_FORMAT_MAX, align_up};
use crate::log::segment::SEGMENT_HEADER_LEN;
use crate::log::{Log, LogLimits};
use crate::options::{Durability, Options};
use crate::recovery::{self, Mode};
use crate::stats::Counters;
use crate::sync::{Arc, Condvar, Mutex};

use super::housekeeper::HousekeeperCall;
use super::{Inner, Store, check_store_time};

impl Store {
    pub(super) fn open_inner(
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
            lanes: match (options.log_lanes, options.durability) {
                (0, Durability::Sync) => 1,
                (0, _) => std::thread::available_parallelism().map_or(1, |n| n.get()).min(16),
                (lanes, _) => lanes,
            },
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
            async_waits: Default::default(),
            namespaces: Mutex::default(),
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
        crate::observe::opened(&inner.dir, &inner.recovery, inner.read_only);
        Ok(Store { inner, background, closed: false })
    }
}

pub(super) fn validate_options(options: &Options) -> Result<()> {
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
pub(super) const PERIODIC_INTERVAL_MAX: Duration = Duration::from_secs(24 * 3600);

/// The highest sequence number an open may start from: half of the space above 2^63 stays
/// free for records, so `next_seq += 1` never wraps.
pub(super) const SEQ_OPEN_MAX: u64 = u64::MAX - (u64::MAX >> 2);

/// Sequence numbers start above store time shifted by this many bits at every open (see
/// `open_inner`).
pub(super) const SEQ_TIME_SHIFT: u32 = 20;

/// A store's identity: a hash of its directory's absolute path. Tokens carry it, so a token
/// handed out by one store is refused by another (two stores opened in the same millisecond
/// hand out the same ids), while the same directory reopened in the same process (after a
/// `Poisoned` store, say) still accepts the tokens of its earlier opens.
pub(super) fn store_identity(dir: &Path) -> u64 {
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
pub(super) fn new_incarnation(dir: &Path) -> Result<u64> {
    let random = getrandom::u64().map_err(|e| Error::io("draw the incarnation", dir, e.into()))?;
    Ok(random | 1)
}
