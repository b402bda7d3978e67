//! Fuzz target: `idemstore::fuzzing::ops_model` (the body and the promise it checks live there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| idemstore::fuzzing::ops_model(data));
