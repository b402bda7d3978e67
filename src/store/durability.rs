//! Waiting for durability: group commit through the log's syncer (the path runs one way:
//! store -> group commit -> log), the time floor, and backpressure
//! on a large unsynced batch.

use crate::error::{Error, Result};
use crate::log::syncer::LogSyncer;
use crate::options::Durability;

use super::Inner;

impl Inner {
    /// What group commit syncs through: the log, which also raises the time floor as far as
    /// the answers given (a read-only view keeps no floor).
    pub(super) fn syncer(&self) -> LogSyncer<'_> {
        self.log.syncer(&self.time, !self.read_only)
    }

    /// Under `Sync`, waits until record `seq` (the one an answer was read from or written) is
    /// durable, leading a group-commit sync if nobody else is.
    pub(super) fn settle(&self, seq: u64) -> Result<()> {
        // Seq 0 (an answer read from no record: a key never written, or whose latest record's
        // bucket has ended) still waits: the answer rests on the store's time, which must be
        // durable before it is given (invariant 7).
        if self.options.durability != Durability::Sync {
            return Ok(());
        }
        self.commit.wait_durable(seq, &self.syncer())
    }

    /// Saves the store's time as the floor for the next open. With `sync` (close, drop), the
    /// exact time, durably. Otherwise (maintenance, once a second): under `None`, written
    /// without a sync (a power cut may lose anything); under `Sync` and `Periodic`, made
    /// durable, and while the housekeeper runs kept ahead of store time (see
    /// `time_floor::LEAD_MS`) so that answers rarely wait for a sync of the floor. A failed
    /// sync poisons the store.
    pub(super) fn save_time(&self, sync: bool) -> Result<()> {
        let floor = self.log.time_floor();
        let now_ms = self.time.now_ms();
        if sync {
            return floor.save_final(now_ms);
        }
        if self.options.durability == Durability::None {
            return floor.save_unsynced(now_ms);
        }
        // A poisoned store syncs nothing more (a retried fsync may "succeed" with data lost).
        self.commit.check()?;
        floor.keep_ahead(now_ms).map_err(|e| match e {
            // Nothing was synced: a clock past the last supported time is refused, not a fault.
            Error::ClockOutOfRange { .. } => e,
            e => {
                let cause = format!("time floor sync failed: {e}");
                self.commit.poison(cause.clone());
                Error::Poisoned { cause }
            }
        })
    }

    pub(super) fn sync_all(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        // Seq 0 (nothing written) is durable at once: this then only reports a poisoned store.
        self.commit.wait_durable(self.log.last_seq(), &self.syncer())
    }

    /// Under `Sync`, keeps one group-commit batch under `batch_bytes_max`.
    pub(super) fn backpressure(&self) -> Result<()> {
        if self.options.durability == Durability::Sync && self.log.unsynced_bytes() > self.options.batch_bytes_max {
            self.sync_all()?;
        }
        Ok(())
    }
}
