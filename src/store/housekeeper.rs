//! The background threads: the housekeeper (maintenance, restart tables, the spare segment) and the
//! `Periodic` flusher, their failures and warnings.

use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

use super::Inner;

impl Inner {
    /// The housekeeper: expiry, sealing and the time floor about once a second, spare segments
    /// as soon as an append asks for one. Periodic syncs are not here (see
    /// `flush_periodically`): one maintenance pass may take longer than their interval. No
    /// failure is lost: each pass runs under `housekeeping_pass`, which reports its errors and
    /// panics, and the thread goes on to the next tick.
    pub(super) fn housekeep(&self) {
        let tick = Duration::from_secs(1);
        // A first pass at once: after an open it builds the sealed tables' union filter.
        self.housekeeping_pass(true);
        let mut next_tick = Instant::now() + tick;
        loop {
            let (spare_wanted, tables_wanted, serving) = {
                let mut call = self.housekeeper_call.lock();
                while !call.stop && !call.spare && !call.tables && !call.passes.pending() && Instant::now() < next_tick
                {
                    let left = next_tick.saturating_duration_since(Instant::now());
                    crate::sync::wait_for(&self.housekeeper_signal, &mut call, left);
                }
                if call.stop {
                    return;
                }
                // A pass asked for is served by a pass that begins now, after the ask.
                let serving = (call.passes.pending() || Instant::now() >= next_tick).then_some(call.passes.asked);
                (std::mem::take(&mut call.spare), std::mem::take(&mut call.tables), serving)
            };
            if tables_wanted {
                self.restart_tables_pass();
            }
            match serving {
                Some(asked) => {
                    next_tick = Instant::now() + tick;
                    self.housekeeping_pass(true);
                    self.background_pass_done(asked, |call| &mut call.passes);
                }
                None if spare_wanted => self.housekeeping_pass(false),
                None => {}
            }
        }
    }

