//! The batch marked ahead: while batch k is posted, batch k+1 is scanned for, its rows decided and
//! its lines marked in flight (the flush included), so that between two POSTs the CMS does not
//! wait for the relay's bookkeeping. Still one POST in flight: k+1 goes out once k is answered.
//!
//! The order of durable writes, and what a crash at each point leaves:
//! - k+1's mark, flushed during k's POST, says it goes out after the id confirmed before k. A crash
//!   before k's answer leaves k and k+1 in flight after the same id: both are read back together,
//!   each line taking the lowest matching row, and k+1's lines, never sent, are found missing.
//! - k's answer `success: true` with last id N: k+1's mark is rewritten to go out after N
//!   (`Outbox::carry_in_flight`, unflushed) before anything of k is removed or any other row of
//!   ours can be stored. sled keeps write order, so k's removal never reaches the disk without it,
//!   and k+1 is never read back against k's rows once k is gone (the same words in the same second
//!   would be taken for k+1's).
//! - Any other answer to k, and any POST of other lines (a line sent alone, a read-back's missing
//!   lines), first clears k+1's mark (`mark_not_stored`, flushed): its lines are pending again and
//!   go in their turn, after whatever is sent first.
//!
//! Beside the POST, after the mark, a read beside the POSTs that has come (`beside`) is settled:
//! its removals are of batches answered before k went out, whose rows lie at or below the id k+1
//! goes out after. The lines it finds missing wait here and go first, one per POST, at the next
//! step.
//!
//! Must not: leave a batch marked ahead while rows of other lines of ours are stored after its
//! mark, or post it after an answer other than `success: true` to the POST before it.

use std::collections::HashSet;

use crate::delivery::{ChatApi, Delivery, Tally, lock};
use crate::outbox::{OutboxError, PendingLine};

/// The batch marked ahead and the POST it waits behind.
#[derive(Default)]
pub(super) struct Ahead {
    /// The lines of the POST on its way: the scan for the next batch passes over them.
    pub(super) posting: HashSet<u64>,
    /// The batch marked ahead, not posted yet.
    pub(super) next: Option<Vec<PendingLine>>,
    /// Lines a read settled while the POST was on its way found missing: pending again, sent one
    /// per POST at the next step, before anything else.
    pub(super) resend: Vec<PendingLine>,
}

impl Ahead {
    /// Whether line `id` is posted now or marked ahead: the step's scan passes over it.
    pub(super) fn holds(&self, id: u64) -> bool {
        self.posting.contains(&id)
            || self.next.iter().flatten().any(|line| line.id == id)
            || self.resend.iter().any(|line| line.id == id)
    }
}

impl<C: ChatApi> Delivery<C> {
    /// While a POST is on its way: marks the next batch (`mark_ahead`), then settles what a read
    /// beside the POSTs that has come proves (its removals written while the CMS stores, not
    /// between two POSTs; what it found missing is kept for the next step). Failures are logged:
    /// the lines stay as they are on disk, and the step's next writes meet the same error.
    pub(super) async fn work_ahead(&self, side: &mut Tally) {
        if let Err(err) = self.mark_ahead(side.now).await {
            // Its lines stay as the failed write left them: pending, or in flight and read back
            // by a later step.
            tracing::warn!(error = %err, "could not mark the next batch while posting");
        }
        match self.settle_read_beside(false, side).await {
            Ok((_, missing)) => lock(&self.ahead).resend.extend(missing),
            Err(err) => {
                tracing::warn!(error = %err, "could not settle the read beside the posts while posting; its lines await their proof")
            }
        }
    }

    /// The lines a read settled during the last POST found missing, to be sent one per POST.
    pub(super) fn take_resend(&self) -> Vec<PendingLine> {
        std::mem::take(&mut lock(&self.ahead).resend)
    }

    /// While a POST is on its way: scans for the next batch, decides its rows and marks it in
    /// flight. Lines of unknown outcome due now are left to the step (they are read back first).
    /// Not while the outbox's disk is full: the mark rewrites a batch and its carry again, and
    /// the room the reserve gave back is for removing lines.
    pub(super) async fn mark_ahead(&self, now: tokio::time::Instant) -> Result<(), OutboxError> {
        if lock(&self.ahead).next.is_some() || self.deps.outbox.is_disk_full() {
            return Ok(());
        }
        let mut lines = self.due_lines(now)?;
        if lines.is_empty() || lines.iter().any(PendingLine::is_in_flight) {
            return Ok(());
        }
        self.prepare(&mut lines).await;
        let batch = self.cut_batch(lines);
        let marked = self.mark_in_flight(&batch).await?;
        lock(&self.ahead).next = Some(marked);
        Ok(())
    }

    /// Whether a batch is marked ahead.
    pub(super) fn marked_ahead(&self) -> bool {
        lock(&self.ahead).next.is_some()
    }

    /// The batch marked ahead, to be posted now, without the lines that left the outbox since (its
    /// `max_age`, a privacy command).
    pub(super) fn take_ahead(&self) -> Result<Option<Vec<PendingLine>>, OutboxError> {
        let Some(next) = lock(&self.ahead).next.take() else {
            return Ok(None);
        };
        let mut kept = Vec::with_capacity(next.len());
        for line in next {
            if self.deps.outbox.is_pending(line.id)? {
                kept.push(line);
            }
        }
        Ok((!kept.is_empty()).then_some(kept))
    }

    /// The POST before the batch marked ahead was answered `success: true` with `last_id`: the
    /// batch now goes out after it.
    pub(super) fn carry_ahead(&self, last_id: i64) -> Result<(), OutboxError> {
        let mut ahead = lock(&self.ahead);
        if let Some(next) = ahead.next.take() {
            ahead.next = Some(self.deps.outbox.carry_in_flight(&next, last_id)?);
        }
        Ok(())
    }

    /// Clears the mark of the batch marked ahead, if any: it was never posted.
    pub(super) async fn clear_ahead(&self) -> Result<(), OutboxError> {
        let next = lock(&self.ahead).next.take();
        if let Some(next) = next {
            self.deps.outbox.mark_not_stored(&next).await?;
        }
        Ok(())
    }
}
