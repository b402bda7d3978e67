//! Calls that reshape a key's time in the window: `extend_lease` (a holder's heartbeat),
//! `touch` (a longer window for a key) and `advance` (the highest version seen of an event
//! stream's key). Each is one record written under the key's shard lock, like every other
//! decision, so a crash leaves either the old record or the new one as the key's latest.

use std::time::{Duration, SystemTime};

use super::lookup::Current;
use super::{Inner, Store};
use crate::clock::{duration_to_ms, ms_to_system_time};
use crate::error::{Error, Result};
use crate::log::record::{Header, Kind};
use crate::types::ClaimToken;

/// What [`Store::advance`] decided for a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a Stale version must be dropped, a Newer one applied"]
pub enum Advance {
    /// The version is higher than any seen for the key in its window: apply the event. It is
    /// now the key's version.
    Newer {
        /// The version it replaced, if the key had one.
        previous: Option<u64>,
    },
    /// The key already has this version or a higher one: drop the event.
    Stale {
        /// The key's version.
        current: u64,
    },
}

/// The request hash that marks a key written by `advance` (a claim's request hash is the
/// hash of its request; this one is no request's in practice, and a claim of such a key with
/// any request is a `Mismatch`).
const ADVANCE_MARK: u128 = 0x6964_656d_7374_6f72_652d_6164_7661_6e63; // "idemstore-advanc"

impl Store {
    /// Moves the lease of the claim held by `token` to `lease` from now (a heartbeat for a long
    /// effect), keeping its last checkpoint; a lease already running longer is kept. Fails
    /// with `StaleToken` when the token no longer holds the key, `InvalidArgument` for a zero
    /// lease or one of 49 days or more. Moves `token.lease_expires_at()` on.
    pub fn extend_lease(&self, token: &ClaimToken, lease: Duration) -> Result<()> {
        let hash = self.inner.key_hash(token.key());
        let (answer, seq) = self.inner.extend_lease_unsettled(token, hash, lease)?;
        self.inner.settle(seq)?;
        answer
    }

    /// Extends the window of `key` (in flight or completed) to at least `ttl` from now, and
    /// returns when the key now expires; `None` when the key is absent. A window already
    /// longer is kept (nothing is written). The key's record is written again into the bucket
    /// of its new expiry; a crash before that write is durable leaves the old window.
    pub fn touch(&self, key: impl AsRef<[u8]>, ttl: Duration) -> Result<Option<SystemTime>> {
        let (answer, seq) = self.inner.touch_unsettled(key.as_ref(), ttl)?;
        self.inner.settle(seq)?;
        Ok(answer)
    }

    /// The out-of-order guard for an event stream: records `version` as `key`'s version when
    /// it is higher than the one the key has, and tells whether it was (`Newer`: apply the
    /// event) or not (`Stale`: drop it). Atomic with any other call on the key, durable under
    /// `Durability::Sync`, and kept for the store's default TTL from the last newer version.
    ///
    /// A companion to exact-key dedupe, not a replacement: it keeps one number per key (an
    /// entity id, say), so an event older than the newest applied is dropped even if it was
    /// never seen. Keys used with `advance` must not be claimed: a claim of one is a
    /// `Mismatch`, and `advance` on a claimed key is `InvalidArgument`.
    pub fn advance(&self, key: impl AsRef<[u8]>, version: u64) -> Result<Advance> {
        self.advance_with_ttl(key, version, self.inner.options.default_ttl)
    }

    /// [`Store::advance`] with the key kept for `ttl` from this newer version.
    pub fn advance_with_ttl(&self, key: impl AsRef<[u8]>, version: u64, ttl: Duration) -> Result<Advance> {
        let (answer, seq) = self.inner.advance_unsettled(key.as_ref(), version, ttl)?;
        self.inner.settle(seq)?;
        Ok(answer)
    }
}

/// `ttl` in ms, checked as a claim's is: at least 1 ms, at most `TTL_MAX`.
fn ttl_ms(ttl: Duration) -> Result<u64> {
    let ms = duration_to_ms(ttl);
    if ms == 0 {
        return Err(Error::InvalidArgument("ttl must be at least 1 ms"));
    }
    if ttl > crate::options::TTL_MAX {
        return Err(Error::InvalidArgument("ttl must be at most TTL_MAX (10 years)"));
    }
    Ok(ms)
}

impl Inner {
    /// The checks before a write that sets a key's window (`touch`, `advance`): the key, the
    /// TTL (returned in ms, with the key's index hash), a writable store, back-pressure.
    fn checked_window_write(&self, key: &[u8], ttl: Duration) -> Result<(u64, u64)> {
        self.check_key(key)?;
        let ttl_ms = ttl_ms(ttl)?;
        self.check_writable()?;
        self.backpressure()?;
        Ok((ttl_ms, self.key_hash(key)))
    }

