//! The task that knows whether the relay hears the region (issue 20, spec §10): every
//! `CHECK_INTERVAL` it reads the viewer's network counters and status, decides where the viewer is
//! (`lookingglass::presence`), tells `/readyz` (and through the same signal the region's in-world
//! speaker, which pauses), `/metrics` and the log (once when a stretch out of the region starts,
//! once when it ends), and stores what it learned in the outbox's cursors, so a
//! stretch is marked once across restarts. Without `viewer.status_url` only the outbox's gaps are
//! marked.
//!
//! This file owns the task, its check and the stretch out of the region. The rest is one concern a
//! file: `recovery` (the REST logout and login through `[viewer.login]`, with backoff and never past
//! the viewer's one logout, and what the operator is told to do), `markers` (the gap-marker lines:
//! a stretch out of the region, the outbox's gap notes once settled) and `hearing` (every
//! `HEARING_INTERVAL`, who in the region is beyond hearing range).
//!
//! Every request takes its turn at the client's gate. Must not read the chat URL, log a name from
//! the avatar list, or reach the login password (it holds a `lookingglass::ViewerLogin`, which only
//! the viewer client opens).

mod hearing;
mod markers;
mod recovery;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::lookingglass::facts::UNANSWERED_RETRY;
use crate::lookingglass::presence::{self, CommCounters, LinkMemory, Place, ViewerStatus};
use crate::lookingglass::{LookingGlassClient, ViewerError, ViewerLogin};
use crate::metrics::Stats;
use crate::outbox::{Cursor, Outbox, OutboxError};
use crate::zone::Zone;

use hearing::BeyondWatch;
pub use hearing::{BEYOND_HEARING_WARN_AFTER, HEARING_INTERVAL, hearing_picture};
use markers::relay_line;
pub use markers::{GAP_SETTLE, gap_marker, outbox_gap_markers};
use recovery::Recovery;
pub use recovery::{RECOVERY_FIRST, RECOVERY_MAX, STUCK_ADVICE, advice};

/// How often the viewer's counters and status are read: two small answers from memory, so a
/// stretch out of the region is noticed within seconds at a cost the viewer does not feel.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// The viewer's place until the first check, when it was out of its region as the relay stopped.
const RESTARTED_OUT: &str = "the viewer was out of its region when the relay last stopped; the next check of its status tells whether it is back";

/// What the task needs.
pub struct PresenceDeps {
    /// The viewer (its gate is shared with every other stage).
    pub viewer: LookingGlassClient,
    /// Where the memory and the markers go.
    pub outbox: Arc<Outbox>,
    /// Gauges, counters and the readiness signal.
    pub stats: Arc<Stats>,
    /// The region the viewer must be in (`viewer.region` or `viewer.login.region`).
    pub region: Option<String>,
    /// `[viewer.login]` with its password, when set.
    pub login: Option<ViewerLogin>,
    /// `viewer.hearing_range`, metres.
    pub hearing_range: f64,
    /// `cms.gap_markers`.
    pub gap_markers: bool,
    /// `cms.timezone`: the marker's times are written in it.
    pub cms_zone: Zone,
    /// The region's `[[regions]]` name: its cursors' keys and its markers' region (empty: the
    /// only region, today's keys).
    pub name: String,
    /// Which region's task writes the markers of the outbox's own losses (lines it dropped for its
    /// bounds, answers it could not read), which belong to no one region.
    pub outbox_gaps: OutboxGaps,
}

/// Who writes the markers of the outbox's own losses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxGaps {
    /// This task, naming its region (the only region).
    Here,
    /// This task, naming these regions (the first of several: `Welcome, Sandbox`).
    Of(String),
    /// Another region's task.
    Elsewhere,
}

/// The presence task.
pub struct Presence {
    deps: PresenceDeps,
    memory: Option<LinkMemory>,
    /// When the current stretch out of the region began (persisted).
    out_since: Option<DateTime<Utc>>,
    /// Where the viewer was at the last check, while out of its region.
    out_place: Option<Place>,
    /// Why the current stretch began, as this process first saw it (the marker's reason).
    stretch_place: Option<Place>,
    /// The last check that found the viewer in its region.
    last_in: Option<DateTime<Utc>>,
    /// The region the viewer was last seen in, for the marker when none is configured.
    seen_region: Option<String>,
    recovery: Recovery,
    counters_warned: bool,
    /// When the counters may be read again: a viewer that never answers them (another viewer
    /// than LookingGlass) costs a `SIDE_READ_LIMIT` at the gate, so it is asked rarely.
    next_counters: Instant,
    /// Likewise for the status (`facts` warns about a status URL that is not answered).
    next_status: Instant,
    next_hearing: Instant,
    beyond: BeyondWatch,
    last_status: ViewerStatus,
}

