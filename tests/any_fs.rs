//! The store on any POSIX file system: where `fallocate` is refused (FUSE, some network and
//! overlay file systems) space is reserved by writing zeros, so a full disk is still an error
//! from a reserve and never SIGBUS; where punching holes is refused, an expired segment is
//! unlinked whole, never cut under a reader's map.
//!
//! Promises checked, on the simulated disk made to refuse those calls:
//! - claims, completes, sealing, reopening and expiry work without `fallocate`, which is tried
//!   once a file, not at every growth step;
//! - without `fallocate`, a full disk fails the claim that needs space with `Error::NoSpace`,
//!   and claims work again once space is back;
//! - without hole punching, an expired segment is unlinked whole after one refused call, and
//!   its space comes back;
//!
//! and on a real FUSE file system (bindfs, which refuses both calls) where the machine can
//! mount one: the same claims, completes and expiry, and a read-only viewer that still maps an
//! expired segment reads it without a fault. Where no FUSE file system can be mounted (no
//! `bindfs`, no `/dev/fuse`, no permission) that test says so on stderr and checks nothing
//! more.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use idemstore::sim::SimDisk;
use idemstore::{Claim, Durability, Entry, Error, ManualClock, Options, Store};

mod common;
use common::{START_MS, acquire, outcome_of, sealing_sim_options, sim_options};

const DIR: &str = "/store";

/// Segment files on the simulated disk.
fn segment_files(disk: &SimDisk) -> usize {
    disk.file_paths().iter().filter(|p| p.extension().is_some_and(|e| e == "seg")).count()
}

#[test]
fn a_store_on_a_disk_that_refuses_fallocate_claims_seals_reopens_and_expires() {
    let disk = SimDisk::new();
    disk.refuse_fallocate(true);
    let clock = ManualClock::new(START_MS);
    let options = || Options { durability: Durability::Sync, ..sealing_sim_options(&disk, &clock) };
    let store = Store::open(DIR, options()).expect("open without fallocate");
    // 4 KiB growth steps: 200 records of ~1.2 KiB grow each segment many times.
    let outcome = vec![7u8; 1024];
    for i in 0..200 {
        let token = acquire(&store, &format!("key-{i}"));
        store.complete(&token, &outcome).expect("complete without fallocate");
    }
    let stats = store.stats();
    assert!(stats.disk_bytes > 200 * 1024, "the segments grew: {} bytes", stats.disk_bytes);
    assert!(disk.zero_bytes_written() >= stats.disk_bytes, "the space was reserved by writing zeros");
    // Once a file (each segment, and the small TIME file), not once a growth step.
    let files = disk.file_paths().len() as u64;
    assert!(
        (segment_files(&disk) as u64..=files).contains(&disk.fallocate_calls()),
        "fallocate is tried once a file, then remembered as refused: {} calls, {files} files, {} growth steps",
        disk.fallocate_calls(),
        disk.paged_reserves()
    );
    // Sealing writes a table (space reserved without zeros where fallocate works).
    clock.advance(Duration::from_secs(6));
    store.maintain().expect("maintain seals without fallocate");
    assert_eq!(store.stats().sealed_tables, 1);
    drop(store);

    let image = disk.power_cut(None);
    let store = Store::open(DIR, Options { io: Arc::new(image.clone()), ..options() }).expect("reopen");
    assert_eq!(store.stats().recovery.tables_loaded, 1, "the table written without fallocate is used");
    assert_eq!(outcome_of(&store, "key-199").as_deref(), Some(&outcome[..]));
    let token = acquire(&store, "after reopen");
    store.complete(&token, "ok").expect("writes go on after the reopen");
    // Past every bucket: expiry drops them all.
    clock.advance(Duration::from_secs(3 * 24 * 3600));
    assert!(store.maintain().expect("expiry without fallocate") > 0);
    assert_eq!(store.get("key-0").expect("get"), None);
    assert_eq!(segment_files(&image), 0, "the expired segments are gone");
}

