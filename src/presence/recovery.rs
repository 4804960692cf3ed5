//! The recovery: the viewer logged out and in again through its REST calls when `[viewer.login]`
//! is set and it is out of its region (not in another region: that is a teleport), with backoff
//! between attempts and never past the viewer's one logout (spec §10); and what the operator is
//! told to do about a stretch out of the region, given what the relay can do itself. Must not
//! reach the login password (`LookingGlassClient::login` builds and sends the login form) or try
//! again once the one logout is spent.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Presence;
use crate::lookingglass::presence::{Place, ViewerStatus};
use crate::lookingglass::{LookingGlassClient, ViewerError, ViewerLogin};
use crate::metrics::Stats;

/// The first wait between recovery attempts; it doubles up to `RECOVERY_MAX`.
pub const RECOVERY_FIRST: Duration = Duration::from_secs(5);

/// The longest wait between recovery attempts.
pub const RECOVERY_MAX: Duration = Duration::from_secs(300);

/// Where a recovery stands.
#[derive(Debug, Default)]
pub(super) struct Recovery {
    attempts: u32,
    next_at: Option<Instant>,
    /// The viewer cannot log out again (its one logout is spent): only a restart of its process
    /// brings it back.
    stuck: bool,
    /// The last refusal or failure, for `/readyz`.
    last_failure: Option<String>,
}

impl Presence {
    /// What the operator does about `place`, given what the relay can do itself.
    pub(super) fn what_to_do(&self, place: &Place) -> String {
        if self.recovery.stuck {
            return STUCK_ADVICE.to_owned();
        }
        let mut text = advice(place, self.region_label(), self.deps.login.is_some());
        if let Some(failure) = &self.recovery.last_failure {
            text.push_str(&format!("; the last attempt: {failure}"));
        }
        text
    }

    /// Logs the viewer out and in again when `[viewer.login]` is set and it is due.
    pub(super) async fn recover(&mut self, place: &Place, stop: &CancellationToken) {
        let Some(login) = &self.deps.login else {
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
        let outcome = recover_once(&self.deps.viewer, &self.last_status, login, stop).await;
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
    login: &ViewerLogin,
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
    Ok(match viewer.login(login, stop).await? {
        Ok(()) => Recovered::LoggedIn,
        Err(message) => Recovered::Refused(message),
    })
}
