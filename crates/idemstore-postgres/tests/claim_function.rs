//! Promise: the claim is one server-side function, `<table>_claim_batch` (schema version 3), which
//! decides the claims of one statement in turn, each as alone. A table made by a version-1 build
//! is upgraded through the migration table when a store that manages
//! the schema opens it (or by the operator's script), keeping its rows; and claims racing on a
//! key that has a row, but no live holder (its lease ended, it expired, its holder is dead),
//! have exactly one winner: the others see the winner in flight, also where the server's
//! default isolation is SERIALIZABLE. An answer that keeps nothing (a replay, `InProgress`,
//! `Mismatch`) commits without waiting for a WAL flush; an acquisition waits, and so does every
//! answer of a statement that acquired one of its keys.

use std::sync::Arc;
use std::time::Duration;

use idemstore::{Claim, ClaimOptions, DedupeStore, Durability, Entry, Error, request_hash};
use idemstore_postgres::{PgOptions, PgStore, SCHEMA_VERSION, schema_sql, schema_sql_at};

mod common;
use common::{acquired, admin, connect, drop_table, pg_url, unique_table};

async fn version(admin: &tokio_postgres::Client, table: &str) -> i32 {
    admin.query_one(&format!("SELECT max(version) FROM {table}_migrations"), &[]).await.unwrap().get(0)
}

/// Whether the claim functions of this build (and, for replicas of the build before during a
/// rolling upgrade, of that one) are there.
async fn has_claim_function(admin: &tokio_postgres::Client, table: &str) -> bool {
    admin
        .query_one(
            "SELECT count(*) = 2 FROM pg_proc WHERE proname IN ($1, $2)",
            &[&format!("{table}_claim"), &format!("{table}_claim_batch")],
        )
        .await
        .unwrap()
        .get(0)
}

/// Rows as a version-1 build left them: a completed key, and an in-flight claim of incarnation
/// 0 (imported: an orphan of every process) with a checkpoint.
async fn version_1_rows(admin: &tokio_postgres::Client, table: &str) {
    let hash = request_hash(b"req").to_be_bytes();
    admin
        .execute(
            &format!(
                "WITH now AS (SELECT floor(date_part('epoch', statement_timestamp()) * 1000)::int8 AS ms)
                 INSERT INTO {table} (key, request_hash, completed, fence, incarnation, recovered, claimed_at_ms,
                     lease_ms, lease_until_ms, expires_at_ms, completed_at_ms, value)
                 SELECT 'done'::bytea, $1::bytea, true, nextval('{table}_fence'), 7, false, ms, 30000, ms + 30000,
                        ms + 3600000, ms, 'out'::bytea FROM now
                 UNION ALL
                 SELECT 'held'::bytea, $1::bytea, false, nextval('{table}_fence'), 0, false, ms, 600000, ms + 600000,
                        ms + 3600000, NULL, 'step 1'::bytea FROM now"
            ),
            &[&&hash[..]],
        )
        .await
        .unwrap();
}

