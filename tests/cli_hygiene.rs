//! The `idemstore` command line on paths that hold no store, its `--json` output, and its
//! figures against the writer's: every command refuses a missing path, a file, an empty
//! directory or a directory of other files (one line on stderr, exit 2, nothing created);
//! `get`, `list` and `stats` print one JSON object per line with `--json`; `stats` reports the
//! same `disk_bytes` and `index_entries` as the writer of the same files.
#![cfg(feature = "cli")]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use idemstore::{Claim, ManualClock, Options, Store};
use serde_json::Value;

mod common;
use common::options;

/// 2100-01-01T00:00:00Z: no record written at this time expires before the CLI reads it.
const START_MS: u64 = 4_102_444_800_000;

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

/// Names and bytes of every file under `dir` (one level), to show nothing was written.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| {
            let path = e.expect("dir entry").path();
            let name = path.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap_or_default())
        })
        .collect();
    files.sort();
    files
}

fn json_lines(output: &Output) -> Vec<serde_json::Map<String, Value>> {
    stdout(output)
        .lines()
        .map(|line| match serde_json::from_str(line) {
            Ok(Value::Object(obj)) => obj,
            other => panic!("not one JSON object per line ({other:?}): {line}"),
        })
        .collect()
}

#[test]
fn every_command_refuses_a_path_that_holds_no_store() {
    let root = tempfile::tempdir().expect("tempdir");
    // Like `/etc`: a directory of another program's files.
    let foreign = root.path().join("etc");
    std::fs::create_dir(&foreign).expect("mkdir");
    std::fs::write(foreign.join("passwd"), b"root:x:0:0").expect("write");
    std::fs::write(foreign.join("LOCK"), b"").expect("a stray LOCK alone does not make a store");
    let empty = root.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let file = root.path().join("a-file");
    std::fs::write(&file, b"hello").expect("write");
    let missing = root.path().join("typo");
    let before = snapshot(root.path());
    let foreign_before = snapshot(&foreign);

    for (path, says) in
        [(&foreign, "other files"), (&empty, "empty"), (&file, "is a file"), (&missing, "no such directory")]
    {
        let p = path_str(path);
        for args in [
            vec!["stats", p],
            vec!["stats", p, "--prometheus"],
            vec!["stats", p, "--json"],
            vec!["get", p, "k"],
            vec!["get", p, "k", "--json"],
            vec!["list", p],
            vec!["list", p, "--json"],
            vec!["dump", p],
            vec!["dump", p, "--json"],
            vec!["verify", p],
            vec!["remove", p, "k"],
        ] {
            let out = idemstore(&args);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}{err}", stdout(&out));
            assert!(err.starts_with("error: ") && err.contains("holds no idemstore store"), "{args:?}: {err}");
            assert!(err.contains(says) && err.contains(p), "{args:?}: {err}");
            assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
            assert_eq!(stdout(&out), "", "{args:?}");
        }
    }
    assert_eq!(snapshot(root.path()), before, "no command created or changed anything");
    assert_eq!(snapshot(&foreign), foreign_before);
    assert!(snapshot(&empty).is_empty());
}

#[test]
fn an_empty_store_is_a_store_for_every_read_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(START_MS);
    Store::open(dir.path(), options(&clock)).expect("open").close().expect("close");
    let d = path_str(dir.path());
    for args in [vec!["stats", d], vec!["list", d], vec!["dump", d], vec!["verify", d]] {
        let out = idemstore(&args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
    }
    let out = idemstore(&["get", d, "k"]);
    assert_eq!(out.status.code(), Some(1), "absent, not an error: {}", stderr(&out));
}

/// A store holding a completed text outcome, a binary key with a binary outcome, and an
/// in-flight claim with a checkpoint (an orphan once the writer closes).
fn write_fixture(dir: &Path) {
    let clock = ManualClock::new(START_MS);
    let store = Store::open(dir, options(&clock)).expect("open");
    let Claim::Acquired(token) = store.claim("order-1", "POST /orders").expect("claim") else { panic!("acquired") };
    store.complete(&token, "201 Created\n\"quoted\"").expect("complete");
    let Claim::Acquired(token) = store.claim([0u8, 0xff], "bin").expect("claim") else { panic!("acquired") };
    store.complete(&token, [0xff, 0xfe]).expect("complete");
    let Claim::Acquired(held) = store.claim("user-1", "signup").expect("claim") else { panic!("acquired") };
    store.checkpoint(&held, "row-written").expect("checkpoint");
    store.close().expect("close");
}

