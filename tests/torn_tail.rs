//! Promise: a torn tail is truncated, never an error (ARCHITECTURE.md, "Recovery").
//!
//! A store writes some records, closes, forgets how far it was durable (its `MARKS` file: a
//! torn write is one no sync covered), and then its segment is cut at every byte offset inside
//! its last record, both as a preallocated file whose bytes after the cut read as zeros and as a
//! file really truncated there. Each time `Store::open` succeeds, every earlier record is intact,
//! the last operation is absent, `stats().recovery.torn_bytes_truncated` counts the cut bytes,
//! and a second open finds a clean file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use idemstore::{Claim, Entry, ManualClock, Options, Store};

mod common;
use common::{START_MS, acquired};

fn options(clock: &Arc<ManualClock>) -> Options {
    Options { segment_bytes_initial: 4096, ..common::options(clock) }
}

/// What the last operation before the cut was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LastOp {
    /// A claim of the new key `last`.
    ClaimOfANewKey,
    /// The complete of `k3`, with a 100-byte outcome.
    CompleteOfAnInFlightKey,
}

/// How the tail is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// The file keeps its length; bytes from the cut on are zero (a preallocated region).
    ZeroFill,
    /// The file ends at the cut.
    Truncate,
}

/// Writes the earlier records and the last one; returns the segment file, the offset and the
/// length (without padding) of its last record.
fn write_records(dir: &Path, clock: &Arc<ManualClock>, last: LastOp) -> (PathBuf, u64, u64) {
    let store = Store::open(dir, options(clock)).unwrap();
    let mut tokens = Vec::new();
    for i in 0..4 {
        tokens.push(acquired(store.claim(format!("k{i}"), format!("request {i}")).unwrap()));
    }
    store.complete(&tokens[0], b"outcome 0").unwrap();
    store.complete(&tokens[1], b"outcome 1").unwrap();
    store.checkpoint(&tokens[2], b"phase 2").unwrap();
    match last {
        LastOp::ClaimOfANewKey => drop(acquired(store.claim("last", b"last request").unwrap())),
        LastOp::CompleteOfAnInFlightKey => store.complete(&tokens[3], [0xa5u8; 100]).unwrap(),
    }
    store.close().unwrap();
    // A clean close writes the segment a table (only after syncing it, so a table never
    // outlives the tail it points at). These cases stand for a crash before any table was
    // written, when the segment is scanned: the table goes.
    for table in files(dir).into_keys().filter(|p| p.extension().is_some_and(|e| e == "tbl")) {
        std::fs::remove_file(table).unwrap();
    }
    // A closed store marks its last record durable (`MARKS`), and damage below that mark is
    // corruption, not a torn tail (tests/durable_marks.rs). A torn tail is a write that was
    // never made durable, as when the process dies before the sync: the mark then stops
    // before the last record. Without the file, no record is known durable.
    std::fs::remove_file(dir.join("MARKS")).unwrap();

    let segments: Vec<PathBuf> = files(dir).into_keys().filter(|p| p.extension().is_some_and(|e| e == "seg")).collect();
    assert_eq!(segments.len(), 1, "all records in one segment: {segments:?}");
    let bytes = std::fs::read(&segments[0]).unwrap();
    let records = record_offsets(&bytes);
    assert_eq!(records.len(), 8, "4 claims, 2 completes, 1 checkpoint, the last op");
    let (offset, len) = *records.last().unwrap();
    (segments[0].clone(), offset, len)
}

/// (offset, length) of every record of a segment, as `u64`s.
fn record_offsets(bytes: &[u8]) -> Vec<(u64, u64)> {
    common::record_offsets(bytes).into_iter().map(|(at, len)| (at as u64, len as u64)).collect()
}

/// Every file of the store directory but the lock file, with its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = common::files(dir);
    files.retain(|p, _| p.file_name().is_some_and(|n| n != idemstore::LOCK_FILE_NAME));
    files
}

fn restore(dir: &Path, pristine: &BTreeMap<PathBuf, Vec<u8>>) {
    for path in files(dir).into_keys() {
        std::fs::remove_file(path).unwrap();
    }
    for (path, bytes) in pristine {
        std::fs::write(path, bytes).unwrap();
    }
}

