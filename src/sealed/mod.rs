//! Sealed tables: when a segment takes no more appends, the index entries that point into it
//! move out of RAM into an immutable file beside it, `<id>.tbl`, read through the memory map,
//! with a blocked Bloom filter kept in RAM so a new key (the common case) is answered without
//! touching the file. Restart maps these tables instead of rescanning their segments.
//!
//! The layout: ARCHITECTURE.md, "On disk", "Sealed table".
//!
//! Each entry's `check` is the crc32 of (segment id, hash, offset), so a damaged entry is
//! caught on the lookup that reads it.
//!
//! A table holds hashes, and is only of use with the hash it was made with: the version and
//! the mark say which (`IndexHash::table_mark`), and a table whose mark is not its store's is
//! treated as damaged (its segment is scanned), never searched with the wrong hash.

pub mod filter;

use std::path::{Path, PathBuf};

use crate::bytes::{u32_at, u64_at, usize_from};
use crate::error::{Error, Result};
use crate::hash::Loc;
use crate::io::{Io, IoFile};
use crate::sealed::filter::BlockedBloom;
use std::sync::Arc;

use parking_lot::RwLock;

/// Magic bytes opening every table file.
pub const TABLE_MAGIC: [u8; 8] = *b"IDEMTBL\0";
/// Bytes of the table header.
pub const TABLE_HEADER_LEN: u64 = 64;
/// Bytes of one entry.
pub const ENTRY_LEN: u64 = 16;
/// File name extension of table files.
pub const TABLE_EXT: &str = "tbl";
/// Version of a table of unkeyed hashes (stores of format version 1).
pub const TABLE_VERSION_UNKEYED: u32 = 1;
/// Version of a table of hashes under the store's secret (format version 2).
pub const TABLE_VERSION_KEYED: u32 = 2;

/// The table version that goes with a hash mark (see `IndexHash::table_mark`).
fn version_for(mark: u32) -> u32 {
    if mark == 0 { TABLE_VERSION_UNKEYED } else { TABLE_VERSION_KEYED }
}

/// Extension added to a table's name while it is written (see [`table_tmp_file_name`]).
pub const TABLE_TMP_EXT: &str = "tmp";

/// The file name of segment `id`'s table.
pub fn table_file_name(id: u32) -> String {
    format!("{id:08x}.{TABLE_EXT}")
}

/// The temporary name segment `id`'s table is written under before it is renamed into place.
pub fn table_tmp_file_name(id: u32) -> String {
    format!("{id:08x}.{TABLE_EXT}.{TABLE_TMP_EXT}")
}

/// The segment id in a temporary table file name (see [`table_tmp_file_name`]), if it is one.
pub fn parse_table_tmp_file_name(name: &str) -> Option<u32> {
    parse_table_file_name(name.strip_suffix(".tmp")?)
}

/// The segment id in a table file name, if it is one.
pub fn parse_table_file_name(name: &str) -> Option<u32> {
    let stem = name.strip_suffix(".tbl")?;
    if stem.len() != 8 {
        return None;
    }
    u32::from_str_radix(stem, 16).ok()
}

/// The fields of one 16-byte entry: hash, record offset, check.
fn entry_fields(bytes: &[u8]) -> (u64, u32, u32) {
    (u64_at(bytes, 0), u32_at(bytes, 8), u32_at(bytes, 12))
}

/// The CRC state after segment `segment_id`'s id: every entry's check starts with it.
fn check_seed(segment_id: u32) -> crc32fast::Hasher {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&segment_id.to_le_bytes());
    hasher
}

/// An entry's check: the crc32 of (segment id, hash, offset), from the seed of its segment.
/// The entry's first 12 bytes are that hash and offset, little endian, as the CRC takes them.
fn entry_check(seed: &crc32fast::Hasher, hash_and_offset: &[u8]) -> u32 {
    let mut hasher = seed.clone();
    hasher.update(hash_and_offset);
    hasher.finalize()
}

fn header_crc(header: &[u8], filter: &BlockedBloom) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[0..56]);
    for word in filter.words() {
        hasher.update(&word.to_le_bytes());
    }
    hasher.finalize()
}

/// Upper bounds over every record of a sealed segment, so a restart that reads the table
/// instead of the segment still never reuses a sequence number or runs its clock backwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableBounds {
    pub max_seq: u64,
    pub latest_ms: u64,
}

