//! A simulated disk for tests and fuzzing (feature `sim`): it keeps the bytes written and the
//! bytes synced apart, so a simulated power cut keeps only what was synced (optionally plus a
//! torn prefix of the unsynced writes), and it can fail fsync or run out of space on demand.
//!
//! File creations, renames and deletions become durable only with `sync_dir`, as on a real file
//! system; or, with [`SimDisk::names_durable_on_first_sync`], a new file's name also with its
//! first sync, as on ext4 (whose first fsync of a new file commits its directory entry too).
//! `sync_gradually` syncs a file in slices front to back ([`SimDisk::set_sync_slice_bytes`]), as
//! the real disk does, and a test can take a power cut between two slices
//! ([`SimDisk::between_sync_slices`]).
//!
//! Space is reserved through the same code as on the real disk (`fallocate`, then zeros), and
//! expired files are freed through the same steps (holes punched, then an unlink), so a disk
//! that refuses `fallocate` ([`SimDisk::refuse_fallocate`]) or punching holes
//! ([`SimDisk::refuse_punch_hole`]), as FUSE and some network file systems do, runs the store's
//! fallbacks; [`SimDisk::fallocate_calls`], [`SimDisk::punch_hole_calls`] and
//! [`SimDisk::zero_bytes_written`] show which calls were made.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::bytes::usize_from;
use crate::io::{DirLock, Fill, HoleCalls, Io, IoFile, LockOwner, SpaceCalls, checked_range};

#[derive(Default)]
struct FileState {
    /// What reads see: every write so far.
    live: Vec<u8>,
    /// What survives a power cut.
    durable: Vec<u8>,
    /// Writes since the last sync, in order: (offset, bytes).
    pending: Vec<(u64, Vec<u8>)>,
}

struct SimFile {
    state: Mutex<FileState>,
    disk: Arc<Faults>,
    writable: bool,
    /// The disk's names, so the first sync can make this file's name durable (see
    /// `SimDisk::names_durable_on_first_sync`); empty for files that never need it.
    names: std::sync::Weak<Mutex<DiskState>>,
    /// Set by the first successful sync.
    synced_once: AtomicBool,
    /// This file's reserves found `fallocate` refused (see `io::reserve_space`).
    no_fallocate: AtomicBool,
    /// Serializes reserves, as the real file's descriptor lock does: a reserve that started
    /// from a stale length must not write zeros over a record written meanwhile.
    reserving: Mutex<()>,
}

impl SimFile {
    /// A file holding `bytes`, all durable, whose name needs no first sync.
    fn durable(bytes: Vec<u8>, disk: Arc<Faults>) -> SimFile {
        SimFile {
            state: Mutex::new(FileState { live: bytes.clone(), durable: bytes, pending: Vec::new() }),
            disk,
            writable: true,
            names: std::sync::Weak::new(),
            synced_once: AtomicBool::new(true),
            no_fallocate: AtomicBool::new(false),
            reserving: Mutex::new(()),
        }
    }
}

/// Called between two slices of a gradual sync (see [`SimDisk::between_sync_slices`]).
pub type SliceHook = Arc<dyn Fn() + Send + Sync>;

/// Slice of a gradual sync unless a test sets another: what the real disk uses.
const DEFAULT_SYNC_SLICE_BYTES: u64 = 1 << 20;

#[derive(Default)]
struct Faults {
    sync_failure: Countdown,
    write_failure: Countdown,
    space_limit_bytes: AtomicU64,
    used_bytes: AtomicU64,
    syncs: AtomicU64,
    paged_reserves: AtomicU64,
    read_bytes: AtomicU64,
    read_hold: ReadHold,
    /// A new file's name becomes durable with its first sync (ext4), not only by `sync_dir`.
    names_on_first_sync: AtomicBool,
    /// Bytes per slice of `sync_gradually`; 0 means the default.
    sync_slice_bytes: AtomicU64,
    between_slices: Mutex<Option<SliceHook>>,
    /// Called at the start of every file sync (see [`SimDisk::before_each_sync`]).
    before_sync: Mutex<Option<SliceHook>>,
    /// `fallocate` fails with `EOPNOTSUPP`, as on FUSE.
    refuse_fallocate: AtomicBool,
    /// Punching holes fails with `EOPNOTSUPP`, as on FUSE.
    refuse_punch_hole: AtomicBool,
    /// Every file removal fails with EIO.
    fail_removes: AtomicBool,
    fallocate_calls: AtomicU64,
    punch_hole_calls: AtomicU64,
    zero_bytes_written: AtomicU64,
}

