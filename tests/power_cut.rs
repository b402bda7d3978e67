//! Power cuts at random instants on the simulated disk, checked against a model of the keys.
//!
//! Promise checked (README, Guarantees: "Crash recovery" and the durability rows): after a power
//! loss at any instant, `Store::open` succeeds, returns nothing half-written, and holds every
//! operation its durability mode promised.
//!
//! How: every disk call that changes bytes or names (create, reserve, write, sync, directory
//! sync, remove) is a possible cut point. A wrapper around `SimDisk` counts them and,
//! just before the chosen one, takes the image a power cut would leave at that instant: only
//! the synced bytes, or those plus a torn prefix of the unsynced writes (`SimDisk::power_cut`),
//! or every write (the disk flushed it all just before the cut). The store
//! goes on running on the live disk; the test then reopens the store on the image, which may
//! itself be cut in the middle of its recovery, and checks every key against the model:
//!
//! - `Sync`: every operation that returned before the cut is there; the one in flight at the
//!   cut is there or not, for its key only; every other key is exactly as acknowledged.
//! - `Periodic` (no flusher in these runs: `store.sync()` is the only sync): every key is in a
//!   state it actually had at or after the last `sync()` that returned, never older, never a
//!   state it did not have (a torn record is never half-visible).
//!
//! After the check, the sequence goes on on the recovered store (recover, mutate, cut again).
//! Each operation writes through one of three lanes of the log, drawn from the seed, as writes
//! from several threads would.
//! Each case prints its seed on failure; `IDEMSTORE_POWER_CUT_SEED=<seed>` replays one case and
//! `IDEMSTORE_POWER_CUTS=<n>` raises the number of cuts per test (default 1,000).

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemstore::io::{DirLock, Io, IoFile};
use idemstore::sim::SimDisk;
use idemstore::{Claim, ClaimOptions, ClaimToken, Durability, Entry, ManualClock, Options, OrphanPolicy, Store};

mod common;
use common::model::{Finish, Model as Contract, Slot};
use common::{Rng, START_MS};

const DIR: &str = "/store";
const LEASE_MS: u64 = 30_000;
const DAY_MS: u64 = 24 * 3600 * 1000;
const SHORT_TTL_MS: u64 = 90_000;
const KEYS: u64 = 4;

// ---------------------------------------------------------------------------------------------
// The disk wrapper that takes a power-cut image before the n-th mutating call.

/// What a power cut leaves of the writes that were not synced yet.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// Nothing: only synced bytes and synced directory entries.
    SyncedOnly,
    /// A random prefix of each file's unsynced writes, the last one torn (`SimDisk::power_cut`).
    Torn(u64),
    /// Everything: the disk happened to write all of it back before the power went.
    AllWritten,
}

impl Cut {
    fn random(rng: &mut Rng) -> Cut {
        match rng.below(8) {
            0 | 1 => Cut::SyncedOnly,
            2 => Cut::AllWritten,
            _ => Cut::Torn(rng.next()),
        }
    }

    fn image(self, disk: &SimDisk) -> SimDisk {
        match self {
            Cut::SyncedOnly => disk.power_cut(None),
            Cut::Torn(seed) => disk.power_cut(Some(seed)),
            Cut::AllWritten => {
                let image = SimDisk::new();
                for path in disk.file_paths() {
                    if let Some(bytes) = disk.read_file(&path) {
                        image.write_file(&path, bytes);
                    }
                }
                image
            }
        }
    }
}

/// When to cut and what the cut left.
#[derive(Debug)]
struct CutPlan {
    disk: SimDisk,
    cut: Cut,
    /// Mutating calls left before the cut; 0 means disarmed (already cut or never armed).
    countdown: AtomicU64,
    image: Mutex<Option<SimDisk>>,
}

impl CutPlan {
    fn new(disk: SimDisk, cut: Cut, countdown: u64) -> Arc<CutPlan> {
        let plan = Arc::new(CutPlan { disk, cut, countdown: AtomicU64::new(countdown), image: Mutex::new(None) });
        // Between two slices of a gradual sync is a cut point too (the slices are synced one
        // by one, and the first may make a new file's name durable: see `ext4`).
        let weak = Arc::downgrade(&plan);
        plan.disk.between_sync_slices(Some(Arc::new(move || {
            if let Some(plan) = weak.upgrade() {
                plan.before_mutation();
            }
        })));
        plan
    }

