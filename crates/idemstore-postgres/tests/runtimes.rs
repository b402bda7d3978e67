//! Promise: a store made by `PgStore::connect_async` runs on the caller's runtime and never
//! panics or hangs there. Its async methods work; its blocking methods work from every thread
//! on a multi-thread runtime, and are refused with `InvalidArgument` from every thread on a
//! current-thread runtime (which runs only while its own thread drives it); a runtime without
//! I/O or timers is refused at connect. Once its runtime is gone, every call is an error.

use std::sync::Arc;

use idemstore::{Claim, DedupeStore, Error};
use idemstore_postgres::PgStore;

mod common;
use common::{acquired, admin, drop_table, pg_url, unique_table};

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn on_a_current_thread_runtime_the_blocking_methods_are_refused_from_every_thread() {
    let Some(url) = pg_url("connect_async_current_thread") else { return };
    let table = unique_table("runtimes");
    let runtime = current_thread_runtime();
    let store = Arc::new(runtime.block_on(PgStore::connect_async(&url, common::options(&table))).unwrap());
    let refused = |answer: idemstore::Result<Claim>| match answer {
        Err(Error::InvalidArgument(why)) => assert!(why.contains("DedupeStore"), "{why}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    runtime.block_on(async {
        let token = acquired(DedupeStore::claim(&*store, b"async", b"req").await.unwrap());
        DedupeStore::complete(&*store, &token, b"out").await.unwrap();
        // On the runtime's own thread, on its blocking pool, and outside it while nothing
        // drives it: none of them may wait for the runtime.
        refused(store.claim("blocking", b"req"));
        let pooled = store.clone();
        refused(tokio::task::spawn_blocking(move || pooled.claim("blocking", b"req")).await.unwrap());
    });
    let outside = store.clone();
    refused(std::thread::spawn(move || outside.claim("blocking", b"req")).join().unwrap());
    let Claim::Completed(done) = runtime.block_on(DedupeStore::claim(&*store, b"async", b"req")).unwrap() else {
        panic!("a replay")
    };
    assert_eq!(done.outcome, b"out");
    let store = Arc::into_inner(store).unwrap();
    runtime.block_on(store.close_async()).unwrap();
    runtime.block_on(async { drop_table(&admin(&url).await, &table).await });
}

#[test]
fn a_runtime_without_io_or_timers_is_refused_at_connect() {
    let Some(url) = pg_url("connect_async_runtime_features") else { return };
    let table = unique_table("runtimes");
    let without_timers = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_io().build().unwrap();
    let without_io = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_time().build().unwrap();
    for runtime in [without_timers, without_io] {
        match runtime.block_on(PgStore::connect_async(&url, common::options(&table))) {
            Err(Error::InvalidArgument(why)) => assert!(why.contains("enable_all"), "{why}"),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }
    // Nothing was made but, perhaps, the schema.
    current_thread_runtime().block_on(async { drop_table(&admin(&url).await, &table).await });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_multi_thread_runtime_the_blocking_methods_work_from_its_workers() {
    let Some(url) = pg_url("connect_async_multi_thread") else { return };
    let table = unique_table("runtimes");
    let store = PgStore::connect_async(&url, common::options(&table)).await.unwrap();
    let token = acquired(store.claim("blocking", b"req").unwrap());
    store.complete(&token, b"out").unwrap();
    let Claim::Completed(done) = DedupeStore::claim(&store, b"blocking", b"req").await.unwrap() else {
        panic!("a replay")
    };
    assert_eq!(done.outcome, b"out");
    store.close().unwrap();
    drop_table(&admin(&url).await, &table).await;
}

#[test]
fn once_its_runtime_is_gone_every_call_is_an_error() {
    let Some(url) = pg_url("connect_async_runtime_gone") else { return };
    let table = unique_table("runtimes");
    for multi_thread in [false, true] {
        let runtime = if multi_thread {
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
        } else {
            current_thread_runtime()
        };
        let store = runtime.block_on(PgStore::connect_async(&url, common::options(&table))).unwrap();
        let _held = acquired(runtime.block_on(DedupeStore::claim(&store, b"held", b"req")).unwrap());
        drop(runtime);
        // The blocking methods are refused on a current-thread runtime's store in any case.
        let blocking_error = |result: idemstore::Result<()>| match result {
            Err(Error::Io { .. }) => multi_thread,
            Err(Error::InvalidArgument(_)) => !multi_thread,
            _ => false,
        };
        assert!(blocking_error(store.claim("after", b"req").map(drop)));
        assert!(blocking_error(store.get("held").map(drop)));
        let elsewhere = current_thread_runtime();
        assert!(matches!(elsewhere.block_on(DedupeStore::claim(&store, b"after", b"req")), Err(Error::Io { .. })));
        assert!(store.close().is_err());
    }
    current_thread_runtime().block_on(async { drop_table(&admin(&url).await, &table).await });
}
