//! Claims: every decision about a claim, made under the key's shard lock (`claim_unsettled`), then
//! the wait for durability (`settle`).

use std::time::{Duration, Instant};

use crate::clock::{duration_to_ms, ms_to_system_time};
use crate::error::{Error, Result};
use crate::log::record::{Header, Kind};
use crate::options::{ClaimOptions, OrphanPolicy};
use crate::types::{Claim, ClaimToken};

use super::lookup::{Current, completed_from};
use super::{Inner, history, loc_id};

/// How a claim's answer is counted when its caller waits on its own between calls (the async
/// calls, which listen for the key instead of sleeping in `claim_unsettled`): as a blocking
/// claim's wait would be, so the counters do not depend on the API.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Tally {
    /// The caller already waited for this key: an outcome found now counts as waited.
    pub waited: bool,
    /// The caller waits again on `InProgress`: that answer is not its last, and not counted.
    pub will_wait: bool,
}

impl Inner {
    pub(super) fn claim(&self, key: &[u8], request: &[u8], options: &ClaimOptions) -> Result<Claim> {
        let _span = crate::observe::call("claim", key);
        let hash = self.key_hash(key);
        // The index slot's cache miss is the largest single cost of a claim over a large
        // index: start it now, so it overlaps the checks, the request hash and the lock.
        // (A batch warms its keys' slots itself, in `warm`.)
        self.index.prefetch_slot(hash);
        let (answer, seq) = self.claim_unsettled(key, hash, request, options, Tally::default())?;
        self.settle(seq)?;
        Ok(answer)
    }

