//! The small shared types every layer speaks: where a record lives ([`Loc`]), the cheap map
//! keyed by an id ([`IdMap`]), the bit mixer of the index, and the hash a key is placed by
//! ([`IndexHash`]). Nothing here knows files, locks or the store: it is the floor the other
//! modules stand on, so they can share these without importing each other.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use xxhash_rust::xxh3::SecretInput;

/// Where a record lives: segment id and byte offset. This, and nothing about the record, is
/// what the index keeps per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Loc {
    pub segment: u32,
    pub offset: u32,
}

/// Spreads a hash's bits (a bijection): multiply by the golden-ratio constant, fold the high
/// bits down.
pub fn mix(hash: u64) -> u64 {
    let x = hash.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^ (x >> 29)
}

/// The key is already a hash: mix it once (a bijection) so the table's bucket and control bits
/// are spread even though the shard was chosen from the top bits.
#[derive(Default, Clone, Copy)]
pub struct PremixedHasher(u64);

impl Hasher for PremixedHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = mix(n);
    }
}

/// A map keyed by an integer id (segments, buckets) with a cheap hasher.
pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<PremixedHasher>>;

/// Bytes of the index hash's secret: xxh3's default secret size (at least 136 are needed).
pub const SECRET_LEN: usize = 192;

/// How a store hashes keys for its index (and so for its sealed tables). The secret is kept
/// in the `META` file (`log::meta`).
pub enum IndexHash {
    /// Version 1: xxh3-64 with no secret.
    Unkeyed,
    /// Version 2: xxh3-64 under the store's secret.
    Keyed(Box<SecretInput<[u8; SECRET_LEN]>>),
}

impl IndexHash {
    /// The index hash of `key`.
    #[inline]
    pub fn hash(&self, key: &[u8]) -> u64 {
        match self {
            IndexHash::Unkeyed => xxhash_rust::xxh3::xxh3_64(key),
            IndexHash::Keyed(secret) => xxhash_rust::xxh3::xxh3_64_with_secret_input(key, secret),
        }
    }

    /// What a sealed table records of the hash its entries were made with: 0 for the unkeyed
    /// hash, else a nonzero fingerprint of the secret. A table whose mark differs from its
    /// store's holds hashes no lookup would compute: it is never trusted (see `Table::open`).
    #[expect(clippy::cast_possible_truncation, reason = "the mark is the low 32 bits of a 64-bit hash by design")]
    pub fn table_mark(&self) -> u32 {
        match self {
            IndexHash::Unkeyed => 0,
            IndexHash::Keyed(secret) => {
                xxhash_rust::xxh3::xxh3_64_with_secret_input(b"idemstore sealed table", secret) as u32 | 1
            }
        }
    }
}

/// The index hash of `key`: `custom` (`Options::key_hash`, a test seam) when set, else the
/// store's own.
#[inline]
pub fn key_hash(custom: Option<fn(&[u8]) -> u64>, own: &IndexHash, key: &[u8]) -> u64 {
    match custom {
        Some(f) => f(key),
        None => own.hash(key),
    }
}
