//! `Relay`: builds every component from `Settings` and runs the stages until stopped.
//!
//! The only module that knows every component and spawns tasks. Shutdown: the token is cancelled, the
//! poller finishes the GET it has in flight and stores it, delivery finishes the POST it has in flight,
//! both within `SHUTDOWN_GRACE`; then the outbox is flushed.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::avatars::AvatarMapper;
use crate::backoff::RetryPolicy;
use crate::cms::CmsClient;
use crate::cms::client::CmsEndpoint;
use crate::config::Settings;
use crate::delivery::Delivery;
use crate::filter::Filter;
use crate::inworld::{Inworld, RecentlySaid};
use crate::lookingglass::LookingGlassClient;
use crate::metrics::Stats;
use crate::outbox::{Limits, Outbox};
use crate::poller::Poller;

/// How long the stages get to finish their requests after a stop: the process must exit within 10 s
/// of SIGTERM (systemd's and Docker's patience is longer, an operator's is not).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(9);

/// The relay, built and ready to run.
pub struct Relay {
    outbox: Arc<Outbox>,
    stats: Arc<Stats>,
    cms: Arc<CmsClient>,
    poller: Poller,
    delivery: Delivery,
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
        let poller = Poller::new(
            viewer.clone(),
            Filter::new(&settings.filter),
            outbox.clone(),
            settings.viewer.timezone,
            settings.viewer.poll_interval,
            stats.clone(),
            recently_said.clone(),
        );
        let retry = RetryPolicy {
            initial: settings.retry.initial,
            max: settings.retry.max,
        };
        let delivery = Delivery::new(
            outbox.clone(),
            cms.clone(),
            mapper,
            settings.cms.clone(),
            retry,
            stats.clone(),
        );
        let inworld = settings.inworld.enabled.then(|| {
            Inworld::new(
                cms.clone(),
                viewer,
                outbox.clone(),
                settings.inworld.clone(),
                settings.cms.timezone,
                stats.clone(),
                recently_said,
            )
        });
        Ok(Relay {
            outbox,
            stats,
            cms,
            poller,
            delivery,
            inworld,
        })
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
        tracker.close();
        token.cancelled().await;
        tracing::info!("stopping: finishing requests in flight");
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
