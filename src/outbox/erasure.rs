//! Erasure, as storage: the `privacy` tree's records, and removing the lines a caller picks.
//!
//! The records are `crate::privacy`'s (who opted out): their keys and values are bytes the outbox
//! stores and returns unread. The lines to remove are chosen by the caller's predicate. Owns the
//! order of the writes and their one flush: a record written with a removal goes first, so that
//! sled's write order lets a crash leave the record without the removal (the next start repeats
//! it), never the removal without its record.
//!
//! Must not decide anything about privacy: read a record's meaning, or judge whose line is whose.
//! Must not touch lines that are not committed yet (a failed ingest's retry writes them again).

use crate::model::CapturedLine;
use crate::outbox::record::decode_pending;
use crate::outbox::store::Store;
use crate::outbox::{Outbox, OutboxError, PendingLine};

/// A record of the `privacy` tree as stored: its key and its value.
pub type PrivacyRecord = (Vec<u8>, Vec<u8>);

impl Outbox {
    /// Every record of the `privacy` tree, as stored, in key order.
    pub fn privacy_records(&self) -> Result<Vec<PrivacyRecord>, OutboxError> {
        let store = self.store()?;
        let mut records = Vec::new();
        for entry in store.privacy.iter() {
            let (key, value) = self.db.io(entry)?;
            records.push((key.to_vec(), value.to_vec()));
        }
        Ok(records)
    }

    /// Deletes the records of the `privacy` tree with these keys, and flushes. Returns how many
    /// were there.
    pub async fn remove_privacy_records(&self, keys: &[Vec<u8>]) -> Result<usize, OutboxError> {
        let store = self.store()?;
        let mut n_removed = 0;
        for key in keys {
            if self.db.io(store.privacy.remove(key.as_slice()))?.is_some() {
                n_removed += 1;
            }
        }
        self.db.flush(&store).await?;
        Ok(n_removed)
    }

    /// Writes the record `key` = `value` in the `privacy` tree, then erases what `doomed` picks
    /// (`erase`), then flushes once. Returns how many lines were erased.
    pub async fn put_privacy_record_and_erase(
        &self,
        key: &[u8],
        value: &[u8],
        up_to: u64,
        doomed: impl Fn(&CapturedLine) -> bool,
    ) -> Result<usize, OutboxError> {
        let store = self.store()?;
        self.db.io(store.privacy.insert(key, value))?;
        let n_erased = self.erase_in(&store, up_to, doomed)?;
        self.db.flush(&store).await?;
        Ok(n_erased)
    }

    /// Removes the committed pending lines with keys up to `up_to` that `doomed` picks, and the
    /// dead letters it picks (kept for an operator until requeued or purged), then flushes. Returns
    /// how many. A record that cannot be decoded is left for delivery to quarantine.
    pub async fn erase(
        &self,
        up_to: u64,
        doomed: impl Fn(&CapturedLine) -> bool,
    ) -> Result<usize, OutboxError> {
        let store = self.store()?;
        let n_erased = self.erase_in(&store, up_to, doomed)?;
        self.db.flush(&store).await?;
        Ok(n_erased)
    }

    /// Splits `lines` (read to be sent) into those `doomed` spares and those it picks, which are
    /// removed from the outbox if still there (and flushed). Returns the lines spared and how many
    /// were removed now.
    pub async fn erase_read(
        &self,
        lines: Vec<PendingLine>,
        doomed: impl Fn(&CapturedLine) -> bool,
    ) -> Result<(Vec<PendingLine>, usize), OutboxError> {
        if !lines.iter().any(|pending| doomed(&pending.line)) {
            return Ok((lines, 0));
        }
        let store = self.store()?;
        let (mut kept, mut n_erased) = (Vec::with_capacity(lines.len()), 0);
        for pending in lines {
            if !doomed(&pending.line) {
                kept.push(pending);
            } else if self.remove_pending(&store, &pending.id.to_be_bytes())? {
                n_erased += 1;
            }
        }
        if n_erased > 0 {
            self.db.flush(&store).await?;
        }
        Ok((kept, n_erased))
    }

    /// `erase` without the flush.
    fn erase_in(
        &self,
        store: &Store,
        up_to: u64,
        doomed: impl Fn(&CapturedLine) -> bool,
    ) -> Result<usize, OutboxError> {
        let mut picked = Vec::new();
        for entry in self.committed_pending(store) {
            let (key, value) = self.db.io(entry)?;
            let Some(pending) = decode_pending(&key, &value) else {
                continue;
            };
            if pending.id > up_to {
                break;
            }
            if doomed(&pending.line) {
                picked.push(key);
            }
        }
        let mut n_erased = self.remove_dead_where(store, |pending| doomed(&pending.line))?;
        for key in picked {
            if self.remove_pending(store, &key)? {
                n_erased += 1;
            }
        }
        Ok(n_erased)
    }
}