/// One read stopped half way (see [`SimDisk::hold_next_read`]): what else may happen while a
/// read is in flight is what a test of a race wants to see.
#[derive(Default)]
struct ReadHold {
    /// The next read is to be held; readable without the lock: every read of every simulated
    /// file checks it, and almost none is ever held.
    armed: AtomicBool,
    state: std::sync::Mutex<HoldState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct HoldState {
    inside: bool,
    removed_meanwhile: bool,
}

impl ReadHold {
    fn lock(&self) -> std::sync::MutexGuard<'_, HoldState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Called at the start of every read: the first read after `hold_next_read` waits here
    /// until `release_held_read`.
    fn pass(&self) {
        if !self.armed.load(Ordering::Relaxed) || !self.armed.swap(false, Ordering::AcqRel) {
            return;
        }
        let mut state = self.lock();
        state.inside = true;
        self.changed.notify_all();
        while state.inside {
            state = self.changed.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

#[derive(Default)]
struct DiskState {
    files: HashMap<PathBuf, Arc<SimFile>>,
    /// Names that survive a power cut (made durable by `sync_dir`), with their file.
    durable_names: HashMap<PathBuf, Arc<SimFile>>,
    dirs: HashSet<PathBuf>,
    locked: HashSet<PathBuf>,
    owners: HashMap<PathBuf, LockOwner>,
}

/// Pins the calling thread to the log's lane `lane` (modulo the store's `Options::log_lanes`)
/// from its next write on, in every store it writes to. A thread is otherwise given its lane
/// at its first write, in turn with other writing threads; a test that switches lanes between
/// operations on one thread writes a key's records through several lanes, in an order its
/// seed decides.
#[cfg(not(loom))]
pub fn pin_thread_lane(lane: usize) {
    crate::log::pin_writer_number(lane);
}

/// An in-memory disk with separate written and synced images; clone it to share it.
#[derive(Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<DiskState>>,
    faults: Arc<Faults>,
}

impl fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimDisk").field("files", &self.state.lock().files.len()).finish()
    }
}

/// A small deterministic generator, so a seed reproduces a power cut.
struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

impl SimDisk {
    /// An empty disk with unlimited space.
    pub fn new() -> Self {
        let disk = SimDisk::default();
        disk.faults.space_limit_bytes.store(u64::MAX, Ordering::SeqCst);
        disk
    }

    /// After `n` more successful syncs (file or directory), every sync fails with EIO.
    pub fn fail_sync_after(&self, n: u64) {
        self.faults.sync_failure.arm(n);
    }

    /// Syncs succeed again.
    pub fn heal_syncs(&self) {
        self.faults.sync_failure.disarm();
    }

    /// After `n` more successful writes into files, every write fails with EIO.
    pub fn fail_writes_after(&self, n: u64) {
        self.faults.write_failure.arm(n);
    }

    /// Writes succeed again.
    pub fn heal_writes(&self) {
        self.faults.write_failure.disarm();
    }

    /// Caps the bytes all files may reserve together; past it `reserve` fails with
    /// `StorageFull`. `u64::MAX` removes the cap.
    pub fn set_space_limit(&self, bytes: u64) {
        self.faults.space_limit_bytes.store(bytes, Ordering::SeqCst);
    }

    /// Bytes reserved by all files.
    pub fn used_bytes(&self) -> u64 {
        self.faults.used_bytes.load(Ordering::SeqCst)
    }

    /// Makes the next read of any file on this disk stop half way, until
    /// [`SimDisk::release_held_read`]; [`SimDisk::wait_for_held_read`] waits until it has.
    pub fn hold_next_read(&self) {
        let hold = &self.faults.read_hold;
        hold.lock().removed_meanwhile = false;
        hold.armed.store(true, Ordering::Release);
    }

