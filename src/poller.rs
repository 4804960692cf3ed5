//! `Poller`: viewer → filter → outbox. One GET at a time; each answer is parsed, filtered and flushed
//! to the outbox before the next GET is sent. An answer longer than `viewer.max_response_bytes`
//! gives the lines in its first part (the client keeps no more), and one that is not chat is
//! recorded in the outbox quarantine (its size and hash, never its text; once, however often the
//! viewer repeats it). Privacy asks come before a line is stored: `privacy` decides (the commands,
//! who opted out, also later in the same answer: `Privacy::judge`, `privacy::Ahead`); the poller
//! keeps the command lines out of the outbox and hands each change to `Privacy::save` (which
//! records it and erases the speaker's waiting lines) once the answer is stored.
//!
//! Must not: deliver anything, say anything in-world (confirmations go to the notice task), read the
//! viewer's status itself (`lookingglass::facts` does, off this path), cancel a GET in flight (an
//! aborted response kills the viewer), or decide on an opt-out itself (read the opt-out records or
//! match a speaker against them: `privacy`'s). The shutdown token is looked at only between requests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::echo::{self, RecentlySaid};
use crate::filter::{Filter, FilterReason};
use crate::lookingglass::{ChatAnswer, LookingGlassClient, ViewerError, ViewerFacts, wire};
use crate::metrics::Stats;
use crate::model::{CapturedLine, LineSource, ViewerLine, ZERO_UUID};
use crate::outbox::{Outbox, OutboxError, Quarantined};
use crate::privacy::{self, Ahead, Change, Command, Judgement, Privacy};
use crate::reload::Live;
use crate::zone::Zone;

/// How long to wait before retrying a failed outbox write (disk full). Polling pauses meanwhile, so
/// the viewer keeps what is said; the outbox reopens its database at the retry once writing works.
const STORAGE_RETRY: Duration = Duration::from_secs(1);

/// Why a poll failed.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// The viewer request failed; nothing was read.
    #[error(transparent)]
    Viewer(#[from] ViewerError),
    /// The lines were read but could not be stored: they are held in memory and stored again before
    /// the next GET.
    #[error(transparent)]
    Storage(#[from] OutboxError),
}

/// What one poll did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PollOutcome {
    /// Entries in the response.
    pub n_polled: usize,
    /// Lines stored in the outbox.
    pub n_relayed: usize,
    /// The outbox is full under `outbox.when_full = "pause_polling"`: no GET was sent.
    pub paused: bool,
}

/// A viewer response whose lines a write error kept out of the outbox, with what it takes to store
/// exactly the same records again: the body (held anyway while it is stored: the one copy), each
/// line's verdict, and the keys the failed try gave.
struct Unstored {
    body: Vec<u8>,
    polled_at: DateTime<Utc>,
    /// The configuration the verdicts were made with: its redactions are applied again.
    live: Arc<Live>,
    /// For each line of the body, in order, whether it is relayed.
    relayed: Vec<bool>,
    /// The outbox keys given so far.
    keys: Vec<u64>,
    /// The body broke off part way and is to be recorded in the quarantine too (its metadata and
    /// hash: the body holds what the filters remove, `outbox::dead`).
    quarantine: bool,
    /// The lines read before the break.
    n_lines_before: usize,
}

impl Unstored {
    /// Lines still to be stored.
    fn n_lines(&self) -> usize {
        self.relayed.iter().filter(|relayed| **relayed).count()
    }
}

/// Whether a line is stored, and with which text.
enum Verdict {
    /// Not stored.
    Drop,
    /// Stored as said.
    Keep,
    /// Stored with `filter.redact` applied.
    Redacted(String),
}

impl Verdict {
    /// The verdict on a line that passed every check: redacted when a rewrite matched, dropped when
    /// nothing is left of it.
    fn redacted(filter: &Filter, line: &ViewerLine) -> Verdict {
        match filter.redact(&line.message) {
            text if text.trim().is_empty() => Verdict::Drop,
            std::borrow::Cow::Borrowed(_) => Verdict::Keep,
            std::borrow::Cow::Owned(text) => Verdict::Redacted(text),
        }
    }
}