    /// Called before every call that changes the disk.
    fn before_mutation(&self) {
        let left = self.countdown.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if left == Ok(1) {
            *self.image.lock().expect("image lock") = Some(self.cut.image(&self.disk));
        }
    }

    fn fired(&self) -> bool {
        self.image.lock().expect("image lock").is_some()
    }

    /// The image the cut left; a cut now if it did not fire yet (then nothing fires later).
    fn take_image(&self) -> SimDisk {
        self.countdown.store(0, Ordering::SeqCst);
        let taken = self.image.lock().expect("image lock").take();
        taken.unwrap_or_else(|| self.cut.image(&self.disk))
    }
}

#[derive(Debug)]
struct CuttingIo(Arc<CutPlan>);

struct CuttingFile {
    inner: Box<dyn IoFile>,
    plan: Arc<CutPlan>,
}

impl Io for CuttingIo {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.0.disk.create_dir_all(dir)
    }
    fn lock_dir(&self, dir: &Path) -> io::Result<Box<dyn DirLock>> {
        self.0.disk.lock_dir(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.0.disk.list(dir)
    }
    fn create(&self, path: &Path, capacity: u64) -> io::Result<Box<dyn IoFile>> {
        self.0.before_mutation();
        let inner = self.0.disk.create(path, capacity)?;
        Ok(Box::new(CuttingFile { inner, plan: self.0.clone() }))
    }
    fn open(&self, path: &Path, capacity: u64, writable: bool) -> io::Result<Box<dyn IoFile>> {
        let inner = self.0.disk.open(path, capacity, writable)?;
        Ok(Box::new(CuttingFile { inner, plan: self.0.clone() }))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.0.before_mutation();
        self.0.disk.remove(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.0.before_mutation();
        self.0.disk.rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.0.before_mutation();
        self.0.disk.sync_dir(dir)
    }
}

impl IoFile for CuttingFile {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn reserve(&self, len: u64) -> io::Result<()> {
        self.plan.before_mutation();
        self.inner.reserve(len)
    }
    fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.plan.before_mutation();
        self.inner.write_at(offset, bytes)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn sync(&self) -> io::Result<()> {
        self.plan.before_mutation();
        self.inner.sync()
    }
    fn reserve_unfilled(&self, len: u64) -> io::Result<()> {
        self.plan.before_mutation();
        self.inner.reserve_unfilled(len)
    }
    fn reserve_paged(&self, len: u64) -> io::Result<()> {
        self.plan.before_mutation();
        self.inner.reserve_paged(len)
    }
    fn write_with(&self, offset: u64, len: usize, fill: &mut dyn FnMut(&mut [u8])) -> io::Result<()> {
        self.plan.before_mutation();
        self.inner.write_with(offset, len, fill)
    }
    fn prefetch(&self, offset: u64) {
        self.inner.prefetch(offset)
    }
    fn sync_gradually(&self) -> io::Result<()> {
        self.plan.before_mutation();
        self.inner.sync_gradually()
    }
    fn release_descriptor(&self) {
        self.inner.release_descriptor()
    }
    fn release_pages(&self) {
        self.inner.release_pages()
    }
}

// ---------------------------------------------------------------------------------------------
// The model: the contract (`common::model`), and per key the states a power cut may leave.

/// The contract's current state of every key, and per key the states a power cut may leave:
/// the first is the last acknowledged state, the others the states after each unacknowledged
/// operation since; the last is the current one. `None` is absent.
struct Model {
    contract: Contract,
    keys: BTreeMap<Vec<u8>, Vec<Option<Slot>>>,
}

impl Model {
    fn new() -> Model {
        let keys = (0..KEYS).map(|k| (key_name(k), vec![None])).collect();
        Model { contract: Contract::new(START_MS, OrphanPolicy::TakeOver), keys }
    }

    /// The last operation changed `key`: its new state is one a power cut may leave.
    fn changed(&mut self, key: &[u8]) {
        let state = self.contract.slot(key).cloned();
        self.keys.get_mut(key).expect("known key").push(state);
    }

    /// Everything so far is durable: only the current states remain possible.
    fn acknowledge_all(&mut self) {
        for states in self.keys.values_mut() {
            let last = states.pop().expect("a key always has a state");
            states.clear();
            states.push(last);
        }
    }
}

/// What `get` returns for a possible state at `now_ms`, the store being at open `incarnation`.
fn entry_of(state: &Option<Slot>, now_ms: u64, incarnation: u64) -> Option<Entry> {
    state.as_ref()?.entry(now_ms, incarnation)
}

/// A possible state as a read at `now_ms` sees it: an expired record is absent.
fn live(state: &Option<Slot>, now_ms: u64) -> Option<&Slot> {
    state.as_ref()?.live(now_ms)
}

fn key_name(k: u64) -> Vec<u8> {
    format!("key-{k}").into_bytes()
}

// ---------------------------------------------------------------------------------------------
// Operations, each run against the store and the model at once.

enum Op {
    Claim { key: Vec<u8>, request: Vec<u8>, ttl_ms: Option<u64> },
    Complete { token: usize, outcome: Vec<u8> },
    Checkpoint { token: usize, phase: Vec<u8> },
    Release { token: usize },
    Remove { key: Vec<u8> },
    Advance { ms: u64 },
    Maintain,
    Sync,
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Claim { key, request, ttl_ms } => {
                write!(f, "Claim({}, {}, ttl {ttl_ms:?})", lossy(key), lossy(request))
            }
            Op::Complete { token, outcome } => write!(f, "Complete(token #{token}, {} bytes)", outcome.len()),
            Op::Checkpoint { token, phase } => write!(f, "Checkpoint(token #{token}, {} bytes)", phase.len()),
            Op::Release { token } => write!(f, "Release(token #{token})"),
            Op::Remove { key } => write!(f, "Remove({})", lossy(key)),
            Op::Advance { ms } => write!(f, "Advance({ms} ms)"),
            Op::Maintain => write!(f, "Maintain"),
            Op::Sync => write!(f, "Sync"),
        }
    }
}

