//! Opening a store: read every segment, delete expired buckets whole, truncate torn tails,
//! refuse corruption that is not a tail, and rebuild the index keeping, per key, the record
//! with the highest sequence number. Beside the scan: what makes a directory a store and the
//! writer's lock (`store_dir`), the `META` file (`meta`), `verify` of the other files
//! (`checkup`) and `salvage`.

pub mod checkup;
pub mod meta;
pub mod salvage;
pub mod store_dir;

use std::path::Path;
use std::sync::Arc;

use crate::bytes::usize_from;
use crate::error::{Error, Result};
use crate::hash::IdMap;
use crate::hash::Loc;
use crate::index::Index;
use crate::io::Io;
use crate::log::record::{self, HEADER_LEN, RECORD_ALIGN};
use crate::log::segment::{Probe, SEGMENT_HEADER_LEN, Segment, parse_segment_file_name, segment_file_name};
use crate::sealed::{SealedTables, Table, parse_table_file_name, parse_table_tmp_file_name, table_file_name};
use crate::stats::RecoveryStats;

/// What recovery hands to the store.
pub struct Recovered<L> {
    pub segments: IdMap<u32, Arc<Segment>>,
    pub index: Index<L>,
    pub sealed: SealedTables,
    pub next_seq: u64,
    pub next_segment_id: u32,
    /// Latest time written in any record: the store's clock never reads earlier than this.
    pub latest_time_ms: u64,
    pub stats: RecoveryStats,
}

/// How recovery may treat the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The store's writer: deletes expired buckets, zeroes torn tails, removes damaged tables.
    Writer,
    /// A read-only view: changes no byte; a torn tail is simply not visible yet.
    ReadOnly,
}

