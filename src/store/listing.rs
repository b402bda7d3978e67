//! Reading without writing: `get`, the list of keys, the orphans of earlier processes.

use crate::clock::ms_to_system_time;
use crate::error::Result;
use crate::log::Loc;
use crate::types::{Entry, Orphan};

use super::Inner;
use super::lookup::Current;

impl Inner {
    pub(super) fn get(&self, key: &[u8]) -> Result<Option<Entry>> {
        let _span = crate::observe::call("get", key);
        self.check_key(key)?;
        self.entry(key)
    }

    /// The state of a key that is known not to be empty. Not held to `max_key_len`: that limit
    /// is for keys given as input, and a key read back from the store may have been written
    /// under a larger one (tools open stores with the default limit).
    pub(super) fn entry(&self, key: &[u8]) -> Result<Option<Entry>> {
        let (entry, seq) = self.entry_unsettled(key)?;
        self.settle(seq)?;
        Ok(entry)
    }

    /// The state of a key (see `entry`) and the seq of the record it was read from.
    pub(super) fn entry_unsettled(&self, key: &[u8]) -> Result<(Option<Entry>, u64)> {
        let (found, seq) = self.entry_and_request_hash_unsettled(key)?;
        Ok((found.map(|(entry, _)| entry), seq))
    }

    /// Every distinct key with an index entry, in RAM or sealed (unsorted, deduplicated).
    pub(super) fn all_keys(&self) -> Result<Vec<Vec<u8>>> {
        let mut locs: Vec<Loc> = Vec::new();
        for locked in self.index.shards() {
            locs.extend(locked.shard.lock().entries().into_iter().map(|(_, loc)| loc));
        }
        for table in self.sealed.all() {
            locs.extend(table.entries()?.into_iter().map(|(_, loc)| loc));
        }
        let mut keys = std::collections::HashSet::new();
        let now_ms = self.time.now_ms();
        for loc in locs {
            // A segment whose bucket has ended holds no live key (and a writer in another
            // process may be freeing its bytes under a read-only view): not read.
            let key = self.log.with_segment(loc.segment, |s| {
                (s.header.bucket_end_ms > now_ms).then(|| s.key_at(u64::from(loc.offset))).transpose()
            });
            if let Some(key) = key.transpose()?.flatten() {
                keys.insert(key);
            }
        }
        Ok(keys.into_iter().collect())
    }

    pub(super) fn keys(&self) -> Result<Vec<(Vec<u8>, Entry)>> {
        let mut keys = Vec::new();
        for key in self.all_keys()? {
            if let Some(entry) = self.entry(&key)? {
                keys.push((key, entry));
            }
        }
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(keys)
    }

    pub(super) fn orphans(&self) -> Result<Vec<Orphan>> {
        let mut found = Vec::new();
        for key in self.all_keys()? {
            let hash = self.key_hash(&key);
            let mut shard = self.index.shard(hash).shard.lock();
            let now_ms = self.time.now_ms();
            let mut slot = None;
            let (state, _, seq) = self.current(&mut shard, hash, &key, now_ms, &mut slot)?;
            let Current::InFlight(record) = state else { continue };
            let (header, checkpoint) = (record.header, std::mem::take(&mut record.value));
            if header.incarnation == self.incarnation {
                continue;
            }
            drop(shard);
            self.settle(seq)?;
            found.push(Orphan {
                key,
                claimed_at: ms_to_system_time(header.claimed_at_ms),
                lease_expires_at: ms_to_system_time(header.lease_until_ms),
                checkpoint: (!checkpoint.is_empty()).then_some(checkpoint),
            });
        }
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }
}
