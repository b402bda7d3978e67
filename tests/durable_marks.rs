//! Promise: damage to a record the store had made durable is `Error::Corrupt`, never dropped
//! as a torn tail; a write that never finished is still truncated.
//!
//! A bad record at the end of a segment looks the same whether the last write was cut short
//! (nobody was answered from it) or an acknowledged record went bad later (dropping it brings a
//! completed payout back as in flight, a removed key back to life). The store records how far
//! each segment is durable (`MARKS`, raised after every sync and synced at close), and recovery
//! refuses damage below that mark.
//!
//! The "kill" here is a copy of the directory taken while the writer is alive: exactly the
//! page cache that a SIGKILL leaves behind, including the marks written since the last sync.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use idemstore::{Claim, Durability, Entry, Error, ManualClock, Options, Store};

mod common;
use common::acquired;

/// 2100-01-01: no record has expired by the (real) time `verify` reads the store.
const START_MS: u64 = 4_102_444_800_000;

fn options(clock: &Arc<ManualClock>, durability: Durability) -> Options {
    Options { durability, segment_bytes_initial: 4096, ..common::options(clock) }
}

/// Writes a payout that completed and a key that was removed, the removal last.
fn write_payouts(store: &Store) {
    let token = acquired(store.claim("payout-1", "pay 10").unwrap());
    store.complete(&token, "paid: tx 77").unwrap();
    let token = acquired(store.claim("refund-1", "refund 5").unwrap());
    store.complete(&token, "refunded").unwrap();
    let token = acquired(store.claim("payout-2", "pay 20").unwrap());
    store.complete(&token, "paid: tx 78").unwrap();
    store.remove("refund-1").unwrap();
}

fn segment_of(dir: &Path) -> PathBuf {
    let segments: Vec<PathBuf> =
        common::files(dir).into_keys().filter(|p| p.extension().is_some_and(|e| e == "seg")).collect();
    assert_eq!(segments.len(), 1, "{segments:?}");
    segments[0].clone()
}

/// (offset, length) of the last record of `segment`.
fn last_record(segment: &Path) -> (usize, usize) {
    *common::record_offsets(&std::fs::read(segment).unwrap()).last().expect("records")
}

fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

/// Copies every file of `from` (but the lock) into `to`: what a process killed now leaves.
fn copy_as_killed(from: &Path, to: &Path) {
    for (path, bytes) in common::files(from) {
        let name = path.file_name().unwrap();
        if name != idemstore::LOCK_FILE_NAME {
            std::fs::write(to.join(name), bytes).unwrap();
        }
    }
}

