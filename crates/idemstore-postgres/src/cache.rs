//! The local replay cache: completed outcomes kept in this replica's memory, so a replay is
//! answered without a round trip (see the crate docs for the trade-off).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use idemstore::Completed;

/// Bounds of the local replay cache ([`PgOptions::replay_cache`](crate::PgOptions)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayCacheLimits {
    /// Most entries kept.
    pub max_entries: usize,
    /// Most bytes kept (keys plus outcomes, roughly).
    pub max_bytes: usize,
}

impl Default for ReplayCacheLimits {
    fn default() -> Self {
        ReplayCacheLimits { max_entries: 100_000, max_bytes: 64 << 20 }
    }
}

/// What a cached key answers.
pub(crate) enum Cached {
    /// The stored outcome (the request hash matched).
    Replay(Completed),
    /// The key was completed for another request.
    Mismatch,
}

struct Slot {
    request_hash: u128,
    completed: Completed,
    expires_at_ms: i64,
    /// Insertion number: the order queue holds stale entries for keys replaced since.
    generation: u64,
}

struct Shard {
    map: HashMap<Vec<u8>, Slot>,
    /// Keys in insertion order (oldest first): with similar TTLs the oldest also expires first,
    /// so evicting from the front evicts expired entries first.
    order: VecDeque<(Vec<u8>, u64)>,
    bytes: usize,
}

const SHARDS: usize = 16;

