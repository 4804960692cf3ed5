//! What the relay says in-world on its own: the privacy notice (`privacy.notice`, at start and every
//! `privacy.notice_interval`), the notice for avatars arriving (`privacy.greet`, from the viewer's
//! avatar list, once a day each), and the confirmations of the privacy commands the poller hands
//! over.
//!
//! Every text goes through the viewer's chat POST on channel 0 and into the echo memory first
//! (`echo::RecentlySaid`), so that its echo is never relayed to the CMS as chat. Must not read the
//! viewer's chat URL with a GET (that is the poller's) or touch the outbox.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::SayType;
use crate::echo::RecentlySaid;

use crate::lookingglass::{LookingGlassClient, ViewerError, ViewerFacts};
use crate::privacy::{self, Privacy};
use crate::reload::Live;
use crate::say::{say_part, split_message};

/// How often the viewer's avatar list is read for arrivals while `privacy.greet` is on: a small GET
/// the viewer answers at once, and an arrival hears the notice within seconds.
const GREET_CHECK: Duration = Duration::from_secs(3);

/// With `privacy.greet`, the notice at start waits this long at most for the first avatar list:
/// that list records who heard it, so an avatar who arrives between the notice and a later first
/// list would be taken as having heard it and never be greeted.
const FIRST_LIST_WAIT: Duration = Duration::from_secs(10);

/// An avatar is greeted at most once in this long.
const GREET_AGAIN_AFTER: Duration = Duration::from_secs(24 * 3600);

/// How soon a notice the viewer did not take is tried again.
const NOTICE_RETRY: Duration = Duration::from_secs(10);

/// The pause between two texts, and two parts of a long one: the in-world relay's default pace.
const SAY_PACE: Duration = Duration::from_millis(500);

/// How many confirmations may wait to be said; beyond, the poller drops them (and logs it).
pub const QUEUE: usize = 64;

/// What the notice task is built from.
pub struct NoticeDeps {
    /// Who says it.
    pub viewer: LookingGlassClient,
    /// The viewer's avatar list, as the side reads last saw it (arrivals are greeted from it; the
    /// notice never reads the viewer itself, so a wrong `avatars_url` cannot hold up polling).
    pub facts: Arc<ViewerFacts>,
    /// The `{region}` text of the notice.
    pub region_label: String,
    /// The notice, the greeting switch, the commands (reloaded with the configuration).
    pub live: watch::Receiver<Arc<Live>>,
    /// Who opted out (they are not greeted).
    pub privacy: Arc<Privacy>,
    /// What was said lately (shared with the poller, which drops its echo).
    pub recently_said: Arc<RecentlySaid>,
    /// Confirmations from the poller.
    pub confirmations: mpsc::Receiver<String>,
    /// How loud (`inworld.type`).
    pub say_type: SayType,
}

/// The notice task.
pub struct Notice {
    deps: NoticeDeps,
    /// A said part is not sent once this is cancelled (`run_until_stopped`'s token).
    stop: CancellationToken,
    /// The configuration's sender is gone (the relay is stopping): nothing will change any more.
    live_closed: bool,
    /// When the notice was last said, and which text.
    said: Option<(Instant, String)>,
    /// The notice could not be said: the next try.
    retry_at: Option<Instant>,
    /// The avatars (UUIDs) in the last avatar list; `None` until one was read.
    present: Option<HashSet<String>>,
    /// When each avatar was last greeted.
    greeted: HashMap<String, Instant>,
    next_greet_check: Instant,
    /// When the task started (`FIRST_LIST_WAIT` runs from there).
    started: Instant,
}

impl Notice {
    /// Builds the task.
    pub fn new(deps: NoticeDeps) -> Notice {
        Notice {
            deps,
            live_closed: false,
            said: None,
            retry_at: None,
            present: None,
            greeted: HashMap::new(),
            next_greet_check: Instant::now(),
            started: Instant::now(),
            stop: CancellationToken::new(),
        }
    }

