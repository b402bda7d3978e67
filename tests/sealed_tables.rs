//! Sealed tables: a segment that takes no more appends moves its index entries out of RAM into
//! a table file. Promise: reopening from tables answers exactly as reopening by a scan of the
//! segments, and as the store did before it closed; a damaged or missing table falls back to
//! a scan and stats say so.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use idemstore::io::Io;
use idemstore::sim::SimDisk;
use idemstore::{Claim, ClaimOptions, Entry, ManualClock, Options, Store};
use proptest::prelude::*;

mod common;
use common::START_MS;

fn options(disk: &SimDisk, clock: &Arc<ManualClock>) -> Options {
    common::sealing_sim_options(disk, clock)
}

fn dir() -> PathBuf {
    PathBuf::from("/store")
}

fn table_paths(disk: &SimDisk) -> Vec<PathBuf> {
    disk.file_paths().into_iter().filter(|p| p.extension().is_some_and(|e| e == "tbl")).collect()
}

/// Every key's entry, with times reduced to what must match across reopens.
fn snapshot(store: &Store, keys: &[Vec<u8>]) -> Vec<(Vec<u8>, Option<String>)> {
    keys.iter()
        .map(|k| {
            let entry = store.get(k).expect("get");
            let shown = entry.map(|e| match e {
                Entry::InFlight { checkpoint, lease_expires_at, expires_at, .. } => {
                    format!("in-flight {checkpoint:?} {lease_expires_at:?} {expires_at:?}")
                }
                Entry::Completed(done) => format!("completed {:?} {:?}", done.outcome, done.expires_at),
            });
            (k.clone(), shown)
        })
        .collect()
}

#[derive(Debug, Clone)]
enum Op {
    Claim { key: u8, ttl_s: u64 },
    Complete { key: u8, outcome: u8 },
    Checkpoint { key: u8, phase: u8 },
    Release { key: u8 },
    Remove { key: u8 },
    Advance { secs: u64 },
    Maintain,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..24, 30u64..600).prop_map(|(key, ttl_s)| Op::Claim { key, ttl_s }),
        3 => (0u8..24, any::<u8>()).prop_map(|(key, outcome)| Op::Complete { key, outcome }),
        1 => (0u8..24, any::<u8>()).prop_map(|(key, phase)| Op::Checkpoint { key, phase }),
        1 => (0u8..24).prop_map(|key| Op::Release { key }),
        1 => (0u8..24).prop_map(|key| Op::Remove { key }),
        2 => (1u64..40).prop_map(|secs| Op::Advance { secs }),
        2 => Just(Op::Maintain),
    ]
}

fn key(k: u8) -> Vec<u8> {
    format!("key-{k}").into_bytes()
}

fn run(ops: &[Op], disk: &SimDisk, clock: &Arc<ManualClock>) -> Store {
    let store = Store::open(dir(), options(disk, clock)).expect("open");
    let mut tokens = std::collections::HashMap::new();
    for op in ops {
        match op {
            Op::Claim { key: k, ttl_s } => {
                let claim = store
                    .claim_with(
                        key(*k),
                        b"req",
                        ClaimOptions { ttl: Some(Duration::from_secs(*ttl_s)), ..Default::default() },
                    )
                    .expect("claim");
                if let Claim::Acquired(token) = claim {
                    tokens.insert(*k, token);
                }
            }
            Op::Complete { key: k, outcome } => {
                if let Some(token) = tokens.remove(k) {
                    let _ = store.complete(&token, [*outcome; 40]);
                }
            }
            Op::Checkpoint { key: k, phase } => {
                if let Some(token) = tokens.get(k) {
                    let _ = store.checkpoint(token, [*phase; 3]);
                }
            }
            Op::Release { key: k } => {
                if let Some(token) = tokens.remove(k) {
                    let _ = store.release(&token);
                }
            }
            Op::Remove { key: k } => store.remove(key(*k)).expect("remove"),
            Op::Advance { secs } => clock.advance(Duration::from_secs(*secs)),
            Op::Maintain => {
                store.maintain().expect("maintain");
            }
        }
    }
    store
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn reopening_from_tables_equals_reopening_by_scan(ops in proptest::collection::vec(op(), 1..120)) {
        let disk = SimDisk::new();
        let clock = ManualClock::new(START_MS);
        let keys: Vec<Vec<u8>> = (0..24).map(key).collect();
        let store = run(&ops, &disk, &clock);
        store.maintain().expect("maintain");
        let before = snapshot(&store, &keys);
        store.close().expect("close");

        let with_tables = disk.power_cut(None);
        let by_scan = disk.power_cut(None);
        for path in table_paths(&by_scan) {
            by_scan.remove(&path).expect("remove table");
        }
        let from_tables = Store::open(dir(), options(&with_tables, &clock)).expect("open with tables");
        let from_scan = Store::open(dir(), options(&by_scan, &clock)).expect("open by scan");
        // The two opens really took the two paths.
        prop_assert_eq!(from_scan.stats().recovery.tables_loaded, 0);
        if !table_paths(&with_tables).is_empty() {
            prop_assert!(from_tables.stats().recovery.tables_loaded > 0);
        }
        prop_assert_eq!(&snapshot(&from_tables, &keys), &before);
        prop_assert_eq!(&snapshot(&from_scan, &keys), &before);
        let listed = |s: &Store| s.keys().expect("keys").into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        prop_assert_eq!(listed(&from_tables), listed(&from_scan));
    }
}

