//! `Relay`: builds every component from `Settings` and runs the stages until stopped.
//!
//! The only module that knows every component and spawns tasks. Shutdown: the token is cancelled, the
//! poller finishes the GET it has in flight and stores it, delivery finishes the POST it has in flight,
//! both within `SHUTDOWN_GRACE`; then the outbox is flushed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::avatars::AvatarMapper;
use crate::backoff::RetryPolicy;
use crate::cms::CmsClient;
use crate::cms::client::CmsEndpoint;
use crate::config::Settings;
use crate::delivery::{Delivery, DeliveryDeps};
use crate::echo::RecentlySaid;
use crate::filter::Filter;
use crate::health::{HealthServer, HealthState};
use crate::inworld::{Inworld, InworldDeps};
use crate::lookingglass::LookingGlassClient;
use crate::metrics::Stats;
use crate::notify::Notifier;
use crate::outbox::{Limits, Outbox};
use crate::poller::{Poller, PollerDeps};

/// How long the stages get to finish their requests after a stop: the process must exit within 10 s
/// of SIGTERM (systemd's and Docker's patience is longer, an operator's is not).
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
    stats: Arc<Stats>,
    cms: Arc<CmsClient>,
    poller: Poller,
    delivery: Delivery,
    health: Option<HealthServer>,
    notifier: Option<Arc<Notifier>>,
    stall_limit: Duration,
    inworld: Option<Inworld>,
}

impl Relay {
    /// Opens the outbox and builds the clients. Fails on anything an operator must fix.
    pub fn build(settings: &Settings) -> anyhow::Result<Relay> {
        let outbox = Arc::new(
            Outbox::open(&settings.outbox.path, settings.outbox.cache_bytes)?.with_limits(Limits {
                max_bytes: settings.outbox.max_bytes,
                max_age: settings.outbox.max_age,
                when_full: settings.outbox.when_full,
                reserve_bytes: settings.outbox.reserve_bytes,
            }),
        );
        let stats = Arc::new(Stats::default());
        let viewer = LookingGlassClient::new(
            settings.viewer.chat_url.clone(),
            settings.viewer.avatars_url.clone(),
            settings.viewer.status_url.clone(),
            settings.viewer.request_timeout,
        )
        .context("building the viewer client")?;
        let cms = Arc::new(
            CmsClient::new(CmsEndpoint {
                base_url: settings.cms.base_url.clone(),
                grid_id: settings.cms.grid_id,
                username: settings.cms.username.clone(),
                password: settings.cms.load_password()?,
                timeout: settings.cms.request_timeout,
                max_response_bytes: settings.cms.max_response_bytes,
            })
            .context("building the cms client")?,
        );
        let mapper = Arc::new(AvatarMapper::new(
            &settings.mapping.users,
            viewer.clone(),
            cms.clone(),
            settings.mapping.cache_ttl,
        ));
        let recently_said = Arc::new(RecentlySaid::default());
        let poller = Poller::new(PollerDeps {
            viewer: viewer.clone(),
            filter: Filter::new(&settings.filter),
            outbox: outbox.clone(),
            zone: settings.viewer.timezone,
            poll_interval: settings.viewer.poll_interval,
            stats: stats.clone(),
            recently_said: recently_said.clone(),
        });
        let delivery = Delivery::new(DeliveryDeps {
            outbox: outbox.clone(),
            cms: cms.clone(),
            mapper,
            settings: settings.cms.delivery(),
            retry: RetryPolicy {
                initial: settings.retry.initial,
                max: settings.retry.max,
            },
            stats: stats.clone(),
            max_line_failures: settings.retry.max_line_failures,
        });
        let health = match settings.http.listen {
            Some(addr) => Some(HealthServer::bind(
                addr,
                HealthState {
                    stats: stats.clone(),
                    outbox: outbox.reader(),
                    cms: cms.clone(),
                    poll_interval: settings.viewer.poll_interval,
                    chat_url: settings.viewer.chat_url.clone(),
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
                viewer,
                outbox: outbox.clone(),
                settings: settings.inworld.clone(),
                cms_zone: settings.cms.timezone,
                stats: stats.clone(),
                recently_said,
            })
        });
        Ok(Relay {
            outbox,
            stats,
            cms,
            poller,
            delivery,
            health,
            notifier: None,
            stall_limit: STALL_LIMIT.max(settings.retry.max * 2),
            inworld,
        })
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

    /// The counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The outbox.
    pub fn outbox(&self) -> Arc<Outbox> {
        self.outbox.clone()
    }

    /// The CMS client.
    pub fn cms(&self) -> Arc<CmsClient> {
        self.cms.clone()
    }

    /// Runs until `token` is cancelled, then stops within `SHUTDOWN_GRACE`.
    pub async fn run_until_stopped(self, token: CancellationToken) -> anyhow::Result<()> {
        let tracker = TaskTracker::new();
        tracker.spawn(self.poller.run_until_stopped(token.clone()));
        tracker.spawn(self.delivery.run_until_stopped(token.clone()));
        if let Some(inworld) = self.inworld {
            tracker.spawn(inworld.run_until_stopped(token.clone()));
        }
        if let Some(health) = self.health {
            tracker.spawn(health.run_until_stopped(token.clone()));
        }
        let (cms, login_token) = (self.cms.clone(), token.clone());
        tracker.spawn(async move {
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
        });
        if let Some(notifier) = &self.notifier {
            notifier.send_logged("READY=1\nSTATUS=relaying chat");
            let (notifier, stats) = (notifier.clone(), self.stats.clone());
            let (stall_limit, watchdog_token) = (self.stall_limit, token.clone());
            tracker.spawn(async move {
                let healthy = || {
                    stats.poller_heartbeat.is_healthy(stall_limit)
                        && stats.delivery_heartbeat.is_healthy(stall_limit)
                };
                notifier.run_watchdog(healthy, watchdog_token).await;
            });
        }
        tracker.close();
        token.cancelled().await;
        tracing::info!("stopping: finishing requests in flight");
        if let Some(notifier) = &self.notifier {
            notifier.send_logged("STOPPING=1\nSTATUS=stopping: finishing requests in flight");
        }
        if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "a request was still in flight at the shutdown deadline; its lines stay in the outbox");
        }
        self.outbox.flush().await.context("flushing the outbox")?;
        tracing::info!(outbox_depth = self.outbox.len(), "stopped");
        Ok(())
    }
}
