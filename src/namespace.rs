//! Namespaces: one store's window divided between tenants, endpoints or consumer groups, each
//! with its own keys, default TTL and lease, and counters.
//!
//! A namespaced key is stored as `0x00, len(name), name, key`: two namespaces' keys never
//! collide (the name's length comes first, so no name is a prefix of another's encoding), and
//! a stored key tells which namespace it belongs to (`split_namespaced_key`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::options::ClaimOptions;
use crate::store::{Advance, Scan, Store};
use crate::types::{Claim, ClaimToken, Entry};

/// The byte every namespaced stored key begins with.
const NAMESPACE_TAG: u8 = 0;

/// Longest namespace name, in bytes.
pub const NAMESPACE_NAME_MAX: usize = 64;

/// The key `key` of namespace `name` is stored under. Fails on an empty name or one longer
/// than [`NAMESPACE_NAME_MAX`].
pub fn namespaced_key(name: &str, key: &[u8]) -> Result<Vec<u8>> {
    let mut stored = namespace_prefix(name)?;
    stored.extend_from_slice(key);
    Ok(stored)
}

/// The namespace name and key of a stored key, when it is a namespaced one.
pub fn split_namespaced_key(stored: &[u8]) -> Option<(&str, &[u8])> {
    let (&tag, rest) = stored.split_first()?;
    let (&len, rest) = rest.split_first()?;
    let len = usize::from(len);
    if tag != NAMESPACE_TAG || len == 0 || len > NAMESPACE_NAME_MAX || rest.len() < len {
        return None;
    }
    let name = std::str::from_utf8(&rest[..len]).ok()?;
    Some((name, &rest[len..]))
}

fn namespace_prefix(name: &str) -> Result<Vec<u8>> {
    if name.is_empty() || name.len() > NAMESPACE_NAME_MAX {
        return Err(Error::InvalidArgument("a namespace name must be 1 to 64 bytes"));
    }
    let len = u8::try_from(name.len()).map_err(|_| Error::InvalidArgument("a namespace name must be 1 to 64 bytes"))?;
    let mut prefix = Vec::with_capacity(2 + name.len());
    prefix.push(NAMESPACE_TAG);
    prefix.push(len);
    prefix.extend_from_slice(name.as_bytes());
    Ok(prefix)
}

/// Claims answered through one namespace since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NamespaceStats {
    /// Claims that acquired a key (fresh or taken over).
    pub claims_acquired_total: u64,
    /// Claims answered with a stored outcome.
    pub duplicates_replayed_total: u64,
    /// Claims answered `InProgress`.
    pub duplicates_in_progress_total: u64,
    /// Claims answered `Mismatch`.
    pub mismatches_total: u64,
}

/// The live counters behind [`NamespaceStats`], shared by every handle of a namespace.
#[derive(Debug, Default)]
pub(crate) struct NamespaceCounters {
    acquired: AtomicU64,
    replayed: AtomicU64,
    in_progress: AtomicU64,
    mismatches: AtomicU64,
}

impl NamespaceCounters {
    fn count(&self, claim: &Claim) {
        let counter = match claim {
            Claim::Acquired(_) => &self.acquired,
            Claim::Completed(_) => &self.replayed,
            Claim::InProgress { .. } => &self.in_progress,
            Claim::Mismatch => &self.mismatches,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> NamespaceStats {
        NamespaceStats {
            claims_acquired_total: self.acquired.load(Ordering::Relaxed),
            duplicates_replayed_total: self.replayed.load(Ordering::Relaxed),
            duplicates_in_progress_total: self.in_progress.load(Ordering::Relaxed),
            mismatches_total: self.mismatches.load(Ordering::Relaxed),
        }
    }
}

/// A handle on one namespace of a store ([`Store::namespace`]): the store's calls, on keys
/// that no other namespace shares, with the namespace's default TTL and lease.
///
/// Tokens it hands out hold the stored key (`ClaimToken::key` shows the namespace prefix);
/// they complete through any handle of the same store.
#[derive(Debug, Clone)]
pub struct Namespace<'a> {
    store: &'a Store,
    name: String,
    prefix: Vec<u8>,
    ttl: Option<Duration>,
    lease: Option<Duration>,
    counters: Arc<NamespaceCounters>,
}

impl Store {
    /// A handle on the namespace `name` (1 to 64 bytes), with the store's default TTL and
    /// lease until [`Namespace::with_ttl`] or [`Namespace::with_lease`] sets its own.
    pub fn namespace(&self, name: &str) -> Result<Namespace<'_>> {
        let prefix = namespace_prefix(name)?;
        let counters = self.namespace_counters(name);
        Ok(Namespace { store: self, name: name.to_owned(), prefix, ttl: None, lease: None, counters })
    }
}

