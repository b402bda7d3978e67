//! Bounded files: however many buckets are live (a 72 h window of 1-minute buckets with mixed
//! TTLs), the store holds at most `Options::max_open_files` segment descriptors (+ the lock
//! file and one spare), and every key stays readable through the maps.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use idemstore::{Claim, ClaimOptions, Durability, Entry, ManualClock, Options, Store};

mod common;
use common::START_MS;

/// Descriptors this process holds on files inside `dir`.
fn descriptors_into(dir: &Path) -> usize {
    let dir = std::fs::canonicalize(dir).expect("canonical dir");
    std::fs::read_dir("/proc/self/fd")
        .expect("list /proc/self/fd")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.starts_with(&dir))
        .count()
}

/// A store of one-minute buckets and small segments on `clock`, not durable, bounded to
/// `max_open_files` descriptors: the tests below open one bucket per key.
fn minute_buckets(clock: &Arc<ManualClock>, max_open_files: usize) -> Options {
    Options {
        durability: Durability::None,
        clock: clock.clone(),
        bucket_width: Duration::from_secs(60),
        max_open_files,
        segment_bytes_initial: 64 << 10,
        ..Default::default()
    }
}

#[test]
fn a_72_hour_window_of_one_minute_buckets_stays_within_max_open_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(START_MS);
    let max_open_files = 8;
    let options = Options { background: false, ..minute_buckets(&clock, max_open_files) };
    let store = Store::open(dir.path(), options.clone()).expect("open");
    // Mixed TTLs from 1 minute to 72 hours: one bucket each, all live at once.
    let ttls: Vec<Duration> = (1..=72 * 60).step_by(7).map(|m| Duration::from_secs(60 * m)).collect();
    for (i, ttl) in ttls.iter().enumerate() {
        let key = format!("key-{i}");
        let claim =
            store.claim_with(&key, b"req", ClaimOptions { ttl: Some(*ttl), ..Default::default() }).expect("claim");
        let Claim::Acquired(token) = claim else { panic!("fresh key {key}") };
        store.complete(&token, format!("outcome-{i}")).expect("complete");
        assert!(descriptors_into(dir.path()) <= max_open_files + 2, "after {i} buckets");
    }
    let stats = store.stats();
    assert!(stats.segments as usize >= ttls.len(), "one segment per bucket: {stats:?}");
    assert!(stats.open_files as usize <= max_open_files + 2, "{stats:?}");
    assert!(descriptors_into(dir.path()) <= max_open_files + 2);
    for (i, _) in ttls.iter().enumerate() {
        let Some(Entry::Completed(done)) = store.get(format!("key-{i}")).expect("get") else {
            panic!("key-{i} readable without a descriptor")
        };
        assert_eq!(done.outcome, format!("outcome-{i}").into_bytes());
    }
    drop(store);

    // Reopen: recovered segments are read through their maps; only the lock stays open.
    let store = Store::open(dir.path(), options).expect("reopen");
    assert!(descriptors_into(dir.path()) <= 2, "{} descriptors after reopen", descriptors_into(dir.path()));
    clock.advance(Duration::from_secs(36 * 3600));
    store.maintain().expect("maintain");
    let live = ttls.iter().filter(|t| **t > Duration::from_secs(36 * 3600)).count();
    assert_eq!(store.keys().expect("keys").len(), live, "half the window expired, bucket by bucket");
}

/// A bucket that fills segment after segment gives each full segment's descriptor up when it
/// moves on: one busy bucket never holds more than the segment it appends to.
#[test]
fn a_bucket_that_fills_many_segments_holds_one_descriptor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(START_MS);
    let options = Options {
        segment_bytes_max: 64 << 10,
        segment_bytes_initial: 16 << 10,
        max_key_len: 64,
        max_outcome_len: 128,
        ..common::options(&clock)
    };
    let store = Store::open(dir.path(), options).expect("open");
    for i in 0..4_000 {
        let token = common::acquire(&store, &format!("key-{i}"));
        store.complete(&token, [7u8; 64]).expect("complete");
    }
    let stats = store.stats();
    assert!(stats.segments >= 10, "the bucket filled several segments: {stats:?}");
    // The lock file and the one segment taking appends.
    let descriptors = descriptors_into(dir.path());
    assert!(descriptors <= 2, "{descriptors} descriptors for one bucket");
    assert!(stats.open_files <= 2, "{stats:?}");
}

/// A file created for a segment whose map then fails (ENOMEM once `vm.max_map_count` is
/// reached; here a capacity no address space holds) is removed again: left behind, it would
/// make every later creation of the same segment id fail with `AlreadyExists`.
#[test]
fn a_created_file_whose_map_fails_is_not_left_behind() {
    use idemstore::io::{Io, RealIo};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("00000001.seg");
    let Err(err) = RealIo.create(&path, 1 << 62) else { panic!("a 4 EiB map succeeded") };
    assert_ne!(err.kind(), std::io::ErrorKind::AlreadyExists, "{err}");
    assert!(!path.exists(), "the file of the failed creation is still there ({err})");
    let file = RealIo.create(&path, 1 << 20).expect("the same name can be created again");
    file.reserve(4096).expect("reserve");
}

/// With several lanes, each writing thread keeps its own segments taking appends and the
/// housekeeper a spare file per lane: together they still hold at most `max_open_files`
/// descriptors (+ the lock file and one spare), whatever the threads write.
#[test]
fn lanes_and_their_spares_stay_within_max_open_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(START_MS);
    let max_open_files = 8;
    let options = Options { background: true, log_lanes: 4, ..minute_buckets(&clock, max_open_files) };
    let store = Store::open(dir.path(), options).expect("open");
    for round in 0..40u64 {
        // Four threads, four lanes, each key in a bucket of its own.
        std::thread::scope(|scope| {
            for thread in 0..4u64 {
                let store = &store;
                scope.spawn(move || {
                    let ttl = Duration::from_secs(60 * (1 + round * 4 + thread));
                    let key = format!("key-{round}-{thread}");
                    let claim = store
                        .claim_with(&key, b"req", ClaimOptions { ttl: Some(ttl), ..Default::default() })
                        .expect("claim");
                    let Claim::Acquired(token) = claim else { panic!("fresh key {key}") };
                    store.complete(&token, "outcome").expect("complete");
                });
            }
        });
        // The spares the lanes used up are made again.
        assert!(store.run_housekeeping_pass(), "the store runs a housekeeper");
        let open = descriptors_into(dir.path());
        assert!(open <= max_open_files + 2, "round {round}: {open} descriptors open");
    }
}
