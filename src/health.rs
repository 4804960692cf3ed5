//! The operator's HTTP endpoint (axum): `GET /healthz`, `/readyz`, `/metrics` and `/status`.
//!
//! Read-only: it looks at `Stats`, the outbox through an `OutboxReader` (which never quarantines a
//! record or reopens the database) and the CMS client's login state, and never writes, logs in, or
//! talks to either peer, so a scraper polling it every second changes nothing.
//! Nothing it serves contains the CMS password or token (URLs are shown without user info).
//! Its connections (`serve`) are bounded: at most `MAX_CONNECTIONS` at once, each closed unless its
//! request head arrives within `HEADER_READ_TIMEOUT`, so a client cannot hold the port.
//!
//! Readiness (`/readyz` is 200 only when all four hold):
//! - **outbox**: the last outbox write succeeded, and the outbox is not full (with
//!   `outbox.when_full = "pause_polling"` a full outbox stops polling);
//! - **viewer**: a chat poll was answered within `max(5 × viewer.poll_interval, 5 s)`: a few missed
//!   polls are normal (a slow answer, one refused connection), a viewer gone for five intervals is not;
//!   with `[[regions]]` every region's viewer, each failing one named (`viewer (Sandbox): …`);
//! - **cms**: the last login, or the last request with its token, was accepted, and delivery has
//!   not failed at every attempt for `http.cms_unready_after` or longer (a CMS that is down, or
//!   answers every POST with an error, fails this check until a delivery succeeds);
//! - **stages**: the poller and delivery loops run (neither ended nor panicked) and came round
//!   within the stall limit (`app::STALL_LIMIT`), the same rule the systemd watchdog is fed by.
//! - **cms**: the last login, or the last request with its token, was accepted;
//! - **delivery**: no line waits for a retry after the CMS failed it while answering other requests
//!   (a read-back it cannot answer, a line it keeps failing).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::cms::CmsClient;
use crate::cms::client::LoginState;
use crate::liveness::Heartbeat;
use crate::metrics::{self, Gauges, RegionStats, Stats};
use crate::model::FilterReason;
use crate::outbox::OutboxReader;

mod serve;
pub use serve::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS};

/// The viewer counts as down when no poll was answered for this many poll intervals...
pub const VIEWER_STALE_POLLS: u32 = 5;
/// ...and never sooner than this.
pub const VIEWER_STALE_MIN: Duration = Duration::from_secs(5);

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The address is taken or not ours.
    #[error(
        "cannot listen on {addr} for http.listen: {cause} (another relay on the same port? give each its own http.listen, or set it to \"\" to turn the endpoint off)"
    )]
    Bind {
        /// `http.listen`
        addr: SocketAddr,
        /// The OS error (in the message, so not also a `source` that `{:#}` would print twice).
        cause: std::io::Error,
    },
}

/// What the endpoint reads.
pub struct HealthState {
    /// The process's counters and signals (delivery, the CMS, the outbox).
    pub stats: Arc<Stats>,
    /// Each region's, at least one.
    pub regions: Vec<HealthRegion>,
    /// The outbox, for its depth (read-only).
    pub outbox: OutboxReader,
    /// The CMS client, for its login state and count.
    pub cms: Arc<CmsClient>,
    /// `http.cms_unready_after`.
    pub cms_unready_after: Duration,
    /// How long a loop may go without coming round (`app::STALL_LIMIT` or `2 × retry.max`).
    pub stall_limit: Duration,
    /// `cms.grid_id`, shown in `/status`.
    pub grid_id: u32,
    /// `cms.username`, shown in `/status` (not a secret; the password never is shown).
    pub username: String,
    /// When the relay started.
    pub started: Instant,
}

/// One region as the endpoint sees it.
pub struct HealthRegion {
    /// Its name (empty: the only region).
    pub name: String,
    /// Its counters and readiness signals.
    pub stats: Arc<Stats>,
    /// `viewer.poll_interval` of its viewer.
    pub poll_interval: Duration,
    /// Its viewer's chat URL (shown without user info).
    pub chat_url: String,
}