/// Claims on the upgraded table: a fresh key, a replay, a mismatch and a takeover of the
/// version-1 rows.
fn claims_work(store: &PgStore) {
    let _held_on = acquired(store.claim("new", b"req").unwrap());
    let Claim::Completed(done) = store.claim("done", b"req").unwrap() else { panic!("expected a replay") };
    assert_eq!(done.outcome, b"out");
    assert_eq!(store.claim("done", b"other").unwrap(), Claim::Mismatch);
    let taker = acquired(store.claim("held", b"req").unwrap());
    assert!(taker.recovered());
    assert_eq!(taker.checkpoint(), Some(&b"step 1"[..]));
    store.complete(&taker, b"finished").unwrap();
    assert!(matches!(store.get("held").unwrap(), Some(Entry::Completed(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_1_table_is_upgraded_at_connect_and_claims_work() {
    let Some(url) = pg_url("schema_upgrade") else { return };
    let table = unique_table("upgrade");
    let admin = admin(&url).await;
    admin.batch_execute(&schema_sql_at(&table, Durability::Sync, 1).unwrap()).await.unwrap();
    version_1_rows(&admin, &table).await;
    assert_eq!(version(&admin, &table).await, 1);
    assert!(!has_claim_function(&admin, &table).await);
    // A store that leaves the schema to the operator refuses the old version (an error, from
    // inside a runtime too, not a panic).
    let manual = PgOptions { manage_schema: false, ..common::options(&table) };
    match PgStore::connect(&url, manual.clone()) {
        Err(Error::UnsupportedVersion { found: 1, supported, .. }) if supported as i32 == SCHEMA_VERSION => {}
        other => panic!("expected UnsupportedVersion 1 of {SCHEMA_VERSION}, got {other:?}"),
    }
    // One that manages it upgrades it, keeping the rows.
    let store = connect(&url, &table);
    assert_eq!(version(&admin, &table).await, SCHEMA_VERSION);
    assert!(has_claim_function(&admin, &table).await);
    claims_work(&store);
    drop(store);
    // Upgraded once: the next store and the operator's check accept it as it is.
    let again = connect(&url, &table);
    assert!(matches!(again.claim("done", b"req").unwrap(), Claim::Completed(_)));
    drop(again);
    let checked = PgStore::connect(&url, manual).unwrap();
    assert!(matches!(checked.claim("done", b"req").unwrap(), Claim::Completed(_)));
    drop(checked);
    drop_table(&admin, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operators_script_upgrades_a_version_1_table() {
    let Some(url) = pg_url("schema_upgrade_by_script") else { return };
    let table = unique_table("upgrade");
    let admin = admin(&url).await;
    admin.batch_execute(&schema_sql_at(&table, Durability::Sync, 1).unwrap()).await.unwrap();
    version_1_rows(&admin, &table).await;
    admin.batch_execute(&schema_sql(&table, Durability::Sync).unwrap()).await.unwrap();
    assert_eq!(version(&admin, &table).await, SCHEMA_VERSION);
    let store = PgStore::connect(&url, PgOptions { manage_schema: false, ..common::options(&table) }).unwrap();
    claims_work(&store);
    drop(store);
    drop_table(&admin, &table).await;
}

/// Sixteen concurrent claims of `key` through the replicas (spread over their pools, so over
/// sixteen server sessions at once): exactly one `Acquired`, whose token is returned, and the
/// rest `InProgress`, with the winner's lease when `winners_lease` (a claim that finds an
/// orphan while another claim holds its incarnation lock to take it over cannot tell that
/// one from a live holder, and answers from the row it read: the dead holder's lease).
async fn race(replicas: &[Arc<PgStore>], key: &str, winners_lease: bool) -> idemstore::ClaimToken {
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (store, key) = (replicas[i % replicas.len()].clone(), key.to_owned());
        tasks.push(tokio::spawn(async move { DedupeStore::claim(&*store, key.as_bytes(), b"req").await.unwrap() }));
    }
    let (mut winners, mut leases) = (Vec::new(), Vec::new());
    for task in tasks {
        match task.await.unwrap() {
            Claim::Acquired(token) => winners.push(token),
            Claim::InProgress { lease_expires_at, .. } => leases.push(lease_expires_at),
            other => panic!("{key}: unexpected {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "{key}: {} winners", winners.len());
    let winner = winners.pop().unwrap();
    if winners_lease {
        for lease in leases {
            assert_eq!(lease, winner.lease_expires_at(), "{key}: a loser saw another holder than the winner");
        }
    }
    winner
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_racing_on_a_key_without_a_live_holder_have_exactly_one_winner() {
    let Some(url) = pg_url("racing_takeovers") else { return };
    let table = unique_table("race");
    const KEYS: usize = 8;
    // The rows: in flight with a 1 s lease, completed with a 60 s TTL, and in flight for 10
    // minutes by a replica that then goes away.
    let holder = connect(&url, &table);
    let short_lease = ClaimOptions { lease: Some(Duration::from_secs(1)), ..Default::default() };
    let short_ttl = ClaimOptions { ttl: Some(Duration::from_secs(60)), ..Default::default() };
    for i in 0..KEYS {
        let held = acquired(holder.claim_with(format!("lease-{i}"), b"req", short_lease.clone()).unwrap());
        holder.checkpoint(&held, b"s").unwrap();
        let done = acquired(holder.claim_with(format!("expired-{i}"), b"req", short_ttl.clone()).unwrap());
        holder.complete(&done, b"old outcome").unwrap();
    }
    let gone = connect(&url, &table);
    let long_lease = ClaimOptions { lease: Some(Duration::from_secs(600)), ..Default::default() };
    for i in 0..KEYS {
        // Left in flight: `gone` goes away holding it.
        let _ = acquired(gone.claim_with(format!("orphan-{i}"), b"req", long_lease.clone()).unwrap());
    }
    gone.close().unwrap();
    // Four replicas whose clocks are 61 s on: every lease of 1 s ended, every TTL of 60 s
    // passed, and the orphans' leases still run.
    let replicas: Vec<Arc<PgStore>> = (0..4)
        .map(|_| {
            let store = connect(&url, &table);
            store.advance_clock(Duration::from_secs(61));
            Arc::new(store)
        })
        .collect();
    for i in 0..KEYS {
        let taker = race(&replicas, &format!("lease-{i}"), true).await;
        assert!(taker.recovered());
        assert_eq!(taker.checkpoint(), Some(&b"s"[..]));
        let fresh = race(&replicas, &format!("expired-{i}"), true).await;
        assert!(!fresh.recovered(), "an expired key is claimed afresh");
        let taker = race(&replicas, &format!("orphan-{i}"), false).await;
        assert!(taker.recovered());
    }
    let (mut lease_takeovers, mut orphan_takeovers, mut acquired_total) = (0, 0, 0);
    for store in &replicas {
        let stats = store.stats();
        lease_takeovers += stats.lease_takeovers_total;
        orphan_takeovers += stats.orphan_takeovers_total;
        acquired_total += stats.claims_acquired_total;
    }
    assert_eq!((acquired_total, lease_takeovers, orphan_takeovers), (3 * KEYS as u64, KEYS as u64, KEYS as u64));
    drop((holder, replicas));
    drop_table(&admin(&url).await, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_claim_reads_committed_whatever_the_servers_default_isolation() {
    let Some(url) = pg_url("racing_under_serializable") else { return };
    let table = unique_table("race");
    // The function relies on each of its statements seeing what committed before it: under a
    // default of SERIALIZABLE (set here through the URL, as a server's configuration could),
    // the one snapshot of the call would hide the row that its first insert conflicted with.
    let separator = if url.contains('?') { '&' } else { '?' };
    let strict = format!("{url}{separator}options=-c%20default_transaction_isolation%3Dserializable");
    let holder = connect(&strict, &table);
    let short_lease = ClaimOptions { lease: Some(Duration::from_secs(1)), ..Default::default() };
    for i in 0..4 {
        let held = acquired(holder.claim_with(format!("lease-{i}"), b"req", short_lease.clone()).unwrap());
        holder.checkpoint(&held, b"s").unwrap();
    }
    let replicas: Vec<Arc<PgStore>> = (0..4)
        .map(|_| {
            let store = PgStore::connect(&strict, common::options(&table)).expect("connect to postgres");
            store.advance_clock(Duration::from_secs(2));
            Arc::new(store)
        })
        .collect();
    for i in 0..4 {
        assert!(race(&replicas, &format!("lease-{i}"), true).await.recovered());
        // Fresh keys raced by all at once.
        let winner = race(&replicas, &format!("fresh-{i}"), true).await;
        assert!(!winner.recovered());
    }
    drop((holder, replicas));
    drop_table(&admin(&url).await, &table).await;
}

/// `synchronous_commit` in the transaction of one call of the claim function for `claims`
/// (key, request) in that order, made on an admin connection (whose default is on), and which
/// of them acquired their key.
async fn commit_mode_after_claims(
    admin: &tokio_postgres::Client,
    table: &str,
    claims: &[(&str, &[u8])],
) -> (Vec<bool>, String) {
    let keys: Vec<&[u8]> = claims.iter().map(|(key, _)| key.as_bytes()).collect();
    let hashes: Vec<Vec<u8>> = claims.iter().map(|(_, request)| request_hash(request).to_be_bytes().to_vec()).collect();
    let leases = vec![30_000i64; claims.len()];
    let ttls = vec![86_400_000i64; claims.len()];
    admin.batch_execute("BEGIN").await.unwrap();
    let acquired: Vec<bool> = admin
        .query_one(
            &format!(
                "SELECT array_agg(a.acquired ORDER BY n)
                 FROM unnest({table}_claim_batch(0, $1, $2, 12345, $3, $4, true)) WITH ORDINALITY AS a(acquired, fence, recovered, completed, request_hash, claimed_at_ms, lease_until_ms, expires_at_ms, completed_at_ms, value, orphan_takeover, now_ms, n)"
            ),
            &[&keys, &hashes, &leases, &ttls],
        )
        .await
        .unwrap()
        .get(0);
    let mode: String = admin.query_one("SHOW synchronous_commit", &[]).await.unwrap().get(0);
    admin.batch_execute("ROLLBACK").await.unwrap();
    (acquired, mode)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_that_keeps_nothing_does_not_wait_for_a_wal_flush() {
    let Some(url) = pg_url("answers_commit_asynchronously") else { return };
    let table = unique_table("commit");
    let store = connect(&url, &table);
    let done = acquired(store.claim("done", b"req").unwrap());
    store.complete(&done, b"out").unwrap();
    let _held = acquired(store.claim("held", b"req").unwrap());
    let admin = admin(&url).await;
    // A replay, a mismatch and an in-progress answer keep nothing (the fencing number drawn by
    // the call is kept durable by the claims that hold one): no flush to wait for.
    let off = |acquired: Vec<bool>| (acquired, "off".to_owned());
    let on = |acquired: Vec<bool>| (acquired, "on".to_owned());
    let req: &[u8] = b"req";
    assert_eq!(commit_mode_after_claims(&admin, &table, &[("done", req)]).await, off(vec![false]));
    assert_eq!(commit_mode_after_claims(&admin, &table, &[("done", b"other")]).await, off(vec![false]));
    assert_eq!(commit_mode_after_claims(&admin, &table, &[("held", req)]).await, off(vec![false]));
    assert_eq!(
        commit_mode_after_claims(&admin, &table, &[("done", req), ("held", req)]).await,
        off(vec![false, false])
    );
    // An acquisition, fresh or a takeover, waits for its flush as the session says, and so
    // does every answer of its statement.
    assert_eq!(commit_mode_after_claims(&admin, &table, &[("fresh", req)]).await, on(vec![true]));
    assert_eq!(
        commit_mode_after_claims(&admin, &table, &[("done", req), ("fresh", req), ("held", req)]).await,
        on(vec![false, true, false])
    );
    // A key twice in one statement: the second claim sees the first in flight.
    assert_eq!(
        commit_mode_after_claims(&admin, &table, &[("twice", req), ("twice", req)]).await,
        on(vec![true, false])
    );
    let expired = ClaimOptions { ttl: Some(Duration::from_millis(1)), ..Default::default() };
    let _old = acquired(store.claim_with("expired", b"req", expired).unwrap());
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(commit_mode_after_claims(&admin, &table, &[("expired", req)]).await, on(vec![true]));
    drop(store);
    drop_table(&admin, &table).await;
}
