//! The one error type of the crate, with enough context (file, offset, cause) to act on.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a store operation.
///
/// Input errors (`EmptyKey`, `KeyTooLong`, ...) are returned before anything is written.
/// `Poisoned` means an earlier write or fsync failed: the store refuses further writes rather
/// than pretend the failed data is safe (see "fsyncgate", Rebello et al., ATC '20); reopen the
/// store to recover from what is on disk.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error, with what was being done and on which file.
    Io {
        /// What the store was doing.
        context: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: Arc<io::Error>,
    },
    /// Another `Store` (in this or another process) holds the directory's lock file.
    Locked {
        /// The store directory.
        dir: PathBuf,
    },
    /// The token no longer holds the claim: another claim took it over after the lease ended,
    /// the key was removed, released, completed, or its window expired.
    StaleToken,
    /// Stored bytes fail their checks: a record that is not a torn tail (checksum, framing,
    /// sequence order), a segment header (or its id against the file name), or a sealed
    /// table's entry. Nothing was deleted.
    Corrupt {
        /// The damaged file.
        file: PathBuf,
        /// Byte offset of the first bad record (or header, or table entry) in that file.
        offset: u64,
        /// What was wrong.
        reason: &'static str,
    },
    /// A file was written by a newer or unknown format version.
    UnsupportedVersion {
        /// The file carrying the version.
        file: PathBuf,
        /// The version found in its header.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// The key is empty.
    EmptyKey,
    /// The key is longer than `Options::max_key_len`.
    KeyTooLong {
        /// Length given.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// The outcome or checkpoint is longer than `Options::max_outcome_len`.
    OutcomeTooLong {
        /// Length given.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// An option or argument is out of its allowed range.
    InvalidArgument(&'static str),
    /// An earlier write or fsync failed; no write is accepted until the store is reopened.
    Poisoned {
        /// The original failure, as text.
        cause: String,
    },
    /// The disk (or the simulated disk) has no room for the record; nothing was written.
    NoSpace {
        /// The file that could not grow.
        path: PathBuf,
    },
    /// `Options::max_disk_bytes` would be exceeded; replays and reads keep working.
    DiskBudgetExceeded {
        /// Bytes the store's files take now.
        used_bytes: u64,
        /// The configured budget.
        max_bytes: u64,
    },
    /// The store was opened read-only; writes are refused.
    ReadOnly,
    /// The clock (or the latest time recorded in the store) reads past the latest time a store
    /// can keep ([`STORE_TIME_MS_MAX`](crate::STORE_TIME_MS_MAX), in the year 2248): fencing
    /// tokens, which start above the time, would overflow. Check the system clock.
    ClockOutOfRange {
        /// The time read, in ms since the epoch.
        now_ms: u64,
        /// The latest time accepted.
        max_ms: u64,
    },
    /// The token was handed out by another store: it proves nothing here.
    ForeignToken,
    /// The store directory can be written by other users, who could replace or plant the
    /// store's files: a writable store refuses to open it (nothing is created in it). Its
    /// mode is left as it is: the store changes no mode it did not set.
    UnsafePermissions {
        /// The store directory.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The path holds no store, and none is made there: it is missing (and
    /// `Options::create_if_missing` is false), a file, or a directory of other files. Check the
    /// path; a store needs a directory of its own.
    NotAStore {
        /// The path given.
        path: PathBuf,
        /// What was found there instead.
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(context: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if is_no_space(&source) {
            return Error::NoSpace { path };
        }
        Error::Io { context, path, source: Arc::new(source) }
    }
}

pub(crate) fn is_no_space(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(libc::ENOSPC)
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { context, path, source } => {
                write!(f, "{context} ({}): {source}", path.display())
            }
            Error::Locked { dir } => {
                write!(f, "store {} is locked by another open store (in this or another process)", dir.display())
            }
            Error::StaleToken => write!(f, "claim token is stale: the claim is no longer held by it"),
            Error::Corrupt { file, offset, reason } => {
                write!(f, "corrupt record in {} at offset {offset}: {reason}", file.display())
            }
            Error::UnsupportedVersion { file, found, supported } => {
                write!(f, "{} has format version {found}; this build supports version {supported}", file.display())
            }
            Error::EmptyKey => write!(f, "key is empty"),
            Error::KeyTooLong { len, max } => write!(f, "key is {len} bytes; the limit is {max}"),
            Error::OutcomeTooLong { len, max } => {
                write!(f, "outcome is {len} bytes; the limit is {max}")
            }
            Error::InvalidArgument(what) => write!(f, "invalid argument: {what}"),
            Error::Poisoned { cause } => {
                write!(f, "store is poisoned by an earlier failed write or sync ({cause}); reopen it")
            }
            Error::NoSpace { path } => write!(f, "no space left on device for {}", path.display()),
            Error::DiskBudgetExceeded { used_bytes, max_bytes } => {
                write!(f, "disk budget exceeded: {used_bytes} bytes used, max_disk_bytes is {max_bytes}")
            }
            Error::ReadOnly => write!(f, "store is open read-only"),
            Error::ClockOutOfRange { now_ms, max_ms } => write!(
                f,
                "the clock reads {now_ms} ms since the epoch, past the latest time a store can keep ({max_ms} ms); \
                 check the system clock"
            ),
            Error::ForeignToken => write!(f, "the claim token was handed out by another store"),
            Error::UnsafePermissions { dir, mode } => write!(
                f,
                "store directory {dir} has mode {mode:04o}: other users can write it, and so replace or plant \
                 the files that hold stored outcomes; run `chmod o-w {dir}` (or `chmod 700 {dir}` to keep \
                 everyone else out) and open it again",
                dir = dir.display()
            ),
            Error::NotAStore { path, reason } => {
                write!(f, "{} holds no idemstore store: {reason}", path.display())
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}
