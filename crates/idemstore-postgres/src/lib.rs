//! idemstore's dedupe contract on PostgreSQL, for a fleet of replicas sharing one window.
//!
//! [`PgStore`] has the blocking methods of [`idemstore::Store`] and implements
//! [`idemstore::DedupeStore`], with the same types ([`Claim`], [`ClaimToken`], [`Entry`],
//! [`Error`]), so a service switches backend by construction:
//!
//! ```no_run
//! use idemstore::Claim;
//! use idemstore_postgres::{PgOptions, PgStore};
//!
//! let store = PgStore::connect("host=/run/postgresql dbname=app", PgOptions::default())?;
//! match store.claim("order-1", b"POST /orders 1")? {
//!     Claim::Acquired(token) => store.complete(&token, b"201 Created")?,
//!     Claim::Completed(done) => println!("replay {:?}", done.outcome),
//!     Claim::InProgress { .. } => println!("409: in progress"),
//!     Claim::Mismatch => println!("422: key reused with another request"),
//!     _ => {}
//! }
//! # Ok::<(), idemstore::Error>(())
//! ```
//!
//! # Schema
//!
//! One table (`PgOptions::table`, default `idemstore`) keyed by the key (`bytea`), holding
//! the request's xxh3-128 hash ([`idemstore::request_hash`], the same in every backend), the
//! state (in flight or completed), the fencing number, the holder's incarnation, the times
//! (claimed, lease end, expiry, completion, in ms since the epoch of the database's clock) and
//! the value (the last checkpoint while in flight, the outcome once completed); an index on
//! the expiry time; a sequence `<table>_fence` for fencing numbers; the claim functions
//! `<table>_claim` and `<table>_claim_batch` and their result type `<table>_claim_result`;
//! `<table>_identity` (a random id that every token of the table carries) and
//! `<table>_migrations` (one row per applied schema version). [`schema_sql`] returns the
//! script; by default ([`PgOptions::manage_schema`]) the store applies missing migrations
//! itself at connect, serialized between replicas by an advisory lock, so a table made by an
//! older version is upgraded in place. With
//! `manage_schema = false` it only checks the version and refuses to run on a schema it does
//! not know; the operator upgrades by running the script again (it is idempotent).
//!
//! # One round trip per claim
//!
//! A claim is one call of a PL/pgSQL function, `SELECT <table>_claim(..)`, created by the
//! schema (version 2). It first tries the cheapest claim PostgreSQL has, `INSERT .. ON CONFLICT
//! (key) DO NOTHING RETURNING ..`: a key with no row is acquired there. When that inserts
//! nothing, the same call reads the key's row and, only when a takeover is due, runs `INSERT ..
//! ON CONFLICT (key) DO UPDATE .. WHERE <takeover rules> RETURNING ..`, whose `WHERE` decides
//! again on the row's latest version under its row lock. The takeover rules: the row expired;
//! or it is in flight for the same request hash and its lease ended (database time) or its
//! holder is an orphan. A completed row, an in-flight row of a live holder, and any row of
//! another request hash are left alone and answered as `Completed`, `InProgress` and
//! `Mismatch`. The fencing number is the sequence's next value; `complete`, `checkpoint` and
//! `release` write only `WHERE fence = <token's>`, so a holder whose key was taken over,
//! removed or expired gets `StaleToken`.
//!
//! Each statement of the function sees a snapshot of its own (the store's sessions run READ
//! COMMITTED, whatever the server's default): a conflict in the first insert means a committed
//! row (an uncommitted one is waited for), which the read then shows; claims
//! racing for a takeover are decided by the row lock, and the one that loses reads the
//! winner's row. Replays, `InProgress` and `Mismatch` answers write no tuple and take no row
//! lock; they do draw a fencing number in the first insert (the sequence writes its WAL once
//! every 32 numbers), and commit without waiting for a WAL flush, having nothing to keep (a
//! fencing number that a claim holds is made durable by that claim's own commit). A fresh key
//! costs the bare insert plus the function call: the README gives the measured figures against
//! a plain `INSERT .. ON CONFLICT DO NOTHING`.
//!
//! # Claims ride together under load
//!
//! A store sends at most [`PgOptions::claim_batches`] claim statements at once (default 4).
//! Claims made while that many are out wait, and the first statement to come back sends them
//! all (up to 64) in one call of `<table>_claim_batch` (schema version 3): one statement, one
//! transaction, one commit. The function decides each key in turn exactly as `<table>_claim`
//! decides it alone; a key twice in one call is answered the second time from the first's row
//! (`InProgress`). The keys are sorted first, so two calls that share keys lock them in the
//! same order and never deadlock. A call waits at most 100 ms for a row lock (`lock_timeout`):
//! past that, or when the server refuses it otherwise, it is rolled back and its claims go
//! again one by one, each in a task of its own, so a busy key holds up no other claim for long;
//! and a claim that has waited 100 ms for a slot sends one beyond `claim_batches`. The call
//! commits without waiting for a flush only when none of its claims wrote anything; one
//! acquisition in it, and every answer of the call waits for that commit's flush. Each claim is still one round trip, in which it waits behind at most
//! the statement before it; a lone claim goes at once, through `<table>_claim`, which costs
//! the server less than a call of one. Under load the server's fixed cost of a statement (the
//! protocol, the executor, the commit and its WAL flush) is paid once for several claims:
//! that is what brings 16 concurrent claims under the cost of 16 plain inserts (see the
//! README). [`PgStats::claim_statements_total`] counts the statements.
//!
//! # Durability
//!
//! | `Durability` | PostgreSQL |
//! | --- | --- |
//! | `Sync` | `synchronous_commit = on` for the store's sessions: an answer is given once its commit's WAL is flushed (and replicated, if the server is set up for synchronous replication) |
//! | `Periodic(_)` | `synchronous_commit = off` for the store's sessions: the server flushes the WAL in the background (`wal_writer_delay`, 200 ms by default; the interval given is not the server's); a server crash may lose the last moments of acknowledged writes, never corrupt the table |
//! | `None` | an `UNLOGGED` table: no WAL at all; a server crash empties the table |
//!
//! # Clocks
//!
//! Every time is the database server's (`statement_timestamp()`), never a replica's: replicas
//! whose clocks disagree still agree on who holds a lease and what has expired. Times handed
//! back (`lease_expires_at`, `expires_at`, ...) are the server's. With the `test-seams` feature,
//! `PgStore::advance_clock` adds an offset to the server's time in the store's SQL, so lease
//! and TTL tests need no sleeping.
//!
//! # Orphans
//!
//! Each `PgStore` is an incarnation: a random 64-bit number that its claims record, and a
//! session-level advisory lock on that number held on a connection of its own for as long as
//! the store lives. When the process dies, its connection closes and the server lets the lock
//! go. A claim that finds an in-flight row tries the row's incarnation lock
//! (`pg_try_advisory_xact_lock`, a transaction lock let go when the claim commits): when it
//! succeeds nobody holds the incarnation, so the holder is dead for certain and the claim takes
//! the key over at once, with the last checkpoint (unless [`PgOptions::orphans`] is
//! `WaitForLease`). An imported claim (incarnation 0) belongs to no process.
//!
//! A replica whose lock connection breaks (a network cut, `pg_terminate_backend`) counts as
//! dead to the others until it reconnects and takes its lock again (it does so at once, in the
//! background): its claims may be taken over meanwhile, and its holders then get `StaleToken`
//! on `complete`. Use `OrphanPolicy::WaitForLease` where an effect must never start twice even
//! then. The advisory lock keys are the incarnations, random 64-bit numbers in the database's
//! advisory-lock space shared with other applications.
//!
//! # Waiting across replicas
//!
//! A claim with `ClaimOptions::wait` marks the holder's row as watched and listens on the
//! channel `<table>_changed`; the holder's `complete`, `release` (and any `remove`) sends a
//! `NOTIFY` only when its row is watched, so the common path pays nothing for it. The wait is
//! bounded by itself and by the holder's lease and the key's expiry: the waiter looks again at
//! the first of them.
//!
//! # Expiry
//!
//! Expired rows are invisible at once (every statement compares with the database's time) and
//! are deleted by a batched reaper (`DELETE .. WHERE ctid = ANY (ARRAY(SELECT ctid .. WHERE
//! expires_at_ms <= now LIMIT n FOR UPDATE SKIP LOCKED))`, repeated until a batch comes back
//! short), run in the background every [`PgOptions::reap_interval`] and by
//! [`PgStore::reap_expired`]. Partitions by expiry time dropped whole would be cheaper still,
//! but PostgreSQL enforces a unique key on a partitioned table only when the partition key is
//! part of it: the window's one-row-per-key guarantee, which the claim's `ON CONFLICT` rests
//! on, would be lost.
//!
//! # Local replay cache
//!
//! With [`PgOptions::replay_cache`], each replica keeps completed outcomes it has seen (with
//! the request hash, so a different request is still answered `Mismatch`) and answers replays
//! from memory until shortly before they expire. Outcomes never change before they expire, so
//! the only thing a replica can miss is a `remove` made on another replica: the removed
//! key keeps replaying from the other replicas' caches until its expiry. That is why the cache
//! is off by default: turn it on where `remove` is an operator's tool rather than part of the
//! protocol. A `remove` through the same replica drops the entry at once.
//!
//! # Runtimes
//!
//! The store's connections are a `deadpool-postgres` pool of `tokio-postgres` connections,
//! driven by one of two runtimes:
//!
//! - [`PgStore::connect`]: a private tokio runtime (2 worker threads). The async methods
//!   (through [`DedupeStore`]) run the operation on that runtime and await it, so they work
//!   under any executor. The blocking methods may be called from anywhere, also from inside a
//!   tokio runtime (they never panic there): there they hand the operation to the private
//!   runtime and block the calling thread until it answers, which stalls that worker thread
//!   meanwhile, so inside async code prefer the trait's methods.
//! - [`PgStore::connect_async`], from inside a tokio runtime: that runtime. An async service's
//!   tasks and the connections they use then share its threads, with no hand-over between two
//!   runtimes at each statement: about a third less client CPU per claim and most of its
//!   context switches gone, measured with 16 tasks on 2 cores (README). The runtime needs I/O
//!   and timers enabled, and must outlive the store's use; once it is gone every call is an
//!   error. On a multi-thread runtime the blocking methods work from every thread (from its
//!   workers through `block_in_place`). A current-thread runtime runs only while its thread
//!   drives it, which no other thread can know: there the blocking methods are refused with
//!   `InvalidArgument`; use the trait's methods and [`PgStore::close_async`].
//!
//! Either way, dropping a `claim` future releases a claim it had made: the claim runs to its
//! end in a task of its own, which releases it when nobody is left to take the token.
//!
//! # Errors
//!
//! A database failure (connection refused or lost, a statement that failed) is
//! `Error::Io` with a context naming the operation, the path `postgres`, and the server's
//! message as source. A lost connection is dropped from the pool, so the next call connects
//! anew.

#![deny(missing_docs)]

