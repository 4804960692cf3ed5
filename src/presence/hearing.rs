//! The hearing picture: every `HEARING_INTERVAL`, while the viewer hears its region, who in the
//! region is within the viewer's hearing range and who is beyond it (the gauges), and a warning
//! once avatars have stayed beyond it for `BEYOND_HEARING_WARN_AFTER`. Must not log a name from
//! the avatar list, or read it while the viewer is out of its region.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Presence;
use crate::config::ViewerLoginSettings;
use crate::lookingglass::ViewerLogin;
use crate::lookingglass::presence::{self, Hearing, ViewerStatus};

/// How often the avatar list is read for the hearing picture.
pub const HEARING_INTERVAL: Duration = Duration::from_secs(30);

/// How long avatars may stay beyond hearing before the log warns (once per stretch).
pub const BEYOND_HEARING_WARN_AFTER: Duration = Duration::from_secs(600);

impl Presence {
    /// Reads the avatar list when due and sets the hearing gauges; warns once when avatars stay
    /// beyond hearing for `BEYOND_HEARING_WARN_AFTER`.
    pub(super) async fn read_hearing(&mut self, stop: &CancellationToken) {
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
            self.deps.login.as_ref().map(ViewerLogin::settings),
            self.deps.region.as_deref().or(self.seen_region.as_deref()),
            self.deps.hearing_range,
        )
    }
}

/// Whether avatars have stayed beyond hearing for `BEYOND_HEARING_WARN_AFTER` (once per stretch
/// with some beyond; a reading with none beyond ends the stretch).
#[derive(Debug, Default)]
pub(super) struct BeyondWatch {
    since: Option<Instant>,
    warned: bool,
}

impl BeyondWatch {
    /// Notes a reading of `n_beyond` at `now`; true when the warning is due now.
    pub(super) fn warn_now(&mut self, n_beyond: usize, now: Instant) -> bool {
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
