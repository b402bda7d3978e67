//! Promise: with the `tracing` feature, store calls run in debug spans named by their operation
//! and carrying a hash of the key (never the key), and recovery, poisoning and takeovers are
//! events; with the `metrics` feature, `Stats::record_metrics` sets the Prometheus text's
//! figures on the `metrics` facade under the same names and labels.
//!
//! Run with `cargo test --features tracing,metrics --test observability` (CI does).
#![cfg(all(feature = "tracing", feature = "metrics"))]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemstore::sim::SimDisk;
use idemstore::{ClaimOptions, Durability, ManualClock, Options, Store};

mod common;
use common::{START_MS, acquired};

/// Everything the fmt subscriber writes, shared with the test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn spans_and_events_name_the_operation_and_hash_the_key() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::NEW)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let secret_key = "customer-4242-secret-order";
    tracing::subscriber::with_default(subscriber, || {
        let disk = SimDisk::new();
        let options = Options { default_lease: Duration::from_secs(5), ..common::sim_options(&disk, Durability::Sync) };
        let clock = ManualClock::new(START_MS);
        let store = Store::open("/obs", Options { clock: clock.clone(), ..options.clone() }).unwrap();
        let _held = acquired(store.claim_with(secret_key, b"req", ClaimOptions::default()).unwrap());
        clock.advance(Duration::from_secs(6));
        let token = acquired(store.claim(secret_key, b"req").unwrap());
        store.complete(&token, b"done").unwrap();
        disk.fail_sync_after(0);
        let _ = store.claim("another", b"req");
    });
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let key_hash = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(secret_key.as_bytes()));
    assert!(text.contains("store opened"), "{text}");
    assert!(text.contains("op=\"claim\"") && text.contains(&key_hash), "{text}");
    assert!(text.contains("op=\"complete\""), "{text}");
    assert!(text.contains("taken over") && text.contains("reason=\"lease\""), "{text}");
    assert!(text.contains("store poisoned"), "{text}");
    assert!(!text.contains(secret_key), "the raw key appears in the trace:\n{text}");
}

#[test]
fn record_metrics_sets_the_prometheus_figures_under_their_names() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let store = common::open(dir.path(), &clock);
    let token = acquired(store.claim("k", b"r").unwrap());
    store.complete(&token, b"v").unwrap();
    for _ in 0..3 {
        let _ = store.claim("k", b"r").unwrap();
    }
    let _ = store.claim("k", b"other").unwrap();
    let stats = store.stats();
    metrics::with_local_recorder(&recorder, || stats.record_metrics());

    let snapshot = snapshotter.snapshot().into_vec();
    let find = |name: &str, label: Option<(&str, &str)>| {
        snapshot.iter().find_map(|(key, _, _, value)| {
            let key = key.key();
            let labels_match = match label {
                None => key.labels().next().is_none(),
                Some((k, v)) => key.labels().any(|l| l.key() == k && l.value() == v),
            };
            (key.name() == name && labels_match).then(|| format!("{value:?}"))
        })
    };
    assert_eq!(find("idemstore_claims_total", Some(("outcome", "replayed"))).as_deref(), Some("Counter(3)"));
    assert_eq!(find("idemstore_claims_total", Some(("outcome", "mismatch"))).as_deref(), Some("Counter(1)"));
    assert_eq!(find("idemstore_operations_total", Some(("op", "complete"))).as_deref(), Some("Counter(1)"));
    assert!(find("idemstore_index_entries", None).is_some_and(|v| v.starts_with("Gauge")));
    // Every family of the text is published.
    for line in stats.to_prometheus().lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split(' ').nth(2).unwrap();
        assert!(snapshot.iter().any(|(key, ..)| key.key().name() == name), "{name} not published");
    }
}

/// Each housekeeping pass publishes the figures itself: a service that installs a `metrics`
/// recorder gets them without calling `record_metrics`.
#[test]
fn each_housekeeping_pass_publishes_the_figures() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // The housekeeper is another thread: only a global recorder reaches it.
    metrics::set_global_recorder(recorder).expect("no other test of this binary sets one");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), Options { durability: Durability::None, ..Options::default() }).unwrap();
    let token = acquired(store.claim("k", b"r").unwrap());
    store.complete(&token, b"v").unwrap();
    let _ = store.claim("k", b"r").unwrap();
    assert!(store.run_housekeeping_pass(), "the housekeeper ran a pass");
    let snapshot = snapshotter.snapshot().into_vec();
    let replayed = snapshot.iter().find_map(|(key, _, _, value)| {
        let key = key.key();
        (key.name() == "idemstore_claims_total" && key.labels().any(|l| l.value() == "replayed"))
            .then(|| format!("{value:?}"))
    });
    assert_eq!(replayed.as_deref(), Some("Counter(1)"));
}
