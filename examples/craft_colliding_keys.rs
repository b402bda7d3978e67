//! Crafts keys that the unkeyed index hash (xxh3-64 with no secret, format version 1) piles onto
//! one probe run: every key shares the shard and the home slot of [`TARGET`] in a shard table of
//! up to [`SLOTS`] slots. Anyone who reads the source can do this offline; a store that hashes
//! keys under its own secret is immune. Writes one key per line:
//!
//! ```sh
//! cargo run --release --example craft_colliding_keys -- 3000 > tests/fixtures/crafted_keys.txt
//! ```
//!
//! Each key costs about 2^20 hashes (8 bits of shard, 12 of home slot); 3000 keys take a few
//! seconds on two cores.

use std::io::Write;

use idemstore::internals::place_in_index;

/// Slots of the shard table the keys share a home slot in (and in every smaller one): 3000 keys
/// fill a table of 4096 slots within its load limit.
const SLOTS: usize = 4096;
/// The (shard, home slot) every crafted key lands on.
const TARGET: (usize, usize) = (7, 0xab);

/// Key `n`: its 16 lowercase hex digits, as a client might send an idempotency key.
fn key(n: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = b"0123456789abcdef"[(n >> (60 - 4 * i) & 0xf) as usize];
    }
    out
}

fn main() {
    let wanted: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(3000);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    // Each thread tries every `threads`-th number and stops once it has found its share; the
    // lowest numbers found are kept (the same keys on every run with the same thread count).
    let found: Vec<u64> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut mine = Vec::new();
                    let mut n = t;
                    while mine.len() < wanted.div_ceil(threads as usize) + 1 {
                        if place_in_index(xxhash_rust::xxh3::xxh3_64(&key(n)), SLOTS) == TARGET {
                            mine.push(n);
                        }
                        n += threads;
                    }
                    mine
                })
            })
            .collect();
        let mut all: Vec<u64> = workers.into_iter().flat_map(|w| w.join().expect("worker")).collect();
        all.sort_unstable();
        all
    });
    let mut out = std::io::stdout().lock();
    for n in found.into_iter().take(wanted) {
        out.write_all(&key(n)).and_then(|()| out.write_all(b"\n")).expect("write");
    }
}
