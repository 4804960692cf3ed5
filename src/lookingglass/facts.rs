//! What the viewer tells besides chat, read off the ingest and delivery paths: its own avatar's name
//! (`viewer.status_url`, so the poller never relays the relay's own lines) and the avatars in view
//! (`viewer.avatars_url`, name → UUID for `avatars`). `FactsReader` is the one task that reads them;
//! `ViewerFacts` is what it learned, which the poller and the avatar mapper read without waiting.
//!
//! A URL the viewer never answers (a wrong path hangs for ever, spec §1.4) costs one
//! `SIDE_READ_LIMIT` per `UNANSWERED_RETRY`, warned about once; one that fails otherwise is warned
//! about once too, except an unreachable viewer or one refusing the `Host` (the poller reports
//! those). Every read takes its turn
//! at the client's gate like any other request. Must not read the chat URL.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::lookingglass::{LookingGlassClient, ViewerError};

/// How often the viewer's own name is read again (it changes only when the viewer logs in as
/// someone else).
pub const OWN_NAME_REFRESH: Duration = Duration::from_secs(60);

/// How often the avatar list may be read again when a name is missing from it.
pub const AVATAR_LIST_REFRESH: Duration = Duration::from_secs(5);

/// How long a URL that did not answer waits before it is tried again.
pub const UNANSWERED_RETRY: Duration = Duration::from_secs(300);

/// What the side reads learned. Share it as `Arc<ViewerFacts>`.
#[derive(Debug)]
pub struct ViewerFacts {
    /// The viewer's own avatar, once a status read told it (kept when later reads fail).
    own_name: Mutex<Option<String>>,
    /// Lower-cased avatar name → UUID, from the last avatar list read.
    avatars: Mutex<HashMap<String, String>>,
    /// Set once an avatar list was read.
    avatars_read: std::sync::atomic::AtomicBool,
    /// Set once the first status read has ended, whatever its outcome.
    status_settled: watch::Sender<bool>,
    /// Asks the reader for a fresh avatar list.
    want_avatars: Notify,
}

impl Default for ViewerFacts {
    fn default() -> Self {
        ViewerFacts {
            own_name: Mutex::new(None),
            avatars: Mutex::new(HashMap::new()),
            avatars_read: std::sync::atomic::AtomicBool::new(false),
            status_settled: watch::Sender::new(false),
            want_avatars: Notify::new(),
        }
    }
}

impl ViewerFacts {
    /// The viewer's own avatar name, when a status read told it.
    pub fn own_name(&self) -> Option<String> {
        lock(&self.own_name).clone()
    }

    /// Resolves once the first status read has ended (at once without a status URL), so the first
    /// chat GET knows the own name if the viewer tells it.
    pub async fn first_status_read(&self) {
        let mut settled = self.status_settled.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = settled.wait_for(|settled| *settled).await;
    }

    /// The UUID of the avatar `name` (lower-cased) in the last avatar list, if it was in view.
    pub fn avatar_uuid(&self, name: &str) -> Option<String> {
        lock(&self.avatars).get(name).cloned()
    }

    /// The last avatar list read (lower-cased name → UUID), `None` before the first one.
    pub fn avatar_list(&self) -> Option<HashMap<String, String>> {
        self.avatars_read
            .load(std::sync::atomic::Ordering::Acquire)
            .then(|| lock(&self.avatars).clone())
    }

    /// Asks for a fresh avatar list (a name was missing); does not wait for it.
    pub fn want_avatars(&self) {
        self.want_avatars.notify_one();
    }

    fn settle_status(&self) {
        self.status_settled.send_replace(true);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each critical section is one assignment or clone: a poisoned lock still holds a whole value.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The side reads of one URL: when it is due, and whether its failure was told.
#[derive(Debug)]
struct SideUrl {
    /// The config key, for the operator.
    key: &'static str,
    /// When it may be read next.
    next: Instant,
    /// Whether the current run of failures was warned about.
    warned: bool,
}

/// How a failed side read is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Told {
    /// At warn: the first failure of a run, which an operator must fix.
    Warn,
    /// At debug: a repeat, or an unreachable viewer (the poller warns about that).
    Debug,
}

impl SideUrl {
    fn new(key: &'static str) -> SideUrl {
        SideUrl {
            key,
            next: Instant::now(),
            warned: false,
        }
    }

    /// Notes a failed read at `now` and says how to log it; the next read is due after `retry`,
    /// or `UNANSWERED_RETRY` when the viewer did not answer at all.
    fn failed(&mut self, err: &ViewerError, now: Instant, retry: Duration) -> Told {
        let unanswered = matches!(err, ViewerError::Unanswered { .. });
        self.next = now + if unanswered { UNANSWERED_RETRY } else { retry };
        // An unreachable viewer, or one refusing the Host header, is the poller's to report: its
        // warning names the fix for every viewer URL.
        let the_pollers = match err {
            ViewerError::Transport(_) => true,
            ViewerError::Status { hint, .. } => !hint.is_empty(),
            _ => false,
        };
        if self.warned || the_pollers {
            return Told::Debug;
        }
        self.warned = true;
        Told::Warn
    }

    /// Notes an answered read at `now`; whether it ends a run of failures that was warned about.
    fn answered(&mut self, now: Instant, refresh: Duration) -> bool {
        self.next = now + refresh;
        std::mem::replace(&mut self.warned, false)
    }

