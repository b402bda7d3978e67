//! Promise: no time a caller or a clock can give makes the store panic, overflow its fencing
//! tokens, or write a file that the next open refuses.
//!
//! - A TTL above `TTL_MAX` (`Duration::MAX` for "forever", say) is a clear `InvalidArgument`,
//!   and the store reopens; a TTL of exactly `TTL_MAX` works and reopens, whatever the bucket
//!   width (widths that divide `u64::MAX` once gave a bucket whose start was its end).
//! - A clock past `STORE_TIME_MS_MAX` is `ClockOutOfRange` at open (before recovery deletes a
//!   thing) and on every write, and tokens never go down.
//! - A wait too long for a deadline (`Duration::MAX`) waits without one: no panic.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use idemstore::{Claim, ClaimOptions, Error, ManualClock, Options, STORE_TIME_MS_MAX, Store, TTL_MAX};

mod common;
use common::{START_MS, acquired};

fn options_with_width(clock: &Arc<ManualClock>, bucket_width_ms: u64) -> Options {
    Options { bucket_width: Duration::from_millis(bucket_width_ms), ..common::options(clock) }
}

#[test]
fn a_ttl_past_the_maximum_is_refused_and_the_store_still_reopens() {
    // Widths that divide u64::MAX: a saturated expiry time once made a bucket of no length.
    for width_ms in [1, 255, 65_535, 3_600_000] {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(START_MS);
        let store = Store::open(dir.path(), options_with_width(&clock, width_ms)).unwrap();
        for ttl in [Duration::MAX, Duration::from_secs(u64::MAX), TTL_MAX + Duration::from_millis(1)] {
            let options = ClaimOptions { ttl: Some(ttl), ..Default::default() };
            let answer = store.claim_with("forever", "request", options.clone());
            assert!(
                matches!(answer, Err(Error::InvalidArgument(_))),
                "width {width_ms} ms, ttl {ttl:?}: expected InvalidArgument, got {answer:?}"
            );
            let batch = store.claim_many(&[("batch", "request")], options);
            assert!(matches!(batch[0], Err(Error::InvalidArgument(_))), "claim_many: {:?}", batch[0]);
        }
        let longest = ClaimOptions { ttl: Some(TTL_MAX), ..Default::default() };
        let token = acquired(store.claim_with("longest", "request", longest).unwrap());
        store.complete(&token, "kept").unwrap();
        store.close().unwrap();
        let store = Store::open(dir.path(), options_with_width(&clock, width_ms))
            .unwrap_or_else(|e| panic!("width {width_ms} ms: the store no longer opens: {e}"));
        assert_eq!(common::outcome_of(&store, "longest").as_deref(), Some(&b"kept"[..]));
        assert_eq!(store.get("forever").unwrap(), None, "a refused claim wrote nothing");
    }
}

#[test]
fn a_default_ttl_past_the_maximum_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let options = Options { default_ttl: Duration::MAX, ..common::options(&clock) };
    assert!(matches!(Store::open(dir.path(), options), Err(Error::InvalidArgument(_))));
}

#[test]
fn a_clock_past_the_last_supported_time_is_refused_at_open_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = common::open(dir.path(), &clock);
    let token = common::acquire(&store, "kept");
    store.complete(&token, "outcome").unwrap();
    store.close().unwrap();
    let before = common::files(dir.path());

    // The year 2527 and beyond once overflowed the sequence: tokens 0 and 1, or a panic.
    for far_ms in [STORE_TIME_MS_MAX + 1, 1 << 44, u64::MAX / 2, u64::MAX] {
        let far = ManualClock::new(far_ms);
        match Store::open(dir.path(), common::options(&far)) {
            Err(Error::ClockOutOfRange { now_ms, max_ms }) => {
                assert_eq!((now_ms, max_ms), (far_ms, STORE_TIME_MS_MAX));
            }
            other => panic!("clock at {far_ms} ms: expected ClockOutOfRange, got {other:?}"),
        }
        assert_eq!(common::files(dir.path()), before, "a refused open changed the directory");
    }
    let store = common::open(dir.path(), &clock);
    assert_eq!(common::outcome_of(&store, "kept").as_deref(), Some(&b"outcome"[..]));
}