mod cache;
mod schema;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::StreamExt;
use idemstore::{
    Claim, ClaimOptions, ClaimToken, Completed, DedupeStore, Durability, Entry, Error, ExportedEntry, Orphan,
    OrphanPolicy, Result, TTL_MAX, ms_to_system_time, request_hash, system_time_to_ms,
};
use tokio::sync::Notify;
use tokio_postgres::NoTls;
use tokio_postgres::types::{FromSql, Kind, Type};

pub use cache::ReplayCacheLimits;
#[cfg(feature = "test-seams")]
pub use schema::schema_sql_at;
pub use schema::{SCHEMA_VERSION, schema_sql};

/// Options of a [`PgStore`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// The table (default `idemstore`); its sequence and bookkeeping tables are named after it.
    /// 1-40 characters of `a-z`, `0-9` and `_`. Replicas sharing a window use the same table.
    pub table: String,
    /// TTL of a claim without `ClaimOptions::ttl` (default 24 h).
    pub default_ttl: Duration,
    /// Lease of a claim without `ClaimOptions::lease` (default 30 s).
    pub default_lease: Duration,
    /// How acknowledged writes survive a server crash (see the crate docs; default `Sync`).
    /// `None` needs an `UNLOGGED` table: the store creates it so, and with `manage_schema`
    /// switches an existing table over (`ALTER TABLE .. SET UNLOGGED/LOGGED` rewrites it).
    pub durability: Durability,
    /// What a claim does with an in-flight key whose holder is dead for certain (default
    /// `TakeOver`: at once; `WaitForLease`: only after its lease).
    pub orphans: OrphanPolicy,
    /// Longest key accepted (default 1024 bytes).
    pub max_key_len: usize,
    /// Longest outcome or checkpoint accepted (default 1 MiB).
    pub max_outcome_len: usize,
    /// Most connections in the pool (default 16), besides the store's own lock connection.
    pub pool_size: usize,
    /// Most claim statements in flight at once (default 4, at most `pool_size` are used).
    /// Claims made while that many are out wait and go together in the next statement, one
    /// transaction and one commit for all of them (each decided as alone): under load the
    /// server's cost per claim falls, and a lone claim is sent at once.
    pub claim_batches: usize,
    /// Create and upgrade the schema at connect (default true). False leaves it to the
    /// operator ([`schema_sql`]): connect then only checks the schema version.
    pub manage_schema: bool,
    /// How often the background reaper deletes expired rows (default 10 s); `None` runs no
    /// reaper (call [`PgStore::reap_expired`], or let another replica reap).
    pub reap_interval: Option<Duration>,
    /// Rows deleted per reaper statement (default 1000): short transactions, short locks.
    pub reap_batch: i64,
    /// The local replay cache (default off; see the crate docs for its trade-off).
    pub replay_cache: Option<ReplayCacheLimits>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            table: "idemstore".to_owned(),
            default_ttl: Duration::from_secs(24 * 3600),
            default_lease: Duration::from_secs(30),
            durability: Durability::Sync,
            orphans: OrphanPolicy::TakeOver,
            max_key_len: 1024,
            max_outcome_len: 1 << 20,
            pool_size: 16,
            claim_batches: 4,
            manage_schema: true,
            reap_interval: Some(Duration::from_secs(10)),
            reap_batch: 1000,
            replay_cache: None,
        }
    }
}

/// Counters of one [`PgStore`] since it connected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgStats {
    /// Claims that acquired the key (including takeovers).
    pub claims_acquired_total: u64,
    /// Of those, takeovers of a holder whose lease ended.
    pub lease_takeovers_total: u64,
    /// Of those, takeovers of a holder that was dead for certain (its incarnation lock free)
    /// while its lease still ran.
    pub orphan_takeovers_total: u64,
    /// Duplicate claims answered `InProgress`.
    pub duplicates_in_progress_total: u64,
    /// Duplicate claims answered with the stored outcome (from the database or the cache).
    pub duplicates_replayed_total: u64,
    /// Claims answered `Mismatch`.
    pub mismatches_total: u64,
    /// Completes, checkpoints and releases refused with `StaleToken`.
    pub stale_tokens_total: u64,
    /// Claims answered by the local replay cache.
    pub cache_hits_total: u64,
    /// Claims that looked in the local replay cache and went to the database.
    pub cache_misses_total: u64,
    /// Entries in the local replay cache now.
    pub cache_entries: u64,
    /// Expired rows this store's reaper deleted.
    pub reaped_rows_total: u64,
    /// Times the lock connection was (re)established (1 after connect).
    pub lock_sessions_total: u64,
    /// Statements that carried claims to the database: fewer than the claims that went there
    /// when claims rode together (`PgOptions::claim_batches`).
    pub claim_statements_total: u64,
}

#[derive(Default)]
struct Counters {
    acquired: AtomicU64,
    lease_takeovers: AtomicU64,
    orphan_takeovers: AtomicU64,
    in_progress: AtomicU64,
    replayed: AtomicU64,
    mismatches: AtomicU64,
    stale: AtomicU64,
    reaped: AtomicU64,
    lock_sessions: AtomicU64,
    claim_statements: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A database failure as the crate's error (see the crate docs, "Errors"), with the whole
/// chain of causes in its message (tokio-postgres says only "db error" at the top).
fn db_error(context: &'static str, error: impl std::fmt::Display) -> Error {
    Error::Io { context, path: PathBuf::from("postgres"), source: Arc::new(std::io::Error::other(error.to_string())) }
}

fn pg_error(context: &'static str, error: &tokio_postgres::Error) -> Error {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    db_error(context, message)
}

/// True when `error` means the connection is unusable (closed, ended by the server, or a
/// fatal error): it must not go back to the pool.
fn breaks_connection(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    if let Some(db) = error.as_db_error() {
        let code = db.code().code();
        return matches!(db.severity(), "FATAL" | "PANIC") || code.starts_with("57P") || code.starts_with("08");
    }
    std::error::Error::source(error).is_some_and(|cause| cause.is::<std::io::Error>())
}

/// A pooled connection that leaves the pool for good when a statement on it found it broken,
/// so the next call connects anew instead of meeting the same dead socket.
struct Conn {
    object: Option<deadpool_postgres::Object>,
    broken: AtomicBool,
}

impl Conn {
    /// The crate's error for a failed statement on this connection.
    fn err(&self, context: &'static str, error: tokio_postgres::Error) -> Error {
        if breaks_connection(&error) {
            self.broken.store(true, Ordering::Relaxed);
        }
        pg_error(context, &error)
    }
}

impl std::ops::Deref for Conn {
    type Target = deadpool_postgres::ClientWrapper;
    fn deref(&self) -> &Self::Target {
        self.object.as_ref().expect("a Conn holds its object until dropped")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.broken.load(Ordering::Relaxed)
            && let Some(object) = self.object.take()
        {
            drop(deadpool_postgres::Object::take(object));
        }
    }
}

fn ms_to_time(ms: i64) -> SystemTime {
    ms_to_system_time(u64::try_from(ms).unwrap_or(0))
}

fn time_to_ms(time: SystemTime) -> i64 {
    i64::try_from(system_time_to_ms(time)).unwrap_or(i64::MAX)
}

/// The longest lease in ms: the embedded store's bound (its records hold a lease in 32 bits of
/// ms), so both backends accept the same leases. A longer one would also pass what the
/// database's `bigint` holds when added to the time (`Duration::MAX`), an error there.
const LEASE_MS_MAX: i64 = u32::MAX as i64;

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn hash_from_bytes(bytes: &[u8]) -> Result<u128> {
    let array: [u8; 16] =
        bytes.try_into().map_err(|_| db_error("reading a request hash", "stored request hash is not 16 bytes"))?;
    Ok(u128::from_be_bytes(array))
}

/// The NOTIFY payload of a key: its xxh3-64 in hex (payloads are text; keys are bytes).
fn key_payload(key: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(key))
}

/// How far a cached replay must live beyond this replica's estimate of the database's time to
/// be answered from the cache: covers the error of the estimate (about a round trip).
const CACHE_MARGIN_MS: i64 = 1_000;

/// Local waiters of keys, woken by notifications (by key hash) and by clock changes.
#[derive(Default)]
struct Waiters {
    by_key: Mutex<HashMap<u64, Arc<Notify>>>,
    everyone: Notify,
}

impl Waiters {
    fn notify_for(&self, key_hash: u64) -> Arc<Notify> {
        let mut map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key_hash).or_default().clone()
    }

    fn wake(&self, key_hash: u64) {
        let map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(notify) = map.get(&key_hash) {
            notify.notify_waiters();
        }
    }

    fn wake_all(&self) {
        self.everyone.notify_waiters();
    }

    /// Drops the entry of `key_hash` when no waiter holds it any more.
    fn forget(&self, key_hash: u64) {
        let mut map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&key_hash).is_some_and(|n| Arc::strong_count(n) == 1) {
            map.remove(&key_hash);
        }
    }
}

struct Inner {
    pool: Pool,
    pg_config: tokio_postgres::Config,
    sql: schema::Sql,
    options: PgOptions,
    identity: u64,
    incarnation: i64,
    /// The test clock offset (ms) added to the database's time.
    offset_ms: AtomicI64,
    /// The database's time (with the offset) minus this machine's, as last seen: the replay
    /// cache's estimate of the database's time.
    skew_ms: AtomicI64,
    cache: Option<cache::ReplayCache>,
    waiters: Waiters,
    counters: Counters,
    /// The backend pid of the lock connection (0 while it is down).
    lock_pid: AtomicI32,
    /// The lock session's task: `close` waits for it to end, so the incarnation's lock is let
    /// go (or its session gone) before `close` returns, even when the lock connection was
    /// being re-established at that moment.
    lock_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    shutdown: Notify,
    closing: AtomicBool,
    batcher: std::sync::Mutex<Batcher>,
    /// Test seam: see `PgStore::send_lone_claims_as_batches`.
    lone_claims_as_batches: AtomicBool,
}

/// Claims waiting for a statement, and the claim statements out.
#[derive(Default)]
struct Batcher {
    waiting: Vec<WaitingClaim>,
    in_flight: usize,
}

/// A claim waiting to be sent: the claim function's arguments for its key, and where its
/// answer goes.
struct WaitingClaim {
    key: Vec<u8>,
    hash: u128,
    ttl_ms: i64,
    lease_ms: i64,
    answer: tokio::sync::oneshot::Sender<Result<ClaimRow>>,
}

/// Most claims in one statement.
const MAX_CLAIM_BATCH: usize = 64;

/// How long a claim waits for a statement slot before it sends one beyond `claim_batches`:
/// far longer than a claim statement takes (a few ms, with its flush), so that under load
/// claims still ride together.
const SLOTS_STUCK_AFTER: Duration = Duration::from_millis(100);

/// Why a claim statement gave no answers.
enum StatementFailure {
    /// The server refused it (see `refused_and_rolled_back`): nothing it wrote was kept.
    Refused(Error),
    /// Anything else: the connection, the pool, an answer that could not be read.
    Failed(Error),
}

impl From<Error> for StatementFailure {
    fn from(error: Error) -> Self {
        StatementFailure::Failed(error)
    }
}

