//! Promise: `claim_with(.., ClaimOptions { wait: Some(d), .. })`.
//!
//! A claim of an in-flight key with a wait blocks until the holder completes (and then returns
//! `Completed` with its outcome), releases (then `Acquired`), its lease ends (then a takeover),
//! or the wait runs out (then `InProgress`). A different request is `Mismatch` at once, and many
//! concurrent waiters see one winner. Real threads; the only timing asserted is that a wait
//! that ran out lasted at least its length, plus generous upper bounds against a hang.
//!
//! Where a thread must be blocked in its wait before the holder acts, the holder pauses a
//! little after a barrier; if the waiter arrives late anyway, the answer checked is the same.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use idemstore::{Claim, ClaimOptions, Entry, ManualClock, Store};

mod common;
use common::{START_MS, acquired};

/// Long enough that no waiter in these tests times out unless the test means it to.
const LONG_WAIT: Duration = Duration::from_secs(60);
/// Upper bound on how long an answer that should come "at once" or "after the event" may take.
const GENEROUS: Duration = Duration::from_secs(30);
/// Head start given to waiters before the holder acts (not needed for correctness).
const HEAD_START: Duration = Duration::from_millis(100);

fn open(clock: &Arc<ManualClock>) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), common::options(clock)).unwrap();
    (dir, store)
}

fn waiting() -> ClaimOptions {
    ClaimOptions { wait: Some(LONG_WAIT), ..Default::default() }
}

/// Runs `waiter` on another thread; once it is about to claim, runs `holder_acts`; returns what
/// the waiter got and how long it took.
fn wait_while(
    store: &Store,
    waiter: impl FnOnce(&Store) -> Claim + Send,
    holder_acts: impl FnOnce(),
) -> (Claim, Duration) {
    let ready = Barrier::new(2);
    thread::scope(|s| {
        let handle = s.spawn(|| {
            ready.wait();
            let started = Instant::now();
            let claim = waiter(store);
            (claim, started.elapsed())
        });
        ready.wait();
        thread::sleep(HEAD_START);
        holder_acts();
        handle.join().expect("waiter thread")
    })
}

#[test]
fn waiter_gets_the_outcome_when_the_holder_completes() {
    let clock = ManualClock::new(START_MS);
    let (_dir, store) = open(&clock);
    let token = acquired(store.claim("k", b"req").unwrap());
    let (claim, took) = wait_while(
        &store,
        |store| store.claim_with("k", b"req", waiting()).unwrap(),
        || store.complete(&token, b"the outcome").unwrap(),
    );
    let Claim::Completed(done) = claim else { panic!("waiter must get the outcome, got {claim:?}") };
    assert_eq!(done.outcome, b"the outcome");
    assert!(took < GENEROUS, "the waiter returned {took:?} after the holder completed");
}

#[test]
fn waiter_acquires_the_key_when_the_holder_releases() {
    let clock = ManualClock::new(START_MS);
    let (_dir, store) = open(&clock);
    let token = acquired(store.claim("k", b"req").unwrap());
    store.checkpoint(&token, b"phase").unwrap();
    let (claim, took) = wait_while(
        &store,
        |store| store.claim_with("k", b"req", waiting()).unwrap(),
        || store.release(&token).unwrap(),
    );
    let next = acquired(claim);
    assert!(!next.recovered(), "a released key is free, not taken over");
    assert_eq!(next.checkpoint(), None);
    assert!(took < GENEROUS);
    assert!(matches!(store.claim("k", b"req").unwrap(), Claim::InProgress { .. }), "the waiter now holds it");
}

#[test]
fn waiter_acquires_the_key_when_it_is_removed() {
    let clock = ManualClock::new(START_MS);
    let (_dir, store) = open(&clock);
    let _held = acquired(store.claim("k", b"req").unwrap());
    let (claim, took) =
        wait_while(&store, |store| store.claim_with("k", b"req", waiting()).unwrap(), || store.remove("k").unwrap());
    assert!(!acquired(claim).recovered());
    assert!(took < GENEROUS);
}

#[test]
fn waiter_takes_over_when_the_holders_lease_ends() {
    let clock = ManualClock::new(START_MS);
    let (_dir, store) = open(&clock);
    let lease = ClaimOptions { lease: Some(Duration::from_millis(200)), ..Default::default() };
    let old = acquired(store.claim_with("k", b"req", lease).unwrap());
    store.checkpoint(&old, b"half way").unwrap();
    let (claim, took) = wait_while(
        &store,
        |store| store.claim_with("k", b"req", waiting()).unwrap(),
        || clock.advance(Duration::from_secs(1)),
    );
    let taker = acquired(claim);
    assert!(taker.recovered());
    assert_eq!(taker.checkpoint(), Some(&b"half way"[..]));
    assert!(took < GENEROUS, "a waiter must notice the lease end, took {took:?}");
    assert!(matches!(store.complete(&old, b"late"), Err(idemstore::Error::StaleToken)));
}

