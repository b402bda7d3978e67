//! The `MARKS` file: how far each segment is known durable, so that recovery can tell damage
//! to committed records from a torn tail.
//!
//! A record that fails its checks at the end of a segment looks the same whether the last
//! write never finished (a torn tail: safe to drop, nobody was answered from it) or a record
//! that was synced and acknowledged was damaged later (dropping it would bring a completed key
//! back as in flight, or a removed key back to life, and the next retry would run its effect
//! twice). The difference is whether the record was durable. So the writer records, after each
//! sync, the end of what that sync covered in each segment; at open, a bad record that starts
//! below its segment's mark is `Error::Corrupt`, and only one at or past it is a torn tail.
//!
//! The layout: ARCHITECTURE.md, "On disk", "MARKS".
//!
//! The header's CRC ties a mark to one file: ids start again at 1 once every segment has been
//! deleted, and a mark left for an earlier file of the same id must not apply to a new one.
//!
//! Why it is safe to write without a sync: a mark is written only after the sync that made its
//! bytes durable has returned, so whatever version of the file reaches the disk never claims
//! more than is durable. A process crash keeps the file (it is in the page cache). A power cut
//! may leave it stale (fewer records protected than could be: still safe) or torn (its CRC
//! fails and it reads as no marks: the store then behaves as a store without the file, as
//! stores written before it existed do). `Store::close` syncs it, so a cleanly closed store
//! has every record protected. The file only ever grows in place: a shorter content is written
//! over the start of a longer one, and the count says where it ends.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::bytes::{u32_at, usize_from};
use crate::io::{Io, IoFile};
use crate::log::segment::Segment;

/// Name of the marks file in a store directory.
pub const MARKS_FILE_NAME: &str = "MARKS";
const MAGIC: [u8; 8] = *b"IDEMMARK";
const VERSION: u32 = 1;
const HEAD_LEN: usize = 16;
const ENTRY_LEN: usize = 12;
/// The most bytes the file may take: its map's capacity. 87 000 segments' marks; a store with
/// more keeps the marks of its newest segments (see `encode`).
const CAPACITY: u64 = 1 << 20;

/// How far one segment file is known durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// The CRC stored in the segment's header (which file of that id the mark is for).
    pub header_crc: u32,
    /// Every record that starts below this offset was durable when the mark was written.
    pub end: u32,
}

/// Why a `MARKS` file could not be used (it is then ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarksProblem {
    /// Too short, wrong magic, a count past the end, or a checksum mismatch.
    Damaged(&'static str),
    /// Written by a newer build.
    UnsupportedVersion(u32),
}

/// The CRC a segment header carries (bytes 60..64 of its encoding).
pub fn header_crc(segment: &Segment) -> u32 {
    u32_at(&segment.header.encode(), 60)
}

/// The mark that applies to `segment` in `marks`: the durable end in bytes, or 0 when none
/// does (no entry, or one for another file of the same id).
pub fn durable_end(marks: &BTreeMap<u32, Mark>, segment: &Segment) -> u64 {
    match marks.get(&segment.id()) {
        Some(mark) if mark.header_crc == header_crc(segment) => u64::from(mark.end),
        _ => 0,
    }
}

/// Reads `dir`'s `MARKS`: `Ok(None)` when there is none.
pub fn read(io: &dyn Io, dir: &Path) -> Result<Option<BTreeMap<u32, Mark>>, MarksProblem> {
    let Ok(file) = io.open(&dir.join(MARKS_FILE_NAME), CAPACITY, false) else {
        return Ok(None);
    };
    let len = usize::try_from(file.len()).unwrap_or(usize::MAX);
    if len < HEAD_LEN + 4 {
        return Err(MarksProblem::Damaged("marks file too short"));
    }
    let mut head = [0u8; HEAD_LEN];
    file.read_at(0, &mut head).map_err(|_| MarksProblem::Damaged("marks file unreadable"))?;
    if head[0..8] != MAGIC {
        return Err(MarksProblem::Damaged("bad marks magic"));
    }
    let version = u32_at(&head, 8);
    if version != VERSION {
        return Err(MarksProblem::UnsupportedVersion(version));
    }
    let count = u32_at(&head, 12) as usize;
    let body_len = count.checked_mul(ENTRY_LEN).and_then(|n| n.checked_add(HEAD_LEN));
    let Some(body_len) = body_len.filter(|&n| n + 4 <= len) else {
        return Err(MarksProblem::Damaged("marks count runs past the end of the file"));
    };
    let mut raw = vec![0u8; body_len + 4];
    file.read_at(0, &mut raw).map_err(|_| MarksProblem::Damaged("marks file unreadable"))?;
    if crc32fast::hash(&raw[..body_len]) != u32_at(&raw, body_len) {
        return Err(MarksProblem::Damaged("marks checksum mismatch"));
    }
    let marks = raw[HEAD_LEN..body_len]
        .chunks_exact(ENTRY_LEN)
        .map(|e| (u32_at(e, 0), Mark { header_crc: u32_at(e, 4), end: u32_at(e, 8) }))
        .collect();
    Ok(Some(marks))
}