impl HealthRegion {
    /// How long its viewer may go without an answered poll and still count as answering.
    pub fn viewer_stale_after(&self) -> Duration {
        (self.poll_interval * VIEWER_STALE_POLLS).max(VIEWER_STALE_MIN)
    }

    /// Its viewer check: answering, and in its region.
    fn viewer_check(&self) -> Check {
        let readiness = &self.stats.readiness;
        let stale_after = self.viewer_stale_after();
        match readiness.viewer() {
            // The viewer answers, but does not hear its region (`presence`).
            (Some(last_ok), _) if last_ok.elapsed() <= stale_after => {
                let problem = readiness.viewer_place_problem();
                Check {
                    ok: problem.is_none(),
                    reason: problem,
                }
            }
            (last_ok, last_error) => {
                let since = match last_ok {
                    Some(at) => format!("no chat poll answered for {:.1} s", secs(at.elapsed())),
                    None => "no chat poll answered yet".to_owned(),
                };
                let limit = format!("(limit {:.1} s)", secs(stale_after));
                Check {
                    ok: false,
                    reason: Some(match last_error {
                        Some(error) => format!("{since} {limit}; last error: {error}"),
                        None => format!("{since} {limit}"),
                    }),
                }
            }
        }
    }
}

/// `what`, naming region `name` when it has one: `viewer (Sandbox)`.
fn in_region(what: &str, name: &str) -> String {
    if name.is_empty() {
        what.to_owned()
    } else {
        format!("{what} ({name})")
    }
}

/// One readiness condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Whether it holds.
    pub ok: bool,
    /// Why not (`None` when it holds).
    pub reason: Option<String>,
}

/// The four readiness conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadinessReport {
    /// The last outbox write succeeded.
    pub outbox: Check,
    /// The viewer answered recently.
    pub viewer: Check,
    /// The CMS accepts the account and the lines.
    pub cms: Check,
    /// The stage loops run and come round.
    pub stages: Check,
    /// No line is held back after failures of its own.
    pub delivery: Check,
}

impl ReadinessReport {
    /// Whether every condition holds.
    pub fn is_ready(&self) -> bool {
        self.outbox.ok && self.viewer.ok && self.cms.ok && self.stages.ok && self.delivery.ok
    }

    fn to_json(&self) -> Value {
        let check = |c: &Check| json!({"ok": c.ok, "reason": c.reason});
        json!({
            "outbox": check(&self.outbox),
            "viewer": check(&self.viewer),
            "cms": check(&self.cms),
            "delivery": check(&self.delivery),
            "stages": check(&self.stages),
        })
    }
}