    /// Waits until a read is held (see [`SimDisk::hold_next_read`]).
    pub fn wait_for_held_read(&self) {
        let hold = &self.faults.read_hold;
        let mut state = hold.lock();
        while !state.inside {
            state = hold.changed.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Lets the held read finish.
    pub fn release_held_read(&self) {
        let hold = &self.faults.read_hold;
        hold.lock().inside = false;
        hold.changed.notify_all();
    }

    /// True when a file was removed while a read was held: a real file system would have cut
    /// the file under that read (a mapped read past the cut faults the process).
    pub fn removed_during_held_read(&self) -> bool {
        self.faults.read_hold.lock().removed_meanwhile
    }

    /// Bytes read from files on this disk so far.
    pub fn read_bytes(&self) -> u64 {
        self.faults.read_bytes.load(Ordering::Relaxed)
    }

    /// Successful file and directory syncs so far.
    pub fn syncs(&self) -> u64 {
        self.faults.syncs.load(Ordering::SeqCst)
    }

    /// Calls to `IoFile::reserve_paged` so far (space the store asked to zero-fill a page per
    /// write; this disk keeps no page cache, so it reserves it like any other).
    pub fn paged_reserves(&self) -> u64 {
        self.faults.paged_reserves.load(Ordering::SeqCst)
    }

    /// The disk as a power cut at this instant would leave it: only synced bytes and synced
    /// directory entries survive. With `torn_seed`, each file also keeps a random prefix of its
    /// unsynced writes, the last of them cut at a random byte. Locks are dropped.
    pub fn power_cut(&self, torn_seed: Option<u64>) -> SimDisk {
        let state = self.state.lock();
        let mut rng = SplitMix(torn_seed.unwrap_or(0));
        let faults = Arc::new(Faults::default());
        faults.space_limit_bytes.store(self.faults.space_limit_bytes.load(Ordering::SeqCst), Ordering::SeqCst);
        faults.names_on_first_sync.store(self.faults.names_on_first_sync.load(Ordering::SeqCst), Ordering::SeqCst);
        faults.sync_slice_bytes.store(self.faults.sync_slice_bytes.load(Ordering::SeqCst), Ordering::SeqCst);
        // What the file system offers survives a power cut; counters start again.
        faults.refuse_fallocate.store(self.faults.refuse_fallocate.load(Ordering::SeqCst), Ordering::SeqCst);
        faults.refuse_punch_hole.store(self.faults.refuse_punch_hole.load(Ordering::SeqCst), Ordering::SeqCst);
        let mut files = HashMap::new();
        let mut names: Vec<_> = state.durable_names.iter().collect();
        names.sort_by(|a, b| a.0.cmp(b.0));
        for (path, file) in names {
            let old = file.state.lock();
            let mut bytes = old.durable.clone();
            if torn_seed.is_some() {
                let keep = usize_from(rng.below(old.pending.len() as u64 + 1));
                for (i, (offset, data)) in old.pending.iter().take(keep).enumerate() {
                    let cut = if i + 1 == keep { usize_from(rng.below(data.len() as u64 + 1)) } else { data.len() };
                    let start = usize_from(*offset);
                    let end = start + cut;
                    if bytes.len() < end {
                        bytes.resize(end, 0);
                    }
                    bytes[start..end].copy_from_slice(&data[..cut]);
                }
            }
            faults.used_bytes.fetch_add(bytes.len() as u64, Ordering::SeqCst);
            files.insert(path.clone(), Arc::new(SimFile::durable(bytes, faults.clone())));
        }
        let durable_names = files.clone();
        SimDisk {
            state: Arc::new(Mutex::new(DiskState {
                files,
                durable_names,
                dirs: state.dirs.clone(),
                locked: HashSet::new(),
                owners: HashMap::new(),
            })),
            faults,
        }
    }

    /// The live bytes of a file (for tests that damage or inspect files).
    pub fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
        self.state.lock().files.get(path).map(|f| f.state.lock().live.clone())
    }

    /// Replaces a file's live and durable bytes (for tests and fuzzing that damage files).
    pub fn write_file(&self, path: &Path, bytes: Vec<u8>) {
        let mut state = self.state.lock();
        let file = Arc::new(SimFile::durable(bytes, self.faults.clone()));
        if let Some(parent) = path.parent() {
            state.dirs.insert(parent.to_path_buf());
        }
        state.files.insert(path.to_path_buf(), file.clone());
        state.durable_names.insert(path.to_path_buf(), file);
    }

    /// Zeroes `len` bytes at `offset` of a file, written and synced alike: a block that reads
    /// back as zeros (lost by the device, or never written before a power cut). The range is
    /// cut at the file's end. `NotFound` when there is no such file.
    pub fn zero_range(&self, path: &Path, offset: u64, len: u64) -> io::Result<()> {
        let state = self.state.lock();
        let file = state.files.get(path).ok_or(io::ErrorKind::NotFound)?;
        let mut guard = file.state.lock();
        let file = &mut *guard;
        for bytes in [&mut file.live, &mut file.durable] {
            let end = usize_from(offset.saturating_add(len).min(bytes.len() as u64));
            let start = usize_from(offset).min(end);
            bytes[start..end].fill(0);
        }
        // A write not yet synced would bring the bytes back at a torn power cut: the block
        // stays zero whatever happens next, as it does on the device.
        let (zero_from, zero_to) = (offset, offset.saturating_add(len));
        for (at, bytes) in &mut file.pending {
            for (i, b) in bytes.iter_mut().enumerate() {
                let pos = *at + i as u64;
                if (zero_from..zero_to).contains(&pos) {
                    *b = 0;
                }
            }
        }
        Ok(())
    }

    /// With `on`, a newly created file's name becomes durable with the file's first sync (as
    /// on ext4, where the first fsync of a new file also commits its directory entry), not
    /// only by `sync_dir`: a power cut between that sync and a later one keeps the file under
    /// its name with whatever was synced so far. Kept by `power_cut` images.
    pub fn names_durable_on_first_sync(&self, on: bool) {
        self.faults.names_on_first_sync.store(on, Ordering::SeqCst);
    }

    /// Bytes per slice of `IoFile::sync_gradually` (1 MiB unless set, as on the real disk);
    /// small slices let a test cut a small file's gradual sync in the middle. Kept by
    /// `power_cut` images.
    pub fn set_sync_slice_bytes(&self, bytes: u64) {
        self.faults.sync_slice_bytes.store(bytes.max(1), Ordering::SeqCst);
    }

    /// Calls `hook` between every two slices of a gradual sync of any file on this disk (after
    /// a slice is durable, before the next is synced), e.g. to take a power cut there; `None`
    /// removes it. Not kept by `power_cut` images.
    pub fn between_sync_slices(&self, hook: Option<SliceHook>) {
        *self.faults.between_slices.lock() = hook;
    }

    /// Runs `hook` at the start of every file sync on this disk, on the syncing thread (to
    /// hold a sync while a test looks at what waits for it); `None` removes it. Not kept by
    /// `power_cut` images.
    pub fn before_each_sync(&self, hook: Option<SliceHook>) {
        *self.faults.before_sync.lock() = hook;
    }

    /// With `on`, `fallocate` fails with `EOPNOTSUPP`, as on FUSE and some network and
    /// overlay file systems: space is then reserved by writing zeros. Kept by `power_cut`
    /// images.
    pub fn refuse_fallocate(&self, on: bool) {
        self.faults.refuse_fallocate.store(on, Ordering::SeqCst);
    }

    /// With `on`, punching holes fails with `EOPNOTSUPP`, as on FUSE and some network file
    /// systems: an expired file is then unlinked whole. Kept by `power_cut` images.
    pub fn refuse_punch_hole(&self, on: bool) {
        self.faults.refuse_punch_hole.store(on, Ordering::SeqCst);
    }

    /// With `on`, every file removal (unlink) fails with EIO and leaves the file in place.
    pub fn fail_removes(&self, on: bool) {
        self.faults.fail_removes.store(on, Ordering::SeqCst);
    }

    /// `fallocate` calls made so far, refused ones included.
    pub fn fallocate_calls(&self) -> u64 {
        self.faults.fallocate_calls.load(Ordering::SeqCst)
    }

    /// Hole-punching calls made so far, refused ones included.
    pub fn punch_hole_calls(&self) -> u64 {
        self.faults.punch_hole_calls.load(Ordering::SeqCst)
    }

    /// Zero bytes written so far to reserve space (by zero-fill after `fallocate`, or instead
    /// of it where it is refused).
    pub fn zero_bytes_written(&self) -> u64 {
        self.faults.zero_bytes_written.load(Ordering::SeqCst)
    }

    /// Paths of all live files, sorted.
    pub fn file_paths(&self) -> Vec<PathBuf> {
        let mut paths: Vec<_> = self.state.lock().files.keys().cloned().collect();
        paths.sort();
        paths
    }
}

impl Faults {
    fn sync_allowed(&self) -> io::Result<()> {
        if !self.sync_failure.allow() {
            return Err(io::Error::other("simulated fsync failure (EIO)"));
        }
        self.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn write_allowed(&self) -> io::Result<()> {
        if !self.write_failure.allow() {
            return Err(io::Error::other("simulated write failure (EIO)"));
        }
        Ok(())
    }
}

/// Lets `n` more operations succeed once armed, then fails every later one until disarmed.
#[derive(Default)]
struct Countdown {
    armed: AtomicBool,
    left: AtomicU64,
}

impl Countdown {
    fn arm(&self, n: u64) {
        self.left.store(n, Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }

    fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
    }

