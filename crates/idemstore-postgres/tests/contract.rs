//! The contract suite (crates/idemstore-contract) against `PgStore` on a real server, four
//! times: plain; with the local replay cache on (one replica: the cache must not change a
//! single answer); with every claim sent through the batch function (a batch of one), which
//! concurrent claims use; and made by `connect_async`, on the test's runtime. Lease and TTL time moves by `PgStore::advance_clock`; an incarnation "crashes" by
//! having its lock session ended by the server (`pg_terminate_backend`), as a dead process's
//! is, and the store closed.

use std::sync::Arc;
use std::time::Duration;

use idemstore::Orphan;
use idemstore_contract::Harness;
use idemstore_postgres::{PgOptions, PgStore, ReplayCacheLimits};

mod common;

/// How a harness makes its stores.
#[derive(Clone, Copy, PartialEq)]
enum Making {
    Plain,
    LoneClaimsAsBatches,
    ConnectAsync,
}

struct PgHarness {
    url: String,
    table: String,
    options: PgOptions,
    making: Making,
    admin: tokio_postgres::Client,
    store: Option<Arc<PgStore>>,
}

impl PgHarness {
    async fn new(test: &str, configure: fn(&mut PgOptions)) -> Option<PgHarness> {
        Self::made(test, configure, Making::Plain).await
    }

    async fn made(test: &str, configure: fn(&mut PgOptions), making: Making) -> Option<PgHarness> {
        let url = common::pg_url(test)?;
        let table = common::unique_table("contract");
        let mut options = common::options(&table);
        configure(&mut options);
        let store = make(&url, &options, making).await;
        let admin = common::admin(&url).await;
        Some(PgHarness { url, table, options, making, admin, store: Some(Arc::new(store)) })
    }

    fn current(&self) -> &Arc<PgStore> {
        self.store.as_ref().expect("a store is open")
    }
}

async fn make(url: &str, options: &PgOptions, making: Making) -> PgStore {
    let store = match making {
        Making::ConnectAsync => PgStore::connect_async(url, options.clone()).await,
        _ => PgStore::connect(url, options.clone()),
    }
    .expect("connect to postgres");
    if making == Making::LoneClaimsAsBatches {
        store.send_lone_claims_as_batches();
    }
    store
}

impl Harness for PgHarness {
    type Store = PgStore;

    fn store(&self) -> Arc<PgStore> {
        self.current().clone()
    }

    fn advance(&self, by: Duration) {
        self.current().advance_clock(by);
    }

    async fn reopen(&mut self) {
        let old = self.store.take().expect("a store is open");
        // As a crash: the server ends the lock session, and so lets the incarnation lock go.
        common::terminate_backend(&self.admin, old.lock_backend_pid()).await;
        let clock = old.clock_offset();
        // The lock task may have taken the lock again on a new session meanwhile: closing the
        // store lets it go for certain before the next incarnation looks.
        let old = Arc::into_inner(old).expect("the test dropped its handles");
        old.close().expect("close the old incarnation");
        let store = make(&self.url, &self.options, self.making).await;
        store.advance_clock(clock);
        self.store = Some(Arc::new(store));
    }

    fn orphans(&self) -> Vec<Orphan> {
        self.current().orphans().expect("orphans")
    }

    async fn finish(mut self) {
        drop(self.store.take());
        common::drop_table(&self.admin, &self.table).await;
    }
}

mod plain {
    use super::*;
    idemstore_contract::contract_suite!(PgHarness::new("contract (plain)", |_| {}).await);
}

mod with_replay_cache {
    use super::*;
    idemstore_contract::contract_suite!(
        PgHarness::new("contract (replay cache)", |o| o.replay_cache = Some(ReplayCacheLimits::default())).await
    );
}

mod lone_claims_as_batches {
    use super::*;
    idemstore_contract::contract_suite!(
        PgHarness::made("contract (lone claims as batches)", |_| {}, Making::LoneClaimsAsBatches).await
    );
}

mod connect_async {
    use super::*;
    idemstore_contract::contract_suite!(
        PgHarness::made("contract (connect_async)", |_| {}, Making::ConnectAsync).await
    );
}