impl Presence {
    /// Builds the task, loading what the outbox remembers.
    pub fn new(deps: PresenceDeps) -> Result<Presence, OutboxError> {
        let outbox = &deps.outbox;
        let memory = match (
            outbox.cursor(Cursor::ViewerDisconnects.of(&deps.name))?,
            outbox.cursor(Cursor::ViewerConnects.of(&deps.name))?,
            outbox.cursor(Cursor::ViewerConnected.of(&deps.name))?,
        ) {
            (Some(disconnected), Some(simconnected), Some(connected)) => Some(LinkMemory {
                counters: CommCounters {
                    disconnected: disconnected.max(0) as u64,
                    simconnected: simconnected.max(0) as u64,
                },
                connected: connected == 1,
            }),
            _ => None,
        };
        let out_since = outbox
            .cursor(Cursor::ViewerOutSince.of(&deps.name))?
            .filter(|millis| *millis > 0)
            .and_then(DateTime::<Utc>::from_timestamp_millis);
        if out_since.is_some() && deps.viewer.status_url().is_some() {
            // Out when the relay stopped: so it stays until the first check says otherwise, and
            // in-world (which pauses on this) sends nothing to a viewer that does not hear it.
            deps.stats
                .readiness
                .viewer_place(Some(RESTARTED_OUT.to_owned()));
            deps.stats.viewer_out_of_region.store(1, Ordering::Relaxed);
        }
        Ok(Presence {
            deps,
            memory,
            out_since,
            out_place: None,
            stretch_place: None,
            last_in: None,
            seen_region: None,
            recovery: Recovery::default(),
            counters_warned: false,
            next_counters: Instant::now(),
            next_status: Instant::now(),
            next_hearing: Instant::now(),
            beyond: BeyondWatch::default(),
            last_status: ViewerStatus::default(),
        })
    }