    /// True when the operation may go ahead (and counts it).
    fn allow(&self) -> bool {
        !self.armed.load(Ordering::SeqCst)
            || self.left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }
}

struct SimLock {
    state: Arc<Mutex<DiskState>>,
    dir: PathBuf,
}
impl DirLock for SimLock {
    fn set_owner(&self, owner: LockOwner) -> io::Result<()> {
        self.state.lock().owners.insert(self.dir.clone(), owner);
        Ok(())
    }
}
impl Drop for SimLock {
    fn drop(&mut self) {
        let mut state = self.state.lock();
        state.locked.remove(&self.dir);
        state.owners.remove(&self.dir);
    }
}

impl Io for SimDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.state.lock().dirs.insert(dir.to_path_buf());
        Ok(())
    }

    fn lock_dir(&self, dir: &Path) -> io::Result<Box<dyn DirLock>> {
        let mut state = self.state.lock();
        if !state.locked.insert(dir.to_path_buf()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(Box::new(SimLock { state: self.state.clone(), dir: dir.to_path_buf() }))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = self.state.lock();
        if !state.dirs.contains(dir) {
            return Err(io::ErrorKind::NotFound.into());
        }
        Ok(state
            .files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
            .collect())
    }

    fn create(&self, path: &Path, _capacity: u64) -> io::Result<Box<dyn IoFile>> {
        let mut state = self.state.lock();
        if state.files.contains_key(path) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        let file = Arc::new(SimFile {
            state: Mutex::new(FileState::default()),
            disk: self.faults.clone(),
            writable: true,
            names: Arc::downgrade(&self.state),
            synced_once: AtomicBool::new(false),
            no_fallocate: AtomicBool::new(false),
            reserving: Mutex::new(()),
        });
        state.files.insert(path.to_path_buf(), file.clone());
        Ok(Box::new(SimHandle(file)))
    }

    fn open(&self, path: &Path, _capacity: u64, writable: bool) -> io::Result<Box<dyn IoFile>> {
        let state = self.state.lock();
        let file = state.files.get(path).ok_or(io::ErrorKind::NotFound)?;
        if writable {
            Ok(Box::new(SimHandle(file.clone())))
        } else {
            let snapshot = file.state.lock().live.clone();
            let copy = SimFile { writable: false, ..SimFile::durable(snapshot, Arc::new(Faults::default())) };
            Ok(Box::new(SimHandle(Arc::new(copy))))
        }
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        if self.faults.fail_removes.load(Ordering::SeqCst) {
            return Err(io::Error::other("simulated unlink failure (EIO)"));
        }
        {
            let mut hold = self.faults.read_hold.lock();
            hold.removed_meanwhile |= hold.inside;
        }
        let mut state = self.state.lock();
        let file = state.files.remove(path).ok_or(io::ErrorKind::NotFound)?;
        let len = file.state.lock().live.len() as u64;
        self.faults.used_bytes.fetch_sub(len.min(self.faults.used_bytes.load(Ordering::SeqCst)), Ordering::SeqCst);
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        let file = state.files.remove(from).ok_or(io::ErrorKind::NotFound)?;
        if let Some(replaced) = state.files.insert(to.to_path_buf(), file) {
            let len = replaced.state.lock().live.len() as u64;
            self.faults.used_bytes.fetch_sub(len.min(self.faults.used_bytes.load(Ordering::SeqCst)), Ordering::SeqCst);
        }
        // Durable with the next `sync_dir` (both names).
        Ok(())
    }

    fn lock_owner(&self, dir: &Path) -> Option<LockOwner> {
        self.state.lock().owners.get(dir).copied()
    }

    fn remove_gradually(&self, path: &Path) -> io::Result<()> {
        // The real disk's steps (see `io::free_gradually`), then the unlink.
        let file = self.state.lock().files.get(path).cloned();
        if let Some(file) = file {
            let len = file.state.lock().live.len() as u64;
            crate::io::free_gradually(&SimHandle(file), len);
        }
        self.remove(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.faults.sync_allowed()?;
        let mut state = self.state.lock();
        state.durable_names.retain(|p, _| p.parent() != Some(dir));
        let entries: Vec<_> =
            state.files.iter().filter(|(p, _)| p.parent() == Some(dir)).map(|(p, f)| (p.clone(), f.clone())).collect();
        state.durable_names.extend(entries);
        Ok(())
    }
}

struct SimHandle(Arc<SimFile>);

impl IoFile for SimHandle {
    fn len(&self) -> u64 {
        self.0.state.lock().live.len() as u64
    }

    fn reserve(&self, len: u64) -> io::Result<()> {
        self.reserve_with(len, Fill::Bulk)
    }

    fn reserve_paged(&self, len: u64) -> io::Result<()> {
        self.0.disk.paged_reserves.fetch_add(1, Ordering::SeqCst);
        self.reserve_with(len, Fill::Paged)
    }

    fn reserve_unfilled(&self, len: u64) -> io::Result<()> {
        self.reserve_with(len, Fill::Unfilled)
    }

    fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        if !self.0.writable {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "file is read-only"));
        }
        self.0.disk.write_allowed()?;
        let mut state = self.0.state.lock();
        let (start, end) = checked_range(offset, bytes.len(), state.live.len() as u64)?;
        state.live[start..end].copy_from_slice(bytes);
        state.pending.push((offset, bytes.to_vec()));
        Ok(())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.disk.read_hold.pass();
        self.0.disk.read_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        let state = self.0.state.lock();
        let (start, end) = checked_range(offset, buf.len(), state.live.len() as u64)?;
        buf.copy_from_slice(&state.live[start..end]);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_range(0, u64::MAX)
    }

