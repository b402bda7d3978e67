//! Batches (`claim_many`, `complete_many`): windows of keys warmed together, each answered as a
//! single call would be, and one wait for durability.

use std::collections::HashSet;

use crate::error::Result;
use crate::log::record::Kind;
use crate::options::ClaimOptions;
use crate::types::{Claim, ClaimToken};

use super::Inner;
use super::claim::Tally;

impl Inner {
    /// Claims a batch (see `in_windows`); under `Sync` it waits once for the last record any
    /// answer rests on.
    pub(super) fn claim_many<K: AsRef<[u8]>, R: AsRef<[u8]>>(
        &self,
        items: &[(K, R)],
        options: &ClaimOptions,
    ) -> Vec<Result<Claim>> {
        // With `wait`, a key this batch already acquired must not wait: it would wait on the
        // batch's own claim, whose token the caller does not have yet, until its lease ran out.
        let waits = options.wait.is_some();
        let no_wait = ClaimOptions { wait: None, ..options.clone() };
        let mut acquired_here: HashSet<&[u8]> = HashSet::new();
        self.in_windows(
            items,
            |(key, _)| key.as_ref(),
            |(key, request), hash| {
                let (key, request) = (key.as_ref(), request.as_ref());
                let options = if waits && !acquired_here.contains(key) { options } else { &no_wait };
                let (answer, seq) = self.claim_unsettled(key, hash, request, options, Tally::default())?;
                if waits && matches!(answer, Claim::Acquired(_)) {
                    acquired_here.insert(key);
                }
                Ok((answer, seq))
            },
        )
    }

    /// Completes a batch of held claims (see `in_windows`); under `Sync` it waits once.
    pub(super) fn complete_many<O: AsRef<[u8]>>(&self, items: &[(&ClaimToken, O)]) -> Vec<Result<()>> {
        // A `StaleToken` is an answer that rests on a record like any other: it stays inside
        // the `Ok` until the batch settles, so a failed sync turns it into `Poisoned` too.
        self.in_windows(
            items,
            |(token, _)| token.key(),
            |(token, outcome), hash| self.finish_unsettled(token, hash, Kind::Complete, outcome.as_ref()),
        )
        .into_iter()
        .map(|answer| answer.and_then(|settled| settled))
        .collect()
    }

    /// Runs a batch a window of keys at a time, its memory misses pipelined: while `each`
    /// answers one window's items (in order, with their key hashes, without waiting for
    /// durability, saying which seq its answer rests on), the next window's records and the
    /// window after that's index slots are already loading. The batch then settles once
    /// (`settle_batch`).
    ///
    /// Why two windows ahead: a slot must have arrived before the record it points at can be
    /// asked for, and each miss costs more than a window's worth of work when it waits alone
    /// (random keys over GiBs of records: two dependent misses per key).
    pub(super) fn in_windows<'a, T, A>(
        &self,
        items: &'a [T],
        key_of: impl Fn(&T) -> &[u8],
        mut each: impl FnMut(&'a T, u64) -> Result<(A, u64)>,
    ) -> Vec<Result<A>> {
        let mut answers = Vec::with_capacity(items.len());
        let hashes: Vec<u64> = items.iter().map(|item| self.key_hash(key_of(item))).collect();
        let windows: Vec<&[u64]> = hashes.chunks(BATCH_WINDOW).collect();
        for window in windows.iter().take(2) {
            self.prefetch_slots(window);
        }
        if let Some(first) = windows.first() {
            self.prefetch_records(first);
        }
        for (at, (window, window_items)) in windows.iter().zip(items.chunks(BATCH_WINDOW)).enumerate() {
            if let Some(after_next) = windows.get(at + 2) {
                self.prefetch_slots(after_next);
            }
            if let Some(next) = windows.get(at + 1) {
                self.prefetch_records(next);
            }
            for (&hash, item) in window.iter().zip(window_items) {
                answers.push(each(item, hash));
            }
        }
        self.settle_batch(answers)
    }

    /// Starts loading the index slots of `hashes` (a hint: takes no lock).
    fn prefetch_slots(&self, hashes: &[u64]) {
        for &hash in hashes {
            self.index.prefetch_slot(hash);
        }
    }

    /// Starts loading the records the index points at for `hashes`: one shard lock each to
    /// read the slot (best started after [`Inner::prefetch_slots`] of the same keys), then
    /// every prefetch at once. A lock is an atomic read-modify-write, which waits for the
    /// loads before it: taken between two prefetches, it would make them wait on each other.
    fn prefetch_records(&self, hashes: &[u64]) {
        let mut locs = [None; BATCH_WINDOW];
        for (loc, &hash) in locs.iter_mut().zip(hashes) {
            *loc = self.index.shard(hash).shard.lock().primary(hash);
        }
        self.log.prefetch_records(locs.iter().flatten());
    }

    /// Under `Sync`, waits once for everything a batch wrote or read (each answer with the
    /// seq it rests on). If that fails, every answer resting on a record that is not durable
    /// becomes the error: its record may be lost at a power cut. Answers read from records
    /// that were already durable stand.
    pub(super) fn settle_batch<T>(&self, answers: Vec<Result<(T, u64)>>) -> Vec<Result<T>> {
        if answers.is_empty() {
            // Nothing was answered, so nothing rests on a record or on the store's time.
            return Vec::new();
        }
        let through = answers.iter().filter_map(|a| a.as_ref().ok().map(|(_, seq)| *seq)).max().unwrap_or(0);
        let failed = self.settle(through).err();
        let durable_seq = self.commit.durable_seq();
        // Every answer also rests on the store's time (a key read as expired): when the time
        // it was given at is not durable either, no answer stands.
        let time_durable = self.log.time_floor().durable_ms() >= self.time.latest_ms();
        let error = failed.map(|failed| self.commit.check().err().unwrap_or(failed));
        answers
            .into_iter()
            .map(|answer| match (answer, &error) {
                (Ok((_, seq)), Some(error)) if seq > durable_seq || !time_durable => Err(error.clone()),
                (answer, _) => answer.map(|(answer, _)| answer),
            })
            .collect()
    }
}

/// Keys a batch (`claim_many`, `complete_many`) warms together: enough memory misses in flight
/// to cover their latency, few enough that the first key's lines are still cached at its turn.
pub(super) const BATCH_WINDOW: usize = 16;
