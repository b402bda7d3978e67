//! The `META` file: the store's format version and the secret of its index hash.
//!
//! Keys come from clients, and the index places a key by its 64-bit hash (shard from the top
//! bits, home slot from the rest). With a fixed, public hash anyone can search offline for keys
//! that share a shard and a home slot and pile them into one probe run, which every claim in
//! that shard then walks under the shard lock. So a store hashes keys with xxh3-64 under a
//! secret of its own, drawn at random when the store is created and kept here: keys crafted
//! without it land where any other keys would.
//!
//! The layout: ARCHITECTURE.md, "On disk", "META".
//!
//! The file is written once, when a store is created (a directory with no segment and no
//! table), as `META.tmp`, synced, renamed to `META` and the directory synced, before any
//! segment exists. A store with segments and no `META` is a version 1 store: its keys hash with
//! unkeyed xxh3-64, and it never gets a `META` (its sealed tables hold unkeyed hashes). A
//! damaged `META` is `Error::Corrupt` and never written again: a new secret would move every
//! key's hash.

use std::path::Path;

use xxhash_rust::xxh3::SecretInput;

use crate::bytes::u32_at;
use crate::error::{Error, Result};
use crate::hash::{IndexHash, SECRET_LEN};
use crate::io::Io;

/// Name of the metadata file in a store directory.
pub const META_FILE_NAME: &str = "META";
/// The name `META` is written under before it is renamed into place.
const META_TMP_FILE_NAME: &str = "META.tmp";
const MAGIC: [u8; 8] = *b"IDEMMETA";
/// The store format version that `META` names: version 1 stores have no `META`.
pub const STORE_FORMAT_VERSION: u32 = 2;
const FLAG_KEYED: u32 = 1;
const SECRET_AT: usize = 16;
const CRC_AT: usize = SECRET_AT + SECRET_LEN;
const LEN: usize = CRC_AT + 4;

/// Whether `dir`'s listing shows a store that holds data: a segment or a table (finished or
/// not). `LOCK` and `TIME` alone hold no key.
fn holds_data(names: &[String]) -> bool {
    names.iter().any(|n| {
        crate::log::segment::parse_segment_file_name(n).is_some()
            || crate::sealed::parse_table_file_name(n).is_some()
            || crate::sealed::parse_table_tmp_file_name(n).is_some()
    })
}

/// The index hash of the store in `dir`, whose files are `names`: read from `META`; version 1
/// (unkeyed) when there is none but the store holds data; a new secret, written as `META`,
/// when the store is new and `create` is set (a writer). A read-only view of a new store reads
/// nothing and writes nothing: it gets the unkeyed hash, which every segment it may find later
/// in its scan is then consistently hashed with.
pub fn load(io: &dyn Io, dir: &Path, names: &[String], create: bool) -> Result<IndexHash> {
    if names.iter().any(|n| n == META_FILE_NAME) {
        return read(io, dir);
    }
    if holds_data(names) || !create {
        return Ok(IndexHash::Unkeyed);
    }
    let mut secret = [0u8; SECRET_LEN];
    getrandom::fill(&mut secret)
        .map_err(|e| Error::io("draw the index hash secret", dir.join(META_FILE_NAME), e.into()))?;
    write(io, dir, &secret)?;
    Ok(IndexHash::Keyed(Box::new(SecretInput::new(secret))))
}

