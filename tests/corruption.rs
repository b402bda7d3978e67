//! Promise: corruption that is not a torn tail is refused with a clear error, and nothing is
//! deleted (README, Guarantees: "Corruption is an error").
//!
//! A flipped byte in a record followed by valid records gives `Error::Corrupt` naming the file
//! and the damaged record's offset; a bad segment magic or header checksum gives `Corrupt`; a
//! header of another format version (with a valid checksum) gives `UnsupportedVersion`. After
//! every refused open the directory holds exactly the same files with the same bytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use idemstore::{Claim, Error, ManualClock, Options, Store};

mod common;
use common::{START_MS, acquired, files, record_offsets};

fn options(clock: &Arc<ManualClock>) -> Options {
    Options { segment_bytes_initial: 4096, ..common::options(clock) }
}

/// A closed store with 6 claims and 6 completes in one segment; returns the segment path.
fn store_with_records(dir: &Path, clock: &Arc<ManualClock>) -> PathBuf {
    let store = Store::open(dir, options(clock)).unwrap();
    for i in 0..6 {
        let token = acquired(store.claim(format!("key-{i}"), b"request").unwrap());
        store.complete(&token, format!("outcome number {i}")).unwrap();
    }
    store.close().unwrap();
    // A clean close writes the segment a table, and a segment with a table is mapped, not
    // scanned, at open (its records are checked when read: see the sealed case below). These
    // cases are about the scan, so the table goes.
    for table in files(dir).into_keys().filter(|p| p.extension().is_some_and(|e| e == "tbl")) {
        std::fs::remove_file(table).unwrap();
    }
    let segments: Vec<PathBuf> = files(dir).into_keys().filter(|p| p.extension().is_some_and(|e| e == "seg")).collect();
    assert_eq!(segments.len(), 1);
    segments[0].clone()
}

fn patch(path: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(path).unwrap();
    edit(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}

/// Opens the damaged store, expecting an error; checks that no file changed.
fn open_refused(dir: &Path, clock: &Arc<ManualClock>) -> Error {
    let before = files(dir);
    let err = Store::open(dir, options(clock)).expect_err("a damaged store must not open");
    assert_eq!(files(dir), before, "a refused open changed or deleted files ({err})");
    err
}

fn flip_each_byte_of_record(record_index: usize) {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let segment = store_with_records(dir.path(), &clock);
    let pristine = std::fs::read(&segment).unwrap();
    let records = record_offsets(&pristine);
    assert_eq!(records.len(), 12);
    assert!(record_index + 1 < records.len(), "valid records must follow the damaged one");
    let (offset, len) = records[record_index];

    for at in offset..offset + len {
        for mask in [0xffu8, 0x01] {
            std::fs::write(&segment, &pristine).unwrap();
            patch(&segment, |b| b[at] ^= mask);
            let context = format!("byte {} of record at {offset} xor {mask:#x}", at - offset);
            match open_refused(dir.path(), &clock) {
                Error::Corrupt { file, offset: reported, reason } => {
                    assert_eq!(file, segment, "{context}");
                    assert_eq!(reported, offset as u64, "{context}: {reason}");
                    assert!(!reason.is_empty());
                }
                other => panic!("{context}: expected Corrupt, got {other:?}"),
            }
        }
    }
    // Undamaged again, the store opens with everything in it.
    std::fs::write(&segment, &pristine).unwrap();
    let store = Store::open(dir.path(), options(&clock)).unwrap();
    for i in 0..6 {
        let Claim::Completed(done) = store.claim(format!("key-{i}"), b"request").unwrap() else {
            panic!("key-{i} lost")
        };
        assert_eq!(done.outcome, format!("outcome number {i}").as_bytes());
    }
}

#[test]
fn flipped_byte_in_a_middle_record_is_corrupt_at_that_record() {
    flip_each_byte_of_record(5);
}

#[test]
fn flipped_byte_in_the_first_record_is_corrupt_at_that_record() {
    flip_each_byte_of_record(0);
}

#[test]
fn corrupt_error_names_the_file_and_offset_in_its_message() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let segment = store_with_records(dir.path(), &clock);
    let (offset, _) = record_offsets(&std::fs::read(&segment).unwrap())[3];
    patch(&segment, |b| b[offset + 100] ^= 0x20);
    let message = open_refused(dir.path(), &clock).to_string();
    assert!(message.contains(&segment.display().to_string()), "{message}");
    assert!(message.contains(&offset.to_string()), "{message}");
}

