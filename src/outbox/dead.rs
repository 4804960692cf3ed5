//! Dead letters (lines the CMS refused, kept with the reason until an operator requeues or purges
//! them) and the quarantine (records that cannot be decoded and bodies that cannot be used, kept
//! raw for an operator).
//!
//! Must not send anything or decide that a line is refused (that is delivery's); a dead letter comes
//! back to the pending lines only through `requeue`.

use std::sync::atomic::Ordering;

use chrono::Utc;

use crate::outbox::record::{decode_dead, encode_dead, encode_pending};
use crate::outbox::store::Store;
use crate::outbox::{DeadLine, Outbox, OutboxError, PendingLine};

impl Outbox {
    /// Moves a line to the dead letters with `reason`, and flushes. The dead record is written before
    /// the pending one is removed: sled keeps write order, so a crash leaves the line in at least one.
    pub async fn dead_letter(&self, line: &PendingLine, reason: &str) -> Result<(), OutboxError> {
        let store = self.store()?;
        let value = encode_dead(line, reason, Utc::now());
        self.db
            .io(store.dead.insert(line.id.to_be_bytes(), value))?;
        self.remove_pending(&store, &line.id.to_be_bytes())?;
        self.db.flush(&store).await
    }

    /// Moves dead letters back to the pending lines (all when `ids` is `None`), to be prepared
    /// afresh (the mapping may have been fixed meanwhile). Returns how many.
    pub async fn requeue(&self, ids: Option<&[u64]>) -> Result<usize, OutboxError> {
        let store = self.store()?;
        let (mut n_requeued, mut last_requeued) = (0, 0);
        for dead in self.dead_letters_in(&store)? {
            if ids.is_some_and(|ids| !ids.contains(&dead.pending.id)) {
                continue;
            }
            let pending = PendingLine {
                attempts: 0,
                prepared: None,
                in_flight: false,
                failures: 0,
                last_error: None,
                sent_after: None,
                ..dead.pending
            };
            let value = encode_pending(&pending);
            let n_bytes = value.len() as u64;
            // Written to pending before it leaves the dead letters: a crash leaves it in at least one.
            if self
                .db
                .io(store.pending.insert(pending.id.to_be_bytes(), value))?
                .is_none()
            {
                self.n_pending.fetch_add(1, Ordering::Relaxed);
                self.n_bytes.fetch_add(n_bytes, Ordering::Relaxed);
            }
            self.db.io(store.dead.remove(pending.id.to_be_bytes()))?;
            last_requeued = last_requeued.max(pending.id);
            n_requeued += 1;
        }
        self.db.flush(&store).await?;
        // Committed lines again, under their old keys, which may lie above the committed watermark
        // (an outbox opened with nothing pending starts it at 0).
        self.committed.fetch_max(last_requeued, Ordering::AcqRel);
        Ok(n_requeued)
    }

    /// Deletes every dead letter. Returns how many.
    pub async fn purge_dead(&self) -> Result<usize, OutboxError> {
        self.purge(|store| &store.dead).await
    }

    /// Deletes every quarantined record. Returns how many.
    pub async fn purge_quarantine(&self) -> Result<usize, OutboxError> {
        self.purge(|store| &store.quarantine).await
    }

    /// Empties one tree and flushes. Returns how many records it held.
    async fn purge(&self, tree: fn(&Store) -> &sled::Tree) -> Result<usize, OutboxError> {
        let store = self.store()?;
        let tree = tree(&store);
        let n = tree.len();
        self.db.io(tree.clear())?;
        self.db.flush(&store).await?;
        Ok(n)
    }

    /// Keeps a raw body that could not be used (a viewer response that is not JSON), for an operator.
    pub async fn quarantine_raw(&self, what: &str, body: &[u8]) -> Result<(), OutboxError> {
        let store = self.store()?;
        let mut value = Vec::with_capacity(what.len() + 1 + body.len());
        value.extend_from_slice(what.as_bytes());
        value.push(b'\n');
        value.extend_from_slice(body);
        self.put_in_quarantine(&store, value)?;
        self.db.flush(&store).await
    }

    /// Writes a raw record to the quarantine under a new key, without flushing.
    pub(super) fn put_in_quarantine(
        &self,
        store: &Store,
        value: impl Into<sled::IVec>,
    ) -> Result<(), OutboxError> {
        let key = self.db.new_id(store)?.to_be_bytes();
        self.db.io(store.quarantine.insert(key, value))?;
        Ok(())
    }

    /// The dead letters, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<DeadLine>, OutboxError> {
        let store = self.store()?;
        self.dead_letters_in(&store)
    }

    /// The dead letters in `store`, oldest first; a record that cannot be read is left where it is.
    fn dead_letters_in(&self, store: &Store) -> Result<Vec<DeadLine>, OutboxError> {
        let mut lines = Vec::new();
        for entry in store.dead.iter() {
            let (key, value) = self.db.io(entry)?;
            lines.extend(decode_dead(&key, &value));
        }
        Ok(lines)
    }

    /// Dead letters (0 while the outbox cannot be reopened).
    pub fn dead_len(&self) -> usize {
        self.store().map_or(0, |store| store.dead.len())
    }

    /// Quarantined records (0 while the outbox cannot be reopened).
    pub fn quarantine_len(&self) -> usize {
        self.store().map_or(0, |store| store.quarantine.len())
    }
}
