//! The step: prepare a batch (each line's row fixed before its first POST), mark it in flight, POST
//! it, and settle what the answer proves; lines the CMS refuses on their own go to the dead letters.
//!
//! Must not: remove a line the CMS has not been proven to hold, or resend a line in flight before a
//! read-back settled it.

use crate::cms::CmsError;
use crate::cms::wire::{ChatItem, encoded_len};
use crate::delivery::holds::Attempt;
use crate::delivery::proof::{Proof, what_a_post_proves};
use crate::delivery::readback::Settle;
use crate::delivery::row::item_of;
use crate::delivery::settle::AWAIT_MAX_LINES;
use crate::delivery::{
    ChatApi, Delivery, DeliveryError, SCAN_LIMIT, Tally, answered_with_error, lock, refusal,
};
use crate::filter::FilterReason;
use crate::metrics::Stats;
use crate::outbox::{Cursor, OutboxError, PendingLine};
use crate::pacing::Answer;

impl<C: ChatApi> Delivery<C> {
    pub(super) async fn step(
        &self,
        mut lines: Vec<PendingLine>,
        tally: &mut Tally,
    ) -> Result<(), DeliveryError> {
        if lines.iter().any(PendingLine::is_in_flight) {
            let (uncertain, rest): (Vec<PendingLine>, Vec<PendingLine>) =
                lines.into_iter().partition(PendingLine::is_in_flight);
            let mut uncertain = self.this_rounds_read(uncertain)?;
            // A record in flight without its row (written by another tool, or damaged) cannot
            // have been sent as it is: its row is decided now, as before a first POST, and the
            // read-back looks for that row.
            self.prepare(&mut uncertain).await;
            let unsent = self.reconcile(uncertain, Settle::Unknown, tally).await?;
            // A pending line older than an unsent one of its speaker goes before it: a crash or a
            // full disk in the middle of the save that clears in-flight marks (oldest first) leaves
            // the older lines cleared and the newer still marked.
            let mut older: Vec<PendingLine> = rest
                .into_iter()
                .filter(|l| {
                    unsent
                        .iter()
                        .any(|u| u.id > l.id && u.line.speaker == l.line.speaker)
                })
                .collect();
            self.prepare(&mut older).await;
            let mut resend = unsent;
            resend.extend(older);
            resend.sort_by_key(|l| l.id);
            // What was not found goes out one line per POST, so each answer is unambiguous.
            return self.deliver_singly(resend, tally).await;
        }
        // The batch marked ahead while the last one was posted, else the oldest due lines.
        let batch = match self.take_ahead()? {
            Some(batch) => batch,
            None => {
                self.prepare(&mut lines).await;
                let batch = self.cut_batch(lines);
                // The error arms below go on with the lines as marked in flight, as they are on
                // disk.
                self.mark_in_flight(&batch).await?
            }
        };
        match self.send(batch.clone(), true, tally).await {
            Ok(()) => {}
            Err(DeliveryError::Cms(CmsError::Invalid(reason))) if batch.len() > 1 => {
                // Nothing of the batch was stored: find the culprit line by line.
                tracing::warn!(n_messages = batch.len(), outbox_depth = self.deps.outbox.len(), reason = %reason, "cms rejected a batch; retrying it line by line");
                self.deliver_singly(batch, tally).await?;
            }
            Err(DeliveryError::Cms(CmsError::LastRowFailed)) if batch.len() > 1 => {
                // The last row failed; earlier rows may be stored. Read back, then send the rest
                // line by line so the failing one is identified.
                tracing::warn!(
                    n_messages = batch.len(),
                    outbox_depth = self.deps.outbox.len(),
                    "cms could not store the last line of a batch; reading it back"
                );
                let unsent = self.reconcile(batch, Settle::Unknown, tally).await?;
                self.deliver_singly(unsent, tally).await?;
            }
            Err(DeliveryError::Cms(err)) if batch.len() == 1 && !err.is_retryable() => {
                // A batch of one is unambiguous: the CMS will not take this line.
                self.dead_letter(&batch[0], &refusal(&err, &batch[0]), tally)
                    .await?;
            }
            Err(err) => return Err(err),
        }
        Ok(())
    }

