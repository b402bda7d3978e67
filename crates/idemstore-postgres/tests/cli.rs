//! Promise: `idemstore-pg import` copies a live embedded store's window into PostgreSQL, and
//! `idemstore-pg export` copies it back into a new store, keeping outcomes, request hashes and
//! in-flight claims (as orphans taken over with their checkpoints); `idemstore-pg schema`
//! prints the schema, claim function included; bad arguments are refused with the usage. Runs
//! the real binary.

use std::process::Command;

use idemstore::{Claim, Options, Store};

mod common;
use common::{acquired, admin, connect, drop_table, pg_url, unique_table};

fn idemstore_pg(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_idemstore-pg")).args(args).output().expect("run idemstore-pg")
}

#[test]
fn schema_prints_the_sql_and_bad_arguments_are_refused() {
    let out = idemstore_pg(&["schema", "--table", "orders_dedupe", "--durability", "none"]);
    assert!(out.status.success());
    let sql = String::from_utf8(out.stdout).unwrap();
    assert!(sql.contains("CREATE UNLOGGED TABLE IF NOT EXISTS orders_dedupe ("), "{sql}");
    assert!(sql.contains("orders_dedupe_migrations"));
    assert!(sql.contains("CREATE OR REPLACE FUNCTION orders_dedupe_claim("), "{sql}");
    let bad = idemstore_pg(&["import", "--bogus"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("usage:"));
    let bad_table = idemstore_pg(&["schema", "--table", "Robert'); DROP TABLE students;--"]);
    assert!(!bad_table.status.success());
}

#[test]
fn import_then_export_moves_a_live_window_both_ways() {
    let Some(url) = pg_url("cli import/export") else { return };
    let table = unique_table("cli");
    let dir = tempfile::tempdir().unwrap();
    // The source store stays open (live) while it is imported.
    let live = Store::open(dir.path(), Options::default()).unwrap();
    let done = acquired(live.claim("done", b"req").unwrap());
    live.complete(&done, b"outcome").unwrap();
    let held = acquired(live.claim("held", b"req").unwrap());
    live.checkpoint(&held, b"step 2").unwrap();
    let out = idemstore_pg(&["import", "--from-store", dir.path().to_str().unwrap(), "--url", &url, "--table", &table]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("imported 2 of 2 keys"));

    let pg = connect(&url, &table);
    let Claim::Completed(replay) = pg.claim("done", b"req").unwrap() else { panic!("expected a replay") };
    assert_eq!(replay.outcome, b"outcome");
    assert_eq!(pg.claim("done", b"other").unwrap(), Claim::Mismatch);
    assert_eq!(pg.orphans().unwrap().len(), 1);
    drop(pg);

    let back = tempfile::tempdir().unwrap();
    let back_dir = back.path().join("store");
    let out = idemstore_pg(&["export", "--to-store", back_dir.to_str().unwrap(), "--url", &url, "--table", &table]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("exported 2 of 2 keys"));
    let store = Store::open(&back_dir, Options::default()).unwrap();
    let Claim::Completed(replay) = store.claim("done", b"req").unwrap() else { panic!("expected a replay") };
    assert_eq!(replay.outcome, b"outcome");
    let taker = acquired(store.claim("held", b"req").unwrap());
    assert!(taker.recovered());
    assert_eq!(taker.checkpoint(), Some(&b"step 2"[..]));
    drop(live);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async { drop_table(&admin(&url).await, &table).await });
}
