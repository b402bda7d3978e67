//! Options of a store and of a single claim.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};
use crate::io::permissions::FileAccess;
use crate::io::{Io, RealIo};

/// The longest TTL a key may have: 10 years. Longer (`Duration::MAX` for "forever", say) is
/// `Error::InvalidArgument`: expiry times must stay far from the end of the 64-bit clock for
/// buckets to have a start before their end.
pub const TTL_MAX: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// When a write counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// A call returns only after its record is on stable storage (fdatasync, shared by
    /// concurrent callers through group commit). No call returns a decision or outcome read
    /// from a record that is not yet durable.
    #[default]
    Sync,
    /// A background thread syncs at least every interval (positive, at most a day): a power
    /// loss may lose that much, a process crash loses nothing.
    Periodic(Duration),
    /// Written to the OS page cache before the call returns: survives a process crash, not a
    /// power loss.
    None,
}

/// What a claim does with an in-flight claim left by an earlier process (an orphan).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OrphanPolicy {
    /// Take it over at once: its holder died with its process (the token says `recovered()`).
    #[default]
    TakeOver,
    /// Treat it like a live claim: wait for its lease to end.
    WaitForLease,
}

/// A function from key bytes to the 64-bit index hash (a test seam; `None` is the store's own).
pub type KeyHashFn = fn(&[u8]) -> u64;

/// Options of a store. Build with struct update syntax:
/// `Options { durability: Durability::None, ..Default::default() }`.
#[derive(Clone)]
pub struct Options {
    /// How long a key is kept from its claim (default 24 h, at most [`TTL_MAX`]).
    pub default_ttl: Duration,
    /// How long an acquired claim is held before another claim may take it over (default 30 s).
    pub default_lease: Duration,
    /// When writes count as done (default `Sync`).
    pub durability: Durability,
    /// What to do with in-flight claims of an earlier process (default: take over at once).
    pub orphans: OrphanPolicy,
    /// Longest key accepted, in bytes (default 1 KiB, at most 65,535).
    pub max_key_len: usize,
    /// Longest outcome or checkpoint accepted, in bytes (default 1 MiB, at most 64 MiB).
    pub max_outcome_len: usize,
    /// Width of an expiry bucket (default 1 h). Records are grouped by the bucket of their
    /// expiry and a bucket's files are deleted whole once it has passed: a wider bucket means
    /// fewer files but keeps expired records on disk up to one width longer.
    pub bucket_width: Duration,
    /// Largest segment file, in bytes (default 64 MiB, at most 4 GiB); a bucket that fills one
    /// continues in another.
    pub segment_bytes_max: u64,
    /// Space reserved when a segment file is created, and the step it grows by (default
    /// 256 KiB). Each step is fallocated and zero-filled ahead of need by the writer that comes
    /// within half a step of the end, outside the appender lock; a larger step means fewer
    /// growths but a longer pause for that one writer (~0.1 ms per 64 KiB measured here; the
    /// zero-fill of a 256 KiB step alone took 64-73 µs, and 140-145 µs one page per write
    /// call as under `Sync`, see `IoFile::reserve_paged`).
    pub segment_bytes_initial: u64,
    /// Under `Sync`, a writer first waits for a sync when this many bytes are unsynced
    /// (default 4 MiB): the cap on one group-commit batch.
    pub batch_bytes_max: u64,
    /// A segment that has taken no write for this long (store time) stops taking appends and
    /// is sealed: its index entries move from RAM to an immutable table file with a small
    /// filter in RAM (default 10 min). Shorter frees RAM sooner; longer writes fewer tables.
    pub seal_idle_after: Duration,
    /// Most record bytes the segments taking appends may hold together (default 16 MiB). Past
    /// it, the fullest of them stops taking appends (its bucket goes on in a new segment) and
    /// the housekeeper writes it a restart table at once, so a reopen after a crash scans at
    /// most about this much (plus what was retired in the last moment), however many buckets
    /// are being written. Smaller bounds that scan lower but makes more, smaller segments.
    pub active_bytes_max: u64,
    /// Most segment files kept open for appends at once (default 64). Each holds one file
    /// descriptor; other segments are read through their memory maps with no descriptor, so
    /// the store holds at most this many plus the lock file and one spare segment however
    /// many buckets are live.
    pub max_open_files: usize,
    /// Lanes the log is written through; 0 (the default) picks them: one under
    /// `Durability::Sync`, else the machine's CPUs, at most 16. Each lane is an appender with
    /// its own lock and its own segment taking appends per bucket, and each writing thread
    /// writes through its own lane, so threads that write at once seldom wait for each other.
    /// Under `Sync` every lane written since the last group commit is one more `fdatasync` in
    /// the next (16 threads on two lanes measured 1.62 x Redis `appendfsync always`, on one
    /// lane 1.75 x in the next run): the disk, not the CPU, bounds those writes. More lanes
    /// means more, smaller segments: `max_open_files` and `active_bytes_max` are shared between
    /// them (each lane keeps a spare segment file ready, counted in `max_open_files` too), and
    /// there are never more lanes than half of `max_open_files`, rounded up. A store may be
    /// reopened with another number of lanes.
    pub log_lanes: usize,
    /// Disk space the store may take (default: unlimited). New claims fail with
    /// `DiskBudgetExceeded` once the segment files would pass it less one growth step
    /// (`segment_bytes_initial`, kept for completes), while replays and reads go on. Completes,
    /// checkpoints, releases and removes are never refused by the budget: a holder can always
    /// record the outcome of an effect it already ran (a full disk still refuses them).
    pub max_disk_bytes: u64,
    /// Who may read the files (default [`FileAccess::Owner`]: directory 0700, files 0600,
    /// whatever the umask; `OwnerAndGroupRead` gives 0750 and 0640). Applies to what the store
    /// creates from now on; existing files keep their modes. `open` refuses a store directory
    /// that other users can write (`Error::UnsafePermissions`) and reports one that grants more
    /// than this in `Stats::warnings`. With a custom `io`, the modes are its own (see
    /// `Io::with_access`).
    pub file_access: FileAccess,
    /// Time source (default: the system clock).
    pub clock: Arc<dyn Clock>,
    /// Disk access (default: the real file system; tests pass a simulated disk).
    pub io: Arc<dyn Io>,
    /// Index hash of a key (a test seam to force collisions; default: xxh3-64 under the store's
    /// secret, or unkeyed in a store of format 1).
    pub key_hash: Option<KeyHashFn>,
    /// Create the store directory when it is missing, and a new store in an empty directory
    /// (default true). False makes `Store::open` refuse a path that holds no store yet with
    /// `Error::NotAStore`: set it once the store exists (a deployment step, or the first run,
    /// creates it) so that a typo'd path, or a volume that did not mount, stops the service
    /// instead of starting it with an empty dedupe window. Either way a path that is a file, or
    /// a directory of other files, is refused.
    pub create_if_missing: bool,
    /// Run the background housekeeping thread (expiry, sealing, periodic sync, spare segments
    /// prepared ahead of need). Default true; tests that drive expiry by hand with
    /// `Store::maintain` may turn it off.
    pub background: bool,
    /// Called after every claim is answered (by `claim`, `claim_with`, `claim_many`, the async
    /// calls and namespaces), to count or log fresh runs and replays in one place. Runs on the
    /// caller's thread with no store lock held; it must be quick and must not panic. Default
    /// none.
    pub on_claim: Option<ClaimHook>,
    /// Count the replays each completed key serves, for `Store::history` (default false). The
    /// count is a map entry per replayed key beside its index shard: over a large set of
    /// distinct replayed keys it cost replays about a third of their rate in `hot_paths`
    /// (one more memory miss each), so it is off unless asked for.
    pub count_replays: bool,
}

