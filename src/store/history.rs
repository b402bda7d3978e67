//! Per-key history for operators (`Store::history`): when the key's claim was made, when it
//! completed, and how many retries were answered with its outcome.
//!
//! Replays are counted in memory beside each index shard, under its lock (a claim that
//! replays already holds it), and written into the files lazily: a completed record whose
//! count has waited `HISTORY_FLUSH_AFTER_MS` is appended again, unchanged but for its count,
//! by the next maintenance pass, and every count is written at close. A crash loses what was
//! counted since the last write. The count rides in the `Complete` record's `lease_ms` field,
//! marked by a `lease_until_ms` of 0 (a completed record's lease means nothing, and every
//! other completed record has a lease end after its claim): older builds read such a record
//! as the completion it is.

use std::time::SystemTime;

use super::lookup::Current;
use super::{Inner, Store, loc_id, loc_of_id};
use crate::clock::ms_to_system_time;
use crate::error::Result;
use crate::log::record::{Header, Kind};

/// How long a count waits in memory before maintenance writes it (a minute: a key replayed
/// all the time costs one record copy a minute, not one per replay).
const HISTORY_FLUSH_AFTER_MS: u64 = 60_000;

/// Replays served by one completed record and not yet written.
#[derive(Debug, Clone, Copy)]
pub(super) struct PendingReplays {
    pub count: u64,
    /// When the first of them was counted.
    pub since_ms: u64,
}

/// What a key's history says (see [`Store::history`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyHistory {
    /// When the claim that holds the key, or completed it, was made (a takeover starts a new
    /// claim: its time).
    pub claimed_at: SystemTime,
    /// When it completed; `None` while in flight.
    pub completed_at: Option<SystemTime>,
    /// Repeats answered with the stored outcome (replays, and waits that ended in it), counted
    /// while `Options::count_replays` is set (0 otherwise). Counted in memory and written into
    /// the files within a minute, and at close: a crash loses the last minute's count, and a
    /// read-only view (the CLI) sees what was written.
    pub replays_served: u64,
    /// When the key leaves the window.
    pub expires_at: SystemTime,
}

/// The replays a completed record carries in its files (see the module docs).
fn written_replays(header: &Header) -> u64 {
    if header.kind == Kind::Complete && header.lease_until_ms == 0 { u64::from(header.lease_ms) } else { 0 }
}

impl Store {
    /// The history of `key`: when its claim was made and completed, and how many repeats its
    /// outcome answered; `None` when the key is absent. Answers "how many times did this
    /// client retry".
    pub fn history(&self, key: impl AsRef<[u8]>) -> Result<Option<KeyHistory>> {
        self.inner.history(key.as_ref())
    }
}

impl Inner {
    fn history(&self, key: &[u8]) -> Result<Option<KeyHistory>> {
        self.check_key(key)?;
        let hash = self.key_hash(key);
        let mut shard = self.index.shard(hash).shard.lock();
        let now_ms = self.time.now_ms();
        let mut slot = None;
        let (state, _, seq) = self.current(&mut shard, hash, key, now_ms, &mut slot)?;
        let history = match state {
            Current::Absent => None,
            Current::InFlight(found) => Some(KeyHistory {
                claimed_at: ms_to_system_time(found.header.claimed_at_ms),
                completed_at: None,
                replays_served: 0,
                expires_at: ms_to_system_time(found.header.expires_at_ms),
            }),
            Current::Completed(found) => {
                let pending = shard.local.replays.get(&loc_id(found.old.loc)).map_or(0, |p| p.count);
                Some(KeyHistory {
                    claimed_at: ms_to_system_time(found.header.claimed_at_ms),
                    completed_at: Some(ms_to_system_time(found.header.written_at_ms)),
                    replays_served: written_replays(&found.header).saturating_add(pending),
                    expires_at: ms_to_system_time(found.header.expires_at_ms),
                })
            }
        };
        drop(shard);
        self.settle(seq)?;
        Ok(history)
    }

    /// Writes the replays counted in memory into copies of their records: those waiting for
    /// `HISTORY_FLUSH_AFTER_MS`, or with `all`, every one. Best effort: a record that cannot be
    /// written now (a full disk, say) keeps its count for the next pass; nothing fails.
    pub(super) fn flush_history(&self, now_ms: u64, all: bool) {
        // Nothing is counted without `count_replays`: no pass over the shards either.
        if !self.options.count_replays || self.read_only || self.commit.poisoned().is_some() {
            return;
        }
        let mut wrote = false;
        for locked in self.index.shards() {
            // A pass skips a shard that is busy (its count waits for the next pass); at close
            // nothing else runs, and every shard is taken.
            let Some(mut shard) = (if all { Some(locked.shard.lock()) } else { locked.shard.try_lock() }) else {
                continue;
            };
            if shard.local.replays.is_empty() {
                continue;
            }
            let due: Vec<(u64, u64)> = shard
                .local
                .replays
                .iter()
                .filter(|(_, p)| all || now_ms.saturating_sub(p.since_ms) >= HISTORY_FLUSH_AFTER_MS)
                .map(|(&id, p)| (id, p.count))
                .collect();
            for (id, count) in due {
                let loc = loc_of_id(id);
                let key = match self.key_at(loc) {
                    Ok(Some(key)) => key,
                    // Its bucket ended or its segment is gone: so is the count's record.
                    Ok(None) => {
                        shard.local.replays.remove(&id);
                        continue;
                    }
                    Err(_) => continue,
                };
                let hash = self.key_hash(&key);
                let mut slot = None;
                let Ok((state, old, _)) = self.current(&mut shard, hash, &key, now_ms, &mut slot) else { continue };
                let Current::Completed(found) = state else {
                    shard.local.replays.remove(&id);
                    continue;
                };
                if found.old.loc != loc {
                    // Superseded since (by a takeover after a removal, say): not this completion.
                    shard.local.replays.remove(&id);
                    continue;
                }
                let total = written_replays(&found.header).saturating_add(count);
                let header = Header {
                    seq: 0,
                    lease_until_ms: 0,
                    lease_ms: u32::try_from(total).unwrap_or(u32::MAX),
                    ..found.header
                };
                let value = std::mem::take(&mut found.value);
                if let Ok((_, new_loc)) = self.append(header, &key, &value, old) {
                    shard.set(hash, Some(loc), new_loc);
                    shard.local.replays.remove(&id);
                    wrote = true;
                }
            }
            drop(shard);
            crate::pace::breathe();
        }
        if wrote {
            self.after_write();
        }
    }
}