    /// Writes the restart tables of segments that stopped taking appends, at once rather than
    /// at the next tick (see `write_restart_tables`). Reported as a maintenance pass is: a
    /// failure is counted and kept (a failed sync has poisoned the store inside), a panic is
    /// caught, and what is left is written by the next pass.
    pub(super) fn restart_tables_pass(&self) {
        let was_poisoned = self.commit.poisoned().is_some();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _serial = self.maintenance.lock();
            self.write_restart_tables(1, true).map(drop)
        }));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.note_maintenance_error(&e, was_poisoned),
            Err(payload) => self.note_background_panic(format!(
                "housekeeping thread panicked writing restart tables: {}",
                crate::commit::panic_message(&*payload)
            )),
        }
    }

    /// One pass of the housekeeper: with `maintenance`, expiry, sealing and the time floor
    /// (`maintain`); then the spare segment. Its outcome is reported (`note_background`); a
    /// panic is caught here, so the thread lives on to the next tick: the state a panic leaves
    /// is one maintenance already recovers from (segments taken out of the log but not yet
    /// deleted are deleted at the next open; retired segments not yet sealed are sealed by the
    /// next pass), and a sync that panicked has poisoned the store in group commit.
    pub(super) fn housekeeping_pass(&self, maintenance: bool) {
        let was_poisoned = self.commit.poisoned().is_some();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let maintained = if maintenance { self.maintain().map(drop) } else { Ok(()) };
            let spare = self.prepare_spare();
            maintained.and(spare)
        }));
        match outcome {
            Ok(Ok(())) if maintenance => self.counters.maintenance_failures_in_a_row.store(0, AtomicOrdering::Relaxed),
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.note_maintenance_error(&e, was_poisoned),
            Err(payload) => self.note_background_panic(format!(
                "housekeeping thread panicked: {}",
                crate::commit::panic_message(&*payload)
            )),
        }
        #[cfg(feature = "metrics")]
        if maintenance {
            self.stats().record_metrics();
        }
    }

    /// `Store::maintain`: a maintenance pass on the caller's thread, whose failure is reported
    /// as the housekeeper's are (a panic goes on to the caller, who sees it).
    pub(super) fn maintain_noted(&self) -> Result<usize> {
        let was_poisoned = self.commit.poisoned().is_some();
        let outcome = self.maintain();
        match &outcome {
            Ok(_) => self.counters.maintenance_failures_in_a_row.store(0, AtomicOrdering::Relaxed),
            Err(e) => self.note_maintenance_error(e, was_poisoned),
        }
        outcome
    }

    /// Reports a failed maintenance pass in `Stats`: counted, kept as the last error, and once
    /// `MAINTENANCE_FAILURES_WARNED` passes in a row have failed, a warning. A pass on a store
    /// that was already poisoned before it began is not counted: it fails at its first sync
    /// with the poison's cause, which `Stats::poisoned` already shows, and would otherwise be
    /// counted once a second for as long as the store stays open. Failures that put durability
    /// at stake (a failed sync of records, of the time floor or of the directory) have
    /// poisoned the store where they happened; the rest (an unlink, a table write) leave
    /// every acknowledged record as durable as it was, so they do not stop writes.
    pub(super) fn note_maintenance_error(&self, e: &Error, was_poisoned: bool) {
        if was_poisoned {
            return;
        }
        self.counters.maintenance_failures_in_a_row.fetch_add(1, AtomicOrdering::Relaxed);
        self.note_background_error(format!("maintenance failed: {e}"));
    }

    /// Reports a panic of a background thread: counted, kept as the last error, and warned of
    /// at once (a panic is a fault of the code, not a passing one of the disk).
    pub(super) fn note_background_panic(&self, cause: String) {
        self.counters.maintenance_failures_in_a_row.fetch_max(MAINTENANCE_FAILURES_WARNED, AtomicOrdering::Relaxed);
        self.note_background_error(cause);
    }

    pub(super) fn note_background_error(&self, cause: String) {
        crate::observe::maintenance_failed(&cause);
        self.counters.maintenance_errors_total.fetch_add(1, AtomicOrdering::Relaxed);
        *self.counters.last_maintenance_error.lock() = Some(cause);
    }

    /// The warning `Stats::warnings` carries while maintenance keeps failing.
    pub(super) fn maintenance_warning(&self) -> Option<String> {
        let in_a_row = self.counters.maintenance_failures_in_a_row.load(AtomicOrdering::Relaxed);
        if in_a_row < MAINTENANCE_FAILURES_WARNED {
            return None;
        }
        let last = self.counters.last_maintenance_error.lock().clone().unwrap_or_default();
        Some(format!(
            "background maintenance has failed {in_a_row} times in a row, so expired buckets may not be \
             dropped nor idle segments sealed; last error: {last}"
        ))
    }

    /// Poisons the store with `cause` and returns the error writers now get. Background work
    /// poisons through here; the flag itself is set in one place, `GroupCommit::poison`.
    pub(super) fn poison(&self, cause: String) -> Error {
        self.commit.poison(cause.clone());
        Error::Poisoned { cause }
    }

    /// Marks the passes asked for up to `asked` as served and wakes whoever waits for them.
    pub(super) fn background_pass_done(&self, asked: u64, which: impl Fn(&mut HousekeeperCall) -> &mut PassAsks) {
        let mut call = self.housekeeper_call.lock();
        let asks = which(&mut call);
        asks.done = asks.done.max(asked);
        drop(call);
        self.housekeeper_signal.notify_all();
    }

    /// The flusher of a `Periodic(interval)` store: a sync (records, and the time floor with
    /// them) at least every `interval`, on a thread of its own so that no maintenance pass
    /// delays it. Each sync is due `interval` after the previous one started; one that took
    /// longer is followed by the next at once.
    pub(super) fn flush_periodically(&self, interval: Duration) {
        let interval = crate::commit::flush_interval(interval);
        // Bounded at open (`PERIODIC_INTERVAL_MAX`): adding it to an instant cannot overflow.
        let mut next_flush = Instant::now() + interval;
        loop {
            let asked = {
                let mut call = self.housekeeper_call.lock();
                while !call.stop && !call.periodic_syncs.pending() && Instant::now() < next_flush {
                    let left = next_flush.saturating_duration_since(Instant::now());
                    crate::sync::wait_for(&self.housekeeper_signal, &mut call, left);
                }
                if call.stop {
                    return;
                }
                call.periodic_syncs.asked
            };
            next_flush = Instant::now() + interval;
            self.periodic_sync_pass();
            self.background_pass_done(asked, |call| &mut call.periodic_syncs);
        }
    }

    /// One sync of the flusher. A failed sync poisons the store inside group commit (writers
    /// see it on their next call). A panic is caught and poisons it too: this store promised
    /// a sync every interval and can no longer keep that promise, so writes must stop rather
    /// than go on being acknowledged with nothing syncing them.
    pub(super) fn periodic_sync_pass(&self) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            #[cfg(feature = "sim")]
            {
                let fault = self.housekeeper_call.lock().periodic_sync_fault.take();
                if let Some(fault) = fault {
                    fault();
                }
            }
            self.sync_all()
        }));
        if let Err(payload) = outcome {
            let cause = format!("periodic sync thread panicked: {}", crate::commit::panic_message(&*payload));
            self.note_background_panic(cause.clone());
            self.poison(cause);
        }
    }

    /// Makes sure a spare segment file is ready. A failed directory sync poisons the store;
    /// any other failure (no space for the file, say) is returned for the housekeeper to
    /// report, and the spare is tried again at the next pass.
    pub(super) fn prepare_spare(&self) -> Result<()> {
        if self.read_only || self.commit.poisoned().is_some() {
            return Ok(());
        }
        match self.log.prepare_spare() {
            Err(Error::Poisoned { cause }) => Err(self.poison(cause)),
            other => other,
        }
    }

    /// Asks the housekeeper to write restart tables now (a segment just stopped taking appends).
    pub(super) fn wake_housekeeper_for_tables(&self) {
        let mut call = self.housekeeper_call.lock();
        if !call.tables {
            call.tables = true;
            drop(call);
            self.housekeeper_signal.notify_all();
        }
    }

    /// Asks the housekeeper to prepare the next spare segment now (an append just used one).
    pub(super) fn wake_housekeeper_for_spare(&self) {
        let mut call = self.housekeeper_call.lock();
        if !call.spare {
            call.spare = true;
            drop(call);
            self.housekeeper_signal.notify_all();
        }
    }
}