    /// Which lines of unknown outcome this step reads back. Lines that just lost their answer are
    /// read together with every other line in flight that neither awaits its proof nor waits for
    /// a read-back of its own (after a restart: every batch that was posted, awaiting or marked
    /// ahead): batches in flight after the same confirmed id (a batch marked ahead, `ahead`) must
    /// be matched against the rows in one go, each row taken once in id order, or the rows of the
    /// first, found and removed, would be taken for the same words in the second. Otherwise the
    /// held lines that wait for a read-back are read together, all of them, due or not, in one
    /// GET: their windows overlap, and a CMS that cannot answer a large read (PHP's memory limit)
    /// gets one such read per round on one backoff, not one per line on each line's own schedule.
    fn this_rounds_read(
        &self,
        uncertain: Vec<PendingLine>,
    ) -> Result<Vec<PendingLine>, OutboxError> {
        let readers = lock(&self.holds).readers();
        let (held, fresh): (Vec<PendingLine>, Vec<PendingLine>) =
            uncertain.into_iter().partition(|l| readers.contains(&l.id));
        if !fresh.is_empty() {
            let awaiting: std::collections::HashSet<u64> =
                lock(&self.awaiting).ids.keys().copied().collect();
            let ahead = lock(&self.ahead);
            // Every line that can be in flight: those awaiting their proof (at most
            // `AWAIT_MAX_LINES`, all of them after a restart) and a few batches posted or marked.
            let scan_limit = AWAIT_MAX_LINES + 4 * self.deps.settings.batch_max_messages;
            return self.deps.outbox.oldest_where_past(
                0,
                usize::MAX,
                scan_limit,
                |id| awaiting.contains(&id) || ahead.holds(id),
                |l| l.is_in_flight() && !readers.contains(&l.id),
            );
        }
        if held.len() == readers.len() {
            return Ok(held);
        }
        self.deps.outbox.oldest_where(usize::MAX, SCAN_LIMIT, |l| {
            l.is_in_flight() && readers.contains(&l.id)
        })
    }

    /// The longest prefix within `batch_max_bytes` (at least one line).
    pub(super) fn cut_batch(&self, lines: Vec<PendingLine>) -> Vec<PendingLine> {
        let mut n_bytes = 2;
        let mut batch = Vec::with_capacity(lines.len());
        for line in lines {
            let item_len = encoded_len(&item_of(&line));
            if !batch.is_empty() && n_bytes + item_len > self.deps.settings.batch_max_bytes {
                break;
            }
            n_bytes += item_len;
            batch.push(line);
        }
        batch
    }

    /// Marks the batch in flight, counts the attempt and notes the last confirmed id it goes out
    /// after, in one write (flushed) before its POST; returns the lines as marked.
    pub(super) async fn mark_in_flight(
        &self,
        batch: &[PendingLine],
    ) -> Result<Vec<PendingLine>, OutboxError> {
        let sent_after = self
            .deps
            .outbox
            .cursor(Cursor::LastConfirmedId)?
            .unwrap_or(0);
        self.deps.outbox.mark_in_flight(batch, sent_after).await
    }

