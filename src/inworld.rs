//! CMS → in-world: lines typed in the CMS (`fromCMS = 1`) are said in the region by the viewer's
//! avatar, once each, in order.
//!
//! Owns the persisted cursor (the highest CMS chat id handled, an outbox `Cursor`, so a
//! restart neither repeats nor skips), the splitting of long lines (a part that fails is said again
//! without the parts before it) and the flood limit. Each text it
//! says goes into the echo memory (`echo::RecentlySaid`, which `app` shares with the poller) before
//! the POST. Must not touch the outbox's pending lines. It never calls the CMS chat GET without a
//! timestamp (that returns the whole history).

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
use crate::zone::Zone;

/// How far before the newest row seen a narrow read starts: the CMS stores whole seconds, and
/// rows of the same moment may be inserted a little out of order by different writers.
const NARROW_MARGIN: chrono::Duration = chrono::Duration::seconds(2);

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
    /// Who says them.
    pub viewer: LookingGlassClient,
    /// Where the cursor is kept.
    pub outbox: Arc<Outbox>,
    /// `[inworld]`
    pub settings: InworldSettings,
    /// The CMS server's clock (`cms.timezone`), to tell a row's age.
    pub cms_zone: Zone,
    /// The counters.
    pub stats: Arc<Stats>,
    /// What was said lately (shared with the poller, which drops its echo).
    pub recently_said: Arc<RecentlySaid>,
}

/// The CMS → in-world stage.
pub struct Inworld {
    deps: InworldDeps,
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
    /// The earliest moment the next line may be said (flood control).
    next_slot: Instant,
    /// The highest CMS id said or skipped by this process. The persisted cursor lags it when writing
    /// the cursor failed (disk full): a line is not said twice for that.
    handled_up_to: Option<i64>,
    /// The row being said in parts and how many of its parts the viewer took, so that after a
    /// failed part the retry starts at that part. In memory only: a restart in the middle of a
    /// split line says all of it again, as it says again a line whose cursor was not yet written.
    parts_said: Option<(i64, usize)>,
}

impl Inworld {
    /// Builds the stage.
    pub fn new(deps: InworldDeps) -> Inworld {
        Inworld {
            deps,
            last_read: None,
            newest_seen: None,
            last_wide: None,
            wide_failed: false,
            next_slot: Instant::now(),
            handled_up_to: None,
            parts_said: None,
        }
    }

    /// One step: read new CMS lines and say them, paced; stops between lines when `token` is
    /// cancelled.
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
        let newest = rows.iter().filter_map(|row| self.dated(row)).max();
        self.newest_seen = self.newest_seen.max(newest);
        let Some(cursor) = self
            .deps
            .outbox
            .cursor(Cursor::LastSaidId)?
            .max(self.handled_up_to)
        else {
            // First start ever: begin from now, say nothing of the past.
            let newest = rows.iter().map(|r| r.id).max().unwrap_or(0);
            self.advance(newest).await?;
            tracing::info!(cursor = newest, "in-world relay starts from now");
            return Ok(InworldOutcome::default());
        };
        let mut pending: Vec<CmsChat> = rows
            .into_iter()
            .filter(|r| r.from_cms && r.id > cursor)
            .collect();
        pending.sort_by_key(|r| r.id);
        let mut outcome = InworldOutcome::default();
        if pending.len() > self.deps.settings.max_queue {
            let n_over = pending.len() - self.deps.settings.max_queue;
            let last_dropped = pending[n_over - 1].id;
            pending.drain(..n_over);
            self.skip(
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
            if self.age(&row, Utc::now()).is_some_and(|age| age > max_age) {
                self.skip(row.id, 1, "older than inworld.max_age", &mut outcome)
                    .await?;
                continue;
            }
            let n_said_before = match self.parts_said {
                Some((id, n_parts)) if id == row.id => n_parts,
                _ => 0,
            };
            for (index, part) in split_message(&self.render(&row))
                .into_iter()
                .enumerate()
                .skip(n_said_before)
            {
                tokio::select! {
                    _ = token.cancelled() => return Ok(outcome),
                    _ = tokio::time::sleep_until(self.next_slot.into()) => {}
                }
                let said = say_part(
                    &self.deps.viewer,
                    &self.deps.recently_said,
                    &part,
                    self.deps.settings.channel,
                    self.deps.settings.say_type.as_str(),
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
                    + Duration::from_secs_f64(1.0 / self.deps.settings.max_lines_per_second);
                Stats::add(&self.deps.stats.inworld_said, 1);
            }
            self.advance(row.id).await?;
            self.parts_said = None;
            outcome.n_said += 1;
        }
        Ok(outcome)
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
        tracing::info!("saying CMS lines in-world");
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

    /// Moves the cursor past `id`: in memory first, then on disk.
    async fn advance(&mut self, id: i64) -> Result<(), OutboxError> {
        self.handled_up_to = self.handled_up_to.max(Some(id));
        self.deps.outbox.set_cursor(Cursor::LastSaidId, id).await
    }

    async fn skip(
        &mut self,
        up_to_id: i64,
        n: usize,
        reason: &str,
        outcome: &mut InworldOutcome,
    ) -> Result<(), OutboxError> {
        tracing::warn!(n_lines = n, reason, "cms lines not said in-world");
        Stats::add(&self.deps.stats.inworld_skipped, n as u64);
        outcome.n_skipped += n;
        self.advance(up_to_id).await
    }

    /// How old a CMS row is; `None` when its timestamp cannot be read. The CMS stores whole seconds,
    /// so a row counts from the end of its second (else a line typed at .9 s looks a second older).
    fn age(&self, row: &CmsChat, now: DateTime<Utc>) -> Option<chrono::Duration> {
        Some(now - self.dated(row)? - chrono::Duration::seconds(1))
    }

    /// A row's timestamp as an instant (the later one in a repeated hour); `None` when unreadable.
    fn dated(&self, row: &CmsChat) -> Option<DateTime<Utc>> {
        let naive = NaiveDateTime::parse_from_str(&row.timestamp, "%Y-%m-%d %H:%M:%S").ok()?;
        self.deps.cms_zone.resolve(naive).into_iter().max()
    }

    fn render(&self, row: &CmsChat) -> String {
        fill_template(
            &self.deps.settings.format,
            &[
                ("first", &row.first_name),
                ("last", &row.last_name),
                ("username", &row.username),
                ("message", &row.message),
            ],
        )
    }
}
