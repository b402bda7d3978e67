//! Promise: a store written by an earlier build keeps reading, with the same answers.
//!
//! `tests/fixtures/v1/` and `v2/` are small stores written by `examples/format_fixture.rs` with
//! the code of format versions 1 (unkeyed index hash, no `META`) and 2 (`META` holding the
//! secret of a keyed index hash): segments, a sealed table, `TIME` and `LOCK`. A later format
//! change must keep reading them (or refuse them with `Error::UnsupportedVersion`), never
//! misread them. The record layout is pinned byte for byte by a golden record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// The fixtures, each with the files beside its segments that its version has.
const FIXTURES: [(&str, &[&str]); 2] = [("v1", &["LOCK", "TIME"]), ("v2", &["LOCK", "META", "TIME"])];

#[test]
fn each_fixture_holds_segments_a_sealed_table_and_its_versions_files() {
    for (name, extra) in FIXTURES {
        let names: Vec<String> = snapshot(&fixture(name)).into_keys().collect();
        let mut expected = vec!["00000001.seg", "00000001.tbl", "00000002.seg"];
        expected.extend_from_slice(extra);
        assert_eq!(names, expected, "{name}");
    }
}

/// Opens `dir` for writing and checks the fixture's answers, through its sealed table.
fn assert_opens_with_known_answers(dir: &Path) {
    let store = Store::open(dir, options()).expect("open the fixture");
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
fn a_v1_store_opens_with_its_known_answers() {
    let dir = copy_of("v1");
    assert_opens_with_known_answers(dir.path());
}

#[test]
fn a_v2_store_opens_with_its_known_answers() {
    let dir = copy_of("v2");
    assert_opens_with_known_answers(dir.path());
}

#[test]
fn a_read_only_view_of_each_fixture_changes_no_byte() {
    for (name, _) in FIXTURES {
        let before = snapshot(&fixture(name));
        let view = Store::open_read_only_with(fixture(name), options()).expect("open a view of the fixture");
        assert_known_entries(&view);
        assert!(view.stats().recovery.tables_loaded >= 1, "{name}");
        view.close().expect("close");
        assert_eq!(snapshot(&fixture(name)), before, "the view changed the {name} fixture");
    }
}

/// Seals a new key into a new table of the store in `dir`, reopens it, and checks that every
/// table loads as it is (the new ones made with the same hash as the fixture's).
fn seal_a_new_key_and_reopen(dir: &Path) {
    let clock = ManualClock::new(FIXTURE_MS + 600_000);
    let options = Options { clock: clock.clone(), seal_idle_after: Duration::from_secs(60), ..options() };
    let store = Store::open(dir, options.clone()).expect("open");
    let Claim::Acquired(token) = store.claim("new-key", "new request").expect("claim") else { panic!("a new key") };
    store.complete(&token, "new outcome").expect("complete");
    clock.advance(Duration::from_secs(120));
    store.maintain().expect("maintain");
    // The fixture's table, and those of the segments written since.
    let tables = store.stats().sealed_tables;
    assert!(tables >= 2, "{tables} tables");
    store.close().expect("close");
    let store = Store::open(dir, options).expect("reopen");
    let recovery = store.stats().recovery;
    assert_eq!((recovery.tables_loaded, recovery.tables_rebuilt), (tables, 0), "{recovery:?}");
    assert_known_entries(&store);
    assert!(matches!(store.get("new-key").expect("get"), Some(Entry::Completed(_))));
}

#[test]
fn a_v1_store_never_gets_a_meta_and_its_new_tables_stay_unkeyed() {
    let dir = copy_of("v1");
    seal_a_new_key_and_reopen(dir.path());
    assert!(!dir.path().join("META").exists(), "a v1 store was given a META");
}

#[test]
fn a_v2_store_keeps_its_secret_for_its_new_tables() {
    let dir = copy_of("v2");
    let meta = std::fs::read(dir.path().join("META")).expect("read META");
    seal_a_new_key_and_reopen(dir.path());
    assert_eq!(std::fs::read(dir.path().join("META")).expect("read META"), meta, "META was rewritten");
}

/// The META of a new store (a secret of its own).
fn fresh_meta() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    Store::open(dir.path(), options()).expect("open").close().expect("close");
    std::fs::read(dir.path().join("META")).expect("read META")
}

/// Opens `dir`, whose table was made with another hash than the store now uses: the table must
/// be set aside and its segment scanned, with the same answers.
fn assert_table_rebuilt_with_known_answers(dir: &Path, case: &str) {
    let store = Store::open(dir, options()).unwrap_or_else(|e| panic!("{case}: open: {e}"));
    let recovery = store.stats().recovery;
    assert_eq!((recovery.tables_loaded, recovery.tables_rebuilt), (0, 1), "{case}: {recovery:?}");
    assert_known_entries(&store);
}

#[test]
fn a_table_is_trusted_only_with_the_hash_it_was_made_with() {
    // A keyed store whose META is gone reads as version 1 (unkeyed): its keyed table is useless.
    let dir = copy_of("v2");
    std::fs::remove_file(dir.path().join("META")).expect("remove META");
    assert_table_rebuilt_with_known_answers(dir.path(), "v2 without its META");
    // A keyed store given another store's secret: its table was made with the old one.
    let dir = copy_of("v2");
    std::fs::write(dir.path().join("META"), fresh_meta()).expect("write META");
    assert_table_rebuilt_with_known_answers(dir.path(), "v2 with another secret");
    // A v1 store given a secret: its table holds unkeyed hashes.
    let dir = copy_of("v1");
    std::fs::write(dir.path().join("META"), fresh_meta()).expect("write META");
    assert_table_rebuilt_with_known_answers(dir.path(), "v1 with a secret");
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