fn sealed_store() -> (SimDisk, Arc<ManualClock>, Vec<Vec<u8>>) {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open(dir(), options(&disk, &clock)).expect("open");
    let keys: Vec<Vec<u8>> = (0..200u32).map(|i| format!("order-{i}").into_bytes()).collect();
    for (i, k) in keys.iter().enumerate() {
        let Claim::Acquired(token) = store.claim(k, b"req").expect("claim") else { panic!("fresh key") };
        if i % 2 == 0 {
            store.complete(&token, format!("outcome-{i}")).expect("complete");
        }
    }
    clock.advance(Duration::from_secs(10));
    store.maintain().expect("maintain");
    let stats = store.stats();
    assert!(stats.sealed_tables >= 1, "idle segments are sealed: {stats:?}");
    assert_eq!(stats.sealed_entries, 200);
    assert_eq!(stats.index_entries, 0, "sealed entries leave RAM");
    for (i, k) in keys.iter().enumerate() {
        let claim = store.claim(k, b"req").expect("claim sealed key");
        if i % 2 == 0 {
            assert!(matches!(claim, Claim::Completed(ref c) if c.outcome == format!("outcome-{i}").into_bytes()));
        } else {
            assert!(matches!(claim, Claim::InProgress { .. }), "{claim:?}");
        }
    }
    store.close().expect("close");
    (disk, clock, keys)
}

#[test]
fn sealed_keys_answer_from_tables_and_reopen_without_scanning() {
    let (disk, clock, keys) = sealed_store();
    let store = Store::open(dir(), options(&disk.power_cut(None), &clock)).expect("reopen");
    let recovery = store.stats().recovery;
    assert!(recovery.tables_loaded >= 1, "{recovery:?}");
    assert_eq!(recovery.records, 0, "sealed segments are mapped, not scanned: {recovery:?}");
    assert!(matches!(store.claim(&keys[0], b"req").expect("claim"), Claim::Completed(_)));
    assert!(matches!(store.claim(&keys[0], b"other").expect("claim"), Claim::Mismatch));
    let Claim::Acquired(token) = store.claim(&keys[1], b"req").expect("claim") else {
        panic!("an orphan of the earlier process is taken over")
    };
    assert!(token.recovered());
    store.complete(&token, b"late").expect("complete");
    assert!(matches!(store.claim(&keys[1], b"req").expect("claim"), Claim::Completed(c) if c.outcome == b"late"));
    assert!(matches!(store.claim(b"never-seen", b"req").expect("claim"), Claim::Acquired(_)));
}

fn damage_tables(disk: &SimDisk, damage: impl Fn(&Path, Vec<u8>) -> Option<Vec<u8>>) -> usize {
    let mut damaged = 0;
    for path in table_paths(disk) {
        let bytes = disk.read_file(&path).expect("table bytes");
        match damage(&path, bytes) {
            Some(bytes) => disk.write_file(&path, bytes),
            None => disk.remove(&path).expect("remove"),
        }
        damaged += 1;
    }
    damaged
}

#[test]
fn damaged_table_falls_back_to_a_scan_and_is_rebuilt() {
    let (disk, clock, keys) = sealed_store();
    let cut = disk.power_cut(None);
    let damaged = damage_tables(&cut, |_, mut bytes| {
        bytes[70] ^= 0x40; // inside the filter, covered by the header checksum
        Some(bytes)
    });
    assert!(damaged >= 1);
    let store = Store::open(dir(), options(&cut, &clock)).expect("reopen");
    let recovery = store.stats().recovery;
    assert_eq!(recovery.tables_rebuilt as usize, damaged, "{recovery:?}");
    assert!(recovery.records >= 200, "the segment was scanned instead: {recovery:?}");
    for (i, k) in keys.iter().enumerate() {
        let claim = store.claim(k, b"req").expect("claim");
        assert_eq!(i % 2 == 0, matches!(claim, Claim::Completed(_)), "{i}: {claim:?}");
    }
    clock.advance(Duration::from_secs(10));
    store.maintain().expect("maintain");
    assert!(store.stats().sealed_tables >= 1, "the table is written anew");
}

#[test]
fn missing_table_falls_back_to_a_scan() {
    let (disk, clock, keys) = sealed_store();
    let cut = disk.power_cut(None);
    assert!(damage_tables(&cut, |_, _| None) >= 1);
    let store = Store::open(dir(), options(&cut, &clock)).expect("reopen");
    assert!(store.stats().recovery.records >= 200);
    assert_eq!(store.keys().expect("keys").len(), keys.len());
}

#[test]
fn damaged_table_entry_is_an_error_not_an_absent_key() {
    let (disk, clock, keys) = sealed_store();
    let cut = disk.power_cut(None);
    damage_tables(&cut, |_, mut bytes| {
        // Flip every entry's offset; the header and filter stay valid.
        let count = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes")) as usize;
        let words = u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes")) as usize;
        let entries_at = 64 + 8 * words;
        for i in 0..count {
            bytes[entries_at + 16 * i + 8] ^= 0x08;
        }
        Some(bytes)
    });
    let store = Store::open(dir(), options(&cut, &clock)).expect("reopen");
    let errors = keys.iter().filter(|k| store.claim(k, b"req").is_err()).count();
    assert_eq!(errors, keys.len(), "a damaged entry never reads as an absent key");
}

#[test]
fn expiry_drops_tables_with_their_segments() {
    let (disk, clock, _) = sealed_store();
    let cut = disk.power_cut(None);
    assert!(!table_paths(&cut).is_empty());
    let store = Store::open(dir(), options(&cut, &clock)).expect("reopen");
    clock.advance(Duration::from_secs(25 * 3600));
    store.maintain().expect("maintain");
    assert_eq!(store.stats().sealed_tables, 0);
    assert!(store.keys().expect("keys").is_empty());
    assert!(table_paths(&cut).is_empty(), "{:?}", cut.file_paths());
    assert!(cut.file_paths().iter().all(|p| p.extension().is_none_or(|e| e != "seg")), "{:?}", cut.file_paths());
}
