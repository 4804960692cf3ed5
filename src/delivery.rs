//! `Delivery`: outbox → CMS. Builds batches within the count and byte limits, fixes each line's row
//! (user, text, timestamp) before its first POST, and retries with backoff until the CMS confirms.
//!
//! Because the CMS's chat POST is not idempotent, a batch whose outcome is unknown (timeout, reset,
//! 5xx, an unreadable answer, a restart in the middle) stays marked in flight, and is read back from
//! the CMS before anything is resent: rows already stored are confirmed, the rest go out one line per
//! POST so each gets an unambiguous answer. A line the CMS refuses on its own goes to the dead letters;
//! a batch that is refused is first retried line by line so one bad line does not take its neighbours
//! with it.
//!
//! A failure is the lines' own when the CMS answered it with an error (an error page or HTTP 500
//! for their POST or their read-back) and answers a probe right after it: those lines wait for their own retry, with
//! their own backoff, while newer lines go on (the newer lines of their speakers wait behind them,
//! so that a speaker's order holds), and after `retry.max_line_failures` such failures
//! they go to the dead letters with a reason that says what to check. Any other failure is an
//! outage: the lines keep their place and the loop backs off, for as long as it lasts.
//! Must not: remove a line before the CMS confirmed it (or a read-back found it), or send again a
//! line whose outcome no read-back could settle.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::avatars::AvatarMapper;
use crate::backoff::RetryPolicy;
use crate::cms::wire::{ChatItem, encoded_len, sanitize_message};
use crate::cms::{CmsChat, CmsClient, CmsError};
use crate::config::DeliverySettings;
use crate::filter::FilterReason;
use crate::metrics::Stats;
use crate::model::{LineSource, fill_template};
use crate::outbox::{Cursor, Outbox, OutboxError, PendingLine, Prepared};
use crate::pacing::{Answer, Pacer};

/// How far before the oldest uncertain line a read-back starts. The relay dates its rows itself
/// (`cms.timezone`, whole seconds) from the line's spoken time, which is also where the read-back
/// starts, so the margin only covers rounding; each second of it reads a second of the grid's rows
/// (60 s read 2 400 rows a read-back on a grid of 20 regions at 2 lines/s).
const READ_BACK_MARGIN_SECS: i64 = 5;

/// How often an idle delivery loop looks at the outbox even without being woken.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// How many pending records one step looks at to find lines it may send past those that wait
/// for a retry (and the newer lines of their speakers): a few thousand records are read in
/// milliseconds; beyond them the step waits for the held lines.
const SCAN_LIMIT: usize = 10_000;

/// The probe's time: a day ahead, so that the GET returns no row and costs the CMS nothing but
/// the request.
const PROBE_AHEAD_SECS: i64 = 86_400;

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
        /// Lines that failed on their own and now wait for their retry.
        n_held: usize,
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
    /// `retry.max_line_failures`: failures of a line's own after which it is dead-lettered.
    pub max_line_failures: u32,
}

/// The delivery stage.
pub struct Delivery {
    deps: DeliveryDeps,
    /// The time left between CMS requests (`cms.adaptive_pacing`, `cms.max_requests_per_second`).
    pacer: Pacer,
    /// The lines that wait for their own retry. In memory: after a restart they are tried in their
    /// place again, and their persisted `failures` keep the bound.
    holds: Mutex<Holds>,
}

#[derive(Default)]
struct Tally {
    n_delivered: usize,
    n_reconciled: usize,
    n_dead: usize,
    n_held: usize,
}

/// What failed: a POST, or the read-back of lines of unknown outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    Post,
    ReadBack,
}

/// A line that failed on its own, passed over until `not_before`.
struct Held {
    not_before: tokio::time::Instant,
    /// The speaker whose newer lines wait behind it: after a failed POST or a read-back the CMS
    /// could not answer, the line is resent if a later read-back finds it missing, and must not
    /// arrive after them. The wait is bounded: after `retry.max_line_failures` the line goes to the
    /// dead letters and its speaker goes on.
    speaker: String,
}

#[derive(Default)]
struct Holds {
    lines: HashMap<u64, Held>,
    /// CMS ids this process confirmed for other lines while lines were held: their read-back must
    /// not take one of those rows for theirs (a speaker saying the same words twice in a second).
    claimed: HashSet<i64>,
    /// The error of the last failure that held lines, for `/readyz`.
    last_error: String,
}

