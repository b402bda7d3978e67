//! What a store directory looks like from its listing, so that a typo'd or wrong path is an
//! error and not an empty store: the writer's `open` and every CLI command decide with the
//! same rule.
//!
//! A directory is a store when it holds `META` (every store this version creates has one), a
//! segment or a table file (finished or not; a format 1 store has no `META`), or `LOCK` and
//! `TIME` together (an empty store created by an older version). It is "empty" when it holds
//! nothing else than the leftovers of a store that was never finished (`LOCK` alone, `TIME`
//! alone, `META.tmp`) and `lost+found` (a dedicated file system mounted there). Anything else
//! is another program's directory.

use std::io;
use std::path::Path;

use crate::error::{Error, Result};
use crate::log::time_floor::TIME_FILE_NAME;
use crate::recovery::meta::META_FILE_NAME;

/// What a directory's listing shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Contents {
    /// A store (with data or not).
    Store,
    /// No store, and nothing else that would be overwritten or mixed with one.
    Empty,
    /// Files that belong to no store (one of them named), and no store.
    Foreign { example: String },
}

/// Whether `name` is one of the files a store writes (finished or under a temporary name).
fn is_store_file(name: &str) -> bool {
    name == crate::io::LOCK_FILE_NAME
        || name == TIME_FILE_NAME
        || name == META_FILE_NAME
        || name == "META.tmp"
        || crate::log::segment::parse_segment_file_name(name).is_some()
        || crate::sealed::parse_table_file_name(name).is_some()
        || crate::sealed::parse_table_tmp_file_name(name).is_some()
}

/// Classifies a directory from the names it holds.
pub(crate) fn classify(names: &[String]) -> Contents {
    let has = |wanted: &str| names.iter().any(|n| n == wanted);
    let holds_data = names.iter().any(|n| {
        crate::log::segment::parse_segment_file_name(n).is_some()
            || crate::sealed::parse_table_file_name(n).is_some()
            || crate::sealed::parse_table_tmp_file_name(n).is_some()
    });
    if has(META_FILE_NAME) || holds_data || (has(crate::io::LOCK_FILE_NAME) && has(TIME_FILE_NAME)) {
        return Contents::Store;
    }
    // Sorted, so that the file named in the error is the same from one run to the next.
    let mut foreign: Vec<&String> = names.iter().filter(|n| !is_store_file(n) && *n != "lost+found").collect();
    foreign.sort();
    match foreign.first() {
        Some(example) => Contents::Foreign { example: (*example).clone() },
        None => Contents::Empty,
    }
}

/// The error for a directory whose listing shows `contents` (not a store).
pub(crate) fn not_a_store(dir: &Path, contents: &Contents) -> Error {
    let reason = match contents {
        Contents::Store => "it is a store".to_string(),
        Contents::Empty => "the directory is empty (no META, segment or LOCK and TIME files)".to_string(),
        Contents::Foreign { example } => format!(
            "the directory holds other files (such as {example:?}) and no store file; \
             a store needs a directory of its own"
        ),
    };
    Error::NotAStore { path: dir.to_path_buf(), reason }
}

/// The error for a directory that could not be listed: missing, a file, or unreadable.
pub(crate) fn unlistable(dir: &Path, e: io::Error) -> Error {
    let reason = match e.kind() {
        io::ErrorKind::NotFound => "no such directory".to_string(),
        io::ErrorKind::NotADirectory => "it is a file (or lies under one), not a directory".to_string(),
        _ if e.raw_os_error() == Some(libc::ENOTDIR) => "it is a file (or lies under one), not a directory".to_string(),
        _ => return Error::io("list store directory", dir, e),
    };
    Error::NotAStore { path: dir.to_path_buf(), reason }
}

/// Takes the writer's lock of the store in `dir` (`Store::open`, `salvage`): `Error::Locked`
/// when another open store holds it. A lock released a moment ago may still be held by a child
/// process that another thread is spawning (the descriptor lives on in it until its exec), so
/// a refusal is retried briefly before it is reported.
pub fn take_writer_lock(io: &dyn crate::io::Io, dir: &Path) -> Result<Box<dyn crate::io::DirLock>> {
    let mut attempts = 0;
    loop {
        match io.lock_dir(dir) {
            Ok(lock) => return Ok(lock),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && attempts < 5 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(Error::Locked { dir: dir.to_path_buf() });
            }
            Err(e) => return Err(Error::io("open lock file", dir.join(crate::io::LOCK_FILE_NAME), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn stores_empty_directories_and_foreign_ones_are_told_apart() {
        assert_eq!(classify(&names(&["META", "LOCK", "TIME"])), Contents::Store);
        assert_eq!(classify(&names(&["00000001.seg"])), Contents::Store, "a format 1 store");
        assert_eq!(classify(&names(&["LOCK", "TIME"])), Contents::Store, "an empty store of an older version");
        assert_eq!(classify(&names(&["META", "notes.txt"])), Contents::Store, "extra files in a store");
        assert_eq!(classify(&names(&[])), Contents::Empty);
        assert_eq!(classify(&names(&["lost+found", "LOCK"])), Contents::Empty);
        assert_eq!(
            classify(&names(&["passwd", "hosts", "LOCK"])),
            Contents::Foreign { example: "hosts".into() },
            "the first foreign name in order"
        );
    }
}