/// The bytes of a `META` holding `secret`.
fn encode(secret: &[u8; SECRET_LEN]) -> [u8; LEN] {
    let mut raw = [0u8; LEN];
    raw[0..8].copy_from_slice(&MAGIC);
    raw[8..12].copy_from_slice(&STORE_FORMAT_VERSION.to_le_bytes());
    raw[12..16].copy_from_slice(&FLAG_KEYED.to_le_bytes());
    raw[SECRET_AT..CRC_AT].copy_from_slice(secret);
    let crc = crc32fast::hash(&raw[..CRC_AT]);
    raw[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    raw
}

/// Writes `META` whole under a temporary name, syncs it, renames it into place and syncs the
/// directory, so `META` is never durable over a secret that is not (and it is durable before
/// the first segment, which is created after this returns).
fn write(io: &dyn Io, dir: &Path, secret: &[u8; SECRET_LEN]) -> Result<()> {
    let tmp = dir.join(META_TMP_FILE_NAME);
    let path = dir.join(META_FILE_NAME);
    // Left by a creation that stopped before its rename: no store ever used it.
    let _ = io.remove(&tmp);
    let raw = encode(secret);
    let file = io.create(&tmp, LEN as u64).map_err(|e| Error::io("create metadata file", &tmp, e))?;
    file.reserve(LEN as u64)
        .and_then(|()| file.write_at(0, &raw))
        .and_then(|()| file.sync())
        .map_err(|e| Error::io("write metadata file", &tmp, e))?;
    drop(file);
    io.rename(&tmp, &path).map_err(|e| Error::io("rename metadata file into place", &path, e))?;
    io.sync_dir(dir).map_err(|e| Error::io("sync directory", dir, e))
}

/// Reads and checks `META`.
fn read(io: &dyn Io, dir: &Path) -> Result<IndexHash> {
    let path = dir.join(META_FILE_NAME);
    let file = io.open(&path, LEN as u64, false).map_err(|e| Error::io("open metadata file", &path, e))?;
    let corrupt = |offset, reason| Error::Corrupt { file: path.clone(), offset, reason };
    let mut raw = [0u8; LEN];
    let head = usize::try_from(file.len()).unwrap_or(usize::MAX).min(LEN);
    if head < 12 {
        return Err(corrupt(0, "metadata file too short"));
    }
    file.read_at(0, &mut raw[..head]).map_err(|e| Error::io("read metadata file", &path, e))?;
    if raw[0..8] != MAGIC {
        return Err(corrupt(0, "bad metadata magic"));
    }
    // The version comes before every other check: another version may have another layout.
    let version = u32_at(&raw, 8);
    if version != STORE_FORMAT_VERSION {
        return Err(Error::UnsupportedVersion { file: path, found: version, supported: STORE_FORMAT_VERSION });
    }
    if file.len() != LEN as u64 {
        return Err(corrupt(0, "metadata file has the wrong length"));
    }
    if crc32fast::hash(&raw[..CRC_AT]) != u32_at(&raw, CRC_AT) {
        return Err(corrupt(CRC_AT as u64, "metadata checksum mismatch"));
    }
    if u32_at(&raw, 12) != FLAG_KEYED {
        return Err(corrupt(12, "unknown metadata flags"));
    }
    let mut secret = [0u8; SECRET_LEN];
    secret.copy_from_slice(&raw[SECRET_AT..CRC_AT]);
    Ok(IndexHash::Keyed(Box::new(SecretInput::new(secret))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::sim::SimDisk;

    #[test]
    fn a_written_meta_reads_back_the_same_secret() {
        let disk = SimDisk::new();
        let dir = Path::new("/store");
        disk.create_dir_all(dir).unwrap();
        let written = load(&disk, dir, &[], true).unwrap();
        let names = disk.list(dir).unwrap();
        assert_eq!(names, vec![META_FILE_NAME.to_string()], "no temporary file is left");
        let read = load(&disk, dir, &names, true).unwrap();
        for key in [&b"a"[..], b"order-42", &[7u8; 300]] {
            assert_eq!(written.hash(key), read.hash(key));
            assert_ne!(written.hash(key), xxhash_rust::xxh3::xxh3_64(key), "the hash is keyed");
        }
        assert_eq!(written.table_mark(), read.table_mark());
        assert_ne!(written.table_mark(), 0);
    }

    #[test]
    fn a_store_with_data_and_no_meta_stays_unkeyed_and_gets_no_meta() {
        let disk = SimDisk::new();
        let dir = Path::new("/store");
        disk.create_dir_all(dir).unwrap();
        for names in [vec!["00000001.seg".to_string()], vec!["00000003.tbl.tmp".to_string()]] {
            let hash = load(&disk, dir, &names, true).unwrap();
            assert!(matches!(hash, IndexHash::Unkeyed));
            assert_eq!(hash.table_mark(), 0);
        }
        assert!(disk.list(dir).unwrap().is_empty(), "nothing was written");
    }
}
