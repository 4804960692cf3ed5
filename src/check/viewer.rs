//! The viewer probe of `check`: the status and avatars URLs with a real GET each, where the viewer
//! is and whom it can hear (its network counters, status and avatar list), and the chat URL only by
//! its host and port (the probes above on the same origin, or a TCP connection).
//!
//! Must not: GET the chat URL (every GET drains the viewer's one chat queue, so a probe would steal
//! chat from the running relay), send HEAD or OPTIONS (never answered), or POST to the viewer.

use crate::check::PROBE_TIMEOUT;
use crate::check::report::{CheckReport, Outcome};
use crate::config::ViewerSettings;
use crate::lookingglass::presence::{self, Place, ViewerStatus};
use crate::lookingglass::{LookingGlassClient, ViewerEndpoint, ViewerError};

/// Probes the viewer `viewer` (`[viewer]`, or one `[[regions]]` entry's).
pub(super) async fn check_viewer(viewer: &ViewerSettings, report: &mut CheckReport) {
    let client = match LookingGlassClient::new(ViewerEndpoint {
        chat_url: viewer.chat_url.clone(),
        avatars_url: viewer.avatars_url.clone(),
        status_url: viewer.status_url.clone(),
        inactivity: PROBE_TIMEOUT,
        max_response_bytes: viewer.max_response_bytes,
    }) {
        Ok(client) => client,
        Err(err) => {
            report.fail(
                "viewer",
                format!("cannot build an HTTP client: {err}"),
                "this is a bug or a broken TLS setup; report it",
            );
            return;
        }
    };
    let chat_origin = host_port(&viewer.chat_url);
    // Whether a probe reached the chat URL's host and port and the viewer accepted the Host header.
    let mut origin_answered = None;
    // check is never stopped half-way: nothing cancels this.
    let stop = tokio_util::sync::CancellationToken::new();
    if let Some(url) = &viewer.status_url {
        match client.own_name(&stop).await {
            Ok(Some(name)) => {
                report.ok(
                    "viewer.status",
                    format!("{url} answers; the viewer is logged in as {name:?} (its own lines are not relayed)"),
                );
            }
            Ok(None) => report.warn(
                "viewer.status",
                format!("{url} answers, but the viewer is not logged in to a region"),
                "log the viewer's avatar in; until then there is no chat to relay",
            ),
            Err(err) => fail_viewer(report, "viewer.status", url, &err),
        }
        note_origin(
            report,
            "viewer.status",
            url,
            &chat_origin,
            &mut origin_answered,
        );
    }
    if let Some(url) = &viewer.avatars_url {
        match client.avatars(&stop).await {
            Ok(avatars) => report.ok(
                "viewer.avatars",
                format!("{url} answers; {} avatars in view", avatars.len()),
            ),
            Err(err) => fail_viewer(report, "viewer.avatars", url, &err),
        }
        note_origin(
            report,
            "viewer.avatars",
            url,
            &chat_origin,
            &mut origin_answered,
        );
    }
    if viewer.status_url.is_some()
        && report
            .line("viewer.status")
            .is_some_and(|line| line.outcome != Outcome::Fail)
    {
        check_place(viewer, &client, &stop, report).await;
    }
    let not_fetched = format!(
        "{} not fetched: every GET drains the viewer's one chat queue, so a probe would take chat away from the running relay",
        viewer.chat_url
    );
    match origin_answered {
        Some(true) => report.ok(
            "viewer.chat",
            format!(
                "{not_fetched}; its host and port answered the probes above with the Host header accepted"
            ),
        ),
        Some(false) => report.fail(
            "viewer.chat",
            format!("{not_fetched}; its host and port failed the probes above"),
            "fix the viewer failures above: the chat URL shares their host and port",
        ),
        None => chat_by_tcp(&viewer.chat_url, &not_fetched, report).await,
    }
}

