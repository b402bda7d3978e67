//! Stored outcomes stay private: a store creates its directory 0700 and every file 0600 (0750
//! and 0640 with `FileAccess::OwnerAndGroupRead`), exactly, whatever the umask; a directory
//! other users can write is refused before anything is created in it; one they can read opens
//! with a warning in `Stats` and from `idemstore verify` / `stats`; existing modes are never
//! changed, by a writer or a read-only view.
//!
//! The umask is process-wide and tests run as threads of one process, so every check that
//! depends on it is in one test function; the other tests set every mode they rely on
//! explicitly and hold whatever the umask is meanwhile.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use idemstore::{Error, FileAccess, ManualClock, Options, Store};

mod common;
use common::{START_MS, acquire};

/// Test options with short buckets and sealing, so a few claims and one `maintain` create
/// every kind of file: segments (and a spare), a sealed table (through its `.tmp`), TIME, LOCK.
fn options(clock: &Arc<ManualClock>, file_access: FileAccess) -> Options {
    Options {
        bucket_width: Duration::from_secs(60),
        default_ttl: Duration::from_secs(600),
        seal_idle_after: Duration::from_secs(5),
        segment_bytes_initial: 4096,
        file_access,
        ..common::options(clock)
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("stat").permissions().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Every file of the store directory `dir` with its mode.
fn file_modes(dir: &Path) -> BTreeMap<String, u32> {
    fs::read_dir(dir)
        .expect("read store dir")
        .map(|entry| {
            let entry = entry.expect("dir entry");
            (entry.file_name().to_string_lossy().into_owned(), mode(&entry.path()))
        })
        .collect()
}

/// Claims and completes keys, seals the idle segment, writes into a second bucket, closes.
fn write_and_seal(dir: &Path, file_access: FileAccess) {
    let clock = ManualClock::new(START_MS);
    let store = Store::open(dir, options(&clock, file_access)).expect("open");
    for i in 0..20 {
        let token = acquire(&store, &format!("payment-{i}"));
        store.complete(&token, format!("charged card ending {i:04}")).expect("complete");
    }
    clock.advance(Duration::from_secs(120));
    store.maintain().expect("maintain seals the idle segment");
    let _in_flight = acquire(&store, "signup-1");
    store.close().expect("close");
}

/// The kinds of file the store must have created: a check over fewer kinds proves less.
fn assert_every_kind_present(files: &BTreeMap<String, u32>) {
    for (what, present) in [
        ("LOCK", files.contains_key("LOCK")),
        ("TIME", files.contains_key("TIME")),
        ("a segment", files.keys().any(|n| n.ends_with(".seg"))),
        ("a sealed table", files.keys().any(|n| n.ends_with(".tbl"))),
    ] {
        assert!(present, "the store created {what}: {files:?}");
    }
}

/// Sets the process umask for as long as it lives, and puts the old one back even when an
/// assertion fails.
struct Umask(libc::mode_t);
#[allow(unsafe_code, reason = "umask, with its SAFETY comment")]
impl Umask {
    fn set(mask: libc::mode_t) -> Umask {
        // SAFETY: umask only swaps the process's file creation mask; no memory is involved.
        Umask(unsafe { libc::umask(mask) })
    }
}
#[allow(unsafe_code, reason = "umask, with its SAFETY comment")]
impl Drop for Umask {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::umask(self.0) };
    }
}

#[test]
fn a_new_store_is_private_and_the_group_option_exact_whatever_the_umask() {
    for mask in [0o022, 0o000, 0o077, 0o027] {
        let _umask = Umask::set(mask);
        for (access, dir_mode, file_mode) in
            [(FileAccess::Owner, 0o700, 0o600), (FileAccess::OwnerAndGroupRead, 0o750, 0o640)]
        {
            let tmp = tempfile::tempdir().expect("tempdir");
            // A parent created on the way too: it must not be wider than the store.
            let dir = tmp.path().join("service").join("idem");
            write_and_seal(&dir, access);
            assert_eq!(mode(&dir), dir_mode, "store directory under umask {mask:03o}, {access:?}");
            assert!(
                mode(dir.parent().expect("parent")) & !dir_mode == 0,
                "a parent the store created is no wider than the store directory"
            );
            let files = file_modes(&dir);
            assert_every_kind_present(&files);
            for (name, m) in &files {
                assert_eq!(*m, file_mode, "{name} under umask {mask:03o}, {access:?}: {m:04o}");
            }
            let clock = ManualClock::new(START_MS + 3_600_000);
            // Reopened and written again (a new bucket: new segment, TIME rewritten): the same.
            let store = Store::open(&dir, options(&clock, access)).expect("reopen");
            assert!(store.stats().warnings.is_empty(), "a store the store made needs no warning");
            let _in_flight = acquire(&store, "refund-1");
            store.close().expect("close");
            for (name, m) in file_modes(&dir) {
                assert_eq!(m, file_mode, "{name} after a reopen under umask {mask:03o}, {access:?}");
            }
        }
    }
}