fn cut_file(segment: &Path, at: u64, cut: Cut) {
    match cut {
        Cut::ZeroFill => {
            let mut bytes = std::fs::read(segment).unwrap();
            bytes[at as usize..].fill(0);
            std::fs::write(segment, bytes).unwrap();
        }
        Cut::Truncate => std::fs::OpenOptions::new().write(true).open(segment).unwrap().set_len(at).unwrap(),
    }
}

/// Every record before the last is there; the last operation is not.
fn check_state(store: &Store, last: LastOp, context: &str) {
    for i in 0..2 {
        match store.claim(format!("k{i}"), format!("request {i}")).unwrap() {
            Claim::Completed(done) => assert_eq!(done.outcome, format!("outcome {i}").as_bytes(), "{context}"),
            other => panic!("{context}: k{i} should replay its outcome, got {other:?}"),
        }
    }
    match store.get("k2").unwrap() {
        Some(Entry::InFlight { checkpoint, .. }) => {
            assert_eq!(checkpoint.as_deref(), Some(&b"phase 2"[..]), "{context}")
        }
        other => panic!("{context}: k2 should be in flight with its checkpoint, got {other:?}"),
    }
    assert!(
        matches!(store.get("k3").unwrap(), Some(Entry::InFlight { .. })),
        "{context}: k3 must be in flight (its complete, if it was the last op, is torn)"
    );
    if last == LastOp::ClaimOfANewKey {
        assert_eq!(store.get("last").unwrap(), None, "{context}: the torn claim must be absent");
    }
}

fn cut_at_every_offset_of_the_last_record(last: LastOp) {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let (segment, record_at, record_len) = write_records(dir.path(), &clock, last);
    let pristine = files(dir.path());
    let record = &pristine[&segment][record_at as usize..(record_at + record_len) as usize];

    for cut in [Cut::ZeroFill, Cut::Truncate] {
        for kept in 0..record_len {
            let context = format!("{last:?}, {cut:?}, {kept} of {record_len} bytes of the last record kept");
            restore(dir.path(), &pristine);
            cut_file(&segment, record_at + kept, cut);
            let garbage = record[..kept as usize].iter().any(|&b| b != 0);

            let store =
                Store::open(dir.path(), options(&clock)).unwrap_or_else(|e| panic!("{context}: open failed: {e}"));
            let recovery = store.stats().recovery;
            if garbage {
                assert!(recovery.torn_bytes_truncated > 0, "{context}: torn bytes not counted: {recovery:?}");
                assert_eq!(recovery.torn_tails, 1, "{context}");
            }
            assert!(recovery.torn_bytes_truncated <= kept, "{context}: counted more than was left: {recovery:?}");
            check_state(&store, last, &context);
            store.close().unwrap();

            let store =
                Store::open(dir.path(), options(&clock)).unwrap_or_else(|e| panic!("{context}: reopen failed: {e}"));
            assert_eq!(store.stats().recovery.torn_bytes_truncated, 0, "{context}: the second open must be clean");
            check_state(&store, last, &context);
            // The store takes writes again where the torn record was lost.
            match last {
                LastOp::ClaimOfANewKey => drop(acquired(store.claim("last", b"last request").unwrap())),
                LastOp::CompleteOfAnInFlightKey => {
                    assert!(acquired(store.claim("k3", b"request 3").unwrap()).recovered(), "{context}");
                }
            }
            store.close().unwrap();
        }
    }
}

#[test]
fn torn_claim_of_a_new_key_is_truncated_at_every_offset() {
    cut_at_every_offset_of_the_last_record(LastOp::ClaimOfANewKey);
}

#[test]
fn torn_complete_of_an_in_flight_key_is_truncated_at_every_offset() {
    cut_at_every_offset_of_the_last_record(LastOp::CompleteOfAnInFlightKey);
}

#[test]
fn uncut_file_reopens_with_the_last_operation_and_no_torn_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    write_records(dir.path(), &clock, LastOp::CompleteOfAnInFlightKey);
    let store = Store::open(dir.path(), options(&clock)).unwrap();
    assert_eq!(store.stats().recovery.torn_bytes_truncated, 0);
    let Some(Entry::Completed(done)) = store.get("k3").unwrap() else { panic!("the last complete survives") };
    assert_eq!(done.outcome, [0xa5u8; 100]);
}
