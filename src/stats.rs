//! Counters kept by a store, a snapshot of them (`Stats`), and its Prometheus text form.

use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;

/// Store-wide counters of background work, named as their `Stats` fields (the counters kept
/// per index shard are `ShardCounters`, below).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Index entries dropped with their bucket, in RAM and in sealed tables (claims that find
    /// a key expired count in `ShardCounters::keys_expired_total`; `Stats` shows the sum).
    pub keys_expired_total: AtomicU64,
    pub buckets_expired_total: AtomicU64,
    /// Failed background passes (see `Stats::maintenance_errors_total`).
    pub maintenance_errors_total: AtomicU64,
    /// Maintenance passes failed in a row since the last one that succeeded (a panic counts as
    /// enough at once; see `store::housekeeper::MAINTENANCE_FAILURES_WARNED`).
    pub maintenance_failures_in_a_row: AtomicU64,
    /// The cause of the latest failed background pass.
    pub last_maintenance_error: parking_lot::Mutex<Option<String>>,
}

/// What recovery found when the store was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryStats {
    /// Time the open took, in microseconds.
    pub duration_us: u64,
    /// Records scanned: read from segments that had no valid table (segments with one are
    /// mapped, not read).
    pub records: u64,
    /// Live segment files found (scanned, or mapped with their table).
    pub segments: u64,
    /// Bytes of torn tails truncated.
    pub torn_bytes_truncated: u64,
    /// Files whose tail was torn.
    pub torn_tails: u64,
    /// Segment files of expired buckets deleted at open.
    pub expired_buckets_deleted: u64,
    /// Empty files (created, header never written) removed at open.
    pub empty_files_removed: u64,
    /// Sealed tables mapped instead of scanning their segments.
    pub tables_loaded: u64,
    /// Damaged tables whose segment was scanned instead (the table is written anew): the
    /// segments scanned because their table was damaged, missing its store's hash, or unreadable.
    pub tables_rebuilt: u64,
    /// Segments scanned because they had no table though they had stopped taking appends
    /// (not the newest of their bucket): the process stopped before their table was written.
    pub segments_scanned_no_table: u64,
    /// Segments scanned because they had no table and were the newest of their bucket: most
    /// likely still taking appends when the process stopped (an unsealed tail).
    pub segments_scanned_unsealed_tail: u64,
    /// Bytes of the segments scanned (their reserved length, zeros after the last record too).
    pub bytes_scanned: u64,
    /// Time the scan of segments without a valid table took, in microseconds (part of
    /// `duration_us`); `records` / this is the scan rate.
    pub scan_us: u64,
}

