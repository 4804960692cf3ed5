//! `Relay`: builds every component from `Settings` and runs the stages until stopped.
//!
//! The only module that knows every component and spawns tasks. Shutdown: the token is cancelled; no
//! new viewer request is sent; the poller finishes the GET it has in flight and stores it, and any
//! viewer request in flight is awaited to its end however long it takes (cutting it would kill the
//! viewer or lose its lines); the other stages (delivery's POST) get `SHUTDOWN_GRACE`; then the
//! outbox is flushed. A task that panics (or a stage loop that ends before the stop) starts the same
//! shutdown, and `run_until_stopped` then returns an error naming it, so the process exits non-zero
//! and its supervisor (systemd, Docker) restarts it. With `with_reload`, SIGHUP
//! reloads the live part of the configuration (`reload`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::avatars::AvatarMapper;
use crate::backoff::RetryPolicy;
use crate::cms::client::CmsEndpoint;
use crate::cms::{CmsClient, ReadBoard};
use crate::config::{Settings, Snapshot};
use crate::delivery::{Delivery, DeliveryDeps};
use crate::echo::RecentlySaid;
use crate::filter::FilterReason;
use crate::health::{HealthRegion, HealthServer, HealthState};
use crate::inworld::{Inworld, InworldDeps, InworldRegion};
use crate::lookingglass::{
    FactsReader, LookingGlassClient, ViewerEndpoint, ViewerFacts, ViewerLogin,
};
use crate::metrics::Stats;
use crate::notice::{Notice, NoticeDeps};
use crate::notify::Notifier;
use crate::outbox::{Limits, Outbox};
use crate::poller::{Poller, PollerDeps};
use crate::presence::{OutboxGaps, Presence, PresenceDeps};
use crate::privacy::Privacy;
use crate::reload::{Live, Reloader};

/// How long the stages get to finish their requests after a stop: the process must exit within 10 s
/// of SIGTERM (systemd's and Docker's patience is longer, an operator's is not). A viewer request
/// still in flight then is waited for beyond it: it ends with its answer, or after
/// `viewer.request_timeout` without a byte.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(9);

/// How often a start-up login that failed is tried again (until one succeeds).
pub const STARTUP_LOGIN_RETRY: Duration = Duration::from_secs(30);

/// A loop that has not come round for this long counts as hung and the systemd watchdog is no longer
/// fed. Every request has its own limit (viewer inactivity 60 s, CMS 30 s), so five minutes without
/// a turn means a bug, not a slow peer; `2 × retry.max` is used when that is longer.
pub const STALL_LIMIT: Duration = Duration::from_secs(300);

/// The relay, built and ready to run.
pub struct Relay {
    outbox: Arc<Outbox>,
    /// Who opted out (its records live in the outbox); shared by every poller, notice and delivery.
    privacy: Arc<Privacy>,
    /// The process-wide counters (delivery, the CMS, the outbox).
    stats: Arc<Stats>,
    cms: Arc<CmsClient>,
    /// Each region's stages, at least one.
    regions: Vec<RegionStages>,
    delivery: Delivery,
    health: Option<HealthServer>,
    notifier: Option<Arc<Notifier>>,
    stall_limit: Duration,
    inworld: Option<Inworld>,
    shutdown_grace: Duration,
    /// The live part of the configuration, read by the poller and the notice task.
    live: watch::Sender<Arc<Live>>,
    mapper: Arc<AvatarMapper>,
    /// What the relay was built from, for a reload to compare against (the password as a digest:
    /// the relay keeps no `Settings`).
    running: Snapshot,
    /// `Some(file)` when SIGHUP reloads the configuration from `file` (and the environment).
    reload_from: Option<Option<PathBuf>>,
    /// `cms.timezone` and `mapping.users`, checked against the CMS after the start-up login.
    cms_zone: crate::zone::Zone,
    mapped_users: std::collections::BTreeMap<String, i64>,
}