/// Scans `dir`, whose files are `names`, and rebuilds the state as of `now_ms`: sealed tables
/// made with the hash `table_mark` names are mapped as they are, only segments without such a
/// (valid) table are scanned.
#[allow(clippy::too_many_arguments)]
pub fn recover<L: Default + Send>(
    io: &dyn Io,
    dir: &Path,
    names: &[String],
    capacity: u64,
    now_ms: u64,
    key_hash: &(dyn Fn(&[u8]) -> u64 + Sync),
    table_mark: u32,
    mode: Mode,
) -> Result<Recovered<L>> {
    let mut ids: Vec<u32> = names.iter().filter_map(|n| parse_segment_file_name(n)).collect();
    ids.sort_unstable();
    let table_ids: std::collections::HashSet<u32> = names.iter().filter_map(|n| parse_table_file_name(n)).collect();
    let mut stats = RecoveryStats::default();
    let mut segments = IdMap::default();
    let index = Index::default();
    let sealed = SealedTables::default();
    let mut max_seq = 0u64;
    let mut latest_time_ms = 0u64;
    let mut dir_changed = false;
    // A file name is input from the disk: the largest id must leave room for the next one.
    let next_segment_id = match ids.last() {
        None => 1,
        Some(&last) => last.checked_add(1).ok_or_else(|| Error::Corrupt {
            file: dir.join(segment_file_name(last)),
            offset: 0,
            reason: "segment id at the end of its range",
        })?,
    };
    let writer = mode == Mode::Writer;
    // Read before any segment is: every byte below a mark was written before the mark was,
    // so a view of a live store copies at least that much (see `log/marks.rs`).
    let marks = crate::log::marks::read_or_none(io, dir);
    let remove =
        |path: &Path, what: &'static str| -> Result<()> { io.remove(path).map_err(|e| Error::io(what, path, e)) };
    // Phase 1: open every segment; map the tables of sealed ones.
    let mut to_scan = Vec::new();
    let mut damaged = std::collections::HashSet::new();
    for &id in &ids {
        let path = dir.join(segment_file_name(id));
        let table_path = dir.join(table_file_name(id));
        let opened = match Segment::open(io, &path, capacity, writer) {
            // Listed a moment ago, gone now: a live writer dropped its bucket meanwhile.
            Err(e) if !writer && vanished(&e) => continue,
            opened => opened?,
        };
        let Some(segment) = opened else {
            if writer {
                remove(&path, "remove empty segment")?;
                stats.empty_files_removed += 1;
                dir_changed = true;
            }
            continue;
        };
        if segment.header.id != id {
            return Err(Error::Corrupt { file: path, offset: 12, reason: "segment id does not match file name" });
        }
        if segment.header.bucket_end_ms <= now_ms {
            if writer {
                // Its table, if any, goes with the tables that have no segment (below).
                drop(segment);
                remove(&path, "delete expired segment")?;
                stats.expired_buckets_deleted += 1;
                dir_changed = true;
            }
            continue;
        }
        let segment = Arc::new(segment);
        segments.insert(id, segment.clone());
        stats.segments += 1;
        if table_ids.contains(&id) && segment.header.rebuilt && writer {
            // A segment whose header salvage rebuilt is never trusted to a table (see
            // `SegmentHeader::rebuilt`): one left from before is removed and the segment scanned.
            remove(&table_path, "remove table of a rebuilt segment")?;
            dir_changed = true;
        } else if table_ids.contains(&id) && !segment.header.rebuilt {
            let opened = match Table::open(io, &table_path, id, table_mark) {
                // Deleted after the listing (its bucket is being dropped by a live writer): the
                // segment, still mapped here, is scanned instead.
                Err(e) if !writer && vanished(&e) => {
                    to_scan.push(segment);
                    continue;
                }
                opened => opened?,
            };
            if let Some(table) = opened {
                max_seq = max_seq.max(table.bounds.max_seq);
                latest_time_ms = latest_time_ms.max(table.bounds.latest_ms);
                stats.tables_loaded += 1;
                sealed.insert(table, &[]);
                segment.release_descriptor();
                continue;
            }
            // A damaged table, or one of another hash: scan the segment instead; sealing writes
            // a new table.
            stats.tables_rebuilt += 1;
            damaged.insert(id);
            if writer {
                remove(&table_path, "remove damaged table")?;
                dir_changed = true;
            }
        }
        to_scan.push(segment);
    }
    if writer {
        for &id in table_ids.iter().filter(|id| !segments.contains_key(*id)) {
            remove(&dir.join(table_file_name(id)), "remove table without segment")?;
            dir_changed = true;
        }
        // A table being written when the process stopped: its entries may never have reached
        // the disk (its name may have, with its first sync). Sealing writes it again.
        for name in names.iter().filter(|n| parse_table_tmp_file_name(n).is_some()) {
            remove(&dir.join(name), "remove unfinished table")?;
            dir_changed = true;
        }
    }
    // Why each segment without a table is scanned: the newest segment of its bucket was most
    // likely still taking appends (an unsealed tail); an older one had stopped, but its table
    // was not written yet when the process stopped.
    let mut newest_of_bucket: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
    for segment in segments.values() {
        let newest = newest_of_bucket.entry(segment.header.bucket_start_ms).or_insert(0);
        *newest = (*newest).max(segment.id());
    }
    for segment in &to_scan {
        if damaged.contains(&segment.id()) {
            continue;
        }
        if newest_of_bucket.get(&segment.header.bucket_start_ms) == Some(&segment.id()) {
            stats.segments_scanned_unsealed_tail += 1;
        } else {
            stats.segments_scanned_no_table += 1;
        }
    }
    // Phase 2: scan the segments that were being written, keeping per key the record with
    // the highest sequence number across them and the sealed tables. A few segments at a time
    // are read, checked and synced on up to two threads, then their records are merged into
    // the index on as many threads, each taking the keys of its own index shards: a key's
    // records all meet in one thread, and the merge keeps the highest seq whatever the order.
    let scan_started = std::time::Instant::now();
    let tables = sealed.all();
    // A scanned record is superseded by a sealed one only in a table holding a higher seq.
    let tables_max_seq = tables.iter().map(|t| t.bounds.max_seq).max().unwrap_or(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, SCAN_THREADS_MAX);
    for batch in to_scan.chunks(threads * SCAN_BATCH_PER_THREAD) {
        let scans: Vec<Result<Scanned>> = in_parallel(threads.min(batch.len()), batch.len(), &|i| {
            scan_and_sync(&batch[i], mode, crate::log::marks::durable_end(&marks, &batch[i]), key_hash)
        });
        // The first error in id order, as a scan in order would report it.
        let scans: Vec<Scanned> = scans.into_iter().collect::<Result<_>>()?;
        for scan in &scans {
            stats.torn_bytes_truncated += scan.scan.torn_bytes;
            stats.torn_tails += u64::from(scan.scan.torn_bytes > 0);
            stats.bytes_scanned += scan.scan.bytes.len() as u64;
        }
        let context =
            MergeContext { batch, scans: &scans, segments: &segments, index: &index, tables: &tables, tables_max_seq };
        let merged = in_parallel(threads, threads, &|part| merge_part(&context, part, threads));
        for part in merged {
            let part = part?;
            stats.records += part.records;
            max_seq = max_seq.max(part.max_seq);
            latest_time_ms = latest_time_ms.max(part.latest_ms);
        }
    }
    stats.scan_us = u64::try_from(scan_started.elapsed().as_micros()).unwrap_or(u64::MAX);
    if dir_changed {
        io.sync_dir(dir).map_err(|e| Error::io("sync directory", dir, e))?;
    }
    Ok(Recovered {
        segments,
        index,
        sealed,
        next_seq: max_seq.saturating_add(1),
        next_segment_id,
        latest_time_ms,
        stats,
    })
}

