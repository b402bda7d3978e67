//! The async face of a dedupe store: [`DedupeStore`], implemented by [`Store`] here and by
//! other backends (the PostgreSQL one in `crates/idemstore-postgres`), so that code written
//! against it (the HTTP layer in `crates/idemstore-http`) runs over either.

use std::future::Future;

use crate::error::Result;
use crate::log::record::Kind;
use crate::options::ClaimOptions;
use crate::store::Store;
use crate::types::{Claim, ClaimToken, Entry};

/// A dedupe window with async calls: atomic claims on keys, stored outcomes, checkpoints.
///
/// The contract is [`Store`]'s (see its methods): exactly one concurrent claim of a key is
/// `Acquired`; a repeat is `InProgress` while the holder's lease runs, `Completed` with the
/// stored outcome once it completed, and `Mismatch` on every branch when its request differs.
///
/// The futures need no particular runtime. Calls that wait for nothing finish in their first
/// poll; a call that waits (a durable write under `Durability::Sync`, a claim with
/// `ClaimOptions::wait`) parks no thread of the caller's: it is woken when the wait ends.
///
/// **Cancellation.** Dropping a `claim` future before it returns leaves nothing held: a claim
/// it had already made is released, since its caller never saw the token and so cannot have
/// started the effect. Dropping the future of `complete`, `checkpoint`, `release` or
/// `remove` may or may not leave its write done (as a crash would); the token stays valid if
/// it was not. A token that is dropped keeps its key in flight until the lease ends (see
/// [`ClaimToken`]).
///
/// `Store`'s inherent methods of the same names are the blocking ones, and method calls pick
/// them first: call the async ones through the trait (`DedupeStore::claim(&*store, ..)`) or
/// on a generic `S: DedupeStore`. Share a store between tasks as `Arc<S>` and call through
/// `&*arc` (the trait is not implemented for `Arc<S>`, so that `arc.claim(..)` stays the
/// blocking call whether or not the trait is in scope).
pub trait DedupeStore: Send + Sync {
    /// Claims `key` for the request `request` with the store's default TTL and lease.
    fn claim(&self, key: &[u8], request: &[u8]) -> impl Future<Output = Result<Claim>> + Send {
        self.claim_with(key, request, ClaimOptions::default())
    }

    /// Claims `key` with per-claim options. With `options.wait`, an in-flight key is waited
    /// for (up to that bound) without blocking a thread: the future resolves when the holder
    /// completes or gives up, its lease or the key's window ends, or the wait runs out.
    fn claim_with(
        &self,
        key: &[u8],
        request: &[u8],
        options: ClaimOptions,
    ) -> impl Future<Output = Result<Claim>> + Send;

    /// Completes the claim held by `token`, storing `outcome` for every later repeat.
    fn complete(&self, token: &ClaimToken, outcome: &[u8]) -> impl Future<Output = Result<()>> + Send;

    /// Records how far the holder got and renews the lease (moving `token`'s lease on).
    fn checkpoint(&self, token: &ClaimToken, phase: &[u8]) -> impl Future<Output = Result<()>> + Send;

    /// Gives the claim up: the key is free again.
    fn release(&self, token: &ClaimToken) -> impl Future<Output = Result<()>> + Send;

    /// The state of `key`: `None` when absent, released, removed or expired.
    fn get(&self, key: &[u8]) -> impl Future<Output = Result<Option<Entry>>> + Send;

    /// Removes `key`; an in-flight holder's token becomes stale.
    fn remove(&self, key: &[u8]) -> impl Future<Output = Result<()>> + Send;
}

impl DedupeStore for Store {
    fn claim_with(
        &self,
        key: &[u8],
        request: &[u8],
        options: ClaimOptions,
    ) -> impl Future<Output = Result<Claim>> + Send {
        crate::observe::instrument("claim", key, self.claim_async(key, request, options))
    }

    fn complete(&self, token: &ClaimToken, outcome: &[u8]) -> impl Future<Output = Result<()>> + Send {
        crate::observe::instrument("complete", token.key(), self.finish_async(token, Kind::Complete, outcome))
    }

    fn checkpoint(&self, token: &ClaimToken, phase: &[u8]) -> impl Future<Output = Result<()>> + Send {
        crate::observe::instrument("checkpoint", token.key(), self.finish_async(token, Kind::Checkpoint, phase))
    }

    fn release(&self, token: &ClaimToken) -> impl Future<Output = Result<()>> + Send {
        crate::observe::instrument("release", token.key(), self.finish_async(token, Kind::Release, &[]))
    }

    fn get(&self, key: &[u8]) -> impl Future<Output = Result<Option<Entry>>> + Send {
        crate::observe::instrument("get", key, self.get_async(key))
    }

    fn remove(&self, key: &[u8]) -> impl Future<Output = Result<()>> + Send {
        crate::observe::instrument("remove", key, self.remove_async(key))
    }
}