#[test]
fn get_list_and_stats_print_one_json_object_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_fixture(dir.path());
    let d = path_str(dir.path());

    let out = idemstore(&["get", d, "order-1", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1);
    let done = &lines[0];
    assert_eq!(done["key"], "order-1");
    assert_eq!(done["key_hex"], "6f726465722d31");
    assert_eq!(done["state"], "completed");
    assert_eq!(done["outcome"], "201 Created\n\"quoted\"");
    assert_eq!(done["claimed_at_ms"], START_MS);
    assert_eq!(done["claimed_at"], "2100-01-01T00:00:00.000Z");
    assert_eq!(done["expires_at"], "2100-01-02T00:00:00.000Z");

    let out = idemstore(&["get", d, "hex:00ff", "--json"]);
    let binary = &json_lines(&out)[0];
    assert!(!binary.contains_key("key") && !binary.contains_key("outcome"), "no text for bytes that are not UTF-8");
    assert_eq!((&binary["key_hex"], &binary["outcome_hex"]), (&Value::from("00ff"), &Value::from("fffe")));

    let out = idemstore(&["get", d, "user-1", "--json"]);
    let held = &json_lines(&out)[0];
    assert_eq!(
        (&held["state"], &held["checkpoint"], &held["orphaned"]),
        (&"orphaned".into(), &"row-written".into(), &true.into())
    );
    assert!(held.contains_key("lease_until_ms") && held.contains_key("lease_until"));

    let out = idemstore(&["get", d, "nobody", "--json"]);
    assert_eq!(out.status.code(), Some(1), "absent keeps its exit code");
    assert_eq!(
        json_lines(&out),
        [serde_json::json!({"key": "nobody", "key_hex": "6e6f626f6479", "state": "absent"})
            .as_object()
            .expect("object")
            .clone()]
    );

    let out = idemstore(&["list", d, "--json", "--sorted"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let listed = json_lines(&out);
    let keys: Vec<&Value> = listed.iter().map(|obj| &obj["key_hex"]).collect();
    assert_eq!(keys, ["00ff", "6f726465722d31", "757365722d31"], "every live key, sorted");
    assert!(listed.iter().all(|obj| obj.contains_key("state") && obj.contains_key("expires_at_ms")));

    let out = idemstore(&["stats", d, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stats = json_lines(&out);
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0]["read_only"], true, "the counters are the view's, and it says so");
    // The three records, in RAM or (after a clean close wrote restart tables) in tables.
    let entries = stats[0]["index_entries"].as_u64().unwrap_or(0) + stats[0]["sealed_entries"].as_u64().unwrap_or(0);
    assert_eq!(entries, 3, "{:?}", stats[0]);
    assert!(stats[0]["disk_bytes"].as_u64().is_some_and(|b| b > 0));
}

/// Waits (bounded, for liveness only) until the writer's housekeeper has prepared its spare
/// segment: the lock file, the one segment and the spare are open.
fn wait_for_spare(store: &Store) {
    let started = Instant::now();
    while store.stats().open_files < 3 {
        assert!(started.elapsed() < Duration::from_secs(30), "no spare segment was prepared");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn the_cli_and_the_writer_report_the_same_disk_bytes_and_index_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(START_MS);
    // The housekeeper prepares the spare segment: real disk, which both must count alike.
    let writer = Store::open(dir.path(), Options { background: true, ..options(&clock) }).expect("open");
    let Claim::Acquired(token) = writer.claim("a", "req").expect("claim") else { panic!("acquired") };
    writer.complete(&token, "done").expect("complete");
    let Claim::Acquired(token) = writer.claim("b", "req").expect("claim") else { panic!("acquired") };
    writer.release(&token).expect("release");
    writer.remove("a").expect("remove");
    wait_for_spare(&writer);
    let expected = writer.stats();

    let out = idemstore(&["stats", path_str(dir.path()), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let seen = &json_lines(&out)[0];
    assert_eq!(seen["disk_bytes"], expected.disk_bytes, "the spare segment counts on both sides");
    assert_eq!(seen["index_entries"], expected.index_entries, "the same entries, tombstones included");
    assert_eq!(seen["segments"], expected.segments);
}
