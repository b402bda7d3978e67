//! `Store::open` is explicit about where it makes a store: a path that is a file, or a
//! directory of another program's files, is `Error::NotAStore` with a clear message whatever
//! the options (nothing is created there); with `create_if_missing: false` a missing or empty
//! directory is refused too, and an existing store opens as always.

use std::path::Path;

use idemstore::{Error, ManualClock, Options, Store};

mod common;
use common::{START_MS, options};

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_path_that_is_a_file_is_not_a_store_and_is_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("dedupe");
    std::fs::write(&file, b"not a store").expect("write");
    let clock = ManualClock::new(START_MS);
    let Err(err) = Store::open(&file, options(&clock)) else { panic!("a file is refused") };
    assert!(matches!(err, Error::NotAStore { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("holds no idemstore store") && message.contains("is a file"), "{message}");
    assert!(message.contains(&file.display().to_string()), "{message}");
    assert_eq!(std::fs::read(&file).expect("read"), b"not a store");
}

#[test]
fn a_directory_of_other_files_is_not_a_store_and_nothing_is_created_in_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("passwd"), b"root:x:0:0").expect("write");
    std::fs::write(dir.path().join("hosts"), b"127.0.0.1 localhost").expect("write");
    let clock = ManualClock::new(START_MS);
    let Err(err) = Store::open(dir.path(), options(&clock)) else { panic!("a foreign directory is refused") };
    assert!(matches!(err, Error::NotAStore { .. }), "{err:?}");
    assert!(err.to_string().contains("\"hosts\""), "the message names a file found: {err}");
    assert_eq!(names_in(dir.path()), ["hosts", "passwd"], "no LOCK, META or TIME was written");
}

#[test]
fn without_create_if_missing_a_missing_or_empty_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(START_MS);
    let strict = || Options { create_if_missing: false, ..options(&clock) };
    let missing = dir.path().join("typo");
    let Err(err) = Store::open(&missing, strict()) else { panic!("a missing directory is refused") };
    assert!(matches!(err, Error::NotAStore { .. }) && err.to_string().contains("no such directory"), "{err}");
    assert!(!missing.exists(), "the missing directory was not created");

    let Err(err) = Store::open(dir.path(), strict()) else { panic!("an empty directory is refused") };
    assert!(matches!(err, Error::NotAStore { .. }) && err.to_string().contains("empty"), "{err}");
    assert!(names_in(dir.path()).is_empty(), "nothing was created");
}

#[test]
fn without_create_if_missing_an_existing_store_opens_and_keeps_its_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(START_MS);
    let store = Store::open(dir.path(), options(&clock)).expect("create");
    let token = common::acquire(&store, "k");
    store.complete(&token, "done").expect("complete");
    store.close().expect("close");
    // An empty store (no key yet) of this version counts as a store as well.
    let empty = tempfile::tempdir().expect("tempdir");
    Store::open(empty.path(), options(&clock)).expect("create").close().expect("close");

    let strict = || Options { create_if_missing: false, ..options(&clock) };
    let store = Store::open(dir.path(), strict()).expect("an existing store opens");
    assert!(store.get("k").expect("get").is_some());
    Store::open(empty.path(), strict()).expect("an empty store opens");
    Store::check_is_store(empty.path()).expect("and is a store");
}

#[test]
fn by_default_a_missing_directory_is_still_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(START_MS);
    let path = dir.path().join("a").join("b");
    Store::open(&path, options(&clock)).expect("created").close().expect("close");
    Store::check_is_store(&path).expect("a store now");
}
