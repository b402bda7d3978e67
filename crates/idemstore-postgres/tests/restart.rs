//! Promise: a server crash (`pg_ctl restart -m immediate`, no shutdown checkpoint: crash
//! recovery from the WAL at start) in the middle of load loses no claim and no complete that
//! `Durability::Sync` acknowledged; calls during the outage fail with a clear error, and the
//! store goes on by itself once the server is back.
//!
//! Needs the server's data directory and `pg_ctl` (`IDEMSTORE_PG_DATA`, `IDEMSTORE_PG_CTL`, and
//! `IDEMSTORE_PG_RUN_AS` when the server runs as another user), which `.ci/postgres.sh` sets;
//! skipped with a message otherwise. Its own test binary: it restarts the server that the other
//! test binaries (run one after the other by `cargo test`) share.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idemstore::{Claim, Entry};

mod common;
use common::{admin, connect, drop_table, pg_url, restart_server, unique_table};

const WRITERS: usize = 4;

#[derive(Default)]
struct Acks {
    /// key -> outcome, for each complete that returned Ok.
    completed: BTreeMap<String, Vec<u8>>,
    /// keys whose claim returned Acquired (and whose complete did not return Ok).
    claimed: Vec<String>,
    errors: usize,
}

#[test]
fn an_immediate_server_restart_mid_load_loses_no_acknowledged_claim_or_complete() {
    let test = "an_immediate_server_restart_mid_load_loses_no_acknowledged_claim_or_complete";
    let Some(url) = pg_url(test) else { return };
    let Some((pg_ctl, data)) = common::pg_ctl_and_data(test) else { return };
    let table = unique_table("restart");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let started_at = |url: &str| {
        runtime.block_on(async {
            let client = admin(url).await;
            let row = client.query_one("SELECT pg_postmaster_start_time()::text", &[]).await.unwrap();
            row.get::<_, String>(0)
        })
    };
    let before = started_at(&url);
    let store = Arc::new(connect(&url, &table));
    let acks = Arc::new(Mutex::new(Acks::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, acks, stop) = (store.clone(), acks.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let key = format!("w{w}-{i}");
                    let token = match store.claim(&key, b"req") {
                        Ok(Claim::Acquired(token)) => token,
                        Ok(other) => panic!("a fresh key answered {other:?}"),
                        Err(_) => {
                            acks.lock().unwrap().errors += 1;
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                    };
                    let outcome = format!("outcome of {key}").into_bytes();
                    match store.complete(&token, &outcome) {
                        Ok(()) => {
                            acks.lock().unwrap().completed.insert(key, outcome);
                        }
                        Err(_) => {
                            let mut acks = acks.lock().unwrap();
                            acks.errors += 1;
                            acks.claimed.push(key);
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let acked_before = acks.lock().unwrap().completed.len();
    restart_server(&pg_ctl, &data);
    // Load goes on until the store has completed a good number of keys after the restart.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acks.lock().unwrap().completed.len() < acked_before + 200 {
        assert!(Instant::now() < deadline, "the store did not recover after the restart");
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.join().expect("writer thread");
    }
    assert_ne!(started_at(&url), before, "the server was restarted");
    let acks = Arc::into_inner(acks).unwrap().into_inner().unwrap();
    assert!(acked_before > 0, "load ran before the restart");
    eprintln!(
        "{} completes and {} claims acknowledged ({} before the restart), {} calls failed during the outage",
        acks.completed.len(),
        acks.claimed.len(),
        acked_before,
        acks.errors
    );
    for (key, outcome) in &acks.completed {
        match store.get(key).unwrap() {
            Some(Entry::Completed(done)) => assert_eq!(&done.outcome, outcome, "{key}"),
            other => panic!("acknowledged complete of {key} lost: {other:?}"),
        }
    }
    for key in &acks.claimed {
        // Its complete failed, so the claim is in flight, or completed if the complete's commit
        // made it before the connection went.
        assert!(store.get(key).unwrap().is_some(), "acknowledged claim of {key} lost");
    }
    drop(store);
    runtime.block_on(async { drop_table(&admin(&url).await, &table).await });
}
