//! The loop: steps delivery until stopped, waits while idle, and backs off while the CMS fails.
//!
//! Must not: cancel a POST in flight, or wait without its heartbeat beating.

use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::cms::CmsError;
use crate::delivery::{ChatApi, Delivery, DeliveryError, DeliveryOutcome, IDLE_CHECK};
use crate::metrics::Stats;
use crate::pacing::Answer;

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
