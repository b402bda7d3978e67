//! Promise: claims made while `PgOptions::claim_batches` statements are out ride the next
//! statement together, and each gets the answer it would get alone: the stored outcome, a
//! mismatch, the holder in flight, a takeover of an expired key or of a dead holder's, and of
//! one key claimed many times at once exactly one `Acquired`.

use std::sync::Arc;
use std::time::Duration;

use idemstore::{Claim, DedupeStore};
use idemstore_postgres::{PgOptions, PgStore};

mod common;
use common::{acquired, admin, drop_table, pg_url, unique_table};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_that_ride_one_statement_are_each_answered_as_alone() {
    let Some(url) = pg_url("claims_ride_one_statement") else { return };
    let table = unique_table("batches");
    let options = PgOptions { claim_batches: 1, ..common::options(&table) };
    let store = Arc::new(PgStore::connect(&url, options.clone()).unwrap());
    let other = PgStore::connect(&url, options).unwrap();

    let done = acquired(store.claim("done", b"req").unwrap());
    store.complete(&done, b"the outcome").unwrap();
    let _mine = acquired(store.claim("mine", b"req").unwrap());
    let orphaned = acquired(other.claim("orphaned", b"req").unwrap());
    other.checkpoint(&orphaned, b"step 1").unwrap();
    // `other` ends: its in-flight claims are orphans, taken over at once.
    other.close().unwrap();

    let short = idemstore::ClaimOptions { ttl: Some(Duration::from_secs(1)), ..Default::default() };
    let _expiring = acquired(store.claim_with("expiring", b"req", short).unwrap());
    store.advance_clock(Duration::from_secs(2));

    let before = store.stats().claim_statements_total;
    let mut claims: Vec<(&str, &[u8])> = vec![
        ("done", b"req"),
        ("done", b"other"),
        ("mine", b"req"),
        ("orphaned", b"req"),
        ("expiring", b"req"),
        ("fresh-a", b"req"),
        ("fresh-b", b"req"),
    ];
    claims.extend(std::iter::repeat_n(("contended", &b"req"[..]), 10));
    let answers = futures_util::future::join_all(
        claims.iter().map(|(key, request)| DedupeStore::claim(&*store, key.as_bytes(), request)),
    )
    .await;
    let statements = store.stats().claim_statements_total - before;
    assert!(
        statements < claims.len() as u64,
        "{} claims took {statements} statements: none rode together",
        claims.len()
    );

    let answers: Vec<Claim> = answers.into_iter().map(|a| a.unwrap()).collect();
    let Claim::Completed(replay) = &answers[0] else { panic!("a replay, got {:?}", answers[0]) };
    assert_eq!(replay.outcome, b"the outcome");
    assert_eq!(answers[1], Claim::Mismatch);
    assert!(matches!(answers[2], Claim::InProgress { .. }), "the holder in flight, got {:?}", answers[2]);
    let Claim::Acquired(taken) = &answers[3] else { panic!("an orphan taken over, got {:?}", answers[3]) };
    assert!(taken.recovered());
    assert_eq!(taken.checkpoint(), Some(&b"step 1"[..]));
    let Claim::Acquired(renewed) = &answers[4] else { panic!("an expired key claimed afresh, got {:?}", answers[4]) };
    assert!(!renewed.recovered());
    assert!(matches!(answers[5], Claim::Acquired(_)) && matches!(answers[6], Claim::Acquired(_)));
    let contended = &answers[7..];
    let winners = contended.iter().filter(|a| matches!(a, Claim::Acquired(_))).count();
    let in_progress = contended.iter().filter(|a| matches!(a, Claim::InProgress { .. })).count();
    assert_eq!((winners, in_progress), (1, contended.len() - 1), "{contended:?}");

    drop(store);
    drop_table(&admin(&url).await, &table).await;
}

