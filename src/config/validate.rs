//! The checks of `Settings` across keys, run once when it is loaded (at start and at a reload): each
//! error names its key and says how to fix it. Must not: warn (`Settings::warnings`), or open anything.

use std::time::Duration;

use secrecy::ExposeSecret;

use super::regions::entry_error;
use super::{ConfigError, Settings, ViewerSettings};

/// The chat types the viewer produces (spec §2.5); anything else in `filter.types` is a typo.
const KNOWN_TYPES: [&str; 5] = ["Normal", "Whisper", "Shout", "Debug", "OwnerSay"];
impl Settings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| ConfigError::Invalid {
            key,
            reason: reason.to_owned(),
        };
        validate_viewer(&self.viewer)?;
        // Without [[regions]] the only region is [viewer] itself, checked above.
        if !self.regions.is_empty() {
            for (index, region) in self.regions().iter().enumerate() {
                validate_viewer(&region.viewer).map_err(|err| match err {
                    ConfigError::Invalid { key, reason } => entry_error(
                        index,
                        &region.name,
                        key.strip_prefix("viewer.").unwrap_or(key),
                        &reason,
                    ),
                    other => other,
                })?;
            }
        }
        check_url("cms.base_url", &self.cms.base_url)?;
        if self.cms.username.is_empty() {
            return Err(invalid(
                "cms.username",
                "is required (the relay's CMS account)",
            ));
        }
        let has_password = !self.cms.password.expose_secret().is_empty();
        match (&self.cms.password_file, has_password) {
            (None, false) => {
                return Err(invalid(
                    "cms.password",
                    "is required (or set cms.password_file)",
                ));
            }
            (Some(_), true) => {
                return Err(invalid(
                    "cms.password_file",
                    "set either cms.password or cms.password_file, not both",
                ));
            }
            _ => {}
        }
        if !self.cms.anonymous_format.contains("{message}") {
            return Err(invalid("cms.anonymous_format", "must contain {message}"));
        }
        if self.cms.batch_max_messages == 0 {
            return Err(invalid("cms.batch_max_messages", "must be at least 1"));
        }
        if self.cms.batch_max_bytes < 1024 {
            return Err(invalid("cms.batch_max_bytes", "must be at least 1024"));
        }
        if self.cms.request_timeout.is_zero() {
            return Err(invalid("cms.request_timeout", "must be more than 0"));
        }
        if let Some(unknown) = self
            .filter
            .types
            .iter()
            .find(|t| !KNOWN_TYPES.contains(&t.as_str()))
        {
            return Err(ConfigError::Invalid {
                key: "filter.types",
                reason: format!(
                    "unknown type {unknown:?} (known: {})",
                    KNOWN_TYPES.join(", ")
                ),
            });
        }
        let privacy = &self.privacy;
        if !privacy.optout_command.trim().is_empty()
            && privacy
                .optout_command
                .trim()
                .eq_ignore_ascii_case(privacy.optin_command.trim())
        {
            return Err(invalid(
                "privacy.optin_command",
                "must differ from privacy.optout_command",
            ));
        }
        if self.retry.initial.is_zero() || self.retry.max < self.retry.initial {
            return Err(invalid("retry.max", "need 0 < retry.initial <= retry.max"));
        }
        if self.retry.max_line_failures == 0 {
            return Err(invalid("retry.max_line_failures", "must be at least 1"));
        }
        if self.inworld.enabled {
            if self.inworld.poll_interval.is_zero() {
                return Err(invalid("inworld.poll_interval", "must be more than 0"));
            }
            if !(self.inworld.max_lines_per_second > 0.0
                && self.inworld.max_lines_per_second <= 100.0)
            {
                return Err(invalid(
                    "inworld.max_lines_per_second",
                    "must be more than 0 and at most 100",
                ));
            }
            if !self.inworld.format.contains("{message}") {
                return Err(invalid("inworld.format", "must contain {message}"));
            }
            if self.inworld.max_queue == 0 {
                return Err(invalid("inworld.max_queue", "must be at least 1"));
            }
        }
        if self.outbox.max_bytes < 4096 {
            return Err(invalid("outbox.max_bytes", "must be at least 4096"));
        }
        if self.outbox.max_age.is_zero() {
            return Err(invalid("outbox.max_age", "must be more than 0"));
        }
        if !(self.cms.max_requests_per_second >= 0.0
            && self.cms.max_requests_per_second.is_finite())
        {
            return Err(invalid(
                "cms.max_requests_per_second",
                "must be 0 (no cap) or more",
            ));
        }
        if self.outbox.path.as_os_str().is_empty() {
            return Err(invalid("outbox.path", "is required"));
        }
        Ok(())
    }
}

/// The checks of one viewer's keys, named as `[viewer]`'s (`viewer.chat_url`); a `[[regions]]`
/// entry's errors are renamed to its own keys by the caller.
fn validate_viewer(viewer: &ViewerSettings) -> Result<(), ConfigError> {
    let invalid = |key, reason: &str| ConfigError::Invalid {
        key,
        reason: reason.to_owned(),
    };
    check_url("viewer.chat_url", &viewer.chat_url)?;
    if let Some(url) = &viewer.avatars_url {
        check_url("viewer.avatars_url", url)?;
    }
    if let Some(url) = &viewer.status_url {
        check_url("viewer.status_url", url)?;
    }
    if !(viewer.hearing_range.is_finite() && viewer.hearing_range > 0.0) {
        return Err(invalid(
            "viewer.hearing_range",
            "must be more than 0 metres (OpenSim's say_distance, 20 by default)",
        ));
    }
    if let Some(login) = &viewer.login {
        login.validate()?;
    }
    if viewer.poll_interval.is_zero() {
        return Err(invalid("viewer.poll_interval", "must be more than 0"));
    }
    if viewer.request_timeout < Duration::from_secs(30) {
        return Err(invalid(
            "viewer.request_timeout",
            "must be at least 30s: ending a viewer request early can abort a response, which kills the viewer",
        ));
    }
    if viewer.max_response_bytes < 4096 {
        return Err(invalid(
            "viewer.max_response_bytes",
            "must be at least 4096",
        ));
    }
    Ok(())
}

fn check_url(key: &'static str, url: &str) -> Result<(), ConfigError> {
    match reqwest::Url::parse(url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some() => {
            Ok(())
        }
        Ok(_) => Err(ConfigError::Invalid {
            key,
            reason: format!("{url:?} is not an http(s) URL"),
        }),
        Err(err) => Err(ConfigError::Invalid {
            key,
            reason: format!("{url:?} is not a URL: {err}"),
        }),
    }
}