/// A snapshot of a store's counters. Every `*_total` field counts since the store was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Claims that acquired the key (including takeovers).
    pub claims_acquired_total: u64,
    /// Duplicate claims answered `InProgress`.
    pub duplicates_in_progress_total: u64,
    /// Duplicate claims answered with the stored outcome.
    pub duplicates_replayed_total: u64,
    /// Duplicate claims that waited for the holder and then got its outcome (not counted in
    /// `duplicates_replayed_total`; a wait that ends in a takeover counts as acquired, one that
    /// runs out as in progress).
    pub duplicates_waited_total: u64,
    /// Claims answered `Mismatch`.
    pub mismatches_total: u64,
    /// Claims that took over a claim whose lease ran out.
    pub lease_takeovers_total: u64,
    /// Claims that took over an orphan of an earlier process.
    pub orphan_takeovers_total: u64,
    /// `complete`/`checkpoint`/`release` calls refused with `StaleToken`.
    pub stale_tokens_total: u64,
    /// Successful `complete` calls.
    pub completes_total: u64,
    /// Successful `checkpoint` calls.
    pub checkpoints_total: u64,
    /// Successful `release` calls.
    pub releases_total: u64,
    /// `remove` calls that removed a key.
    pub removes_total: u64,
    /// Index entries dropped because their bucket expired.
    pub keys_expired_total: u64,
    /// Buckets dropped whole.
    pub buckets_expired_total: u64,
    /// Entries in the in-RAM index, one per key whose latest record is in a segment that still
    /// takes appends: keys in flight or completed, and also keys released or removed (their
    /// tombstone keeps an entry until its bucket drops), so this is not the count of live keys
    /// (`Store::keys().len()` is). A writer and a read-only view of the same files count the
    /// same entries.
    pub index_entries: u64,
    /// Sealed tables (one per segment that takes no more appends).
    pub sealed_tables: u64,
    /// Entries in sealed tables (on disk, read through the map).
    pub sealed_entries: u64,
    /// RAM taken by the sealed tables' filters and their union filter, in bytes.
    pub sealed_filter_bytes: u64,
    /// Live segment files.
    pub segments: u64,
    /// Files the store holds a descriptor for: segments taking appends, the spare segment and
    /// the lock file (at most `Options::max_open_files` + 2).
    pub open_files: u64,
    /// Bytes reserved on disk by segment files: records, preallocated space not yet used, and
    /// the spare segment prepared ahead of need (real disk, so counted; a read-only view counts
    /// the writer's spare as it finds it on disk, and so reports what the writer does).
    pub disk_bytes: u64,
    /// Bytes of records appended since the store was opened.
    pub appended_bytes_total: u64,
    /// Bytes of records that are the latest of their key, in live segments. Counted since
    /// open and by the scan at open; segments mapped with their table at open (sealed, or
    /// given a table at close) are not scanned, so their records are counted in neither
    /// this nor `dead_bytes`.
    pub live_bytes: u64,
    /// Bytes of records superseded by a later record of their key (space that only the
    /// bucket's expiry gives back).
    pub dead_bytes: u64,
    /// Syncs (fdatasync rounds) done by group commit or the flusher.
    pub syncs_total: u64,
    /// Records made durable by those syncs (records / syncs = mean batch size).
    pub synced_records_total: u64,
    /// Sum of sync latencies, in microseconds.
    pub sync_latency_us_total: u64,
    /// Slowest sync, in microseconds.
    pub sync_latency_us_max: u64,
    /// Highest sequence number written.
    pub last_seq: u64,
    /// Highest sequence number known durable.
    pub durable_seq: u64,
    /// Problems that do not stop the store, one sentence each. Today: a store directory whose
    /// mode grants its group or other users more than `Options::file_access` allows (ending
    /// with the command that fixes it; read at each `stats` call, so a fix shows at once); and
    /// background maintenance failing pass after pass, or after a panic of its thread (gone
    /// once a pass succeeds). Empty when all is well.
    pub warnings: Vec<String>,
    /// Failed background passes since open: a maintenance pass (expiry, sealing, the time
    /// floor, the spare segment; by the housekeeper thread or `Store::maintain`) that returned
    /// an error or whose thread panicked, and a periodic sync whose thread panicked. A pass on
    /// a store already poisoned is not counted (its cause is in `poisoned`).
    pub maintenance_errors_total: u64,
    /// The cause of the latest failed background pass (see `maintenance_errors_total`), kept
    /// after later passes succeed.
    pub last_maintenance_error: Option<String>,
    /// What recovery found at open.
    pub recovery: RecoveryStats,
    /// The poison cause, when a write or sync failed.
    pub poisoned: Option<String>,
    /// The snapshot is a read-only view's (`Store::open_read_only`, the `idemstore` CLI): its
    /// `*_total` counters count what the view did since it opened (next to nothing), not
    /// what the writer did. `to_prometheus` says so in its first line and in
    /// `idemstore_view_info`.
    pub read_only: bool,
}

impl Stats {
    /// Duplicate attempts blocked: every claim that did not run the effect again.
    pub fn duplicates_blocked_total(&self) -> u64 {
        self.duplicates_in_progress_total
            + self.duplicates_replayed_total
            + self.duplicates_waited_total
            + self.mismatches_total
    }

    /// The Prometheus text exposition format (version 0.0.4), ready to serve on `/metrics`.
    /// The dashboard tile "duplicate attempts blocked (24h)" is
    /// `sum(increase(idemstore_claims_total{outcome!="acquired"}[24h]))`.
    ///
    /// Durations are in seconds, as Prometheus names them (`_seconds`); each quantity has one
    /// name. A read-only view's text starts with a `# ` comment saying its counters are not the
    /// writer's, and carries `idemstore_view_info{read_only="true"} 1`.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        if self.read_only {
            out.push_str(
                "# A read-only view of an idemstore store: its *_total counters count only since this view \
                 opened, not the writer's; scrape the writing service for those.\n",
            );
        }
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, Sample)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {value}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {value}");
                }
            }
        };
        for f in FAMILIES {
            let samples: Vec<(&str, Sample)> = f.samples.iter().map(|(labels, value)| (*labels, value(self))).collect();
            family(f.name, f.kind, f.help, &samples);
        }
        if self.read_only {
            family(
                "idemstore_view_info",
                "gauge",
                "1: these figures come from a read-only view, whose counters are not the writer's.",
                &[("read_only=\"true\"", Sample::Count(1))],
            );
        }
        out
    }
}

