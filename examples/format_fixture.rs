//! Writes the small store that `tests/format_fixture.rs` opens to pin the on-disk format:
//!
//! ```sh
//! cargo run --example format_fixture -- tests/fixtures/v2
//! ```
//!
//! Run once per format version with the code of that version and check the directory in; the
//! test then holds every later build to reading it (`v1` was written by the code before the
//! index hash was keyed, `v2` by the code that added `META`). Time comes from a `ManualClock` at
//! [`FIXTURE_MS`], so the test can open it at a known time:
//!
//! - `done-1`, `done-2`: completed before the first segment was sealed (found through the
//!   sealed table), outcomes `outcome of done-1` and so on;
//! - `done-3`: completed after, in the unsealed segment;
//! - `flying`: claimed and checkpointed (`phase-2`), never completed: an orphan once reopened;
//! - `removed`: completed, then removed; `released`: claimed, then released.
//!
//! Every request is `request of <key>`.

use std::path::PathBuf;
use std::time::Duration;

use idemstore::{Claim, Durability, ManualClock, Options, Store};

/// The store time at which the fixture is written (November 2023).
const FIXTURE_MS: u64 = 1_700_000_000_000;

fn acquire(store: &Store, key: &str) -> idemstore::ClaimToken {
    match store.claim(key, format!("request of {key}")).expect("claim") {
        Claim::Acquired(token) => token,
        other => panic!("{key}: expected Acquired, got {other:?}"),
    }
}

fn complete(store: &Store, key: &str) {
    let token = acquire(store, key);
    store.complete(&token, format!("outcome of {key}")).expect("complete");
}

fn main() {
    let dir: PathBuf = std::env::args_os().nth(1).expect("usage: format_fixture <new directory>").into();
    assert!(!dir.exists(), "{} exists: the fixture is written into a new directory", dir.display());
    let clock = ManualClock::new(FIXTURE_MS);
    let options = Options {
        durability: Durability::None,
        background: false,
        clock: clock.clone(),
        // Small files: a fixture of a few KiB.
        segment_bytes_initial: 4096,
        seal_idle_after: Duration::from_secs(60),
        ..Options::default()
    };
    let store = Store::open(&dir, options).expect("open");
    complete(&store, "done-1");
    complete(&store, "done-2");
    // Idle past `seal_idle_after`: the segment stops taking appends and gets its table.
    clock.advance(Duration::from_secs(120));
    store.maintain().expect("maintain");
    assert!(store.stats().sealed_tables >= 1, "the first segment was sealed");
    complete(&store, "done-3");
    let flying = acquire(&store, "flying");
    store.checkpoint(&flying, "phase-2").expect("checkpoint");
    complete(&store, "removed");
    store.remove("removed").expect("remove");
    let released = acquire(&store, "released");
    store.release(&released).expect("release");
    clock.advance(Duration::from_secs(1));
    store.close().expect("close");
    println!("wrote {}", dir.display());
}
