//! Record encoding and decoding: a fixed 96-byte header, the key, then the value (outcome or
//! checkpoint). Every record is a full snapshot of its key's state, so recovery keeps the
//! record with the highest sequence number per key and needs nothing else.
//!
//! The layout: ARCHITECTURE.md, "On disk", "Record". Records start at 8-byte aligned offsets;
//! padding bytes are zero.

pub(crate) use crate::bytes::{u32_at, u64_at, usize_from};
use crc32fast::Hasher;

/// Size of the fixed record header.
pub const HEADER_LEN: usize = 96;
/// Records start at multiples of this.
pub const RECORD_ALIGN: u64 = 8;
/// Longest key the format can hold (the option limit is usually far lower).
pub const KEY_LEN_FORMAT_MAX: usize = u16::MAX as usize;
/// Longest value the format accepts on decode (64 MiB); bounds what a damaged length can ask for.
pub const VALUE_LEN_FORMAT_MAX: usize = 64 << 20;

const _: () = assert!(HEADER_LEN.is_multiple_of(usize_from(RECORD_ALIGN)));

/// What a record says about its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A claim was acquired (or taken over); the key is in flight.
    Claim = 1,
    /// The holder recorded progress; still in flight, value is the phase.
    Checkpoint = 2,
    /// The effect finished; value is the outcome.
    Complete = 3,
    /// The holder gave the claim up; the key is absent.
    Release = 4,
    /// The key was removed; the key is absent.
    Remove = 5,
}

impl Kind {
    /// The kind for a byte, if it is one.
    pub fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Claim,
            2 => Kind::Checkpoint,
            3 => Kind::Complete,
            4 => Kind::Release,
            5 => Kind::Remove,
            _ => return None,
        })
    }

    /// True when the key is held by a claim (the record is a claim or a checkpoint).
    pub fn is_in_flight(self) -> bool {
        matches!(self, Kind::Claim | Kind::Checkpoint)
    }

    /// True when the record says the key is absent.
    pub fn is_absent(self) -> bool {
        matches!(self, Kind::Release | Kind::Remove)
    }
}

/// The fixed-size part of a record: everything but the key and the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the record says about its key.
    pub kind: Kind,
    /// Length of the key that follows the header.
    pub key_len: u16,
    /// Length of the value (outcome or checkpoint) after the key.
    pub value_len: u32,
    /// Global sequence number; the highest per key wins at recovery.
    pub seq: u64,
    /// When the key leaves the window; the record is invisible from then on.
    pub expires_at_ms: u64,
    /// When the current holding was claimed.
    pub claimed_at_ms: u64,
    /// When the holder's lease ends.
    pub lease_until_ms: u64,
    /// Fencing number: the seq of the claim record that started this holding.
    pub token: u64,
    /// The process incarnation that made the claim (orphan detection).
    pub incarnation: u64,
    /// xxh3-128 of the request bytes.
    pub request_hash: u128,
    /// When the record was written (completed_at for `Complete`).
    pub written_at_ms: u64,
    /// Lease length, renewed by checkpoints.
    pub lease_ms: u32,
}

impl Header {
    /// Length of the record on disk without padding.
    pub fn record_len(&self) -> usize {
        HEADER_LEN + usize::from(self.key_len) + self.value_len as usize
    }

    /// Length of the record on disk including padding to the next record.
    pub fn padded_len(&self) -> u64 {
        align_up(self.record_len() as u64)
    }
}

/// `n` rounded up to the record alignment.
pub fn align_up(n: u64) -> u64 {
    n.div_ceil(RECORD_ALIGN) * RECORD_ALIGN
}

/// A CRC hasher seeded for records of segment `segment_id`; feed it the record's bytes from
/// offset 4 (after the stored CRC) to its end.
pub fn checksum_hasher(segment_id: u32) -> Hasher {
    let mut hasher = Hasher::new();
    hasher.update(&segment_id.to_le_bytes());
    hasher
}