/// True when the server refused the statement with an `ERROR` (not `FATAL`: the session goes
/// on): its implicit transaction was rolled back, so nothing it wrote was kept.
fn refused_and_rolled_back(error: &tokio_postgres::Error) -> bool {
    error.as_db_error().is_some_and(|db| db.parsed_severity() == Some(tokio_postgres::error::Severity::Error))
        && !breaks_connection(error)
}

/// A dedupe window in a PostgreSQL table, shared by every replica that connects to it.
///
/// `Send + Sync`: share it as `Arc<PgStore>`. Dropping it ends its incarnation: its lock
/// connection closes, and claims it still holds become orphans for the other replicas.
pub struct PgStore {
    inner: Arc<Inner>,
    /// `None` once the store is closed.
    driver: Option<Driver>,
}

/// The runtime that drives the store's connections and background tasks.
enum Driver {
    /// A runtime of the store's own ([`PgStore::connect`]).
    Own(tokio::runtime::Runtime),
    /// The runtime the store was connected from ([`PgStore::connect_async`]): the caller's
    /// tasks and the connections they use share its threads, with no hand-over between two
    /// runtimes at each statement.
    Caller(tokio::runtime::Handle),
}

impl Driver {
    fn handle(&self) -> &tokio::runtime::Handle {
        match self {
            Driver::Own(runtime) => runtime.handle(),
            Driver::Caller(handle) => handle,
        }
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("table", &self.inner.options.table)
            .field("incarnation", &self.inner.incarnation)
            .finish_non_exhaustive()
    }
}

fn random_i64() -> Result<i64> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| db_error("drawing a random incarnation", e))?;
    // Positive and never 0 (0 marks imported claims).
    Ok((i64::from_le_bytes(bytes) & i64::MAX).max(1))
}

impl PgStore {
    /// Connects to the database at `url` (a `postgres://` URL or a `key=value` string),
    /// creates or upgrades the schema (unless `manage_schema` is off), takes this
    /// incarnation's advisory lock, and starts listening for completions.
    ///
    /// Fails with `InvalidArgument` for a bad URL, table name or option, `UnsupportedVersion`
    /// for a schema of another version, and `Io` when the database cannot be reached.
    pub fn connect(url: &str, options: PgOptions) -> Result<PgStore> {
        let pg_config = session_config(url, &options)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("idemstore-pg")
            .enable_all()
            .build()
            .map_err(|e| db_error("starting the store's runtime", e))?;
        let inner = match run_on(runtime.handle(), true, Self::open_inner(pg_config, options)) {
            Ok(Ok(inner)) => inner,
            Ok(Err(e)) | Err(e) => {
                drop_runtime(runtime);
                return Err(e);
            }
        };
        Ok(PgStore { inner, driver: Some(Driver::Own(runtime)) })
    }

    /// Connects like [`connect`](Self::connect), from inside a tokio runtime, and drives the
    /// store's connections and background tasks on that runtime instead of a runtime of the
    /// store's own: the way for an async service, whose tasks then reach their connections
    /// without a hand-over between two runtimes at every statement (about a third less client
    /// CPU per claim; see the crate's README for the figures).
    ///
    /// The runtime must have I/O and timers enabled, and outlive the store's use: once it
    /// shuts down, every call fails with `Error::Io`. On a multi-thread runtime the blocking
    /// methods work from every thread (from one of its workers they block it with
    /// [`tokio::task::block_in_place`]). A current-thread runtime runs only while its thread
    /// drives it, which no other thread can know, so there the blocking methods are refused
    /// with `InvalidArgument`: use the [`DedupeStore`] methods and
    /// [`close_async`](Self::close_async).
    ///
    /// Fails with `InvalidArgument` outside a tokio runtime or on one without I/O or timers,
    /// and as `connect` does otherwise.
    pub async fn connect_async(url: &str, options: PgOptions) -> Result<PgStore> {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return Err(Error::InvalidArgument("connect_async must be called inside a tokio runtime"));
        };
        let pg_config = session_config(url, &options)?;
        // The store's tasks need the runtime's I/O and timers (`Builder::enable_all`), and tokio
        // panics where they are off: open in a task of its own, where such a panic is an error
        // here. The store's tasks are spawned from it, on the caller's runtime.
        let opened = handle.spawn(async move {
            tokio::time::sleep(Duration::ZERO).await;
            Self::open_inner(pg_config, options).await
        });
        match opened.await {
            Ok(inner) => Ok(PgStore { inner: inner?, driver: Some(Driver::Caller(handle)) }),
            Err(e) if e.is_panic() => Err(Error::InvalidArgument(
                "connect_async needs a tokio runtime with I/O and timers enabled (Builder::enable_all)",
            )),
            Err(e) => Err(db_error("connecting to postgres", e)),
        }
    }
}

/// Checks `options` and builds the connection settings every session of the store uses.
fn session_config(url: &str, options: &PgOptions) -> Result<tokio_postgres::Config> {
    schema::check_table_name(&options.table)?;
    if options.default_ttl.is_zero() || options.default_lease.is_zero() || options.default_ttl > TTL_MAX {
        return Err(Error::InvalidArgument("default_ttl and default_lease must be at least 1 ms, ttl at most TTL_MAX"));
    }
    if duration_ms(options.default_lease) > LEASE_MS_MAX {
        return Err(Error::InvalidArgument("default_lease must be under 49 days"));
    }
    if options.pool_size == 0 || options.claim_batches == 0 || options.reap_batch <= 0 {
        return Err(Error::InvalidArgument("pool_size, claim_batches and reap_batch must be at least 1"));
    }
    let mut pg_config: tokio_postgres::Config =
        url.parse().map_err(|_| Error::InvalidArgument("not a PostgreSQL connection URL or string"))?;
    let synchronous_commit = if options.durability == Durability::Sync { "on" } else { "off" };
    let mut session_options = pg_config.get_options().unwrap_or("").to_owned();
    // A generic plan for the store's few prepared statements: without it the server plans
    // the claim's statement anew at every execution (its custom plans look cheaper than
    // the generic one), which costs more than executing it. READ COMMITTED whatever the
    // server's default: each statement of the claim function must see what committed
    // before it (the row its first insert conflicted with).
    session_options.push_str(&format!(
        " -c synchronous_commit={synchronous_commit} -c plan_cache_mode=force_generic_plan \
             -c default_transaction_isolation=read\\ committed"
    ));
    pg_config.options(session_options.trim());
    if pg_config.get_application_name().is_none() {
        pg_config.application_name("idemstore");
    }
    Ok(pg_config)
}

