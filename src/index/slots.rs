//! The index's primary table: key hash -> record location, open addressing with linear
//! probing over 16-byte slots that hold the full hash and the location side by side.
//!
//! A lookup reads one cache line in the common case: the slot it lands on holds the hash to
//! compare and the answer (a general-purpose hash map keeps control bytes and entries in
//! separate arrays, so a hit costs two cache misses over an index larger than the caches).
//! Deletion shifts later entries back instead of leaving tombstones, so probe runs stay short
//! however many keys expire. A slot whose offset is 0 is empty: no record starts at offset 0
//! (every segment file begins with its header).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::bytes::usize_from;
use crate::hash::{Loc, mix};

/// One slot: a key's full 64-bit hash and where its latest record lives.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Slot {
    hash: u64,
    loc: Loc,
}

const EMPTY: Slot = Slot { hash: 0, loc: Loc { segment: 0, offset: 0 } };

impl Slot {
    fn is_empty(&self) -> bool {
        self.loc.offset == 0
    }
}

/// The table grows when it would pass 3/4 full, so an absent key's probe run stays short.
const LOAD_NUM: usize = 3;
const LOAD_DEN: usize = 4;
/// Smallest table allocated.
const MIN_CAPACITY: usize = 16;

/// The slot where `hash` starts probing in a table of `slots` slots (a power of two). The hash
/// was chosen by the caller (possibly by a weak user-supplied function, and its top bits already
/// picked the shard): mix it first.
pub fn home_slot(hash: u64, slots: usize) -> usize {
    usize_from(mix(hash)) & slots.wrapping_sub(1)
}

/// Hash -> location, at most one location per hash (the index keeps colliding keys apart).
#[derive(Default)]
pub struct Slots {
    slots: Box<[Slot]>,
    len: usize,
    /// Where `slots` lives, for prefetching without the shard lock.
    hint: Arc<TableHint>,
}

/// Where a table's slots live, readable without the lock that guards the table: a batch of
/// claims prefetches every key's slot before it takes any lock. Only ever a hint: while the
/// table is rebuilt it may name the old (freed) array, or mix the old base with the new size;
/// prefetching such an address is harmless (see `prefetch_read`), so no ordering is needed.
#[derive(Default)]
pub struct TableHint {
    base: AtomicUsize,
    mask: AtomicUsize,
}

impl TableHint {
    /// Starts loading the slot where `hash`'s probe begins.
    pub fn prefetch(&self, hash: u64) {
        let base = self.base.load(Ordering::Relaxed);
        if base == 0 {
            return;
        }
        let index = usize_from(mix(hash)) & self.mask.load(Ordering::Relaxed);
        let at = base.wrapping_add(index.wrapping_mul(std::mem::size_of::<Slot>()));
        crate::prefetch::prefetch_read(std::ptr::without_provenance(at));
    }
}

impl Slots {
    pub fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Where `hash` starts probing.
    fn home(&self, hash: u64) -> usize {
        home_slot(hash, self.slots.len())
    }