    fn sync_gradually(&self) -> io::Result<()> {
        let slice = match self.0.disk.sync_slice_bytes.load(Ordering::SeqCst) {
            0 => DEFAULT_SYNC_SLICE_BYTES,
            n => n,
        };
        let len = self.len();
        let mut at = 0u64;
        loop {
            let end = at.saturating_add(slice);
            self.sync_range(at, end)?;
            if end >= len {
                return Ok(());
            }
            at = end;
            // Taken out first: the hook may take a power cut, which locks the disk and files.
            let hook = self.0.disk.between_slices.lock().clone();
            if let Some(hook) = hook {
                hook();
            }
        }
    }
}

impl SimHandle {
    /// `reserve`, `reserve_paged`, `reserve_unfilled`: through the real disk's code.
    fn reserve_with(&self, len: u64, fill: Fill) -> io::Result<()> {
        let _serial = self.0.reserving.lock();
        let old = self.len();
        if len <= old {
            return Ok(());
        }
        if !self.0.writable {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "file is read-only"));
        }
        crate::io::reserve_space(self, &self.0.no_fallocate, old, len, fill)
    }

    /// Grows the live bytes to `len` (zeros), within the disk's space limit.
    fn grow(&self, state: &mut FileState, len: u64) -> io::Result<()> {
        let old = state.live.len() as u64;
        if len <= old {
            return Ok(());
        }
        let faults = &self.0.disk;
        let grow = len - old;
        let used = faults.used_bytes.load(Ordering::SeqCst);
        if used.saturating_add(grow) > faults.space_limit_bytes.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::StorageFull, "simulated disk full"));
        }
        faults.used_bytes.fetch_add(grow, Ordering::SeqCst);
        state.live.resize(usize_from(len), 0);
        Ok(())
    }

    /// Makes the file's length and its writes within `from..to` durable, as an fdatasync of
    /// that range does (the length goes with the first range: the data needs it to be read).
    /// Ranges are synced front to back: a write wholly before `to` is then done with.
    fn sync_range(&self, from: u64, to: u64) -> io::Result<()> {
        let hook = self.0.disk.before_sync.lock().clone();
        if let Some(hook) = hook {
            hook();
        }
        self.0.disk.sync_allowed()?;
        {
            let mut guard = self.0.state.lock();
            let state = &mut *guard;
            let len = state.live.len();
            state.durable.resize(len, 0);
            let (from, to) = (usize_from(from.min(len as u64)), usize_from(to.min(len as u64)));
            for (offset, bytes) in &state.pending {
                let start = usize_from(*offset).clamp(from, to);
                let end = (usize_from(*offset) + bytes.len()).clamp(from, to);
                state.durable[start..end].copy_from_slice(&state.live[start..end]);
            }
            state.pending.retain(|(offset, bytes)| usize_from(*offset) + bytes.len() > to);
        }
        if self.0.disk.names_on_first_sync.load(Ordering::SeqCst) && !self.0.synced_once.swap(true, Ordering::SeqCst) {
            // Taken after the file's lock is let go: `power_cut` takes the disk, then files.
            if let Some(names) = self.0.names.upgrade() {
                let mut names = names.lock();
                let mine: Vec<PathBuf> =
                    names.files.iter().filter(|(_, f)| Arc::ptr_eq(f, &self.0)).map(|(p, _)| p.clone()).collect();
                for path in mine {
                    names.durable_names.insert(path, self.0.clone());
                }
            }
        }
        Ok(())
    }
}

