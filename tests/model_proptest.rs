//! Promise: the store behaves like a plain map with the contract's semantics, for any sequence
//! of operations.
//!
//! Random sequences of claim / claim_with (TTL and lease) / complete / checkpoint / release /
//! remove / get / orphans / maintain / advancing a `ManualClock` / reopening the store run
//! against the store and against `Model`, a `HashMap` written here from the contract in the README; every
//! answer is compared, and after each step every key's `get` too. Both orphan policies are
//! covered. `PROPTEST_CASES` sets the number of cases (default 64); the run then checks that
//! every branch of the contract was exercised by some case.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use idemstore::{
    Claim, ClaimOptions, ClaimToken, Completed, Entry, ManualClock, Options, Orphan, OrphanPolicy, Store,
    ms_to_system_time,
};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{TestError, TestRunner};

mod common;
use common::START_MS;

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
// The model: the latest state of each key, exactly as the README's contract describes it.

#[derive(Debug, Clone)]
enum State {
    InFlight {
        token: usize,
        lease_until_ms: u64,
        lease_ms: u64,
        checkpoint: Vec<u8>,
        incarnation: u64,
    },
    Completed {
        outcome: Vec<u8>,
        completed_at_ms: u64,
    },
    /// Released or removed: absent, whatever its window says.
    Gone,
}

#[derive(Debug, Clone)]
struct Record {
    state: State,
    request: usize,
    claimed_at_ms: u64,
    expires_at_ms: u64,
}

/// What the model expects of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expected {
    Acquired { recovered: bool, checkpoint: Option<Vec<u8>>, lease_until_ms: u64 },
    InProgress { lease_until_ms: u64 },
    Completed(Completed),
    Mismatch,
}

struct Model {
    records: HashMap<usize, Record>,
    now_ms: u64,
    incarnation: u64,
    policy: OrphanPolicy,
    /// Key of every token handed out, by model token number.
    token_keys: Vec<usize>,
}

fn non_empty(bytes: &[u8]) -> Option<Vec<u8>> {
    (!bytes.is_empty()).then(|| bytes.to_vec())
}

impl Model {
    /// The key's record if it is visible now: in its window and not released or removed.
    fn visible(&self, key: usize) -> Option<&Record> {
        self.records.get(&key).filter(|r| r.expires_at_ms > self.now_ms && !matches!(r.state, State::Gone))
    }

    fn completed(record: &Record, outcome: &[u8], completed_at_ms: u64) -> Completed {
        Completed {
            outcome: outcome.to_vec(),
            completed_at: ms_to_system_time(completed_at_ms),
            claimed_at: ms_to_system_time(record.claimed_at_ms),
            expires_at: ms_to_system_time(record.expires_at_ms),
        }
    }

    fn claim(&mut self, key: usize, request: usize, ttl_ms: u64, lease_ms: u64) -> Expected {
        let now = self.now_ms;
        let new_token = self.token_keys.len();
        let Some(record) = self.visible(key).cloned() else {
            self.records.insert(
                key,
                Record {
                    state: State::InFlight {
                        token: new_token,
                        lease_until_ms: now + lease_ms,
                        lease_ms,
                        checkpoint: Vec::new(),
                        incarnation: self.incarnation,
                    },
                    request,
                    claimed_at_ms: now,
                    expires_at_ms: now + ttl_ms,
                },
            );
            self.token_keys.push(key);
            return Expected::Acquired { recovered: false, checkpoint: None, lease_until_ms: now + lease_ms };
        };
        if record.request != request {
            return Expected::Mismatch;
        }
        match &record.state {
            State::Completed { outcome, completed_at_ms } => {
                Expected::Completed(Self::completed(&record, outcome, *completed_at_ms))
            }
            State::InFlight { lease_until_ms, checkpoint, incarnation, .. } => {
                let orphan = *incarnation != self.incarnation && self.policy == OrphanPolicy::TakeOver;
                if !orphan && now < *lease_until_ms {
                    return Expected::InProgress { lease_until_ms: *lease_until_ms };
                }
                let checkpoint = checkpoint.clone();
                self.records.insert(
                    key,
                    Record {
                        state: State::InFlight {
                            token: new_token,
                            lease_until_ms: now + lease_ms,
                            lease_ms,
                            checkpoint: checkpoint.clone(),
                            incarnation: self.incarnation,
                        },
                        request,
                        claimed_at_ms: now,
                        expires_at_ms: (now + ttl_ms).max(record.expires_at_ms),
                    },
                );
                self.token_keys.push(key);
                Expected::Acquired {
                    recovered: true,
                    checkpoint: non_empty(&checkpoint),
                    lease_until_ms: now + lease_ms,
                }
            }
            State::Gone => unreachable!("a gone record is not visible"),
        }
    }

