//! The task that knows whether the relay hears the region (issue 20, spec §10): every
//! `CHECK_INTERVAL` it reads the viewer's network counters and status, decides where the viewer is
//! (`lookingglass::presence`), tells `/readyz`, `/metrics` and the log (once when a stretch out of
//! the region starts, once when it ends), brings the viewer back through its REST logout and login
//! when `[viewer.login]` is set (with backoff, and never past the viewer's one logout), writes one
//! gap marker for each stretch into the outbox (`cms.gap_markers`) and one for the losses the
//! outbox noted (lines dropped by its bounds, answers quarantined unread) once they settle, and
//! every `HEARING_INTERVAL` works out who in the region is beyond hearing range. Without
//! `viewer.status_url` only the outbox's gaps are marked.
//!
//! Every request takes its turn at the client's gate. What it remembers across restarts (the last
//! counters and verdict, when the current stretch began) lives in the outbox's cursors, so a
//! stretch is marked once. Must not read the chat URL, log a name from the avatar list, or log the
//! login password.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::config::ViewerLoginSettings;
use crate::lookingglass::facts::UNANSWERED_RETRY;
use crate::lookingglass::presence::{self, CommCounters, Hearing, LinkMemory, Place, ViewerStatus};
use crate::lookingglass::{LookingGlassClient, ViewerError};
use crate::metrics::Stats;
use crate::model::{CapturedLine, LineSource};
use crate::outbox::{Cursor, GapKind, GapNote, Outbox, OutboxError};
use crate::zone::Zone;

/// How often the viewer's counters and status are read: two small answers from memory, so a
/// stretch out of the region is noticed within seconds at a cost the viewer does not feel.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// How often the avatar list is read for the hearing picture.
pub const HEARING_INTERVAL: Duration = Duration::from_secs(30);

/// How long avatars may stay beyond hearing before the log warns (once per stretch).
pub const BEYOND_HEARING_WARN_AFTER: Duration = Duration::from_secs(600);

/// The first wait between recovery attempts; it doubles up to `RECOVERY_MAX`.
pub const RECOVERY_FIRST: Duration = Duration::from_secs(5);

/// The longest wait between recovery attempts.
pub const RECOVERY_MAX: Duration = Duration::from_secs(300);

/// How long the outbox's gap notes must have stopped coming before their markers are written: a
/// CMS outage that makes the outbox drop lines at every poll gets one marker when it ends, not one
/// a poll.
pub const GAP_SETTLE: Duration = Duration::from_secs(10);

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
    /// `[viewer.login]` and its password, when set.
    pub login: Option<(ViewerLoginSettings, SecretString)>,
    /// `viewer.hearing_range`, metres.
    pub hearing_range: f64,
    /// `cms.gap_markers`.
    pub gap_markers: bool,
    /// `cms.timezone`: the marker's times are written in it.
    pub cms_zone: Zone,
}

/// Where a recovery stands.
#[derive(Debug, Default)]
struct Recovery {
    attempts: u32,
    next_at: Option<Instant>,
    /// The viewer cannot log out again (its one logout is spent): only a restart of its process
    /// brings it back.
    stuck: bool,
    /// The last refusal or failure, for `/readyz`.
    last_failure: Option<String>,
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
            outbox.cursor(Cursor::ViewerDisconnects)?,
            outbox.cursor(Cursor::ViewerConnects)?,
            outbox.cursor(Cursor::ViewerConnected)?,
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
            .cursor(Cursor::ViewerOutSince)?
            .filter(|millis| *millis > 0)
            .and_then(DateTime::<Utc>::from_timestamp_millis);
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
        let status = match self.deps.viewer.status(stop).await {
            Ok(status) => status.unwrap_or_default(),
            Err(err) => {
                if !matches!(err, ViewerError::Transport(_) | ViewerError::Stopping) {
                    self.next_status = now + UNANSWERED_RETRY;
                }
                return Err(err.into());
            }
        };
        let counters = if now < self.next_counters {
            None
        } else {
            match self.deps.viewer.comm_counters(stop).await {
                Ok(counters) => Some(counters),
                Err(err @ (ViewerError::Transport(_) | ViewerError::Stopping)) => {
                    return Err(err.into());
                }
                Err(err) => {
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
            }
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
                (Cursor::ViewerDisconnects, counters.disconnected as i64),
                (Cursor::ViewerConnects, counters.simconnected as i64),
                (Cursor::ViewerConnected, i64::from(connected)),
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
                .set_cursor(Cursor::ViewerOutSince, since.timestamp_millis())
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
            let line = relay_line(message, now);
            self.deps
                .outbox
                .append_and_set_cursor(&[line], Cursor::ViewerOutSince, 0)
                .await?;
            Stats::add(&stats.gap_markers, 1);
        } else {
            self.deps
                .outbox
                .set_cursor(Cursor::ViewerOutSince, 0)
                .await?;
        }
        self.out_since = None;
        Ok(())
    }