/// One region's stages: its viewer (with its own gate: never two requests at once to one viewer),
/// the poller, the side reads, presence and the notice. A region whose viewer is down or elsewhere
/// slows only these.
struct RegionStages {
    /// The region's name (empty: the only region).
    name: String,
    /// Its counters and readiness signals (the `region` label of `/metrics`).
    stats: Arc<Stats>,
    viewer: LookingGlassClient,
    poller: Poller,
    facts: FactsReader,
    /// Whether the viewer hears its region; the outbox's gap markers.
    presence: Presence,
    notice: Notice,
}

impl Relay {
    /// Opens the outbox and builds the clients. Fails on anything an operator must fix.
    pub fn build(settings: &Settings) -> anyhow::Result<Relay> {
        let outbox = Arc::new(
            Outbox::open(&settings.outbox.path, settings.outbox.cache_bytes)?
                .with_limits(Limits {
                    max_bytes: settings.outbox.max_bytes,
                    max_age: settings.outbox.max_age,
                    when_full: settings.outbox.when_full,
                    reserve_bytes: settings.outbox.reserve_bytes,
                })
                .with_max_quarantine_bytes(settings.outbox.max_quarantine_bytes),
        );
        let stats = Arc::new(Stats::default());
        let cms = Arc::new(
            CmsClient::new(CmsEndpoint::from_settings(&settings.cms)?)
                .context("building the cms client")?
                // Failed logins follow the delivery's retry schedule, whichever task asks.
                .with_login_retry(RetryPolicy {
                    initial: settings.retry.initial,
                    max: settings.retry.max,
                }),
        );
        let live = watch::Sender::new(Arc::new(Live::new(settings)));
        // Opt-outs hold in every region: a speaker who opted out is not recorded anywhere.
        let privacy = Arc::new(Privacy::open(outbox.clone())?);
        let mut regions = Vec::new();
        let mut all_facts = Vec::new();
        let every_label = settings
            .regions()
            .iter()
            .map(|region| region.label.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let mut inworld_regions = Vec::new();
        for region in settings.regions() {
            let viewer_settings = &region.viewer;
            let name = region.name.clone();
            // The only region's counters are the process's, as they always were.
            let region_stats = if name.is_empty() {
                stats.clone()
            } else {
                Arc::new(Stats::default())
            };
            let viewer = LookingGlassClient::new(ViewerEndpoint {
                chat_url: viewer_settings.chat_url.clone(),
                avatars_url: viewer_settings.avatars_url.clone(),
                status_url: viewer_settings.status_url.clone(),
                inactivity: viewer_settings.request_timeout,
                max_response_bytes: viewer_settings.max_response_bytes,
            })
            .with_context(|| format!("building the viewer client of region {name:?}"))?;
            let facts = Arc::new(ViewerFacts::default());
            all_facts.push(facts.clone());
            // Each region's own: the poller drops the echo of what was said in its region only.
            let recently_said = Arc::new(RecentlySaid::default());
            let (confirmations, confirmations_rx) = mpsc::channel(crate::notice::QUEUE);
            let notice = Notice::new(NoticeDeps {
                viewer: viewer.clone(),
                facts: facts.clone(),
                region_label: region.label.clone(),
                live: live.subscribe(),
                privacy: privacy.clone(),
                recently_said: recently_said.clone(),
                confirmations: confirmations_rx,
                say_type: settings.inworld.say_type,
            });
            let poller = Poller::new(PollerDeps {
                viewer: viewer.clone(),
                live: live.subscribe(),
                privacy: privacy.clone(),
                confirmations,
                outbox: outbox.clone(),
                zone: viewer_settings.timezone,
                poll_interval: viewer_settings.poll_interval,
                stats: region_stats.clone(),
                recently_said: recently_said.clone(),
                facts: facts.clone(),
                region: name.clone(),
                region_label: region.label.clone(),
            });
            // Without the status it only marks the outbox's gaps: it cannot tell a logout or another
            // region, nor whose position is whose.
            let presence = Presence::new(PresenceDeps {
                viewer: viewer.clone(),
                outbox: outbox.clone(),
                stats: region_stats.clone(),
                region: viewer_settings.expected_region().map(str::to_owned),
                login: viewer_settings
                    .login
                    .as_ref()
                    .map(ViewerLogin::from_settings)
                    .transpose()?,
                hearing_range: viewer_settings.hearing_range,
                gap_markers: settings.cms.gap_markers,
                cms_zone: settings.cms.timezone,
                name: name.clone(),
                outbox_gaps: match (regions.is_empty(), name.is_empty()) {
                    (false, _) => OutboxGaps::Elsewhere,
                    (true, true) => OutboxGaps::Here,
                    (true, false) => OutboxGaps::Of(every_label.clone()),
                },
            })?;
            inworld_regions.push(InworldRegion {
                name: name.clone(),
                label: region.label.clone(),
                viewer: viewer.clone(),
                recently_said,
                stats: region_stats.clone(),
            });
            regions.push(RegionStages {
                name,
                stats: region_stats,
                facts: FactsReader::new(viewer.clone(), facts),
                viewer,
                poller,
                presence,
                notice,
            });
        }
        let mapper = Arc::new(AvatarMapper::new(
            &settings.mapping.users,
            all_facts,
            cms.clone(),
            settings.mapping.cache_ttl,
        ));
        // In-world's reads settle delivery's batches (when in-world runs): one GET for both.
        let board = Arc::new(ReadBoard::new());
        let delivery = Delivery::new(DeliveryDeps {
            outbox: outbox.clone(),
            cms: cms.clone(),
            board: board.clone(),
            mapper: mapper.clone(),
            privacy: privacy.clone(),
            settings: settings.cms.delivery(),
            retry: RetryPolicy {
                initial: settings.retry.initial,
                max: settings.retry.max,
            },
            stats: stats.clone(),
            max_line_failures: settings.retry.max_line_failures,
            region_labels: settings
                .regions()
                .iter()
                .map(|region| (region.name.clone(), region.label.clone()))
                .collect(),
            region_stats: regions
                .iter()
                .map(|region: &RegionStages| (region.name.clone(), region.stats.clone()))
                .collect(),
        });
        let stall_limit = STALL_LIMIT.max(settings.retry.max * 2);
        let health = match settings.http.listen {
            Some(addr) => Some(HealthServer::bind(
                addr,
                HealthState {
                    stats: stats.clone(),
                    regions: settings
                        .regions()
                        .iter()
                        .zip(&regions)
                        .map(|(region, stages)| HealthRegion {
                            name: region.name.clone(),
                            stats: stages.stats.clone(),
                            poll_interval: region.viewer.poll_interval,
                            chat_url: region.viewer.chat_url.clone(),
                        })
                        .collect(),
                    outbox: outbox.reader(),
                    cms: cms.clone(),
                    cms_unready_after: settings.http.cms_unready_after,
                    stall_limit,
                    grid_id: settings.cms.grid_id,
                    username: settings.cms.username.clone(),
                    started: Instant::now(),
                },
            )?),
            None => None,
        };
        let inworld = settings.inworld.enabled.then(|| {
            Inworld::new(InworldDeps {
                cms: cms.clone(),
                regions: inworld_regions,
                outbox: outbox.clone(),
                settings: settings.inworld.clone(),
                cms_zone: settings.cms.timezone,
                board,
            })
        });
        Ok(Relay {
            outbox,
            privacy,
            stats,
            cms,
            regions,
            delivery,
            health,
            notifier: None,
            stall_limit,
            inworld,
            shutdown_grace: SHUTDOWN_GRACE,
            live,
            mapper,
            running: settings.snapshot(),
            reload_from: None,
            cms_zone: settings.cms.timezone,
            mapped_users: settings.mapping.users.clone(),
        })
    }

    /// Reloads `file` (the `--config` file, if any, under the `RELAY__…` environment) at every
    /// SIGHUP: `mapping.users`, `filter.*` and `privacy.*` apply from the next line.
    pub fn with_reload(mut self, file: Option<PathBuf>) -> Relay {
        self.reload_from = Some(file);
        self
    }

    /// Where `/healthz`, `/readyz`, `/metrics` and `/status` are served (`None` when `http.listen`
    /// is empty). Bound by `build`, so port 0 is already resolved.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health.as_ref().map(HealthServer::local_addr)
    }

