//! Fuzz target body `ops_model`: a sequence of operations (claims, batches of claims and
//! completes, checkpoints, releases, removes, reads, clock steps, reopens and power cuts) under
//! `Durability::Sync` behaves exactly like the model of the contract after every step. The model
//! is the one the model proptest and the power-cut test use (`tests/common/model.rs`).
//!
//! Compiled into the cargo-fuzz target `fuzz/fuzz_targets/ops_model.rs` and into the corpus
//! replay `tests/fuzz_corpus.rs` (both with `#[path]`); it uses only idemstore's public API and
//! the simulated disk (feature `sim`).

use std::sync::Arc;
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use idemstore::sim::SimDisk;
use idemstore::{
    Claim, ClaimOptions, ClaimToken, Clock, Durability, KeyHashFn, ManualClock, Options, OrphanPolicy, Store,
};

#[path = "../../tests/common/model.rs"]
mod model;
use model::{Finish, Model};

/// Where the simulated store lives on its `SimDisk`.
const STORE_DIR: &str = "/idemstore-fuzz/store";
/// The manual clock's start: a plausible wall-clock time in milliseconds.
const START_MS: u64 = 1_700_000_000_000;

/// Keys the model works on (few, so operations meet on the same key).
const MODEL_KEYS: u8 = 3;
/// Distinct request bodies per key (a different one must get `Mismatch`).
const MODEL_REQUESTS: u8 = 2;
/// Claim tokens kept for later complete/checkpoint/release calls.
const MODEL_TOKENS_MAX: usize = 8;
/// Operations run per input.
const MODEL_OPS_MAX: usize = 256;
const MODEL_DEFAULT_TTL_MS: u64 = 60_000;
const MODEL_DEFAULT_LEASE_MS: u64 = 5_000;
/// Per-claim TTLs to pick from (`None` takes the default).
const MODEL_TTLS_MS: [Option<u64>; 5] = [None, Some(1_000), Some(5_000), Some(30_000), Some(7_200_000)];
/// Per-claim leases to pick from (`None` takes the default).
const MODEL_LEASES_MS: [Option<u64>; 4] = [None, Some(1), Some(1_000), Some(10_000)];
/// Clock steps to pick from.
const MODEL_STEPS_MS: [u64; 9] = [1, 10, 100, 999, 1_000, 5_000, 30_000, 61_000, 3_600_000];

/// One step of the model test. Its `arbitrary` encoding is the input format of `ops_model`:
/// changing this enum changes what existing corpus and regression inputs mean, so regressions
/// must be found and minimized again after such a change. `Restart` is a clean reopen, or a
/// power cut (keeping a torn prefix of unsynced writes when seeded) and an open of what
/// survived; one variant for both keeps restarts, the costliest step, at one step in thirteen.
#[derive(Debug, Clone, Arbitrary)]
enum ModelOp {
    Claim {
        key: u8,
        request: u8,
        ttl: u8,
        lease: u8,
    },
    /// (key, request) pairs claimed in one `claim_many` call; checked as single claims in order.
    ClaimMany {
        items: Vec<(u8, u8)>,
        ttl: u8,
        lease: u8,
    },
    Complete {
        token: u8,
        outcome: u8,
    },
    /// (token pick, outcome byte) pairs completed in one `complete_many` call; checked in order.
    CompleteMany {
        picks: Vec<(u8, u8)>,
    },
    Checkpoint {
        token: u8,
        phase: u8,
    },
    Release {
        token: u8,
    },
    Remove {
        key: u8,
    },
    Get {
        key: u8,
    },
    Orphans,
    Advance {
        step: u8,
    },
    Sync,
    Maintain,
    Restart {
        power_cut: bool,
        torn_seed: Option<u64>,
    },
}

fn model_key(key: u8) -> Vec<u8> {
    format!("model-key-{key}").into_bytes()
}

fn model_request(request: u8) -> Vec<u8> {
    format!("POST /model {request}").into_bytes()
}

/// A colliding index hash: every key lands on one 64-bit hash.
fn colliding_hash(_key: &[u8]) -> u64 {
    7
}

struct ModelRun {
    disk: SimDisk,
    clock: Arc<ManualClock>,
    store: Option<Store>,
    collide: bool,
    model: Model,
    tokens: Vec<ClaimToken>,
    step: usize,
}

impl ModelRun {
    fn options(&self) -> Options {
        Options {
            durability: Durability::Sync,
            default_ttl: Duration::from_millis(MODEL_DEFAULT_TTL_MS),
            default_lease: Duration::from_millis(MODEL_DEFAULT_LEASE_MS),
            max_key_len: 64,
            max_outcome_len: 256,
            bucket_width: Duration::from_secs(10),
            segment_bytes_max: 16 << 10,
            segment_bytes_initial: 1024,
            clock: self.clock.clone(),
            io: Arc::new(self.disk.clone()),
            key_hash: self.collide.then_some(colliding_hash as KeyHashFn),
            background: false,
            ..Options::default()
        }
    }

