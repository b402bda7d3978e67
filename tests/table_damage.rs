//! Promise: a sealed table whose entries are damaged or were never written answers
//! `Error::Corrupt` for every key whose lookup reads a damaged entry, never "absent" (the key
//! would be acquired and its effect run twice) and never an older record of the key (a removed
//! key would come back). Every other key answers as it did before the damage.
//!
//! How: 1,000 keys claimed and completed, sealed into one table; then entries of that table are
//! zeroed on the simulated disk (`SimDisk::zero_range`: a block that reads back as zeros) and
//! the store is reopened from it. Each entry names its record's offset, so the test knows
//! which key each zeroed entry belonged to.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use idemstore::sim::SimDisk;
use idemstore::{Claim, Entry, Error, ManualClock, Options, Store};

mod common;
use common::START_MS;

const KEYS: usize = 1000;
const DIR: &str = "/store";

fn options(disk: &SimDisk, clock: &Arc<ManualClock>) -> Options {
    common::sealing_sim_options(disk, clock)
}

fn key(i: usize) -> Vec<u8> {
    format!("order-{i:04}").into_bytes()
}

fn outcome(i: usize) -> Vec<u8> {
    format!("outcome-{i}").into_bytes()
}

/// Seals the idle segments of `store` into tables.
fn seal(store: &Store, clock: &ManualClock) {
    clock.advance(Duration::from_secs(10));
    store.maintain().expect("maintain");
    assert_eq!(store.stats().index_entries, 0, "every entry was sealed");
}

/// A closed store whose `KEYS` keys are completed and sealed into one table.
fn sealed_store() -> (SimDisk, Arc<ManualClock>) {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open(DIR, options(&disk, &clock)).expect("open");
    for i in 0..KEYS {
        let Claim::Acquired(token) = store.claim(key(i), b"req").expect("claim") else { panic!("fresh key {i}") };
        store.complete(&token, outcome(i)).expect("complete");
    }
    seal(&store, &clock);
    let stats = store.stats();
    assert_eq!((stats.sealed_tables, stats.sealed_entries), (1, KEYS as u64), "{stats:?}");
    store.close().expect("close");
    (disk, clock)
}

/// One table file on the disk, read from its header.
struct TableFile {
    path: PathBuf,
    count: u64,
    entries_at: u64,
}

/// The tables on `disk`, oldest segment first.
fn tables(disk: &SimDisk) -> Vec<TableFile> {
    let mut tables = Vec::new();
    for path in disk.file_paths().into_iter().filter(|p| p.extension().is_some_and(|e| e == "tbl")) {
        let bytes = disk.read_file(&path).expect("table bytes");
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        tables.push(TableFile { count: u64_at(16), entries_at: 64 + 8 * u64_at(24), path });
    }
    tables
}

impl TableFile {
    /// The key of entry `i`: its record offset, read in the table's segment.
    fn key_of(&self, disk: &SimDisk, i: u64) -> Vec<u8> {
        let table = disk.read_file(&self.path).expect("table bytes");
        let at = (self.entries_at + 16 * i) as usize;
        let offset = u32::from_le_bytes(table[at + 8..at + 12].try_into().expect("4 bytes")) as usize;
        let segment = disk.read_file(&self.path.with_extension("seg")).expect("segment bytes");
        let key_len = u16::from_le_bytes(segment[offset + 10..offset + 12].try_into().expect("2 bytes")) as usize;
        segment[offset + 96..offset + 96 + key_len].to_vec()
    }

    /// Zeroes entries `from..to`; returns their keys.
    fn zero_entries(&self, disk: &SimDisk, from: u64, to: u64) -> Vec<Vec<u8>> {
        let keys = (from..to).map(|i| self.key_of(disk, i)).collect();
        disk.zero_range(&self.path, self.entries_at + 16 * from, 16 * (to - from)).expect("zero entries");
        keys
    }
}