    /// Tells systemd `READY=1` once polling starts, feeds its watchdog while the loops are alive, and
    /// says `STOPPING=1` at shutdown (`Notifier::from_env()` in production).
    pub fn with_notifier(mut self, notifier: Option<Notifier>) -> Relay {
        self.notifier = notifier.map(Arc::new);
        self
    }

    /// How long the stages get to finish their requests after a stop (`SHUTDOWN_GRACE` unless
    /// changed here, e.g. by a test that needs a stop to outlast it).
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Relay {
        self.shutdown_grace = grace;
        self
    }

    /// The process-wide counters (delivery, the CMS, the outbox, in-world).
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Each region's name and counters (the viewer's side: polls, lines, presence).
    pub fn region_stats(&self) -> Vec<(String, Arc<Stats>)> {
        self.regions
            .iter()
            .map(|region| (region.name.clone(), region.stats.clone()))
            .collect()
    }

    /// The outbox.
    pub fn outbox(&self) -> Arc<Outbox> {
        self.outbox.clone()
    }

    /// Who opted out, as the relay keeps and stores it.
    pub fn privacy(&self) -> Arc<Privacy> {
        self.privacy.clone()
    }

    /// The CMS client.
    pub fn cms(&self) -> Arc<CmsClient> {
        self.cms.clone()
    }

    /// Runs until `token` is cancelled, then stops within `SHUTDOWN_GRACE`, or later when a viewer
    /// answer is still arriving then (it is never cut). A stage that panics (or a loop that ends
    /// before the stop) stops the others the same way, and the relay returns an error naming it after
    /// the outbox is flushed: the binary exits non-zero, so that systemd or Docker restarts it, and the
    /// restart resumes from the outbox.
    pub async fn run_until_stopped(self, token: CancellationToken) -> anyhow::Result<()> {
        let tracker = TaskTracker::new();
        // Cancelled by the caller's token or by a stage's failure; the caller's token is theirs.
        let stop = token.child_token();
        let failure = Arc::new(std::sync::Mutex::new(None::<String>));
        let supervisor = Supervisor {
            tracker: &tracker,
            stop: &stop,
            failure: &failure,
        };
        // Opt-outs a crash interrupted, or `privacy add` made while the relay was stopped.
        match self.privacy.erase_waiting().await {
            Ok(0) => {}
            Ok(n_dropped) => {
                // Which region each line came from is not told here: counted in the first.
                let counted = self
                    .regions
                    .first()
                    .map_or(&self.stats, |region| &region.stats);
                for _ in 0..n_dropped {
                    counted.filtered(FilterReason::OptedOut);
                }
                tracing::info!(
                    n_dropped,
                    "lines of speakers who opted out dropped from the outbox"
                );
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot drop the waiting lines of speakers who opted out")
            }
        }
        let (cms_zone, mapped_users) = (self.cms_zone, self.mapped_users.clone());
        // Listened to before READY=1: SIGHUP's default action would end the relay.
        #[cfg(unix)]
        let _live = match self.reload_from {
            Some(file) => {
                let hangup = crate::reload::on_hangup().context("listening for SIGHUP")?;
                let reloader = Reloader::new(file, self.running, self.live, self.mapper);
                supervisor.spawn(
                    "reload",
                    Ends::Whenever,
                    reloader.run_until_stopped(hangup, stop.clone()),
                );
                None
            }
            None => Some(self.live),
        };
        #[cfg(not(unix))]
        let _live = (self.live, self.reload_from, self.running, self.mapper);
        let mut pollers = Vec::new();
        let mut viewers = Vec::new();
        let mut poller_stats = Vec::new();
        for region in self.regions {
            // Each region's tasks carry its name in the log (a span); the only region's log is as
            // it always was.
            let span = if region.name.is_empty() {
                tracing::Span::none()
            } else {
                tracing::info_span!("region", region = region.name)
            };
            supervisor.spawn(
                "notice",
                Ends::Whenever,
                region
                    .notice
                    .run_until_stopped(stop.clone())
                    .instrument(span.clone()),
            );
            pollers.push(
                supervisor.spawn(
                    "poller",
                    Ends::OnStop,
                    region
                        .poller
                        .run_until_stopped(stop.clone())
                        .instrument(span.clone()),
                ),
            );
            supervisor.spawn(
                "viewer facts",
                Ends::OnStop,
                region
                    .facts
                    .run_until_stopped(stop.clone())
                    .instrument(span.clone()),
            );
            supervisor.spawn(
                "viewer presence",
                Ends::OnStop,
                region
                    .presence
                    .run_until_stopped(stop.clone())
                    .instrument(span.clone()),
            );
            viewers.push(region.viewer);
            poller_stats.push(region.stats);
        }
        supervisor.spawn(
            "delivery",
            Ends::OnStop,
            self.delivery.run_until_stopped(stop.clone()),
        );
        if let Some(inworld) = self.inworld {
            supervisor.spawn(
                "inworld",
                Ends::OnStop,
                inworld.run_until_stopped(stop.clone()),
            );
        }
        if let Some(health) = self.health {
            supervisor.spawn(
                "health",
                Ends::OnStop,
                health.run_until_stopped(stop.clone()),
            );
        }
        let (cms, login_token) = (self.cms.clone(), stop.clone());
        supervisor.spawn("start-up login", Ends::Whenever, async move {
            // Readiness should not wait for the first chat line to learn whether the CMS takes us;
            // a CMS that is down at start is tried again until it answers (a wrong password too,
            // slowly, so /readyz turns ready once it is fixed in the CMS).
            let mut n_failed = 0u32;
            while let Err(err) = cms.ensure_logged_in().await {
                if n_failed == 0 {
                    tracing::warn!(error = %err, retry_in = ?STARTUP_LOGIN_RETRY, "cms login at start-up failed; trying again");
                }
                n_failed += 1;
                tokio::select! {
                    _ = login_token.cancelled() => return,
                    _ = tokio::time::sleep(STARTUP_LOGIN_RETRY) => {}
                }
            }
            // The login answer shows the CMS's own zone: a cms.timezone that disagrees dates every
            // row wrong (read-backs still start early enough, from the CMS's offset).
            if let Some(disagreement) = crate::delivery::zone_disagreement(cms_zone, &cms) {
                tracing::warn!("{disagreement}; set cms.timezone to the zone of the cms's php (date.timezone)");
            }
            match crate::delivery::unknown_mapped_users(&mapped_users, &cms).await {
                (unknown, _) if !unknown.is_empty() => {
                    let described = crate::delivery::describe_unknown_users(&unknown);
                    tracing::warn!("{described}; fix mapping.users");
                }
                (_, Some(err)) => {
                    tracing::info!(error = %err, "cannot look up the users of mapping.users in the cms (the account needs user >= 4)")
                }
                _ => {}
            }
        });
        if let Some(notifier) = &self.notifier {
            notifier.send_logged("READY=1\nSTATUS=relaying chat");
            let (notifier, stats) = (notifier.clone(), self.stats.clone());
            let (stall_limit, watchdog_token) = (self.stall_limit, stop.clone());
            let poller_stats = poller_stats.clone();
            supervisor.spawn("watchdog", Ends::Whenever, async move {
                let healthy = || {
                    poller_stats
                        .iter()
                        .all(|region| region.poller_heartbeat.is_healthy(stall_limit))
                        && stats.delivery_heartbeat.is_healthy(stall_limit)
                };
                notifier.run_watchdog(healthy, watchdog_token).await;
            });
        }
        tracker.close();
        stop.cancelled().await;
        let failed = lock(&failure).clone();
        match &failed {
            Some(failed) => tracing::error!(
                error = %failed,
                "stopping: a relay stage failed; finishing the other stages' requests, then exiting with an error so that the relay is restarted"
            ),
            None => tracing::info!("stopping: finishing requests in flight"),
        }
        if let Some(notifier) = &self.notifier {
            notifier.send_logged("STOPPING=1\nSTATUS=stopping: finishing requests in flight");
        }
        let deadline = tokio::time::Instant::now() + self.shutdown_grace;
        // The poller stops at once between GETs; a GET in flight (or any viewer request) ends with
        // its answer read to its end, or after viewer.request_timeout without a byte.
        let viewer_done = async {
            for poller in pollers {
                let _ = poller.await;
            }
            for viewer in &viewers {
                viewer.idle().await;
            }
        };
        tokio::pin!(viewer_done);
        if tokio::time::timeout(self.shutdown_grace, &mut viewer_done)
            .await
            .is_err()
        {
            tracing::warn!(grace = ?self.shutdown_grace, "a viewer request is still in flight at the shutdown deadline: waiting for its answer to end (cutting it would kill the viewer or lose its lines; it ends at the latest after viewer.request_timeout without a byte)");
            viewer_done.await;
        }
        if tokio::time::timeout_at(deadline, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?self.shutdown_grace, "a request was still in flight at the shutdown deadline; its lines stay in the outbox");
        }
        let flushed = self.outbox.flush().await.context("flushing the outbox");
        if let Some(failed) = failed {
            if let Err(err) = flushed {
                tracing::error!(error = %format!("{err:#}"), "the outbox could not be flushed after the failure");
            }
            anyhow::bail!("{failed}; the relay stopped so that it is restarted");
        }
        flushed?;
        tracing::info!(outbox_depth = self.outbox.len(), "stopped");
        Ok(())
    }
}