    /// Says notices and confirmations until `token` is cancelled.
    pub async fn run_until_stopped(mut self, token: CancellationToken) {
        self.stop = token.clone();
        loop {
            let live = self.deps.live.borrow_and_update().clone();
            let notice = privacy::notice(&live.privacy, &self.deps.region_label);
            // Arrivals first: the first list read, before the notice at start, records who hears it.
            if live.privacy.greet
                && let Some(text) = &notice
                && Instant::now() >= self.next_greet_check
            {
                self.next_greet_check = Instant::now() + GREET_CHECK;
                if self.arrivals().await > 0 {
                    self.say_notice(text, "privacy notice said for avatars arriving")
                        .await;
                }
            }
            if let Some(text) = &notice
                && self.notice_due(text, &live, Instant::now())
            {
                self.say_notice(text, "privacy notice said in-world").await;
            }
            let wake = self.next_wake(notice.as_deref(), &live);
            tokio::select! {
                _ = token.cancelled() => return,
                confirmation = self.deps.confirmations.recv() => match confirmation {
                    Some(text) => {
                        if let Err(err) = self.say(&text).await {
                            tracing::warn!(error = %err, "privacy confirmation could not be said in-world");
                        }
                    }
                    None => return,
                },
                changed = self.deps.live.changed(), if !self.live_closed => {
                    self.live_closed = changed.is_err();
                }
                _ = sleep_until(wake) => {}
            }
        }
    }

    /// Whether the notice `text` is to be said now: never said, changed, or its interval passed (a
    /// failed try waits for `retry_at`). The first one waits for the first avatar list when
    /// arrivals are greeted (`FIRST_LIST_WAIT`).
    fn notice_due(&self, text: &str, live: &Live, now: Instant) -> bool {
        if self.retry_at.is_some_and(|at| now < at) {
            return false;
        }
        match &self.said {
            None => {
                !live.privacy.greet
                    || self.present.is_some()
                    || now >= self.started + FIRST_LIST_WAIT
            }
            Some((_, said)) if said != text => true,
            Some((at, _)) => {
                let interval = live.privacy.notice_interval;
                !interval.is_zero() && now >= *at + interval
            }
        }
    }

    /// When the loop is next due without being woken: the notice's next time, the next greeting
    /// check; `None` waits for a confirmation or a reload.
    fn next_wake(&self, notice: Option<&str>, live: &Live) -> Option<Instant> {
        notice?;
        let interval = live.privacy.notice_interval;
        let next_notice = match (&self.said, self.retry_at) {
            (_, Some(retry)) => Some(retry),
            (Some((at, _)), None) if !interval.is_zero() => Some(*at + interval),
            _ => None,
        };
        let next_greet = live.privacy.greet.then_some(self.next_greet_check);
        [next_notice, next_greet].into_iter().flatten().min()
    }

    async fn say_notice(&mut self, text: &str, what: &'static str) {
        match self.say(text).await {
            Ok(()) => {
                tracing::info!("{what}");
                self.said = Some((Instant::now(), text.to_owned()));
                self.retry_at = None;
            }
            Err(err) => {
                tracing::warn!(error = %err, retry_in = ?NOTICE_RETRY, "privacy notice could not be said in-world");
                self.retry_at = Some(Instant::now() + NOTICE_RETRY);
            }
        }
    }

    /// Reads the avatar list and counts the avatars that arrived since the last read and were not
    /// greeted within a day (nor opted out). The first list only records who is there: they heard
    /// the notice at start.
    async fn arrivals(&mut self) -> usize {
        // A fresh list for the next check; this one works from the last list read.
        self.deps.facts.want_avatars();
        let Some(avatars) = self.deps.facts.avatar_list() else {
            tracing::debug!("no viewer avatar list read yet; nobody greeted");
            return 0;
        };
        let now = Instant::now();
        self.greeted
            .retain(|_, at| now.duration_since(*at) < GREET_AGAIN_AFTER);
        let uuids: HashSet<String> = avatars.values().cloned().collect();
        let Some(present) = self.present.replace(uuids) else {
            for uuid in avatars.values() {
                self.greeted.insert(uuid.clone(), now);
            }
            return 0;
        };
        let mut n_arrived = 0;
        for (name, uuid) in &avatars {
            if present.contains(uuid)
                || self.greeted.contains_key(uuid)
                || self.deps.privacy.is_opted_out(name, Some(uuid))
            {
                continue;
            }
            self.greeted.insert(uuid.clone(), now);
            n_arrived += 1;
        }
        n_arrived
    }

    /// Says `text` on channel 0, in parts the viewer takes, each recorded in the echo memory before
    /// its POST.
    async fn say(&self, text: &str) -> Result<(), ViewerError> {
        for part in split_message(text) {
            say_part(
                &self.deps.viewer,
                &self.deps.recently_said,
                &part,
                0,
                self.deps.say_type.as_str(),
                &self.stop,
            )
            .await?;
            tokio::time::sleep(SAY_PACE).await;
        }
        Ok(())
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
