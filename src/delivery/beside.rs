//! The shared read beside the POSTs: while delivery is behind a backlog, the read that settles its
//! batches awaiting their proof (`settle`) runs as a task of its own while the next batches go out,
//! so that a CMS with a second PHP worker reads on one while the relay's POSTs keep the other busy,
//! and the POSTs never wait for a read of hundreds of milliseconds. Still one POST in flight: the
//! read is a GET, sent after the pacer's turn like any request of delivery's.
//!
//! A read beside is a read like the in-world reader's (`settle::settle_from_read`): it settles the
//! batches answered before it was sent whose window it reaches back over; batches answered since
//! wait for the next. One runs at a time. When it fails, the next read is delivery's own, made
//! in the step (`readback::reconcile`), which tells an outage from a failure of the lines' own.
//!
//! Must not: settle a batch answered after the read was sent, or leave a failure of the read
//! unreported (it is logged, and the read made again in the step, whose errors the loop handles).

use std::sync::Arc;
use std::time::Instant;

use crate::cms::CmsError;
use crate::cms::board::BoardRead;
use crate::cms::wire::CmsChat;
use crate::delivery::{ChatApi, Delivery, DeliveryError, Tally, lock};
use crate::outbox::PendingLine;

/// The read beside the POSTs, if one was started, and whether the last one failed.
#[derive(Default)]
pub(super) struct Beside {
    pub(super) task: Option<ReadTask>,
    /// The last read beside failed: the next shared read is made in the step.
    pub(super) failed: bool,
}

/// A read beside the POSTs: its start, when it was sent, and the task that makes it.
pub(super) struct ReadTask {
    since: i64,
    sent_at: Instant,
    handle: tokio::task::JoinHandle<Result<Vec<CmsChat>, CmsError>>,
}

impl<C: ChatApi> Delivery<C> {
    /// Whether a read beside the POSTs is on its way.
    pub(super) fn read_beside_running(&self) -> bool {
        lock(&self.beside).task.is_some()
    }

    /// Starts the shared read from `since` beside the next POSTs, after the pacer's turn.
    pub(super) async fn start_read_beside(&self, since: i64) {
        self.pacer.wait().await;
        let cms = Arc::clone(&self.deps.cms);
        let sent_at = Instant::now();
        let handle = tokio::spawn(async move { cms.read_since(since).await });
        lock(&self.beside).task = Some(ReadTask {
            since,
            sent_at,
            handle,
        });
    }

    /// Settles what the read beside proves once it has come (or, with `wait`, once it comes), and
    /// sends the lines it found missing one per POST; whether anything was settled.
    pub(super) async fn settle_from_read_beside(
        &self,
        wait: bool,
        tally: &mut Tally,
    ) -> Result<bool, DeliveryError> {
        let (n_settled, missing) = self.settle_read_beside(wait, tally).await?;
        self.deliver_singly(missing, tally).await?;
        Ok(n_settled > 0)
    }

    /// Settles what the read beside proves once it has come (or, with `wait`, once it comes): how
    /// many lines, and those found missing, for the caller to send one per POST. A read that
    /// failed is logged and leaves the next shared read to the step.
    pub(super) async fn settle_read_beside(
        &self,
        wait: bool,
        tally: &mut Tally,
    ) -> Result<(usize, Vec<PendingLine>), DeliveryError> {
        let task = {
            let mut beside = lock(&self.beside);
            match &beside.task {
                Some(task) if wait || task.handle.is_finished() => beside.task.take(),
                _ => None,
            }
        };
        let Some(task) = task else {
            return Ok((0, Vec::new()));
        };
        let rows = match task.handle.await {
            Ok(Ok(rows)) => rows,
            Ok(Err(err)) => {
                tracing::warn!(error = %err, outbox_depth = self.deps.outbox.len(), "the shared read beside the posts failed; the next is made before the next post");
                lock(&self.beside).failed = true;
                return Ok((0, Vec::new()));
            }
            Err(join) => {
                tracing::error!(error = %join, "the shared read beside the posts did not finish; the next is made before the next post");
                lock(&self.beside).failed = true;
                return Ok((0, Vec::new()));
            }
        };
        let read = BoardRead {
            since: task.since,
            sent_at: task.sent_at,
            rows: Arc::new(rows),
        };
        let (n_settled, missing) = self.settle_from_read(&read, tally).await?;
        lock(&self.awaiting).last_read_rows = read.rows.len().saturating_sub(n_settled);
        Ok((n_settled, missing))
    }
}
