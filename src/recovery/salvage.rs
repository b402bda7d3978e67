//! Salvage: the operator's way out of damage that `Store::open` refuses.
//!
//! `Store::open` never drops a durable record by itself: a damaged one is `Error::Corrupt`
//! and the store stays shut, since answering without it could run an effect twice. When the
//! operator decides that a known hole in the window is better than no service, [`salvage`]
//! (the CLI's `idemstore salvage DIR`) makes the store open again and says exactly what the
//! hole is:
//!
//! - a damaged segment is copied whole to `DIR/quarantine/<name>` (synced), then replaced, under
//!   the same name and id, by a file holding its header and every record that still checks
//!   out, in their order. The same id keeps every record's checksum (seeded with the id) and
//!   the order of the bucket's segments (a lookup relies on it); a new id would put old
//!   records ahead of newer ones of the same bucket. A header that is itself damaged is rebuilt
//!   from the records: its bucket ends just after the latest expiry they hold, never later than
//!   the original did, so no older record outlives a newer one elsewhere. That guessed
//!   bucket may sort the segment behind an older one of its original bucket, so the rebuilt
//!   header says so (`SegmentHeader::rebuilt`) and the segment never gets a table: it is
//!   scanned into the RAM index at every open, where a key's newest record wins by seq.
//! - the lost bytes are reported as ranges, with every record header still readable in them:
//!   offset, kind, seq and the key bytes (unverified: the checksum that covers them failed).
//! - a damaged or touched segment's table is removed (derived data: rebuilt at the next open);
//!   so is any damaged table. A damaged `TIME` or `MARKS` is removed (both read as absent
//!   anyway), a damaged `META` is moved to the quarantine (see `docs/operations.md`).
//!
//! It takes the writer's lock, so it refuses a live store (`Error::Locked`).

use std::path::{Path, PathBuf};

use crate::bytes::usize_from;
use crate::error::{Error, Result};
use crate::io::Io;
use crate::log::record::{self, HEADER_LEN, RECORD_ALIGN};
use crate::log::segment::{SEGMENT_HEADER_LEN, SegmentHeader};
use crate::recovery::FileKind;

/// Name of the directory damaged files are moved to, inside the store directory.
pub const QUARANTINE_DIR_NAME: &str = "quarantine";

/// How [`salvage`] runs.
#[derive(Debug, Clone, Default)]
pub struct SalvageOptions {
    /// Report what would be done and lost; change nothing.
    pub dry_run: bool,
}

/// A record in a lost range whose header could still be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostRecord {
    /// Its offset in the original file.
    pub offset: u64,
    /// Its kind as written: `claim`, `checkpoint`, `complete`, `release` or `remove`.
    pub kind: &'static str,
    /// Its sequence number as written.
    pub seq: u64,
    /// Its key bytes as they read now (the checksum over them failed: they may be damaged).
    pub key: Vec<u8>,
}

/// What [`salvage`] did (or, in a dry run, would do) to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SalvagedFile {
    /// The file.
    pub path: PathBuf,
    /// Which file of the store it is.
    pub kind: FileKind,
    /// What was done, in words.
    pub action: String,
    /// Where the original now lies (segments and `META`).
    pub quarantined: Option<PathBuf>,
    /// Records kept (segments).
    pub records_kept: u64,
    /// Records lost: the readable headers in the lost ranges, and at least one a range.
    pub records_lost: u64,
    /// Byte ranges `[start, end)` of the original that no longer hold a valid record.
    pub lost_ranges: Vec<(u64, u64)>,
    /// The lost records whose headers could still be read.
    pub lost_records: Vec<LostRecord>,
}

/// What [`salvage`] found and did, file by file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SalvageReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Every file acted on (or that would be); empty when the store had nothing to salvage.
    pub files: Vec<SalvagedFile>,
}

impl SalvageReport {
    /// Records lost over every file.
    pub fn records_lost(&self) -> u64 {
        self.files.iter().map(|f| f.records_lost).sum()
    }
}

fn kind_name(kind: record::Kind) -> &'static str {
    match kind {
        record::Kind::Claim => "claim",
        record::Kind::Checkpoint => "checkpoint",
        record::Kind::Complete => "complete",
        record::Kind::Release => "release",
        record::Kind::Remove => "remove",
    }
}

/// What a walk over a damaged segment's records found.
struct Walk {
    /// (offset, padded length) of every record that checks out, in order.
    kept: Vec<(usize, usize)>,
    lost_ranges: Vec<(u64, u64)>,
    lost_records: Vec<LostRecord>,
    records_lost: u64,
    /// Latest expiry and earliest write of the kept records (to rebuild a header).
    max_expires_ms: u64,
    min_written_ms: u64,
}

