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
//!     Claim::Mismatch => println!("same key, different request: 409"),
//! }
//! // A retry gets the original answer back.
//! let Claim::Completed(done) = store.claim("order-42", b"POST /orders {qty: 1}")? else { panic!() };
//! assert_eq!(done.outcome, b"201 Created: order 42");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! See `ARCHITECTURE.md` for the code map, the byte layout and the invariants.

#![deny(missing_docs)]
#![deny(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod checkup;
mod clock;
mod commit;
mod error;
mod filter;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod index;
pub mod io;
mod log;
mod marks;
mod meta;
mod options;
mod pace;
mod permissions;
mod prefetch;
mod record;
mod recovery;
mod salvage;
mod segment;
mod segment_cache;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
mod slots;
mod stats;
mod store;
mod striped_map;
mod sync;
mod table;
mod time_floor;
mod types;

pub use clock::{Clock, ManualClock, STORE_TIME_MS_MAX, SystemClock, ms_to_system_time, system_time_to_ms};
pub use error::{Error, Result};
pub use options::{ClaimOptions, Durability, KeyHashFn, Options, OrphanPolicy, TTL_MAX};
pub use permissions::FileAccess;
pub use recovery::{FileKind, FileReport, VerifyReport};
pub use salvage::{LostRecord, QUARANTINE_DIR_NAME, SalvageOptions, SalvageReport, SalvagedFile};
pub use stats::{RecoveryStats, Stats};
pub use store::Store;
pub use types::{Claim, ClaimToken, Completed, Entry, Orphan};

/// Name of the lock file in a store directory.
pub const LOCK_FILE_NAME: &str = "LOCK";

/// Makes a damaged store in `dir` open again, keeping every record that checks out and moving
/// damaged files to `dir/quarantine/`, and reports exactly what was lost (see
/// `docs/operations.md`). Needs the writer's lock: a live store is refused with
/// `Error::Locked`. `Store::open` never does this by itself. With `options.dry_run`, reports
/// and changes nothing.
pub fn salvage(dir: impl AsRef<std::path::Path>, options: &SalvageOptions) -> Result<SalvageReport> {
    let defaults = Options::default();
    salvage::salvage(defaults.io.as_ref(), dir.as_ref(), defaults.segment_bytes_max, options)
}

/// Internals exposed for fuzz targets and tests (not a stable API).
#[doc(hidden)]
pub mod internals {
    pub use crate::commit::{GroupCommit, Syncer};
    pub use crate::index::place_in_index;
    pub use crate::record::{DecodeError, HEADER_LEN, Header, Kind, decode, encode};
    pub use crate::segment::{SEGMENT_HEADER_LEN, SegmentHeader, segment_file_name};
}

#[cfg(test)]
mod static_checks {
    fn assert_send_sync<T: Send + Sync>() {}
    #[test]
    fn store_is_send_and_sync() {
        assert_send_sync::<crate::Store>();
    }
}
