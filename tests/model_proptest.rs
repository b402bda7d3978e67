//! Promise: the store behaves like a plain map with the contract's semantics, for any sequence
//! of operations.
//!
//! Random sequences of claim / claim_with (TTL and lease) / complete / checkpoint / release /
//! remove / get / orphans / maintain / advancing a `ManualClock` / reopening the store run
//! against the store and against `common::model::Model`, the README's contract as a map, which
//! checks every answer; after each step every key's `get` is compared too. Both orphan policies
//! are covered. `PROPTEST_CASES` sets the number of cases (default 64); the run then checks that
//! every branch of the contract was exercised by some case.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use idemstore::{Claim, ClaimOptions, ClaimToken, ManualClock, Options, OrphanPolicy, Store};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{TestError, TestRunner};

mod common;
use common::START_MS;
use common::model::{Expected, Finish, Model};

const KEYS: usize = 4;
const REQUESTS: usize = 2;
const TTLS_MS: [u64; 4] = [1_000, 10_000, 60_000, 600_000];
const LEASES_MS: [u64; 3] = [500, 2_000, 15_000];
/// The store's defaults, used by a plain `claim`.
const DEFAULT_TTL_MS: u64 = 24 * 3600 * 1000;
const DEFAULT_LEASE_MS: u64 = 30_000;

fn key(k: usize) -> Vec<u8> {
    format!("key-{k}").into_bytes()
}

fn request(r: usize) -> Vec<u8> {
    format!("request-{r}").into_bytes()
}

#[derive(Debug, Clone)]
enum Op {
    Claim { key: usize, req: usize },
    ClaimWith { key: usize, req: usize, ttl: usize, lease: usize },
    Complete { token: Index, outcome: Vec<u8> },
    Checkpoint { token: Index, phase: Vec<u8> },
    Release { token: Index },
    Remove { key: usize },
    Get { key: usize },
    Orphans,
    Advance { ms: u64 },
    Maintain,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let key = 0..KEYS;
    let req = 0..REQUESTS;
    let bytes = proptest::collection::vec(any::<u8>(), 0..8);
    prop_oneof![
        4 => (key.clone(), req.clone()).prop_map(|(key, req)| Op::Claim { key, req }),
        4 => (key.clone(), req, 0..TTLS_MS.len(), 0..LEASES_MS.len())
            .prop_map(|(key, req, ttl, lease)| Op::ClaimWith { key, req, ttl, lease }),
        3 => (any::<Index>(), bytes.clone()).prop_map(|(token, outcome)| Op::Complete { token, outcome }),
        2 => (any::<Index>(), bytes).prop_map(|(token, phase)| Op::Checkpoint { token, phase }),
        1 => any::<Index>().prop_map(|token| Op::Release { token }),
        1 => key.clone().prop_map(|key| Op::Remove { key }),
        2 => key.prop_map(|key| Op::Get { key }),
        1 => Just(Op::Orphans),
        3 => prop::sample::select(vec![1u64, 499, 500, 1_000, 5_000, 30_000, 120_000, 700_000])
            .prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Maintain),
        1 => Just(Op::Reopen),
    ]
}

// ---------------------------------------------------------------------------------------------
// Running a sequence against both.

fn options(clock: &Arc<ManualClock>, policy: OrphanPolicy, writer: Writer) -> Options {
    let options = Options {
        orphans: policy,
        bucket_width: Duration::from_secs(10),
        segment_bytes_initial: 4096,
        ..common::options(clock)
    };
    match writer {
        Writer::Caller => options,
        // Many lanes, small segments retired often and sealed soon: a key's records spread
        // over segments of several lanes, some sealed, some not.
        Writer::FreshThread => Options {
            log_lanes: 3,
            max_key_len: 16,
            max_outcome_len: 16,
            segment_bytes_initial: 256,
            segment_bytes_max: 512,
            active_bytes_max: 700,
            seal_idle_after: Duration::from_secs(1),
            ..options
        },
    }
}

fn open(dir: &Path, clock: &Arc<ManualClock>, policy: OrphanPolicy, writer: Writer) -> Store {
    Store::open(dir, options(clock, policy, writer)).expect("open store")
}

