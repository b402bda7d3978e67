//! Fuzz target bodies (feature `fuzzing`), shared by the cargo-fuzz crate in `fuzz/` and by
//! `tests/fuzz_corpus.rs`, which replays every checked-in corpus and regression input.
//!
//! Each function takes arbitrary bytes and panics only on a real bug:
//!
//! - [`record_decode`]: the record decoder never panics, and never returns a record that is not
//!   exactly what the encoder writes for it (so it never returns a record whose checksum does
//!   not match its bytes).
//! - [`recover`]: a valid store image, damaged on purpose (flipped bytes, truncations, zeroed
//!   and copied ranges, deleted files, a newer format version), opens with a clear `Error` or
//!   opens and returns only states that were really written, with their exact outcomes.
//! - [`ops_model`]: a sequence of operations (claims, completes, checkpoints, releases,
//!   removes, reads, clock steps, reopens and power cuts) under `Durability::Sync` behaves
//!   exactly like a plain `HashMap` model after every step.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};

use crate::clock::{ManualClock, ms_to_system_time};
use crate::io::sim::SimDisk;
use crate::log::record::{self, DecodeError};
use crate::log::segment::SEGMENT_HEADER_LEN;
use crate::{Claim, ClaimOptions, ClaimToken, Completed, Durability, Entry, Error, Options, Orphan, Store};

/// Where the simulated stores of the fuzz targets live on their `SimDisk`.
const STORE_DIR: &str = "/idemstore-fuzz/store";
/// The manual clock's start: a plausible wall-clock time in milliseconds.
const START_MS: u64 = 1_700_000_000_000;

// ---------------------------------------------------------------------------------------------
// record_decode
// ---------------------------------------------------------------------------------------------

/// Decodes arbitrary bytes as one record.
///
/// Input layout: 4 bytes of segment id (little endian), 1 mode byte, then the record bytes.
/// When the mode's low bit is set, the record's CRC field is first overwritten with the correct
/// checksum of the bytes its length field covers, so the fuzzer also explores every check that
/// sits behind the checksum.
///
/// Panics (a bug) when the decoder panics, when it returns a record whose re-encoding differs
/// from the input's record bytes, or when a record it accepts under one segment id is not
/// refused with `BadChecksum` under another.
pub fn record_decode(data: &[u8]) {
    let Some((id_bytes, rest)) = data.split_first_chunk::<4>() else { return };
    let segment_id = u32::from_le_bytes(*id_bytes);
    let Some((&mode, record_bytes)) = rest.split_first() else { return };
    let mut bytes = record_bytes.to_vec();
    if mode & 1 == 1 {
        fix_record_checksum(segment_id, &mut bytes);
    }
    let Ok((header, key, value)) = record::decode(segment_id, &bytes) else { return };
    assert_eq!(key.len(), usize::from(header.key_len), "decoded key length disagrees with its header");
    assert_eq!(value.len(), header.value_len as usize, "decoded value length disagrees with its header");
    assert!(header.seq > 0 && header.key_len > 0, "decode returned an impossible header: {header:?}");
    let len = header.record_len();
    let mut encoded = Vec::new();
    record::encode(segment_id, &header, key, value, &mut encoded);
    assert_eq!(encoded.len() as u64, header.padded_len(), "encode wrote a record of the wrong padded length");
    let differing: Vec<usize> = (0..len).filter(|&i| encoded[i] != bytes[i]).collect();
    assert!(
        differing.is_empty(),
        "decode accepted bytes that encode never writes for the same record: header {header:?}, \
         differing offsets {differing:?} (0..4 is the CRC, 9 the flags, 92..96 reserved)"
    );
    assert!(encoded[len..].iter().all(|&b| b == 0), "encode padded with non-zero bytes");
    assert_eq!(
        record::decode(segment_id.wrapping_add(1), &bytes).err(),
        Some(DecodeError::BadChecksum),
        "a record accepted in segment {segment_id} must fail its checksum in any other segment"
    );
}

/// Overwrites the CRC field of `bytes` with the checksum of the bytes its length field covers
/// (clamped to what is there), seeded with the segment id as the format prescribes.
fn fix_record_checksum(segment_id: u32, bytes: &mut [u8]) {
    if bytes.len() < 8 {
        return;
    }
    let claimed_len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    let end = claimed_len.clamp(4, bytes.len());
    let mut hasher = crate::log::record::checksum_hasher(segment_id);
    hasher.update(&bytes[4..end]);
    bytes[0..4].copy_from_slice(&hasher.finalize().to_le_bytes());
}

// ---------------------------------------------------------------------------------------------
// recover
// ---------------------------------------------------------------------------------------------

/// What was ever written for one key while the image was built: any state recovery returns
/// for the key must be one of these (losing the key is allowed: the image is damaged).
#[derive(Debug, Default, Clone)]
struct KeyHistory {
    request: Vec<u8>,
    claimed: bool,
    outcomes: Vec<Vec<u8>>,
    checkpoints: Vec<Vec<u8>>,
}

type History = HashMap<Vec<u8>, KeyHistory>;