fn random_op(rng: &mut Rng, tokens: usize, with_sync: bool) -> Op {
    let key = key_name(rng.below(KEYS));
    let roll = rng.below(100);
    let token = if tokens == 0 { None } else { Some(tokens - 1 - rng.below(tokens.min(6) as u64) as usize) };
    match (roll, token) {
        (0..=34, _) | (35..=64, None) => Op::Claim {
            key,
            request: if rng.one_in(8) { b"request-B".to_vec() } else { b"request-A".to_vec() },
            ttl_ms: if rng.one_in(4) { Some(SHORT_TTL_MS) } else { None },
        },
        (35..=49, Some(token)) => {
            let len = if rng.one_in(6) { rng.range(1_000, 5_000) } else { rng.below(200) } as usize;
            Op::Complete { token, outcome: rng.bytes(len) }
        }
        (50..=57, Some(token)) => {
            let len = rng.range(1, 100) as usize;
            Op::Checkpoint { token, phase: rng.bytes(len) }
        }
        (58..=64, Some(token)) => Op::Release { token },
        (65..=71, _) => Op::Remove { key },
        (72..=84, _) => Op::Advance { ms: if rng.one_in(2) { rng.below(1_000) } else { rng.range(1_000, 45_000) } },
        (85..=89, _) => Op::Maintain,
        _ if with_sync => Op::Sync,
        _ => Op::Advance { ms: rng.below(100) },
    }
}

fn fail(seed: u64, what: impl std::fmt::Display) -> ! {
    panic!("case seed {seed:#x} (replay with IDEMSTORE_POWER_CUT_SEED={seed}): {what}");
}