/// Most threads that scan segments at open (the store is meant for a couple of cores; more
/// would only contend with the merge for memory bandwidth).
const SCAN_THREADS_MAX: usize = 2;

/// Segments each thread scans before their records are merged (bounds the memory the scans
/// of one batch hold: a copy of each segment).
const SCAN_BATCH_PER_THREAD: usize = 2;

/// Runs `job(0..count)` on up to `threads` threads; the results come back in index order.
fn in_parallel<T: Send>(threads: usize, count: usize, job: &(dyn Fn(usize) -> T + Sync)) -> Vec<T> {
    if threads <= 1 || count <= 1 {
        return (0..count).map(job).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<(usize, T)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.min(count))
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= count {
                            return done;
                        }
                        done.push((i, job(i)));
                    }
                })
            })
            .collect();
        // A worker that panicked re-raises its panic here: recovery code does not panic on
        // disk input, so that would be a bug, not a damaged file.
        workers.into_iter().flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });
    results.sort_unstable_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// One scanned segment and the index hash of each of its records' keys.
struct Scanned {
    scan: Scan,
    hashes: Vec<u64>,
}

/// Scans one segment, hashes its keys and, for the writer, makes what a crashed process left
/// in the page cache durable before any answer is read from it.
/// `durable_end`: how far the segment is known durable (`MARKS`); damage below it is
/// corruption, never a torn tail.
fn scan_and_sync(
    segment: &Segment,
    mode: Mode,
    durable_end: u64,
    key_hash: &(dyn Fn(&[u8]) -> u64 + Sync),
) -> Result<Scanned> {
    let scan = scan_segment(segment, mode, durable_end)?;
    if mode == Mode::Writer {
        segment.sync().map_err(|e| Error::io("sync recovered segment", &segment.path, e))?;
    }
    // Recovered segments are never appended to again: only the map is needed from now on.
    segment.release_descriptor();
    let hashes = scan.records.iter().map(|(offset, header)| key_hash(scan.key(*offset, header))).collect();
    Ok(Scanned { scan, hashes })
}

/// What one merge thread reads.
struct MergeContext<'a, L> {
    batch: &'a [Arc<Segment>],
    scans: &'a [Scanned],
    segments: &'a IdMap<u32, Arc<Segment>>,
    index: &'a Index<L>,
    tables: &'a [Arc<Table>],
    tables_max_seq: u64,
}

/// What one merge thread found.
#[derive(Default)]
struct Merged {
    records: u64,
    max_seq: u64,
    latest_ms: u64,
}