/// Where the viewer is (`viewer.region`) and whom it can hear (`viewer.hearing`), from its network
/// counters, status and avatar list. `check` has not the running relay's memory of the counters
/// (it lives in the outbox), so a tie it cannot decide is a warning that points at `/readyz`.
async fn check_place(
    viewer: &ViewerSettings,
    client: &LookingGlassClient,
    stop: &tokio_util::sync::CancellationToken,
    report: &mut CheckReport,
) {
    let Ok(Some(status)) = client.status(stop).await else {
        return;
    };
    let counters = client.comm_counters(stop).await;
    let region = viewer.expected_region();
    let region_label = region
        .map(str::to_owned)
        .or_else(|| {
            status
                .current_sim
                .as_deref()
                .map(|sim| presence::region_name(sim).to_owned())
        })
        .unwrap_or_else(|| "the region".to_owned());
    let has_login = viewer.login.is_some();
    let connected = match &counters {
        Ok(counters) => {
            // One restart disconnects the viewer for good, so a second disconnect means a logout
            // (and maybe a login) happened: only then can a tie be either way (spec §10: 2 and 2
            // while chat flows after a recovery).
            let tie = counters.disconnected >= 2
                && counters.disconnected >= counters.simconnected
                && status.current_sim.is_none();
            if tie && status.login_state.as_deref() == Some("login") {
                report.warn(
                    "viewer.region",
                    format!(
                        "the viewer's network counters show {} disconnects against {} connects and its status names no region: either a region restart disconnected it, or it was logged in again through REST since",
                        counters.disconnected, counters.simconnected
                    ),
                    format!(
                        "the running relay remembers which: see /readyz (its viewer check); if it is disconnected, {}",
                        crate::presence::advice(&Place::Disconnected, &region_label, has_login)
                    ),
                );
                check_hearing(viewer, client, &status, region, stop, report).await;
                return;
            }
            presence::connected(None, *counters, &status)
        }
        Err(err) => {
            report.warn(
                "viewer.region",
                format!(
                    "{}: the network counters cannot be read ({err}): a region restart that disconnects the viewer cannot be noticed",
                    client.comm_stats_url().unwrap_or("the counters")
                ),
                "use LookingGlass (its /api/stats/Comm/stats on the chat URL's host)",
            );
            true
        }
    };
    let place = presence::place(connected, &status, region);
    match place.why_not() {
        None => {
            if counters.is_ok() {
                report.ok(
                    "viewer.region",
                    format!("the viewer is connected and hears {region_label}"),
                );
            }
            check_hearing(viewer, client, &status, region, stop, report).await;
        }
        Some(why) => report.fail(
            "viewer.region",
            format!("{why}: its chat is not recorded"),
            crate::presence::advice(&place, &region_label, has_login),
        ),
    }
}

/// The hearing picture: avatars in the region, and those beyond `viewer.hearing_range`, by name
/// and distance (the operator's console; the log never names them).
async fn check_hearing(
    viewer: &ViewerSettings,
    client: &LookingGlassClient,
    status: &ViewerStatus,
    region: Option<&str>,
    stop: &tokio_util::sync::CancellationToken,
    report: &mut CheckReport,
) {
    let Ok(Some(avatars)) = client.seen_avatars(stop).await else {
        return;
    };
    let region = region.map(str::to_owned).or_else(|| {
        status
            .current_sim
            .as_deref()
            .map(|sim| presence::region_name(sim).to_owned())
    });
    let picture = crate::presence::hearing_picture(
        &avatars,
        status,
        viewer.login.as_ref(),
        region.as_deref(),
        viewer.hearing_range,
    );
    let range = viewer.hearing_range;
    if !picture.position_known {
        report.warn(
            "viewer.hearing",
            format!(
                "{} avatars in the region; the viewer's own position is unknown (its status shows none after a REST login)",
                picture.in_region
            ),
            "set viewer.login.start_position to where the viewer's avatar stands, so distances can be told",
        );
    } else if picture.beyond == 0 {
        report.ok(
            "viewer.hearing",
            format!(
                "{} avatars in the region, all within viewer.hearing_range ({range} m) of the viewer's avatar",
                picture.in_region
            ),
        );
    } else {
        let far: Vec<String> = picture
            .far
            .iter()
            .map(|(name, distance)| format!("{name} {distance:.0} m"))
            .collect();
        report.warn(
            "viewer.hearing",
            format!(
                "{} of {} avatars in the region are beyond viewer.hearing_range ({range} m): {}; what they say is not recorded",
                picture.beyond,
                picture.in_region,
                far.join(", ")
            ),
            "place the viewer's avatar where the chatting happens (viewer.login.start_position), or raise OpenSim's say_distance ([Chat] in OpenSim.ini, then viewer.hearing_range); docs/OPERATIONS.md, \"Chat ranges\"",
        );
    }
}