fn recover_options(disk: &SimDisk, clock: &Arc<ManualClock>, small_segments: bool) -> Options {
    Options {
        durability: Durability::None,
        max_key_len: 64,
        max_outcome_len: 512,
        bucket_width: Duration::from_secs(3600),
        // 1 KiB segments put a bucket's records into several files.
        segment_bytes_max: if small_segments { 1024 } else { 64 << 10 },
        segment_bytes_initial: 256,
        clock: clock.clone(),
        io: Arc::new(disk.clone()),
        background: false,
        ..Options::default()
    }
}

/// Builds a valid store image on a fresh `SimDisk` with a few keys in every state (completed,
/// in flight with checkpoints, released, removed, taken over, claimed twice), spread over
/// several expiry buckets. Bit 0 of `variant` picks small segments; bit 1 ends with a power
/// cut that keeps a torn prefix of the unsynced writes instead of a clean close; bit 2 makes
/// the disk keep a new file's name from its first sync (as ext4 does), with gradual syncs in
/// small slices.
fn build_image(variant: u8) -> (SimDisk, Arc<ManualClock>, History) {
    let disk = SimDisk::new();
    if variant & 4 == 4 {
        disk.names_durable_on_first_sync(true);
        disk.set_sync_slice_bytes(256);
    }
    let clock = ManualClock::new(START_MS);
    let small_segments = variant & 1 == 1;
    let store = Store::open(STORE_DIR, recover_options(&disk, &clock, small_segments))
        .unwrap_or_else(|e| panic!("opening a fresh simulated store failed: {e}"));
    let mut history = History::new();
    let ttls = [1u64, 2, 3, 24].map(|h| Duration::from_secs(h * 3600));
    let mut taken_over_later = Vec::new();
    for i in 0..12usize {
        let key = format!("key-{i:02}").into_bytes();
        let request = format!("request-{i}").into_bytes();
        let entry =
            history.entry(key.clone()).or_insert_with(|| KeyHistory { request: request.clone(), ..Default::default() });
        let claim_options = ClaimOptions { ttl: Some(ttls[i % ttls.len()]), ..Default::default() };
        let acquire = |entry: &mut KeyHistory| -> ClaimToken {
            match store.claim_with(&key, &request, claim_options.clone()) {
                Ok(Claim::Acquired(token)) => {
                    entry.claimed = true;
                    token
                }
                other => panic!("building the image: claim of a free key gave {other:?}"),
            }
        };
        let outcome = |n: usize| -> Vec<u8> {
            let mut o = format!("outcome {i} #{n} ").into_bytes();
            o.resize(o.len() + i * 37 % 300, b'a' + (i as u8 % 26));
            o
        };
        let ok = |what: &str, result: crate::Result<()>| {
            result.unwrap_or_else(|e| panic!("building the image: {what} failed: {e}"));
        };
        match i % 6 {
            0 => {
                let token = acquire(entry);
                let done = outcome(0);
                ok("complete", store.complete(&token, &done));
                entry.outcomes.push(done);
            }
            1 => {
                let token = acquire(entry);
                for phase in [&b"phase-a"[..], b"phase-b"] {
                    ok("checkpoint", store.checkpoint(&token, phase));
                    entry.checkpoints.push(phase.to_vec());
                }
            }
            2 => {
                let token = acquire(entry);
                ok("release", store.release(&token));
            }
            3 => {
                let token = acquire(entry);
                let done = outcome(0);
                ok("complete", store.complete(&token, &done));
                entry.outcomes.push(done);
                ok("remove", store.remove(&key));
            }
            4 => {
                let token = acquire(entry);
                ok("checkpoint", store.checkpoint(&token, b"before-takeover"));
                entry.checkpoints.push(b"before-takeover".to_vec());
                taken_over_later.push((key.clone(), request.clone(), claim_options.clone()));
            }
            _ => {
                let token = acquire(entry);
                ok("release", store.release(&token));
                let token = acquire(entry);
                let done = outcome(1);
                ok("complete", store.complete(&token, &done));
                entry.outcomes.push(done);
            }
        }
    }
    // Past the default lease: the abandoned claims are taken over and finished by a new holder.
    clock.advance(Duration::from_secs(31));
    for (key, request, claim_options) in taken_over_later {
        let entry = history.get_mut(&key).unwrap_or_else(|| panic!("key {key:?} has no history"));
        let token = match store.claim_with(&key, &request, claim_options) {
            Ok(Claim::Acquired(token)) if token.recovered() => token,
            other => panic!("building the image: takeover after the lease gave {other:?}"),
        };
        store.checkpoint(&token, b"after-takeover").unwrap_or_else(|e| panic!("checkpoint failed: {e}"));
        entry.checkpoints.push(b"after-takeover".to_vec());
        let done = b"finished by the second holder".to_vec();
        store.complete(&token, &done).unwrap_or_else(|e| panic!("complete failed: {e}"));
        entry.outcomes.push(done);
    }
    if variant & 2 == 2 {
        let cut = disk.power_cut(Some(u64::from(variant)));
        drop(store);
        (cut, clock, history)
    } else {
        store.close().unwrap_or_else(|e| panic!("closing the image store failed: {e}"));
        // A clean close gives every segment a table, and a segment with a table is mapped at
        // open, not scanned: damage to its records is `Corrupt` when one is read (as in a
        // sealed segment, `tests/corruption.rs`), never a wrong answer. This target checks the
        // scan, so the image is the store as a crash before any table left it.
        for path in disk.file_paths() {
            if path.extension().is_some_and(|e| e == crate::sealed::TABLE_EXT) {
                let _ = crate::io::Io::remove(&disk, &path);
            }
        }
        (disk, clock, history)
    }
}

