//! The I/O seam. The store touches the disk only through `Io` and `IoFile`, so tests and fuzz
//! targets can swap the real disk ([`RealIo`]) for a simulated one that tears writes, loses
//! unsynced bytes, fails fsync and runs out of space (`SimDisk`, feature `sim`).
//!
//! Real segment files are preallocated with `fallocate` and accessed through a shared memory
//! map: a write is a `memcpy` into the page cache (it survives a process crash at once) and a
//! sync is `fdatasync`. Space is always reserved before it is written, so a full disk shows up
//! as an error from `reserve`, never as SIGBUS.
//!
//! Any POSIX file system will do: where `fallocate` is refused (FUSE, some network and overlay
//! file systems) space is reserved by writing zeros for real ([`reserve_space`]), and where
//! punching holes is refused an expired file is unlinked whole ([`free_gradually`]). Both
//! decisions are made here, over the calls of [`SpaceCalls`] and [`HoleCalls`], so the real
//! disk and the simulated one (which can refuse both calls) run the same code.

pub(crate) mod permissions;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub(crate) mod sys;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use crate::bytes::usize_from;
use crate::io::permissions::FileAccess;

/// Name of the lock file in a store directory.
pub const LOCK_FILE_NAME: &str = "LOCK";

/// A guard that holds a directory lock until dropped.
pub trait DirLock: Send + Sync {
    /// Records who holds the lock (the writer's incarnation), for read-only viewers.
    fn set_owner(&self, owner: LockOwner) -> io::Result<()>;
}

/// Who holds a store's lock: the writer's incarnation and process id, written into the `LOCK`
/// file (layout: ARCHITECTURE.md, "On disk", "LOCK").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockOwner {
    /// The writer's incarnation (the one its claims record).
    pub incarnation: u64,
    /// The writer's process id.
    pub pid: u32,
}

