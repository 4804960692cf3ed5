//! `Delivery`: outbox → CMS. Builds batches within the count and byte limits, fixes each line's row
//! (user, text, timestamp) before its first POST, and retries with backoff until the CMS confirms.
//!
//! Because the CMS's chat POST is not idempotent, a batch whose outcome is unknown (timeout, reset,
//! 5xx, an unreadable answer, a restart in the middle) stays marked in flight, and is read back from
//! the CMS before anything is resent: rows already stored are confirmed, the rest go out one line per
//! POST so each gets an unambiguous answer. A line the CMS refuses on its own goes to the dead letters;
//! a batch that is refused is first retried line by line so one bad line does not take its neighbours
//! with it. Must not: remove a line before the CMS confirmed it (or a read-back found it).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::avatars::AvatarMapper;
use crate::backoff::RetryPolicy;
use crate::cms::wire::{ChatItem, encoded_len, sanitize_message};
use crate::cms::{CmsChat, CmsClient, CmsError};
use crate::config::DeliverySettings;
use crate::filter::FilterReason;
use crate::metrics::Stats;
use crate::model::fill_template;
use crate::outbox::{Cursor, Outbox, OutboxError, PendingLine, Prepared};

/// How far before the oldest uncertain line a read-back starts, for clock rounding between the relay
/// and the CMS.
const READ_BACK_MARGIN_SECS: i64 = 60;

/// How often an idle delivery loop looks at the outbox even without being woken.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// Why a delivery step failed; the lines stay in the outbox.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The CMS failed in a way worth retrying.
    #[error(transparent)]
    Cms(#[from] CmsError),
    /// The outbox could not be read or written.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

impl DeliveryError {
    fn retry_after(&self) -> Option<Duration> {
        match self {
            DeliveryError::Cms(err) => err.retry_after(),
            DeliveryError::Outbox(_) => None,
        }
    }
}

/// What one delivery step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// Nothing was pending.
    Idle,
    /// Progress was made.
    Progress {
        /// Lines the CMS confirmed.
        n_delivered: usize,
        /// Lines a read-back found already stored.
        n_reconciled: usize,
        /// Lines moved to the dead letters.
        n_dead: usize,
    },
}

/// What delivery is built from.
pub struct DeliveryDeps {
    /// Where the lines wait.
    pub outbox: Arc<Outbox>,
    /// Where they go.
    pub cms: Arc<CmsClient>,
    /// Speaker → CMS user.
    pub mapper: Arc<AvatarMapper>,
    /// Batching, pacing and how a row is made (`CmsSettings::delivery`).
    pub settings: DeliverySettings,
    /// The retry schedule.
    pub retry: RetryPolicy,
    /// The counters.
    pub stats: Arc<Stats>,
}

/// The delivery stage.
pub struct Delivery {
    deps: DeliveryDeps,
    /// The earliest moment of the next CMS request (`cms.max_requests_per_second`).
    next_request: std::sync::Mutex<tokio::time::Instant>,
}

#[derive(Default)]
struct Tally {
    n_delivered: usize,
    n_reconciled: usize,
    n_dead: usize,
}

