//! Reading little-endian fields out of a file's bytes (every on-disk layout of the store:
//! records, segment and table headers, `META`, `TIME`, `MARKS`, the `LOCK` owner), and
//! turning a file's offsets and lengths into memory sizes.

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

/// `n` as a `usize`, for a file offset or length used as a memory index or size. Lossless:
/// the crate builds for 64-bit targets only (see `lib.rs`), where a `usize` holds every `u64`.
#[inline(always)]
#[expect(clippy::cast_possible_truncation, reason = "64-bit targets only (lib.rs): a usize holds every u64")]
pub(crate) const fn usize_from(n: u64) -> usize {
    n as usize
}
