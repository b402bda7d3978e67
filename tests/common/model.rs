//! The contract of a dedupe store written once, as a plain map from key to the latest state of
//! its record, exactly as the README's Use and Guarantees sections describe it. The model
//! proptest (`tests/model_proptest.rs`), the power-cut test (`tests/power_cut.rs`) and the
//! `ops_model` fuzz target (`fuzz/bodies/ops_model.rs`, which includes this file with `#[path]`)
//! all run their operations against a `Store` and against this model, and hand the store's
//! answer to the model, which checks it and then takes the operation.
//!
//! The contract, per key:
//! - a claim of an absent (never claimed, released, removed or expired) key acquires it, with a
//!   window of `now + ttl` and a lease of `now + lease`;
//! - a claim with a different request than the one on record is `Mismatch`, in any state;
//! - a claim of a completed key replays the stored outcome;
//! - a claim of an in-flight key is `InProgress` until its lease ends, and takes it over after
//!   (or at once when the holder belonged to an earlier open and the policy is `TakeOver`): the
//!   new token is `recovered()`, carries the last checkpoint, and the window never shrinks;
//! - `complete`, `checkpoint` and `release` succeed only with the token that holds the key
//!   (whatever its lease says), else `StaleToken`; a checkpoint renews the lease, an empty one is
//!   refused with `InvalidArgument`;
//! - fencing tokens only grow: per key, and over every claim since the store was opened;
//! - `get` and `orphans` show the state as it is now: expired keys are absent, in-flight claims
//!   of an earlier open are orphans.
//!
//! The model keeps its own clock (`now_ms`), which the driver advances with the store's.

#![allow(dead_code)]

use std::collections::BTreeMap;

use idemstore::{Claim, ClaimToken, Completed, Entry, Error, Orphan, OrphanPolicy, ms_to_system_time};

/// An in-flight claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// The fencing token the store handed out for it.
    pub token: u64,
    pub request: Vec<u8>,
    pub checkpoint: Option<Vec<u8>>,
    pub claimed_at_ms: u64,
    pub lease_until_ms: u64,
    /// The lease the claim asked for: a checkpoint renews it by as much.
    pub lease_ms: u64,
    pub expires_at_ms: u64,
    /// Which open of the store made the claim: an earlier one makes it an orphan.
    pub incarnation: u64,
}

/// A completed key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Done {
    pub request: Vec<u8>,
    pub outcome: Vec<u8>,
    pub claimed_at_ms: u64,
    pub completed_at_ms: u64,
    pub expires_at_ms: u64,
}

/// The latest record of a key. A key with no slot (never claimed, released, removed) is absent;
/// so is a key whose slot has expired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slot {
    InFlight(Held),
    Completed(Done),
}

impl Slot {
    pub fn expires_at_ms(&self) -> u64 {
        match self {
            Slot::InFlight(h) => h.expires_at_ms,
            Slot::Completed(d) => d.expires_at_ms,
        }
    }

    pub fn request(&self) -> &[u8] {
        match self {
            Slot::InFlight(h) => &h.request,
            Slot::Completed(d) => &d.request,
        }
    }

    /// The slot if it is still in its window at `now_ms`.
    pub fn live(&self, now_ms: u64) -> Option<&Slot> {
        (self.expires_at_ms() > now_ms).then_some(self)
    }

    /// What `get` must return for this slot at `now_ms`, the store being at open `incarnation`.
    pub fn entry(&self, now_ms: u64, incarnation: u64) -> Option<Entry> {
        Some(match self.live(now_ms)? {
            Slot::InFlight(h) => Entry::InFlight {
                claimed_at: ms_to_system_time(h.claimed_at_ms),
                lease_expires_at: ms_to_system_time(h.lease_until_ms),
                expires_at: ms_to_system_time(h.expires_at_ms),
                checkpoint: h.checkpoint.clone(),
                orphaned: h.incarnation != incarnation,
            },
            Slot::Completed(d) => Entry::Completed(d.completed()),
        })
    }
}

impl Done {
    /// The replay a claim of this key answers.
    pub fn completed(&self) -> Completed {
        Completed {
            outcome: self.outcome.clone(),
            completed_at: ms_to_system_time(self.completed_at_ms),
            claimed_at: ms_to_system_time(self.claimed_at_ms),
            expires_at: ms_to_system_time(self.expires_at_ms),
        }
    }
}

/// What the model expects of a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Acquired: fresh (`recovered` false) or a takeover of an earlier holder.
    Acquired {
        recovered: bool,
        checkpoint: Option<Vec<u8>>,
        lease_until_ms: u64,
        expires_at_ms: u64,
    },
    InProgress {
        lease_until_ms: u64,
    },
    Completed(Completed),
    Mismatch,
}