#[test]
fn bad_segment_magic_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let segment = store_with_records(dir.path(), &clock);
    patch(&segment, |b| b[0..8].copy_from_slice(b"NOTASEG\0"));
    match open_refused(dir.path(), &clock) {
        Error::Corrupt { file, offset, .. } => {
            assert_eq!(file, segment);
            assert_eq!(offset, 0);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn bad_segment_header_checksum_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let segment = store_with_records(dir.path(), &clock);
    for at in [9usize, 13, 20, 28, 36, 45, 61] {
        let pristine = std::fs::read(&segment).unwrap();
        patch(&segment, |b| b[at] ^= 0x10);
        match open_refused(dir.path(), &clock) {
            Error::Corrupt { file, .. } => assert_eq!(file, segment, "header byte {at}"),
            other => panic!("header byte {at}: expected Corrupt, got {other:?}"),
        }
        std::fs::write(&segment, pristine).unwrap();
    }
}

fn set_version(segment: &Path, version: u32) {
    patch(segment, |b| {
        b[8..12].copy_from_slice(&version.to_le_bytes());
        let crc = crc32fast::hash(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
    });
}

#[test]
fn unknown_format_version_is_unsupported_version() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let segment = store_with_records(dir.path(), &clock);
    let pristine = std::fs::read(&segment).unwrap();
    let supported = u32::from_le_bytes(pristine[8..12].try_into().unwrap());
    for version in [supported + 1, 0, u32::MAX] {
        std::fs::write(&segment, &pristine).unwrap();
        set_version(&segment, version);
        match open_refused(dir.path(), &clock) {
            Error::UnsupportedVersion { file, found, supported: reported } => {
                assert_eq!(file, segment);
                assert_eq!(found, version);
                assert_eq!(reported, supported);
            }
            other => panic!("version {version}: expected UnsupportedVersion, got {other:?}"),
        }
    }
    // Back to the supported version (checksum recomputed the same way): it opens.
    set_version(&segment, supported);
    assert_eq!(std::fs::read(&segment).unwrap(), pristine);
    Store::open(dir.path(), options(&clock)).unwrap();
}

#[test]
fn read_only_open_refuses_corruption_too() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let segment = store_with_records(dir.path(), &clock);
    let (offset, _) = record_offsets(&std::fs::read(&segment).unwrap())[4];
    patch(&segment, |b| b[offset + 50] ^= 0xff);
    let before = files(dir.path());
    let err = Store::open_read_only_with(dir.path(), options(&clock)).expect_err("damaged store");
    assert!(matches!(err, Error::Corrupt { offset: o, .. } if o == offset as u64), "got {err:?}");
    assert_eq!(files(dir.path()), before);
}

/// A segment sealed by `maintain` is not rescanned at open (its table is mapped instead), so a
/// flipped byte in one of its records may be found at open or only when the record is read.
/// Either way it must surface as `Corrupt` at that record: never as a wrong outcome, and never
/// as an absent key that a new claim would acquire (a duplicate effect).
#[test]
fn flipped_byte_in_a_sealed_segment_is_an_error_never_an_absent_key() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    {
        let store = Store::open(dir.path(), options(&clock)).unwrap();
        for i in 0..6 {
            let token = acquired(store.claim(format!("key-{i}"), b"request").unwrap());
            store.complete(&token, format!("outcome number {i}")).unwrap();
        }
        // Idle for two hours (inside the 24 h window): maintain seals the segment.
        clock.advance(std::time::Duration::from_secs(2 * 3600));
        store.maintain().unwrap();
        assert!(store.stats().sealed_tables >= 1, "maintain sealed nothing: {:?}", store.stats());
        store.close().unwrap();
    }
    let pristine = files(dir.path());
    assert!(pristine.keys().any(|p| p.extension().is_some_and(|e| e == "tbl")), "no table file was written");
    let segment = pristine.keys().find(|p| p.extension().is_some_and(|e| e == "seg")).unwrap().clone();
    let records = record_offsets(&pristine[&segment]);
    assert_eq!(records.len(), 12);
    // key-3's complete: the 8th record (claims and completes alternate).
    let (offset, len) = records[7];

    for at in offset..offset + len {
        for path in files(dir.path()).into_keys().filter(|p| !pristine.contains_key(p)) {
            std::fs::remove_file(path).unwrap();
        }
        for (path, bytes) in &pristine {
            std::fs::write(path, bytes).unwrap();
        }
        patch(&segment, |b| b[at] ^= 0xff);
        let context = format!("byte {} of key-3's record at {offset}", at - offset);
        let expect_corrupt_here = |err: Error| match err {
            Error::Corrupt { file, offset: reported, .. } => {
                assert_eq!(file, segment, "{context}");
                assert_eq!(reported, offset as u64, "{context}");
            }
            other => panic!("{context}: expected Corrupt, got {other:?}"),
        };
        let before = files(dir.path());
        let store = match Store::open(dir.path(), options(&clock)) {
            Err(err) => {
                assert_eq!(files(dir.path()), before, "{context}: a refused open changed files");
                expect_corrupt_here(err);
                continue;
            }
            Ok(store) => store,
        };
        match store.get("key-3") {
            Err(err) => expect_corrupt_here(err),
            Ok(entry) => panic!("{context}: get answered {entry:?} from a damaged record"),
        }
        match store.claim("key-3", b"request") {
            Err(err) => expect_corrupt_here(err),
            Ok(claim) => panic!("{context}: claim answered {claim:?} from a damaged record"),
        }
        let Claim::Completed(done) = store.claim("key-2", b"request").unwrap() else { panic!("{context}: key-2") };
        assert_eq!(done.outcome, b"outcome number 2", "{context}");
    }
}

