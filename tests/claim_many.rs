//! `Store::claim_many` and `Store::complete_many`: a batch answers exactly as the same calls
//! made one at a time, each item fails on its own, and under `Durability::Sync` the batch waits
//! for one sync, so every answer rests on durable records or fails.
//!
//! Promises checked:
//! - random histories of batches (repeated keys, mismatched requests, empty keys, batched
//!   completes with stale tokens among them, releases and time passing between batches) get
//!   the same answers from `claim_many` / `complete_many` as from single calls on a twin store
//!   (proptest);
//! - a `Sync` batch of 64 new keys, and one of 64 completes, each cost one fsync, and all 64
//!   survive a power cut;
//! - a failed fsync fails every answer of the batch with `Poisoned`, and an item that was bad
//!   input (an empty key, a stale token) keeps its own error.

use std::sync::Arc;
use std::time::Duration;

use idemstore::sim::SimDisk;
use idemstore::{Claim, ClaimOptions, ClaimToken, Durability, Entry, Error, ManualClock, Options, Store};
use proptest::prelude::*;

mod common;
use common::{START_MS, acquired, assert_poisoned_by_fsync, sim_options};

/// Keys the histories draw from; the last is empty (bad input).
const KEYS: [&str; 6] = ["a", "b", "c", "d", "e", ""];
const REQUESTS: [&str; 2] = ["request", "other request"];

#[derive(Debug, Clone)]
enum Step {
    /// (key index, request index) pairs claimed as one batch.
    Batch(Vec<(usize, usize)>),
    /// Complete every token acquired so far (stale ones fail alike in both stores).
    CompleteAll,
    /// Release every token acquired so far.
    ReleaseAll,
    /// Let time pass (leases are 1 s, TTLs 10 s in these stores).
    Advance(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        // Up to 40 items: a batch runs 16 keys a window with two windows warming ahead, so
        // batches of three windows take every path of that pipeline.
        4 => prop::collection::vec((0..KEYS.len(), 0..REQUESTS.len()), 0..40).prop_map(Step::Batch),
        1 => Just(Step::CompleteAll),
        1 => Just(Step::ReleaseAll),
        1 => (0u64..2_500).prop_map(Step::Advance),
    ]
}

fn twin(clock: &Arc<ManualClock>) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = Options {
        default_ttl: Duration::from_secs(10),
        default_lease: Duration::from_secs(1),
        ..common::options(clock)
    };
    let store = Store::open(dir.path(), options).expect("open");
    (dir, store)
}

/// An answer as text: variant, token, outcome and times (both stores see the same clock and
/// the same record sequence, so equal histories print equal answers).
fn shown<T: std::fmt::Debug>(answer: &idemstore::Result<T>) -> String {
    format!("{answer:?}")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn claim_many_answers_as_single_claims_would(steps in prop::collection::vec(step(), 1..24)) {
        let clock = ManualClock::new(START_MS);
        let (_batched_dir, batched) = twin(&clock);
        let (_single_dir, single) = twin(&clock);
        let mut tokens: Vec<(ClaimToken, ClaimToken)> = Vec::new();
        for step in steps {
            match step {
                Step::Batch(items) => {
                    let items: Vec<(&str, &str)> = items.iter().map(|&(k, r)| (KEYS[k], REQUESTS[r])).collect();
                    let answers = batched.claim_many(&items, ClaimOptions::default());
                    prop_assert_eq!(answers.len(), items.len());
                    for ((key, request), answer) in items.iter().zip(answers) {
                        let expected = single.claim(key, request);
                        prop_assert_eq!(shown(&answer), shown(&expected), "key {:?}", key);
                        if let (Ok(Claim::Acquired(a)), Ok(Claim::Acquired(b))) = (answer, expected) {
                            tokens.push((a, b));
                        }
                    }
                }
                Step::CompleteAll => {
                    let items: Vec<(&ClaimToken, &str)> = tokens.iter().map(|(a, _)| (a, "outcome")).collect();
                    let answers = batched.complete_many(&items);
                    prop_assert_eq!(answers.len(), tokens.len());
                    for ((_, b), done) in tokens.iter().zip(answers) {
                        prop_assert_eq!(shown(&done), shown(&single.complete(b, "outcome")));
                    }
                    tokens.clear();
                }
                Step::ReleaseAll => {
                    for (a, b) in tokens.drain(..) {
                        prop_assert_eq!(shown(&batched.release(&a)), shown(&single.release(&b)));
                    }
                }
                Step::Advance(ms) => clock.advance(Duration::from_millis(ms)),
            }
        }
    }
}

