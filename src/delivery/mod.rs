//! `Delivery`: outbox → CMS. Builds batches within the count and byte limits, fixes each line's row
//! (user, text, timestamp) before its first POST, and retries with backoff until the CMS confirms.
//!
//! What an answer proves is `proof::what_a_post_proves`: a `success: true` proves a line stored only
//! for a POST of that line alone (every insert consumes an id, stored or not), so a batch of more
//! awaits its proof (`settle`) while newer batches go out, and one read settles all such batches.
//! Because the CMS's chat POST is not idempotent, a batch whose outcome is unknown (timeout, reset,
//! 5xx, an unreadable answer, a restart in the middle) stays marked in flight, and is read back
//! from the CMS before anything is resent: rows already stored are confirmed, the rest go out one
//! line per POST so each gets an unambiguous answer. A line the CMS refuses on its own goes to the
//! dead letters; a batch that is refused is first retried line by line so one bad line does not
//! take its neighbours with it.
//!
//! A failure is the lines' own when the CMS answered it with an error (an error page or HTTP 500
//! for their POST or their read-back) and answers a probe right after it, or when it refused one
//! line's insert after storing other rows: those lines wait for their own retry (those waiting for
//! a read-back on one shared schedule, read in one GET), while newer lines go on (the newer lines
//! of their speakers wait behind them, so that a speaker's order holds), and after
//! `retry.max_line_failures` such failures they go to the dead letters with a reason that says what
//! to check. Any other failure is an outage: the lines keep their place and the loop backs off
//! (a server's `Retry-After` up to `retry.max`, its heartbeat beating), for as long as it lasts.
//!
//! The files, one concern each: `api` (the CMS seam), `row` (the row a line becomes), `proof`,
//! `step`, `readback`, `settle` (the batches awaiting their proof and the one read that settles
//! them), `beside` (that read made beside the POSTs while delivery is behind), `ahead` (the next
//! batch marked while one is posted), `holds`, `run`; `scripted`, `tests`, `waits`, `refusals`,
//! `settles`, `besides`, `aheads` and `model` are test-only.
//! Must not: remove a line before the CMS confirmed it (or a read-back found it), send again a
//! line whose outcome no read-back could settle, or decide on an opt-out itself (each batch is
//! handed to `Privacy::withhold` before its POST).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::avatars::AvatarMapper;
use crate::backoff::RetryPolicy;
use crate::cms::{CmsClient, CmsError, ReadBoard};
use crate::config::DeliverySettings;
use crate::metrics::Stats;
use crate::outbox::{Outbox, OutboxError, PendingLine};
use crate::pacing::Pacer;
use crate::privacy::Privacy;

mod ahead;
#[cfg(test)]
mod aheads;
mod api;
mod beside;
#[cfg(test)]
mod besides;
mod holds;
#[cfg(test)]
mod model;
mod proof;
mod readback;
#[cfg(test)]
mod refusals;
mod row;
mod run;
#[cfg(test)]
mod scripted;
mod settle;
#[cfg(test)]
mod settles;
mod step;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod waits;

use ahead::Ahead;
pub use api::{ChatApi, describe_unknown_users, unknown_mapped_users, zone_disagreement};
use beside::Beside;
use holds::Holds;
use settle::Awaiting;

/// How far before the earliest stored timestamp of the uncertain lines a read-back starts. The
/// relay dates its rows itself (`cms.timezone`, whole seconds) and the start is taken from those
/// strings (`readback::read_back_start`), which the CMS compares `>=`: the start string itself is
/// exact, and the one second is slack kept on top. Each second of it reads a second of the grid's
/// rows, and while a burst drains, a second of the relay's own rows spoken then (3 600 rows at
/// 3 600 lines/s; 5 s read 18 000 rows a read).
const READ_BACK_MARGIN_SECS: i64 = 1;

/// How often an idle delivery loop looks at the outbox even without being woken.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// How many pending records one step looks at to find lines it may send past those that wait
/// for a retry (and the newer lines of their speakers): a few thousand records are read in
/// milliseconds; beyond them the step waits for the held lines.
const SCAN_LIMIT: usize = 10_000;

/// The probe's time: a day ahead, so that the GET returns no row and costs the CMS nothing but
/// the request.
const PROBE_AHEAD_SECS: i64 = 86_400;