/// After the probe `name` of `url`: when `url` is on the chat URL's host and port, whether any probe
/// there has answered so far.
fn note_origin(
    report: &CheckReport,
    name: &str,
    url: &str,
    chat_origin: &Option<(String, u16)>,
    origin_answered: &mut Option<bool>,
) {
    let answered = report
        .line(name)
        .is_some_and(|l| l.outcome != Outcome::Fail);
    if host_port(url) == *chat_origin {
        *origin_answered = Some(answered || origin_answered.unwrap_or(false));
    }
}

/// No status or avatars URL on the chat URL's host and port: only a TCP connection can be tried.
async fn chat_by_tcp(chat_url: &str, not_fetched: &str, report: &mut CheckReport) {
    let Some((host, port)) = host_port(chat_url) else {
        report.fail(
            "viewer.chat",
            format!("{chat_url} has no host"),
            "set viewer.chat_url to http://127.0.0.1:9144/api/chat",
        );
        return;
    };
    let connect = tokio::net::TcpStream::connect((host.as_str(), port));
    match tokio::time::timeout(PROBE_TIMEOUT, connect).await {
        Ok(Ok(_)) => report.warn(
            "viewer.chat",
            format!("{not_fetched}; {host}:{port} accepts connections"),
            "set viewer.status_url on the same host and port (…/api/LLLP/status) so check can verify the Host header too",
        ),
        Ok(Err(err)) => report.fail(
            "viewer.chat",
            format!("{not_fetched}; nothing accepts connections on {host}:{port}: {err}"),
            "start the viewer; check RestManager.Port in the viewer's LookingGlass.json against viewer.chat_url",
        ),
        Err(_) => report.fail(
            "viewer.chat",
            format!("{not_fetched}; no connection to {host}:{port} within {PROBE_TIMEOUT:?}"),
            "check the host in viewer.chat_url and any firewall between the relay and the viewer",
        ),
    }
}

fn fail_viewer(report: &mut CheckReport, name: &'static str, url: &str, err: &ViewerError) {
    let host = host_port(url).map_or_else(String::new, |(h, p)| format!("{h}:{p}"));
    match err {
        ViewerError::Status { status: 400, .. } if err.to_string().contains("Invalid host") => {
            report.fail(
                name,
                format!("{url}: the viewer answered 400 \"Invalid host\": it accepts only the host it listens on, not {host}"),
                "use http://127.0.0.1:9144 (the viewer's RestManager.BaseURL and Port), not localhost or the machine's name, in viewer.chat_url, viewer.status_url and viewer.avatars_url",
            )
        }
        ViewerError::Transport(source) if is_timeout(source) => report.fail(
            name,
            format!("{url}: no answer within {PROBE_TIMEOUT:?}: the viewer never answers a path it does not serve"),
            "check the path (LookingGlass: /api/LLLP/status and /api/avatars); a viewer in Radegast plugin mode serves no chat API",
        ),
        ViewerError::Unanswered { waited } => report.fail(
            name,
            format!("{url}: no answer within {waited:?}: the viewer never answers a path it does not serve"),
            "check the path (LookingGlass: /api/LLLP/status and /api/avatars); a viewer in Radegast plugin mode serves no chat API",
        ),
        ViewerError::Transport(_) => report.fail(
            name,
            format!("{url}: nothing answers on {host}: {err}"),
            "start the viewer (LookingGlass) on this machine; check RestManager.Port in its LookingGlass.json against the URL",
        ),
        ViewerError::Status { .. }
        | ViewerError::Decode { .. }
        | ViewerError::TooLarge { .. }
        | ViewerError::Stopping => report.fail(
            name,
            format!("{url}: {err}"),
            "check that the URL points at a LookingGlass viewer's REST interface",
        ),
    }
}

fn is_timeout(err: &reqwest::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(err);
    while let Some(cause) = source {
        if cause.to_string().contains("timed out") {
            return true;
        }
        source = cause.source();
    }
    err.is_timeout()
}

fn host_port(url: &str) -> Option<(String, u16)> {
    let parsed = reqwest::Url::parse(url).ok()?;
    let host = parsed.host_str()?.to_owned();
    Some((host, parsed.port_or_known_default()?))
}