/// Walks every 8-byte-aligned position after the header: a record that checks out (and whose
/// seq continues the ones before it) is kept; bytes between kept records are lost, except
/// zeros at the end (never written).
fn walk(id: u32, bytes: &[u8]) -> Walk {
    let mut w = Walk {
        kept: Vec::new(),
        lost_ranges: Vec::new(),
        lost_records: Vec::new(),
        records_lost: 0,
        max_expires_ms: 0,
        min_written_ms: u64::MAX,
    };
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let mut pos = usize_from(SEGMENT_HEADER_LEN);
    let mut lost_from: Option<usize> = None;
    let mut last_seq = 0u64;
    while pos < end {
        match record::decode(id, &bytes[pos..]) {
            Ok((header, _, _)) if header.seq > last_seq => {
                if let Some(from) = lost_from.take() {
                    close_range(&mut w, bytes, from, pos);
                }
                last_seq = header.seq;
                w.max_expires_ms = w.max_expires_ms.max(header.expires_at_ms);
                w.min_written_ms = w.min_written_ms.min(header.written_at_ms);
                let len = usize_from(header.padded_len());
                w.kept.push((pos, len));
                pos += len;
            }
            _ => {
                lost_from.get_or_insert(pos);
                pos += usize_from(RECORD_ALIGN);
            }
        }
    }
    if let Some(from) = lost_from {
        close_range(&mut w, bytes, from, end.max(from));
    }
    w
}

/// Notes `[from, to)` as lost, with every record header still readable in it.
fn close_range(w: &mut Walk, bytes: &[u8], from: usize, to: usize) {
    w.lost_ranges.push((from as u64, to as u64));
    let mut found = 0;
    let mut pos = from;
    while pos + HEADER_LEN <= to {
        match record::parse_header(&bytes[pos..]) {
            Ok(header) if header.seq != 0 => {
                let key_at = pos + HEADER_LEN;
                let key_end = (key_at + usize::from(header.key_len)).min(bytes.len());
                w.lost_records.push(LostRecord {
                    offset: pos as u64,
                    kind: kind_name(header.kind),
                    seq: header.seq,
                    key: bytes[key_at..key_end].to_vec(),
                });
                found += 1;
                pos += usize_from(header.padded_len()).max(usize_from(RECORD_ALIGN));
            }
            _ => pos += usize_from(RECORD_ALIGN),
        }
    }
    w.records_lost += found.max(1);
}

