//! `Durability::Periodic`, `close()` and drop, on the simulated disk.
//!
//! Promises checked:
//! - the background flusher syncs on its own, with no call from the user, within its interval;
//! - it goes on syncing while maintenance (expiry, sealing) is held up for as long as it takes;
//! - `sync()` makes every write before it durable: a power cut keeps all of it, whole, and
//!   loses (or keeps whole) only what came after;
//! - a process crash (no power loss: the OS keeps what it was given) loses nothing;
//! - `close()` and drop sync everything written before them, so a power cut right after loses
//!   nothing, and they stop the flusher and housekeeper threads.
//!
//! The flusher's interval is wall-clock time (it sleeps on the real clock, not on the store's
//! `Clock`), so the flusher test waits for its effect, polling with a generous deadline. The
//! tests that start background threads run one at a time (`BACKGROUND`), so the thread count
//! they read is their own.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use idemstore::sim::SimDisk;
use idemstore::{Durability, Entry, Options, Store};

mod common;
use common::{acquire, sim_options};

const DIR: &str = "/store";
const HOUR: Duration = Duration::from_secs(3600);
/// The background threads' names as the kernel keeps them (15 bytes of "idemstore-flusher"
/// and "idemstore-housekeeper").
const FLUSHER_COMM: &str = "idemstore-flush";
const HOUSEKEEPER_COMM: &str = "idemstore-house";

static BACKGROUND: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    BACKGROUND.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn options(disk: &SimDisk, durability: Durability, background: bool) -> Options {
    Options { background, ..sim_options(disk, durability) }
}

fn claim_and_complete(store: &Store, key: &str) {
    let token = acquire(store, key);
    store.complete(&token, format!("outcome of {key}")).expect("complete");
}

/// The outcome of `key` in the store a power cut of `disk` would leave (None if absent or not
/// completed). Opens the image read-only.
fn outcome_after_power_cut(disk: &SimDisk, torn_seed: Option<u64>, key: &str) -> Option<Vec<u8>> {
    let image = disk.power_cut(torn_seed);
    let store = Store::open_read_only_with(DIR, options(&image, Durability::None, false))
        .expect("the image of a power cut opens");
    match store.get(key).expect("get") {
        Some(Entry::Completed(done)) => Some(done.outcome),
        _ => None,
    }
}

/// (flusher, housekeeper) threads running in this process.
fn background_threads() -> (usize, usize) {
    let comms: Vec<String> = std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|comm| comm.trim_end().to_string())
        .collect();
    let count = |name: &str| comms.iter().filter(|comm| *comm == name).count();
    (count(FLUSHER_COMM), count(HOUSEKEEPER_COMM))
}

/// Polls `condition` until it holds or 30 s pass.
fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn periodic_flusher_makes_writes_durable_without_any_call() {
    let _serial = one_at_a_time();
    let disk = SimDisk::new();
    let store = Store::open(DIR, options(&disk, Durability::Periodic(Duration::from_millis(20)), true)).expect("open");
    claim_and_complete(&store, "flushed by the flusher");
    let want = Some(b"outcome of flushed by the flusher".to_vec());
    eventually("the flusher syncs the write", || {
        outcome_after_power_cut(&disk, None, "flushed by the flusher") == want
    });
    store.close().expect("close");
}

#[test]
fn periodic_syncs_go_on_while_maintenance_is_held() {
    let _serial = one_at_a_time();
    let disk = SimDisk::new();
    let store = Store::open(DIR, options(&disk, Durability::Periodic(Duration::from_millis(20)), true)).expect("open");
    // As a long bucket drop or sealing pass would, for as long as the test needs.
    let maintenance = store.hold_maintenance();
    for round in 0..3 {
        let key = format!("written while maintenance is held, round {round}");
        let syncs = store.stats().syncs_total;
        claim_and_complete(&store, &key);
        eventually(&format!("a periodic sync after {key:?}"), || store.stats().syncs_total > syncs);
        let want = Some(format!("outcome of {key}").into_bytes());
        assert_eq!(outcome_after_power_cut(&disk, None, &key), want, "{key} lost in a power cut after a periodic sync");
    }
    drop(maintenance);
    store.close().expect("close");
}

