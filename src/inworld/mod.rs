//! CMS → in-world: lines typed in the CMS (`fromCMS = 1`) are said in every region by that region's
//! viewer's avatar, once each, in order. One reader of the CMS chat serves every region: the CMS
//! cannot filter, so each reader pays for every row of the grid, and one reader per process keeps
//! that cost growing with hosts, not with regions squared (issue 23).
//!
//! This file owns the reader: the read window, the rows seen, and handing each read to every
//! region's `speaker` through its `Inbox`, so that a region whose viewer refuses or hangs holds up
//! no other. The speaker owns its region's persisted cursor (the highest CMS chat id handled, with
//! the time and a fingerprint of its row: outbox `Cursor`s, so a restart neither repeats nor
//! skips), noticing that the CMS's ids went backwards (its database restored from a backup:
//! `went_back`), the splitting of long lines (a part that fails is said again without the parts
//! before it), the flood limit, and the pause while its viewer does not hear its region (as that
//! region's presence task tells it through `Stats`). Each text it says goes into its region's echo
//! memory (`echo::RecentlySaid`, which `app` shares with that region's poller) before the POST.
//! Must not touch the outbox's pending lines. It never calls the CMS chat GET without a timestamp (that
//! returns the whole history).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::cms::{CmsChat, CmsClient, CmsError, ReadBoard};
use crate::config::InworldSettings;
use crate::echo::RecentlySaid;
use crate::lookingglass::{LookingGlassClient, ViewerError};
use crate::metrics::Stats;
use crate::outbox::{Outbox, OutboxError};
use crate::text::fnv1a64;
use crate::zone::Zone;

mod speaker;
use speaker::{Speaker, dated, seen_row};

/// How far before the newest row seen a narrow read starts: the CMS stores whole seconds, and
/// rows of the same moment may be inserted a little out of order by different writers.
const NARROW_MARGIN: chrono::Duration = chrono::Duration::seconds(2);

/// How far behind the previous read a narrow read follows rows dated behind the present, besides
/// the lag CMS lines were lately seen with (`Reader::cms_lag`): a browser whose clock is behind is
/// followed once a read has found one of its lines. The newest row seen lags the present
/// when the relay drains a backlog (its rows carry the time they were said): following it, every
/// read returned the seconds of the relay's own rows it had stored since (14 000 rows a read, half of
/// a one-worker CMS's time in the throughput phase of `docs/PERFORMANCE.md`). In-world says only
/// CMS lines; a row dated further behind is caught by the next wide read, at most `look_back` late.
const FOLLOW_MAX: chrono::Duration = chrono::Duration::seconds(5);

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
    /// Where each read is shared with delivery, which settles its batches from it.
    pub board: Arc<ReadBoard>,
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

/// The CMS → in-world stage: one reader of the CMS chat for every region, and each region's
/// speaker, which takes the reads from its own inbox at its own pace.
pub struct Inworld {
    deps: Shared,
    regions: Vec<Speaker>,
    reader: Reader,
}

/// The reader's side: where the next read starts, and what the reads returned.
struct Reader {
    /// One inbox for each region's speaker, in the order of `Inworld::regions`.
    inboxes: Vec<Arc<Inbox>>,
    /// When the previous successful read was made (this host's clock).
    last_read: Option<DateTime<Utc>>,
    /// The newest row timestamp seen on the grid, as an instant in the CMS's zone: narrow reads
    /// start `NARROW_MARGIN` before it (or before `last_read`, whichever is earlier).
    newest_seen: Option<DateTime<Utc>>,
    /// When the last wide read was made: every `look_back` one read reaches `look_back` before
    /// it, for CMS lines dated behind the newest rows (a browser's clock behind).
    last_wide: Option<DateTime<Utc>>,
    /// Wide reads that failed in a row (an answer too large for the CMS's memory limit or
    /// `cms.max_response_bytes`, say): each one doubles the wait before the next and halves how far
    /// back it reaches (`since`), so a CMS that cannot answer it is not asked again and again.
    wide_failures: u32,
    /// No wide read before this (after failures); narrow reads go on meanwhile.
    wide_not_before: Option<DateTime<Utc>>,
    /// The rows the reads of this process returned, by id (at most `SEEN_MAX`, the highest): a row
    /// under a known id with other content shows that the CMS hands its ids out again.
    seen: BTreeMap<i64, SeenRow>,
    /// The largest lag of a CMS line (`fromCMS`) behind the read that first saw it, among those seen
    /// within `look_back`, with when it was seen: a browser whose clock is behind dates its lines
    /// that far back, and narrow reads reach back as far for its next ones. A line found only by a
    /// wide read (dated behind further than narrow reads reach) counts with its whole age, an
    /// overestimate of up to `look_back`: narrow reads then reach back further than needed until
    /// `look_back` has passed.
    cms_lag: Option<(chrono::Duration, DateTime<Utc>)>,
}