/// The three calls a token makes.
#[derive(Clone, Debug)]
pub enum Finish {
    Complete(Vec<u8>),
    Checkpoint(Vec<u8>),
    Release,
}

/// The store as a map. Every checking method returns `Err` with what diverged; the caller adds
/// its own context (step, seed) and fails its way (panic, `prop_assert`).
#[derive(Clone, Debug)]
pub struct Model {
    /// The model's clock, in ms since the epoch: the store's `ManualClock`, stepped alike.
    pub now_ms: u64,
    /// Counts opens of the store after the first.
    pub incarnation: u64,
    pub policy: OrphanPolicy,
    slots: BTreeMap<Vec<u8>, Slot>,
    /// Per key, the largest fencing token handed out.
    last_token: BTreeMap<Vec<u8>, u64>,
    /// The largest fencing token handed out since the store was last opened.
    last_token_this_open: u64,
}

impl Model {
    pub fn new(now_ms: u64, policy: OrphanPolicy) -> Model {
        Model {
            now_ms,
            incarnation: 0,
            policy,
            slots: BTreeMap::new(),
            last_token: BTreeMap::new(),
            last_token_this_open: 0,
        }
    }

    /// Steps the model's clock (step the store's `ManualClock` by as much).
    pub fn advance(&mut self, ms: u64) {
        self.now_ms += ms;
    }

    /// The store was closed (or crashed, or lost power) and opened again: its in-flight claims
    /// are now orphans.
    pub fn reopen(&mut self) {
        self.incarnation += 1;
        self.last_token_this_open = 0;
    }

    /// The key's slot as written, expired or not.
    pub fn slot(&self, key: &[u8]) -> Option<&Slot> {
        self.slots.get(key)
    }

    /// The key's slot if it is in its window now.
    pub fn live(&self, key: &[u8]) -> Option<&Slot> {
        self.slots.get(key)?.live(self.now_ms)
    }

    /// Sets a key's slot to what a store reopened after a power cut was found to hold (one of
    /// the states the key had): the fencing floor of the key goes back to that state's token,
    /// since tokens handed out after it may have been lost with their records.
    pub fn restore(&mut self, key: &[u8], slot: Option<Slot>) {
        match &slot {
            Some(Slot::InFlight(h)) => self.last_token.insert(key.to_vec(), h.token),
            _ => self.last_token.remove(key),
        };
        match slot {
            Some(slot) => self.slots.insert(key.to_vec(), slot),
            None => self.slots.remove(key),
        };
    }

    /// What a claim of `key` with `request` must answer now.
    pub fn expect_claim(&self, key: &[u8], request: &[u8], ttl_ms: u64, lease_ms: u64) -> Expected {
        let now = self.now_ms;
        let fresh = Expected::Acquired {
            recovered: false,
            checkpoint: None,
            lease_until_ms: now + lease_ms,
            expires_at_ms: now + ttl_ms,
        };
        let Some(slot) = self.live(key) else { return fresh };
        if slot.request() != request {
            return Expected::Mismatch;
        }
        match slot {
            Slot::Completed(done) => Expected::Completed(done.completed()),
            Slot::InFlight(held) => {
                let orphan = held.incarnation != self.incarnation && self.policy == OrphanPolicy::TakeOver;
                if !orphan && now < held.lease_until_ms {
                    return Expected::InProgress { lease_until_ms: held.lease_until_ms };
                }
                Expected::Acquired {
                    recovered: true,
                    checkpoint: held.checkpoint.clone(),
                    lease_until_ms: now + lease_ms,
                    expires_at_ms: (now + ttl_ms).max(held.expires_at_ms),
                }
            }
        }
    }

    /// The smallest fencing token a new claim of `key` may get, minus one.
    fn token_floor(&self, key: &[u8]) -> u64 {
        self.last_token.get(key).copied().unwrap_or(0).max(self.last_token_this_open)
    }

