//! One segment file: a 64-byte header naming its expiry bucket, then records.
//!
//! The header's layout: ARCHITECTURE.md, "On disk", "Segment header".

use std::path::{Path, PathBuf};

use crate::bytes::usize_from;
use crate::error::{Error, Result};
use crate::io::{Io, IoFile};
use crate::log::record::{self, DecodeError, HEADER_LEN, Header, u32_at, u64_at};

/// Bytes of the segment header; records start here.
pub const SEGMENT_HEADER_LEN: u64 = 64;
/// Magic bytes opening every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"IDEMSEG\0";
/// The segment (and record) format version this build reads and writes: 1 in stores of both
/// format versions (the store's own version is in `META`, see `recovery/meta.rs`).
pub const FORMAT_VERSION: u32 = 1;
/// File name extension of segment files.
pub const SEGMENT_EXT: &str = "seg";

/// The file name of segment `id`.
pub fn segment_file_name(id: u32) -> String {
    format!("{id:08x}.{SEGMENT_EXT}")
}

/// The segment id in a segment file name, if it is one.
pub fn parse_segment_file_name(name: &str) -> Option<u32> {
    let stem = name.strip_suffix(".seg")?;
    if stem.len() != 8 {
        return None;
    }
    u32::from_str_radix(stem, 16).ok()
}

/// The decoded segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Segment id, also in the file name.
    pub id: u32,
    /// Start of the expiry bucket.
    pub bucket_start_ms: u64,
    /// End of the expiry bucket: every record in the file expires before this.
    pub bucket_end_ms: u64,
    /// When the file was created.
    pub created_at_ms: u64,
    /// The header was rebuilt from the records by `salvage` (byte 40, bit 0; a reserved byte
    /// that builds before it ignore). Its bucket is a guess narrower than the original, so the
    /// segment may sort wrongly among its bucket's sealed tables (newest first by bucket end):
    /// it never gets a table and is scanned into the RAM index at every open, where a key's
    /// newest record wins by sequence number.
    pub rebuilt: bool,
}

impl SegmentHeader {
    /// The 64 header bytes.
    pub fn encode(&self) -> [u8; usize_from(SEGMENT_HEADER_LEN)] {
        let mut b = [0u8; usize_from(SEGMENT_HEADER_LEN)];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.bucket_start_ms.to_le_bytes());
        b[24..32].copy_from_slice(&self.bucket_end_ms.to_le_bytes());
        b[32..40].copy_from_slice(&self.created_at_ms.to_le_bytes());
        b[40] = u8::from(self.rebuilt);
        let crc = crc32fast::hash(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a header. `Ok(None)` means the header is all zeros: the file was created but its
    /// header never reached the disk; it holds nothing only if the rest of it is zeros too (see
    /// `Segment::open`).
    pub fn decode(path: &Path, b: &[u8; usize_from(SEGMENT_HEADER_LEN)]) -> Result<Option<Self>> {
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let corrupt = |reason| Error::Corrupt { file: path.to_path_buf(), offset: 0, reason };
        if b[0..8] != SEGMENT_MAGIC {
            return Err(corrupt("not a segment file (bad magic)"));
        }
        if crc32fast::hash(&b[0..60]) != u32_at(b, 60) {
            return Err(corrupt("segment header checksum mismatch"));
        }
        let version = u32_at(b, 8);
        if version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                file: path.to_path_buf(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let header = SegmentHeader {
            id: u32_at(b, 12),
            bucket_start_ms: u64_at(b, 16),
            bucket_end_ms: u64_at(b, 24),
            created_at_ms: u64_at(b, 32),
            rebuilt: b[40] & 1 == 1,
        };
        if header.bucket_end_ms <= header.bucket_start_ms {
            return Err(corrupt("segment header has an empty bucket"));
        }
        Ok(Some(header))
    }
}

/// A segment file made ahead of need, waiting for a bucket.
pub struct SpareFile {
    pub id: u32,
    path: PathBuf,
    file: Box<dyn IoFile>,
}

impl SpareFile {
    /// Bytes the spare file reserves.
    pub fn len(&self) -> u64 {
        self.file.len()
    }
}

/// An open segment file.
pub struct Segment {
    pub header: SegmentHeader,
    pub path: PathBuf,
    file: Box<dyn IoFile>,
    /// Store time of the latest record written into this segment.
    last_write_ms: std::sync::atomic::AtomicU64,
    /// Bytes of records in this segment (known since open: appended, or found by a scan).
    record_bytes: std::sync::atomic::AtomicU64,
    /// Bytes of those records that a later record of the same key superseded.
    dead_bytes: std::sync::atomic::AtomicU64,
    /// A growth step ahead of need is queued or running (see `Log::grow_ahead`).
    growing: std::sync::atomic::AtomicBool,
    /// The CRC state after this segment's id (every record's checksum starts with it).
    crc_seed: crc32fast::Hasher,
    /// Taken out of the log's segments (its bucket expired): handles kept elsewhere (see
    /// `SegmentCache`) must treat it as gone.
    dropped: std::sync::atomic::AtomicBool,
    /// End of the last record written by this process (`u64::MAX` for a segment opened from
    /// disk: this process never appends to it). A read stops here: past it the appender may
    /// be writing the next record, and copying bytes another thread writes is a data race.
    written_end: std::sync::atomic::AtomicU64,
    /// The lane this segment takes appends in, `NO_LANE` once it takes none (retired, or
    /// found at open). Set and cleared under that lane's lock; read without it to pick the
    /// lane of a record that supersedes one in this segment (see `Log::append`).
    appending_lane: std::sync::atomic::AtomicUsize,
}

/// `Segment::appending_lane` of a segment that takes no appends.
const NO_LANE: usize = usize::MAX;

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment").field("path", &self.path).field("header", &self.header).finish()
    }
}

