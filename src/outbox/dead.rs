//! Dead letters (lines the CMS refused, kept with the reason until an operator requeues or purges
//! them, or their speaker opts out) and the quarantine (what could not be used, on record for an
//! operator).
//!
//! The quarantine keeps only what may be kept: a viewer answer that cannot be read is never stored
//! as it came (it holds what the filters would have removed: an ignored speaker's line, an opted-out
//! speaker's line, an e-mail address before `filter.redact`), only its metadata and a hash (when,
//! what, its size, the lines read before the break, FNV-1a 64 of the body); an outbox record that
//! cannot be decoded is kept as it was stored (a line already filtered and redacted). Every record
//! leaves after `outbox.max_age` (`drop_expired_quarantine`), and a record an older relay kept raw
//! (no header) at the first such pass. A body is recorded once however often it comes, and none once
//! the quarantine holds `outbox.max_quarantine_bytes` (a damaged record is moved there whatever the
//! bound: it is on disk already).
//!
//! Must not send anything or decide that a line is refused (that is delivery's); a dead letter comes
//! back to the pending lines only through `requeue`.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::outbox::record::{decode_dead, encode_dead, encode_pending};
use crate::outbox::store::Store;
use crate::outbox::{DeadLine, GapKind, GapNote, Outbox, OutboxError, PendingLine};
use crate::text::fnv1a64;

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

    /// Deletes the dead letters `is_theirs` picks (`erasure`'s caller decides which), without
    /// flushing. Returns how many.
    pub(super) fn remove_dead_where(
        &self,
        store: &Store,
        is_theirs: impl Fn(&PendingLine) -> bool,
    ) -> Result<usize, OutboxError> {
        let mut n_removed = 0;
        for dead in self.dead_letters_in(store)? {
            if is_theirs(&dead.pending)
                && self
                    .db
                    .io(store.dead.remove(dead.pending.id.to_be_bytes()))?
                    .is_some()
            {
                self.n_dead.fetch_sub(1, Ordering::Relaxed);
                n_removed += 1;
            }
        }
        Ok(n_removed)
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

    /// Records a viewer answer that could not be read, for an operator: `what`, its size, how many
    /// lines were read before the break (they went through the filters like any other) and its hash,
    /// never the body. Not recorded again when the same body was recorded before, nor when the
    /// quarantine holds `max_quarantine_bytes` (logged at warn once).
    pub async fn quarantine_unreadable(
        &self,
        what: &str,
        body: &[u8],
        n_lines_before: usize,
    ) -> Result<Quarantined, OutboxError> {
        let hash = fnv1a64(body);
        // Whatever becomes of the body, its lines are lost: noted for a gap marker (`gaps`),
        // flushed with the body (or with the next flush when the body is not kept).
        let now = chrono::Utc::now();
        let note = GapNote {
            kind: GapKind::Unreadable,
            from: now,
            to: now,
            n: 1,
            noted_at: now,
        };
        let store = self.store()?;
        self.note_gap(&store, note)?;
        if self.quarantine.has_kept(hash) {
            return Ok(Quarantined::Repeat);
        }
        let value = encode_quarantined(what, body.len(), hash, Some(n_lines_before), &[]);
        if !self.quarantine.has_room(value.len() as u64) {
            if !self.quarantine.warned_full.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    quarantine_bytes = self.quarantine_bytes(),
                    "the outbox quarantine holds outbox.max_quarantine_bytes: further unreadable answers are counted, not recorded; look at them (outbox quarantine) and purge them (outbox purge --quarantine)"
                );
            }
            return Ok(Quarantined::Full);
        }
        self.put_raw_in_quarantine(&store, value)?;
        self.db.flush(&store).await?;
        self.quarantine.kept(hash);
        Ok(Quarantined::Kept)
    }

    /// Moves an outbox record that cannot be decoded to the quarantine under a new key, as it was
    /// stored (a line already filtered and redacted), without flushing.
    pub(super) fn put_in_quarantine(
        &self,
        store: &Store,
        record: impl AsRef<[u8]>,
    ) -> Result<(), OutboxError> {
        let record = record.as_ref();
        let value = encode_quarantined(
            "outbox record that cannot be decoded",
            record.len(),
            fnv1a64(record),
            None,
            record,
        );
        self.put_raw_in_quarantine(store, value)
    }

    /// Writes a quarantine record under a new key, without flushing.
    fn put_raw_in_quarantine(&self, store: &Store, value: Vec<u8>) -> Result<(), OutboxError> {
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

    /// Removes the quarantine records older than `max_age` (`outbox.max_age`), and those an older
    /// relay kept without a header (raw viewer bodies, which may hold what the filters remove), then
    /// flushes. Keys grow with time, so the walk stops at the first record that stays: cheap enough
    /// for every delivery step. Returns how many were removed.
    pub async fn drop_expired_quarantine(
        &self,
        max_age: std::time::Duration,
    ) -> Result<usize, OutboxError> {
        let cutoff = chrono::Duration::from_std(max_age)
            .ok()
            .and_then(|max_age| Utc::now().checked_sub_signed(max_age));
        let store = self.store()?;
        let mut n_removed = 0;
        for entry in store.quarantine.iter() {
            let (key, value) = self.db.io(entry)?;
            let expired = match decode_quarantined(0, &value).at {
                Some(at) => cutoff.is_some_and(|cutoff| at < cutoff),
                None => true,
            };
            if !expired {
                break;
            }
            if self.db.io(store.quarantine.remove(&key))?.is_some() {
                self.n_quarantined.fetch_sub(1, Ordering::Relaxed);
                self.quarantine.removed(value.len() as u64);
                n_removed += 1;
            }
        }
        if n_removed > 0 {
            self.db.flush(&store).await?;
            tracing::info!(
                n_records = n_removed,
                "quarantine records older than outbox.max_age (or kept raw by an older relay) removed"
            );
        }
        Ok(n_removed)
    }

    /// The quarantine's records, oldest first (`outbox quarantine`).
    pub fn quarantined(&self) -> Result<Vec<QuarantinedRecord>, OutboxError> {
        let store = self.store()?;
        let mut records = Vec::new();
        for entry in store.quarantine.iter() {
            let (key, value) = self.db.io(entry)?;
            let id = <[u8; 8]>::try_from(key.as_ref()).map_or(0, u64::from_be_bytes);
            records.push(decode_quarantined(id, &value));
        }
        Ok(records)
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

/// What became of an answer offered to the quarantine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quarantined {
    /// Recorded and flushed.
    Kept,
    /// The same body was recorded before: not recorded again.
    Repeat,
    /// The quarantine holds `max_quarantine_bytes`: not recorded.
    Full,
}

/// One quarantine record, as `outbox quarantine` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedRecord {
    /// Its key.
    pub id: u64,
    /// When it was recorded; `None` for a record an older relay kept raw (removed at the next
    /// expiry pass).
    pub at: Option<DateTime<Utc>>,
    /// What it is.
    pub what: String,
    /// The size of what could not be used.
    pub n_bytes: u64,
    /// FNV-1a 64 of what could not be used, in hex: the same answer twice has the same hash.
    pub hash: Option<String>,
    /// For an unreadable viewer answer: the lines read before the break.
    pub n_lines_before: Option<usize>,
    /// What is kept of it: an undecodable outbox record as stored; nothing of a viewer answer.
    pub kept: Vec<u8>,
}