/// One sealed table, mapped.
pub struct Table {
    pub segment_id: u32,
    pub bucket_end_ms: u64,
    pub bounds: TableBounds,
    pub path: PathBuf,
    filter: BlockedBloom,
    count: u64,
    entries_at: u64,
    file: Box<dyn IoFile>,
    /// `check_seed(segment_id)`, kept so a lookup's checks hash only the entries' bytes.
    seed: crc32fast::Hasher,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").field("path", &self.path).field("count", &self.count).finish()
    }
}

impl Table {
    /// Writes the table of segment `segment_id` from its (hash, offset) entries, made with the
    /// hash that `mark` names, syncs it and renames it into place. The caller syncs the
    /// directory, which makes the table durable under its name.
    pub fn write(
        io: &dyn Io,
        dir: &Path,
        segment_id: u32,
        bucket_end_ms: u64,
        bounds: TableBounds,
        mark: u32,
        mut entries: Vec<(u64, u32)>,
    ) -> Result<Table> {
        entries.sort_unstable();
        let path = dir.join(table_file_name(segment_id));
        let mut filter = BlockedBloom::with_capacity(entries.len() as u64);
        for (hash, _) in &entries {
            filter.insert_unshared(*hash);
        }
        let mut header = [0u8; usize_from(TABLE_HEADER_LEN)];
        header[0..8].copy_from_slice(&TABLE_MAGIC);
        header[8..12].copy_from_slice(&version_for(mark).to_le_bytes());
        header[12..16].copy_from_slice(&segment_id.to_le_bytes());
        header[16..24].copy_from_slice(&(entries.len() as u64).to_le_bytes());
        header[24..32].copy_from_slice(&(filter.words().len() as u64).to_le_bytes());
        header[32..40].copy_from_slice(&bucket_end_ms.to_le_bytes());
        header[40..48].copy_from_slice(&bounds.max_seq.to_le_bytes());
        header[48..56].copy_from_slice(&bounds.latest_ms.to_le_bytes());
        let crc = header_crc(&header, &filter);
        header[56..60].copy_from_slice(&crc.to_le_bytes());
        header[60..64].copy_from_slice(&mark.to_le_bytes());
        let entries_at = TABLE_HEADER_LEN + 8 * filter.words().len() as u64;
        let total = entries_at + ENTRY_LEN * entries.len() as u64;
        let mut bytes = Vec::with_capacity(usize_from(total));
        bytes.extend_from_slice(&header);
        for word in filter.words() {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        let seed = check_seed(segment_id);
        for (hash, offset) in &entries {
            let at = bytes.len();
            bytes.extend_from_slice(&hash.to_le_bytes());
            bytes.extend_from_slice(&offset.to_le_bytes());
            let check = entry_check(&seed, &bytes[at..]);
            bytes.extend_from_slice(&check.to_le_bytes());
        }
        debug_assert_eq!(bytes.len() as u64, total);
        // Written whole under a temporary name, synced, then renamed into place: the table's
        // name must never be durable over entries that are not. (A sync in slices of a file
        // under its own name could leave its header and filter durable over a zeroed tail: on
        // ext4 the first sync of a new file commits its name too.) A temporary file left by
        // an interrupted earlier attempt is replaced; recovery removes any it finds.
        let tmp = dir.join(table_tmp_file_name(segment_id));
        let _ = io.remove(&tmp);
        let file = io.create(&tmp, total).map_err(|e| Error::io("create table", &tmp, e))?;
        // The pages are unmapped before the sync (see `IoFile::release_pages`): writeback then
        // write-protects no mapped page, each with a TLB flush on every CPU of the process.
        let written = file
            .reserve_unfilled(total)
            .and_then(|()| file.write_at(0, &bytes))
            .map(|()| file.release_pages())
            .and_then(|()| file.sync_gradually())
            .map_err(|e| ("write table", e))
            .and_then(|()| io.rename(&tmp, &path).map_err(|e| ("rename table into place", e)));
        if let Err((what, e)) = written {
            drop(file);
            let _ = io.remove(&tmp);
            return Err(Error::io(what, tmp, e));
        }
        file.release_descriptor();
        Ok(Table {
            segment_id,
            bucket_end_ms,
            bounds,
            path,
            filter,
            count: entries.len() as u64,
            entries_at,
            file,
            seed,
        })
    }

    /// Opens a table; `Ok(None)` when it is damaged (bad magic, checksum, version or sizes) or
    /// was made with another hash than the one `mark` names, so its segment is scanned instead
    /// and the table rebuilt.
    pub fn open(io: &dyn Io, path: &Path, segment_id: u32, mark: u32) -> Result<Option<Table>> {
        let file = io.open(path, 0, false).map_err(|e| Error::io("open table", path, e))?;
        let len = file.len();
        let mut header = [0u8; usize_from(TABLE_HEADER_LEN)];
        if len < TABLE_HEADER_LEN || file.read_at(0, &mut header).is_err() {
            return Ok(None);
        }
        if header[0..8] != TABLE_MAGIC || u32_at(&header, 12) != segment_id {
            return Ok(None);
        }
        // Hashes made another way would make stored keys look absent: the mark is outside the
        // CRC, so a damaged one fails here too, and the table is rebuilt.
        if u32_at(&header, 8) != version_for(mark) || u32_at(&header, 60) != mark {
            return Ok(None);
        }
        let count = u64_at(&header, 16);
        let words = u64_at(&header, 24);
        let Some(entries_at) = words.checked_mul(8).and_then(|b| b.checked_add(TABLE_HEADER_LEN)) else {
            return Ok(None);
        };
        if count.checked_mul(ENTRY_LEN).and_then(|b| b.checked_add(entries_at)) != Some(len) {
            return Ok(None);
        }
        let mut raw = vec![0u8; usize_from(words * 8)];
        if file.read_at(TABLE_HEADER_LEN, &mut raw).is_err() {
            return Ok(None);
        }
        let filter_words: Vec<u64> = raw.chunks_exact(8).map(|c| u64_at(c, 0)).collect();
        let Some(filter) = BlockedBloom::from_words(filter_words) else {
            return Ok(None);
        };
        if header_crc(&header, &filter) != u32_at(&header, 56) {
            return Ok(None);
        }
        file.release_descriptor();
        Ok(Some(Table {
            segment_id,
            bucket_end_ms: u64_at(&header, 32),
            bounds: TableBounds { max_seq: u64_at(&header, 40), latest_ms: u64_at(&header, 48) },
            path: path.to_path_buf(),
            filter,
            count,
            entries_at,
            file,
            seed: check_seed(segment_id),
        }))
    }

    /// Number of entries.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Bytes of RAM the table holds (its filter).
    pub fn ram_bytes(&self) -> usize {
        self.filter.bytes()
    }

    /// Entry `i`'s hash and record offset, from its 16 bytes, checked against its own CRC.
    fn checked(&self, i: u64, bytes: &[u8]) -> Result<(u64, u32)> {
        let (hash, offset, check) = entry_fields(bytes);
        if check != entry_check(&self.seed, &bytes[..12]) {
            return Err(Error::Corrupt {
                file: self.path.clone(),
                offset: self.entries_at + i * ENTRY_LEN,
                reason: "table entry checksum mismatch",
            });
        }
        Ok((hash, offset))
    }

    fn entry(&self, i: u64) -> Result<(u64, u32)> {
        let mut raw = [0u8; usize_from(ENTRY_LEN)];
        let at = self.entries_at + i * ENTRY_LEN;
        self.file.read_at(at, &mut raw).map_err(|e| Error::io("read table entry", &self.path, e))?;
        self.checked(i, &raw)
    }

    /// Visits entries `i`, `i + 1`, ... while their hash is `hash`; true when `visit` stopped.
    fn visit_run(&self, mut i: u64, hash: u64, visit: &mut dyn FnMut(Loc) -> Result<bool>) -> Result<bool> {
        while i < self.count {
            let (h, offset) = self.entry(i)?;
            if h != hash {
                break;
            }
            if visit(Loc { segment: self.segment_id, offset })? {
                return Ok(true);
            }
            i += 1;
        }
        Ok(false)
    }

    /// Calls `visit` with the location of every entry with `hash`, until it returns true
    /// (stop); returns whether it stopped.
    ///
    /// Every entry whose hash is compared is checked against its CRC first: a damaged (or never
    /// written, zeroed) entry read as a hash would steer the search past the key, making a
    /// stored key look absent, or a newer record of it (a removal) look missing so that an
    /// older table answers. Only compared entries are checked: the boundaries of the window, the
    /// binary search's probes and the run it visits, a dozen CRCs of 16 bytes, not the window.
    /// The search's answer rests only on those: the entry before the position found and the one
    /// at it were both compared, so a damaged entry elsewhere cannot move it.
    pub fn lookup(&self, hash: u64, visit: &mut dyn FnMut(Loc) -> Result<bool>) -> Result<bool> {
        if self.count == 0 || !self.filter.may_contain(hash) {
            return Ok(false);
        }
        // Hashes are uniform: the entry is almost always within a small window around the
        // interpolated position, read with one copy and searched in memory.
        const SLACK: u64 = 64;
        let guess = ((u128::from(hash) * u128::from(self.count)) >> 64) as u64;
        let lo = guess.saturating_sub(SLACK);
        let hi = (guess + SLACK).min(self.count);
        let mut window = [0u8; usize_from(2 * SLACK * ENTRY_LEN)];
        let window = &mut window[..usize_from((hi - lo) * ENTRY_LEN)];
        self.file
            .read_at(self.entries_at + lo * ENTRY_LEN, window)
            .map_err(|e| Error::io("read table entries", &self.path, e))?;
        let at = |i: u64| self.checked(lo + i, &window[usize_from(i * ENTRY_LEN)..usize_from((i + 1) * ENTRY_LEN)]);
        let hash_of = |i: u64| at(i).map(|(h, _)| h);
        let len = hi - lo;
        if (lo > 0 && hash_of(0)? >= hash) || (hi < self.count && hash_of(len - 1)? < hash) {
            // The interpolation missed: search the whole table.
            let (mut a, mut b) = (0, self.count);
            while a < b {
                let mid = a + (b - a) / 2;
                if self.entry(mid)?.0 < hash {
                    a = mid + 1;
                } else {
                    b = mid;
                }
            }
            return self.visit_run(a, hash, visit);
        }
        let (mut a, mut b) = (0, len);
        while a < b {
            let mid = a + (b - a) / 2;
            if hash_of(mid)? < hash {
                a = mid + 1;
            } else {
                b = mid;
            }
        }
        for i in a..len {
            let (h, offset) = at(i)?;
            if h != hash {
                return Ok(false);
            }
            if visit(Loc { segment: self.segment_id, offset })? {
                return Ok(true);
            }
        }
        // Equal hashes run past the window (only with colliding hashes).
        self.visit_run(hi, hash, visit)
    }

    /// Calls `f` with every entry's hash, in order, checking each entry.
    pub fn for_each_hash(&self, f: &mut dyn FnMut(u64)) -> Result<()> {
        const CHUNK: u64 = 4096;
        let mut buf = vec![0u8; usize_from(CHUNK * ENTRY_LEN)];
        let mut i = 0;
        while i < self.count {
            let n = CHUNK.min(self.count - i);
            let bytes = &mut buf[..usize_from(n * ENTRY_LEN)];
            self.file
                .read_at(self.entries_at + i * ENTRY_LEN, bytes)
                .map_err(|e| Error::io("read table entries", &self.path, e))?;
            for (j, entry) in bytes.chunks_exact(usize_from(ENTRY_LEN)).enumerate() {
                f(self.checked(i + j as u64, entry)?.0);
            }
            i += n;
        }
        Ok(())
    }

    /// Every (hash, location) in the table whose hash lies in `range`, in hash order: a binary
    /// search for its start, then one read of the run (each entry CRC-checked).
    pub fn entries_in(&self, range: std::ops::RangeInclusive<u64>) -> Result<Vec<(u64, Loc)>> {
        let (mut a, mut b) = (0, self.count);
        while a < b {
            let mid = a + (b - a) / 2;
            if self.entry(mid)?.0 < *range.start() {
                a = mid + 1;
            } else {
                b = mid;
            }
        }
        let mut out = Vec::new();
        while a < self.count {
            let (hash, offset) = self.entry(a)?;
            if hash > *range.end() {
                break;
            }
            out.push((hash, Loc { segment: self.segment_id, offset }));
            a += 1;
        }
        Ok(out)
    }

    /// Every (hash, location) in the table.
    pub fn entries(&self) -> Result<Vec<(u64, Loc)>> {
        (0..self.count)
            .map(|i| self.entry(i).map(|(h, offset)| (h, Loc { segment: self.segment_id, offset })))
            .collect()
    }
}

/// The set of sealed tables consulted when the in-RAM index misses, with one filter over all
/// of them so a new key costs one filter probe however many tables are live.
#[derive(Default)]
pub struct SealedTables {
    tables: RwLock<Vec<Arc<Table>>>,
    /// Tables in the set; lets the common no-table case skip the lock's shared counter.
    count: std::sync::atomic::AtomicUsize,
    /// Union of every table's keys (and of dropped ones until rebuilt). `None` until built
    /// after an open, or after it ran out of room: then each table's own filter is asked.
    union: RwLock<Option<Arc<BlockedBloom>>>,
}

impl SealedTables {
    /// Calls `visit` with every sealed location that may hold `hash`'s key, newest table
    /// first (latest bucket end, then highest segment id), until `visit` returns true.
    ///
    /// Newest first means the first location holding a key has its latest sealed record: a
    /// key's newer record always lies in a bucket ending no earlier than its older ones
    /// (ARCHITECTURE.md, invariant 3), and within one bucket in a segment with a larger id
    /// (invariant 5: the log's append sees to it, whichever lane writes the record).
    pub fn visit(&self, hash: u64, visit: &mut dyn FnMut(Loc) -> Result<bool>) -> Result<()> {
        if self.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return Ok(());
        }
        if let Some(union) = self.union.read().as_ref()
            && !union.may_contain(hash)
        {
            return Ok(());
        }
        let tables = self.tables.read();
        for table in tables.iter() {
            if table.lookup(hash, visit)? {
                break;
            }
        }
        Ok(())
    }