impl Delivery {
    /// Builds the stage.
    pub fn new(deps: DeliveryDeps) -> Delivery {
        Delivery {
            deps,
            next_request: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// One step: settle lines of unknown outcome, or send the next batch.
    pub async fn try_deliver_batch(&self) -> Result<DeliveryOutcome, DeliveryError> {
        self.deps.outbox.drop_expired().await?;
        let mut lines = self
            .deps
            .outbox
            .oldest(self.deps.settings.batch_max_messages)?;
        if lines.is_empty() {
            return Ok(DeliveryOutcome::Idle);
        }
        let mut tally = Tally::default();
        if lines.iter().any(|l| l.in_flight) {
            let uncertain: Vec<PendingLine> =
                lines.iter().filter(|l| l.in_flight).cloned().collect();
            let unsent = self.reconcile(uncertain, &mut tally).await?;
            // What was not found goes out one line per POST, so each answer is unambiguous.
            self.deliver_singly(unsent, &mut tally).await?;
            return Ok(tally.into_outcome());
        }
        self.prepare(&mut lines).await;
        let batch = self.cut_batch(lines);
        match self.send(batch.clone(), &mut tally).await {
            Ok(()) => {}
            Err(DeliveryError::Cms(CmsError::Invalid(reason))) if batch.len() > 1 => {
                // Nothing of the batch was stored: find the culprit line by line.
                tracing::warn!(n_messages = batch.len(), outbox_depth = self.deps.outbox.len(), reason = %reason, "cms rejected a batch; retrying it line by line");
                self.deliver_singly(batch, &mut tally).await?;
            }
            Err(DeliveryError::Cms(CmsError::LastRowFailed)) if batch.len() > 1 => {
                // The last row failed; earlier rows may be stored. Read back, then send the rest
                // line by line so the failing one is identified.
                tracing::warn!(
                    n_messages = batch.len(),
                    outbox_depth = self.deps.outbox.len(),
                    "cms could not store the last line of a batch; reading it back"
                );
                let unsent = self.reconcile(batch, &mut tally).await?;
                self.deliver_singly(unsent, &mut tally).await?;
            }
            Err(DeliveryError::Cms(err)) if batch.len() == 1 && !err.is_retryable() => {
                // A batch of one is unambiguous: the CMS will not take this line.
                self.dead_letter(&batch[0], &refusal(&err, &batch[0]), &mut tally)
                    .await?;
            }
            Err(err) => return Err(err),
        }
        Ok(tally.into_outcome())
    }

    /// Delivers until `token` is cancelled. A POST in flight is not cancelled by the token.
    pub async fn run_until_stopped(self, token: CancellationToken) {
        let mut backoff = self.deps.retry.schedule();
        let mut failing = false;
        let stats = self.deps.stats.clone();
        let _alive = stats.delivery_heartbeat.alive();
        while !token.is_cancelled() {
            stats.delivery_heartbeat.beat();
            match self.try_deliver_batch().await {
                Ok(DeliveryOutcome::Idle) => {
                    stats.readiness.delivery_idle();
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = self.deps.outbox.wait_for_lines() => {}
                        _ = tokio::time::sleep(IDLE_CHECK) => {}
                    }
                    if !self.deps.settings.batch_linger.is_zero()
                        && self.deps.outbox.len() < self.deps.settings.batch_max_messages
                    {
                        tokio::select! {
                            _ = token.cancelled() => {}
                            _ = tokio::time::sleep(self.deps.settings.batch_linger) => {}
                        }
                    }
                }
                Ok(DeliveryOutcome::Progress {
                    n_delivered,
                    n_reconciled,
                    n_dead,
                }) => {
                    self.deps.stats.readiness.outbox_ok();
                    stats.readiness.delivery_ok();
                    if failing {
                        tracing::info!("cms reachable again");
                        failing = false;
                        backoff = self.deps.retry.schedule();
                    }
                    tracing::info!(
                        n_messages = n_delivered,
                        n_reconciled,
                        n_dead,
                        outbox_depth = self.deps.outbox.len(),
                        "delivered batch"
                    );
                }
                Err(err) => {
                    Stats::add(&self.deps.stats.delivery_retries, 1);
                    match &err {
                        DeliveryError::Outbox(outbox_err) => {
                            stats.readiness.outbox_failed(outbox_err)
                        }
                        DeliveryError::Cms(cms_err) => stats.readiness.delivery_failed(cms_err),
                    }
                    let n_messages = Stats::get(&self.deps.stats.last_batch_size);
                    let delay = backoff.next_delay(err.retry_after());
                    let level_error = matches!(
                        err,
                        DeliveryError::Cms(
                            CmsError::Unauthorized
                                | CmsError::Login(_)
                                | CmsError::LoginDeferred { .. }
                        ) | DeliveryError::Outbox(_)
                    );
                    if level_error {
                        tracing::error!(error = %err, retry_in = ?delay, n_messages, outbox_depth = self.deps.outbox.len(), "delivery failed");
                    } else {
                        tracing::warn!(error = %err, retry_in = ?delay, n_messages, outbox_depth = self.deps.outbox.len(), "delivery failed");
                    }
                    failing = true;
                    // After a storage error the poller's first good write (the disk has room
                    // again) is the sign to try at once.
                    let storage_failed = matches!(err, DeliveryError::Outbox(_));
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.deps.outbox.wait_for_lines(), if storage_failed => {}
                    }
                }
            }
        }
        tracing::info!(outbox_depth = self.deps.outbox.len(), "delivery stopped");
    }

