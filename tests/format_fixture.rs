//! Promise: a store written by an earlier build keeps reading, with the same answers.
//!
//! `tests/fixtures/v1/` is a small store written by `examples/format_fixture.rs` with the code
//! of format version 1: segments, a sealed table, `TIME` and `LOCK`. A later format change must
//! keep reading it (or refuse it with `Error::UnsupportedVersion`), never misread it. The
//! record layout is pinned byte for byte by a golden record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use idemstore::internals::{Header, Kind, decode, encode};
use idemstore::{Claim, Durability, Entry, ManualClock, Options, Store, ms_to_system_time};

/// The store time the fixtures were written at (`FIXTURE_MS` in the generator).
const FIXTURE_MS: u64 = 1_700_000_000_000;
/// The generator advanced its clock by 120 s before sealing.
const AFTER_SEAL_MS: u64 = FIXTURE_MS + 120_000;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A copy of fixture `name` in a temporary directory (opening a store for writing changes it).
fn copy_of(name: &str) -> tempfile::TempDir {
    let copy = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(fixture(name)).expect("read fixture") {
        let entry = entry.expect("fixture entry");
        std::fs::copy(entry.path(), copy.path().join(entry.file_name())).expect("copy fixture file");
    }
    copy
}

/// Every file of `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| {
            let e = e.expect("entry");
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).expect("read file"))
        })
        .collect()
}

/// Options at a time shortly after the fixture was written.
fn options() -> Options {
    Options {
        durability: Durability::None,
        background: false,
        clock: ManualClock::new(FIXTURE_MS + 600_000),
        ..Options::default()
    }
}

fn request(key: &str) -> Vec<u8> {
    format!("request of {key}").into_bytes()
}

/// The answers the generator's script leaves, read through `get` (no write).
fn assert_known_entries(store: &Store) {
    for (key, claimed_ms) in [("done-1", FIXTURE_MS), ("done-2", FIXTURE_MS), ("done-3", AFTER_SEAL_MS)] {
        match store.get(key).expect("get") {
            Some(Entry::Completed(done)) => {
                assert_eq!(done.outcome, format!("outcome of {key}").into_bytes(), "{key}");
                assert_eq!(done.claimed_at, ms_to_system_time(claimed_ms), "{key}");
                assert_eq!(done.completed_at, ms_to_system_time(claimed_ms), "{key}");
                assert_eq!(done.expires_at, ms_to_system_time(claimed_ms + 24 * 3600 * 1000), "{key}");
            }
            other => panic!("{key}: expected its outcome, got {other:?}"),
        }
    }
    match store.get("flying").expect("get") {
        Some(Entry::InFlight { checkpoint, orphaned, claimed_at, .. }) => {
            assert_eq!(checkpoint.as_deref(), Some(&b"phase-2"[..]));
            assert!(orphaned, "its holder was the generator's process");
            assert_eq!(claimed_at, ms_to_system_time(AFTER_SEAL_MS));
        }
        other => panic!("flying: expected in flight, got {other:?}"),
    }
    for key in ["removed", "released", "never-claimed"] {
        assert!(store.get(key).expect("get").is_none(), "{key} is absent");
    }
}

#[test]
fn the_v1_fixture_holds_segments_a_sealed_table_time_and_lock() {
    let names: Vec<String> = snapshot(&fixture("v1")).into_keys().collect();
    assert_eq!(names, ["00000001.seg", "00000001.tbl", "00000002.seg", "LOCK", "TIME"]);
}

#[test]
fn a_v1_store_opens_with_its_known_answers() {
    let dir = copy_of("v1");
    let store = Store::open(dir.path(), options()).expect("open the v1 fixture");
    let recovery = store.stats().recovery;
    assert!(recovery.tables_loaded >= 1, "the sealed key is read through its table: {recovery:?}");
    assert_eq!(recovery.tables_rebuilt, 0, "{recovery:?}");
    assert_known_entries(&store);
    let orphans = store.orphans().expect("orphans");
    assert_eq!(orphans.len(), 1, "{orphans:?}");
    assert_eq!(orphans[0].key, b"flying");
    assert_eq!(orphans[0].checkpoint.as_deref(), Some(&b"phase-2"[..]));
    // Replays of the sealed and the unsealed keys, and a takeover of the orphan.
    for key in ["done-1", "done-3"] {
        match store.claim(key, request(key)).expect("claim") {
            Claim::Completed(done) => assert_eq!(done.outcome, format!("outcome of {key}").into_bytes()),
            other => panic!("{key}: expected a replay, got {other:?}"),
        }
    }
    assert!(matches!(store.claim("done-1", "another request").expect("claim"), Claim::Mismatch));
    match store.claim("flying", request("flying")).expect("claim") {
        Claim::Acquired(token) => {
            assert!(token.recovered());
            assert_eq!(token.checkpoint(), Some(&b"phase-2"[..]));
        }
        other => panic!("flying: expected a takeover, got {other:?}"),
    }
    assert!(matches!(store.claim("released", request("released")).expect("claim"), Claim::Acquired(_)));
}

#[test]
fn a_read_only_view_of_the_v1_fixture_changes_no_byte() {
    let before = snapshot(&fixture("v1"));
    let view = Store::open_read_only_with(fixture("v1"), options()).expect("open a view of the v1 fixture");
    assert_known_entries(&view);
    assert!(view.stats().recovery.tables_loaded >= 1);
    view.close().expect("close");
    assert_eq!(snapshot(&fixture("v1")), before, "the view changed the fixture");
}

/// A record with every field set to a distinct value: its bytes below are the format.
fn golden_header() -> Header {
    Header {
        kind: Kind::Complete,
        key_len: 10,
        value_len: 12,
        seq: 0x0102_0304_0506_0708,
        expires_at_ms: FIXTURE_MS + 86_400_000,
        claimed_at_ms: FIXTURE_MS,
        lease_until_ms: FIXTURE_MS + 30_000,
        token: 0x1112_1314_1516_1718,
        incarnation: 0x2122_2324_2526_2728,
        request_hash: 0x3132_3334_3536_3738_393a_3b3c_3d3e_3f40,
        written_at_ms: FIXTURE_MS + 5,
        lease_ms: 30_000,
    }
}

/// `golden_header()` with key `golden-key` and value `golden-value`, in segment 7.
const GOLDEN_RECORD: &str = concat!(
    "0dd5c4a3",                         // crc32 of bytes 4..len, seeded with the segment id
    "76000000",                         // len 118
    "03",                               // kind 3: complete
    "00",                               // flags
    "0a00",                             // key_len 10
    "0c000000",                         // value_len 12
    "0807060504030201",                 // seq
    "00c40bd58b010000",                 // expires_at_ms
    "0068e5cf8b010000",                 // claimed_at_ms
    "30dde5cf8b010000",                 // lease_until_ms
    "1817161514131211",                 // token
    "2827262524232221",                 // incarnation
    "403f3e3d3c3b3a393837363534333231", // request hash
    "0568e5cf8b010000",                 // written_at_ms
    "30750000",                         // lease_ms
    "00000000",                         // reserved
    "676f6c64656e2d6b6579",             // key
    "676f6c64656e2d76616c7565",         // value
    "0000",                             // padding to 8 bytes
);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_record_encodes_to_the_golden_bytes() {
    let mut out = Vec::new();
    encode(7, &golden_header(), b"golden-key", b"golden-value", &mut out);
    assert_eq!(hex(&out), GOLDEN_RECORD);
    let (header, key, value) = decode(7, &out).expect("decode the golden record");
    assert_eq!((header, key, value), (golden_header(), &b"golden-key"[..], &b"golden-value"[..]));
}
