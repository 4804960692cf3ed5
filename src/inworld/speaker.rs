//! One region's side of the in-world stage: from a read's rows, the CMS lines past this region's
//! cursor, said by this region's viewer at this region's pace, its cursor moved past each (and
//! lowered when the CMS's ids went backwards). While this region's presence task says its viewer
//! does not hear the region (`liveness::Readiness::viewer_place_problem`, which only a viewer with
//! `viewer.status_url` ever sets), the speaker is paused: it sends its viewer nothing (spec §10: a
//! disconnected viewer answers a chat POST and says nothing) and its cursor stays before the
//! waiting lines, which it says once, in order, when the viewer is back. Must not: read the CMS
//! (the stage reads once for every region), touch another region's cursor or echo memory, or know
//! how presence decides (it reads the one signal presence writes).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::{
    CursorRow, Inbox, InworldError, InworldOutcome, InworldRegion, Read, SeenRow, Shared,
    fingerprint, went_back_known,
};
use crate::cms::CmsChat;
use crate::lookingglass::ViewerError;
use crate::metrics::Stats;
use crate::model::fill_template;
use crate::outbox::{Cursor, OutboxError};
use crate::say::{say_part, split_message};
use crate::zone::Zone;

/// How often a paused speaker asks again whether its viewer hears the region: presence decides
/// every 5 s (`presence::CHECK_INTERVAL`), so this adds at most a second to a resume. An unpaused
/// speaker waiting for a read asks as often, so that a pause is shown while the CMS is not read.
const PAUSE_RECHECK: Duration = Duration::from_secs(1);

/// What one turn of a speaker did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Turn {
    /// No read came within `PAUSE_RECHECK`, or the relay is stopping.
    Idle,
    /// Its viewer does not hear the region: no read was taken, nothing was sent.
    Paused,
    /// It said (and skipped) lines of a read; a pause in the middle holds the rest (`held`).
    Stepped(InworldOutcome),
}

/// How a wait for the next slot ended.
enum Slot {
    /// The line may be said now.
    Go,
    /// The viewer does not hear the region.
    Paused,
    /// The relay is stopping.
    Stopping,
}

/// One region's side of the stage: its viewer, echo memory, cursor and flood limit.
pub(super) struct Speaker {
    pub(super) region: InworldRegion,
    /// The earliest moment the next line may be said here (flood control, per region: each region
    /// is its own chat).
    pub(super) next_slot: Instant,
    /// The highest CMS id said or skipped here by this process. The persisted cursor lags it when
    /// writing the cursor failed (disk full): a line is not said twice for that.
    pub(super) handled_up_to: Option<i64>,
    /// The row being said in parts and how many of its parts the viewer took, so that after a
    /// failed part the retry starts at that part. In memory only: a restart in the middle of a
    /// split line says all of it again, as it says again a line whose cursor was not yet written.
    pub(super) parts_said: Option<(i64, usize)>,
    /// The read a pause interrupted, taken again before the inbox's when the viewer is back (its
    /// lines said before the pause are behind the cursor, so they are not said again).
    pub(super) held: Option<Arc<Read>>,
    /// Since when this region's viewer has not heard the region (the pause told once).
    pub(super) paused_since: Option<Instant>,
}

impl Speaker {
    /// Says the CMS lines of each read its inbox hands it until `token` is cancelled. A read whose
    /// lines it could not say (its viewer refused) is left: its lines come back with a later read
    /// that reaches them (every wide read does), as with one region. While paused, the reads wait
    /// in the inbox.
    pub(super) async fn run_until_stopped(
        mut self,
        deps: &Shared,
        inbox: Arc<Inbox>,
        token: &CancellationToken,
    ) {
        let mut failing = false;
        while !token.is_cancelled() {
            let turn = self.try_say_once(deps, &inbox, token).await;
            let region = self.region.name.as_str();
            match turn {
                Ok(Turn::Idle) => {}
                Ok(Turn::Paused) => {
                    tokio::select! {
                        _ = token.cancelled() => return,
                        _ = tokio::time::sleep(PAUSE_RECHECK) => {}
                    }
                }
                Ok(Turn::Stepped(outcome)) => {
                    failing = false;
                    if outcome.n_said + outcome.n_skipped > 0 {
                        tracing::info!(
                            region,
                            n_said = outcome.n_said,
                            n_skipped = outcome.n_skipped,
                            "cms lines said in-world"
                        );
                    }
                }
                Err(err) if !failing => {
                    tracing::warn!(region, error = %err, "in-world relay step failed; retrying with the next read");
                    failing = true;
                }
                Err(err) => {
                    tracing::debug!(region, error = %err, "in-world relay step failed again")
                }
            }
        }
    }