impl SpaceCalls for SimHandle {
    fn allocate(&self, len: u64) -> io::Result<()> {
        let faults = &self.0.disk;
        faults.fallocate_calls.fetch_add(1, Ordering::SeqCst);
        if faults.refuse_fallocate.load(Ordering::SeqCst) {
            return Err(crate::io::not_supported());
        }
        self.grow(&mut self.0.state.lock(), len)
    }

    /// Not held to `fail_writes_after`, which counts the writes of data (headers, records,
    /// tables) that tests aim their failures at.
    fn write_zeros(&self, at: u64, zeros: &[u8]) -> io::Result<()> {
        let mut state = self.0.state.lock();
        let end = at.checked_add(zeros.len() as u64).ok_or_else(crate::io::out_of_range)?;
        self.grow(&mut state, end)?;
        state.live[usize_from(at)..usize_from(end)].fill(0);
        self.0.disk.zero_bytes_written.fetch_add(zeros.len() as u64, Ordering::SeqCst);
        Ok(())
    }
}

impl HoleCalls for SimHandle {
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let faults = &self.0.disk;
        faults.punch_hole_calls.fetch_add(1, Ordering::SeqCst);
        if faults.refuse_punch_hole.load(Ordering::SeqCst) {
            return Err(crate::io::not_supported());
        }
        let mut guard = self.0.state.lock();
        let state = &mut *guard;
        for bytes in [&mut state.live, &mut state.durable] {
            let end = usize_from(offset.saturating_add(len).min(bytes.len() as u64));
            let start = usize_from(offset).min(end);
            bytes[start..end].fill(0);
        }
        Ok(())
    }
}