impl<'a> Namespace<'a> {
    /// This namespace's default TTL for claims that do not set one.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// This namespace's default lease for claims that do not set one.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The store this namespace lives in.
    pub fn store(&self) -> &'a Store {
        self.store
    }

    fn key(&self, key: &[u8]) -> Result<Vec<u8>> {
        if key.is_empty() {
            return Err(Error::EmptyKey);
        }
        let mut stored = Vec::with_capacity(self.prefix.len() + key.len());
        stored.extend_from_slice(&self.prefix);
        stored.extend_from_slice(key);
        Ok(stored)
    }

    /// [`Store::claim`] in this namespace.
    pub fn claim(&self, key: impl AsRef<[u8]>, request: impl AsRef<[u8]>) -> Result<Claim> {
        self.claim_with(key, request, ClaimOptions::default())
    }

    /// [`Store::claim_with`] in this namespace; unset `ttl` and `lease` take the namespace's.
    pub fn claim_with(&self, key: impl AsRef<[u8]>, request: impl AsRef<[u8]>, options: ClaimOptions) -> Result<Claim> {
        let options = ClaimOptions { ttl: options.ttl.or(self.ttl), lease: options.lease.or(self.lease), ..options };
        let claim = self.store.claim_with(self.key(key.as_ref())?, request, options)?;
        self.counters.count(&claim);
        Ok(claim)
    }

    /// [`Store::complete`].
    pub fn complete(&self, token: &ClaimToken, outcome: impl AsRef<[u8]>) -> Result<()> {
        self.store.complete(token, outcome)
    }

    /// [`Store::checkpoint`].
    pub fn checkpoint(&self, token: &ClaimToken, phase: impl AsRef<[u8]>) -> Result<()> {
        self.store.checkpoint(token, phase)
    }

    /// [`Store::release`].
    pub fn release(&self, token: &ClaimToken) -> Result<()> {
        self.store.release(token)
    }

    /// [`Store::extend_lease`].
    pub fn extend_lease(&self, token: &ClaimToken, lease: Duration) -> Result<()> {
        self.store.extend_lease(token, lease)
    }

    /// [`Store::get`] in this namespace.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Entry>> {
        self.store.get(self.key(key.as_ref())?)
    }

    /// [`Store::remove`] in this namespace.
    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<()> {
        self.store.remove(self.key(key.as_ref())?)
    }

    /// [`Store::touch`] in this namespace.
    pub fn touch(&self, key: impl AsRef<[u8]>, ttl: Duration) -> Result<Option<SystemTime>> {
        self.store.touch(self.key(key.as_ref())?, ttl)
    }

    /// [`Store::advance`] in this namespace, kept for the namespace's TTL.
    pub fn advance(&self, key: impl AsRef<[u8]>, version: u64) -> Result<Advance> {
        let ttl = self.ttl.unwrap_or(self.store.options().default_ttl);
        self.store.advance_with_ttl(self.key(key.as_ref())?, version, ttl)
    }

    /// [`Store::scan`] of this namespace's keys beginning with `prefix`; the keys come
    /// without the namespace's prefix.
    pub fn scan(&self, prefix: impl AsRef<[u8]>) -> impl Iterator<Item = Result<(Vec<u8>, Entry)>> + 'a {
        let mut full = self.prefix.clone();
        full.extend_from_slice(prefix.as_ref());
        let strip = self.prefix.len();
        let scan: Scan<'a> = self.store.scan(full);
        scan.map(move |item| item.map(|(key, entry)| (key[strip..].to_vec(), entry)))
    }

    /// Claims answered through this namespace since the store was opened.
    pub fn stats(&self) -> NamespaceStats {
        self.counters.snapshot()
    }
}
