//! What the handler learns of its claim, and how it records checkpoints.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use idemstore::{ClaimToken, DedupeStore};

/// The claim a request holds, as a request extension (`Extension<IdempotencyContext>` in
/// axum). Present only on requests that carried a key and acquired it.
///
/// A claim may be a takeover ([`recovered`](Self::recovered)): an earlier request with the
/// same key ran into a crash of its process (or outlived its lease) part way through. Its last
/// [`checkpoint`](Self::last_checkpoint) says how far it got, so the handler can skip the
/// effects that already ran. Record one with [`checkpoint`](Self::checkpoint) after each
/// effect; each also renews the lease.
#[derive(Clone)]
pub struct IdempotencyContext {
    inner: Arc<ContextInner>,
}

pub(crate) struct ContextInner {
    pub(crate) token: ClaimToken,
    client_key: Vec<u8>,
    sink: Arc<dyn CheckpointSink>,
    last_checkpoint: Mutex<Option<Vec<u8>>>,
}

impl std::fmt::Debug for IdempotencyContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyContext")
            .field("recovered", &self.recovered())
            .field("last_checkpoint", &self.last_checkpoint())
            .finish_non_exhaustive()
    }
}

impl IdempotencyContext {
    pub(crate) fn new(token: ClaimToken, client_key: Vec<u8>, sink: Arc<dyn CheckpointSink>) -> Self {
        let last_checkpoint = Mutex::new(token.checkpoint().map(<[u8]>::to_vec));
        IdempotencyContext { inner: Arc::new(ContextInner { token, client_key, sink, last_checkpoint }) }
    }

    pub(crate) fn token(&self) -> &ClaimToken {
        &self.inner.token
    }

    /// True when this claim took over from an earlier holder of the key that did not finish
    /// (its process died, or its lease ran out): effects up to its last checkpoint ran.
    pub fn recovered(&self) -> bool {
        self.inner.token.recovered()
    }

    /// The latest checkpoint of this key's claim: the earlier holder's when recovered, then
    /// each one recorded through [`checkpoint`](Self::checkpoint).
    pub fn last_checkpoint(&self) -> Option<Vec<u8>> {
        self.inner.last_checkpoint.lock().map_or(None, |last| last.clone())
    }

    /// The client's key, as sent (unquoted): pass it on to a downstream system as its own
    /// idempotency key, so that an effect there is not repeated either.
    pub fn client_key(&self) -> &[u8] {
        &self.inner.client_key
    }

    /// Records how far the handler got (durably, as the store's durability says) and renews
    /// the lease. An error means the checkpoint may not be recorded: `StaleToken` says the
    /// claim was taken over (the lease ran out), so stop rather than repeat effects.
    pub async fn checkpoint(&self, phase: impl AsRef<[u8]>) -> Result<(), idemstore::Error> {
        let phase = phase.as_ref();
        self.inner.sink.checkpoint(&self.inner.token, phase).await?;
        if let Ok(mut last) = self.inner.last_checkpoint.lock() {
            *last = Some(phase.to_vec());
        }
        Ok(())
    }
}

type CheckpointFuture<'a> = Pin<Box<dyn Future<Output = Result<(), idemstore::Error>> + Send + 'a>>;

/// The store, type-erased to the one call a handler makes, so that the context is one type
/// whatever the backend.
pub(crate) trait CheckpointSink: Send + Sync {
    fn checkpoint<'a>(&'a self, token: &'a ClaimToken, phase: &'a [u8]) -> CheckpointFuture<'a>;
}

pub(crate) struct StoreSink<S>(pub(crate) Arc<S>);

impl<S: DedupeStore + 'static> CheckpointSink for StoreSink<S> {
    fn checkpoint<'a>(&'a self, token: &'a ClaimToken, phase: &'a [u8]) -> CheckpointFuture<'a> {
        Box::pin(self.0.checkpoint(token, phase))
    }
}
