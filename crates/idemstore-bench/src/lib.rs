//! The peer comparison of idemstore with Redis, SQLite and redb lives in `benches/peers.rs`
//! (`cargo bench -p idemstore-bench --bench peers`). This crate exists so that those engines
//! are dependencies of the benchmark only, never of the library.