fn expect_corrupt_at(dir: &Path, clock: &Arc<ManualClock>, segment: &Path, at: usize) {
    let before = common::files(dir);
    match Store::open(dir, options(clock, Durability::Sync)) {
        Err(Error::Corrupt { file, offset, .. }) => {
            assert_eq!(file, segment);
            assert_eq!(offset, at as u64);
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        // A segment with a restart table (a clean close writes one) is not scanned at open:
        // its records are checked when read, and the damaged one is Corrupt then.
        Ok(store) => {
            assert_eq!(store.stats().recovery.torn_bytes_truncated, 0, "nothing was truncated");
            match store.get("refund-1") {
                Err(Error::Corrupt { file, offset, .. }) => assert_eq!((file.as_path(), offset), (segment, at as u64)),
                other => panic!("damage to a durable record was taken for a torn tail: refund-1 reads {other:?}"),
            }
            drop(store);
            // Only the files an open writes (the time floor, the marks) may have changed.
            let mut after = common::files(dir);
            after.retain(|p, _| p.extension().is_some_and(|e| e == "seg"));
            let mut before = before;
            before.retain(|p, _| p.extension().is_some_and(|e| e == "seg"));
            assert_eq!(after, before, "the open truncated nothing");
            return;
        }
    }
    let mut after = common::files(dir);
    after.retain(|p, _| p.file_name().is_some_and(|n| n != idemstore::LOCK_FILE_NAME));
    let mut before = before;
    before.retain(|p, _| p.file_name().is_some_and(|n| n != idemstore::LOCK_FILE_NAME));
    assert_eq!(after, before, "a refused open truncated nothing");
}

#[test]
fn a_flipped_byte_in_the_last_record_of_a_closed_store_is_corrupt_not_a_torn_tail() {
    for durability in [Durability::Sync, Durability::None] {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(START_MS);
        let store = Store::open(dir.path(), options(&clock, durability)).unwrap();
        write_payouts(&store);
        store.close().unwrap();
        let segment = segment_of(dir.path());
        let (at, len) = last_record(&segment);
        // One byte near the end of the removal's record.
        flip(&segment, at + len - 3);
        expect_corrupt_at(dir.path(), &clock, &segment, at);
        let report = Store::verify(dir.path()).unwrap();
        assert!(!report.is_clean(), "{durability:?}: verify must see it: {report:?}");
    }
}

/// A `Sync` store whose every call returned after its sync, copied as its writer died then
/// (with nothing unsynced): the copy's directory.
fn killed_synced_store(clock: &Arc<ManualClock>) -> tempfile::TempDir {
    let live = tempfile::tempdir().unwrap();
    let killed = tempfile::tempdir().unwrap();
    let store = Store::open(live.path(), options(clock, Durability::Sync)).unwrap();
    write_payouts(&store);
    copy_as_killed(live.path(), killed.path());
    drop(store);
    killed
}

#[test]
fn a_flipped_byte_in_the_last_record_of_a_synced_sync_store_is_corrupt_after_a_kill() {
    let clock = ManualClock::new(START_MS);
    let killed = killed_synced_store(&clock);
    let segment = segment_of(killed.path());
    let (at, len) = last_record(&segment);
    flip(&segment, at + len - 3);
    expect_corrupt_at(killed.path(), &clock, &segment, at);
}

#[test]
fn a_torn_tail_after_a_kill_is_still_truncated() {
    let clock = ManualClock::new(START_MS);
    let killed = killed_synced_store(&clock);
    // The next write was cut short by the kill: half a record past the durable mark.
    let segment = segment_of(killed.path());
    let (at, len) = last_record(&segment);
    let mut bytes = std::fs::read(&segment).unwrap();
    let half: Vec<u8> = bytes[at..at + len / 2].to_vec();
    let next = at + len.next_multiple_of(8);
    bytes[next..next + half.len()].copy_from_slice(&half);
    std::fs::write(&segment, bytes).unwrap();

    let store = Store::open(killed.path(), options(&clock, Durability::Sync)).unwrap();
    assert!(store.stats().recovery.torn_bytes_truncated > 0, "{:?}", store.stats().recovery);
    match store.claim("payout-1", "pay 10").unwrap() {
        Claim::Completed(done) => assert_eq!(done.outcome, b"paid: tx 77"),
        other => panic!("payout-1 must replay, got {other:?}"),
    }
    assert_eq!(store.get("refund-1").unwrap(), None, "the removal stands");
    assert!(matches!(store.get("payout-2").unwrap(), Some(Entry::Completed(_))));
}

#[test]
fn a_store_without_marks_still_truncates_a_bad_last_record() {
    // Stores written before `MARKS` existed behave as they did.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = Store::open(dir.path(), options(&clock, Durability::Sync)).unwrap();
    write_payouts(&store);
    store.close().unwrap();
    std::fs::remove_file(dir.path().join("MARKS")).unwrap();
    // As after a crash before a restart table was written: the segment is scanned at open.
    for table in common::files(dir.path()).into_keys().filter(|p| p.extension().is_some_and(|e| e == "tbl")) {
        std::fs::remove_file(table).unwrap();
    }
    let segment = segment_of(dir.path());
    let (at, len) = last_record(&segment);
    flip(&segment, at + len - 3);
    let store = Store::open(dir.path(), options(&clock, Durability::Sync)).unwrap();
    assert!(store.stats().recovery.torn_bytes_truncated > 0);
}

#[test]
fn a_damaged_marks_file_is_ignored_and_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = Store::open(dir.path(), options(&clock, Durability::Sync)).unwrap();
    write_payouts(&store);
    store.close().unwrap();
    flip(&dir.path().join("MARKS"), 17);
    let report = Store::verify(dir.path()).unwrap();
    assert!(!report.is_clean(), "a torn MARKS is reported: {report:?}");
    let store = Store::open(dir.path(), options(&clock, Durability::Sync)).unwrap();
    assert!(matches!(store.get("payout-2").unwrap(), Some(Entry::Completed(_))));
    store.close().unwrap();
    assert!(Store::verify(dir.path()).unwrap().is_clean(), "the writer rewrote it");
}
