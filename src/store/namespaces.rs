//! The store's side of namespaces (see `crate::namespace`): the counters of each namespace a
//! handle was made for.

use std::sync::Arc;

use super::Store;
use crate::namespace::{NamespaceCounters, NamespaceStats};
use crate::options::Options;

impl Store {
    /// The counters of namespace `name`, shared by all its handles.
    pub(crate) fn namespace_counters(&self, name: &str) -> Arc<NamespaceCounters> {
        let mut namespaces = self.inner.namespaces.lock();
        Arc::clone(namespaces.entry(name.to_owned()).or_default())
    }

    /// Claims answered through each namespace since the store was opened, by name (only
    /// namespaces a handle was made for).
    pub fn namespace_stats(&self) -> Vec<(String, NamespaceStats)> {
        let namespaces = self.inner.namespaces.lock();
        let mut stats: Vec<_> = namespaces.iter().map(|(name, counters)| (name.clone(), counters.snapshot())).collect();
        stats.sort_by(|a, b| a.0.cmp(&b.0));
        stats
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &Options {
        &self.inner.options
    }
}
