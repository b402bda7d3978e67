//! Moving a window between backends: each key's latest state with the hash of its request, so
//! that a retry after the move is still told `Mismatch` when its request differs.

use crate::types::Entry;

/// The 128-bit hash a store keeps of a claim's request (xxh3-128 of the bytes): the same in
/// every backend, so an entry moved between backends still tells a repeat from a mismatch.
pub fn request_hash(request: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(request)
}

/// One key's state as an export carries it (see `Store::export_entries`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedEntry {
    /// The key.
    pub key: Vec<u8>,
    /// [`request_hash`] of the request that claimed it.
    pub request_hash: u128,
    /// Its state: in flight (with lease and last checkpoint) or completed (with outcome).
    pub entry: Entry,
}
