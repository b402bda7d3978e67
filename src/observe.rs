//! What the store tells observability facades, each behind its feature: debug spans around
//! store calls and events for recovery, poisoning and takeovers (`tracing`); the Prometheus
//! figures under the same names (`metrics`). Without the features every function here is empty
//! and compiles away.
//!
//! Keys never appear: a span carries `key_hash`, xxh3-64 of the key in hex, which ties the
//! calls of one key together without showing it.

/// A span around one store call, entered until the guard drops.
#[cfg(feature = "tracing")]
pub(crate) fn call(op: &'static str, key: &[u8]) -> tracing::span::EnteredSpan {
    tracing::debug_span!("idemstore", op, key_hash = %format_args!("{:016x}", xxhash_rust::xxh3::xxh3_64(key)))
        .entered()
}

/// A span around one store call (nothing without the `tracing` feature).
#[cfg(not(feature = "tracing"))]
#[inline(always)]
pub(crate) fn call(_op: &'static str, _key: &[u8]) -> NoSpan {
    NoSpan
}

/// What `call` returns without the `tracing` feature: a guard with nothing to guard.
#[cfg(not(feature = "tracing"))]
pub(crate) struct NoSpan;

/// A claim took over an earlier holder (`orphan`: its process died; otherwise its lease ran out).
#[inline(always)]
pub(crate) fn takeover(_key: &[u8], _orphan: bool) {
    #[cfg(feature = "tracing")]
    tracing::info!(
        key_hash = %format_args!("{:016x}", xxhash_rust::xxh3::xxh3_64(_key)),
        reason = if _orphan { "orphan" } else { "lease" },
        "idemstore: claim taken over from an earlier holder"
    );
}

/// The store was poisoned: writes stop until it is reopened.
#[inline(always)]
pub(crate) fn poisoned(_cause: &str) {
    #[cfg(feature = "tracing")]
    tracing::error!(cause = _cause, "idemstore: store poisoned, writes refused until it is reopened");
}

/// A store was opened: what recovery found.
#[inline(always)]
pub(crate) fn opened(_dir: &std::path::Path, _recovery: &crate::stats::RecoveryStats, _read_only: bool) {
    #[cfg(feature = "tracing")]
    tracing::info!(
        dir = %_dir.display(),
        read_only = _read_only,
        duration_us = _recovery.duration_us,
        segments = _recovery.segments,
        records_scanned = _recovery.records,
        tables_loaded = _recovery.tables_loaded,
        torn_tails = _recovery.torn_tails,
        torn_bytes_truncated = _recovery.torn_bytes_truncated,
        expired_buckets_deleted = _recovery.expired_buckets_deleted,
        "idemstore: store opened"
    );
}

/// A background pass failed (the store goes on; see `Stats::maintenance_errors_total`).
#[inline(always)]
pub(crate) fn maintenance_failed(_cause: &str) {
    #[cfg(feature = "tracing")]
    tracing::warn!(cause = _cause, "idemstore: background maintenance pass failed");
}

/// `future` inside a span around one async store call.
#[cfg(feature = "tracing")]
pub(crate) fn instrument<F: std::future::Future>(
    op: &'static str,
    key: &[u8],
    future: F,
) -> tracing::instrument::Instrumented<F> {
    use tracing::Instrument;
    future.instrument(
        tracing::debug_span!("idemstore", op, key_hash = %format_args!("{:016x}", xxhash_rust::xxh3::xxh3_64(key))),
    )
}

/// `future` itself (nothing to add without the `tracing` feature).
#[cfg(not(feature = "tracing"))]
#[inline(always)]
pub(crate) fn instrument<F: std::future::Future>(_op: &'static str, _key: &[u8], future: F) -> F {
    future
}