impl PgStore {
    async fn open_inner(pg_config: tokio_postgres::Config, options: PgOptions) -> Result<Arc<Inner>> {
        let manager =
            Manager::from_config(pg_config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| db_error("building the connection pool", e))?;
        let table = options.table.clone();
        {
            let mut client = pool.get().await.map_err(|e| db_error("connecting to postgres", e))?;
            prepare_schema(&mut client, &table, &options).await?;
        }
        let identity = {
            let client = pool.get().await.map_err(|e| db_error("connecting to postgres", e))?;
            let row = client
                .query_one(&format!("SELECT store_id FROM {table}_identity"), &[])
                .await
                .map_err(|e| db_error("reading the store's identity", e))?;
            row.try_get::<_, i64>(0).map_err(|e| db_error("reading the store's identity", e))? as u64
        };
        let inner = Arc::new(Inner {
            pool,
            pg_config,
            sql: schema::Sql::new(&table),
            cache: options.replay_cache.map(cache::ReplayCache::new),
            options,
            identity,
            incarnation: random_i64()?,
            offset_ms: AtomicI64::new(0),
            skew_ms: AtomicI64::new(0),
            waiters: Waiters::default(),
            counters: Counters::default(),
            lock_pid: AtomicI32::new(0),
            lock_task: std::sync::Mutex::new(None),
            shutdown: Notify::new(),
            closing: AtomicBool::new(false),
            batcher: std::sync::Mutex::new(Batcher::default()),
            lone_claims_as_batches: AtomicBool::new(false),
        });
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let lock_task = tokio::spawn(lock_session(Arc::downgrade(&inner), ready_tx));
        if let Ok(mut slot) = inner.lock_task.lock() {
            *slot = Some(lock_task);
        }
        match ready_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(db_error("taking the incarnation lock", "the lock task ended")),
        }
        if let Some(interval) = inner.options.reap_interval {
            tokio::spawn(reaper(Arc::downgrade(&inner), interval));
        }
        Ok(inner)
    }

    /// Runs `op` on the store's runtime and blocks until it answers.
    fn block<T: Send + 'static>(&self, op: impl Future<Output = Result<T>> + Send + 'static) -> Result<T> {
        let Some(driver) = self.driver.as_ref() else {
            return Err(db_error("running a store operation", "the store is closed"));
        };
        block_on_driver(driver, op)
    }

    /// Claims `key` for the request `request` with the default TTL and lease. See
    /// [`PgStore::claim_with`].
    pub fn claim(&self, key: impl AsRef<[u8]>, request: impl AsRef<[u8]>) -> Result<Claim> {
        self.claim_with(key, request, ClaimOptions::default())
    }

    /// Claims `key`, with the contract of [`idemstore::Store::claim_with`]: exactly one
    /// concurrent claim (across every replica) is `Acquired`; a repeat is `InProgress` while
    /// the holder's lease runs, `Completed` with the stored outcome after completion, and
    /// `Mismatch` on every branch when the request differs. An in-flight claim whose lease ended
    /// or whose holder is dead for certain is taken over (`recovered()`, last checkpoint).
    pub fn claim_with(&self, key: impl AsRef<[u8]>, request: impl AsRef<[u8]>, options: ClaimOptions) -> Result<Claim> {
        let inner = self.inner.clone();
        let (key, request) = (key.as_ref().to_vec(), request.as_ref().to_vec());
        inner.check_claim(&key, &options)?;
        if let Some(answer) = inner.cached_claim(&key, &request)? {
            return Ok(answer);
        }
        self.block(async move { inner.claim(&key, &request, &options).await })
    }

    /// Completes the claim held by `token`, storing `outcome` for every later repeat. Fails with
    /// `StaleToken` when the token no longer holds the key, `ForeignToken` for a token of
    /// another store, `OutcomeTooLong` over `max_outcome_len`.
    pub fn complete(&self, token: &ClaimToken, outcome: impl AsRef<[u8]>) -> Result<()> {
        let (inner, token, outcome) = (self.inner.clone(), token.clone(), outcome.as_ref().to_vec());
        self.block(async move { inner.complete(&token, &outcome).await })
    }

    /// Records how far the holder got and renews the lease by the claim's lease length (the
    /// token's lease end moves on).
    pub fn checkpoint(&self, token: &ClaimToken, phase: impl AsRef<[u8]>) -> Result<()> {
        let (inner, owned, phase) = (self.inner.clone(), token.clone(), phase.as_ref().to_vec());
        let lease_until = self.block(async move { inner.checkpoint(&owned, &phase).await })?;
        token.set_lease_expires_at(lease_until);
        Ok(())
    }

    /// Gives the claim up: the key is free again.
    pub fn release(&self, token: &ClaimToken) -> Result<()> {
        let (inner, token) = (self.inner.clone(), token.clone());
        self.block(async move { inner.release(&token).await })
    }

    /// The state of `key`: `None` when absent, released, removed or expired.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Entry>> {
        let (inner, key) = (self.inner.clone(), key.as_ref().to_vec());
        self.block(async move { inner.get(&key).await })
    }

    /// Removes `key` (absent is fine); an in-flight holder's token becomes stale. Other
    /// replicas' replay caches may answer the key until its expiry (see the crate docs).
    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<()> {
        let (inner, key) = (self.inner.clone(), key.as_ref().to_vec());
        self.block(async move { inner.remove(&key).await })
    }

    /// In-flight claims whose holder is dead for certain (its incarnation lock is free), sorted
    /// by key; expired ones are left out.
    pub fn orphans(&self) -> Result<Vec<Orphan>> {
        let inner = self.inner.clone();
        self.block(async move { inner.orphans().await })
    }

    /// This store's counters.
    pub fn stats(&self) -> PgStats {
        let c = &self.inner.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (hits, misses, entries) = match &self.inner.cache {
            Some(cache) => (load(&cache.hits), load(&cache.misses), cache.len() as u64),
            None => (0, 0, 0),
        };
        PgStats {
            claims_acquired_total: load(&c.acquired),
            lease_takeovers_total: load(&c.lease_takeovers),
            orphan_takeovers_total: load(&c.orphan_takeovers),
            duplicates_in_progress_total: load(&c.in_progress),
            duplicates_replayed_total: load(&c.replayed),
            mismatches_total: load(&c.mismatches),
            stale_tokens_total: load(&c.stale),
            cache_hits_total: hits,
            cache_misses_total: misses,
            cache_entries: entries,
            reaped_rows_total: load(&c.reaped),
            lock_sessions_total: load(&c.lock_sessions),
            claim_statements_total: load(&c.claim_statements),
        }
    }

    /// Deletes expired rows now, in batches of `reap_batch`; returns how many.
    pub fn reap_expired(&self) -> Result<u64> {
        let inner = self.inner.clone();
        self.block(async move { inner.reap().await })
    }

    /// Every live key with its state and request hash, sorted by key: what another store's
    /// import (`Store::import_entry`, [`PgStore::import_entry`]) takes to carry the window over.
    pub fn export_entries(&self) -> Result<Vec<ExportedEntry>> {
        let inner = self.inner.clone();
        self.block(async move { inner.export_entries().await })
    }

    /// Writes one exported entry into the table. `Ok(false)`, writing nothing, when the key
    /// already has a live entry here or the entry has expired. An imported in-flight claim
    /// keeps its request hash, times and checkpoint and belongs to no process: the next claim
    /// of its key takes it over at once with the checkpoint (as `orphans` says).
    pub fn import_entry(&self, exported: &ExportedEntry) -> Result<bool> {
        let (inner, exported) = (self.inner.clone(), exported.clone());
        self.block(async move { inner.import_entry(&exported).await })
    }

    /// The identity that this table's tokens carry (a random number drawn when the schema was
    /// created): replicas of one table accept each other's tokens, other stores refuse them.
    pub fn identity(&self) -> u64 {
        self.inner.identity
    }

    /// This store's incarnation: the number its claims record and its advisory lock key.
    pub fn incarnation(&self) -> i64 {
        self.inner.incarnation
    }

    /// The server process id of the lock connection (0 while it is being re-established): a
    /// test can end it with `pg_terminate_backend` to make this store look dead to the others.
    pub fn lock_backend_pid(&self) -> i32 {
        self.inner.lock_pid.load(Ordering::Relaxed)
    }

    /// Test seam: a claim alone in its statement goes through the batch function too (a batch
    /// of one), so that single-threaded tests check that function's every branch.
    #[cfg(feature = "test-seams")]
    pub fn send_lone_claims_as_batches(&self) {
        self.inner.lone_claims_as_batches.store(true, Ordering::Relaxed);
    }

    /// Test seam: moves the store's clock on by `by` (an offset added to the database's time in
    /// every statement of this store). Waiters look again at once.
    #[cfg(feature = "test-seams")]
    pub fn advance_clock(&self, by: Duration) {
        let by = duration_ms(by);
        self.inner.offset_ms.fetch_add(by, Ordering::Relaxed);
        self.inner.skew_ms.fetch_add(by, Ordering::Relaxed);
        self.inner.waiters.wake_all();
    }

    /// Test seam: how far `PgStore::advance_clock` has moved this store's clock in all.
    #[cfg(feature = "test-seams")]
    pub fn clock_offset(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.inner.offset()).unwrap_or(0))
    }

    /// Ends this incarnation cleanly: lets its advisory lock go at once (so its in-flight claims
    /// are orphans to the other replicas from this moment) and closes its connections.
    ///
    /// A blocking method: on a store of a current-thread runtime ([`connect_async`](Self::connect_async))
    /// it is refused with `InvalidArgument` like the others, and the store is closed anyway, its
    /// lock let go when that runtime next runs; there use [`close_async`](Self::close_async).
    pub fn close(mut self) -> Result<()> {
        let Some(driver) = self.driver.take() else { return Ok(()) };
        let result = block_on_driver(&driver, self.begin_shut_down());
        self.end(driver);
        result
    }

    /// [`close`](Self::close) for async code: awaits the lock's release instead of blocking.
    pub async fn close_async(mut self) -> Result<()> {
        let Some(driver) = self.driver.take() else { return Ok(()) };
        let result = match driver.handle().spawn(self.begin_shut_down()).await {
            Ok(result) => result,
            Err(e) => Err(db_error("letting the incarnation lock go", e)),
        };
        self.end(driver);
        result
    }

    /// Tells the store's tasks to end, and returns the wait for the lock task to let the lock
    /// go and end (it ends too if it was between two sessions, before taking the lock again).
    fn begin_shut_down(&self) -> impl Future<Output = Result<()>> + Send + 'static {
        self.inner.closing.store(true, Ordering::Relaxed);
        self.inner.shutdown.notify_waiters();
        let inner = self.inner.clone();
        let lock_task = inner.lock_task.lock().ok().and_then(|mut slot| slot.take());
        async move {
            let Some(mut lock_task) = lock_task else { return Ok(()) };
            for _ in 0..400 {
                inner.shutdown.notify_waiters();
                if tokio::time::timeout(Duration::from_millis(5), &mut lock_task).await.is_ok() {
                    return Ok(());
                }
            }
            Err(db_error("letting the incarnation lock go", "the lock connection did not close in time"))
        }
    }

    /// Closes the pool and stops the store's own runtime. The caller's runtime goes on; the
    /// store's tasks there end on their own (the lock session on `shutdown`, the reaper at its
    /// next tick, connections with their clients).
    fn end(&self, driver: Driver) {
        self.inner.closing.store(true, Ordering::Relaxed);
        self.inner.shutdown.notify_waiters();
        self.inner.pool.close();
        if let Driver::Own(runtime) = driver {
            drop_runtime(runtime);
        }
    }
}

/// Stops the store's runtime. Dropping a runtime blocks for its tasks, which tokio refuses (with
/// a panic) inside another runtime: there it is let go in the background.
fn drop_runtime(runtime: tokio::runtime::Runtime) {
    if tokio::runtime::Handle::try_current().is_ok() {
        runtime.shutdown_background();
    } else {
        runtime.shutdown_timeout(Duration::from_secs(1));
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(driver) = self.driver.take() {
            self.end(driver);
        }
    }
}

/// Runs `op` on `driver`'s runtime and blocks the calling thread until it answers.
fn block_on_driver<T: Send + 'static>(
    driver: &Driver,
    op: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    let Driver::Caller(handle) = driver else { return run_on(driver.handle(), true, op)? };
    if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
        // A current-thread runtime runs only while its thread drives it, which no other thread
        // can know: a blocking call could wait for it forever, or be the thread it waits for.
        return Err(Error::InvalidArgument(
            "the blocking PgStore methods need a store made by connect, or by connect_async on a \
             multi-thread runtime: use the DedupeStore methods (and close_async)",
        ));
    }
    match tokio::runtime::Handle::try_current() {
        // A worker of the store's runtime hands its other tasks to a new worker while it waits,
        // so none of them (a connection, the operation itself) is stuck behind it.
        Ok(current) if current.id() == handle.id() => tokio::task::block_in_place(|| run_on(handle, false, op))?,
        // Another runtime's thread, or one outside any, waits while the store's runtime works.
        _ => run_on(handle, false, op)?,
    }
}

/// Runs `op` to its end on `runtime`, from a thread inside or outside another runtime.
/// `owned`: the store owns `runtime`, which therefore runs; outside any runtime, this thread
/// then drives `op` itself (`block_on`), with no hand-over. A runtime the store does not own
/// may have shut down, and `block_on` on one that has (whose timers and I/O are gone) could
/// panic or wait forever: `op` is spawned there instead, and a runtime that is gone drops it,
/// which is an error here.
fn run_on<T: Send + 'static>(
    runtime: &tokio::runtime::Handle,
    owned: bool,
    op: impl Future<Output = T> + Send + 'static,
) -> Result<T> {
    if owned && tokio::runtime::Handle::try_current().is_err() {
        return Ok(runtime.block_on(op));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    runtime.spawn(async move {
        let _ = tx.send(op.await);
    });
    rx.recv().map_err(|_| db_error("running a store operation", "the store's runtime stopped"))
}

async fn prepare_schema(client: &mut deadpool_postgres::Object, table: &str, options: &PgOptions) -> Result<()> {
    let ctx = "preparing the schema";
    if options.manage_schema {
        let tx = client.transaction().await.map_err(|e| db_error(ctx, e))?;
        // Replicas starting together migrate one at a time.
        tx.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&format!("idemstore migrate {table}")])
            .await
            .map_err(|e| db_error(ctx, e))?;
        tx.batch_execute(&schema::migrations_table(table)).await.map_err(|e| db_error(ctx, e))?;
        let version = current_version(&tx, table).await?;
        if version > SCHEMA_VERSION {
            return Err(Error::UnsupportedVersion {
                file: PathBuf::from(format!("postgres table {table}_migrations")),
                found: version as u32,
                supported: SCHEMA_VERSION as u32,
            });
        }
        for (i, migration) in schema::migrations(table, options.durability).iter().enumerate() {
            let to = i as i32 + 1;
            if to > version {
                tx.batch_execute(migration).await.map_err(|e| db_error("migrating the schema", e))?;
                tx.execute(&format!("INSERT INTO {table}_migrations (version) VALUES ($1)"), &[&to])
                    .await
                    .map_err(|e| db_error("migrating the schema", e))?;
            }
        }
        let unlogged = is_unlogged(&tx, table).await?;
        let want_unlogged = options.durability == Durability::None;
        if unlogged != want_unlogged {
            let mode = if want_unlogged { "UNLOGGED" } else { "LOGGED" };
            tx.batch_execute(&format!("ALTER TABLE {table} SET {mode}"))
                .await
                .map_err(|e| db_error("changing the table's durability", e))?;
        }
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
    } else {
        let tx = client.transaction().await.map_err(|e| db_error(ctx, e))?;
        let version = current_version(&tx, table).await?;
        if version != SCHEMA_VERSION {
            return Err(Error::UnsupportedVersion {
                file: PathBuf::from(format!("postgres table {table}_migrations")),
                found: version as u32,
                supported: SCHEMA_VERSION as u32,
            });
        }
        if is_unlogged(&tx, table).await? != (options.durability == Durability::None) {
            return Err(Error::InvalidArgument(
                "the table's logging does not match the durability: Durability::None needs an UNLOGGED table, \
                 Sync and Periodic a logged one (ALTER TABLE .. SET UNLOGGED / SET LOGGED)",
            ));
        }
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
    }
    Ok(())
}

