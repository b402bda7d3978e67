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
