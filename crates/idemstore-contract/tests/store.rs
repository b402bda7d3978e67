//! The contract suite against the embedded `Store`, on a `ManualClock`.

use std::sync::Arc;
use std::time::Duration;

use idemstore::{Durability, ManualClock, Options, Orphan, Store};
use idemstore_contract::Harness;

/// Where the clock starts (November 2023).
const START_MS: u64 = 1_700_000_000_000;

struct StoreHarness {
    dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    store: Option<Arc<Store>>,
}

fn options(clock: &Arc<ManualClock>) -> Options {
    Options { durability: Durability::None, background: false, clock: clock.clone(), ..Default::default() }
}

impl StoreHarness {
    fn new() -> StoreHarness {
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = ManualClock::new(START_MS);
        let store = Store::open(dir.path(), options(&clock)).expect("open store");
        StoreHarness { dir, clock, store: Some(Arc::new(store)) }
    }

    fn current(&self) -> &Arc<Store> {
        self.store.as_ref().expect("a store is open")
    }
}

impl Harness for StoreHarness {
    type Store = Store;

    fn store(&self) -> Arc<Store> {
        self.current().clone()
    }

    fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    async fn reopen(&mut self) {
        // The test dropped its handles; the store closes when the last one goes.
        let old = self.store.take().expect("a store is open");
        drop(Arc::into_inner(old).expect("the test still holds the store"));
        let store = Store::open(self.dir.path(), options(&self.clock)).expect("reopen store");
        self.store = Some(Arc::new(store));
    }

    fn orphans(&self) -> Vec<Orphan> {
        self.current().orphans().expect("orphans")
    }
}

idemstore_contract::contract_suite!(Some(StoreHarness::new()));
