//! One region's side of the in-world stage: from a read's rows, the CMS lines past this region's
//! cursor, said by this region's viewer at this region's pace, its cursor moved past each (and
//! lowered when the CMS's ids went backwards). Must not: read the CMS (the stage reads once for
//! every region), or touch another region's cursor or echo memory.

use std::sync::Arc;
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
}

impl Speaker {
    /// Says the CMS lines of each read its inbox hands it until `token` is cancelled. A read whose
    /// lines it could not say (its viewer refused) is left: its lines come back with a later read
    /// that reaches them (every wide read does), as with one region.
    pub(super) async fn run_until_stopped(
        mut self,
        deps: &Shared,
        inbox: Arc<Inbox>,
        token: &CancellationToken,
    ) {
        let mut failing = false;
        while !token.is_cancelled() {
            let read = tokio::select! {
                _ = token.cancelled() => return,
                read = inbox.next() => read,
            };
            let stepped = self.step(deps, &read, token).await;
            let region = self.region.name.as_str();
            match stepped {
                Ok(outcome) => {
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

    /// Says this region's share of one read: the CMS lines past its cursor, in order.
    async fn step(
        &mut self,
        deps: &Shared,
        read: &Read,
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
                tokio::select! {
                    _ = token.cancelled() => return Ok(outcome),
                    _ = tokio::time::sleep_until(self.next_slot.into()) => {}
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
