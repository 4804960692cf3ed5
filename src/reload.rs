//! Reloading the configuration without a restart: on SIGHUP (systemd's `ExecReload=`) the
//! configuration is loaded again, exactly as at start (defaults < file < `RELAY__…` environment).
//! `mapping.users`, `filter.*` and `privacy.*` take effect for the next line; any other key that
//! changed is logged as needing a restart; a configuration that does not load leaves the running one
//! in force, with one error line.
//!
//! Owns `Live` (the part of the configuration the stages read for every line, handed out through a
//! `watch` channel) and SIGHUP. Must not restart or rebuild a component: what cannot change while
//! running waits for a restart.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::avatars::AvatarMapper;
use crate::config::{ConfigError, PrivacySettings, Settings, Snapshot};
use crate::filter::Filter;

/// The keys a reload applies while the relay runs; every other key needs a restart.
pub const LIVE_KEYS: [&str; 3] = ["mapping.users", "filter", "privacy"];

/// The configuration the stages read for every line: the poller's filter and privacy commands, the
/// notice task's texts. Replaced whole by a reload.
#[derive(Debug)]
pub struct Live {
    /// `[filter]`, compiled.
    pub filter: Filter,
    /// `[privacy]`
    pub privacy: PrivacySettings,
}

impl Live {
    /// The live part of `settings`.
    pub fn new(settings: &Settings) -> Live {
        Live {
            filter: Filter::new(&settings.filter),
            privacy: settings.privacy.clone(),
        }
    }
}

/// Loads the configuration again and hands its live part to the running stages.
pub struct Reloader {
    /// The configuration file given at start (`--config`, `RELAY_CONFIG`), if any.
    file: Option<PathBuf>,
    /// The configuration in force: what the relay started with, with the live keys of the last
    /// reload. A snapshot, not the `Settings`: the password stays with `config` and the CMS client.
    running: Snapshot,
    live: watch::Sender<Arc<Live>>,
    mapper: Arc<AvatarMapper>,
}

impl Reloader {
    /// A reloader of `file` for a relay running `running`, whose stages read `live` and map
    /// speakers with `mapper`.
    pub fn new(
        file: Option<PathBuf>,
        running: Snapshot,
        live: watch::Sender<Arc<Live>>,
        mapper: Arc<AvatarMapper>,
    ) -> Reloader {
        Reloader {
            file,
            running,
            live,
            mapper,
        }
    }

    /// Loads the configuration again and applies it. Returns the changed keys that need a restart;
    /// on an error nothing changed.
    pub fn reload(&mut self) -> Result<Vec<String>, ConfigError> {
        let settings = Settings::load(self.file.as_deref(), &[])?;
        for warning in settings.warnings() {
            tracing::warn!("{warning}");
        }
        Ok(self.apply(&settings))
    }

    /// Applies the live keys of `settings`. Returns the other keys in which it differs from the
    /// configuration in force, which keeps their old values.
    pub fn apply(&mut self, settings: &Settings) -> Vec<String> {
        let loaded = settings.snapshot();
        let restart_keys = self.running.changed_keys(&loaded, is_live);
        self.mapper.set_users(&settings.mapping.users);
        self.live.send_replace(Arc::new(Live::new(settings)));
        self.running.adopt(&loaded, is_live);
        restart_keys
    }

    /// Reloads at every SIGHUP until `token` is cancelled. `hangup` is listened to from before the
    /// relay says it is ready (`on_hangup`): SIGHUP's default action ends the process.
    #[cfg(unix)]
    pub async fn run_until_stopped(
        mut self,
        mut hangup: tokio::signal::unix::Signal,
        token: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                received = hangup.recv() => if received.is_none() { return },
            }
            match self.reload() {
                Ok(restart_keys) => {
                    tracing::info!(
                        "configuration reloaded (SIGHUP): mapping.users, filter and privacy apply from the next line"
                    );
                    if !restart_keys.is_empty() {
                        tracing::warn!(
                            keys = %restart_keys.join(", "),
                            "configuration keys changed that take effect only after a restart"
                        );
                    }
                }
                Err(err) => tracing::error!(
                    error = %err,
                    "configuration reload (SIGHUP) failed; the running configuration stays in force"
                ),
            }
        }
    }
}

/// Listens for SIGHUP from now on (its default action, ending the process, no longer applies).
#[cfg(unix)]
pub fn on_hangup() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

/// Whether a reload applies `key` (a dotted key under one of `LIVE_KEYS`).
fn is_live(key: &str) -> bool {
    LIVE_KEYS
        .iter()
        .any(|live| key == *live || key.starts_with(&format!("{live}.")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(overrides: &[(&str, &str)]) -> Settings {
        let mut all = vec![("cms.username", "relay"), ("cms.password", "pw")];
        all.extend_from_slice(overrides);
        Settings::load(None, &all).expect("loads")
    }

    #[test]
    fn only_keys_outside_the_live_ones_need_a_restart() {
        let running = load(&[]);
        let loaded = load(&[
            ("filter.ignore_speakers", "Greeter Bot"),
            ("privacy.notice", "recorded"),
            ("mapping.users.alice", "3"),
            ("viewer.poll_interval", "2s"),
            ("cms.password", "changed"),
        ]);
        assert_eq!(
            running.snapshot().changed_keys(&loaded.snapshot(), is_live),
            ["cms.password", "viewer.poll_interval"]
        );
        assert!(
            running
                .snapshot()
                .changed_keys(&load(&[]).snapshot(), is_live)
                .is_empty()
        );
    }
}
