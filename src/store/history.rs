//! Per-key history for operators (`Store::history`): when the key's claim was made, when it
//! completed, and how many retries were answered with its outcome.

use std::time::SystemTime;

use super::lookup::Current;
use super::{Inner, Store};
use crate::clock::ms_to_system_time;
use crate::error::Result;

/// What the store knows of a key's life (see [`Store::history`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyHistory {
    /// When the claim that holds the key, or completed it, was made (a takeover starts a new
    /// claim: its time).
    pub claimed_at: SystemTime,
    /// When it completed; `None` while in flight.
    pub completed_at: Option<SystemTime>,
    /// Repeats answered with the stored outcome (replays, and waits that ended in it) since
    /// the store was opened. Counted in memory beside the index: it starts again from 0 at
    /// each open, and is not kept in the files.
    pub replays_served: u64,
    /// When the key leaves the window.
    pub expires_at: SystemTime,
}

impl Store {
    /// The history of `key`: claim and completion times and the replays served since open;
    /// `None` when the key is absent. Answers "how many times did this client retry".
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
            Current::Completed(found) => Some(KeyHistory {
                claimed_at: ms_to_system_time(found.header.claimed_at_ms),
                completed_at: Some(ms_to_system_time(found.header.written_at_ms)),
                replays_served: shard.local.replays.get(&super::loc_id(found.old.loc)).copied().unwrap_or(0),
                expires_at: ms_to_system_time(found.header.expires_at_ms),
            }),
        };
        drop(shard);
        self.settle(seq)?;
        Ok(history)
    }
}
