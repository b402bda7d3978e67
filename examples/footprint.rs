//! Disk and RAM per key, for sizing a store: N keys of 32 bytes, each claimed with a 64-byte
//! request and completed with a 20-byte outcome (`Durability::None`, so the disk's speed does
//! not matter), then sealed (the state of a key older than `seal_idle_after`).
//!
//! Prints the store's disk use (file sizes and allocated blocks) and the growth of resident
//! anonymous memory (`RssAnon`, Linux) per key, before and after sealing, and the size of an
//! empty store. Run: `cargo run --release --example footprint` (`FOOTPRINT_KEYS`, default
//! 1,000,000).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use idemstore::{Claim, Durability, ManualClock, Options, Store};

/// Resident anonymous memory of this process, in bytes (0 where `/proc` has no such line).
fn rss_anon() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// (sum of file sizes, sum of allocated blocks) of the files in `dir`.
fn disk(dir: &Path) -> (u64, u64) {
    let mut sizes = (0, 0);
    for entry in std::fs::read_dir(dir).expect("list") {
        let meta = entry.expect("entry").metadata().expect("metadata");
        sizes.0 += meta.len();
        sizes.1 += meta.blocks() * 512;
    }
    sizes
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let keys: u64 = std::env::var("FOOTPRINT_KEYS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let clock = ManualClock::new(1_700_000_000_000);
    let options = Options {
        durability: Durability::None,
        clock: clock.clone(),
        seal_idle_after: Duration::from_secs(1),
        ..Options::default()
    };

    let empty = tempfile::tempdir()?;
    let store = Store::open(empty.path(), options.clone())?;
    // The housekeeper prepares a spare segment as it starts.
    let started = std::time::Instant::now();
    while store.stats().open_files < 2 && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let (bytes, blocks) = disk(empty.path());
    println!(
        "empty store: {bytes} bytes in files, {blocks} bytes allocated (stats disk_bytes {})",
        store.stats().disk_bytes
    );
    store.close()?;

    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path(), Options { background: false, ..options })?;
    let request = [b'r'; 64];
    let before = rss_anon();
    for i in 0..keys {
        let key = format!("{i:032x}");
        let Claim::Acquired(token) = store.claim(key.as_bytes(), request)? else { panic!("fresh key") };
        store.complete(&token, format!("201 order {i:010}"))?;
    }
    let in_ram = rss_anon().saturating_sub(before);
    let (bytes, blocks) = disk(dir.path());
    let stats = store.stats();
    let per = |v: u64| v as f64 / keys as f64;
    println!("{keys} keys (32 B key, 64 B request, 20 B outcome), claimed and completed:");
    println!(
        "  disk: {:.1} B/key in files, {:.1} B/key allocated; records {:.1} B/key (live {:.1})",
        per(bytes),
        per(blocks),
        per(stats.appended_bytes_total),
        per(stats.live_bytes)
    );
    println!("  RAM (RssAnon growth), keys in the RAM index: {:.1} B/key", per(in_ram));
    clock.advance(Duration::from_secs(2));
    store.maintain()?;
    let stats = store.stats();
    let sealed_ram = rss_anon().saturating_sub(before);
    let (bytes, blocks) = disk(dir.path());
    println!(
        "  after sealing ({} tables, {} entries, filters {:.2} B/key):",
        stats.sealed_tables,
        stats.sealed_entries,
        per(stats.sealed_filter_bytes)
    );
    println!("  disk: {:.1} B/key in files, {:.1} B/key allocated", per(bytes), per(blocks));
    println!("  RAM (RssAnon growth, allocator's cache included): {:.1} B/key", per(sealed_ram));
    store.close()?;
    Ok(())
}