impl Holds {
    /// Whether `line` may be sent now: it does not wait for a retry, and no older line of its
    /// speaker is held.
    fn may_send(&self, line: &PendingLine, now: tokio::time::Instant) -> bool {
        if self
            .lines
            .get(&line.id)
            .is_some_and(|held| held.not_before > now)
        {
            return false;
        }
        !self
            .lines
            .iter()
            .any(|(id, held)| *id < line.id && held.speaker == line.line.speaker)
    }
}

impl Delivery {
    /// Builds the stage.
    pub fn new(deps: DeliveryDeps) -> Delivery {
        Delivery {
            pacer: Pacer::new(deps.settings.pacing),
            deps,
            holds: Mutex::new(Holds::default()),
        }
    }

    /// One step: settle lines of unknown outcome, or send the next batch.
    pub async fn try_deliver_batch(&self) -> Result<DeliveryOutcome, DeliveryError> {
        self.deps.outbox.drop_expired().await?;
        // After a full disk, the room delivery freed by removing lines goes back to the reserve
        // first, and then to new lines.
        self.deps.outbox.restore_reserve();
        self.forget_gone_holds()?;
        let lines = self.due_lines()?;
        if lines.is_empty() {
            self.publish_holds();
            return Ok(DeliveryOutcome::Idle);
        }
        let mut tally = Tally::default();
        let stepped = self.step(lines, &mut tally).await;
        self.publish_holds();
        stepped.map(|()| tally.into_outcome())
    }

