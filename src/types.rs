//! The public result types. They carry no engine internals (a token is a key plus an opaque
//! number, never a file offset), so another backend could return them too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// The decision of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "an Acquired claim holds its key until the lease ends unless it is completed or released"]
pub enum Claim {
    /// The caller holds the key: do the effect, then `complete`, `release` or `checkpoint`.
    Acquired(ClaimToken),
    /// Another holder has the key and its lease runs until `lease_expires_at`.
    InProgress {
        /// When the holder's lease ends; a claim after it takes the key over.
        lease_expires_at: SystemTime,
    },
    /// The effect already happened: replay this outcome.
    Completed(Completed),
    /// The key was used with a different request (answer 422 Unprocessable Content, as the
    /// IETF `Idempotency-Key` draft says).
    Mismatch,
}

impl Claim {
    /// How the claim was answered, in one word: tells a fresh run from a replay without
    /// matching every variant (for metrics and logs; see also `Options::on_claim`).
    pub fn answer(&self) -> Answer {
        match self {
            Claim::Acquired(token) if token.recovered() => Answer::Resumed,
            Claim::Acquired(_) => Answer::Fresh,
            Claim::Completed(_) => Answer::Replayed,
            Claim::InProgress { .. } => Answer::InProgress,
            Claim::Mismatch => Answer::Mismatch,
        }
    }
}

/// How a claim was answered (see [`Claim::answer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Answer {
    /// Acquired a key nobody held: a fresh run of the effect.
    Fresh,
    /// Acquired by taking over a holder that died or whose lease ended: resume from the
    /// checkpoint.
    Resumed,
    /// The stored outcome of an earlier run: a replay.
    Replayed,
    /// Another holder runs the effect now.
    InProgress,
    /// The key was used with a different request.
    Mismatch,
}

impl Answer {
    /// A stable lowercase name (`fresh`, `resumed`, `replayed`, `in_progress`, `mismatch`),
    /// for metric labels and log fields.
    pub fn as_str(self) -> &'static str {
        match self {
            Answer::Fresh => "fresh",
            Answer::Resumed => "resumed",
            Answer::Replayed => "replayed",
            Answer::InProgress => "in_progress",
            Answer::Mismatch => "mismatch",
        }
    }
}

/// What `Options::on_claim` is called with: one claim's key and answer, after the answer is
/// settled (durable under `Sync`), on the caller's thread, with no lock of the store held.
#[derive(Debug, Clone, Copy)]
pub struct ClaimEvent<'a> {
    /// The key as stored (a namespaced key with its namespace's prefix).
    pub key: &'a [u8],
    /// How it was answered.
    pub answer: Answer,
}

/// Proof of holding a claim. Stale once another claim took the key over.
///
/// A token belongs to the store that handed it out: another store refuses it (its ids are
/// numbers that another store may also hand out, so a token carries its store's identity).
///
/// Dropping a token does not release its claim: the key stays in flight until the lease ends,
/// then the next claim takes it over with the last checkpoint. That is on purpose: a token is
/// dropped when its holder panics or is cancelled part way through the effect, and the store
/// cannot know whether the effect happened; releasing would let a retry run it again at once,
/// while a takeover after the lease hands the retry the holder's last checkpoint to resume
/// from. Call [`Store::release`](crate::Store::release) when the effect surely did not happen.
#[must_use = "a dropped token keeps its key in flight until the lease ends: complete or release it"]
pub struct ClaimToken {
    pub(crate) key: TokenKey,
    pub(crate) id: u64,
    /// The identity of the store that handed the token out (see `Store::store_identity`).
    pub(crate) store: u64,
    pub(crate) recovered: bool,
    pub(crate) checkpoint: Option<Vec<u8>>,
    /// When the lease ends, in ms since the epoch; a checkpoint through this token renews the
    /// lease and moves it on (an atomic, since `checkpoint` takes the token by reference).
    pub(crate) lease_until_ms: AtomicU64,
}

impl Clone for ClaimToken {
    fn clone(&self) -> Self {
        ClaimToken {
            key: self.key.clone(),
            id: self.id,
            store: self.store,
            recovered: self.recovered,
            checkpoint: self.checkpoint.clone(),
            lease_until_ms: AtomicU64::new(self.lease_until_ms.load(Ordering::Relaxed)),
        }
    }
}

impl PartialEq for ClaimToken {
    /// Two tokens are equal when they are the same holding (key, id and store); the lease they
    /// last saw and the checkpoint they were handed do not make them different holdings.
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key && self.id == other.id && self.store == other.store
    }
}

impl Eq for ClaimToken {}

impl std::fmt::Debug for ClaimToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimToken")
            .field("key", &self.key)
            .field("id", &self.id)
            .field("recovered", &self.recovered)
            .field("checkpoint", &self.checkpoint)
            .field("lease_expires_at", &self.lease_expires_at())
            .finish()
    }
}

impl ClaimToken {
    /// The key this token holds.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// An opaque number that fences this holding: a later holder of the key gets a larger one.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// True when this claim took over an earlier holder's claim: an orphan of a process that
    /// died, or a holder whose lease ran out. Resume from [`ClaimToken::checkpoint`].
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    /// The last checkpoint recorded for this key's claim (by this or an earlier holder).
    pub fn checkpoint(&self) -> Option<&[u8]> {
        self.checkpoint.as_deref()
    }

