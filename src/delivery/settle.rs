//! Batches posted and awaiting their proof: a multi-line batch the CMS answered `success: true` is
//! not read back on its own. Its lines stay marked in flight (on disk: a restart reads them back as
//! any line of unknown outcome), are neither resent nor removed, and wait here while newer batches
//! go out; one shared read settles all of them, from the earliest stored timestamp string minus
//! the margin (`readback::read_back_start`).
//!
//! When that read is made is the whole of its cost to the CMS. A read returns every row of the
//! grid from its start, so a read per batch costs a backlog whose lines share a second O(n²) rows
//! (190 batches of 100 lines each reading up to 19 000 rows). Here a read is made when nothing else
//! can be sent, or when as many lines wait as the last read returned rows beyond the lines it
//! settled, or `AWAIT_MAX_LINES` wait. In the worst case (every line of a backlog in one second, so
//! that each read returns every row stored since) the lines each read settles grow geometrically,
//! so the reads are logarithmic in the backlog and their rows a few times its lines; a backlog
//! spread over time reads its own rows once plus the grid's rows of each read's window, in reads
//! of a few hundred rows.
//!
//! Must not: count a line delivered before a read found its row, or let a line awaiting proof be
//! resent (`due_lines` passes over them) before a read settled it.

use std::collections::HashMap;

use crate::delivery::readback::Settle;
use crate::delivery::{ChatApi, Delivery, DeliveryError, Tally, lock};
use crate::outbox::PendingLine;

/// How many lines may await their proof before the shared read is made whatever its cost: the
/// read loads and matches them all (the step passes over them by key, `oldest_where_past`).
pub(super) const AWAIT_MAX_LINES: usize = 20_000;

/// The lines posted with a `success: true` whose rows no read has found yet. In memory: after a
/// restart they are lines in flight of unknown outcome, read back before anything is resent.
#[derive(Default)]
pub(super) struct Awaiting {
    /// Each line's id, with the id the CMS answered for the last row of its batch: the line's row,
    /// if stored, lies between the id its batch went out after and that one.
    pub(super) ids: HashMap<u64, i64>,
    /// The rows the last read-back returned that were not the lines it settled (other writers'
    /// rows, the relay's rows stored since the read's start): the next shared read waits for as
    /// many lines.
    pub(super) last_read_rows: usize,
    /// Every pending line below this id awaits its proof: the step's scan starts here. A backlog's
    /// batches go out one after the other, and passing over thousands of waiting records at each
    /// step (sled reads them to skip them) cost more than the POSTs. Back to 0 whenever a line
    /// below it may be due again (the shared read, a restart).
    pub(super) scan_from: u64,
    /// The first line the step's scan returned, when it passed over nothing from `scan_from` on:
    /// a batch that starts with it and goes to await its proof moves `scan_from` past it.
    pub(super) first_due: Option<u64>,
}

impl Awaiting {
    /// Whether the shared read is due: something awaits, and nothing else can be sent, or as many
    /// lines wait as the last read returned rows beyond its own lines (so that a read costs the CMS
    /// at most about two rows a line, and a backlog spread over time is read in reads of a few
    /// hundred rows, not ever larger ones that hold a PHP worker for seconds).
    pub(super) fn read_due(&self, more_to_send: bool) -> bool {
        let n = self.ids.len();
        n > 0 && (!more_to_send || n >= AWAIT_MAX_LINES || n >= self.last_read_rows)
    }
}

impl<C: ChatApi> Delivery<C> {
    /// Notes `batch` posted with a `success: true` whose last row is `last_id`: its lines await
    /// the shared read.
    pub(super) fn await_proof(&self, batch: &[PendingLine], last_id: i64) {
        let mut awaiting = lock(&self.awaiting);
        awaiting.ids.extend(batch.iter().map(|l| (l.id, last_id)));
        if let (Some(first), Some(last)) = (batch.first(), batch.last())
            && awaiting.first_due == Some(first.id)
        {
            awaiting.scan_from = last.id + 1;
            awaiting.first_due = None;
        }
    }

    /// The shared read if it is due (`Awaiting::read_due`); whether it was made.
    pub(super) async fn settle_posted(
        &self,
        more_to_send: bool,
        tally: &mut Tally,
    ) -> Result<bool, DeliveryError> {
        let ids = {
            let awaiting = lock(&self.awaiting);
            if !awaiting.read_due(more_to_send) {
                return Ok(false);
            }
            awaiting.ids.clone()
        };
        // The lines as stored; those that left the outbox otherwise (its bounds, a privacy
        // command) are forgotten.
        let lines = self.deps.outbox.oldest_where(ids.len(), usize::MAX, |l| {
            l.is_in_flight() && ids.contains_key(&l.id)
        })?;
        let unsent = match self.reconcile(lines, Settle::AfterSuccess, tally).await {
            Ok(unsent) => unsent,
            // An outage: they keep waiting, and the loop backs off.
            Err(err) => return Err(err),
        };
        // Found, missing (now pending again) or held for a read of their own: none awaits.
        {
            let mut awaiting = lock(&self.awaiting);
            awaiting.ids.retain(|id, _| !ids.contains_key(id));
            awaiting.scan_from = 0;
        }
        if !unsent.is_empty() {
            tracing::warn!(
                n_missing = unsent.len(),
                n_messages = ids.len(),
                outbox_depth = self.deps.outbox.len(),
                "cms reported success but lines are missing; resending them one by one"
            );
        }
        self.deliver_singly(unsent, tally).await?;
        Ok(true)
    }
}