    /// Checks the store's answer `got` to a claim of `key` with `request` (TTL and lease in ms)
    /// and takes the claim. Returns what the model expected, which `got` matched.
    pub fn claim(
        &mut self,
        key: &[u8],
        request: &[u8],
        ttl_ms: u64,
        lease_ms: u64,
        got: &Claim,
    ) -> Result<Expected, String> {
        let expected = self.expect_claim(key, request, ttl_ms, lease_ms);
        match (&expected, got) {
            (Expected::Acquired { recovered, checkpoint, lease_until_ms, expires_at_ms }, Claim::Acquired(token)) => {
                if token.key() != key {
                    return Err(format!("the token is for key {:?}", String::from_utf8_lossy(token.key())));
                }
                if token.recovered() != *recovered {
                    return Err(format!("token.recovered() is {}, the model expects {recovered}", token.recovered()));
                }
                if token.checkpoint() != checkpoint.as_deref() {
                    return Err(format!(
                        "the token carries checkpoint {:?}, the model expects {checkpoint:?}",
                        token.checkpoint()
                    ));
                }
                if token.lease_expires_at() != ms_to_system_time(*lease_until_ms) {
                    return Err(format!(
                        "the token's lease ends {:?}, the model expects {:?}",
                        token.lease_expires_at(),
                        ms_to_system_time(*lease_until_ms)
                    ));
                }
                let floor = self.token_floor(key);
                if token.id() <= floor {
                    return Err(format!("fencing token {} is not above an earlier one ({floor})", token.id()));
                }
                self.last_token.insert(key.to_vec(), token.id());
                self.last_token_this_open = token.id();
                let held = Held {
                    token: token.id(),
                    request: request.to_vec(),
                    checkpoint: checkpoint.clone(),
                    claimed_at_ms: self.now_ms,
                    lease_until_ms: *lease_until_ms,
                    lease_ms,
                    expires_at_ms: *expires_at_ms,
                    incarnation: self.incarnation,
                };
                self.slots.insert(key.to_vec(), Slot::InFlight(held));
                Ok(expected)
            }
            (Expected::InProgress { lease_until_ms }, Claim::InProgress { lease_expires_at })
                if *lease_expires_at == ms_to_system_time(*lease_until_ms) =>
            {
                Ok(expected)
            }
            (Expected::Completed(want), Claim::Completed(done)) if want == done => Ok(expected),
            (Expected::Mismatch, Claim::Mismatch) => Ok(expected),
            _ => Err(format!("the store answered {got:?}, the model expects {expected:?}")),
        }
    }

    /// True when `token` holds its key now: the key's live slot is in flight under this token.
    pub fn holds(&self, token: &ClaimToken) -> bool {
        matches!(self.live(token.key()), Some(Slot::InFlight(h)) if h.token == token.id())
    }

    /// Checks the store's answer `got` to `complete`, `checkpoint` or `release` with `token`
    /// and takes the call. Returns whether the token held its key (then the key changed).
    pub fn finish(&mut self, token: &ClaimToken, what: Finish, got: &idemstore::Result<()>) -> Result<bool, String> {
        if let Finish::Checkpoint(phase) = &what
            && phase.is_empty()
        {
            // An empty phase would erase the last recovery point: refused, nothing written.
            return match got {
                Err(Error::InvalidArgument(_)) => Ok(false),
                other => Err(format!("an empty checkpoint gave {other:?}, not InvalidArgument")),
            };
        }
        let holds = self.holds(token);
        match (holds, got) {
            (true, Ok(())) | (false, Err(Error::StaleToken)) => {}
            (true, other) => return Err(format!("{what:?} with the holding token gave {other:?}")),
            (false, other) => return Err(format!("{what:?} with a stale token gave {other:?}, not StaleToken")),
        }
        if !holds {
            return Ok(false);
        }
        let now = self.now_ms;
        let key = token.key();
        let Some(Slot::InFlight(held)) = self.slots.get_mut(key) else { unreachable!("a held key is in flight") };
        match what {
            Finish::Complete(outcome) => {
                let done = Done {
                    request: held.request.clone(),
                    outcome,
                    claimed_at_ms: held.claimed_at_ms,
                    completed_at_ms: now,
                    expires_at_ms: held.expires_at_ms,
                };
                self.slots.insert(key.to_vec(), Slot::Completed(done));
            }
            Finish::Checkpoint(phase) => {
                held.checkpoint = Some(phase);
                held.lease_until_ms = now + held.lease_ms;
            }
            Finish::Release => {
                self.slots.remove(key);
            }
        }
        Ok(true)
    }

    /// `remove(key)`: the key is absent from now on. Returns whether it was present.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        let present = self.live(key).is_some();
        if present {
            self.slots.remove(key);
        }
        present
    }

    /// What `get(key)` must return now.
    pub fn entry(&self, key: &[u8]) -> Option<Entry> {
        self.slots.get(key)?.entry(self.now_ms, self.incarnation)
    }

    /// What `orphans()` must return now: the live in-flight claims of an earlier open, by key.
    pub fn orphans(&self) -> Vec<Orphan> {
        self.slots
            .iter()
            .filter_map(|(key, slot)| match slot.live(self.now_ms)? {
                Slot::InFlight(h) if h.incarnation != self.incarnation => Some(Orphan {
                    key: key.clone(),
                    claimed_at: ms_to_system_time(h.claimed_at_ms),
                    lease_expires_at: ms_to_system_time(h.lease_until_ms),
                    checkpoint: h.checkpoint.clone(),
                }),
                _ => None,
            })
            .collect()
    }
}
