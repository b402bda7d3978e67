//! Fuzz target body `record_decode`: arbitrary bytes into the record decoder. The decoder never
//! panics, and never returns a record that is not exactly what the encoder writes for it (so it
//! never returns a record whose checksum does not match its bytes).
//!
//! Compiled into the cargo-fuzz target `fuzz/fuzz_targets/record_decode.rs` and into the corpus
//! replay `tests/fuzz_corpus.rs` (both with `#[path]`); it uses only idemstore's public API and
//! its `#[doc(hidden)]` `internals`.

use idemstore::internals::{DecodeError, checksum_hasher, decode, encode};

/// Decodes arbitrary bytes as one record.
///
/// Input layout: 4 bytes of segment id (little endian), 1 mode byte, then the record bytes.
/// When the mode's low bit is set, the record's CRC field is first overwritten with the correct
/// checksum of the bytes its length field covers, so the fuzzer also explores every check that
/// sits behind the checksum.
///
/// Panics (a bug) when the decoder panics, when it returns a record whose re-encoding differs
/// from the input's record bytes, or when a record it accepts under one segment id is not
/// refused with `BadChecksum` under another.
pub fn record_decode(data: &[u8]) {
    let Some((id_bytes, rest)) = data.split_first_chunk::<4>() else { return };
    let segment_id = u32::from_le_bytes(*id_bytes);
    let Some((&mode, record_bytes)) = rest.split_first() else { return };
    let mut bytes = record_bytes.to_vec();
    if mode & 1 == 1 {
        fix_record_checksum(segment_id, &mut bytes);
    }
    let Ok((header, key, value)) = decode(segment_id, &bytes) else { return };
    assert_eq!(key.len(), usize::from(header.key_len), "decoded key length disagrees with its header");
    assert_eq!(value.len(), header.value_len as usize, "decoded value length disagrees with its header");
    assert!(header.seq > 0 && header.key_len > 0, "decode returned an impossible header: {header:?}");
    let len = header.record_len();
    let mut encoded = Vec::new();
    encode(segment_id, &header, key, value, &mut encoded);
    assert_eq!(encoded.len() as u64, header.padded_len(), "encode wrote a record of the wrong padded length");
    let differing: Vec<usize> = (0..len).filter(|&i| encoded[i] != bytes[i]).collect();
    assert!(
        differing.is_empty(),
        "decode accepted bytes that encode never writes for the same record: header {header:?}, \
         differing offsets {differing:?} (0..4 is the CRC, 9 the flags, 92..96 reserved)"
    );
    assert!(encoded[len..].iter().all(|&b| b == 0), "encode padded with non-zero bytes");
    assert_eq!(
        decode(segment_id.wrapping_add(1), &bytes).err(),
        Some(DecodeError::BadChecksum),
        "a record accepted in segment {segment_id} must fail its checksum in any other segment"
    );
}

/// Overwrites the CRC field of `bytes` with the checksum of the bytes its length field covers
/// (clamped to what is there), seeded with the segment id as the format prescribes.
fn fix_record_checksum(segment_id: u32, bytes: &mut [u8]) {
    if bytes.len() < 8 {
        return;
    }
    let claimed_len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    let end = claimed_len.clamp(4, bytes.len());
    let mut hasher = checksum_hasher(segment_id);
    hasher.update(&bytes[4..end]);
    bytes[0..4].copy_from_slice(&hasher.finalize().to_le_bytes());
}
