//! Opening a store: read every segment, delete expired buckets whole, truncate torn tails,
//! refuse corruption that is not a tail, and rebuild the index keeping, per key, the record
//! with the highest sequence number.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::index::{IdMap, Index};
use crate::io::Io;
use crate::log::Loc;
use crate::record::{self, HEADER_LEN, RECORD_ALIGN};
use crate::segment::{Probe, SEGMENT_HEADER_LEN, Segment, parse_segment_file_name, segment_file_name};
use crate::stats::RecoveryStats;
use crate::table::{SealedTables, Table, parse_table_file_name, table_file_name};

/// What recovery hands to the store.
pub struct Recovered {
    pub segments: IdMap<u32, Arc<Segment>>,
    pub index: Index,
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

/// Scans `dir` and rebuilds the state as of `now_ms`: sealed tables are mapped as they are,
/// only segments without a (valid) table are scanned.
pub fn recover(
    io: &dyn Io,
    dir: &Path,
    capacity: u64,
    now_ms: u64,
    key_hash: &dyn Fn(&[u8]) -> u64,
    mode: Mode,
) -> Result<Recovered> {
    let names = io.list(dir).map_err(|e| Error::io("list store directory", dir, e))?;
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
    let next_segment_id = ids.last().map_or(1, |id| id + 1);
    let writer = mode == Mode::Writer;
    let remove =
        |path: &Path, what: &'static str| -> Result<()> { io.remove(path).map_err(|e| Error::io(what, path, e)) };
    // Phase 1: open every segment; map the tables of sealed ones.
    let mut to_scan = Vec::new();
    for &id in &ids {
        let path = dir.join(segment_file_name(id));
        let table_path = dir.join(table_file_name(id));
        let Some(segment) = Segment::open(io, &path, capacity, writer)? else {
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
        if table_ids.contains(&id) {
            if let Some(table) = Table::open(io, &table_path, id)? {
                max_seq = max_seq.max(table.bounds.max_seq);
                latest_time_ms = latest_time_ms.max(table.bounds.latest_ms);
                stats.tables_loaded += 1;
                sealed.insert(table, &[]);
                segment.release_descriptor();
                continue;
            }
            // A damaged table: scan the segment instead; sealing writes a new table.
            stats.tables_rebuilt += 1;
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
    }
    // Phase 2: scan the segments that were being written, keeping per key the record with
    // the highest sequence number across them and the sealed tables.
    for segment in to_scan {
        let id = segment.id();
        let scan = scan_segment(&segment, mode)?;
        if writer {
            // What a crashed process left in the page cache becomes durable before any answer
            // is read from it.
            segment.sync().map_err(|e| Error::io("sync recovered segment", &segment.path, e))?;
        }
        // Recovered segments are never appended to again: only the map is needed from now on.
        segment.release_descriptor();
        stats.torn_bytes_truncated += scan.torn_bytes;
        stats.torn_tails += u64::from(scan.torn_bytes > 0);
        for (offset, header, key) in scan.records {
            stats.records += 1;
            segment.note_write(header.written_at_ms);
            segment.note_record(header.padded_len());
            max_seq = max_seq.max(header.seq);
            latest_time_ms = latest_time_ms.max(header.written_at_ms).max(header.claimed_at_ms);
            let hash = key_hash(&key);
            let mut newer_sealed = false;
            sealed.visit(hash, &mut |candidate| {
                if let Some(other) = segments.get(&candidate.segment)
                    && let Probe::Match(h) = other.probe(u64::from(candidate.offset), &key)?
                {
                    // The first match is the key's latest sealed record.
                    newer_sealed = h.seq > header.seq;
                    return Ok(true);
                }
                Ok(false)
            })?;
            if newer_sealed {
                segment.note_dead(header.padded_len());
                continue;
            }
            let loc = Loc { segment: id, offset: offset as u32 };
            let mut shard = index.shard(hash).shard.lock();
            let mut existing = None;
            for candidate in shard.candidates(hash) {
                let Some(other) = segments.get(&candidate.segment) else { continue };
                if let Probe::Match(h) = other.probe(u64::from(candidate.offset), &key)? {
                    existing = Some((candidate, h));
                    break;
                }
            }
            match existing {
                Some((_, newer)) if newer.seq > header.seq => segment.note_dead(header.padded_len()),
                Some((old, older)) => {
                    if let Some(old_segment) = segments.get(&old.segment) {
                        old_segment.note_dead(older.padded_len());
                    }
                    shard.set(hash, Some(old), loc);
                }
                None => shard.set(hash, None, loc),
            }
        }
    }
    if dir_changed {
        io.sync_dir(dir).map_err(|e| Error::io("sync directory", dir, e))?;
    }
    Ok(Recovered { segments, index, sealed, next_seq: max_seq + 1, next_segment_id, latest_time_ms, stats })
}

struct Scan {
    records: Vec<(u64, record::Header, Vec<u8>)>,
    torn_bytes: u64,
}

/// Reads every record of a segment. A bad record followed only by zeros (or garbage that holds
/// no valid record) is a torn tail: zeroed in writer mode. A bad record followed by a valid one
/// is corruption: an error, and nothing is changed.
fn scan_segment(segment: &Segment, mode: Mode) -> Result<Scan> {
    let len = segment.len();
    let mut bytes =
        segment.read_raw(0, usize::try_from(len).map_err(|_| Error::InvalidArgument("segment too large"))?)?;
    let mut records = Vec::new();
    let mut pos = SEGMENT_HEADER_LEN as usize;
    let id = segment.id();
    let mut last_seq = 0u64;
    let mut rereads = 0;
    while pos < bytes.len() {
        match record::decode(id, &bytes[pos..]) {
            Ok((header, key, _value)) => {
                if header.seq <= last_seq {
                    return Err(Error::Corrupt {
                        file: segment.path.clone(),
                        offset: pos as u64,
                        reason: "sequence numbers go backwards within a segment",
                    });
                }
                last_seq = header.seq;
                records.push((pos as u64, header, key.to_vec()));
                pos += header.padded_len() as usize;
            }
            Err(err) => {
                if bytes[pos..].iter().all(|&b| b == 0) {
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
                // A torn tail: the last write never completed. Zero it so the file ends cleanly.
                let end = bytes.iter().rposition(|&b| b != 0).map_or(pos, |i| i + 1).max(pos);
                let torn = (end - pos) as u64;
                if mode == Mode::Writer && torn > 0 {
                    // `recover` syncs every scanned segment right after the scan.
                    segment.write_at(pos as u64, &vec![0u8; end - pos])?;
                }
                return Ok(Scan { records, torn_bytes: torn });
            }
        }
    }
    Ok(Scan { records, torn_bytes: 0 })
}

/// How often a read-only scan reads the rest of a segment again when a bad record is followed
/// by valid ones (see `scan_segment`).
const TAIL_REREADS_MAX: u32 = 3;

/// Whether a valid record starts at some aligned position after `from`.
fn valid_record_after(id: u32, bytes: &[u8], from: usize) -> bool {
    let mut pos = from + RECORD_ALIGN as usize;
    while pos + HEADER_LEN <= bytes.len() {
        if bytes[pos + 8] != 0 && record::decode(id, &bytes[pos..]).is_ok() {
            return true;
        }
        pos += RECORD_ALIGN as usize;
    }
    false
}

/// What `verify` found in one segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReport {
    /// The file checked.
    pub path: std::path::PathBuf,
    /// Valid records in it.
    pub records: u64,
    /// Bytes of an incomplete tail (a write that never finished; harmless, truncated at open).
    pub torn_bytes: u64,
    /// The first problem that is not a torn tail: (offset, reason). Opening the store fails
    /// with `Error::Corrupt` or `Error::UnsupportedVersion` while this is set.
    pub problem: Option<(u64, String)>,
}

/// What `Store::verify` found, file by file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// One entry per segment file, in id order.
    pub files: Vec<FileReport>,
}

impl VerifyReport {
    /// True when no file has a problem (torn tails are not problems).
    pub fn is_clean(&self) -> bool {
        self.files.iter().all(|f| f.problem.is_none())
    }
}

/// Checks every checksum of every segment in `dir` without changing a byte.
pub fn verify(io: &dyn Io, dir: &Path, capacity: u64) -> Result<VerifyReport> {
    let names = io.list(dir).map_err(|e| Error::io("list store directory", dir, e))?;
    let mut ids: Vec<u32> = names.iter().filter_map(|n| parse_segment_file_name(n)).collect();
    ids.sort_unstable();
    let mut report = VerifyReport::default();
    for id in ids {
        let path = dir.join(crate::segment::segment_file_name(id));
        let mut file = FileReport { path: path.clone(), records: 0, torn_bytes: 0, problem: None };
        match Segment::open(io, &path, capacity, false) {
            Ok(None) => {}
            Ok(Some(segment)) if segment.header.id != id => {
                file.problem = Some((12, "segment id does not match file name".into()));
            }
            Ok(Some(segment)) => match scan_segment(&segment, Mode::ReadOnly) {
                Ok(scan) => {
                    file.records = scan.records.len() as u64;
                    file.torn_bytes = scan.torn_bytes;
                }
                Err(Error::Corrupt { offset, reason, .. }) => file.problem = Some((offset, reason.into())),
                Err(e) => file.problem = Some((0, e.to_string())),
            },
            Err(Error::Corrupt { offset, reason, .. }) => file.problem = Some((offset, reason.into())),
            Err(e) => file.problem = Some((0, e.to_string())),
        }
        report.files.push(file);
    }
    Ok(report)
}