/// An admin transaction that has inserted the rows of `keys` and not committed: a claim of
/// one of them waits for it (its insert's conflict check waits for the inserter).
async fn hold_uncommitted_rows(url: &str, table: &str, keys: &[&str]) -> tokio_postgres::Client {
    let holder = admin(url).await;
    holder.batch_execute("BEGIN").await.unwrap();
    for key in keys {
        holder
            .execute(
                &format!(
                    "INSERT INTO {table} (key, request_hash, completed, fence, incarnation, recovered, claimed_at_ms,
                         lease_ms, lease_until_ms, expires_at_ms)
                     VALUES ($1, '\\x00'::bytea, false, nextval('{table}_fence'), 0, false, 0, 1, 1, 1)"
                ),
                &[&key.as_bytes()],
            )
            .await
            .unwrap();
    }
    holder
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_does_not_wait_behind_statements_stuck_on_other_keys() {
    let Some(url) = pg_url("claims_pass_stuck_statements") else { return };
    let table = unique_table("batches");
    let store = Arc::new(PgStore::connect(&url, PgOptions { claim_batches: 1, ..common::options(&table) }).unwrap());
    let holder = hold_uncommitted_rows(&url, &table, &["locked"]).await;
    // Every claim slot (one) is out, stuck on the row lock.
    let stuck_store = store.clone();
    let stuck = tokio::spawn(async move { DedupeStore::claim(&*stuck_store, b"locked", b"req").await });
    while store.stats().claim_statements_total == 0 {
        tokio::task::yield_now().await;
    }
    let free = tokio::time::timeout(Duration::from_secs(20), DedupeStore::claim(&*store, b"free", b"req")).await;
    let free = free.expect("a claim of another key waited for the stuck statement").unwrap();
    assert!(matches!(free, Claim::Acquired(_)), "{free:?}");
    assert!(!stuck.is_finished());
    // The lock goes (the row was never committed): the stuck claim acquires.
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert!(matches!(stuck.await.unwrap().unwrap(), Claim::Acquired(_)));
    drop(store);
    drop_table(&admin(&url).await, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_held_elsewhere_does_not_hold_up_the_claims_that_ride_with_it() {
    let Some(url) = pg_url("riders_pass_a_held_key") else { return };
    let table = unique_table("batches");
    let store = Arc::new(PgStore::connect(&url, PgOptions { claim_batches: 1, ..common::options(&table) }).unwrap());
    let holder = hold_uncommitted_rows(&url, &table, &["held-a", "held-b"]).await;
    // The one slot waits on held-a; the rest queue and, after the slot's wait, ride one call
    // with held-b among them.
    let spawn_claim = |key: &'static str| {
        let store = store.clone();
        tokio::spawn(async move { DedupeStore::claim(&*store, key.as_bytes(), b"req").await })
    };
    let first = spawn_claim("held-a");
    while store.stats().claim_statements_total == 0 {
        tokio::task::yield_now().await;
    }
    let riders: Vec<_> =
        ["free-1", "held-b", "free-2", "free-3"].into_iter().map(|key| (key, spawn_claim(key))).collect();
    let mut held_b = None;
    for (key, rider) in riders {
        if key == "held-b" {
            held_b = Some(rider);
            continue;
        }
        let answer = tokio::time::timeout(Duration::from_secs(20), rider).await;
        let answer = answer.unwrap_or_else(|_| panic!("{key} waited for a key held elsewhere")).unwrap().unwrap();
        assert!(matches!(answer, Claim::Acquired(_)), "{key}: {answer:?}");
    }
    let held_b = held_b.unwrap();
    assert!(!first.is_finished() && !held_b.is_finished());
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert!(matches!(first.await.unwrap().unwrap(), Claim::Acquired(_)));
    assert!(matches!(held_b.await.unwrap().unwrap(), Claim::Acquired(_)));
    drop(store);
    drop_table(&admin(&url).await, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replays_too_large_to_share_a_statement_are_answered_one_by_one() {
    let Some(url) = pg_url("large_replays_ride_apart") else { return };
    let table = unique_table("batches");
    // Thirteen replays of an 80 MiB outcome in one statement would build a 1 GiB answer, past
    // what PostgreSQL holds in one value: the server refuses the statement.
    const SIZE: usize = 80 << 20;
    let options = PgOptions { claim_batches: 1, max_outcome_len: SIZE, ..common::options(&table) };
    let store = Arc::new(PgStore::connect(&url, options).unwrap());
    let big = vec![7u8; SIZE];
    let token = acquired(store.claim("big", b"req").unwrap());
    store.complete(&token, &big).unwrap();
    // The first claim holds the one slot while the rest queue behind it.
    let holder = hold_uncommitted_rows(&url, &table, &["gate"]).await;
    let gate_store = store.clone();
    let gate = tokio::spawn(async move { DedupeStore::claim(&*gate_store, b"gate", b"req").await });
    while store.stats().claim_statements_total < 2 {
        tokio::task::yield_now().await;
    }
    let replays: Vec<_> = (0..14)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { DedupeStore::claim(&*store, b"big", b"req").await })
        })
        .collect();
    // Time for the replays to queue behind the gate (any that come later ride together too).
    tokio::time::sleep(Duration::from_millis(50)).await;
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert!(matches!(gate.await.unwrap().unwrap(), Claim::Acquired(_)));
    for replay in replays {
        let Claim::Completed(done) = replay.await.unwrap().unwrap() else { panic!("a replay") };
        assert!(done.outcome == big, "the outcome, byte for byte");
    }
    drop(store);
    drop_table(&admin(&url).await, &table).await;
}
