//! Appending a key's new record, and the chores an append leaves for after the shard lock.

use crate::error::{Error, Result};
use crate::log::Loc;
use crate::log::record::{Header, Kind};

use super::lookup::Superseded;
use super::{Inner, check_store_time};

impl Inner {
    /// Appends a record for a key whose latest record (if any) is `superseded`.
    ///
    /// Invariant: a key's latest record lies in a bucket that ends no earlier than the bucket
    /// of any older record of that key. So the latest record is never dropped while an older
    /// one survives to be resurrected (by the index falling back to a sealed table, or by a
    /// scan at recovery); reads still expire it exactly at its own `expires_at_ms`.
    #[inline]
    pub(super) fn append(
        &self,
        header: Header,
        key: &[u8],
        value: &[u8],
        superseded: Option<Superseded>,
    ) -> Result<(Header, Loc)> {
        let new_claim = header.kind == Kind::Claim;
        self.check_writable()?;
        // A clock stepped far ahead after open: a record written at that time would make the
        // next open fail (its sequence floor would overflow), so nothing is written.
        check_store_time(header.written_at_ms)?;
        let retain_floor_ms = superseded.map_or(0, |old| old.bucket_end_ms.saturating_sub(1));
        let retain_until_ms = header.expires_at_ms.max(retain_floor_ms);
        let superseded = superseded.map(|old| (old.loc, old.padded_len));
        match self.log.append(header, key, value, retain_until_ms, new_claim, superseded) {
            Err(Error::Poisoned { cause }) => {
                self.commit.poison(cause.clone());
                Err(Error::Poisoned { cause })
            }
            other => other,
        }
    }

    /// Chores an append may leave, done once the key's shard lock is released (no claim on
    /// that shard waits for them): growing a segment close to its end, asking for a spare.
    pub(super) fn after_write(&self) {
        if self.log.growth_wanted() {
            self.log.grow_ahead();
        }
        if self.options.background && self.log.take_spare_wanted() {
            self.wake_housekeeper_for_spare();
        }
        if self.options.background && self.log.take_tables_wanted() {
            self.wake_housekeeper_for_tables();
        }
    }
}