/// What a read at an index location found.
pub enum Probe {
    /// The record there is for the key asked about.
    Match(Header),
    /// The record there is for another key with the same hash.
    OtherKey,
}

/// Grows `file` to `len` with zeroed space, one page per write call when `paged`
/// (`IoFile::reserve_paged`, for `Sync` stores) or in bulk.
fn reserve_zeroed(file: &dyn IoFile, len: u64, paged: bool) -> std::io::Result<()> {
    if paged { file.reserve_paged(len) } else { file.reserve(len) }
}

/// The offset of the first non-zero byte of `file` at or after `from`, if any. Read in chunks:
/// only files whose header reads as zeros are searched, a spare's few hundred KiB at most
/// unless the file is damaged.
fn first_non_zero(file: &dyn IoFile, path: &Path, from: u64) -> Result<Option<u64>> {
    const CHUNK: u64 = 64 << 10;
    let len = file.len();
    let mut buf = vec![0u8; usize_from(CHUNK.min(len.saturating_sub(from)))];
    let mut at = from;
    while at < len {
        let n = usize_from(CHUNK.min(len - at));
        file.read_at(at, &mut buf[..n]).map_err(|e| Error::io("read segment", path, e))?;
        if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
            return Ok(Some(at + i as u64));
        }
        at += n as u64;
    }
    Ok(None)
}

impl Segment {
    /// Creates a new segment file with `initial_bytes` reserved and its header written.
    pub fn create(
        io: &dyn Io,
        dir: &Path,
        header: SegmentHeader,
        capacity: u64,
        initial_bytes: u64,
        paged: bool,
    ) -> Result<Segment> {
        let spare = Segment::create_spare(io, dir, header.id, capacity, initial_bytes, paged)?;
        Segment::from_spare(io, spare, header)
    }

    /// Creates a segment file ahead of need: reserved and zero-filled, without a header (an
    /// empty file to recovery, which removes it). The caller makes its directory entry durable.
    /// `paged`: zero-filled one page per write (`IoFile::reserve_paged`).
    pub fn create_spare(
        io: &dyn Io,
        dir: &Path,
        id: u32,
        capacity: u64,
        initial_bytes: u64,
        paged: bool,
    ) -> Result<SpareFile> {
        let path = dir.join(segment_file_name(id));
        let file = io.create(&path, capacity).map_err(|e| Error::io("create segment", &path, e))?;
        if let Err(e) = reserve_zeroed(file.as_ref(), initial_bytes.max(SEGMENT_HEADER_LEN), paged) {
            // Leave no empty file behind; its removal is best effort (the error is what matters).
            drop(file);
            let _ = io.remove(&path);
            return Err(Error::io("reserve segment space", path, e));
        }
        Ok(SpareFile { id, path, file })
    }