/// When a supervised task may end without that being a failure.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ends {
    /// Only once the relay is stopping (a stage loop).
    OnStop,
    /// Whenever its work is done (the start-up login, the watchdog without systemd).
    Whenever,
}

/// Spawns the relay's tasks so that a panic, or a loop ending before the stop, is noticed at once:
/// the first failure is kept and the stop is cancelled.
struct Supervisor<'a> {
    tracker: &'a TaskTracker,
    stop: &'a CancellationToken,
    failure: &'a Arc<std::sync::Mutex<Option<String>>>,
}

impl Supervisor<'_> {
    fn spawn(
        &self,
        name: &'static str,
        ends: Ends,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let handle = tokio::spawn(task);
        let (stop, failure) = (self.stop.clone(), self.failure.clone());
        // The tracker waits for the watcher, which waits for the task: the shutdown grace covers both.
        self.tracker.spawn(async move {
            let failed = match handle.await {
                Ok(()) if ends == Ends::Whenever || stop.is_cancelled() => return,
                Ok(()) => format!("the {name} stage ended unexpectedly"),
                Err(err) if err.is_panic() => {
                    format!(
                        "the {name} stage panicked: {}",
                        panic_message(err.into_panic())
                    )
                }
                // Cancelled: the runtime is going away.
                Err(_) => return,
            };
            lock(&failure).get_or_insert(failed);
            stop.cancel();
        })
    }
}

/// The text a panic was raised with.
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(text) => (*text).to_owned(),
            Err(_) => "(no message)".to_owned(),
        },
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this mutex leaves a plain value behind; keep using it.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