/// A cursor over the damage description: little-endian fields, and `None` once it runs out.
struct DamageReader<'a> {
    bytes: &'a [u8],
}

impl DamageReader<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&first, rest) = self.bytes.split_first()?;
        self.bytes = rest;
        Some(first)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes([self.u8()?, self.u8()?, self.u8()?, self.u8()?]))
    }
}

/// The most damage operations one input applies.
const DAMAGE_OPS_MAX: usize = 8;

/// Applies the damage that `description` encodes to the segment files of the image, one
/// operation after another: an opcode byte (taken modulo 6) and its fields. File numbers and
/// offsets are taken modulo the number of files and the file's length, so every operation hits.
///
/// | op | fields | damage |
/// |---:|--------|--------|
/// | 0 | file u8, offset u32, mask u8 | xor one byte with the mask (0 counts as 1) |
/// | 1 | file u8, len u32 | truncate the file to `len % (file len + 1)` |
/// | 2 | file u8, offset u32, len u16 | zero a range |
/// | 3 | src u8, offset u32, dst u8, offset u32, len u16 | copy a range, within the target's length |
/// | 4 | file u8, version u32 | set the header's format version and fix the header CRC |
/// | 5 | file u8 | delete the file |
fn apply_damage(disk: &SimDisk, dir: &Path, description: &[u8]) {
    let mut reader = DamageReader { bytes: description };
    let mut files: Vec<PathBuf> = segment_paths(disk, dir);
    for _ in 0..DAMAGE_OPS_MAX {
        let Some(op) = reader.u8() else { return };
        if files.is_empty() {
            return;
        }
        let pick = |n: u8, files: &[PathBuf]| files[usize::from(n) % files.len()].clone();
        let read = |path: &Path| disk.read_file(path).unwrap_or_default();
        match op % 6 {
            0 => {
                let (Some(f), Some(offset), Some(mask)) = (reader.u8(), reader.u32(), reader.u8()) else { return };
                let path = pick(f, &files);
                let mut bytes = read(&path);
                if !bytes.is_empty() {
                    let at = offset as usize % bytes.len();
                    bytes[at] ^= mask.max(1);
                    disk.write_file(&path, bytes);
                }
            }
            1 => {
                let (Some(f), Some(len)) = (reader.u8(), reader.u32()) else { return };
                let path = pick(f, &files);
                let mut bytes = read(&path);
                bytes.truncate(len as usize % (bytes.len() + 1));
                disk.write_file(&path, bytes);
            }
            2 => {
                let (Some(f), Some(offset), Some(len)) = (reader.u8(), reader.u32(), reader.u16()) else { return };
                let path = pick(f, &files);
                let size = read(&path).len() as u64;
                if size > 0 {
                    let start = u64::from(offset) % size;
                    disk.zero_range(&path, start, u64::from(len))
                        .unwrap_or_else(|e| panic!("zeroing a range of {path:?} failed: {e}"));
                }
            }
            3 => {
                let (Some(src), Some(src_offset), Some(dst), Some(dst_offset), Some(len)) =
                    (reader.u8(), reader.u32(), reader.u8(), reader.u32(), reader.u16())
                else {
                    return;
                };
                let source = read(&pick(src, &files));
                let target_path = pick(dst, &files);
                let mut target = read(&target_path);
                if !source.is_empty() && !target.is_empty() {
                    let from = src_offset as usize % source.len();
                    let to = dst_offset as usize % target.len();
                    let n = usize::from(len).min(source.len() - from).min(target.len() - to);
                    target[to..to + n].copy_from_slice(&source[from..from + n]);
                    disk.write_file(&target_path, target);
                }
            }
            4 => {
                let (Some(f), Some(version)) = (reader.u8(), reader.u32()) else { return };
                let path = pick(f, &files);
                let mut bytes = read(&path);
                if bytes.len() >= SEGMENT_HEADER_LEN as usize {
                    bytes[8..12].copy_from_slice(&version.to_le_bytes());
                    let crc = crc32fast::hash(&bytes[0..60]);
                    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
                    disk.write_file(&path, bytes);
                }
            }
            _ => {
                let Some(f) = reader.u8() else { return };
                let path = pick(f, &files);
                crate::io::Io::remove(disk, &path).unwrap_or_else(|e| panic!("deleting {path:?} failed: {e}"));
                files.retain(|p| *p != path);
            }
        }
    }
}

