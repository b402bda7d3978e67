//! Fuzz target `record_decode`: the body, and the promise it checks, are in `fuzz/bodies/record_decode.rs`, which
//! `tests/fuzz_corpus.rs` also compiles to replay the checked-in inputs under `cargo test`.
#![no_main]

#[path = "../bodies/record_decode.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::record_decode(data));