pub(crate) struct ReplayCache {
    shards: Vec<Mutex<Shard>>,
    limits: ReplayCacheLimits,
    next_generation: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

fn slot_bytes(key: &[u8], completed: &Completed) -> usize {
    key.len() * 2 + completed.outcome.len() + 96
}

impl ReplayCache {
    pub(crate) fn new(limits: ReplayCacheLimits) -> ReplayCache {
        let shards =
            (0..SHARDS).map(|_| Mutex::new(Shard { map: HashMap::new(), order: VecDeque::new(), bytes: 0 })).collect();
        ReplayCache {
            shards,
            limits,
            next_generation: AtomicU64::new(1),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &[u8]) -> std::sync::MutexGuard<'_, Shard> {
        let i = (xxhash_rust::xxh3::xxh3_64(key) as usize) % SHARDS;
        // A panic while a shard was held left a cache that is still consistent enough to read
        // (every change is a plain insert or remove): keep using it.
        self.shards[i].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The answer for `key` claimed with `request_hash` at `now_ms` (the database's time as
    /// this replica estimates it), when the cache holds it and it lives beyond `margin_ms`.
    pub(crate) fn lookup(&self, key: &[u8], request_hash: u128, now_ms: i64, margin_ms: i64) -> Option<Cached> {
        let shard = self.shard(key);
        let answer = match shard.map.get(key) {
            Some(slot) if slot.expires_at_ms > now_ms.saturating_add(margin_ms) => {
                if slot.request_hash == request_hash {
                    Some(Cached::Replay(slot.completed.clone()))
                } else {
                    Some(Cached::Mismatch)
                }
            }
            _ => None,
        };
        drop(shard);
        let counter = if answer.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        answer
    }

    pub(crate) fn insert(&self, key: &[u8], request_hash: u128, completed: Completed, expires_at_ms: i64, now_ms: i64) {
        let per_shard_entries = (self.limits.max_entries / SHARDS).max(1);
        let per_shard_bytes = (self.limits.max_bytes / SHARDS).max(1);
        let bytes = slot_bytes(key, &completed);
        if bytes > per_shard_bytes {
            return;
        }
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let mut shard = self.shard(key);
        if let Some(old) = shard.map.remove(key) {
            shard.bytes -= slot_bytes(key, &old.completed);
        }
        shard.bytes += bytes;
        shard.map.insert(key.to_vec(), Slot { request_hash, completed, expires_at_ms, generation });
        shard.order.push_back((key.to_vec(), generation));
        // Evict from the oldest: expired entries first (they sit at the front when TTLs are
        // alike), then the oldest live ones while over a bound.
        while let Some((front, front_generation)) = shard.order.front() {
            let over = shard.map.len() > per_shard_entries || shard.bytes > per_shard_bytes;
            let live = shard.map.get(front).filter(|slot| slot.generation == *front_generation);
            let expired = live.is_some_and(|slot| slot.expires_at_ms <= now_ms);
            let queue_bloated = shard.order.len() > 2 * shard.map.len() + 16;
            if !(over || expired || live.is_none() && queue_bloated) {
                break;
            }
            let Some((front, front_generation)) = shard.order.pop_front() else { break };
            if shard.map.get(&front).is_some_and(|slot| slot.generation == front_generation)
                && let Some(slot) = shard.map.remove(&front)
            {
                shard.bytes -= slot_bytes(&front, &slot.completed);
            }
        }
    }

    pub(crate) fn invalidate(&self, key: &[u8]) {
        let mut shard = self.shard(key);
        if let Some(old) = shard.map.remove(key) {
            shard.bytes -= slot_bytes(key, &old.completed);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).map.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn done(outcome: &[u8]) -> Completed {
        Completed {
            outcome: outcome.to_vec(),
            completed_at: UNIX_EPOCH + Duration::from_secs(2),
            claimed_at: UNIX_EPOCH + Duration::from_secs(1),
            expires_at: UNIX_EPOCH + Duration::from_secs(100),
        }
    }

    #[test]
    fn a_cached_key_replays_for_its_request_and_mismatches_for_another() {
        let cache = ReplayCache::new(ReplayCacheLimits::default());
        cache.insert(b"k", 7, done(b"out"), 100_000, 0);
        assert!(matches!(cache.lookup(b"k", 7, 0, 1_000), Some(Cached::Replay(d)) if d.outcome == b"out"));
        assert!(matches!(cache.lookup(b"k", 8, 0, 1_000), Some(Cached::Mismatch)));
        assert!(cache.lookup(b"other", 7, 0, 1_000).is_none());
        assert_eq!((cache.hits.load(Ordering::Relaxed), cache.misses.load(Ordering::Relaxed)), (2, 1));
    }

    #[test]
    fn an_entry_is_not_answered_within_the_margin_of_its_expiry() {
        let cache = ReplayCache::new(ReplayCacheLimits::default());
        cache.insert(b"k", 7, done(b"out"), 10_000, 0);
        assert!(cache.lookup(b"k", 7, 8_999, 1_000).is_some());
        assert!(cache.lookup(b"k", 7, 9_000, 1_000).is_none(), "expiring within the margin: ask the database");
        assert!(cache.lookup(b"k", 7, 10_000, 0).is_none(), "expired");
    }

    #[test]
    fn invalidate_forgets_a_key() {
        let cache = ReplayCache::new(ReplayCacheLimits::default());
        cache.insert(b"k", 7, done(b"out"), 100_000, 0);
        cache.invalidate(b"k");
        assert!(cache.lookup(b"k", 7, 0, 0).is_none());
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn the_entry_and_byte_bounds_hold_and_the_oldest_go_first() {
        // One shard's share is max / 16: give every shard room for 4 entries.
        let cache = ReplayCache::new(ReplayCacheLimits { max_entries: 4 * SHARDS, max_bytes: 1 << 30 });
        for i in 0..10_000u32 {
            cache.insert(format!("k{i}").as_bytes(), 1, done(b"x"), 1_000_000, 0);
        }
        assert!(cache.len() <= 4 * SHARDS, "{} entries", cache.len());
        assert!(cache.lookup(b"k9999", 1, 0, 0).is_some(), "the newest stays");
        assert!(cache.lookup(b"k0", 1, 0, 0).is_none(), "the oldest went");

        let small = ReplayCache::new(ReplayCacheLimits { max_entries: usize::MAX, max_bytes: 64 << 10 });
        for i in 0..10_000u32 {
            small.insert(format!("k{i}").as_bytes(), 1, done(&[0u8; 200]), 1_000_000, 0);
        }
        let bytes: usize = small.shards.iter().map(|s| s.lock().unwrap().bytes).sum();
        assert!(bytes <= 64 << 10, "{bytes} bytes");
        // An outcome larger than a shard's share is never kept.
        small.insert(b"huge", 1, done(&vec![0u8; 64 << 10]), 1_000_000, 0);
        assert!(small.lookup(b"huge", 1, 0, 0).is_none());
    }

    #[test]
    fn expired_entries_are_evicted_before_live_ones() {
        let cache = ReplayCache::new(ReplayCacheLimits { max_entries: SHARDS * 1000, max_bytes: 1 << 30 });
        for i in 0..500u32 {
            cache.insert(format!("old{i}").as_bytes(), 1, done(b"x"), 1_000, 0);
        }
        // Later inserts at a time past the old entries' expiry push them out, though no bound
        // was reached.
        for i in 0..500u32 {
            cache.insert(format!("new{i}").as_bytes(), 1, done(b"x"), 1_000_000, 5_000);
        }
        assert_eq!(cache.len(), 500);
        assert!(cache.lookup(b"new0", 1, 5_000, 0).is_some());
    }

    #[test]
    fn replacing_a_key_keeps_one_entry_and_its_bytes_right() {
        let cache = ReplayCache::new(ReplayCacheLimits::default());
        for round in 0..100u8 {
            cache.insert(b"k", 1, done(&[round; 10]), 1_000_000, 0);
        }
        assert_eq!(cache.len(), 1);
        let bytes: usize = cache.shards.iter().map(|s| s.lock().unwrap().bytes).sum();
        assert_eq!(bytes, slot_bytes(b"k", &done(&[0; 10])));
        assert!(matches!(cache.lookup(b"k", 1, 0, 0), Some(Cached::Replay(d)) if d.outcome == [99; 10]));
    }
}