fn segment_paths(disk: &SimDisk, dir: &Path) -> Vec<PathBuf> {
    disk.file_paths()
        .into_iter()
        .filter(|p| p.parent() == Some(dir) && p.extension().is_some_and(|e| e == "seg"))
        .collect()
}

/// Checks that an in-flight state recovery returned for `key` was written for it.
fn check_recovered_in_flight(key: &[u8], checkpoint: Option<&[u8]>, history: &History) {
    let Some(written) = history.get(key) else {
        panic!("recovery returned key {key:?} in flight, but it was never written");
    };
    assert!(written.claimed, "recovery returned key {key:?} in flight, but it was never claimed");
    if let Some(checkpoint) = checkpoint {
        assert!(
            written.checkpoints.iter().any(|c| c == checkpoint),
            "recovery returned checkpoint {checkpoint:?} for key {key:?}, which was never recorded"
        );
    }
}

/// Checks that what the store says about `key` is a state that was written for it.
fn check_recovered_entry(key: &[u8], entry: Option<&Entry>, history: &History) {
    match entry {
        None => {}
        Some(Entry::Completed(done)) => {
            let Some(written) = history.get(key) else {
                panic!("recovery returned {done:?} for key {key:?}, which was never written");
            };
            assert!(
                written.outcomes.contains(&done.outcome),
                "recovery returned outcome {:?} for key {key:?}, which was never completed with it",
                String::from_utf8_lossy(&done.outcome)
            );
        }
        Some(Entry::InFlight { checkpoint, .. }) => check_recovered_in_flight(key, checkpoint.as_deref(), history),
    }
}

/// Every key the recovered store returns, through `get` and `orphans`, was written with that
/// exact outcome or checkpoint; keys never written stay absent.
fn check_recovered_store(store: &Store, history: &History) {
    let never_written: [&[u8]; 2] = [b"key-99", b"never-written"];
    for key in history.keys().map(Vec::as_slice).chain(never_written) {
        let entry = store.get(key).unwrap_or_else(|e| panic!("get({key:?}) on a recovered store failed: {e}"));
        check_recovered_entry(key, entry.as_ref(), history);
    }
    let orphans = store.orphans().unwrap_or_else(|e| panic!("orphans() on a recovered store failed: {e}"));
    for orphan in orphans {
        check_recovered_in_flight(&orphan.key, orphan.checkpoint.as_deref(), history);
    }
}

/// Opens a damaged store image: it must open, or fail with a clear error.
///
/// Input layout: 1 byte picks the image (see `build_image`), the rest describes the damage
/// (see `apply_damage`). When the store opens, every state it returns must be one that was
/// written; a claim of each key with its original request must replay a written outcome or
/// take the key over; and the store must reopen after those writes. Set the environment
/// variable `IDEMSTORE_FUZZ_TRACE` to print what the open gave.
pub fn recover(data: &[u8]) {
    let Some((&variant, damage)) = data.split_first() else { return };
    let (disk, clock, mut history) = build_image(variant);
    let dir = Path::new(STORE_DIR);
    apply_damage(&disk, dir, damage);
    let small_segments = variant & 1 == 1;
    let opened = Store::open(dir, recover_options(&disk, &clock, small_segments));
    if std::env::var_os("IDEMSTORE_FUZZ_TRACE").is_some() {
        eprintln!("recover: variant {variant}, open gave {:?}", opened.as_ref().map(|_| "a store"));
    }
    let store = match opened {
        Ok(store) => store,
        Err(first) => {
            assert!(
                matches!(first, Error::Corrupt { .. } | Error::UnsupportedVersion { .. }),
                "a damaged image gave an unclear error: {first:?}"
            );
            assert!(!first.to_string().is_empty());
            let again = Store::open(dir, recover_options(&disk, &clock, small_segments));
            assert!(
                matches!(&again, Err(e) if std::mem::discriminant(e) == std::mem::discriminant(&first)),
                "opening a refused image again gave {again:?} instead of {first:?}"
            );
            return;
        }
    };
    check_recovered_store(&store, &history);
    let keys: Vec<Vec<u8>> = history.keys().cloned().collect();
    for key in keys {
        let Some(written) = history.get_mut(&key) else { continue };
        match store.claim(&key, &written.request) {
            Ok(Claim::Completed(done)) => assert!(
                written.outcomes.contains(&done.outcome),
                "a claim after recovery replayed an outcome never completed for {key:?}: {done:?}"
            ),
            Ok(Claim::Acquired(token)) => {
                if let Some(checkpoint) = token.checkpoint() {
                    assert!(
                        written.checkpoints.iter().any(|c| c == checkpoint),
                        "a takeover after recovery carried a checkpoint never recorded for {key:?}"
                    );
                }
                written.claimed = true;
                let done = b"completed after recovery".to_vec();
                store.complete(&token, &done).unwrap_or_else(|e| panic!("complete after recovery failed: {e}"));
                written.outcomes.push(done);
            }
            other => panic!("a claim of {key:?} with its own request after recovery gave {other:?}"),
        }
    }
    drop(store);
    let reopened = Store::open(dir, recover_options(&disk, &clock, small_segments))
        .unwrap_or_else(|e| panic!("a store that recovered and took writes does not reopen: {e}"));
    check_recovered_store(&reopened, &history);
}

