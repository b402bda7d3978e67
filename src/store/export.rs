//! Export and import of a window (`Store::export_entries`, `Store::import_entry`): each live
//! key's latest state with its request hash, written into another store or backend.

use super::lookup::{Current, completed_from};
use super::{Inner, Store};
use crate::clock::{duration_to_ms, ms_to_system_time, system_time_to_ms};
use crate::error::{Error, Result};
use crate::log::record::{Header, Kind};
use crate::transfer::ExportedEntry;
use crate::types::Entry;

impl Store {
    /// Every live key (in flight or completed) with its state and the hash of its request,
    /// sorted by key: what [`Store::import_entry`] (or another backend's import) takes to
    /// carry the window over. Works on a live store and on a read-only view; reads the whole
    /// index, like [`Store::keys`].
    pub fn export_entries(&self) -> Result<Vec<ExportedEntry>> {
        self.inner.export_entries()
    }

    /// Writes one exported entry into this store, durably under `Durability::Sync`. Returns
    /// `Ok(false)`, writing nothing, when the key already has a live entry here (it is kept)
    /// or the entry has expired.
    ///
    /// An imported in-flight claim keeps its request hash, times, lease and last checkpoint,
    /// and belongs to no process of this store: it is an orphan here, taken over by the next
    /// claim of its key as [`OrphanPolicy`](crate::OrphanPolicy) says, with its checkpoint on
    /// the new token. Its old holder's token (of the source store) is refused here with
    /// `Error::ForeignToken`. A completed entry replays its outcome to every repeat, and
    /// answers `Mismatch` to a different request, as it did in the source.
    pub fn import_entry(&self, exported: &ExportedEntry) -> Result<bool> {
        self.inner.import_entry(exported)
    }
}

/// The incarnation an imported claim records: no open of any store draws it (incarnations are
/// odd), so the claim is an orphan of every process.
const NO_PROCESS: u64 = 0;

impl Inner {
    fn export_entries(&self) -> Result<Vec<ExportedEntry>> {
        let mut keys = self.all_keys()?;
        keys.sort_unstable();
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some((entry, request_hash)) = self.entry_and_request_hash(&key)? {
                out.push(ExportedEntry { key, request_hash, entry });
            }
        }
        Ok(out)
    }

    fn import_entry(&self, exported: &ExportedEntry) -> Result<bool> {
        let key = exported.key.as_slice();
        self.check_key(key)?;
        self.check_writable()?;
        let (kind, value, claimed_at, written_at, lease_until, expires_at) = match &exported.entry {
            Entry::InFlight { claimed_at, lease_expires_at, expires_at, checkpoint, .. } => (
                Kind::Claim,
                checkpoint.as_deref().unwrap_or_default(),
                *claimed_at,
                *claimed_at,
                *lease_expires_at,
                *expires_at,
            ),
            Entry::Completed(done) => (
                Kind::Complete,
                done.outcome.as_slice(),
                done.claimed_at,
                done.completed_at,
                done.completed_at,
                done.expires_at,
            ),
        };
        self.check_value(value)?;
        let now_ms = self.time.now_ms();
        let expires_at_ms = system_time_to_ms(expires_at);
        if expires_at_ms <= now_ms {
            return Ok(false);
        }
        if expires_at_ms - now_ms > duration_to_ms(crate::options::TTL_MAX) {
            return Err(Error::InvalidArgument("an imported entry must expire within TTL_MAX (10 years)"));
        }
        let claimed_at_ms = system_time_to_ms(claimed_at).min(now_ms);
        let lease_until_ms = system_time_to_ms(lease_until);
        // The lease a checkpoint renews by: the one the claim was given, as far as it can be told.
        let lease_ms = u32::try_from(lease_until_ms.saturating_sub(claimed_at_ms).max(1)).unwrap_or(u32::MAX);
        let header = Header {
            kind,
            key_len: u16::try_from(key.len())
                .map_err(|_| Error::KeyTooLong { len: key.len(), max: u16::MAX.into() })?,
            value_len: u32::try_from(value.len()).map_err(|_| Error::InvalidArgument("imported value too long"))?,
            seq: 0,
            expires_at_ms,
            claimed_at_ms,
            lease_until_ms,
            token: 0,
            incarnation: NO_PROCESS,
            request_hash: exported.request_hash,
            written_at_ms: system_time_to_ms(written_at).clamp(claimed_at_ms, now_ms),
            lease_ms,
        };
        let hash = self.key_hash(key);
        let locked = self.index.shard(hash);
        let mut shard = locked.shard.lock();
        let mut slot = None;
        let (state, old, _) = self.current(&mut shard, hash, key, now_ms, &mut slot)?;
        if !matches!(state, Current::Absent) {
            return Ok(false);
        }
        let (written, loc) = self.append(header, key, value, old)?;
        shard.set(hash, old.map(|o| o.loc), loc);
        drop(shard);
        self.after_write();
        self.key_changed(locked, hash);
        self.settle(written.seq)?;
        Ok(true)
    }

    /// `key`'s state (as `Store::get` answers it) and the hash of the request that claimed it.
    fn entry_and_request_hash(&self, key: &[u8]) -> Result<Option<(Entry, u128)>> {
        let (found, seq) = self.entry_and_request_hash_unsettled(key)?;
        self.settle(seq)?;
        Ok(found)
    }

    /// `entry_and_request_hash` before the answer is settled: with the seq it rests on.
    pub(super) fn entry_and_request_hash_unsettled(&self, key: &[u8]) -> Result<(Option<(Entry, u128)>, u64)> {
        let hash = self.key_hash(key);
        self.index.prefetch_slot(hash);
        let mut shard = self.index.shard(hash).shard.lock();
        let now_ms = self.time.now_ms();
        let mut slot = None;
        let (state, _, seq) = self.current(&mut shard, hash, key, now_ms, &mut slot)?;
        let answer = match state {
            Current::Absent => None,
            Current::Completed(found) => {
                let outcome = std::mem::take(&mut found.value);
                Some((Entry::Completed(completed_from(&found.header, outcome)), found.header.request_hash))
            }
            Current::InFlight(found) => {
                let (header, checkpoint) = (found.header, std::mem::take(&mut found.value));
                let entry = Entry::InFlight {
                    claimed_at: ms_to_system_time(header.claimed_at_ms),
                    lease_expires_at: ms_to_system_time(header.lease_until_ms),
                    expires_at: ms_to_system_time(header.expires_at_ms),
                    checkpoint: (!checkpoint.is_empty()).then_some(checkpoint),
                    orphaned: header.incarnation != self.incarnation,
                };
                Some((entry, header.request_hash))
            }
        };
        drop(shard);
        Ok((answer, seq))
    }
}
