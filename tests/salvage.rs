//! Promise: one bad record does not keep a store shut for good. `Store::open` refuses it
//! (`Error::Corrupt`, nothing dropped), and the operator's `salvage` keeps every record that
//! checks out, moves the damaged file to `quarantine/`, and names what was lost; the store then
//! opens and every undamaged key replays its outcome. A live store is refused.
#![cfg(feature = "cli")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use idemstore::{Claim, Entry, Error, ManualClock, Options, SalvageOptions, Store};

mod common;
use common::acquired;

/// 2100-01-01: nothing has expired by the (real) time the tools read the store.
const START_MS: u64 = 4_102_444_800_000;
const KEYS: usize = 20;

fn options(clock: &Arc<ManualClock>) -> Options {
    Options { segment_bytes_initial: 4096, ..common::options(clock) }
}

fn idemstore(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idemstore")).args(args).output().expect("run the idemstore binary")
}

/// A closed store with `KEYS` completed keys; returns its segment and the offset of the
/// complete record of `key-7` (a record in the middle).
fn damaged_store(dir: &Path) -> (PathBuf, usize) {
    let clock = ManualClock::new(START_MS);
    let store = Store::open(dir, options(&clock)).unwrap();
    for i in 0..KEYS {
        let token = acquired(store.claim(format!("key-{i}"), "request").unwrap());
        store.complete(&token, format!("outcome {i}")).unwrap();
    }
    store.close().unwrap();
    // As after a crash before the segment's restart table was written: the open scans the
    // segment (with a table, the damaged record would be Corrupt only when read).
    std::fs::remove_file(dir.join("00000001.tbl")).unwrap();
    let segment = dir.join("00000001.seg");
    let mut bytes = std::fs::read(&segment).unwrap();
    // Records: claim, complete, claim, complete...: key-7's complete is the 16th.
    let (at, len) = common::record_offsets(&bytes)[15];
    assert_eq!(&bytes[at + 96..at + 96 + 5], b"key-7");
    // A byte of its outcome: the header and key still read.
    bytes[at + len - 2] ^= 0x01;
    std::fs::write(&segment, bytes).unwrap();
    (segment, at)
}

#[test]
fn salvage_keeps_every_record_that_checks_out_and_names_the_lost_key() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let (segment, at) = damaged_store(dir.path());
    let original = std::fs::read(&segment).unwrap();
    match Store::open(dir.path(), options(&clock)) {
        Err(Error::Corrupt { offset, .. }) => assert_eq!(offset, at as u64),
        other => panic!("a damaged middle record must keep the store shut, got {other:?}"),
    }

    let report = idemstore::salvage(dir.path(), &SalvageOptions::default()).unwrap();
    let file = report.files.iter().find(|f| f.path == segment).expect("the segment is salvaged");
    assert_eq!(file.records_kept, 2 * KEYS as u64 - 1, "{report:?}");
    assert_eq!(file.records_lost, 1, "{report:?}");
    assert_eq!(file.lost_ranges.len(), 1, "{report:?}");
    assert_eq!(file.lost_ranges[0].0, at as u64, "{report:?}");
    assert_eq!(file.lost_records.len(), 1, "{report:?}");
    assert_eq!((file.lost_records[0].key.as_slice(), file.lost_records[0].kind), (&b"key-7"[..], "complete"));
    let moved = dir.path().join("quarantine/00000001.seg");
    assert_eq!(file.quarantined.as_deref(), Some(moved.as_path()));
    assert_eq!(std::fs::read(&moved).unwrap(), original, "the original is kept whole");

    let store = Store::open(dir.path(), options(&clock)).expect("the salvaged store opens");
    for i in (0..KEYS).filter(|&i| i != 7) {
        match store.claim(format!("key-{i}"), "request").unwrap() {
            Claim::Completed(done) => assert_eq!(done.outcome, format!("outcome {i}").as_bytes()),
            other => panic!("key-{i} must replay its outcome, got {other:?}"),
        }
    }
    // key-7's claim survived, its complete did not: it reads as in flight, as the report says.
    assert!(matches!(store.get("key-7").unwrap(), Some(Entry::InFlight { .. })));
    store.close().unwrap();
    assert!(Store::verify(dir.path()).unwrap().is_clean());
}