fn checksum(segment_id: u32, bytes_after_crc: &[u8]) -> u32 {
    let mut hasher = checksum_hasher(segment_id);
    hasher.update(bytes_after_crc);
    hasher.finalize()
}

/// The CRC stored in a record's first four bytes.
pub fn stored_checksum(record: &[u8]) -> u32 {
    u32_at(record, 0)
}

/// Encodes a record into `out` (cleared first), padded to the record alignment.
pub fn encode(segment_id: u32, header: &Header, key: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.resize(usize_from(header.padded_len()), 0);
    encode_into(&checksum_hasher(segment_id), header, key, value, out);
    debug_assert_eq!(decode(segment_id, out).ok().map(|(h, _, _)| h), Some(*header));
}

/// Encodes a record into `out`, which is exactly its padded length, with the segment's CRC
/// seed (`checksum_hasher`, which the append path keeps per segment): the append path encodes
/// straight into the segment's reserved space, with no buffer in between.
pub fn encode_into(seed: &Hasher, header: &Header, key: &[u8], value: &[u8], out: &mut [u8]) {
    debug_assert_eq!(usize::from(header.key_len), key.len());
    debug_assert_eq!(header.value_len as usize, value.len());
    debug_assert!(!key.is_empty() && header.seq > 0);
    debug_assert_eq!(out.len() as u64, header.padded_len());
    let len = header.record_len();
    let mut h = [0u8; HEADER_LEN];
    #[expect(
        clippy::cast_possible_truncation,
        reason = "a header, a key of at most u16::MAX bytes and a value of at most VALUE_LEN_FORMAT_MAX (64 MiB)"
    )]
    let len_field = len as u32;
    h[4..8].copy_from_slice(&len_field.to_le_bytes());
    h[8] = header.kind as u8;
    h[10..12].copy_from_slice(&header.key_len.to_le_bytes());
    h[12..16].copy_from_slice(&header.value_len.to_le_bytes());
    h[16..24].copy_from_slice(&header.seq.to_le_bytes());
    h[24..32].copy_from_slice(&header.expires_at_ms.to_le_bytes());
    h[32..40].copy_from_slice(&header.claimed_at_ms.to_le_bytes());
    h[40..48].copy_from_slice(&header.lease_until_ms.to_le_bytes());
    h[48..56].copy_from_slice(&header.token.to_le_bytes());
    h[56..64].copy_from_slice(&header.incarnation.to_le_bytes());
    h[64..80].copy_from_slice(&header.request_hash.to_le_bytes());
    h[80..88].copy_from_slice(&header.written_at_ms.to_le_bytes());
    h[88..92].copy_from_slice(&header.lease_ms.to_le_bytes());
    let key_end = HEADER_LEN + key.len();
    out[..HEADER_LEN].copy_from_slice(&h);
    out[HEADER_LEN..key_end].copy_from_slice(key);
    out[key_end..len].copy_from_slice(value);
    out[len..].fill(0);
    let mut hasher = seed.clone();
    hasher.update(&out[4..len]);
    out[0..4].copy_from_slice(&hasher.finalize().to_le_bytes());
}

/// Why bytes are not a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// All header bytes are zero: the preallocated, never-written end of a segment.
    Zeros,
    /// Fewer bytes than the record says it has.
    Truncated,
    /// The framing fields are impossible (kind 0 or unknown, bad lengths).
    BadFrame,
    /// The checksum does not match.
    BadChecksum,
}

impl DecodeError {
    /// A short description for error messages.
    pub fn reason(self) -> &'static str {
        match self {
            DecodeError::Zeros => "zeroed bytes where a record should be",
            DecodeError::Truncated => "record runs past the end of the file",
            DecodeError::BadFrame => "impossible record framing",
            DecodeError::BadChecksum => "checksum mismatch",
        }
    }
}