/// The filter's verdict `filtered` of `line`, except that a line dropped only for its chat type
/// passes when it is a privacy command: an avatar's shouted `!nolog` counts whatever `filter.types`
/// says (the chat type is the filter's last check, so every other check passed).
fn command_passes(
    filtered: Result<(), FilterReason>,
    line: &ViewerLine,
    live: &Live,
) -> Result<(), FilterReason> {
    match filtered {
        Err(FilterReason::Type) if privacy::command_of(&live.privacy, line).is_some() => Ok(()),
        filtered => filtered,
    }
}

/// What the poller is built from.
pub struct PollerDeps {
    /// The viewer it drains.
    pub viewer: LookingGlassClient,
    /// Which lines are relayed, and the privacy commands (reloaded with the configuration).
    pub live: watch::Receiver<Arc<Live>>,
    /// Who opted out: asked of every line, and told every command to record.
    pub privacy: Arc<Privacy>,
    /// Where the confirmations of privacy commands go to be said in-world (the notice task).
    pub confirmations: mpsc::Sender<String>,
    /// Where they are stored.
    pub outbox: Arc<Outbox>,
    /// The viewer machine's clock (`viewer.timezone`), to rebuild each line's time.
    pub zone: Zone,
    /// The pause between the end of one poll and the next GET (`viewer.poll_interval`).
    pub poll_interval: Duration,
    /// The counters.
    pub stats: Arc<Stats>,
    /// What the relay said in-world lately (shared with `inworld`): its echo is dropped when the
    /// viewer gives no own name.
    pub recently_said: Arc<RecentlySaid>,
    /// The viewer's own name, as `lookingglass::facts` last read it (its `FactsReader` must run:
    /// the first GET waits for its first status read).
    pub facts: Arc<ViewerFacts>,
    /// The region's `[[regions]]` name, stored with each line (empty: the only region).
    pub region: String,
    /// The region's `{region}` text, for the privacy confirmations.
    pub region_label: String,
}

/// The ingest stage.
pub struct Poller {
    deps: PollerDeps,
    own_name: Option<String>,
    /// A response a failed write has not stored yet.
    unstored: Option<Unstored>,
    /// Privacy commands read but not yet recorded in the outbox, oldest first.
    unsaved_changes: Vec<Change>,
    /// Whether the "another client drains the viewer's queue" warning was given (it is given once).
    warned_other_consumer: bool,
    /// Unreadable answers in a row: the first of a run is logged at error, the rest at debug.
    n_unreadable_in_a_row: u64,
    /// A GET is not sent once this is cancelled (`run_until_stopped`'s token).
    stop: CancellationToken,
}

impl Poller {
    /// Builds the poller.
    pub fn new(deps: PollerDeps) -> Poller {
        Poller {
            deps,
            own_name: None,
            unstored: None,
            unsaved_changes: Vec::new(),
            warned_other_consumer: false,
            n_unreadable_in_a_row: 0,
            stop: CancellationToken::new(),
        }
    }

