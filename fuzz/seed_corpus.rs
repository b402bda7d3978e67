//! Writes the small seed corpora under `fuzz/corpus/<target>/` (run once from `fuzz/` with
//! `cargo run --bin seed_corpus`; the files are checked in). Each seed is named after what it
//! exercises; the input layouts are documented on the target bodies in `fuzz/bodies/`.

use std::fs;
use std::path::Path;

use idemstore::internals::{Header, Kind, encode};

fn record(segment_id: u32, mode: u8, kind: Kind, key: &[u8], value: &[u8]) -> Vec<u8> {
    let header = Header {
        kind,
        key_len: key.len() as u16,
        value_len: value.len() as u32,
        seq: 42,
        expires_at_ms: 1_700_000_360_000,
        claimed_at_ms: 1_700_000_000_000,
        lease_until_ms: 1_700_000_030_000,
        token: 41,
        incarnation: 0x1234_5679,
        request_hash: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
        written_at_ms: 1_700_000_001_000,
        lease_ms: 30_000,
    };
    let mut bytes = Vec::new();
    encode(segment_id, &header, key, value, &mut bytes);
    let mut input = segment_id.to_le_bytes().to_vec();
    input.push(mode);
    input.extend_from_slice(&bytes);
    input
}

/// A damage description for the `recover` target: (opcode, fields) in little endian.
enum Damage {
    Flip { file: u8, offset: u32, mask: u8 },
    Truncate { file: u8, len: u32 },
    Zero { file: u8, offset: u32, len: u16 },
    Copy { src: u8, src_offset: u32, dst: u8, dst_offset: u32, len: u16 },
    Version { file: u8, version: u32 },
    Delete { file: u8 },
}

fn recover_input(variant: u8, damage: &[Damage]) -> Vec<u8> {
    let mut out = vec![variant];
    for d in damage {
        match *d {
            Damage::Flip { file, offset, mask } => {
                out.extend([0, file]);
                out.extend(offset.to_le_bytes());
                out.push(mask);
            }
            Damage::Truncate { file, len } => {
                out.extend([1, file]);
                out.extend(len.to_le_bytes());
            }
            Damage::Zero { file, offset, len } => {
                out.extend([2, file]);
                out.extend(offset.to_le_bytes());
                out.extend(len.to_le_bytes());
            }
            Damage::Copy { src, src_offset, dst, dst_offset, len } => {
                out.extend([3, src]);
                out.extend(src_offset.to_le_bytes());
                out.push(dst);
                out.extend(dst_offset.to_le_bytes());
                out.extend(len.to_le_bytes());
            }
            Damage::Version { file, version } => {
                out.extend([4, file]);
                out.extend(version.to_le_bytes());
            }
            Damage::Delete { file } => out.extend([5, file]),
        }
    }
    out
}

/// Deterministic pseudo-random bytes (splitmix64), so the seeds are reproducible.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    fs::create_dir_all(&dir).expect("create corpus dir");
    fs::write(dir.join(name), bytes).expect("write seed");
}

fn main() {
    write("record_decode", "complete-record", &record(1, 0, Kind::Complete, b"order-42", b"201 Created"));
    write("record_decode", "claim-record-empty-value", &record(7, 0, Kind::Claim, b"k", b""));
    write("record_decode", "checkpoint-fix-crc", &record(3, 1, Kind::Checkpoint, b"key", b"phase-2"));
    write("record_decode", "remove-long-key-fix-crc", &record(9, 1, Kind::Remove, &[b'k'; 300], b""));
    let mut flipped = record(1, 0, Kind::Release, b"key", b"");
    flipped[5 + 20] ^= 0x10;
    write("record_decode", "release-flipped-seq", &flipped);
    let mut torn = record(2, 0, Kind::Complete, b"key", &[b'v'; 64]);
    torn.truncate(5 + 120);
    write("record_decode", "complete-torn", &torn);
    write("record_decode", "zeros", &[0u8; 5 + 128]);

    for variant in 0..4u8 {
        write("recover", &format!("undamaged-variant-{variant}"), &recover_input(variant, &[]));
    }
    write("recover", "flip-mid-file", &recover_input(0, &[Damage::Flip { file: 0, offset: 300, mask: 0x04 }]));
    write("recover", "flip-small-segments", &recover_input(1, &[Damage::Flip { file: 3, offset: 200, mask: 0xff }]));
    write("recover", "truncate-tail", &recover_input(0, &[Damage::Truncate { file: 1, len: 500 }]));
    write("recover", "zero-range", &recover_input(1, &[Damage::Zero { file: 2, offset: 64, len: 96 }]));
    write(
        "recover",
        "copy-record-within-file",
        &recover_input(0, &[Damage::Copy { src: 0, src_offset: 64, dst: 0, dst_offset: 1024, len: 200 }]),
    );
    write(
        "recover",
        "copy-record-across-files",
        &recover_input(1, &[Damage::Copy { src: 0, src_offset: 64, dst: 1, dst_offset: 64, len: 160 }]),
    );
    write("recover", "newer-version", &recover_input(0, &[Damage::Version { file: 0, version: 2 }]));
    write("recover", "delete-file", &recover_input(3, &[Damage::Delete { file: 1 }]));
    write(
        "recover",
        "several-damages",
        &recover_input(
            2,
            &[
                Damage::Truncate { file: 0, len: 700 },
                Damage::Flip { file: 1, offset: 9, mask: 1 },
                Damage::Zero { file: 2, offset: 0, len: 64 },
            ],
        ),
    );

    for (i, len) in [64usize, 256, 512, 1024, 2048].into_iter().enumerate() {
        let mut input = noise(i as u64 + 1, len);
        input[0] = (i % 2) as u8;
        write("ops_model", &format!("noise-{len}-bytes{}", if i % 2 == 1 { "-colliding" } else { "" }), &input);
    }
}
