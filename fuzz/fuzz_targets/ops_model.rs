//! Fuzz target `ops_model`: the body, and the promise it checks, are in `fuzz/bodies/ops_model.rs`, which
//! `tests/fuzz_corpus.rs` also compiles to replay the checked-in inputs under `cargo test`.
#![no_main]

#[path = "../bodies/ops_model.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::ops_model(data));
