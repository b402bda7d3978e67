//! The sharded in-memory index: the 64-bit hash of a key -> where its latest record lives.
//!
//! Only the location is kept (16 bytes a key plus table overhead); the key, its state and its
//! times are read from the record itself, so a hash hit is always confirmed against the stored
//! key and two keys that share a 64-bit hash stay two keys (the second goes to `spill`).
//!
//! The index knows locations, never files: what its user keeps beside each shard under the
//! same lock (the store's counters and segment handles) is the type parameter `L`.

pub mod slots;

use std::sync::Arc;

use crate::bytes::usize_from;
use crate::hash::{IdMap, Loc};
use crate::index::slots::{Slots, TableHint};
use crate::sync::{Condvar, Mutex};

/// Number of shards; a power of two. Enough that a shard's sweep after a bucket drop is short.
pub const SHARD_COUNT: usize = 256;

/// One shard: the primary table and the rare keys whose hash another key already uses.
///
/// `L` is what the index's user keeps beside each shard under the same lock (the store: its
/// per-shard counters and segment handles); the index itself knows locations, never files.
#[derive(Default)]
pub struct Shard<L> {
    main: Slots,
    spill: IdMap<u64, Vec<Loc>>,
    /// The user's data of this shard, guarded by the shard lock.
    pub local: L,
}

/// Every location in `main` and `spill` that may hold `hash`'s key, primary first.
fn locations<'a>(main: &'a Slots, spill: &'a IdMap<u64, Vec<Loc>>, hash: u64) -> impl Iterator<Item = Loc> + 'a {
    let spilled = if spill.is_empty() { None } else { spill.get(&hash) };
    main.get(hash).into_iter().chain(spilled.into_iter().flatten().copied())
}