    /// One turn: unless paused, takes the read a pause held or the next one from `inbox` (waiting
    /// at most `PAUSE_RECHECK` for it) and says its lines past the cursor.
    pub(super) async fn try_say_once(
        &mut self,
        deps: &Shared,
        inbox: &Inbox,
        token: &CancellationToken,
    ) -> Result<Turn, InworldError> {
        if self.paused() {
            return Ok(Turn::Paused);
        }
        let read = match self.held.take() {
            Some(read) => read,
            None => tokio::select! {
                _ = token.cancelled() => return Ok(Turn::Idle),
                _ = tokio::time::sleep(PAUSE_RECHECK) => return Ok(Turn::Idle),
                read = inbox.next() => read,
            },
        };
        Ok(Turn::Stepped(self.step(deps, &read, token).await?))
    }

    /// Whether this region's viewer does not hear the region, as its presence task last decided
    /// (never without `viewer.status_url`); a change is logged once and shown in
    /// `Stats::inworld_paused`.
    fn paused(&mut self) -> bool {
        let stats = &self.region.stats;
        let problem = stats.readiness.viewer_place_problem();
        let region = self.region.name.as_str();
        match (problem, self.paused_since) {
            (Some(why), None) => {
                tracing::warn!(
                    region,
                    reason = %why,
                    "in-world is paused for this region: its viewer does not hear the region; the cms lines wait and are said once it is back"
                );
                self.paused_since = Some(Instant::now());
                stats.inworld_paused.store(1, Ordering::Relaxed);
                true
            }
            (Some(_), Some(_)) => true,
            (None, Some(since)) => {
                tracing::info!(
                    region,
                    paused_for = ?since.elapsed(),
                    "in-world resumes for this region: its viewer hears the region again; the cms lines that waited are said now"
                );
                self.paused_since = None;
                stats.inworld_paused.store(0, Ordering::Relaxed);
                false
            }
            (None, None) => false,
        }
    }

