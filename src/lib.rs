//! # idemstore
//!
//! An embedded dedupe storage engine: atomic insert-if-absent *claims* on idempotency keys,
//! *completion records* that replay the original outcome to every retry, *TTL-segmented
//! expiry* (whole files dropped when their window passes) and *crash recovery*.
//!
//! ```
//! use idemstore::{Claim, Durability, Options, Store};
//!
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(dir.path(), Options { durability: Durability::None, ..Default::default() })?;
//! match store.claim("order-42", b"POST /orders {qty: 1}")? {
//!     Claim::Acquired(token) => store.complete(&token, b"201 Created: order 42")?,
//!     Claim::Completed(done) => println!("replay: {:?}", done.outcome),
//!     Claim::InProgress { .. } => println!("someone else is on it"),
//!     Claim::Mismatch => println!("same key, different request: 422"),
//! }
//! // A retry gets the original answer back.
//! let Claim::Completed(done) = store.claim("order-42", b"POST /orders {qty: 1}")? else { panic!() };
//! assert_eq!(done.outcome, b"201 Created: order 42");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Using it in a service
//!
//! **What `request` holds.** The bytes that make two requests "the same": method, path (with
//! the query) and a canonical form of the body (keys sorted, whitespace stripped), and
//! whichever header changes the effect (the tenant, say). Not volatile headers (`Date`, trace
//! ids, auth tokens that rotate): a retry would then be a `Mismatch`. Only a 128-bit hash of it
//! is kept.
//!
//! **Lease and TTL.** The lease (`Options::default_lease`, 30 s) must outlast the effect: set it
//! above the effect's p99.9 duration, or call `checkpoint` during a long effect (each one renews
//! the lease). A lease that runs out lets a second claim take the key over and run the effect
//! again; the first holder then gets `StaleToken`. The TTL (`default_ttl`, 24 h) must be at
//! least the clients' retry horizon (their longest backoff, a queue's redelivery limit): a
//! retry after the window is a new request.
//!
//! **What to do with each answer and error** (HTTP statuses for an HTTP API):
//!
//! | answer or error | meaning | action | HTTP |
//! | --- | --- | --- | --- |
//! | `Claim::Acquired` | this request owns the key | run the effect, then `complete` (or `release` after a retryable failure) | the effect's |
//! | `Claim::Completed` | a retry | reply with the stored outcome | the stored one |
//! | `Claim::InProgress` | another request holds the key | ask to retry (or claim with `wait`) | 409, `Retry-After` from `lease_expires_at` |
//! | `Claim::Mismatch` | same key, different request | refuse; nothing runs | 422 (as the IETF `Idempotency-Key` draft says) |
//! | `EmptyKey`, `KeyTooLong` | the client's key is unusable | refuse | 400 |
//! | `StaleToken` | the lease ran out and another claim took over | the effect may run twice: alert, lengthen the lease or checkpoint | 500 |
//! | `OutcomeTooLong`, `InvalidArgument`, `ForeignToken`, `ReadOnly` | a bug or a setting | fix the code or `Options` | 500 |
//! | `Poisoned` | a write or fsync failed; writes stop | reopen the store (below) | 503 |
//! | `NoSpace`, `DiskBudgetExceeded`, `Io` | the disk is full, the budget spent, or failing | free space or raise `max_disk_bytes`; replays still work | 503 |
//! | `ClockOutOfRange` | the system clock is far in the future | fix the clock | 503 |
//! | `Corrupt`, `UnsupportedVersion` | damaged files, or a newer build's | do not start; run `idemstore verify DIR`; deploy the newer build | (startup) |
//! | `Locked`, `NotAStore`, `UnsafePermissions` | another open store holds the directory; a wrong path; a directory others can write | do not start; fix the deployment | (startup) |
//!
//! **Reopening a `Poisoned` store.** Share the store as `Arc<Store>` behind a lock you can swap.
//! The lock file is held until the last clone of the old store is dropped: an open before
//! that is `Error::Locked`. So take the old store out of the slot, wait for the requests that
//! still hold a clone to finish, then open again:
//!
//! ```
//! use std::sync::{Arc, RwLock};
//! use idemstore::{Error, Options, Store};
//!
//! struct Dedupe {
//!     dir: std::path::PathBuf,
//!     store: RwLock<Option<Arc<Store>>>,
//! }
//!
//! impl Dedupe {
//!     /// What each request uses: a clone, dropped when the request ends.
//!     fn store(&self) -> Option<Arc<Store>> {
//!         self.store.read().ok()?.clone()
//!     }
//!
//!     /// Called on `Error::Poisoned`: requests meanwhile get `None` (answer 503).
//!     fn reopen(&self) -> Result<(), Error> {
//!         let Some(old) = self.store.write().map_or(None, |mut slot| slot.take()) else { return Ok(()) };
//!         let gone = Arc::downgrade(&old);
//!         drop(old);
//!         while gone.strong_count() > 0 {
//!             std::thread::sleep(std::time::Duration::from_millis(10)); // requests still running
//!         }
//!         let store = Store::open(&self.dir, Options::default())?;
//!         if let Ok(mut slot) = self.store.write() {
//!             *slot = Some(Arc::new(store));
//!         }
//!         Ok(())
//!     }
//! }
//! # let dir = tempfile::tempdir()?;
//! # let d = Dedupe { dir: dir.path().into(), store: RwLock::new(Some(Arc::new(Store::open(dir.path(), Options::default())?))) };
//! # let held = d.store();
//! # drop(held);
//! # d.reopen()?;
//! # assert!(d.store().is_some());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! **Orphans at startup.** A claim whose process died is an orphan. By default
//! (`OrphanPolicy::TakeOver`) the next claim of its key takes it over at once, with
//! `token.recovered()` set and the dead holder's last checkpoint on the token: resume from
//! there, or check the downstream system (pass the key to it as its own idempotency key)
//! before running the effect again. `Store::orphans()` lists them at startup, to reconcile
//! them before traffic arrives.
//!
//! **One writer process per directory.** `open` takes the directory's lock: a second process
//! (or a second `open` in the same one) gets `Error::Locked`. Dedupe is therefore per instance:
//! replicas behind a load balancer each need their own directory and see only their own keys,
//! so route a key to one instance (hash the key) until a shared backend exists. Read-only views
//! (`Store::open_read_only`, the `idemstore` CLI) need no lock.
//!
//! **Disk and RAM per key.** With 32-byte keys, 64-byte requests and 20-byte outcomes, a
//! claimed and completed key takes about 280 B on disk (claim and completion records),
//! about 298 B once its segment is sealed (plus its table entry), and about 38 B of RAM while
//! its segment takes writes, about 4 B once sealed (measured with
//! `cargo run --release --example footprint`, 1M keys). Records are kept until their
//! expiry bucket passes (`bucket_width` after the TTL at most). An empty store takes 256 KiB
//! (the spare segment prepared ahead of need), 512 KiB from its first key (the first segment,
//! preallocated in `segment_bytes_initial` steps, and the spare); `Stats::disk_bytes` counts both.
//!
//! **Platforms.** Linux only (it uses `fallocate`, `fdatasync` and shared memory maps);
//! measured and tested on ext4. A local file system: not NFS or other network file systems,
//! whose locks and maps do not hold the same promises.
//!
//! **A path that holds no store.** `Store::open` creates the directory when it is missing
//! (`Options::create_if_missing`, default true; set it false once the store exists, so that a
//! wrong path or an unmounted volume stops the service instead of starting it with an empty
//! window) and refuses, with `Error::NotAStore`, a file or a directory of other files.
//!
//! See `ARCHITECTURE.md` for the code map, the byte layout and the invariants.

