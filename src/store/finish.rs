//! Complete, checkpoint, release (`finish_unsettled`: the decision under the shard lock) and
//! remove.

use std::sync::atomic::Ordering as AtomicOrdering;

use crate::error::{Error, Result};
use crate::log::record::{Header, Kind};
use crate::types::ClaimToken;

use super::lookup::{Current, Superseded};
use super::{Inner, Shard, ShardLocal};

/// The in-flight record a token holds, as `Inner::write_as_holder` hands it to a write.
pub(super) struct Holding {
    pub header: Header,
    /// The last checkpoint (empty: none).
    pub value: Vec<u8>,
    /// The record a new write supersedes.
    pub old: Option<Superseded>,
    pub now_ms: u64,
}

impl Inner {
    /// complete / checkpoint / release: a write by the holder of `token`.
    pub(super) fn finish(&self, token: &ClaimToken, kind: Kind, value: &[u8]) -> Result<()> {
        let _span = crate::observe::call(kind_name(kind), token.key());
        let hash = self.key_hash(token.key());
        self.index.prefetch_slot(hash);
        let (answer, seq) = self.finish_unsettled(token, hash, kind, value)?;
        self.settle(seq)?;
        answer
    }

    /// A complete, checkpoint or release up to its record: its answer (`Ok`, or `StaleToken`
    /// read from the key's latest record) and the seq of the record that answer rests on,
    /// which `settle` must see durable before the answer is given out. A `StaleToken` rests
    /// on the record that superseded the token: told before that record is durable, a holder
    /// could give up a key that a power cut then gives back to it.
    pub(super) fn finish_unsettled(
        &self,
        token: &ClaimToken,
        hash: u64,
        kind: Kind,
        value: &[u8],
    ) -> Result<(Result<()>, u64)> {
        if token.store != self.identity {
            return Err(Error::ForeignToken);
        }
        if kind == Kind::Checkpoint && value.is_empty() {
            // An empty record value reads as "no checkpoint": it would erase the last one.
            return Err(Error::InvalidArgument("a checkpoint phase must not be empty"));
        }
        self.check_value(value)?;
        let answer = self.write_as_holder(token, hash, |shard, holding| {
            let held = holding.header;
            // A checkpoint renews the lease (a release comes with no value).
            debug_assert!(kind != Kind::Release || value.is_empty());
            #[expect(
                clippy::cast_possible_truncation,
                reason = "`check_value` bounds a value by `VALUE_LEN_FORMAT_MAX` (64 MiB)"
            )]
            let value_len = value.len() as u32;
            let mut header = Header { kind, value_len, seq: 0, written_at_ms: holding.now_ms, ..held };
            if kind == Kind::Checkpoint {
                // Renewed, never shortened: a lease `extend_lease` moved further on is kept.
                header.lease_until_ms =
                    holding.now_ms.saturating_add(u64::from(held.lease_ms)).max(held.lease_until_ms);
            }
            let (written, new_loc) = self.append(header, token.key(), value, holding.old)?;
            shard.set(hash, holding.old.map(|o| o.loc), new_loc);
            match kind {
                Kind::Complete => shard.local.counters.completes_total += 1,
                Kind::Checkpoint => {
                    shard.local.counters.checkpoints_total += 1;
                    token.lease_until_ms.store(written.lease_until_ms, AtomicOrdering::Relaxed);
                }
                _ => shard.local.counters.releases_total += 1,
            }
            Ok(((), Some(written.seq)))
        })?;
        if kind != Kind::Checkpoint && answer.0.is_ok() {
            self.key_changed(self.index.shard(hash), hash);
        }
        Ok(answer)
    }

    /// A write by the holder of `token`, decided under its key's shard lock: `write` gets the
    /// shard and the key's in-flight record while `token` holds it, and returns its answer
    /// and the seq of the record it wrote (`None`: it wrote nothing, and the answer rests on
    /// the record it read). Otherwise the answer is `StaleToken`, resting on the record that
    /// superseded the token. Returns the answer and that seq, for `settle`.
    pub(super) fn write_as_holder<R>(
        &self,
        token: &ClaimToken,
        hash: u64,
        write: impl FnOnce(&mut Shard, Holding) -> Result<(R, Option<u64>)>,
    ) -> Result<(Result<R>, u64)> {
        self.check_writable()?;
        self.backpressure()?;
        let mut shard = self.index.shard(hash).shard.lock();
        let now_ms = self.time.now_ms();
        let mut slot = None;
        let (state, old, seen_seq) = self.current(&mut shard, hash, token.key(), now_ms, &mut slot)?;
        let holding = match state {
            Current::InFlight(found) if found.header.token == token.id => {
                Holding { header: found.header, value: std::mem::take(&mut found.value), old, now_ms }
            }
            _ => {
                shard.local.counters.stale_tokens_total += 1;
                return Ok((Err(Error::StaleToken), seen_seq));
            }
        };
        let (answer, written) = write(&mut shard, holding)?;
        drop(shard);
        if written.is_some() {
            self.after_write();
        }
        Ok((Ok(answer), written.unwrap_or(seen_seq)))
    }

    pub(super) fn remove(&self, key: &[u8]) -> Result<()> {
        let _span = crate::observe::call("remove", key);
        let seq = self.remove_unsettled(key)?;
        self.settle(seq)
    }

    /// A remove up to its tombstone: the seq of the record its answer rests on (the
    /// tombstone, or the record that shows the key absent).
    pub(super) fn remove_unsettled(&self, key: &[u8]) -> Result<u64> {
        self.check_key(key)?;
        self.check_writable()?;
        let hash = self.key_hash(key);
        let locked = self.index.shard(hash);
        let mut shard = locked.shard.lock();
        let now_ms = self.time.now_ms();
        let mut slot = None;
        let (state, old, seen_seq) = self.current(&mut shard, hash, key, now_ms, &mut slot)?;
        let header = match state {
            Current::Absent => return Ok(seen_seq),
            Current::InFlight(found) | Current::Completed(found) => found.header,
        };
        let tombstone = Header { kind: Kind::Remove, value_len: 0, seq: 0, written_at_ms: now_ms, ..header };
        let (written, new_loc) = self.append(tombstone, key, &[], old)?;
        shard.set(hash, old.map(|o| o.loc), new_loc);
        shard.local.counters.removes_total += 1;
        drop(shard);
        self.after_write();
        self.key_changed(locked, hash);
        Ok(written.seq)
    }

    /// Wakes whoever waits for the key with index hash `hash` (in shard `locked`): blocking
    /// claims with a wait, and async listeners.
    pub(super) fn key_changed(&self, locked: &crate::index::LockedShard<ShardLocal>, hash: u64) {
        locked.changed.notify_all();
        self.async_waits.key_changed(hash);
    }
}

/// The call a holder's record kind comes from, for spans.
pub(super) fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Claim => "claim",
        Kind::Checkpoint => "checkpoint",
        Kind::Complete => "complete",
        Kind::Release => "release",
        Kind::Remove => "remove",
    }
}