/// The marks of `dir` for recovery and `verify`: none when the file is missing, damaged or of
/// another version (the store then treats every bad tail as it did before marks existed).
pub fn read_or_none(io: &dyn Io, dir: &Path) -> BTreeMap<u32, Mark> {
    read(io, dir).ok().flatten().unwrap_or_default()
}

/// The file's bytes for `marks`: the newest segments' marks when they do not all fit.
fn encode(marks: &BTreeMap<u32, Mark>, out: &mut Vec<u8>) {
    let fit = (usize_from(CAPACITY) - HEAD_LEN - 4) / ENTRY_LEN;
    let skip = marks.len().saturating_sub(fit);
    out.clear();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    #[expect(
        clippy::cast_possible_truncation,
        reason = "at most `fit` marks, a few hundred: what the file's capacity holds"
    )]
    let count = (marks.len() - skip) as u32;
    out.extend_from_slice(&count.to_le_bytes());
    for (id, mark) in marks.iter().skip(skip) {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&mark.header_crc.to_le_bytes());
        out.extend_from_slice(&mark.end.to_le_bytes());
    }
    let crc = crc32fast::hash(out);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Writes `marks` as `dir`'s `MARKS` whole, synced, with its name made durable (salvage).
pub fn write_synced(io: &dyn Io, dir: &Path, marks: &BTreeMap<u32, Mark>) -> std::io::Result<()> {
    let path = dir.join(MARKS_FILE_NAME);
    let tmp = dir.join("MARKS.tmp");
    let _ = io.remove(&tmp);
    let mut raw = Vec::new();
    encode(marks, &mut raw);
    let file = io.create(&tmp, CAPACITY)?;
    file.reserve(raw.len() as u64)?;
    file.write_at(0, &raw)?;
    file.sync()?;
    drop(file);
    io.rename(&tmp, &path)?;
    io.sync_dir(dir)
}

/// The writer's marks while the store runs.
pub struct Marks {
    io: Arc<dyn Io>,
    dir: PathBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// False for a read-only view (and before a writer loads them): nothing is written.
    enabled: bool,
    marks: BTreeMap<u32, Mark>,
    /// The marks changed since the file was last written.
    changed: bool,
    file: Option<Box<dyn IoFile>>,
    /// The file's name may not be durable yet (created by this process, no directory sync).
    created: bool,
    buf: Vec<u8>,
}

impl Marks {
    /// Marks that write nothing until [`Marks::load`].
    pub fn disabled(io: Arc<dyn Io>, dir: PathBuf) -> Self {
        Marks { io, dir, state: Mutex::new(State::default()) }
    }