    /// Says this region's share of one read: the CMS lines past its cursor, in order.
    async fn step(
        &mut self,
        deps: &Shared,
        read: &Arc<Read>,
        token: &CancellationToken,
    ) -> Result<InworldOutcome, InworldError> {
        let max_age = chrono::Duration::from_std(deps.settings.max_age).unwrap_or_default();
        let rows = read.rows.as_slice();
        let region = self.region.name.clone();
        let Some(cursor) = deps
            .outbox
            .cursor(Cursor::LastSaidId.of(&region))?
            .max(self.handled_up_to)
        else {
            // First start ever (in this region): begin from now, say nothing of the past.
            let newest = rows.iter().max_by_key(|row| row.id);
            self.advance(deps, newest.map_or(0, |row| row.id), newest)
                .await?;
            tracing::info!(
                region,
                cursor = newest.map_or(0, |row| row.id),
                "in-world relay starts from now"
            );
            return Ok(InworldOutcome::default());
        };
        let cursor = self.notice_restore(deps, read, cursor).await?;
        let mut pending: Vec<&CmsChat> = rows
            .iter()
            .filter(|r| r.from_cms && r.id > cursor)
            .collect();
        pending.sort_by_key(|r| r.id);
        let mut outcome = InworldOutcome::default();
        if pending.len() > deps.settings.max_queue {
            let n_over = pending.len() - deps.settings.max_queue;
            let last_dropped = pending[n_over - 1];
            pending.drain(..n_over);
            self.skip(
                deps,
                last_dropped,
                n_over,
                "more lines waiting than inworld.max_queue",
                &mut outcome,
            )
            .await?;
        }
        for row in pending {
            if token.is_cancelled() {
                break;
            }
            if age(deps.cms_zone, row, Utc::now()).is_some_and(|age| age > max_age) {
                self.skip(deps, row, 1, "older than inworld.max_age", &mut outcome)
                    .await?;
                continue;
            }
            let n_said_before = match self.parts_said {
                Some((id, n_parts)) if id == row.id => n_parts,
                _ => 0,
            };
            for (index, part) in split_message(&self.render(deps, row))
                .into_iter()
                .enumerate()
                .skip(n_said_before)
            {
                match self.wait_for_slot(token).await {
                    Slot::Go => {}
                    Slot::Stopping => return Ok(outcome),
                    Slot::Paused => {
                        // Its viewer left the region meanwhile: the rest of this read waits.
                        self.held = Some(read.clone());
                        return Ok(outcome);
                    }
                }
                let said = say_part(
                    &self.region.viewer,
                    &self.region.recently_said,
                    &part,
                    deps.settings.channel,
                    deps.settings.say_type.as_str(),
                    token,
                )
                .await;
                if let Err(err) = said {
                    return match err {
                        // Not sent: the relay is stopping.
                        ViewerError::Stopping => Ok(outcome),
                        err => Err(err.into()),
                    };
                }
                self.parts_said = Some((row.id, index + 1));
                self.next_slot = Instant::now()
                    + Duration::from_secs_f64(1.0 / deps.settings.max_lines_per_second);
                Stats::add(&self.region.stats.inworld_said, 1);
            }
            self.advance(deps, row.id, Some(row)).await?;
            self.parts_said = None;
            outcome.n_said += 1;
        }
        Ok(outcome)
    }

