//! Promise: a reopen scans only what was being written at the last instant. A clean close
//! leaves every segment a table (nothing to scan); a segment that stops taking appends gets a
//! restart table at once (its keys stay in RAM meanwhile); the segments still taking appends
//! hold at most `Options::active_bytes_max` between them. Recovery stays as safe: a restart
//! table never hides a newer record, a damaged or missing one means its segment is scanned,
//! and `Stats::recovery` says what was scanned and why.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use idemstore::sim::SimDisk;
use idemstore::{Claim, ClaimOptions, Durability, Entry, ManualClock, Options, Store};

mod common;
use common::{START_MS, acquired};

const DIR: &str = "/store";

/// Small segments and a small active budget, so a few hundred keys make many segments; no
/// housekeeper (tests call `maintain`), no durability waits.
fn options(disk: &SimDisk, clock: &Arc<ManualClock>) -> Options {
    Options {
        durability: Durability::None,
        background: false,
        clock: clock.clone(),
        io: Arc::new(disk.clone()),
        segment_bytes_initial: 4096,
        segment_bytes_max: 16 << 10,
        active_bytes_max: 8 << 10,
        max_outcome_len: 1024,
        bucket_width: Duration::from_secs(60),
        ..Options::default()
    }
}

fn key(i: u64) -> String {
    format!("key-{i:05}")
}

fn outcome(i: u64) -> Vec<u8> {
    format!("outcome of {i}").into_bytes()
}

/// Claims `count` keys spread over 5 buckets (TTLs 1..5 minutes) and completes the even ones.
fn fill(store: &Store, count: u64) {
    for i in 0..count {
        let ttl = ClaimOptions { ttl: Some(Duration::from_secs(60 * (1 + i % 5))), ..Default::default() };
        let token = acquired(store.claim_with(key(i), b"request", ttl).unwrap());
        if i % 2 == 0 {
            store.complete(&token, outcome(i)).unwrap();
        }
    }
}

/// Every key reads back as `fill` left it.
fn check(store: &Store, count: u64) {
    for i in 0..count {
        match store.get(key(i)).unwrap() {
            Some(Entry::Completed(done)) if i % 2 == 0 => assert_eq!(done.outcome, outcome(i), "{}", key(i)),
            Some(Entry::InFlight { .. }) if i % 2 == 1 => {}
            other => panic!("{}: {other:?}", key(i)),
        }
    }
}

/// What a process crash leaves: every byte written, synced or not (the page cache survives a
/// kill), on a disk of its own.
fn crash_image(disk: &SimDisk) -> SimDisk {
    let image = SimDisk::new();
    for path in disk.file_paths() {
        if let Some(bytes) = disk.read_file(&path) {
            image.write_file(&path, bytes);
        }
    }
    image
}

fn paths_with(disk: &SimDisk, ext: &str) -> Vec<PathBuf> {
    disk.file_paths().into_iter().filter(|p| p.extension().is_some_and(|e| e == ext)).collect()
}

#[test]
fn a_reopen_after_a_clean_close_maps_every_segment_and_scans_no_record() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open(DIR, options(&disk, &clock)).unwrap();
    fill(&store, 600);
    let segments = store.stats().segments;
    assert!(segments > 5, "the fill made too few segments to mean anything: {segments}");
    store.close().unwrap();

    let store = Store::open(DIR, options(&disk, &clock)).unwrap();
    let recovery = store.stats().recovery;
    assert_eq!(recovery.records, 0, "a clean close left records to scan: {recovery:?}");
    assert_eq!(recovery.tables_loaded, segments, "{recovery:?}");
    assert_eq!(recovery.segments_scanned_no_table + recovery.segments_scanned_unsealed_tail, 0, "{recovery:?}");
    check(&store, 600);
    // Replays and duplicates are answered from the tables, exactly as before the close.
    let Claim::Completed(done) = store.claim(key(2), b"request").unwrap() else { panic!("key 2 replays") };
    assert_eq!(done.outcome, outcome(2));
    assert!(matches!(store.claim(key(3), b"request").unwrap(), Claim::InProgress { .. } | Claim::Acquired(_)));
    assert!(matches!(store.claim(key(4), b"other request").unwrap(), Claim::Mismatch));
}

#[test]
fn a_segment_that_stops_taking_appends_gets_a_restart_table_and_keeps_its_keys_in_ram() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open(DIR, options(&disk, &clock)).unwrap();
    fill(&store, 600);
    assert!(paths_with(&disk, "tbl").is_empty(), "a table before maintenance");
    store.maintain().unwrap();
    let tables = paths_with(&disk, "tbl");
    let stats = store.stats();
    assert!(tables.len() as u64 + 5 >= stats.segments, "{} tables for {} segments", tables.len(), stats.segments);
    assert!(!tables.is_empty());
    // Not sealed: the keys are still served from RAM (none moved to a table).
    assert_eq!(stats.sealed_tables, 0, "{stats:?}");
    assert_eq!(stats.index_entries, 600, "{stats:?}");
    check(&store, 600);
}

