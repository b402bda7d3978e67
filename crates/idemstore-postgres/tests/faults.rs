//! Promise: faults on a real server and real processes.
//!
//! - Several processes (real children of this test binary, which re-executes itself) under
//!   duplicate load on one table produce exactly one effect per key.
//! - A process killed with SIGKILL leaves claims that are orphans at once (its session ended,
//!   so its incarnation lock is free): the next claim takes each over inside its lease, with
//!   its checkpoint.
//! - A connection ended by the server (`pg_terminate_backend`) mid-statement is a clear error,
//!   and the next call reconnects.

use std::time::{Duration, Instant};

use idemstore::{Claim, ClaimOptions, Error};
use idemstore_postgres::PgStore;

mod common;
use common::{
    CHILD_INDEX_ENV, CHILD_ROLE_ENV, CHILD_TABLE_ENV, ChildProcess, acquired, admin, connect, drop_table, pg_url,
    spawn_child, unique_table, wait_for_line,
};

const KEYS: usize = 150;
const PROCESSES: usize = 4;
/// A child stops on its own after this long, so it never outlives a crashed parent.
const CHILD_LIFETIME_MAX: Duration = Duration::from_secs(60);

/// The effect each key stands for: a row in `<table>_effects`, written by whoever holds it.
async fn record_effect(client: &tokio_postgres::Client, table: &str, key: &str) {
    client
        .execute(
            &format!("INSERT INTO {table}_effects (key, pid) VALUES ($1, $2)"),
            &[&key, &(std::process::id() as i32)],
        )
        .await
        .expect("record the effect");
}

fn duplicate_load_child(url: &str, table: &str, index: usize) {
    let store = connect(url, table);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let effects = runtime.block_on(admin(url));
    let started = Instant::now();
    // Half the children go through the keys forwards, half backwards: every key is raced.
    let order: Vec<usize> = if index.is_multiple_of(2) { (0..KEYS).collect() } else { (0..KEYS).rev().collect() };
    let waiting = ClaimOptions { wait: Some(Duration::from_secs(10)), ..Default::default() };
    let mut mine = 0;
    for i in order {
        let key = format!("key-{i}");
        loop {
            assert!(started.elapsed() < CHILD_LIFETIME_MAX, "child {index} ran too long");
            match store.claim_with(&key, b"the one request", waiting.clone()).unwrap() {
                Claim::Acquired(token) => {
                    runtime.block_on(record_effect(&effects, table, &key));
                    store.complete(&token, format!("done by {}", std::process::id())).unwrap();
                    mine += 1;
                    break;
                }
                Claim::Completed(_) => break,
                Claim::InProgress { .. } => continue,
                Claim::Mismatch => panic!("the same request was answered Mismatch"),
            }
        }
    }
    println!("CHILD DONE {index} effects={mine}");
}

#[test]
fn several_processes_under_duplicate_load_produce_exactly_one_effect_per_key() {
    const TEST: &str = "several_processes_under_duplicate_load_produce_exactly_one_effect_per_key";
    let Some(url) = pg_url(TEST) else { return };
    if std::env::var(CHILD_ROLE_ENV).as_deref() == Ok("duplicate-load") {
        let table = std::env::var(CHILD_TABLE_ENV).unwrap();
        let index = std::env::var(CHILD_INDEX_ENV).unwrap().parse().unwrap();
        duplicate_load_child(&url, &table, index);
        return;
    }
    let table = unique_table("fleet");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let admin_client = runtime.block_on(admin(&url));
    runtime
        .block_on(async {
            admin_client
                .batch_execute(&format!("CREATE TABLE {table}_effects (key text NOT NULL, pid int NOT NULL)"))
                .await
        })
        .unwrap();
    // Create the schema once, so the children race on keys rather than on migrations.
    drop(connect(&url, &table));
    let mut children: Vec<ChildProcess> =
        (0..PROCESSES).map(|i| spawn_child(TEST, "duplicate-load", &table, i)).collect();
    let mut total_effects = 0;
    for (i, child) in children.iter_mut().enumerate() {
        let done = wait_for_line(child, "CHILD DONE");
        let status = child.0.wait().unwrap();
        assert!(status.success(), "child {i} failed: {status}");
        total_effects += done.rsplit("effects=").next().unwrap().parse::<usize>().unwrap();
    }
    assert_eq!(total_effects, KEYS, "the children together ran one effect per key");
    let (effects, keys): (i64, i64) = runtime.block_on(async {
        let row = admin_client
            .query_one(&format!("SELECT count(*), count(DISTINCT key) FROM {table}_effects"), &[])
            .await
            .unwrap();
        (row.get(0), row.get(1))
    });
    assert_eq!((effects, keys), (KEYS as i64, KEYS as i64), "exactly one effect per key");
    let store = connect(&url, &table);
    for i in 0..KEYS {
        assert!(matches!(store.claim(format!("key-{i}"), b"the one request").unwrap(), Claim::Completed(_)));
    }
    drop(store);
    runtime.block_on(async {
        admin_client.batch_execute(&format!("DROP TABLE {table}_effects")).await.unwrap();
        drop_table(&admin_client, &table).await;
    });
}