/// A function called with each claim's answer (see [`Options::on_claim`]).
pub type ClaimHook = Arc<dyn Fn(&crate::types::ClaimEvent<'_>) + Send + Sync>;

impl Default for Options {
    fn default() -> Self {
        Options {
            default_ttl: Duration::from_secs(24 * 3600),
            default_lease: Duration::from_secs(30),
            durability: Durability::Sync,
            orphans: OrphanPolicy::TakeOver,
            max_key_len: 1024,
            max_outcome_len: 1 << 20,
            bucket_width: Duration::from_secs(3600),
            segment_bytes_max: 64 << 20,
            segment_bytes_initial: 256 << 10,
            batch_bytes_max: 4 << 20,
            seal_idle_after: Duration::from_secs(600),
            active_bytes_max: 16 << 20,
            max_open_files: 64,
            log_lanes: 0,
            max_disk_bytes: u64::MAX,
            file_access: FileAccess::Owner,
            clock: Arc::new(SystemClock),
            io: Arc::new(RealIo),
            key_hash: None,
            create_if_missing: true,
            background: true,
            on_claim: None,
            count_replays: false,
        }
    }
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("default_ttl", &self.default_ttl)
            .field("default_lease", &self.default_lease)
            .field("durability", &self.durability)
            .field("orphans", &self.orphans)
            .field("max_key_len", &self.max_key_len)
            .field("max_outcome_len", &self.max_outcome_len)
            .field("bucket_width", &self.bucket_width)
            .field("segment_bytes_max", &self.segment_bytes_max)
            .field("seal_idle_after", &self.seal_idle_after)
            .field("active_bytes_max", &self.active_bytes_max)
            .field("max_open_files", &self.max_open_files)
            .field("log_lanes", &self.log_lanes)
            .field("max_disk_bytes", &self.max_disk_bytes)
            .field("file_access", &self.file_access)
            .field("create_if_missing", &self.create_if_missing)
            .field("clock", &self.clock)
            .field("io", &self.io)
            .field("on_claim", &self.on_claim.as_ref().map(|_| "set"))
            .field("count_replays", &self.count_replays)
            .finish_non_exhaustive()
    }
}

/// Per-claim options; `None` fields take the store's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimOptions {
    /// How long the key is kept from this claim (at most [`TTL_MAX`]).
    pub ttl: Option<Duration>,
    /// How long this claim is held before another claim may take it over.
    pub lease: Option<Duration>,
    /// When the key is in flight, block up to this long for the holder to complete or give up
    /// (or for its lease or the key's window to end), instead of returning `InProgress` at
    /// once. A wait too long to fit a deadline on this machine's monotonic clock
    /// (`Duration::MAX`, say) has none: it lasts until one of those events.
    pub wait: Option<Duration>,
}