async fn current_version(tx: &deadpool_postgres::Transaction<'_>, table: &str) -> Result<i32> {
    let exists: bool = tx
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&format!("{table}_migrations")])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| db_error("reading the schema version", e))?;
    if !exists {
        return Ok(0);
    }
    tx.query_one(&format!("SELECT coalesce(max(version), 0) FROM {table}_migrations"), &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| db_error("reading the schema version", e))
}

async fn is_unlogged(tx: &deadpool_postgres::Transaction<'_>, table: &str) -> Result<bool> {
    let persistence: Option<i8> = tx
        .query_one("SELECT (SELECT relpersistence FROM pg_class WHERE oid = to_regclass($1))", &[&table])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| db_error("reading the table's durability", e))?;
    Ok(persistence == Some(b'u' as i8))
}

/// Holds the incarnation's advisory lock on a connection of its own, listens for the table's
/// notifications on it, and re-establishes both when the connection is lost.
async fn lock_session(inner: Weak<Inner>, ready: tokio::sync::oneshot::Sender<Result<()>>) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(strong) = inner.upgrade() else { return };
        if strong.closing.load(Ordering::Relaxed) {
            return;
        }
        let config = strong.pg_config.clone();
        let incarnation = strong.incarnation;
        let channel = strong.sql.channel.clone();
        drop(strong);
        let connected = async {
            let (client, mut connection) =
                config.connect(NoTls).await.map_err(|e| db_error("opening the lock connection", e))?;
            // Drive the connection, handing notifications to the waiters.
            let notify_target = inner.clone();
            let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(async move {
                let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(message) = messages.next().await {
                    match message {
                        Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                            if let (Some(inner), Ok(hash)) =
                                (notify_target.upgrade(), u64::from_str_radix(n.payload(), 16))
                            {
                                inner.waiters.wake(hash);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                let _ = lost_tx.send(());
            });
            client
                .execute("SELECT pg_advisory_lock($1)", &[&incarnation])
                .await
                .map_err(|e| db_error("taking the incarnation lock", e))?;
            client.batch_execute(&format!("LISTEN {channel}")).await.map_err(|e| db_error("listening", e))?;
            let pid: i32 = client
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .and_then(|row| row.try_get(0))
                .map_err(|e| db_error("reading the lock connection's pid", e))?;
            Ok::<_, Error>((client, lost_rx, pid))
        }
        .await;
        let (client, lost_rx, pid) = match connected {
            Ok(parts) => parts,
            Err(e) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(e));
                    return;
                }
                // A shutdown meanwhile ends the wait (the loop then sees `closing`).
                let Some(strong) = inner.upgrade() else { return };
                {
                    let shutdown = strong.shutdown.notified();
                    if !strong.closing.load(Ordering::Relaxed) {
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shutdown => {}
                        }
                    }
                }
                drop(strong);
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let Some(strong) = inner.upgrade() else { return };
        strong.lock_pid.store(pid, Ordering::Relaxed);
        bump(&strong.counters.lock_sessions);
        // Notifications may have been missed while the connection was down.
        strong.waiters.wake_all();
        if let Some(ready) = ready.take() {
            let _ = ready.send(Ok(()));
        }
        // `strong` lives on while the session does: the store's shutdown (at `close` or drop)
        // ends the session, and with it this reference.
        let ended_by_shutdown = {
            let shutdown = strong.shutdown.notified();
            tokio::pin!(shutdown);
            shutdown.as_mut().enable();
            strong.closing.load(Ordering::Relaxed)
                || tokio::select! {
                    _ = shutdown => true,
                    _ = lost_rx => false,
                }
        };
        drop(strong);
        if ended_by_shutdown {
            let _ = client.execute("SELECT pg_advisory_unlock_all()", &[]).await;
            drop(client);
            if let Some(strong) = inner.upgrade() {
                strong.lock_pid.store(0, Ordering::Relaxed);
            }
            return;
        }
        if let Some(strong) = inner.upgrade() {
            strong.lock_pid.store(0, Ordering::Relaxed);
        }
    }
}

async fn reaper(inner: Weak<Inner>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let Some(strong) = inner.upgrade() else { return };
        if strong.closing.load(Ordering::Relaxed) {
            return;
        }
        // A failed pass is retried at the next interval; expired rows are invisible meanwhile.
        let _ = strong.reap().await;
    }
}

/// A claim's answer: the key's row as the claim left it, and the database's time.
struct ClaimRow {
    acquired: bool,
    fence: i64,
    recovered: bool,
    completed: bool,
    request_hash: u128,
    claimed_at_ms: i64,
    lease_until_ms: i64,
    expires_at_ms: i64,
    completed_at_ms: Option<i64>,
    value: Option<Vec<u8>>,
    /// The key was taken over from a dead holder before its lease ended.
    orphan_takeover: bool,
    now_ms: i64,
}

type DecodeError = Box<dyn std::error::Error + Sync + Send>;

/// The fields of a composite value in the binary format (`record_send`): their count, then for
/// each its type's oid, its length (-1 for NULL) and its bytes.
struct RecordFields<'a> {
    raw: &'a [u8],
    left: usize,
}

impl<'a> RecordFields<'a> {
    fn new(raw: &'a [u8], expected: usize) -> std::result::Result<RecordFields<'a>, DecodeError> {
        let mut fields = RecordFields { raw, left: 0 };
        let count = fields.int4()?;
        if usize::try_from(count).ok() != Some(expected) {
            return Err(format!("a claim result of {count} fields, not {expected}").into());
        }
        fields.left = expected;
        Ok(fields)
    }

    fn int4(&mut self) -> std::result::Result<i32, DecodeError> {
        let (head, rest) = self.raw.split_first_chunk::<4>().ok_or("a claim result cut short")?;
        self.raw = rest;
        Ok(i32::from_be_bytes(*head))
    }

    /// The next field, `None` when NULL, checked to be of type `ty`.
    fn next<T: FromSql<'a>>(&mut self, ty: &Type) -> std::result::Result<Option<T>, DecodeError> {
        self.left = self.left.checked_sub(1).ok_or("a claim result with too few fields")?;
        let oid = self.int4()? as u32;
        if oid != ty.oid() {
            return Err(format!("a claim result's field of type oid {oid}, not {}", ty.name()).into());
        }
        let Ok(len) = usize::try_from(self.int4()?) else { return Ok(None) };
        if len > self.raw.len() {
            return Err("a claim result cut short".into());
        }
        let (bytes, rest) = self.raw.split_at(len);
        self.raw = rest;
        T::from_sql(ty, bytes).map(Some)
    }

    /// The next field, which must not be NULL.
    fn required<T: FromSql<'a>>(&mut self, ty: &Type, name: &str) -> std::result::Result<T, DecodeError> {
        self.next(ty)?.ok_or_else(|| format!("a claim result without {name}").into())
    }
}

/// The `<table>_claim_result` value as the claim function returns it. A key acquired by the
/// function's first insert carries only `acquired`, `fence` and `now_ms`: its row holds what the
/// claim sent.
struct ClaimResult {
    acquired: bool,
    fence: i64,
    recovered: Option<bool>,
    completed: Option<bool>,
    request_hash: Option<u128>,
    claimed_at_ms: Option<i64>,
    lease_until_ms: Option<i64>,
    expires_at_ms: Option<i64>,
    completed_at_ms: Option<i64>,
    value: Option<Vec<u8>>,
    orphan_takeover: Option<bool>,
    now_ms: i64,
}

impl<'a> FromSql<'a> for ClaimResult {
    fn from_sql(_: &Type, raw: &'a [u8]) -> std::result::Result<ClaimResult, DecodeError> {
        let mut f = RecordFields::new(raw, 12)?;
        Ok(ClaimResult {
            acquired: f.required(&Type::BOOL, "acquired")?,
            fence: f.required(&Type::INT8, "fence")?,
            recovered: f.next(&Type::BOOL)?,
            completed: f.next(&Type::BOOL)?,
            request_hash: f.next::<&[u8]>(&Type::BYTEA)?.map(hash_from_bytes).transpose()?,
            claimed_at_ms: f.next(&Type::INT8)?,
            lease_until_ms: f.next(&Type::INT8)?,
            expires_at_ms: f.next(&Type::INT8)?,
            completed_at_ms: f.next(&Type::INT8)?,
            value: f.next(&Type::BYTEA)?,
            orphan_takeover: f.next(&Type::BOOL)?,
            now_ms: f.required(&Type::INT8, "now_ms")?,
        })
    }

    fn accepts(ty: &Type) -> bool {
        matches!(ty.kind(), Kind::Composite(_))
    }
}

impl ClaimResult {
    /// The answer as a row. A key acquired fresh (the row's fields left NULL) holds `hash` and
    /// the time plus `lease_ms` and `ttl_ms`, as the function wrote them.
    fn into_row(self, hash: u128, lease_ms: i64, ttl_ms: i64) -> std::result::Result<ClaimRow, DecodeError> {
        let now_ms = self.now_ms;
        if self.acquired && self.recovered.is_none() {
            return Ok(ClaimRow {
                acquired: true,
                fence: self.fence,
                recovered: false,
                completed: false,
                request_hash: hash,
                claimed_at_ms: now_ms,
                lease_until_ms: now_ms.saturating_add(lease_ms),
                expires_at_ms: now_ms.saturating_add(ttl_ms),
                completed_at_ms: None,
                value: None,
                orphan_takeover: false,
                now_ms,
            });
        }
        fn field<T>(value: Option<T>, name: &str) -> std::result::Result<T, DecodeError> {
            value.ok_or_else(|| format!("a claim result without {name}").into())
        }
        Ok(ClaimRow {
            acquired: self.acquired,
            fence: self.fence,
            recovered: field(self.recovered, "recovered")?,
            completed: field(self.completed, "completed")?,
            request_hash: field(self.request_hash, "request_hash")?,
            claimed_at_ms: field(self.claimed_at_ms, "claimed_at_ms")?,
            lease_until_ms: field(self.lease_until_ms, "lease_until_ms")?,
            expires_at_ms: field(self.expires_at_ms, "expires_at_ms")?,
            completed_at_ms: self.completed_at_ms,
            value: self.value,
            orphan_takeover: field(self.orphan_takeover, "orphan_takeover")?,
            now_ms,
        })
    }
}