/// Runs `op` against the store and the contract, which checks the store's answer; records the
/// key's new state when the operation changed one.
fn run_op(store: &Store, clock: &ManualClock, model: &mut Model, tokens: &mut Vec<ClaimToken>, op: &Op, seed: u64) {
    let contract = &mut model.contract;
    match op {
        Op::Claim { key, request, ttl_ms } => {
            let options = ClaimOptions { ttl: ttl_ms.map(Duration::from_millis), ..Default::default() };
            let got = store.claim_with(key, request, options).unwrap_or_else(|e| fail(seed, format!("{op:?}: {e}")));
            let ttl = ttl_ms.unwrap_or(DAY_MS);
            contract
                .claim(key, request, ttl, LEASE_MS, &got)
                .unwrap_or_else(|why| fail(seed, format!("{op:?}: {why}")));
            if let Claim::Acquired(token) = got {
                tokens.push(token);
                model.changed(key);
                // An acquire takes a millisecond, so that no two holdings of a key read the same.
                clock.advance(Duration::from_millis(1));
                model.contract.advance(1);
            }
        }
        Op::Complete { token, .. } | Op::Checkpoint { token, .. } | Op::Release { token } => {
            let token = &tokens[*token];
            let (what, result) = match op {
                Op::Complete { outcome, .. } => (Finish::Complete(outcome.clone()), store.complete(token, outcome)),
                Op::Checkpoint { phase, .. } => (Finish::Checkpoint(phase.clone()), store.checkpoint(token, phase)),
                _ => (Finish::Release, store.release(token)),
            };
            let changed = contract
                .finish(token, what, &result)
                .unwrap_or_else(|why| fail(seed, format!("{op:?} on token {}: {why}", token.id())));
            if changed {
                model.changed(token.key());
            }
        }
        Op::Remove { key } => {
            store.remove(key).unwrap_or_else(|e| fail(seed, format!("{op:?}: {e}")));
            if contract.remove(key) {
                model.changed(key);
            }
        }
        Op::Advance { ms } => {
            clock.advance(Duration::from_millis(*ms));
            contract.advance(*ms);
        }
        Op::Maintain => {
            store.maintain().unwrap_or_else(|e| fail(seed, format!("{op:?}: {e}")));
        }
        Op::Sync => {
            store.sync().unwrap_or_else(|e| fail(seed, format!("{op:?}: {e}")));
        }
    }
}

/// The live store agrees with the contract's current state for every key.
fn check_live(store: &Store, model: &Model, seed: u64, after: &Op) {
    for key in model.keys.keys() {
        let want = model.contract.entry(key);
        let got = store.get(key).unwrap_or_else(|e| fail(seed, format!("get after {after:?}: {e}")));
        if got != want {
            fail(seed, format!("after {after:?}, key {:?}: live store {got:?}, model {want:?}", lossy(key)));
        }
    }
}

fn lossy(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// After a reopen: every key is in one of the states the model allows; the model keeps the one
/// found. Also, `orphans()` lists exactly the in-flight keys, with their checkpoints.
fn check_recovered(store: &Store, model: &mut Model, seed: u64, tally: &mut Tally) {
    let now = model.contract.now_ms;
    let incarnation = model.contract.incarnation;
    for (key, states) in model.keys.iter_mut() {
        let got = store.get(key).unwrap_or_else(|e| fail(seed, format!("get after reopen: {e}")));
        let matching: Vec<&Option<Slot>> = states.iter().filter(|s| entry_of(s, now, incarnation) == got).collect();
        let Some(found) = matching.last().map(|s| (*s).clone()) else {
            fail(
                seed,
                format!(
                    "after a power cut, key {:?} reads {got:?}, which is none of the states allowed: {states:#?}",
                    lossy(key)
                ),
            );
        };
        // Every acquire moves the clock, so two holdings never read the same: the states that
        // match are one and the same (or all absent).
        if matching.iter().any(|s| live(s, now) != live(&found, now)) {
            fail(seed, format!("test design: key {:?} matches different states {matching:#?}", lossy(key)));
        }
        let latest = entry_of(states.last().expect("state"), now, incarnation);
        if std::env::var_os("IDEMSTORE_POWER_CUT_SEED").is_some() {
            println!(
                "recovered {}: {got:?} (matches {} of {} allowed states)",
                lossy(key),
                matching.len(),
                states.len()
            );
        }
        if states.len() > 1 {
            if got == latest {
                tally.unacknowledged_kept += 1;
            } else {
                tally.unacknowledged_lost += 1;
            }
        }
        model.contract.restore(key, found.clone());
        *states = vec![found];
    }
    let orphans = store.orphans().unwrap_or_else(|e| fail(seed, format!("orphans after reopen: {e}")));
    let want = model.contract.orphans();
    if orphans != want {
        fail(seed, format!("orphans after reopen: store {orphans:?}, model {want:?}"));
    }
}

// ---------------------------------------------------------------------------------------------
// The driver.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// `Durability::Sync`: every operation is acknowledged when it returns.
    Sync,
    /// `Durability::Periodic(1 h)` with no flusher: only `sync()` acknowledges.
    Periodic,
}

/// Sets up a case's disk: as ext4 does (when `ext4`), a new file's name becomes durable with
/// its first sync, and gradual syncs go in small slices so a cut can fall between two of them
/// even in a small table.
fn configure(disk: &SimDisk, ext4: bool) {
    disk.names_durable_on_first_sync(ext4);
    disk.set_sync_slice_bytes(if ext4 { 256 } else { 1 << 20 });
}

