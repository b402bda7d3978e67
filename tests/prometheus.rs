//! `Stats::to_prometheus()` is valid Prometheus text exposition (parsed back here by a small
//! strict parser: `# HELP`/`# TYPE` before each family's samples, legal metric and label names,
//! counters named `*_total`, no duplicate series) and its samples carry the `Stats` fields: after
//! a known sequence of operations, and for a snapshot whose every field holds a distinct value.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use idemstore::{Claim, Durability, ManualClock, Options, RecoveryStats, Stats, Store};

/// One parsed exposition: family name -> (type, help, samples keyed by their label text).
#[derive(Debug, Default)]
struct Exposition {
    families: BTreeMap<String, Family>,
}

#[derive(Debug, Default)]
struct Family {
    kind: String,
    help: String,
    /// Sorted `k="v"` pairs joined by commas (empty without labels) -> value.
    samples: BTreeMap<String, f64>,
}

impl Exposition {
    /// The value of `name` with exactly the labels `labels` (`k="v"` pairs in any order).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        pairs.sort();
        let family = self.families.get(name).unwrap_or_else(|| panic!("no family {name}"));
        *family.samples.get(&pairs.join(",")).unwrap_or_else(|| panic!("no sample {name}{{{}}}", pairs.join(",")))
    }
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
}

/// Parses `k="v",k2="v2"` (the text between the braces) into sorted pairs.
fn parse_labels(text: &str) -> Result<String, String> {
    let mut pairs = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").ok_or(format!("label without =\" in {text:?}"))?;
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().ok_or(format!("unterminated label value in {text:?}"))? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().map(|(_, c)| c) {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    other => return Err(format!("bad escape {other:?} in {text:?}")),
                },
                (_, c) => value.push(c),
            }
        };
        if pairs.iter().any(|(k, _): &(String, String)| k == name) {
            return Err(format!("label {name} twice"));
        }
        pairs.push((name.to_string(), value));
        rest = &after[end + 1..];
        if let Some(next) = rest.strip_prefix(',') {
            rest = next;
        } else if !rest.is_empty() {
            return Err(format!("junk after a label value in {text:?}"));
        }
    }
    let mut pairs: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    pairs.sort();
    Ok(pairs.join(","))
}

/// A strict parser of the text format, version 0.0.4.
fn parse(text: &str) -> Result<Exposition, String> {
    if !text.ends_with('\n') {
        return Err("the exposition must end with a newline".into());
    }
    let mut exposition = Exposition::default();
    let mut help_seen: HashMap<String, bool> = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').ok_or(format!("HELP without text: {line}"))?;
            if !is_metric_name(name) || help.trim().is_empty() {
                return Err(format!("bad HELP line: {line}"));
            }
            if exposition.families.contains_key(name) || help_seen.insert(name.to_string(), true).is_some() {
                return Err(format!("family {name} declared twice"));
            }
            exposition.families.insert(name.to_string(), Family { help: help.to_string(), ..Family::default() });
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or(format!("TYPE without type: {line}"))?;
            let family = exposition.families.get_mut(name).ok_or(format!("TYPE before HELP for {name}"))?;
            if !family.kind.is_empty() {
                return Err(format!("TYPE twice for {name}"));
            }
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(format!("unknown type {kind}"));
            }
            if kind == "counter" && !name.ends_with("_total") {
                return Err(format!("counter {name} does not end in _total"));
            }
            family.kind = kind.to_string();
        } else if line.starts_with("# ") {
            // A comment: the format allows them anywhere.
        } else if line.starts_with('#') || line.trim().is_empty() {
            return Err(format!("unexpected line: {line:?}"));
        } else {
            let (series, value) = line.rsplit_once(' ').ok_or(format!("sample without value: {line}"))?;
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => {
                    (name, parse_labels(labels.strip_suffix('}').ok_or(format!("unclosed labels: {line}"))?)?)
                }
                None => (series, String::new()),
            };
            if !is_metric_name(name) {
                return Err(format!("bad metric name {name:?}"));
            }
            let value: f64 = value.parse().map_err(|e| format!("bad value in {line}: {e}"))?;
            let family = exposition.families.get_mut(name).ok_or(format!("sample of {name} before its HELP"))?;
            if family.kind.is_empty() {
                return Err(format!("sample of {name} before its TYPE"));
            }
            if family.samples.insert(labels, value).is_some() {
                return Err(format!("duplicate series: {line}"));
            }
        }
    }
    if let Some((name, _)) = exposition.families.iter().find(|(_, f)| f.samples.is_empty() || f.kind.is_empty()) {
        return Err(format!("family {name} has no TYPE or no samples"));
    }
    Ok(exposition)
}