    /// Publishes a table whose entries have these hashes. The union filter learns them first,
    /// so no lookup can miss a published key.
    pub fn insert(&self, table: Table, hashes: &[u64]) {
        // The filter's words are atomics: bits go in under the read lock, so lookups (which
        // take it too) never wait for a large table's hashes (~10 ms for 500k keys).
        let full = match self.union.read().as_ref() {
            Some(filter) if filter.has_room(hashes.len() as u64) => {
                for &hash in hashes {
                    filter.insert(hash);
                }
                false
            }
            Some(_) => true,
            None => false,
        };
        if full {
            *self.union.write() = None;
        }
        let mut tables = self.tables.write();
        tables.push(Arc::new(table));
        tables.sort_by_key(|t| std::cmp::Reverse((t.bucket_end_ms, t.segment_id)));
        self.count.store(tables.len(), std::sync::atomic::Ordering::Release);
    }

    /// Forgets the tables of dropped segments; returns them so their files can be deleted.
    /// (Their keys stay in the union filter until it is rebuilt.)
    pub fn remove_segments(&self, dead: &dyn Fn(u32) -> bool) -> Vec<Arc<Table>> {
        let mut tables = self.tables.write();
        let (gone, kept): (Vec<_>, Vec<_>) = tables.drain(..).partition(|t| dead(t.segment_id));
        *tables = kept;
        self.count.store(tables.len(), std::sync::atomic::Ordering::Release);
        gone
    }

