//! `opensim-chat-relay check`: probes both peers with the real configuration and says, one line per
//! check, what works and how to fix what does not; and `healthcheck`, the container probe of
//! `/healthz`. One file each: `report` (the lines and their text), `viewer` and `cms` (the probes; the viewer probe runs for each region's viewer),
//! `healthcheck` (the client of the relay's own endpoint).
//!
//! Must not: GET the viewer's chat URL (every GET drains the viewer's one chat queue, so a probe would
//! steal chat from the running relay), send HEAD or OPTIONS to the viewer (never answered), POST chat
//! to either peer, or print the password or the token. The one POST it sends is the CMS login
//! (`POST /auth/username/`): without a token nothing else of the CMS can be probed.

mod cms;
mod healthcheck;
mod report;
mod viewer;

use std::time::Duration;

use crate::config::Settings;

pub use cms::NEEDED_PERMISSIONS;
pub use healthcheck::{HealthcheckError, healthcheck};
pub use report::{CheckLine, CheckReport, Outcome};

/// How long a probe waits for an answer. The viewer never answers an unknown path, so a wrong
/// status or avatars URL shows up as this timeout.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs every check against the peers named in `settings` (already loaded and validated).
pub async fn run(settings: &Settings) -> CheckReport {
    let mut report = CheckReport::default();
    report.ok("config", "loaded and valid");
    for region in settings.regions() {
        if region.name.is_empty() {
            viewer::check_viewer(&region.viewer, &mut report).await;
            continue;
        }
        // Each region's viewer in turn, its lines saying which region they are about.
        let mut lines = CheckReport::default();
        viewer::check_viewer(&region.viewer, &mut lines).await;
        report.lines.extend(lines.lines.into_iter().map(|mut line| {
            line.detail = format!("region {:?}: {}", region.name, line.detail);
            line
        }));
    }
    cms::check_cms(settings, &mut report).await;
    report
}