/// Merges the records of a batch of scanned segments whose keys fall in index shards of
/// `part` (shard number mod `parts`) into the index, keeping per key the record with the
/// highest seq across the index and the sealed tables.
fn merge_part<L>(cx: &MergeContext<'_, L>, part: usize, parts: usize) -> Result<Merged> {
    let mut merged = Merged::default();
    for (segment, scanned) in cx.batch.iter().zip(cx.scans) {
        let id = segment.id();
        for (&(offset, header), &hash) in scanned.scan.records.iter().zip(&scanned.hashes) {
            if cx.index.shard_number(hash) % parts != part {
                continue;
            }
            let key = scanned.scan.key(offset, &header);
            merged.records += 1;
            segment.note_write(header.written_at_ms);
            segment.note_record(header.padded_len());
            merged.max_seq = merged.max_seq.max(header.seq);
            merged.latest_ms = merged.latest_ms.max(header.written_at_ms).max(header.claimed_at_ms);
            let mut newer_sealed = false;
            if header.seq < cx.tables_max_seq {
                // Tables newest first: the first that holds the key holds its latest sealed
                // record (invariants 3 and 5). A table whose records are all older than this one
                // cannot hold a newer record of the key, nor come before one that does.
                for table in cx.tables.iter().filter(|t| t.bounds.max_seq > header.seq) {
                    let found = table.lookup(hash, &mut |candidate| {
                        if let Some(other) = cx.segments.get(&candidate.segment)
                            && let Probe::Match(h) = other.probe(u64::from(candidate.offset), key)?
                        {
                            newer_sealed = h.seq > header.seq;
                            return Ok(true);
                        }
                        Ok(false)
                    })?;
                    if found {
                        break;
                    }
                }
            }
            if newer_sealed {
                segment.note_dead(header.padded_len());
                continue;
            }
            #[expect(
                clippy::cast_possible_truncation,
                reason = "a record starts inside its segment, whose capacity is at most 4 GiB"
            )]
            let loc = Loc { segment: id, offset: offset as u32 };
            let mut shard = cx.index.shard(hash).shard.lock();
            let mut existing = None;
            for candidate in shard.candidates(hash) {
                let Some(other) = cx.segments.get(&candidate.segment) else { continue };
                if let Probe::Match(h) = other.probe(u64::from(candidate.offset), key)? {
                    existing = Some((candidate, h));
                    break;
                }
            }
            match existing {
                Some((_, newer)) if newer.seq > header.seq => segment.note_dead(header.padded_len()),
                Some((old, older)) => {
                    if let Some(old_segment) = cx.segments.get(&old.segment) {
                        old_segment.note_dead(older.padded_len());
                    }
                    shard.set(hash, Some(old), loc);
                }
                None => shard.set(hash, None, loc),
            }
        }
    }
    Ok(merged)
}

/// A restart table's (hash, record offset) entries and the bounds over its segment's records.
pub type RestartEntries = (Vec<(u64, u32)>, crate::sealed::TableBounds);

/// The entries and bounds of a restart table for `segment`, which takes no more appends: each
/// key's latest record in it, read from the segment itself (not from the RAM index, whose
/// sweep over every key would cost far more than reading one segment). A record of it that a
/// later segment superseded stays listed: at open the newer record wins by seq, and should
/// that record be lost to a power cut, this one is still the right answer. `None` when the
/// segment does not read back whole (a damaged record: it is left to the scan at open, which
/// reports it).
pub fn restart_entries(segment: &Segment, key_hash: &dyn Fn(&[u8]) -> u64) -> Result<Option<RestartEntries>> {
    // Only what was written: the rest of the reserved space is zeros.
    let end = usize::try_from(segment.written_end()).map_err(|_| Error::InvalidArgument("segment too large"))?;
    let bytes = segment.read_raw(0, end)?;
    let id = segment.id();
    let mut bounds = crate::sealed::TableBounds::default();
    // (hash, offset) of every record, in offset (and so seq) order.
    let mut all: Vec<(u64, u32)> = Vec::with_capacity(end / 128);
    let mut pos = usize_from(SEGMENT_HEADER_LEN);
    while pos < bytes.len() {
        match record::decode(id, &bytes[pos..]) {
            Ok((header, key, _)) => {
                if header.seq <= bounds.max_seq {
                    return Ok(None);
                }
                bounds.max_seq = header.seq;
                bounds.latest_ms = bounds.latest_ms.max(header.written_at_ms).max(header.claimed_at_ms);
                let offset = u32::try_from(pos).map_err(|_| Error::InvalidArgument("segment too large"))?;
                all.push((key_hash(key), offset));
                pos += usize_from(header.padded_len());
            }
            Err(_) if bytes[pos..].iter().all(|&b| b == 0) => break,
            Err(_) => return Ok(None),
        }
    }
    // Each key's latest record: records of one hash sit together once sorted, by offset
    // within the run; a later one of the same key replaces an earlier one. (Keys that share
    // a hash are told apart by their bytes.) Sorting and comparing in place, without a map
    // of keys, keeps this cheap: it runs beside claims, once per segment.
    all.sort_unstable();
    let key_at = |offset: u32| {
        let at = offset as usize;
        let key_len = usize::from(u16::from_le_bytes([bytes[at + 10], bytes[at + 11]]));
        &bytes[at + HEADER_LEN..at + HEADER_LEN + key_len]
    };
    let mut latest: Vec<(u64, u32)> = Vec::with_capacity(all.len());
    let mut run_start = 0;
    for i in 0..all.len() {
        if i + 1 < all.len() && all[i + 1].0 == all[i].0 {
            continue;
        }
        let run = &all[run_start..=i];
        if run.len() == 1 {
            latest.push(run[0]);
        } else {
            for (j, &(hash, offset)) in run.iter().enumerate() {
                let key = key_at(offset);
                if !run[j + 1..].iter().any(|&(_, later)| key_at(later) == key) {
                    latest.push((hash, offset));
                }
            }
        }
        run_start = i + 1;
    }
    Ok(Some((latest, bounds)))
}