    fn log_failure(&self, err: &ViewerError, told: Told, url: &str) {
        let retry_in = self.next.saturating_duration_since(Instant::now());
        match told {
            Told::Warn if matches!(err, ViewerError::Unanswered { .. }) => tracing::warn!(
                key = self.key,
                url,
                error = %err,
                ?retry_in,
                "{} {url} is not answered: the viewer never answers a path it does not serve; check \
                 the path (LookingGlass: /api/LLLP/status, /api/avatars) or set {} empty (the relay \
                 goes on without it and tries again now and then)",
                self.key,
                self.key
            ),
            Told::Warn => tracing::warn!(
                key = self.key,
                url,
                error = %err,
                ?retry_in,
                "{} {url} fails; check it or set {} empty (the relay goes on without it and tries \
                 again now and then)",
                self.key,
                self.key
            ),
            Told::Debug => {
                tracing::debug!(key = self.key, error = %err, ?retry_in, "viewer side read failed")
            }
        }
    }
}

/// The one task that reads the viewer's status and avatar list.
pub struct FactsReader {
    viewer: LookingGlassClient,
    facts: std::sync::Arc<ViewerFacts>,
}

impl FactsReader {
    /// A reader for `viewer` that tells `facts`.
    pub fn new(viewer: LookingGlassClient, facts: std::sync::Arc<ViewerFacts>) -> FactsReader {
        FactsReader { viewer, facts }
    }

    /// Reads the status at once and every `OWN_NAME_REFRESH`, and the avatar list whenever a name is
    /// missing from it (at most every `AVATAR_LIST_REFRESH`), until `stop`.
    pub async fn run_until_stopped(self, stop: CancellationToken) {
        let mut status = self
            .viewer
            .status_url()
            .map(|url| (SideUrl::new("viewer.status_url"), url.to_owned()));
        let mut avatars = self
            .viewer
            .avatars_url()
            .map(|url| (SideUrl::new("viewer.avatars_url"), url.to_owned()));
        if status.is_none() {
            self.facts.settle_status();
        }
        let mut avatars_wanted = false;
        while !stop.is_cancelled() {
            let now = Instant::now();
            if let Some((side, url)) = status.as_mut().filter(|(side, _)| side.next <= now) {
                self.read_status(side, url, &stop).await;
                self.facts.settle_status();
            }
            let now = Instant::now();
            if let Some((side, url)) = avatars
                .as_mut()
                .filter(|(side, _)| avatars_wanted && side.next <= now)
            {
                self.read_avatars(side, url, &stop).await;
                avatars_wanted = false;
            }
            let next_status = status.as_ref().map(|(side, _)| side.next);
            let next_avatars = avatars
                .as_ref()
                .filter(|_| avatars_wanted)
                .map(|(side, _)| side.next);
            let wake = next_status.into_iter().chain(next_avatars).min();
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = self.facts.want_avatars.notified() => avatars_wanted = avatars.is_some(),
                _ = sleep_until(wake) => {}
            }
        }
        // Nothing waits for a status read that will not come.
        self.facts.settle_status();
    }

    async fn read_status(&self, side: &mut SideUrl, url: &str, stop: &CancellationToken) {
        match self.viewer.own_name(stop).await {
            Ok(name) => {
                if side.answered(Instant::now(), OWN_NAME_REFRESH) {
                    tracing::info!(key = side.key, url, "the viewer answers its status again");
                }
                let Some(name) = name else { return };
                let mut own = lock(&self.facts.own_name);
                if own.as_deref() != Some(name.as_str()) {
                    tracing::info!(own_name = %name, "the viewer's own avatar will not be relayed");
                    *own = Some(name);
                }
            }
            Err(ViewerError::Stopping) => {}
            Err(err) => {
                let told = side.failed(&err, Instant::now(), OWN_NAME_REFRESH);
                side.log_failure(&err, told, url);
            }
        }
    }

    async fn read_avatars(&self, side: &mut SideUrl, url: &str, stop: &CancellationToken) {
        match self.viewer.avatars(stop).await {
            Ok(list) => {
                if side.answered(Instant::now(), AVATAR_LIST_REFRESH) {
                    tracing::info!(
                        key = side.key,
                        url,
                        "the viewer answers its avatar list again"
                    );
                }
                *lock(&self.facts.avatars) = list;
                self.facts
                    .avatars_read
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            Err(ViewerError::Stopping) => {}
            Err(err) => {
                let told = side.failed(&err, Instant::now(), AVATAR_LIST_REFRESH);
                side.log_failure(&err, told, url);
            }
        }
    }
}

/// Sleeps until `at`, or for ever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_failures_is_warned_about_once_and_again_after_an_answer() {
        let mut side = SideUrl::new("viewer.status_url");
        let now = Instant::now();
        let unanswered = ViewerError::Unanswered {
            waited: Duration::from_secs(5),
        };
        let told: Vec<Told> = (0..4)
            .map(|_| side.failed(&unanswered, now, OWN_NAME_REFRESH))
            .collect();
        assert_eq!(told, [Told::Warn, Told::Debug, Told::Debug, Told::Debug]);
        assert_eq!(
            side.next,
            now + UNANSWERED_RETRY,
            "a silent URL is tried rarely"
        );

        assert!(side.answered(now, OWN_NAME_REFRESH), "the recovery is told");
        assert!(!side.answered(now, OWN_NAME_REFRESH));
        let refused = ViewerError::Status {
            status: 500,
            hint: "",
            snippet: String::new(),
        };
        assert_eq!(side.failed(&refused, now, OWN_NAME_REFRESH), Told::Warn);
        assert_eq!(side.next, now + OWN_NAME_REFRESH);
    }
}