    /// Starts keeping marks for a writer whose live segments are `segments`: the file's marks
    /// for them, raised to the end of their records where recovery found and synced them.
    pub fn load<'a>(&self, segments: impl Iterator<Item = &'a Arc<Segment>>) {
        let old = read_or_none(self.io.as_ref(), &self.dir);
        let mut state = self.state.lock();
        state.enabled = true;
        state.marks.clear();
        for segment in segments {
            let crc = header_crc(segment);
            let mut end = durable_end(&old, segment);
            // A scanned segment's records were synced by recovery; they lie back to back from
            // the header on. (A segment with a table has no records counted: its old mark
            // stands.)
            let (record_bytes, _) = segment.byte_counts();
            if record_bytes > 0 {
                end = end.max(crate::log::segment::SEGMENT_HEADER_LEN + record_bytes);
            }
            if let Ok(end) = u32::try_from(end)
                && end > 0
            {
                state.marks.insert(segment.id(), Mark { header_crc: crc, end });
            }
        }
        // Written now, not at the first sync: marks of segments deleted since (expired
        // buckets, files recovery removed) must be gone before a new file takes their id.
        // Every value is durable: recovery synced what it scanned. A failure leaves the old
        // file, whose stale entries the header CRC still tells apart.
        state.changed = true;
        if !old.is_empty() {
            let _ = self.write(&mut state);
        }
    }

    /// A sync covered `segments` up to the given ends: raises their marks and writes the file
    /// (into the page cache: no sync, see the module's comment). Called after the sync
    /// returned, never before.
    pub fn note_synced(&self, segments: &[Arc<Segment>], ends: &[u64]) -> std::io::Result<()> {
        let mut state = self.state.lock();
        if !state.enabled {
            return Ok(());
        }
        for (segment, end) in segments.iter().zip(ends) {
            let Ok(end) = u32::try_from(*end) else { continue };
            if segment.is_dropped() {
                state.marks.remove(&segment.id());
                continue;
            }
            let mark = state.marks.entry(segment.id()).or_insert(Mark { header_crc: header_crc(segment), end: 0 });
            if end > mark.end {
                mark.end = end;
                state.changed = true;
            }
        }
        self.write(&mut state)
    }

    /// Forgets the marks of segments that are gone (deleted buckets); the file loses them at
    /// its next write.
    pub fn forget(&self, ids: impl Iterator<Item = u32>) {
        let mut state = self.state.lock();
        for id in ids {
            state.changed |= state.marks.remove(&id).is_some();
        }
    }

    /// Writes the file if the marks changed.
    fn write(&self, state: &mut State) -> std::io::Result<()> {
        if !state.changed {
            return Ok(());
        }
        let path = self.dir.join(MARKS_FILE_NAME);
        if state.file.is_none() {
            let file = match self.io.open(&path, CAPACITY, true) {
                Ok(file) => file,
                Err(_) => {
                    state.created = true;
                    self.io.create(&path, CAPACITY)?
                }
            };
            state.file = Some(file);
        }
        let mut buf = std::mem::take(&mut state.buf);
        encode(&state.marks, &mut buf);
        let result = match &state.file {
            Some(file) => {
                let len = buf.len() as u64;
                let grown = if file.len() < len { file.reserve(len) } else { Ok(()) };
                grown.and_then(|()| file.write_at(0, &buf))
            }
            None => Ok(()),
        };
        state.buf = buf;
        result?;
        state.changed = false;
        Ok(())
    }

    /// Writes the marks if they changed and syncs the file (and, if this process created it,
    /// the directory): at close, after the final sync, so a closed store protects every record.
    pub fn sync(&self) -> std::io::Result<()> {
        let mut state = self.state.lock();
        if !state.enabled {
            return Ok(());
        }
        self.write(&mut state)?;
        if let Some(file) = &state.file {
            file.sync()?;
            if state.created {
                self.io.sync_dir(&self.dir)?;
                state.created = false;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::sim::SimDisk;

    #[test]
    fn written_marks_read_back_and_damage_reads_as_none() {
        let disk = SimDisk::new();
        let dir = Path::new("/store");
        disk.create_dir_all(dir).unwrap();
        let mut marks = BTreeMap::new();
        marks.insert(3, Mark { header_crc: 7, end: 4096 });
        marks.insert(9, Mark { header_crc: 8, end: 128 });
        write_synced(&disk, dir, &marks).unwrap();
        assert_eq!(read(&disk, dir).unwrap(), Some(marks));
        let file = disk.open(&dir.join(MARKS_FILE_NAME), CAPACITY, true).unwrap();
        file.write_at(20, &[0xff]).unwrap();
        assert_eq!(read(&disk, dir), Err(MarksProblem::Damaged("marks checksum mismatch")));
        assert!(read_or_none(&disk, dir).is_empty());
    }
}
