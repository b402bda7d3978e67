//! Promise: lease control, TTL refresh and the out-of-order guard (README, "Use"):
//! `extend_lease` moves a holder's lease on and keeps its checkpoint (a stale token gets
//! `StaleToken`); `touch` gives a key a longer window without changing its answer; `advance`
//! keeps the highest version per key and says whether an event is newer or stale. All three
//! hold across a reopen and, under `Durability::Sync`, across a SIGKILL of the writer.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use idemstore::{Advance, Claim, ClaimOptions, Durability, Entry, Error, ManualClock, Options, Store};

mod common;
use common::{START_MS, acquired, at};

#[test]
fn extend_lease_moves_the_lease_on_keeps_the_checkpoint_and_fences_stale_tokens() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let store = common::open(dir.path(), &clock);
    let lease = ClaimOptions { lease: Some(Duration::from_secs(10)), ..Default::default() };
    let token = acquired(store.claim_with("k", b"req", lease.clone()).unwrap());
    store.checkpoint(&token, b"step 1").unwrap();
    clock.advance(Duration::from_secs(8));
    store.extend_lease(&token, Duration::from_secs(60)).unwrap();
    assert_eq!(token.lease_expires_at(), at(START_MS + 68_000));
    let Some(Entry::InFlight { lease_expires_at, checkpoint, .. }) = store.get("k").unwrap() else { panic!() };
    assert_eq!((lease_expires_at, checkpoint.as_deref()), (at(START_MS + 68_000), Some(&b"step 1"[..])));

    // Past the first lease, the key is still held.
    clock.advance(Duration::from_secs(30));
    assert_eq!(common::in_progress_until(store.claim("k", b"req").unwrap()), Some(at(START_MS + 68_000)));
    // A shorter extension never shortens the lease.
    store.extend_lease(&token, Duration::from_secs(1)).unwrap();
    assert_eq!(token.lease_expires_at(), at(START_MS + 68_000));

    // Once the lease ran out and another claim took over, the old token is stale.
    clock.advance(Duration::from_secs(31));
    let taker = acquired(store.claim("k", b"req").unwrap());
    assert_eq!(taker.checkpoint(), Some(&b"step 1"[..]));
    assert!(matches!(store.extend_lease(&token, Duration::from_secs(60)), Err(Error::StaleToken)));
    assert!(matches!(store.extend_lease(&taker, Duration::ZERO), Err(Error::InvalidArgument(_))));
    store.extend_lease(&taker, Duration::from_secs(120)).unwrap();
    drop(store);
    let store = common::open(dir.path(), &clock);
    let Some(Entry::InFlight { lease_expires_at, .. }) = store.get("k").unwrap() else { panic!() };
    assert_eq!(lease_expires_at, at(START_MS + 69_000 + 120_000), "the extension survives a reopen");
}

#[test]
fn touch_extends_a_window_without_changing_the_answer() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let store = common::open(dir.path(), &clock);
    let ttl = ClaimOptions { ttl: Some(Duration::from_secs(60)), ..Default::default() };
    let token = acquired(store.claim_with("done", b"req", ttl.clone()).unwrap());
    store.complete(&token, b"outcome").unwrap();
    clock.advance(Duration::from_secs(50));
    assert_eq!(store.touch("done", Duration::from_secs(3600)).unwrap(), Some(at(START_MS + 50_000 + 3_600_000)));
    // A shorter window is not taken: the key keeps the longer one.
    assert_eq!(store.touch("done", Duration::from_secs(1)).unwrap(), Some(at(START_MS + 50_000 + 3_600_000)));
    assert_eq!(store.touch("absent", Duration::from_secs(60)).unwrap(), None);
    assert!(store.get("absent").unwrap().is_none(), "touch never creates a key");

    clock.advance(Duration::from_secs(120)); // past the first window
    let Claim::Completed(done) = store.claim("done", b"req").unwrap() else { panic!("the touched key expired") };
    assert_eq!(
        (done.outcome.as_slice(), done.claimed_at, done.completed_at),
        (&b"outcome"[..], at(START_MS), at(START_MS))
    );
    assert_eq!(store.claim("done", b"other").unwrap(), Claim::Mismatch);

    // An in-flight key keeps its holder.
    let held = acquired(store.claim_with("held", b"req", ttl).unwrap());
    store.touch("held", Duration::from_secs(3600)).unwrap();
    clock.advance(Duration::from_secs(61));
    store.complete(&held, b"late but held").unwrap();
    drop(store);
    let store = common::open(dir.path(), &clock);
    assert_eq!(common::outcome_of(&store, "held"), Some(b"late but held".to_vec()));
    store.maintain().unwrap();
    assert_eq!(common::outcome_of(&store, "done"), Some(b"outcome".to_vec()), "kept past its first bucket");
    clock.advance(Duration::from_secs(3600));
    assert!(store.get("done").unwrap().is_none(), "expires at its new time");
}

