//! A read-only view of a live store copies each segment while the writer may be appending to
//! it. If the copy is preempted, it can hold a record that was not written yet followed by
//! records that were: that is the live tail, not corruption. The view reads the rest of the
//! segment again before it calls a record corrupt; a record that is really damaged stays
//! damaged however often it is read, and is still reported.
//!
//! The race is made deterministic here by an `Io` whose segment reads hide one record's
//! header (zeros, as if not yet written) for the first `hidden_reads` reads.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use idemstore::io::{DirLock, Io, IoFile, RealIo};
use idemstore::{Entry, Error, ManualClock, Options, Store};

mod common;
use common::{START_MS, acquired, record_offsets};

/// Real files, except that reads of segment bytes covering `hidden` see zeros there while
/// `reads_left` lasts.
#[derive(Debug)]
struct HidingIo {
    hidden: (u64, u64),
    reads_left: Arc<AtomicU32>,
}

struct HidingFile {
    inner: Box<dyn IoFile>,
    hidden: Option<(u64, u64)>,
    reads_left: Arc<AtomicU32>,
}

impl Io for HidingIo {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        RealIo.create_dir_all(dir)
    }
    fn lock_dir(&self, dir: &Path) -> io::Result<Box<dyn DirLock>> {
        RealIo.lock_dir(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        RealIo.list(dir)
    }
    fn create(&self, path: &Path, capacity: u64) -> io::Result<Box<dyn IoFile>> {
        RealIo.create(path, capacity)
    }
    fn open(&self, path: &Path, capacity: u64, writable: bool) -> io::Result<Box<dyn IoFile>> {
        let inner = RealIo.open(path, capacity, writable)?;
        let segment = path.extension().is_some_and(|e| e == "seg");
        Ok(Box::new(HidingFile { inner, hidden: segment.then_some(self.hidden), reads_left: self.reads_left.clone() }))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        RealIo.remove(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        RealIo.rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        RealIo.sync_dir(dir)
    }
}

// Only read-only views open through it: they never grow, write or sync a file, so the trait's
// defaults stand for the optional methods.
impl IoFile for HidingFile {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn reserve(&self, len: u64) -> io::Result<()> {
        self.inner.reserve(len)
    }
    fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.inner.write_at(offset, bytes)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)?;
        if let Some((from, to)) = self.hidden {
            let end = offset + buf.len() as u64;
            let covers = offset <= from && to <= end;
            if covers && self.reads_left.load(Ordering::SeqCst) > 0 {
                self.reads_left.fetch_sub(1, Ordering::SeqCst);
                buf[(from - offset) as usize..(to - offset) as usize].fill(0);
            }
        }
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
}

/// A closed store with 8 completed keys in one segment; returns that segment's record offsets.
fn store_with_records(dir: &Path, clock: &Arc<ManualClock>) -> Vec<(usize, usize)> {
    let store = Store::open(dir, common::options(clock)).unwrap();
    for i in 0..8 {
        let token = acquired(store.claim(format!("key-{i}"), b"request").unwrap());
        store.complete(&token, format!("outcome {i}")).unwrap();
    }
    store.close().unwrap();
    // A clean close writes the segment a table, and a view maps a segment with a table
    // instead of copying it; these cases are about the copy of a segment being written, which
    // has no table yet.
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "tbl") {
            std::fs::remove_file(path).unwrap();
        }
    }
    let segment = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .expect("a segment file");
    record_offsets(&std::fs::read(segment).unwrap())
}

fn open_hiding(
    dir: &Path,
    clock: &Arc<ManualClock>,
    record: (usize, usize),
    hidden_reads: u32,
) -> (idemstore::Result<Store>, Arc<AtomicU32>) {
    let reads_left = Arc::new(AtomicU32::new(hidden_reads));
    let io = HidingIo { hidden: (record.0 as u64, record.0 as u64 + 96), reads_left: reads_left.clone() };
    (Store::open_read_only_with(dir, Options { io: Arc::new(io), ..common::options(clock) }), reads_left)
}

#[test]
fn a_record_missing_from_the_first_copy_but_present_on_a_reread_is_the_live_tail() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let records = store_with_records(dir.path(), &clock);
    let (view, reads_left) = open_hiding(dir.path(), &clock, records[10], 1);
    let view = view.expect("a live tail is not corruption");
    assert_eq!(reads_left.load(Ordering::SeqCst), 0, "the first copy never missed the record");
    for i in 0..8 {
        let Some(Entry::Completed(done)) = view.get(format!("key-{i}")).unwrap() else {
            panic!("key-{i} not completed")
        };
        assert_eq!(done.outcome, format!("outcome {i}").into_bytes());
    }
}

#[test]
fn a_record_missing_from_every_copy_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let records = store_with_records(dir.path(), &clock);
    let err = open_hiding(dir.path(), &clock, records[10], u32::MAX).0.expect_err("damage that stays is corruption");
    assert!(matches!(err, Error::Corrupt { offset, .. } if offset == records[10].0 as u64), "got {err:?}");
}