#[cfg(feature = "metrics")]
impl Stats {
    /// Sets every figure of the Prometheus text (`to_prometheus`) on the `metrics` facade's
    /// recorder, under the same names and labels: counters as absolute values, gauges as
    /// values, durations in seconds (as gauges: the facade's counters hold integers). A store
    /// with a housekeeping thread does this on each pass (about once a second); call it to
    /// publish at other times.
    pub fn record_metrics(&self) {
        for family in FAMILIES {
            for (labels, value) in family.samples {
                let labels = parse_labels(labels);
                match (family.kind, value(self)) {
                    ("counter", Sample::Count(n)) => metrics::counter!(family.name, labels).absolute(n),
                    (_, Sample::Count(n)) => metrics::gauge!(family.name, labels).set(n as f64),
                    (_, Sample::Seconds(us)) => metrics::gauge!(family.name, labels).set(us as f64 / 1e6),
                }
            }
        }
    }
}

/// The labels of a sample (`k="v",k2="v2"`, as the text writes them) as facade labels.
#[cfg(feature = "metrics")]
fn parse_labels(labels: &str) -> Vec<metrics::Label> {
    labels
        .split(',')
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            Some(metrics::Label::new(key.trim().to_owned(), value.trim().trim_matches('"').to_owned()))
        })
        .collect()
}

/// One Prometheus family: its name, type and help, and its samples (label set, value).
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: &'static [LabeledSample],
}

