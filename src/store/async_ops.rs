//! `Store`'s side of [`DedupeStore`](crate::DedupeStore): the same decisions as the blocking
//! calls, with every wait handed to the store instead of a caller's thread.
//!
//! Two waits exist. A durable write under `Durability::Sync` waits for the group commit to
//! cover its record: the future registers its sequence number and sleeps; the store's *async
//! committer* thread takes every registered wait, joins the group commit for the highest one
//! (leading a sync or riding another's, as a blocking caller would) and wakes the futures it
//! covered. A claim with `ClaimOptions::wait` that finds its key in flight listens for that
//! key: a `complete`, `release` or `remove` of the key wakes it, and so does the first of its
//! wait's deadline, the holder's lease end and the key's window end, kept by a *timer* thread
//! (apart from the committer, so that a slow sync never delays a deadline). Each thread
//! starts at the first wait that needs it and stops with the store. Futures are woken with no
//! lock of the store held, and a waker that panics is contained: it can stop neither thread.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::claim::Tally;
use super::lookup::Current;
use super::{Inner, Store};
use crate::clock::system_time_to_ms;
use crate::error::{Error, Result};
use crate::log::record::{Header, Kind};
use crate::options::{ClaimOptions, Durability};
use crate::types::{Claim, ClaimToken, Entry};

/// The async waits' shared state (one per store).
#[derive(Default)]
pub(super) struct AsyncWaits {
    state: Mutex<WaitsState>,
    /// Wakes the committer: a durable wait arrived, or the store stops.
    committer_signal: Condvar,
    /// Wakes the timer thread: a deadline arrived, or the store stops.
    timer_signal: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Listeners registered on keys: lets `key_changed` skip the lock when nobody listens.
    listening: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
#[cfg_attr(loom, allow(dead_code))]
struct WaitsState {
    /// Futures waiting for a record to be durable: its seq and where to put the answer.
    durable: Vec<(u64, Arc<Signal>)>,
    /// Futures waiting for a key (by index hash) to change.
    keys: HashMap<u64, Vec<Weak<Signal>>>,
    /// Deadlines of key listeners: when, which key, whom to wake.
    timers: Vec<(Instant, u64, Weak<Signal>)>,
    committer_started: bool,
    timer_started: bool,
    stop: bool,
}

/// A one-shot answer between the committer (or a notifier) and one future.
#[derive(Default)]
struct Signal {
    slot: Mutex<SignalSlot>,
}

#[derive(Default)]
struct SignalSlot {
    fired: Option<Result<()>>,
    waker: Option<Waker>,
}

impl Signal {
    fn fire(&self, answer: Result<()>) {
        let mut slot = self.slot.lock();
        if slot.fired.is_none() {
            slot.fired = Some(answer);
        }
        let waker = slot.waker.take();
        drop(slot);
        if let Some(waker) = waker {
            // A waker is the runtime's code: one that panics must not take the store's thread
            // (and every later wait) with it. Its task is then never woken, as that runtime
            // chose.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| waker.wake()));
        }
    }

    fn poll(&self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let mut slot = self.slot.lock();
        match slot.fired.take() {
            Some(answer) => Poll::Ready(answer),
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Resolves when the signal fires.
struct SignalFuture(Arc<Signal>);

impl Future for SignalFuture {
    type Output = Result<()>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.0.poll(cx)
    }
}

/// An error for each of several waiters on one failed sync (errors are not `Clone`: the
/// causes a sync can fail with are carried over by kind).
fn copy_error(e: &Error) -> Error {
    match e {
        Error::Poisoned { cause } => Error::Poisoned { cause: cause.clone() },
        Error::ClockOutOfRange { now_ms, max_ms } => Error::ClockOutOfRange { now_ms: *now_ms, max_ms: *max_ms },
        other => Error::Poisoned { cause: other.to_string() },
    }
}

impl AsyncWaits {
    /// Wakes the listeners of the key with index hash `hash` (it was completed, released or
    /// removed). Costs one atomic load when nobody listens.
    pub(super) fn key_changed(&self, hash: u64) {
        if self.listening.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return;
        }
        let listeners = self.state.lock().keys.remove(&hash).unwrap_or_default();
        self.listening.fetch_sub(listeners.len(), std::sync::atomic::Ordering::AcqRel);
        for listener in listeners {
            if let Some(signal) = listener.upgrade() {
                signal.fire(Ok(()));
            }
        }
    }

    /// Stops the committer thread and fails what still waits (nothing should: the futures
    /// borrow the store, which is being dropped).
    pub(super) fn stop(&self) {
        self.state.lock().stop = true;
        self.committer_signal.notify_all();
        self.timer_signal.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock());
        for handle in threads {
            let _ = handle.join();
        }
    }