impl LockOwner {
    fn encode(self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[0..8].copy_from_slice(&self.incarnation.to_le_bytes());
        b[8..12].copy_from_slice(&self.pid.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<LockOwner> {
        let b: &[u8; 12] = b.get(..12)?.try_into().ok()?;
        Some(LockOwner { incarnation: crate::bytes::u64_at(b, 0), pid: crate::bytes::u32_at(b, 8) })
    }
}

/// Directory-level operations.
pub trait Io: Send + Sync + fmt::Debug {
    /// Creates the directory (and parents) if missing.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Takes the exclusive lock of the store in `dir`; `WouldBlock` when someone else holds it.
    fn lock_dir(&self, dir: &Path) -> io::Result<Box<dyn DirLock>>;
    /// Names of the files in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Creates a new file (failing if it exists) whose mapping can grow to `capacity` bytes.
    fn create(&self, path: &Path, capacity: u64) -> io::Result<Box<dyn IoFile>>;
    /// Opens an existing file; `writable` false maps it read-only and never changes it.
    fn open(&self, path: &Path, capacity: u64, writable: bool) -> io::Result<Box<dyn IoFile>>;
    /// Deletes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Renames a file, replacing any file at `to` (both in the same directory); durable with
    /// the next `sync_dir`. Lets a file be written whole under a temporary name and appear
    /// under its real one only once it is complete.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes creations, renames and deletions in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Deletes a large file without one long stall: gives its blocks and cached pages back a
    /// few MiB at a time, then unlinks it. (Plain `remove` by default.)
    fn remove_gradually(&self, path: &Path) -> io::Result<()> {
        self.remove(path)
    }
    /// The owner of the store's lock when a live writer holds it, without taking the lock.
    /// `None` when unknown (then a read-only view shows every in-flight claim as orphaned).
    fn lock_owner(&self, _dir: &Path) -> Option<LockOwner> {
        None
    }
    /// This disk, creating directories (`create_dir_all`) and files (`create`, and the lock
    /// file) with exactly the modes of `access` (see [`FileAccess`]). `None` when it keeps no
    /// modes, or when it already creates with these (the default): the store then uses it as
    /// it is. `Store::open` asks this once, so every file it creates, now or in a later version,
    /// gets the mode through `create` without each caller passing it.
    fn with_access(&self, _access: FileAccess) -> Option<Arc<dyn Io>> {
        None
    }
    /// The permission bits (`st_mode & 0o7777`) of `path`; `None` when this disk keeps no modes
    /// (the default). `Store::open` checks the store directory's with it.
    fn mode(&self, _path: &Path) -> io::Result<Option<u32>> {
        Ok(None)
    }
}

/// One file, read and written at offsets.
pub trait IoFile: Send + Sync {
    /// Bytes that may be read and written: the reserved (allocated) length.
    fn len(&self) -> u64;
    /// True when nothing is reserved.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Grows the reserved length to at least `len` with zeroed, allocated space.
    fn reserve(&self, len: u64) -> io::Result<()>;
    /// Like `reserve`, for a file synced after every few records (`Durability::Sync`): the
    /// zeros go one page per write call. The page cache sizes a folio by the write that
    /// creates it (ext4 with large folios, Linux 6.x), and a store through a shared map marks
    /// its whole folio dirty, so after bulk zero-fill every sync wrote back the whole folio:
    /// 64 KiB for a 150 B record, measured here, against 4 KiB after paged zero-fill. Bulk
    /// stays the default because paged zero-fill costs more calls (new-key claims under
    /// `None` ran ~10 % slower with it), and without a sync after each record the folios
    /// fill before they are written back anyway.
    fn reserve_paged(&self, len: u64) -> io::Result<()> {
        self.reserve(len)
    }
    /// Like `reserve`, without writing zeros over the new space: it is allocated (writes
    /// into it never fail for lack of space) but left as unwritten extents, so the first sync
    /// after writing into it also commits their conversion. For files written whole and then
    /// synced once (sealed tables), where zeros would only be overwritten.
    fn reserve_unfilled(&self, len: u64) -> io::Result<()> {
        self.reserve(len)
    }
    /// Writes `bytes` at `offset`; the range must lie within `len()`.
    fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// Lets `fill` write `len` bytes at `offset` in place (the range must lie within `len()`).
    /// By default through a buffer and `write_at`; a mapped file hands out the mapped bytes.
    fn write_with(&self, offset: u64, len: usize, fill: &mut dyn FnMut(&mut [u8])) -> io::Result<()> {
        let mut buf = vec![0u8; len];
        fill(&mut buf);
        self.write_at(offset, &buf)
    }
    /// Starts loading the bytes at `offset` into the CPU cache, when the file is mapped (a hint:
    /// does nothing otherwise, or when `offset` lies past `len()`).
    fn prefetch(&self, _offset: u64) {}
    /// Reads `buf.len()` bytes at `offset`; the range must lie within `len()`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Reads as much of `buf.len()` bytes at `offset` as lies within `len()`; returns how
    /// many. Lets a reader take a record whose length it does not know yet in one call.
    fn read_prefix(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let n = prefix_len(offset, buf.len(), self.len());
        if n > 0 {
            self.read_at(offset, &mut buf[..n])?;
        }
        Ok(n)
    }
    /// Makes every write so far durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// Like `sync`, for background work on a large file: writes back a slice at a time with
    /// rests between (see `pace`), so no claim thread waits on one long sync for its CPU.
    fn sync_gradually(&self) -> io::Result<()> {
        self.sync()
    }
    /// Closes the file descriptor of a file that will not grow again; reads, writes within
    /// the reserved length and syncs keep working through the memory map. Bounds the number
    /// of open descriptors however many files are live.
    fn release_descriptor(&self) {}
    /// Drops the memory-mapped pages of a file, in small steps: before it is deleted, so the
    /// final unmap is quick and never holds up page faults of other threads for long; and
    /// before a file that takes no more writes is synced, so writeback finds no page mapped
    /// writable (a later read maps its page again).
    fn release_pages(&self) {}
}

pub(crate) fn out_of_range() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "access past the reserved length of a file")
}

