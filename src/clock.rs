//! The `Clock` seam: wall time by default, a manual clock in tests, and the store's own
//! monotonic view of it (the latest time seen never goes backwards).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time, in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time in milliseconds since the Unix epoch. May step backwards; the store
    /// never lets its own time do so.
    fn now_ms(&self) -> u64;
}

/// The operating system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    /// Reads `CLOCK_REALTIME_COARSE` (the time of the last kernel tick, a few ms behind at
    /// most): the store keeps milliseconds, and the coarse clock costs a fraction of a precise
    /// read on every claim.
    fn now_ms(&self) -> u64 {
        crate::io::sys::realtime_coarse_ms().unwrap_or_else(|| system_time_to_ms(SystemTime::now()))
    }
}

/// A clock that moves only when told to; share it with the store through `Arc`.
#[derive(Debug)]
pub struct ManualClock {
    now_ms: AtomicU64,
}

impl ManualClock {
    /// A clock standing at `start_ms` milliseconds since the Unix epoch.
    pub fn new(start_ms: u64) -> Arc<Self> {
        Arc::new(ManualClock { now_ms: AtomicU64::new(start_ms) })
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.now_ms.fetch_add(duration_to_ms(by), Ordering::SeqCst);
    }

    /// Sets the clock to `ms`; may move it backwards, as a stepped wall clock would.
    pub fn set_ms(&self, ms: u64) {
        self.now_ms.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

/// The latest store time a store accepts, in ms since the epoch: 2^43 ms, in the year 2248.
/// Sequence numbers start above store time shifted left by 20 bits at every open, so this
/// bound leaves half of the 64-bit sequence space for records; a clock past it is
/// `Error::ClockOutOfRange`, never an overflowed (shrinking) fencing token.
pub const STORE_TIME_MS_MAX: u64 = 1 << 43;

/// The store's time: the latest of all clock readings, so leases and expiry never run
/// backwards when the wall clock is stepped back.
#[derive(Debug)]
pub(crate) struct StoreTime {
    clock: Arc<dyn Clock>,
    latest_ms: AtomicU64,
}

impl StoreTime {
    pub(crate) fn new(clock: Arc<dyn Clock>, floor_ms: u64) -> Self {
        StoreTime { clock, latest_ms: AtomicU64::new(floor_ms) }
    }

    /// The current store time; monotonic across calls and threads.
    pub(crate) fn now_ms(&self) -> u64 {
        let reading = self.clock.now_ms();
        // A plain load first: the cache line stays shared between threads unless time moved.
        let latest = self.latest_ms.load(Ordering::Acquire);
        if reading <= latest {
            return latest;
        }
        let previous = self.latest_ms.fetch_max(reading, Ordering::AcqRel);
        previous.max(reading)
    }

    /// The latest store time handed out so far (no clock reading): every answer given yet was
    /// given at this time or earlier.
    pub(crate) fn latest_ms(&self) -> u64 {
        self.latest_ms.load(Ordering::Acquire)
    }
}

/// Milliseconds since the epoch; times before the epoch count as 0.
pub fn system_time_to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(duration_to_ms).unwrap_or(0)
}

/// The `SystemTime` for `ms` milliseconds since the epoch.
pub fn ms_to_system_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A duration in whole milliseconds, saturating at `u64::MAX`.
pub(crate) fn duration_to_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_time_never_goes_backwards() {
        let clock = ManualClock::new(10_000);
        let time = StoreTime::new(clock.clone(), 0);
        assert_eq!(time.now_ms(), 10_000);
        clock.set_ms(5_000);
        assert_eq!(time.now_ms(), 10_000);
        clock.set_ms(12_000);
        assert_eq!(time.now_ms(), 12_000);
    }

    #[test]
    fn floor_from_disk_holds_time_up() {
        let clock = ManualClock::new(1_000);
        let time = StoreTime::new(clock, 9_000);
        assert_eq!(time.now_ms(), 9_000);
    }
}