#![deny(missing_docs)]
// Every narrowing `as` cast either goes (`try_from`, `From`) or says why it cannot truncate.
#![deny(clippy::cast_possible_truncation)]
#![deny(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]
// Unit tests cast small test sizes; the library's own code is checked in the non-test build.
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

#[cfg(not(target_os = "linux"))]
compile_error!(
    "idemstore supports Linux only: it relies on fallocate (reserving and punching holes), fdatasync, \
     futex waits, CLOCK_REALTIME_COARSE and shared memory maps with Linux's semantics (see ARCHITECTURE.md)"
);
#[cfg(not(target_pointer_width = "64"))]
compile_error!(
    "idemstore needs a 64-bit target: it maps every segment over its whole capacity and reads \
     file offsets as memory indexes (see ARCHITECTURE.md)"
);

mod bytes;
mod clock;
mod commit;
mod dedupe_store;
mod error;
mod hash;
mod index;
pub mod io;
mod log;
mod namespace;
mod observe;
mod options;
mod pace;
mod prefetch;
mod recovery;
mod sealed;
mod stats;
mod store;
mod sync;
mod transfer;
mod types;

pub use clock::{Clock, ManualClock, STORE_TIME_MS_MAX, SystemClock, ms_to_system_time, system_time_to_ms};
pub use dedupe_store::DedupeStore;
pub use error::{Error, Result};
pub use io::LOCK_FILE_NAME;
pub use io::permissions::FileAccess;
#[cfg(any(test, feature = "sim"))]
pub use io::sim;
pub use namespace::{NAMESPACE_NAME_MAX, Namespace, NamespaceStats, namespaced_key, split_namespaced_key};
pub use options::{ClaimHook, ClaimOptions, Durability, KeyHashFn, Options, OrphanPolicy, TTL_MAX};
pub use recovery::salvage::{LostRecord, QUARANTINE_DIR_NAME, SalvageOptions, SalvageReport, SalvagedFile};
pub use recovery::{FileKind, FileReport, VerifyReport};
pub use stats::{RecoveryStats, Stats};
pub use store::{Advance, KeyHistory, Scan, Store};
pub use transfer::{ExportedEntry, request_hash};
pub use types::{Answer, Claim, ClaimEvent, ClaimToken, Completed, Entry, Orphan};

/// Makes a damaged store in `dir` open again, keeping every record that checks out and moving
/// damaged files to `dir/quarantine/`, and reports exactly what was lost (see
/// `docs/operations.md`). Needs the writer's lock: a live store is refused with
/// `Error::Locked`. `Store::open` never does this by itself. With `options.dry_run`, reports
/// and changes nothing.
pub fn salvage(dir: impl AsRef<std::path::Path>, options: &SalvageOptions) -> Result<SalvageReport> {
    let defaults = Options::default();
    recovery::salvage::salvage(defaults.io.as_ref(), dir.as_ref(), defaults.segment_bytes_max, options)
}

/// Internals exposed for fuzz targets and tests (not a stable API).
#[doc(hidden)]
pub mod internals {
    pub use crate::commit::{GroupCommit, Syncer};
    pub use crate::index::place_in_index;
    pub use crate::log::record::{DecodeError, HEADER_LEN, Header, Kind, checksum_hasher, decode, encode};
    pub use crate::log::segment::{SEGMENT_HEADER_LEN, SegmentHeader, segment_file_name};
    pub use crate::sealed::TABLE_EXT;
}

#[cfg(test)]
mod static_checks {
    fn assert_send_sync<T: Send + Sync>() {}
    #[test]
    fn store_is_send_and_sync() {
        assert_send_sync::<crate::Store>();
    }
}
