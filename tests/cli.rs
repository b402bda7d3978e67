//! The `idemstore` command line, run as a binary: `stats`, `get`, `list`, `dump`, `verify` read a
//! store (also one held open by a live writer) and change nothing; `remove` needs the writer's
//! lock and says so clearly when another process holds it; keys are text or `hex:`; errors are
//! one line on stderr with a non-zero exit code.
//!
//! The stores here are written with a manual clock standing at 2100-01-01T00:00:00Z, so every
//! time the CLI prints is known in advance and no record has expired by the (real) time the
//! CLI reads it.
#![cfg(feature = "cli")]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use idemstore::{Claim, ClaimOptions, Durability, ManualClock, Options, Store};

mod common;
use common::options;

/// 2100-01-01T00:00:00Z in milliseconds since the Unix epoch.
const START_MS: u64 = 4_102_444_800_000;
const START_TEXT: &str = "2100-01-01T00:00:00.000Z";

fn idemstore(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idemstore")).args(args).output().expect("run the idemstore binary")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("stderr is UTF-8")
}

fn path_str(dir: &Path) -> &str {
    dir.to_str().expect("temp paths are UTF-8")
}

fn claim_and_complete(store: &Store, key: &[u8], request: &[u8], outcome: &[u8]) {
    let Claim::Acquired(token) = store.claim(key, request).expect("claim") else {
        panic!("fresh key must be acquired")
    };
    store.complete(&token, outcome).expect("complete");
}

/// A closed store holding: `order-1` and `order-2` completed, `user-1` in flight with a
/// checkpoint (its process is gone, so it is an orphan), the binary key 00 ff 10 completed
/// with a binary outcome, and `order-3` (released) and `order-4` (removed), both absent.
fn write_fixture(dir: &Path) {
    let clock = ManualClock::new(START_MS);
    let store = Store::open(dir, options(&clock)).expect("open");
    claim_and_complete(&store, b"order-1", b"POST /orders qty=1", b"201 Created: order 1");
    clock.advance(Duration::from_millis(1_500));
    claim_and_complete(&store, b"order-2", b"POST /orders qty=2", b"201 Created: order 2");
    claim_and_complete(&store, &[0x00, 0xff, 0x10], b"binary", &[0xde, 0xad, 0xbe, 0xef]);
    let Claim::Acquired(held) = store.claim("user-1", "signup").expect("claim") else { panic!("acquired") };
    store.checkpoint(&held, "db-row-written").expect("checkpoint");
    let Claim::Acquired(released) = store.claim("order-3", "x").expect("claim") else { panic!("acquired") };
    store.release(&released).expect("release");
    claim_and_complete(&store, b"order-4", b"x", b"done");
    store.remove("order-4").expect("remove");
    store.close().expect("close");
}

fn fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write_fixture(dir.path());
    dir
}

/// Every byte of every file in `dir`, to show a command changed nothing.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| {
            let path = e.expect("dir entry").path();
            let name = path.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read(&path).expect("read file"))
        })
        .collect();
    files.sort();
    files
}

fn segment_paths(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut segments: Vec<_> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    segments
}