/// One CMS read as every region's speaker gets it: the rows, where the read started, and for each
/// row whether the reads before it saw it (`None`: not seen; `Some(false)`: seen with another
/// fingerprint, so the CMS handed its id out again), for `went_back_known`.
pub(crate) struct Read {
    rows: Arc<Vec<CmsChat>>,
    since: DateTime<Utc>,
    known: Vec<Option<bool>>,
    seen_empty: bool,
}

/// The reads waiting for one region's speaker. A speaker whose viewer hangs (a request that never
/// ends holds its gate) or is out of its region (the speaker is paused) lets its reads wait here
/// while the other regions go on; beyond
/// `MAX_WAITING_READS` the oldest waiting read is dropped (its lines come back with a later wide
/// read while younger than `inworld.max_age`, and are skipped as too old otherwise).
pub(crate) struct Inbox {
    reads: std::sync::Mutex<std::collections::VecDeque<Arc<Read>>>,
    ready: tokio::sync::Notify,
    /// A dropped read was told since the speaker last took one: a long pause (a viewer out of its
    /// region for an hour) is warned about once, not at every read.
    drop_told: std::sync::atomic::AtomicBool,
}

/// A wide read that keeps failing reaches back at least 1/2^6 = 1/64 of its full span.
const MAX_WIDE_HALVINGS: u32 = 6;

/// The wait before a wide read is tried again doubles up to 2^16 poll intervals (then `look_back`
/// caps it); the bound only keeps the shift in range.
const MAX_WIDE_BACKOFF_DOUBLINGS: u32 = 16;

/// A read every `inworld.poll_interval` (2 s): 1,000 waiting reads are half an hour of a viewer that
/// does not answer, longer than `inworld.max_age` (10 minutes) keeps a line worth saying.
const MAX_WAITING_READS: usize = 1000;

