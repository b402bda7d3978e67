//! `Store::scan`: every live key with a prefix, one at a time, in a stable order, holding in
//! memory only the locations of one index shard (16 bytes per key of 1/256 of the window),
//! never the whole listing.

use std::collections::VecDeque;

use super::{Inner, Store};
use crate::error::Result;
use crate::index::{SHARD_COUNT, shard_hash_range};
use crate::log::Loc;
use crate::types::Entry;

impl Store {
    /// Every live key beginning with `prefix` (an empty prefix: every key) with its entry, as
    /// an iterator that reads the window shard by shard instead of listing it in memory
    /// (unlike [`Store::keys`]). The order is the index's hash order: the same for every scan
    /// of the same keys in this store, not sorted by key. Keys written or removed while a scan
    /// runs may or may not be seen; each key is seen at most once, with its state when the
    /// scan reached it. Works on read-only views as `keys` does.
    pub fn scan(&self, prefix: impl AsRef<[u8]>) -> Scan<'_> {
        Scan {
            inner: &self.inner,
            prefix: prefix.as_ref().to_vec(),
            next_shard: 0,
            pending: VecDeque::new(),
            ready: VecDeque::new(),
            failed: false,
        }
    }
}

/// The iterator of [`Store::scan`]: `(key, entry)` pairs, or an error (after which it ends).
pub struct Scan<'a> {
    inner: &'a Inner,
    prefix: Vec<u8>,
    next_shard: usize,
    /// The current shard's locations, sorted by hash: a key's locations (in RAM and in sealed
    /// tables) are adjacent, so each key is read once.
    pending: VecDeque<(u64, Loc)>,
    /// Keys of the hash run read last, to answer next.
    ready: VecDeque<Vec<u8>>,
    failed: bool,
}

impl std::fmt::Debug for Scan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scan")
            .field("prefix", &self.prefix)
            .field("next_shard", &self.next_shard)
            .finish_non_exhaustive()
    }
}

impl Scan<'_> {
    /// Loads the next shard's locations; false when every shard is done.
    fn load_shard(&mut self) -> Result<bool> {
        if self.next_shard >= SHARD_COUNT {
            return Ok(false);
        }
        let number = self.next_shard;
        self.next_shard += 1;
        let mut locs = self.inner.index.shard_at(number).shard.lock().entries();
        for table in self.inner.sealed.all() {
            locs.extend(table.entries_in(shard_hash_range(number))?);
        }
        locs.sort_unstable_by_key(|(hash, loc)| (*hash, loc.segment, loc.offset));
        locs.dedup_by_key(|(hash, loc)| (*hash, loc.segment, loc.offset));
        self.pending = locs.into();
        Ok(true)
    }

    /// Reads the keys of the next run of equal hashes (usually one key) into `ready`.
    fn read_run(&mut self) -> Result<()> {
        let Some(&(hash, _)) = self.pending.front() else { return Ok(()) };
        let mut keys: Vec<Vec<u8>> = Vec::new();
        while let Some(&(h, loc)) = self.pending.front() {
            if h != hash {
                break;
            }
            self.pending.pop_front();
            if let Some(key) = self.inner.key_at(loc)?
                && key.starts_with(&self.prefix)
                && !keys.contains(&key)
            {
                keys.push(key);
            }
        }
        keys.sort_unstable();
        self.ready.extend(keys);
        Ok(())
    }

    fn step(&mut self) -> Result<Option<(Vec<u8>, Entry)>> {
        loop {
            if let Some(key) = self.ready.pop_front() {
                match self.inner.entry(&key)? {
                    Some(entry) => return Ok(Some((key, entry))),
                    None => continue,
                }
            }
            if !self.pending.is_empty() {
                self.read_run()?;
                continue;
            }
            if !self.load_shard()? {
                return Ok(None);
            }
        }
    }
}

impl Iterator for Scan<'_> {
    type Item = Result<(Vec<u8>, Entry)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.step() {
            Ok(found) => found.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

impl Inner {
    /// The key of the record at `loc`; `None` when its segment's bucket has ended (it holds no
    /// live key, and a writer in another process may be freeing its bytes under a read-only
    /// view) or is gone.
    pub(super) fn key_at(&self, loc: Loc) -> Result<Option<Vec<u8>>> {
        let now_ms = self.time.now_ms();
        let key = self.log.with_segment(loc.segment, |s| {
            (s.header.bucket_end_ms > now_ms).then(|| s.key_at(u64::from(loc.offset))).transpose()
        });
        Ok(key.transpose()?.flatten())
    }
}