    /// How far each entry lies past its home slot (the slots a lookup of it walks past).
    pub fn displacements(&self) -> impl Iterator<Item = usize> + '_ {
        let mask = self.slots.len().wrapping_sub(1);
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .map(move |(i, s)| i.wrapping_sub(self.home(s.hash)) & mask)
    }

    /// The slot holding `hash`, or the empty slot that ends its probe run.
    fn probe(&self, hash: u64) -> Result<usize, usize> {
        debug_assert!(self.slots.len().is_power_of_two() && self.len < self.slots.len());
        let mask = self.slots.len() - 1;
        let mut i = self.home(hash);
        loop {
            let slot = &self.slots[i];
            if slot.is_empty() {
                return Err(i);
            }
            if slot.hash == hash {
                return Ok(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// The table's location, kept current as the table is rebuilt.
    pub fn hint(&self) -> Arc<TableHint> {
        self.hint.clone()
    }

    pub fn get(&self, hash: u64) -> Option<Loc> {
        if self.len == 0 {
            return None;
        }
        self.probe(hash).ok().map(|i| self.slots[i].loc)
    }

    /// `hash`'s location, to change in place (the new one must not have offset 0).
    pub fn get_mut(&mut self, hash: u64) -> Option<&mut Loc> {
        if self.len == 0 {
            return None;
        }
        let i = self.probe(hash).ok()?;
        Some(&mut self.slots[i].loc)
    }

    /// Sets `hash`'s location, replacing the one it had; returns that one.
    pub fn insert(&mut self, hash: u64, loc: Loc) -> Option<Loc> {
        debug_assert!(loc.offset != 0, "offset 0 marks an empty slot; no record starts there");
        if (self.len + 1) * LOAD_DEN > self.slots.len() * LOAD_NUM {
            self.resize((self.slots.len() * 2).max(MIN_CAPACITY));
        }
        match self.probe(hash) {
            Ok(i) => Some(std::mem::replace(&mut self.slots[i].loc, loc)),
            Err(i) => {
                self.slots[i] = Slot { hash, loc };
                self.len += 1;
                None
            }
        }
    }

    /// Forgets `hash`; returns its location.
    pub fn remove(&mut self, hash: u64) -> Option<Loc> {
        if self.len == 0 {
            return None;
        }
        let found = self.probe(hash).ok()?;
        let removed = self.slots[found].loc;
        self.close_gap(found);
        Some(removed)
    }

    /// Empties slot `hole` and shifts later entries of its probe run back into place, so no
    /// lookup ever stops early at a hole inside its run.
    fn close_gap(&mut self, mut hole: usize) {
        let mask = self.slots.len() - 1;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let slot = self.slots[j];
            if slot.is_empty() {
                break;
            }
            let home = self.home(slot.hash);
            // The entry at `j` may move to `hole` when `hole` lies on its way from `home`.
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.slots[hole] = slot;
                hole = j;
            }
        }
        self.slots[hole] = EMPTY;
        self.len -= 1;
    }

    /// Keeps the entries `keep` accepts; returns the hashes of the ones dropped.
    pub fn retain(&mut self, mut keep: impl FnMut(u64, Loc) -> bool) -> Vec<u64> {
        let mut dropped = Vec::new();
        if self.len == 0 {
            return dropped;
        }
        // The kept entries are only copied out once the first entry is dropped: a sweep that
        // drops nothing (most shards, most of the time) leaves the table alone.
        let mut kept: Option<Vec<Slot>> = None;
        for (i, slot) in self.slots.iter().enumerate().filter(|(_, s)| !s.is_empty()) {
            if keep(slot.hash, slot.loc) {
                if let Some(kept) = kept.as_mut() {
                    kept.push(*slot);
                }
            } else {
                dropped.push(slot.hash);
                kept.get_or_insert_with(|| self.slots[..i].iter().filter(|s| !s.is_empty()).copied().collect());
            }
        }
        if let Some(kept) = kept {
            let count = kept.len();
            self.rebuild(kept.into_iter(), count, self.slots.len());
        }
        dropped
    }

    /// Gives memory back when the table is under a quarter full.
    pub fn shrink(&mut self) {
        if self.slots.len() > MIN_CAPACITY && self.len * 4 < self.slots.len() {
            self.resize(Self::capacity_for(self.len));
        }
    }

    /// Smallest power-of-two capacity that holds `len` entries within the load limit.
    fn capacity_for(len: usize) -> usize {
        if len == 0 {
            return 0;
        }
        (len * LOAD_DEN).div_ceil(LOAD_NUM).next_power_of_two().max(MIN_CAPACITY)
    }

    fn resize(&mut self, capacity: usize) {
        // Straight from the old array into the new: no list of the entries in between.
        let old = std::mem::take(&mut self.slots);
        let count = self.len;
        self.rebuild(old.iter().filter(|s| !s.is_empty()).copied(), count, capacity);
    }

    /// Replaces the table with one of `capacity` (at least enough for `count`) holding
    /// `entries`, `count` of them.
    fn rebuild(&mut self, entries: impl Iterator<Item = Slot>, count: usize, capacity: usize) {
        let capacity = capacity.max(Self::capacity_for(count));
        self.slots = vec![EMPTY; capacity].into_boxed_slice();
        // An empty table (shrunk to nothing) has no slot to prefetch: base 0 turns the hint off.
        let base = if capacity == 0 { 0 } else { self.slots.as_ptr().addr() };
        self.hint.base.store(base, Ordering::Relaxed);
        self.hint.mask.store(capacity.saturating_sub(1), Ordering::Relaxed);
        self.len = 0;
        for slot in entries {
            if let Err(i) = self.probe(slot.hash) {
                self.slots[i] = slot;
                self.len += 1;
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, Loc)> + '_ {
        self.slots.iter().filter(|s| !s.is_empty()).map(|s| (s.hash, s.loc))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn loc(n: u32) -> Loc {
        Loc { segment: n % 7 + 1, offset: 64 + n }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u32),
        Remove(u64),
        RetainOdd,
        Shrink,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few distinct hashes, some sharing a home slot, so runs overlap and wrap around.
        let hash = prop_oneof![0u64..64, (0u64..8).prop_map(|h| h << 60), any::<u64>()];
        prop_oneof![
            6 => (hash.clone(), any::<u32>()).prop_map(|(h, n)| Op::Insert(h, n % 1_000_000)),
            3 => hash.prop_map(Op::Remove),
            1 => Just(Op::RetainOdd),
            1 => Just(Op::Shrink),
        ]
    }

    #[test]
    fn the_hint_follows_the_table_through_growth_and_shrinking() {
        let mut slots = Slots::default();
        let hint = slots.hint();
        let points_at_table = |slots: &Slots| {
            hint.base.load(Ordering::Relaxed) == slots.slots.as_ptr().addr()
                && hint.mask.load(Ordering::Relaxed) == slots.slots.len() - 1
        };
        for i in 1..=1_000u64 {
            slots.insert(i, Loc { segment: 1, offset: 64 * i as u32 });
            assert!(points_at_table(&slots), "after insert {i}");
        }
        slots.retain(|hash, _| hash % 10 == 0);
        slots.shrink();
        assert!(points_at_table(&slots), "after shrinking to {} slots", slots.capacity());
        // Emptied and shrunk to nothing (as after a bucket drop that took every key of a
        // shard): the hint turns off instead of naming a slot.
        slots.retain(|_, _| false);
        slots.shrink();
        assert_eq!(slots.capacity(), 0);
        assert_eq!(hint.base.load(Ordering::Relaxed), 0, "an empty table has no slot to prefetch");
        hint.prefetch(42);
        slots.insert(7, Loc { segment: 1, offset: 64 });
        assert!(points_at_table(&slots), "after growing again");
    }

    proptest! {
        #[test]
        fn behaves_like_a_hash_map(ops in prop::collection::vec(op(), 1..400)) {
            let mut slots = Slots::default();
            let mut model: HashMap<u64, Loc> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(h, n) => prop_assert_eq!(slots.insert(h, loc(n)), model.insert(h, loc(n))),
                    Op::Remove(h) => prop_assert_eq!(slots.remove(h), model.remove(&h)),
                    Op::RetainOdd => {
                        let mut dropped = slots.retain(|_, l| l.offset % 2 == 1);
                        let mut expected: Vec<u64> =
                            model.iter().filter(|(_, l)| l.offset % 2 == 0).map(|(h, _)| *h).collect();
                        model.retain(|_, l| l.offset % 2 == 1);
                        dropped.sort_unstable();
                        expected.sort_unstable();
                        prop_assert_eq!(dropped, expected);
                    }
                    Op::Shrink => slots.shrink(),
                }
                prop_assert_eq!(slots.len(), model.len());
                for (h, l) in &model {
                    prop_assert_eq!(slots.get(*h), Some(*l));
                }
                prop_assert!(slots.capacity() == 0 || slots.len() * LOAD_DEN <= slots.capacity() * LOAD_NUM);
            }
            let mut all: Vec<(u64, Loc)> = slots.iter().collect();
            let mut expected: Vec<(u64, Loc)> = model.into_iter().collect();
            all.sort_unstable_by_key(|(h, _)| *h);
            expected.sort_unstable_by_key(|(h, _)| *h);
            prop_assert_eq!(all, expected);
        }
    }

    #[test]
    fn a_removal_inside_a_wrapped_run_keeps_every_later_key_reachable() {
        let mut slots = Slots::default();
        // Hashes with the same home slot fill one run that wraps past the table's end.
        let same_home: Vec<u64> =
            (0u64..1 << 20).filter(|h| mix(*h) as usize & (MIN_CAPACITY - 1) == MIN_CAPACITY - 2).take(5).collect();
        for (n, h) in same_home.iter().enumerate() {
            slots.insert(*h, loc(n as u32));
        }
        assert_eq!(slots.capacity(), MIN_CAPACITY);
        assert_eq!(slots.remove(same_home[1]), Some(loc(1)));
        for (n, h) in same_home.iter().enumerate().filter(|(n, _)| *n != 1) {
            assert_eq!(slots.get(*h), Some(loc(n as u32)), "key {n} lost after a removal before it");
        }
        assert_eq!(slots.get(same_home[1]), None);
    }
}