    /// One step: store what an earlier step could not, then GET, parse, filter and store.
    pub async fn try_poll_once(&mut self) -> Result<PollOutcome, PollError> {
        if let Some(unstored) = self.unstored.take() {
            self.store_again(unstored).await?;
        }
        self.save_changes().await?;
        if self.deps.outbox.is_full_and_paused() {
            return Ok(PollOutcome {
                paused: true,
                ..PollOutcome::default()
            });
        }
        // The first GET waits for the first status read, so it knows the own name if the viewer
        // tells it (its queue may hold the relay's own lines from before a restart).
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => return Ok(PollOutcome::default()),
            _ = self.deps.facts.first_status_read() => {}
        }
        self.note_own_name();
        let poll_started = Instant::now();
        let answer = match self.deps.viewer.poll(&self.stop).await {
            Err(ViewerError::Stopping) => return Ok(PollOutcome::default()),
            answer => answer?,
        };
        let polled_at = Utc::now();
        Stats::add(&self.deps.stats.polls, 1);
        self.deps.stats.readiness.viewer_ok();
        let cut = self.note_oversized(&answer);
        let body = answer.body;
        let live = self.deps.live.borrow().clone();
        // Everything stored so far is committed (a failed write was stored again above): an opt-out
        // read in this answer drops the speaker's lines up to here.
        let watermark = self.deps.outbox.pending_watermark();
        let ahead = self.opt_outs_ahead(&body, polled_at, &live);
        let mut relayed = Vec::new();
        let mut changes = Vec::new();
        let (parsed, stored) = self
            .ingest(&body, polled_at, Vec::new(), |line| {
                let verdict = self.keep(line, relayed.len(), &live, &ahead);
                if let Some(change) = verdict.1 {
                    changes.push(Change {
                        watermark,
                        ..change
                    });
                }
                relayed.push(!matches!(verdict.0, Verdict::Drop));
                verdict.0
            })
            .await;
        self.unsaved_changes.extend(changes);
        let n_polled = relayed.len();
        Stats::add(&self.deps.stats.lines_polled, n_polled as u64);
        let quarantine = match parsed {
            // The break is where the client stopped keeping the answer: nothing to quarantine.
            Err(_) if cut => false,
            Ok(tally) => {
                if self.n_unreadable_in_a_row > 0 {
                    tracing::info!(
                        n_unreadable = self.n_unreadable_in_a_row,
                        "the viewer answers readable chat again"
                    );
                    self.n_unreadable_in_a_row = 0;
                }
                for skipped in &tally.skipped {
                    tracing::warn!(key = %skipped.key, reason = %skipped.reason, "viewer chat entry unreadable; skipped");
                }
                Stats::add(
                    &self.deps.stats.lines_unreadable,
                    tally.skipped.len() as u64,
                );
                if tally.n_untimed > 0 {
                    tracing::warn!(
                        n_lines = tally.n_untimed,
                        "viewer Time unreadable; using the receive time"
                    );
                }
                false
            }
            Err(err) => {
                // The viewer has already forgotten these lines: keep the body for an operator.
                if self.n_unreadable_in_a_row == 0 {
                    tracing::error!(error = %err, n_bytes = body.len(), n_lines_before = n_polled, "viewer chat response unreadable; the lines before the error went through the filters as usual, the answer is recorded in the outbox quarantine (its size and hash, never its text; once, however often it comes)");
                } else {
                    tracing::debug!(error = %err, n_bytes = body.len(), "viewer chat response unreadable again");
                }
                self.n_unreadable_in_a_row += 1;
                Stats::add(&self.deps.stats.lines_unreadable, 1);
                true
            }
        };
        let mut unstored = Unstored {
            body,
            polled_at,
            live,
            relayed,
            keys: Vec::new(),
            quarantine,
            n_lines_before: n_polled,
        };
        let n_relayed = match stored {
            Ok(n_relayed) => n_relayed,
            Err((err, keys)) => {
                unstored.keys = keys;
                self.unstored = Some(unstored);
                return Err(err.into());
            }
        };
        Stats::add(&self.deps.stats.lines_relayed, n_relayed as u64);
        if quarantine {
            // The lines are stored: only the quarantine copy is left to write.
            unstored.relayed.clear();
            self.store_again(unstored).await?;
        }
        self.check_echoes(poll_started);
        self.save_changes().await?;
        Ok(PollOutcome {
            n_polled,
            n_relayed,
            paused: false,
        })
    }

    /// Parses `body` and stores, line by line as they are read, the lines `keep` accepts (with the
    /// text it gives), under `keys` first (those of an earlier try). Returns the parse's outcome and
    /// the store's.
    async fn ingest(
        &self,
        body: &[u8],
        polled_at: DateTime<Utc>,
        keys: Vec<u64>,
        mut keep: impl FnMut(&ViewerLine) -> Verdict,
    ) -> (
        Result<wire::ChatTally, wire::ChatParseError>,
        Result<usize, (OutboxError, Vec<u64>)>,
    ) {
        let mut ingest = self.deps.outbox.ingest(keys);
        let parsed = wire::for_each_line(body, polled_at, self.deps.zone, |line| {
            let message = match keep(&line) {
                Verdict::Drop => return,
                Verdict::Keep => line.message,
                Verdict::Redacted(text) => text,
            };
            ingest.push(&CapturedLine {
                source: LineSource::of(line.entry_type),
                speaker: line.from.unwrap_or_default(),
                owner_id: line.owner_id.filter(|o| o != ZERO_UUID),
                message,
                spoken_at: line.spoken_at,
                captured_at: polled_at,
                region: self.deps.region.clone(),
            });
        });
        (parsed, ingest.commit().await)
    }

    /// Stores what a failed write left: the same lines under the same keys (the body is parsed
    /// again, the same way), then the quarantine copy if one is due. On failure it is kept again.
    async fn store_again(&mut self, mut unstored: Unstored) -> Result<(), OutboxError> {
        if unstored.n_lines() > 0 {
            let keys = std::mem::take(&mut unstored.keys);
            let mut verdicts = unstored.relayed.iter().copied();
            let filter = &unstored.live.filter;
            let (_, stored) = self
                .ingest(&unstored.body, unstored.polled_at, keys, |line| {
                    if verdicts.next().unwrap_or(false) {
                        Verdict::redacted(filter, line)
                    } else {
                        Verdict::Drop
                    }
                })
                .await;
            match stored {
                Ok(n_relayed) => Stats::add(&self.deps.stats.lines_relayed, n_relayed as u64),
                Err((err, keys)) => {
                    unstored.keys = keys;
                    self.unstored = Some(unstored);
                    return Err(err);
                }
            }
        }
        if unstored.quarantine {
            match self
                .deps
                .outbox
                .quarantine_unreadable(
                    "unreadable viewer chat response",
                    &unstored.body,
                    unstored.n_lines_before,
                )
                .await
            {
                Ok(Quarantined::Kept) => {}
                Ok(Quarantined::Repeat) => Stats::add(&self.deps.stats.quarantine_repeats, 1),
                Ok(Quarantined::Full) => Stats::add(&self.deps.stats.quarantine_full, 1),
                Err(err) => {
                    unstored.relayed.clear();
                    self.unstored = Some(unstored);
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Counts and logs an answer longer than `viewer.max_response_bytes`; whether it was one.
    fn note_oversized(&self, answer: &ChatAnswer) -> bool {
        let n_discarded = answer.n_discarded();
        if n_discarded == 0 {
            return false;
        }
        Stats::add(&self.deps.stats.viewer_answers_oversized, 1);
        Stats::add(&self.deps.stats.viewer_bytes_discarded, n_discarded);
        let n_kept = answer.body.len();
        if answer.given_up {
            tracing::error!(
                n_bytes_read = answer.n_bytes,
                n_kept,
                "viewer chat answer did not end: given up after {} bytes, {} times viewer.max_response_bytes (no viewer sends that); the lines in its first {n_kept} bytes are relayed, the rest is lost",
                answer.n_bytes,
                crate::lookingglass::client::DISCARD_FACTOR
            );
        } else {
            tracing::error!(
                n_bytes = answer.n_bytes,
                n_kept,
                n_discarded,
                "viewer chat answer larger than viewer.max_response_bytes: read to its end (cutting it would kill the viewer), the lines in its first {n_kept} bytes are relayed, the other {n_discarded} bytes and their lines are lost; raise viewer.max_response_bytes if the memory allows"
            );
        }
        true
    }

    /// Whether a viewer line is relayed, and with which text, in this order: the filter (a line it
    /// drops only for its chat type goes on if it is a privacy command: `privacy::command_of`),
    /// (without the own name) the echo memory, `filter.ignore_speakers`, privacy (`Privacy::judge`:
    /// the commands, the opt-outs, also one the speaker says later in this answer), the chat type,
    /// `filter.ignore_messages`, then `filter.redact`. A privacy command is applied at once and
    /// returned, to be recorded. Asked once per line, with its index in the answer: the echo memory
    /// forgets what it matched.
    fn keep(
        &self,
        line: &ViewerLine,
        index: usize,
        live: &Live,
        ahead: &Ahead,
    ) -> (Verdict, Option<Change>) {
        let drop = |reason| {
            self.deps.stats.filtered(reason);
            (Verdict::Drop, None)
        };
        let filtered = live.filter.check(line, self.own_name.as_deref());
        if let Err(reason) = command_passes(filtered, line, live) {
            if reason == FilterReason::OwnAvatar {
                self.deps.recently_said.echo_arrived();
            }
            return drop(reason);
        }
        if self.own_name.is_none() && self.deps.recently_said.take_echo(&line.message) {
            self.deps.recently_said.echo_arrived();
            Stats::add(&self.deps.stats.inworld_echoes_dropped, 1);
            return drop(FilterReason::OwnAvatar);
        }
        let speaker = line.from.as_deref().unwrap_or_default();
        if live.filter.ignores_speaker(speaker) {
            return drop(FilterReason::IgnoredSpeaker);
        }
        match self.deps.privacy.judge(&live.privacy, line, index, ahead) {
            Judgement::Command(change) => {
                return (drop(FilterReason::PrivacyCommand).0, Some(change));
            }
            Judgement::OptedOut => return drop(FilterReason::OptedOut),
            Judgement::Relay => {}
        }
        // A line of a type not relayed came this far only as a privacy command, taken above.
        if let Err(reason) = filtered {
            return drop(reason);
        }
        if live.filter.ignores_message(&line.message) {
            return drop(FilterReason::IgnoredMessage);
        }
        match Verdict::redacted(&live.filter, line) {
            Verdict::Drop => drop(FilterReason::Empty),
            verdict => (verdict, None),
        }
    }

    /// The opt-out commands in `body`, with each line's index: a speaker's lines before their
    /// opt-out in the same answer were waiting when they opted out, and are not stored either. The
    /// body is read for them only when it may hold one (`privacy::may_contain`); the checks are
    /// `keep`'s up to the command, except the echo memory, which only `keep` may consume.
    fn opt_outs_ahead(&self, body: &[u8], polled_at: DateTime<Utc>, live: &Live) -> Ahead {
        let mut ahead = Ahead::default();
        if !privacy::may_contain(body, &live.privacy.optout_command) {
            return ahead;
        }
        let mut index = 0;
        // A body that breaks off is `ingest`'s to report; the commands before the break count.
        let _ = wire::for_each_line(body, polled_at, self.deps.zone, |line| {
            let at = index;
            index += 1;
            let Some(speaker) = line.from.as_deref() else {
                return;
            };
            let filtered = live.filter.check(&line, self.own_name.as_deref());
            if command_passes(filtered, &line, live).is_err()
                || live.filter.ignores_speaker(speaker)
            {
                return;
            }
            ahead.note(&live.privacy, at, &line);
        });
        ahead
    }

    /// Has `privacy` record the privacy commands read so far, oldest first, counting the waiting
    /// lines an opt-out erases, and hands each confirmation to the notice task. What a write error
    /// leaves is tried again before the next GET.
    async fn save_changes(&mut self) -> Result<(), OutboxError> {
        while let Some(change) = self.unsaved_changes.first() {
            let n_dropped = self.deps.privacy.save(change).await?;
            for _ in 0..n_dropped {
                self.deps.stats.filtered(FilterReason::OptedOut);
            }
            // The speaker's name stays out of the log: `privacy list` shows who opted out.
            match change.command {
                Command::OptOut => tracing::info!(
                    n_dropped,
                    "a speaker opted out of recording; their lines waiting in the outbox were dropped"
                ),
                Command::OptIn => tracing::info!("a speaker opted in to recording again"),
            }
            let live = self.deps.live.borrow().clone();
            if let Some(text) =
                self.deps
                    .privacy
                    .confirmation(&live.privacy, change, &self.deps.region_label)
                && let Err(err) = self.deps.confirmations.try_send(text)
            {
                tracing::warn!(error = %err, "privacy confirmation not said: the in-world queue is full or closed");
            }
            self.unsaved_changes.remove(0);
        }
        Ok(())
    }

    /// Polls until `token` is cancelled. A GET in flight is always answered and stored first.
    pub async fn run_until_stopped(mut self, token: CancellationToken) {
        tracing::info!(chat_url = %self.deps.viewer.chat_url(), "polling the viewer");
        self.stop = token.clone();
        let stats = self.deps.stats.clone();
        let _alive = stats.poller_heartbeat.alive();
        let mut failing = false;
        let mut paused = false;
        let mut storage_failing = false;
        while !token.is_cancelled() {
            stats.poller_heartbeat.beat();
            let pause = match self.try_poll_once().await {
                Ok(outcome) if outcome.paused => {
                    if !paused {
                        tracing::warn!(
                            outbox_bytes = self.deps.outbox.bytes(),
                            "outbox full: viewer polling paused until delivery makes room (the viewer keeps the lines)"
                        );
                        paused = true;
                    }
                    self.deps.poll_interval
                }
                Ok(outcome) => {
                    self.deps.stats.readiness.outbox_ok();
                    if storage_failing {
                        tracing::info!("the outbox accepts writes again: viewer polling resumed");
                        storage_failing = false;
                    }
                    if paused {
                        tracing::info!("outbox has room again: viewer polling resumed");
                        paused = false;
                    }
                    if failing {
                        tracing::info!("viewer reachable again");
                        failing = false;
                    }
                    if outcome.n_relayed > 0 {
                        tracing::debug!(
                            n_polled = outcome.n_polled,
                            n_relayed = outcome.n_relayed,
                            "polled"
                        );
                    }
                    self.deps.poll_interval
                }
                Err(PollError::Storage(err)) => {
                    self.deps.stats.readiness.outbox_failed(&err);
                    if storage_failing {
                        tracing::debug!(error = %err, n_lines = self.unstored.as_ref().map_or(0, Unstored::n_lines), "outbox write failed again");
                    } else {
                        tracing::error!(error = %err, n_lines = self.unstored.as_ref().map_or(0, Unstored::n_lines), retry_in = ?STORAGE_RETRY, "cannot store polled lines; viewer polling paused until the outbox accepts writes (the lines read are kept in memory)");
                        storage_failing = true;
                    }
                    STORAGE_RETRY
                }
                Err(PollError::Viewer(err)) => {
                    Stats::add(&self.deps.stats.poll_errors, 1);
                    self.deps.stats.readiness.viewer_failed(&err);
                    if !failing {
                        tracing::warn!(error = %err, "viewer poll failed; retrying every poll interval");
                        failing = true;
                    }
                    self.deps.poll_interval.max(Duration::from_secs(1))
                }
            };
            tokio::select! {
                _ = token.cancelled() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
        if let Some(unstored) = self.unstored.take() {
            let n_lines = unstored.n_lines();
            if let Err(err) = self.store_again(unstored).await {
                Stats::add(&self.deps.stats.lines_unstored, n_lines as u64);
                tracing::error!(error = %err, n_lines, "lines read from the viewer could not be stored at shutdown and are lost");
            }
        }
        tracing::info!("viewer polling stopped");
    }

    /// Every GET drains the viewer's one queue, whoever sends it (spec §2.2). The only sign of another
    /// consumer the relay can see without saying anything unasked: what it said in-world on channel 0
    /// is echoed back as its own avatar, so an echo missing from every poll that started after its
    /// deadline was taken by someone else. Judged only while the own name is known (the echo is
    /// recognised by it; texts can come back changed).
    fn check_echoes(&mut self, poll_started: Instant) {
        let n_missing = self.deps.recently_said.take_missing_echoes(poll_started);
        if n_missing == 0 || self.own_name.is_none() {
            return;
        }
        if self.warned_other_consumer {
            tracing::debug!(n_missing, "echoes of lines said in-world missing again");
            return;
        }
        self.warned_other_consumer = true;
        tracing::warn!(
            n_missing,
            deadline = ?echo::ECHO_DEADLINE,
            chat_url = %self.deps.viewer.chat_url(),
            "another client is probably draining the viewer's chat queue: the echo of a line the relay \
             said in-world never came back, and lines it takes never reach the cms; remove the ViewChat \
             module from the viewer's Modules.json and close browser tabs on /static/ViewChat.html \
             (or the viewer was not in a region when the line was said)"
        );
    }

    /// Takes the own name `lookingglass::facts` last read (kept while its reads fail).
    fn note_own_name(&mut self) {
        self.own_name = self.deps.facts.own_name();
    }
}