#[test]
fn get_shows_a_completed_outcome_as_text_with_its_times() {
    let dir = fixture();
    let out = idemstore(&["get", path_str(dir.path()), "order-2"]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("state       completed"), "{text}");
    assert!(text.contains(r#"outcome     "201 Created: order 2""#), "{text}");
    assert!(text.contains("claimed_at  2100-01-01T00:00:01.500Z"), "{text}");
    assert!(text.contains("completed_at 2100-01-01T00:00:01.500Z"), "{text}");
    assert!(text.contains("expires_at  2100-01-02T00:00:01.500Z"), "{text}");

    let out = idemstore(&["get", path_str(dir.path()), "order-1", "--ms"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains(&format!("claimed_at  {START_MS}")), "{text}");
    assert!(text.contains(&format!("expires_at  {}", START_MS + 24 * 3600 * 1000)), "{text}");
}

#[test]
fn get_shows_a_binary_outcome_in_hex_and_hex_flag_forces_hex() {
    let dir = fixture();
    let out = idemstore(&["get", path_str(dir.path()), "hex:00ff10"]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("key         hex:00ff10"), "{text}");
    assert!(text.contains("outcome     hex:deadbeef"), "{text}");

    let out = idemstore(&["get", path_str(dir.path()), "order-1", "--hex"]);
    assert!(out.status.success());
    let expected = b"201 Created: order 1".iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert!(stdout(&out).contains(&format!("outcome     hex:{expected}")), "{}", stdout(&out));
}

#[test]
fn get_shows_an_in_flight_claim_with_its_checkpoint_and_lease() {
    let dir = fixture();
    let out = idemstore(&["get", path_str(dir.path()), "user-1"]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    // Its writer closed the store, so the holder is gone: an orphan.
    assert!(text.contains("state       orphaned"), "{text}");
    assert!(text.contains(r#"checkpoint  "db-row-written""#), "{text}");
    assert!(text.contains("lease_until 2100-01-01T00:00:31.500Z"), "{text}");
}

#[test]
fn get_of_an_absent_key_says_so_with_exit_code_1() {
    let dir = fixture();
    for key in ["never-claimed", "order-3", "order-4"] {
        let out = idemstore(&["get", path_str(dir.path()), key]);
        assert_eq!(out.status.code(), Some(1), "{key}: {}", stdout(&out));
        assert!(stdout(&out).contains("state       absent"), "{key}: {}", stdout(&out));
    }
}

#[test]
fn a_bad_hex_key_is_a_one_line_error() {
    let dir = fixture();
    let out = idemstore(&["get", path_str(dir.path()), "hex:abc"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.starts_with("error: ") && err.trim_end().lines().count() == 1, "{err}");
}

#[test]
fn list_shows_live_keys_sorted_and_filters_by_prefix_and_state() {
    let dir = fixture();
    let d = path_str(dir.path());
    let out = idemstore(&["list", d, "--sorted"]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let keys: Vec<String> =
        stdout(&out).lines().map(|l| l.split('\t').next().expect("a key column").to_string()).collect();
    assert_eq!(keys, ["hex:00ff10", "order-1", "order-2", "user-1"]);
    // Streamed in scan order: the same lines, in an order that is the same on every run.
    let streamed = idemstore(&["list", d]);
    let streamed_text = stdout(&streamed);
    let mut lines: Vec<&str> = streamed_text.lines().collect();
    let again = idemstore(&["list", d]);
    assert_eq!(stdout(&again), streamed_text, "the scan order is stable");
    lines.sort_unstable();
    assert_eq!(lines, stdout(&out).lines().collect::<Vec<_>>());
    assert!(stdout(&out).contains(&format!("order-1\tcompleted\t{}", "2100-01-02T00:00:00.000Z")), "{}", stdout(&out));

    let out = idemstore(&["list", d, "--prefix", "order-"]);
    assert_eq!(stdout(&out).lines().count(), 2, "{}", stdout(&out));

    let out = idemstore(&["list", d, "--prefix", "hex:00ff"]);
    assert_eq!(stdout(&out).trim_end(), "hex:00ff10\tcompleted\t2100-01-02T00:00:01.500Z");

    let out = idemstore(&["list", d, "--state", "orphaned"]);
    assert_eq!(stdout(&out).trim_end(), "user-1\torphaned\t2100-01-02T00:00:01.500Z");

    let out = idemstore(&["list", d, "--state", "completed", "--ms"]);
    assert_eq!(stdout(&out).lines().count(), 3, "{}", stdout(&out));
    assert!(stdout(&out).contains(&format!("order-1\tcompleted\t{}", START_MS + 24 * 3600 * 1000)));

    // The store is closed: no live holder, so nothing is merely in flight.
    let out = idemstore(&["list", d, "--state", "in-flight"]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), "");

    let out = idemstore(&["list", d, "--state", "bogus"]);
    assert!(!out.status.success());
}

#[test]
fn list_dump_and_get_take_a_namespace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(START_MS);
    let store = Store::open(dir.path(), options(&clock)).expect("open");
    let payments = store.namespace("payments").expect("namespace");
    let Claim::Acquired(token) = payments.claim("evt-1", "r").expect("claim") else { panic!("acquired") };
    payments.complete(&token, "charged").expect("complete");
    claim_and_complete(&store, b"evt-1", b"r", b"plain");
    store.close().expect("close");
    let d = path_str(dir.path());

    let out = idemstore(&["list", d, "--namespace", "payments"]);
    assert_eq!(stdout(&out).lines().map(|l| l.split('\t').next().unwrap_or("")).collect::<Vec<_>>(), ["evt-1"]);
    let out = idemstore(&["get", d, "evt-1", "--namespace", "payments"]);
    assert!(
        stdout(&out).contains("key         evt-1\n") && stdout(&out).contains("outcome     \"charged\""),
        "{}",
        stdout(&out)
    );
    let out = idemstore(&["get", d, "evt-1"]);
    assert!(stdout(&out).contains("outcome     \"plain\""), "{}", stdout(&out));
    let out = idemstore(&["dump", d, "--namespace", "payments"]);
    assert!(stdout(&out).contains("evt-1 completed") && stdout(&out).contains("1 live keys"), "{}", stdout(&out));
    let out = idemstore(&["list", d]);
    assert_eq!(stdout(&out).lines().count(), 2, "both keys without a namespace filter");
}

#[test]
fn dump_prints_every_live_key_with_its_entry() {
    let dir = fixture();
    let out = idemstore(&["dump", path_str(dir.path())]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(&format!("order-1 completed claimed_at={START_TEXT}")), "{text}");
    assert!(text.contains(r#"outcome="201 Created: order 1""#), "{text}");
    assert!(text.contains("hex:00ff10 completed"), "{text}");
    assert!(text.contains("outcome=hex:deadbeef"), "{text}");
    assert!(text.contains(r#"user-1 orphaned"#) && text.contains(r#"checkpoint="db-row-written""#), "{text}");
    assert!(text.contains("4 live keys"), "{text}");
    assert!(!text.contains("order-3") && !text.contains("order-4"), "{text}");
}

#[test]
fn dump_json_is_valid_json_and_escapes_every_awkward_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(START_MS);
    let store = Store::open(dir.path(), options(&clock)).expect("open");
    let awkward_key = "quote\" backslash\\ newline\n tab\t bell\u{7} é ☃";
    let awkward_outcome = "{\"id\": 7}\r\n\u{0}\u{1f}";
    claim_and_complete(&store, awkward_key.as_bytes(), b"r", awkward_outcome.as_bytes());
    claim_and_complete(&store, &[0xff, 0xfe], b"r", &[0x80, 0x00]);
    let Claim::Acquired(_held) = store.claim("in-flight", "r").expect("claim") else { panic!("acquired") };
    store.close().expect("close");

    let out = idemstore(&["dump", path_str(dir.path()), "--json"]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let value = json::parse(&stdout(&out)).unwrap_or_else(|e| panic!("invalid JSON ({e}): {}", stdout(&out)));
    let json::Value::Array(entries) = value else { panic!("a JSON array") };
    assert_eq!(entries.len(), 3);

    let by_key_hex = |hex: &str| {
        entries
            .iter()
            .find(|e| e.get("key_hex") == Some(&json::Value::String(hex.into())))
            .unwrap_or_else(|| panic!("no entry with key_hex {hex}"))
    };
    let awkward = by_key_hex(&hex(awkward_key.as_bytes()));
    assert_eq!(awkward.get("key"), Some(&json::Value::String(awkward_key.into())));
    assert_eq!(awkward.get("outcome"), Some(&json::Value::String(awkward_outcome.into())));
    assert_eq!(awkward.get("state"), Some(&json::Value::String("completed".into())));
    assert_eq!(awkward.get("claimed_at_ms"), Some(&json::Value::Number(START_MS as f64)));

    let binary = by_key_hex("fffe");
    assert_eq!(binary.get("key"), None, "a non-UTF-8 key has no text form");
    assert_eq!(binary.get("outcome_hex"), Some(&json::Value::String("8000".into())));

    let in_flight = by_key_hex(&hex(b"in-flight"));
    assert_eq!(in_flight.get("checkpoint"), Some(&json::Value::Null));
    assert_eq!(in_flight.get("orphaned"), Some(&json::Value::Bool(true)));
}

#[test]
fn dump_json_of_an_empty_store_is_an_empty_array() {
    let dir = tempfile::tempdir().expect("tempdir");
    Store::open(dir.path(), Options { durability: Durability::None, ..Options::default() })
        .expect("open")
        .close()
        .expect("close");
    let out = idemstore(&["dump", path_str(dir.path()), "--json"]);
    assert!(out.status.success());
    assert_eq!(json::parse(&stdout(&out)), Ok(json::Value::Array(Vec::new())));
}

#[test]
fn stats_reports_the_window_and_prometheus_text() {
    let dir = fixture();
    let expected = Store::open_read_only(dir.path()).expect("read-only open").stats();
    let out = idemstore(&["stats", path_str(dir.path())]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    let field = |name: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(name).filter(|rest| rest.starts_with(' ')).map(|rest| rest.trim().to_string()))
            .unwrap_or_else(|| panic!("no {name} line in {text}"))
    };
    assert_eq!(field("index_entries"), expected.index_entries.to_string());
    assert_eq!(field("segments"), expected.segments.to_string());
    assert_eq!(field("recovery_records"), expected.recovery.records.to_string());
    // The fixture was closed cleanly: its segments got tables, so the view scanned nothing.
    assert_eq!(expected.recovery.records, 0, "a cleanly closed store was scanned: {:?}", expected.recovery);
    assert!(expected.recovery.tables_loaded >= 1, "{:?}", expected.recovery);
    assert_eq!(field("recovery_tables_loaded"), expected.recovery.tables_loaded.to_string());
    for name in ["recovery_scanned_no_table", "recovery_scanned_unsealed", "recovery_scanned_damaged"] {
        assert_eq!(field(name), "0", "{name}");
    }

    // Its tables gone, the view scans every segment, and says why.
    for table in std::fs::read_dir(dir.path()).expect("list").map(|e| e.expect("entry").path()) {
        if table.extension().is_some_and(|e| e == "tbl") {
            std::fs::remove_file(table).expect("remove table");
        }
    }
    let scanned_stats = Store::open_read_only(dir.path()).expect("read-only open").stats();
    let scanned = scanned_stats.recovery;
    assert!(scanned.records >= 10, "the fixture wrote at least 10 records: {scanned:?}");
    let out = idemstore(&["stats", path_str(dir.path())]);
    let text = stdout(&out);
    let field = |name: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(name).filter(|rest| rest.starts_with(' ')).map(|rest| rest.trim().to_string()))
            .unwrap_or_else(|| panic!("no {name} line in {text}"))
    };
    assert_eq!(field("recovery_records"), scanned.records.to_string());
    let why: u64 = ["recovery_scanned_no_table", "recovery_scanned_unsealed"]
        .iter()
        .map(|name| field(name).parse::<u64>().expect("a number"))
        .sum();
    assert_eq!(why, scanned.segments, "every segment scanned is counted under a reason: {text}");

    let out = idemstore(&["stats", path_str(dir.path()), "--prometheus"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("# TYPE idemstore_claims_total counter"), "{text}");
    assert!(text.contains(&format!("\nidemstore_index_entries {}\n", scanned_stats.index_entries)), "{text}");
    assert!(text.contains(&format!("\nidemstore_recovery_records {}\n", scanned.records)), "{text}");
}

#[test]
fn verify_passes_a_clean_store_and_changes_nothing() {
    let dir = fixture();
    let before = snapshot(dir.path());
    let out = idemstore(&["verify", path_str(dir.path())]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("clean: 1 files") && text.contains("0 files with problems"), "{text}");
    assert!(text.contains("00000001.seg: ok, 13 records"), "{text}");
    assert_eq!(snapshot(dir.path()), before);
}

#[test]
fn verify_reports_corruption_mid_file_with_exit_code_1_and_changes_nothing() {
    let dir = fixture();
    let segment = segment_paths(dir.path()).into_iter().next().expect("a segment");
    let mut bytes = std::fs::read(&segment).expect("read");
    // A byte of the first record's key: the records after it are still valid.
    let first_key_byte = (idemstore::internals::SEGMENT_HEADER_LEN as usize) + idemstore::internals::HEADER_LEN;
    bytes[first_key_byte] ^= 0x40;
    std::fs::write(&segment, &bytes).expect("write");
    let before = snapshot(dir.path());

    let out = idemstore(&["verify", path_str(dir.path())]);
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("00000001.seg: CORRUPT at offset 64"), "{text}");
    assert!(text.contains("NOT clean"), "{text}");
    assert_eq!(snapshot(dir.path()), before, "verify must not change a byte");
}

#[test]
fn verify_reports_a_torn_tail_as_torn_and_still_clean() {
    let dir = fixture();
    let segment = segment_paths(dir.path()).into_iter().next().expect("a segment");
    let mut bytes = std::fs::read(&segment).expect("read");
    // Find the last record by walking the valid ones, then damage its value's last byte, as a
    // write cut short would.
    let mut pos = idemstore::internals::SEGMENT_HEADER_LEN as usize;
    let mut last = None;
    while let Ok((header, _, _)) = idemstore::internals::decode(1, &bytes[pos..]) {
        last = Some(pos);
        pos += header.padded_len() as usize;
    }
    let last = last.expect("records in the segment");
    bytes[last + idemstore::internals::HEADER_LEN + 1] ^= 0xff;
    std::fs::write(&segment, &bytes).expect("write");
    // A torn write is one no sync covered: without `MARKS` no record is known durable (with
    // it, the closed store's last record is, and its damage is corruption).
    std::fs::remove_file(dir.path().join("MARKS")).expect("remove MARKS");
    // Nor one a clean close covered with a restart table (its segment counts as durable whole).
    for table in std::fs::read_dir(dir.path()).expect("list").map(|e| e.expect("entry").path()) {
        if table.extension().is_some_and(|e| e == "tbl") {
            std::fs::remove_file(table).expect("remove table");
        }
    }

    let out = idemstore(&["verify", path_str(dir.path())]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("00000001.seg: ok, 12 records; torn tail of"), "{text}");
    assert!(text.contains("1 torn tails"), "{text}");
}

#[test]
fn verify_and_list_cover_every_segment_and_name_the_damaged_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = path_str(dir.path());
    let clock = ManualClock::new(START_MS);
    let store = Store::open(dir.path(), options(&clock)).expect("open");
    // Three TTLs, three expiry buckets, three segment files.
    for (hours, key) in [(1u64, "short"), (5, "medium"), (30, "long")] {
        let ttl = ClaimOptions { ttl: Some(Duration::from_secs(hours * 3600)), ..ClaimOptions::default() };
        for n in 0..3 {
            let key = format!("{key}-{n}");
            let Claim::Acquired(token) = store.claim_with(&key, "r", ttl.clone()).expect("claim") else {
                panic!("acquired")
            };
            store.complete(&token, "done").expect("complete");
        }
    }
    store.close().expect("close");
    let segments = segment_paths(dir.path());
    assert_eq!(segments.len(), 3, "one segment per bucket");

    let out = idemstore(&["list", d]);
    assert_eq!(stdout(&out).lines().count(), 9, "{}", stdout(&out));
    let out = idemstore(&["verify", d]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("clean: 3 files, 18 records"), "{}", stdout(&out));

    let damaged = &segments[1];
    let mut bytes = std::fs::read(damaged).expect("read");
    bytes[idemstore::internals::SEGMENT_HEADER_LEN as usize + 5] ^= 0x01;
    std::fs::write(damaged, &bytes).expect("write");
    let damaged_name = damaged.file_name().expect("name").to_string_lossy().into_owned();
    let out = idemstore(&["verify", d]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = stdout(&out);
    let corrupt: Vec<&str> = text.lines().filter(|l| l.contains("CORRUPT")).collect();
    assert_eq!(corrupt.len(), 1, "{text}");
    assert!(corrupt[0].starts_with(&format!("{damaged_name}: CORRUPT at offset 64")), "{text}");
    assert_eq!(text.lines().filter(|l| l.contains(": ok, 6 records")).count(), 2, "{text}");
}

#[test]
fn remove_deletes_a_key_of_a_closed_store() {
    let dir = fixture();
    let d = path_str(dir.path());
    let out = idemstore(&["remove", d, "order-1"]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out).trim_end(), "removed order-1 (it was completed)");
    assert_eq!(idemstore(&["get", d, "order-1"]).status.code(), Some(1));

    let out = idemstore(&["remove", d, "hex:00ff10"]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    assert_eq!(idemstore(&["get", d, "hex:00ff10"]).status.code(), Some(1));

    let out = idemstore(&["remove", d, "never-claimed"]);
    assert!(out.status.success());
    assert_eq!(stdout(&out).trim_end(), "never-claimed was absent; nothing to remove");

    let reopened = Store::open_read_only(dir.path()).expect("open");
    assert_eq!(reopened.get("order-1").expect("get"), None);
    assert!(reopened.get("order-2").expect("get").is_some(), "other keys stay");
}

#[test]
fn read_commands_work_on_a_store_held_open_by_a_writer_and_remove_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = path_str(dir.path());
    let clock = ManualClock::new(START_MS);
    let writer = Store::open(dir.path(), options(&clock)).expect("open");
    claim_and_complete(&writer, b"paid", b"charge 10", b"ch_123");
    let lease = ClaimOptions { lease: Some(Duration::from_secs(600)), ..ClaimOptions::default() };
    let Claim::Acquired(held) = writer.claim_with("sending", "mail", lease).expect("claim") else { panic!("acquired") };
    writer.checkpoint(&held, "rendered").expect("checkpoint");

    let out = idemstore(&["get", d, "paid"]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    assert!(stdout(&out).contains(r#"outcome     "ch_123""#), "{}", stdout(&out));
    for args in [vec!["stats", d], vec!["stats", d, "--prometheus"], vec!["list", d], vec!["dump", d, "--json"]] {
        let out = idemstore(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let out = idemstore(&["verify", d]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));

    let out = idemstore(&["remove", d, "paid"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.starts_with("error: cannot remove: store ") && err.contains("open in another process"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    // The writer is untouched and carries on.
    writer.complete(&held, "sent").expect("the live writer still holds its claim");
    assert!(matches!(writer.get("paid").expect("get"), Some(idemstore::Entry::Completed(_))));
}

/// While a writer appends without pause, every read command still succeeds and `verify` never
/// calls the tail being written corrupt (it may be torn: that is not a problem).
#[test]
fn read_commands_stay_clean_while_a_writer_appends() {
    const ITERATIONS_MAX: u64 = 3_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = path_str(dir.path());
    let clock = ManualClock::new(START_MS);
    let writer = std::sync::Arc::new(Store::open(dir.path(), options(&clock)).expect("open"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Cycles over 500 keys (claim, complete, remove) so the window stays small while the files
    // grow; bounded so a fast writer cannot make the reads slow.
    let appender = {
        let (writer, stop, progress) = (writer.clone(), stop.clone(), progress.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while n < ITERATIONS_MAX && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("key-{}", n % 500);
                claim_and_complete(&writer, key.as_bytes(), b"request", &vec![b'x'; (n % 300) as usize]);
                writer.remove(&key).expect("remove");
                n += 1;
                progress.store(n, std::sync::atomic::Ordering::Relaxed);
            }
            n
        })
    };
    let before_reads = progress.load(std::sync::atomic::Ordering::Relaxed);
    for round in 0..4 {
        for args in [vec!["verify", d], vec!["list", d], vec!["dump", d, "--json"], vec!["stats", d]] {
            let out = idemstore(&args);
            assert_eq!(out.status.code(), Some(0), "round {round} {args:?}: {}{}", stdout(&out), stderr(&out));
        }
    }
    let after_reads = progress.load(std::sync::atomic::Ordering::Relaxed);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = appender.join().expect("appender");
    assert!(written > 0, "the writer wrote while the CLI read");
    assert!(after_reads > before_reads, "the writer was done before the first read command ran ({before_reads} ops)");
}

/// A claim held by the live writer is in flight, not orphaned: its holder is alive. (The
/// read-only view has an incarnation of its own, so the engine must not call every claim of
/// another incarnation an orphan while the writer that made it still holds the lock.)
#[test]
fn a_live_writers_claim_is_in_flight_not_orphaned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = path_str(dir.path());
    let clock = ManualClock::new(START_MS);
    let writer = Store::open(dir.path(), options(&clock)).expect("open");
    let Claim::Acquired(_held) = writer.claim("sending", "mail").expect("claim") else { panic!("acquired") };

    let out = idemstore(&["get", d, "sending"]);
    assert!(stdout(&out).contains("state       in-flight"), "{}", stdout(&out));
    let out = idemstore(&["list", d, "--state", "orphaned"]);
    assert!(out.status.success(), "list failed: {}", stderr(&out));
    assert_eq!(stdout(&out), "", "the live writer's claim listed as an orphan");
}

#[test]
fn a_missing_directory_is_a_one_line_error_for_every_command() {
    let parent = tempfile::tempdir().expect("tempdir");
    let missing = parent.path().join("no-such-store");
    let m = path_str(&missing);
    for args in [
        vec!["stats", m],
        vec!["stats", m, "--prometheus"],
        vec!["get", m, "k"],
        vec!["list", m],
        vec!["dump", m, "--json"],
        vec!["verify", m],
        vec!["remove", m, "k"],
    ] {
        let out = idemstore(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr(&out);
        assert!(err.starts_with("error: ") && err.contains("no-such-store"), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert_eq!(stdout(&out), "", "{args:?}");
    }
    assert!(!missing.exists(), "no command may create the directory");
}

#[test]
fn remove_refuses_a_directory_that_holds_no_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = idemstore(&["remove", path_str(dir.path()), "k"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("holds no idemstore store"), "{}", stderr(&out));
    assert_eq!(std::fs::read_dir(dir.path()).expect("read dir").count(), 0, "nothing created");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A small strict JSON parser (RFC 8259), enough to check the CLI's hand-written JSON.
mod json {
    #[derive(Debug, Clone, PartialEq)]
    pub enum Value {
        Null,
        Bool(bool),
        Number(f64),
        String(String),
        Array(Vec<Value>),
        Object(Vec<(String, Value)>),
    }

    impl Value {
        pub fn get(&self, name: &str) -> Option<&Value> {
            match self {
                Value::Object(fields) => fields.iter().find(|(k, _)| k == name).map(|(_, v)| v),
                _ => None,
            }
        }
    }

    pub fn parse(text: &str) -> Result<Value, String> {
        let mut p = Parser { chars: text.chars().collect(), pos: 0 };
        let value = p.value()?;
        p.ws();
        if p.pos != p.chars.len() {
            return Err(format!("trailing data at {}", p.pos));
        }
        Ok(value)
    }

    struct Parser {
        chars: Vec<char>,
        pos: usize,
    }

    impl Parser {
        fn peek(&self) -> Option<char> {
            self.chars.get(self.pos).copied()
        }

        fn next(&mut self) -> Result<char, String> {
            let c = self.peek().ok_or("unexpected end")?;
            self.pos += 1;
            Ok(c)
        }

        fn ws(&mut self) {
            while matches!(self.peek(), Some(' ' | '\n' | '\r' | '\t')) {
                self.pos += 1;
            }
        }

        fn expect(&mut self, word: &str) -> Result<(), String> {
            for c in word.chars() {
                if self.next()? != c {
                    return Err(format!("expected {word} at {}", self.pos));
                }
            }
            Ok(())
        }

        fn value(&mut self) -> Result<Value, String> {
            self.ws();
            match self.peek().ok_or("unexpected end")? {
                'n' => self.expect("null").map(|()| Value::Null),
                't' => self.expect("true").map(|()| Value::Bool(true)),
                'f' => self.expect("false").map(|()| Value::Bool(false)),
                '"' => self.string().map(Value::String),
                '[' => {
                    self.pos += 1;
                    let mut items = Vec::new();
                    self.ws();
                    if self.peek() == Some(']') {
                        self.pos += 1;
                        return Ok(Value::Array(items));
                    }
                    loop {
                        items.push(self.value()?);
                        self.ws();
                        match self.next()? {
                            ',' => {}
                            ']' => return Ok(Value::Array(items)),
                            c => return Err(format!("unexpected {c:?} in array at {}", self.pos)),
                        }
                    }
                }
                '{' => {
                    self.pos += 1;
                    let mut fields = Vec::new();
                    self.ws();
                    if self.peek() == Some('}') {
                        self.pos += 1;
                        return Ok(Value::Object(fields));
                    }
                    loop {
                        self.ws();
                        let name = self.string()?;
                        self.ws();
                        self.expect(":")?;
                        let value = self.value()?;
                        if fields.iter().any(|(k, _)| *k == name) {
                            return Err(format!("duplicate field {name}"));
                        }
                        fields.push((name, value));
                        self.ws();
                        match self.next()? {
                            ',' => {}
                            '}' => return Ok(Value::Object(fields)),
                            c => return Err(format!("unexpected {c:?} in object at {}", self.pos)),
                        }
                    }
                }
                c if c == '-' || c.is_ascii_digit() => {
                    let start = self.pos;
                    while matches!(self.peek(), Some(c) if c == '-' || c == '+' || c == '.' || c == 'e' || c == 'E' || c.is_ascii_digit())
                    {
                        self.pos += 1;
                    }
                    let literal: String = self.chars[start..self.pos].iter().collect();
                    literal.parse().map(Value::Number).map_err(|e| format!("bad number {literal}: {e}"))
                }
                c => Err(format!("unexpected {c:?} at {}", self.pos)),
            }
        }

        fn string(&mut self) -> Result<String, String> {
            self.expect("\"")?;
            let mut s = String::new();
            loop {
                match self.next()? {
                    '"' => return Ok(s),
                    '\\' => match self.next()? {
                        '"' => s.push('"'),
                        '\\' => s.push('\\'),
                        '/' => s.push('/'),
                        'b' => s.push('\u{8}'),
                        'f' => s.push('\u{c}'),
                        'n' => s.push('\n'),
                        'r' => s.push('\r'),
                        't' => s.push('\t'),
                        'u' => {
                            let digits: String = (0..4).map(|_| self.next()).collect::<Result<_, _>>()?;
                            let code = u32::from_str_radix(&digits, 16).map_err(|e| e.to_string())?;
                            s.push(char::from_u32(code).ok_or("a surrogate escape")?);
                        }
                        c => return Err(format!("bad escape \\{c}")),
                    },
                    c if u32::from(c) < 0x20 => {
                        return Err(format!("raw control character {:#x} in a string", u32::from(c)));
                    }
                    c => s.push(c),
                }
            }
        }
    }
}