    /// Writes one marker per kind of loss for the outbox's gap notes once they have settled, and
    /// removes the notes in the same flush.
    async fn mark_settled_gaps(&mut self) -> Result<(), OutboxError> {
        let notes = self.deps.outbox.pending_gaps()?;
        let Some(newest) = notes.iter().map(|note| note.noted_at).max() else {
            return Ok(());
        };
        let now = Utc::now();
        if (now - newest).to_std().unwrap_or_default() < GAP_SETTLE {
            return Ok(());
        }
        let markers: Vec<CapturedLine> = if self.deps.gap_markers {
            outbox_gap_markers(&notes, self.region_label(), self.deps.cms_zone)
                .into_iter()
                .map(|message| relay_line(message, now))
                .collect()
        } else {
            Vec::new()
        };
        self.deps.outbox.mark_gaps(&markers, notes.len()).await?;
        if !markers.is_empty() {
            Stats::add(&self.deps.stats.gap_markers, markers.len() as u64);
            tracing::info!(
                n_markers = markers.len(),
                "gap markers written for lines the outbox dropped or could not read"
            );
        }
        Ok(())
    }

    fn region_label(&self) -> &str {
        self.deps
            .region
            .as_deref()
            .or(self.seen_region.as_deref())
            .unwrap_or("the region")
    }

    /// What the operator does about `place`, given what the relay can do itself.
    fn what_to_do(&self, place: &Place) -> String {
        if self.recovery.stuck {
            return STUCK_ADVICE.to_owned();
        }
        let mut text = advice(place, self.region_label(), self.deps.login.is_some());
        if let Some(failure) = &self.recovery.last_failure {
            text.push_str(&format!("; the last attempt: {failure}"));
        }
        text
    }

    fn tell_readiness(&self, place: &Place) {
        let problem = format!(
            "{}; {}",
            place.why_not().unwrap_or_default(),
            self.what_to_do(place)
        );
        self.deps.stats.readiness.viewer_place(Some(problem));
    }

    /// Logs the viewer out and in again when `[viewer.login]` is set and it is due.
    async fn recover(&mut self, place: &Place, stop: &CancellationToken) {
        let Some((login, password)) = &self.deps.login else {
            return;
        };
        if matches!(place, Place::OtherRegion(_)) || self.recovery.stuck {
            return;
        }
        let now = Instant::now();
        if self.recovery.next_at.is_some_and(|at| now < at) {
            return;
        }
        self.recovery.attempts += 1;
        let exponent = self.recovery.attempts.saturating_sub(1).min(16);
        let wait = RECOVERY_FIRST
            .saturating_mul(1 << exponent)
            .min(RECOVERY_MAX);
        self.recovery.next_at = Some(now + wait);
        let outcome = recover_once(
            &self.deps.viewer,
            &self.last_status,
            login.form(password),
            stop,
        )
        .await;
        match outcome {
            Ok(Recovered::LoggedIn) => {
                Stats::add(&self.deps.stats.viewer_logins, 1);
                self.recovery.last_failure = None;
                tracing::info!(
                    attempt = self.recovery.attempts,
                    "logged the viewer out and in again; the next check tells whether it hears its region"
                );
            }
            Ok(Recovered::Stuck) => {
                self.recovery.stuck = true;
                tracing::error!("{STUCK_ADVICE} (the relay stops trying)");
            }
            Ok(Recovered::Refused(message)) => {
                tracing::warn!(attempt = self.recovery.attempts, ?wait, refusal = %message, "the viewer refused the login; the relay tries again");
                self.recovery.last_failure =
                    Some(format!("the viewer refused the login: {message}"));
            }
            Err(ViewerError::Stopping) => {}
            Err(err) => {
                tracing::warn!(attempt = self.recovery.attempts, ?wait, error = %err, "the viewer's REST login failed; the relay tries again");
                self.recovery.last_failure = Some(err.to_string());
            }
        }
    }