/// Why a delivery step failed; the lines stay in the outbox.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The CMS failed in a way worth retrying.
    #[error(transparent)]
    Cms(#[from] CmsError),
    /// The outbox could not be read or written.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// Inserts of lines sent alone each got `{"success":false,"id":0}`, with no row of ours stored
    /// between: the CMS fails every insert.
    #[error(
        "the cms fails every insert: {n_lines} inserts of lines sent alone in a row answered {{\"success\":false,\"id\":0}} with no line stored between (its database cannot write: a full disk, a lost connection, a lock wait?); the lines wait, none is counted as failing"
    )]
    InsertsFailing {
        /// The failed inserts in a row.
        n_lines: usize,
    },
}

impl DeliveryError {
    fn retry_after(&self) -> Option<Duration> {
        match self {
            DeliveryError::Cms(err) => err.retry_after(),
            DeliveryError::Outbox(_) | DeliveryError::InsertsFailing { .. } => None,
        }
    }
}

/// What one delivery step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// Nothing was pending.
    Idle,
    /// Progress was made.
    Progress {
        /// Lines the CMS confirmed.
        n_delivered: usize,
        /// Lines a read-back found already stored.
        n_reconciled: usize,
        /// Lines moved to the dead letters.
        n_dead: usize,
        /// Lines that failed on their own and now wait for their retry.
        n_held: usize,
    },
}

/// What delivery is built from.
pub struct DeliveryDeps<C = CmsClient> {
    /// Where the lines wait.
    pub outbox: Arc<Outbox>,
    /// Where they go.
    pub cms: Arc<C>,
    /// The in-world reader's reads, which settle batches awaiting their proof (`settle`) when a
    /// reader serves it.
    pub board: Arc<ReadBoard>,
    /// Speaker → CMS user.
    pub mapper: Arc<AvatarMapper>,
    /// Who opted out: a line of theirs is not sent (`Privacy::withhold`).
    pub privacy: Arc<Privacy>,
    /// Batching, pacing and how a row is made (`CmsSettings::delivery`).
    pub settings: DeliverySettings,
    /// The retry schedule.
    pub retry: RetryPolicy,
    /// The counters.
    pub stats: Arc<Stats>,
    /// `retry.max_line_failures`: failures of a line's own after which it is dead-lettered.
    pub max_line_failures: u32,
    /// Each region's `{region}` text by its `[[regions]]` name (the only region under "").
    pub region_labels: std::collections::HashMap<String, String>,
    /// Each region's counters by its `[[regions]]` name, for the lines delivered there (the only
    /// region's are `stats`).
    pub region_stats: std::collections::HashMap<String, Arc<Stats>>,
}

impl<C> DeliveryDeps<C> {
    /// Counts `lines` as delivered (`reconciled`: found by a read-back after an unknown outcome)
    /// in the counters of each line's region: its own, else the process's (the only region, or a
    /// line of a region no longer configured).
    pub fn count_delivered<'a>(
        &self,
        lines: impl Iterator<Item = &'a crate::outbox::PendingLine>,
        reconciled: bool,
    ) {
        for line in lines {
            let stats = self
                .region_stats
                .get(&line.line.region)
                .map_or(&*self.stats, |stats| &**stats);
            let counter = if reconciled {
                &stats.lines_reconciled
            } else {
                &stats.lines_delivered
            };
            Stats::add(counter, 1);
        }
    }

    /// The `{region}` text of the region named `name`: its label, else the name itself (a line of
    /// a region no longer configured), else "the region".
    pub fn region_label<'a>(&'a self, name: &'a str) -> &'a str {
        match self.region_labels.get(name) {
            Some(label) => label,
            None if name.is_empty() => "the region",
            None => name,
        }
    }
}

/// The delivery stage.
pub struct Delivery<C = CmsClient> {
    deps: DeliveryDeps<C>,
    /// The time left between CMS requests (`cms.adaptive_pacing`, `cms.max_requests_per_second`).
    pacer: Pacer,
    /// The lines that wait for their own retry. In memory: after a restart they are tried in their
    /// place again, and their persisted `failures` keep the bound.
    holds: Mutex<Holds>,
    /// The lines of batches the CMS answered `success: true` for, waiting for the shared read
    /// that proves them stored (`settle`). In memory: after a restart they are in flight.
    awaiting: Mutex<Awaiting>,
    /// The shared read made beside the POSTs while delivery is behind (`beside`).
    beside: Mutex<Beside>,
    /// The batch marked while the one before it is posted (`ahead`).
    ahead: Mutex<Ahead>,
}

