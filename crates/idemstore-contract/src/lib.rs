//! The dedupe contract as one test suite, written once and run against every backend.
//!
//! A backend's tests implement [`Harness`] (the store under test, its clock, a new
//! incarnation) and expand [`contract_suite!`], which makes one `#[tokio::test]` (multi-thread
//! runtime) per contract test. The tests assert only what the contract says: times are
//! compared with each other (a claim's lease end is its claim time plus the lease), never with
//! a fixed clock reading, so a backend whose clock runs on (a database's) passes them too.
//!
//! The contract is `idemstore::Store`'s, as its method docs say: exactly one concurrent claim
//! is `Acquired`; a repeat is `InProgress` while the holder's lease runs, `Completed` with the
//! stored outcome after completion, `Mismatch` on every branch when the request differs; a
//! lease that ended, or a holder that died, is taken over (`recovered()`, last checkpoint
//! handed on); a stale token gets `StaleToken`, another store's token `ForeignToken`; keys
//! expire at their TTL; `release` frees the key; `remove` makes the holder's token stale.

#![deny(missing_docs)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use idemstore::{Claim, ClaimOptions, ClaimToken, Completed, DedupeStore, Entry, Error, Orphan};

/// A backend under test.
pub trait Harness: Send + Sync + 'static {
    /// The store type.
    type Store: DedupeStore + 'static;

    /// The store of the current incarnation.
    fn store(&self) -> Arc<Self::Store>;

    /// Moves the store's clock on by `by` (no sleeping); waiters look again.
    fn advance(&self, by: Duration);

    /// Ends the current incarnation as a crash would (its in-flight claims become orphans: the
    /// holder is known to be dead) and opens a new one on the same window and clock.
    fn reopen(&mut self) -> impl Future<Output = ()> + Send;

    /// In-flight claims of dead holders, as the backend's `orphans()` lists them.
    fn orphans(&self) -> Vec<Orphan>;

    /// Called once at the end of a test that passed: drop what the test created.
    fn finish(self) -> impl Future<Output = ()> + Send
    where
        Self: Sized,
    {
        async {}
    }
}

/// The default lease of both backends (`Options::default_lease`, `PgOptions::default_lease`).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// The default TTL of both backends.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// The default longest outcome or checkpoint of both backends.
pub const DEFAULT_MAX_OUTCOME: usize = 1 << 20;
/// Long enough that no waiter times out unless the test means it to.
const LONG_WAIT: Duration = Duration::from_secs(60);
/// Upper bound on an answer that should come at once, or right after the event it waits for.
const GENEROUS: Duration = Duration::from_secs(20);
/// Head start given to a waiter before the holder acts (not needed for correctness).
const HEAD_START: Duration = Duration::from_millis(150);

