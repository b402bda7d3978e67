//! Reading a key: its hash, the checks on what callers pass, finding its latest record (RAM index,
//! then sealed tables) and what state that record tells.

use crate::clock::ms_to_system_time;
use crate::error::{Error, Result};
use crate::hash::key_hash;
use crate::log::Loc;
use crate::log::record::Header;
use crate::log::segment::Segment;
use crate::log::segment_cache::SegmentCache;
use crate::types::Completed;

use super::{Inner, Shard};

impl Inner {
    #[inline]
    pub(super) fn key_hash(&self, key: &[u8]) -> u64 {
        key_hash(self.options.key_hash, &self.index_hash, key)
    }

    #[inline]
    pub(super) fn check_key(&self, key: &[u8]) -> Result<()> {
        if key.is_empty() {
            return Err(Error::EmptyKey);
        }
        if key.len() > self.options.max_key_len {
            return Err(Error::KeyTooLong { len: key.len(), max: self.options.max_key_len });
        }
        Ok(())
    }

    #[inline]
    pub(super) fn check_value(&self, value: &[u8]) -> Result<()> {
        if value.len() > self.options.max_outcome_len {
            return Err(Error::OutcomeTooLong { len: value.len(), max: self.options.max_outcome_len });
        }
        Ok(())
    }

    #[inline]
    pub(super) fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.commit.check()
    }

    /// Reads the latest record of `key` and its value into `slot`, confirmed against the
    /// stored key (and its CRC); drops index entries whose bucket is gone. `slot` is `None`
    /// afterwards when the key has no record (whatever it held before is cleared first: the
    /// search below stops at the first record it puts there).
    #[inline]
    pub(super) fn find(
        &self,
        shard: &mut Shard,
        hash: u64,
        key: &[u8],
        now_ms: u64,
        slot: &mut Option<Found>,
    ) -> Result<()> {
        *slot = None;
        // `None` when the segment is gone (its bucket was dropped, or has ended at `now_ms`);
        // `Some(Ok(true))` when the record at `loc` is the key's, now in `slot`.
        let probe = |loc: Loc, slot: &mut Option<Found>, segments: &mut SegmentCache| {
            self.log.with_segment_cached(segments, loc.segment, |s| -> Option<Result<bool>> {
                if s.header.bucket_end_ms <= now_ms {
                    // Every record in it has expired, and so has every older record of its keys
                    // (invariant 3): it answers nothing, and its bytes are not read. A writer in
                    // another process may be freeing them under a read-only view (a punched
                    // hole reads as zeros, which would fail the record's checks).
                    return None;
                }
                Some(self.read_found(s, loc, key, slot))
            })?
        };

        let mut gone: Option<Vec<Loc>> = None;
        let (candidates, local) = shard.candidates_and_local(hash);
        for loc in candidates {
            match probe(loc, slot, &mut local.segments) {
                None => gone.get_or_insert_with(Vec::new).push(loc),
                Some(Ok(true)) => break,
                Some(Ok(false)) => {}
                Some(Err(e)) => return Err(e),
            }
        }
        for loc in gone.into_iter().flatten() {
            shard.remove(hash, loc);
            shard.local.counters.keys_expired_total += 1;
        }
        if slot.is_some() {
            // Invariant: a key's entry in RAM is newer than any of its sealed entries.
            return Ok(());
        }
        // Not in RAM: its latest sealed record, if any (usually the filters say no). Tables
        // come newest first, so the first one holding the key holds its latest record.
        let segments = &mut shard.local.segments;
        self.sealed.visit(hash, &mut |loc| Ok(probe(loc, slot, segments).transpose()?.unwrap_or(false)))
    }

    /// Reads the record at `loc` of segment `s` into `slot` if it is `key`'s; true when it is.
    pub(super) fn read_found(&self, s: &Segment, loc: Loc, key: &[u8], slot: &mut Option<Found>) -> Result<bool> {
        let Some((header, value)) = s.probe_read(u64::from(loc.offset), key)? else {
            return Ok(false);
        };
        let old = Superseded { loc, padded_len: header.padded_len(), bucket_end_ms: s.header.bucket_end_ms };
        *slot = Some(Found { old, header, value });
        Ok(true)
    }

    /// The key's state at `now_ms` (its latest record read into `slot`), the record a new
    /// write supersedes, and that record's seq.
    #[inline]
    pub(super) fn current<'a>(
        &self,
        shard: &mut Shard,
        hash: u64,
        key: &[u8],
        now_ms: u64,
        slot: &'a mut Option<Found>,
    ) -> Result<(Current<'a>, Option<Superseded>, u64)> {
        self.find(shard, hash, key, now_ms, slot)?;
        let Some(found) = slot.as_mut() else {
            return Ok((Current::Absent, None, 0));
        };
        let (old, seq) = (found.old, found.header.seq);
        debug_assert!(seq > 0);
        let state = if found.header.expires_at_ms <= now_ms || found.header.kind.is_absent() {
            Current::Absent
        } else if found.header.kind.is_in_flight() {
            Current::InFlight(found)
        } else {
            Current::Completed(found)
        };
        Ok((state, Some(old), seq))
    }
}

#[inline]
pub(super) fn completed_from(header: &Header, outcome: Vec<u8>) -> Completed {
    Completed {
        outcome,
        completed_at: ms_to_system_time(header.written_at_ms),
        claimed_at: ms_to_system_time(header.claimed_at_ms),
        expires_at: ms_to_system_time(header.expires_at_ms),
    }
}

/// A key's latest record, which the record being written supersedes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Superseded {
    pub(super) loc: Loc,
    pub(super) padded_len: u64,
    /// End of the bucket of the segment holding it (read when it was found).
    pub(super) bucket_end_ms: u64,
}

/// A key's latest record as `find` read it: where it is, its header and its value.
pub(super) struct Found {
    pub(super) old: Superseded,
    pub(super) header: Header,
    pub(super) value: Vec<u8>,
}

/// The state of a key as its latest record tells it, at a given time. It borrows the record
/// from a slot of the caller's, so a replay's header and outcome are read into place once
/// instead of being moved through every layer between the segment and the answer.
pub(super) enum Current<'a> {
    Absent,
    /// The record; its value is the last checkpoint.
    InFlight(&'a mut Found),
    /// The record; its value is the outcome.
    Completed(&'a mut Found),
}
