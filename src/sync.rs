//! The synchronization facade: parking_lot in normal builds, loom under `--cfg loom`, behind
//! one parking_lot-shaped API, so the claim race and the group-commit handoff can be model
//! checked without changing their code.

#[cfg(not(loom))]
mod imp {
    pub use parking_lot::{Condvar, Mutex, MutexGuard};
    pub use std::sync::Arc;
    pub use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// Waits on `cv` until notified or `timeout` passes; true when it timed out.
    pub fn wait_for<T>(cv: &Condvar, guard: &mut MutexGuard<'_, T>, timeout: std::time::Duration) -> bool {
        cv.wait_for(guard, timeout).timed_out()
    }
}

#[cfg(loom)]
mod imp {
    pub use loom::sync::Arc;
    pub use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
