//! `verify` of the files that are not segments: sealed tables, `TIME`, `LOCK`, `META` and
//! `MARKS`. Each problem comes with what it means for the store and what to do about it, in
//! the words of `docs/operations.md`.

use std::path::Path;

use crate::io::Io;
use crate::recovery::{FileKind, FileReport};

/// What to do about a damaged segment (or one `Store::open` refuses for its content).
pub const SEGMENT_REMEDY: &str = "stop the writer and run `idemstore salvage DIR`: it keeps every record that checks out, \
     moves the file to DIR/quarantine/ and reports the keys or byte ranges lost";
/// What to do about a segment of another format version.
pub const VERSION_REMEDY: &str = "written by a newer build: open the store with that build (nothing is lost)";
/// What to do about a damaged table.
pub const TABLE_REMEDY: &str = "remove the .tbl file (or leave it: a writer's open removes a table whose header fails its checks): it is \
     derived data, rebuilt from its segment at the next open; reads through it fail until then";

fn report(path: &Path, kind: FileKind) -> FileReport {
    FileReport {
        path: path.to_path_buf(),
        records: 0,
        torn_bytes: 0,
        problem: None,
        expired: false,
        kind,
        remedy: None,
        note: None,
    }
}

fn problem(mut file: FileReport, offset: u64, reason: impl Into<String>, remedy: &str) -> FileReport {
    file.problem = Some((offset, reason.into()));
    file.remedy = Some(remedy.to_string());
    file
}

/// Checks the table of segment `id` at `path`: its header and filter CRC, the hash it was made
/// with (`table_mark`, `None` when `META` could not be read), and every entry's check; each
/// entry must point inside its segment (`segment_len`, `None` when the segment is missing).
/// Returns the report and whether the table is sound (its segment is then known durable whole).
pub fn check_table(
    io: &dyn Io,
    path: &Path,
    id: u32,
    table_mark: Option<u32>,
    segment_len: Option<u64>,
) -> (FileReport, bool) {
    let file = report(path, FileKind::Table);
    let Some(segment_len) = segment_len else {
        let mut file = file;
        file.note = Some("no segment: removed at the next writer's open (its bucket expired)".into());
        return (file, false);
    };
    let Some(mark) = table_mark else {
        let mut file = file;
        file.note = Some("not checked: META cannot be read, so the hash its entries must carry is unknown".into());
        return (file, false);
    };
    let opened = match crate::sealed::Table::open(io, path, id, mark) {
        Ok(opened) => opened,
        Err(e) => return (problem(file, 0, format!("cannot read: {e}"), TABLE_REMEDY), false),
    };
    let Some(table) = opened else {
        return (
            problem(
                file,
                0,
                "table header or filter fails its checks, or it was made with another index hash",
                "nothing is lost: the next writer's open removes it and scans its segment (slower open); or \
                 remove the .tbl file now",
            ),
            false,
        );
    };
    let mut file = file;
    match table.entries() {
        Ok(entries) => {
            file.records = entries.len() as u64;
            for (_, loc) in entries {
                let offset = u64::from(loc.offset);
                if offset < crate::log::segment::SEGMENT_HEADER_LEN || offset >= segment_len {
                    return (problem(file, 0, "a table entry points outside its segment", TABLE_REMEDY), false);
                }
            }
            (file, true)
        }
        Err(crate::error::Error::Corrupt { offset, reason, .. }) => {
            (problem(file, offset, reason, TABLE_REMEDY), false)
        }
        Err(e) => (problem(file, 0, e.to_string(), TABLE_REMEDY), false),
    }
}