    /// Checks every `CHECK_INTERVAL` until `stop`.
    pub async fn run_until_stopped(mut self, stop: CancellationToken) {
        while !stop.is_cancelled() {
            match self.try_check_once(&stop).await {
                Ok(_) | Err(PresenceError::Viewer(ViewerError::Stopping)) => {}
                // An unreachable viewer is the poller's to report.
                Err(PresenceError::Viewer(err)) => {
                    tracing::debug!(error = %err, "viewer presence check failed")
                }
                Err(PresenceError::Outbox(err)) => {
                    tracing::warn!(error = %err, "cannot store what the relay knows of the viewer's place; it tries again")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(CHECK_INTERVAL) => {}
            }
        }
    }

    /// One check: read, decide, tell, maybe recover, maybe mark a gap, maybe read the avatars.
    /// Returns the place decided.
    pub async fn try_check_once(
        &mut self,
        stop: &CancellationToken,
    ) -> Result<Place, PresenceError> {
        self.mark_settled_gaps().await?;
        if self.deps.viewer.status_url().is_none() {
            // Without the status neither a logout nor another region can be told.
            return Ok(Place::InRegion);
        }
        let now = Instant::now();
        if now < self.next_status {
            return Ok(self.out_place.clone().unwrap_or(Place::InRegion));
        }
        let counters = if now < self.next_counters {
            None
        } else {
            match self.deps.viewer.comm_counters(stop).await {
                Ok(counters) => Some(Ok(counters)),
                Err(err @ (ViewerError::Transport(_) | ViewerError::Stopping)) => {
                    return Err(err.into());
                }
                Err(err) => Some(Err(err)),
            }
        };
        // The status is read after the counters: a tie of the counters is decided by a status at
        // least as new as they are (a restart between the two reads would otherwise be judged by
        // a status from before it, and remembered as connected).
        let status = match self.deps.viewer.status(stop).await {
            Ok(status) => status.unwrap_or_default(),
            Err(err) => {
                if !matches!(err, ViewerError::Transport(_) | ViewerError::Stopping) {
                    self.next_status = now + UNANSWERED_RETRY;
                }
                return Err(err.into());
            }
        };
        // The counters' failure is told only when the status answers: a viewer that answers
        // neither (a wrong host, say) is the poller's to report.
        let counters = match counters {
            Some(Ok(counters)) => Some(counters),
            Some(Err(err)) => {
                self.next_counters = now + UNANSWERED_RETRY;
                if !std::mem::replace(&mut self.counters_warned, true) {
                    tracing::warn!(
                        url = self.deps.viewer.comm_stats_url().unwrap_or(""),
                        error = %err,
                        "the viewer's network counters cannot be read: a region restart that disconnects it cannot be noticed (only a logout or another region, from its status); tried again now and then"
                    );
                }
                None
            }
            None => None,
        };
        let connected = match counters {
            Some(counters) => presence::connected(self.memory, counters, &status),
            // Unread: the last verdict stands (none: the status alone judges).
            None => self.memory.is_none_or(|memory| memory.connected),
        };
        if let Some(counters) = counters {
            self.remember(counters, connected).await?;
        }
        let place = presence::place(connected, &status, self.deps.region.as_deref());
        if let Some(current) = &status.current_sim {
            self.seen_region = Some(presence::region_name(current).to_owned());
        }
        self.last_status = status;
        let now = Utc::now();
        if place.hears_region() {
            self.back_in(now).await?;
            self.last_in = Some(now);
            self.read_hearing(stop).await;
        } else {
            self.out(&place, now).await?;
            // Told before the recovery's requests too: in-world pauses on it (`inworld::speaker`),
            // and a recovery takes a few seconds of the gate.
            self.tell_readiness(&place);
            self.recover(&place, stop).await;
            self.tell_readiness(&place);
        }
        Ok(place)
    }

    /// Stores the counters and verdict when they changed.
    async fn remember(
        &mut self,
        counters: CommCounters,
        connected: bool,
    ) -> Result<(), OutboxError> {
        let memory = LinkMemory {
            counters,
            connected,
        };
        if self.memory == Some(memory) {
            return Ok(());
        }
        if self.memory.is_some_and(|old| {
            counters.disconnected < old.counters.disconnected
                || counters.simconnected < old.counters.simconnected
        }) {
            // The viewer process was restarted: a spent logout is fresh again.
            self.recovery = Recovery::default();
        }
        self.deps
            .outbox
            .set_cursors(&[
                (
                    Cursor::ViewerDisconnects.of(&self.deps.name),
                    counters.disconnected as i64,
                ),
                (
                    Cursor::ViewerConnects.of(&self.deps.name),
                    counters.simconnected as i64,
                ),
                (
                    Cursor::ViewerConnected.of(&self.deps.name),
                    i64::from(connected),
                ),
            ])
            .await?;
        self.memory = Some(memory);
        Ok(())
    }

    /// The viewer is out of its region: a new stretch is told and stored once; a change of why
    /// within the stretch (disconnected, then logged out by the recovery) is told at info.
    async fn out(&mut self, place: &Place, now: DateTime<Utc>) -> Result<(), OutboxError> {
        let stats = &self.deps.stats;
        stats.viewer_out_of_region.store(1, Ordering::Relaxed);
        stats.avatars_in_region.store(0, Ordering::Relaxed);
        stats.avatars_beyond_hearing.store(0, Ordering::Relaxed);
        if self.out_place.as_ref() == Some(place) {
            return Ok(());
        }
        if self.out_since.is_none() {
            let since = self.last_in.unwrap_or(now);
            self.deps
                .outbox
                .set_cursor(
                    Cursor::ViewerOutSince.of(&self.deps.name),
                    since.timestamp_millis(),
                )
                .await?;
            self.out_since = Some(since);
            Stats::add(&stats.viewer_out_of_region_stretches, 1);
        }
        let why = place.why_not().unwrap_or_default();
        match &self.stretch_place {
            // The first word of this process on the stretch (after a restart of the relay too).
            None => {
                tracing::warn!(
                    place = ?place,
                    "the viewer does not hear its region, so its chat is not recorded: {why}; {}",
                    self.what_to_do(place)
                );
                self.stretch_place = Some(place.clone());
            }
            Some(_) => {
                tracing::info!(place = ?place, "the viewer is still out of its region: {why}")
            }
        }
        self.out_place = Some(place.clone());
        Ok(())
    }

    /// The viewer hears its region: a stretch that was out ends, told once and marked once.
    async fn back_in(&mut self, now: DateTime<Utc>) -> Result<(), OutboxError> {
        let stats = &self.deps.stats;
        stats.viewer_out_of_region.store(0, Ordering::Relaxed);
        stats.readiness.viewer_place(None);
        self.out_place = None;
        let reason = self.stretch_place.take();
        self.recovery = Recovery::default();
        let Some(since) = self.out_since else {
            return Ok(());
        };
        let reason = reason
            .as_ref()
            .map_or("the viewer was out of its region", Place::marker_reason);
        tracing::info!(
            out_for = ?(now - since).to_std().unwrap_or_default(),
            "the viewer hears its region again ({reason} before)"
        );
        if self.deps.gap_markers {
            let message = gap_marker(self.region_label(), since, now, reason, self.deps.cms_zone);
            let line = relay_line(message, now, &self.deps.name);
            self.deps
                .outbox
                .append_and_set_cursor(&[line], Cursor::ViewerOutSince.of(&self.deps.name), 0)
                .await?;
            Stats::add(&stats.gap_markers, 1);
        } else {
            self.deps
                .outbox
                .set_cursor(Cursor::ViewerOutSince.of(&self.deps.name), 0)
                .await?;
        }
        self.out_since = None;
        Ok(())
    }

    fn region_label(&self) -> &str {
        self.deps
            .region
            .as_deref()
            .or(self.seen_region.as_deref())
            .unwrap_or("the region")
    }

    fn tell_readiness(&self, place: &Place) {
        let problem = format!(
            "{}; {}",
            place.why_not().unwrap_or_default(),
            self.what_to_do(place)
        );
        self.deps.stats.readiness.viewer_place(Some(problem));
    }
}

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    /// The viewer did not answer.
    #[error(transparent)]
    Viewer(#[from] ViewerError),
    /// The outbox could not store what was learned.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

#[cfg(test)]
pub(crate) mod tests;