#[test]
fn a_killed_processes_claims_are_orphans_at_once() {
    const TEST: &str = "a_killed_processes_claims_are_orphans_at_once";
    let Some(url) = pg_url(TEST) else { return };
    let lease = ClaimOptions { lease: Some(Duration::from_secs(600)), ..Default::default() };
    if std::env::var(CHILD_ROLE_ENV).as_deref() == Ok("holder") {
        let table = std::env::var(CHILD_TABLE_ENV).unwrap();
        let store = connect(&url, &table);
        for i in 0..3 {
            let token = acquired(store.claim_with(format!("k{i}"), b"req", lease.clone()).unwrap());
            store.checkpoint(&token, format!("step {i}")).unwrap();
            std::mem::forget(token);
        }
        println!("HOLDER READY");
        std::thread::sleep(CHILD_LIFETIME_MAX);
        return;
    }
    let table = unique_table("killed");
    let mut child = spawn_child(TEST, "holder", &table, 0);
    wait_for_line(&mut child, "HOLDER READY");
    let store = connect(&url, &table);
    assert!(matches!(store.claim_with("k0", b"req", lease.clone()).unwrap(), Claim::InProgress { .. }), "alive");
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.orphans().unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "the killed process's claims never became orphans");
        std::thread::sleep(Duration::from_millis(10));
    }
    for i in 0..3 {
        let taker = acquired(store.claim_with(format!("k{i}"), b"req", lease.clone()).unwrap());
        assert!(taker.recovered());
        assert_eq!(taker.checkpoint(), Some(format!("step {i}").as_bytes()));
        store.complete(&taker, b"finished by the survivor").unwrap();
    }
    assert_eq!(store.stats().orphan_takeovers_total, 3, "taken over inside the 10-minute lease");
    drop(store);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async { drop_table(&admin(&url).await, &table).await });
}

#[test]
fn a_connection_ended_mid_statement_is_a_clear_error_and_the_next_call_reconnects() {
    let Some(url) = pg_url("terminated_connection") else { return };
    let table = unique_table("terminated");
    let app = table.clone();
    let separator = if url.contains('?') { '&' } else { '?' };
    let store_url = format!("{url}{separator}application_name={app}");
    let store = std::sync::Arc::new(
        PgStore::connect(&store_url, idemstore_postgres::PgOptions { pool_size: 1, ..common::options(&table) })
            .unwrap(),
    );
    // A holder whose lease has ended: the next claim is a takeover, which writes the row.
    let _old = acquired(store.claim("k", b"req").unwrap());
    store.advance_clock(Duration::from_secs(31));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut admin_client = runtime.block_on(admin(&url));
    // Hold the key's row, so the store's takeover waits inside its statement.
    let tx = runtime.block_on(admin_client.transaction()).unwrap();
    runtime.block_on(tx.execute(&format!("SELECT 1 FROM {table} WHERE key = 'k'::bytea FOR UPDATE"), &[])).unwrap();
    let claimer = {
        let store = store.clone();
        std::thread::spawn(move || store.claim("k", b"req"))
    };
    let lock_pid = store.lock_backend_pid();
    let deadline = Instant::now() + Duration::from_secs(10);
    let waiting_pid = loop {
        let row = runtime
            .block_on(tx.query_opt(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND pid <> $2 AND wait_event_type = 'Lock'",
                &[&app, &lock_pid],
            ))
            .unwrap();
        if let Some(row) = row {
            break row.get::<_, i32>(0);
        }
        assert!(Instant::now() < deadline, "the store's claim never waited on the row");
        std::thread::sleep(Duration::from_millis(10));
    };
    runtime.block_on(tx.execute("SELECT pg_terminate_backend($1)", &[&waiting_pid])).unwrap();
    let answer = claimer.join().unwrap();
    match &answer {
        Err(Error::Io { context, source, .. }) => {
            assert_eq!(*context, "claiming a key");
            let message = source.to_string();
            assert!(!message.is_empty(), "the error carries the server's message");
            eprintln!("the claim whose connection was ended failed with: {context}: {message}");
        }
        other => panic!("expected a clear Io error, got {other:?}"),
    }
    runtime.block_on(tx.rollback()).unwrap();
    // The next call gets a new connection.
    assert!(acquired(store.claim("k", b"req").unwrap()).recovered());
    let token = acquired(store.claim("k2", b"req").unwrap());
    store.complete(&token, b"ok").unwrap();
    drop(store);
    runtime.block_on(drop_table(&admin_client, &table));
}