    /// Turns a spare file into the segment `header` describes by writing its header.
    pub fn from_spare(io: &dyn Io, spare: SpareFile, header: SegmentHeader) -> Result<Segment> {
        debug_assert_eq!(spare.id, header.id);
        let SpareFile { path, file, .. } = spare;
        if let Err(e) = file.write_at(0, &header.encode()) {
            drop(file);
            let _ = io.remove(&path);
            return Err(Error::io("write segment header", path, e));
        }
        Ok(Segment::new(header, path, file, SEGMENT_HEADER_LEN))
    }

    fn new(header: SegmentHeader, path: PathBuf, file: Box<dyn IoFile>, written_end: u64) -> Segment {
        Segment {
            header,
            path,
            file,
            last_write_ms: header.created_at_ms.into(),
            record_bytes: 0.into(),
            dead_bytes: 0.into(),
            growing: false.into(),
            crc_seed: record::checksum_hasher(header.id),
            dropped: false.into(),
            written_end: written_end.into(),
            appending_lane: NO_LANE.into(),
        }
    }

    /// Opens an existing segment; `Ok(None)` when the file is all zeros (or too short for a
    /// header): a spare (created ahead of need) whose header was never written, holding
    /// nothing. A header that reads as zeros
    /// over anything else is `Error::Corrupt`: records follow, and they are the only copy of
    /// their keys, so the file must not be taken for an empty spare and deleted.
    pub fn open(io: &dyn Io, path: &Path, capacity: u64, writable: bool) -> Result<Option<Segment>> {
        let file = io.open(path, capacity, writable).map_err(|e| Error::io("open segment", path, e))?;
        let len = file.len();
        let mut raw = [0u8; usize_from(SEGMENT_HEADER_LEN)];
        if len < SEGMENT_HEADER_LEN {
            // Too short to hold a header, let alone a record: nothing in it can be lost.
            return Ok(None);
        }
        file.read_at(0, &mut raw).map_err(|e| Error::io("read segment header", path, e))?;
        let Some(header) = SegmentHeader::decode(path, &raw)? else {
            return match first_non_zero(file.as_ref(), path, SEGMENT_HEADER_LEN)? {
                None => Ok(None),
                Some(_) => Err(Error::Corrupt {
                    file: path.to_path_buf(),
                    offset: 0,
                    reason: "segment header reads as zeros, yet bytes follow it (a lost header, not a spare)",
                }),
            };
        };
        Ok(Some(Segment::new(header, path.to_path_buf(), file, u64::MAX)))
    }