/// What one step did so far, and the time it runs at (an input, so that tests step the holds'
/// schedule without waiting).
struct Tally {
    now: tokio::time::Instant,
    n_delivered: usize,
    n_reconciled: usize,
    n_dead: usize,
    n_held: usize,
}

impl<C: ChatApi> Delivery<C> {
    /// Builds the stage.
    pub fn new(deps: DeliveryDeps<C>) -> Delivery<C> {
        Delivery {
            pacer: Pacer::new(deps.settings.pacing),
            deps,
            holds: Mutex::new(Holds::default()),
            awaiting: Mutex::new(Awaiting::default()),
            beside: Mutex::new(Beside::default()),
            ahead: Mutex::new(Ahead::default()),
        }
    }

    /// One step: settle lines of unknown outcome, or send the next batch.
    pub async fn try_deliver_batch(&self) -> Result<DeliveryOutcome, DeliveryError> {
        self.try_deliver_batch_at(tokio::time::Instant::now()).await
    }

    /// `try_deliver_batch` as if it ran at `now` (for the held lines' schedule).
    pub(crate) async fn try_deliver_batch_at(
        &self,
        now: tokio::time::Instant,
    ) -> Result<DeliveryOutcome, DeliveryError> {
        self.deps.outbox.drop_expired().await?;
        // After a full disk, the room delivery freed by removing lines goes back to the reserve
        // first, and then to new lines.
        self.deps.outbox.restore_reserve();
        self.forget_gone_holds()?;
        let mut tally = Tally::at(now);
        // Lines a read settled during the last POST found missing go first, one per POST.
        let resend = self.take_resend();
        if !resend.is_empty() {
            let sent = self.deliver_singly(resend, &mut tally).await;
            self.publish_holds();
            return sent.map(|()| tally.into_outcome());
        }
        // With a batch marked ahead it goes next: the scan for due lines (a hundred records read)
        // would only say that more can be sent. Lines of unknown outcome that fall due meanwhile
        // keep the next mark from being made (`mark_ahead`), and this scan then finds them.
        let lines = if self.marked_ahead() {
            Vec::new()
        } else {
            self.due_lines(now)?
        };
        // Batches posted earlier are settled by one shared read when it is due (`settle`).
        let more = !lines.is_empty() || self.marked_ahead();
        let stepped = match self.settle_posted(more, &mut tally).await {
            Ok(true) => Ok(()),
            Ok(false) if !more => {
                self.publish_holds();
                return Ok(DeliveryOutcome::Idle);
            }
            Ok(false) => self.step(lines, &mut tally).await,
            Err(err) => Err(err),
        };
        self.publish_holds();
        stepped.map(|()| tally.into_outcome())
    }
}

impl Tally {
    /// Nothing done yet, at `now`.
    fn at(now: tokio::time::Instant) -> Tally {
        Tally {
            now,
            n_delivered: 0,
            n_reconciled: 0,
            n_dead: 0,
            n_held: 0,
        }
    }

    /// Adds what `other` did (work done beside a POST).
    fn merge(&mut self, other: Tally) {
        self.n_delivered += other.n_delivered;
        self.n_reconciled += other.n_reconciled;
        self.n_dead += other.n_dead;
        self.n_held += other.n_held;
    }

    fn into_outcome(self) -> DeliveryOutcome {
        DeliveryOutcome::Progress {
            n_delivered: self.n_delivered,
            n_reconciled: self.n_reconciled,
            n_dead: self.n_dead,
            n_held: self.n_held,
        }
    }
}

/// Why the CMS refused `line`, for its dead letter (`CmsError::refusal_reason`).
fn refusal(err: &CmsError, line: &PendingLine) -> String {
    err.refusal_reason(line.row().map(|p| p.user_id))
}

/// Whether the CMS itself answered a request with an error (not an outage): a page that is not its
/// JSON with HTTP 200 (a PHP fatal error, such as its memory limit on a large chat GET) or an answer
/// too large to read, HTTP 500, or `success: false` with an error of its own. Validation errors and
/// a failed last row have their own handling; no answer (a timeout, a reset, a refused
/// connection), a proxy's 502/503/504 or a refused account are outages.
fn answered_with_error(err: &CmsError) -> bool {
    matches!(
        err,
        CmsError::Decode { .. } | CmsError::Failed(_) | CmsError::Http { status: 500, .. }
    )
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each of these mutexes guards plain values assigned whole: a panic elsewhere leaves them usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