/// True when `e` says a file was not found: in a read-only view or `verify`, a file listed a
/// moment before and missing now was deleted by the live writer (an expired bucket dropped).
fn vanished(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

struct Scan {
    /// The segment's bytes as read (the records' keys are read from here).
    bytes: Vec<u8>,
    /// Every valid record: its offset and header.
    records: Vec<(u64, record::Header)>,
    torn_bytes: u64,
}

impl Scan {
    /// The key of the record at `offset` (one the scan decoded, so within `bytes`).
    fn key(&self, offset: u64, header: &record::Header) -> &[u8] {
        let at = usize_from(offset) + HEADER_LEN;
        &self.bytes[at..at + usize::from(header.key_len)]
    }
}

/// `scan_segment`'s `durable_end` for a segment whose whole content is known durable (it has a
/// sealed table, written only after the whole log was synced): any bad record is damage, and
/// zeros after the last record are simply its unused space.
const WHOLE_SEGMENT_DURABLE: u64 = u64::MAX;

/// Reads every record of a segment. A bad record followed only by zeros (or garbage that holds
/// no valid record) is a torn tail: zeroed in writer mode. A bad record followed by a valid one
/// is corruption: an error, and nothing is changed.
///
/// `durable_end` is how far the segment is known durable (its mark in `MARKS`, 0 when none):
/// a torn tail is a write that never finished, so it cannot start below that. A bad record
/// there, or records that end before it, is damage to committed data: `Error::Corrupt`, and
/// nothing is truncated (dropping it would bring back a key's earlier state).
fn scan_segment(segment: &Segment, mode: Mode, durable_end: u64) -> Result<Scan> {
    let len = segment.len();
    let mut bytes =
        segment.read_raw(0, usize::try_from(len).map_err(|_| Error::InvalidArgument("segment too large"))?)?;
    let mut records = Vec::new();
    let mut pos = usize_from(SEGMENT_HEADER_LEN);
    let id = segment.id();
    let mut last_seq = 0u64;
    let mut rereads = 0;
    while pos < bytes.len() {
        match record::decode(id, &bytes[pos..]) {
            Ok((header, _key, _value)) => {
                if header.seq <= last_seq {
                    return Err(Error::Corrupt {
                        file: segment.path.clone(),
                        offset: pos as u64,
                        reason: "sequence numbers go backwards within a segment",
                    });
                }
                last_seq = header.seq;
                records.push((pos as u64, header));
                pos += usize_from(header.padded_len());
            }
            Err(err) => {
                let committed = (pos as u64) < durable_end;
                if bytes[pos..].iter().all(|&b| b == 0) {
                    if committed && durable_end != WHOLE_SEGMENT_DURABLE {
                        return Err(Error::Corrupt {
                            file: segment.path.clone(),
                            offset: pos as u64,
                            reason: "records the store had made durable read as zeros",
                        });
                    }
                    break;
                }
                if valid_record_after(id, &bytes, pos) {
                    if mode == Mode::ReadOnly && rereads < TAIL_REREADS_MAX {
                        // A live writer may have appended this record while the copy above was
                        // being taken (the copy read it before it was written, and the ones
                        // after it once they were): read from here on again. A damaged record
                        // stays damaged however often it is read.
                        rereads += 1;
                        let fresh = segment.read_raw(pos as u64, bytes.len() - pos)?;
                        bytes.truncate(pos);
                        bytes.extend_from_slice(&fresh);
                        continue;
                    }
                    return Err(Error::Corrupt {
                        file: segment.path.clone(),
                        offset: pos as u64,
                        reason: err.reason(),
                    });
                }
                if committed {
                    // Not a torn tail: this record was durable before it went bad.
                    return Err(Error::Corrupt {
                        file: segment.path.clone(),
                        offset: pos as u64,
                        reason: committed_reason(err),
                    });
                }
                // A torn tail: the last write never completed. Zero it so the file ends cleanly.
                let end = bytes.iter().rposition(|&b| b != 0).map_or(pos, |i| i + 1).max(pos);
                let torn = (end - pos) as u64;
                if mode == Mode::Writer && torn > 0 {
                    // `recover` syncs every scanned segment right after the scan.
                    segment.write_at(pos as u64, &vec![0u8; end - pos])?;
                }
                return Ok(Scan { bytes, records, torn_bytes: torn });
            }
        }
    }
    if (pos as u64) < durable_end && durable_end != WHOLE_SEGMENT_DURABLE {
        return Err(Error::Corrupt {
            file: segment.path.clone(),
            offset: pos as u64,
            reason: "segment ends before the records the store had made durable",
        });
    }
    Ok(Scan { bytes, records, torn_bytes: 0 })
}

/// The reason for a bad record below its segment's durable mark: damage, never a torn tail.
fn committed_reason(err: record::DecodeError) -> &'static str {
    match err {
        record::DecodeError::Zeros => "a durable record reads as zeros (below the durable mark)",
        record::DecodeError::Truncated => "a durable record runs past the end of the file (below the durable mark)",
        record::DecodeError::BadFrame => "a durable record has impossible framing (below the durable mark)",
        record::DecodeError::BadChecksum => "a durable record fails its checksum (below the durable mark)",
    }
}

