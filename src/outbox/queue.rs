//! The pending queue: reading the committed lines oldest first, moving them through their
//! lifecycle (`LineState`: one verb per transition delivery makes), and removing those the CMS
//! confirmed.
//!
//! Owns the committed watermark's use by readers and the depth counters' upkeep on removal. Must not
//! decide when a line is confirmed (that is delivery's) or drop lines for space or age (`bounds`).

use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};

use crate::outbox::record::{decode_pending, encode_pending};
use crate::outbox::store::Store;
use crate::outbox::{Cursor, LineState, Outbox, OutboxError, PendingLine};

impl Outbox {
    /// The committed pending keys, oldest first: what delivery and the bounds may touch.
    pub(super) fn committed_pending(&self, store: &Store) -> sled::Iter {
        store
            .pending
            .range(..=self.committed.load(Ordering::Acquire).to_be_bytes())
    }

    /// The highest pending key that is committed: every line stored so far lies at or below it, and
    /// every line stored from now on above it.
    pub fn pending_watermark(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    /// Resolves after the next `append` (or at once if one happened since the last wait).
    pub async fn wait_for_lines(&self) {
        self.appended.notified().await;
    }

    /// Up to `max` pending lines, oldest first. A record that cannot be decoded is moved to the
    /// quarantine (and logged) so the rest keeps flowing.
    pub fn oldest(&self, max: usize) -> Result<Vec<PendingLine>, OutboxError> {
        self.oldest_where(max, usize::MAX, |_| true)
    }

    /// Up to `max` pending lines that `keep` accepts, oldest first, looking at no more than
    /// `scan_limit` records (delivery passes over the lines that wait for a retry). Undecodable
    /// records are quarantined as in `oldest`.
    pub fn oldest_where(
        &self,
        max: usize,
        scan_limit: usize,
        keep: impl FnMut(&PendingLine) -> bool,
    ) -> Result<Vec<PendingLine>, OutboxError> {
        self.oldest_where_past(0, max, scan_limit, |_| false, keep)
    }

    /// `oldest_where` from line `from` on, passing over the records whose id `pass` names without
    /// reading them and without counting them against `scan_limit` (delivery's lines awaiting their
    /// proof: thousands of them at the front of a backlog, read at every step, would cost more than
    /// the POSTs).
    pub fn oldest_where_past(
        &self,
        from: u64,
        max: usize,
        scan_limit: usize,
        pass: impl Fn(u64) -> bool,
        mut keep: impl FnMut(&PendingLine) -> bool,
    ) -> Result<Vec<PendingLine>, OutboxError> {
        let store = self.store()?;
        let mut lines = Vec::with_capacity(max.min(1024));
        let mut n_scanned = 0;
        let committed = self.committed.load(Ordering::Acquire);
        if from > committed {
            return Ok(lines);
        }
        for entry in store
            .pending
            .range(from.to_be_bytes()..=committed.to_be_bytes())
        {
            if lines.len() >= max || n_scanned >= scan_limit {
                break;
            }
            let (key, value) = self.db.io(entry)?;
            let id = <[u8; 8]>::try_from(key.as_ref()).map(u64::from_be_bytes);
            if id.is_ok_and(&pass) {
                continue;
            }
            n_scanned += 1;
            match decode_pending(&key, &value) {
                Some(line) if keep(&line) => lines.push(line),
                Some(_) => {}
                None => {
                    tracing::error!(key = ?key.as_ref(), "outbox record cannot be decoded; moved to the quarantine");
                    self.put_in_quarantine(&store, value)?;
                    self.remove_pending(&store, &key)?;
                }
            }
        }
        Ok(lines)
    }

    /// Whether line `id` is still pending (not confirmed, dead-lettered or dropped).
    pub fn is_pending(&self, id: u64) -> Result<bool, OutboxError> {
        let store = self.store()?;
        self.db.io(store.pending.contains_key(id.to_be_bytes()))
    }

    /// When the oldest pending line was captured.
    pub fn oldest_captured_at(&self) -> Result<Option<DateTime<Utc>>, OutboxError> {
        Ok(self.oldest(1)?.first().map(|p| p.line.captured_at))
    }

    /// Marks `lines` in flight before their POST, each with its decided row (`PendingLine::row`)
    /// and the last confirmed id `after` it goes out after, counts the attempt, and flushes: a
    /// crash from here on leaves them to a read-back. Returns the lines as marked.
    pub async fn mark_in_flight(
        &self,
        lines: &[PendingLine],
        after: i64,
    ) -> Result<Vec<PendingLine>, OutboxError> {
        let marked: Vec<PendingLine> = lines
            .iter()
            .map(|line| PendingLine {
                attempts: line.attempts.saturating_add(1),
                state: LineState::InFlight {
                    row: line.row().cloned(),
                    after: Some(after),
                },
                ..line.clone()
            })
            .collect();
        self.rewrite(&marked).await?;
        Ok(marked)
    }

    /// Notes that `lines`, marked in flight and not posted yet, go out after `after`, without
    /// counting an attempt and without a flush (delivery's batch marked ahead, once the POST before
    /// it was answered `success: true`). sled keeps write order: any later flush carries it, and
    /// no removal written after it can reach the disk without it. Returns the lines as written.
    pub fn carry_in_flight(
        &self,
        lines: &[PendingLine],
        after: i64,
    ) -> Result<Vec<PendingLine>, OutboxError> {
        let carried: Vec<PendingLine> = lines
            .iter()
            .map(|line| PendingLine {
                state: LineState::InFlight {
                    row: line.row().cloned(),
                    after: Some(after),
                },
                ..line.clone()
            })
            .collect();
        let store = self.store()?;
        self.write_records(&store, &carried)?;
        Ok(carried)
    }

    /// Marks `lines` proven not stored (a read-back did not find them, or their own insert
    /// failed): in flight no more, their rows kept to be sent again as they are. Their counters
    /// are written as given. Returns the lines as marked.
    pub async fn mark_not_stored(
        &self,
        lines: &[PendingLine],
    ) -> Result<Vec<PendingLine>, OutboxError> {
        let marked: Vec<PendingLine> = lines.iter().cloned().map(PendingLine::not_stored).collect();
        self.rewrite(&marked).await?;
        Ok(marked)
    }

    /// Counts a failure of each of `lines`' own (`error`, for its dead-letter reason), their
    /// state as given (still in flight after a failed read-back or an unknown POST), and flushes.
    /// Returns the lines as written.
    pub async fn record_failure(
        &self,
        lines: &[PendingLine],
        error: &str,
    ) -> Result<Vec<PendingLine>, OutboxError> {
        let failed: Vec<PendingLine> = lines
            .iter()
            .map(|line| PendingLine {
                failures: line.failures.saturating_add(1),
                last_error: Some(error.to_owned()),
                ..line.clone()
            })
            .collect();
        self.rewrite(&failed).await?;
        Ok(failed)
    }

    /// Rewrites the given pending lines and flushes (the verbs above).
    async fn rewrite(&self, lines: &[PendingLine]) -> Result<(), OutboxError> {
        let store = self.store()?;
        self.write_records(&store, lines)?;
        self.db.flush(&store).await?;
        // A rewrite grows a record (its prepared row): the bound holds after it too.
        self.enforce_max_bytes(&store).await?;
        Ok(())
    }

    /// Writes the given pending lines over their records, unflushed; a record no longer pending is
    /// not written back.
    fn write_records(&self, store: &Store, lines: &[PendingLine]) -> Result<(), OutboxError> {
        for line in lines {
            let value = encode_pending(line);
            let new_len = value.len() as u64;
            // Only a record that is still pending is rewritten: a line dropped for space meanwhile
            // must not come back.
            let old = self.db.io(store
                .pending
                .fetch_and_update(line.id.to_be_bytes(), |old| old.map(|_| value.clone())))?;
            if let Some(old) = old {
                self.n_bytes.fetch_add(new_len, Ordering::Relaxed);
                self.n_bytes.fetch_sub(old.len() as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Removes lines the CMS confirmed, and flushes.
    pub async fn remove(&self, ids: &[u64]) -> Result<(), OutboxError> {
        self.remove_with_cursor(ids, None).await
    }

    /// Removes lines the CMS confirmed and then, when given, sets a cursor, with one flush for both.
    /// sled keeps write order, so after a crash the removal may be stored without the cursor, never
    /// the cursor without the removal: a raised last-confirmed id with its lines still pending would
    /// make a read-back ignore their rows and send them twice.
    pub async fn remove_with_cursor(
        &self,
        ids: &[u64],
        cursor: Option<(Cursor, i64)>,
    ) -> Result<(), OutboxError> {
        let store = self.store()?;
        for id in ids {
            self.remove_pending(&store, &id.to_be_bytes())?;
        }
        if let Some((cursor, value)) = cursor {
            self.write_cursor(&store, &cursor.into(), value)?;
        }
        self.db.flush(&store).await
    }

    /// Removes one pending record and keeps the depth counters true.
    /// Whether it was there: two tasks can drop the same line at once (both see the bound passed).
    pub(super) fn remove_pending(&self, store: &Store, key: &[u8]) -> Result<bool, OutboxError> {
        let Some(old) = self.db.io(store.pending.remove(key))? else {
            return Ok(false);
        };
        self.n_pending.fetch_sub(1, Ordering::Relaxed);
        self.n_bytes.fetch_sub(old.len() as u64, Ordering::Relaxed);
        self.db.reserve().freed(old.len() as u64);
        Ok(true)
    }
}