// ---------------------------------------------------------------------------------------------
// ops_model
// ---------------------------------------------------------------------------------------------

/// Keys the model works on (few, so operations meet on the same key).
const MODEL_KEYS: u8 = 3;
/// Distinct request bodies per key (a different one must get `Mismatch`).
const MODEL_REQUESTS: u8 = 2;
/// Claim tokens kept for later complete/checkpoint/release calls.
const MODEL_TOKENS_MAX: usize = 8;
/// Operations run per input.
const MODEL_OPS_MAX: usize = 256;
const MODEL_DEFAULT_TTL_MS: u64 = 60_000;
const MODEL_DEFAULT_LEASE_MS: u64 = 5_000;
/// Per-claim TTLs to pick from (`None` takes the default).
const MODEL_TTLS_MS: [Option<u64>; 5] = [None, Some(1_000), Some(5_000), Some(30_000), Some(7_200_000)];
/// Per-claim leases to pick from (`None` takes the default).
const MODEL_LEASES_MS: [Option<u64>; 4] = [None, Some(1), Some(1_000), Some(10_000)];
/// Clock steps to pick from.
const MODEL_STEPS_MS: [u64; 9] = [1, 10, 100, 999, 1_000, 5_000, 30_000, 61_000, 3_600_000];

/// One step of the model test. Its `arbitrary` encoding is the input format of `ops_model`:
/// changing this enum changes what existing corpus and regression inputs mean, so regressions
/// must be found and minimized again after such a change. `Restart` is a clean reopen, or a
/// power cut (keeping a torn prefix of unsynced writes when seeded) and an open of what
/// survived; one variant for both keeps restarts, the costliest step, at one step in thirteen.
#[derive(Debug, Clone, Arbitrary)]
enum ModelOp {
    Claim {
        key: u8,
        request: u8,
        ttl: u8,
        lease: u8,
    },
    /// (key, request) pairs claimed in one `claim_many` call; checked as single claims in order.
    ClaimMany {
        items: Vec<(u8, u8)>,
        ttl: u8,
        lease: u8,
    },
    Complete {
        token: u8,
        outcome: u8,
    },
    /// (token pick, outcome byte) pairs completed in one `complete_many` call; checked in order.
    CompleteMany {
        picks: Vec<(u8, u8)>,
    },
    Checkpoint {
        token: u8,
        phase: u8,
    },
    Release {
        token: u8,
    },
    Remove {
        key: u8,
    },
    Get {
        key: u8,
    },
    Orphans,
    Advance {
        step: u8,
    },
    Sync,
    Maintain,
    Restart {
        power_cut: bool,
        torn_seed: Option<u64>,
    },
}

/// What the model knows about a key.
#[derive(Debug, Clone)]
enum Slot {
    InFlight {
        request: u8,
        token_id: u64,
        claimed_at_ms: u64,
        lease_until_ms: u64,
        lease_ms: u64,
        expires_at_ms: u64,
        checkpoint: Option<Vec<u8>>,
        incarnation: u64,
    },
    Completed {
        request: u8,
        outcome: Vec<u8>,
        completed_at_ms: u64,
        claimed_at_ms: u64,
        expires_at_ms: u64,
    },
}

impl Slot {
    fn expires_at_ms(&self) -> u64 {
        match self {
            Slot::InFlight { expires_at_ms, .. } | Slot::Completed { expires_at_ms, .. } => *expires_at_ms,
        }
    }
}

/// The plain `HashMap` model of a store.
#[derive(Debug, Default)]
struct Model {
    slots: HashMap<u8, Slot>,
    /// Counts opens; an in-flight claim of an earlier incarnation is an orphan.
    incarnation: u64,
    /// The largest token id ever handed out per key: fencing tokens only grow.
    last_token_id: HashMap<u8, u64>,
}

impl Model {
    fn live(&self, key: u8, now_ms: u64) -> Option<&Slot> {
        self.slots.get(&key).filter(|s| s.expires_at_ms() > now_ms)
    }

    fn entry(&self, key: u8, now_ms: u64) -> Option<Entry> {
        Some(match self.live(key, now_ms)? {
            Slot::InFlight { claimed_at_ms, lease_until_ms, expires_at_ms, checkpoint, incarnation, .. } => {
                Entry::InFlight {
                    claimed_at: ms_to_system_time(*claimed_at_ms),
                    lease_expires_at: ms_to_system_time(*lease_until_ms),
                    expires_at: ms_to_system_time(*expires_at_ms),
                    checkpoint: checkpoint.clone(),
                    orphaned: *incarnation != self.incarnation,
                }
            }
            Slot::Completed { outcome, completed_at_ms, claimed_at_ms, expires_at_ms, .. } => {
                Entry::Completed(Completed {
                    outcome: outcome.clone(),
                    completed_at: ms_to_system_time(*completed_at_ms),
                    claimed_at: ms_to_system_time(*claimed_at_ms),
                    expires_at: ms_to_system_time(*expires_at_ms),
                })
            }
        })
    }

