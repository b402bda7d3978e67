//! A map read on every claim and changed rarely (the live segments by id: a segment is
//! created, or a bucket is dropped).
//!
//! One `RwLock` around one map would make every reader write the lock's reader count, one
//! cache line that then moves between every core doing claims. So the map is kept in
//! `STRIPES` copies, each behind its own lock on its own cache lines: a thread reads the copy
//! of its stripe (given out round-robin as threads first read), and a change is made to every
//! copy, under all their write locks at once, taken in order.

use std::cell::Cell;
#[cfg(not(loom))]
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;

use parking_lot::RwLock;

use crate::hash::IdMap;

/// Copies of the map: more than the cores of most machines that run a store. Each costs a
/// copy of a map of at most a few hundred entries.
const STRIPES: usize = 16;

/// One copy, alone on its cache lines (two of them: adjacent-line prefetch pairs lines).
#[repr(align(128))]
struct Stripe<V>(RwLock<IdMap<u32, V>>);

pub struct StripedMap<V> {
    stripes: Box<[Stripe<V>]>,
}

/// The stripe to give the next thread that reads for the first time.
#[cfg(not(loom))]
static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

#[cfg(not(loom))]
thread_local! {
    /// This thread's stripe; `STRIPES` until the thread first reads. A constant initializer
    /// makes the per-read access a plain thread-local load, without lazy-init bookkeeping.
    static STRIPE: Cell<usize> = const { Cell::new(STRIPES) };
}

/// This thread's stripe, given out on first use.
#[cfg(not(loom))]
#[inline]
fn stripe() -> usize {
    STRIPE.with(|stripe| {
        let mine = stripe.get();
        if mine < STRIPES {
            return mine;
        }
        let given = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
        stripe.set(given);
        given
    })
}

/// Under loom, every modelled thread runs on one OS thread: each gets its stripe from loom's
/// thread locals instead, given out in the order the model's threads first ask (the same in
/// every execution loom replays).
#[cfg(loom)]
fn stripe() -> usize {
    loom::lazy_static! {
        static ref NEXT: loom::sync::atomic::AtomicUsize = loom::sync::atomic::AtomicUsize::new(0);
    }
    loom::thread_local! {
        static STRIPE: Cell<usize> = Cell::new(STRIPES);
    }
    STRIPE.with(|stripe| {
        if stripe.get() == STRIPES {
            stripe.set(NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES);
        }
        stripe.get()
    })
}

impl<V: Clone> StripedMap<V> {
    pub fn new(map: IdMap<u32, V>) -> Self {
        StripedMap { stripes: (0..STRIPES).map(|_| Stripe(RwLock::new(map.clone()))).collect() }
    }

    /// Runs `f` on the map, read-locked (this thread's copy).
    #[inline]
    pub fn read<R>(&self, f: impl FnOnce(&IdMap<u32, V>) -> R) -> R {
        f(&self.stripes[stripe()].0.read())
    }

    /// Runs `change` on every copy, with all of them write-locked at once (no reader sees two
    /// copies disagree); returns what it returned for the first copy.
    pub fn change<R>(&self, mut change: impl FnMut(&mut IdMap<u32, V>) -> R) -> R {
        let mut locked: Vec<_> = self.stripes.iter().map(|s| s.0.write()).collect();
        let (first, rest) = locked.split_at_mut(1);
        let answer = change(&mut first[0]);
        for map in rest {
            change(map);
        }
        answer
    }
}

const _: () = assert!(STRIPES > 0);

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// What every one of `2 * STRIPES` fresh threads (so every stripe) reads at `id`.
    fn read_everywhere(map: &Arc<StripedMap<u64>>, id: u32) -> Vec<Option<u64>> {
        let readers: Vec<_> = (0..2 * STRIPES)
            .map(|_| {
                let map = map.clone();
                std::thread::spawn(move || map.read(|m| m.get(&id).copied()))
            })
            .collect();
        readers.into_iter().map(|r| r.join().unwrap()).collect()
    }

    #[test]
    fn a_change_reaches_the_copy_of_every_stripe() {
        let map = Arc::new(StripedMap::new([(1, 10)].into_iter().collect()));
        assert!(read_everywhere(&map, 1).iter().all(|v| *v == Some(10)));
        assert_eq!(map.change(|m| m.insert(2, 20)), None);
        assert!(read_everywhere(&map, 2).iter().all(|v| *v == Some(20)));
        assert_eq!(map.change(|m| m.remove(&1)), Some(10));
        assert!(read_everywhere(&map, 1).iter().all(Option::is_none));
        assert_eq!(map.read(|m| m.len()), 1);
    }
}