#[test]
fn without_fallocate_a_full_disk_fails_the_claim_with_no_space_and_claims_resume_when_space_returns() {
    let disk = SimDisk::new();
    disk.refuse_fallocate(true);
    let store = Store::open(DIR, Options { segment_bytes_initial: 4096, ..sim_options(&disk, Durability::Sync) })
        .expect("open");
    disk.set_space_limit(disk.used_bytes() + (64 << 10));
    let outcome = vec![1u8; 512];
    let (mut completed, mut held) = (Vec::new(), None);
    let error = loop {
        let key = format!("key-{}", completed.len());
        let token = match store.claim(&key, "request") {
            Ok(Claim::Acquired(token)) => token,
            Ok(other) => panic!("fresh key {key}: {other:?}"),
            Err(e) => break e,
        };
        // A complete needs space too: one refused leaves its key held.
        if let Err(e) = store.complete(&token, &outcome) {
            held = Some(key);
            break e;
        }
        completed.push(key);
        assert!(completed.len() < 10_000, "the space limit was never reached");
    };
    assert!(matches!(error, Error::NoSpace { .. }), "the write that needed space: {error:?}");
    assert!(!completed.is_empty());
    for key in &completed {
        assert_eq!(outcome_of(&store, key).as_deref(), Some(&outcome[..]), "{key} is kept");
    }
    if let Some(key) = held {
        assert!(matches!(store.get(&key).expect("get"), Some(Entry::InFlight { .. })), "{key} stays held");
    }
    disk.set_space_limit(u64::MAX);
    let token = acquire(&store, "after space returns");
    store.complete(&token, "ok").expect("writes resume once space is back");
}