impl Inbox {
    fn new() -> Inbox {
        Inbox {
            reads: std::sync::Mutex::new(std::collections::VecDeque::new()),
            ready: tokio::sync::Notify::new(),
            drop_told: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Hands `read` to the speaker; whether an older read had to be dropped for it, the first time
    /// since the speaker last took a read.
    fn push(&self, read: Arc<Read>) -> bool {
        let dropped = {
            let mut reads = lock(&self.reads);
            let dropped = reads.len() >= MAX_WAITING_READS && reads.pop_front().is_some();
            reads.push_back(read);
            dropped
        };
        self.ready.notify_one();
        dropped
            && !self
                .drop_told
                .swap(true, std::sync::atomic::Ordering::Relaxed)
    }

    /// The oldest waiting read, once there is one.
    pub(crate) async fn next(&self) -> Arc<Read> {
        loop {
            if let Some(read) = lock(&self.reads).pop_front() {
                self.drop_told
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                return read;
            }
            // A push between the check and here left a permit: this returns at once.
            self.ready.notified().await;
        }
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this mutex leaves a plain queue behind; keep using it.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What every region's speaker shares.
struct Shared {
    cms: Arc<CmsClient>,
    outbox: Arc<Outbox>,
    settings: InworldSettings,
    cms_zone: Zone,
    board: Arc<ReadBoard>,
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
    let known: Vec<Option<bool>> = rows.iter().map(|row| known_as(seen, row)).collect();
    went_back_known(rows, &known, seen.is_empty(), at_cursor, since, dated)
}

/// Whether `row` was seen before: `None` not, `Some(true)` with the same fingerprint.
fn known_as(seen: &BTreeMap<i64, SeenRow>, row: &CmsChat) -> Option<bool> {
    seen.get(&row.id)
        .map(|known| known.fingerprint == fingerprint(row))
}

/// `went_back` with what the reads before knew of each row worked out by the reader (`known`, one
/// for each of `rows`; `seen_empty` when they knew nothing), so that each region's speaker decides
/// for its own cursor without the reader's memory.
pub(crate) fn went_back_known(
    rows: &[CmsChat],
    known: &[Option<bool>],
    seen_empty: bool,
    at_cursor: &CursorRow,
    since: DateTime<Utc>,
    dated: impl Fn(&CmsChat) -> Option<DateTime<Utc>>,
) -> Option<i64> {
    let reused = known.contains(&Some(false));
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
    let known_old = |(row, known): &(&CmsChat, &Option<bool>)| match known {
        Some(same) => *same,
        None => {
            seen_empty
                && cursor_at.is_some_and(|cursor_at| dated(row).is_some_and(|at| at <= cursor_at))
        }
    };
    Some(
        rows.iter()
            .zip(known)
            .filter(|(row, _)| row.id <= at_cursor.id)
            .filter(known_old)
            .map(|(row, _)| row.id)
            .max()
            .unwrap_or(0),
    )
}

impl Inworld {
    /// Builds the stage.
    pub fn new(deps: InworldDeps) -> Inworld {
        let inboxes = deps
            .regions
            .iter()
            .map(|_| Arc::new(Inbox::new()))
            .collect();
        Inworld {
            regions: deps
                .regions
                .into_iter()
                .map(|region| Speaker {
                    region,
                    next_slot: Instant::now(),
                    handled_up_to: None,
                    parts_said: None,
                    held: None,
                    paused_since: None,
                })
                .collect(),
            deps: Shared {
                cms: deps.cms,
                outbox: deps.outbox,
                settings: deps.settings,
                cms_zone: deps.cms_zone,
                board: deps.board,
            },
            reader: Reader::new(inboxes),
        }
    }

    /// Reads and says until `token` is cancelled: the reader and every region's speaker at once
    /// in this one task (a panic in any of them is the stage's), each speaker at its own pace.
    pub async fn run_until_stopped(self, token: CancellationToken) {
        tracing::info!(n_regions = self.regions.len(), "saying CMS lines in-world");
        let Inworld {
            deps,
            regions,
            mut reader,
        } = self;
        let speakers = regions
            .into_iter()
            .zip(reader.inboxes.clone())
            .map(|(speaker, inbox)| speaker.run_until_stopped(&deps, inbox, &token));
        let reading = reader.run_until_stopped(&deps, &token);
        futures_util::future::join(reading, futures_util::future::join_all(speakers)).await;
    }
}

impl Reader {
    /// A reader that has read nothing yet, handing its reads to `inboxes`.
    fn new(inboxes: Vec<Arc<Inbox>>) -> Reader {
        Reader {
            inboxes,
            last_read: None,
            newest_seen: None,
            last_wide: None,
            wide_failures: 0,
            wide_not_before: None,
            seen: BTreeMap::new(),
            cms_lag: None,
        }
    }

    /// One read of the CMS chat, handed to every region's speaker; returns how many rows it got.
    async fn read_once(&mut self, deps: &Shared) -> Result<usize, CmsError> {
        let now = Utc::now();
        let look_back = chrono::Duration::from_std(deps.settings.look_back).unwrap_or_default();
        let max_age = chrono::Duration::from_std(deps.settings.max_age).unwrap_or_default();
        let (own_since, wide) = self.since(now, look_back, max_age);
        // Reaching back to where delivery needs a read settles its batches with this one.
        let since_unix = deps.board.start_for(own_since.timestamp(), now.timestamp());
        let since = DateTime::from_timestamp(since_unix, 0).unwrap_or(own_since);
        let sent_at = Instant::now();
        let rows = match deps.cms.chats_since(since_unix).await {
            Ok(rows) => rows,
            Err(err) => {
                if wide {
                    let poll =
                        chrono::Duration::from_std(deps.settings.poll_interval).unwrap_or_default();
                    self.wide_failed(now, look_back, poll);
                }
                return Err(err);
            }
        };
        self.last_read = Some(now);
        if wide {
            self.wide_succeeded(now);
        }
        let newest = rows
            .iter()
            .filter_map(|row| dated(deps.cms_zone, row))
            .max();
        self.newest_seen = self.newest_seen.max(newest);
        let known: Vec<Option<bool>> = rows.iter().map(|row| known_as(&self.seen, row)).collect();
        let seen_empty = self.seen.is_empty();
        if !seen_empty {
            // (The first read of a process sees every row first: its lines lag by their age.)
            self.note_cms_lag(now, look_back, &rows, &known, deps.cms_zone);
        }
        if known.contains(&Some(false)) {
            // The CMS hands ids out again (a restored database): what was remembered describes
            // the database before the restore. Each speaker lowers its own cursor from this read.
            self.seen.clear();
        }
        self.remember(deps.cms_zone, &rows);
        let n_rows = rows.len();
        let rows = Arc::new(rows);
        deps.board.publish(since_unix, sent_at, rows.clone());
        let read = Arc::new(Read {
            rows,
            since,
            known,
            seen_empty,
        });
        for inbox in &self.inboxes {
            if inbox.push(read.clone()) {
                tracing::warn!(
                    waiting = MAX_WAITING_READS,
                    "a region's viewer has not taken the cms lines of the last reads (it hangs, or is out of its region): the oldest reads waiting for it are dropped"
                );
            }
        }
        Ok(n_rows)
    }

    /// Where the next read starts, and whether it is a wide one. Most reads are narrow: they follow
    /// the new rows, from a little before the newest row seen (or the previous read, if that is
    /// earlier: a writer whose clock is ahead cannot push the reads past the present), so a read
    /// returns about the rows added since the previous one, not `look_back` of the whole grid.
    /// Every `look_back` a wide read reaches `look_back` before the previous wide one, which catches
    /// every row dated at most `look_back` behind its insertion; the first one after a start reaches
    /// back over `max_age` too (lines typed while the relay was down), and none reaches further.
    /// After a failed wide read the reads are narrow until `wide_not_before`, then a wide one is
    /// tried again reaching back half as far as the full span (a quarter after two failures, …, at
    /// least 1/64 of it): a read that failed for its size is not repeated as it was.
    fn since(
        &self,
        now: DateTime<Utc>,
        look_back: chrono::Duration,
        max_age: chrono::Duration,
    ) -> (DateTime<Utc>, bool) {
        let oldest = now - max_age - look_back;
        let wide_due = self.last_wide.is_none_or(|at| now - at >= look_back)
            && self.wide_not_before.is_none_or(|at| now >= at);
        if wide_due {
            let full = self
                .last_wide
                .map_or(oldest, |at| (at - look_back).max(oldest));
            let share = 1i32 << self.wide_failures.min(MAX_WIDE_HALVINGS);
            return (now - (now - full) / share, true);
        }
        let read = self.last_read.unwrap_or(now);
        let newest = self.newest_seen.map_or(read, |newest| newest.min(read));
        // Never further back than `FOLLOW_MAX` and the lag CMS lines came with lately (at most
        // `look_back`) before the previous read: while a backlog drains, the newest row seen is the
        // relay's own, dated when it was said.
        let lag = self
            .cms_lag
            .filter(|(_, at)| read - *at < look_back)
            .map_or(chrono::Duration::zero(), |(lag, _)| lag);
        let floor = read - (FOLLOW_MAX + lag).min(look_back);
        ((newest - NARROW_MARGIN).max(floor), false)
    }

    /// Notes the lag of the CMS lines a read at `now` saw first (`known` is `None`), keeping the
    /// largest within `look_back`.
    fn note_cms_lag(
        &mut self,
        now: DateTime<Utc>,
        look_back: chrono::Duration,
        rows: &[CmsChat],
        known: &[Option<bool>],
        zone: Zone,
    ) {
        let lag = rows
            .iter()
            .zip(known)
            .filter(|(row, known)| row.from_cms && known.is_none())
            .filter_map(|(row, _)| dated(zone, row))
            .map(|at| now - at)
            .max();
        let Some(lag) = lag.filter(|lag| *lag > chrono::Duration::zero()) else {
            return;
        };
        let kept = self
            .cms_lag
            .filter(|(kept, at)| now - *at < look_back && *kept >= lag);
        self.cms_lag = Some(kept.unwrap_or((lag, now)));
    }

    /// A wide read failed at `now`: the next waits `poll` × 2^failures (at most `look_back`) and
    /// reaches back half as far as this one did.
    fn wide_failed(
        &mut self,
        now: DateTime<Utc>,
        look_back: chrono::Duration,
        poll: chrono::Duration,
    ) {
        self.wide_failures = self.wide_failures.saturating_add(1);
        let wait = poll * (1i32 << self.wide_failures.min(MAX_WIDE_BACKOFF_DOUBLINGS));
        self.wide_not_before = Some(now + wait.min(look_back));
    }

    /// A wide read succeeded at `now`: the next is due `look_back` later, at full reach again.
    fn wide_succeeded(&mut self, now: DateTime<Utc>) {
        if self.wide_failures > 0 {
            tracing::warn!(
                n_failed = self.wide_failures,
                "the cms could not answer in-world's read reaching look_back (its memory_limit or cms.max_response_bytes); a shorter one did: cms lines dated further back than it reached are not said"
            );
        }
        self.last_wide = Some(now);
        self.wide_failures = 0;
        self.wide_not_before = None;
    }

    /// Reads every `inworld.poll_interval` until `token` is cancelled.
    async fn run_until_stopped(&mut self, deps: &Shared, token: &CancellationToken) {
        deps.board.serve(deps.settings.poll_interval);
        let mut failing = false;
        while !token.is_cancelled() {
            match self.read_once(deps).await {
                Ok(_) => failing = false,
                Err(err) if !failing => {
                    tracing::warn!(error = %err, "in-world relay step failed; retrying every poll interval");
                    failing = true;
                }
                Err(err) => tracing::debug!(error = %err, "in-world relay step failed again"),
            }
            tokio::select! {
                _ = token.cancelled() => {}
                _ = tokio::time::sleep(deps.settings.poll_interval) => {}
            }
        }
    }

    /// Remembers the rows of a read (`seen`), keeping the `SEEN_MAX` highest ids.
    fn remember(&mut self, zone: Zone, rows: &[CmsChat]) {
        for row in rows {
            let seen = seen_row(zone, row);
            self.seen.insert(row.id, seen);
        }
        while self.seen.len() > SEEN_MAX {
            self.seen.pop_first();
        }
    }
}

#[cfg(test)]
mod tests;