    /// The record held by `token`, if the token still holds it.
    fn held(&mut self, token: usize) -> Option<&mut Record> {
        let key = self.token_keys[token];
        self.visible(key)?;
        let record = self.records.get_mut(&key)?;
        match record.state {
            State::InFlight { token: holder, .. } if holder == token => Some(record),
            _ => None,
        }
    }

    /// complete / checkpoint / release: `Ok` when the token holds the key.
    fn finish(&mut self, token: usize, what: Finish) -> Result<(), ()> {
        let now = self.now_ms;
        let record = self.held(token).ok_or(())?;
        let State::InFlight { lease_until_ms, lease_ms, checkpoint, .. } = &mut record.state else { unreachable!() };
        match what {
            Finish::Complete(outcome) => record.state = State::Completed { outcome, completed_at_ms: now },
            Finish::Checkpoint(phase) => {
                *checkpoint = phase;
                *lease_until_ms = now + *lease_ms;
            }
            Finish::Release => record.state = State::Gone,
        }
        Ok(())
    }

    fn remove(&mut self, key: usize) {
        if self.visible(key).is_some() {
            self.records.get_mut(&key).unwrap().state = State::Gone;
        }
    }

    fn get(&self, key: usize) -> Option<Entry> {
        let record = self.visible(key)?;
        Some(match &record.state {
            State::InFlight { lease_until_ms, checkpoint, incarnation, .. } => Entry::InFlight {
                claimed_at: ms_to_system_time(record.claimed_at_ms),
                lease_expires_at: ms_to_system_time(*lease_until_ms),
                expires_at: ms_to_system_time(record.expires_at_ms),
                checkpoint: non_empty(checkpoint),
                orphaned: *incarnation != self.incarnation,
            },
            State::Completed { outcome, completed_at_ms } => {
                Entry::Completed(Self::completed(record, outcome, *completed_at_ms))
            }
            State::Gone => unreachable!("a gone record is not visible"),
        })
    }

    fn orphans(&self) -> Vec<Orphan> {
        let mut orphans: Vec<Orphan> = (0..KEYS)
            .filter_map(|k| {
                let record = self.visible(k)?;
                match &record.state {
                    State::InFlight { lease_until_ms, checkpoint, incarnation, .. }
                        if *incarnation != self.incarnation =>
                    {
                        Some(Orphan {
                            key: key(k),
                            claimed_at: ms_to_system_time(record.claimed_at_ms),
                            lease_expires_at: ms_to_system_time(*lease_until_ms),
                            checkpoint: non_empty(checkpoint),
                        })
                    }
                    _ => None,
                }
            })
            .collect();
        orphans.sort_by(|a, b| a.key.cmp(&b.key));
        orphans
    }
}

enum Finish {
    Complete(Vec<u8>),
    Checkpoint(Vec<u8>),
    Release,
}

// ---------------------------------------------------------------------------------------------
// Running a sequence against both.