#[test]
fn the_parser_rejects_what_prometheus_rejects() {
    assert!(parse("# HELP a_total x\n# TYPE a_total counter\na_total 1\n").is_ok());
    assert!(parse("# HELP a x\n# TYPE a counter\na 1\n").is_err(), "counter without _total");
    assert!(parse("# TYPE a gauge\n# HELP a x\na 1\n").is_err(), "TYPE before HELP");
    assert!(parse("# HELP a x\n# TYPE a gauge\nb 1\n").is_err(), "sample of an undeclared family");
    assert!(parse("# HELP 1a x\n# TYPE 1a gauge\n1a 1\n").is_err(), "bad name");
    assert!(parse("# HELP a x\n# TYPE a gauge\na{l=\"1\"} 1\na{l=\"1\"} 2\n").is_err(), "duplicate series");
    assert!(parse("# HELP a x\n# TYPE a gauge\na{l=1} 1\n").is_err(), "unquoted label");
    assert!(parse("# HELP a x\n# TYPE a gauge\na 1").is_err(), "no final newline");
    assert!(parse("# HELP a x\n# TYPE a gauge\na one\n").is_err(), "bad value");
}

#[test]
fn samples_equal_the_stats_after_a_known_sequence_of_operations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(1_700_000_000_000);
    let options =
        Options { durability: Durability::None, clock: clock.clone(), background: false, ..Options::default() };
    let store = Store::open(dir.path(), options).expect("open");

    let acquire = |key: &str| match store.claim(key, "req").expect("claim") {
        Claim::Acquired(token) => token,
        other => panic!("{key}: expected Acquired, got {other:?}"),
    };
    let a = acquire("a");
    let b = acquire("b");
    let c = acquire("c");
    store.complete(&a, "A").expect("complete");
    store.complete(&b, "B").expect("complete");
    store.checkpoint(&c, "half").expect("checkpoint");
    assert!(matches!(store.claim("a", "req").expect("claim"), Claim::Completed(_)));
    assert!(matches!(store.claim("b", "req").expect("claim"), Claim::Completed(_)));
    assert_eq!(store.claim("a", "other request").expect("claim"), Claim::Mismatch);
    assert!(matches!(store.claim("c", "req").expect("claim"), Claim::InProgress { .. }));
    clock.advance(Duration::from_secs(1));

    let stats = store.stats();
    assert_eq!(stats.claims_acquired_total, 3);
    assert_eq!(stats.duplicates_replayed_total, 2);
    assert_eq!(stats.mismatches_total, 1);
    assert_eq!(stats.duplicates_in_progress_total, 1);
    assert_eq!(stats.completes_total, 2);
    assert_eq!(stats.checkpoints_total, 1);

    let exposition = parse(&stats.to_prometheus()).expect("valid exposition");
    let claims = "idemstore_claims_total";
    assert_eq!(exposition.value(claims, &[("outcome", "acquired")]), 3.0);
    assert_eq!(exposition.value(claims, &[("outcome", "replayed")]), 2.0);
    assert_eq!(exposition.value(claims, &[("outcome", "mismatch")]), 1.0);
    assert_eq!(exposition.value(claims, &[("outcome", "in_progress")]), 1.0);
    assert_eq!(exposition.value("idemstore_operations_total", &[("op", "complete")]), 2.0);
    assert_eq!(exposition.value("idemstore_operations_total", &[("op", "checkpoint")]), 1.0);
    assert_eq!(exposition.value("idemstore_index_entries", &[]), stats.index_entries as f64);
    assert_eq!(exposition.value("idemstore_segments", &[]), stats.segments as f64);
    assert_eq!(exposition.value("idemstore_poisoned", &[]), 0.0);

    // The dashboard tile "duplicate attempts blocked":
    // sum(idemstore_claims_total{outcome!="acquired"}).
    let blocked: f64 = exposition.families[claims]
        .samples
        .iter()
        .filter(|(labels, _)| *labels != "outcome=\"acquired\"")
        .map(|(_, v)| v)
        .sum();
    assert_eq!(blocked, stats.duplicates_blocked_total() as f64);
    assert_eq!(blocked, 4.0);
}