    /// Under loom (whose `Arc` has no weak handle) the async waits are not modelled: only
    /// group commit is.
    #[cfg(loom)]
    fn ensure_committer(self: &Arc<Self>, _state: &mut WaitsState, _inner: &crate::sync::Arc<Inner>) -> Result<()> {
        Err(Error::InvalidArgument("async waits are not available in loom models"))
    }

    /// Starts the committer thread if it is not running; `Err` when it cannot be started.
    #[cfg(not(loom))]
    fn ensure_committer(self: &Arc<Self>, state: &mut WaitsState, inner: &Arc<Inner>) -> Result<()> {
        if state.committer_started {
            return Ok(());
        }
        let (waits, weak) = (Arc::clone(self), Arc::downgrade(inner));
        let handle = std::thread::Builder::new()
            .name("idemstore-async".into())
            .spawn(move || committer(&waits, &weak))
            .map_err(|e| Error::io("start the async committer thread", &inner.dir, e))?;
        state.committer_started = true;
        self.threads.lock().push(handle);
        Ok(())
    }

    /// Starts the timer thread if it is not running; `Err` when it cannot be started.
    fn ensure_timer(self: &Arc<Self>, state: &mut WaitsState, dir: &std::path::Path) -> Result<()> {
        if state.timer_started {
            return Ok(());
        }
        let waits = Arc::clone(self);
        let handle = std::thread::Builder::new()
            .name("idemstore-timers".into())
            .spawn(move || timers(&waits))
            .map_err(|e| Error::io("start the async timer thread", dir, e))?;
        state.timer_started = true;
        self.threads.lock().push(handle);
        Ok(())
    }
}

/// The committer thread: serves durable waits through the group commit.
#[cfg_attr(loom, allow(dead_code))]
fn committer(waits: &AsyncWaits, inner: &Weak<Inner>) {
    loop {
        let mut state = waits.state.lock();
        while !state.stop && state.durable.is_empty() {
            waits.committer_signal.wait(&mut state);
        }
        let stopping = state.stop;
        let batch = std::mem::take(&mut state.durable);
        drop(state);
        if stopping {
            for (_, signal) in batch {
                signal.fire(Err(Error::Poisoned { cause: "the store was closed".into() }));
            }
            return;
        }
        // Only waits registered before this sync began are answered by it: a later answer may
        // rest on a time that this sync's time floor does not cover.
        let through = batch.iter().map(|(seq, _)| *seq).max().unwrap_or(0);
        let answer = match inner.upgrade() {
            Some(inner) => inner.commit.wait_durable(through, &inner.syncer()),
            None => Err(Error::Poisoned { cause: "the store was closed".into() }),
        };
        for (_, signal) in batch {
            signal.fire(answer.as_ref().map(|_| ()).map_err(copy_error));
        }
    }
}

/// The timer thread: wakes key listeners at their deadlines.
fn timers(waits: &AsyncWaits) {
    loop {
        let mut state = waits.state.lock();
        if state.stop {
            return;
        }
        let (due, next) = take_due_timers(&mut state);
        if due.is_empty() {
            match next {
                Some(at) => {
                    let left = at.saturating_duration_since(Instant::now());
                    waits.timer_signal.wait_for(&mut state, left);
                }
                None => waits.timer_signal.wait(&mut state),
            }
            continue;
        }
        drop(state);
        for signal in due {
            signal.fire(Ok(()));
        }
    }
}

/// Takes the key listeners whose deadline has passed (to be woken once the lock is let go) and
/// forgets dropped ones; returns them and the next deadline. (A listener leaves the key lists
/// when it is dropped: see `Listener`.)
fn take_due_timers(state: &mut WaitsState) -> (Vec<Arc<Signal>>, Option<Instant>) {
    let now = Instant::now();
    let mut next: Option<Instant> = None;
    let mut due = Vec::new();
    state.timers.retain(|(at, _, listener)| {
        let Some(signal) = listener.upgrade() else { return false };
        if *at <= now {
            due.push(signal);
            return false;
        }
        next = Some(next.map_or(*at, |n| n.min(*at)));
        true
    });
    (due, next)
}

/// A claim's wait for its key: woken by a change of the key (`AsyncWaits::key_changed`) or
/// by a timer (`Store::wake_at`). Dropping it unregisters it.
struct Listener {
    waits: Arc<AsyncWaits>,
    hash: u64,
    signal: Arc<Signal>,
}

impl Future for Listener {
    type Output = Result<()>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.signal.poll(cx)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let mut state = self.waits.state.lock();
        let mine = Arc::downgrade(&self.signal);
        if let Some(list) = state.keys.get_mut(&self.hash) {
            let before = list.len();
            list.retain(|l| !Weak::ptr_eq(l, &mine));
            let removed = before - list.len();
            if list.is_empty() {
                state.keys.remove(&self.hash);
            }
            self.waits.listening.fetch_sub(removed, std::sync::atomic::Ordering::AcqRel);
        }
        state.timers.retain(|(_, _, l)| !Weak::ptr_eq(l, &mine));
    }
}

