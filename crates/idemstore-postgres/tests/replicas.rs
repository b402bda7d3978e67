//! Promise: what the PostgreSQL backend adds to the contract, on a real server.
//!
//! Several replicas (`PgStore`s) on one table share one window: tokens of one are accepted by
//! another; a claim waiting on one replica is woken by a complete on another (LISTEN/NOTIFY);
//! a replica whose lock session is gone is dead for certain and its claims are taken over at
//! once; the replay cache answers replays and mismatches without a round trip and misses a
//! `remove` made elsewhere only until the entry's expiry; the schema can be left to the
//! operator; `Durability::None` is an UNLOGGED table; the reaper deletes expired rows in
//! batches; the blocking calls work inside a runtime, and a connect that fails there is an
//! error; export and import carry a window over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use idemstore::{Claim, ClaimOptions, Durability, Entry, Error, OrphanPolicy};
use idemstore_postgres::{PgOptions, PgStore, ReplayCacheLimits, SCHEMA_VERSION, schema_sql};

mod common;
use common::{acquired, admin, connect, drop_table, pg_url, terminate_backend, unique_table};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_share_one_window_and_accept_each_others_tokens() {
    let Some(url) = pg_url("replicas_share_one_window") else { return };
    let table = unique_table("replicas");
    let (a, b) = (connect(&url, &table), connect(&url, &table));
    assert_eq!(a.identity(), b.identity(), "one table, one identity");
    assert_ne!(a.incarnation(), b.incarnation());
    let token = acquired(a.claim("k", b"req").unwrap());
    assert!(
        matches!(b.claim("k", b"req").unwrap(), Claim::InProgress { lease_expires_at, .. } if lease_expires_at == token.lease_expires_at())
    );
    assert_eq!(b.claim("k", b"other").unwrap(), Claim::Mismatch);
    b.complete(&token, b"done on b").unwrap();
    let Claim::Completed(done) = a.claim("k", b"req").unwrap() else { panic!("expected a replay") };
    assert_eq!(done.outcome, b"done on b");
    // Another table is another store: its tokens are foreign.
    let other_table = unique_table("replicas");
    let other = connect(&url, &other_table);
    let foreign = acquired(other.claim("k2", b"req").unwrap());
    assert!(matches!(a.complete(&foreign, b"x"), Err(Error::ForeignToken)));
    drop((a, b, other));
    let admin = admin(&url).await;
    drop_table(&admin, &table).await;
    drop_table(&admin, &other_table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiter_on_one_replica_is_woken_by_a_complete_on_another() {
    let Some(url) = pg_url("cross_replica_wait") else { return };
    let table = unique_table("replicas");
    let (holder, waiter) = (Arc::new(connect(&url, &table)), Arc::new(connect(&url, &table)));
    let token = acquired(holder.claim("k", b"req").unwrap());
    let waiting = ClaimOptions { wait: Some(Duration::from_secs(60)), ..Default::default() };
    let task = {
        let waiter = waiter.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let answer = idemstore::DedupeStore::claim_with(&*waiter, b"k", b"req", waiting).await.unwrap();
            (answer, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    idemstore::DedupeStore::complete(&*holder, &token, b"from the holder").await.unwrap();
    let (answer, took) = tokio::time::timeout(Duration::from_secs(20), task).await.expect("waiter hung").unwrap();
    let Claim::Completed(done) = answer else { panic!("expected Completed, got {answer:?}") };
    assert_eq!(done.outcome, b"from the holder");
    // Woken by the notification, not by its lease (30 s) or its wait (60 s).
    assert!(took < Duration::from_secs(10), "took {took:?}");
    drop((holder, waiter));
    drop_table(&admin(&url).await, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_is_gone_is_dead_for_certain_and_its_claims_are_taken_over_at_once() {
    let Some(url) = pg_url("orphan_detection") else { return };
    let table = unique_table("replicas");
    let (a, b) = (connect(&url, &table), connect(&url, &table));
    let lease = ClaimOptions { lease: Some(Duration::from_secs(600)), ..Default::default() };
    let held = acquired(a.claim_with("k", b"req", lease.clone()).unwrap());
    a.checkpoint(&held, b"step 1").unwrap();
    assert!(matches!(b.claim("k", b"req").unwrap(), Claim::InProgress { .. }), "a is alive");
    assert!(b.orphans().unwrap().is_empty());
    assert!(matches!(b.get("k").unwrap(), Some(Entry::InFlight { orphaned: false, .. })));
    // `a` goes away without completing (its connections close, as a dead process's do).
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(10);
    let orphans = loop {
        let orphans = b.orphans().unwrap();
        if !orphans.is_empty() {
            break orphans;
        }
        assert!(Instant::now() < deadline, "the dead replica's claim never became an orphan");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Inside its 10-minute lease, the key is an orphan, and the next claim takes it over.
    assert_eq!(orphans.len(), 1);
    assert_eq!(orphans[0].checkpoint.as_deref(), Some(&b"step 1"[..]));
    assert!(matches!(b.get("k").unwrap(), Some(Entry::InFlight { orphaned: true, .. })));
    let taker = acquired(b.claim_with("k", b"req", lease).unwrap());
    assert!(taker.recovered());
    assert_eq!(taker.checkpoint(), Some(&b"step 1"[..]));
    assert_eq!(b.stats().orphan_takeovers_total, 1);
    assert_eq!(b.stats().lease_takeovers_total, 0);
    drop(b);
    drop_table(&admin(&url).await, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_whose_lock_session_is_cut_takes_its_lock_again() {
    let Some(url) = pg_url("lock_session_cut") else { return };
    let table = unique_table("replicas");
    let admin = admin(&url).await;
    let (a, b) = (connect(&url, &table), connect(&url, &table));
    let lease = ClaimOptions { lease: Some(Duration::from_secs(600)), ..Default::default() };
    let held = acquired(a.claim_with("k", b"req", lease).unwrap());
    let first_pid = a.lock_backend_pid();
    terminate_backend(&admin, first_pid).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.stats().lock_sessions_total < 2 || a.lock_backend_pid() == 0 {
        assert!(Instant::now() < deadline, "the lock session was not re-established");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_ne!(a.lock_backend_pid(), first_pid);
    // Alive again: its claim is no orphan, and it completes it.
    assert!(matches!(b.claim("k", b"req").unwrap(), Claim::InProgress { .. }));
    assert!(b.orphans().unwrap().is_empty());
    a.complete(&held, b"ok").unwrap();
    drop((a, b));
    drop_table(&admin, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wait_for_lease_policy_keeps_a_dead_holders_key_until_its_lease_ends() {
    let Some(url) = pg_url("wait_for_lease") else { return };
    let table = unique_table("replicas");
    let admin = admin(&url).await;
    let a = connect(&url, &table);
    let b =
        PgStore::connect(&url, PgOptions { orphans: OrphanPolicy::WaitForLease, ..common::options(&table) }).unwrap();
    let lease = ClaimOptions { lease: Some(Duration::from_secs(60)), ..Default::default() };
    let _held = acquired(a.claim_with("k", b"req", lease.clone()).unwrap());
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.orphans().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the dead replica's claim never became an orphan");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(matches!(b.claim_with("k", b"req", lease.clone()).unwrap(), Claim::InProgress { .. }));
    b.advance_clock(Duration::from_secs(61));
    assert!(acquired(b.claim_with("k", b"req", lease).unwrap()).recovered());
    assert_eq!(b.stats().lease_takeovers_total, 1);
    drop(b);
    drop_table(&admin, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_replay_cache_answers_replays_and_mismatches_and_misses_a_remote_remove_only_until_expiry() {
    let Some(url) = pg_url("replay_cache") else { return };
    let table = unique_table("replicas");
    let cached = PgStore::connect(
        &url,
        PgOptions { replay_cache: Some(ReplayCacheLimits::default()), ..common::options(&table) },
    )
    .unwrap();
    let plain = connect(&url, &table);
    let ttl = ClaimOptions { ttl: Some(Duration::from_secs(600)), ..Default::default() };
    let token = acquired(cached.claim_with("k", b"req", ttl).unwrap());
    cached.complete(&token, b"outcome").unwrap();
    for _ in 0..5 {
        let Claim::Completed(done) = cached.claim("k", b"req").unwrap() else { panic!("expected a replay") };
        assert_eq!(done.outcome, b"outcome");
    }
    assert_eq!(cached.claim("k", b"another request").unwrap(), Claim::Mismatch, "the cache keeps the request hash");
    let stats = cached.stats();
    assert_eq!(stats.cache_hits_total, 6, "{stats:?}");
    assert_eq!(stats.cache_misses_total, 1, "only the first claim looked and missed: {stats:?}");
    assert_eq!(stats.cache_entries, 1);
    // The documented trade-off: a remove on another replica is not seen by this cache...
    plain.remove("k").unwrap();
    assert!(matches!(cached.claim("k", b"req").unwrap(), Claim::Completed(_)));
    // ...until the entry's expiry, after which the database answers.
    cached.advance_clock(Duration::from_secs(600));
    assert!(!acquired(cached.claim("k", b"req").unwrap()).recovered());
    // A remove through the same replica is seen at once.
    let other = acquired(cached.claim("k3", b"req").unwrap());
    cached.complete(&other, b"x").unwrap();
    assert!(matches!(cached.claim("k3", b"req").unwrap(), Claim::Completed(_)));
    cached.remove("k3").unwrap();
    assert!(matches!(cached.claim("k3", b"req").unwrap(), Claim::Acquired(_)));
    drop((cached, plain));
    drop_table(&admin(&url).await, &table).await;
}

#[test]
fn the_replay_cache_stays_within_its_entry_bound() {
    let Some(url) = pg_url("replay_cache_bound") else { return };
    let table = unique_table("replicas");
    let limits = ReplayCacheLimits { max_entries: 64, max_bytes: 1 << 20 };
    let store = PgStore::connect(&url, PgOptions { replay_cache: Some(limits), ..common::options(&table) }).unwrap();
    for i in 0..500 {
        let token = acquired(store.claim(format!("k{i}"), b"req").unwrap());
        store.complete(&token, b"outcome").unwrap();
    }
    let entries = store.stats().cache_entries;
    assert!(entries > 0 && entries <= 64, "{entries} entries");
    // Every key still answers correctly, from the cache or the database.
    for i in (0..500).step_by(7) {
        assert!(matches!(store.claim(format!("k{i}"), b"req").unwrap(), Claim::Completed(_)));
    }
    drop(store);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async { drop_table(&admin(&url).await, &table).await });
}

#[test]
fn the_schema_can_be_left_to_the_operator() {
    let Some(url) = pg_url("manual_schema") else { return };
    let table = unique_table("manual");
    let manual = PgOptions { manage_schema: false, ..common::options(&table) };
    match PgStore::connect(&url, manual.clone()) {
        Err(Error::UnsupportedVersion { found: 0, supported, .. }) => assert_eq!(supported as i32, SCHEMA_VERSION),
        other => panic!("expected UnsupportedVersion for a missing schema, got {other:?}"),
    }
    let sql = schema_sql(&table, Durability::Sync).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async { admin(&url).await.batch_execute(&sql).await.unwrap() });
    let store = PgStore::connect(&url, manual.clone()).unwrap();
    let token = acquired(store.claim("k", b"req").unwrap());
    store.complete(&token, b"ok").unwrap();
    drop(store);
    // The script is idempotent, and a store that manages the schema accepts it as current.
    runtime.block_on(async { admin(&url).await.batch_execute(&sql).await.unwrap() });
    let managed = connect(&url, &table);
    assert!(matches!(managed.claim("k", b"req").unwrap(), Claim::Completed(_)));
    drop(managed);
    // Durability::None needs an UNLOGGED table: an operator-run schema that is logged is refused.
    let none = PgOptions { durability: Durability::None, ..manual };
    assert!(matches!(PgStore::connect(&url, none), Err(Error::InvalidArgument(_))));
    assert!(schema_sql("Bad-Name", Durability::Sync).is_err());
    runtime.block_on(async { drop_table(&admin(&url).await, &table).await });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn durability_none_is_an_unlogged_table_and_sync_a_logged_one() {
    let Some(url) = pg_url("durability_mapping") else { return };
    let table = unique_table("durability");
    let admin = admin(&url).await;
    let none = PgStore::connect(&url, PgOptions { durability: Durability::None, ..common::options(&table) }).unwrap();
    assert_eq!(persistence(&admin, &table).await, 'u');
    drop(none);
    let sync = connect(&url, &table);
    assert_eq!(persistence(&admin, &table).await, 'p', "a managed schema follows the durability");
    drop(sync);
    drop_table(&admin, &table).await;
}

async fn persistence(admin: &tokio_postgres::Client, table: &str) -> char {
    let row =
        admin.query_one("SELECT relpersistence FROM pg_class WHERE oid = to_regclass($1)", &[&table]).await.unwrap();
    row.get::<_, i8>(0) as u8 as char
}

#[test]
fn the_reaper_deletes_expired_rows_in_batches() {
    let Some(url) = pg_url("reaper") else { return };
    let table = unique_table("reaper");
    let store = PgStore::connect(&url, PgOptions { reap_batch: 7, ..common::options(&table) }).unwrap();
    let short = ClaimOptions { ttl: Some(Duration::from_secs(60)), ..Default::default() };
    for i in 0..30 {
        let token = acquired(store.claim_with(format!("k{i}"), b"req", short.clone()).unwrap());
        if i % 2 == 0 {
            store.complete(&token, b"x").unwrap();
        }
    }
    let _long = acquired(store.claim("kept", b"req").unwrap());
    assert_eq!(store.reap_expired().unwrap(), 0, "nothing has expired yet");
    store.advance_clock(Duration::from_secs(61));
    assert_eq!(store.reap_expired().unwrap(), 30);
    assert_eq!(store.stats().reaped_rows_total, 30);
    assert!(store.get("kept").unwrap().is_some());
    drop(store);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let admin = admin(&url).await;
        let rows: i64 = admin.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap().get(0);
        assert_eq!(rows, 1);
        drop_table(&admin, &table).await;
    });
}

#[tokio::test(flavor = "current_thread")]
async fn the_blocking_calls_work_inside_a_runtime() {
    let Some(url) = pg_url("blocking_inside_runtime") else { return };
    let table = unique_table("blocking");
    // Even on a one-thread runtime, the blocking calls hand their work to the store's own.
    let store = connect(&url, &table);
    let token = acquired(store.claim("k", b"req").unwrap());
    store.complete(&token, b"ok").unwrap();
    assert!(matches!(store.get("k").unwrap(), Some(Entry::Completed(_))));
    drop(store);
    drop_table(&admin(&url).await, &table).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_connect_that_fails_inside_a_runtime_is_an_error() {
    // No server listens on port 1; the store's runtime, already started, is let go without
    // blocking this one (which tokio would refuse with a panic).
    let refused = PgStore::connect("postgres://postgres@127.0.0.1:1/postgres", common::options("nowhere"));
    assert!(matches!(refused, Err(Error::Io { .. })), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_claim_future_releases_its_claim() {
    let Some(url) = pg_url("dropped_claim_future") else { return };
    let table = unique_table("cancel");
    let store = connect(&url, &table);
    // Dropped before it answered: the claim may or may not have reached the database; either
    // way the key must not stay held by a token nobody has. (A claim that answered before its
    // timeout handed its token to the caller, whose dropped token keeps the key: not checked.)
    let mut dropped = Vec::new();
    for i in 0..20u64 {
        let key = format!("k{i}");
        let future = idemstore::DedupeStore::claim(&store, key.as_bytes(), b"req");
        if tokio::time::timeout(Duration::from_micros(50 * i), future).await.is_err() {
            dropped.push(key);
        }
    }
    assert!(!dropped.is_empty(), "a timeout of 0 drops the claim future before it answers");
    let deadline = Instant::now() + Duration::from_secs(10);
    for key in &dropped {
        loop {
            match store.get(key).unwrap() {
                None => break,
                Some(entry) => {
                    assert!(Instant::now() < deadline, "{key} stayed held: {entry:?}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    drop(store);
    drop_table(&admin(&url).await, &table).await;
}

#[test]
fn export_and_import_carry_a_window_between_the_embedded_store_and_postgres() {
    let Some(url) = pg_url("export_import") else { return };
    let table = unique_table("moved");
    let dir = tempfile::tempdir().unwrap();
    let embedded = idemstore::Store::open(dir.path(), idemstore::Options::default()).unwrap();
    let done = acquired(embedded.claim("done", b"req done").unwrap());
    embedded.complete(&done, b"the outcome").unwrap();
    let held = acquired(embedded.claim("held", b"req held").unwrap());
    embedded.checkpoint(&held, b"step 3").unwrap();

    let pg = connect(&url, &table);
    for entry in embedded.export_entries().unwrap() {
        assert!(pg.import_entry(&entry).unwrap());
    }
    // The outcome replays, a different request is still a mismatch, and the in-flight claim is
    // an orphan taken over at once with its checkpoint; the old holder's token is foreign here.
    let Claim::Completed(replay) = pg.claim("done", b"req done").unwrap() else { panic!("expected a replay") };
    assert_eq!(replay.outcome, b"the outcome");
    assert_eq!(pg.claim("done", b"another").unwrap(), Claim::Mismatch);
    assert_eq!(pg.claim("held", b"another").unwrap(), Claim::Mismatch);
    assert_eq!(pg.orphans().unwrap().len(), 1);
    assert!(matches!(pg.complete(&held, b"x"), Err(Error::ForeignToken)));
    let taker = acquired(pg.claim("held", b"req held").unwrap());
    assert!(taker.recovered());
    assert_eq!(taker.checkpoint(), Some(&b"step 3"[..]));
    // A key that is live in the target is kept.
    let entries = embedded.export_entries().unwrap();
    assert!(!pg.import_entry(&entries[0]).unwrap());

    // And back: from PostgreSQL into a fresh embedded store.
    let back_dir = tempfile::tempdir().unwrap();
    let back = idemstore::Store::open(back_dir.path(), idemstore::Options::default()).unwrap();
    for entry in pg.export_entries().unwrap() {
        assert!(back.import_entry(&entry).unwrap());
    }
    let Claim::Completed(replay) = back.claim("done", b"req done").unwrap() else { panic!("expected a replay") };
    assert_eq!(replay.outcome, b"the outcome");
    assert_eq!(back.claim("done", b"another").unwrap(), Claim::Mismatch);
    let again = acquired(back.claim("held", b"req held").unwrap());
    assert!(again.recovered(), "the in-flight claim moved back as an orphan");
    drop(pg);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async { drop_table(&admin(&url).await, &table).await });
}