/// True when `e`, from `fallocate`, says the file system does not offer the call or the mode
/// asked (FUSE without it: `EOPNOTSUPP`; `ENOSYS` from very old kernels; `EINVAL` where the
/// mode is refused, since the offsets given are always valid), rather than a real failure
/// such as a full disk.
pub(crate) fn refused_by_file_system(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL))
}

/// The error a file system that does not offer a call gives (`EOPNOTSUPP`); the simulated
/// disk's refusals.
#[cfg(any(test, feature = "sim"))]
pub(crate) fn not_supported() -> io::Error {
    io::Error::from_raw_os_error(libc::EOPNOTSUPP)
}

/// The calls [`reserve_space`] makes of a file.
pub(crate) trait SpaceCalls {
    /// `fallocate(fd, 0, 0, len)`: allocates `0..len`, growing the file to `len`.
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// Writes `zeros` at `at` (growing the file when `at` reaches past its end).
    fn write_zeros(&self, at: u64, zeros: &[u8]) -> io::Result<()>;
}

/// How [`reserve_space`] covers new space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fill {
    /// Allocated only (unwritten extents).
    Unfilled,
    /// Zeros in large write calls.
    Bulk,
    /// Zeros one page per write call.
    Paged,
}

/// Grows a file whose reserved length is `from` to `len`, allocated and reading as zeros:
/// `fallocate`, then zeros written for real as `fill` says. Where the file system refuses
/// `fallocate` (see [`refused_by_file_system`]) the zeros alone reserve the space, whatever
/// `fill` says: every block is then allocated by a write that could fail, so a full disk is an
/// error here and never SIGBUS at a later store through the map into a block that was never
/// allocated (as it would be after a mere `set_len`, which leaves a sparse file). The zeros
/// are written from `from` onwards, past the file's end, so they grow the file as they go: a
/// write that fails half way leaves the file longer only by zeros that are allocated.
/// `no_fallocate` remembers the refusal, so the call is not tried again for this file.
pub(crate) fn reserve_space(
    calls: &dyn SpaceCalls,
    no_fallocate: &AtomicBool,
    from: u64,
    len: u64,
    fill: Fill,
) -> io::Result<()> {
    let allocated = !no_fallocate.load(Ordering::Relaxed)
        && match calls.allocate(len) {
            Ok(()) => true,
            Err(e) if refused_by_file_system(&e) => {
                no_fallocate.store(true, Ordering::Relaxed);
                false
            }
            Err(e) => return Err(e),
        };
    // Where fallocate ran, the zeros are still written for real: it leaves "unwritten"
    // extents, and the first fdatasync after writing into one must also commit the extent
    // conversion. Zeroed blocks make later syncs pure data writes (measured here: ~130 us
    // instead of ~200 us). The size of each write call sets the size of the page-cache folios
    // (`IoFile::reserve_paged`).
    static ZEROS: [u8; 64 << 10] = [0u8; 64 << 10];
    let write_max = match fill {
        Fill::Unfilled if allocated => 0,
        Fill::Unfilled | Fill::Bulk => ZEROS.len(),
        Fill::Paged => page_bytes().min(ZEROS.len()),
    } as u64;
    let mut at = from;
    while write_max > 0 && at < len {
        // Aligned, so each call covers whole pages (or whole 64 KiB runs) of its own.
        let n = usize_from((len - at).min(write_max - at % write_max));
        calls.write_zeros(at, &ZEROS[..n])?;
        at += n as u64;
    }
    Ok(())
}