/// Gives a claim back if its future is dropped before handing the token to its caller: that
/// caller cannot have started the effect, so the key is freed at once instead of staying in
/// flight until the lease ends.
struct ReleaseUnlessTaken<'a> {
    inner: &'a Inner,
    hash: u64,
    token: Option<ClaimToken>,
}

impl ReleaseUnlessTaken<'_> {
    fn take(mut self) -> Option<ClaimToken> {
        self.token.take()
    }
}

impl Drop for ReleaseUnlessTaken<'_> {
    fn drop(&mut self) {
        let Some(token) = self.token.take() else { return };
        // Not waited for: under `Sync` a crash may lose this record, and the claim then ends
        // as an orphan's would (taken over by the next claim).
        if token.recovered() {
            // A takeover took the key from a holder that may have run the effect: the key
            // goes back to that holder's state (its checkpoint, its process), with the lease
            // ended, so the next claim takes over from it as this one did.
            let _ = self.inner.give_back(&token, self.hash);
        } else {
            let _ = self.inner.finish_unsettled(&token, self.hash, Kind::Release, &[]);
        }
    }
}

impl Inner {
    /// Undoes a takeover whose caller never saw its token (see `ReleaseUnlessTaken`).
    fn give_back(&self, token: &ClaimToken, hash: u64) -> Result<()> {
        self.check_writable()?;
        let key = token.key();
        let locked = self.index.shard(hash);
        let mut shard = locked.shard.lock();
        let now_ms = self.time.now_ms();
        let mut slot = None;
        let (state, old, _) = self.current(&mut shard, hash, key, now_ms, &mut slot)?;
        let (held, checkpoint) = match state {
            Current::InFlight(found) if found.header.token == token.id => {
                (found.header, std::mem::take(&mut found.value))
            }
            _ => return Ok(()),
        };
        let header = Header {
            kind: Kind::Checkpoint,
            seq: 0,
            written_at_ms: now_ms,
            lease_until_ms: now_ms,
            incarnation: token.taken_from,
            ..held
        };
        let (_, new_loc) = self.append(header, key, &checkpoint, old)?;
        shard.set(hash, old.map(|o| o.loc), new_loc);
        drop(shard);
        self.after_write();
        self.key_changed(locked, hash);
        Ok(())
    }
}

impl Store {
    /// Resolves once record `seq` (the one an answer rests on) is durable, under `Sync`; at
    /// once otherwise, or when it already is.
    async fn settle_async(&self, seq: u64) -> Result<()> {
        let inner = &self.inner;
        if inner.options.durability != Durability::Sync {
            return Ok(());
        }
        inner.commit.check()?;
        let time_durable = inner.read_only || inner.log.time_floor().durable_ms() >= inner.time.latest_ms();
        if inner.commit.durable_seq() >= seq && time_durable {
            return Ok(());
        }
        let signal = Arc::new(Signal::default());
        {
            let waits = &inner.async_waits;
            let mut state = waits.state.lock();
            waits.ensure_committer(&mut state, &self.inner)?;
            state.durable.push((seq, Arc::clone(&signal)));
        }
        inner.async_waits.committer_signal.notify_one();
        SignalFuture(signal).await
    }