/// Checks `TIME`: missing is fine (a new store, or one never closed); damaged reads as 0.
pub fn check_time(io: &dyn Io, dir: &Path) -> Option<FileReport> {
    let path = dir.join(crate::log::time_floor::TIME_FILE_NAME);
    let opened = io.open(&path, 16, false).ok()?;
    let file = report(&path, FileKind::Time);
    let mut raw = [0u8; 16];
    let readable = opened.len() >= 16 && opened.read_at(0, &mut raw).is_ok();
    let sound = readable && raw[12..16] == *b"IDTM" && crc32fast::hash(&raw[0..8]) == crate::bytes::u32_at(&raw, 8);
    if sound {
        return Some(file);
    }
    Some(problem(
        file,
        0,
        "time floor damaged: it reads as 0, so the store's time at the next open comes from the records and the \
         clock alone; a clock set back could show keys that had expired, or leases longer than they were",
        "check the system clock before the next open (`date -u`); the next writer rewrites TIME",
    ))
}

/// Checks `LOCK`'s owner record (12 bytes: incarnation, process id), when it holds one.
pub fn check_lock(io: &dyn Io, dir: &Path) -> Option<FileReport> {
    let path = dir.join(crate::io::LOCK_FILE_NAME);
    let opened = io.open(&path, 0, false).ok()?;
    let mut file = report(&path, FileKind::Lock);
    match opened.len() {
        0 => {}
        12 => {
            if let Some(owner) = io.lock_owner(dir) {
                file.note = Some(format!("held by a live writer, process {}", owner.pid));
            }
        }
        n => {
            return Some(problem(
                file,
                0,
                format!("owner record of {n} bytes, not 12"),
                "harmless to a writer, which rewrites it at its open; read-only views may take a live writer's \
                 claims for orphans meanwhile. With no writer running, remove LOCK",
            ));
        }
    }
    Some(file)
}

/// Checks `META`; returns the report and the hash mark tables must carry (`None` when it
/// cannot be read).
pub fn check_meta(io: &dyn Io, dir: &Path, names: &[String]) -> (Option<FileReport>, Option<u32>) {
    let path = dir.join(crate::recovery::meta::META_FILE_NAME);
    let present = names.iter().any(|n| n == crate::recovery::meta::META_FILE_NAME);
    let loaded = crate::recovery::meta::load(io, dir, names, false);
    let file = present.then(|| report(&path, FileKind::Meta));
    match loaded {
        Ok(hash) => (file, Some(hash.table_mark())),
        Err(crate::error::Error::UnsupportedVersion { found, .. }) => {
            (file.map(|f| problem(f, 8, format!("store format version {found}"), VERSION_REMEDY)), None)
        }
        Err(crate::error::Error::Corrupt { offset, reason, .. }) => (
            file.map(|f| {
                problem(
                    f,
                    offset,
                    format!("{reason}: the store will not open (Corrupt)"),
                    "restore META from a backup of this store; without one, run `idemstore salvage DIR`, which \
                     moves it aside: the store then opens with the unkeyed index hash of format 1 (no records \
                     lost; tables rebuilt; no protection against crafted keys until the window is rebuilt)",
                )
            }),
            None,
        ),
        Err(e) => (file.map(|f| problem(f, 0, e.to_string(), "check the file's permissions and the disk")), None),
    }
}

/// Checks `MARKS`: damaged, it is ignored (records at segment ends are then not told apart
/// from torn tails until the next writer's sync rewrites it).
pub fn check_marks(io: &dyn Io, dir: &Path) -> Option<FileReport> {
    let path = dir.join(crate::log::marks::MARKS_FILE_NAME);
    let file = report(&path, FileKind::Marks);
    match crate::log::marks::read(io, dir) {
        Ok(None) => None,
        Ok(Some(marks)) => {
            let mut file = file;
            file.records = marks.len() as u64;
            Some(file)
        }
        Err(crate::log::marks::MarksProblem::UnsupportedVersion(v)) => {
            Some(problem(file, 8, format!("marks version {v}"), VERSION_REMEDY))
        }
        Err(crate::log::marks::MarksProblem::Damaged(reason)) => Some(problem(
            file,
            0,
            format!(
                "{reason}: ignored, so damage in the last records of a segment would be taken for a torn tail \
                 (a power cut can tear this file)"
            ),
            "nothing is lost: the next writer's sync rewrites it; run verify again after a clean close",
        )),
    }
}