/// The call [`free_gradually`] makes of a file.
pub(crate) trait HoleCalls {
    /// `fallocate(fd, PUNCH_HOLE | KEEP_SIZE, offset, len)`: frees the blocks of the range and
    /// drops their cached pages, keeping the file's length; the range reads back as zeros.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// Bytes freed per step by [`free_gradually`]: ~0.5 ms of work per MiB measured here.
pub(crate) const FREE_STEP: u64 = 256 << 10;

/// Gives the blocks of a file of `len` bytes about to be unlinked back a step at a time from
/// its end, resting between steps (see `pace`), so no claim thread waits on one long free.
/// The file's length is kept, never cut: a read-only viewer in another process may still map
/// the file, and a mapped read past a cut would fault that process (SIGBUS), where a hole
/// reads as zeros, which the record checksums refuse.
///
/// Where punching holes is refused (FUSE, some network file systems) this stops at the first
/// refusal and leaves the file whole for the caller to unlink, with no fallback to cutting:
/// an unlinked file's inode and blocks live on until the last map of it goes, so a viewer
/// keeps reading the old bytes, which is harmless (the bucket has ended, and readers skip
/// ended buckets without reading them), and the space comes back once every viewer has let
/// the file go. The price is that the unlink frees all the blocks in one step. Any other
/// error ends the steps the same way: the unlink still frees the space.
pub(crate) fn free_gradually(calls: &dyn HoleCalls, mut len: u64) {
    while len > FREE_STEP {
        len -= FREE_STEP;
        if calls.punch_hole(len, FREE_STEP).is_err() {
            return;
        }
        crate::pace::breathe();
    }
}

impl HoleCalls for File {
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        sys::punch_hole(self.as_fd(), offset, len)
    }
}

impl SpaceCalls for File {
    fn allocate(&self, len: u64) -> io::Result<()> {
        sys::allocate(self.as_fd(), len)
    }

    fn write_zeros(&self, at: u64, zeros: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, zeros, at)
    }
}

/// How many of `len` bytes at `offset` lie within `limit` (0 when `offset` is past it).
fn prefix_len(offset: u64, len: usize, limit: u64) -> usize {
    usize::try_from(limit.saturating_sub(offset)).map_or(len, |within| within.min(len))
}

/// Checks that `offset..offset+len` lies within `limit`; returns the range as usizes.
pub(crate) fn checked_range(offset: u64, len: usize, limit: u64) -> io::Result<(usize, usize)> {
    let end = offset.checked_add(len as u64).ok_or_else(out_of_range)?;
    if end > limit {
        return Err(out_of_range());
    }
    Ok((usize_from(offset), usize_from(end)))
}

/// The operating system's file system. Creates directories 0700 and files 0600 exactly,
/// whatever the umask; [`Io::with_access`] gives the same disk with another [`FileAccess`].
#[derive(Debug, Default, Clone, Copy)]
pub struct RealIo;

/// The real file system creating with the modes of a `FileAccess` other than the default one
/// (`RealIo` is kept a unit struct: callers and tests name it as a value).
#[derive(Debug, Clone, Copy)]
struct RealIoWith(FileAccess);