/// A segment of `keys` completed keys on a simulated disk, closed; returns its path.
fn sim_store_with_records(disk: &idemstore::sim::SimDisk, clock: &Arc<ManualClock>, keys: usize) -> PathBuf {
    let store = Store::open("/store", Options { io: Arc::new(disk.clone()), ..options(clock) }).unwrap();
    for i in 0..keys {
        let token = acquired(store.claim(format!("key-{i}"), b"request").unwrap());
        store.complete(&token, format!("outcome number {i}")).unwrap();
    }
    store.close().unwrap();
    let segments: Vec<PathBuf> =
        disk.file_paths().into_iter().filter(|p| p.extension().is_some_and(|e| e == "seg")).collect();
    assert_eq!(segments.len(), 1);
    segments[0].clone()
}

/// A spare segment (created ahead of need) is all zeros, and is removed quietly at open. A
/// segment whose header reads as zeros but which holds anything after it lost its header:
/// refused, and nothing is deleted (its records were the only copy of 100 outcomes).
#[test]
fn a_segment_whose_header_reads_as_zeros_over_records_is_corrupt_not_a_spare() {
    let clock = ManualClock::new(START_MS);
    let disk = idemstore::sim::SimDisk::new();
    let segment = sim_store_with_records(&disk, &clock, 100);
    let sim_options = || Options { io: Arc::new(disk.clone()), ..options(&clock) };

    let spare = segment.with_file_name("000000ff.seg");
    disk.write_file(&spare, vec![0; 8192]);
    let store = Store::open("/store", sim_options()).expect("a spare is no damage");
    assert_eq!(store.stats().recovery.empty_files_removed, 1);
    store.close().unwrap();
    assert!(disk.read_file(&spare).is_none(), "the spare was removed");

    disk.zero_range(&segment, 0, 4096).unwrap();
    let before: Vec<_> = disk.file_paths().into_iter().map(|p| (disk.read_file(&p), p)).collect();
    for attempt in 0..2 {
        match Store::open("/store", sim_options()) {
            Err(Error::Corrupt { file, offset, .. }) => assert_eq!((file, offset), (segment.clone(), 0)),
            Err(other) => panic!("attempt {attempt}: expected Corrupt, got {other:?}"),
            Ok(store) => panic!("attempt {attempt}: opened, with {} keys", store.keys().unwrap().len()),
        }
        let after: Vec<_> = disk.file_paths().into_iter().map(|p| (disk.read_file(&p), p)).collect();
        assert!(after == before, "attempt {attempt}: a refused open changed files");
    }
    let view = Store::open_read_only_with("/store", sim_options());
    assert!(matches!(view, Err(Error::Corrupt { .. })), "a read-only view refuses it too: {:?}", view.err());
}

#[test]
fn verify_reports_a_segment_whose_header_reads_as_zeros_over_records() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = Store::open(dir.path(), options(&clock)).unwrap();
    for i in 0..100 {
        let token = acquired(store.claim(format!("key-{i}"), b"request").unwrap());
        store.complete(&token, format!("outcome number {i}")).unwrap();
    }
    store.close().unwrap();
    let segment = dir.path().join("00000001.seg");
    assert!(std::fs::metadata(&segment).unwrap().len() > 4096, "records lie past the zeroed block");
    patch(&segment, |b| {
        let end = b.len().min(4096);
        b[..end].fill(0);
    });
    let report = Store::verify(dir.path()).unwrap();
    assert!(!report.is_clean(), "{report:?}");
    let file = report.files.iter().find(|f| f.path == segment).expect("the segment is in the report");
    assert_eq!(file.problem.as_ref().map(|(offset, _)| *offset), Some(0), "{file:?}");
    assert!(segment.exists(), "verify deletes nothing");
}

/// A file name is input from the disk: a segment named with the last possible id leaves no id
/// for the next segment, and the open says so instead of wrapping (a debug build panicked).
#[test]
fn a_segment_named_with_the_last_id_is_refused_never_wrapped() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = Store::open(dir.path(), options(&clock)).unwrap();
    let token = acquired(store.claim("kept", "request").unwrap());
    store.complete(&token, "outcome").unwrap();
    drop(store);
    std::fs::write(dir.path().join("ffffffff.seg"), [0u8; 64]).unwrap();
    let before = files(dir.path());
    match Store::open(dir.path(), options(&clock)) {
        Err(Error::Corrupt { file, .. }) => assert!(file.ends_with("ffffffff.seg"), "{file:?}"),
        other => panic!("expected Corrupt naming the file, got {other:?}"),
    }
    assert_eq!(files(dir.path()), before, "a refused open changed the directory");
}
