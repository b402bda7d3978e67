//! The log: appends records into the segment of their expiry bucket, assigns the global
//! sequence numbers, remembers which segments are dirty for the next sync, and drops whole
//! buckets when their window has passed.
//!
//! Its parts: records (`record`) in segment files (`segment`), the live segments by id
//! (`striped_map`) and a shard's own handles to them (`segment_cache`), how far each segment
//! is known durable (`marks`), the floor of the store's time (`time_floor`), and what group
//! commit syncs (`syncer`). The log knows nothing of the index, sealed tables or the store.
//!
//! Writes go through lanes (see `Lane`): independent appenders, each with its own lock and
//! its own segment taking appends per bucket, one per writing thread, so writers do not queue
//! on one lock. A sync batch, an expiry or a retire decision takes every lane's lock, in order.
//!
//! Lock order: index shard -> lane appenders (in lane order) -> `Shared` -> spare -> segments.
//! The segments locks (one per stripe of `StripedMap`, a change takes them all in order) are
//! leaves: nothing else is taken while one is held.

pub mod marks;
pub mod record;
pub mod segment;
pub mod segment_cache;
pub mod striped_map;
pub mod syncer;
pub mod time_floor;

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::sync::{AtomicU64 as LaneAtomicU64, Mutex as LaneMutex, MutexGuard as LaneGuard};

use crate::error::{Error, Result};
use crate::hash::IdMap;
pub use crate::hash::Loc;
use crate::io::Io;
use crate::log::marks::Marks;
use crate::log::record::Header;
use crate::log::segment::{SEGMENT_HEADER_LEN, Segment, SegmentHeader, SpareFile};
use crate::log::segment_cache::SegmentCache;
use crate::log::striped_map::StripedMap;
use crate::log::time_floor::TimeFloor;