/// A sample's label set (empty for none) and how its value is read from `Stats`.
type LabeledSample = (&'static str, fn(&Stats) -> Sample);

/// Declares every figure of the Prometheus text once: family name, type and help, and for
/// each sample its labels and the `Stats` field it shows. A sample marked `shard` is also a
/// counter the store bumps under an index shard's lock: `ShardCounters` gets a field of the
/// same name as the `Stats` field (so a counter has one name in the code, in `Stats` and, with
/// its family and label, in the text). The others: `count` shows a field as it is, `seconds`
/// a duration kept in microseconds, `len` a list's length, `set` 1 when an option holds a value.
macro_rules! metrics {
    ($($name:literal $kind:ident $help:literal { $($labels:literal => $how:ident $($field:ident).+,)* })*) => {
        const FAMILIES: &[Family] = &[$(Family {
            name: $name,
            kind: stringify!($kind),
            help: $help,
            samples: &[$(($labels, |s: &Stats| metrics!(@sample $how s $($field).+)),)*],
        },)*];
        metrics!(@shard [] $($($how $($field).+;)*)*);
    };
    (@sample shard $s:ident $($field:ident).+) => { Sample::Count($s.$($field).+) };
    (@sample count $s:ident $($field:ident).+) => { Sample::Count($s.$($field).+) };
    (@sample seconds $s:ident $($field:ident).+) => { Sample::Seconds($s.$($field).+) };
    (@sample len $s:ident $($field:ident).+) => { Sample::Count($s.$($field).+.len() as u64) };
    (@sample set $s:ident $($field:ident).+) => { Sample::Count(u64::from($s.$($field).+.is_some())) };
    (@shard [$($acc:ident)*] shard $field:ident; $($rest:tt)*) => { metrics!(@shard [$($acc)* $field] $($rest)*); };
    (@shard [$($acc:ident)*] $how:ident $($field:ident).+; $($rest:tt)*) => { metrics!(@shard [$($acc)*] $($rest)*); };
    (@shard [$($field:ident)*]) => {
        /// Counters bumped under an index shard's lock: plain integers, so threads on
        /// different shards never fight over a counter's cache line. `Store::stats` sums them
        /// into the `Stats` fields of the same names.
        #[derive(Debug, Default, Clone, Copy)]
        pub(crate) struct ShardCounters {
            $(pub $field: u64,)*
        }

        impl ShardCounters {
            /// Adds `o`'s counts to these.
            pub fn add(&mut self, o: &ShardCounters) {
                $(self.$field += o.$field;)*
            }

            /// Adds these counts to `stats`' fields of the same names.
            pub fn add_to(&self, stats: &mut Stats) {
                $(stats.$field += self.$field;)*
            }
        }
    };
}

metrics! {
    "idemstore_claims_total" counter "Claims by outcome." {
        "outcome=\"acquired\"" => shard claims_acquired_total,
        "outcome=\"in_progress\"" => shard duplicates_in_progress_total,
        "outcome=\"replayed\"" => shard duplicates_replayed_total,
        "outcome=\"waited\"" => shard duplicates_waited_total,
        "outcome=\"mismatch\"" => shard mismatches_total,
    }
    "idemstore_takeovers_total" counter "Claims taken over from an earlier holder." {
        "reason=\"lease\"" => shard lease_takeovers_total,
        "reason=\"orphan\"" => shard orphan_takeovers_total,
    }
    "idemstore_stale_tokens_total" counter "Calls refused because their token was stale." {
        "" => shard stale_tokens_total,
    }
    "idemstore_operations_total" counter "Token and key operations that wrote a record." {
        "op=\"complete\"" => shard completes_total,
        "op=\"checkpoint\"" => shard checkpoints_total,
        "op=\"release\"" => shard releases_total,
        "op=\"remove\"" => shard removes_total,
    }
    "idemstore_keys_expired_total" counter "Index entries dropped by expiry." {
        "" => shard keys_expired_total,
    }
    "idemstore_buckets_expired_total" counter "Expiry buckets dropped whole." {
        "" => count buckets_expired_total,
    }
    "idemstore_index_entries" gauge "Keys in the in-memory index." {
        "" => count index_entries,
    }
    "idemstore_sealed_tables" gauge "Sealed per-segment tables." {
        "" => count sealed_tables,
    }
    "idemstore_sealed_entries" gauge "Keys in sealed tables." {
        "" => count sealed_entries,
    }
    "idemstore_sealed_filter_bytes" gauge "RAM taken by sealed tables' filters." {
        "" => count sealed_filter_bytes,
    }
    "idemstore_segments" gauge "Live segment files." {
        "" => count segments,
    }
    "idemstore_open_files" gauge "Files held open (descriptors)." {
        "" => count open_files,
    }
    "idemstore_appended_bytes_total" counter "Bytes of records appended since open." {
        "" => count appended_bytes_total,
    }
    "idemstore_live_bytes" gauge "Bytes of latest records in live segments." {
        "" => count live_bytes,
    }
    "idemstore_dead_bytes" gauge "Bytes of superseded records in live segments." {
        "" => count dead_bytes,
    }
    "idemstore_disk_bytes" gauge "Bytes reserved on disk by segment files." {
        "" => count disk_bytes,
    }
    "idemstore_syncs_total" counter "fdatasync rounds." {
        "" => count syncs_total,
    }
    "idemstore_synced_records_total" counter "Records made durable by syncs." {
        "" => count synced_records_total,
    }
    "idemstore_sync_latency_seconds_total" counter "Time spent in syncs, in seconds." {
        "" => seconds sync_latency_us_total,
    }
    "idemstore_sync_latency_seconds_max" gauge "Slowest sync since open, in seconds." {
        "" => seconds sync_latency_us_max,
    }
    "idemstore_recovery_records" gauge "Records scanned at open." {
        "" => count recovery.records,
    }
    "idemstore_recovery_torn_bytes" gauge "Torn tail bytes truncated at open." {
        "" => count recovery.torn_bytes_truncated,
    }
    "idemstore_recovery_duration_seconds" gauge "Time the open took, in seconds." {
        "" => seconds recovery.duration_us,
    }
    "idemstore_recovery_scanned_segments" gauge "Segments scanned at open, by why they had no usable table." {
        "reason=\"no_table\"" => count recovery.segments_scanned_no_table,
        "reason=\"unsealed_tail\"" => count recovery.segments_scanned_unsealed_tail,
        "reason=\"damaged_table\"" => count recovery.tables_rebuilt,
    }
    "idemstore_recovery_tables_loaded" gauge "Tables mapped at open instead of scanning their segments." {
        "" => count recovery.tables_loaded,
    }
    "idemstore_recovery_scan_seconds" gauge "Time the scan of segments without a table took at open, in seconds." {
        "" => seconds recovery.scan_us,
    }
    "idemstore_warnings" gauge "Setup problems that do not stop the store, such as a directory others can read (see idemstore stats)." {
        "" => len warnings,
    }
    "idemstore_maintenance_errors_total" counter "Failed background maintenance passes (expiry, sealing, time floor, spare segment) and background thread panics." {
        "" => count maintenance_errors_total,
    }
    "idemstore_poisoned" gauge "1 when a failed write or sync stopped writes." {
        "" => set poisoned,
    }
}

/// One sample's value: a count, or a duration kept in microseconds and shown in seconds.
#[derive(Clone, Copy)]
enum Sample {
    Count(u64),
    Seconds(u64),
}

impl std::fmt::Display for Sample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Sample::Count(n) => write!(f, "{n}"),
            // Exact to the microsecond: whole seconds, then six digits.
            Sample::Seconds(us) => write!(f, "{}.{:06}", us / 1_000_000, us % 1_000_000),
        }
    }
}