/// A metric name, its labels, and the value it must carry.
type Expected = (&'static str, &'static [(&'static str, &'static str)], f64);

/// Every field of a snapshot set to a distinct value, so a sample wired to the wrong field
/// shows up.
#[test]
#[allow(clippy::needless_update)]
fn every_stats_field_lands_in_its_own_sample() {
    let stats = Stats {
        claims_acquired_total: 101,
        duplicates_in_progress_total: 102,
        duplicates_replayed_total: 103,
        duplicates_waited_total: 104,
        mismatches_total: 105,
        lease_takeovers_total: 106,
        orphan_takeovers_total: 107,
        stale_tokens_total: 108,
        completes_total: 109,
        checkpoints_total: 110,
        releases_total: 111,
        removes_total: 112,
        keys_expired_total: 113,
        buckets_expired_total: 114,
        index_entries: 115,
        sealed_tables: 132,
        sealed_entries: 133,
        sealed_filter_bytes: 134,
        segments: 116,
        open_files: 135,
        appended_bytes_total: 136,
        live_bytes: 137,
        dead_bytes: 138,
        disk_bytes: 117,
        syncs_total: 118,
        synced_records_total: 119,
        sync_latency_us_total: 120,
        sync_latency_us_max: 121,
        last_seq: 122,
        durable_seq: 123,
        warnings: vec!["one".into(), "two".into()],
        recovery: RecoveryStats {
            duration_us: 124,
            records: 125,
            segments: 126,
            torn_bytes_truncated: 127,
            torn_tails: 128,
            expired_buckets_deleted: 129,
            empty_files_removed: 130,
            tables_rebuilt: 131,
            tables_loaded: 139,
            segments_scanned_no_table: 140,
            segments_scanned_unsealed_tail: 141,
            bytes_scanned: 142,
            scan_us: 143,
        },
        poisoned: Some("fsync failed".into()),
        maintenance_errors_total: 144,
        last_maintenance_error: Some("maintenance failed: delete expired segment".into()),
        // Fields added later start at zero here rather than break this test.
        ..Stats::default()
    };
    let e = parse(&stats.to_prometheus()).expect("valid exposition");
    let expected: [Expected; 38] = [
        ("idemstore_claims_total", &[("outcome", "acquired")], 101.0),
        ("idemstore_claims_total", &[("outcome", "in_progress")], 102.0),
        ("idemstore_claims_total", &[("outcome", "replayed")], 103.0),
        ("idemstore_claims_total", &[("outcome", "waited")], 104.0),
        ("idemstore_claims_total", &[("outcome", "mismatch")], 105.0),
        ("idemstore_takeovers_total", &[("reason", "lease")], 106.0),
        ("idemstore_takeovers_total", &[("reason", "orphan")], 107.0),
        ("idemstore_stale_tokens_total", &[], 108.0),
        ("idemstore_operations_total", &[("op", "complete")], 109.0),
        ("idemstore_operations_total", &[("op", "checkpoint")], 110.0),
        ("idemstore_operations_total", &[("op", "release")], 111.0),
        ("idemstore_operations_total", &[("op", "remove")], 112.0),
        ("idemstore_keys_expired_total", &[], 113.0),
        ("idemstore_buckets_expired_total", &[], 114.0),
        ("idemstore_index_entries", &[], 115.0),
        ("idemstore_sealed_tables", &[], 132.0),
        ("idemstore_sealed_entries", &[], 133.0),
        ("idemstore_sealed_filter_bytes", &[], 134.0),
        ("idemstore_segments", &[], 116.0),
        ("idemstore_open_files", &[], 135.0),
        ("idemstore_appended_bytes_total", &[], 136.0),
        ("idemstore_live_bytes", &[], 137.0),
        ("idemstore_dead_bytes", &[], 138.0),
        ("idemstore_disk_bytes", &[], 117.0),
        ("idemstore_syncs_total", &[], 118.0),
        ("idemstore_synced_records_total", &[], 119.0),
        ("idemstore_sync_latency_seconds_total", &[], 120e-6),
        ("idemstore_sync_latency_seconds_max", &[], 121e-6),
        ("idemstore_recovery_duration_seconds", &[], 124e-6),
        ("idemstore_recovery_records", &[], 125.0),
        ("idemstore_recovery_torn_bytes", &[], 127.0),
        ("idemstore_recovery_scanned_segments", &[("reason", "no_table")], 140.0),
        ("idemstore_recovery_scanned_segments", &[("reason", "unsealed_tail")], 141.0),
        ("idemstore_recovery_scanned_segments", &[("reason", "damaged_table")], 131.0),
        ("idemstore_recovery_tables_loaded", &[], 139.0),
        ("idemstore_recovery_scan_seconds", &[], 143e-6),
        ("idemstore_maintenance_errors_total", &[], 144.0),
        ("idemstore_poisoned", &[], 1.0),
    ];
    for (name, labels, value) in expected {
        assert_eq!(e.value(name, labels), value, "{name}{labels:?}");
        // One name per quantity: no other sample repeats this field's distinct value.
        let carriers: Vec<&String> = e
            .families
            .iter()
            .filter(|(_, family)| family.samples.values().any(|v| *v == value))
            .map(|(name, _)| name)
            .collect();
        assert_eq!(carriers, [name], "{name}{labels:?}: the value {value} is exposed under more than one name");
    }
    for name in e.families.keys() {
        assert!(!name.contains("microseconds") && !name.contains("_us"), "{name}: durations are in seconds");
    }
    assert_eq!(e.value("idemstore_warnings", &[]), 2.0, "the gauge counts the warnings");
    for (name, family) in &e.families {
        assert!(!family.help.is_empty(), "{name} has help");
        if name.ends_with("_total") {
            assert_eq!(family.kind, "counter", "{name} ends in _total, so it is a counter");
        }
    }
    let healthy = Stats { poisoned: None, ..stats };
    assert_eq!(parse(&healthy.to_prometheus()).expect("valid").value("idemstore_poisoned", &[]), 0.0);
}

