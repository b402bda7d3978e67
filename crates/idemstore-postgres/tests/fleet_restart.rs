//! Promise: a fleet of processes (real children of this test binary, which re-executes itself)
//! sharing one table under duplicate load, every key raced by all of them, while the server
//! crashes and restarts (`pg_ctl restart -m immediate`, twice), runs exactly one effect per key: the
//! holder of a key records its effect and retries its complete through the outage until it is
//! acknowledged (a retry of a complete that landed before the crash lost its answer is
//! `StaleToken`, and the key then holds that outcome); the others get `InProgress`, wait, and
//! then replay the outcome.
//!
//! The fleet runs with `OrphanPolicy::WaitForLease` and a lease longer than the outage: a restart
//! ends every session, so every incarnation lock is free until its store takes it again, and
//! with `TakeOver` a live holder's key may be taken over meanwhile (the crate's docs say so).
//! A claim that was committed but whose answer the crash lost has no holder to complete it: its
//! key is taken over once its lease ends, and the first effect of that key runs then.
//!
//! Needs `IDEMSTORE_PG_DATA` and `IDEMSTORE_PG_CTL` (`.ci/postgres.sh` sets them); skipped with a
//! message otherwise. Its own test binary: it restarts the server that the other test binaries
//! (run one after the other by `cargo test`) share.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use idemstore::{Claim, ClaimOptions, Entry, Error, OrphanPolicy};
use idemstore_postgres::{PgOptions, PgStore};

mod common;
use common::{
    CHILD_INDEX_ENV, CHILD_ROLE_ENV, CHILD_TABLE_ENV, ChildProcess, admin, drop_table, pg_url, restart_server,
    spawn_child, unique_table, wait_for_line,
};

const TEST: &str = "a_fleet_under_duplicate_load_runs_one_effect_per_key_across_a_server_restart";
const KEYS: usize = 600;
const PROCESSES: usize = 4;
/// Longer than the outage, so that no live holder is taken over: see the module's docs.
const LEASE: Duration = Duration::from_secs(8);
/// A child stops on its own after this long, so it never outlives a crashed parent.
const CHILD_LIFETIME_MAX: Duration = Duration::from_secs(120);

fn fleet_options(table: &str) -> PgOptions {
    PgOptions { orphans: OrphanPolicy::WaitForLease, default_lease: LEASE, claim_batches: 2, ..common::options(table) }
}

/// Calls that failed while the server was away, in this (child) process.
static OUTAGE_ERRORS: AtomicUsize = AtomicUsize::new(0);