    /// Waits for the flood limit's next slot, asking every `PAUSE_RECHECK` whether the viewer
    /// still hears the region (a slot is 1 / `inworld.max_lines_per_second` away, which an operator
    /// may set to minutes).
    async fn wait_for_slot(&mut self, token: &CancellationToken) -> Slot {
        loop {
            if self.paused() {
                return Slot::Paused;
            }
            let now = Instant::now();
            if now >= self.next_slot {
                return Slot::Go;
            }
            let wait = (self.next_slot - now).min(PAUSE_RECHECK);
            tokio::select! {
                _ = token.cancelled() => return Slot::Stopping,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Moves the cursor past `id` (the row `row`, whose time and fingerprint are stored with it):
    /// in memory first, then on disk.
    async fn advance(
        &mut self,
        deps: &Shared,
        id: i64,
        row: Option<&CmsChat>,
    ) -> Result<(), OutboxError> {
        self.handled_up_to = self.handled_up_to.max(Some(id));
        self.store_cursor(deps, id, row).await
    }

    /// Stores the cursor `id` with its row's time and fingerprint (0 when none is known).
    async fn store_cursor(
        &self,
        deps: &Shared,
        id: i64,
        row: Option<&CmsChat>,
    ) -> Result<(), OutboxError> {
        let seen = row.map(|row| seen_row(deps.cms_zone, row));
        let at = seen.and_then(|seen| seen.at).map_or(0, |at| at.timestamp());
        // The fingerprint's bits as an i64; 0 stands for "unknown" (one fingerprint in 2^64 is
        // read as unknown, which only turns that row's check off).
        let fingerprint = seen.map_or(0, |seen| seen.fingerprint as i64);
        let region = self.region.name.as_str();
        deps.outbox
            .set_cursors(&[
                (Cursor::LastSaidAt.of(region), at),
                (Cursor::LastSaidRow.of(region), fingerprint),
                (Cursor::LastSaidId.of(region), id),
            ])
            .await
    }

    /// The row at the cursor `id`, as stored with it; unknown when the stored cursor is another
    /// (a write that failed left it behind the one in memory).
    fn cursor_row(&self, deps: &Shared, id: i64) -> Result<CursorRow, OutboxError> {
        let region = self.region.name.as_str();
        if deps.outbox.cursor(Cursor::LastSaidId.of(region))? != Some(id) {
            return Ok(CursorRow { id, row: None });
        }
        let fingerprint = deps
            .outbox
            .cursor(Cursor::LastSaidRow.of(region))?
            .unwrap_or(0);
        let at = deps
            .outbox
            .cursor(Cursor::LastSaidAt.of(region))?
            .unwrap_or(0);
        let row = (fingerprint != 0).then(|| SeenRow {
            fingerprint: fingerprint as u64,
            at: (at != 0).then(|| DateTime::from_timestamp(at, 0)).flatten(),
        });
        Ok(CursorRow { id, row })
    }

    /// Lowers the cursor when the read shows the CMS's ids went backwards (`went_back_known`),
    /// saying so in the log; returns the cursor to go on from.
    async fn notice_restore(
        &mut self,
        deps: &Shared,
        read: &Read,
        cursor: i64,
    ) -> Result<i64, OutboxError> {
        let at_cursor = self.cursor_row(deps, cursor)?;
        let Some(lowered) = went_back_known(
            &read.rows,
            &read.known,
            read.seen_empty,
            &at_cursor,
            read.since,
            |row| dated(deps.cms_zone, row),
        ) else {
            return Ok(cursor);
        };
        if lowered >= cursor {
            // Ids handed out again, all above the cursor (a region that said no CMS line yet):
            // nothing this region handled is gone, and nothing to lower.
            return Ok(cursor);
        }
        tracing::warn!(
            region = self.region.name,
            cursor,
            new_cursor = lowered,
            "cms ids went backwards (a restored database?): the in-world cursor goes back, so that the cms lines typed since the restore are said"
        );
        self.handled_up_to = Some(lowered);
        self.parts_said = None;
        let row = read.rows.iter().find(|row| row.id == lowered);
        self.store_cursor(deps, lowered, row).await?;
        Ok(lowered)
    }

    async fn skip(
        &mut self,
        deps: &Shared,
        up_to: &CmsChat,
        n: usize,
        reason: &str,
        outcome: &mut InworldOutcome,
    ) -> Result<(), OutboxError> {
        tracing::warn!(
            region = self.region.name,
            n_lines = n,
            reason,
            "cms lines not said in-world"
        );
        Stats::add(&self.region.stats.inworld_skipped, n as u64);
        outcome.n_skipped += n;
        self.advance(deps, up_to.id, Some(up_to)).await
    }

    fn render(&self, deps: &Shared, row: &CmsChat) -> String {
        fill_template(
            &deps.settings.format,
            &[
                ("first", &row.first_name),
                ("last", &row.last_name),
                ("username", &row.username),
                ("message", &row.message),
                ("region", &self.region.label),
            ],
        )
    }
}

pub(super) fn seen_row(zone: Zone, row: &CmsChat) -> SeenRow {
    SeenRow {
        fingerprint: fingerprint(row),
        at: dated(zone, row),
    }
}

/// How old a CMS row is; `None` when its timestamp cannot be read. The CMS stores whole seconds,
/// so a row counts from the end of its second (else a line typed at .9 s looks a second older).
fn age(zone: Zone, row: &CmsChat, now: DateTime<Utc>) -> Option<chrono::Duration> {
    Some(now - dated(zone, row)? - chrono::Duration::seconds(1))
}

/// A row's timestamp as an instant (the later one in a repeated hour); `None` when unreadable.
pub(super) fn dated(zone: Zone, row: &CmsChat) -> Option<DateTime<Utc>> {
    let naive = NaiveDateTime::parse_from_str(&row.timestamp, "%Y-%m-%d %H:%M:%S").ok()?;
    zone.resolve(naive).into_iter().max()
}

#[cfg(test)]
mod tests;
