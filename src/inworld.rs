//! CMS → in-world: lines typed in the CMS (`fromCMS = 1`) are said in every region by that region's
//! viewer's avatar, once each, in order. One reader of the CMS chat serves every region: the CMS
//! cannot filter, so each reader pays for every row of the grid, and one reader per process keeps
//! that cost growing with hosts, not with regions squared (issue 23).
//!
//! Owns each region's persisted cursor (the highest CMS chat id handled, with the time and a fingerprint of
//! its row: outbox `Cursor`s, so a restart neither repeats nor skips), noticing that the CMS's ids
//! went backwards (its database restored from a backup: `went_back`), the splitting of long lines
//! (a part that fails is said again without the parts before it) and the flood limit. Each text it
//! says goes into the echo memory (`echo::RecentlySaid`, which `app` shares with the poller) before
//! the POST. Must not touch the outbox's pending lines. It never calls the CMS chat GET without a
//! timestamp (that returns the whole history).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::cms::{CmsChat, CmsClient, CmsError};
use crate::config::InworldSettings;
use crate::echo::RecentlySaid;
use crate::lookingglass::{LookingGlassClient, ViewerError};
use crate::metrics::Stats;
use crate::model::fill_template;
use crate::outbox::{Cursor, Outbox, OutboxError};
use crate::say::{say_part, split_message};
use crate::text::fnv1a64;
use crate::zone::Zone;

/// How far before the newest row seen a narrow read starts: the CMS stores whole seconds, and
/// rows of the same moment may be inserted a little out of order by different writers.
const NARROW_MARGIN: chrono::Duration = chrono::Duration::seconds(2);

/// The rows remembered from the reads of this process (their fingerprint and time, about 40 bytes
/// each): the highest ids, enough for several `look_back` windows of a busy grid.
const SEEN_MAX: usize = 10_000;

/// Why a step failed; the cursor did not move past anything unsaid.
#[derive(Debug, thiserror::Error)]
pub enum InworldError {
    /// Reading the CMS failed.
    #[error(transparent)]
    Cms(#[from] CmsError),
    /// Saying in-world failed.
    #[error(transparent)]
    Viewer(#[from] ViewerError),
    /// The cursor could not be read or stored.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

/// What one step did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InworldOutcome {
    /// CMS lines said.
    pub n_said: usize,
    /// CMS lines skipped (too old, over the queue limit).
    pub n_skipped: usize,
}

/// What the in-world stage is built from.
pub struct InworldDeps {
    /// Where the lines typed in the CMS are read.
    pub cms: Arc<CmsClient>,
    /// The regions they are said in, each by its own viewer: at least one.
    pub regions: Vec<InworldRegion>,
    /// Where the cursors are kept.
    pub outbox: Arc<Outbox>,
    /// `[inworld]`
    pub settings: InworldSettings,
    /// The CMS server's clock (`cms.timezone`), to tell a row's age.
    pub cms_zone: Zone,
}

/// One region the CMS lines are said in.
pub struct InworldRegion {
    /// The region's name: its cursors' keys (empty: the only region, today's keys).
    pub name: String,
    /// The `{region}` value of `inworld.format`.
    pub label: String,
    /// Who says them there.
    pub viewer: LookingGlassClient,
    /// What was said lately there (shared with that region's poller, which drops its echo).
    pub recently_said: Arc<RecentlySaid>,
    /// That region's counters (said, skipped).
    pub stats: Arc<Stats>,
}

/// The CMS → in-world stage: one reader of the CMS chat for every region.
pub struct Inworld {
    deps: Shared,
    regions: Vec<Speaker>,
    /// When the previous successful read was made (this host's clock).
    last_read: Option<DateTime<Utc>>,
    /// The newest row timestamp seen on the grid, as an instant in the CMS's zone: narrow reads
    /// start `NARROW_MARGIN` before it (or before `last_read`, whichever is earlier).
    newest_seen: Option<DateTime<Utc>>,
    /// When the last wide read was made: every `look_back` one read reaches `look_back` before
    /// it, for CMS lines dated behind the newest rows (a browser's clock behind).
    last_wide: Option<DateTime<Utc>>,
    /// The last read was a wide one and failed (its answer too large for the CMS's memory limit or
    /// `cms.max_response_bytes`, say): the next read is narrow, so the stage goes on meanwhile.
    wide_failed: bool,
    /// The rows the reads of this process returned, by id (at most `SEEN_MAX`, the highest): a row
    /// under a known id with other content shows that the CMS hands its ids out again.
    seen: BTreeMap<i64, SeenRow>,
}

/// What every region's speaker shares.
struct Shared {
    cms: Arc<CmsClient>,
    outbox: Arc<Outbox>,
    settings: InworldSettings,
    cms_zone: Zone,
}

/// One region's side of the stage: its viewer, echo memory, cursor and flood limit.
struct Speaker {
    region: InworldRegion,
    /// The earliest moment the next line may be said here (flood control, per region: each region
    /// is its own chat).
    next_slot: Instant,
    /// The highest CMS id said or skipped here by this process. The persisted cursor lags it when
    /// writing the cursor failed (disk full): a line is not said twice for that.
    handled_up_to: Option<i64>,
    /// The row being said in parts and how many of its parts the viewer took, so that after a
    /// failed part the retry starts at that part. In memory only: a restart in the middle of a
    /// split line says all of it again, as it says again a line whose cursor was not yet written.
    parts_said: Option<(i64, usize)>,
}

/// What the stage remembers of a row it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenRow {
    /// `fingerprint` of the row.
    pub fingerprint: u64,
    /// Its time, when readable.
    pub at: Option<DateTime<Utc>>,
}

/// The row at the persisted cursor, as stored with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorRow {
    /// The cursor.
    pub id: i64,
    /// The row's `SeenRow`, unknown for a cursor stored by an older relay or past no row.
    pub row: Option<SeenRow>,
}