/// This thread's number among the threads that have appended to any log, given out at its
/// first append: threads that write one after another get consecutive numbers, so as many
/// writing threads as a log has lanes write through different lanes. (Only writers count:
/// threads that only read take no number and leave no gap.)
#[cfg(not(loom))]
fn writer_number() -> usize {
    WRITER_NUMBER.with(|mine| {
        if mine.get() == usize::MAX {
            mine.set(NEXT_WRITER_NUMBER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        }
        mine.get()
    })
}

/// The number the next thread to append for the first time gets (see `writer_number`).
#[cfg(not(loom))]
static NEXT_WRITER_NUMBER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[cfg(not(loom))]
thread_local! {
    /// This thread's writer number; `usize::MAX` until its first append.
    static WRITER_NUMBER: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// Sets the calling thread's writer number (a test seam: see `sim::pin_thread_lane`).
#[cfg(all(not(loom), any(test, feature = "sim")))]
pub(crate) fn pin_writer_number(number: usize) {
    WRITER_NUMBER.with(|mine| mine.set(number));
}

/// Under loom, every modelled thread runs on one OS thread: the number comes from loom's
/// thread locals instead, in the order the model's threads first append (the same in every
/// execution loom replays).
#[cfg(loom)]
fn writer_number() -> usize {
    use std::cell::Cell;
    loom::lazy_static! {
        static ref NEXT: loom::sync::atomic::AtomicUsize = loom::sync::atomic::AtomicUsize::new(0);
    }
    loom::thread_local! {
        static MINE: Cell<usize> = Cell::new(usize::MAX);
    }
    MINE.with(|mine| {
        if mine.get() == usize::MAX {
            mine.set(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        }
        mine.get()
    })
}

/// Sizes and limits the log works with.
#[derive(Debug, Clone)]
pub struct LogLimits {
    pub bucket_width_ms: u64,
    pub segment_bytes_max: u64,
    pub segment_bytes_initial: u64,
    pub disk_bytes_max: u64,
    /// Most segments kept open for appends (each holds a file descriptor).
    pub open_segments_max: usize,
    /// New segment space is zero-filled a page per write (`IoFile::reserve_paged`): every
    /// record is synced soon after it is written (`Durability::Sync`).
    pub paged_zero_fill: bool,
    /// Most record bytes the active segments may hold together before the fullest is retired
    /// (`Options::active_bytes_max`): what a reopen after a crash may have to scan.
    pub active_bytes_max: u64,
    /// Independent appenders (`Options::log_lanes`); see `Lane`.
    pub lanes: usize,
}

struct Active {
    segment: Arc<Segment>,
    write_pos: u64,
    last_write_seq: u64,
}

/// One lane's appender: its own segment taking appends per bucket, written under its own lock.
///
/// Each thread writes through its own lane (`writer_number`, given out as threads first
/// write), so threads that write at once touch neither the same lock nor
/// the same segment's tail: lanes share only the sequence counter (`Log::next_seq`) and, when
/// a segment is opened or retired, `Shared`. What keeps a key's records in order across lanes
/// is in `Log::append`.
struct Appender {
    active: IdMap<u64, Active>,
    dirty: Vec<Arc<Segment>>,
    /// Record bytes in the segments of `active` (their `write_pos` past the header), kept
    /// under this lane's share of `LogLimits::active_bytes_max`.
    active_bytes: u64,
    appended_bytes: u64,
    /// The latest store time any record appended in this lane was written at.
    written_ms: u64,
}

/// A lane: its appender and its unsynced byte count, on cache lines of their own so that
/// writers in different lanes never touch a line another lane writes.
/// (The lanes' locks and counters, `next_seq` and `Shared` come from `crate::sync`, so the loom
/// models see writers meet in them.)
#[repr(align(128))]
struct Lane {
    appender: LaneMutex<Appender>,
    /// Bytes appended in this lane since the last sync batch was taken (written under the
    /// lane's lock, read without it for the group-commit batch cap).
    unsynced_bytes: LaneAtomicU64,
}

/// The sequence counter on cache lines of its own: every append from every lane adds to it,
/// and sharing its line with what appends only read (the lanes' address, the limits) made each
/// of those reads a miss too whenever another core had just added.
#[repr(align(128))]
struct SeqCounter(LaneAtomicU64);

/// What the lanes share, changed only when a segment is opened or retired. Lock order: a
/// lane's appender, then this, then `Log::spare`, then the segments map's stripes.
struct Shared {
    next_segment_id: u32,
    /// Live segments that take no more appends: they left a lane's `active` (full, evicted
    /// for the descriptor bound, or idle) or were found at open. Only these are handed out to
    /// seal, and an append never writes to one (an `Active` is only ever made for a new
    /// segment).
    retired: IdMap<u32, ()>,
}

impl Shared {
    /// Takes `bucket`'s segment out of `app.active`, under its lane's lock: from here on it
    /// takes no appends (a later write to the bucket opens a new segment), so its descriptor
    /// goes. True when the bucket had one.
    fn retire(&mut self, app: &mut Appender, bucket: u64) -> bool {
        let Some(done) = app.active.remove(&bucket) else { return false };
        done.segment.set_appending_lane(None);
        done.segment.release_descriptor();
        app.active_bytes -= done.write_pos - SEGMENT_HEADER_LEN;
        self.retired.insert(done.segment.id(), ());
        true
    }
}

pub struct Log {
    io: Arc<dyn Io>,
    dir: PathBuf,
    limits: LogLimits,
    /// The appenders, at least one (see `Lane`).
    lanes: Box<[Lane]>,
    /// Most segments each lane keeps taking appends (its share of `open_segments_max`).
    lane_open_max: usize,
    /// Each lane's share of `active_bytes_max`.
    lane_active_bytes_max: u64,
    /// The next record's seq, taken under a lane's lock with the record written before that
    /// lock is let go: once every lane's lock is held, every seq below it is written.
    next_seq: SeqCounter,
    shared: LaneMutex<Shared>,
    /// The live segments by id (read on every claim; see `StripedMap`).
    segments: StripedMap<Arc<Segment>>,
    /// Segment files created, zero-filled and made durable in the directory ahead of need, one
    /// per lane at most, oldest id first: an append that opens a bucket (or rolls over) never
    /// waits for a directory fsync under its lane's lock, even when several lanes roll over
    /// at about the same moment.
    spare: Mutex<std::collections::VecDeque<SpareFile>>,
    /// Active segments within half a growth step of their reserved end: `grow_ahead` extends
    /// them outside the lane locks, so appends rarely wait for a growth step.
    to_grow: Mutex<Vec<Arc<Segment>>>,
    /// `to_grow` is not empty (read on every append without taking its lock).
    growth_pending: std::sync::atomic::AtomicBool,
    /// A new segment was opened and no spare is left for the next one (see `take_spare_wanted`).
    spare_wanted: std::sync::atomic::AtomicBool,
    /// A segment stopped taking appends since the last call of `take_tables_wanted`: the
    /// housekeeper should write its restart table now, not at its next tick.
    tables_wanted: std::sync::atomic::AtomicBool,
    /// The durable floor of the store's time (synced records raise it; see `TimeFloor`).
    time_floor: TimeFloor,
    /// How far each segment is known durable (`MARKS`; see `marks.rs`): raised after each
    /// sync. Written only once a writer loads them (`Log::load_marks`).
    marks: Marks,
    /// Time spent in syncs of the log (see `syncer.rs`).
    sync_latency: syncer::SyncLatency,
    /// Test seam: run once by the next `retire_idle`, right after its retire decision and
    /// before it hands the segments to seal back (see `Log::on_next_retire`).
    #[cfg(any(test, feature = "sim"))]
    retire_hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

/// What one sync must cover: every record up to `through_seq`, in these segments.
pub struct SyncBatch {
    pub through_seq: u64,
    pub segments: Vec<Arc<Segment>>,
    /// The latest store time of the records it covers.
    pub written_ms: u64,
    /// The end of the last record written in each of `segments` when the batch was taken:
    /// how far the sync makes each durable.
    pub written_ends: Vec<u64>,
}

impl Log {
    pub fn new(
        io: Arc<dyn Io>,
        dir: PathBuf,
        limits: LogLimits,
        segments: IdMap<u32, Arc<Segment>>,
        next_seq: u64,
        next_segment_id: u32,
    ) -> Self {
        // Segments found at open never take appends again.
        let retired = segments.keys().map(|&id| (id, ())).collect();
        // Each lane keeps at least one segment taking appends and one spare: no more lanes than
        // half the descriptor bound (plus the one spare always allowed beside it).
        let lane_count = limits.lanes.clamp(1, (limits.open_segments_max.div_ceil(2)).max(1));
        let lanes = (0..lane_count)
            .map(|_| Lane {
                appender: LaneMutex::new(Appender {
                    active: IdMap::default(),
                    dirty: Vec::new(),
                    active_bytes: 0,
                    appended_bytes: 0,
                    written_ms: 0,
                }),
                unsynced_bytes: LaneAtomicU64::new(0),
            })
            .collect();
        Log {
            // The spares (one per lane) count against the bound too, all but one of them (one
            // spare was always kept beside `open_segments_max`).
            lane_open_max: (limits.open_segments_max.saturating_sub(lane_count - 1) / lane_count).max(1),
            lane_active_bytes_max: (limits.active_bytes_max / lane_count as u64).max(1),
            lanes,
            next_seq: SeqCounter(LaneAtomicU64::new(next_seq)),
            shared: LaneMutex::new(Shared { next_segment_id, retired }),
            time_floor: TimeFloor::new(io.clone(), dir.clone()),
            marks: Marks::disabled(io.clone(), dir.clone()),
            sync_latency: Default::default(),
            io,
            dir,
            limits,
            segments: StripedMap::new(segments),
            spare: Mutex::new(std::collections::VecDeque::new()),
            to_grow: Mutex::new(Vec::new()),
            growth_pending: std::sync::atomic::AtomicBool::new(false),
            spare_wanted: std::sync::atomic::AtomicBool::new(false),
            tables_wanted: std::sync::atomic::AtomicBool::new(false),
            #[cfg(any(test, feature = "sim"))]
            retire_hook: Mutex::new(None),
        }
    }

    /// Test seam: `hook` runs once, inside the next [`Log::retire_idle`], after the segments
    /// to seal are chosen and before they are returned, so a test can append at that instant.
    #[cfg(any(test, feature = "sim"))]
    pub fn on_next_retire(&self, hook: Box<dyn FnOnce() + Send>) {
        *self.retire_hook.lock() = Some(hook);
    }

    /// Runs the hook set by [`Log::on_next_retire`], if any (no lock is held here).
    fn run_retire_hook(&self) {
        #[cfg(any(test, feature = "sim"))]
        {
            let hook = self.retire_hook.lock().take();
            if let Some(hook) = hook {
                hook();
            }
        }
    }

    /// Starts keeping `MARKS` (a writer, right after recovery synced what it scanned).
    pub fn load_marks(&self) {
        self.segments.read(|segments| self.marks.load(segments.values()));
    }

    /// Makes the marks durable (at close, after the final sync).
    pub fn sync_marks(&self) -> Result<()> {
        let path = self.dir.join(crate::log::marks::MARKS_FILE_NAME);
        self.marks.sync().map_err(|e| Error::io("sync marks file", path, e))
    }

    /// The durable floor of the store's time.
    pub fn time_floor(&self) -> &TimeFloor {
        &self.time_floor
    }

    /// The sequence number of the last record given out (read without any lock): no record
    /// written so far has a higher one. (A record with this seq may still be being written in
    /// its lane; a sync batch is taken with every lane's lock, so it covers it whole.)
    pub fn last_seq(&self) -> u64 {
        self.next_seq.0.load(crate::sync::Ordering::Acquire) - 1
    }

    /// Bytes appended since the last sync batch was taken, over all lanes.
    pub fn unsynced_bytes(&self) -> u64 {
        self.lanes.iter().map(|lane| lane.unsynced_bytes.load(crate::sync::Ordering::Relaxed)).sum()
    }

    /// Every lane's appender locked, in lane order (the only order in which more than one is
    /// ever held): no append is under way until they are let go.
    fn lock_all_lanes(&self) -> Vec<LaneGuard<'_, Appender>> {
        self.lanes.iter().map(|lane| lane.appender.lock()).collect()
    }

    /// Runs `f` on the segment `id` without cloning its handle; `None` when it was dropped.
    pub fn with_segment<R>(&self, id: u32, f: impl FnOnce(&Segment) -> R) -> Option<R> {
        self.segments.read(|segments| segments.get(&id).map(|s| f(s)))
    }

    /// Starts loading the records at `locs` into cache (hints), under one read of the
    /// segments map: no lock is taken between two prefetches (see `Inner::prefetch_records`).
    pub fn prefetch_records<'a>(&self, locs: impl Iterator<Item = &'a Loc>) {
        self.segments.read(|segments| {
            for loc in locs {
                if let Some(segment) = segments.get(&loc.segment) {
                    segment.prefetch(u64::from(loc.offset));
                }
            }
        });
    }

    /// Like [`Log::with_segment`], through a shard's own handles (see `SegmentCache`): no
    /// lock when `cache` holds the segment; a miss looks it up and keeps the handle.
    #[inline]
    pub fn with_segment_cached<R>(
        &self,
        cache: &mut SegmentCache,
        id: u32,
        f: impl FnOnce(&Segment) -> R,
    ) -> Option<R> {
        let way = cache.way_mut(id);
        if let Some(segment) = way.as_deref()
            && segment.id() == id
            && !segment.is_dropped()
        {
            return Some(f(segment));
        }
        match self.segments.read(|segments| segments.get(&id).cloned()) {
            Some(segment) => Some(f(way.insert(segment))),
            None => {
                if way.as_ref().is_some_and(|s| s.id() == id) {
                    *way = None;
                }
                None
            }
        }
    }

    /// Whether segment `id` is one of the log's live segments.
    pub fn holds_segment(&self, id: u32) -> bool {
        self.segments.read(|segments| segments.contains_key(&id))
    }

    pub fn segment_count(&self) -> usize {
        self.segments.read(|segments| segments.len())
    }

    /// (live, dead) record bytes over all live segments: dead ones were superseded by a later
    /// record of their key (counted since open, and by the scan at open).
    pub fn live_and_dead_bytes(&self) -> (u64, u64) {
        self.segments.read(|segments| {
            segments
                .values()
                .map(|s| s.byte_counts())
                .fold((0, 0), |(live, dead), (records, gone)| (live + records.saturating_sub(gone), dead + gone))
        })
    }

    /// Segment files holding a descriptor: the ones taking appends, and the spare.
    pub fn open_files(&self) -> usize {
        let active: usize = self.lanes.iter().map(|lane| lane.appender.lock().active.len()).sum();
        active + self.spare.lock().len()
    }

    /// Bytes of records appended since open (unsynced included).
    pub fn appended_bytes(&self) -> u64 {
        self.lanes.iter().map(|lane| lane.appender.lock().appended_bytes).sum()
    }

    /// Bytes reserved on disk by all live segments (and the spare file).
    pub fn disk_bytes(&self) -> u64 {
        let spare: u64 = self.spare.lock().iter().map(SpareFile::len).sum();
        self.segments.read(|segments| segments.values().map(|s| s.len()).sum::<u64>()) + spare
    }

    /// Whether fewer spare segment files are ready than there are lanes.
    pub fn spares_missing(&self) -> bool {
        self.spare.lock().len() < self.lanes.len()
    }

    /// Makes sure a spare segment file is ready for every lane (created, zero-filled, durable
    /// in the directory), doing the slow part with no lock held.
    pub fn prepare_spare(&self) -> Result<()> {
        while self.spare.lock().len() < self.lanes.len() {
            if !self.prepare_one_spare()? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Adds one spare; false when it could not be kept (a segment got a larger id meanwhile).
    fn prepare_one_spare(&self) -> Result<bool> {
        let id = {
            let mut shared = self.shared.lock();
            let id = shared.next_segment_id;
            shared.next_segment_id += 1;
            id
        };
        let spare = Segment::create_spare(
            self.io.as_ref(),
            &self.dir,
            id,
            self.limits.segment_bytes_max,
            self.limits.segment_bytes_initial,
            self.limits.paged_zero_fill,
        )?;
        self.io.sync_dir(&self.dir).map_err(|e| Error::Poisoned { cause: format!("directory sync failed: {e}") })?;
        let shared = self.shared.lock();
        if shared.next_segment_id != id + 1 {
            // A segment was created meanwhile with a larger id. A lane's segments of a bucket
            // must take ids in the order they take records (sealed lookups rely on it), so this
            // spare, with its smaller id, is not used. (An empty file: reopen would remove it
            // too.)
            drop(shared);
            let path = self.dir.join(crate::log::segment::segment_file_name(id));
            drop(spare);
            let _ = self.io.remove(&path);
            return Ok(false);
        }
        self.spare.lock().push_back(spare);
        drop(shared);
        Ok(true)
    }

    /// Appends a record into a segment of the bucket holding `retain_until_ms` (at least its
    /// `expires_at_ms`; later when the record shadows a record retained longer). `header.seq`
    /// is assigned here; a `token` of 0 becomes the new seq (a fresh claim is fenced by its
    /// own sequence number). Returns the final header and where the record lives.
    ///
    /// The record goes through the calling thread's lane, unless it supersedes a record (at
    /// `supersedes`, the key's latest) whose segment of the same bucket still takes appends:
    /// then through that segment's lane, right after it. Either way it lands in a segment
    /// with an id no lower than the superseded record's when both share a bucket (a lane whose
    /// segment of the bucket is older opens a new one first), so that sealed lookups, newest
    /// table first, meet a key's latest record first (ARCHITECTURE.md, invariant 5).
    ///
    /// `supersedes` is the superseded record's location and padded length: once this record
    /// is written, that many bytes of its segment are counted dead.
    ///
    /// `new_claim`: only new claims are held to the disk budget; a holder can always record
    /// its outcome (or give up) for an effect it already performed.
    ///
    /// A failed record write or directory sync returns `Error::Poisoned` (the caller poisons
    /// the store): the bytes may be half in the page cache, nothing may be trusted after it.
    pub fn append(
        &self,
        mut header: Header,
        key: &[u8],
        value: &[u8],
        retain_until_ms: u64,
        new_claim: bool,
        supersedes: Option<(Loc, u64)>,
    ) -> Result<(Header, Loc)> {
        debug_assert!(retain_until_ms >= header.expires_at_ms);
        let bucket = retain_until_ms.max(header.expires_at_ms) / self.limits.bucket_width_ms;
        // The superseded record's segment, when it lies in this bucket: (its id, the lane
        // still appending to it, if any).
        let after = supersedes.and_then(|(old, _)| {
            self.segments.read(|segments| {
                let segment = segments.get(&old.segment)?;
                let same_bucket = segment.header.bucket_start_ms / self.limits.bucket_width_ms == bucket;
                same_bucket.then(|| (old.segment, segment.appending_lane()))
            })
        });
        let lane_number = match after {
            Some((_, Some(lane))) => lane,
            _ => writer_number() % self.lanes.len(),
        };
        let lane = &self.lanes[lane_number];
        let mut guard = lane.appender.lock();
        let app = &mut *guard;
        let len = header.padded_len();
        let needs_new = match app.active.get(&bucket) {
            // A lane's segment older than the superseded record's takes no record of that key:
            // the bucket opens a newer one in this lane (rare: the key's segment was retired
            // while this lane's segment of the bucket, opened before it, still takes appends).
            Some(a) => {
                a.write_pos + len > self.limits.segment_bytes_max || after.is_some_and(|(id, _)| a.segment.id() < id)
            }
            None => true,
        };
        if needs_new {
            self.open_segment(app, lane_number, bucket, &header, len, new_claim)?;
        }
        let Some(active) = app.active.get_mut(&bucket) else {
            return Err(Error::InvalidArgument("internal: active segment vanished"));
        };
        let end = active.write_pos + len;
        let reserved = active.segment.len();
        if end > reserved {
            // Grow in fixed steps. Normally `grow_ahead` got here first, outside the lock;
            // this is the fallback when appends outran it (each step is zero-filled while the
            // lane's lock is held, so a step bounds that pause and the first sync after it).
            let grown = reserved
                .saturating_add(self.limits.segment_bytes_initial)
                .max(end)
                .min(self.limits.segment_bytes_max.max(end));
            if new_claim {
                self.check_budget(grown - reserved)?;
            }
            active.segment.reserve(grown, self.limits.paged_zero_fill)?;
        }
        // The seq is taken only now, when nothing can fail before the record is written: a
        // seq given out is always written before this lane's lock is let go (see `next_seq`).
        header.seq = self.next_seq.0.fetch_add(1, crate::sync::Ordering::AcqRel);
        if header.token == 0 {
            header.token = header.seq;
        }
        let offset = active.write_pos;
        if let Err(e) = active.segment.write_record(offset, &header, key, value) {
            return Err(Error::Poisoned { cause: format!("record write failed: {e}") });
        }
        active.write_pos = end;
        active.last_write_seq = header.seq;
        active.segment.note_record(len);
        active.segment.note_write(header.written_at_ms);
        // The superseded record is dead now; most often it sits in this very segment (the
        // record follows its lane), which spares a lookup in the segments map.
        let dead_elsewhere = match supersedes {
            Some((old, dead_len)) if old.segment == active.segment.id() => {
                active.segment.note_dead(dead_len);
                None
            }
            other => other,
        };
        #[expect(
            clippy::cast_possible_truncation,
            reason = "a record starts inside its segment, at most `segment_bytes_max` (4 GiB, checked at open)"
        )]
        let loc = Loc { segment: active.segment.id(), offset: offset as u32 };
        if !app.dirty.iter().any(|s| Arc::ptr_eq(s, &active.segment)) {
            app.dirty.push(active.segment.clone());
        }
        let headroom = active.segment.len().saturating_sub(end);
        if headroom < self.limits.segment_bytes_initial / 2
            && active.segment.len() < self.limits.segment_bytes_max
            && active.segment.claim_growth()
        {
            self.to_grow.lock().push(active.segment.clone());
            self.growth_pending.store(true, std::sync::atomic::Ordering::Release);
        }
        app.active_bytes += len;
        if app.active_bytes > self.lane_active_bytes_max {
            // Records in segments that take appends have no table yet: a crash leaves them to
            // be scanned at reopen. The lane's fullest one stops taking appends now (the record
            // just written is in it already) and gets its table from the housekeeper, so that
            // scan stays bounded however many buckets are being written.
            if let Some(&fullest) = app.active.iter().max_by_key(|(_, a)| a.write_pos).map(|(b, _)| b)
                && self.shared.lock().retire(app, fullest)
            {
                self.tables_wanted.store(true, std::sync::atomic::Ordering::Release);
            }
        }
        // Written only under this lane's lock (here and when a batch is taken).
        let unsynced = lane.unsynced_bytes.load(crate::sync::Ordering::Relaxed);
        lane.unsynced_bytes.store(unsynced + len, crate::sync::Ordering::Relaxed);
        app.appended_bytes += len;
        app.written_ms = app.written_ms.max(header.written_at_ms);
        drop(guard);
        if let Some((old, dead_len)) = dead_elsewhere {
            self.with_segment(old.segment, |s| s.note_dead(dead_len));
        }
        Ok((header, loc))
    }

    /// Opens a new segment for `bucket` in a lane (`app`, under its lock), retiring the
    /// bucket's full segment in that lane, and the lane's coldest for the descriptor bound.
    #[cold]
    fn open_segment(
        &self,
        app: &mut Appender,
        lane: usize,
        bucket: u64,
        header: &Header,
        len: u64,
        new_claim: bool,
    ) -> Result<()> {
        let start = bucket.saturating_mul(self.limits.bucket_width_ms);
        let initial = self.limits.segment_bytes_initial.max(SEGMENT_HEADER_LEN + len);
        if new_claim {
            self.check_budget(initial)?;
        }
        let mut shared = self.shared.lock();
        let mut segment_header = SegmentHeader {
            id: shared.next_segment_id,
            bucket_start_ms: start,
            bucket_end_ms: start.saturating_add(self.limits.bucket_width_ms),
            created_at_ms: header.written_at_ms,
            rebuilt: false,
        };
        let spare = self.spare.lock().pop_front();
        self.spare_wanted.store(true, std::sync::atomic::Ordering::Release);
        let segment = match spare {
            Some(spare) => {
                segment_header.id = spare.id;
                Arc::new(Segment::from_spare(self.io.as_ref(), spare, segment_header)?)
            }
            None => {
                let segment = Arc::new(Segment::create(
                    self.io.as_ref(),
                    &self.dir,
                    segment_header,
                    self.limits.segment_bytes_max.max(SEGMENT_HEADER_LEN + len),
                    initial,
                    self.limits.paged_zero_fill,
                )?);
                shared.next_segment_id += 1;
                // A new file must be durable as a directory entry before anything in it counts.
                if let Err(e) = self.io.sync_dir(&self.dir) {
                    // The file exists but may vanish at a power cut: nothing written to it
                    // could be promised, so the store stops here. (The empty file is removed
                    // at reopen.)
                    return Err(Error::Poisoned { cause: format!("directory sync failed: {e}") });
                }
                segment
            }
        };
        // The lane's full segment of this bucket takes no more appends: its descriptor goes
        // now (it is synced through its map from here on, like an evicted one).
        let mut retired = shared.retire(app, bucket);
        if app.active.len() >= self.lane_open_max {
            // Bound the descriptors: the lane's least recently written bucket gives its file
            // up; a later write to that bucket opens a new segment.
            if let Some(&coldest) = app.active.iter().min_by_key(|(_, a)| a.last_write_seq).map(|(b, _)| b) {
                retired |= shared.retire(app, coldest);
            }
        }
        debug_assert!(!shared.retired.contains_key(&segment.id()), "a new segment is never a retired one");
        if retired {
            self.tables_wanted.store(true, std::sync::atomic::Ordering::Release);
        }
        drop(shared);
        segment.set_appending_lane(Some(lane));
        self.segments.change(|segments| segments.insert(segment.id(), segment.clone()));
        app.dirty.push(segment.clone());
        app.active.insert(bucket, Active { segment, write_pos: SEGMENT_HEADER_LEN, last_write_seq: 0 });
        Ok(())
    }

    /// Whether a segment was opened since the last call, using up the spare (or finding none):
    /// the housekeeper should prepare the next spare now, not at its next tick, so the next
    /// bucket or full segment does not create a file and sync the directory under the
    /// lane lock.
    pub fn take_spare_wanted(&self) -> bool {
        self.spare_wanted.load(std::sync::atomic::Ordering::Acquire)
            && self.spare_wanted.swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    /// Whether a segment stopped taking appends since the last call: the housekeeper should
    /// write its restart table now (see `Store`'s restart tables).
    pub fn take_tables_wanted(&self) -> bool {
        self.tables_wanted.load(std::sync::atomic::Ordering::Acquire)
            && self.tables_wanted.swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    /// Every live segment that takes no more appends (retired, or found at open), by id.
    pub fn retired_segments(&self) -> Vec<Arc<Segment>> {
        let shared = self.shared.lock();
        let mut retired: Vec<Arc<Segment>> =
            self.segments.read(|segments| shared.retired.keys().filter_map(|id| segments.get(id)).cloned().collect());
        drop(shared);
        retired.sort_by_key(|s| s.id());
        retired
    }

    /// Retires every segment taking appends (the store is closing: nothing is appended after
    /// this), so each can get its table. Their records are all written: appends write under
    /// the lane locks this takes.
    pub fn retire_all(&self) {
        let mut lanes = self.lock_all_lanes();
        let mut shared = self.shared.lock();
        for app in lanes.iter_mut() {
            let buckets: Vec<u64> = app.active.keys().copied().collect();
            for bucket in buckets {
                shared.retire(app, bucket);
            }
        }
    }

    /// Whether some active segment is close to its reserved end (see `grow_ahead`).
    pub fn growth_wanted(&self) -> bool {
        self.growth_pending.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Extends every segment close to its reserved end by one growth step, without the
    /// lane lock: appends go on below the old end meanwhile. Best effort: a failure (full
    /// disk, budget, a released descriptor) is left for the append that needs the space, which
    /// retries under the lock and reports it.
    pub fn grow_ahead(&self) {
        let wanted = {
            let mut queue = self.to_grow.lock();
            self.growth_pending.store(false, std::sync::atomic::Ordering::Release);
            std::mem::take(&mut *queue)
        };
        for segment in wanted {
            let reserved = segment.len();
            let grown = reserved.saturating_add(self.limits.segment_bytes_initial).min(self.limits.segment_bytes_max);
            if grown > reserved && self.check_budget(grown - reserved).is_ok() {
                let _ = segment.reserve(grown, self.limits.paged_zero_fill);
            }
            segment.end_growth();
        }
    }

    fn check_budget(&self, more_bytes: u64) -> Result<()> {
        if self.limits.disk_bytes_max == u64::MAX {
            return Ok(());
        }
        let used_bytes = self.disk_bytes();
        // One growth step stays free for the completes of claims already held.
        let headroom = self.limits.segment_bytes_initial;
        if used_bytes.saturating_add(more_bytes).saturating_add(headroom) > self.limits.disk_bytes_max {
            return Err(Error::DiskBudgetExceeded { used_bytes, max_bytes: self.limits.disk_bytes_max });
        }
        Ok(())
    }

    /// Takes what the next sync must cover; the caller syncs it without holding any lock.
    ///
    /// Every lane's lock is held while it is taken, so no record is half written: every seq
    /// given out so far is written, and `through_seq` covers them all.
    fn take_sync_batch(&self) -> SyncBatch {
        let mut lanes = self.lock_all_lanes();
        let mut segments = Vec::new();
        let mut written_ms = 0;
        for (app, lane) in lanes.iter_mut().zip(self.lanes.iter()) {
            lane.unsynced_bytes.store(0, crate::sync::Ordering::Relaxed);
            segments.append(&mut app.dirty);
            written_ms = written_ms.max(app.written_ms);
        }
        // Records are written whole under the lane locks: each end is a record boundary.
        let written_ends = segments.iter().map(|s| s.written_end()).collect();
        let through_seq = self.last_seq();
        drop(lanes);
        SyncBatch { through_seq, segments, written_ms, written_ends }
    }

    /// Syncs a batch: every dirty segment (fdatasync). New files' directory entries were
    /// made durable when the files were created. The batch's records now hold its latest
    /// store time durably: the time floor rises to it.
    fn sync_batch(&self, batch: &SyncBatch) -> std::io::Result<()> {
        for segment in &batch.segments {
            segment.sync()?;
        }
        self.time_floor.note_durable(batch.written_ms);
        // Only now, after the sync returned: a mark never claims more than is durable.
        if !batch.segments.is_empty() {
            // A failed write leaves the file stale, which is safe (fewer records protected):
            // not worth failing the sync, which would poison the store.
            let _ = self.marks.note_synced(&batch.segments, &batch.written_ends);
        }
        Ok(())
    }

    /// Takes every segment whose bucket's window ended at or before `now_ms` out of the log
    /// and marks it dropped; returns (buckets, segments) taken. Their files stay until
    /// [`Log::delete_segments`]: a claim may still be reading one through a handle its shard
    /// kept (see `SegmentCache`), so the caller first waits that out, by taking every shard's
    /// lock, and only then deletes (cutting a mapped file under a reader would fault it).
    pub fn take_expired(&self, now_ms: u64) -> (usize, Vec<Arc<Segment>>) {
        let mut lanes = self.lock_all_lanes();
        for app in lanes.iter_mut() {
            let mut gone_bytes = 0;
            app.active.retain(|_, a| {
                let live = a.segment.header.bucket_end_ms > now_ms;
                if !live {
                    a.segment.set_appending_lane(None);
                    a.segment.release_descriptor();
                    gone_bytes += a.write_pos - SEGMENT_HEADER_LEN;
                }
                live
            });
            app.active_bytes -= gone_bytes;
            app.dirty.retain(|s| s.header.bucket_end_ms > now_ms);
        }
        let mut shared = self.shared.lock();
        let taken: Vec<Arc<Segment>> = self.segments.change(|segments| {
            let expired: Vec<u32> =
                segments.values().filter(|s| s.header.bucket_end_ms <= now_ms).map(|s| s.id()).collect();
            expired.iter().filter_map(|id| segments.remove(id)).collect()
        });
        for segment in &taken {
            shared.retired.remove(&segment.id());
        }
        drop(shared);
        drop(lanes);
        for segment in &taken {
            segment.mark_dropped();
        }
        let mut buckets: Vec<u64> = taken.iter().map(|s| s.header.bucket_start_ms).collect();
        buckets.sort_unstable();
        buckets.dedup();
        (buckets.len(), taken)
    }

    /// Unlinks the files of segments taken by [`Log::take_expired`] and makes that durable.
    pub fn delete_segments(&self, taken: &[Arc<Segment>]) -> Result<()> {
        if taken.is_empty() {
            return Ok(());
        }
        // Every file is tried: these segments are out of the log, so a file skipped here would
        // stay on disk until the next open.
        let mut first_error = None;
        for segment in taken {
            debug_assert!(segment.is_dropped(), "only a segment taken out of the log is deleted");
            if let Err(e) = self.io.remove_gradually(&segment.path) {
                first_error.get_or_insert(Error::io("delete expired segment", &segment.path, e));
            }
        }
        self.marks.forget(taken.iter().map(|s| s.id()));
        let synced = self.io.sync_dir(&self.dir).map_err(|e| Error::io("sync directory", &self.dir, e));
        first_error.map_or(synced, Err)
    }

    /// Retires every segment taking appends whose last write is older than `idle_before_ms`
    /// (a later write to its bucket opens a new segment) and returns every live retired
    /// segment last written before `idle_before_ms`: the ones to seal.
    ///
    /// Both steps happen under every lane's lock, one of which every append holds: a segment
    /// is handed out only if it was retired when the locks were taken or by this call, so no
    /// append reaches it afterwards. (Choosing from the segments map after letting the lock go would
    /// hand out a segment an append created meanwhile, still taking appends, whenever that
    /// append's time reading was older than `idle_before_ms`: a writer that stalled, or a
    /// forward step of the clock. Sealing it would lose the records written after its entries
    /// were collected.)
    pub fn retire_idle(&self, idle_before_ms: u64) -> Vec<Arc<Segment>> {
        let mut lanes = self.lock_all_lanes();
        let mut shared = self.shared.lock();
        for app in lanes.iter_mut() {
            let idle: Vec<u64> = app
                .active
                .iter()
                .filter(|(_, a)| a.segment.last_write_ms() < idle_before_ms)
                .map(|(&bucket, _)| bucket)
                .collect();
            for bucket in idle {
                shared.retire(app, bucket);
            }
        }
        // A retired segment's last write no longer changes.
        let mut to_seal: Vec<Arc<Segment>> = self.segments.read(|segments| {
            shared
                .retired
                .keys()
                .filter_map(|id| segments.get(id))
                .filter(|s| s.last_write_ms() < idle_before_ms)
                .cloned()
                .collect()
        });
        drop(shared);
        drop(lanes);
        self.run_retire_hook();
        to_seal.sort_by_key(|s| s.id());
        to_seal
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::sim::SimDisk;
    use crate::log::record::Kind;

    const WIDTH_MS: u64 = 60_000;

    fn log(disk: &SimDisk) -> Log {
        log_with_lanes(disk, 1)
    }

    fn log_with_lanes(disk: &SimDisk, lanes: usize) -> Log {
        let dir = PathBuf::from("/store");
        disk.create_dir_all(&dir).unwrap();
        let limits = LogLimits {
            bucket_width_ms: WIDTH_MS,
            segment_bytes_max: 4096,
            segment_bytes_initial: 4096,
            disk_bytes_max: u64::MAX,
            open_segments_max: 8,
            paged_zero_fill: false,
            active_bytes_max: u64::MAX,
            lanes,
        };
        Log::new(Arc::new(disk.clone()), dir, limits, IdMap::default(), 1, 1)
    }

    fn claim_expiring_at(expires_at_ms: u64) -> Header {
        Header {
            kind: Kind::Claim,
            key_len: 3,
            value_len: 0,
            seq: 0,
            expires_at_ms,
            claimed_at_ms: 0,
            lease_until_ms: 1,
            token: 0,
            incarnation: 1,
            request_hash: 7,
            written_at_ms: 0,
            lease_ms: 1,
        }
    }

    #[test]
    fn a_prepared_spare_opens_a_bucket_without_a_directory_sync() {
        let disk = SimDisk::new();
        let log = log(&disk);
        // No spare: opening a bucket syncs the directory under the lane lock.
        let before = disk.syncs();
        let (_, first) = log.append(claim_expiring_at(WIDTH_MS), b"one", &[], WIDTH_MS, true, None).unwrap();
        assert_eq!(disk.syncs(), before + 1);
        assert_eq!(first.segment, 1);

        log.prepare_spare().unwrap();
        let prepared = disk.syncs();
        let (_, second) = log.append(claim_expiring_at(3 * WIDTH_MS), b"two", &[], 3 * WIDTH_MS, true, None).unwrap();
        assert_eq!(disk.syncs(), prepared, "the spare's directory entry was made durable beforehand");
        assert_eq!(second.segment, 2, "the new bucket took the spare");
        assert_eq!(log.segment_count(), 2);
    }

    #[test]
    fn an_append_within_half_a_step_of_the_end_asks_for_growth_and_grow_ahead_adds_one_step() {
        let disk = SimDisk::new();
        let dir = PathBuf::from("/store");
        disk.create_dir_all(&dir).unwrap();
        let step = 1024;
        let limits = LogLimits {
            bucket_width_ms: WIDTH_MS,
            segment_bytes_max: 8 * step,
            segment_bytes_initial: step,
            disk_bytes_max: u64::MAX,
            open_segments_max: 8,
            paged_zero_fill: false,
            active_bytes_max: u64::MAX,
            lanes: 1,
        };
        let log = Log::new(Arc::new(disk.clone()), dir, limits, IdMap::default(), 1, 1);
        let (header, first) = log.append(claim_expiring_at(WIDTH_MS), b"one", &[], WIDTH_MS, true, None).unwrap();
        let record = header.padded_len();
        let reserved = |log: &Log| log.with_segment(first.segment, |s| s.len()).unwrap();
        assert_eq!(reserved(&log), step);
        let mut end = SEGMENT_HEADER_LEN + record;
        while step - end >= step / 2 {
            assert!(!log.growth_wanted(), "growth asked for with {} bytes left", step - end);
            log.append(claim_expiring_at(WIDTH_MS), b"two", &[], WIDTH_MS, true, None).unwrap();
            end += record;
        }
        assert!(log.growth_wanted(), "no growth asked for with {} of {step} bytes left", step - end);
        assert_eq!(reserved(&log), step, "the append itself grew the segment");
        log.grow_ahead();
        assert!(!log.growth_wanted());
        assert_eq!(reserved(&log), 2 * step, "grow_ahead did not add one step");
        log.append(claim_expiring_at(WIDTH_MS), b"six", &[], WIDTH_MS, true, None).unwrap();
        assert!(!log.growth_wanted(), "growth asked for again right after a step was added");
    }

    #[test]
    fn a_cached_segment_handle_reads_as_gone_once_its_bucket_is_dropped() {
        let disk = SimDisk::new();
        let log = log(&disk);
        let (_, expiring) = log.append(claim_expiring_at(WIDTH_MS), b"old", &[], WIDTH_MS, true, None).unwrap();
        let (_, staying) = log.append(claim_expiring_at(5 * WIDTH_MS), b"new", &[], 5 * WIDTH_MS, true, None).unwrap();
        let mut cache = SegmentCache::default();
        let id_through = |log: &Log, cache: &mut SegmentCache, id| log.with_segment_cached(cache, id, |s| s.id());
        assert_eq!(id_through(&log, &mut cache, expiring.segment), Some(expiring.segment));
        assert_eq!(id_through(&log, &mut cache, staying.segment), Some(staying.segment));
        assert_eq!(cache.len(), 2, "both handles kept");
        let same_way = expiring.segment + 8;
        assert_eq!(id_through(&log, &mut cache, same_way), None, "another segment's handle answered for {same_way}");
        assert_eq!(cache.len(), 2, "a miss for an id the log does not have let a kept handle go");

        let (buckets, dropped) = log.take_expired(2 * WIDTH_MS);
        assert_eq!((buckets, dropped.len()), (1, 1));
        assert_eq!(id_through(&log, &mut cache, expiring.segment), None, "a dropped segment read through the cache");
        assert_eq!(cache.len(), 1, "the dropped segment's handle was let go");
        assert_eq!(id_through(&log, &mut cache, staying.segment), Some(staying.segment));
        assert_eq!(id_through(&log, &mut cache, 99), None, "an id the log never had");
    }

    #[test]
    fn a_segment_retire_idle_hands_out_never_takes_another_append() {
        let disk = SimDisk::new();
        let log = Arc::new(log(&disk));
        let (_, old) = log.append(claim_expiring_at(WIDTH_MS), b"old", &[], WIDTH_MS, true, None).unwrap();
        // A writer whose time reading is as old as the idle segment's appends to a new bucket
        // just after the retire decision: its new segment looks idle too.
        let late_bucket = 5 * WIDTH_MS;
        log.on_next_retire(Box::new({
            let log = log.clone();
            move || {
                log.append(claim_expiring_at(late_bucket), b"new", &[], late_bucket, true, None).unwrap();
            }
        }));
        let retired = log.retire_idle(1_000);
        assert!(retired.iter().any(|s| s.id() == old.segment), "the idle segment was not handed out to seal");
        for segment in &retired {
            let bucket_end = segment.header.bucket_end_ms;
            let records_before = segment.byte_counts().0;
            let (_, loc) =
                log.append(claim_expiring_at(bucket_end - 1), b"key", &[], bucket_end - 1, true, None).unwrap();
            assert_ne!(loc.segment, segment.id(), "segment {} was handed out to seal and took an append", segment.id());
            assert_eq!(segment.byte_counts().0, records_before, "a segment handed out to seal grew");
        }
    }

    #[test]
    fn a_bucket_takes_segment_ids_in_the_order_it_takes_records() {
        let disk = SimDisk::new();
        let log = log(&disk);
        let mut last = (0, 0);
        for i in 0..60u64 {
            if i % 7 == 0 {
                log.prepare_spare().unwrap();
            }
            // Alternate two buckets; small segments make each roll over several times.
            let expires = if i % 2 == 0 { WIDTH_MS } else { 5 * WIDTH_MS };
            let header = Header { value_len: 300, ..claim_expiring_at(expires) };
            let (header, loc) = log.append(header, b"key", &[0u8; 300], expires, true, None).unwrap();
            if expires == WIDTH_MS {
                assert!((loc.segment, header.seq) > last, "segment {} after {:?}", loc.segment, last);
                last = (loc.segment, header.seq);
            }
        }
        assert!(last.0 > 2, "the bucket rolled over into several segments");
    }

    /// A thread of its own, running what it is sent: it keeps its lane across appends.
    struct Writer {
        jobs: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
    }

    impl Writer {
        fn new() -> Writer {
            let (jobs, inbox) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
            std::thread::spawn(move || inbox.into_iter().for_each(|job| job()));
            Writer { jobs }
        }

        fn append(&self, log: &Arc<Log>, key: &'static [u8], value_len: u32, supersedes: Option<Loc>) -> Loc {
            let supersedes = supersedes.map(|loc| (loc, 0));
            let (log, (done, answer)) = (log.clone(), std::sync::mpsc::channel());
            let job = move || {
                let header = Header { value_len, key_len: key.len() as u16, ..claim_expiring_at(WIDTH_MS) };
                let value = vec![0u8; value_len as usize];
                done.send(log.append(header, key, &value, WIDTH_MS, true, supersedes).unwrap().1).unwrap();
            };
            self.jobs.send(Box::new(job)).unwrap();
            answer.recv().unwrap()
        }
    }

    #[test]
    fn a_key_s_later_record_never_lands_in_an_older_segment_of_its_bucket() {
        let disk = SimDisk::new();
        let log = Arc::new(log_with_lanes(&disk, 2));
        let lane_of = |loc: Loc| log.with_segment(loc.segment, |s| s.appending_lane()).flatten();
        // Two writers in different lanes (a thread's lane is given out at its first append).
        let b = Writer::new();
        let first_b = b.append(&log, b"filler-b", 8, None);
        let a = std::iter::repeat_with(Writer::new)
            .find(|a| lane_of(a.append(&log, b"probe", 8, None)) != lane_of(first_b))
            .unwrap();
        // A writes the key into its segment, then fills it until it rolls over: the key's
        // segment is retired, while B's segment of the bucket, opened first, takes appends.
        let key_at = a.append(&log, b"key", 8, None);
        assert!(key_at.segment > first_b.segment);
        while lane_of(key_at).is_some() {
            a.append(&log, b"filler-a", 300, None);
        }
        assert!(lane_of(first_b).is_some(), "B's segment was retired too");
        // B writes the key's next record: not into its older segment.
        let next = b.append(&log, b"key", 8, Some(key_at));
        assert!(next.segment > key_at.segment, "the key's record at {next:?} went before its older one at {key_at:?}");
        // While the key's segment takes appends, a superseding write from any lane follows it.
        let again = a.append(&log, b"key", 8, Some(next));
        assert_eq!(again.segment, next.segment, "the record did not follow the key's segment's lane");
    }
}