    /// Builds the union filter when it is missing, or when dropped keys make up over half of
    /// it. Reads every table's entries: background work (the maintenance thread).
    pub fn refresh_union(&self) -> Result<bool> {
        let tables = self.all();
        let live: u64 = tables.iter().map(|t| t.len()).sum();
        let stale = match self.union.read().as_ref() {
            None => !tables.is_empty(),
            Some(filter) => filter.inserted() > 2 * live.max(1 << 16),
        };
        if !stale {
            return Ok(false);
        }
        // Room for half as many again, so new tables join without a rebuild for a while.
        let filter = BlockedBloom::with_capacity(live + live / 2 + (1 << 16));
        for table in &tables {
            table.for_each_hash(&mut |hash| filter.insert(hash))?;
        }
        // Tables are only added by the maintenance thread, which is running this: the set did
        // not change meanwhile.
        *self.union.write() = Some(Arc::new(filter));
        Ok(true)
    }

    pub fn has(&self, segment_id: u32) -> bool {
        self.tables.read().iter().any(|t| t.segment_id == segment_id)
    }

    pub fn all(&self) -> Vec<Arc<Table>> {
        self.tables.read().clone()
    }

    /// (tables, entries, RAM bytes of their filters and the union filter).
    pub fn totals(&self) -> (u64, u64, u64) {
        let tables = self.tables.read();
        let entries = tables.iter().map(|t| t.len()).sum();
        let union = self.union.read().as_ref().map_or(0, |f| f.bytes() as u64);
        let ram = tables.iter().map(|t| t.ram_bytes() as u64).sum::<u64>() + union;
        (tables.len() as u64, entries, ram)
    }
}