impl Inner {
    fn offset(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    async fn client(&self) -> Result<Conn> {
        let object = self.pool.get().await.map_err(|e| db_error("getting a postgres connection", e))?;
        Ok(Conn { object: Some(object), broken: AtomicBool::new(false) })
    }

    /// Notes the database's time seen by a statement, for the cache's estimate.
    fn saw_db_time(&self, now_ms: i64) {
        if self.cache.is_some() {
            let local = time_to_ms(SystemTime::now());
            self.skew_ms.store(now_ms - local, Ordering::Relaxed);
        }
    }

    fn estimated_db_now(&self) -> i64 {
        time_to_ms(SystemTime::now()) + self.skew_ms.load(Ordering::Relaxed)
    }

    fn check_key(&self, key: &[u8]) -> Result<()> {
        if key.is_empty() {
            return Err(Error::EmptyKey);
        }
        if key.len() > self.options.max_key_len {
            return Err(Error::KeyTooLong { len: key.len(), max: self.options.max_key_len });
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<()> {
        if value.len() > self.options.max_outcome_len {
            return Err(Error::OutcomeTooLong { len: value.len(), max: self.options.max_outcome_len });
        }
        Ok(())
    }

    fn check_token(&self, token: &ClaimToken) -> Result<()> {
        if token.backend() != self.identity {
            return Err(Error::ForeignToken);
        }
        Ok(())
    }

    /// The replay cache's answer for a claim, when it has one (no round trip).
    fn cached_claim(&self, key: &[u8], request: &[u8]) -> Result<Option<Claim>> {
        let Some(cache) = &self.cache else { return Ok(None) };
        self.check_key(key)?;
        let answer = cache.lookup(key, request_hash(request), self.estimated_db_now(), CACHE_MARGIN_MS);
        Ok(answer.map(|cached| match cached {
            cache::Cached::Replay(done) => {
                bump(&self.counters.replayed);
                Claim::Completed(done)
            }
            cache::Cached::Mismatch => {
                bump(&self.counters.mismatches);
                Claim::Mismatch
            }
        }))
    }

    /// Checks a claim's key and options; returns its TTL and lease in ms.
    fn check_claim(&self, key: &[u8], options: &ClaimOptions) -> Result<(i64, i64)> {
        self.check_key(key)?;
        let ttl = options.ttl.unwrap_or(self.options.default_ttl);
        let lease = options.lease.unwrap_or(self.options.default_lease);
        if duration_ms(ttl) == 0 || duration_ms(lease) == 0 {
            return Err(Error::InvalidArgument("ttl and lease must be at least 1 ms"));
        }
        if ttl > TTL_MAX {
            return Err(Error::InvalidArgument("ttl must be at most TTL_MAX (10 years)"));
        }
        if duration_ms(lease) > LEASE_MS_MAX {
            return Err(Error::InvalidArgument("lease must be under 49 days"));
        }
        Ok((duration_ms(ttl), duration_ms(lease)))
    }

    /// A claim through the database (the callers looked in the replay cache first).
    async fn claim(self: &Arc<Self>, key: &[u8], request: &[u8], options: &ClaimOptions) -> Result<Claim> {
        let (ttl_ms, lease_ms) = self.check_claim(key, options)?;
        let hash = request_hash(request);
        let deadline = options.wait.map(|w| tokio::time::Instant::now().checked_add(w));
        let key_hash = xxhash_rust::xxh3::xxh3_64(key);
        let waiting = deadline.map(|_| self.waiters.notify_for(key_hash));
        let result = self.claim_loop(key, hash, ttl_ms, lease_ms, deadline, waiting.as_deref()).await;
        if waiting.is_some() {
            drop(waiting);
            self.waiters.forget(key_hash);
        }
        result
    }

    async fn claim_loop(
        self: &Arc<Self>,
        key: &[u8],
        hash: u128,
        ttl_ms: i64,
        lease_ms: i64,
        deadline: Option<Option<tokio::time::Instant>>,
        waiting: Option<&Notify>,
    ) -> Result<Claim> {
        let mut watched_fence = None;
        loop {
            // A waiter listens before it looks, so that a change between the look and the sleep
            // wakes it (a claim that does not wait listens to nothing).
            let mut key_changed = waiting.map(|n| Box::pin(n.notified()));
            let mut clock_changed = waiting.map(|_| Box::pin(self.waiters.everyone.notified()));
            for notified in key_changed.iter_mut().chain(clock_changed.iter_mut()) {
                notified.as_mut().enable();
            }
            let row = self.claim_once(key, hash, ttl_ms, lease_ms).await?;
            self.saw_db_time(row.now_ms);
            if row.acquired {
                bump(&self.counters.acquired);
                if row.orphan_takeover {
                    bump(&self.counters.orphan_takeovers);
                } else if row.recovered {
                    bump(&self.counters.lease_takeovers);
                }
                let token = ClaimToken::for_backend(
                    self.identity,
                    key,
                    row.fence as u64,
                    row.recovered,
                    row.value,
                    ms_to_time(row.lease_until_ms),
                );
                return Ok(Claim::Acquired(token));
            }
            if row.request_hash != hash {
                bump(&self.counters.mismatches);
                return Ok(Claim::Mismatch);
            }
            if row.completed {
                bump(&self.counters.replayed);
                let done = Completed {
                    outcome: row.value.unwrap_or_default(),
                    completed_at: ms_to_time(row.completed_at_ms.unwrap_or(row.claimed_at_ms)),
                    claimed_at: ms_to_time(row.claimed_at_ms),
                    expires_at: ms_to_time(row.expires_at_ms),
                };
                if let Some(cache) = &self.cache {
                    cache.insert(key, hash, done.clone(), row.expires_at_ms, row.now_ms);
                }
                return Ok(Claim::Completed(done));
            }
            // In flight for a live holder.
            let now = tokio::time::Instant::now();
            let remaining = match deadline {
                None => None,
                Some(None) => Some(Duration::MAX),
                Some(Some(at)) => at.checked_duration_since(now).filter(|d| !d.is_zero()),
            };
            let Some(left) = remaining else {
                bump(&self.counters.in_progress);
                return Ok(Claim::InProgress {
                    lease_expires_at: ms_to_time(row.lease_until_ms),
                    expires_at: ms_to_time(row.expires_at_ms),
                });
            };
            if watched_fence != Some(row.fence) {
                // Ask the holder's complete or release to notify; when the row changed meanwhile,
                // look again at once.
                let client = self.client().await?;
                let statement = client.prepare_cached(&self.sql.watch).await.map_err(|e| client.err("waiting", e))?;
                let updated = client
                    .execute(&statement, &[&self.offset(), &key, &row.fence])
                    .await
                    .map_err(|e| client.err("waiting", e))?;
                if updated == 0 {
                    continue;
                }
                watched_fence = Some(row.fence);
            }
            // The key also changes, with nothing written, at the lease's end (a takeover) and
            // the window's end: look again then at the latest.
            let change_at = row.lease_until_ms.min(row.expires_at_ms);
            let until_change = Duration::from_millis(u64::try_from(change_at - row.now_ms).unwrap_or(0).max(1));
            let sleep = left.min(until_change);
            tokio::select! {
                _ = async { match key_changed { Some(k) => k.await, None => std::future::pending().await } } => {}
                _ = async { match clock_changed { Some(c) => c.await, None => std::future::pending().await } } => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// One round trip: the claim rides a claim statement (see `schema::claim_batch_function`).
    /// While fewer than `claim_batches` statements are out, the claim sends one itself, with
    /// every claim waiting by then; otherwise it waits, and the first statement back sends it
    /// with the others that came meanwhile.
    async fn claim_once(self: &Arc<Self>, key: &[u8], hash: u128, ttl_ms: i64, lease_ms: i64) -> Result<ClaimRow> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let batch = {
            let mut batcher = self.lock_batcher();
            batcher.waiting.push(WaitingClaim { key: key.to_vec(), hash, ttl_ms, lease_ms, answer });
            self.take_batch(&mut batcher)
        };
        let mut answered = answered;
        if let Some(batch) = batch {
            self.send_in_slot(batch).await;
            self.send_waiting();
            // This claim rode the statement it sent: its answer is in.
            if let Ok(answer) = answered.try_recv() {
                return answer;
            }
        }
        loop {
            tokio::select! {
                answer = &mut answered => {
                    return answer.map_err(|_| db_error("claiming a key", "the claim's statement was abandoned"))?;
                }
                // Every slot has been out that long (a statement waits for a row lock, say):
                // what waits goes in one more statement, up to the pool's size, rather than
                // behind statements that have nothing to do with it.
                _ = tokio::time::sleep(SLOTS_STUCK_AFTER) => {
                    let batch = self.take_batch_up_to(&mut self.lock_batcher(), self.options.pool_size);
                    if let Some(batch) = batch {
                        self.send_in_slot(batch).await;
                        self.send_waiting();
                    }
                }
            }
        }
    }

    fn lock_batcher(&self) -> std::sync::MutexGuard<'_, Batcher> {
        self.batcher.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The waiting claims, taken for a new statement when one more may go out.
    fn take_batch(&self, batcher: &mut Batcher) -> Option<Vec<WaitingClaim>> {
        self.take_batch_up_to(batcher, self.options.claim_batches)
    }

    /// The waiting claims, taken for a new statement when fewer than `limit` (and than the
    /// pool's size) are out.
    fn take_batch_up_to(&self, batcher: &mut Batcher, limit: usize) -> Option<Vec<WaitingClaim>> {
        let limit = limit.min(self.options.pool_size);
        if batcher.waiting.is_empty() || batcher.in_flight >= limit {
            return None;
        }
        batcher.in_flight += 1;
        let count = batcher.waiting.len().min(MAX_CLAIM_BATCH);
        Some(batcher.waiting.drain(..count).collect())
    }

    /// Sends `batch` in the statement slot `take_batch` counted for it, and gives the slot back
    /// when done (or dropped).
    async fn send_in_slot(self: &Arc<Self>, batch: Vec<WaitingClaim>) {
        struct Slot<'a>(&'a Inner);
        impl Drop for Slot<'_> {
            fn drop(&mut self) {
                let mut batcher = self.0.lock_batcher();
                batcher.in_flight = batcher.in_flight.saturating_sub(1);
            }
        }
        let _slot = Slot(self);
        self.send_batch(batch).await;
    }

    /// Sends the claims that came while every slot was out, on a task of its own, so that the
    /// answer of the claim that returns here does not wait for them. A claim waits only while
    /// a slot is out, and every slot taken is given back and then looks here: none is left.
    fn send_waiting(self: &Arc<Self>) {
        let Some(mut batch) = self.take_batch(&mut self.lock_batcher()) else { return };
        let inner = self.clone();
        tokio::spawn(async move {
            loop {
                inner.send_in_slot(batch).await;
                match inner.take_batch(&mut inner.lock_batcher()) {
                    Some(next) => batch = next,
                    None => return,
                }
            }
        });
    }

    /// One statement for `batch`, its keys in order (two statements that share keys lock them
    /// in the same order, so they never deadlock); each claim gets its answer.
    async fn send_batch(self: &Arc<Self>, mut batch: Vec<WaitingClaim>) {
        batch.sort_by(|a, b| a.key.cmp(&b.key));
        match self.claim_statement(&batch).await {
            Ok(answers) => {
                for (claim, answer) in batch.into_iter().zip(answers) {
                    let _ = claim.answer.send(answer);
                }
            }
            // The server refused the call of several claims and rolled it back: nothing was
            // written, so each claim goes again alone, all at once, and gets its own answer
            // (one key's row held elsewhere past the call's lock timeout, or the answers of many
            // replays of large outcomes together past what one value may hold).
            Err(StatementFailure::Refused(_)) if batch.len() > 1 => {
                // Each in a task of its own: the claim that sent this call answers its caller at
                // once, whatever another key of the call still waits for.
                for claim in batch {
                    let inner = self.clone();
                    tokio::spawn(async move {
                        let answer = match inner.claim_statement(std::slice::from_ref(&claim)).await {
                            Ok(mut answers) => {
                                answers.pop().unwrap_or_else(|| Err(db_error("claiming a key", "no answer")))
                            }
                            Err(StatementFailure::Refused(e) | StatementFailure::Failed(e)) => Err(e),
                        };
                        let _ = claim.answer.send(answer);
                    });
                }
            }
            Err(StatementFailure::Refused(error) | StatementFailure::Failed(error)) => {
                for claim in batch {
                    let _ = claim.answer.send(Err(error.clone()));
                }
            }
        }
    }

    async fn claim_statement(
        &self,
        batch: &[WaitingClaim],
    ) -> std::result::Result<Vec<Result<ClaimRow>>, StatementFailure> {
        let ctx = "claiming a key";
        let client = self.client().await?;
        let take_orphans = self.options.orphans == OrphanPolicy::TakeOver;
        bump(&self.counters.claim_statements);
        if let [claim] = batch
            && !self.lone_claims_as_batches.load(Ordering::Relaxed)
        {
            let statement = client.prepare_cached(&self.sql.claim).await.map_err(|e| client.err(ctx, e))?;
            let hash = claim.hash.to_be_bytes();
            let rows = client
                .query(
                    &statement,
                    &[
                        &self.offset(),
                        &claim.key,
                        &&hash[..],
                        &self.incarnation,
                        &claim.lease_ms,
                        &claim.ttl_ms,
                        &take_orphans,
                    ],
                )
                .await
                .map_err(|e| client.err(ctx, e))?;
            let answer: Option<ClaimResult> = match rows.first() {
                Some(row) => row.try_get(0).map_err(|e| pg_error("reading a claim's answer", &e))?,
                None => None,
            };
            return Ok(vec![Self::claim_row(claim, answer)]);
        }
        let statement = client.prepare_cached(&self.sql.claim_batch).await.map_err(|e| client.err(ctx, e))?;
        let hashes: Vec<[u8; 16]> = batch.iter().map(|c| c.hash.to_be_bytes()).collect();
        let keys: Vec<&[u8]> = batch.iter().map(|c| c.key.as_slice()).collect();
        let hash_refs: Vec<&[u8]> = hashes.iter().map(|h| h.as_slice()).collect();
        let leases: Vec<i64> = batch.iter().map(|c| c.lease_ms).collect();
        let ttls: Vec<i64> = batch.iter().map(|c| c.ttl_ms).collect();
        let rows = client
            .query(&statement, &[&self.offset(), &keys, &hash_refs, &self.incarnation, &leases, &ttls, &take_orphans])
            .await
            .map_err(|e| {
                if refused_and_rolled_back(&e) {
                    StatementFailure::Refused(client.err(ctx, e))
                } else {
                    StatementFailure::Failed(client.err(ctx, e))
                }
            })?;
        let answers: Vec<Option<ClaimResult>> = match rows.first() {
            Some(row) => row.try_get(0).map_err(|e| pg_error("reading a claim's answer", &e))?,
            None => Vec::new(),
        };
        if answers.len() != batch.len() {
            return Err(StatementFailure::Failed(db_error(
                "reading a claim's answer",
                format!("{} answers to {} claims", answers.len(), batch.len()),
            )));
        }
        Ok(batch.iter().zip(answers).map(|(claim, answer)| Self::claim_row(claim, answer)).collect())
    }

    /// A claim's answer as a row; NULL (`None`) when the function found the key changed under
    /// each of its tries.
    fn claim_row(claim: &WaitingClaim, answer: Option<ClaimResult>) -> Result<ClaimRow> {
        let answer = answer
            .ok_or_else(|| db_error("claiming a key", "the key kept changing under concurrent claims; try again"))?;
        answer.into_row(claim.hash, claim.lease_ms, claim.ttl_ms).map_err(|e| db_error("reading a claim's answer", e))
    }

    async fn complete(&self, token: &ClaimToken, outcome: &[u8]) -> Result<()> {
        self.check_token(token)?;
        self.check_value(outcome)?;
        let ctx = "completing a claim";
        let client = self.client().await?;
        let statement = client.prepare_cached(&self.sql.complete).await.map_err(|e| client.err(ctx, e))?;
        let rows = client
            .query(
                &statement,
                &[&self.offset(), &token.key(), &(token.id() as i64), &outcome, &key_payload(token.key())],
            )
            .await
            .map_err(|e| client.err(ctx, e))?;
        let Some(row) = rows.first() else {
            bump(&self.counters.stale);
            return Err(Error::StaleToken);
        };
        if let Some(cache) = &self.cache {
            let read = || -> std::result::Result<(i64, i64, i64, Vec<u8>, i64), tokio_postgres::Error> {
                Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?, row.try_get(4)?))
            };
            if let Ok((claimed_at, expires_at, completed_at, hash, now_ms)) = read()
                && let Ok(hash) = hash_from_bytes(&hash)
            {
                self.saw_db_time(now_ms);
                let done = Completed {
                    outcome: outcome.to_vec(),
                    completed_at: ms_to_time(completed_at),
                    claimed_at: ms_to_time(claimed_at),
                    expires_at: ms_to_time(expires_at),
                };
                cache.insert(token.key(), hash, done, expires_at, now_ms);
            }
        }
        self.waiters.wake(xxhash_rust::xxh3::xxh3_64(token.key()));
        Ok(())
    }

    async fn checkpoint(&self, token: &ClaimToken, phase: &[u8]) -> Result<SystemTime> {
        self.check_token(token)?;
        if phase.is_empty() {
            return Err(Error::InvalidArgument("a checkpoint phase must not be empty"));
        }
        self.check_value(phase)?;
        let ctx = "checkpointing a claim";
        let client = self.client().await?;
        let statement = client.prepare_cached(&self.sql.checkpoint).await.map_err(|e| client.err(ctx, e))?;
        let rows = client
            .query(&statement, &[&self.offset(), &token.key(), &(token.id() as i64), &phase])
            .await
            .map_err(|e| client.err(ctx, e))?;
        let Some(row) = rows.first() else {
            bump(&self.counters.stale);
            return Err(Error::StaleToken);
        };
        let lease_until: i64 = row.try_get(0).map_err(|e| client.err(ctx, e))?;
        Ok(ms_to_time(lease_until))
    }

    async fn release(&self, token: &ClaimToken) -> Result<()> {
        self.check_token(token)?;
        let ctx = "releasing a claim";
        let client = self.client().await?;
        let statement = client.prepare_cached(&self.sql.release).await.map_err(|e| client.err(ctx, e))?;
        let rows = client
            .query(&statement, &[&self.offset(), &token.key(), &(token.id() as i64), &key_payload(token.key())])
            .await
            .map_err(|e| client.err(ctx, e))?;
        if rows.is_empty() {
            bump(&self.counters.stale);
            return Err(Error::StaleToken);
        }
        self.waiters.wake(xxhash_rust::xxh3::xxh3_64(token.key()));
        Ok(())
    }

    async fn remove(&self, key: &[u8]) -> Result<()> {
        self.check_key(key)?;
        if let Some(cache) = &self.cache {
            cache.invalidate(key);
        }
        let ctx = "removing a key";
        let client = self.client().await?;
        let statement = client.prepare_cached(&self.sql.remove).await.map_err(|e| client.err(ctx, e))?;
        client.query(&statement, &[&key, &key_payload(key)]).await.map_err(|e| client.err(ctx, e))?;
        if let Some(cache) = &self.cache {
            // A replay that raced with the delete may have put it back.
            cache.invalidate(key);
        }
        self.waiters.wake(xxhash_rust::xxh3::xxh3_64(key));
        Ok(())
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Entry>> {
        self.check_key(key)?;
        let ctx = "reading a key";
        let client = self.client().await?;
        let statement = client.prepare_cached(&self.sql.get).await.map_err(|e| client.err(ctx, e))?;
        let rows = client
            .query(&statement, &[&self.offset(), &key, &self.incarnation])
            .await
            .map_err(|e| client.err(ctx, e))?;
        let Some(row) = rows.first() else { return Ok(None) };
        entry_from_row(row, 0).map(|(entry, _)| Some(entry)).map_err(|e| client.err(ctx, e))
    }

    async fn orphans(&self) -> Result<Vec<Orphan>> {
        let ctx = "listing orphans";
        let client = self.client().await?;
        let rows = client
            .query(&self.sql.orphans, &[&self.offset(), &self.incarnation])
            .await
            .map_err(|e| client.err(ctx, e))?;
        rows.iter()
            .map(|row| {
                let checkpoint: Option<Vec<u8>> = row.try_get(3)?;
                Ok(Orphan {
                    key: row.try_get(0)?,
                    claimed_at: ms_to_time(row.try_get(1)?),
                    lease_expires_at: ms_to_time(row.try_get(2)?),
                    checkpoint: checkpoint.filter(|c| !c.is_empty()),
                })
            })
            .collect::<std::result::Result<_, tokio_postgres::Error>>()
            .map_err(|e| client.err(ctx, e))
    }

    async fn reap(&self) -> Result<u64> {
        let ctx = "deleting expired rows";
        let client = self.client().await?;
        let statement = client.prepare_cached(&self.sql.reap).await.map_err(|e| client.err(ctx, e))?;
        let batch = self.options.reap_batch;
        let mut total = 0;
        loop {
            let deleted =
                client.execute(&statement, &[&self.offset(), &batch]).await.map_err(|e| client.err(ctx, e))?;
            total += deleted;
            self.counters.reaped.fetch_add(deleted, Ordering::Relaxed);
            if deleted < batch as u64 {
                return Ok(total);
            }
        }
    }

    async fn export_entries(&self) -> Result<Vec<ExportedEntry>> {
        let ctx = "exporting entries";
        let client = self.client().await?;
        let rows = client
            .query(&self.sql.export, &[&self.offset(), &self.incarnation])
            .await
            .map_err(|e| client.err(ctx, e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let key: Vec<u8> = row.try_get(0).map_err(|e| client.err(ctx, e))?;
            let hash: Vec<u8> = row.try_get(1).map_err(|e| client.err(ctx, e))?;
            let (entry, _) = entry_from_row(row, 2).map_err(|e| client.err(ctx, e))?;
            out.push(ExportedEntry { key, request_hash: hash_from_bytes(&hash)?, entry });
        }
        Ok(out)
    }

    async fn import_entry(&self, exported: &ExportedEntry) -> Result<bool> {
        let key = exported.key.as_slice();
        self.check_key(key)?;
        let (completed, value, claimed_at, lease_until, expires_at, completed_at) = match &exported.entry {
            Entry::InFlight { claimed_at, lease_expires_at, expires_at, checkpoint, .. } => (
                false,
                checkpoint.clone(),
                time_to_ms(*claimed_at),
                time_to_ms(*lease_expires_at),
                time_to_ms(*expires_at),
                None,
            ),
            Entry::Completed(done) => (
                true,
                Some(done.outcome.clone()),
                time_to_ms(done.claimed_at),
                time_to_ms(done.completed_at),
                time_to_ms(done.expires_at),
                Some(time_to_ms(done.completed_at)),
            ),
        };
        if let Some(value) = &value {
            self.check_value(value)?;
        }
        let lease_ms = (lease_until - claimed_at).max(1);
        let ctx = "importing an entry";
        let client = self.client().await?;
        let hash = exported.request_hash.to_be_bytes();
        let rows = client
            .query(
                &self.sql.import,
                &[
                    &self.offset(),
                    &key,
                    &&hash[..],
                    &completed,
                    &claimed_at,
                    &lease_ms,
                    &lease_until,
                    &expires_at,
                    &completed_at,
                    &value,
                ],
            )
            .await
            .map_err(|e| client.err(ctx, e))?;
        Ok(!rows.is_empty())
    }
}

/// An `Entry` from a row whose columns from `at` on are: completed, claimed_at, lease_until,
/// expires_at, completed_at, value, orphaned.
fn entry_from_row(row: &tokio_postgres::Row, at: usize) -> std::result::Result<(Entry, bool), tokio_postgres::Error> {
    let completed: bool = row.try_get(at)?;
    let claimed_at: i64 = row.try_get(at + 1)?;
    let lease_until: i64 = row.try_get(at + 2)?;
    let expires_at: i64 = row.try_get(at + 3)?;
    let completed_at: Option<i64> = row.try_get(at + 4)?;
    let value: Option<Vec<u8>> = row.try_get(at + 5)?;
    let orphaned: Option<bool> = row.try_get(at + 6)?;
    let orphaned = orphaned.unwrap_or(false);
    let entry = if completed {
        Entry::Completed(Completed {
            outcome: value.unwrap_or_default(),
            completed_at: ms_to_time(completed_at.unwrap_or(claimed_at)),
            claimed_at: ms_to_time(claimed_at),
            expires_at: ms_to_time(expires_at),
        })
    } else {
        Entry::InFlight {
            claimed_at: ms_to_time(claimed_at),
            lease_expires_at: ms_to_time(lease_until),
            expires_at: ms_to_time(expires_at),
            checkpoint: value.filter(|v| !v.is_empty()),
            orphaned,
        }
    };
    Ok((entry, orphaned))
}

impl PgStore {
    /// Runs `op` on the private runtime and awaits it from any executor.
    fn spawn<T: Send + 'static>(
        &self,
        op: impl Future<Output = Result<T>> + Send + 'static,
    ) -> impl Future<Output = Result<T>> + Send + 'static {
        let handle = self.driver.as_ref().map(|d| d.handle().clone());
        async move {
            let Some(handle) = handle else {
                return Err(db_error("running a store operation", "the store is closed"));
            };
            handle.spawn(op).await.map_err(|e| db_error("running a store operation", e))?
        }
    }
}

impl DedupeStore for PgStore {
    fn claim_with(
        &self,
        key: &[u8],
        request: &[u8],
        options: ClaimOptions,
    ) -> impl Future<Output = Result<Claim>> + Send {
        let inner = self.inner.clone();
        let (key, request) = (key.to_vec(), request.to_vec());
        let handle = self.driver.as_ref().map(|d| d.handle().clone());
        async move {
            inner.check_claim(&key, &options)?;
            if let Some(answer) = inner.cached_claim(&key, &request)? {
                return Ok(answer);
            }
            let Some(handle) = handle else {
                return Err(db_error("running a store operation", "the store is closed"));
            };
            // The claim runs to its end on the store's runtime; if this future was dropped
            // meanwhile, nobody will ever see the token, so the claim is released there.
            let (tx, rx) = tokio::sync::oneshot::channel();
            let worker = inner.clone();
            handle.spawn(async move {
                let answer = worker.claim(&key, &request, &options).await;
                if let Err(Ok(Claim::Acquired(token))) = tx.send(answer) {
                    let _ = worker.release(&token).await;
                }
            });
            rx.await.map_err(|_| db_error("claiming a key", "the store's runtime stopped"))?
        }
    }