fn options(mode: Mode, clock: &Arc<ManualClock>, plan: &Arc<CutPlan>) -> Options {
    Options {
        durability: match mode {
            Mode::Sync => Durability::Sync,
            Mode::Periodic => Durability::Periodic(Duration::from_secs(3600)),
        },
        clock: clock.clone(),
        io: Arc::new(CuttingIo(plan.clone())),
        background: false,
        bucket_width: Duration::from_secs(60),
        segment_bytes_initial: 512,
        // Idle segments are sealed into tables by `Maintain` within a case's clock steps, so
        // cuts fall in table writes too.
        seal_idle_after: Duration::from_secs(20),
        // A small budget for the segments taking appends: they retire every few operations,
        // and `Maintain` writes their restart tables, so cuts fall in those writes too.
        active_bytes_max: 4096,
        // Each operation writes through a lane its seed picks (`pin_thread_lane`), so a key's
        // records spread over the lanes' segments, retired and sealed at different times.
        log_lanes: LANES,
        ..Options::default()
    }
}

/// The log's lanes in these runs.
const LANES: usize = 3;

/// What a run did, so a test can show its cuts hit what they were meant to.
#[derive(Debug, Default)]
struct Tally {
    cuts: u64,
    during_an_operation: u64,
    between_operations: u64,
    during_recovery: u64,
    synced_only: u64,
    torn: u64,
    all_written: u64,
    /// Keys with unacknowledged states whose latest state survived the cut / did not.
    unacknowledged_kept: u64,
    unacknowledged_lost: u64,
    /// Sealed tables reopens found and trusted.
    tables_loaded: u64,
    /// Rounds that ended with `close` (which writes every segment a table), and those whose
    /// cut fell inside it.
    closes: u64,
    during_close: u64,
}

impl Tally {
    fn cut(&mut self, plan: &CutPlan) {
        self.cuts += 1;
        match plan.cut {
            Cut::SyncedOnly => self.synced_only += 1,
            Cut::Torn(_) => self.torn += 1,
            Cut::AllWritten => self.all_written += 1,
        }
    }
}

/// One case: a fresh disk, then rounds of (open, maybe cut during recovery, check, run
/// operations, cut at a random mutating call or between two operations).
fn run_case(mode: Mode, seed: u64, rounds: u32, tally: &mut Tally) {
    let mut rng = Rng(seed);
    let clock = ManualClock::new(START_MS);
    let mut model = Model::new();
    let mut tokens: Vec<ClaimToken> = Vec::new();
    let mut disk = SimDisk::new();
    let ext4 = rng.one_in(2);
    configure(&disk, ext4);
    let trace = std::env::var_os("IDEMSTORE_POWER_CUT_SEED").is_some();
    let calls_per_op = match mode {
        Mode::Sync => 3,
        Mode::Periodic => 2,
    };
    for round in 0..rounds {
        let ops = rng.range(5, 35);
        // Open; a cut may hit recovery itself (then reopen the image it left).
        let mut cuts_in_open = 0u64;
        let (store, plan) = loop {
            let countdown = if round > 0 && rng.one_in(6) { rng.range(1, 3) } else { rng.range(1, ops * calls_per_op) };
            // An open (and the check after it) that makes more mutations than any countdown
            // drawn here would be cut forever: after many cuts in a row, it is let through.
            let countdown = if cuts_in_open >= 32 { u64::MAX } else { countdown };
            cuts_in_open += 1;
            let plan = CutPlan::new(disk.clone(), Cut::random(&mut rng), countdown);
            let store = Store::open(DIR, options(mode, &clock, &plan))
                .unwrap_or_else(|e| fail(seed, format!("open after a power cut (round {round}): {e}")));
            if !plan.fired() && round > 0 {
                model.contract.reopen();
                // Reads write too: under `Sync` an answer makes the store's time durable first
                // (the TIME file), so the cut may fall in this check; then it is a cut like one
                // during recovery, and the image it left is opened again.
                check_recovered(&store, &mut model, seed, tally);
            }
            if !plan.fired() {
                tally.tables_loaded += store.stats().recovery.tables_loaded;
                break (store, plan);
            }
            disk = plan.take_image();
            configure(&disk, ext4);
            drop(store);
            tally.cut(&plan);
            tally.during_recovery += 1;
        };
        if round > 0 {
            // A step of the clock, so that a takeover is told apart from the claim it replaces.
            clock.advance(Duration::from_millis(1));
            model.contract.advance(1);
        }
        for _ in 0..ops {
            let op = random_op(&mut rng, tokens.len(), mode == Mode::Periodic);
            let cut_before = plan.fired();
            if trace {
                println!("round {round} t={} {op:?}", model.contract.now_ms - START_MS);
            }
            idemstore::sim::pin_thread_lane(rng.below(LANES as u64) as usize);
            run_op(&store, &clock, &mut model, &mut tokens, &op, seed);
            check_live(&store, &model, seed, &op);
            if mode == Mode::Sync {
                let stats = store.stats();
                if stats.durable_seq < stats.last_seq {
                    fail(seed, format!("Sync: {op:?} returned with seq {} not durable", stats.last_seq));
                }
            }
            if !cut_before && plan.fired() {
                // The cut hit this operation: it is unacknowledged, and the round ends.
                tally.during_an_operation += 1;
                break;
            }
            let acknowledged = match mode {
                Mode::Sync => true,
                Mode::Periodic => matches!(op, Op::Sync),
            };
            if acknowledged {
                model.acknowledge_all();
            }
        }
        if !plan.fired() {
            tally.between_operations += 1;
        }
        // Half the rounds that reach their end close the store: the cut, still armed, may fall
        // in the close's syncs and table writes.
        let store = if !plan.fired() && rng.one_in(2) {
            tally.closes += 1;
            store.close().unwrap_or_else(|e| fail(seed, format!("close: {e}")));
            if plan.fired() {
                tally.during_close += 1;
            }
            None
        } else {
            Some(store)
        };
        if trace {
            println!("round {round}: power cut ({:?}, during an operation: {})", plan.cut, plan.fired());
        }
        disk = plan.take_image();
        configure(&disk, ext4);
        tally.cut(&plan);
        drop(store);
    }
    // The last image opens and holds what the model allows.
    let plan = CutPlan::new(disk, Cut::SyncedOnly, 0);
    let store = Store::open(DIR, options(mode, &clock, &plan))
        .unwrap_or_else(|e| fail(seed, format!("final open after a power cut: {e}")));
    model.contract.reopen();
    check_recovered(&store, &mut model, seed, tally);
}