/// Salvages the store in `dir` (see the module's documentation). Refuses a store another
/// process holds open (`Error::Locked`).
pub fn salvage(io: &dyn Io, dir: &Path, capacity: u64, options: &SalvageOptions) -> Result<SalvageReport> {
    let _lock = crate::recovery::store_dir::take_writer_lock(io, dir)?;
    let verified = crate::recovery::verify(io, dir, capacity)?;
    let mut report = SalvageReport { dry_run: options.dry_run, files: Vec::new() };
    let quarantine = dir.join(QUARANTINE_DIR_NAME);
    let mut marks = crate::log::marks::read_or_none(io, dir);
    let mut marks_changed = false;
    let mut touched = Vec::new();
    for file in verified.files.iter().filter(|f| f.problem.is_some()) {
        let Some(id) =
            file.path.file_name().and_then(|n| n.to_str()).and_then(crate::log::segment::parse_segment_file_name)
        else {
            continue;
        };
        let raw = read_whole(io, &file.path, capacity)?;
        if raw.len() >= 12 && raw[0..8] == crate::log::segment::SEGMENT_MAGIC && record::u32_at(&raw, 8) != 1 {
            // Another format version: nothing here is damaged for the build that wrote it.
            continue;
        }
        let w = walk(id, &raw);
        let header = raw
            .get(..usize_from(SEGMENT_HEADER_LEN))
            .and_then(|h| <&[u8; usize_from(SEGMENT_HEADER_LEN)]>::try_from(h).ok())
            .and_then(|h| SegmentHeader::decode(&file.path, h).ok().flatten())
            .filter(|h| h.id == id);
        let (header, rebuilt) = match header {
            Some(h) => (h, false),
            None => {
                let start = if w.min_written_ms == u64::MAX { 0 } else { w.min_written_ms };
                let end = w.max_expires_ms.saturating_add(1).max(start + 1);
                (
                    SegmentHeader {
                        id,
                        bucket_start_ms: start,
                        bucket_end_ms: end,
                        created_at_ms: start,
                        rebuilt: true,
                    },
                    true,
                )
            }
        };
        let mut out = Vec::with_capacity(raw.len());
        out.extend_from_slice(&header.encode());
        for &(at, len) in &w.kept {
            out.extend_from_slice(&raw[at..(at + len).min(raw.len())]);
        }
        out.resize(usize_from(SEGMENT_HEADER_LEN) + w.kept.iter().map(|k| k.1).sum::<usize>(), 0);
        let name = crate::log::segment::segment_file_name(id);
        let moved = quarantine.join(&name);
        let mut action = format!("rewritten with the {} records that check out", w.kept.len());
        if rebuilt {
            action.push_str("; its header was damaged and was rebuilt from the records");
        }
        if !options.dry_run {
            io.create_dir_all(&quarantine).map_err(|e| Error::io("create quarantine directory", &quarantine, e))?;
            write_whole(io, &moved, &raw)?;
            io.sync_dir(&quarantine).map_err(|e| Error::io("sync directory", &quarantine, e))?;
            let tmp = dir.join(format!("{name}.salvage"));
            write_whole(io, &tmp, &out)?;
            io.rename(&tmp, &file.path).map_err(|e| Error::io("rename salvaged segment into place", &file.path, e))?;
        }
        // Every record of the new file is durable (synced before the rename).
        let crc = record::u32_at(&header.encode(), 60);
        #[expect(
            clippy::cast_possible_truncation,
            reason = "the rebuilt segment holds what fitted its capacity, at most 4 GiB"
        )]
        let end = out.len() as u32;
        marks.insert(id, crate::log::marks::Mark { header_crc: crc, end });
        marks_changed = true;
        touched.push(id);
        report.files.push(SalvagedFile {
            path: file.path.clone(),
            kind: FileKind::Segment,
            action,
            quarantined: Some(moved),
            records_kept: w.kept.len() as u64,
            records_lost: w.records_lost,
            lost_ranges: w.lost_ranges,
            lost_records: w.lost_records,
        });
    }
    // Tables: of a rewritten segment (their offsets point into the old file) or damaged.
    for file in &verified.other_files {
        let name = file.path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let table_id = crate::sealed::parse_table_file_name(name);
        let stale_table = table_id.is_some_and(|id| touched.contains(&id));
        let action = match file.kind {
            FileKind::Table if stale_table || file.problem.is_some() => {
                "removed: derived data, rebuilt from its segment at the next open"
            }
            FileKind::Time if file.problem.is_some() => "removed: it read as 0 anyway; the next writer writes it again",
            FileKind::Marks if file.problem.is_some() => {
                marks_changed = true;
                "replaced: it was ignored anyway; written again from what this salvage knows durable"
            }
            FileKind::Meta if file.problem.is_some() => {
                "moved to the quarantine: the store now opens with the unkeyed index hash of format 1"
            }
            _ => continue,
        };
        let mut quarantined = None;
        if file.kind == FileKind::Meta {
            let moved = quarantine.join(name);
            if !options.dry_run {
                io.create_dir_all(&quarantine).map_err(|e| Error::io("create quarantine directory", &quarantine, e))?;
                io.rename(&file.path, &moved).map_err(|e| Error::io("move META to the quarantine", &moved, e))?;
            }
            quarantined = Some(moved);
        } else if file.kind != FileKind::Marks && !options.dry_run {
            io.remove(&file.path).map_err(|e| Error::io("remove damaged file", &file.path, e))?;
        }
        report.files.push(SalvagedFile {
            path: file.path.clone(),
            kind: file.kind,
            action: action.to_string(),
            quarantined,
            records_kept: 0,
            records_lost: 0,
            lost_ranges: Vec::new(),
            lost_records: Vec::new(),
        });
    }
    if !options.dry_run && marks_changed {
        let names = io.list(dir).map_err(|e| Error::io("list store directory", dir, e))?;
        marks.retain(|id, _| names.iter().any(|n| crate::log::segment::parse_segment_file_name(n) == Some(*id)));
        crate::log::marks::write_synced(io, dir, &marks)
            .map_err(|e| Error::io("write marks file", dir.join(crate::log::marks::MARKS_FILE_NAME), e))?;
    }
    if !options.dry_run && !report.files.is_empty() {
        io.sync_dir(dir).map_err(|e| Error::io("sync directory", dir, e))?;
    }
    Ok(report)
}

/// Every byte of the file at `path`.
fn read_whole(io: &dyn Io, path: &Path, capacity: u64) -> Result<Vec<u8>> {
    let file = io.open(path, capacity, false).map_err(|e| Error::io("open segment", path, e))?;
    let len = usize::try_from(file.len()).map_err(|_| Error::InvalidArgument("segment too large"))?;
    let mut raw = vec![0u8; len];
    file.read_at(0, &mut raw).map_err(|e| Error::io("read segment", path, e))?;
    Ok(raw)
}

/// Writes `bytes` as the new file `path` (replacing a leftover of an interrupted salvage) and
/// syncs it.
fn write_whole(io: &dyn Io, path: &Path, bytes: &[u8]) -> Result<()> {
    let _ = io.remove(path);
    let len = bytes.len() as u64;
    let file = io.create(path, len.max(1)).map_err(|e| Error::io("create file", path, e))?;
    file.reserve(len)
        .and_then(|()| file.write_at(0, bytes))
        .and_then(|()| file.sync())
        .map_err(|e| Error::io("write file", path, e))
}