fn options(clock: &Arc<ManualClock>, policy: OrphanPolicy) -> Options {
    Options {
        orphans: policy,
        bucket_width: Duration::from_secs(10),
        segment_bytes_initial: 4096,
        ..common::options(clock)
    }
}

fn open(dir: &Path, clock: &Arc<ManualClock>, policy: OrphanPolicy) -> Store {
    Store::open(dir, options(clock, policy)).expect("open store")
}

fn check_claim(got: &Claim, expected: &Expected, step: &str) -> Result<(), TestCaseError> {
    match (got, expected) {
        (Claim::Acquired(token), Expected::Acquired { recovered, checkpoint, lease_until_ms }) => {
            prop_assert_eq!(token.recovered(), *recovered, "{}: recovered()", step);
            prop_assert_eq!(token.checkpoint(), checkpoint.as_deref(), "{}: checkpoint()", step);
            prop_assert_eq!(token.lease_expires_at(), ms_to_system_time(*lease_until_ms), "{}: lease", step);
        }
        (Claim::InProgress { lease_expires_at }, Expected::InProgress { lease_until_ms }) => {
            prop_assert_eq!(*lease_expires_at, ms_to_system_time(*lease_until_ms), "{}", step);
        }
        (Claim::Completed(done), Expected::Completed(model)) => prop_assert_eq!(done, model, "{}", step),
        (Claim::Mismatch, Expected::Mismatch) => {}
        (got, expected) => prop_assert!(false, "{}: store answered {:?}, model expects {:?}", step, got, expected),
    }
    Ok(())
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

fn run(policy: OrphanPolicy, ops: &[Op], coverage: &Coverage) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut store = open(dir.path(), &clock, policy);
    let mut model = Model { records: HashMap::new(), now_ms: START_MS, incarnation: 0, policy, token_keys: Vec::new() };
    // Engine tokens, parallel to `model.token_keys`; and per key the largest token id seen.
    let mut tokens: Vec<ClaimToken> = Vec::new();
    let mut largest_id: HashMap<usize, u64> = HashMap::new();

    for (n, op) in ops.iter().enumerate() {
        let step = format!("step {n} {op:?}");
        match op {
            Op::Claim { key: k, req } | Op::ClaimWith { key: k, req, .. } => {
                let expired_before = model.records.get(k).is_some_and(|r| r.expires_at_ms <= model.now_ms);
                let orphan_before = model.orphans().iter().any(|o| o.key == key(*k));
                let (got, expected) = match op {
                    Op::ClaimWith { ttl, lease, .. } => {
                        let opts = ClaimOptions {
                            ttl: Some(Duration::from_millis(TTLS_MS[*ttl])),
                            lease: Some(Duration::from_millis(LEASES_MS[*lease])),
                            wait: None,
                        };
                        (
                            store.claim_with(key(*k), request(*req), opts).unwrap(),
                            model.claim(*k, *req, TTLS_MS[*ttl], LEASES_MS[*lease]),
                        )
                    }
                    _ => (
                        store.claim(key(*k), request(*req)).unwrap(),
                        model.claim(*k, *req, DEFAULT_TTL_MS, DEFAULT_LEASE_MS),
                    ),
                };
                check_claim(&got, &expected, &step)?;
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
                    prop_assert_eq!(token.key(), &key(*k)[..], "{}", step);
                    let previous = largest_id.insert(*k, token.id());
                    prop_assert!(previous.is_none_or(|p| token.id() > p), "{}: fencing id did not grow", step);
                    tokens.push(token);
                }
            }
            Op::Complete { token, outcome } | Op::Checkpoint { token, phase: outcome } => {
                if tokens.is_empty() {
                    continue;
                }
                let t = token.index(tokens.len());
                if matches!(op, Op::Checkpoint { .. }) && outcome.is_empty() {
                    // An empty phase would erase the last recovery point: refused, nothing written.
                    let got = store.checkpoint(&tokens[t], outcome);
                    prop_assert!(
                        matches!(got, Err(idemstore::Error::InvalidArgument(_))),
                        "{}: empty checkpoint got {:?}",
                        step,
                        got
                    );
                    continue;
                }
                let (got, expected) = if matches!(op, Op::Complete { .. }) {
                    (store.complete(&tokens[t], outcome), model.finish(t, Finish::Complete(outcome.clone())))
                } else {
                    (store.checkpoint(&tokens[t], outcome), model.finish(t, Finish::Checkpoint(outcome.clone())))
                };
                check_finish(got, expected, &step, coverage)?;
            }
            Op::Release { token } => {
                if tokens.is_empty() {
                    continue;
                }
                let t = token.index(tokens.len());
                check_finish(store.release(&tokens[t]), model.finish(t, Finish::Release), &step, coverage)?;
            }
            Op::Remove { key: k } => {
                store.remove(key(*k)).unwrap();
                model.remove(*k);
            }
            Op::Get { key: k } => prop_assert_eq!(store.get(key(*k)).unwrap(), model.get(*k), "{}", step),
            Op::Orphans => {
                let expected = model.orphans();
                if !expected.is_empty() {
                    hit(coverage, "orphans: listed");
                }
                prop_assert_eq!(store.orphans().unwrap(), expected, "{}", step);
            }
            Op::Advance { ms } => {
                clock.advance(Duration::from_millis(*ms));
                model.now_ms += ms;
            }
            Op::Maintain => {
                if store.maintain().unwrap() > 0 {
                    hit(coverage, "maintain: dropped a bucket");
                }
            }
            Op::Reopen => {
                drop(store);
                store = open(dir.path(), &clock, policy);
                model.incarnation += 1;
                hit(coverage, "reopen");
            }
        }
        for k in 0..KEYS {
            prop_assert_eq!(store.get(key(k)).unwrap(), model.get(k), "after {}: key-{}", step, k);
        }
    }
    drop(store);
    // A last reopen: everything the model holds is still there.
    let store = open(dir.path(), &clock, policy);
    model.incarnation += 1;
    for k in 0..KEYS {
        prop_assert_eq!(store.get(key(k)).unwrap(), model.get(k), "after the final reopen: key-{}", k);
    }
    prop_assert_eq!(store.orphans().unwrap(), model.orphans(), "orphans after the final reopen");
    Ok(())
}