impl HealthState {
    /// Evaluates readiness now.
    pub fn readiness(&self) -> ReadinessReport {
        let ok = Check {
            ok: true,
            reason: None,
        };
        let failed = |reason: String| Check {
            ok: false,
            reason: Some(reason),
        };
        let readiness = &self.stats.readiness;
        // The pollers and delivery both write the outbox: the first failure any of them saw.
        let outbox_error = readiness.outbox_error().or_else(|| {
            self.regions
                .iter()
                .find_map(|region| region.stats.readiness.outbox_error())
        });
        let outbox = match outbox_error {
            Some(error) => failed(format!("the last outbox write failed: {error}")),
            None if self.outbox.is_disk_full() => failed(
                "the outbox's disk is full: viewer polling is paused (the viewer keeps the lines) while delivery removes confirmed lines in the room of its reserve (outbox.reserve_bytes), and after that while the outbox holds a third of what filled the disk"
                    .to_owned(),
            ),
            None if self.outbox.is_full_and_paused() => failed(format!(
                "the outbox is full ({} bytes, outbox.max_bytes): viewer polling is paused until delivery makes room",
                self.outbox.bytes()
            )),
            None => ok.clone(),
        };
        // Each failing region named: `viewer (Sandbox): no chat poll answered …`.
        let failing: Vec<String> = self
            .regions
            .iter()
            .filter_map(|region| {
                let reason = region.viewer_check().reason?;
                Some(if region.name.is_empty() {
                    reason
                } else {
                    format!("{}: {reason}", in_region("viewer", &region.name))
                })
            })
            .collect();
        let viewer = if failing.is_empty() {
            ok.clone()
        } else {
            failed(failing.join("; "))
        };
        let cms = match self.cms.login_state() {
            LoginState::Valid => match readiness.delivery_failing() {
                Some(failing) if failing.since.elapsed() >= self.cms_unready_after => {
                    failed(format!(
                        "delivery to the cms has failed for {:.1} s ({} attempts in a row, none succeeded; limit {:.1} s, http.cms_unready_after); last error: {}",
                        secs(failing.since.elapsed()),
                        failing.n_failed,
                        secs(self.cms_unready_after),
                        failing.last_error
                    ))
                }
                _ => ok.clone(),
            },
            LoginState::NotYet => failed("not logged in to the cms yet".to_owned()),
            LoginState::Failed(error) => failed(error),
        };
        let loops = self
            .regions
            .iter()
            .map(|region| {
                (
                    in_region("poller", &region.name),
                    &region.stats.poller_heartbeat,
                )
            })
            .chain([("delivery".to_owned(), &self.stats.delivery_heartbeat)]);
        let stalled: Vec<String> = loops
            .filter_map(|(name, heartbeat)| self.loop_trouble(&name, heartbeat))
            .collect();
        let stages = if stalled.is_empty() {
            Check {
                ok: true,
                reason: None,
            }
        } else {
            failed(stalled.join("; "))
        };
        let delivery = readiness.delivery_held_reason().map_or(ok, failed);
        ReadinessReport {
            outbox,
            viewer,
            cms,
            delivery,
            stages,
        }
    }

    /// What is wrong with a stage loop, if anything.
    fn loop_trouble(&self, name: &str, heartbeat: &Heartbeat) -> Option<String> {
        if !heartbeat.is_running() {
            return Some(format!(
                "the {name} loop is not running (the relay is stopping, or the loop panicked and the relay exits to be restarted)"
            ));
        }
        match heartbeat.since_last_beat() {
            Some(since) if since > self.stall_limit => Some(format!(
                "the {name} loop has not come round for {:.1} s (limit {:.1} s): it is stuck (under systemd the watchdog restarts the relay)",
                secs(since),
                secs(self.stall_limit)
            )),
            _ => None,
        }
    }