    /// Reads the avatar list when due and sets the hearing gauges; warns once when avatars stay
    /// beyond hearing for `BEYOND_HEARING_WARN_AFTER`.
    async fn read_hearing(&mut self, stop: &CancellationToken) {
        let now = Instant::now();
        if now < self.next_hearing {
            return;
        }
        self.next_hearing = now + HEARING_INTERVAL;
        let avatars = match self.deps.viewer.seen_avatars(stop).await {
            Ok(Some(avatars)) => avatars,
            Ok(None) | Err(_) => return,
        };
        let picture = self.hearing_from(&avatars);
        let stats = &self.deps.stats;
        stats
            .avatars_in_region
            .store(picture.in_region as u64, Ordering::Relaxed);
        stats
            .avatars_beyond_hearing
            .store(picture.beyond as u64, Ordering::Relaxed);
        if self.beyond.warn_now(picture.beyond, now) {
            tracing::warn!(
                n_beyond = picture.beyond,
                n_in_region = picture.in_region,
                hearing_range_m = self.deps.hearing_range,
                "avatars in the region have stayed beyond the viewer's hearing range for {} min: what they say is not recorded; move the viewer's avatar nearer (viewer.login.start_position) or see docs/OPERATIONS.md on chat ranges",
                BEYOND_HEARING_WARN_AFTER.as_secs() / 60
            );
        }
    }

    fn hearing_from(&self, avatars: &[presence::SeenAvatar]) -> Hearing {
        hearing_picture(
            avatars,
            &self.last_status,
            self.deps.login.as_ref().map(|(login, _)| login),
            self.deps.region.as_deref().or(self.seen_region.as_deref()),
            self.deps.hearing_range,
        )
    }
}

/// Whether avatars have stayed beyond hearing for `BEYOND_HEARING_WARN_AFTER` (once per stretch
/// with some beyond; a reading with none beyond ends the stretch).
#[derive(Debug, Default)]
struct BeyondWatch {
    since: Option<Instant>,
    warned: bool,
}

impl BeyondWatch {
    /// Notes a reading of `n_beyond` at `now`; true when the warning is due now.
    fn warn_now(&mut self, n_beyond: usize, now: Instant) -> bool {
        if n_beyond == 0 {
            *self = BeyondWatch::default();
            return false;
        }
        let since = *self.since.get_or_insert(now);
        if self.warned || now.duration_since(since) < BEYOND_HEARING_WARN_AFTER {
            return false;
        }
        self.warned = true;
        true
    }
}

/// The hearing picture from the avatar list and the status, the viewer's own position taken from
/// the status or else the configured start position (shared with `check`).
pub fn hearing_picture(
    avatars: &[presence::SeenAvatar],
    status: &ViewerStatus,
    login: Option<&ViewerLoginSettings>,
    region: Option<&str>,
    range: f64,
) -> Hearing {
    let own_position = status
        .position
        .or_else(|| login.and_then(ViewerLoginSettings::start_position));
    let own_name = status
        .own_name
        .clone()
        .or_else(|| login.map(|login| format!("{} {}", login.first.trim(), login.last.trim())));
    presence::hearing(avatars, own_name.as_deref(), own_position, region, range)
}

/// What to do when the viewer's one logout is spent.
pub const STUCK_ADVICE: &str = "the viewer cannot log out again (LookingGlass logs out only once per process): restart the viewer process, and it logs in at its start; the relay goes on by itself once it hears the region";

/// What the operator does about `place` (shared with `check`): by hand, or nothing while
/// `[viewer.login]` lets the relay bring the viewer back.
pub fn advice(place: &Place, region: &str, has_login: bool) -> String {
    match (place, has_login) {
        (Place::InRegion, _) => String::new(),
        (Place::OtherRegion(_), _) => format!(
            "teleport the viewer's avatar back to {region} (POST /api/LLLP/connect/teleport, or in the viewer's window)"
        ),
        (_, true) => "the relay logs the viewer out and in again ([viewer.login]), with backoff".to_owned(),
        (Place::Disconnected, false) => "log the viewer out and in again by hand (POST /api/LLLP/connect/logout, then /api/LLLP/connect/login, or in the viewer's window), or set [viewer.login] for the relay to do it; if the viewer already logged out once since it started, restart the viewer process instead (it logs out only once)".to_owned(),
        (Place::LoggedOut(_), false) => "log the viewer in by hand (POST /api/LLLP/connect/login, or in the viewer's window), or set [viewer.login] for the relay to do it".to_owned(),
    }
}

/// Status reads after a logout before it counts as not taken (the one-logout limit).
const LOGOUT_READS: u32 = 3;