/// Work handed to the housekeeper thread (and the flusher) between their ticks.
#[derive(Default)]
pub(super) struct HousekeeperCall {
    /// The store is closing: stop.
    pub(super) stop: bool,
    /// An append used up the spare segment: prepare the next one now.
    pub(super) spare: bool,
    /// A segment stopped taking appends: write its restart table now.
    pub(super) tables: bool,
    /// Housekeeping passes asked for now (a test seam, `Store::run_housekeeping_pass`).
    pub(super) passes: PassAsks,
    /// Periodic syncs asked for now (a test seam, `Store::run_periodic_sync`).
    pub(super) periodic_syncs: PassAsks,
    /// Runs at the start of every maintenance pass (`Store::set_maintenance_fault`).
    #[cfg(feature = "sim")]
    pub(super) maintenance_fault: Option<std::sync::Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>>,
    /// Runs in the flusher's next sync (`Store::on_next_periodic_sync`).
    #[cfg(feature = "sim")]
    pub(super) periodic_sync_fault: Option<Box<dyn FnOnce() + Send>>,
}

/// Passes of a background thread asked for, and how far they are served: `done` is the
/// highest `asked` that a pass which began after it has ended.
#[derive(Default)]
pub(super) struct PassAsks {
    pub(super) asked: u64,
    pub(super) done: u64,
}

impl PassAsks {
    /// True while some ask is unserved: no pass that began after it has ended yet.
    fn pending(&self) -> bool {
        self.asked > self.done
    }
}

/// Maintenance passes failed in a row before `Stats::warnings` says maintenance is failing.
/// One failure is often passing (an unlink that met a busy file, a table write that met a
/// full disk that expiry is about to relieve) and is retried at the next tick a second later;
/// three in a row, about three seconds, is a fault that stays, yet is reported long before
/// the disk fills for want of expiry or RAM for want of sealing.
pub(super) const MAINTENANCE_FAILURES_WARNED: u64 = 3;