/// A duplicate that waited for the holder and then got the stored outcome did not run the
/// effect: it is a blocked duplicate, in `duplicates_blocked_total()` and in the dashboard
/// query `sum(idemstore_claims_total{outcome!="acquired"})`.
#[test]
fn duplicates_replayed_after_waiting_count_as_blocked() {
    let stats = Stats { duplicates_waited_total: 4, duplicates_replayed_total: 1, ..Stats::default() };
    assert_eq!(stats.duplicates_blocked_total(), 5, "waited replays are blocked duplicates");
    let exposition = parse(&stats.to_prometheus()).expect("valid exposition");
    let blocked: f64 = exposition.families["idemstore_claims_total"]
        .samples
        .iter()
        .filter(|(labels, _)| *labels != "outcome=\"acquired\"")
        .map(|(_, v)| v)
        .sum();
    assert_eq!(blocked, 5.0, "the dashboard query sees the waited replays too");
}

/// A read-only view (the CLI's `stats --prometheus`) counts only what the view did: its text
/// says so before anything else and in an info metric, so a scrape of it is not taken for the
/// writer's counters. The writer's own text carries neither.
#[test]
fn a_views_text_says_its_counters_are_not_the_writers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(1_700_000_000_000);
    let options =
        Options { durability: Durability::None, clock: clock.clone(), background: false, ..Options::default() };
    let writer = Store::open(dir.path(), options.clone()).expect("open");
    assert!(matches!(writer.claim("a", "req").expect("claim"), Claim::Acquired(_)));
    let writer_text = writer.stats().to_prometheus();
    assert!(writer_text.starts_with("# HELP "), "{writer_text}");
    assert!(!writer_text.contains("idemstore_view_info"), "{writer_text}");
    assert!(!writer.stats().read_only);

    let view = Store::open_read_only_with(dir.path(), options).expect("view");
    let stats = view.stats();
    assert!(stats.read_only);
    let text = stats.to_prometheus();
    let first = text.lines().next().expect("a first line");
    assert!(
        first.starts_with("# ") && !first.starts_with("# HELP") && first.contains("read-only view"),
        "first line: {first}"
    );
    assert!(first.contains("not the writer's"), "first line: {first}");
    let e = parse(&text).expect("valid exposition");
    assert_eq!(e.value("idemstore_view_info", &[("read_only", "true")]), 1.0);
    assert_eq!(e.value("idemstore_claims_total", &[("outcome", "acquired")]), 0.0, "the writer's claim is not counted");
}
