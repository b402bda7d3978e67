//! Reading little-endian fields out of a file's bytes: every on-disk layout of the store
//! (records, segment and table headers, `META`, `TIME`, `MARKS`, the `LOCK` owner) is read
//! with these.

/// The little-endian u64 at `at` (the caller guarantees the bytes are there).
pub(crate) fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// The little-endian u32 at `at` (the caller guarantees the bytes are there).
pub(crate) fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}