#[test]
fn advance_keeps_the_highest_version_and_drops_older_events() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let store = common::open(dir.path(), &clock);
    assert_eq!(store.advance("order-7", 3).unwrap(), Advance::Newer { previous: None });
    assert_eq!(store.advance("order-7", 2).unwrap(), Advance::Stale { current: 3 });
    assert_eq!(store.advance("order-7", 3).unwrap(), Advance::Stale { current: 3 }, "a duplicate is stale");
    assert_eq!(store.advance("order-7", 9).unwrap(), Advance::Newer { previous: Some(3) });
    assert_eq!(store.advance("order-8", 1).unwrap(), Advance::Newer { previous: None }, "keys are independent");

    // Claims and advances do not share keys.
    assert_eq!(store.claim("order-7", b"req").unwrap(), Claim::Mismatch);
    let _held = acquired(store.claim("claimed", b"req").unwrap());
    assert!(matches!(store.advance("claimed", 1), Err(Error::InvalidArgument(_))));
    drop(store);

    let store = common::open(dir.path(), &clock);
    assert_eq!(store.advance("order-7", 5).unwrap(), Advance::Stale { current: 9 }, "kept across a reopen");
    // The window: a version is forgotten a TTL after the last newer one.
    clock.advance(Duration::from_secs(24 * 3600 + 1));
    assert_eq!(store.advance("order-7", 5).unwrap(), Advance::Newer { previous: None });
}