/// Which thread runs each write.
#[derive(Debug, Clone, Copy)]
enum Writer {
    /// The test's own thread (so always one lane).
    Caller,
    /// A new thread for each write: threads take the log's lanes in turn, so a key's records
    /// are written through different lanes.
    FreshThread,
}

impl Writer {
    fn run<R: Send>(self, write: impl FnOnce() -> R + Send) -> R {
        match self {
            Writer::Caller => write(),
            Writer::FreshThread => std::thread::scope(|s| s.spawn(write).join().expect("writer thread")),
        }
    }
}

/// How often each interesting branch was taken, over all cases.
type Coverage = RefCell<BTreeMap<&'static str, u64>>;

fn hit(coverage: &Coverage, branch: &'static str) {
    *coverage.borrow_mut().entry(branch).or_insert(0) += 1;
}

/// Branches every full run must take at least once.
const BRANCHES: [&str; 12] = [
    "claim: acquired fresh",
    "claim: acquired by lease takeover",
    "claim: acquired by orphan takeover",
    "claim: in progress",
    "claim: completed replay",
    "claim: mismatch",
    "claim: acquired after expiry",
    "finish: ok",
    "finish: stale token",
    "orphans: listed",
    "maintain: dropped a bucket",
    "reopen",
];

fn run(policy: OrphanPolicy, writer: Writer, ops: &[Op], coverage: &Coverage) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut store = open(dir.path(), &clock, policy, writer);
    let mut model = Model::new(START_MS, policy);
    let mut tokens: Vec<ClaimToken> = Vec::new();

    for (n, op) in ops.iter().enumerate() {
        let step = format!("step {n} {op:?}");
        match op {
            Op::Claim { key: k, req } | Op::ClaimWith { key: k, req, .. } => {
                let expired_before = model.slot(&key(*k)).is_some_and(|s| s.expires_at_ms() <= model.now_ms);
                let orphan_before = model.orphans().iter().any(|o| o.key == key(*k));
                let (got, ttl_ms, lease_ms) = match op {
                    Op::ClaimWith { ttl, lease, .. } => {
                        let opts = ClaimOptions {
                            ttl: Some(Duration::from_millis(TTLS_MS[*ttl])),
                            lease: Some(Duration::from_millis(LEASES_MS[*lease])),
                            wait: None,
                        };
                        (
                            writer.run(|| store.claim_with(key(*k), request(*req), opts)).unwrap(),
                            TTLS_MS[*ttl],
                            LEASES_MS[*lease],
                        )
                    }
                    _ => {
                        (writer.run(|| store.claim(key(*k), request(*req))).unwrap(), DEFAULT_TTL_MS, DEFAULT_LEASE_MS)
                    }
                };
                let expected = match model.claim(&key(*k), &request(*req), ttl_ms, lease_ms, &got) {
                    Ok(expected) => expected,
                    Err(why) => return Err(TestCaseError::fail(format!("{step}: {why}"))),
                };
                hit(
                    coverage,
                    match &expected {
                        Expected::Acquired { recovered: false, .. } if expired_before => "claim: acquired after expiry",
                        Expected::Acquired { recovered: false, .. } => "claim: acquired fresh",
                        Expected::Acquired { .. } if orphan_before => "claim: acquired by orphan takeover",
                        Expected::Acquired { .. } => "claim: acquired by lease takeover",
                        Expected::InProgress { .. } => "claim: in progress",
                        Expected::Completed(_) => "claim: completed replay",
                        Expected::Mismatch => "claim: mismatch",
                    },
                );
                if let Claim::Acquired(token) = got {
                    tokens.push(token);
                }
            }
            Op::Complete { token, outcome } | Op::Checkpoint { token, phase: outcome } => {
                if tokens.is_empty() {
                    continue;
                }
                let token = &tokens[token.index(tokens.len())];
                let (got, what) = if matches!(op, Op::Complete { .. }) {
                    (writer.run(|| store.complete(token, outcome)), Finish::Complete(outcome.clone()))
                } else {
                    (writer.run(|| store.checkpoint(token, outcome)), Finish::Checkpoint(outcome.clone()))
                };
                let empty_checkpoint = matches!(op, Op::Checkpoint { .. }) && outcome.is_empty();
                check_finish(model.finish(token, what, &got), empty_checkpoint, &step, coverage)?;
            }
            Op::Release { token } => {
                if tokens.is_empty() {
                    continue;
                }
                let token = &tokens[token.index(tokens.len())];
                let got = writer.run(|| store.release(token));
                check_finish(model.finish(token, Finish::Release, &got), false, &step, coverage)?;
            }
            Op::Remove { key: k } => {
                writer.run(|| store.remove(key(*k))).unwrap();
                model.remove(&key(*k));
            }
            Op::Get { key: k } => prop_assert_eq!(store.get(key(*k)).unwrap(), model.entry(&key(*k)), "{}", step),
            Op::Orphans => {
                let expected = model.orphans();
                if !expected.is_empty() {
                    hit(coverage, "orphans: listed");
                }
                prop_assert_eq!(store.orphans().unwrap(), expected, "{}", step);
            }
            Op::Advance { ms } => {
                clock.advance(Duration::from_millis(*ms));
                model.advance(*ms);
            }
            Op::Maintain => {
                if writer.run(|| store.maintain()).unwrap() > 0 {
                    hit(coverage, "maintain: dropped a bucket");
                }
            }
            Op::Reopen => {
                drop(store);
                store = open(dir.path(), &clock, policy, writer);
                model.reopen();
                hit(coverage, "reopen");
            }
        }
        for k in 0..KEYS {
            prop_assert_eq!(store.get(key(k)).unwrap(), model.entry(&key(k)), "after {}: key-{}", step, k);
        }
    }
    drop(store);
    // A last reopen: everything the model holds is still there.
    let store = open(dir.path(), &clock, policy, writer);
    model.reopen();
    for k in 0..KEYS {
        prop_assert_eq!(store.get(key(k)).unwrap(), model.entry(&key(k)), "after the final reopen: key-{}", k);
    }
    prop_assert_eq!(store.orphans().unwrap(), model.orphans(), "orphans after the final reopen");
    Ok(())
}