    /// Waits for the next request slot under `cms.max_requests_per_second`.
    async fn pace(&self) {
        if self.deps.settings.max_requests_per_second <= 0.0 {
            return;
        }
        let interval = Duration::from_secs_f64(1.0 / self.deps.settings.max_requests_per_second);
        let slot = {
            let mut next = self
                .next_request
                .lock()
                .expect("pacing lock is never poisoned");
            let slot = (*next).max(tokio::time::Instant::now());
            *next = slot + interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }

    /// Fixes the row of every line that has none yet. The decision is stored with the in-flight mark
    /// (`mark_in_flight`), in the same write, before the first POST: a line that is not sent this
    /// time was never sent, so deciding it again later is harmless, and one write and one flush per
    /// batch fewer is a third of delivery's outbox work.
    async fn prepare(&self, lines: &mut [PendingLine]) {
        for pending in lines.iter_mut().filter(|l| l.prepared.is_none()) {
            let line = &pending.line;
            let user = self
                .deps
                .mapper
                .resolve(&line.speaker, line.owner_id.as_deref())
                .await;
            let message = match user {
                Some(_) => line.message.clone(),
                None => fill_template(
                    &self.deps.settings.anonymous_format,
                    &[("name", &line.speaker), ("message", &line.message)],
                ),
            };
            pending.prepared = Some(Prepared {
                user_id: user.unwrap_or(self.deps.settings.anonymous_user_id),
                message: sanitize_message(&message),
                timestamp: self
                    .deps
                    .settings
                    .timezone
                    .wall_clock(line.spoken_at)
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string(),
            });
        }
    }

    /// The longest prefix within `batch_max_bytes` (at least one line).
    fn cut_batch(&self, lines: Vec<PendingLine>) -> Vec<PendingLine> {
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

    async fn mark_in_flight(&self, batch: &[PendingLine]) -> Result<(), OutboxError> {
        let marked: Vec<PendingLine> = batch
            .iter()
            .map(|l| PendingLine {
                in_flight: true,
                ..l.clone()
            })
            .collect();
        self.deps.outbox.save(&marked).await
    }

    /// POSTs a batch and settles it. A `success: true` proves every row stored only when the ids
    /// show no gap: each insert, failed or not, consumes one auto-increment id, so `n` rows ending at
    /// `last_id` right after the last confirmed id are all ours. Otherwise (another writer, a failed
    /// middle row, `cms.verify`) the batch is read back and what is missing is sent line by line.
    async fn send(&self, batch: Vec<PendingLine>, tally: &mut Tally) -> Result<(), DeliveryError> {
        let before = self
            .deps
            .outbox
            .cursor(Cursor::LastConfirmedId)?
            .unwrap_or(0);
        // A line whose speaker opted out since it was read is not sent, nor sent again after a
        // read-back that did not find it.
        let (batch, n_withheld) = self.deps.outbox.withhold_opted_out(batch).await?;
        for _ in 0..n_withheld {
            self.deps.stats.filtered(FilterReason::OptedOut);
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.mark_in_flight(&batch).await?;
        let items: Vec<ChatItem> = batch.iter().map(item_of).collect();
        self.pace().await;
        self.deps.stats.batch_attempted(batch.len());
        let started = Instant::now();
        let posted = self.deps.cms.post_chats(&items).await;
        self.deps
            .stats
            .post_seconds
            .observe_duration(started.elapsed());
        let last_id = posted?;
        Stats::add(&self.deps.stats.batches_delivered, 1);
        let n = batch.len() as i64;
        let proven = n == 1 || (!self.deps.settings.verify && before > 0 && last_id - before == n);
        if proven {
            let ids: Vec<u64> = batch.iter().map(|l| l.id).collect();
            self.confirm(&ids, Some(last_id)).await?;
            Stats::add(&self.deps.stats.lines_delivered, batch.len() as u64);
            batch
                .iter()
                .for_each(|l| self.deps.stats.confirmed(l.line.captured_at));
            tally.n_delivered += batch.len();
            return Ok(());
        }
        let unsent = self.reconcile(batch, tally).await?;
        if !unsent.is_empty() {
            tracing::warn!(
                n_missing = unsent.len(),
                n_messages = items.len(),
                outbox_depth = self.deps.outbox.len(),
                "cms reported success but lines are missing; resending them one by one"
            );
        }
        self.deliver_singly(unsent, tally).await?;
        self.raise_last_confirmed(last_id).await?;
        Ok(())
    }

    /// Removes confirmed lines and raises the last confirmed id, with one flush. The removal is
    /// written first and sled keeps write order, so a crash can leave the removal without the raised
    /// id (one extra read-back later) but never the reverse: a read-back ignores rows at or below
    /// that id, so a raised id with the lines still pending would send them twice.
    async fn confirm(&self, ids: &[u64], last_id: Option<i64>) -> Result<(), OutboxError> {
        let known = self
            .deps
            .outbox
            .cursor(Cursor::LastConfirmedId)?
            .unwrap_or(0);
        let raise = last_id
            .filter(|last_id| *last_id > known)
            .map(|last_id| (Cursor::LastConfirmedId, last_id));
        self.deps.outbox.remove_with_cursor(ids, raise).await
    }

    async fn raise_last_confirmed(&self, last_id: i64) -> Result<(), OutboxError> {
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
    async fn deliver_singly(
        &self,
        lines: Vec<PendingLine>,
        tally: &mut Tally,
    ) -> Result<(), DeliveryError> {
        for line in lines {
            match Box::pin(self.send(vec![line.clone()], tally)).await {
                Ok(()) => {}
                Err(DeliveryError::Cms(err)) if !err.is_retryable() => {
                    self.dead_letter(&line, &refusal(&err, &line), tally)
                        .await?
                }
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    async fn dead_letter(
        &self,
        line: &PendingLine,
        reason: &str,
        tally: &mut Tally,
    ) -> Result<(), OutboxError> {
        tracing::error!(outbox_id = line.id, speaker = %line.line.speaker, reason, n_messages = 1, outbox_depth = self.deps.outbox.len(), "line moved to the dead letters");
        self.deps.outbox.dead_letter(line, reason).await?;
        Stats::add(&self.deps.stats.lines_dead_lettered, 1);
        tally.n_dead += 1;
        Ok(())
    }

    /// Reads back the CMS over the window of `uncertain` lines; confirms those found and returns the
    /// rest with their in-flight mark cleared.
    async fn reconcile(
        &self,
        uncertain: Vec<PendingLine>,
        tally: &mut Tally,
    ) -> Result<Vec<PendingLine>, DeliveryError> {
        let since = uncertain
            .iter()
            .map(|l| l.line.spoken_at.timestamp())
            .min()
            .unwrap_or(0)
            - READ_BACK_MARGIN_SECS;
        self.pace().await;
        let rows = self.deps.cms.chats_since(since).await?;
        let after = self
            .deps
            .outbox
            .cursor(Cursor::LastConfirmedId)?
            .unwrap_or(0);
        let (found, unsent) = match_rows(
            &uncertain,
            &rows,
            after,
            self.deps.settings.anonymous_user_id,
        );
        if !found.is_empty() {
            self.confirm(&found, None).await?;
            Stats::add(&self.deps.stats.lines_reconciled, found.len() as u64);
            uncertain
                .iter()
                .filter(|l| found.contains(&l.id))
                .for_each(|l| self.deps.stats.confirmed(l.line.captured_at));
            tally.n_reconciled += found.len();
        }
        let unsent: Vec<PendingLine> = unsent
            .into_iter()
            .map(|l| PendingLine {
                in_flight: false,
                ..l
            })
            .collect();
        self.deps.outbox.save(&unsent).await?;
        tracing::info!(
            n_found = found.len(),
            n_resend = unsent.len(),
            n_messages = found.len() + unsent.len(),
            outbox_depth = self.deps.outbox.len(),
            "read back lines of unknown outcome"
        );
        Ok(unsent)
    }
}

impl Tally {
    fn into_outcome(self) -> DeliveryOutcome {
        DeliveryOutcome::Progress {
            n_delivered: self.n_delivered,
            n_reconciled: self.n_reconciled,
            n_dead: self.n_dead,
        }
    }
}

/// Why the CMS refused `line`, for its dead letter (`CmsError::refusal_reason`).
fn refusal(err: &CmsError, line: &PendingLine) -> String {
    err.refusal_reason(line.prepared.as_ref().map(|p| p.user_id))
}

/// The row of a prepared line.
fn item_of(line: &PendingLine) -> ChatItem {
    let prepared = line
        .prepared
        .as_ref()
        .expect("lines are prepared before they are sent");
    ChatItem {
        user_id: prepared.user_id,
        message: prepared.message.clone(),
        timestamp: prepared.timestamp.clone(),
        from_cms: 0,
    }
}

/// Splits `uncertain` into the ids found among `rows` (relay rows newer than `after_id`, each row
/// matching at most one line) and the lines not found.
fn match_rows(
    uncertain: &[PendingLine],
    rows: &[CmsChat],
    after_id: i64,
    anonymous_user_id: i64,
) -> (Vec<u64>, Vec<PendingLine>) {
    let mut used = HashSet::new();
    let mut found = Vec::new();
    let mut unsent = Vec::new();
    for line in uncertain {
        let Some(prepared) = &line.prepared else {
            unsent.push(line.clone());
            continue;
        };
        let hit = rows.iter().find(|row| {
            !row.from_cms
                && row.id > after_id
                && !used.contains(&row.id)
                && row.message == prepared.message
                && row.timestamp == prepared.timestamp
                && (row.user_id == prepared.user_id
                    || (prepared.user_id == anonymous_user_id && row.user_id == -1))
        });
        match hit {
            Some(row) => {
                used.insert(row.id);
                found.push(line.id);
            }
            None => unsent.push(line.clone()),
        }
    }
    (found, unsent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CapturedLine;
    use chrono::Utc;

    fn pending(id: u64, user_id: i64, message: &str, timestamp: &str) -> PendingLine {
        let now = Utc::now();
        PendingLine {
            id,
            line: CapturedLine {
                speaker: "S".into(),
                owner_id: None,
                message: message.into(),
                spoken_at: now,
                captured_at: now,
            },
            attempts: 0,
            prepared: Some(Prepared {
                user_id,
                message: message.into(),
                timestamp: timestamp.into(),
            }),
            in_flight: true,
        }
    }

    fn row(id: i64, user_id: i64, message: &str, timestamp: &str) -> CmsChat {
        CmsChat {
            id,
            user_id,
            username: String::new(),
            first_name: String::new(),
            last_name: String::new(),
            message: message.into(),
            timestamp: timestamp.into(),
            from_cms: false,
        }
    }

    #[test]
    fn a_read_back_matches_each_row_once_and_ignores_old_rows() {
        let t = "2026-11-22 12:00:00";
        let uncertain = [
            pending(1, 3, "hi", t),
            pending(2, 3, "hi", t),
            pending(3, -1, "[C] yo", t),
        ];
        // Row 5 is from before the last confirmed id; row 7 matches one of the two "hi" lines.
        let rows = [
            row(5, 3, "hi", t),
            row(7, 3, "hi", t),
            row(8, -1, "[C] yo", t),
        ];
        let (found, unsent) = match_rows(&uncertain, &rows, 6, -1);
        assert_eq!(found, [1, 3]);
        assert_eq!(unsent.iter().map(|l| l.id).collect::<Vec<_>>(), [2]);
    }
}