    fn gauges(&self, ready: bool) -> Gauges {
        // One record read, whatever the outbox holds: the oldest pending line (an undecodable one is
        // passed over here and moved to the quarantine by delivery's next step); the counts are the
        // outbox's counters.
        let oldest = self.outbox.oldest_captured_at().unwrap_or_else(|err| {
            tracing::warn!(error = %err, "cannot read the oldest outbox line for the metrics");
            None
        });
        let oldest_age_seconds = oldest.map_or(0.0, |at| {
            (chrono::Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0
        });
        Gauges {
            outbox_lines: self.outbox.len() as u64,
            outbox_bytes: self.outbox.bytes(),
            outbox_disk_bytes: self.outbox.disk_bytes(),
            outbox_dropped: self.outbox.n_dropped(),
            oldest_age_seconds,
            dead_letters: self.outbox.dead_len() as u64,
            quarantined: self.outbox.quarantine_len() as u64,
            cms_logins: self.cms.n_logins(),
            ready,
            uptime_seconds: secs(self.started.elapsed()),
        }
    }
}

/// The bound endpoint, not serving yet.
pub struct HealthServer {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    state: Arc<HealthState>,
}

impl HealthServer {
    /// Binds `addr` now (so a taken port fails start-up, and port 0 is resolved at once).
    pub fn bind(addr: SocketAddr, state: HealthState) -> Result<HealthServer, HealthError> {
        let bind_error = |cause| HealthError::Bind { addr, cause };
        let listener = std::net::TcpListener::bind(addr).map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        Ok(HealthServer {
            listener,
            addr,
            state: Arc::new(state),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `token` is cancelled.
    pub async fn run_until_stopped(self, token: CancellationToken) {
        let listener = match tokio::net::TcpListener::from_std(self.listener) {
            Ok(listener) => listener,
            Err(err) => {
                tracing::error!(error = %err, "health endpoint cannot start");
                return;
            }
        };
        tracing::info!(addr = %self.addr, "serving /healthz, /readyz, /metrics, /status");
        let app = router(self.state);
        serve::serve(listener, app, token).await;
    }
}

fn router(state: Arc<HealthState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/status", get(status))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<HealthState>>) -> Response {
    let report = state.readiness();
    let code = if report.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({"ready": report.is_ready(), "checks": report.to_json()});
    (code, Json(body)).into_response()
}

async fn metrics_text(State(state): State<Arc<HealthState>>) -> Response {
    let ready = state.readiness().is_ready();
    let gauges = state.gauges(ready);
    let regions: Vec<RegionStats<'_>> = state
        .regions
        .iter()
        .map(|region| RegionStats {
            name: &region.name,
            stats: &region.stats,
        })
        .collect();
    let text = metrics::render_prometheus(&state.stats, &regions, &gauges);
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

async fn status(State(state): State<Arc<HealthState>>) -> Json<Value> {
    let report = state.readiness();
    let gauges = state.gauges(report.is_ready());
    let stats = &state.stats;
    let get = Stats::get;
    // The viewer side summed over the regions (one region: its own numbers, as before).
    let sum = |read: &dyn Fn(&Stats) -> u64| -> u64 {
        state.regions.iter().map(|region| read(&region.stats)).sum()
    };
    let n_filtered =
        |stats: &Stats| -> u64 { FilterReason::ALL.iter().map(|r| stats.n_filtered(*r)).sum() };
    // The process's own count of a delivery counter and each region's that is not the process's.
    let delivered = |read: &dyn Fn(&Stats) -> u64| -> u64 {
        read(stats)
            + state
                .regions
                .iter()
                .filter(|region| !Arc::ptr_eq(&region.stats, stats))
                .map(|region| read(&region.stats))
                .sum::<u64>()
    };
    let login = match state.cms.login_state() {
        LoginState::NotYet => "not yet",
        LoginState::Valid => "valid",
        LoginState::Failed(_) => "failed",
    };
    let viewer_of = |region: &HealthRegion| {
        let stats = &region.stats;
        let (last_ok, _) = stats.readiness.viewer();
        json!({
            "chat_url": without_userinfo(&region.chat_url),
            "last_poll_seconds_ago": last_ok.map(|at| round1(secs(at.elapsed()))),
            "polls": get(&stats.polls),
            "poll_errors": get(&stats.poll_errors),
            "hears_region": get(&stats.viewer_out_of_region) == 0,
            "avatars_in_region": get(&stats.avatars_in_region),
            "avatars_beyond_hearing": get(&stats.avatars_beyond_hearing),
            "gap_markers": get(&stats.gap_markers),
        })
    };
    let regions: Vec<Value> = state
        .regions
        .iter()
        .map(|region| {
            let stats = &region.stats;
            let check = region.viewer_check();
            json!({
                "name": region.name,
                "ready": check.ok,
                "reason": check.reason,
                "viewer": viewer_of(region),
                "lines": {
                    "polled": get(&stats.lines_polled),
                    "relayed": get(&stats.lines_relayed),
                    "filtered": n_filtered(stats),
                    "delivered": get(&stats.lines_delivered) + get(&stats.lines_reconciled),
                    "dropped": get(&stats.lines_unreadable) + get(&stats.lines_unstored),
                },
                "inworld": {
                    "said": get(&stats.inworld_said),
                    "skipped": get(&stats.inworld_skipped),
                    "paused": get(&stats.inworld_paused) == 1,
                },
            })
        })
        .collect();
    // `viewer` is the only region's (or the first's): what a one-region relay always showed.
    let viewer = state.regions.first().map(viewer_of);
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": round1(gauges.uptime_seconds),
        "ready": report.is_ready(),
        "checks": report.to_json(),
        "viewer": viewer,
        "regions": regions,
        "cms": {
            "base_url": without_userinfo(state.cms.base_url()),
            "grid_id": state.grid_id,
            "username": state.username,
            "login": login,
            "logins": gauges.cms_logins,
            "pacing_gap_seconds": get(&stats.cms_pacing_gap_micros) as f64 / 1e6,
        },
        "outbox": {
            "lines": gauges.outbox_lines,
            "bytes": gauges.outbox_bytes,
            "dropped": gauges.outbox_dropped,
            "oldest_age_seconds": round1(gauges.oldest_age_seconds),
            "dead_letters": gauges.dead_letters,
            "quarantined": gauges.quarantined,
        },
        "lines": {
            "polled": sum(&|s| get(&s.lines_polled)),
            "relayed": sum(&|s| get(&s.lines_relayed)),
            "filtered": sum(&|s| n_filtered(s)),
            "delivered": delivered(&|s| get(&s.lines_delivered) + get(&s.lines_reconciled)),
            "dead_lettered": get(&stats.lines_dead_lettered),
            "dropped": sum(&|s| get(&s.lines_unreadable) + get(&s.lines_unstored)) + gauges.outbox_dropped,
            "delivery_retries": get(&stats.delivery_retries),
        },
        "inworld": {
            "said": sum(&|s| get(&s.inworld_said)),
            "skipped": sum(&|s| get(&s.inworld_skipped)),
        },
    }))
}

/// A URL without `user:password@`, should an operator have put credentials in one.
pub fn without_userinfo(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        Err(_) => "(unparsable url)".to_owned(),
    }
}

fn secs(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

fn round1(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Outbox;

    fn state(outbox: &Arc<Outbox>) -> HealthState {
        let cms = CmsClient::unreachable();
        HealthState {
            stats: Arc::new(Stats::default()),
            regions: vec![HealthRegion {
                name: String::new(),
                stats: Arc::new(Stats::default()),
                poll_interval: Duration::from_millis(500),
                chat_url: "http://127.0.0.1:9144/api/chat".into(),
            }],
            outbox: outbox.reader(),
            cms: Arc::new(cms),
            cms_unready_after: Duration::from_secs(60),
            stall_limit: Duration::from_secs(300),
            grid_id: 1,
            username: "relay".into(),
            started: Instant::now(),
        }
    }

    #[test]
    fn readiness_names_a_stage_loop_that_stopped_or_is_stuck() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Arc::new(Outbox::open(dir.path(), 1 << 20).expect("open"));
        let mut state = state(&outbox);
        let stats = state.stats.clone();
        let region = state.regions[0].stats.clone();
        {
            let _poller = region.poller_heartbeat.alive();
            let _delivery = stats.delivery_heartbeat.alive();
            assert_eq!(state.readiness().stages.reason, None);

            // Stuck: no turn within the limit.
            state.stall_limit = Duration::ZERO;
            std::thread::sleep(Duration::from_millis(2));
            let stages = state.readiness().stages;
            let reason = stages.reason.expect("a reason");
            assert!(!stages.ok && !state.readiness().is_ready());
            assert!(
                reason.contains("the poller loop has not come round")
                    && reason.contains("the delivery loop has not come round")
                    && reason.contains("stuck"),
                "{reason}"
            );
            region.poller_heartbeat.beat();
            stats.delivery_heartbeat.beat();
            state.stall_limit = Duration::from_secs(300);
            assert_eq!(state.readiness().stages.reason, None);
        }
        // Ended (or panicked: the guard is dropped while unwinding).
        let reason = state.readiness().stages.reason.expect("a reason");
        assert!(
            reason.contains("the poller loop is not running")
                && reason.contains("the delivery loop is not running"),
            "{reason}"
        );
    }

    #[test]
    fn credentials_in_a_url_are_not_shown() {
        assert_eq!(
            without_userinfo("http://relay:hunter2@cms.example.org/OpenSim-CMS/api"),
            "http://cms.example.org/OpenSim-CMS/api"
        );
        assert_eq!(
            without_userinfo("http://127.0.0.1:9144/api/chat"),
            "http://127.0.0.1:9144/api/chat"
        );
    }
}
