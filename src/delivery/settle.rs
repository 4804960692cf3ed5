//! Batches posted and awaiting their proof: a multi-line batch the CMS answered `success: true` is
//! not read back on its own. Its lines stay marked in flight (on disk: a restart reads them back as
//! any line of unknown outcome), are neither resent nor removed, and wait here while newer batches
//! go out; one shared read settles all of them, from the earliest stored timestamp string minus
//! the margin (`readback::read_back_start`).
//!
//! When that read is made is the whole of its cost to the CMS. A read returns every row of the
//! grid from its start, so a read per batch costs a backlog whose lines share a second O(n²) rows
//! (190 batches of 100 lines each reading up to 19 000 rows). Here a read is made when nothing else
//! can be sent, or when three times as many lines wait as the last read returned rows beyond the
//! lines it settled (`Awaiting::read_due`), or `AWAIT_MAX_LINES` wait. In the worst case (every
//! line of a backlog in one second, so that each read returns every row stored since) the lines
//! each read settles grow geometrically, so the reads are logarithmic in the backlog and their rows
//! a few times its lines; a backlog spread over time reads its own rows once plus the grid's rows
//! of each read's window, in reads of a few hundred rows or a few thousand.
//!
//! When the in-world reader serves the `ReadBoard`, its reads come first: it reads every row of the
//! grid every `inworld.poll_interval` anyway, reaching back to where these lines need it
//! (`ReadBoard::want`), so a read it sent after a batch's answer, from no later than the batch's
//! read-back start (`readback::reaches_back_to`), settles the batch exactly as a read of delivery's
//! own would. Delivery asks for the reader's reads only while it is caught up (the last step found
//! nothing else to send): a backlog's lines share their seconds with every row drained since, so a
//! reader reaching back to them would read those rows at every poll. It makes its own read when no
//! such read came within `BOARD_WAIT_INTERVALS` of the reader's interval (a reader that fails, a
//! CMS that cannot answer it), while it is behind (the thresholds below), for lines beyond the
//! reader's reach (`board::MAX_REACH_SECS`), or at `AWAIT_MAX_LINES`.
//!
//! Must not: count a line delivered before a read found its row, take a read sent before a batch's
//! answer or starting after its window for its proof, or let a line awaiting proof be resent
//! (`due_lines` passes over them) before a read settled it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::cms::ReadBoard;
use crate::cms::board::BoardRead;
use crate::delivery::readback::{Settle, reaches_back_to, read_back_start, read_once_more};
use crate::delivery::{ChatApi, Delivery, DeliveryError, Tally, lock};
use crate::outbox::PendingLine;

/// How many of the reader's intervals delivery waits for a read of the reader's that settles its
/// batches before it reads for itself: the next read comes within one interval, and the second
/// covers a read that was already on its way when the batch was answered.
pub(super) const BOARD_WAIT_INTERVALS: u32 = 2;

/// Slack on top of those intervals for a read that takes its time (a busy PHP worker).
const BOARD_WAIT_SLACK: Duration = Duration::from_secs(1);

/// A line posted in a batch the CMS answered `success: true`, awaiting the read that proves it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Posted {
    /// The id the CMS answered for the last row of the line's batch: the line's row, if stored,
    /// lies between the id its batch went out after and this one.
    pub(super) last_id: i64,
    /// When that answer came: a read sent after it holds every row of the batch that was stored.
    pub(super) answered_at: Instant,
    /// Where a read must start to hold them (`readback::read_back_start` of the batch).
    pub(super) start: i64,
}

/// How many lines may await their proof before the shared read is made whatever its cost: the
/// read loads and matches them all (the step passes over them by key, `oldest_where_past`).
pub(super) const AWAIT_MAX_LINES: usize = 20_000;

/// The lines posted with a `success: true` whose rows no read has found yet. In memory: after a
/// restart they are lines in flight of unknown outcome, read back before anything is resent.
#[derive(Default)]
pub(super) struct Awaiting {
    /// Each line's id, with its batch's answer.
    pub(super) ids: HashMap<u64, Posted>,
    /// The rows the last read-back returned that were not the lines it settled (other writers'
    /// rows, the relay's rows stored since the read's start): the next shared read waits for as
    /// many lines.
    pub(super) last_read_rows: usize,
    /// Every pending line below this id awaits its proof: the step's scan starts here, and moves
    /// it up to the first line that does not (`due_lines`). A backlog's batches go out one after
    /// the other, and passing over thousands of waiting records at each step (sled reads them to
    /// skip them) cost more than the POSTs. Back to 0 whenever a line below it may be due again
    /// (the shared read, a restart).
    pub(super) scan_from: u64,
    /// Whether the last step found nothing else to send: only then does delivery ask the reader for
    /// its reads and wait for them (`want_reads`, `board_due`).
    pub(super) caught_up: bool,
    /// When the last reader's read delivery looked at was sent: each read is looked at once (a
    /// batch it did not cover then it never covers: those answered since came after it was sent),
    /// so a step behind a backlog of thousands awaiting does not test each against it again.
    pub(super) examined: Option<Instant>,
}