#[test]
fn salvage_from_the_command_line_reports_the_lost_key_and_a_dry_run_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (segment, at) = damaged_store(dir.path());
    let before = common::files(dir.path());

    let out = idemstore(&["salvage", d, "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("lost record at offset") && text.contains("complete of key key-7"), "{text}");
    assert!(text.contains("dry run: 1 records lost in all"), "{text}");
    let mut after = common::files(dir.path());
    after.retain(|p, _| p.file_name().is_some_and(|n| n != idemstore::LOCK_FILE_NAME));
    let mut before_no_lock = before;
    before_no_lock.retain(|p, _| p.file_name().is_some_and(|n| n != idemstore::LOCK_FILE_NAME));
    assert_eq!(after, before_no_lock, "a dry run changes nothing");

    let out = idemstore(&["salvage", d]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(&format!("lost bytes {at}..")), "{text}");
    assert!(text.contains("records kept: 39, records lost: 1"), "{text}");
    assert!(segment.exists() && dir.path().join("quarantine/00000001.seg").exists());
    let out = idemstore(&["verify", d]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn salvage_refuses_a_live_store() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = Store::open(dir.path(), options(&clock)).unwrap();
    let token = acquired(store.claim("k", "r").unwrap());
    store.complete(&token, "o").unwrap();
    assert!(matches!(idemstore::salvage(dir.path(), &SalvageOptions::default()), Err(Error::Locked { .. })));
    let out = idemstore(&["salvage", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("open in another process"));
}

/// A header that salvage rebuilds from the records gets a guessed, narrower bucket, so the
/// segment could sort behind an older segment of its original bucket among the sealed tables
/// (newest first by bucket end): it is never given a table, and a reopen after a clean close
/// (which writes tables) still answers from its newest records.
#[test]
fn a_segment_whose_header_salvage_rebuilt_is_never_outranked_by_an_older_table() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS + 5_000);
    let options = || Options {
        segment_bytes_initial: 4096,
        segment_bytes_max: 16 << 10,
        active_bytes_max: 4096,
        max_outcome_len: 1024,
        bucket_width: std::time::Duration::from_secs(60),
        default_ttl: std::time::Duration::from_secs(30),
        ..common::options(&clock)
    };
    let store = Store::open(dir.path(), options()).unwrap();
    let token = acquired(store.claim("K", "request").unwrap());
    store.complete(&token, "K done").unwrap();
    // Fill until the active budget retires segment 1 and the bucket goes on in segment 2.
    let mut i = 0;
    while !dir.path().join("00000002.seg").exists() {
        let token = acquired(store.claim(format!("filler-{i}"), "request").unwrap());
        store.complete(&token, vec![b'f'; 200]).unwrap();
        i += 1;
    }
    clock.advance(std::time::Duration::from_secs(5));
    store.remove("K").unwrap(); // its tombstone lies in segment 2, same bucket
    store.close().unwrap();
    let path = dir.path().join("00000002.seg");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[30] ^= 0xFF; // segment 2's bucket end: the header fails its checksum
    std::fs::write(&path, bytes).unwrap();
    assert!(matches!(Store::open(dir.path(), options()), Err(Error::Corrupt { .. })));

    idemstore::salvage(dir.path(), &SalvageOptions::default()).unwrap();
    for open in 1..=2 {
        let store = Store::open(dir.path(), options()).unwrap();
        assert_eq!(store.get("K").unwrap(), None, "open {open}: the removed key came back");
        store.close().unwrap();
    }
}