    fn complete(&self, token: &ClaimToken, outcome: &[u8]) -> impl Future<Output = Result<()>> + Send {
        let (inner, token, outcome) = (self.inner.clone(), token.clone(), outcome.to_vec());
        self.spawn(async move { inner.complete(&token, &outcome).await })
    }

    fn checkpoint(&self, token: &ClaimToken, phase: &[u8]) -> impl Future<Output = Result<()>> + Send {
        let (inner, owned, phase) = (self.inner.clone(), token.clone(), phase.to_vec());
        let run = self.spawn(async move { inner.checkpoint(&owned, &phase).await });
        async move {
            let lease_until = run.await?;
            // The caller's token learns its new lease end, as `Store`'s does.
            token.set_lease_expires_at(lease_until);
            Ok(())
        }
    }

    fn release(&self, token: &ClaimToken) -> impl Future<Output = Result<()>> + Send {
        let (inner, token) = (self.inner.clone(), token.clone());
        self.spawn(async move { inner.release(&token).await })
    }

    fn get(&self, key: &[u8]) -> impl Future<Output = Result<Option<Entry>>> + Send {
        let (inner, key) = (self.inner.clone(), key.to_vec());
        self.spawn(async move { inner.get(&key).await })
    }

    fn remove(&self, key: &[u8]) -> impl Future<Output = Result<()>> + Send {
        let (inner, key) = (self.inner.clone(), key.to_vec());
        self.spawn(async move { inner.remove(&key).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `<table>_claim_result` in the binary format, from its fields (oid, bytes or NULL).
    fn record(fields: &[(Type, Option<Vec<u8>>)]) -> Vec<u8> {
        let mut raw = (fields.len() as i32).to_be_bytes().to_vec();
        for (ty, bytes) in fields {
            raw.extend(ty.oid().to_be_bytes());
            match bytes {
                Some(bytes) => {
                    raw.extend((bytes.len() as i32).to_be_bytes());
                    raw.extend(bytes);
                }
                None => raw.extend((-1i32).to_be_bytes()),
            }
        }
        raw
    }

    fn replay_fields() -> Vec<(Type, Option<Vec<u8>>)> {
        let int8 = |v: i64| (Type::INT8, Some(v.to_be_bytes().to_vec()));
        let boolean = |v: bool| (Type::BOOL, Some(vec![v as u8]));
        vec![
            boolean(false),
            int8(41),
            boolean(true),
            boolean(true),
            (Type::BYTEA, Some(7u128.to_be_bytes().to_vec())),
            int8(1_000),
            int8(31_000),
            int8(86_401_000),
            int8(2_000),
            (Type::BYTEA, Some(b"201 Created".to_vec())),
            boolean(false),
            int8(2_500),
        ]
    }

    fn decode(raw: &[u8]) -> std::result::Result<ClaimRow, DecodeError> {
        ClaimResult::from_sql(&Type::RECORD, raw)?.into_row(9, 30_000, 86_400_000)
    }

    #[test]
    fn a_claim_result_is_decoded_field_by_field() {
        let row = decode(&record(&replay_fields())).unwrap();
        assert!(!row.acquired && row.recovered && row.completed && !row.orphan_takeover);
        assert_eq!((row.fence, row.request_hash), (41, 7));
        assert_eq!((row.claimed_at_ms, row.lease_until_ms, row.expires_at_ms), (1_000, 31_000, 86_401_000));
        assert_eq!((row.completed_at_ms, row.now_ms), (Some(2_000), 2_500));
        assert_eq!(row.value.as_deref(), Some(&b"201 Created"[..]));
        // The nullable fields may be NULL.
        let mut fields = replay_fields();
        fields[8].1 = None;
        fields[9].1 = None;
        let row = decode(&record(&fields)).unwrap();
        assert_eq!((row.completed_at_ms, row.value), (None, None));
    }

    #[test]
    fn a_fresh_acquisition_is_completed_from_what_the_claim_sent() {
        let mut fields: Vec<_> = replay_fields().into_iter().map(|(ty, _)| (ty, None)).collect();
        fields[0].1 = Some(vec![1]);
        fields[1].1 = Some(42i64.to_be_bytes().to_vec());
        fields[11].1 = Some(5_000i64.to_be_bytes().to_vec());
        let row = decode(&record(&fields)).unwrap();
        assert!(row.acquired && !row.recovered && !row.completed && !row.orphan_takeover);
        assert_eq!((row.fence, row.request_hash, row.now_ms), (42, 9, 5_000));
        assert_eq!((row.claimed_at_ms, row.lease_until_ms, row.expires_at_ms), (5_000, 35_000, 86_405_000));
        assert_eq!((row.completed_at_ms, row.value), (None, None));
        // Only an acquisition may leave the row's fields out.
        fields[0].1 = Some(vec![0]);
        assert!(decode(&record(&fields)).is_err());
    }

    #[test]
    fn a_malformed_claim_result_is_an_error() {
        let good = record(&replay_fields());
        // Cut short anywhere.
        for len in 0..good.len() {
            assert!(decode(&good[..len]).is_err(), "cut at {len}");
        }
        // A field too few or too many.
        assert!(decode(&record(&replay_fields()[..11])).is_err());
        let mut more = replay_fields();
        more.push((Type::INT8, Some(0i64.to_be_bytes().to_vec())));
        assert!(decode(&record(&more)).is_err());
        // A field of another type, a required field NULL, a hash of another length, a boolean
        // of no bytes.
        let mut other_type = replay_fields();
        other_type[1] = (Type::INT4, Some(41i32.to_be_bytes().to_vec()));
        assert!(decode(&record(&other_type)).is_err());
        for required in [0, 1, 2, 3, 4, 5, 6, 7, 10, 11] {
            let mut null = replay_fields();
            null[required].1 = None;
            assert!(decode(&record(&null)).is_err(), "field {required} NULL");
        }
        let mut short_hash = replay_fields();
        short_hash[4].1 = Some(vec![1, 2, 3]);
        assert!(decode(&record(&short_hash)).is_err());
        let mut bad_bool = replay_fields();
        bad_bool[0].1 = Some(vec![]);
        assert!(decode(&record(&bad_bool)).is_err());
    }
}