    fn extend_lease_unsettled(&self, token: &ClaimToken, hash: u64, lease: Duration) -> Result<(Result<()>, u64)> {
        if token.store != self.identity {
            return Err(Error::ForeignToken);
        }
        let lease_ms = duration_to_ms(lease);
        if lease_ms == 0 {
            return Err(Error::InvalidArgument("a lease must be at least 1 ms"));
        }
        if u32::try_from(lease_ms).is_err() {
            return Err(Error::InvalidArgument("a lease must be under 49 days"));
        }
        self.write_as_holder(token, hash, |shard, holding| {
            let held = holding.header;
            let lease_until_ms = holding.now_ms.saturating_add(lease_ms).max(held.lease_until_ms);
            if lease_until_ms == held.lease_until_ms {
                return Ok(((), None));
            }
            // A checkpoint record with the last checkpoint as its value: the lease moves, the
            // phase a later holder resumes from does not.
            let header =
                Header { kind: Kind::Checkpoint, seq: 0, written_at_ms: holding.now_ms, lease_until_ms, ..held };
            let (written, new_loc) = self.append(header, token.key(), &holding.value, holding.old)?;
            shard.set(hash, holding.old.map(|o| o.loc), new_loc);
            token.lease_until_ms.store(written.lease_until_ms, std::sync::atomic::Ordering::Relaxed);
            Ok(((), Some(written.seq)))
        })
    }

    fn touch_unsettled(&self, key: &[u8], ttl: Duration) -> Result<(Option<SystemTime>, u64)> {
        let (ttl_ms, hash) = self.checked_window_write(key, ttl)?;
        let locked = self.index.shard(hash);
        let mut shard = locked.shard.lock();
        let now_ms = self.time.now_ms();
        let mut slot = None;
        let (state, old, seen_seq) = self.current(&mut shard, hash, key, now_ms, &mut slot)?;
        let (latest, value) = match state {
            Current::Absent => return Ok((None, seen_seq)),
            Current::InFlight(found) | Current::Completed(found) => (found.header, std::mem::take(&mut found.value)),
        };
        let expires_at_ms = now_ms.saturating_add(ttl_ms).max(latest.expires_at_ms);
        if expires_at_ms == latest.expires_at_ms {
            return Ok((Some(ms_to_system_time(expires_at_ms)), seen_seq));
        }
        // The same record (times, holder, outcome or checkpoint) with a later expiry: a
        // holder's token stays valid, a replay answers as before. A claim record is written
        // as a checkpoint (the same in-flight state): only new claims are held to the disk
        // budget, and this is none.
        let kind = if latest.kind == Kind::Claim { Kind::Checkpoint } else { latest.kind };
        let header = Header { kind, seq: 0, expires_at_ms, ..latest };
        let (written, new_loc) = self.append(header, key, &value, old)?;
        shard.set(hash, old.map(|o| o.loc), new_loc);
        // The same completion, moved: its replays served go with it.
        if let Some(served) = old.and_then(|o| shard.local.replays.remove(&super::loc_id(o.loc))) {
            shard.local.replays.insert(super::loc_id(new_loc), served);
        }
        drop(shard);
        self.after_write();
        Ok((Some(ms_to_system_time(written.expires_at_ms)), written.seq))
    }

    fn advance_unsettled(&self, key: &[u8], version: u64, ttl: Duration) -> Result<(Advance, u64)> {
        let (ttl_ms, hash) = self.checked_window_write(key, ttl)?;
        let locked = self.index.shard(hash);
        let mut shard = locked.shard.lock();
        let now_ms = self.time.now_ms();
        let mut slot = None;
        let (state, old, seen_seq) = self.current(&mut shard, hash, key, now_ms, &mut slot)?;
        let (previous, expires_floor_ms) = match state {
            Current::Absent => (None, 0),
            Current::Completed(found) if found.header.request_hash == ADVANCE_MARK => {
                let current = <[u8; 8]>::try_from(found.value.as_slice())
                    .map(u64::from_le_bytes)
                    .map_err(|_| Error::InvalidArgument("the key's advance record holds no version"))?;
                if version <= current {
                    return Ok((Advance::Stale { current }, seen_seq));
                }
                (Some(current), found.header.expires_at_ms)
            }
            Current::InFlight(_) | Current::Completed(_) => {
                return Err(Error::InvalidArgument("advance on a key used by claims"));
            }
        };
        let value = version.to_le_bytes();
        let header = Header {
            kind: Kind::Complete,
            key_len: u16::try_from(key.len())
                .map_err(|_| Error::KeyTooLong { len: key.len(), max: u16::MAX.into() })?,
            value_len: 8, // a version: `u64::to_le_bytes`
            seq: 0,
            expires_at_ms: now_ms.saturating_add(ttl_ms).max(expires_floor_ms),
            claimed_at_ms: now_ms,
            lease_until_ms: now_ms,
            token: 0,
            incarnation: self.incarnation,
            request_hash: ADVANCE_MARK,
            written_at_ms: now_ms,
            lease_ms: 1,
        };
        let (written, new_loc) = self.append(header, key, &value, old)?;
        shard.set(hash, old.map(|o| o.loc), new_loc);
        drop(shard);
        self.after_write();
        Ok((Advance::Newer { previous }, written.seq))
    }
}