fn check_finish(
    got: idemstore::Result<()>,
    expected: Result<(), ()>,
    step: &str,
    coverage: &Coverage,
) -> Result<(), TestCaseError> {
    hit(coverage, if expected.is_ok() { "finish: ok" } else { "finish: stale token" });
    match (got, expected) {
        (Ok(()), Ok(())) | (Err(idemstore::Error::StaleToken), Err(())) => Ok(()),
        (got, expected) => {
            prop_assert!(false, "{}: store answered {:?}, model expects {:?} (Err = StaleToken)", step, got, expected);
            Ok(())
        }
    }
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

#[test]
fn store_answers_like_the_hashmap_model() {
    let config = config();
    let cases = config.cases;
    let mut runner = TestRunner::new(config);
    let coverage = Coverage::default();
    let strategy = (any::<bool>(), proptest::collection::vec(op(), 1..80));
    let result = runner.run(&strategy, |(take_over, ops)| {
        let policy = if take_over { OrphanPolicy::TakeOver } else { OrphanPolicy::WaitForLease };
        run(policy, &ops, &coverage)
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, (take_over, ops))) => {
            panic!("{why}\nminimal failing case: take_over = {take_over}, ops = {ops:#?}")
        }
        Err(e) => panic!("{e}"),
    }
    let coverage = coverage.into_inner();
    println!("model_proptest: {cases} cases, branches taken: {coverage:?}");
    if cases >= 32 {
        for branch in BRANCHES {
            assert!(coverage.contains_key(branch), "no case exercised \"{branch}\": {coverage:?}");
        }
    }
}