    async fn step(
        &self,
        mut lines: Vec<PendingLine>,
        tally: &mut Tally,
    ) -> Result<(), DeliveryError> {
        if lines.iter().any(|l| l.in_flight) {
            let (mut uncertain, rest): (Vec<PendingLine>, Vec<PendingLine>) =
                lines.into_iter().partition(|l| l.in_flight);
            // A record in flight without its row (written by another tool, or damaged) cannot
            // have been sent as it is: its row is decided now, as before a first POST, and the
            // read-back looks for that row.
            self.prepare(&mut uncertain).await;
            let unsent = self.reconcile(uncertain, tally).await?;
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
                let unsent = self.reconcile(batch, tally).await?;
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
                    let until_due = self
                        .next_due()
                        .map_or(IDLE_CHECK, |due| due.min(IDLE_CHECK));
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = self.deps.outbox.wait_for_lines() => {}
                        _ = tokio::time::sleep(until_due) => {}
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
                    n_held,
                }) => {
                    self.deps.stats.readiness.outbox_ok();
                    stats.readiness.delivery_ok();
                    if failing {
                        tracing::info!("cms reachable again");
                        failing = false;
                        backoff = self.deps.retry.schedule();
                    }
                    if n_delivered + n_reconciled + n_dead > 0 {
                        tracing::info!(
                            n_messages = n_delivered,
                            n_reconciled,
                            n_dead,
                            n_held,
                            outbox_depth = self.deps.outbox.len(),
                            "delivered batch"
                        );
                    }
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

    /// Tells the pacer how a request that started at `started` ended; publishes the gap.
    fn paced<T>(&self, started: Instant, result: &Result<T, CmsError>, answer: Answer) {
        let answer = if result.is_ok() {
            answer
        } else {
            Answer::Failed
        };
        let gap = self.pacer.answered(started, answer);
        self.deps.stats.cms_pacing_gap_micros.store(
            u64::try_from(gap.as_micros()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Fixes the row of every line that has none yet. The decision is stored with the in-flight mark
    /// (`mark_in_flight`), in the same write, before the first POST: a line that is not sent this
    /// time was never sent, so deciding it again later is harmless, and one write and one flush per
    /// batch fewer is a third of delivery's outbox work.
    async fn prepare(&self, lines: &mut [PendingLine]) {
        for pending in lines.iter_mut().filter(|l| l.prepared.is_none()) {
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
                    &[("name", &line.speaker), ("message", &line.message)],
                ),
                (None, LineSource::Object) => fill_template(
                    &self.deps.settings.anonymous_format,
                    &[
                        ("name", &format!("{} (object)", line.speaker)),
                        ("message", &line.message),
                    ],
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

    /// Marks the batch in flight, counts the attempt and notes the last confirmed id it goes out
    /// after, in one write (flushed) before its POST; returns the lines as marked.
    async fn mark_in_flight(&self, batch: &[PendingLine]) -> Result<Vec<PendingLine>, OutboxError> {
        let sent_after = self
            .deps
            .outbox
            .cursor(Cursor::LastConfirmedId)?
            .unwrap_or(0);
        let marked: Vec<PendingLine> = batch
            .iter()
            .map(|l| PendingLine {
                in_flight: true,
                attempts: l.attempts.saturating_add(1),
                sent_after: Some(sent_after),
                ..l.clone()
            })
            .collect();
        self.deps.outbox.save(&marked).await?;
        Ok(marked)
    }

    /// POSTs a batch and settles it. A `success: true` proves every row stored only when the ids
    /// show no gap: each insert, failed or not, consumes one auto-increment id, so `n` rows ending at
    /// `last_id` right after the last confirmed id are all ours. Otherwise (another writer, a failed
    /// middle row, `cms.verify`) the batch is read back and what is missing is sent line by line.
    /// `batch` is marked in flight (`mark_in_flight`), all after the same confirmed id.
    async fn send(&self, batch: Vec<PendingLine>, tally: &mut Tally) -> Result<(), DeliveryError> {
        // A line whose speaker opted out since it was read is not sent, nor sent again after a
        // read-back that did not find it.
        let (batch, n_withheld) = self.deps.outbox.withhold_opted_out(batch).await?;
        for _ in 0..n_withheld {
            self.deps.stats.filtered(FilterReason::OptedOut);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let mut before = batch.first().and_then(|l| l.sent_after).unwrap_or(0);
        let items: Vec<ChatItem> = batch.iter().map(item_of).collect();
        let started = self.pacer.wait().await;
        self.deps.stats.batch_attempted(batch.len());
        let mark = self.deps.cms.activity_mark();
        let posted = self.deps.cms.post_chats(&items).await;
        self.deps
            .stats
            .post_seconds
            .observe_duration(started.elapsed());
        let answer = if self.deps.cms.overlapped_since(mark) {
            Answer::Read
        } else {
            Answer::Stored {
                n_rows: batch.len(),
            }
        };
        self.paced(started, &posted, answer);
        let last_id = match posted {
            Ok(last_id) => last_id,
            Err(err) if answered_with_error(&err) => {
                return self.failed(&batch, err, Attempt::Post, tally).await;
            }
            Err(err) => return Err(err.into()),
        };
        Stats::add(&self.deps.stats.batches_delivered, 1);
        let n = batch.len() as i64;
        if last_id > 0 && before > 0 && last_id - before < n {
            // Each of the `n` inserts took a new id above every earlier one, ours included: a last
            // id less than `n` above ours means the CMS database went back (restored from a
            // backup), and rows of this batch may lie at or below the cursor, where a read-back
            // would not look. The rows the cursor stood for are gone with the restore, so it
            // starts again from 0 and is raised by this batch.
            tracing::warn!(
                last_confirmed_id = before,
                cms_last_id = last_id,
                "cms ids went backwards (a restored database?); the read-back cursor starts again from 0"
            );
            self.deps
                .outbox
                .set_cursor(Cursor::LastConfirmedId, 0)
                .await?;
            before = 0;
        }
        let proven = n == 1 || (!self.deps.settings.verify && before > 0 && last_id - before == n);
        if proven {
            let ids: Vec<u64> = batch.iter().map(|l| l.id).collect();
            self.confirm(&ids, Some(last_id)).await?;
            // Claimed once the lines are gone: if their removal fails (a full disk), they stay
            // pending and their own read-back must still find these rows.
            self.claim(last_id - n + 1..=last_id);
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
        self.deps.outbox.remove_with_cursor(ids, raise).await?;
        self.forget_holds(ids);
        Ok(())
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
            if !lock(&self.holds).may_send(&line, tokio::time::Instant::now()) {
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

    async fn dead_letter(
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

    /// Reads back the CMS over the window of `uncertain` lines; confirms those found and returns the
    /// rest with their in-flight mark cleared, but for lines that failed `retry.max_line_failures`
    /// times, which go to the dead letters. A read-back that fails is handled by `failed`.
    async fn reconcile(
        &self,
        uncertain: Vec<PendingLine>,
        tally: &mut Tally,
    ) -> Result<Vec<PendingLine>, DeliveryError> {
        // The read-back is an attempt of each line, stored with the write that follows an answer
        // (an outage adds no write: a disk the outbox filled has little room to spare).
        let uncertain: Vec<PendingLine> = uncertain
            .into_iter()
            .map(|l| PendingLine {
                attempts: l.attempts.saturating_add(1),
                ..l
            })
            .collect();
        let since = uncertain
            .iter()
            .map(|l| l.line.spoken_at.timestamp())
            .min()
            .unwrap_or(0)
            - READ_BACK_MARGIN_SECS;
        let started = self.pacer.wait().await;
        let read = self.deps.cms.chats_since(since).await;
        self.paced(started, &read, Answer::Read);
        let rows = match read {
            Ok(rows) => rows,
            Err(err) if answered_with_error(&err) => {
                self.failed(&uncertain, err, Attempt::ReadBack, tally)
                    .await?;
                return Ok(Vec::new());
            }
            Err(err) => return Err(err.into()),
        };
        let cursor = self
            .deps
            .outbox
            .cursor(Cursor::LastConfirmedId)?
            .unwrap_or(0);
        // A line's row, if stored, is above the id confirmed when it went out, whatever was
        // confirmed since; below the cursor only if the cursor started again (`send`).
        let after = |line: &PendingLine| line.sent_after.map_or(cursor, |sent| sent.min(cursor));
        let claimed = lock(&self.holds).claimed.clone();
        let (found, unsent) = match_rows(
            &uncertain,
            &rows,
            after,
            &claimed,
            self.deps.settings.anonymous_user_id,
        );
        if !found.is_empty() {
            let ids: Vec<u64> = found.iter().map(|(id, _)| *id).collect();
            self.confirm(&ids, None).await?;
            self.claim(found.iter().map(|(_, row_id)| *row_id));
            Stats::add(&self.deps.stats.lines_reconciled, found.len() as u64);
            uncertain
                .iter()
                .filter(|l| ids.contains(&l.id))
                .for_each(|l| self.deps.stats.confirmed(l.line.captured_at));
            tally.n_reconciled += found.len();
        }
        let (exhausted, unsent): (Vec<PendingLine>, Vec<PendingLine>) = unsent
            .into_iter()
            .map(|l| PendingLine {
                in_flight: false,
                ..l
            })
            .partition(|l| l.failures >= self.deps.max_line_failures);
        for line in &exhausted {
            let reason = format!(
                "the cms failed this line {} times (last: {}); a read-back found it not stored: fix the cause, then `outbox requeue`",
                line.failures,
                line.last_error.as_deref().unwrap_or("unknown")
            );
            self.dead_letter(line, &reason, tally).await?;
        }
        self.deps.outbox.save(&unsent).await?;
        tracing::info!(
            n_found = found.len(),
            n_resend = unsent.len(),
            n_dead = exhausted.len(),
            n_messages = uncertain.len(),
            outbox_depth = self.deps.outbox.len(),
            "read back lines of unknown outcome"
        );
        Ok(unsent)
    }

    /// An attempt of `lines` (as stored, in flight) that the CMS answered with an error
    /// (`answered_with_error`). If the CMS answers a probe, the failure is theirs: each counts it,
    /// waits for its own retry, and the lines that can no longer be settled (a read-back that failed
    /// `retry.max_line_failures` times) go to the dead letters. Otherwise the CMS fails everything
    /// (its database is down, say): an outage, and the error goes back to the loop, the lines in
    /// their place.
    async fn failed(
        &self,
        lines: &[PendingLine],
        err: CmsError,
        attempt: Attempt,
        tally: &mut Tally,
    ) -> Result<(), DeliveryError> {
        if !self.cms_answers_a_probe().await {
            return Err(err.into());
        }
        Stats::add(&self.deps.stats.delivery_retries, 1);
        let error = err.to_string();
        let max = self.deps.max_line_failures;
        let mut kept = Vec::with_capacity(lines.len());
        let mut n_unresolved = 0;
        for line in lines {
            let line = PendingLine {
                failures: line.failures.saturating_add(1),
                last_error: Some(error.clone()),
                ..line.clone()
            };
            if attempt == Attempt::ReadBack && line.failures >= max {
                let reason = format!(
                    "outcome unknown: the cms could not answer the read-back ({error}) {} times; check the cms chat for this line before `outbox requeue`",
                    line.failures
                );
                self.dead_letter(&line, &reason, tally).await?;
                n_unresolved += 1;
            } else {
                kept.push(line);
            }
        }
        Stats::add(&self.deps.stats.lines_unresolved, n_unresolved);
        self.deps.outbox.save(&kept).await?;
        let n_failures = kept.iter().map(|l| l.failures).max().unwrap_or(1);
        let delay = self.hold_delay(n_failures);
        let not_before = tokio::time::Instant::now() + delay;
        {
            let mut holds = lock(&self.holds);
            for line in &kept {
                holds.lines.insert(
                    line.id,
                    Held {
                        not_before,
                        speaker: line.line.speaker.clone(),
                    },
                );
            }
            holds.last_error = error.clone();
        }
        tally.n_held += kept.len();
        let attempt = match attempt {
            Attempt::Post => "post",
            Attempt::ReadBack => "read-back",
        };
        // The loop's message, with what tells this failure apart: the lines wait on their own.
        tracing::warn!(error = %error, retry_in = ?delay, n_messages = lines.len(), outbox_depth = self.deps.outbox.len(), attempt, n_failures, n_unresolved, held = true, "delivery failed");
        Ok(())
    }

    /// Whether the CMS answers a chat GET that returns no row: after a failure, it tells an outage
    /// from a failure of the lines' own.
    async fn cms_answers_a_probe(&self) -> bool {
        let started = self.pacer.wait().await;
        let ahead = chrono::Utc::now().timestamp() + PROBE_AHEAD_SECS;
        let probe = self.deps.cms.chats_since(ahead).await;
        self.paced(started, &probe, Answer::Read);
        probe.is_ok()
    }

    /// The wait after a line's `n_failures`-th failure: the delivery schedule's, full jitter.
    fn hold_delay(&self, n_failures: u32) -> Duration {
        let mut schedule = self.deps.retry.schedule();
        (1..n_failures.clamp(1, 32)).for_each(|_| {
            schedule.next_delay(None);
        });
        schedule.next_delay(None)
    }

    /// The committed lines this step may send, oldest first.
    fn due_lines(&self) -> Result<Vec<PendingLine>, OutboxError> {
        let now = tokio::time::Instant::now();
        let holds = lock(&self.holds);
        self.deps
            .outbox
            .oldest_where(self.deps.settings.batch_max_messages, SCAN_LIMIT, |line| {
                holds.may_send(line, now)
            })
    }

    /// How long until the next held line may be tried.
    fn next_due(&self) -> Option<Duration> {
        let now = tokio::time::Instant::now();
        lock(&self.holds)
            .lines
            .values()
            .map(|held| held.not_before.saturating_duration_since(now))
            .min()
    }

    /// Notes CMS ids confirmed for our lines while others are held.
    fn claim(&self, row_ids: impl IntoIterator<Item = i64>) {
        let mut holds = lock(&self.holds);
        if !holds.lines.is_empty() {
            holds.claimed.extend(row_ids);
        }
    }

    fn forget_holds(&self, ids: &[u64]) {
        let mut holds = lock(&self.holds);
        for id in ids {
            holds.lines.remove(id);
        }
        if holds.lines.is_empty() {
            holds.claimed.clear();
        }
    }

    /// Forgets held lines that left the outbox otherwise (dropped by its bounds).
    fn forget_gone_holds(&self) -> Result<(), OutboxError> {
        let held: Vec<u64> = lock(&self.holds).lines.keys().copied().collect();
        let mut gone = Vec::new();
        for id in held {
            if !self.deps.outbox.is_pending(id)? {
                gone.push(id);
            }
        }
        self.forget_holds(&gone);
        Ok(())
    }

    /// Tells `/readyz` and the metrics how many lines wait for their own retry, and why.
    fn publish_holds(&self) {
        let holds = lock(&self.holds);
        let n_held = holds.lines.len();
        self.deps
            .stats
            .lines_held_back
            .store(n_held as u64, std::sync::atomic::Ordering::Relaxed);
        let reason = (n_held > 0).then(|| {
            format!(
                "{n_held} lines wait for a retry after the cms failed them while it answered other requests (last error: {}); each is tried up to retry.max_line_failures = {} times, then moved to the dead letters (`outbox dead`)",
                holds.last_error, self.deps.max_line_failures
            )
        });
        self.deps.stats.readiness.delivery_held(reason);
    }
}

impl Tally {
    fn into_outcome(self) -> DeliveryOutcome {
        DeliveryOutcome::Progress {
            n_delivered: self.n_delivered,
            n_reconciled: self.n_reconciled,
            n_dead: self.n_dead,
            n_held: self.n_held,
        }
    }
}

/// Why the CMS refused `line`, for its dead letter (`CmsError::refusal_reason`).
fn refusal(err: &CmsError, line: &PendingLine) -> String {
    err.refusal_reason(line.prepared.as_ref().map(|p| p.user_id))
}

/// Whether the CMS itself answered a request with an error (not an outage): a page that is not its
/// JSON with HTTP 200 (a PHP fatal error, such as its memory limit on a large chat GET) or an answer
/// too large to read, HTTP 500, or `success: false` with an error of its own. Validation errors and
/// a failed last row have their own handling; no answer (a timeout, a reset, a refused
/// connection), a proxy's 502/503/504 or a refused account are outages.
fn answered_with_error(err: &CmsError) -> bool {
    matches!(
        err,
        CmsError::Decode { .. } | CmsError::Failed(_) | CmsError::Http { status: 500, .. }
    )
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each of these mutexes guards plain values assigned whole: a panic elsewhere leaves them usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The row of a prepared line.
fn item_of(line: &PendingLine) -> ChatItem {
    let prepared = line
        .prepared
        .as_ref()
        .expect("every path prepares its lines (`prepare`) before it sends them");
    ChatItem {
        user_id: prepared.user_id,
        message: prepared.message.clone(),
        timestamp: prepared.timestamp.clone(),
        from_cms: 0,
    }
}

/// Splits `uncertain` into the (line id, row id) pairs found among `rows` (relay rows above the
/// line's `after_id`, not `claimed` by another line, each row matching at most one line) and the
/// lines not found.
fn match_rows(
    uncertain: &[PendingLine],
    rows: &[CmsChat],
    after_id: impl Fn(&PendingLine) -> i64,
    claimed: &HashSet<i64>,
    anonymous_user_id: i64,
) -> (Vec<(u64, i64)>, Vec<PendingLine>) {
    let mut used = claimed.clone();
    let mut found = Vec::new();
    let mut unsent = Vec::new();
    for line in uncertain {
        let Some(prepared) = &line.prepared else {
            unsent.push(line.clone());
            continue;
        };
        let after = after_id(line);
        let hit = rows.iter().find(|row| {
            !row.from_cms
                && row.id > after
                && !used.contains(&row.id)
                && row.message == prepared.message
                && row.timestamp == prepared.timestamp
                && (row.user_id == prepared.user_id
                    || (prepared.user_id == anonymous_user_id && row.user_id == -1))
        });
        match hit {
            Some(row) => {
                used.insert(row.id);
                found.push((line.id, row.id));
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
                source: crate::model::LineSource::Avatar,
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
            failures: 0,
            last_error: None,
            sent_after: None,
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
        let (found, unsent) = match_rows(&uncertain, &rows, |_| 6, &HashSet::new(), -1);
        assert_eq!(found, [(1, 7), (3, 8)]);
        assert_eq!(unsent.iter().map(|l| l.id).collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn a_read_back_uses_each_lines_own_cursor_and_skips_rows_claimed_by_other_lines() {
        let t = "2026-11-22 12:00:00";
        // Line 1 went out when the cursor was 4; lines confirmed since raised it to 9, and row 9
        // is the same words by the same speaker, confirmed for another line.
        let mut held = pending(1, 3, "lol", t);
        held.sent_after = Some(4);
        let rows = [row(5, 3, "lol", t), row(9, 3, "lol", t)];

        let (found, _) = match_rows(
            std::slice::from_ref(&held),
            &rows,
            |line| line.sent_after.unwrap_or(9),
            &HashSet::from([9]),
            -1,
        );

        assert_eq!(found, [(1, 5)]);
    }
}