/// Parses the header fields of `bytes` (at least `HEADER_LEN` long) without checking the CRC.
/// Used on the hot path for records the index already vouches for.
pub fn parse_header(bytes: &[u8]) -> Result<Header, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Truncated);
    }
    let kind_byte = bytes[8];
    if kind_byte == 0 && bytes[..HEADER_LEN].iter().all(|&b| b == 0) {
        return Err(DecodeError::Zeros);
    }
    let kind = Kind::from_byte(kind_byte).ok_or(DecodeError::BadFrame)?;
    let len = u32_at(bytes, 4) as usize;
    let key_len = u16::from_le_bytes([bytes[10], bytes[11]]);
    let value_len = u32_at(bytes, 12);
    let reserved_zero = bytes[9] == 0 && bytes[92..96].iter().all(|&b| b == 0);
    if key_len == 0
        || !reserved_zero
        || value_len as usize > VALUE_LEN_FORMAT_MAX
        || len != HEADER_LEN + usize::from(key_len) + value_len as usize
    {
        return Err(DecodeError::BadFrame);
    }
    let mut hash = [0u8; 16];
    hash.copy_from_slice(&bytes[64..80]);
    Ok(Header {
        kind,
        key_len,
        value_len,
        seq: u64_at(bytes, 16),
        expires_at_ms: u64_at(bytes, 24),
        claimed_at_ms: u64_at(bytes, 32),
        lease_until_ms: u64_at(bytes, 40),
        token: u64_at(bytes, 48),
        incarnation: u64_at(bytes, 56),
        request_hash: u128::from_le_bytes(hash),
        written_at_ms: u64_at(bytes, 80),
        lease_ms: u32_at(bytes, 88),
    })
}

/// Decodes and verifies one record at the start of `bytes`: returns the header, the key and the
/// value. Never returns a record whose checksum does not match its bytes.
pub fn decode(segment_id: u32, bytes: &[u8]) -> Result<(Header, &[u8], &[u8]), DecodeError> {
    let header = parse_header(bytes)?;
    let len = header.record_len();
    if bytes.len() < len {
        return Err(DecodeError::Truncated);
    }
    let stored_crc = u32_at(bytes, 0);
    if checksum(segment_id, &bytes[4..len]) != stored_crc {
        return Err(DecodeError::BadChecksum);
    }
    if header.seq == 0 {
        return Err(DecodeError::BadFrame);
    }
    let key_end = HEADER_LEN + usize::from(header.key_len);
    Ok((header, &bytes[HEADER_LEN..key_end], &bytes[key_end..len]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            kind: Kind::Complete,
            key_len: 3,
            value_len: 5,
            seq: 42,
            expires_at_ms: 1_000,
            claimed_at_ms: 10,
            lease_until_ms: 20,
            token: 41,
            incarnation: 7,
            request_hash: 0xdead_beef_u128 << 64 | 0x1234,
            written_at_ms: 15,
            lease_ms: 30_000,
        }
    }

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        encode(9, &sample(), b"key", b"value", &mut buf);
        assert_eq!(buf.len() as u64, align_up((HEADER_LEN + 8) as u64));
        let (h, k, v) = decode(9, &buf).unwrap();
        assert_eq!((h, k, v), (sample(), &b"key"[..], &b"value"[..]));
    }

    #[test]
    fn wrong_segment_fails_checksum() {
        let mut buf = Vec::new();
        encode(9, &sample(), b"key", b"value", &mut buf);
        assert_eq!(decode(10, &buf).unwrap_err(), DecodeError::BadChecksum);
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let mut buf = Vec::new();
        encode(1, &sample(), b"key", b"value", &mut buf);
        let len = sample().record_len();
        for byte in 0..len {
            for bit in 0..8 {
                let mut damaged = buf.clone();
                damaged[byte] ^= 1 << bit;
                assert!(decode(1, &damaged).is_err(), "flip at {byte}:{bit} accepted");
            }
        }
    }

    #[test]
    fn zeros_are_not_a_record() {
        assert_eq!(decode(0, &[0u8; 200]).unwrap_err(), DecodeError::Zeros);
    }
}