fn keys(n: usize) -> Vec<(String, &'static str)> {
    (0..n).map(|i| (format!("key-{i}"), "request")).collect()
}

#[test]
fn a_sync_batch_waits_for_one_fsync_and_survives_a_power_cut() {
    let disk = SimDisk::new();
    let store = Store::open("/store", sim_options(&disk, Durability::Sync)).expect("open");
    let batch = keys(64);
    // The first claim creates the bucket's segment (and syncs its directory entry).
    assert!(matches!(store.claim("first", "request"), Ok(Claim::Acquired(_))));
    let syncs_before = disk.syncs();
    for (answer, (key, _)) in store.claim_many(&batch, ClaimOptions::default()).into_iter().zip(&batch) {
        assert!(matches!(answer, Ok(Claim::Acquired(_))), "{key}: {answer:?}");
    }
    assert_eq!(disk.syncs() - syncs_before, 1, "one fsync for the whole batch");
    drop(store);

    // Only synced bytes survive the cut: every acknowledged claim must be among them.
    let image = disk.power_cut(None);
    let store = Store::open("/store", sim_options(&image, Durability::Sync)).expect("reopen");
    for (key, _) in &batch {
        assert!(matches!(store.get(key).expect("get"), Some(Entry::InFlight { .. })), "{key} was lost");
    }
}

#[test]
fn a_failed_fsync_fails_every_answer_and_bad_input_keeps_its_own_error() {
    let disk = SimDisk::new();
    let store = Store::open("/store", sim_options(&disk, Durability::Sync)).expect("open");
    let batch = [("one", "request"), ("", "request"), ("two", "request")];
    // The segment exists before the fault, so the batch's appends succeed and only its one
    // fsync fails.
    assert!(matches!(store.claim("first", "request"), Ok(Claim::Acquired(_))));
    disk.fail_sync_after(0);
    let answers = store.claim_many(&batch, ClaimOptions::default());
    assert!(matches!(answers[1], Err(Error::EmptyKey)), "{:?}", answers[1]);
    for (i, answer) in answers.into_iter().enumerate().filter(|(i, _)| *i != 1) {
        assert_poisoned_by_fsync(&format!("item {i}, whose record was never synced"), answer);
    }
    drop(store);
    let store = Store::open("/store", sim_options(&disk.power_cut(None), Durability::Sync)).expect("reopen");
    for key in ["one", "two"] {
        assert_eq!(store.get(key).expect("get"), None, "{key}: never synced, never acknowledged");
    }
}

#[test]
fn an_empty_batch_answers_nothing_and_writes_nothing() {
    let disk = SimDisk::new();
    let store = Store::open("/store", sim_options(&disk, Durability::Sync)).expect("open");
    let syncs_before = disk.syncs();
    let none: [(&str, &str); 0] = [];
    assert!(store.claim_many(&none, ClaimOptions::default()).is_empty());
    assert_eq!(disk.syncs(), syncs_before);
    assert_eq!(store.stats().appended_bytes_total, 0);
}

#[test]
fn a_read_only_view_replays_a_batch_and_refuses_its_new_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(START_MS);
    let store = common::open(dir.path(), &clock);
    let token = common::acquire(&store, "done");
    store.complete(&token, "outcome").expect("complete");
    store.close().expect("close");

    let view = Store::open_read_only_with(dir.path(), common::options(&clock)).expect("open read-only");
    let answers = view.claim_many(&[("done", "request"), ("new", "request")], ClaimOptions::default());
    match &answers[0] {
        Ok(Claim::Completed(done)) => assert_eq!(done.outcome, b"outcome"),
        other => panic!("a replay through a read-only view: {other:?}"),
    }
    assert!(matches!(answers[1], Err(Error::ReadOnly)), "{:?}", answers[1]);
}