    fn orphans(&self, now_ms: u64) -> Vec<Orphan> {
        let mut keys: Vec<u8> = self.slots.keys().copied().collect();
        keys.sort_unstable_by_key(|k| model_key(*k));
        keys.into_iter()
            .filter_map(|key| match self.live(key, now_ms)? {
                Slot::InFlight { claimed_at_ms, lease_until_ms, checkpoint, incarnation, .. }
                    if *incarnation != self.incarnation =>
                {
                    Some(Orphan {
                        key: model_key(key),
                        claimed_at: ms_to_system_time(*claimed_at_ms),
                        lease_expires_at: ms_to_system_time(*lease_until_ms),
                        checkpoint: checkpoint.clone(),
                    })
                }
                _ => None,
            })
            .collect()
    }

    /// True when `token` still holds its key at `now_ms`.
    fn holds(&self, key: u8, token: &ClaimToken, now_ms: u64) -> bool {
        matches!(self.live(key, now_ms), Some(Slot::InFlight { token_id, .. }) if *token_id == token.id())
    }
}

fn model_key(key: u8) -> Vec<u8> {
    format!("model-key-{key}").into_bytes()
}

fn model_request(request: u8) -> Vec<u8> {
    format!("POST /model {request}").into_bytes()
}

/// A colliding index hash: every key lands on one 64-bit hash.
fn colliding_hash(_key: &[u8]) -> u64 {
    7
}

struct ModelRun {
    disk: SimDisk,
    clock: Arc<ManualClock>,
    store: Option<Store>,
    collide: bool,
    model: Model,
    tokens: Vec<(u8, ClaimToken)>,
    step: usize,
}

impl ModelRun {
    fn options(&self) -> Options {
        Options {
            durability: Durability::Sync,
            default_ttl: Duration::from_millis(MODEL_DEFAULT_TTL_MS),
            default_lease: Duration::from_millis(MODEL_DEFAULT_LEASE_MS),
            max_key_len: 64,
            max_outcome_len: 256,
            bucket_width: Duration::from_secs(10),
            segment_bytes_max: 16 << 10,
            segment_bytes_initial: 1024,
            clock: self.clock.clone(),
            io: Arc::new(self.disk.clone()),
            key_hash: self.collide.then_some(colliding_hash as crate::KeyHashFn),
            background: false,
            ..Options::default()
        }
    }

    fn open(&mut self) {
        let store = Store::open(STORE_DIR, self.options())
            .unwrap_or_else(|e| panic!("step {}: opening the store failed: {e}", self.step));
        self.store = Some(store);
        self.model.incarnation += 1;
        self.check_orphans();
    }

    fn store(&self) -> &Store {
        self.store.as_ref().unwrap_or_else(|| panic!("the store is open between steps"))
    }

    fn now_ms(&self) -> u64 {
        crate::Clock::now_ms(self.clock.as_ref())
    }

    fn run(&mut self, op: &ModelOp) {
        let now = self.now_ms();
        let step = self.step;
        match *op {
            ModelOp::Claim { key, request, ttl, lease } => {
                self.claim(key % MODEL_KEYS, request % MODEL_REQUESTS, ttl, lease)
            }
            ModelOp::ClaimMany { ref items, ttl, lease } => self.claim_many(items, ttl, lease),
            ModelOp::Complete { token, outcome } => {
                let Some((key, token)) = self.pick_token(token) else { return };
                let outcome = vec![outcome; usize::from(outcome % 7)];
                let result = self.store().complete(&token, &outcome);
                self.check_complete(key, &token, outcome, now, &result);
            }
            ModelOp::CompleteMany { ref picks } => {
                let chosen: Vec<(u8, ClaimToken, Vec<u8>)> = picks
                    .iter()
                    .filter_map(|&(pick, outcome)| {
                        let (key, token) = self.pick_token(pick)?;
                        Some((key, token, vec![outcome; usize::from(outcome % 7)]))
                    })
                    .collect();
                let items: Vec<(&ClaimToken, &[u8])> = chosen.iter().map(|(_, t, o)| (t, o.as_slice())).collect();
                let results = self.store().complete_many(&items);
                assert_eq!(
                    results.len(),
                    chosen.len(),
                    "step {step}: complete_many answered a different number of items"
                );
                for ((key, token, outcome), result) in chosen.into_iter().zip(results) {
                    self.check_complete(key, &token, outcome, now, &result);
                }
            }
            ModelOp::Checkpoint { token, phase } => {
                let Some((key, token)) = self.pick_token(token) else { return };
                let phase = vec![phase; 1 + usize::from(phase % 3)];
                let holds = self.model.holds(key, &token, now);
                let result = self.store().checkpoint(&token, &phase);
                self.expect_token_result("checkpoint", holds, &result);
                if holds
                    && let Some(Slot::InFlight { lease_until_ms, lease_ms, checkpoint, .. }) =
                        self.model.slots.get_mut(&key)
                {
                    *lease_until_ms = now + *lease_ms;
                    *checkpoint = Some(phase);
                }
            }
            ModelOp::Release { token } => {
                let Some((key, token)) = self.pick_token(token) else { return };
                let holds = self.model.holds(key, &token, now);
                let result = self.store().release(&token);
                self.expect_token_result("release", holds, &result);
                if holds {
                    self.model.slots.remove(&key);
                }
            }
            ModelOp::Remove { key } => {
                let key = key % MODEL_KEYS;
                self.store().remove(model_key(key)).unwrap_or_else(|e| panic!("step {step}: remove failed: {e}"));
                self.model.slots.remove(&key);
            }
            ModelOp::Get { key } => self.check_key(key % MODEL_KEYS),
            ModelOp::Orphans => self.check_orphans(),
            ModelOp::Advance { step: pick } => {
                self.clock.advance(Duration::from_millis(MODEL_STEPS_MS[usize::from(pick) % MODEL_STEPS_MS.len()]));
            }
            ModelOp::Sync => self.store().sync().unwrap_or_else(|e| panic!("step {step}: sync failed: {e}")),
            ModelOp::Maintain => {
                self.store().maintain().unwrap_or_else(|e| panic!("step {step}: maintain failed: {e}"));
            }
            ModelOp::Restart { power_cut: false, .. } => {
                self.store = None;
                self.open();
            }
            ModelOp::Restart { power_cut: true, torn_seed } => {
                // Under `Sync` every acknowledged operation is durable: the cut loses nothing.
                let survivor = self.disk.power_cut(torn_seed);
                self.store = None;
                self.disk = survivor;
                self.open();
            }
        }
    }