#[test]
fn a_directory_others_can_write_is_refused_and_nothing_is_created_in_it() {
    for unsafe_mode in [0o777, 0o1777, 0o702, 0o722] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("store");
        fs::create_dir(&dir).expect("mkdir");
        chmod(&dir, unsafe_mode);
        let clock = ManualClock::new(START_MS);
        match Store::open(&dir, options(&clock, FileAccess::Owner)) {
            Err(Error::UnsafePermissions { dir: refused, mode }) => {
                assert_eq!(refused, dir);
                assert_eq!(mode, unsafe_mode);
                let text = Error::UnsafePermissions { dir: refused, mode }.to_string();
                assert!(text.contains(&format!("{unsafe_mode:04o}")) && text.contains("chmod o-w"), "{text}");
            }
            Err(other) => panic!("mode {unsafe_mode:04o}: refused for another reason: {other}"),
            Ok(_) => panic!("a store directory others can write ({unsafe_mode:04o}) was opened"),
        }
        assert!(file_modes(&dir).is_empty(), "nothing created in a refused directory");
        assert_eq!(mode(&dir), unsafe_mode, "its mode is left as it was");
    }
}

#[test]
fn an_old_store_readable_by_others_opens_with_a_warning_and_keeps_its_modes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("store");
    write_and_seal(&dir, FileAccess::Owner);
    // As an older version left it under umask 022.
    chmod(&dir, 0o755);
    let old: Vec<String> = file_modes(&dir).into_keys().collect();
    for name in &old {
        chmod(&dir.join(name), 0o644);
    }

    // A read-only view: opens, warns, changes no mode.
    let view = Store::open_read_only(&dir).expect("view");
    let warnings = view.stats().warnings;
    drop(view);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("0755") && warnings[0].contains("other users") && warnings[0].contains("chmod g-rx,o-rx"),
        "{warnings:?}"
    );
    assert_eq!(mode(&dir), 0o755);
    assert!(file_modes(&dir).values().all(|&m| m == 0o644), "a view changes no mode");

    // The writer: opens, warns the same, leaves the old files as they are, creates new ones 0600
    // (a claim now expires in a later bucket than any before: a new segment).
    let clock = ManualClock::new(START_MS + 200_000);
    let store = Store::open(&dir, options(&clock, FileAccess::Owner)).expect("an old store opens");
    assert_eq!(store.stats().warnings, warnings);
    let _in_flight = acquire(&store, "new-bucket");
    store.sync().expect("sync");
    assert_eq!(mode(&dir), 0o755, "the directory's mode is the operator's");
    for (name, m) in file_modes(&dir) {
        let expected = if old.contains(&name) { 0o644 } else { 0o600 };
        assert_eq!(m, expected, "{name}");
    }
    let now = file_modes(&dir);
    assert!(now.keys().any(|n| !old.contains(n) && n.ends_with(".seg")), "the claim created a segment: {now:?}");
    assert!(now.keys().any(|n| old.contains(n) && n.ends_with(".seg")), "an old segment is still there: {now:?}");

    // The fix shows at once, without a reopen.
    chmod(&dir, 0o700);
    assert!(store.stats().warnings.is_empty());
    // A group that may only read is fine with the option, reported without it.
    chmod(&dir, 0o750);
    let group_warning = &store.stats().warnings;
    assert!(group_warning.len() == 1 && group_warning[0].contains("its group"), "{group_warning:?}");
    store.close().expect("close");
    let store = Store::open(&dir, options(&clock, FileAccess::OwnerAndGroupRead)).expect("open");
    assert!(store.stats().warnings.is_empty(), "0750 is what the group option asks for");
    chmod(&dir, 0o770);
    assert!(store.stats().warnings[0].contains("chmod g-w"), "a group that can write is reported");
    store.close().expect("close");
}

#[cfg(feature = "cli")]
#[test]
fn the_cli_verify_and_stats_print_the_permission_warning() {
    use std::process::{Command, Output};
    let run = |args: &[&str]| -> Output {
        Command::new(env!("CARGO_BIN_EXE_idemstore")).args(args).output().expect("run the idemstore binary")
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("store");
    write_and_seal(&dir, FileAccess::Owner);
    let path = dir.to_str().expect("UTF-8 temp path");

    let clean = run(&["verify", path]);
    assert!(clean.status.success());
    assert!(!String::from_utf8_lossy(&clean.stdout).contains("warning"), "a private store: no warning");

    chmod(&dir, 0o755);
    for args in [&["verify", path][..], &["stats", path][..]] {
        let out = run(args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: a warning alone is not a failure: {stdout}");
        assert!(
            stdout.contains(&format!("warning: store directory {path} has mode 0755"))
                && stdout.contains("chmod g-rx,o-rx"),
            "{args:?}: {stdout}"
        );
    }

    chmod(&dir, 0o750);
    let group = run(&["verify", path]);
    assert!(String::from_utf8_lossy(&group.stdout).contains("its group"));
    let meant = run(&["verify", "--group-readable", path]);
    assert!(!String::from_utf8_lossy(&meant.stdout).contains("warning"), "the group is meant to read");

    chmod(&dir, 0o757);
    let writable = run(&["verify", path]);
    let stdout = String::from_utf8_lossy(&writable.stdout);
    assert_eq!(writable.status.code(), Some(1), "others can write: a problem: {stdout}");
    assert!(stdout.contains("UNSAFE") && stdout.contains("chmod g-rx,o-rwx"), "{stdout}");
    chmod(&dir, 0o700);
}
