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

    /// Runs a batch a window of keys at a time: warms the window (`warm`), then calls `each`
    /// on its items in order with their key hashes; `each` answers without waiting for
    /// durability and says which seq its answer rests on. The batch then settles once
    /// (`settle_batch`).
    pub(super) fn in_windows<'a, T, A>(
        &self,
        items: &'a [T],
        key_of: impl Fn(&T) -> &[u8],
        mut each: impl FnMut(&'a T, u64) -> Result<(A, u64)>,
    ) -> Vec<Result<A>> {
        let mut answers = Vec::with_capacity(items.len());
        let mut hashes = [0u64; BATCH_WINDOW];
        for window in items.chunks(BATCH_WINDOW) {
            for (hash, item) in hashes.iter_mut().zip(window) {
                *hash = self.key_hash(key_of(item));
            }
            self.warm(&hashes[..window.len()]);
            for (&hash, item) in hashes.iter().zip(window) {
                answers.push(each(item, hash));
            }
        }
        self.settle_batch(answers)
    }

    /// Starts loading a window of keys' index slots, then (one shard lock each) the records
    /// they point at, so the misses of the whole window overlap.
    pub(super) fn warm(&self, hashes: &[u64]) {
        for &hash in hashes {
            self.index.prefetch_slot(hash);
        }
        for &hash in hashes {
            let primary = self.index.shard(hash).shard.lock().primary(hash);
            if let Some(loc) = primary {
                self.log.with_segment(loc.segment, |s| s.prefetch(u64::from(loc.offset)));
            }
        }
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
