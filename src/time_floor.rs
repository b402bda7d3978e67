//! The store's latest time, kept in a small file (`TIME`) so that a wall clock stepped back
//! across a restart cannot bring an expired key back or shorten a lease: at open the store's
//! time starts no earlier than what the last process saw.
//!
//! Layout: `ms u64 | crc32(ms) u32 | magic "IDTM"`. A missing, torn or damaged file reads as 0
//! (the floor then comes from the records alone).

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::Io;

/// Name of the time floor file in a store directory.
pub const TIME_FILE_NAME: &str = "TIME";
const MAGIC: [u8; 4] = *b"IDTM";
const LEN: u64 = 16;

/// The time floor saved in `dir`, or 0.
pub fn read(io: &dyn Io, dir: &Path) -> u64 {
    let Ok(file) = io.open(&dir.join(TIME_FILE_NAME), LEN, false) else {
        return 0;
    };
    let mut raw = [0u8; LEN as usize];
    if file.len() < LEN || file.read_at(0, &mut raw).is_err() || raw[12..16] != MAGIC {
        return 0;
    }
    let ms = crate::record::u64_at(&raw, 0);
    let crc = crate::record::u32_at(&raw, 8);
    if crc32fast::hash(&raw[0..8]) == crc { ms } else { 0 }
}

/// Saves `ms` as the time floor of `dir`; with `sync`, durably.
pub fn write(io: &dyn Io, dir: &Path, ms: u64, sync: bool) -> Result<()> {
    let path = dir.join(TIME_FILE_NAME);
    let (file, created) = match io.open(&path, LEN, true) {
        Ok(file) => (file, false),
        Err(_) => (io.create(&path, LEN).map_err(|e| Error::io("create time file", &path, e))?, true),
    };
    let mut raw = [0u8; LEN as usize];
    raw[0..8].copy_from_slice(&ms.to_le_bytes());
    let crc = crc32fast::hash(&raw[0..8]);
    raw[8..12].copy_from_slice(&crc.to_le_bytes());
    raw[12..16].copy_from_slice(&MAGIC);
    file.reserve(LEN)
        .and_then(|()| file.write_at(0, &raw))
        .and_then(|()| if sync { file.sync() } else { Ok(()) })
        .map_err(|e| Error::io("write time file", &path, e))?;
    if created && sync {
        io.sync_dir(dir).map_err(|e| Error::io("sync directory", dir, e))?;
    }
    Ok(())
}