#[test]
fn a_clock_that_jumps_past_the_last_supported_time_refuses_writes_and_tokens_never_go_down() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = common::open(dir.path(), &clock);
    let first = common::acquire(&store, "before");
    let second = common::acquire(&store, "second");
    clock.set_ms(1 << 44);
    let claimed = store.claim("after", "request");
    assert!(matches!(claimed, Err(Error::ClockOutOfRange { .. })), "{claimed:?}");
    // At that time every key has expired: its token is stale, and nothing is written.
    assert!(store.complete(&second, "late").is_err());
    drop(store);
    clock.set_ms(START_MS + 1_000);
    let store = common::open(dir.path(), &clock);
    let taken_over = acquired(store.claim("before", "request").unwrap());
    assert!(taken_over.id() > first.id(), "fencing tokens went down: {} after {}", taken_over.id(), first.id());
    let fresh = common::acquire(&store, "after");
    assert!(fresh.id() > first.id());
}

#[test]
fn a_wait_too_long_for_a_deadline_waits_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = common::open(dir.path(), &clock);
    let waits = [Duration::MAX, Duration::from_secs(u64::MAX), Duration::from_secs(i64::MAX as u64)];
    for (i, wait) in waits.into_iter().enumerate() {
        let forever = ClaimOptions { wait: Some(wait), ..Default::default() };
        assert!(matches!(store.claim_with(format!("fresh-{i}"), "request", forever.clone()), Ok(Claim::Acquired(_))));
        let batch = store.claim_many(&[(format!("batch-{i}"), "request")], forever);
        assert!(matches!(batch[0], Ok(Claim::Acquired(_))), "{:?}", batch[0]);
    }
    // A key in flight: the endless wait ends when the holder completes.
    let token = common::acquire(&store, "held");
    thread::scope(|s| {
        let waiter = s.spawn(|| {
            store.claim_with("held", "request", ClaimOptions { wait: Some(Duration::MAX), ..Default::default() })
        });
        thread::sleep(Duration::from_millis(50));
        store.complete(&token, "done").unwrap();
        match waiter.join().expect("the waiter panicked") {
            Ok(Claim::Completed(done)) => assert_eq!(done.outcome, b"done"),
            other => panic!("expected the holder's outcome, got {other:?}"),
        }
    });
}

#[test]
fn a_periodic_interval_past_a_day_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    for interval in [Duration::MAX, Duration::from_secs(24 * 3600 + 1)] {
        let options = Options {
            durability: idemstore::Durability::Periodic(interval),
            background: true,
            ..common::options(&clock)
        };
        assert!(matches!(Store::open(dir.path(), options), Err(Error::InvalidArgument(_))), "{interval:?}");
    }
    let daily = Options {
        durability: idemstore::Durability::Periodic(Duration::from_secs(24 * 3600)),
        background: true,
        ..common::options(&clock)
    };
    let store = Store::open(dir.path(), daily).expect("a daily sync is accepted");
    let _held = common::acquire(&store, "key");
    store.close().unwrap();
}

/// The time floor is written ahead of store time while the housekeeper runs; near the last
/// supported time the lead stops there instead of poisoning the store.
#[test]
fn a_clock_just_below_the_last_supported_time_keeps_working_with_the_housekeeper() {
    let disk = idemstore::sim::SimDisk::new();
    let clock = ManualClock::new(STORE_TIME_MS_MAX - 500);
    let options = Options {
        durability: idemstore::Durability::Sync,
        background: true,
        io: Arc::new(disk.clone()),
        ..common::options(&clock)
    };
    let store = Store::open("/store", options).unwrap();
    // The housekeeper's first pass writes the floor ahead at once; a maintain does the same.
    store.maintain().expect("maintenance near the last supported time");
    let claimed = store.claim("key", "request");
    assert!(matches!(claimed, Ok(Claim::Acquired(_))), "{claimed:?}");
    drop(claimed);
    store.close().unwrap();
}
