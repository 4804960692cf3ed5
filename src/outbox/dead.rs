//! Dead letters (lines the CMS refused, kept with the reason until an operator requeues or purges
//! them) and the quarantine (records that cannot be decoded and bodies that cannot be used, kept
//! raw for an operator). The quarantine is bounded: a body is kept once however often it comes, at
//! most its first `QUARANTINE_BODY_BYTES`, and none once the quarantine holds
//! `outbox.max_quarantine_bytes` (a damaged record is moved there whatever the bound: it is on disk
//! already).
//!
//! Must not send anything or decide that a line is refused (that is delivery's); a dead letter comes
//! back to the pending lines only through `requeue`.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

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
        if self
            .db
            .io(store.dead.insert(line.id.to_be_bytes(), value))?
            .is_none()
        {
            self.n_dead.fetch_add(1, Ordering::Relaxed);
        }
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
            let pending = PendingLine::captured(dead.pending.id, dead.pending.line);
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
            if self
                .db
                .io(store.dead.remove(pending.id.to_be_bytes()))?
                .is_some()
            {
                self.n_dead.fetch_sub(1, Ordering::Relaxed);
            }
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
        self.purge(|store| &store.dead, &self.n_dead).await
    }

    /// Deletes every quarantined record. Returns how many.
    pub async fn purge_quarantine(&self) -> Result<usize, OutboxError> {
        let n = self
            .purge(|store| &store.quarantine, &self.n_quarantined)
            .await?;
        self.quarantine.emptied();
        Ok(n)
    }

    /// Empties one tree (and its counter) and flushes. Returns how many records it held.
    async fn purge(
        &self,
        tree: fn(&Store) -> &sled::Tree,
        counter: &AtomicUsize,
    ) -> Result<usize, OutboxError> {
        let store = self.store()?;
        let tree = tree(&store);
        let n = tree.len();
        self.db.io(tree.clear())?;
        counter.store(0, Ordering::Relaxed);
        self.db.flush(&store).await?;
        Ok(n)
    }

    /// Keeps a raw body that could not be used (a viewer response that is not JSON), for an
    /// operator: `what`, a line, then the body (its first `QUARANTINE_BODY_BYTES` when longer, the
    /// first line saying so). Not kept again when the same body was kept before, nor when the
    /// quarantine holds `max_quarantine_bytes` (logged at warn once).
    pub async fn quarantine_raw(
        &self,
        what: &str,
        body: &[u8],
    ) -> Result<Quarantined, OutboxError> {
        let fingerprint = fingerprint(body);
        if self.quarantine.has_kept(fingerprint) {
            return Ok(Quarantined::Repeat);
        }
        let kept = &body[..body.len().min(QUARANTINE_BODY_BYTES)];
        let header = if kept.len() < body.len() {
            format!(
                "{what} (its first {} of {} bytes)\n",
                kept.len(),
                body.len()
            )
        } else {
            format!("{what}\n")
        };
        let n_bytes = (header.len() + kept.len()) as u64;
        if !self.quarantine.has_room(n_bytes) {
            if !self.quarantine.warned_full.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    quarantine_bytes = self.quarantine_bytes(),
                    "the outbox quarantine holds outbox.max_quarantine_bytes: further unusable bodies are counted, not kept; look at them (outbox stats) and purge them (outbox purge --quarantine)"
                );
            }
            return Ok(Quarantined::Full);
        }
        let store = self.store()?;
        let mut value = Vec::with_capacity(header.len() + kept.len());
        value.extend_from_slice(header.as_bytes());
        value.extend_from_slice(kept);
        self.put_in_quarantine(&store, value)?;
        self.db.flush(&store).await?;
        self.quarantine.kept(fingerprint);
        Ok(Quarantined::Kept)
    }

    /// Writes a raw record to the quarantine under a new key, without flushing.
    pub(super) fn put_in_quarantine(
        &self,
        store: &Store,
        value: impl Into<sled::IVec>,
    ) -> Result<(), OutboxError> {
        let value = value.into();
        let n_bytes = value.len() as u64;
        let key = self.db.new_id(store)?.to_be_bytes();
        if self.db.io(store.quarantine.insert(key, value))?.is_none() {
            self.n_quarantined.fetch_add(1, Ordering::Relaxed);
        }
        self.quarantine
            .n_bytes
            .fetch_add(n_bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Bounds the quarantine to `max_bytes` of records (`outbox.max_quarantine_bytes`).
    pub fn with_max_quarantine_bytes(mut self, max_bytes: u64) -> Outbox {
        self.quarantine.max_bytes = max_bytes;
        self
    }

    /// Bytes of the quarantined records (those found at open, and those kept since).
    pub fn quarantine_bytes(&self) -> u64 {
        self.quarantine.n_bytes.load(Ordering::Relaxed)
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

    /// Dead letters (a counter the writes keep: no record is read).
    pub fn dead_len(&self) -> usize {
        self.n_dead.load(Ordering::Relaxed)
    }

    /// Quarantined records (a counter the writes keep: no record is read).
    pub fn quarantine_len(&self) -> usize {
        self.n_quarantined.load(Ordering::Relaxed)
    }
}

/// The most of one unusable body the quarantine keeps: enough to see what a peer sent.
pub const QUARANTINE_BODY_BYTES: usize = 1 << 20;

/// What became of a body offered to the quarantine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quarantined {
    /// Written and flushed.
    Kept,
    /// The same body was kept before: not written again.
    Repeat,
    /// The quarantine holds `max_quarantine_bytes`: not written.
    Full,
}

/// The quarantine's bound and what it has kept in this process.
#[derive(Debug)]
pub(super) struct QuarantineBound {
    /// `outbox.max_quarantine_bytes`.
    max_bytes: u64,
    /// Bytes of the quarantined records.
    n_bytes: AtomicU64,
    /// Fingerprints of the bodies kept since the outbox was opened.
    fingerprints: Mutex<HashSet<u64>>,
    /// Whether the quarantine being full was warned about (once until a purge).
    warned_full: AtomicBool,
}

impl QuarantineBound {
    /// Unbounded, holding the records of `store`'s quarantine.
    pub(super) fn of(store: &Store) -> QuarantineBound {
        let n_bytes = store
            .quarantine
            .iter()
            .values()
            .filter_map(Result::ok)
            .map(|value| value.len() as u64)
            .sum();
        QuarantineBound {
            max_bytes: u64::MAX,
            n_bytes: AtomicU64::new(n_bytes),
            fingerprints: Mutex::new(HashSet::new()),
            warned_full: AtomicBool::new(false),
        }
    }

    fn has_kept(&self, fingerprint: u64) -> bool {
        self.lock().contains(&fingerprint)
    }

    fn has_room(&self, n_bytes: u64) -> bool {
        self.n_bytes.load(Ordering::Relaxed).saturating_add(n_bytes) <= self.max_bytes
    }

    fn kept(&self, fingerprint: u64) {
        self.lock().insert(fingerprint);
    }

    fn emptied(&self) {
        self.n_bytes.store(0, Ordering::Relaxed);
        self.lock().clear();
        self.warned_full.store(false, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        // Each critical section is one set operation: a poisoned lock still holds a whole set.
        self.fingerprints
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A body's fingerprint (SipHash with fixed keys: the same body gives the same value in a process).
fn fingerprint(body: &[u8]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_quarantine_keeps_a_body_once_its_first_mib_and_nothing_beyond_its_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::open(dir.path(), 1 << 20)
            .expect("open")
            .with_max_quarantine_bytes(2 << 20);
        let page = vec![b'x'; 1000];
        let huge = vec![b'y'; 5 << 20];

        let outcomes = [
            outbox.quarantine_raw("bad", &page).await.expect("write"),
            outbox.quarantine_raw("bad", &page).await.expect("write"),
            outbox.quarantine_raw("bad", &huge).await.expect("write"),
            outbox.quarantine_raw("bad", &huge).await.expect("write"),
            outbox
                .quarantine_raw("bad", &[b'z'; 2 << 20])
                .await
                .expect("write"),
        ];

        use Quarantined::{Full, Kept, Repeat};
        assert_eq!(outcomes, [Kept, Repeat, Kept, Repeat, Full]);
        let header = "bad (its first 1048576 of 5242880 bytes)\n".len() as u64;
        let n_bytes = 4 + 1000 + header + (1 << 20);
        assert_eq!(
            (outbox.quarantine_len(), outbox.quarantine_bytes()),
            (2, n_bytes)
        );
        drop(outbox);
        let reopened = Outbox::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!(
            reopened.quarantine_bytes(),
            n_bytes,
            "counted again at open"
        );
        assert_eq!(reopened.purge_quarantine().await.expect("purge"), 2);
        assert_eq!(reopened.quarantine_bytes(), 0);
    }
}
