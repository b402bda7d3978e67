//! Counters kept by a store, a snapshot of them (`Stats`), and its Prometheus text form.

use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;

/// Store-wide counters of background work (per-key counters live in the index shards).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub keys_expired: AtomicU64,
    pub buckets_expired: AtomicU64,
    /// Failed background passes (see `Stats::maintenance_errors_total`).
    pub maintenance_errors: AtomicU64,
    /// Maintenance passes failed in a row since the last one that succeeded (a panic counts as
    /// enough at once; see `store::MAINTENANCE_FAILURES_WARNED`).
    pub maintenance_failures_in_a_row: AtomicU64,
    /// The cause of the latest failed background pass.
    pub last_maintenance_error: parking_lot::Mutex<Option<String>>,
}

/// Counters bumped under the shard lock: plain integers, so threads on different shards
/// never fight over a counter's cache line. `Store::stats` sums them.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ShardCounters {
    pub claims_acquired: u64,
    pub claims_in_progress: u64,
    pub claims_replayed: u64,
    pub claims_waited: u64,
    pub mismatches: u64,
    pub lease_takeovers: u64,
    pub orphan_takeovers: u64,
    pub stale_tokens: u64,
    pub completes: u64,
    pub checkpoints: u64,
    pub releases: u64,
    pub removes: u64,
    pub keys_expired: u64,
}

