//! The bare group commit: the handoff `Durability::Sync` makes, with no store around it, as
//! the practical ceiling to read the store's ratio against. The limit in the table assumes
//! each of 16 writers costs nothing between syncs; on a machine with fewer cores than writers,
//! waking them and letting each write again takes time the disk then sits idle for.
//!
//! Each writer appends 64 B under a mutex (a `pwrite` at the next offset of a preallocated,
//! zero-filled file), then waits until a sync covers it. The first waiter leads: it lets the
//! writers its last sync released write again (yielding, for at most as long as that sync took,
//! as the store does), calls `fdatasync`, publishes the covered sequence and wakes every
//! sleeper with one `FUTEX_WAKE`. Nothing else: no index, no records, no checksums.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use super::Row;
use super::support::{duration_nanos, new_histogram};

/// Bytes each writer appends per op, as in the raw loops.
const RECORD: [u8; 64] = [0x3Cu8; 64];
/// Size of the preallocated file; offsets wrap around.
const FILE_BYTES: u64 = 64 << 20;
/// Longest a leader waits for returning writers, and most times it yields meanwhile, as in
/// the store.
const GATHER_BUDGET_MAX: Duration = Duration::from_millis(1);
const GATHER_YIELDS_MAX: u32 = 1024;

/// What the writers share.
struct Shared {
    file: File,
    /// The last written sequence number, under the lock that orders the writes.
    written: Mutex<u64>,
    /// Mirrors `written` for the gathering leader, which does not take the lock.
    written_seen: AtomicU64,
    durable: AtomicU64,
    leader_active: AtomicBool,
    /// Bumped by every wake; sleepers wait while it is unchanged.
    generation: AtomicU32,
    /// Records the last sync covered, and how long it took (ns).
    last_batch: AtomicU64,
    last_sync_ns: AtomicU64,
    syncs: AtomicU64,
    sync_ns_total: AtomicU64,
}

impl Shared {
    fn write(&self) -> u64 {
        let mut written = self.written.lock().expect("written lock");
        *written += 1;
        let offset = (*written * RECORD.len() as u64) % FILE_BYTES;
        self.file.write_all_at(&RECORD, offset).expect("bare commit: write");
        self.written_seen.store(*written, Ordering::Release);
        *written
    }

    fn wait_durable(&self, seq: u64) {
        while self.durable.load(Ordering::Acquire) < seq {
            if self.leader_active.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                self.lead();
                continue;
            }
            let seen = self.generation.load(Ordering::SeqCst);
            if self.leader_active.load(Ordering::Acquire) && self.durable.load(Ordering::Acquire) < seq {
                futex(&self.generation, libc::FUTEX_WAIT, seen);
            }
        }
    }

    fn lead(&self) {
        let before = self.durable.load(Ordering::Acquire);
        let returning = self.last_batch.load(Ordering::Relaxed);
        if returning > 1 {
            let budget = Duration::from_nanos(self.last_sync_ns.load(Ordering::Relaxed)).min(GATHER_BUDGET_MAX);
            let started = Instant::now();
            let expected = (self.written_seen.load(Ordering::Acquire) - before + returning).saturating_sub(1);
            for _ in 0..GATHER_YIELDS_MAX {
                if self.written_seen.load(Ordering::Acquire) - before >= expected || started.elapsed() >= budget {
                    break;
                }
                std::thread::yield_now();
            }
        }
        let through = self.written_seen.load(Ordering::Acquire);
        let started = Instant::now();
        self.file.sync_data().expect("bare commit: fdatasync");
        let took = duration_nanos(started.elapsed());
        self.last_sync_ns.store(took, Ordering::Relaxed);
        self.sync_ns_total.fetch_add(took, Ordering::Relaxed);
        self.last_batch.store(through - before, Ordering::Relaxed);
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.durable.store(through, Ordering::Release);
        self.leader_active.store(false, Ordering::Release);
        self.generation.fetch_add(1, Ordering::SeqCst);
        futex(&self.generation, libc::FUTEX_WAKE, i32::MAX as u32);
    }
}

/// FUTEX_WAIT (sleep while the word holds `value`) or FUTEX_WAKE (wake up to `value`
/// sleepers); spurious returns are handled by the callers' loops.
fn futex(word: &AtomicU32, op: libc::c_int, value: u32) {
    // SAFETY: the futex word is a live atomic owned by `Shared`, which outlives every thread
    // that waits on it; FUTEX_WAIT only reads it and FUTEX_WAKE only uses its address as a key.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            op | libc::FUTEX_PRIVATE_FLAG,
            value,
            std::ptr::null::<libc::timespec>(),
        );
    }
}

/// The bare group commit's row: `threads` writers for `duration`.
pub fn row(dir: &Path, threads: usize, duration: Duration) -> Row {
    let path = dir.join("bare-commit.bin");
    let file = File::create(&path).expect("create bare commit file");
    let zeros = vec![0u8; 1 << 20];
    for chunk in 0..(FILE_BYTES >> 20) {
        file.write_all_at(&zeros, chunk << 20).expect("zero-fill bare commit file");
    }
    file.sync_all().expect("sync zero-filled file");
    let shared = Arc::new(Shared {
        file,
        written: Mutex::new(0),
        written_seen: AtomicU64::new(0),
        durable: AtomicU64::new(0),
        leader_active: AtomicBool::new(false),
        generation: AtomicU32::new(0),
        last_batch: AtomicU64::new(0),
        last_sync_ns: AtomicU64::new(0),
        syncs: AtomicU64::new(0),
        sync_ns_total: AtomicU64::new(0),
    });
    let written_before = super::device_bytes_written(dir);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (shared, stop, start) = (shared.clone(), stop.clone(), start.clone());
            std::thread::spawn(move || {
                let mut hist = new_histogram();
                let mut ops = 0u64;
                start.wait();
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let seq = shared.write();
                    shared.wait_durable(seq);
                    let now = Instant::now();
                    hist.saturating_record(duration_nanos(now - last));
                    last = now;
                    ops += 1;
                }
                (ops, hist)
            })
        })
        .collect();
    start.wait();
    let started = Instant::now();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut hist = new_histogram();
    let mut ops = 0;
    for worker in workers {
        let (n, h) = worker.join().expect("bare commit thread panicked");
        ops += n;
        hist.add(h).expect("merge histograms");
    }
    let elapsed = started.elapsed();
    let syncs = shared.syncs.load(Ordering::Relaxed);
    let kib_per_sync = super::kib_per_sync(written_before, super::device_bytes_written(dir), syncs);
    let sync_ns_total = shared.sync_ns_total.load(Ordering::Relaxed);
    std::fs::remove_file(&path).expect("remove bare commit file");
    Row {
        name: "bare group commit (no store: pwrite + shared fdatasync, see bare_commit.rs)".into(),
        durability: "fdatasync".into(),
        threads,
        ops,
        elapsed,
        hist,
        records_per_sync: (syncs > 0).then(|| ops as f64 / syncs as f64),
        mean_sync_us: (syncs > 0).then(|| sync_ns_total as f64 / syncs as f64 / 1000.0),
        kib_per_sync,
        is_sync_claims: false,
        is_group_commit: true,
        raw: None,
    }
}
