//! Promise: a read-only view opened while the writer drops an expired bucket opens, and answers
//! every key of the buckets that remain. The writer may delete a bucket's segment and table
//! between the view listing the directory and opening the files: a file gone by then was
//! deleted, not lost.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemstore::io::{DirLock, Io, IoFile};
use idemstore::sim::SimDisk;
use idemstore::{ClaimOptions, Durability, Entry, ManualClock, Options, Store};

mod common;
use common::{START_MS, acquired};

const DIR: &str = "/store";

/// The simulated disk, except that the first open of a file named in `vanish` finds it
/// deleted, with the files named with it: what a viewer sees when the writer drops a bucket
/// between its listing of the directory and its opening of the files.
#[derive(Debug)]
struct VanishingIo {
    disk: SimDisk,
    vanish: Mutex<Vec<(PathBuf, Vec<PathBuf>)>>,
}

impl Io for VanishingIo {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.disk.create_dir_all(dir)
    }
    fn lock_dir(&self, dir: &Path) -> io::Result<Box<dyn DirLock>> {
        self.disk.lock_dir(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.disk.list(dir)
    }
    fn create(&self, path: &Path, capacity: u64) -> io::Result<Box<dyn IoFile>> {
        self.disk.create(path, capacity)
    }
    fn open(&self, path: &Path, capacity: u64, writable: bool) -> io::Result<Box<dyn IoFile>> {
        let mut vanish = self.vanish.lock().expect("vanish list");
        if let Some(at) = vanish.iter().position(|(trigger, _)| trigger == path) {
            for gone in vanish.remove(at).1 {
                self.disk.remove(&gone)?;
            }
        }
        drop(vanish);
        self.disk.open(path, capacity, writable)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.disk.remove(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.disk.rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.disk.sync_dir(dir)
    }
}

fn options(io: Arc<dyn Io>, clock: &Arc<ManualClock>) -> Options {
    Options {
        durability: Durability::None,
        background: false,
        clock: clock.clone(),
        io,
        bucket_width: Duration::from_secs(60),
        seal_idle_after: Duration::from_secs(5),
        segment_bytes_initial: 4096,
        ..Default::default()
    }
}

/// A closed store with 20 keys in a short bucket (one minute) and 20 in a long one (a day),
/// sealed into tables when `sealed`; returns the disk and the short bucket's segment.
fn two_buckets(sealed: bool) -> (SimDisk, Arc<ManualClock>, PathBuf) {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open(DIR, options(Arc::new(disk.clone()), &clock)).expect("open");
    for i in 0..20 {
        let short = ClaimOptions { ttl: Some(Duration::from_secs(60)), ..Default::default() };
        let token = acquired(store.claim_with(format!("short-{i}"), b"req", short).expect("claim"));
        store.complete(&token, b"done").expect("complete");
        let token = acquired(store.claim(format!("long-{i}"), b"req").expect("claim"));
        store.complete(&token, b"done").expect("complete");
    }
    if sealed {
        clock.advance(Duration::from_secs(10));
        store.maintain().expect("maintain");
        assert_eq!(store.stats().sealed_tables, 2);
    }
    store.close().expect("close");
    let segments: Vec<PathBuf> =
        disk.file_paths().into_iter().filter(|p| p.extension().is_some_and(|e| e == "seg")).collect();
    assert_eq!(segments.len(), 2, "{segments:?}");
    // The short bucket took the first segment: its key was claimed first.
    (disk, clock, segments[0].clone())
}

fn view(disk: &SimDisk, clock: &Arc<ManualClock>, vanish: Vec<(PathBuf, Vec<PathBuf>)>) -> Store {
    let io = Arc::new(VanishingIo { disk: disk.clone(), vanish: Mutex::new(vanish) });
    Store::open_read_only_with(DIR, options(io, clock))
        .unwrap_or_else(|e| panic!("a view opened while a bucket was dropped failed: {e}"))
}

fn assert_long_keys_answer(view: &Store) {
    for i in 0..20 {
        assert!(matches!(view.get(format!("long-{i}")).expect("get"), Some(Entry::Completed(_))), "long-{i}");
    }
}

#[test]
fn a_read_only_view_skips_a_segment_deleted_after_it_was_listed() {
    let (disk, clock, short) = two_buckets(false);
    let view = view(&disk, &clock, vec![(short.clone(), vec![short])]);
    assert_long_keys_answer(&view);
}

#[test]
fn a_read_only_view_skips_a_sealed_bucket_deleted_after_it_was_listed() {
    let (disk, clock, short) = two_buckets(true);
    let table = short.with_extension("tbl");
    let view = view(&disk, &clock, vec![(short.clone(), vec![short, table])]);
    assert_long_keys_answer(&view);
}

#[test]
fn a_read_only_view_scans_a_segment_whose_table_was_deleted_after_it_was_listed() {
    let (disk, clock, short) = two_buckets(true);
    let table = short.with_extension("tbl");
    let view = view(&disk, &clock, vec![(table.clone(), vec![table])]);
    assert_long_keys_answer(&view);
    assert!(matches!(view.get("short-3").expect("get"), Some(Entry::Completed(_))), "read by a scan of its segment");
}

/// `verify` (the CLI's `verify`) runs beside a live writer, which may be freeing the blocks of
/// an expired bucket's segment (holes read as zeros): a segment whose bucket has ended is
/// reported as expired, not as a problem, whatever its bytes. A live bucket's damage is still
/// a problem.
#[test]
fn verify_reports_an_expired_segment_as_expired_never_as_a_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now_ms = idemstore::system_time_to_ms(std::time::SystemTime::now());
    let clock = ManualClock::new(now_ms - 2 * 3600 * 1000);
    let store =
        Store::open(dir.path(), Options { segment_bytes_initial: 4096, ..common::options(&clock) }).expect("open");
    for i in 0..20 {
        let short = ClaimOptions { ttl: Some(Duration::from_secs(60)), ..Default::default() };
        let token = acquired(store.claim_with(format!("short-{i}"), b"req", short).expect("claim"));
        store.complete(&token, b"done").expect("complete");
        let token = acquired(store.claim(format!("long-{i}"), b"req").expect("claim"));
        store.complete(&token, b"done").expect("complete");
    }
    store.close().expect("close");
    let (short, long) = (dir.path().join("00000001.seg"), dir.path().join("00000002.seg"));
    let mut bytes = std::fs::read(&short).expect("read");
    // Blocks freed in the middle: records follow the zeros.
    bytes[200..400].fill(0);
    std::fs::write(&short, bytes).expect("write");

    let report = Store::verify(dir.path()).expect("verify");
    assert!(report.is_clean(), "{report:?}");
    let of = |path: &Path| report.files.iter().find(|f| f.path == path).cloned().expect("in the report");
    assert!(of(&short).expired && of(&short).problem.is_none(), "{report:?}");
    assert!(!of(&long).expired && of(&long).records == 40, "{report:?}");

    let mut bytes = std::fs::read(&long).expect("read");
    bytes[200..400].fill(0);
    std::fs::write(&long, bytes).expect("write");
    let again = Store::verify(dir.path()).expect("verify");
    let problems: Vec<_> = again.files.iter().filter(|f| f.problem.is_some()).map(|f| f.path.clone()).collect();
    assert_eq!(problems, vec![long], "a live segment's damage is a problem: {again:?}");
}
