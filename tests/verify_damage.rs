//! Promise: `verify` covers every file the store reads (segments, tables, `META`, `TIME`,
//! `LOCK`, `MARKS`), exits non-zero on any damage, and names the remedy: damaged table entries
//! that `get` would trip over are found, and damage to a closed store's last record is
//! corruption, not a torn tail.
#![cfg(feature = "cli")]

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use idemstore::{Error, ManualClock, Options, Store};

mod common;
use common::acquired;

/// 2100-01-01: nothing has expired by the (real) time the tools read the store.
const START_MS: u64 = 4_102_444_800_000;

fn options(clock: &Arc<ManualClock>) -> Options {
    Options { seal_idle_after: Duration::from_secs(5), segment_bytes_initial: 4096, ..common::options(clock) }
}

fn idemstore(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idemstore")).args(args).output().expect("run the idemstore binary")
}

fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

/// A closed store of 50 completed keys sealed into a table.
fn sealed_store(dir: &Path) -> Arc<ManualClock> {
    let clock = ManualClock::new(START_MS);
    let store = Store::open(dir, options(&clock)).unwrap();
    for i in 0..50 {
        let token = acquired(store.claim(format!("key-{i}"), "request").unwrap());
        store.complete(&token, "done").unwrap();
    }
    clock.advance(Duration::from_secs(10));
    store.maintain().unwrap();
    assert_eq!(store.stats().sealed_tables, 1);
    store.close().unwrap();
    clock
}

#[test]
fn verify_finds_damaged_table_entries_that_reads_trip_over_and_names_the_remedy() {
    let dir = tempfile::tempdir().unwrap();
    let clock = sealed_store(dir.path());
    let table = dir.path().join("00000001.tbl");
    let len = std::fs::metadata(&table).unwrap().len() as usize;
    // A byte of the last entry (entries end the file, 16 bytes each).
    flip(&table, len - 10);
    let view = Store::open_read_only_with(dir.path(), options(&clock)).unwrap();
    let failed = (0..50).any(|i| matches!(view.get(format!("key-{i}")), Err(Error::Corrupt { .. })));
    assert!(failed, "a read trips over the damaged entry");
    drop(view);

    let out = idemstore(&["verify", dir.path().to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("00000001.tbl: DAMAGED"), "{text}");
    assert!(text.contains("remedy: remove the .tbl file"), "{text}");
    assert!(text.contains("NOT clean"), "{text}");

    // The remedy works: the table is rebuilt from its segment and every key reads.
    std::fs::remove_file(&table).unwrap();
    let store = Store::open(dir.path(), options(&clock)).unwrap();
    for i in 0..50 {
        assert!(store.get(format!("key-{i}")).unwrap().is_some());
    }
    store.close().unwrap();
}

#[test]
fn verify_calls_damage_to_the_last_record_of_a_closed_store_corrupt_with_exit_code_1() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = Store::open(dir.path(), options(&clock)).unwrap();
    let token = acquired(store.claim("payout-1", "pay").unwrap());
    store.complete(&token, "paid").unwrap();
    store.close().unwrap();
    let segment = dir.path().join("00000001.seg");
    let (at, len) = *common::record_offsets(&std::fs::read(&segment).unwrap()).last().unwrap();
    flip(&segment, at + len - 3);

    let out = idemstore(&["verify", dir.path().to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("00000001.seg: CORRUPT at offset {at}")), "{text}");
    assert!(!text.contains("torn tail of"), "{text}");
    assert!(text.contains("remedy: stop the writer and run `idemstore salvage DIR`"), "{text}");
}

#[test]
fn verify_reports_damaged_meta_time_and_lock_files() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = Store::open(dir.path(), options(&clock)).unwrap();
    let token = acquired(store.claim("k", "r").unwrap());
    store.complete(&token, "o").unwrap();
    store.close().unwrap();
    let d = dir.path().to_str().unwrap();
    assert_eq!(idemstore(&["verify", d]).status.code(), Some(0));

    for (file, at, expect) in
        [("TIME", 2, "TIME: DAMAGED"), ("META", 40, "META: DAMAGED"), ("LOCK", usize::MAX, "LOCK: DAMAGED")]
    {
        let path = dir.path().join(file);
        let pristine = std::fs::read(&path).unwrap();
        if at == usize::MAX {
            std::fs::write(&path, b"garbage").unwrap();
        } else {
            flip(&path, at);
        }
        let out = idemstore(&["verify", d]);
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(out.status.code(), Some(1), "{file}: {text}");
        assert!(text.contains(expect), "{file}: {text}");
        assert!(text.contains("remedy: "), "{file}: {text}");
        std::fs::write(&path, pristine).unwrap();
    }
}