/// How many lines the shared read waits for, while more can be sent, for each row its last read
/// returned beyond the lines it settled (the margin's rows, others' rows, the relay's own rows of
/// the same seconds drained before): 3 keeps the rows read near 4/3 a line delivered.
pub(super) const LINES_PER_EXTRA_ROW: usize = 3;

/// The fewest lines the shared read waits for while a backlog of at least as many waits to be
/// sent: five batches of the default size, so that the read's own cost (at PHP speed 2.1 ms a
/// request, the insert of seven rows) is spread over them. A few lines behind (a trickle, one line
/// at each step) wait for no more than those few.
pub(super) const MIN_LINES_PER_READ: usize = 500;

impl Awaiting {
    /// Whether the shared read is due, with `n_other` lines to send besides those awaiting: something
    /// awaits, and nothing else can be sent, or `LINES_PER_EXTRA_ROW` lines wait for each row the
    /// last read returned beyond its own lines (and `MIN_LINES_PER_READ` at least, or as many as
    /// the lines to send when fewer), or `AWAIT_MAX_LINES` wait. So a read costs the CMS about 4/3
    /// rows a line, and a backlog spread over time is read in reads of a few hundred rows or a few
    /// thousand, not ever larger ones that hold a PHP worker for seconds.
    pub(super) fn read_due(&self, n_other: usize) -> bool {
        let n = self.ids.len();
        let enough = (self.last_read_rows.saturating_mul(LINES_PER_EXTRA_ROW))
            .max(MIN_LINES_PER_READ.min(n_other))
            .min(AWAIT_MAX_LINES);
        n > 0 && (n_other == 0 || n >= enough)
    }
}

impl<C: ChatApi> Delivery<C> {
    /// Notes `batch` posted with a `success: true` whose last row is `last_id`: its lines await
    /// the shared read.
    pub(super) fn await_proof(&self, batch: &[PendingLine], last_id: i64) {
        let posted = Posted {
            last_id,
            answered_at: Instant::now(),
            start: read_back_start(
                batch,
                self.deps.settings.timezone,
                self.deps.cms.offset_seen(),
            ),
        };
        let mut awaiting = lock(&self.awaiting);
        awaiting.ids.extend(batch.iter().map(|l| (l.id, posted)));
    }

    /// Settles what a read of the reader's can, else makes the shared read if it is due
    /// (`Awaiting::read_due`) and no read of the reader's is to be expected; whether anything was
    /// settled.
    pub(super) async fn settle_posted(
        &self,
        more_to_send: bool,
        tally: &mut Tally,
    ) -> Result<bool, DeliveryError> {
        if self.settle_from_board(tally).await?
            || self.settle_from_read_beside(false, tally).await?
        {
            return Ok(true);
        }
        // While the outbox's disk is full, every line proven stored is room given back: the read
        // is made at once, in the step, whatever it costs the CMS.
        let disk_full = self.deps.outbox.is_disk_full();
        let (ids, since) = {
            let mut awaiting = lock(&self.awaiting);
            awaiting.caught_up = !more_to_send;
            self.want_reads(&awaiting);
            let n_other = if more_to_send && !disk_full {
                self.deps
                    .outbox
                    .len()
                    .saturating_sub(awaiting.ids.len())
                    .max(1)
            } else {
                0
            };
            if !awaiting.read_due(n_other) || self.board_due(&awaiting).is_some() {
                return Ok(false);
            }
            let since = awaiting.ids.values().map(|posted| posted.start).min();
            (awaiting.ids.clone(), since)
        };
        // Behind a backlog, the read goes beside the next POSTs (`beside`), one at a time; with
        // nothing else to send, `AWAIT_MAX_LINES` waiting, a full disk, or after a read beside
        // failed, it is made here.
        let beside_failed = lock(&self.beside).failed;
        if more_to_send && ids.len() < AWAIT_MAX_LINES && !beside_failed && !disk_full {
            if !self.read_beside_running()
                && let Some(since) = since
            {
                self.start_read_beside(since).await;
            }
            return Ok(false);
        }
        if self.settle_from_read_beside(true, tally).await? {
            return Ok(true);
        }
        // The lines as stored; those that left the outbox otherwise (its bounds, a privacy
        // command) are forgotten.
        let lines = self.deps.outbox.oldest_where(ids.len(), usize::MAX, |l| {
            l.is_in_flight() && ids.contains_key(&l.id)
        })?;
        // An outage: they keep waiting, and the loop backs off.
        let unsent = self.reconcile(lines, Settle::AfterSuccess, tally).await?;
        lock(&self.beside).failed = false;
        let missing = self.settled(&ids, unsent);
        self.deliver_singly(missing, tally).await?;
        Ok(true)
    }