/// The model's verdict on a complete, checkpoint or release; counts which branch it took (an
/// empty checkpoint, refused before any token check, counts as neither).
fn check_finish(
    verdict: Result<bool, String>,
    empty_checkpoint: bool,
    step: &str,
    coverage: &Coverage,
) -> Result<(), TestCaseError> {
    match verdict {
        Ok(_) if empty_checkpoint => Ok(()),
        Ok(held) => {
            hit(coverage, if held { "finish: ok" } else { "finish: stale token" });
            Ok(())
        }
        Err(why) => Err(TestCaseError::fail(format!("{step}: {why}"))),
    }
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

#[test]
fn store_answers_like_the_hashmap_model() {
    check_against_the_model(Writer::Caller);
}

/// The same, with each write on a thread of its own: the log's lanes, their segments' ids and
/// sealed tables must keep every key's latest record the one that answers.
#[test]
fn store_answers_like_the_hashmap_model_when_writes_come_from_many_threads() {
    check_against_the_model(Writer::FreshThread);
}

fn check_against_the_model(writer: Writer) {
    let config = config();
    let cases = config.cases;
    let mut runner = TestRunner::new(config);
    let coverage = Coverage::default();
    let strategy = (any::<bool>(), proptest::collection::vec(op(), 1..80));
    let result = runner.run(&strategy, |(take_over, ops)| {
        let policy = if take_over { OrphanPolicy::TakeOver } else { OrphanPolicy::WaitForLease };
        run(policy, writer, &ops, &coverage)
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, (take_over, ops))) => {
            panic!("{why}\nminimal failing case: take_over = {take_over}, ops = {ops:#?}")
        }
        Err(e) => panic!("{e}"),
    }
    let coverage = coverage.into_inner();
    println!("model_proptest ({writer:?}): {cases} cases, branches taken: {coverage:?}");
    if cases >= 32 {
        for branch in BRANCHES {
            assert!(coverage.contains_key(branch), "no case exercised \"{branch}\": {coverage:?}");
        }
    }
}