#[test]
fn a_crash_leaves_only_the_segments_still_taking_appends_to_scan() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let budget = options(&disk, &clock).active_bytes_max;
    let store = Store::open(DIR, options(&disk, &clock)).unwrap();
    fill(&store, 600);
    store.maintain().unwrap();
    let image = crash_image(&disk);
    drop(store);

    let store = Store::open(DIR, options(&image, &clock)).unwrap();
    let recovery = store.stats().recovery;
    assert!(recovery.tables_loaded > 0, "{recovery:?}");
    assert_eq!(recovery.segments_scanned_no_table, 0, "a retired segment without its table: {recovery:?}");
    // Every record is at least a header and a key long.
    let smallest_record = 96 + key(0).len() as u64;
    assert!(
        recovery.records * smallest_record <= budget,
        "scanned {} records, more than the active segments may hold ({budget} bytes): {recovery:?}",
        recovery.records
    );
    assert!(recovery.records > 0, "the active tail was not scanned: {recovery:?}");
    check(&store, 600);
}

#[test]
fn a_restart_table_never_hides_a_newer_record_of_its_keys() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open(DIR, options(&disk, &clock)).unwrap();
    // Claims first: their segments retire and get restart tables listing the claims...
    let tokens: Vec<_> = (0..300).map(|i| acquired(store.claim(key(i), b"request").unwrap())).collect();
    store.maintain().unwrap();
    assert!(!paths_with(&disk, "tbl").is_empty());
    // ...then the completes land in later segments; some of those get tables, some do not.
    for (i, token) in tokens.iter().enumerate() {
        store.complete(token, outcome(i as u64)).unwrap();
    }
    let reopened = Store::open(DIR, options(&crash_image(&disk), &clock)).unwrap();
    assert!(reopened.stats().recovery.tables_loaded > 0);
    for i in 0..300 {
        let Some(Entry::Completed(done)) = reopened.get(key(i)).unwrap() else {
            panic!("crash: {} lost its complete to an older table entry", key(i))
        };
        assert_eq!(done.outcome, outcome(i));
    }
    drop(reopened);
    store.close().unwrap();
    let reopened = Store::open(DIR, options(&disk, &clock)).unwrap();
    assert_eq!(reopened.stats().recovery.records, 0);
    for i in 0..300 {
        let Some(Entry::Completed(done)) = reopened.get(key(i)).unwrap() else {
            panic!("close: {} lost its complete to an older table entry", key(i))
        };
        assert_eq!(done.outcome, outcome(i));
    }
}

/// Flips one byte of the filter of `table` (covered by the header's CRC).
fn damage(disk: &SimDisk, table: &Path) {
    let mut bytes = disk.read_file(table).unwrap();
    bytes[70] ^= 0xff;
    disk.write_file(table, bytes);
}

#[test]
fn a_damaged_or_missing_restart_table_means_its_segment_is_scanned_and_the_table_written_again() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open(DIR, options(&disk, &clock)).unwrap();
    fill(&store, 600);
    store.close().unwrap();
    let tables = paths_with(&disk, "tbl");
    assert!(tables.len() >= 3);
    damage(&disk, &tables[0]);
    idemstore::io::Io::remove(&disk, &tables[1]).unwrap();

    let store = Store::open(DIR, options(&disk, &clock)).unwrap();
    let recovery = store.stats().recovery;
    assert_eq!(recovery.tables_rebuilt, 1, "{recovery:?}");
    assert_eq!(recovery.segments_scanned_no_table + recovery.segments_scanned_unsealed_tail, 1, "{recovery:?}");
    assert_eq!(recovery.tables_loaded, tables.len() as u64 - 2, "{recovery:?}");
    assert!(recovery.records > 0);
    check(&store, 600);
    // The scanned segments take no appends: the next maintenance writes their tables again.
    store.maintain().unwrap();
    assert_eq!(paths_with(&disk, "tbl").len(), tables.len(), "the two tables were not written again");
    drop(store);
    let store = Store::open(DIR, options(&disk, &clock)).unwrap();
    assert_eq!(store.stats().recovery.records, 0, "{:?}", store.stats().recovery);
    check(&store, 600);
}

#[test]
fn a_restart_table_goes_with_its_expired_bucket() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open(DIR, options(&disk, &clock)).unwrap();
    fill(&store, 600);
    store.maintain().unwrap();
    assert!(!paths_with(&disk, "tbl").is_empty());
    // Every bucket ends within 6 minutes; the seal (10 min idle) has not run.
    clock.advance(Duration::from_secs(7 * 60));
    store.maintain().unwrap();
    assert_eq!(store.stats().segments, 0);
    assert_eq!(paths_with(&disk, "tbl"), Vec::<PathBuf>::new(), "restart tables outlived their segments");
}