    /// A claim up to its answer, with the seq of the record that answer rests on (which
    /// `settle` must see durable before the answer is given out under `Sync`).
    pub(super) fn claim_unsettled(
        &self,
        key: &[u8],
        hash: u64,
        request: &[u8],
        options: &ClaimOptions,
        tally: Tally,
    ) -> Result<(Claim, u64)> {
        self.check_key(key)?;
        let ttl = options.ttl.unwrap_or(self.options.default_ttl);
        let ttl_ms = duration_to_ms(ttl);
        let lease_ms = duration_to_ms(options.lease.unwrap_or(self.options.default_lease));
        if ttl_ms == 0 || lease_ms == 0 {
            return Err(Error::InvalidArgument("ttl and lease must be at least 1 ms"));
        }
        if ttl > crate::options::TTL_MAX {
            return Err(Error::InvalidArgument("ttl must be at most TTL_MAX (10 years)"));
        }
        let lease_ms = u32::try_from(lease_ms).map_err(|_| Error::InvalidArgument("lease must be under 49 days"))?;
        self.backpressure()?;
        let request_hash = crate::transfer::request_hash(request);
        // `None`: no waiting. `Some(None)`: a wait with no deadline (longer than the monotonic
        // clock can add), which ends only when the holder does, or its lease or the window.
        let deadline: Option<Option<Instant>> = options.wait.map(|w| Instant::now().checked_add(w));
        let locked = self.index.shard(hash);
        let mut shard = locked.shard.lock();
        let mut waited = tally.waited;
        let (answer, seq) = loop {
            let now_ms = self.time.now_ms();
            let mut slot = None;
            let (state, old, seen_seq) = self.current(&mut shard, hash, key, now_ms, &mut slot)?;
            match state {
                Current::Absent => {
                    let header = self.claim_record(key, now_ms, ttl_ms, lease_ms, request_hash);
                    let (written, loc) = self.append(header, key, &[], old)?;
                    shard.set(hash, old.map(|o| o.loc), loc);
                    shard.local.counters.claims_acquired_total += 1;
                    break (Claim::Acquired(token_for(self.identity, key, &written, None, Vec::new())), written.seq);
                }
                Current::Completed(found) => {
                    if found.header.request_hash != request_hash {
                        shard.local.counters.mismatches_total += 1;
                        break (Claim::Mismatch, seen_seq);
                    }
                    if waited {
                        shard.local.counters.duplicates_waited_total += 1;
                    } else {
                        shard.local.counters.duplicates_replayed_total += 1;
                    }
                    if self.options.count_replays {
                        let pending = shard
                            .local
                            .replays
                            .entry(loc_id(found.old.loc))
                            .or_insert(history::PendingReplays { count: 0, since_ms: now_ms });
                        pending.count = pending.count.saturating_add(1);
                    }
                    let outcome = std::mem::take(&mut found.value);
                    break (Claim::Completed(completed_from(&found.header, outcome)), seen_seq);
                }
                Current::InFlight(found) => {
                    let header = found.header;
                    if header.request_hash != request_hash {
                        shard.local.counters.mismatches_total += 1;
                        break (Claim::Mismatch, seen_seq);
                    }
                    let orphaned = header.incarnation != self.incarnation;
                    let orphan_takeover = orphaned && self.options.orphans == OrphanPolicy::TakeOver;
                    let lease_over = now_ms >= header.lease_until_ms;
                    if orphan_takeover || lease_over {
                        let checkpoint = std::mem::take(&mut found.value);
                        #[expect(
                            clippy::cast_possible_truncation,
                            reason = "a checkpoint read from a record, whose value length is a u32"
                        )]
                        let value_len = checkpoint.len() as u32;
                        let takeover = Header {
                            value_len,
                            // A takeover never shortens the window: it shadows the old claim.
                            expires_at_ms: now_ms.saturating_add(ttl_ms).max(header.expires_at_ms),
                            ..self.claim_record(key, now_ms, ttl_ms, lease_ms, request_hash)
                        };
                        let (written, new_loc) = self.append(takeover, key, &checkpoint, old)?;
                        debug_assert!(written.token > header.token, "fencing tokens only grow");
                        shard.set(hash, old.map(|o| o.loc), new_loc);
                        shard.local.counters.claims_acquired_total += 1;
                        crate::observe::takeover(key, orphan_takeover && !lease_over);
                        if orphan_takeover && !lease_over {
                            shard.local.counters.orphan_takeovers_total += 1;
                        } else {
                            shard.local.counters.lease_takeovers_total += 1;
                        }
                        break (
                            Claim::Acquired(token_for(
                                self.identity,
                                key,
                                &written,
                                Some(header.incarnation),
                                checkpoint,
                            )),
                            written.seq,
                        );
                    }
                    let remaining = match deadline {
                        None => None,
                        Some(None) => Some(Duration::MAX),
                        Some(Some(at)) => at.checked_duration_since(Instant::now()),
                    };
                    match remaining {
                        Some(left) if !left.is_zero() => {
                            // Woken by the holder's complete or release; otherwise the key changes
                            // at its lease end (a takeover) or at its window's end (absent), with
                            // no write to wake anyone: sleep no longer than the first of them.
                            let change_at_ms = header.lease_until_ms.min(header.expires_at_ms);
                            let until_change = Duration::from_millis(change_at_ms.saturating_sub(now_ms).max(1));
                            crate::sync::wait_for(&locked.changed, &mut shard, left.min(until_change));
                            waited = true;
                        }
                        _ => {
                            if !tally.will_wait {
                                shard.local.counters.duplicates_in_progress_total += 1;
                            }
                            let lease_expires_at = ms_to_system_time(header.lease_until_ms);
                            let expires_at = ms_to_system_time(header.expires_at_ms);
                            break (Claim::InProgress { lease_expires_at, expires_at }, seen_seq);
                        }
                    }
                }
            }
        };
        drop(shard);
        // Only an acquisition appended a record; replays and answers of keys in flight leave
        // nothing to grow or replace.
        if matches!(answer, Claim::Acquired(_)) {
            self.after_write();
        }
        Ok((answer, seq))
    }

    /// The record of a new holding of `key` claimed at `now_ms` (a fresh claim, or the base of
    /// a takeover); its token is its own seq, assigned at append.
    #[inline]
    pub(super) fn claim_record(
        &self,
        key: &[u8],
        now_ms: u64,
        ttl_ms: u64,
        lease_ms: u32,
        request_hash: u128,
    ) -> Header {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "`check_key` bounds a key by `max_key_len`, at most `KEY_LEN_FORMAT_MAX` (u16::MAX)"
        )]
        let key_len = key.len() as u16;
        Header {
            kind: Kind::Claim,
            key_len,
            value_len: 0,
            seq: 0,
            expires_at_ms: now_ms.saturating_add(ttl_ms),
            claimed_at_ms: now_ms,
            lease_until_ms: now_ms.saturating_add(u64::from(lease_ms)),
            token: 0,
            incarnation: self.incarnation,
            request_hash,
            written_at_ms: now_ms,
            lease_ms,
        }
    }
}

/// The token of the claim record `written` (its checkpoint carried over on a takeover).
#[inline]
pub(super) fn token_for(
    store: u64,
    key: &[u8],
    written: &Header,
    taken_from: Option<u64>,
    checkpoint: Vec<u8>,
) -> ClaimToken {
    ClaimToken {
        key: key.into(),
        id: written.token,
        store,
        recovered: taken_from.is_some(),
        checkpoint: (!checkpoint.is_empty()).then_some(checkpoint),
        lease_until_ms: std::sync::atomic::AtomicU64::new(written.lease_until_ms),
        taken_from: taken_from.unwrap_or(0),
    }
}

impl Inner {
    /// Tells `Options::on_claim`, if set, how a claim of `key` was answered.
    pub(super) fn report_claim(&self, key: &[u8], answer: &Result<Claim>) {
        if let (Some(hook), Ok(claim)) = (&self.options.on_claim, answer) {
            hook(&crate::types::ClaimEvent { key, answer: claim.answer() });
        }
    }
}