impl ShardCounters {
    pub fn add(&mut self, o: &ShardCounters) {
        self.claims_acquired += o.claims_acquired;
        self.claims_in_progress += o.claims_in_progress;
        self.claims_replayed += o.claims_replayed;
        self.claims_waited += o.claims_waited;
        self.mismatches += o.mismatches;
        self.lease_takeovers += o.lease_takeovers;
        self.orphan_takeovers += o.orphan_takeovers;
        self.stale_tokens += o.stale_tokens;
        self.completes += o.completes;
        self.checkpoints += o.checkpoints;
        self.releases += o.releases;
        self.removes += o.removes;
        self.keys_expired += o.keys_expired;
    }
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
        family(
            "idemstore_claims_total",
            "counter",
            "Claims by outcome.",
            &[
                ("outcome=\"acquired\"", Sample::Count(self.claims_acquired_total)),
                ("outcome=\"in_progress\"", Sample::Count(self.duplicates_in_progress_total)),
                ("outcome=\"replayed\"", Sample::Count(self.duplicates_replayed_total)),
                ("outcome=\"waited\"", Sample::Count(self.duplicates_waited_total)),
                ("outcome=\"mismatch\"", Sample::Count(self.mismatches_total)),
            ],
        );
        family(
            "idemstore_takeovers_total",
            "counter",
            "Claims taken over from an earlier holder.",
            &[
                ("reason=\"lease\"", Sample::Count(self.lease_takeovers_total)),
                ("reason=\"orphan\"", Sample::Count(self.orphan_takeovers_total)),
            ],
        );
        family(
            "idemstore_stale_tokens_total",
            "counter",
            "Calls refused because their token was stale.",
            &[("", Sample::Count(self.stale_tokens_total))],
        );
        family(
            "idemstore_operations_total",
            "counter",
            "Token and key operations that wrote a record.",
            &[
                ("op=\"complete\"", Sample::Count(self.completes_total)),
                ("op=\"checkpoint\"", Sample::Count(self.checkpoints_total)),
                ("op=\"release\"", Sample::Count(self.releases_total)),
                ("op=\"remove\"", Sample::Count(self.removes_total)),
            ],
        );
        family(
            "idemstore_keys_expired_total",
            "counter",
            "Index entries dropped by expiry.",
            &[("", Sample::Count(self.keys_expired_total))],
        );
        family(
            "idemstore_buckets_expired_total",
            "counter",
            "Expiry buckets dropped whole.",
            &[("", Sample::Count(self.buckets_expired_total))],
        );
        family(
            "idemstore_index_entries",
            "gauge",
            "Keys in the in-memory index.",
            &[("", Sample::Count(self.index_entries))],
        );
        family(
            "idemstore_sealed_tables",
            "gauge",
            "Sealed per-segment tables.",
            &[("", Sample::Count(self.sealed_tables))],
        );
        family(
            "idemstore_sealed_entries",
            "gauge",
            "Keys in sealed tables.",
            &[("", Sample::Count(self.sealed_entries))],
        );
        family(
            "idemstore_sealed_filter_bytes",
            "gauge",
            "RAM taken by sealed tables' filters.",
            &[("", Sample::Count(self.sealed_filter_bytes))],
        );
        family("idemstore_segments", "gauge", "Live segment files.", &[("", Sample::Count(self.segments))]);
        family(
            "idemstore_open_files",
            "gauge",
            "Files held open (descriptors).",
            &[("", Sample::Count(self.open_files))],
        );
        family(
            "idemstore_appended_bytes_total",
            "counter",
            "Bytes of records appended since open.",
            &[("", Sample::Count(self.appended_bytes_total))],
        );
        family(
            "idemstore_live_bytes",
            "gauge",
            "Bytes of latest records in live segments.",
            &[("", Sample::Count(self.live_bytes))],
        );
        family(
            "idemstore_dead_bytes",
            "gauge",
            "Bytes of superseded records in live segments.",
            &[("", Sample::Count(self.dead_bytes))],
        );
        family(
            "idemstore_disk_bytes",
            "gauge",
            "Bytes reserved on disk by segment files.",
            &[("", Sample::Count(self.disk_bytes))],
        );
        family("idemstore_syncs_total", "counter", "fdatasync rounds.", &[("", Sample::Count(self.syncs_total))]);
        family(
            "idemstore_synced_records_total",
            "counter",
            "Records made durable by syncs.",
            &[("", Sample::Count(self.synced_records_total))],
        );
        family(
            "idemstore_sync_latency_seconds_total",
            "counter",
            "Time spent in syncs, in seconds.",
            &[("", Sample::Seconds(self.sync_latency_us_total))],
        );
        family(
            "idemstore_sync_latency_seconds_max",
            "gauge",
            "Slowest sync since open, in seconds.",
            &[("", Sample::Seconds(self.sync_latency_us_max))],
        );
        family(
            "idemstore_recovery_records",
            "gauge",
            "Records scanned at open.",
            &[("", Sample::Count(self.recovery.records))],
        );
        family(
            "idemstore_recovery_torn_bytes",
            "gauge",
            "Torn tail bytes truncated at open.",
            &[("", Sample::Count(self.recovery.torn_bytes_truncated))],
        );
        family(
            "idemstore_recovery_duration_seconds",
            "gauge",
            "Time the open took, in seconds.",
            &[("", Sample::Seconds(self.recovery.duration_us))],
        );
        family(
            "idemstore_recovery_scanned_segments",
            "gauge",
            "Segments scanned at open, by why they had no usable table.",
            &[
                ("reason=\"no_table\"", Sample::Count(self.recovery.segments_scanned_no_table)),
                ("reason=\"unsealed_tail\"", Sample::Count(self.recovery.segments_scanned_unsealed_tail)),
                ("reason=\"damaged_table\"", Sample::Count(self.recovery.tables_rebuilt)),
            ],
        );
        family(
            "idemstore_recovery_tables_loaded",
            "gauge",
            "Tables mapped at open instead of scanning their segments.",
            &[("", Sample::Count(self.recovery.tables_loaded))],
        );
        family(
            "idemstore_recovery_scan_seconds",
            "gauge",
            "Time the scan of segments without a table took at open, in seconds.",
            &[("", Sample::Seconds(self.recovery.scan_us))],
        );
        family(
            "idemstore_warnings",
            "gauge",
            "Setup problems that do not stop the store, such as a directory others can read (see idemstore stats).",
            &[("", Sample::Count(self.warnings.len() as u64))],
        );
        family(
            "idemstore_maintenance_errors_total",
            "counter",
            "Failed background maintenance passes (expiry, sealing, time floor, spare segment) and background thread panics.",
            &[("", Sample::Count(self.maintenance_errors_total))],
        );
        family(
            "idemstore_poisoned",
            "gauge",
            "1 when a failed write or sync stopped writes.",
            &[("", Sample::Count(u64::from(self.poisoned.is_some())))],
        );
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
