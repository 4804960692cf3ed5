//! The step: prepare a batch (each line's row fixed before its first POST), mark it in flight, POST
//! it, and settle what the answer proves; lines the CMS refuses on their own go to the dead letters.
//!
//! Must not: remove a line the CMS has not been proven to hold, or resend a line in flight before a
//! read-back settled it.

use crate::cms::CmsError;
use crate::cms::wire::{ChatItem, encoded_len, sanitize_message};
use crate::delivery::holds::Attempt;
use crate::delivery::proof::{Proof, what_a_post_proves};
use crate::delivery::readback::{ROW_TIME, Settle};
use crate::delivery::{
    ChatApi, Delivery, DeliveryError, SCAN_LIMIT, Tally, answered_with_error, lock, refusal,
};
use crate::filter::FilterReason;
use crate::metrics::Stats;
use crate::model::{LineSource, fill_template};
use crate::outbox::{Cursor, LineState, OutboxError, PendingLine, Prepared};
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
        self.prepare(&mut lines).await;
        let batch = self.cut_batch(lines);
        // The error arms below go on with the lines as marked in flight, as they are on disk.
        let batch = self.mark_in_flight(&batch).await?;
        match self.send(batch.clone(), tally).await {
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

    /// Which of the due lines of unknown outcome this step reads back. Lines that just lost their
    /// answer are read alone (their window is seconds, the read cheap); otherwise the held lines
    /// that wait for a read-back are read together, all of them, due or not, in one GET: their
    /// windows overlap, and a CMS that cannot answer a large read (PHP's memory limit) gets one
    /// such read per round on one backoff, not one per line on each line's own schedule.
    fn this_rounds_read(
        &self,
        uncertain: Vec<PendingLine>,
    ) -> Result<Vec<PendingLine>, OutboxError> {
        let readers = lock(&self.holds).readers();
        let (held, fresh): (Vec<PendingLine>, Vec<PendingLine>) =
            uncertain.into_iter().partition(|l| readers.contains(&l.id));
        if !fresh.is_empty() || held.len() == readers.len() {
            return Ok(if fresh.is_empty() { held } else { fresh });
        }
        self.deps.outbox.oldest_where(usize::MAX, SCAN_LIMIT, |l| {
            l.is_in_flight() && readers.contains(&l.id)
        })
    }

    /// Fixes the row of every line that has none yet. The decision is stored with the in-flight mark
    /// (`mark_in_flight`), in the same write, before the first POST: a line that is not sent this
    /// time was never sent, so deciding it again later is harmless, and one write and one flush per
    /// batch fewer is a third of delivery's outbox work.
    pub(super) async fn prepare(&self, lines: &mut [PendingLine]) {
        for pending in lines.iter_mut().filter(|l| l.row().is_none()) {
            let line = &pending.line;
            // Only an avatar's name is looked up: an object may name itself after any avatar, and
            // the relay's own lines are said by no one.
            let user = match line.source {
                LineSource::Avatar => {
                    self.deps
                        .mapper
                        .resolve(&line.speaker, line.owner_id.as_deref())
                        .await
                }
                LineSource::Object | LineSource::Relay => None,
            };
            let message = match (user, line.source) {
                (Some(_), _) => line.message.clone(),
                (None, LineSource::Relay) => line.message.clone(),
                (None, LineSource::Avatar) => fill_template(
                    &self.deps.settings.anonymous_format,
                    &[
                        ("name", &line.speaker),
                        ("message", &line.message),
                        ("region", self.deps.region_label(&line.region)),
                    ],
                ),
                (None, LineSource::Object) => fill_template(
                    &self.deps.settings.anonymous_format,
                    &[
                        ("name", &format!("{} (object)", line.speaker)),
                        ("message", &line.message),
                        ("region", self.deps.region_label(&line.region)),
                    ],
                ),
            };
            let row = Prepared {
                user_id: user.unwrap_or(self.deps.settings.anonymous_user_id),
                message: sanitize_message(&message),
                timestamp: self
                    .deps
                    .settings
                    .timezone
                    .wall_clock(line.spoken_at)
                    .format(ROW_TIME)
                    .to_string(),
            };
            // In memory: written with the in-flight mark. A record in flight without its row keeps
            // its place in flight, to be read back for the row decided now.
            pending.state = match &pending.state {
                LineState::InFlight { after, .. } => LineState::InFlight {
                    row: Some(row),
                    after: *after,
                },
                _ => LineState::Prepared(row),
            };
        }
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
    /// `batch` is marked in flight (`mark_in_flight`), all after the same confirmed id.
    pub(super) async fn send(
        &self,
        batch: Vec<PendingLine>,
        tally: &mut Tally,
    ) -> Result<(), DeliveryError> {
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
        let (posted, overlapped) = self.deps.cms.post(&items).await;
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
                self.raise_last_confirmed(last_id).await?;
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

    pub(super) async fn raise_last_confirmed(&self, last_id: i64) -> Result<(), OutboxError> {
        let known = self
            .deps
            .outbox
            .cursor(Cursor::LastConfirmedId)?
            .unwrap_or(0);
        if last_id > known {
            self.deps
                .outbox
                .set_cursor(Cursor::LastConfirmedId, last_id)
                .await?;
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
            match Box::pin(self.send(marked.clone(), tally)).await {
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

/// The row of a prepared line.
pub(super) fn item_of(line: &PendingLine) -> ChatItem {
    let prepared = line
        .row()
        .expect("every path prepares its lines (`prepare`) before it sends them");
    ChatItem {
        user_id: prepared.user_id,
        message: prepared.message.clone(),
        timestamp: prepared.timestamp.clone(),
        from_cms: 0,
    }
}