#[test]
fn a_sync_batch_of_completes_waits_for_one_fsync_and_survives_a_power_cut() {
    let disk = SimDisk::new();
    let store = Store::open("/store", sim_options(&disk, Durability::Sync)).expect("open");
    let batch = keys(64);
    let tokens: Vec<ClaimToken> = store
        .claim_many(&batch, ClaimOptions::default())
        .into_iter()
        .map(|answer| acquired(answer.expect("claim of a new key")))
        .collect();
    let items: Vec<(&ClaimToken, String)> = tokens.iter().map(|t| (t, format!("outcome of {:?}", t.key()))).collect();
    let syncs_before = disk.syncs();
    for answer in store.complete_many(&items) {
        answer.expect("complete");
    }
    assert_eq!(disk.syncs() - syncs_before, 1, "one fsync for the whole batch of completes");
    drop(store);

    let store = Store::open("/store", sim_options(&disk.power_cut(None), Durability::Sync)).expect("reopen");
    for (token, outcome) in &items {
        match store.get(token.key()).expect("get") {
            Some(Entry::Completed(done)) => assert_eq!(done.outcome, outcome.as_bytes()),
            other => panic!("{:?}: an acknowledged complete was lost: {other:?}", token.key()),
        }
    }
}

#[test]
fn a_failed_fsync_fails_every_complete_of_the_batch_and_a_stale_token_keeps_its_error() {
    let disk = SimDisk::new();
    let store = Store::open("/store", sim_options(&disk, Durability::Sync)).expect("open");
    let held: Vec<ClaimToken> = ["one", "two", "stale"].iter().map(|key| common::acquire(&store, key)).collect();
    store.release(&held[2]).expect("release");
    disk.fail_sync_after(0);
    let answers = store.complete_many(&[(&held[0], "a"), (&held[2], "b"), (&held[1], "c")]);
    assert!(matches!(answers[1], Err(Error::StaleToken)), "{:?}", answers[1]);
    for (i, answer) in answers.into_iter().enumerate().filter(|(i, _)| *i != 1) {
        assert_poisoned_by_fsync(&format!("item {i}, a complete never synced"), answer);
    }
}

/// With `wait`, a key the batch itself just acquired must not wait on its own claim (the caller
/// has no token yet): the repeat is `InProgress` at once and the first token stays good.
#[test]
fn a_repeated_key_does_not_wait_on_the_batch_own_claim() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(START_MS);
    let store = common::open(dir.path(), &clock);
    let options = ClaimOptions { wait: Some(Duration::from_secs(30)), ..ClaimOptions::default() };
    let started = std::time::Instant::now();
    let answers = store.claim_many(&[("key", "request"), ("key", "request")], options);
    assert!(started.elapsed() < Duration::from_secs(10), "the repeat waited on the batch's own claim");
    let mut answers = answers.into_iter();
    let token = acquired(answers.next().expect("two answers").expect("first claim"));
    assert!(matches!(answers.next(), Some(Ok(Claim::InProgress { .. }))));
    store.complete(&token, "outcome").expect("the first token still holds the key");
}

/// A `StaleToken` rests on the record that superseded the token: when that record was written
/// by the same batch and its sync fails, the answer is `Poisoned` like the complete it read,
/// never `StaleToken` (after a power cut the durable state says the token still holds the key).
#[test]
fn a_stale_token_read_from_a_record_never_synced_is_poisoned() {
    let disk = SimDisk::new();
    let store = Store::open("/store", sim_options(&disk, Durability::Sync)).expect("open");
    let token = common::acquire(&store, "key");
    disk.fail_sync_after(0);
    let answers = store.complete_many(&[(&token, "a"), (&token, "b")]);
    for (i, answer) in answers.into_iter().enumerate() {
        assert_poisoned_by_fsync(&format!("item {i}, resting on a complete never synced"), answer);
    }
    drop(store);
    let store = Store::open("/store", sim_options(&disk.power_cut(None), Durability::Sync)).expect("reopen");
    assert!(matches!(store.get("key"), Ok(Some(idemstore::Entry::InFlight { .. }))), "the claim was durable");
}