    fn pick_token(&self, pick: u8) -> Option<(u8, ClaimToken)> {
        if self.tokens.is_empty() {
            return None;
        }
        Some(self.tokens[usize::from(pick) % self.tokens.len()].clone())
    }

    /// Checks one complete's result against the model (which the earlier items of a batch have
    /// already changed) and applies it.
    fn check_complete(&mut self, key: u8, token: &ClaimToken, outcome: Vec<u8>, now: u64, result: &crate::Result<()>) {
        let holds = self.model.holds(key, token, now);
        self.expect_token_result("complete", holds, result);
        if holds && let Some(Slot::InFlight { request, claimed_at_ms, expires_at_ms, .. }) = self.model.slots.get(&key)
        {
            let done = Slot::Completed {
                request: *request,
                outcome,
                completed_at_ms: now,
                claimed_at_ms: *claimed_at_ms,
                expires_at_ms: *expires_at_ms,
            };
            self.model.slots.insert(key, done);
        }
    }

    fn expect_token_result(&self, what: &str, holds: bool, result: &crate::Result<()>) {
        match (holds, result) {
            (true, Ok(())) | (false, Err(Error::StaleToken)) => {}
            (true, Err(e)) => panic!("step {}: {what} with the holding token failed: {e:?}", self.step),
            (false, other) => panic!("step {}: {what} with a stale token gave {other:?}, not StaleToken", self.step),
        }
    }

    /// The claim options `ttl` and `lease` pick, and the TTL and lease (ms) they mean.
    fn claim_options(ttl: u8, lease: u8) -> (ClaimOptions, u64, u64) {
        let ttl_ms = MODEL_TTLS_MS[usize::from(ttl) % MODEL_TTLS_MS.len()];
        let lease_ms = MODEL_LEASES_MS[usize::from(lease) % MODEL_LEASES_MS.len()];
        let options = ClaimOptions {
            ttl: ttl_ms.map(Duration::from_millis),
            lease: lease_ms.map(Duration::from_millis),
            wait: None,
        };
        (options, ttl_ms.unwrap_or(MODEL_DEFAULT_TTL_MS), lease_ms.unwrap_or(MODEL_DEFAULT_LEASE_MS))
    }

    fn claim(&mut self, key: u8, request: u8, ttl: u8, lease: u8) {
        let step = self.step;
        let (options, ttl_ms, lease_ms) = Self::claim_options(ttl, lease);
        let got = self
            .store()
            .claim_with(model_key(key), model_request(request), options)
            .unwrap_or_else(|e| panic!("step {step}: claim failed: {e}"));
        self.check_claim(key, request, ttl_ms, lease_ms, got);
    }

    /// A batch answers as its claims made one at a time would: each answer is checked against
    /// the model, which then takes that claim, before the next answer.
    fn claim_many(&mut self, items: &[(u8, u8)], ttl: u8, lease: u8) {
        let step = self.step;
        let (options, ttl_ms, lease_ms) = Self::claim_options(ttl, lease);
        let items: Vec<(u8, u8)> = items.iter().map(|&(k, r)| (k % MODEL_KEYS, r % MODEL_REQUESTS)).collect();
        let batch: Vec<(Vec<u8>, Vec<u8>)> = items.iter().map(|&(k, r)| (model_key(k), model_request(r))).collect();
        let answers = self.store().claim_many(&batch, options);
        assert_eq!(answers.len(), items.len(), "step {step}: claim_many answered a different number of items");
        for ((key, request), answer) in items.into_iter().zip(answers) {
            let got = answer.unwrap_or_else(|e| panic!("step {step}: claim_many failed for key {key}: {e}"));
            self.check_claim(key, request, ttl_ms, lease_ms, got);
        }
    }