#[test]
fn without_hole_punching_an_expired_segment_is_unlinked_whole_after_one_refused_call_and_its_space_returns() {
    // Where holes can be punched, the 1 MiB segment is freed in three 256 KiB steps from its
    // end first (the last step goes with the unlink): the count to compare with.
    for (refuse, punch_calls) in [(false, 3), (true, 1)] {
        let disk = SimDisk::new();
        disk.refuse_punch_hole(refuse);
        let clock = ManualClock::new(START_MS);
        let options =
            Options { segment_bytes_initial: 1 << 20, clock: clock.clone(), ..sim_options(&disk, Durability::Sync) };
        let store = Store::open(DIR, options).expect("open");
        let token = acquire(&store, "old");
        store.complete(&token, "done").expect("complete");
        let used_before = disk.used_bytes();
        assert!(used_before >= 1 << 20, "the segment holds its 1 MiB");
        clock.advance(Duration::from_secs(2 * 24 * 3600));
        assert_eq!(store.maintain().expect("expiry"), 1, "the bucket is dropped");
        assert_eq!(segment_files(&disk), 0, "refused {refuse}: the expired segment is unlinked");
        // Only the 16-byte TIME file is left.
        assert!(disk.used_bytes() < 4096, "refused {refuse}: its space came back: {} bytes used", disk.used_bytes());
        assert_eq!(
            disk.punch_hole_calls(),
            punch_calls,
            "refused {refuse}: holes punched a step at a time where offered; one refused call, then \
             the unlink, where not"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A real FUSE file system

/// A bindfs mount of a scratch directory, unmounted on drop.
struct FuseMount {
    mount: PathBuf,
    _source: tempfile::TempDir,
    _mount_dir: tempfile::TempDir,
}

impl FuseMount {
    /// Mounts one, or says why it could not.
    fn new() -> Result<FuseMount, String> {
        if !Path::new("/dev/fuse").exists() {
            return Err("no /dev/fuse".into());
        }
        let source = tempfile::tempdir().map_err(|e| format!("scratch directory: {e}"))?;
        let mount_dir = tempfile::tempdir().map_err(|e| format!("scratch directory: {e}"))?;
        let mount = mount_dir.path().to_path_buf();
        let status = Command::new("bindfs")
            .arg(source.path())
            .arg(&mount)
            .status()
            .map_err(|e| format!("bindfs could not be run ({e}); `apt-get install bindfs` provides it"))?;
        if !status.success() {
            return Err(format!("bindfs failed to mount ({status})"));
        }
        let mounted = FuseMount { mount, _source: source, _mount_dir: mount_dir };
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let target = mounted.mount.to_string_lossy().into_owned();
        if !mounts.lines().any(|line| line.split(' ').nth(1) == Some(&target) && line.contains("fuse")) {
            return Err("bindfs returned, yet no FUSE mount is listed".into());
        }
        Ok(mounted)
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        for (program, args) in [("fusermount3", &["-u"][..]), ("fusermount", &["-u"][..]), ("umount", &["-l"][..])] {
            if Command::new(program).args(args).arg(&self.mount).status().is_ok_and(|s| s.success()) {
                return;
            }
        }
        eprintln!("could not unmount {}", self.mount.display());
    }
}

/// Whether `fallocate` with `mode` works on a file in `dir` (errno when refused).
#[allow(unsafe_code, reason = "a raw fallocate probe, with its SAFETY comment")]
fn fallocate_works(dir: &Path, mode: i32) -> Result<(), std::io::Error> {
    use std::os::unix::io::AsRawFd;
    let path = dir.join("probe");
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
    std::fs::write(&path, vec![1u8; 8192])?;
    // SAFETY: fallocate on a descriptor this test owns; no memory is touched.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, 0, 4096) };
    let outcome = if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
    std::fs::remove_file(&path)?;
    outcome
}

#[test]
fn on_a_fuse_file_system_the_store_claims_completes_expires_and_a_viewer_of_an_expired_segment_never_faults() {
    let mount = match FuseMount::new() {
        Ok(mount) => mount,
        Err(why) => {
            eprintln!("SKIPPED: no FUSE file system could be mounted here: {why}");
            return;
        }
    };
    let allocate = fallocate_works(&mount.mount, 0);
    let punch = fallocate_works(&mount.mount, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE);
    eprintln!("bindfs at {}: fallocate {allocate:?}, punching holes {punch:?}", mount.mount.display());

    let dir = mount.mount.join("store");
    let clock = ManualClock::new(START_MS);
    let options =
        || Options { durability: Durability::None, background: false, clock: clock.clone(), ..Options::default() };
    let store = Store::open(&dir, options()).expect("open on FUSE");
    // ~450 KiB of records: the segment grows past its first 256 KiB step, and the last keys
    // lie beyond it (where a cut of the file to one step would leave a mapped reader nothing).
    let outcome = vec![3u8; 1024];
    for i in 0..400 {
        let token = acquire(&store, &format!("key-{i}"));
        store.complete(&token, &outcome).expect("complete on FUSE");
    }
    store.sync().expect("sync on FUSE");
    store.close().expect("close on FUSE");
    let store = Store::open(&dir, options()).expect("reopen on FUSE");
    assert_eq!(outcome_of(&store, "key-399").as_deref(), Some(&outcome[..]), "recovered on FUSE");

    // A viewer with a clock of its own, for which the bucket has not ended: it maps the segment
    // and reads from it while the writer drops the bucket.
    let viewer_clock = ManualClock::new(START_MS);
    let viewer = Store::open_read_only_with(&dir, Options { clock: viewer_clock, ..options() }).expect("viewer");
    assert_eq!(outcome_of(&viewer, "key-399").as_deref(), Some(&outcome[..]));
    clock.advance(Duration::from_secs(2 * 24 * 3600));
    assert_eq!(store.maintain().expect("expiry on FUSE"), 1);
    assert_eq!(store.get("key-0").expect("get"), None, "expired for the writer");
    let segments: Vec<_> = std::fs::read_dir(&dir)
        .expect("list")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
        .collect();
    assert!(segments.is_empty(), "the expired segment is unlinked: {segments:?}");
    // A cut file would fault this read (SIGBUS ends the test process); the unlinked one still
    // holds its bytes for whoever maps it.
    match viewer.get("key-399").expect("the viewer reads the unlinked segment") {
        Some(Entry::Completed(c)) => assert_eq!(c.outcome, outcome),
        other => panic!("the viewer read {other:?}"),
    }
    drop(viewer);
    let token = acquire(&store, "after expiry");
    store.complete(&token, "ok").expect("writes go on");
    drop(store);
}