/// A row's fingerprint: its timestamp and text (what a restored database's new row under the same
/// id would not share). Not its user: a deleted CMS user turns the row's user into -1 (a LEFT JOIN),
/// which must not look like another row.
pub fn fingerprint(row: &CmsChat) -> u64 {
    let mut bytes = Vec::with_capacity(row.message.len() + row.timestamp.len() + 1);
    bytes.extend_from_slice(row.timestamp.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(row.message.as_bytes());
    fnv1a64(&bytes)
}

/// Whether a read shows that the CMS's ids went backwards (its database restored from a backup: the
/// rows after the backup are gone, and new rows get their ids again), and if so where the cursor
/// goes. Delivery notices it from the ids its POSTs get; this stage reads only, so it looks at what
/// the read returns, `dated` telling each row's time:
///
/// | evidence in the read | verdict |
/// |---|---|
/// | a row under an id `seen` (this process) with another fingerprint | went back |
/// | the row at the cursor missing, or there with another fingerprint, while the read reaches back to its time (`since` at or before it) | went back |
/// | anything else (no row at the cursor's id is needed: a read need not reach it) | `None` |
///
/// When it went back, the cursor goes to the highest id of the rows known to be older than the
/// restore: seen with the same fingerprint, or (when nothing was seen, after a restart) dated no
/// later than the row at the cursor (a restore takes longer than the rest of that second); 0 when
/// none is. The rows above it are new, and said.
pub fn went_back(
    rows: &[CmsChat],
    seen: &BTreeMap<i64, SeenRow>,
    at_cursor: &CursorRow,
    since: DateTime<Utc>,
    dated: impl Fn(&CmsChat) -> Option<DateTime<Utc>>,
) -> Option<i64> {
    let reused = rows.iter().any(|row| {
        seen.get(&row.id)
            .is_some_and(|known| known.fingerprint != fingerprint(row))
    });
    let cursor_row_gone = at_cursor.row.is_some_and(|known| {
        // The CMS compares whole seconds: a row a second after `since` is surely in the read.
        let reached = known
            .at
            .is_some_and(|at| at >= since + chrono::Duration::seconds(1));
        reached
            && !rows
                .iter()
                .any(|row| row.id == at_cursor.id && fingerprint(row) == known.fingerprint)
    });
    if !reused && !cursor_row_gone {
        return None;
    }
    let cursor_at = at_cursor.row.and_then(|known| known.at);
    let known_old = |row: &&CmsChat| match seen.get(&row.id) {
        Some(known) => known.fingerprint == fingerprint(row),
        None => {
            seen.is_empty()
                && cursor_at.is_some_and(|cursor_at| dated(row).is_some_and(|at| at <= cursor_at))
        }
    };
    Some(
        rows.iter()
            .filter(|row| row.id <= at_cursor.id)
            .filter(known_old)
            .map(|row| row.id)
            .max()
            .unwrap_or(0),
    )
}

impl Inworld {
    /// Builds the stage.
    pub fn new(deps: InworldDeps) -> Inworld {
        Inworld {
            regions: deps
                .regions
                .into_iter()
                .map(|region| Speaker {
                    region,
                    next_slot: Instant::now(),
                    handled_up_to: None,
                    parts_said: None,
                })
                .collect(),
            deps: Shared {
                cms: deps.cms,
                outbox: deps.outbox,
                settings: deps.settings,
                cms_zone: deps.cms_zone,
            },
            last_read: None,
            newest_seen: None,
            last_wide: None,
            wide_failed: false,
            seen: BTreeMap::new(),
        }
    }

    /// One step: read new CMS lines once and say them in every region, each region at its own
    /// pace and from its own cursor, the regions at once (a region whose viewer fails does not stop
    /// the others); stops between lines when `token` is cancelled. The first region's error is
    /// returned once every region is done.
    pub async fn try_poll_once(
        &mut self,
        token: &CancellationToken,
    ) -> Result<InworldOutcome, InworldError> {
        let now = Utc::now();
        let look_back =
            chrono::Duration::from_std(self.deps.settings.look_back).unwrap_or_default();
        let max_age = chrono::Duration::from_std(self.deps.settings.max_age).unwrap_or_default();
        let (since, wide) = self.since(now, look_back, max_age);
        let rows = match self.deps.cms.chats_since(since.timestamp()).await {
            Ok(rows) => rows,
            Err(err) => {
                self.wide_failed = wide;
                return Err(err.into());
            }
        };
        self.last_read = Some(now);
        if wide {
            self.last_wide = Some(now);
        }
        self.wide_failed = false;
        let newest = rows
            .iter()
            .filter_map(|row| dated(self.deps.cms_zone, row))
            .max();
        self.newest_seen = self.newest_seen.max(newest);
        let deps = &self.deps;
        let seen = &self.seen;
        let steps = self
            .regions
            .iter_mut()
            .map(|speaker| speaker.step(deps, seen, &rows, since, max_age, token));
        let results = futures_util::future::join_all(steps).await;
        let mut outcome = InworldOutcome::default();
        let mut first_err = None;
        let mut went_back = false;
        for result in results {
            match result {
                Ok((step, back)) => {
                    outcome.n_said += step.n_said;
                    outcome.n_skipped += step.n_skipped;
                    went_back |= back;
                }
                Err(err) => {
                    first_err.get_or_insert(err);
                }
            }
        }
        if went_back {
            // What was remembered describes the database before the restore.
            self.seen.clear();
        }
        self.remember(&rows);
        match first_err {
            Some(err) => Err(err),
            None => Ok(outcome),
        }
    }

    /// Where the next read starts, and whether it is a wide one. Most reads are narrow: they follow
    /// the new rows, from a little before the newest row seen (or the previous read, if that is
    /// earlier: a writer whose clock is ahead cannot push the reads past the present), so a read
    /// returns about the rows added since the previous one, not `look_back` of the whole grid.
    /// Every `look_back` a wide read reaches `look_back` before the previous wide one, which catches
    /// every row dated at most `look_back` behind its insertion; the first one after a start reaches
    /// back over `max_age` too (lines typed while the relay was down), and none reaches further.
    /// After a failed wide read the next is narrow, then the wide one is tried again.
    fn since(
        &self,
        now: DateTime<Utc>,
        look_back: chrono::Duration,
        max_age: chrono::Duration,
    ) -> (DateTime<Utc>, bool) {
        let oldest = now - max_age - look_back;
        let wide_due = self.last_wide.is_none_or(|at| now - at >= look_back);
        if wide_due && !self.wide_failed {
            let since = self
                .last_wide
                .map_or(oldest, |at| (at - look_back).max(oldest));
            return (since, true);
        }
        let read = self.last_read.unwrap_or(now);
        let newest = self.newest_seen.map_or(read, |newest| newest.min(read));
        // Never further back than `look_back` before the previous read: after old-dated rows
        // (a backlog drained), the newest row seen may be far behind the present.
        ((newest - NARROW_MARGIN).max(read - look_back), false)
    }

    /// Polls until `token` is cancelled.
    pub async fn run_until_stopped(mut self, token: CancellationToken) {
        tracing::info!(n_regions = self.regions.len(), "saying CMS lines in-world");
        let mut failing = false;
        while !token.is_cancelled() {
            match self.try_poll_once(&token).await {
                Ok(outcome) => {
                    failing = false;
                    if outcome.n_said + outcome.n_skipped > 0 {
                        tracing::info!(
                            n_said = outcome.n_said,
                            n_skipped = outcome.n_skipped,
                            "cms lines said in-world"
                        );
                    }
                }
                Err(err) if !failing => {
                    tracing::warn!(error = %err, "in-world relay step failed; retrying every poll interval");
                    failing = true;
                }
                Err(err) => tracing::debug!(error = %err, "in-world relay step failed again"),
            }
            tokio::select! {
                _ = token.cancelled() => {}
                _ = tokio::time::sleep(self.deps.settings.poll_interval) => {}
            }
        }
    }

    /// Remembers the rows of a read (`seen`), keeping the `SEEN_MAX` highest ids.
    fn remember(&mut self, rows: &[CmsChat]) {
        for row in rows {
            let seen = seen_row(self.deps.cms_zone, row);
            self.seen.insert(row.id, seen);
        }
        while self.seen.len() > SEEN_MAX {
            self.seen.pop_first();
        }
    }
}

impl Speaker {
    /// Says this region's share of a read: the CMS lines past its cursor, in order. Returns what
    /// it did and whether the read showed the CMS's ids going backwards.
    async fn step(
        &mut self,
        deps: &Shared,
        seen: &BTreeMap<i64, SeenRow>,
        rows: &[CmsChat],
        since: DateTime<Utc>,
        max_age: chrono::Duration,
        token: &CancellationToken,
    ) -> Result<(InworldOutcome, bool), InworldError> {
        let region = self.region.name.clone();
        let result = self.say_new(deps, seen, rows, since, max_age, token).await;
        if let Err(err) = &result {
            if !region.is_empty() {
                tracing::debug!(region, error = %err, "in-world step failed in this region");
            }
        }
        result
    }

    async fn say_new(
        &mut self,
        deps: &Shared,
        seen: &BTreeMap<i64, SeenRow>,
        rows: &[CmsChat],
        since: DateTime<Utc>,
        max_age: chrono::Duration,
        token: &CancellationToken,
    ) -> Result<(InworldOutcome, bool), InworldError> {
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
            return Ok((InworldOutcome::default(), false));
        };
        let (cursor, went_back) = self.notice_restore(deps, seen, rows, cursor, since).await?;
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
                    _ = token.cancelled() => return Ok((outcome, went_back)),
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
                        ViewerError::Stopping => Ok((outcome, went_back)),
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
        Ok((outcome, went_back))
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

    /// Lowers the cursor when the read shows the CMS's ids went backwards (`went_back`), saying so
    /// in the log; returns the cursor to go on from and whether it went back.
    async fn notice_restore(
        &mut self,
        deps: &Shared,
        seen: &BTreeMap<i64, SeenRow>,
        rows: &[CmsChat],
        cursor: i64,
        since: DateTime<Utc>,
    ) -> Result<(i64, bool), OutboxError> {
        let at_cursor = self.cursor_row(deps, cursor)?;
        let Some(lowered) = went_back(rows, seen, &at_cursor, since, |row| {
            dated(deps.cms_zone, row)
        }) else {
            return Ok((cursor, false));
        };
        tracing::warn!(
            region = self.region.name,
            cursor,
            new_cursor = lowered,
            "cms ids went backwards (a restored database?): the in-world cursor goes back, so that the cms lines typed since the restore are said"
        );
        self.handled_up_to = Some(lowered);
        self.parts_said = None;
        let row = rows.iter().find(|row| row.id == lowered);
        self.store_cursor(deps, lowered, row).await?;
        Ok((lowered, true))
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

fn seen_row(zone: Zone, row: &CmsChat) -> SeenRow {
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
fn dated(zone: Zone, row: &CmsChat) -> Option<DateTime<Utc>> {
    let naive = NaiveDateTime::parse_from_str(&row.timestamp, "%Y-%m-%d %H:%M:%S").ok()?;
    zone.resolve(naive).into_iter().max()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, message: &str, second: u32) -> CmsChat {
        CmsChat {
            id,
            user_id: 4,
            username: "dora".into(),
            first_name: "Dora".into(),
            last_name: "Admin".into(),
            message: message.into(),
            timestamp: format!("2026-12-07 06:00:{second:02}"),
            from_cms: true,
        }
    }

    fn dated(row: &CmsChat) -> Option<DateTime<Utc>> {
        NaiveDateTime::parse_from_str(&row.timestamp, "%Y-%m-%d %H:%M:%S")
            .ok()
            .map(|naive| naive.and_utc())
    }

    fn seen(rows: &[CmsChat]) -> BTreeMap<i64, SeenRow> {
        rows.iter()
            .map(|row| {
                let seen = SeenRow {
                    fingerprint: fingerprint(row),
                    at: dated(row),
                };
                (row.id, seen)
            })
            .collect()
    }

    fn at_cursor(row: &CmsChat) -> CursorRow {
        CursorRow {
            id: row.id,
            row: Some(SeenRow {
                fingerprint: fingerprint(row),
                at: dated(row),
            }),
        }
    }

    #[test]
    fn ids_going_backwards_are_told_from_the_rows_a_read_returns() {
        let before = [row(1, "one", 10), row(2, "two", 11), row(3, "three", 12)];
        let since = dated(&before[0]).expect("dated") - chrono::Duration::seconds(5);
        let late = dated(&before[2]).expect("dated") + chrono::Duration::seconds(1);
        let known = seen(&before);
        let cursor = at_cursor(&before[2]);
        // A read like the last one, or one that does not reach back to the cursor's row.
        assert_eq!(went_back(&before, &known, &cursor, since, dated), None);
        assert_eq!(went_back(&[], &known, &cursor, late, dated), None);
        // Restored after row 1: row 2 is another line now, row 3 is gone.
        let restored = [row(1, "one", 10), row(2, "after the restore", 30)];
        assert_eq!(went_back(&restored, &known, &cursor, since, dated), Some(1));
        // The same after a restart (nothing seen): rows dated by the cursor's row are old.
        let nothing = BTreeMap::new();
        assert_eq!(
            went_back(&restored, &nothing, &cursor, since, dated),
            Some(1)
        );
        // A cursor stored by an older relay, without its row: only reused ids tell.
        let bare = CursorRow { id: 3, row: None };
        assert_eq!(went_back(&restored, &nothing, &bare, since, dated), None);
        assert_eq!(went_back(&restored, &known, &bare, since, dated), Some(1));
    }
}