    /// A token of another [`DedupeStore`](crate::DedupeStore) backend: `backend` is that
    /// store's identity (chosen so that it cannot equal another store's: this crate's stores
    /// use a hash of their directory), `id` the holding's fencing number, `lease_expires_at`
    /// when its lease ends. A `Store` refuses such a token with `Error::ForeignToken`.
    pub fn for_backend(
        backend: u64,
        key: &[u8],
        id: u64,
        recovered: bool,
        checkpoint: Option<Vec<u8>>,
        lease_expires_at: SystemTime,
    ) -> ClaimToken {
        ClaimToken {
            key: TokenKey::from(key),
            id,
            store: backend,
            recovered,
            checkpoint,
            lease_until_ms: AtomicU64::new(crate::clock::system_time_to_ms(lease_expires_at)),
        }
    }

    /// The identity of the store that handed this token out (see [`ClaimToken::for_backend`]).
    pub fn backend(&self) -> u64 {
        self.store
    }

    /// Moves this token's lease end on (for other backends' `checkpoint`).
    pub fn set_lease_expires_at(&self, lease_expires_at: SystemTime) {
        self.lease_until_ms.store(crate::clock::system_time_to_ms(lease_expires_at), Ordering::Relaxed);
    }

    /// When this holding's lease ends: at the claim, and moved on by every checkpoint made
    /// through this token (a clone made before the checkpoint keeps the older time).
    pub fn lease_expires_at(&self) -> SystemTime {
        crate::clock::ms_to_system_time(self.lease_until_ms.load(Ordering::Relaxed))
    }
}

/// Longest key a token keeps inline: a UUID as text (36 B) or as bytes (16 B) fits.
const INLINE_KEY_MAX: usize = 38;

/// A token's copy of its key, inline when short, so the common claim allocates nothing for it
/// (a boxed copy was a `malloc` and a `free` per claim: about 130 of ~1,790 instructions).
#[derive(Clone)]
pub(crate) enum TokenKey {
    Inline { len: u8, bytes: [u8; INLINE_KEY_MAX] },
    Boxed(Box<[u8]>),
}

const _: () = assert!(INLINE_KEY_MAX <= u8::MAX as usize);

impl From<&[u8]> for TokenKey {
    fn from(key: &[u8]) -> Self {
        if key.len() <= INLINE_KEY_MAX {
            let mut bytes = [0u8; INLINE_KEY_MAX];
            bytes[..key.len()].copy_from_slice(key);
            #[expect(
                clippy::cast_possible_truncation,
                reason = "at most INLINE_KEY_MAX, which fits a u8 (asserted above)"
            )]
            let len = key.len() as u8;
            TokenKey::Inline { len, bytes }
        } else {
            TokenKey::Boxed(key.into())
        }
    }
}

impl std::ops::Deref for TokenKey {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            TokenKey::Inline { len, bytes } => &bytes[..usize::from(*len)],
            TokenKey::Boxed(key) => key,
        }
    }
}

impl PartialEq for TokenKey {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for TokenKey {}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

/// A completed claim: the stored outcome, replayed to every repeat of the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// The outcome bytes given to `complete`.
    pub outcome: Vec<u8>,
    /// When `complete` was called.
    pub completed_at: SystemTime,
    /// When the claim was made.
    pub claimed_at: SystemTime,
    /// When the key leaves the window.
    pub expires_at: SystemTime,
}

/// What `get` finds for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// Claimed and not yet completed.
    InFlight {
        /// When the claim was made (or taken over).
        claimed_at: SystemTime,
        /// When the holder's lease ends.
        lease_expires_at: SystemTime,
        /// When the key leaves the window.
        expires_at: SystemTime,
        /// The last checkpoint, if any.
        checkpoint: Option<Vec<u8>>,
        /// True when the holder belonged to an earlier process (see `Store::orphans`).
        orphaned: bool,
    },
    /// Completed; the outcome is kept until the key expires.
    Completed(Completed),
}

/// An in-flight claim whose holder died with an earlier process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    /// The key.
    pub key: Vec<u8>,
    /// When the dead holder claimed it.
    pub claimed_at: SystemTime,
    /// When its lease ends (or ended).
    pub lease_expires_at: SystemTime,
    /// The last checkpoint the dead holder recorded.
    pub checkpoint: Option<Vec<u8>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_key_gives_back_the_key_it_was_made_from_inline_or_boxed() {
        let long: Vec<u8> = (0..=255u8).collect();
        for len in [0, 1, 16, 36, INLINE_KEY_MAX - 1, INLINE_KEY_MAX, INLINE_KEY_MAX + 1, 200] {
            let key = &long[..len];
            let token_key = TokenKey::from(key);
            assert_eq!(&*token_key, key, "length {len}");
            assert_eq!(matches!(token_key, TokenKey::Inline { .. }), len <= INLINE_KEY_MAX, "length {len}");
            assert_eq!(token_key, TokenKey::from(key));
            if len > 0 {
                assert_ne!(token_key, TokenKey::from(&long[1..=len]), "length {len}");
            }
            assert_eq!(format!("{token_key:?}"), format!("{key:?}"));
        }
    }
}
