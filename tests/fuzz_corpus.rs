//! Replays the checked-in fuzz inputs through the fuzz target bodies (`fuzz/bodies/`, compiled
//! in here as they are into the cargo-fuzz targets), so every crash the fuzzers once found
//! stays fixed and the seeds keep passing without cargo-fuzz: each file of
//! `fuzz/corpus/<target>/` and, when present, `fuzz/regressions/<target>/` goes to the matching
//! function. A missing or empty corpus directory fails the test, so the replay cannot silently
//! check nothing.
//!
//! Run with `cargo test --test fuzz_corpus`.

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

#[path = "../fuzz/bodies/ops_model.rs"]
mod ops_model;
#[path = "../fuzz/bodies/record_decode.rs"]
mod record_decode;
#[path = "../fuzz/bodies/recover.rs"]
mod recover;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `dir`, sorted; an error when the directory cannot be read.
fn inputs_in(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.map(|e| e.path()).map_err(|e| format!("cannot list {}: {e}", dir.display())))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.is_file());
    files.sort();
    Ok(files)
}

/// Feeds every corpus input (which must exist) and every regression input (if any) of
/// `target` to `body`; reports all failing inputs by name, not only the first.
fn replay(target: &str, body: fn(&[u8])) {
    let corpus_dir = fuzz_dir().join("corpus").join(target);
    let corpus = inputs_in(&corpus_dir).unwrap_or_else(|e| panic!("the seed corpus of {target} is missing: {e}"));
    assert!(!corpus.is_empty(), "the seed corpus {} is empty", corpus_dir.display());
    let regressions_dir = fuzz_dir().join("regressions").join(target);
    let regressions = if regressions_dir.exists() {
        inputs_in(&regressions_dir).unwrap_or_else(|e| panic!("{e}"))
    } else {
        Vec::new()
    };
    let mut failures = Vec::new();
    for path in corpus.iter().chain(&regressions) {
        let data = fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| body(&data))) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            failures.push(format!("{}: {message}", path.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} inputs of {target} fail:\n{}",
        failures.len(),
        corpus.len() + regressions.len(),
        failures.join("\n")
    );
}

#[test]
fn record_decode_corpus_and_regressions_pass() {
    replay("record_decode", record_decode::record_decode);
}

#[test]
fn recover_corpus_and_regressions_pass() {
    replay("recover", recover::recover);
}

#[test]
fn ops_model_corpus_and_regressions_pass() {
    replay("ops_model", ops_model::ops_model);
}