#[test]
fn periodic_sync_makes_everything_before_it_durable_and_nothing_after_it_is_half_kept() {
    let disk = SimDisk::new();
    let store = Store::open(DIR, options(&disk, Durability::Periodic(HOUR), false)).expect("open");
    for i in 0..5 {
        claim_and_complete(&store, &format!("before-{i}"));
    }
    store.sync().expect("sync");
    for i in 0..5 {
        claim_and_complete(&store, &format!("after-{i}"));
    }
    // Without a torn write, exactly what was synced survives.
    for i in 0..5 {
        let key = format!("before-{i}");
        assert_eq!(outcome_after_power_cut(&disk, None, &key), Some(format!("outcome of {key}").into_bytes()));
        assert_eq!(outcome_after_power_cut(&disk, None, &format!("after-{i}")), None);
    }
    // With torn writes, the synced part survives and a later write is there whole or not at all.
    for seed in 0..64 {
        let image = disk.power_cut(Some(seed));
        let reopened = Store::open(DIR, options(&image, Durability::Sync, false))
            .unwrap_or_else(|e| panic!("torn seed {seed}: open failed: {e}"));
        for i in 0..5 {
            let key = format!("before-{i}");
            match reopened.get(&key).expect("get") {
                Some(Entry::Completed(done)) => assert_eq!(done.outcome, format!("outcome of {key}").into_bytes()),
                other => panic!("torn seed {seed}: synced {key} reads {other:?}"),
            }
            let key = format!("after-{i}");
            match reopened.get(&key).expect("get") {
                None | Some(Entry::InFlight { checkpoint: None, orphaned: true, .. }) => {}
                Some(Entry::Completed(done)) => assert_eq!(done.outcome, format!("outcome of {key}").into_bytes()),
                other => panic!("torn seed {seed}: unsynced {key} reads {other:?}"),
            }
        }
    }
    drop(store);
}

#[test]
fn periodic_process_crash_loses_nothing() {
    let disk = SimDisk::new();
    let store = Store::open(DIR, options(&disk, Durability::Periodic(HOUR), false)).expect("open");
    for i in 0..5 {
        claim_and_complete(&store, &format!("key-{i}"));
    }
    let held = acquire(&store, "held");
    store.checkpoint(&held, "step 2").expect("checkpoint");
    // A kill -9: no close, no drop, no sync; the OS keeps every byte it was handed.
    std::mem::forget(store);
    let crashed = SimDisk::new();
    for path in disk.file_paths() {
        crashed.write_file(&path, disk.read_file(&path).expect("live bytes"));
    }
    let store = Store::open(DIR, options(&crashed, Durability::Periodic(HOUR), false)).expect("reopen");
    for i in 0..5 {
        let key = format!("key-{i}");
        match store.get(&key).expect("get") {
            Some(Entry::Completed(done)) => assert_eq!(done.outcome, format!("outcome of {key}").into_bytes()),
            other => panic!("{key} after a process crash: {other:?}"),
        }
    }
    match store.get("held").expect("get") {
        Some(Entry::InFlight { checkpoint, orphaned: true, .. }) => {
            assert_eq!(checkpoint.as_deref(), Some(&b"step 2"[..]))
        }
        other => panic!("held after a process crash: {other:?}"),
    }
}

/// Opens a store on a fresh disk under `Periodic(1 h)` with its flusher running, claims and
/// completes "key-0" to "key-9" (none of it synced yet), ends the store with `end`, then checks
/// that the flusher and housekeeper threads stopped and that every key keeps its outcome through a power cut
/// after `ending`. Returns the disk and what `end` returned.
fn end_a_periodic_store<T>(ending: &str, end: impl FnOnce(Store) -> T) -> (SimDisk, T) {
    let _serial = one_at_a_time();
    let before = background_threads();
    let disk = SimDisk::new();
    let store = Store::open(DIR, options(&disk, Durability::Periodic(HOUR), true)).expect("open");
    // The thread names itself once it runs, which may be a moment after `open` returns.
    eventually("the store runs one flusher and one housekeeper thread", || {
        background_threads() == (before.0 + 1, before.1 + 1)
    });
    for i in 0..10 {
        claim_and_complete(&store, &format!("key-{i}"));
    }
    let ended = end(store);
    eventually("the flusher and housekeeper threads end", || background_threads() == before);
    for i in 0..10 {
        let key = format!("key-{i}");
        assert_eq!(
            outcome_after_power_cut(&disk, None, &key),
            Some(format!("outcome of {key}").into_bytes()),
            "{key} written before {ending} lost in a power cut after it"
        );
    }
    (disk, ended)
}

#[test]
fn close_syncs_everything_written_before_it_and_stops_the_flusher() {
    let (disk, held) = end_a_periodic_store("close()", |store| {
        let held = acquire(&store, "held");
        store.close().expect("close");
        held
    });
    // The directory lock is released: the store reopens on the same disk, and the held claim
    // of the closed store is an orphan there.
    let store = Store::open(DIR, options(&disk.power_cut(None), Durability::Sync, false)).expect("reopen");
    assert!(matches!(store.get("held").expect("get"), Some(Entry::InFlight { orphaned: true, .. })));
    drop(held);
}

#[test]
fn drop_syncs_everything_written_before_it_and_stops_the_flusher() {
    let (disk, ()) = end_a_periodic_store("the drop", drop);
    let reopened = Store::open(DIR, options(&disk, Durability::Sync, false)).expect("the lock was released");
    drop(reopened);
}