/// The header of a quarantine record (JSON, one line, `v` = 1), followed by the kept bytes.
#[derive(Serialize, Deserialize)]
struct QuarantineHeaderV1 {
    v: u8,
    at_ms: i64,
    what: String,
    n_bytes: u64,
    fnv1a64: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n_lines_before: Option<usize>,
}

fn encode_quarantined(
    what: &str,
    n_bytes: usize,
    hash: u64,
    n_lines_before: Option<usize>,
    kept: &[u8],
) -> Vec<u8> {
    let header = QuarantineHeaderV1 {
        v: 1,
        at_ms: Utc::now().timestamp_millis(),
        what: what.to_owned(),
        n_bytes: n_bytes as u64,
        fnv1a64: format!("{hash:016x}"),
        n_lines_before,
    };
    let mut value =
        serde_json::to_vec(&header).expect("serializing strings and integers cannot fail");
    value.push(b'\n');
    value.extend_from_slice(kept);
    value
}

/// A record read back; one without a readable header is an older relay's raw body.
fn decode_quarantined(id: u64, value: &[u8]) -> QuarantinedRecord {
    let header_end = value.iter().position(|b| *b == b'\n');
    let header = header_end
        .and_then(|end| serde_json::from_slice::<QuarantineHeaderV1>(&value[..end]).ok())
        .filter(|header| header.v == 1);
    match (header, header_end) {
        (Some(header), Some(end)) => QuarantinedRecord {
            id,
            at: Utc.timestamp_millis_opt(header.at_ms).single(),
            what: header.what,
            n_bytes: header.n_bytes,
            hash: Some(header.fnv1a64),
            n_lines_before: header.n_lines_before,
            kept: value[end + 1..].to_vec(),
        },
        _ => QuarantinedRecord {
            id,
            at: None,
            what: "kept raw by an older relay".to_owned(),
            n_bytes: value.len() as u64,
            hash: None,
            n_lines_before: None,
            kept: Vec::new(),
        },
    }
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

    fn removed(&self, n_bytes: u64) {
        // Saturating: a record counted at open and removed cannot take it below zero.
        let _ = self
            .n_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                Some(held.saturating_sub(n_bytes))
            });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_quarantine_records_an_answer_once_without_its_body_and_nothing_beyond_its_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::open(dir.path(), 1 << 20)
            .expect("open")
            .with_max_quarantine_bytes(600);
        let page = b"<html>alice@example.org said hello</html>".to_vec();
        let other = b"<html>another page</html>".to_vec();

        let outcomes = [
            outbox
                .quarantine_unreadable("bad", &page, 3)
                .await
                .expect("write"),
            outbox
                .quarantine_unreadable("bad", &page, 3)
                .await
                .expect("write"),
            outbox
                .quarantine_unreadable("bad", &other, 0)
                .await
                .expect("write"),
            outbox
                .quarantine_unreadable("bad", b"a third", 0)
                .await
                .expect("write"),
        ];

        use Quarantined::{Full, Kept, Repeat};
        assert_eq!(outcomes[..3], [Kept, Repeat, Kept]);
        let records = outbox.quarantined().expect("list");
        assert_eq!(records.len(), outbox.quarantine_len());
        assert!(outbox.quarantine_bytes() <= 600);
        if outcomes[3] == Full {
            assert_eq!(records.len(), 2);
        }
        let first = &records[0];
        assert_eq!(
            (first.what.as_str(), first.n_bytes, first.n_lines_before),
            ("bad", page.len() as u64, Some(3))
        );
        assert_eq!(
            first.hash.as_deref(),
            Some(format!("{:016x}", fnv1a64(&page)).as_str())
        );
        assert!(first.kept.is_empty(), "the body itself is not kept");
        assert!(first.at.is_some());
        drop(outbox);

        let reopened = Outbox::open(dir.path(), 1 << 20).expect("reopen");
        let n_bytes: u64 = reopened.quarantine_bytes();
        assert!(n_bytes > 0, "counted again at open");
        assert_eq!(
            reopened.purge_quarantine().await.expect("purge"),
            records.len()
        );
        assert_eq!(reopened.quarantine_bytes(), 0);
    }

    #[tokio::test]
    async fn quarantine_records_leave_after_the_maximum_age_and_raw_ones_of_an_older_relay_at_once()
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::open(dir.path(), 1 << 20).expect("open");
        let store = outbox.store().expect("store");
        // An older relay's record: the raw body, no header.
        outbox
            .put_raw_in_quarantine(&store, b"{\"raw\": \"viewer body\"}".to_vec())
            .expect("write");
        outbox
            .put_in_quarantine(&store, b"damaged record")
            .expect("write");
        drop(store);
        outbox
            .quarantine_unreadable("bad", b"<html>", 0)
            .await
            .expect("write");
        assert_eq!(outbox.quarantine_len(), 3);

        let week = std::time::Duration::from_secs(7 * 24 * 3600);
        assert_eq!(
            outbox.drop_expired_quarantine(week).await.expect("expire"),
            1
        );
        let left = outbox.quarantined().expect("list");
        assert_eq!(left.len(), 2);
        assert_eq!(
            left[0].kept, b"damaged record",
            "a stored record is kept as stored"
        );

        assert_eq!(
            outbox
                .drop_expired_quarantine(std::time::Duration::ZERO)
                .await
                .expect("expire"),
            2
        );
        assert_eq!((outbox.quarantine_len(), outbox.quarantine_bytes()), (0, 0));
    }
}