/// Creates `dir` with exactly `mode` when it is missing; an existing directory keeps its mode
/// (see `permissions`). Missing parents are created with `mode` too, narrowed by the umask:
/// they only lead to the store, and are not the store's to widen.
fn create_dir_with_mode(dir: &Path, mode: u32) -> io::Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty() && !p.is_dir()) {
        fs::DirBuilder::new().recursive(true).mode(mode).create(parent)?;
    }
    match fs::DirBuilder::new().mode(mode).create(dir) {
        // The umask may have taken bits off (or, under umask 0, left them as asked): set exactly.
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(mode)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Sets exactly `mode` on a file this process has just created (through its descriptor,
/// `fchmod`: no other file can be swapped in under the name meanwhile).
fn set_created_mode(file: &File, mode: u32) -> io::Result<()> {
    file.set_permissions(fs::Permissions::from_mode(mode))
}

fn lock_dir_with_mode(dir: &Path, mode: u32) -> io::Result<Box<dyn DirLock>> {
    let path = dir.join(LOCK_FILE_NAME);
    // Created with the store's mode when missing; an existing lock file keeps its own (the
    // store changes no mode it did not create).
    let file = match OpenOptions::new().read(true).write(true).create_new(true).mode(mode).open(&path) {
        Ok(file) => {
            set_created_mode(&file, mode)?;
            file
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => OpenOptions::new().read(true).write(true).open(&path)?,
        Err(e) => return Err(e),
    };
    match file.try_lock() {
        Ok(()) => Ok(Box::new(FileLock(file))),
        Err(fs::TryLockError::WouldBlock) => Err(io::ErrorKind::WouldBlock.into()),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

fn create_with_mode(path: &Path, capacity: u64, mode: u32) -> io::Result<Box<dyn IoFile>> {
    let file = OpenOptions::new().read(true).write(true).create_new(true).mode(mode).open(path)?;
    match set_created_mode(&file, mode).and_then(|()| MappedFile::new(file, capacity, true)) {
        Ok(mapped) => Ok(Box::new(mapped)),
        Err(e) => {
            // The file is ours (`create_new`): left behind, every later creation of the same
            // name would fail with `AlreadyExists`. Its removal is best effort; the map's
            // error (ENOMEM once `vm.max_map_count` is reached, say) is what the caller needs.
            let _ = fs::remove_file(path);
            Err(e)
        }
    }
}

/// The real file system creating with the modes of `access`.
fn real_io_with(access: FileAccess) -> Arc<dyn Io> {
    match access {
        FileAccess::Owner => Arc::new(RealIo),
        other => Arc::new(RealIoWith(other)),
    }
}

fn mode_of(path: &Path) -> io::Result<Option<u32>> {
    Ok(Some(fs::metadata(path)?.permissions().mode() & 0o7777))
}

impl Io for RealIoWith {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        create_dir_with_mode(dir, self.0.dir_mode())
    }
    fn lock_dir(&self, dir: &Path) -> io::Result<Box<dyn DirLock>> {
        lock_dir_with_mode(dir, self.0.file_mode())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        RealIo.list(dir)
    }
    fn create(&self, path: &Path, capacity: u64) -> io::Result<Box<dyn IoFile>> {
        create_with_mode(path, capacity, self.0.file_mode())
    }
    fn open(&self, path: &Path, capacity: u64, writable: bool) -> io::Result<Box<dyn IoFile>> {
        RealIo.open(path, capacity, writable)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        RealIo.remove(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        RealIo.rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        RealIo.sync_dir(dir)
    }
    fn remove_gradually(&self, path: &Path) -> io::Result<()> {
        RealIo.remove_gradually(path)
    }
    fn lock_owner(&self, dir: &Path) -> Option<LockOwner> {
        RealIo.lock_owner(dir)
    }
    fn with_access(&self, access: FileAccess) -> Option<Arc<dyn Io>> {
        (access != self.0).then(|| real_io_with(access))
    }
    fn mode(&self, path: &Path) -> io::Result<Option<u32>> {
        mode_of(path)
    }
}

struct FileLock(File);
impl Drop for FileLock {
    fn drop(&mut self) {
        // No owner once the lock is let go: a viewer must not take a closed store's claims for
        // a live writer's. (A crashed writer leaves its owner behind, with a dead pid.)
        let _ = self.0.set_len(0);
    }
}
impl DirLock for FileLock {
    fn set_owner(&self, owner: LockOwner) -> io::Result<()> {
        self.0.set_len(0)?;
        std::os::unix::fs::FileExt::write_all_at(&self.0, &owner.encode(), 0)
    }
}

impl Io for RealIo {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        create_dir_with_mode(dir, FileAccess::Owner.dir_mode())
    }

    fn lock_dir(&self, dir: &Path) -> io::Result<Box<dyn DirLock>> {
        lock_dir_with_mode(dir, FileAccess::Owner.file_mode())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            if let Some(name) = entry?.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    fn create(&self, path: &Path, capacity: u64) -> io::Result<Box<dyn IoFile>> {
        create_with_mode(path, capacity, FileAccess::Owner.file_mode())
    }

    fn open(&self, path: &Path, capacity: u64, writable: bool) -> io::Result<Box<dyn IoFile>> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        Ok(Box::new(MappedFile::new(file, capacity, writable)?))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn remove_gradually(&self, path: &Path) -> io::Result<()> {
        // Holes punched step by step, never a cut; unlinked whole where holes are refused (see
        // `free_gradually` for why a viewer mapping the file is safe either way).
        if let Ok(file) = OpenOptions::new().write(true).open(path) {
            free_gradually(&file, file.metadata()?.len());
        }
        fs::remove_file(path)
    }

    fn lock_owner(&self, dir: &Path) -> Option<LockOwner> {
        let owner = LockOwner::decode(&fs::read(dir.join(LOCK_FILE_NAME)).ok()?)?;
        // Probing the lock itself would take it for a moment and could make a writer that
        // opens at that instant fail with `Locked`; a live process id is asked instead.
        let pid = libc::pid_t::try_from(owner.pid).ok()?;
        sys::process_exists(pid).then_some(owner)
    }

    fn with_access(&self, access: FileAccess) -> Option<Arc<dyn Io>> {
        (access != FileAccess::Owner).then(|| real_io_with(access))
    }

    fn mode(&self, path: &Path) -> io::Result<Option<u32>> {
        mode_of(path)
    }
}

/// Bytes of one memory page: the write size of paged zero-fill (`IoFile::reserve_paged`).
fn page_bytes() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| sys::page_size().unwrap_or(4096))
}

/// A file mapped shared into memory over its whole capacity. Only the first `len` bytes are
/// backed by the file; nothing past them is ever touched, so no access can raise SIGBUS.
struct MappedFile {
    /// Present while the file may grow; syncs go through the map once it is released.
    file: parking_lot::Mutex<Option<File>>,
    map: MmapRaw,
    capacity: u64,
    len: AtomicU64,
    writable: bool,
    /// The file system refused `fallocate` for this file: space is reserved with zeros alone
    /// from then on (see [`reserve_space`]).
    no_fallocate: AtomicBool,
}

impl MappedFile {
    fn new(file: File, capacity: u64, writable: bool) -> io::Result<Self> {
        let len = file.metadata()?.len();
        let capacity = capacity.max(len).max(1);
        let map_len = usize::try_from(capacity).map_err(|_| out_of_range())?;
        let mut options = MmapOptions::new();
        options.len(map_len);
        let map = if writable { options.map_raw(&file)? } else { options.map_raw_read_only(&file)? };
        Ok(MappedFile {
            file: parking_lot::Mutex::new(Some(file)),
            map,
            capacity,
            len: AtomicU64::new(len),
            writable,
            no_fallocate: AtomicBool::new(false),
        })
    }
}

impl MappedFile {
    /// Calls `step` on the file's reserved length 1 MiB at a time, resting between slices
    /// (background work, see `pace`); stops at the first error.
    fn in_slices(&self, mut step: impl FnMut(usize, usize) -> io::Result<()>) -> io::Result<()> {
        const STEP: usize = 1 << 20;
        let len = usize::try_from(self.len()).map_err(|_| out_of_range())?;
        let mut at = 0;
        while at < len {
            let n = STEP.min(len - at);
            step(at, n)?;
            at += n;
            crate::pace::breathe();
        }
        Ok(())
    }

    /// `reserve`, `reserve_paged` and `reserve_unfilled`: space reserved (see
    /// [`reserve_space`]), then the new pages mapped.
    fn reserve_space(&self, len: u64, fill: Fill) -> io::Result<()> {
        if len <= self.len() {
            return Ok(());
        }
        if len > self.capacity || !self.writable {
            return Err(out_of_range());
        }
        let guard = self.file.lock();
        if len <= self.len() {
            // Grown meanwhile (growth ahead of need races the append that needs it).
            return Ok(());
        }
        let Some(file) = guard.as_ref() else {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "file descriptor already released"));
        };
        reserve_space(file, &self.no_fallocate, self.len(), len, fill)?;
        // Map the new pages now (best effort; Linux 5.14+), so appends never take a page fault
        // (each costs microseconds, and waits behind any unmap elsewhere in the process).
        if let (Ok(start), Ok(end)) = (usize::try_from(self.len()), usize::try_from(len)) {
            let _ = self.map.advise_range(memmap2::Advice::PopulateWrite, start, end - start);
        }
        self.len.store(len, Ordering::Release);
        Ok(())
    }
}

impl IoFile for MappedFile {
    fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    fn reserve(&self, len: u64) -> io::Result<()> {
        self.reserve_space(len, Fill::Bulk)
    }

    fn reserve_paged(&self, len: u64) -> io::Result<()> {
        self.reserve_space(len, Fill::Paged)
    }

    fn reserve_unfilled(&self, len: u64) -> io::Result<()> {
        self.reserve_space(len, Fill::Unfilled)
    }

    fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.write_with(offset, bytes.len(), &mut |out| out.copy_from_slice(bytes))
    }

    #[allow(unsafe_code, reason = "writes through the shared map, with its SAFETY comment")]
    fn write_with(&self, offset: u64, len: usize, fill: &mut dyn FnMut(&mut [u8])) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "file is read-only"));
        }
        let (start, _) = checked_range(offset, len, self.len())?;
        // SAFETY: the range lies within the file's allocated length (checked above), which lies
        // within the mapping, so no page past EOF is touched. No other thread reads or writes it
        // while it is being written (records reach the index only after this returns, the
        // appender lock serializes writers, and each range is written once). The slice lives
        // only for the call of `fill`.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(start), len) };
        fill(bytes);
        Ok(())
    }

    fn prefetch(&self, offset: u64) {
        if let Ok(start) = usize::try_from(offset)
            && offset < self.len()
        {
            // Every line a small record's read copies (`Segment::probe_read` reads 256 bytes
            // from the record's start, which need not be line-aligned: up to five lines).
            let at = self.map.as_ptr().wrapping_add(start);
            for line in 0..5 {
                crate::prefetch::prefetch_read(at.wrapping_add(line * 64));
            }
        }
    }

    #[allow(unsafe_code, reason = "reads from the shared map, with its SAFETY comment")]
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let (start, _) = checked_range(offset, buf.len(), self.len())?;
        // SAFETY: the range lies within the file's length and the mapping (checked above).
        // Bytes may be concurrently written by another process (a read-only viewer of a live
        // store); they are copied out and then checked by CRC, never trusted in place.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(start), buf.as_mut_ptr(), buf.len());
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        if let Some(file) = self.file.lock().as_ref() {
            return file.sync_data();
        }
        // msync(MS_SYNC) on Linux is an fsync of the mapped range of the file the mapping holds.
        let len = usize::try_from(self.len()).map_err(|_| out_of_range())?;
        if len == 0 { Ok(()) } else { self.map.flush_range(0, len) }
    }

    fn sync_gradually(&self) -> io::Result<()> {
        // msync(MS_SYNC) of a range: an fdatasync of that range of the file.
        self.in_slices(|at, n| self.map.flush_range(at, n))
    }

    fn release_descriptor(&self) {
        self.file.lock().take();
    }

    #[allow(unsafe_code, reason = "madvise of the shared map through memmap2, with its SAFETY comment")]
    fn release_pages(&self) {
        let _ = self.in_slices(|at, n| {
            // SAFETY: MADV_DONTNEED on a shared file mapping only drops page-table entries; the
            // data stays in the file and page cache and a later access faults it back in, so no
            // reader can observe changed bytes. Each call takes the mapping lock for reading
            // only (a munmap of the whole file would take it for writing, stalling every page
            // fault in the process until it is done).
            // A failed advice leaves the pages mapped; the final unmap still drops them.
            let _ = unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, at, n) };
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real mapped file holding `len` bytes of 0xEE, then grown to `grown` with `grow`.
    fn file_grown_from(
        dir: &Path,
        len: u64,
        grown: u64,
        grow: impl Fn(&dyn IoFile, u64) -> io::Result<()>,
    ) -> Box<dyn IoFile> {
        let file = RealIo.create(&dir.join("f"), 1 << 20).unwrap();
        file.reserve(len).unwrap();
        file.write_at(0, &vec![0xEE; len as usize]).unwrap();
        grow(file.as_ref(), grown).unwrap();
        file
    }

    #[test]
    fn paged_and_bulk_zero_fill_reserve_the_same_zeroed_space_from_an_unaligned_end() {
        let dir = tempfile::tempdir().unwrap();
        let (len, grown) = (5000, 200_000);
        let paged = file_grown_from(dir.path(), len, grown, |f, n| f.reserve_paged(n));
        let bulk_dir = tempfile::tempdir().unwrap();
        let bulk = file_grown_from(bulk_dir.path(), len, grown, |f, n| f.reserve(n));
        for (file, path) in [(&paged, dir.path().join("f")), (&bulk, bulk_dir.path().join("f"))] {
            assert_eq!(file.len(), grown);
            let mut back = vec![1u8; grown as usize];
            file.read_at(0, &mut back).unwrap();
            assert!(back[..len as usize].iter().all(|&b| b == 0xEE), "the old bytes are kept");
            assert!(back[len as usize..].iter().all(|&b| b == 0), "the new space reads as zeros");
            assert_eq!(std::fs::metadata(&path).unwrap().len(), grown, "the file has the reserved length");
            file.write_at(grown - 8, &[7u8; 8]).unwrap();
            file.sync().unwrap();
        }
    }

    #[test]
    fn read_prefix_reads_what_lies_within_the_length_on_a_mapped_and_a_simulated_file() {
        let dir = tempfile::tempdir().unwrap();
        let sim = crate::io::sim::SimDisk::new();
        sim.create_dir_all(Path::new("/d")).unwrap();
        let files =
            [RealIo.create(&dir.path().join("f"), 1 << 20).unwrap(), sim.create(Path::new("/d/f"), 1 << 20).unwrap()];
        for file in files {
            file.reserve(4096).unwrap();
            let bytes: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
            file.write_at(0, &bytes).unwrap();
            let mut buf = [0u8; 256];
            assert_eq!(file.read_prefix(100, &mut buf).unwrap(), 256, "a whole read inside the file");
            assert_eq!(&buf[..], &bytes[100..356]);
            let mut buf = [0u8; 256];
            assert_eq!(file.read_prefix(4000, &mut buf).unwrap(), 96, "a read cut at the length");
            assert_eq!(&buf[..96], &bytes[4000..]);
            assert!(buf[96..].iter().all(|&b| b == 0), "nothing written past what was read");
            assert_eq!(file.read_prefix(4096, &mut buf).unwrap(), 0);
            assert_eq!(file.read_prefix(u64::MAX, &mut buf).unwrap(), 0, "an offset past the end reads nothing");
        }
    }

    #[test]
    fn a_file_removed_gradually_stays_readable_through_a_map_of_it_until_unmapped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let len = 1u64 << 20;
        let file = RealIo.create(&path, len).unwrap();
        file.reserve(len).unwrap();
        file.write_at(0, &vec![0xAB; len as usize]).unwrap();
        // Another holder of the map (a read-only viewer, say) while the file is deleted: a cut
        // file would fault this read (SIGBUS); punched holes read as zeros.
        RealIo.remove_gradually(&path).unwrap();
        assert!(!path.exists());
        let mut back = vec![1u8; len as usize];
        file.read_at(0, &mut back).unwrap();
        assert!(back[..256 << 10].iter().all(|&b| b == 0xAB), "the first step is unlinked, not freed");
        assert!(back[256 << 10..].iter().all(|&b| b == 0), "freed steps read as zeros");
    }

    #[test]
    fn reserving_past_the_capacity_fails_and_keeps_the_length() {
        let dir = tempfile::tempdir().unwrap();
        let file = RealIo.create(&dir.path().join("f"), 8192).unwrap();
        file.reserve_paged(4096).unwrap();
        assert_eq!(file.reserve_paged(8193).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(file.len(), 4096);
    }
}
