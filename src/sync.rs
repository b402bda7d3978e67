//! The synchronization facade: parking_lot in normal builds, loom under `--cfg loom`, behind
//! one parking_lot-shaped API, so the claim race and the group-commit handoff can be model
//! checked without changing their code.

#[cfg(not(loom))]
mod imp {
    pub use parking_lot::{Condvar, Mutex, MutexGuard};
    pub use std::sync::Arc;
    pub use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// Where threads sleep until woken by a filter over the tokens they parked with: a
    /// group-commit leader wakes exactly the waiters its sync covered, plus one successor,
    /// with no mutex to queue behind afterwards.
    #[derive(Debug)]
    pub struct WaitQueue {
        /// Gives the queue an address of its own (parking_lot keys sleepers by address).
        _address: u8,
    }

    impl WaitQueue {
        /// An empty queue.
        pub fn new() -> Self {
            WaitQueue { _address: 0 }
        }

        fn key(&self) -> usize {
            self as *const Self as usize
        }

        /// Sleeps with `token` while `still_wait()` holds. The check runs under the queue's
        /// lock, which every wake takes too, so a wake after the check is never lost. May
        /// return spuriously; callers loop.
        pub fn park(&self, token: u64, still_wait: impl FnOnce() -> bool) {
            // SAFETY: the key is this queue's own address, used by no other primitive;
            // `still_wait` only reads atomics (it neither panics nor calls into parking_lot),
            // and the other callbacks do nothing.
            unsafe {
                parking_lot_core::park(
                    self.key(),
                    still_wait,
                    || {},
                    |_, _| {},
                    parking_lot_core::ParkToken(token as usize),
                    None,
                );
            }
        }

        /// Wakes every sleeper whose token `wake` picks (called once per sleeper, in the order
        /// they went to sleep).
        pub fn unpark_filter(&self, mut wake: impl FnMut(u64) -> bool) {
            use parking_lot_core::{DEFAULT_UNPARK_TOKEN, FilterOp};
            // SAFETY: as in `park`; `wake` is plain arithmetic on the token and cannot panic.
            unsafe {
                parking_lot_core::unpark_filter(
                    self.key(),
                    |token| if wake(token.0 as u64) { FilterOp::Unpark } else { FilterOp::Skip },
                    |_| DEFAULT_UNPARK_TOKEN,
                );
            }
        }
    }

    /// Waits on `cv` until notified or `timeout` passes; true when it timed out.
    pub fn wait_for<T>(cv: &Condvar, guard: &mut MutexGuard<'_, T>, timeout: std::time::Duration) -> bool {
        cv.wait_for(guard, timeout).timed_out()
    }
}

#[cfg(loom)]
mod imp {
    pub use loom::sync::Arc;
    pub use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// The wait queue, built from loom's mutex and condition variable: a wake wakes every
    /// sleeper (allowed: sleepers re-check and loop), so models still see every interleaving
    /// of the checks.
    #[derive(Debug)]
    pub struct WaitQueue {
        lock: loom::sync::Mutex<()>,
        woken: loom::sync::Condvar,
    }

    impl WaitQueue {
        pub fn new() -> Self {
            WaitQueue { lock: loom::sync::Mutex::new(()), woken: loom::sync::Condvar::new() }
        }
        pub fn park(&self, _token: u64, still_wait: impl FnOnce() -> bool) {
            let guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            if still_wait() {
                drop(self.woken.wait(guard));
            }
        }
        pub fn unpark_filter(&self, _wake: impl FnMut(u64) -> bool) {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.woken.notify_all();
        }
    }

    /// loom's mutex with parking_lot's shape (`lock()` returns the guard).
    #[derive(Debug, Default)]
    pub struct Mutex<T>(loom::sync::Mutex<T>);

    /// Guard of [`Mutex`]; an `Option` inside so `Condvar::wait` can hand it to loom and back.
    pub struct MutexGuard<'a, T>(Option<loom::sync::MutexGuard<'a, T>>);

    impl<T> Mutex<T> {
        pub fn new(value: T) -> Self {
            Mutex(loom::sync::Mutex::new(value))
        }
        pub fn lock(&self) -> MutexGuard<'_, T> {
            MutexGuard(Some(self.0.lock().unwrap_or_else(|e| e.into_inner())))
        }
    }

    impl<T> std::ops::Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            self.0.as_ref().expect("guard present outside wait")
        }
    }
    impl<T> std::ops::DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            self.0.as_mut().expect("guard present outside wait")
        }
    }

    /// loom's condition variable with parking_lot's shape.
    #[derive(Debug, Default)]
    pub struct Condvar(loom::sync::Condvar);

    impl Condvar {
        pub fn new() -> Self {
            Condvar(loom::sync::Condvar::new())
        }
        pub fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
            let inner = guard.0.take().expect("guard present");
            guard.0 = Some(self.0.wait(inner).unwrap_or_else(|e| e.into_inner()));
        }
        pub fn notify_all(&self) -> usize {
            self.0.notify_all();
            0
        }
    }

    /// loom has no timed waits: a timed wait is a plain wait (models must notify).
    pub fn wait_for<T>(cv: &Condvar, guard: &mut MutexGuard<'_, T>, _timeout: std::time::Duration) -> bool {
        cv.wait(guard);
        false
    }
}

pub use imp::*;