/// The key's window can end before the holder's lease (a TTL shorter than the lease): nothing
/// is written then to wake the waiter, so it must wake by itself at the window's end and take
/// the key, not sleep on until its wait or the lease runs out.
#[test]
fn waiter_acquires_the_key_when_its_window_ends_before_the_lease() {
    let clock = ManualClock::new(START_MS);
    let (_dir, store) = open(&clock);
    let short_window =
        ClaimOptions { ttl: Some(Duration::from_secs(1)), lease: Some(Duration::from_secs(30)), ..Default::default() };
    let _holder = acquired(store.claim_with("k", b"req", short_window).unwrap());
    let wait = Duration::from_secs(8);
    let (claim, took) = wait_while(
        &store,
        |store| store.claim_with("k", b"req", ClaimOptions { wait: Some(wait), ..Default::default() }).unwrap(),
        || clock.advance(Duration::from_millis(1_500)),
    );
    let token = acquired(claim);
    assert!(!token.recovered(), "the window ended: a new holding, not a takeover");
    // The waiter sleeps at most until the window's end (1 s of the store's time from its
    // claim) before it looks again; it must not wait out its 8 s.
    assert!(took < wait - Duration::from_secs(2), "the waiter slept past the window's end: {took:?}");
}

#[test]
fn waiter_returns_in_progress_when_the_wait_runs_out() {
    let clock = ManualClock::new(START_MS);
    let (_dir, store) = open(&clock);
    let token = acquired(store.claim("k", b"req").unwrap());
    let wait = Duration::from_millis(300);
    let started = Instant::now();
    let claim = store.claim_with("k", b"req", ClaimOptions { wait: Some(wait), ..Default::default() }).unwrap();
    let took = started.elapsed();
    assert_eq!(common::in_progress_until(claim), Some(token.lease_expires_at()));
    assert!(took >= wait, "returned after {took:?}, before its wait of {wait:?} ran out");
    assert!(took < GENEROUS, "a wait of {wait:?} took {took:?}");
    // The holder is unaffected.
    store.complete(&token, b"ok").unwrap();
}

#[test]
fn waiter_with_a_different_request_gets_mismatch_at_once() {
    let clock = ManualClock::new(START_MS);
    let (_dir, store) = open(&clock);
    let _held = acquired(store.claim("k", b"req").unwrap());
    let started = Instant::now();
    assert_eq!(store.claim_with("k", b"other", waiting()).unwrap(), Claim::Mismatch);
    assert!(started.elapsed() < GENEROUS, "a mismatch must not wait for the holder");
}

#[test]
fn many_waiters_all_get_the_one_outcome() {
    const WAITERS: usize = 8;
    let clock = ManualClock::new(START_MS);
    let (_dir, store) = open(&clock);
    let token = acquired(store.claim("k", b"req").unwrap());
    let ready = Barrier::new(WAITERS + 1);
    let answers: Vec<Claim> = thread::scope(|s| {
        let handles: Vec<_> = (0..WAITERS)
            .map(|_| {
                s.spawn(|| {
                    ready.wait();
                    store.claim_with("k", b"req", waiting()).unwrap()
                })
            })
            .collect();
        ready.wait();
        thread::sleep(HEAD_START);
        store.complete(&token, b"once").unwrap();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for answer in answers {
        let Claim::Completed(done) = answer else { panic!("every waiter replays, got {answer:?}") };
        assert_eq!(done.outcome, b"once");
    }
    assert_eq!(store.stats().claims_acquired_total, 1);
}

#[test]
fn concurrent_waiting_claims_have_exactly_one_winner() {
    const THREADS: usize = 8;
    let clock = ManualClock::new(START_MS);
    let (_dir, store) = open(&clock);
    let ready = Barrier::new(THREADS);
    let answers: Vec<Claim> = thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let (store, ready) = (&store, &ready);
                s.spawn(move || {
                    ready.wait();
                    let claim = store.claim_with("k", b"req", waiting()).unwrap();
                    if let Claim::Acquired(token) = &claim {
                        store.complete(token, format!("winner {i}")).unwrap();
                    }
                    claim
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let winners = answers.iter().filter(|a| matches!(a, Claim::Acquired(_))).count();
    assert_eq!(winners, 1, "answers: {answers:?}");
    let Some(Entry::Completed(stored)) = store.get("k").unwrap() else { panic!("the winner completed the key") };
    for answer in &answers {
        match answer {
            Claim::Acquired(_) => {}
            Claim::Completed(done) => assert_eq!(done.outcome, stored.outcome),
            other => panic!("a waiting loser must get the winner's outcome, got {other:?}"),
        }
    }
}