fn cuts_wanted() -> u64 {
    std::env::var("IDEMSTORE_POWER_CUTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000)
}

/// Runs cases until `IDEMSTORE_POWER_CUTS` cuts were taken (or the one case of
/// `IDEMSTORE_POWER_CUT_SEED`), then checks the cuts hit every kind of instant.
fn run_many(mode: Mode, base_seed: u64) {
    let mut tally = Tally::default();
    if let Some(seed) = std::env::var("IDEMSTORE_POWER_CUT_SEED").ok().and_then(|v| v.parse().ok()) {
        run_case(mode, seed, 4, &mut tally);
        println!("{mode:?}: {tally:?}");
        return;
    }
    let wanted = cuts_wanted();
    let mut case = 0u64;
    while tally.cuts < wanted {
        let seed = Rng(base_seed ^ case).next();
        run_case(mode, seed, 4, &mut tally);
        case += 1;
    }
    println!("{mode:?}: {case} cases, {tally:?}");
    assert!(tally.cuts >= wanted);
    if wanted >= 200 {
        assert!(tally.during_an_operation > 0 && tally.between_operations > 0, "{tally:?}");
        assert!(tally.during_recovery > 0, "{tally:?}");
        assert!(tally.synced_only > 0 && tally.torn > 0 && tally.all_written > 0, "{tally:?}");
        assert!(tally.unacknowledged_kept > 0 && tally.unacknowledged_lost > 0, "{tally:?}");
        assert!(tally.tables_loaded > 0, "no cut left a sealed table to reopen: {tally:?}");
        assert!(tally.during_close > 0, "no cut fell in a close: {tally:?}");
    }
}

#[test]
fn sync_power_cuts_lose_no_acknowledged_operation_and_show_no_half_written_one() {
    run_many(Mode::Sync, 0x5EED_0001);
}

#[test]
fn periodic_power_cuts_lose_nothing_older_than_the_last_completed_sync() {
    run_many(Mode::Periodic, 0x5EED_0002);
}

/// Regression: a segment whose reserved space ends fewer than a record header's length (96
/// bytes) after its last record, all zeros, must reopen cleanly: it is not a torn tail.
#[test]
fn reopen_succeeds_when_fewer_than_a_header_of_zeros_follow_the_last_record() {
    let disk = SimDisk::new();
    let options = Options {
        durability: Durability::Sync,
        clock: ManualClock::new(START_MS),
        io: Arc::new(disk.clone()),
        background: false,
        // Segment header (64) + one claim of a 1-byte key (96 + 1, padded to 104) + 8 spare
        // bytes, and no room to grow (growth ahead of need would otherwise add a step).
        segment_bytes_initial: 64 + 104 + 8,
        segment_bytes_max: 64 + 104 + 8,
        max_key_len: 1,
        max_outcome_len: 0,
        ..Options::default()
    };
    let store = Store::open(DIR, options.clone()).expect("open");
    assert!(matches!(store.claim("k", "request").expect("claim"), Claim::Acquired(_)));
    store.close().expect("close");
    let segments: Vec<_> =
        disk.file_paths().into_iter().filter(|p| p.extension().is_some_and(|e| e == "seg")).collect();
    assert!(!segments.is_empty());
    for path in segments {
        let len = disk.read_file(&path).expect("segment bytes").len();
        assert_eq!(len, 64 + 104 + 8, "{path:?}: the tail after the record is not 8 bytes");
    }
    let store = Store::open(DIR, options).expect("reopen after a clean close");
    assert!(matches!(store.get("k").expect("get"), Some(Entry::InFlight { .. })));
}

/// A table is written, synced front to back in slices, while sealing. On ext4 the first sync
/// of a new file also makes its name durable, so a power cut between two slices can leave a
/// file with a valid header and filter over entries that were never written. Every image a
/// cut between two slices leaves must open and answer every acknowledged key as it was: such
/// a table is never trusted, its segment is scanned instead.
#[test]
fn a_table_cut_between_its_sync_slices_is_never_trusted() {
    const SEALED_KEYS: usize = 1000;
    let disk = SimDisk::new();
    disk.names_durable_on_first_sync(true);
    disk.set_sync_slice_bytes(4096);
    let clock = ManualClock::new(START_MS);
    let options = |disk: &SimDisk| Options {
        durability: Durability::Sync,
        clock: clock.clone(),
        io: Arc::new(disk.clone()),
        background: false,
        bucket_width: Duration::from_secs(60),
        seal_idle_after: Duration::from_secs(5),
        segment_bytes_initial: 4096,
        ..Options::default()
    };
    let store = Store::open(DIR, options(&disk)).expect("open");
    let outcome = |i: usize| format!("outcome-{i}").into_bytes();
    for i in 0..SEALED_KEYS {
        let Claim::Acquired(token) = store.claim(key_name(i as u64), b"request").expect("claim") else {
            panic!("fresh key {i}")
        };
        store.complete(&token, outcome(i)).expect("complete");
    }
    let images = Arc::new(Mutex::new(Vec::new()));
    let (cut_from, taken) = (disk.clone(), images.clone());
    disk.between_sync_slices(Some(Arc::new(move || {
        taken.lock().expect("images").push(cut_from.power_cut(None));
    })));
    clock.advance(Duration::from_secs(10));
    store.maintain().expect("maintain");
    disk.between_sync_slices(None);
    assert_eq!(store.stats().sealed_tables, 1, "the keys were sealed");
    drop(store);

    let images = std::mem::take(&mut *images.lock().expect("images"));
    let is_table = |p: &Path| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains(".tbl"));
    let with_partial_table = images.iter().filter(|image| image.file_paths().iter().any(|p| is_table(p))).count();
    assert!(with_partial_table > 0, "no cut fell inside the table's sync ({} cuts)", images.len());
    for (n, image) in images.into_iter().enumerate() {
        let store = Store::open(DIR, options(&image)).unwrap_or_else(|e| panic!("image {n}: open: {e}"));
        for i in 0..SEALED_KEYS {
            match store.claim(key_name(i as u64), b"request") {
                Ok(Claim::Completed(done)) if done.outcome == outcome(i) => {}
                other => panic!("image {n}, key {i}: acknowledged as completed, reads {other:?}"),
            }
        }
        assert_eq!(store.stats().recovery.tables_loaded, 0, "image {n}: a table cut in its sync was trusted");
        assert!(
            image.file_paths().iter().all(|p| !is_table(p)),
            "image {n}: what the cut left of the table is removed at open: {:?}",
            image.file_paths()
        );
    }
}
