//! Who may read a store's files: the modes the store gives what it creates, and the check of
//! an existing store directory at open.
//!
//! A store keeps what services answered their clients (payment results, sign-up responses,
//! webhook payloads) in clear, so it is private by default whatever the process umask: its
//! directory 0700, its files 0600. [`FileAccess::OwnerAndGroupRead`] widens that to a group
//! that must read (an operator's CLI). The modes are set exactly, not requested: a mode given
//! to `open(2)` or `mkdir(2)` is only narrowed by the umask, so under umask 077 a group mode
//! would be lost and under umask 0 nothing else would narrow it; the real disk sets the mode
//! again on the new descriptor (`fchmod`) or directory right after creating it.
//!
//! An existing directory is never changed: its modes may be what its operator chose (a shared
//! backup reader, say), and a store cannot tell a deliberate choice from an accident. Instead a
//! directory that other users can write is refused (they could replace or plant the store's
//! files, as PostgreSQL refuses a data directory others can reach), and one that grants more
//! than reading is reported in `Stats::warnings` and by `idemstore verify` and `stats`, with the
//! `chmod` that fixes it. Only the directory is checked: its mode alone decides whether anyone
//! else can reach the files in it (a 0644 file written by an older version is out of reach
//! under a 0700 directory, and within reach under 0711 as well as 0755).

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::Io;

/// Who, besides the owner, may read a store's files. The store gives every directory and file
/// it creates exactly these modes, whatever the process umask; existing ones keep theirs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FileAccess {
    /// Only the owner (directory 0700, files 0600). The default: outcomes are private.
    #[default]
    Owner,
    /// The owner, and the directory's group for reading (directory 0750, files 0640): for a
    /// group that must read the store, such as operators running the `idemstore` CLI. Give the
    /// directory the right group (`chgrp`, or a setgid parent) before the store creates files.
    OwnerAndGroupRead,
}

impl FileAccess {
    /// The mode of a directory the store creates.
    pub fn dir_mode(self) -> u32 {
        match self {
            FileAccess::Owner => 0o700,
            FileAccess::OwnerAndGroupRead => 0o750,
        }
    }

    /// The mode of a file the store creates.
    pub fn file_mode(self) -> u32 {
        match self {
            FileAccess::Owner => 0o600,
            FileAccess::OwnerAndGroupRead => 0o640,
        }
    }
}

/// Refuses a store directory that other users can write, before anything is created in it.
pub(crate) fn refuse_unsafe(io: &dyn Io, dir: &Path) -> Result<()> {
    let mode = io.mode(dir).map_err(|e| Error::io("read the mode of the store directory", dir, e))?;
    match mode {
        Some(mode) if mode & 0o002 != 0 => {
            Err(Error::UnsafePermissions { dir: dir.to_path_buf(), mode: mode & 0o7777 })
        }
        _ => Ok(()),
    }
}

/// What is wrong with the mode of the store directory `dir` for `access`, as sentences that end
/// with the command that fixes it; empty when nothing is (or the disk keeps no modes).
pub(crate) fn warnings(io: &dyn Io, dir: &Path, access: FileAccess) -> Vec<String> {
    let mode = match io.mode(dir) {
        Ok(Some(mode)) => mode,
        Ok(None) => return Vec::new(),
        Err(e) => return vec![format!("cannot read the mode of store directory {}: {e}", dir.display())],
    };
    // Bits of the group and of others beyond what `access` gives them.
    let excess = mode & 0o077 & !access.dir_mode();
    if excess == 0 {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut chmod = Vec::new();
    for (who, letter, bits) in [("its group", 'g', (excess >> 3) & 7), ("other users", 'o', excess & 7)] {
        if bits == 0 {
            continue;
        }
        let mut can = Vec::new();
        if bits & 0o1 != 0 {
            can.push("enter it and read every file in it that grants them read (older versions created 0644 files)");
        }
        if bits & 0o4 != 0 {
            can.push("list its files");
        }
        if bits & 0o2 != 0 {
            can.push("replace, plant and delete its files (a writable store's open refuses this when others can)");
        }
        found.push(format!("{who} can {}", can.join(", ")));
        chmod.push(format!("{letter}-{}", rwx(bits)));
    }
    vec![format!(
        "store directory {dir} has mode {mode:04o}: {found}; run `chmod {chmod} {dir}`",
        dir = dir.display(),
        mode = mode & 0o7777,
        found = found.join("; "),
        chmod = chmod.join(","),
    )]
}

/// `rwx` letters of the 3-bit permission `bits`, as `chmod` takes them.
fn rwx(bits: u32) -> String {
    [(0o4, 'r'), (0o2, 'w'), (0o1, 'x')].iter().filter(|(bit, _)| bits & bit != 0).map(|(_, c)| *c).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rwx_spells_the_bits_in_chmod_order() {
        assert_eq!(rwx(0o7), "rwx");
        assert_eq!(rwx(0o5), "rx");
        assert_eq!(rwx(0o2), "w");
        assert_eq!(rwx(0), "");
    }
}
