//! Every raw system call the store makes, each behind a safe function: the one place that
//! talks to the kernel without the standard library in between. Calls the standard library
//! or `memmap2` already wrap stay with their callers: `fdatasync` (`File::sync_data`), the
//! writer's `flock` (`File::try_lock`), `fchmod` (`File::set_permissions`), `msync` and
//! `madvise` of a segment's map (in `io/mod.rs`), the futex of group commit's waiters (the
//! `atomic-wait` crate, in `sync.rs`).
//!
//! Linux only, as the whole crate (see `lib.rs`).
#![allow(unsafe_code, reason = "the raw system calls, each with its SAFETY comment")]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `fallocate(fd, mode, offset, len)`: reserves (mode 0) or frees (`FALLOC_FL_PUNCH_HOLE`)
/// blocks of the file. An offset or length past `off_t` is `InvalidInput` (as any access past
/// a file's reserved length: `io::out_of_range`).
fn fallocate(fd: BorrowedFd<'_>, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(super::out_of_range());
    };
    // SAFETY: fallocate on a file descriptor the caller borrows for the call; no memory of
    // ours is read or written.
    if unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset, len) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reserves the file's first `len` bytes on disk (`fallocate`, mode 0): a later write there
/// cannot fail for want of space. The file grows to `len` if shorter.
pub fn allocate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    fallocate(fd, 0, 0, len)
}

/// Frees the blocks of `len` bytes at `offset`, keeping the file's length: the range then
/// reads as zeros (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`).
pub fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
}

/// Whether a process with id `pid` exists (`kill(pid, 0)`: nothing is sent). A process of
/// another user exists too (`EPERM`).
pub fn process_exists(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Bytes of one memory page (`sysconf(_SC_PAGESIZE)`), or `None` if the system will not say.
pub fn page_size() -> Option<usize> {
    // SAFETY: sysconf reads a system constant; it touches no memory of ours.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).ok().filter(|&p| p > 0)
}

/// `CLOCK_REALTIME_COARSE` in milliseconds since the epoch (the time of the last kernel tick,
/// a few ms behind at most), or `None` if the call fails.
pub fn realtime_coarse_ms() -> Option<u64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    match (rc, u64::try_from(ts.tv_sec), u64::try_from(ts.tv_nsec)) {
        (0, Ok(secs), Ok(nanos)) => Some(secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)),
        _ => None,
    }
}

/// Returns the allocator's free heap to the operating system (`malloc_trim(0)`, glibc only;
/// elsewhere nothing).
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