    /// Notes that a record written at `ms` (store time) went into this segment.
    ///
    /// Callers are serialized (its lane's lock, or recovery's one thread), so a load and a
    /// store do, without a locked read-modify-write on every append.
    pub fn note_write(&self, ms: u64) {
        if ms > self.last_write_ms.load(std::sync::atomic::Ordering::Relaxed) {
            self.last_write_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Counts a record of `padded_len` bytes written into (or found in) this segment. Callers
    /// are serialized, as for `note_write`.
    pub fn note_record(&self, padded_len: u64) {
        let bytes = self.record_bytes.load(std::sync::atomic::Ordering::Relaxed);
        self.record_bytes.store(bytes + padded_len, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts a record of `padded_len` bytes in this segment as superseded by a later record
    /// of its key.
    pub fn note_dead(&self, padded_len: u64) {
        self.dead_bytes.fetch_add(padded_len, std::sync::atomic::Ordering::Relaxed);
    }

    /// (record bytes, superseded bytes) known since open.
    pub fn byte_counts(&self) -> (u64, u64) {
        (
            self.record_bytes.load(std::sync::atomic::Ordering::Relaxed),
            self.dead_bytes.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Store time of the latest record in this segment.
    pub fn last_write_ms(&self) -> u64 {
        self.last_write_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn id(&self) -> u32 {
        self.header.id
    }

    /// Reserved (readable and writable) length of the file.
    pub fn len(&self) -> u64 {
        self.file.len()
    }

    /// Grows the reserved length to `len`, zero-filled; `paged` as in `create_spare`.
    pub fn reserve(&self, len: u64, paged: bool) -> Result<()> {
        reserve_zeroed(self.file.as_ref(), len, paged).map_err(|e| Error::io("reserve segment space", &self.path, e))
    }

    /// Encodes a record straight into the file at `offset` (space already reserved), the end
    /// of what was written before (callers are serialized: its lane's lock), and moves the
    /// end readers may copy from past it.
    pub fn write_record(&self, offset: u64, header: &Header, key: &[u8], value: &[u8]) -> Result<()> {
        let len = usize_from(header.padded_len());
        self.file
            .write_with(offset, len, &mut |out| record::encode_into(&self.crc_seed, header, key, value, out))
            .map_err(|e| Error::io("write record", &self.path, e))?;
        let end = offset + len as u64;
        debug_assert!(end > self.written_end.load(std::sync::atomic::Ordering::Relaxed));
        self.written_end.store(end, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.file.write_at(offset, bytes).map_err(|e| Error::io("write record", &self.path, e))
    }

    /// Takes the right to grow this segment ahead of need; false when it is already queued.
    pub fn claim_growth(&self) -> bool {
        !self.growing.swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// Gives that right back once the growth step is done (or given up).
    pub fn end_growth(&self) {
        self.growing.store(false, std::sync::atomic::Ordering::Release);
    }

    /// The lane taking appends into this segment, if any (see `appending_lane`).
    pub fn appending_lane(&self) -> Option<usize> {
        let lane = self.appending_lane.load(std::sync::atomic::Ordering::Acquire);
        (lane != NO_LANE).then_some(lane)
    }

    /// Records that lane `lane` takes appends into this segment from now on, or, with `None`,
    /// that it takes no more (called under that lane's lock).
    pub fn set_appending_lane(&self, lane: Option<usize>) {
        self.appending_lane.store(lane.unwrap_or(NO_LANE), std::sync::atomic::Ordering::Release);
    }

    /// Marks the segment as taken out of the log (see `dropped`).
    pub fn mark_dropped(&self) {
        self.dropped.store(true, std::sync::atomic::Ordering::Release);
    }

    /// True once the segment was taken out of the log.
    pub fn is_dropped(&self) -> bool {
        self.dropped.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Drops this process's mappings of the segment's pages (see `IoFile`): for a segment
    /// about to be deleted, or one that takes no more appends, before it is synced.
    pub fn release_pages(&self) {
        self.file.release_pages();
    }

    /// Closes the descriptor of a segment that takes no more space (see `IoFile`).
    pub fn release_descriptor(&self) {
        self.file.release_descriptor();
    }

    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync()
    }

    /// `sync` for background work (sealing): in slices with rests between.
    pub fn sync_gradually(&self) -> std::io::Result<()> {
        self.file.sync_gradually()
    }

    fn corrupt(&self, offset: u64, e: DecodeError) -> Error {
        Error::Corrupt { file: self.path.clone(), offset, reason: e.reason() }
    }

    /// Reads the record at `offset` and tells whether it is `key`'s. The whole record's CRC is
    /// verified either way: a damaged key must be an error, never "another key" (which would
    /// make a stored key look absent and let its effect run twice).
    pub fn probe(&self, offset: u64, key: &[u8]) -> Result<Probe> {
        Ok(match self.probe_read(offset, key)? {
            Some((header, _)) => Probe::Match(header),
            None => Probe::OtherKey,
        })
    }

    /// Like [`Segment::probe`], and on a match also returns the record's value. The record is
    /// copied out once (bytes in the map are never trusted in place: a read-only viewer shares
    /// them with a live writer), and the CRC is checked over that copy in one pass.
    pub fn probe_read(&self, offset: u64, key: &[u8]) -> Result<Option<(Header, Vec<u8>)>> {
        /// Records up to this size (header, key, value) are read into a stack buffer: a 16 B key
        /// with an outcome up to 144 B. Small enough to zero inline, where a larger buffer
        /// costs a `memset` call on every replay.
        const SMALL_RECORD: usize = 256;
        let mut small = [0u8; SMALL_RECORD];
        // One read takes the header and, for a small record, all of it: its length is not
        // known before the header is parsed, and a second call costs more than the extra bytes.
        // It stops at the end of what was written: the next record may be being written there.
        let written = self.written_end.load(std::sync::atomic::Ordering::Acquire);
        let want = usize::try_from(written.saturating_sub(offset)).map_or(SMALL_RECORD, |n| n.min(SMALL_RECORD));
        let got =
            self.file.read_prefix(offset, &mut small[..want]).map_err(|e| Error::io("read record", &self.path, e))?;
        let head = small[..got].get(..HEADER_LEN).ok_or_else(|| self.corrupt(offset, DecodeError::Truncated))?;
        let header = record::parse_header(head).map_err(|e| self.corrupt(offset, e))?;
        let record_len = header.record_len();
        // A small record must lie within what was read; a large one within what was written
        // and the file's length now.
        let past_end = if record_len <= SMALL_RECORD {
            record_len > got
        } else {
            offset.saturating_add(record_len as u64) > written.min(self.file.len())
        };
        if past_end {
            return Err(self.corrupt(offset, DecodeError::Truncated));
        }
        let mut large = Vec::new();
        let bytes = if record_len <= SMALL_RECORD {
            &mut small[..record_len]
        } else {
            // The header goes in as already read and parsed, not read again: the CRC must
            // approve the very bytes `header` came from (the map may change under a viewer).
            large.resize(record_len, 0);
            large[..HEADER_LEN].copy_from_slice(&small[..HEADER_LEN]);
            self.file
                .read_at(offset + HEADER_LEN as u64, &mut large[HEADER_LEN..])
                .map_err(|e| Error::io("read record", &self.path, e))?;
            &mut large[..]
        };
        // One CRC pass over the whole record: past 128 bytes crc32fast folds with PCLMULQDQ,
        // which a header-then-rest split would miss for most replays.
        let mut hasher = self.crc_seed.clone();
        hasher.update(&bytes[4..]);
        if hasher.finalize() != record::stored_checksum(bytes) {
            return Err(self.corrupt(offset, DecodeError::BadChecksum));
        }
        let value_at = HEADER_LEN + usize::from(header.key_len);
        if bytes.get(HEADER_LEN..value_at) != Some(key) {
            return Ok(None);
        }
        if record_len <= SMALL_RECORD {
            return Ok(Some((header, bytes[value_at..].to_vec())));
        }
        // A large record: its buffer becomes the value (header and key cut off the front).
        large.drain(..value_at);
        Ok(Some((header, large)))
    }

    /// Starts loading the record at `offset` into cache (a hint; see `IoFile::prefetch`).
    pub fn prefetch(&self, offset: u64) {
        self.file.prefetch(offset);
    }

    /// Reads the key of the record at `offset` (a location an index vouches for).
    pub fn key_at(&self, offset: u64) -> Result<Vec<u8>> {
        let mut raw = [0u8; HEADER_LEN];
        self.file.read_at(offset, &mut raw).map_err(|e| Error::io("read record", &self.path, e))?;
        let header = record::parse_header(&raw).map_err(|e| self.corrupt(offset, e))?;
        let mut key = vec![0u8; usize::from(header.key_len)];
        self.file
            .read_at(offset + HEADER_LEN as u64, &mut key)
            .map_err(|e| Error::io("read record key", &self.path, e))?;
        Ok(key)
    }

    /// End of what this process wrote to this segment (the end of its last record); for a
    /// segment found at open, its length. The caller holds its lane's lock when it needs a
    /// record boundary.
    pub fn written_end(&self) -> u64 {
        self.written_end.load(std::sync::atomic::Ordering::Acquire).min(self.len())
    }

    /// Reads `len` raw bytes at `offset` (recovery scans use this).
    pub fn read_raw(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file.read_at(offset, &mut buf).map_err(|e| Error::io("read segment", &self.path, e))?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::sim::SimDisk;
    use crate::log::record::Kind;

    #[test]
    fn a_record_read_stops_at_the_end_of_what_was_written() {
        let disk = SimDisk::new();
        let dir = Path::new("/store");
        disk.create_dir_all(dir).unwrap();
        let header =
            SegmentHeader { id: 1, bucket_start_ms: 0, bucket_end_ms: 60_000, created_at_ms: 0, rebuilt: false };
        let segment = Segment::create(&disk, dir, header, 4096, 4096, false).unwrap();
        let record = Header {
            kind: Kind::Claim,
            key_len: 3,
            value_len: 0,
            seq: 1,
            expires_at_ms: 60_000,
            claimed_at_ms: 0,
            lease_until_ms: 1,
            token: 1,
            incarnation: 1,
            request_hash: 7,
            written_at_ms: 0,
            lease_ms: 1,
        };
        segment.write_record(SEGMENT_HEADER_LEN, &record, b"key", &[]).unwrap();
        let before = disk.read_bytes();
        let (found, value) = segment.probe_read(SEGMENT_HEADER_LEN, b"key").unwrap().expect("the record");
        assert_eq!(
            disk.read_bytes() - before,
            record.padded_len(),
            "the read went past the record, where the next one may be being written"
        );
        assert_eq!((found.seq, value.len()), (1, 0));
        assert!(segment.probe_read(SEGMENT_HEADER_LEN, b"other").unwrap().is_none());
    }
}
