//! Fuzz target `recover`: the body, and the promise it checks, are in `fuzz/bodies/recover.rs`, which
//! `tests/fuzz_corpus.rs` also compiles to replay the checked-in inputs under `cargo test`.
#![no_main]

#[path = "../bodies/recover.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::recover(data));