    /// POSTs a batch and settles it. A `success: true` proves a row stored only for a batch of one:
    /// every insert, failed or not, consumes an auto-increment id (spec §10.2), so an id span of
    /// exactly `n` proves only that no other writer came between, not that a middle row was not
    /// skipped. A batch of more lines therefore awaits the shared read (`settle`), and what it
    /// finds missing is sent line by line (`docs/RELIABILITY.md`, "What proves a batch stored").
    /// `batch` is marked in flight (`mark_in_flight`), all after the same confirmed id. With
    /// `ahead`, the next batch is marked while this one is posted (`ahead`); otherwise a batch
    /// marked ahead is cleared first, as rows of other lines are about to be stored.
    pub(super) async fn send(
        &self,
        batch: Vec<PendingLine>,
        ahead: bool,
        tally: &mut Tally,
    ) -> Result<(), DeliveryError> {
        if !ahead {
            self.clear_ahead().await?;
        }
        // A line whose speaker opted out since it was read is not sent, nor sent again after a
        // read-back that did not find it.
        let (batch, n_withheld) = self.deps.privacy.withhold(batch).await?;
        for _ in 0..n_withheld {
            self.deps.stats.filtered(FilterReason::OptedOut);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let before = batch.first().and_then(PendingLine::sent_after).unwrap_or(0);
        let items: Vec<ChatItem> = batch.iter().map(item_of).collect();
        let started = self.pacer.wait().await;
        self.deps.stats.batch_attempted(batch.len());
        let (posted, overlapped) = if ahead {
            lock(&self.ahead).posting = batch.iter().map(|l| l.id).collect();
            let mut side = Tally::at(tally.now);
            let (answer, ()) = tokio::join!(self.deps.cms.post(&items), self.work_ahead(&mut side));
            lock(&self.ahead).posting.clear();
            tally.merge(side);
            answer
        } else {
            self.deps.cms.post(&items).await
        };
        self.deps
            .stats
            .post_seconds
            .observe_duration(started.elapsed());
        let answer = if overlapped {
            Stats::add(&self.deps.stats.cms_posts_shared, 1);
            Answer::Shared {
                n_rows: batch.len(),
            }
        } else {
            Answer::Stored {
                n_rows: batch.len(),
            }
        };
        self.paced(started, &posted, answer);
        let (proof, went_back) = what_a_post_proves(batch.len(), before, &posted);
        if went_back {
            // The rows the cursor stood for are gone with the restore, and rows of this batch may
            // lie at or below it, where a read-back would not look: it starts again from 0 and is
            // raised by this batch.
            tracing::warn!(
                last_confirmed_id = before,
                cms_last_id = posted.as_ref().copied().unwrap_or(0),
                "cms ids went backwards (a restored database?); the read-back cursor starts again from 0"
            );
            self.deps
                .outbox
                .set_cursor(Cursor::LastConfirmedId, 0)
                .await?;
            // The batch's own rows may lie at or below the id it went out after: whoever reads it
            // back (the shared read, or a read-back after a crash) must look from 0, so its marks
            // say so on disk too.
            self.deps.outbox.mark_in_flight(&batch, 0).await?;
        }
        match proof {
            Proof::Stored { last_id } | Proof::LastStored { last_id } => {
                self.carry_ahead(last_id)?
            }
            _ => self.clear_ahead().await?,
        }
        let err = match (proof, posted) {
            (Proof::Stored { last_id }, _) => {
                Stats::add(&self.deps.stats.batches_delivered, 1);
                let ids: Vec<u64> = batch.iter().map(|l| l.id).collect();
                self.confirm(&ids, Some(last_id)).await?;
                // Claimed once the lines are gone: if their removal fails (a full disk), they stay
                // pending and their own read-back must still find this row.
                self.claim([last_id]);
                self.deps.count_delivered(batch.iter(), false);
                batch
                    .iter()
                    .for_each(|l| self.deps.stats.confirmed(l.line.captured_at));
                tally.n_delivered += batch.len();
                return Ok(());
            }
            (Proof::LastStored { last_id }, _) => {
                Stats::add(&self.deps.stats.batches_delivered, 1);
                // The lines stay in flight, neither resent nor removed, until the shared read
                // finds their rows (`settle`); newer batches go out meanwhile, each after this id.
                self.raise_last_confirmed(last_id)?;
                self.await_proof(&batch, last_id);
                return Ok(());
            }
            (Proof::LastNotStored, _) if batch.len() == 1 => {
                return self.insert_failed(&batch[0], tally).await;
            }
            (_, Err(err)) if answered_with_error(&err) => {
                return self.failed(&batch, err, Attempt::Post, tally).await;
            }
            (_, Err(err)) => err,
            (_, Ok(_)) => unreachable!("a success proves its last row stored"),
        };
        // A validation error, a failed last row of a batch, or an outage: the caller decides.
        Err(err.into())
    }

    /// Removes confirmed lines and raises the last confirmed id, with one flush. The removal is
    /// written first and sled keeps write order, so a crash can leave the removal without the raised
    /// id (one extra read-back later) but never the reverse: a read-back ignores rows at or below
    /// that id, so a raised id with the lines still pending would send them twice.
    pub(super) async fn confirm(
        &self,
        ids: &[u64],
        last_id: Option<i64>,
    ) -> Result<(), OutboxError> {
        let known = self
            .deps
            .outbox
            .cursor(Cursor::LastConfirmedId)?
            .unwrap_or(0);
        let raise = last_id
            .filter(|last_id| *last_id > known)
            .map(|last_id| (Cursor::LastConfirmedId, last_id));
        self.deps.outbox.remove_with_cursor(ids, raise).await?;
        self.forget_holds(ids);
        if !ids.is_empty() {
            // The CMS stored a row of ours: it can insert, and a line that fails next is its own.
            lock(&self.holds).inserts_failed_since_stored = 0;
        }
        Ok(())
    }

    /// Raises the last confirmed id to `last_id` (a batch answered `success: true`), unflushed:
    /// the next flush carries it (the mark of a batch after it, flushed while a POST is on its
    /// way). A crash that loses it loses every write after it too (sled keeps write order), and
    /// leaves the state from just before it: the batch in flight after the id before, read back
    /// as after any crash.
    pub(super) fn raise_last_confirmed(&self, last_id: i64) -> Result<(), OutboxError> {
        let known = self
            .deps
            .outbox
            .cursor(Cursor::LastConfirmedId)?
            .unwrap_or(0);
        if last_id > known {
            self.deps
                .outbox
                .note_cursor(Cursor::LastConfirmedId, last_id)?;
        }
        Ok(())
    }

    /// Sends lines one per POST; a line the CMS refuses is dead-lettered.
    pub(super) async fn deliver_singly(
        &self,
        lines: Vec<PendingLine>,
        tally: &mut Tally,
    ) -> Result<(), DeliveryError> {
        for line in lines {
            if !lock(&self.holds).may_send(&line, tally.now) {
                // An older line of the speaker failed just now: this one waits behind it.
                continue;
            }
            let marked = self.mark_in_flight(std::slice::from_ref(&line)).await?;
            match Box::pin(self.send(marked.clone(), false, tally)).await {
                Ok(()) => {}
                Err(DeliveryError::Cms(err)) if !err.is_retryable() => {
                    self.dead_letter(&marked[0], &refusal(&err, &marked[0]), tally)
                        .await?
                }
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    pub(super) async fn dead_letter(
        &self,
        line: &PendingLine,
        reason: &str,
        tally: &mut Tally,
    ) -> Result<(), OutboxError> {
        tracing::error!(outbox_id = line.id, speaker = %line.line.speaker, reason, n_messages = 1, outbox_depth = self.deps.outbox.len(), "line moved to the dead letters");
        self.deps.outbox.dead_letter(line, reason).await?;
        Stats::add(&self.deps.stats.lines_dead_lettered, 1);
        self.forget_holds(&[line.id]);
        tally.n_dead += 1;
        Ok(())
    }
}