/// How often a read-only scan reads the rest of a segment again when a bad record is followed
/// by valid ones (see `scan_segment`).
const TAIL_REREADS_MAX: u32 = 3;

/// Whether a valid record starts at some aligned position after `from`.
fn valid_record_after(id: u32, bytes: &[u8], from: usize) -> bool {
    let mut pos = from + usize_from(RECORD_ALIGN);
    while pos + HEADER_LEN <= bytes.len() {
        if bytes[pos + 8] != 0 && record::decode(id, &bytes[pos..]).is_ok() {
            return true;
        }
        pos += usize_from(RECORD_ALIGN);
    }
    false
}

/// Which of the store's files a [`FileReport`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileKind {
    /// A segment (`<id>.seg`): the records, the only copy of the keys' states.
    Segment,
    /// A sealed table (`<id>.tbl`): derived from its segment, rebuilt when removed.
    Table,
    /// `TIME`: the floor of the store's time.
    Time,
    /// `LOCK`: the writer's lock and its owner record.
    Lock,
    /// `META`: the format version and the secret of the index hash.
    Meta,
    /// `MARKS`: how far each segment is known durable.
    Marks,
}

/// What `verify` found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReport {
    /// The file checked.
    pub path: std::path::PathBuf,
    /// Valid records in it (for a table: its entries; for `MARKS`: its marks).
    pub records: u64,
    /// Bytes of an incomplete tail (a write that never finished; harmless, truncated at open).
    /// Only bytes past the segment's durable mark can be one: damage below it is a problem.
    pub torn_bytes: u64,
    /// The first problem that is not a torn tail: (offset, reason). For a segment, opening the
    /// store fails with `Error::Corrupt` or `Error::UnsupportedVersion` while this is set.
    pub problem: Option<(u64, String)>,
    /// Its bucket has ended: the file is deleted at the next open or by the writer's next
    /// maintenance, which may be freeing its blocks right now, so its records are not checked.
    pub expired: bool,
    /// Which file of the store this is.
    pub kind: FileKind,
    /// What to do about `problem` (set whenever it is).
    pub remedy: Option<String>,
    /// Something worth knowing that is not a problem.
    pub note: Option<String>,
}

