//! Promise: a store made by `PgStore::connect_async` runs on the caller's runtime and never
//! panics or hangs there. Its async methods work; its blocking methods work from a worker of a
//! multi-thread runtime and from a thread outside the runtime, and fail with `InvalidArgument`
//! on the thread of its own current-thread runtime (which would wait for itself). Once its
//! runtime is gone, every call is an error.

use std::sync::Arc;

use idemstore::{Claim, DedupeStore, Error};
use idemstore_postgres::PgStore;

mod common;
use common::{acquired, admin, drop_table, pg_url, unique_table};

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn on_a_current_thread_runtime_the_blocking_methods_are_refused_on_its_thread_only() {
    let Some(url) = pg_url("connect_async_current_thread") else { return };
    let table = unique_table("runtimes");
    let runtime = current_thread_runtime();
    let store = Arc::new(runtime.block_on(PgStore::connect_async(&url, common::options(&table))).unwrap());
    runtime.block_on(async {
        let token = acquired(DedupeStore::claim(&*store, b"async", b"req").await.unwrap());
        DedupeStore::complete(&*store, &token, b"out").await.unwrap();
        match store.claim("blocking", b"req") {
            Err(Error::InvalidArgument(why)) => assert!(why.contains("DedupeStore"), "{why}"),
            other => panic!("expected InvalidArgument on the runtime's own thread, got {other:?}"),
        }
        // From a thread outside the runtime, while this one drives it.
        let outside = store.clone();
        let thread = std::thread::spawn(move || outside.claim("async", b"req"));
        let answer = loop {
            if thread.is_finished() {
                break thread.join().unwrap();
            }
            tokio::task::yield_now().await;
        };
        let Ok(Claim::Completed(done)) = answer else { panic!("a replay from outside, got {answer:?}") };
        assert_eq!(done.outcome, b"out");
    });
    drop(store);
    runtime.block_on(async { drop_table(&admin(&url).await, &table).await });
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
        assert!(matches!(store.claim("after", b"req"), Err(Error::Io { .. })));
        assert!(matches!(store.get("held"), Err(Error::Io { .. })));
        let elsewhere = current_thread_runtime();
        assert!(matches!(elsewhere.block_on(DedupeStore::claim(&store, b"after", b"req")), Err(Error::Io { .. })));
        assert!(store.close().is_err());
    }
    current_thread_runtime().block_on(async { drop_table(&admin(&url).await, &table).await });
}
