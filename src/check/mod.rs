//! `opensim-chat-relay check`: probes both peers with the real configuration and says, one line per
//! check, what works and how to fix what does not; and `healthcheck`, the container probe of
//! `/healthz`. One file each: `report` (the lines and their text), `viewer` and `cms` (the probes),
//! `healthcheck` (the client of the relay's own endpoint). With `[[regions]]` each region's viewer
//! is probed, its lines naming the region.
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
    match settings.regions() {
        // Without [[regions]]: [viewer] is the only region's viewer, as always.
        [only] if only.name.is_empty() => viewer::check_viewer(settings, &mut report).await,
        // Each region's viewer in turn, probed as the only one of a configuration; its lines name
        // the region. [viewer] itself is only the defaults the regions share.
        regions => {
            for region in regions {
                let mut one = settings.clone();
                one.viewer = region.viewer.clone();
                let mut lines = CheckReport::default();
                viewer::check_viewer(&one, &mut lines).await;
                report.absorb(lines, &region.name);
            }
        }
    }
    cms::check_cms(settings, &mut report).await;
    report
}
