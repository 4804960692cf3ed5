//! Batches posted and awaiting their proof: a multi-line batch the CMS answered `success: true` is
//! not read back on its own. Its lines stay marked in flight (on disk: a restart reads them back as
//! any line of unknown outcome), are neither resent nor removed, and wait here while newer batches
//! go out; one shared read settles all of them, from the earliest stored timestamp string minus
//! the margin (`readback::read_back_start`).
//!
//! When that read is made is the whole of its cost to the CMS. A read returns every row of the
//! grid from its start, so a read per batch costs a backlog whose lines share a second O(n²) rows
//! (190 batches of 100 lines each reading up to 19 000 rows). Here a read is made when nothing else
//! can be sent, or when the lines waiting are at least half the rows the last read returned, or
//! `AWAIT_MAX_LINES` wait: rows read per line delivered stay below about three whatever the
//! backlog's shape (each read at least doubles the rows it settles against those it reads), and in
//! the worst case (every line of the backlog in one second) the reads grow geometrically, so their
//! number is logarithmic in the backlog.
//!
//! Must not: count a line delivered before a read found its row, or let a line awaiting proof be
//! resent (`due_lines` passes over them) before a read settled it.

use std::collections::HashMap;

use crate::delivery::readback::Settle;
use crate::delivery::{ChatApi, Delivery, DeliveryError, Tally, lock};
use crate::outbox::PendingLine;

/// How many lines may await their proof before the shared read is made whatever its cost: the
/// step passes over them in the outbox (`SCAN_LIMIT` is twice this) and the read matches them.
pub(super) const AWAIT_MAX_LINES: usize = 5_000;

/// The lines posted with a `success: true` whose rows no read has found yet. In memory: after a
/// restart they are lines in flight of unknown outcome, read back before anything is resent.
#[derive(Default)]
pub(super) struct Awaiting {
    /// Each line's id, with the id the CMS answered for the last row of its batch: the line's row,
    /// if stored, lies between the id its batch went out after and that one.
    pub(super) ids: HashMap<u64, i64>,
    /// The rows the last read-back returned: the next shared read waits for half as many lines.
    pub(super) last_read_rows: usize,
}

impl Awaiting {
    /// Whether the shared read is due: something awaits, and nothing else can be sent, or enough
    /// lines wait for the read to cost the CMS no more than twice as many rows.
    pub(super) fn read_due(&self, more_to_send: bool) -> bool {
        let n = self.ids.len();
        n > 0 && (!more_to_send || n >= AWAIT_MAX_LINES || 2 * n >= self.last_read_rows)
    }
}

impl<C: ChatApi> Delivery<C> {
    /// Notes `batch` posted with a `success: true` whose last row is `last_id`: its lines await
    /// the shared read.
    pub(super) fn await_proof(&self, batch: &[PendingLine], last_id: i64) {
        lock(&self.awaiting)
            .ids
            .extend(batch.iter().map(|l| (l.id, last_id)));
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
