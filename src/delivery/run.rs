//! The loop: steps delivery until stopped, waits while idle, and backs off while the CMS fails.
//!
//! Must not: cancel a POST in flight, or wait without its heartbeat beating.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::cms::CmsError;
use crate::delivery::{ChatApi, Delivery, DeliveryError, DeliveryOutcome, IDLE_CHECK};
use crate::metrics::Stats;
use crate::pacing::Answer;

/// How often the heartbeat beats while the loop waits after a failure (the watchdog's limit is
/// minutes: `STALL_LIMIT`, at least twice `retry.max`).
const HEARTBEAT_TICK: Duration = Duration::from_secs(1);

impl<C: ChatApi> Delivery<C> {
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
                    // Until a held line is due, or batches awaiting their proof stop waiting
                    // for a read of the in-world reader's (`settle`), or that read comes.
                    let until_due = [self.next_due(), self.board_wait()]
                        .into_iter()
                        .flatten()
                        .fold(IDLE_CHECK, Duration::min);
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = self.deps.outbox.wait_for_lines() => {}
                        _ = self.deps.board.next_read() => {}
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
                        DeliveryError::InsertsFailing { .. } => {
                            stats.readiness.delivery_failed(&err)
                        }
                    }
                    let n_messages = Stats::get(&self.deps.stats.last_batch_size);
                    let plain = backoff.next_delay(None);
                    let delay = match err.retry_after() {
                        Some(asked) => plain.max(asked.min(self.deps.retry.max)),
                        None => plain,
                    };
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
                    self.wait_after_failure(&token, plain, delay, storage_failed)
                        .await;
                }
            }
        }
        tracing::info!(outbox_depth = self.deps.outbox.len(), "delivery stopped");
    }

    /// Waits `delay` after a failed step (`plain`, the schedule's own, lengthened by a server's
    /// `Retry-After` up to `retry.max`), beating the heartbeat every `HEARTBEAT_TICK` so that the
    /// watchdog sees a loop that waits, not one that is stuck. Once `plain` has passed, new lines
    /// end the wait, and so does a CMS that answers a probe again (tried on the retry schedule, so
    /// a CMS in maintenance gets a GET that returns no row every few seconds at most, up to one
    /// every `retry.max`). After a storage error, the first new line ends it at once: the disk has
    /// room again.
    async fn wait_after_failure(
        &self,
        token: &CancellationToken,
        plain: Duration,
        delay: Duration,
        storage_failed: bool,
    ) {
        // A wake-up stored by lines appended before the failure is no news: taken here, so that
        // only lines appended during the wait end it.
        let _ = tokio::time::timeout(Duration::ZERO, self.deps.outbox.wait_for_lines()).await;
        let start = tokio::time::Instant::now();
        let end = start + delay;
        let earliest = start + plain;
        // The first probe when the schedule's own wait is over, then on the retry schedule.
        let mut next_probe = earliest;
        let mut probes = self.deps.retry.schedule();
        let mut new_lines = false;
        loop {
            self.deps.stats.delivery_heartbeat.beat();
            let now = tokio::time::Instant::now();
            if token.is_cancelled() || now >= end || (new_lines && now >= earliest) {
                return;
            }
            if now >= next_probe {
                if self.cms_answers_a_probe().await {
                    return;
                }
                next_probe = tokio::time::Instant::now() + probes.next_delay(None);
                continue;
            }
            // `next_probe` is never before `earliest`: waking for it covers new lines too.
            let tick = HEARTBEAT_TICK.min(end - now).min(next_probe - now);
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
                _ = self.deps.outbox.wait_for_lines(), if !new_lines => {
                    if storage_failed {
                        return;
                    }
                    new_lines = true;
                }
            }
        }
    }

    /// Tells the pacer how a request that started at `started` ended; publishes the gap.
    pub(super) fn paced<T>(&self, started: Instant, result: &Result<T, CmsError>, answer: Answer) {
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
}