#[test]
fn a_bucket_that_keeps_taking_appends_is_split_at_the_active_budget() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let options = Options { segment_bytes_max: 1 << 20, ..options(&disk, &clock) };
    let budget = options.active_bytes_max;
    let store = Store::open(DIR, options.clone()).unwrap();
    for i in 0..1000 {
        let _in_flight = acquired(store.claim(key(i), b"request").unwrap());
    }
    let segments = paths_with(&disk, "seg");
    assert!(segments.len() > 5, "one bucket's appends were not split: {} segments", segments.len());
    for segment in segments {
        let written = disk.read_file(&segment).unwrap().iter().rposition(|&b| b != 0).unwrap_or(0) as u64;
        assert!(written <= budget + 4096, "{segment:?} holds {written} bytes, over the {budget}-byte budget");
    }
}

#[test]
fn a_scanned_record_newer_than_its_keys_entry_in_a_table_wins() {
    let disk = SimDisk::new();
    let clock = ManualClock::new(START_MS);
    let store = Store::open(DIR, options(&disk, &clock)).unwrap();
    let short = ClaimOptions { ttl: Some(Duration::from_secs(60)), ..Default::default() };
    let long = ClaimOptions { ttl: Some(Duration::from_secs(300)), ..Default::default() };
    // The key's claim and release go into the short bucket's segment...
    let token = acquired(store.claim_with("the-key", b"request", short.clone()).unwrap());
    store.release(&token).unwrap();
    // ...its new claim into the long bucket's segment, which takes nothing else...
    let _held = acquired(store.claim_with("the-key", b"request", long).unwrap());
    // ...and later records of other keys fill the short bucket's segment until the budget
    // retires it: its table's records reach past the new claim's seq.
    for i in 0..200 {
        let _in_flight = acquired(store.claim_with(key(i), b"request", short.clone()).unwrap());
    }
    store.maintain().unwrap();
    let image = crash_image(&disk);
    drop(store);

    let store = Store::open(DIR, options(&image, &clock)).unwrap();
    let recovery = store.stats().recovery;
    assert!(recovery.tables_loaded > 0 && recovery.records > 0, "{recovery:?}");
    assert!(
        matches!(store.get("the-key").unwrap(), Some(Entry::InFlight { .. })),
        "the new claim, scanned, lost to the release in a table: {:?}",
        store.get("the-key").unwrap()
    );
}

/// The test that, run as a child with `KILLED_WRITER_DIR_ENV` set, is the writer killed below.
const KILLED_TEST_NAME: &str = "a_sigkill_leaves_only_the_segments_still_taking_appends_to_scan";
const KILLED_WRITER_DIR_ENV: &str = "IDEMSTORE_TEST_FAST_REOPEN_WRITER_DIR";
const KILLED_KEYS: u64 = 2000;

/// Real files, small segments and budget, housekeeping by hand.
fn killed_options() -> Options {
    Options {
        durability: Durability::None,
        background: false,
        segment_bytes_initial: 4096,
        segment_bytes_max: 64 << 10,
        active_bytes_max: 16 << 10,
        max_outcome_len: 1024,
        ..Options::default()
    }
}

/// The writer: fills, lets maintenance write the tables of the segments that stopped taking
/// appends, says so, and waits to be killed.
fn killed_writer(dir: &Path) -> ! {
    use std::io::Write as _;
    let store = Store::open(dir, killed_options()).unwrap();
    for i in 0..KILLED_KEYS {
        let token = acquired(store.claim(key(i), b"request").unwrap());
        store.complete(&token, outcome(i)).unwrap();
    }
    store.maintain().unwrap();
    println!("READY");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
    std::process::exit(1)
}

#[test]
fn a_sigkill_leaves_only_the_segments_still_taking_appends_to_scan() {
    use std::io::BufRead as _;
    if let Some(dir) = std::env::var_os(KILLED_WRITER_DIR_ENV) {
        killed_writer(Path::new(&dir));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([KILLED_TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(KILLED_WRITER_DIR_ENV, dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let ready = std::io::BufReader::new(stdout).lines().map_while(|l| l.ok()).any(|l| l.contains("READY"));
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(ready, "the writer never got ready ({status})");
    assert!(!status.success());

    let store = Store::open(dir.path(), killed_options()).unwrap();
    let recovery = store.stats().recovery;
    let budget = killed_options().active_bytes_max;
    let smallest_record = 96 + key(0).len() as u64;
    assert!(recovery.tables_loaded > 10, "{recovery:?}");
    assert_eq!(recovery.segments_scanned_no_table, 0, "a retired segment without its table: {recovery:?}");
    assert!(
        recovery.records * smallest_record <= budget,
        "scanned {} records after the kill, more than the active segments may hold ({budget} bytes): {recovery:?}",
        recovery.records
    );
    for i in 0..KILLED_KEYS {
        let Some(Entry::Completed(done)) = store.get(key(i)).unwrap() else { panic!("{} lost", key(i)) };
        assert_eq!(done.outcome, outcome(i));
    }
}