/// The pause between those reads.
const LOGOUT_READ_GAP: Duration = Duration::from_secs(1);

/// How one recovery attempt ended.
#[derive(Debug, PartialEq, Eq)]
enum Recovered {
    LoggedIn,
    /// The logout changed nothing: the viewer's one logout is spent.
    Stuck,
    Refused(String),
}

/// Logs out (when the viewer still thinks it is logged in), checks the logout took, then logs in.
async fn recover_once(
    viewer: &LookingGlassClient,
    status: &ViewerStatus,
    form: Vec<(&'static str, String)>,
    stop: &CancellationToken,
) -> Result<Recovered, ViewerError> {
    if status
        .login_state
        .as_deref()
        .is_none_or(|state| state == "login")
    {
        if let Err(message) = viewer.connect("logout", &[], stop).await? {
            return Ok(Recovered::Refused(format!("logout: {message}")));
        }
        // The viewer answers the logout before it has acted on it: its status is given a few
        // reads to leave `login` (spec §10: it says `loggingout` at once on a real region).
        let mut took = false;
        for _ in 0..LOGOUT_READS {
            let after = viewer.status(stop).await?.unwrap_or_default();
            if after.login_state.as_deref() != Some("login") {
                took = true;
                break;
            }
            tokio::time::sleep(LOGOUT_READ_GAP).await;
        }
        if !took {
            return Ok(Recovered::Stuck);
        }
    }
    let form: Vec<(&str, &str)> = form
        .iter()
        .map(|(key, value)| (*key, value.as_str()))
        .collect();
    Ok(match viewer.connect("login", &form, stop).await? {
        Ok(()) => Recovered::LoggedIn,
        Err(message) => Recovered::Refused(message),
    })
}

/// A line of the relay's own, said by no one: delivery stores it anonymously, as it is.
fn relay_line(message: String, at: DateTime<Utc>) -> CapturedLine {
    CapturedLine {
        source: LineSource::Relay,
        speaker: String::new(),
        owner_id: None,
        message,
        spoken_at: at,
        captured_at: at,
    }
}

/// The marker line: what, where, between which times (wall clock in `zone`; with the date when
/// the two fall on different days) and why; never a missed line's text or speaker.
pub fn gap_marker(
    region: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    why: &str,
    zone: Zone,
) -> String {
    let (from, to) = wall_clock_pair(from, to, zone);
    format!("[relay] chat in {region} was not recorded between {from} and {to}: {why}")
}

/// The markers for the outbox's gap notes: one per kind, spanning its notes, in the order the
/// kinds first occur.
pub fn outbox_gap_markers(notes: &[GapNote], region: &str, zone: Zone) -> Vec<String> {
    let mut spans: Vec<(GapKind, DateTime<Utc>, DateTime<Utc>, u64)> = Vec::new();
    for note in notes {
        match spans.iter_mut().find(|(kind, ..)| *kind == note.kind) {
            Some((_, from, to, n)) => {
                *from = (*from).min(note.from);
                *to = (*to).max(note.to);
                *n += note.n;
            }
            None => spans.push((note.kind, note.from, note.to, note.n)),
        }
    }
    spans
        .into_iter()
        .map(|(kind, from, to, n)| {
            let (from, to) = wall_clock_pair(from, to, zone);
            let lines = if n == 1 {
                "1 line".to_owned()
            } else {
                format!("{n} lines")
            };
            let were = if n == 1 { "was" } else { "were" };
            match kind {
                GapKind::DroppedForSpace => format!(
                    "[relay] {lines} of chat in {region} said between {from} and {to} {were} not recorded: the relay's outbox was full (outbox.max_bytes) while the CMS did not take them"
                ),
                GapKind::DroppedForAge => format!(
                    "[relay] {lines} of chat in {region} said between {from} and {to} {were} not recorded: they waited longer than outbox.max_age for the CMS"
                ),
                // The lines of the answer before the point where it broke are relayed: "some".
                GapKind::Unreadable if n == 1 => format!(
                    "[relay] some chat in {region} received at {to} was not recorded: the viewer's answer could not be read whole (kept in the outbox quarantine)"
                ),
                GapKind::Unreadable => format!(
                    "[relay] some chat in {region} received between {from} and {to} was not recorded: {n} viewer answers could not be read whole (kept in the outbox quarantine)"
                ),
            }
        })
        .collect()
}

/// Two instants as wall-clock times in `zone`: `HH:MM:SS`, with the date when they fall on
/// different days.
fn wall_clock_pair(from: DateTime<Utc>, to: DateTime<Utc>, zone: Zone) -> (String, String) {
    let (from, to) = (zone.wall_clock(from), zone.wall_clock(to));
    let format = if from.date() == to.date() {
        "%H:%M:%S"
    } else {
        "%Y-%m-%d %H:%M:%S"
    };
    (
        from.format(format).to_string(),
        to.format(format).to_string(),
    )
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
mod tests {
    use super::*;
    use crate::lookingglass::ViewerEndpoint;
    use crate::sim::lookingglass::{Connection, Dialect, ViewerSim, ViewerSimSettings};

    /// The task against the simulated viewer, driven one check at a time.
    struct Rig {
        sim: ViewerSim,
        outbox: Arc<Outbox>,
        stats: Arc<Stats>,
        presence: Presence,
        _dir: tempfile::TempDir,
    }

    async fn rig(with_login: bool) -> Rig {
        let sim = ViewerSim::start(ViewerSimSettings {
            listen: "127.0.0.1:0".parse().expect("address"),
            dialect: Dialect::Lookingglass,
            timezone: chrono_tz::UTC,
            own_name: "Relay Bot".to_owned(),
            crash_on_abort: true,
        })
        .await
        .expect("viewer simulator");
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Arc::new(Outbox::open(dir.path(), 1 << 20).expect("outbox"));
        let stats = Arc::new(Stats::default());
        let viewer = LookingGlassClient::new(ViewerEndpoint {
            chat_url: sim.chat_url(),
            avatars_url: Some(sim.avatars_url()),
            status_url: Some(sim.status_url()),
            inactivity: Duration::from_secs(30),
            max_response_bytes: 1 << 20,
        })
        .expect("client");
        let login = with_login.then(|| {
            let settings = ViewerLoginSettings {
                first: "Relay".to_owned(),
                last: "Bot".to_owned(),
                password_file: None,
                grid: "OSGrid".to_owned(),
                region: "Sim".to_owned(),
                start_position: "128/128/25".to_owned(),
            };
            (settings, SecretString::from("pw".to_owned()))
        });
        let presence = Presence::new(PresenceDeps {
            viewer,
            outbox: outbox.clone(),
            stats: stats.clone(),
            region: Some("Sim".to_owned()),
            login,
            hearing_range: 20.0,
            gap_markers: true,
            cms_zone: Zone::Named(chrono_tz::UTC),
        })
        .expect("presence");
        Rig {
            sim,
            outbox,
            stats,
            presence,
            _dir: dir,
        }
    }

    async fn check(presence: &mut Presence) -> Place {
        let stop = CancellationToken::new();
        presence.try_check_once(&stop).await.expect("checked")
    }

    fn texts(outbox: &Outbox) -> Vec<String> {
        outbox
            .oldest(100)
            .expect("read")
            .into_iter()
            .map(|line| line.line.message)
            .collect()
    }

    #[tokio::test]
    async fn a_restart_is_recovered_and_marked_and_a_second_one_asks_for_a_viewer_restart_once() {
        let mut rig = rig(true).await;
        let handle = rig.sim.handle();
        assert_eq!(check(&mut rig.presence).await, Place::InRegion);

        handle.restart_region();
        assert_eq!(check(&mut rig.presence).await, Place::Disconnected);
        assert_eq!(
            handle.connection(),
            Connection::Connected,
            "logged in again at once"
        );
        assert_eq!(rig.stats.viewer_out_of_region.load(Ordering::Relaxed), 1);
        assert_eq!(check(&mut rig.presence).await, Place::InRegion);
        let markers = texts(&rig.outbox);
        assert_eq!(markers.len(), 1, "{markers:?}");
        assert!(
            markers[0].ends_with(": the region restarted"),
            "{markers:?}"
        );
        assert_eq!(rig.stats.readiness.viewer_place_problem(), None);

        handle.restart_region();
        assert_eq!(check(&mut rig.presence).await, Place::Disconnected);
        let problem = rig
            .stats
            .readiness
            .viewer_place_problem()
            .expect("a problem");
        assert!(problem.contains("restart the viewer process"), "{problem}");
        let n_requests = handle.requests().len();
        assert_eq!(check(&mut rig.presence).await, Place::Disconnected);
        let posts: Vec<_> = handle.requests()[n_requests..]
            .iter()
            .filter(|(method, _)| method == "POST")
            .cloned()
            .collect();
        assert!(posts.is_empty(), "no further attempt: {posts:?}");
        assert_eq!(handle.n_logouts(), 1);
        assert_eq!(handle.n_aborted(), 0);
    }

    #[tokio::test]
    async fn without_a_login_nothing_is_posted_and_the_memory_outlives_the_task() {
        let mut rig = rig(false).await;
        let handle = rig.sim.handle();
        let stop = CancellationToken::new();
        assert_eq!(
            rig.presence.try_check_once(&stop).await.expect("checked"),
            Place::InRegion
        );
        handle.restart_region();
        assert_eq!(
            rig.presence.try_check_once(&stop).await.expect("checked"),
            Place::Disconnected
        );
        // A new task (a relay restart) remembers the verdict: 1 and 1 is still out.
        let Rig { presence, .. } = rig;
        let deps = presence.deps;
        let mut again = Presence::new(deps).expect("presence");
        assert_eq!(
            again.try_check_once(&stop).await.expect("checked"),
            Place::Disconnected
        );
        assert!(!handle.requests().iter().any(|(method, _)| method == "POST"));
    }

    #[test]
    fn avatars_beyond_hearing_are_warned_about_once_after_ten_minutes_of_it() {
        let mut watch = BeyondWatch::default();
        let start = Instant::now();
        let at = |minutes: u64| start + Duration::from_secs(60 * minutes);
        let readings = [(0, 2), (5, 1), (10, 1), (15, 3), (16, 0), (17, 1), (27, 1)];
        let warned: Vec<bool> = readings
            .iter()
            .map(|(minute, n_beyond)| watch.warn_now(*n_beyond, at(*minute)))
            .collect();
        assert_eq!(warned, [false, false, true, false, false, false, true]);
    }

    #[test]
    fn a_marker_says_what_where_when_and_why_in_the_cms_zone() {
        let from = DateTime::parse_from_rfc3339("2026-12-07T02:00:12Z")
            .expect("time")
            .with_timezone(&Utc);
        let to = DateTime::parse_from_rfc3339("2026-12-07T02:04:40Z")
            .expect("time")
            .with_timezone(&Utc);
        let zone = Zone::Named(chrono_tz::Europe::Amsterdam);
        assert_eq!(
            gap_marker("Welcome", from, to, "the region restarted", zone),
            "[relay] chat in Welcome was not recorded between 03:00:12 and 03:04:40: the region restarted"
        );
        let next_day = to + chrono::Duration::hours(22);
        assert_eq!(
            gap_marker("Welcome", from, next_day, "the viewer was logged out", zone),
            "[relay] chat in Welcome was not recorded between 2026-12-07 03:00:12 and 2026-12-08 01:04:40: the viewer was logged out"
        );
    }

    #[test]
    fn the_outbox_notes_make_one_marker_per_kind_spanning_its_notes() {
        let at = |text: &str| {
            DateTime::parse_from_rfc3339(text)
                .expect("time")
                .with_timezone(&Utc)
        };
        let note = |kind, from: &str, to: &str, n| GapNote {
            kind,
            from: at(from),
            to: at(to),
            n,
            noted_at: at(to),
        };
        let notes = [
            note(
                GapKind::DroppedForAge,
                "2026-12-07T02:00:00Z",
                "2026-12-07T02:00:05Z",
                2,
            ),
            note(
                GapKind::Unreadable,
                "2026-12-07T02:01:00Z",
                "2026-12-07T02:01:00Z",
                1,
            ),
            note(
                GapKind::DroppedForAge,
                "2026-12-07T01:59:00Z",
                "2026-12-07T02:03:00Z",
                1,
            ),
        ];
        let zone = Zone::Named(chrono_tz::UTC);
        assert_eq!(
            outbox_gap_markers(&notes, "Welcome", zone),
            [
                "[relay] 3 lines of chat in Welcome said between 01:59:00 and 02:03:00 were not recorded: they waited longer than outbox.max_age for the CMS",
                "[relay] some chat in Welcome received at 02:01:00 was not recorded: the viewer's answer could not be read whole (kept in the outbox quarantine)",
            ]
        );
        let one = [note(
            GapKind::DroppedForSpace,
            "2026-12-07T02:00:00Z",
            "2026-12-07T02:00:00Z",
            1,
        )];
        assert_eq!(
            outbox_gap_markers(&one, "Welcome", zone),
            [
                "[relay] 1 line of chat in Welcome said between 02:00:00 and 02:00:00 was not recorded: the relay's outbox was full (outbox.max_bytes) while the CMS did not take them"
            ]
        );
    }
}