    /// Settles the lines the reader's latest read proves stored or not (`settle_from_read`), each
    /// of its reads looked at once. Whether any were.
    async fn settle_from_board(&self, tally: &mut Tally) -> Result<bool, DeliveryError> {
        let Some(read) = self.deps.board.latest() else {
            return Ok(false);
        };
        if lock(&self.awaiting).examined.replace(read.sent_at) == Some(read.sent_at) {
            return Ok(false);
        }
        let (n_settled, missing) = self.settle_from_read(&read, tally).await?;
        self.deliver_singly(missing, tally).await?;
        Ok(n_settled > 0)
    }

    /// Settles the lines `read` proves stored or not: those whose batch was answered before the
    /// read was sent, and whose window it reaches back over. How many were, and those found missing
    /// (pending again), for the caller to send one line per POST.
    pub(super) async fn settle_from_read(
        &self,
        read: &BoardRead,
        tally: &mut Tally,
    ) -> Result<(usize, Vec<PendingLine>), DeliveryError> {
        let zone = self.deps.settings.timezone;
        let ids: HashMap<u64, Posted> = lock(&self.awaiting)
            .ids
            .iter()
            .filter(|(_, posted)| {
                posted.answered_at <= read.sent_at
                    && reaches_back_to(read.since, posted.start, zone)
            })
            .map(|(id, posted)| (*id, *posted))
            .collect();
        if ids.is_empty() {
            return Ok((0, Vec::new()));
        }
        let lines = self.deps.outbox.oldest_where(ids.len(), usize::MAX, |l| {
            l.is_in_flight() && ids.contains_key(&l.id)
        })?;
        let unsent = self
            .settle_rows(
                read_once_more(lines),
                &read.rows,
                Settle::AfterSuccess,
                tally,
            )
            .await?;
        Ok((ids.len(), self.settled(&ids, unsent)))
    }

    /// The lines of `ids` were settled: found, missing (`unsent`, pending again, returned to be
    /// sent one line per POST) or held for a read of their own. None awaits any more.
    fn settled(&self, ids: &HashMap<u64, Posted>, unsent: Vec<PendingLine>) -> Vec<PendingLine> {
        {
            let mut awaiting = lock(&self.awaiting);
            awaiting.ids.retain(|id, _| !ids.contains_key(id));
            awaiting.scan_from = 0;
            self.want_reads(&awaiting);
        }
        if !unsent.is_empty() {
            tracing::warn!(
                n_missing = unsent.len(),
                n_messages = ids.len(),
                outbox_depth = self.deps.outbox.len(),
                "cms reported success but lines are missing; resending them one by one"
            );
        }
        unsent
    }

    /// Tells the reader where delivery's lines need a read to start: nothing when none awaits, or
    /// while delivery is behind (a backlog's lines share their seconds with every row drained
    /// since, and a reader reaching back to them would read those rows at every poll; delivery's
    /// own reads, made once for many batches, settle a backlog).
    fn want_reads(&self, awaiting: &Awaiting) {
        let wanted = awaiting
            .caught_up
            .then(|| awaiting.ids.values().map(|posted| posted.start).min())
            .flatten();
        self.deps.board.want(wanted);
    }

    /// How long delivery still waits for a read of the reader's to settle what awaits (`None`: it
    /// does not: no reader serves the board, the lines are too many or lie beyond its reach, or
    /// the oldest batch waited `BOARD_WAIT_INTERVALS` of its interval already).
    pub(super) fn board_due(&self, awaiting: &Awaiting) -> Option<Duration> {
        let interval = self.deps.board.interval()?;
        if !awaiting.caught_up || awaiting.ids.is_empty() || awaiting.ids.len() >= AWAIT_MAX_LINES {
            return None;
        }
        let wait = interval * BOARD_WAIT_INTERVALS + BOARD_WAIT_SLACK;
        let now_unix = chrono::Utc::now().timestamp();
        let oldest = awaiting
            .ids
            .values()
            .try_fold(Instant::now(), |oldest, posted| {
                ReadBoard::within_reach(posted.start, now_unix)
                    .then(|| oldest.min(posted.answered_at))
            })?;
        wait.checked_sub(oldest.elapsed())
    }

    /// `board_due` for the loop, which sleeps no longer than that while idle.
    pub(super) fn board_wait(&self) -> Option<Duration> {
        self.board_due(&lock(&self.awaiting))
    }
}