/// What `Store::verify` found, file by file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// One entry per segment file, in id order (a file deleted while `verify` ran is left out).
    pub files: Vec<FileReport>,
    /// Every other file the store reads: sealed tables in id order, then `META`, `TIME`,
    /// `LOCK` and `MARKS` when present.
    pub other_files: Vec<FileReport>,
}

impl VerifyReport {
    /// True when no file has a problem (torn tails are not problems).
    pub fn is_clean(&self) -> bool {
        self.files.iter().chain(&self.other_files).all(|f| f.problem.is_none())
    }
}

/// Checks every checksum of every file in `dir` without changing a byte, as of the wall
/// clock's time (see [`verify_at`]).
pub fn verify(io: &dyn Io, dir: &Path, capacity: u64) -> Result<VerifyReport> {
    verify_at(io, dir, capacity, crate::clock::system_time_to_ms(std::time::SystemTime::now()))
}

/// Checks every checksum of every file in `dir` without changing a byte, on a store that a
/// writer may be changing meanwhile: a segment deleted after the listing is left out, and one
/// whose bucket ended by `now_ms` is reported as expired without a check of its records (the
/// writer may be freeing its blocks, which then read as zeros).
///
/// A segment's records below its durable mark (`MARKS`), or all of them when it has a sound
/// table (written only after the whole log was synced), cannot be a torn tail: damage there is
/// a problem, as the next open would find it.
pub fn verify_at(io: &dyn Io, dir: &Path, capacity: u64, now_ms: u64) -> Result<VerifyReport> {
    let names = io.list(dir).map_err(|e| Error::io("list store directory", dir, e))?;
    let mut ids: Vec<u32> = names.iter().filter_map(|n| parse_segment_file_name(n)).collect();
    ids.sort_unstable();
    let mut table_ids: Vec<u32> = names.iter().filter_map(|n| parse_table_file_name(n)).collect();
    table_ids.sort_unstable();
    let mut report = VerifyReport::default();
    let (meta, table_mark) = crate::recovery::checkup::check_meta(io, dir, &names);
    // Read before the segments, as recovery does (see `recover`).
    let marks = crate::log::marks::read_or_none(io, dir);
    let segment_lens: std::collections::HashMap<u32, u64> = ids
        .iter()
        .filter_map(|&id| io.open(&dir.join(segment_file_name(id)), capacity, false).ok().map(|f| (id, f.len())))
        .collect();
    let mut sealed = std::collections::HashSet::new();
    for &id in &table_ids {
        let path = dir.join(table_file_name(id));
        let (file, sound) =
            crate::recovery::checkup::check_table(io, &path, id, table_mark, segment_lens.get(&id).copied());
        if sound {
            sealed.insert(id);
        }
        report.other_files.push(file);
    }
    for id in ids {
        let path = dir.join(crate::log::segment::segment_file_name(id));
        let mut file = FileReport {
            path: path.clone(),
            records: 0,
            torn_bytes: 0,
            problem: None,
            expired: false,
            kind: FileKind::Segment,
            remedy: None,
            note: None,
        };
        match Segment::open(io, &path, capacity, false) {
            Err(e) if vanished(&e) => continue,
            // A file of zeros is a spare that never got a header, unless records in it were
            // known durable (its header is gone, so the mark's file cannot be checked).
            Ok(None) if marks.get(&id).is_some_and(|m| u64::from(m.end) > SEGMENT_HEADER_LEN) => {
                file.problem = Some((0, "a segment that held durable records reads as zeros".into()));
            }
            Ok(None) => {}
            Ok(Some(segment)) if segment.header.id != id => {
                file.problem = Some((12, "segment id does not match file name".into()));
            }
            Ok(Some(segment)) if segment.header.bucket_end_ms <= now_ms => file.expired = true,
            Ok(Some(segment)) => {
                let durable_end = if sealed.contains(&id) {
                    WHOLE_SEGMENT_DURABLE
                } else {
                    crate::log::marks::durable_end(&marks, &segment)
                };
                match scan_segment(&segment, Mode::ReadOnly, durable_end) {
                    Ok(scan) => {
                        file.records = scan.records.len() as u64;
                        file.torn_bytes = scan.torn_bytes;
                    }
                    Err(Error::Corrupt { offset, reason, .. }) => file.problem = Some((offset, reason.into())),
                    Err(e) => file.problem = Some((0, e.to_string())),
                }
            }
            Err(Error::UnsupportedVersion { found, .. }) => {
                file.problem = Some((8, format!("segment format version {found}")));
                file.remedy = Some(crate::recovery::checkup::VERSION_REMEDY.into());
            }
            Err(Error::Corrupt { offset, reason, .. }) => file.problem = Some((offset, reason.into())),
            Err(e) => file.problem = Some((0, e.to_string())),
        }
        if file.problem.is_some() && file.remedy.is_none() {
            file.remedy = Some(crate::recovery::checkup::SEGMENT_REMEDY.into());
        }
        report.files.push(file);
    }
    report.other_files.extend(meta);
    report.other_files.extend(crate::recovery::checkup::check_time(io, dir));
    report.other_files.extend(crate::recovery::checkup::check_lock(io, dir));
    report.other_files.extend(crate::recovery::checkup::check_marks(io, dir));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::sim::SimDisk;
    use crate::io::{DirLock, IoFile};
    use std::path::PathBuf;

    /// The simulated disk, except that the first open of `vanish` finds it deleted: what
    /// `verify` sees when the writer drops a bucket between the listing and the open.
    #[derive(Debug)]
    struct VanishingIo {
        disk: SimDisk,
        vanish: parking_lot::Mutex<Option<PathBuf>>,
    }

    impl Io for VanishingIo {
        fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
            self.disk.create_dir_all(dir)
        }
        fn lock_dir(&self, dir: &Path) -> std::io::Result<Box<dyn DirLock>> {
            self.disk.lock_dir(dir)
        }
        fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
            self.disk.list(dir)
        }
        fn create(&self, path: &Path, capacity: u64) -> std::io::Result<Box<dyn IoFile>> {
            self.disk.create(path, capacity)
        }
        fn open(&self, path: &Path, capacity: u64, writable: bool) -> std::io::Result<Box<dyn IoFile>> {
            if self.vanish.lock().take_if(|p| p == path).is_some() {
                self.disk.remove(path)?;
            }
            self.disk.open(path, capacity, writable)
        }
        fn remove(&self, path: &Path) -> std::io::Result<()> {
            self.disk.remove(path)
        }
        fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
            self.disk.rename(from, to)
        }
        fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
            self.disk.sync_dir(dir)
        }
    }

    #[test]
    fn verify_leaves_out_a_segment_deleted_after_it_was_listed() {
        let disk = SimDisk::new();
        let dir = Path::new("/store");
        let now_ms = crate::clock::system_time_to_ms(std::time::SystemTime::now());
        let options = crate::Options {
            io: std::sync::Arc::new(disk.clone()),
            clock: crate::ManualClock::new(now_ms),
            background: false,
            ..crate::Options::default()
        };
        let store = crate::Store::open(dir, options.clone()).unwrap();
        for (i, ttl_s) in [60, 7200].into_iter().enumerate() {
            let ttl = crate::ClaimOptions { ttl: Some(std::time::Duration::from_secs(ttl_s)), ..Default::default() };
            let crate::Claim::Acquired(token) = store.claim_with(format!("key-{i}"), b"req", ttl).unwrap() else {
                panic!("a fresh key")
            };
            store.complete(&token, b"done").unwrap();
        }
        store.close().unwrap();
        let segments: Vec<PathBuf> =
            disk.file_paths().into_iter().filter(|p| p.extension().is_some_and(|e| e == "seg")).collect();
        assert_eq!(segments.len(), 2);
        let io = VanishingIo { disk: disk.clone(), vanish: parking_lot::Mutex::new(Some(segments[0].clone())) };
        let report = verify_at(&io, dir, options.segment_bytes_max, now_ms).unwrap();
        assert!(report.is_clean(), "{report:?}");
        let paths: Vec<&PathBuf> = report.files.iter().map(|f| &f.path).collect();
        assert_eq!(paths, vec![&segments[1]], "the deleted segment is left out: {report:?}");
        assert_eq!(report.files[0].records, 2);
    }
}
