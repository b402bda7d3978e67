//! Helpers shared by the integration tests: the usual test `Options` (a `ManualClock`, no fsync,
//! no housekeeping thread), opening a store, unwrapping an acquired claim, reading a store
//! directory, a small deterministic generator, and the model of the contract (`model`). Each
//! test file pulls it in with `mod common;` and uses only what it needs.

#![allow(dead_code)]

pub mod model;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use idemstore::sim::SimDisk;
use idemstore::{Claim, ClaimToken, Durability, Entry, Error, ManualClock, Options, Store, ms_to_system_time};

/// Where the `ManualClock` of most tests starts (November 2023).
pub const START_MS: u64 = 1_700_000_000_000;

/// Options for a test store: time from `clock`, no fsync, no housekeeping thread (expired
/// buckets go only when the test calls `maintain`). Tests that need more settings override
/// fields with `Options { field, ..options(clock) }`.
pub fn options(clock: &Arc<ManualClock>) -> Options {
    Options { durability: Durability::None, background: false, clock: clock.clone(), ..Default::default() }
}

/// Options for a test store on the simulated `disk`: `durability`, time from a fresh
/// `ManualClock` at [`START_MS`], no housekeeping thread. Tests that need more settings
/// override fields with `Options { field, ..sim_options(disk, durability) }`.
pub fn sim_options(disk: &SimDisk, durability: Durability) -> Options {
    Options {
        durability,
        clock: ManualClock::new(START_MS),
        io: Arc::new(disk.clone()),
        background: false,
        ..Options::default()
    }
}

/// Options for a store on the simulated `disk` whose segments seal quickly: no fsync, no
/// housekeeping thread, time from `clock`, 1-minute buckets, sealing after 5 s idle, small
/// segment steps (4 KiB, up to 2 MiB). Tests of sealed tables share it.
pub fn sealing_sim_options(disk: &SimDisk, clock: &Arc<ManualClock>) -> Options {
    Options {
        durability: Durability::None,
        background: false,
        clock: clock.clone(),
        io: Arc::new(disk.clone()),
        bucket_width: std::time::Duration::from_secs(60),
        seal_idle_after: std::time::Duration::from_secs(5),
        segment_bytes_initial: 4096,
        segment_bytes_max: 2 << 20,
        ..Default::default()
    }
}

/// Opens a store in `dir` with [`options`].
pub fn open(dir: &Path, clock: &Arc<ManualClock>) -> Store {
    Store::open(dir, options(clock)).expect("open store")
}

/// The wall time `ms` milliseconds after the epoch.
pub fn at(ms: u64) -> SystemTime {
    ms_to_system_time(ms)
}

/// The token of a claim that must have been acquired.
pub fn acquired(claim: Claim) -> ClaimToken {
    match claim {
        Claim::Acquired(token) => token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

/// Claims `key` with the request `"request"` and returns the token; panics unless acquired.
pub fn acquire(store: &Store, key: &str) -> ClaimToken {
    match store.claim(key, "request").expect("claim") {
        Claim::Acquired(token) => token,
        other => panic!("claim of {key}: expected Acquired, got {other:?}"),
    }
}

/// The stored outcome of `key`, or `None` if it is absent or not completed.
pub fn outcome_of(store: &Store, key: &str) -> Option<Vec<u8>> {
    match store.get(key).expect("get") {
        Some(Entry::Completed(done)) => Some(done.outcome),
        _ => None,
    }
}

/// What `SimDisk` says when a sync it was told to fail fails.
pub const FSYNC_FAILURE: &str = "simulated fsync failure";

/// Asserts that `result` is `Error::Poisoned` whose cause names a failed simulated fsync.
pub fn assert_poisoned_by_fsync<T: std::fmt::Debug>(what: &str, result: idemstore::Result<T>) {
    match result {
        Err(Error::Poisoned { cause }) => {
            assert!(cause.contains(FSYNC_FAILURE), "{what}: Poisoned, but the cause does not name the fsync: {cause}")
        }
        other => panic!("{what}: expected Error::Poisoned naming the failed fsync, got {other:?}"),
    }
}

/// Every file in `dir` (the lock file included) with its bytes.
pub fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

/// The names of the files in `dir`, sorted.
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    names
}

/// (offset, length) of every record after the 64-byte segment header (length: the u32 at +4;
/// records padded to 8 bytes; the zeroed preallocated end stops the walk).
pub fn record_offsets(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut records = Vec::new();
    let mut at = 64usize;
    while at + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        records.push((at, len));
        at += len.div_ceil(8) * 8;
    }
    records
}

/// A small deterministic generator (splitmix64), so a seed reproduces a run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True once in `n` calls on average.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// Shuffles `items` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}