/// Calls `op` until it answers, pausing while the server is away; panics on an answer that is
/// not an I/O error (the contract's errors are never expected here).
fn through_outage<T>(index: usize, started: Instant, mut op: impl FnMut() -> idemstore::Result<T>) -> T {
    loop {
        assert!(started.elapsed() < CHILD_LIFETIME_MAX, "child {index} ran too long");
        match op() {
            Ok(answer) => return answer,
            Err(Error::Io { .. }) => {
                OUTAGE_ERRORS.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(other) => panic!("child {index}: {other:?}"),
        }
    }
}

/// Records `key`'s effect as run by the holding of `fence` on `client` (connected anew when
/// gone); recording the same holding twice (a retry whose first answer the crash lost) keeps
/// one row.
fn record_effect(
    runtime: &tokio::runtime::Runtime,
    client: &mut Option<tokio_postgres::Client>,
    url: &str,
    table: &str,
    key: &str,
    fence: i64,
) -> Result<(), String> {
    runtime.block_on(async {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            let (fresh, connection) =
                tokio_postgres::connect(url, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            *client = Some(fresh);
        }
        let Some(client) = client.as_ref() else { return Err("no connection".to_owned()) };
        client
            .execute(
                &format!("INSERT INTO {table}_effects (key, fence) VALUES ($1, $2) ON CONFLICT DO NOTHING"),
                &[&key, &fence],
            )
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
}

fn fleet_child(url: &str, table: &str, index: usize) {
    let started = Instant::now();
    let store = through_outage(index, started, || PgStore::connect(url, fleet_options(table)));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut effects = None;
    // Each child goes through the keys from its own starting point: every key is raced.
    let order = (0..KEYS).map(|i| (i + index * KEYS / PROCESSES) % KEYS);
    let waiting = ClaimOptions { wait: Some(Duration::from_secs(2)), ..Default::default() };
    for i in order {
        let key = format!("key-{i}");
        loop {
            match through_outage(index, started, || store.claim_with(&key, b"the one request", waiting.clone())) {
                Claim::Acquired(token) => {
                    while let Err(e) = record_effect(&runtime, &mut effects, url, table, &key, token.id() as i64) {
                        assert!(started.elapsed() < CHILD_LIFETIME_MAX, "child {index}: {e}");
                        OUTAGE_ERRORS.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let outcome = format!("done by {index}").into_bytes();
                    // A complete whose answer the crash lost may have landed: its retry is then
                    // `StaleToken`, and the key holds this outcome.
                    let landed = through_outage(index, started, || match store.complete(&token, &outcome) {
                        Err(Error::StaleToken) => store.get(&key).map(|entry| match entry {
                            Some(Entry::Completed(done)) => done.outcome == outcome,
                            _ => false,
                        }),
                        other => other.map(|()| true),
                    });
                    assert!(landed, "child {index}: the complete of {key} was refused and did not land");
                    break;
                }
                Claim::Completed(_) => break,
                Claim::InProgress { .. } => continue,
                Claim::Mismatch => panic!("the same request was answered Mismatch"),
            }
        }
        if i % 50 == 0 {
            println!("CHILD {index} AT {i}");
        }
    }
    let errors = OUTAGE_ERRORS.load(Ordering::Relaxed) as i64;
    runtime
        .block_on(async {
            admin(url).await.execute(&format!("INSERT INTO {table}_outages VALUES ($1)"), &[&errors]).await
        })
        .expect("record the outage errors");
    println!("CHILD DONE {index}");
}

#[test]
fn a_fleet_under_duplicate_load_runs_one_effect_per_key_across_a_server_restart() {
    let Some(url) = pg_url(TEST) else { return };
    if std::env::var(CHILD_ROLE_ENV).as_deref() == Ok("fleet") {
        let table = std::env::var(CHILD_TABLE_ENV).unwrap();
        let index = std::env::var(CHILD_INDEX_ENV).unwrap().parse().unwrap();
        fleet_child(&url, &table, index);
        return;
    }
    let Some((pg_ctl, data)) = common::pg_ctl_and_data(TEST) else { return };
    let table = unique_table("fleet_restart");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let started_at = || {
        runtime.block_on(async {
            let client = admin(&url).await;
            client.query_one("SELECT pg_postmaster_start_time()::text", &[]).await.unwrap().get::<_, String>(0)
        })
    };
    let before = started_at();
    runtime
        .block_on(async {
            admin(&url)
                .await
                .batch_execute(&format!(
                    "CREATE TABLE {table}_effects (key text NOT NULL, fence bigint NOT NULL, PRIMARY KEY (key, fence));
                     CREATE TABLE {table}_outages (errors bigint NOT NULL)"
                ))
                .await
        })
        .unwrap();
    // The schema once, so that the children race on keys rather than on migrations.
    drop(PgStore::connect(&url, fleet_options(&table)).unwrap());
    let mut children: Vec<ChildProcess> = (0..PROCESSES).map(|i| spawn_child(TEST, "fleet", &table, i)).collect();
    // The crash comes once every child is under way.
    for child in &mut children {
        wait_for_line(child, "AT");
    }
    // Two crashes, the second soon after the first, while every child is still at work.
    for _ in 0..2 {
        assert!(children.iter_mut().all(|c| c.0.try_wait().unwrap().is_none()), "a child finished before a crash");
        restart_server(&pg_ctl, &data);
        std::thread::sleep(Duration::from_millis(300));
    }
    for (i, child) in children.iter_mut().enumerate() {
        let status = child.0.wait().unwrap();
        assert!(status.success(), "child {i} failed: {status}");
    }
    drop(children);
    assert_ne!(started_at(), before, "the server was restarted");
    let (effects, keys, holdings, children_done, outage_errors): (i64, i64, i64, i64, i64) = runtime.block_on(async {
        let row = admin(&url)
            .await
            .query_one(
                &format!(
                    "SELECT count(*), count(DISTINCT key), count(DISTINCT (key, fence)),
                            (SELECT count(*) FROM {table}_outages), (SELECT sum(errors)::int8 FROM {table}_outages)
                     FROM {table}_effects"
                ),
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4))
    });
    assert_eq!(children_done, PROCESSES as i64);
    assert!(outage_errors > 0, "no call of the fleet met the outage");
    assert_eq!((effects, keys, holdings), (KEYS as i64, KEYS as i64, KEYS as i64), "exactly one effect per key");
    let store = PgStore::connect(&url, fleet_options(&table)).unwrap();
    for i in 0..KEYS {
        assert!(matches!(store.claim(format!("key-{i}"), b"the one request").unwrap(), Claim::Completed(_)), "key-{i}");
    }
    drop(store);
    runtime.block_on(async {
        let client = admin(&url).await;
        client.batch_execute(&format!("DROP TABLE {table}_effects, {table}_outages")).await.unwrap();
        drop_table(&client, &table).await;
    });
}
