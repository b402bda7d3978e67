//! Fuzz target body `recover`: a valid store image, damaged on purpose (flipped bytes,
//! truncations, zeroed and copied ranges, deleted files, a newer format version), opens with a
//! clear `Error`, or opens and returns only states that were really written, with their exact
//! outcomes.
//!
//! Compiled into the cargo-fuzz target `fuzz/fuzz_targets/recover.rs` and into the corpus replay
//! `tests/fuzz_corpus.rs` (both with `#[path]`); it uses only idemstore's public API, the
//! simulated disk (feature `sim`) and its `#[doc(hidden)]` `internals`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use idemstore::internals::{SEGMENT_HEADER_LEN, TABLE_EXT};
use idemstore::io::Io;
use idemstore::sim::SimDisk;
use idemstore::{Claim, ClaimOptions, ClaimToken, Durability, Entry, Error, ManualClock, Options, Store};

/// Where the simulated store lives on its `SimDisk`.
const STORE_DIR: &str = "/idemstore-fuzz/store";
/// The manual clock's start: a plausible wall-clock time in milliseconds.
const START_MS: u64 = 1_700_000_000_000;

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
        let ok = |what: &str, result: idemstore::Result<()>| {
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
            if path.extension().is_some_and(|e| e == TABLE_EXT) {
                let _ = Io::remove(&disk, &path);
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
                Io::remove(disk, &path).unwrap_or_else(|e| panic!("deleting {path:?} failed: {e}"));
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