    /// Opens the store (the model counts a reopen unless this is the first open) and compares
    /// `orphans()`.
    fn open(&mut self, reopen: bool) {
        let store = Store::open(STORE_DIR, self.options())
            .unwrap_or_else(|e| panic!("step {}: opening the store failed: {e}", self.step));
        self.store = Some(store);
        if reopen {
            self.model.reopen();
        }
        self.check_orphans();
    }

    fn store(&self) -> &Store {
        self.store.as_ref().unwrap_or_else(|| panic!("the store is open between steps"))
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    fn run(&mut self, op: &ModelOp) {
        let step = self.step;
        match *op {
            ModelOp::Claim { key, request, ttl, lease } => {
                self.claim(key % MODEL_KEYS, request % MODEL_REQUESTS, ttl, lease)
            }
            ModelOp::ClaimMany { ref items, ttl, lease } => self.claim_many(items, ttl, lease),
            ModelOp::Complete { token, outcome } => {
                let Some(token) = self.pick_token(token) else { return };
                let outcome = vec![outcome; usize::from(outcome % 7)];
                let result = self.store().complete(&token, &outcome);
                self.check_finish(&token, Finish::Complete(outcome), &result);
            }
            ModelOp::CompleteMany { ref picks } => {
                let chosen: Vec<(ClaimToken, Vec<u8>)> = picks
                    .iter()
                    .filter_map(|&(pick, outcome)| {
                        let token = self.pick_token(pick)?;
                        Some((token, vec![outcome; usize::from(outcome % 7)]))
                    })
                    .collect();
                let items: Vec<(&ClaimToken, &[u8])> = chosen.iter().map(|(t, o)| (t, o.as_slice())).collect();
                let results = self.store().complete_many(&items);
                assert_eq!(
                    results.len(),
                    chosen.len(),
                    "step {step}: complete_many answered a different number of items"
                );
                // Each item is checked against the model, which the earlier items of the batch
                // have already changed.
                for ((token, outcome), result) in chosen.into_iter().zip(results) {
                    self.check_finish(&token, Finish::Complete(outcome), &result);
                }
            }
            ModelOp::Checkpoint { token, phase } => {
                let Some(token) = self.pick_token(token) else { return };
                let phase = vec![phase; 1 + usize::from(phase % 3)];
                let result = self.store().checkpoint(&token, &phase);
                self.check_finish(&token, Finish::Checkpoint(phase), &result);
            }
            ModelOp::Release { token } => {
                let Some(token) = self.pick_token(token) else { return };
                let result = self.store().release(&token);
                self.check_finish(&token, Finish::Release, &result);
            }
            ModelOp::Remove { key } => {
                let key = model_key(key % MODEL_KEYS);
                self.store().remove(&key).unwrap_or_else(|e| panic!("step {step}: remove failed: {e}"));
                self.model.remove(&key);
            }
            ModelOp::Get { key } => self.check_key(key % MODEL_KEYS),
            ModelOp::Orphans => self.check_orphans(),
            ModelOp::Advance { step: pick } => {
                let ms = MODEL_STEPS_MS[usize::from(pick) % MODEL_STEPS_MS.len()];
                self.clock.advance(Duration::from_millis(ms));
                self.model.advance(ms);
            }
            ModelOp::Sync => self.store().sync().unwrap_or_else(|e| panic!("step {step}: sync failed: {e}")),
            ModelOp::Maintain => {
                self.store().maintain().unwrap_or_else(|e| panic!("step {step}: maintain failed: {e}"));
            }
            ModelOp::Restart { power_cut: false, .. } => {
                self.store = None;
                self.open(true);
            }
            ModelOp::Restart { power_cut: true, torn_seed } => {
                // Under `Sync` every acknowledged operation is durable: the cut loses nothing.
                let survivor = self.disk.power_cut(torn_seed);
                self.store = None;
                self.disk = survivor;
                self.open(true);
            }
        }
    }

    fn pick_token(&self, pick: u8) -> Option<ClaimToken> {
        if self.tokens.is_empty() {
            return None;
        }
        Some(self.tokens[usize::from(pick) % self.tokens.len()].clone())
    }

    /// Hands the result of a complete, checkpoint or release to the model, which checks it.
    fn check_finish(&mut self, token: &ClaimToken, what: Finish, result: &idemstore::Result<()>) {
        if let Err(why) = self.model.finish(token, what, result) {
            panic!("step {}: {why}", self.step);
        }
    }

    /// The claim options `ttl` and `lease` pick, and the TTL and lease (ms) they mean.
    fn claim_options(ttl: u8, lease: u8) -> (ClaimOptions, u64, u64) {
        let ttl_ms = MODEL_TTLS_MS[usize::from(ttl) % MODEL_TTLS_MS.len()];
        let lease_ms = MODEL_LEASES_MS[usize::from(lease) % MODEL_LEASES_MS.len()];
        let options = ClaimOptions {
            ttl: ttl_ms.map(Duration::from_millis),
            lease: lease_ms.map(Duration::from_millis),
            wait: None,
        };
        (options, ttl_ms.unwrap_or(MODEL_DEFAULT_TTL_MS), lease_ms.unwrap_or(MODEL_DEFAULT_LEASE_MS))
    }

    fn claim(&mut self, key: u8, request: u8, ttl: u8, lease: u8) {
        let step = self.step;
        let (options, ttl_ms, lease_ms) = Self::claim_options(ttl, lease);
        let got = self
            .store()
            .claim_with(model_key(key), model_request(request), options)
            .unwrap_or_else(|e| panic!("step {step}: claim failed: {e}"));
        self.check_claim(key, request, ttl_ms, lease_ms, got);
    }

    /// A batch answers as its claims made one at a time would: each answer is checked against
    /// the model, which then takes that claim, before the next answer.
    fn claim_many(&mut self, items: &[(u8, u8)], ttl: u8, lease: u8) {
        let step = self.step;
        let (options, ttl_ms, lease_ms) = Self::claim_options(ttl, lease);
        let items: Vec<(u8, u8)> = items.iter().map(|&(k, r)| (k % MODEL_KEYS, r % MODEL_REQUESTS)).collect();
        let batch: Vec<(Vec<u8>, Vec<u8>)> = items.iter().map(|&(k, r)| (model_key(k), model_request(r))).collect();
        let answers = self.store().claim_many(&batch, options);
        assert_eq!(answers.len(), items.len(), "step {step}: claim_many answered a different number of items");
        for ((key, request), answer) in items.into_iter().zip(answers) {
            let got = answer.unwrap_or_else(|e| panic!("step {step}: claim_many failed for key {key}: {e}"));
            self.check_claim(key, request, ttl_ms, lease_ms, got);
        }
    }

    /// Hands one claim's answer to the model, which checks it and takes the claim; keeps the
    /// token of an acquired key for later steps.
    fn check_claim(&mut self, key: u8, request: u8, ttl_ms: u64, lease_ms: u64, got: Claim) {
        if let Err(why) = self.model.claim(&model_key(key), &model_request(request), ttl_ms, lease_ms, &got) {
            panic!("step {}: claim of key {key} request {request}: {why}", self.step);
        }
        if let Claim::Acquired(token) = got {
            if self.tokens.len() == MODEL_TOKENS_MAX {
                let _forgotten = self.tokens.remove(0);
            }
            self.tokens.push(token);
        }
    }

    fn check_key(&self, key: u8) {
        let key = model_key(key);
        let got = self.store().get(&key).unwrap_or_else(|e| panic!("step {}: get failed: {e}", self.step));
        let expected = self.model.entry(&key);
        assert_eq!(got, expected, "step {}: get({}) diverges from the model", self.step, String::from_utf8_lossy(&key));
    }

    fn check_orphans(&self) {
        let got = self.store().orphans().unwrap_or_else(|e| panic!("step {}: orphans failed: {e}", self.step));
        assert_eq!(got, self.model.orphans(), "step {}: orphans() diverges from the model", self.step);
    }

    /// Compares every key after a step; `orphans()` (a scan of the whole index) is compared on
    /// `Orphans` steps and after every open.
    fn check_all(&self) {
        for key in 0..MODEL_KEYS {
            self.check_key(key);
        }
    }
}

/// Runs a sequence of operations against a `Durability::Sync` store on a `SimDisk` and against
/// the model of the contract, comparing every answer and, after every step, every key.
///
/// Input layout: 1 byte of flags (bit 0: force every key onto one index hash), then an
/// `arbitrary`-encoded sequence of operations (at most 256 are run). Set the environment
/// variable `IDEMSTORE_FUZZ_TRACE` to print each operation as it runs.
pub fn ops_model(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else { return };
    let mut run = ModelRun {
        disk: SimDisk::new(),
        clock: ManualClock::new(START_MS),
        store: None,
        collide: flags & 1 == 1,
        model: Model::new(START_MS, OrphanPolicy::TakeOver),
        tokens: Vec::new(),
        step: 0,
    };
    run.open(false);
    let trace = std::env::var_os("IDEMSTORE_FUZZ_TRACE").is_some();
    let mut input = Unstructured::new(rest);
    while run.step < MODEL_OPS_MAX && !input.is_empty() {
        let Ok(op) = ModelOp::arbitrary(&mut input) else { break };
        run.step += 1;
        if trace {
            eprintln!("step {} at {} ms: {op:?}", run.step, run.now_ms() - START_MS);
        }
        run.run(&op);
        run.check_all();
    }
}
