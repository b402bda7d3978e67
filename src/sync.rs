//! The synchronization facade: parking_lot in normal builds, loom under `--cfg loom`, behind
//! one parking_lot-shaped API, so the claim race and the group-commit handoff can be model
//! checked without changing their code.

#[cfg(not(loom))]
mod imp {
    pub use parking_lot::{Condvar, Mutex, MutexGuard};
    pub use std::sync::Arc;
    pub use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// Where threads sleep until woken, on one futex word that every wake bumps: a wake is
    /// a single `FUTEX_WAKE` system call for all sleepers, a sleep a `FUTEX_WAIT` that checks
    /// the word first (both through the `atomic-wait` crate). Waking each sleeper by its own
    /// call (parking_lot's per-thread parkers) cost the group-commit leader one call and one
    /// cross-CPU interrupt per waiter, between a sync's end and the next batch forming.
    #[derive(Debug)]
    pub struct WaitQueue {
        generation: std::sync::atomic::AtomicU32,
    }

    impl WaitQueue {
        /// An empty queue.
        pub fn new() -> Self {
            WaitQueue { generation: std::sync::atomic::AtomicU32::new(0) }
        }

        /// Sleeps while `still_wait()` holds. A wake after the check is never lost: the
        /// generation is read before the check, every wake bumps it after changing what the
        /// check reads, and the kernel sleeps only while the generation is unchanged. May
        /// return spuriously; callers loop.
        pub fn park(&self, still_wait: impl FnOnce() -> bool) {
            let seen = self.generation.load(Ordering::SeqCst);
            if !still_wait() {
                return;
            }
            // Returns at once if the generation moved on since `seen` (a wake came after the
            // check); spurious returns are handled by the callers' loops.
            atomic_wait::wait(&self.generation, seen);
        }

        /// Wakes every sleeper (each re-checks what it waits for and may sleep again).
        pub fn wake_all(&self) {
            self.generation.fetch_add(1, Ordering::SeqCst);
            atomic_wait::wake_all(&self.generation);
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

    /// The futex wait queue, modelled: a generation read before the caller's check, and a
    /// sleep (on loom's mutex and condition variable, standing in for the kernel's futex
    /// bucket) only while the generation is unchanged, so the models check the real queue's
    /// ordering, not a stronger primitive that holds a lock across the check.
    #[derive(Debug)]
    pub struct WaitQueue {
        generation: loom::sync::atomic::AtomicU32,
        lock: loom::sync::Mutex<()>,
        woken: loom::sync::Condvar,
    }

    impl WaitQueue {
        pub fn new() -> Self {
            WaitQueue {
                generation: loom::sync::atomic::AtomicU32::new(0),
                lock: loom::sync::Mutex::new(()),
                woken: loom::sync::Condvar::new(),
            }
        }
        pub fn park(&self, still_wait: impl FnOnce() -> bool) {
            let seen = self.generation.load(Ordering::SeqCst);
            if !still_wait() {
                return;
            }
            let guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            if self.generation.load(Ordering::SeqCst) == seen {
                drop(self.woken.wait(guard));
            }
        }
        pub fn wake_all(&self) {
            self.generation.fetch_add(1, Ordering::SeqCst);
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

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, mpsc};
    use std::time::Duration;

    use super::WaitQueue;

    /// Longest a sleeper may take to notice a wake before the test calls it lost.
    const LOST: Duration = Duration::from_secs(10);

    #[test]
    fn a_wake_that_lands_between_the_check_and_the_sleep_is_not_lost() {
        // Many rounds of one sleeper and one waker racing, so the wake falls on every side of
        // the sleeper's check; a lost wake leaves the sleeper asleep and the round times out.
        for round in 0..2_000 {
            let queue = Arc::new(WaitQueue::new());
            let done = Arc::new(AtomicBool::new(false));
            let (returned, seen) = mpsc::channel();
            let sleeper = {
                let (queue, done) = (queue.clone(), done.clone());
                std::thread::spawn(move || {
                    while !done.load(Ordering::Acquire) {
                        queue.park(|| !done.load(Ordering::Acquire));
                    }
                    returned.send(()).unwrap();
                })
            };
            if round % 2 == 0 {
                std::thread::yield_now();
            }
            done.store(true, Ordering::Release);
            queue.wake_all();
            assert!(seen.recv_timeout(LOST).is_ok(), "round {round}: the sleeper missed its wake");
            sleeper.join().unwrap();
        }
    }

    #[test]
    fn one_wake_releases_every_sleeper() {
        let queue = Arc::new(WaitQueue::new());
        let open = Arc::new(AtomicBool::new(false));
        let asleep = Arc::new(AtomicUsize::new(0));
        let (returned, seen) = mpsc::channel();
        let sleepers: Vec<_> = (0..8)
            .map(|_| {
                let (queue, open, asleep, returned) = (queue.clone(), open.clone(), asleep.clone(), returned.clone());
                std::thread::spawn(move || {
                    asleep.fetch_add(1, Ordering::AcqRel);
                    while !open.load(Ordering::Acquire) {
                        queue.park(|| !open.load(Ordering::Acquire));
                    }
                    returned.send(()).unwrap();
                })
            })
            .collect();
        while asleep.load(Ordering::Acquire) < 8 {
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_millis(20));
        open.store(true, Ordering::Release);
        queue.wake_all();
        for n in 0..8 {
            assert!(seen.recv_timeout(LOST).is_ok(), "only {n} of 8 sleepers returned after one wake");
        }
        sleepers.into_iter().for_each(|s| s.join().unwrap());
    }

    #[test]
    fn a_sleeper_whose_check_fails_does_not_sleep() {
        let queue = WaitQueue::new();
        // No one will ever wake this queue: a park that slept would hang the test.
        queue.park(|| false);
    }
}