#[test]
fn advance_decides_atomically_between_threads() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let store = common::open(dir.path(), &clock);
    let newer = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (store, newer) = (&store, &newer);
            s.spawn(move || {
                for v in 0..500u64 {
                    // Every thread offers every version: each is newer exactly once.
                    if let Advance::Newer { .. } = store.advance("k", v * 4 + (t + v) % 4).unwrap() {
                        newer.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let Advance::Stale { current } = store.advance("k", 0).unwrap() else { panic!() };
    assert_eq!(current, 499 * 4 + 3);
    let applied = newer.load(std::sync::atomic::Ordering::Relaxed);
    assert!((1..=2000).contains(&applied), "{applied}");
}

const KILL_CHILD_ENV: &str = "IDEMSTORE_TEST_WINDOW_OPS_CHILD";

fn sync_options() -> Options {
    Options { durability: Durability::Sync, background: false, ..Default::default() }
}

/// Child: advances `stream` to 1, 2, 3, ... and touches `kept` with a growing TTL, printing
/// each acknowledged version until killed.
#[test]
fn acknowledged_advances_and_touches_survive_a_sigkill() {
    if let Ok(dir) = std::env::var(KILL_CHILD_ENV) {
        let store = Store::open(&dir, sync_options()).unwrap();
        let token = acquired(store.claim("kept", b"req").unwrap());
        store.complete(&token, b"kept outcome").unwrap();
        for v in 1..u64::MAX {
            assert_eq!(store.advance("stream", v).unwrap(), Advance::Newer { previous: (v > 1).then(|| v - 1) });
            let expires = store.touch("kept", Duration::from_secs(24 * 3600 + v)).unwrap().unwrap();
            let expires_ms = idemstore::system_time_to_ms(expires);
            println!("ACK {v} {expires_ms}");
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "acknowledged_advances_and_touches_survive_a_sigkill", "--nocapture", "--test-threads=1"])
        .env(KILL_CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut acked = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("ACK ") {
            let mut parts = rest.split(' ').map(|p| p.parse::<u64>().unwrap());
            acked = (parts.next().unwrap(), parts.next().unwrap());
            if acked.0 >= 200 {
                break;
            }
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(acked.0 >= 200, "the child stopped early");

    let store = Store::open(dir.path(), sync_options()).unwrap();
    let Advance::Stale { current } = store.advance("stream", acked.0).unwrap() else {
        panic!("an acknowledged version was lost")
    };
    assert!(current >= acked.0, "version {current} below the acknowledged {}", acked.0);
    let Some(Entry::Completed(kept)) = store.get("kept").unwrap() else { panic!("kept key lost") };
    assert_eq!(kept.outcome, b"kept outcome");
    assert!(idemstore::system_time_to_ms(kept.expires_at) >= acked.1, "an acknowledged touch was lost");
}

#[test]
fn history_counts_the_replays_a_completion_served() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let counting = || Options { count_replays: true, ..common::options(&clock) };
    let other = tempfile::tempdir().unwrap();
    let uncounted = common::open(other.path(), &clock);
    let t = acquired(uncounted.claim("k", b"req").unwrap());
    uncounted.complete(&t, b"done").unwrap();
    let _ = uncounted.claim("k", b"req").unwrap();
    assert_eq!(uncounted.history("k").unwrap().unwrap().replays_served, 0, "not counted unless asked for");
    let store = Store::open(dir.path(), counting()).unwrap();
    let token = acquired(store.claim("k", b"req").unwrap());
    let in_flight = store.history("k").unwrap().unwrap();
    assert_eq!((in_flight.claimed_at, in_flight.completed_at, in_flight.replays_served), (at(START_MS), None, 0));
    clock.advance(Duration::from_secs(2));
    store.complete(&token, b"done").unwrap();
    for _ in 0..3 {
        assert!(matches!(store.claim("k", b"req").unwrap(), Claim::Completed(_)));
    }
    assert_eq!(store.claim("k", b"other").unwrap(), Claim::Mismatch, "a mismatch is not a replay");
    let done = store.history("k").unwrap().unwrap();
    assert_eq!((done.completed_at, done.replays_served), (Some(at(START_MS + 2_000)), 3));
    assert_eq!(store.history("other").unwrap(), None);
    store.touch("k", Duration::from_secs(48 * 3600)).unwrap();
    assert_eq!(store.history("k").unwrap().unwrap().replays_served, 3, "a touch keeps the count");

    // Written at close: a reopen (and a read-only view) sees it, and counts on from there.
    drop(store);
    let store = Store::open(dir.path(), counting()).unwrap();
    assert_eq!(store.history("k").unwrap().unwrap().replays_served, 3, "kept across a reopen");
    let _ = store.claim("k", b"req").unwrap();
    assert_eq!(store.history("k").unwrap().unwrap().replays_served, 4);
    let view = Store::open_read_only_with(dir.path(), common::options(&clock)).unwrap();
    assert_eq!(view.history("k").unwrap().unwrap().replays_served, 3, "not written yet");
    // Maintenance writes a count that has waited a minute.
    clock.advance(Duration::from_secs(61));
    store.maintain().unwrap();
    let view = Store::open_read_only_with(dir.path(), common::options(&clock)).unwrap();
    assert_eq!(view.history("k").unwrap().unwrap().replays_served, 4, "written by maintenance");
    let Some(Entry::Completed(done)) = view.get("k").unwrap() else { panic!() };
    assert_eq!(done.outcome, b"done", "the copy answers as the completion did");
    assert_eq!(store.claim("k", b"other").unwrap(), Claim::Mismatch);

    store.remove("k").unwrap();
    assert_eq!(store.history("k").unwrap(), None);
}