/// What a claim of a key said, reduced to what the promise is about.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Completed,
    Corrupt,
    Other(String),
}

fn claim_seen(store: &Store, table: &TableFile, i: usize) -> Seen {
    match store.claim(key(i), b"req") {
        Ok(Claim::Completed(done)) if done.outcome == outcome(i) => Seen::Completed,
        Err(Error::Corrupt { file, .. }) if file == table.path => Seen::Corrupt,
        other => Seen::Other(format!("{other:?}")),
    }
}

#[test]
fn a_zeroed_table_entry_is_corrupt_never_absent() {
    let (disk, clock) = sealed_store();
    let table = &tables(&disk)[0];
    let middle = table.count / 2;
    let damaged = table.zero_entries(&disk, middle, middle + 1).remove(0);
    let store = Store::open(DIR, options(&disk, &clock)).expect("a table's header and filter are intact: it opens");
    assert_eq!(store.stats().recovery.tables_loaded, 1);
    for i in 0..KEYS {
        let seen = claim_seen(&store, table, i);
        if key(i) == damaged {
            assert_eq!(seen, Seen::Corrupt, "the key of the zeroed entry");
            assert!(
                matches!(store.get(key(i)), Err(Error::Corrupt { .. })),
                "get of the key of the zeroed entry is Corrupt too"
            );
        } else {
            assert!(matches!(seen, Seen::Completed | Seen::Corrupt), "key {i}: {seen:?}");
        }
    }
}

#[test]
fn an_unwritten_table_tail_is_corrupt_never_absent() {
    let (disk, clock) = sealed_store();
    let table = &tables(&disk)[0];
    let damaged = table.zero_entries(&disk, table.count - 40, table.count);
    let store = Store::open(DIR, options(&disk, &clock)).expect("open");
    let mut corrupt = 0;
    for i in 0..KEYS {
        let seen = claim_seen(&store, table, i);
        if damaged.contains(&key(i)) {
            assert_eq!(seen, Seen::Corrupt, "key {i}: its entry is zeros");
        }
        assert!(matches!(seen, Seen::Completed | Seen::Corrupt), "key {i}: {seen:?}");
        corrupt += usize::from(seen == Seen::Corrupt);
    }
    assert!(corrupt >= damaged.len());
    // Checking entries costs no more than the entries a lookup compares: keys far from the tail
    // never read it.
    assert!(corrupt < KEYS / 2, "{corrupt} keys refused for 40 zeroed entries");
}

#[test]
fn a_damaged_newer_table_never_brings_a_removed_key_back() {
    let (disk, clock) = sealed_store();
    let store = Store::open(DIR, options(&disk, &clock)).expect("open");
    for i in 0..KEYS {
        store.remove(key(i)).expect("remove");
    }
    seal(&store, &clock);
    assert_eq!(store.stats().sealed_tables, 2);
    store.close().expect("close");
    let all = tables(&disk);
    let newer = &all[1];
    let mut damaged = newer.zero_entries(&disk, newer.count - 40, newer.count);
    let middle = newer.count / 2;
    damaged.extend(newer.zero_entries(&disk, middle, middle + 1));

    let store = Store::open(DIR, options(&disk, &clock)).expect("open");
    for i in 0..KEYS {
        match store.get(key(i)) {
            Ok(None) => assert!(!damaged.contains(&key(i)), "key {i}: its tombstone's entry is zeros"),
            Err(Error::Corrupt { file, .. }) => assert_eq!(file, newer.path, "key {i}"),
            Ok(Some(Entry::Completed(done))) => {
                panic!("key {i} was removed, yet reads completed with {:?}", String::from_utf8_lossy(&done.outcome))
            }
            other => panic!("key {i}: {other:?}"),
        }
        let claim = store.claim(key(i), b"req");
        assert!(
            matches!(claim, Ok(Claim::Acquired(_)) | Err(Error::Corrupt { .. })),
            "key {i}: a removed key is free or refused, never replayed: {claim:?}"
        );
    }
}