    /// Checks one claim's answer against the model and applies it.
    fn check_claim(&mut self, key: u8, request: u8, ttl_ms: u64, lease_ms: u64, got: Claim) {
        let now = self.now_ms();
        let step = self.step;
        let current_incarnation = self.model.incarnation;
        // (recovered, checkpoint, expires_at_ms) of an expected acquisition, or the exact answer.
        let acquisition = match self.model.live(key, now) {
            None => Ok((false, None, now + ttl_ms)),
            Some(Slot::Completed { request: r, .. } | Slot::InFlight { request: r, .. }) if *r != request => {
                Err(Claim::Mismatch)
            }
            Some(Slot::Completed { .. }) => {
                let Some(Entry::Completed(done)) = self.model.entry(key, now) else {
                    unreachable!("a live completed slot reads as completed")
                };
                Err(Claim::Completed(done))
            }
            Some(Slot::InFlight { lease_until_ms, incarnation, checkpoint, expires_at_ms, .. }) => {
                if *incarnation != current_incarnation || now >= *lease_until_ms {
                    Ok((true, checkpoint.clone(), (now + ttl_ms).max(*expires_at_ms)))
                } else {
                    Err(Claim::InProgress { lease_expires_at: ms_to_system_time(*lease_until_ms) })
                }
            }
        };
        match (acquisition, got) {
            (Ok((recovered, checkpoint, expires_at_ms)), Claim::Acquired(token)) => {
                assert_eq!(token.key(), model_key(key).as_slice(), "step {step}: token for the wrong key");
                assert_eq!(token.recovered(), recovered, "step {step}: token.recovered() is wrong");
                assert_eq!(
                    token.checkpoint(),
                    checkpoint.as_deref(),
                    "step {step}: token carries the wrong checkpoint"
                );
                assert_eq!(
                    token.lease_expires_at(),
                    ms_to_system_time(now + lease_ms),
                    "step {step}: token lease end is wrong"
                );
                let last = self.model.last_token_id.get(&key).copied().unwrap_or(0);
                assert!(
                    token.id() > last,
                    "step {step}: fencing token {} for key {key} is not larger than an earlier one ({last})",
                    token.id()
                );
                self.model.last_token_id.insert(key, token.id());
                let slot = Slot::InFlight {
                    request,
                    token_id: token.id(),
                    claimed_at_ms: now,
                    lease_until_ms: now + lease_ms,
                    lease_ms,
                    expires_at_ms,
                    checkpoint,
                    incarnation: current_incarnation,
                };
                self.model.slots.insert(key, slot);
                if self.tokens.len() == MODEL_TOKENS_MAX {
                    let _forgotten = self.tokens.remove(0);
                }
                self.tokens.push((key, token));
            }
            (Err(expected), got) if expected == got => {}
            (expected, got) => {
                panic!("step {step}: claim of key {key} request {request} gave {got:?}, the model expects {expected:?}")
            }
        }
    }

    fn check_key(&self, key: u8) {
        let now = self.now_ms();
        let got = self.store().get(model_key(key)).unwrap_or_else(|e| panic!("step {}: get failed: {e}", self.step));
        let expected = self.model.entry(key, now);
        assert_eq!(got, expected, "step {}: get(key {key}) diverges from the model", self.step);
    }

    fn check_orphans(&self) {
        let got = self.store().orphans().unwrap_or_else(|e| panic!("step {}: orphans failed: {e}", self.step));
        assert_eq!(got, self.model.orphans(self.now_ms()), "step {}: orphans() diverges from the model", self.step);
    }

    /// Compares every key after a step; `orphans()` (a scan of the whole index) is compared on
    /// `Orphans` steps and after every open.
    fn check_all(&self) {
        for key in 0..MODEL_KEYS {
            self.check_key(key);
        }
    }
}

/// Runs a sequence of operations against a `Durability::Sync` store on a `SimDisk` and against
/// a plain `HashMap` model, comparing every answer and, after every step, every key.
///
/// Input layout: 1 byte of flags (bit 0: force every key onto one index hash), then an
/// `arbitrary`-encoded sequence of operations (at most 256 are run). Set the environment
/// variable `IDEMSTORE_FUZZ_TRACE` to print each operation as it runs.
pub fn ops_model(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else { return };
    let mut run = ModelRun {
        disk: SimDisk::new(),
        clock: ManualClock::new(START_MS),
        store: None,
        collide: flags & 1 == 1,
        model: Model::default(),
        tokens: Vec::new(),
        step: 0,
    };
    run.open();
    let trace = std::env::var_os("IDEMSTORE_FUZZ_TRACE").is_some();
    let mut input = Unstructured::new(rest);
    while run.step < MODEL_OPS_MAX && !input.is_empty() {
        let Ok(op) = ModelOp::arbitrary(&mut input) else { break };
        run.step += 1;
        if trace {
            eprintln!("step {} at {} ms: {op:?}", run.step, run.now_ms() - START_MS);
        }
        run.run(&op);
        run.check_all();
    }
}