impl<L> Shard<L> {
    /// Every location that may hold `hash`'s key, primary first.
    pub fn candidates(&self, hash: u64) -> impl Iterator<Item = Loc> + '_ {
        locations(&self.main, &self.spill, hash)
    }

    /// [`Shard::candidates`], with the shard's local data (to read them through).
    pub fn candidates_and_local(&mut self, hash: u64) -> (impl Iterator<Item = Loc> + '_, &mut L) {
        (locations(&self.main, &self.spill, hash), &mut self.local)
    }

    /// The location of `hash`'s primary entry, if any: where its record most likely lives.
    pub fn primary(&self, hash: u64) -> Option<Loc> {
        self.main.get(hash)
    }

    /// Points the key that lived at `old` (or a new key, when `old` is `None`) at `new`.
    pub fn set(&mut self, hash: u64, old: Option<Loc>, new: Loc) {
        debug_assert!(new.offset != 0, "no record starts at offset 0");
        let Some(primary) = self.main.get_mut(hash) else {
            // No key with this hash in RAM (so none spilled either).
            self.main.insert(hash, new);
            return;
        };
        if old == Some(*primary) {
            *primary = new;
            return;
        }
        // Another key holds the primary slot: this one lives (or goes) in the spill list.
        let list = self.spill.entry(hash).or_default();
        match old.and_then(|old| list.iter_mut().find(|l| **l == old)) {
            Some(slot) => *slot = new,
            None => list.push(new),
        }
    }

    /// Forgets `loc` (its segment was dropped), promoting a spilled key if one waits.
    pub fn remove(&mut self, hash: u64, loc: Loc) {
        if self.main.get(hash) == Some(loc) {
            self.main.remove(hash);
            self.promote(hash);
        } else if let Some(list) = self.spill.get_mut(&hash) {
            list.retain(|l| *l != loc);
            if list.is_empty() {
                self.spill.remove(&hash);
            }
        }
    }

    /// Drops every entry whose segment `is_live` rejects; returns how many went.
    pub fn retain_live(&mut self, is_live: impl Fn(u32) -> bool) -> usize {
        let before = self.len();
        self.spill.retain(|_, list| {
            list.retain(|l| is_live(l.segment));
            !list.is_empty()
        });
        let dropped = self.main.retain(|_, loc| is_live(loc.segment));
        if self.spill.is_empty() {
            return before - self.len();
        }
        for hash in dropped {
            self.promote(hash);
        }
        before - self.len()
    }

    /// After `hash`'s primary entry went: a spilled key with that hash, if any, takes it.
    fn promote(&mut self, hash: u64) {
        if let Some(list) = self.spill.get_mut(&hash) {
            if let Some(promoted) = list.pop() {
                self.main.insert(hash, promoted);
            }
            if list.is_empty() {
                self.spill.remove(&hash);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.main.len() + self.spill.values().map(Vec::len).sum::<usize>()
    }

    /// Gives memory back after many entries left (sealed or expired): a hash table keeps its
    /// capacity otherwise, and RAM per key would not fall.
    pub fn shrink(&mut self) {
        self.main.shrink();
        if self.spill.is_empty() {
            self.spill.shrink_to_fit();
        }
    }

    /// Every (hash, location) in the shard.
    pub fn entries(&self) -> Vec<(u64, Loc)> {
        let mut all: Vec<(u64, Loc)> = self.main.iter().collect();
        for (h, list) in &self.spill {
            all.extend(list.iter().map(|l| (*h, *l)));
        }
        all
    }
}

/// A shard behind its lock, with the condition variable that claim waiters sleep on.
pub struct LockedShard<L> {
    pub shard: Mutex<Shard<L>>,
    pub changed: Condvar,
    /// Where the shard's primary table lives, to prefetch a slot without the lock.
    pub slots_hint: Arc<TableHint>,
}

impl<L: Default> Default for LockedShard<L> {
    fn default() -> Self {
        let shard = Shard::default();
        let slots_hint = shard.main.hint();
        LockedShard { shard: Mutex::new(shard), changed: Condvar::default(), slots_hint }
    }
}

/// The whole index.
pub struct Index<L> {
    shards: Box<[LockedShard<L>]>,
}

impl<L: Default> Default for Index<L> {
    fn default() -> Self {
        Index { shards: (0..SHARD_COUNT).map(|_| LockedShard::default()).collect() }
    }
}

impl<L> Index<L> {
    /// Starts loading `hash`'s index slot into cache, without its shard's lock (a hint).
    pub fn prefetch_slot(&self, hash: u64) {
        self.shard(hash).slots_hint.prefetch(hash);
    }

    pub fn shard(&self, hash: u64) -> &LockedShard<L> {
        &self.shards[shard_of(hash)]
    }

    /// The number of `hash`'s shard (recovery splits its merge between threads by it: a key's
    /// records all go to the thread of its shard).
    pub fn shard_number(&self, hash: u64) -> usize {
        shard_of(hash)
    }

    /// (longest, mean) displacement of the primary tables' entries from their home slots:
    /// how many slots past its home a lookup of a stored key walks.
    pub fn probe_stats(&self) -> (usize, f64) {
        let (mut longest, mut total, mut entries) = (0, 0usize, 0usize);
        for locked in self.shards() {
            let shard = locked.shard.lock();
            for displacement in shard.main.displacements() {
                longest = longest.max(displacement);
                total += displacement;
                entries += 1;
            }
        }
        (longest, if entries == 0 { 0.0 } else { total as f64 / entries as f64 })
    }

    /// Shard number `number` (0..`SHARD_COUNT`).
    pub fn shard_at(&self, number: usize) -> &LockedShard<L> {
        &self.shards[number]
    }

    pub fn shards(&self) -> impl Iterator<Item = &LockedShard<L>> {
        self.shards.iter()
    }
}

/// The shard of `hash`: its top bits (`PremixedHasher` and the slot tables spread the rest
/// inside it).
fn shard_of(hash: u64) -> usize {
    usize_from(hash >> (64 - SHARD_COUNT.trailing_zeros())) & (SHARD_COUNT - 1)
}

/// The hashes shard `number` holds: a contiguous range (shards are by a hash's top bits).
pub fn shard_hash_range(number: usize) -> std::ops::RangeInclusive<u64> {
    let bits = SHARD_COUNT.trailing_zeros();
    let start = (number as u64) << (64 - bits);
    start..=start | (u64::MAX >> bits)
}

/// Where the index places `hash`: (shard, home slot in a shard table of `slots` slots, a power
/// of two). Two keys whose hashes share both walk one probe run.
pub fn place_in_index(hash: u64, slots: usize) -> (usize, usize) {
    (shard_of(hash), crate::index::slots::home_slot(hash, slots))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(segment: u32, offset: u32) -> Loc {
        Loc { segment, offset }
    }

    #[test]
    fn colliding_keys_both_kept_and_promoted_on_removal() {
        let mut shard = Shard::<()>::default();
        shard.set(7, None, loc(1, 64));
        shard.set(7, None, loc(1, 200));
        assert_eq!(shard.candidates(7).collect::<Vec<_>>(), vec![loc(1, 64), loc(1, 200)]);
        shard.set(7, Some(loc(1, 200)), loc(2, 64));
        assert_eq!(shard.candidates(7).collect::<Vec<_>>(), vec![loc(1, 64), loc(2, 64)]);
        shard.remove(7, loc(1, 64));
        assert_eq!(shard.candidates(7).collect::<Vec<_>>(), vec![loc(2, 64)]);
        assert_eq!(shard.len(), 1);
    }

    #[test]
    fn retain_live_drops_dead_segments() {
        let mut shard = Shard::<()>::default();
        shard.set(1, None, loc(1, 64));
        shard.set(1, None, loc(2, 64));
        shard.set(2, None, loc(1, 128));
        assert_eq!(shard.retain_live(|s| s == 2), 2);
        assert_eq!(shard.candidates(1).collect::<Vec<_>>(), vec![loc(2, 64)]);
        assert_eq!(shard.candidates(2).count(), 0);
    }
}