/// The token of an `Acquired` claim; panics (failing the test) on any other answer.
pub fn acquired(claim: Claim) -> ClaimToken {
    match claim {
        Claim::Acquired(token) => token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

fn completed(claim: Claim) -> Completed {
    match claim {
        Claim::Completed(done) => done,
        other => panic!("expected Completed, got {other:?}"),
    }
}

fn with_lease(lease: Duration) -> ClaimOptions {
    ClaimOptions { lease: Some(lease), ..Default::default() }
}

fn with_ttl(ttl: Duration) -> ClaimOptions {
    ClaimOptions { ttl: Some(ttl), ..Default::default() }
}

fn waiting(wait: Duration) -> ClaimOptions {
    ClaimOptions { wait: Some(wait), ..Default::default() }
}

async fn claim<S: DedupeStore>(store: &S, key: &str, request: &[u8]) -> Claim {
    store.claim(key.as_bytes(), request).await.expect("claim")
}

async fn claim_with<S: DedupeStore>(store: &S, key: &str, request: &[u8], options: ClaimOptions) -> Claim {
    store.claim_with(key.as_bytes(), request, options).await.expect("claim_with")
}

async fn get<S: DedupeStore>(store: &S, key: &str) -> Option<Entry> {
    store.get(key.as_bytes()).await.expect("get")
}

/// When `key`'s current holding was claimed (it must be in flight).
async fn claimed_at<S: DedupeStore>(store: &S, key: &str) -> SystemTime {
    match get(store, key).await {
        Some(Entry::InFlight { claimed_at, .. }) => claimed_at,
        other => panic!("expected {key} in flight, got {other:?}"),
    }
}

fn stale<T: std::fmt::Debug>(result: Result<T, Error>, what: &str) {
    assert!(matches!(result, Err(Error::StaleToken)), "{what}: expected StaleToken, got {result:?}");
}

// ---------------------------------------------------------------------------------------------
// Claim branches

/// A free key is `Acquired` with a fresh token: not recovered, no checkpoint, the default lease
/// from its claim time; two holdings never share a fencing number.
pub async fn first_claim_is_acquired_with_a_fresh_token<H: Harness>(h: &mut H) {
    let store = h.store();
    let token = acquired(claim(&*store, "order-1", b"request").await);
    assert_eq!(token.key(), b"order-1");
    assert!(!token.recovered(), "a first claim takes nothing over");
    assert_eq!(token.checkpoint(), None);
    assert_eq!(token.lease_expires_at(), claimed_at(&*store, "order-1").await + DEFAULT_LEASE);
    let custom = acquired(claim_with(&*store, "order-2", b"request", with_lease(Duration::from_secs(5))).await);
    assert_eq!(custom.lease_expires_at(), claimed_at(&*store, "order-2").await + Duration::from_secs(5));
    assert_ne!(custom.id(), token.id(), "two holdings never share a fencing number");
}

/// A repeat inside the holder's lease is `InProgress` with the holder's lease end.
pub async fn repeat_while_in_flight_is_in_progress_with_the_holders_lease_end<H: Harness>(h: &mut H) {
    let store = h.store();
    let token = acquired(claim_with(&*store, "k", b"req", with_lease(Duration::from_secs(10))).await);
    h.advance(Duration::from_secs(8));
    for _ in 0..3 {
        assert_eq!(
            in_progress_until(claim(&*store, "k", b"req").await),
            Some(token.lease_expires_at()),
            "a repeat inside the lease must not take the key"
        );
    }
    // The answer also tells how long the window keeps the key (a client's retry budget).
    let Claim::InProgress { expires_at, .. } = claim(&*store, "k", b"req").await else { panic!("in progress") };
    let Some(Entry::InFlight { expires_at: window_end, .. }) = get(&*store, "k").await else { panic!("in flight") };
    assert_eq!(expires_at, window_end);
}

/// After `complete`, every repeat replays the outcome byte for byte with its times, and `get`
/// reports the same.
pub async fn repeat_after_complete_replays_the_outcome_byte_identical<H: Harness>(h: &mut H) {
    let store = h.store();
    let outcome: Vec<u8> = (0..=255u8).chain([0, 0, 0xff, b'\n']).collect();
    let token = acquired(claim(&*store, "pay-7", b"POST /pay 7").await);
    let claimed = claimed_at(&*store, "pay-7").await;
    h.advance(Duration::from_secs(1));
    store.complete(&token, &outcome).await.unwrap();
    h.advance(Duration::from_secs(60));
    let first = completed(claim(&*store, "pay-7", b"POST /pay 7").await);
    assert_eq!(first.outcome, outcome);
    assert_eq!(first.claimed_at, claimed);
    assert!(first.completed_at >= claimed + Duration::from_secs(1), "completed_at {first:?}");
    assert_eq!(first.expires_at, claimed + DEFAULT_TTL);
    for _ in 0..2 {
        assert_eq!(claim(&*store, "pay-7", b"POST /pay 7").await, Claim::Completed(first.clone()));
    }
    assert_eq!(get(&*store, "pay-7").await, Some(Entry::Completed(first)));
}

/// An empty outcome is an outcome: replayed as empty.
pub async fn empty_outcome_is_replayed_as_empty<H: Harness>(h: &mut H) {
    let store = h.store();
    let token = acquired(claim(&*store, "k", b"r").await);
    store.complete(&token, b"").await.unwrap();
    assert!(completed(claim(&*store, "k", b"r").await).outcome.is_empty());
}

/// A different request is `Mismatch` while the key is in flight; the holder is untouched.
pub async fn different_request_while_in_flight_is_mismatch<H: Harness>(h: &mut H) {
    let store = h.store();
    let token = acquired(claim(&*store, "k", b"request A").await);
    assert_eq!(claim(&*store, "k", b"request B").await, Claim::Mismatch);
    assert_eq!(claim(&*store, "k", b"").await, Claim::Mismatch);
    store.complete(&token, b"done").await.unwrap();
}

/// A different request is `Mismatch` after completion, at once even with a wait; the right
/// request still replays.
pub async fn different_request_after_complete_is_mismatch<H: Harness>(h: &mut H) {
    let store = h.store();
    let token = acquired(claim(&*store, "k", b"request A").await);
    store.complete(&token, b"outcome A").await.unwrap();
    assert_eq!(claim(&*store, "k", b"request B").await, Claim::Mismatch);
    let started = Instant::now();
    assert_eq!(claim_with(&*store, "k", b"request B", waiting(LONG_WAIT)).await, Claim::Mismatch);
    assert!(started.elapsed() < GENEROUS, "a mismatch must not wait");
    assert_eq!(completed(claim(&*store, "k", b"request A").await).outcome, b"outcome A");
}

/// A different request after the holder's lease ended is `Mismatch`, not a takeover: the
/// holder may still complete.
pub async fn different_request_after_lease_ended_is_mismatch_not_a_takeover<H: Harness>(h: &mut H) {
    let store = h.store();
    let lease = with_lease(Duration::from_secs(10));
    let first = acquired(claim_with(&*store, "k", b"request A", lease.clone()).await);
    h.advance(Duration::from_secs(11));
    assert_eq!(claim_with(&*store, "k", b"request B", lease).await, Claim::Mismatch);
    store.complete(&first, b"late but fine").await.unwrap();
}

/// After a takeover the new holding keeps the original request: a different one is `Mismatch`,
/// before and after the new holder completes.
pub async fn different_request_after_a_takeover_is_mismatch<H: Harness>(h: &mut H) {
    let store = h.store();
    let lease = with_lease(Duration::from_secs(10));
    let _first = acquired(claim_with(&*store, "k", b"request A", lease.clone()).await);
    h.advance(Duration::from_secs(11));
    let taker = acquired(claim_with(&*store, "k", b"request A", lease.clone()).await);
    assert!(taker.recovered());
    assert_eq!(claim(&*store, "k", b"request B").await, Claim::Mismatch);
    store.complete(&taker, b"done").await.unwrap();
    assert_eq!(claim(&*store, "k", b"request B").await, Claim::Mismatch);
}

/// An orphan (its holder died) answers `Mismatch` to a different request, and is taken over
/// only by the same request.
pub async fn different_request_for_an_orphan_is_mismatch<H: Harness>(h: &mut H) {
    let store = h.store();
    let _dead = acquired(claim(&*store, "k", b"request A").await);
    drop(store);
    h.reopen().await;
    let store = h.store();
    assert_eq!(claim(&*store, "k", b"request B").await, Claim::Mismatch);
    assert!(acquired(claim(&*store, "k", b"request A").await).recovered());
}

/// `release` frees the key: the next claim acquires it afresh, and the released token is stale.
pub async fn release_frees_the_key_and_fences_the_token<H: Harness>(h: &mut H) {
    let store = h.store();
    let token = acquired(claim(&*store, "k", b"req").await);
    store.release(&token).await.unwrap();
    assert_eq!(get(&*store, "k").await, None);
    let next = acquired(claim(&*store, "k", b"another request is fine after a release").await);
    assert!(!next.recovered(), "a released key is free: nothing is taken over");
    assert!(next.id() > token.id(), "fencing numbers grow");
    stale(store.complete(&token, b"x").await, "complete after release");
    stale(store.release(&token).await, "second release");
    store.complete(&next, b"ok").await.unwrap();
}

/// `remove` of an in-flight key makes the holder's token stale and the key free; of a
/// completed key, forgets the outcome; of an absent key, is `Ok`.
pub async fn remove_makes_the_holders_token_stale_and_frees_the_key<H: Harness>(h: &mut H) {
    let store = h.store();
    let token = acquired(claim(&*store, "k", b"req").await);
    store.remove(b"k").await.unwrap();
    assert_eq!(get(&*store, "k").await, None);
    stale(store.complete(&token, b"x").await, "complete after remove");
    stale(store.checkpoint(&token, b"x").await, "checkpoint after remove");
    stale(store.release(&token).await, "release after remove");
    let again = acquired(claim(&*store, "k", b"req").await);
    store.complete(&again, b"done").await.unwrap();
    store.remove(b"k").await.unwrap();
    assert_eq!(get(&*store, "k").await, None);
    assert!(!acquired(claim(&*store, "k", b"req").await).recovered());
    store.remove(b"never-claimed").await.unwrap();
}

/// `get` reports each state: absent, in flight (times, checkpoint, not orphaned), completed.
pub async fn get_reports_each_state<H: Harness>(h: &mut H) {
    let store = h.store();
    assert_eq!(get(&*store, "k").await, None);
    let token = acquired(claim_with(&*store, "k", b"req", with_lease(Duration::from_secs(7))).await);
    match get(&*store, "k").await {
        Some(Entry::InFlight { claimed_at, lease_expires_at, expires_at, checkpoint, orphaned }) => {
            assert_eq!(lease_expires_at, claimed_at + Duration::from_secs(7));
            assert_eq!(lease_expires_at, token.lease_expires_at());
            assert_eq!(expires_at, claimed_at + DEFAULT_TTL);
            assert_eq!(checkpoint, None);
            assert!(!orphaned, "the holder is alive");
        }
        other => panic!("expected InFlight, got {other:?}"),
    }
    store.complete(&token, b"out").await.unwrap();
    assert!(matches!(get(&*store, "k").await, Some(Entry::Completed(done)) if done.outcome == b"out"));
}

/// Empty keys, zero TTLs and leases, TTLs past `TTL_MAX` and leases of 49 days or more are
/// refused.
pub async fn bad_input_is_refused<H: Harness>(h: &mut H) {
    let store = h.store();
    assert!(matches!(store.claim(b"", b"r").await, Err(Error::EmptyKey)));
    assert!(matches!(store.get(b"").await, Err(Error::EmptyKey)));
    assert!(matches!(store.claim_with(b"k", b"r", with_ttl(Duration::ZERO)).await, Err(Error::InvalidArgument(_))));
    assert!(matches!(store.claim_with(b"k", b"r", with_lease(Duration::ZERO)).await, Err(Error::InvalidArgument(_))));
    assert!(matches!(
        store.claim_with(b"k", b"r", with_ttl(idemstore::TTL_MAX + Duration::from_secs(1))).await,
        Err(Error::InvalidArgument(_))
    ));
    for lease in [Duration::from_millis(u64::from(u32::MAX) + 1), Duration::MAX] {
        assert!(matches!(store.claim_with(b"k", b"r", with_lease(lease)).await, Err(Error::InvalidArgument(_))));
    }
    assert_eq!(get(&*store, "k").await, None, "a refused claim writes nothing");
    // Refused for a completed key too, where a replay would otherwise answer.
    let done = acquired(claim(&*store, "done", b"r").await);
    store.complete(&done, b"out").await.unwrap();
    assert!(completed(claim(&*store, "done", b"r").await).outcome == b"out");
    assert!(matches!(store.claim_with(b"done", b"r", with_ttl(Duration::ZERO)).await, Err(Error::InvalidArgument(_))));
}

/// Of many concurrent claims of one key, exactly one is `Acquired`; the rest see it in flight.
pub async fn concurrent_claims_have_exactly_one_winner<H: Harness>(h: &mut H) {
    let store = h.store();
    for round in 0..5 {
        let key = format!("race-{round}");
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (store, key) = (store.clone(), key.clone());
            tasks.push(tokio::spawn(async move { store.claim(key.as_bytes(), b"req").await.unwrap() }));
        }
        let mut winners = 0;
        for task in tasks {
            match task.await.unwrap() {
                Claim::Acquired(_) => winners += 1,
                Claim::InProgress { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(winners, 1, "round {round}");
    }
}

// ---------------------------------------------------------------------------------------------
// Leases and fencing

/// Inside the lease a repeat waits; at the lease's end the next claim takes over, with the
/// holder's last checkpoint and a larger fencing number.
pub async fn claim_at_lease_end_takes_over_with_the_checkpoint<H: Harness>(h: &mut H) {
    let store = h.store();
    let lease = with_lease(Duration::from_secs(10));
    let old = acquired(claim_with(&*store, "k", b"req", lease.clone()).await);
    store.checkpoint(&old, b"step 2").await.unwrap();
    h.advance(Duration::from_secs(5));
    assert!(matches!(claim_with(&*store, "k", b"req", lease.clone()).await, Claim::InProgress { .. }));
    h.advance(Duration::from_secs(6));
    let taker = acquired(claim_with(&*store, "k", b"req", lease).await);
    assert!(taker.recovered());
    assert_eq!(taker.checkpoint(), Some(&b"step 2"[..]));
    assert!(taker.id() > old.id(), "fencing numbers grow across takeovers");
}

/// After a takeover the old token is stale for complete, checkpoint and release, and the
/// stored state is the new holder's.
pub async fn old_token_is_stale_after_a_takeover<H: Harness>(h: &mut H) {
    let store = h.store();
    let lease = with_lease(Duration::from_secs(10));
    let old = acquired(claim_with(&*store, "k", b"req", lease.clone()).await);
    h.advance(Duration::from_secs(11));
    let new = acquired(claim_with(&*store, "k", b"req", lease).await);
    stale(store.complete(&old, b"late").await, "complete");
    stale(store.checkpoint(&old, b"late").await, "checkpoint");
    stale(store.release(&old).await, "release");
    store.complete(&new, b"winner").await.unwrap();
    assert_eq!(completed(claim(&*store, "k", b"req").await).outcome, b"winner");
}

/// A chain of takeovers fences every earlier holder.
pub async fn a_chain_of_takeovers_fences_every_earlier_holder<H: Harness>(h: &mut H) {
    let store = h.store();
    let lease = with_lease(Duration::from_secs(10));
    let mut tokens = vec![acquired(claim_with(&*store, "k", b"req", lease.clone()).await)];
    for _ in 0..3 {
        h.advance(Duration::from_secs(11));
        tokens.push(acquired(claim_with(&*store, "k", b"req", lease.clone()).await));
    }
    let (last, earlier) = tokens.split_last().unwrap();
    for token in earlier {
        stale(store.complete(token, b"x").await, "an earlier holder");
    }
    store.complete(last, b"ok").await.unwrap();
}

/// A holder whose lease ended may still complete, checkpoint or release while nobody took over.
pub async fn late_writes_are_allowed_while_nobody_took_over<H: Harness>(h: &mut H) {
    let store = h.store();
    let lease = with_lease(Duration::from_secs(10));
    let a = acquired(claim_with(&*store, "a", b"req", lease.clone()).await);
    let b = acquired(claim_with(&*store, "b", b"req", lease.clone()).await);
    let c = acquired(claim_with(&*store, "c", b"req", lease).await);
    h.advance(Duration::from_secs(60));
    store.complete(&a, b"late").await.unwrap();
    assert_eq!(completed(claim(&*store, "a", b"req").await).outcome, b"late");
    store.checkpoint(&b, b"late step").await.unwrap();
    store.release(&c).await.unwrap();
    assert_eq!(get(&*store, "c").await, None);
}

/// A checkpoint renews the lease by the claim's lease length, from the checkpoint's time, and
/// moves the token's lease end on.
pub async fn checkpoint_renews_the_lease_by_the_claims_lease_length<H: Harness>(h: &mut H) {
    let store = h.store();
    let lease = Duration::from_secs(10);
    let token = acquired(claim_with(&*store, "k", b"req", with_lease(lease)).await);
    let first_end = token.lease_expires_at();
    h.advance(Duration::from_secs(8));
    store.checkpoint(&token, b"phase 1").await.unwrap();
    let renewed = token.lease_expires_at();
    assert!(renewed >= first_end + Duration::from_secs(8), "renewed to {renewed:?} from {first_end:?}");
    match get(&*store, "k").await {
        Some(Entry::InFlight { lease_expires_at, .. }) => assert_eq!(lease_expires_at, renewed),
        other => panic!("expected InFlight, got {other:?}"),
    }
    // 8 s after the checkpoint the renewed lease still runs: no takeover.
    h.advance(Duration::from_secs(8));
    assert!(
        matches!(claim(&*store, "k", b"req").await, Claim::InProgress { lease_expires_at, .. } if lease_expires_at == renewed)
    );
    h.advance(Duration::from_secs(3));
    assert!(acquired(claim(&*store, "k", b"req").await).recovered());
}

/// A takeover never shortens the key's window.
pub async fn a_takeover_keeps_the_window<H: Harness>(h: &mut H) {
    let store = h.store();
    let long = ClaimOptions { ttl: Some(Duration::from_secs(3600)), lease: Some(Duration::from_secs(10)), wait: None };
    let _old = acquired(claim_with(&*store, "k", b"req", long).await);
    let window_end = match get(&*store, "k").await {
        Some(Entry::InFlight { expires_at, .. }) => expires_at,
        other => panic!("expected InFlight, got {other:?}"),
    };
    h.advance(Duration::from_secs(11));
    let short = ClaimOptions { ttl: Some(Duration::from_secs(60)), lease: Some(Duration::from_secs(10)), wait: None };
    let _new = acquired(claim_with(&*store, "k", b"req", short).await);
    match get(&*store, "k").await {
        Some(Entry::InFlight { expires_at, .. }) => {
            assert!(expires_at >= window_end, "{expires_at:?} < {window_end:?}")
        }
        other => panic!("expected InFlight, got {other:?}"),
    }
}

/// A token of another store (or backend) is refused with `ForeignToken`, never taken as proof.
pub async fn a_token_of_another_store_is_foreign<H: Harness>(h: &mut H) {
    let store = h.store();
    let mine = acquired(claim(&*store, "k", b"req").await);
    let foreign =
        ClaimToken::for_backend(mine.backend() ^ 0x5a5a, mine.key(), mine.id(), false, None, mine.lease_expires_at());
    assert!(matches!(store.complete(&foreign, b"x").await, Err(Error::ForeignToken)));
    assert!(matches!(store.checkpoint(&foreign, b"x").await, Err(Error::ForeignToken)));
    assert!(matches!(store.release(&foreign).await, Err(Error::ForeignToken)));
    store.complete(&mine, b"mine").await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Orphans

/// After the holder's incarnation ends, its in-flight claims are listed as orphans (with their
/// checkpoints) and `get` says so; completed keys are not.
pub async fn a_dead_incarnations_claims_are_listed_as_orphans<H: Harness>(h: &mut H) {
    let store = h.store();
    let a = acquired(claim(&*store, "a", b"req").await);
    store.checkpoint(&a, b"half").await.unwrap();
    let _b = acquired(claim(&*store, "b", b"req").await);
    let c = acquired(claim(&*store, "c", b"req").await);
    store.complete(&c, b"done").await.unwrap();
    assert!(h.orphans().is_empty(), "a live holder's claims are not orphans");
    drop(store);
    h.reopen().await;
    let orphans = h.orphans();
    let keys: Vec<&[u8]> = orphans.iter().map(|o| o.key.as_slice()).collect();
    assert_eq!(keys, vec![&b"a"[..], &b"b"[..]]);
    assert_eq!(orphans[0].checkpoint.as_deref(), Some(&b"half"[..]));
    assert_eq!(orphans[1].checkpoint, None);
    let store = h.store();
    assert!(matches!(get(&*store, "a").await, Some(Entry::InFlight { orphaned: true, .. })));
}

/// The next claim of an orphan takes it over at once (inside the dead holder's lease), with its
/// checkpoint; the dead holder's token is stale.
pub async fn an_orphan_is_taken_over_at_once_with_its_checkpoint<H: Harness>(h: &mut H) {
    let store = h.store();
    let dead = acquired(claim(&*store, "k", b"req").await);
    store.checkpoint(&dead, b"charged card").await.unwrap();
    drop(store);
    h.reopen().await;
    let store = h.store();
    let taker = acquired(claim(&*store, "k", b"req").await);
    assert!(taker.recovered());
    assert_eq!(taker.checkpoint(), Some(&b"charged card"[..]));
    assert!(h.orphans().is_empty(), "taken over: no longer an orphan");
    assert!(matches!(claim(&*store, "k", b"req").await, Claim::InProgress { .. }), "the taker is alive");
    store.complete(&taker, b"done").await.unwrap();
}

/// An expired orphan is neither listed nor taken over: its key is simply free.
pub async fn an_expired_orphan_is_neither_listed_nor_taken_over<H: Harness>(h: &mut H) {
    let store = h.store();
    let _dead = acquired(claim_with(&*store, "k", b"req", with_ttl(Duration::from_secs(60))).await);
    drop(store);
    h.reopen().await;
    h.advance(Duration::from_secs(61));
    assert!(h.orphans().is_empty());
    let store = h.store();
    assert!(!acquired(claim(&*store, "k", b"req").await).recovered());
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

/// `get` shows the last checkpoint; completing replaces it with the outcome.
pub async fn get_shows_the_last_checkpoint_until_completion<H: Harness>(h: &mut H) {
    let store = h.store();
    let token = acquired(claim(&*store, "k", b"req").await);
    for phase in [&b"one"[..], b"two", b"three"] {
        store.checkpoint(&token, phase).await.unwrap();
        assert!(matches!(get(&*store, "k").await, Some(Entry::InFlight { checkpoint: Some(c), .. }) if c == phase));
    }
    store.complete(&token, b"outcome").await.unwrap();
    assert!(matches!(get(&*store, "k").await, Some(Entry::Completed(done)) if done.outcome == b"outcome"));
}

/// An empty or over-long checkpoint, and an over-long outcome, are refused and write nothing.
pub async fn bad_checkpoints_and_outcomes_are_refused<H: Harness>(h: &mut H) {
    let store = h.store();
    let token = acquired(claim(&*store, "k", b"req").await);
    store.checkpoint(&token, b"kept").await.unwrap();
    assert!(matches!(store.checkpoint(&token, b"").await, Err(Error::InvalidArgument(_))));
    let too_long = vec![7u8; DEFAULT_MAX_OUTCOME + 1];
    assert!(matches!(store.checkpoint(&token, &too_long).await, Err(Error::OutcomeTooLong { .. })));
    assert!(matches!(store.complete(&token, &too_long).await, Err(Error::OutcomeTooLong { .. })));
    assert!(matches!(get(&*store, "k").await, Some(Entry::InFlight { checkpoint: Some(c), .. }) if c == b"kept"));
    store.complete(&token, b"fine").await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Waiting

/// Runs `waiter` as a task; once it had a head start, runs `holder_acts`; returns what the
/// waiter got and how long it took.
async fn wait_while<S, W, F, A, AF>(store: Arc<S>, waiter: W, holder_acts: A) -> (Claim, Duration)
where
    S: DedupeStore + 'static,
    W: FnOnce(Arc<S>) -> F + Send + 'static,
    F: Future<Output = Claim> + Send + 'static,
    A: FnOnce() -> AF,
    AF: Future<Output = ()>,
{
    let task = tokio::spawn(async move {
        let started = Instant::now();
        let claim = waiter(store).await;
        (claim, started.elapsed())
    });
    tokio::time::sleep(HEAD_START).await;
    holder_acts().await;
    tokio::time::timeout(GENEROUS * 2, task).await.expect("the waiter hung").expect("waiter task")
}

/// A waiter gets the outcome when the holder completes.
pub async fn a_waiter_gets_the_outcome_when_the_holder_completes<H: Harness>(h: &mut H) {
    let store = h.store();
    let token = acquired(claim(&*store, "k", b"req").await);
    let holder = store.clone();
    let (answer, took) = wait_while(
        store.clone(),
        |s| async move { s.claim_with(b"k", b"req", waiting(LONG_WAIT)).await.unwrap() },
        || async move { holder.complete(&token, b"the outcome").await.unwrap() },
    )
    .await;
    assert_eq!(completed(answer).outcome, b"the outcome");
    assert!(took < GENEROUS, "took {took:?}");
}

/// A waiter acquires the key when the holder releases it.
pub async fn a_waiter_acquires_the_key_when_the_holder_releases<H: Harness>(h: &mut H) {
    let store = h.store();
    let token = acquired(claim(&*store, "k", b"req").await);
    let holder = store.clone();
    let (answer, took) = wait_while(
        store.clone(),
        |s| async move { s.claim_with(b"k", b"req", waiting(LONG_WAIT)).await.unwrap() },
        || async move { holder.release(&token).await.unwrap() },
    )
    .await;
    assert!(!acquired(answer).recovered());
    assert!(took < GENEROUS, "took {took:?}");
}

/// A waiter acquires the key when it is removed.
pub async fn a_waiter_acquires_the_key_when_it_is_removed<H: Harness>(h: &mut H) {
    let store = h.store();
    let _token = acquired(claim(&*store, "k", b"req").await);
    let remover = store.clone();
    let (answer, took) = wait_while(
        store.clone(),
        |s| async move { s.claim_with(b"k", b"req", waiting(LONG_WAIT)).await.unwrap() },
        || async move { remover.remove(b"k").await.unwrap() },
    )
    .await;
    assert!(!acquired(answer).recovered());
    assert!(took < GENEROUS, "took {took:?}");
}

/// A waiter takes the key over when the holder's lease ends, with its checkpoint.
pub async fn a_waiter_takes_over_when_the_holders_lease_ends<H: Harness>(h: &mut H) {
    let store = h.store();
    let old = acquired(claim_with(&*store, "k", b"req", with_lease(Duration::from_millis(500))).await);
    store.checkpoint(&old, b"half way").await.unwrap();
    let (answer, took) = wait_while(
        store.clone(),
        |s| async move { s.claim_with(b"k", b"req", waiting(LONG_WAIT)).await.unwrap() },
        || async { h.advance(Duration::from_secs(2)) },
    )
    .await;
    let taker = acquired(answer);
    assert!(taker.recovered());
    assert_eq!(taker.checkpoint(), Some(&b"half way"[..]));
    assert!(took < GENEROUS, "took {took:?}");
    stale(store.complete(&old, b"late").await, "the old holder");
}

/// A wait that runs out returns `InProgress`, no sooner than its length; the holder is
/// unaffected.
pub async fn a_wait_that_runs_out_is_in_progress<H: Harness>(h: &mut H) {
    let store = h.store();
    let token = acquired(claim(&*store, "k", b"req").await);
    let wait = Duration::from_millis(300);
    let started = Instant::now();
    let answer = claim_with(&*store, "k", b"req", waiting(wait)).await;
    let took = started.elapsed();
    assert_eq!(in_progress_until(answer), Some(token.lease_expires_at()));
    assert!(took >= wait, "returned after {took:?}, before its wait of {wait:?}");
    assert!(took < GENEROUS, "took {took:?}");
    store.complete(&token, b"ok").await.unwrap();
}

/// Many waiters all get the one outcome.
pub async fn many_waiters_all_get_the_one_outcome<H: Harness>(h: &mut H) {
    let store = h.store();
    let token = acquired(claim(&*store, "k", b"req").await);
    let mut waiters = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        waiters.push(tokio::spawn(async move { store.claim_with(b"k", b"req", waiting(LONG_WAIT)).await.unwrap() }));
    }
    tokio::time::sleep(HEAD_START).await;
    store.complete(&token, b"shared").await.unwrap();
    for waiter in waiters {
        let answer = tokio::time::timeout(GENEROUS, waiter).await.expect("a waiter hung").unwrap();
        assert_eq!(completed(answer).outcome, b"shared");
    }
}

/// Of concurrent waiting claims of a key that gets released, exactly one acquires it; the
/// others keep waiting until that one completes, then replay its outcome.
pub async fn concurrent_waiting_claims_have_exactly_one_winner<H: Harness>(h: &mut H) {
    let store = h.store();
    let token = acquired(claim(&*store, "k", b"req").await);
    let mut waiters = Vec::new();
    for _ in 0..6 {
        let store = store.clone();
        waiters.push(tokio::spawn(async move {
            match store.claim_with(b"k", b"req", waiting(LONG_WAIT)).await.unwrap() {
                Claim::Acquired(token) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    store.complete(&token, b"by the winner").await.unwrap();
                    true
                }
                Claim::Completed(done) => {
                    assert_eq!(done.outcome, b"by the winner");
                    false
                }
                other => panic!("unexpected {other:?}"),
            }
        }));
    }
    tokio::time::sleep(HEAD_START).await;
    store.release(&token).await.unwrap();
    let mut winners = 0;
    for waiter in waiters {
        if tokio::time::timeout(GENEROUS, waiter).await.expect("a waiter hung").unwrap() {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
}

// ---------------------------------------------------------------------------------------------
// Expiry

/// In-flight and completed keys read as absent once their TTL has passed, and a claim then
/// acquires them afresh (no takeover, no checkpoint); a holder of an expired key is stale.
pub async fn expired_keys_are_absent_and_claimed_afresh<H: Harness>(h: &mut H) {
    let store = h.store();
    let ttl = Duration::from_secs(120);
    let done = acquired(claim_with(&*store, "done", b"req", with_ttl(ttl)).await);
    store.complete(&done, b"out").await.unwrap();
    let held = acquired(claim_with(&*store, "held", b"req", with_ttl(ttl)).await);
    store.checkpoint(&held, b"step").await.unwrap();
    h.advance(Duration::from_secs(100));
    assert!(get(&*store, "done").await.is_some() && get(&*store, "held").await.is_some());
    h.advance(Duration::from_secs(21));
    assert_eq!(get(&*store, "done").await, None);
    assert_eq!(get(&*store, "held").await, None);
    stale(store.complete(&held, b"too late").await, "complete after expiry");
    let fresh = acquired(claim(&*store, "held", b"a different request is fine after expiry").await);
    assert!(!fresh.recovered());
    assert_eq!(fresh.checkpoint(), None);
    assert!(!acquired(claim(&*store, "done", b"req").await).recovered());
}

/// A replay's `expires_at` is the claim time plus the TTL it was claimed with.
pub async fn a_replay_carries_the_claims_ttl<H: Harness>(h: &mut H) {
    let store = h.store();
    let ttl = Duration::from_secs(3600);
    let token = acquired(claim_with(&*store, "k", b"req", with_ttl(ttl)).await);
    let claimed = claimed_at(&*store, "k").await;
    store.complete(&token, b"x").await.unwrap();
    assert_eq!(completed(claim(&*store, "k", b"req").await).expires_at, claimed + ttl);
    h.advance(ttl);
    assert_eq!(get(&*store, "k").await, None);
}

/// Expands to one `#[tokio::test]` (multi-thread runtime) per contract test. `$make` is an
/// async expression giving `Option<H>`: `None` skips the test (the maker prints why).
#[macro_export]
macro_rules! contract_suite {
    ($make:expr) => {
        $crate::contract_suite!(@tests $make;
            first_claim_is_acquired_with_a_fresh_token,
            repeat_while_in_flight_is_in_progress_with_the_holders_lease_end,
            repeat_after_complete_replays_the_outcome_byte_identical,
            empty_outcome_is_replayed_as_empty,
            different_request_while_in_flight_is_mismatch,
            different_request_after_complete_is_mismatch,
            different_request_after_lease_ended_is_mismatch_not_a_takeover,
            different_request_after_a_takeover_is_mismatch,
            different_request_for_an_orphan_is_mismatch,
            release_frees_the_key_and_fences_the_token,
            remove_makes_the_holders_token_stale_and_frees_the_key,
            get_reports_each_state,
            bad_input_is_refused,
            concurrent_claims_have_exactly_one_winner,
            claim_at_lease_end_takes_over_with_the_checkpoint,
            old_token_is_stale_after_a_takeover,
            a_chain_of_takeovers_fences_every_earlier_holder,
            late_writes_are_allowed_while_nobody_took_over,
            checkpoint_renews_the_lease_by_the_claims_lease_length,
            a_takeover_keeps_the_window,
            a_token_of_another_store_is_foreign,
            a_dead_incarnations_claims_are_listed_as_orphans,
            an_orphan_is_taken_over_at_once_with_its_checkpoint,
            an_expired_orphan_is_neither_listed_nor_taken_over,
            get_shows_the_last_checkpoint_until_completion,
            bad_checkpoints_and_outcomes_are_refused,
            a_waiter_gets_the_outcome_when_the_holder_completes,
            a_waiter_acquires_the_key_when_the_holder_releases,
            a_waiter_acquires_the_key_when_it_is_removed,
            a_waiter_takes_over_when_the_holders_lease_ends,
            a_wait_that_runs_out_is_in_progress,
            many_waiters_all_get_the_one_outcome,
            concurrent_waiting_claims_have_exactly_one_winner,
            expired_keys_are_absent_and_claimed_afresh,
            a_replay_carries_the_claims_ttl,
        );
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let Some(mut harness) = $make else { return };
                $crate::$name(&mut harness).await;
                $crate::Harness::finish(harness).await;
            }
        )*
    };
}

/// When the holder's lease ends, if `claim` is `InProgress` (`None` for any other answer).
fn in_progress_until(claim: Claim) -> Option<std::time::SystemTime> {
    match claim {
        Claim::InProgress { lease_expires_at, .. } => Some(lease_expires_at),
        _ => None,
    }
}
