//! The layer's counters: atomics the service can read, and (feature `metrics`) the same
//! counts through the `metrics` facade.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one [`IdempotencyLayer`](crate::IdempotencyLayer), shared by every service it
/// makes (get them with [`IdempotencyLayer::metrics`](crate::IdempotencyLayer::metrics)).
///
/// With the feature `metrics` each increment is also sent to the `metrics` facade under the
/// name given on each method (stable names, counters).
#[derive(Debug, Default)]
pub struct Metrics {
    replayed: AtomicU64,
    conflicts: AtomicU64,
    mismatches: AtomicU64,
    stored: AtomicU64,
    released: AtomicU64,
    store_errors: AtomicU64,
    panics: AtomicU64,
    kept_for_resume: AtomicU64,
}

/// The counters at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Requests answered with a stored response (`idemstore_http_replays_total`).
    pub replayed: u64,
    /// Requests answered 409 because their key was in flight (`idemstore_http_conflicts_total`).
    pub conflicts: u64,
    /// Requests answered 422: key reused with another request (`idemstore_http_mismatches_total`).
    pub mismatches: u64,
    /// Responses stored for replay (`idemstore_http_stored_total`).
    pub stored: u64,
    /// Claims released so that a retry runs the handler again: a response the policy does not
    /// store, a panic, a failed response body, when no checkpoint was recorded
    /// (`idemstore_http_released_total`).
    pub released: u64,
    /// Store calls that failed (`idemstore_http_store_errors_total`).
    pub store_errors: u64,
    /// Handlers that panicked (`idemstore_http_panics_total`).
    pub panics: u64,
    /// Failed attempts whose claim carried a checkpoint, so was left in flight for the retry to
    /// resume after the lease instead of released (`idemstore_http_kept_for_resume_total`).
    pub kept_for_resume: u64,
}

macro_rules! counter {
    ($field:ident, $name:literal, $doc:literal) => {
        #[doc = $doc]
        #[doc = concat!("Facade name: `", $name, "`.")]
        pub fn $field(&self) -> u64 {
            self.$field.load(Ordering::Relaxed)
        }
    };
}

impl Metrics {
    counter!(replayed, "idemstore_http_replays_total", "Requests answered with a stored response.");
    counter!(conflicts, "idemstore_http_conflicts_total", "Requests answered 409 (key in flight).");
    counter!(mismatches, "idemstore_http_mismatches_total", "Requests answered 422 (key reused).");
    counter!(stored, "idemstore_http_stored_total", "Responses stored for replay.");
    counter!(released, "idemstore_http_released_total", "Claims released for the retry to run again.");
    counter!(store_errors, "idemstore_http_store_errors_total", "Store calls that failed.");
    counter!(panics, "idemstore_http_panics_total", "Handlers that panicked.");
    counter!(
        kept_for_resume,
        "idemstore_http_kept_for_resume_total",
        "Failed attempts with a checkpoint, left in flight for the retry to resume."
    );

    /// All counters at once (each read on its own: not one atomic snapshot).
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            replayed: self.replayed(),
            conflicts: self.conflicts(),
            mismatches: self.mismatches(),
            stored: self.stored(),
            released: self.released(),
            store_errors: self.store_errors(),
            panics: self.panics(),
            kept_for_resume: self.kept_for_resume(),
        }
    }

    pub(crate) fn count(&self, event: Event) {
        let (field, _name) = match event {
            Event::Replayed => (&self.replayed, "idemstore_http_replays_total"),
            Event::Conflict => (&self.conflicts, "idemstore_http_conflicts_total"),
            Event::Mismatch => (&self.mismatches, "idemstore_http_mismatches_total"),
            Event::Stored => (&self.stored, "idemstore_http_stored_total"),
            Event::Released => (&self.released, "idemstore_http_released_total"),
            Event::StoreError => (&self.store_errors, "idemstore_http_store_errors_total"),
            Event::Panic => (&self.panics, "idemstore_http_panics_total"),
            Event::KeptForResume => (&self.kept_for_resume, "idemstore_http_kept_for_resume_total"),
        };
        field.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(_name).increment(1);
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Event {
    Replayed,
    Conflict,
    Mismatch,
    Stored,
    Released,
    StoreError,
    Panic,
    KeptForResume,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_moves_its_own_counter() {
        let metrics = Metrics::default();
        for event in
            [Event::Replayed, Event::Replayed, Event::Conflict, Event::Mismatch, Event::Stored, Event::Released]
        {
            metrics.count(event);
        }
        metrics.count(Event::StoreError);
        metrics.count(Event::Panic);
        metrics.count(Event::KeptForResume);
        let expected = MetricsSnapshot {
            replayed: 2,
            conflicts: 1,
            mismatches: 1,
            stored: 1,
            released: 1,
            store_errors: 1,
            panics: 1,
            kept_for_resume: 1,
        };
        assert_eq!(metrics.snapshot(), expected);
    }

    /// The facade sees the same counts under the documented names.
    #[cfg(feature = "metrics")]
    #[test]
    fn the_facade_gets_each_count_under_its_stable_name() {
        use std::collections::BTreeMap;
        use std::sync::{Arc, Mutex};

        use ::metrics::{Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

        #[derive(Default)]
        struct Counts(Mutex<BTreeMap<String, u64>>);
        struct One(Arc<Counts>, String);
        impl CounterFn for One {
            fn increment(&self, value: u64) {
                *self.0.0.lock().unwrap().entry(self.1.clone()).or_default() += value;
            }
            fn absolute(&self, value: u64) {
                self.0.0.lock().unwrap().insert(self.1.clone(), value);
            }
        }
        struct Recording(Arc<Counts>);
        impl Recorder for Recording {
            fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
            fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
            fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
            fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
                Counter::from_arc(Arc::new(One(self.0.clone(), key.name().to_string())))
            }
            fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
                Gauge::noop()
            }
            fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
                Histogram::noop()
            }
        }

        let counts = Arc::new(Counts::default());
        let recorder = Recording(counts.clone());
        let metrics = Metrics::default();
        ::metrics::with_local_recorder(&recorder, || {
            metrics.count(Event::Replayed);
            metrics.count(Event::Replayed);
            metrics.count(Event::Conflict);
            metrics.count(Event::Released);
        });
        let seen = counts.0.lock().unwrap().clone();
        let expected: BTreeMap<String, u64> = [
            ("idemstore_http_replays_total".to_string(), 2),
            ("idemstore_http_conflicts_total".to_string(), 1),
            ("idemstore_http_released_total".to_string(), 1),
        ]
        .into_iter()
        .collect();
        assert_eq!(seen, expected);
    }
}