    /// A listener on the key with index hash `hash`, woken by its next change.
    fn listen(&self, hash: u64) -> Result<Listener> {
        let waits = &self.inner.async_waits;
        let signal = Arc::new(Signal::default());
        let mut state = waits.state.lock();
        waits.ensure_timer(&mut state, &self.inner.dir)?;
        state.keys.entry(hash).or_default().push(Arc::downgrade(&signal));
        waits.listening.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(Listener { waits: Arc::clone(waits), hash, signal })
    }

    /// Wakes `listener` at `at` too.
    fn wake_at(&self, listener: &Listener, at: Instant) {
        let waits = &self.inner.async_waits;
        waits.state.lock().timers.push((at, listener.hash, Arc::downgrade(&listener.signal)));
        waits.timer_signal.notify_one();
    }

    pub(crate) async fn claim_async(&self, key: &[u8], request: &[u8], options: ClaimOptions) -> Result<Claim> {
        let answer = self.claim_async_unreported(key, request, options).await;
        self.inner.report_claim(key, &answer);
        answer
    }

    async fn claim_async_unreported(&self, key: &[u8], request: &[u8], options: ClaimOptions) -> Result<Claim> {
        let inner = &*self.inner;
        let hash = inner.key_hash(key);
        inner.index.prefetch_slot(hash);
        let Some(wait) = options.wait else {
            let (answer, seq) = inner.claim_unsettled(key, hash, request, &options, Tally::default())?;
            return self.deliver(hash, answer, seq).await;
        };
        // `None`: a wait too long for the monotonic clock, which has no deadline of its own.
        let deadline = Instant::now().checked_add(wait);
        let once = ClaimOptions { wait: None, ..options };
        let mut waited = false;
        loop {
            // Listening starts before the key is read: a change between the read and the
            // registration would otherwise be missed.
            let listener = self.listen(hash)?;
            let now = Instant::now();
            let out_of_time = deadline.is_some_and(|at| now >= at);
            let tally = Tally { waited, will_wait: !out_of_time };
            let (answer, seq) = inner.claim_unsettled(key, hash, request, &once, tally)?;
            let Claim::InProgress { lease_expires_at, expires_at } = answer else {
                return self.deliver(hash, answer, seq).await;
            };
            if out_of_time {
                return self.deliver(hash, answer, seq).await;
            }
            waited = true;
            // The key changes by itself at the holder's lease end (a takeover) or at its
            // window's end (absent), with no write to wake anyone: wake up at the first of
            // them too (at least once a day, to look again).
            let change_at = lease_expires_at.min(expires_at);
            let change_in_ms = system_time_to_ms(change_at).saturating_sub(inner.time.now_ms()).max(1);
            let change_in = Duration::from_millis(change_in_ms).min(Duration::from_secs(24 * 3600));
            let mut wake = now + change_in;
            if let Some(at) = deadline {
                wake = wake.min(at);
            }
            self.wake_at(&listener, wake);
            listener.await?;
        }
    }

    /// Settles an answer and hands it out; an `Acquired` claim whose future is dropped on the
    /// way is released.
    async fn deliver(&self, hash: u64, answer: Claim, seq: u64) -> Result<Claim> {
        match answer {
            Claim::Acquired(token) => {
                let guard = ReleaseUnlessTaken { inner: &self.inner, hash, token: Some(token) };
                self.settle_async(seq).await?;
                Ok(Claim::Acquired(guard.take().ok_or(Error::InvalidArgument("claim token taken twice"))?))
            }
            other => {
                self.settle_async(seq).await?;
                Ok(other)
            }
        }
    }

    pub(crate) async fn finish_async(&self, token: &ClaimToken, kind: Kind, value: &[u8]) -> Result<()> {
        let hash = self.inner.key_hash(token.key());
        self.inner.index.prefetch_slot(hash);
        let (answer, seq) = self.inner.finish_unsettled(token, hash, kind, value)?;
        self.settle_async(seq).await?;
        answer
    }

    pub(crate) async fn get_async(&self, key: &[u8]) -> Result<Option<Entry>> {
        self.inner.check_key(key)?;
        let (entry, seq) = self.inner.entry_unsettled(key)?;
        self.settle_async(seq).await?;
        Ok(entry)
    }

    pub(crate) async fn remove_async(&self, key: &[u8]) -> Result<()> {
        let seq = self.inner.remove_unsettled(key)?;
        self.settle_async(seq).await
    }
}
