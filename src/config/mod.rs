//! The `Settings` tree: layered loading, validation, and redacted printing for `check-config`.
//! How each value is read from its text (and the password masked when printed) is `fields`'s.
//! Longer than the code map's 600 lines on purpose: one concern, the settings tree, one struct per
//! section with a `///` on every key, and the validation across keys.
//!
//! Layers, lowest first: `config/default.toml` (embedded in the binary), the file named by `--config`
//! or `RELAY_CONFIG`, then environment variables `RELAY__SECTION__KEY`. Every struct denies unknown
//! keys, so a typo stops start-up with the key's name. This module opens no sockets and no files other
//! than the config file, `cms.password_file` and `cms.ca_file`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::pacing::PacingSettings;
use crate::zone::Zone;

mod fields;
mod viewer_login;
use fields::{
    boolean, display, empty_addr_is_none, empty_is_none, empty_path_is_none, float, integer,
    masked, none_is_empty, pattern_list, string_list, user_map,
};
pub use viewer_login::ViewerLoginSettings;

/// The built-in defaults, embedded so the binary runs without any file next to it.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Why the configuration could not be loaded. The message names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be read or parsed, or a value has the wrong type.
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// The effective configuration cannot be printed as TOML (e.g. a path that is not UTF-8).
    #[error("configuration: cannot print it as TOML: {0}")]
    Print(String),
    /// A value is well-typed but unusable.
    #[error("configuration: key `{key}`: {reason}")]
    Invalid {
        /// The dotted key, e.g. `cms.base_url`.
        key: &'static str,
        /// What is wrong with it and how to fix it.
        reason: String,
    },
}

/// Everything the relay reads from its configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The LookingGlass viewer chat interface.
    pub viewer: ViewerSettings,
    /// The OpenSim-CMS API.
    pub cms: CmsSettings,
    /// Avatar name to CMS user mapping.
    pub mapping: MappingSettings,
    /// Which viewer lines are relayed, and what is redacted in them.
    pub filter: FilterSettings,
    /// Opting out in-world, and the notice that chat is recorded.
    pub privacy: PrivacySettings,
    /// CMS → in-world.
    pub inworld: InworldSettings,
    /// The durable outbox.
    pub outbox: OutboxSettings,
    /// Retry schedule for CMS deliveries.
    pub retry: RetrySettings,
    /// Logging.
    pub log: LogSettings,
    /// The health, readiness and metrics endpoint.
    pub http: HttpSettings,
}

/// `[viewer]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ViewerSettings {
    /// The chat URL; every GET drains the viewer's queue.
    pub chat_url: String,
    /// `/api/avatars`, used to map a name to an avatar UUID; `None` when empty.
    #[serde(deserialize_with = "empty_is_none", serialize_with = "none_is_empty")]
    pub avatars_url: Option<String>,
    /// `/api/LLLP/status`, used to learn the viewer's own name; `None` when empty.
    #[serde(deserialize_with = "empty_is_none", serialize_with = "none_is_empty")]
    pub status_url: Option<String>,
    /// Pause between the end of one poll and the next GET.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// The viewer machine's clock, used to rebuild each line's time.
    #[serde(serialize_with = "display")]
    pub timezone: Zone,
    /// Inactivity limit on a viewer request (never below 30 s).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The most of one viewer answer held; the rest is read and discarded.
    pub max_response_bytes: usize,
    /// The region the viewer must be in; empty: `viewer.login.region`, or any region.
    pub region: String,
    /// How far the viewer's avatar hears, metres (OpenSim's `say_distance`, 20 by default).
    #[serde(deserialize_with = "float")]
    pub hearing_range: f64,
    /// `[viewer.login]`, optional: the viewer's own login, for the relay to bring it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<ViewerLoginSettings>,
}

impl ViewerSettings {
    /// The region the viewer must be in: `viewer.region`, else `viewer.login.region`, else none.
    pub fn expected_region(&self) -> Option<&str> {
        let region = self.region.trim();
        if !region.is_empty() {
            return Some(region);
        }
        self.login.as_ref().map(|login| login.region.trim())
    }
}

/// `[cms]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CmsSettings {
    /// E.g. `http://127.0.0.1/OpenSim-CMS/api`, without a trailing slash.
    pub base_url: String,
    /// The CMS's `grids.id`.
    #[serde(deserialize_with = "integer")]
    pub grid_id: u32,
    /// The relay's CMS account.
    pub username: String,
    /// The password, unless `password_file` is used.
    #[serde(serialize_with = "masked")]
    pub password: SecretString,
    /// A file holding the password (a systemd credential, a Docker secret); `None` when empty.
    #[serde(
        deserialize_with = "empty_path_is_none",
        serialize_with = "none_is_empty"
    )]
    pub password_file: Option<PathBuf>,
    /// A PEM bundle trusted for the CMS's certificate besides the system's store (a private CA, a
    /// self-signed certificate); `None` when empty.
    #[serde(
        deserialize_with = "empty_path_is_none",
        serialize_with = "none_is_empty"
    )]
    pub ca_file: Option<PathBuf>,
    /// The CMS server's clock.
    #[serde(serialize_with = "display")]
    pub timezone: Zone,
    /// The user id of unmapped speakers (-1 for OpenSim-CMS 1.1).
    #[serde(deserialize_with = "integer")]
    pub anonymous_user_id: i64,
    /// Message of an unmapped speaker, with `{name}` and `{message}`.
    pub anonymous_format: String,
    /// At most this many lines per POST.
    #[serde(deserialize_with = "integer")]
    pub batch_max_messages: usize,
    /// At most this many bytes of JSON per POST.
    #[serde(deserialize_with = "integer")]
    pub batch_max_bytes: usize,
    /// How long a batch that is not full waits for more lines.
    #[serde(with = "humantime_serde")]
    pub batch_linger: Duration,
    /// Limit on one CMS request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A CMS answer larger than this is refused.
    #[serde(deserialize_with = "integer")]
    pub max_response_bytes: usize,
    /// CMS requests of the delivery per second at most (0 = no cap): a hard cap on top of the
    /// adaptive pacing.
    #[serde(deserialize_with = "float")]
    pub max_requests_per_second: f64,
    /// Delivery finds the pace the CMS can take from its answer times (`pacing`); off, only
    /// `max_requests_per_second` paces it.
    #[serde(deserialize_with = "boolean")]
    pub adaptive_pacing: bool,
    /// Read back every batch after `success: true` (OpenSim-CMS 1.1 can report success for a batch
    /// that lost a middle line). Off: batches are read back only when the returned id leaves a gap.
    #[serde(deserialize_with = "boolean")]
    pub verify: bool,
    /// Post one `[relay] …` line to the CMS chat for each stretch the relay knows it did not record
    /// (the viewer out of its region, lines dropped by the outbox bounds, a quarantined answer).
    #[serde(deserialize_with = "boolean")]
    pub gap_markers: bool,
}

/// What delivery takes from `[cms]`: how rows are made, batched and paced. Built by
/// `CmsSettings::delivery`; it has no address, account or password, which stay with `CmsClient`
/// (the keys stay in `[cms]`, where operators know them).
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// `cms.timezone`: the zone a row's timestamp is written in.
    pub timezone: Zone,
    /// `cms.anonymous_user_id`
    pub anonymous_user_id: i64,
    /// `cms.anonymous_format`
    pub anonymous_format: String,
    /// `cms.batch_max_messages`
    pub batch_max_messages: usize,
    /// `cms.batch_max_bytes`
    pub batch_max_bytes: usize,
    /// `cms.batch_linger`
    pub batch_linger: Duration,
    /// `cms.adaptive_pacing` and `cms.max_requests_per_second` (0 = no cap).
    pub pacing: PacingSettings,
    /// `cms.verify`
    pub verify: bool,
}

/// `[mapping]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MappingSettings {
    /// Avatar name to CMS user id, checked before any lookup (names compare case-insensitively).
    #[serde(deserialize_with = "user_map")]
    pub users: BTreeMap<String, i64>,
    /// How long a lookup result (found or not) is remembered.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
}

/// `[filter]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSettings {
    /// Chat `Type`s relayed (Normal, Whisper, Shout, and optionally Debug, OwnerSay).
    #[serde(deserialize_with = "string_list")]
    pub types: Vec<String>,
    /// Relay lines said by objects too.
    #[serde(deserialize_with = "boolean")]
    pub objects: bool,
    /// Speakers never relayed (other bots, the region owner's scripts); names compare
    /// case-insensitively.
    #[serde(deserialize_with = "string_list")]
    pub ignore_speakers: Vec<String>,
    /// Lines whose text matches one of these regular expressions are not relayed.
    #[serde(deserialize_with = "pattern_list")]
    pub ignore_messages: Vec<Pattern>,
    /// Rewrites of the text before it is stored, applied in order (e-mail addresses, phone numbers).
    pub redact: Vec<Redaction>,
}

/// One `filter.redact` entry: every match of `pattern` in a line's text becomes `replacement`
/// (`$1` or `${name}` insert a group; `$$` is a dollar sign).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Redaction {
    /// What to find.
    pub pattern: Pattern,
    /// What it becomes.
    pub replacement: String,
}

/// A regular expression of the configuration (`regex` syntax), compiled when it is loaded, so that a
/// bad one stops start-up (and a reload) naming its key and the pattern's error.
#[derive(Debug, Clone)]
pub struct Pattern(regex::Regex);

impl Pattern {
    /// Compiles `text`; the error is one line: the pattern and what is wrong with it.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        regex::Regex::new(text).map(Pattern).map_err(|err| {
            // regex's syntax errors span several lines (the pattern, a caret, `error: …`): the
            // last line says what is wrong.
            let shown = err.to_string();
            let reason = shown
                .lines()
                .rev()
                .find_map(|line| line.trim().strip_prefix("error: "))
                .map_or_else(
                    || shown.split_whitespace().collect::<Vec<_>>().join(" "),
                    str::to_owned,
                );
            format!("{text:?} is not a regular expression: {reason}")
        })
    }

    /// The compiled expression.
    pub fn regex(&self) -> &regex::Regex {
        &self.0
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Pattern, D::Error> {
        let text = String::deserialize(deserializer)?;
        Pattern::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// `[privacy]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySettings {
    /// What a speaker says to stop being relayed (compared with the whole line, trimmed,
    /// case-insensitively); empty turns opting out off.
    pub optout_command: String,
    /// What a speaker says to be relayed again; empty turns it off.
    pub optin_command: String,
    /// The in-world confirmation of either command, with `{name}`, `{state}` (`not recorded` or
    /// `recorded`), `{optout}` and `{optin}`; empty says nothing.
    pub confirm_format: String,
    /// Said in-world at start and every `notice_interval`, with `{optout}` and `{optin}`; empty is off.
    pub notice: String,
    /// How often the notice is said again (0 = only at start).
    #[serde(with = "humantime_serde")]
    pub notice_interval: Duration,
    /// Say the notice when an avatar arrives in the viewer's avatar list (once a day each).
    #[serde(deserialize_with = "boolean")]
    pub greet: bool,
}

/// `[inworld]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InworldSettings {
    /// Whether CMS lines are said in-world at all.
    #[serde(deserialize_with = "boolean")]
    pub enabled: bool,
    /// Pause between CMS reads.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How far back a CMS line may be dated and still be said: every `look_back` one read reaches
    /// this far before the previous such read (the others follow the newest row seen).
    #[serde(with = "humantime_serde")]
    pub look_back: Duration,
    /// The said text, with `{first}`, `{last}`, `{username}`, `{message}`.
    pub format: String,
    /// The chat channel (0 = public chat).
    #[serde(deserialize_with = "integer")]
    pub channel: i32,
    /// How the avatar says it.
    #[serde(rename = "type")]
    pub say_type: SayType,
    /// Flood limit.
    #[serde(deserialize_with = "float")]
    pub max_lines_per_second: f64,
    /// Lines older than this when their turn comes are skipped.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Lines waiting at most; beyond, the oldest are skipped.
    #[serde(deserialize_with = "integer")]
    pub max_queue: usize,
}

/// `inworld.type`: the viewer's POST `Type` (compared case-sensitively by the viewer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum SayType {
    /// Heard within 10 m.
    Whisper,
    /// Heard within 20 m.
    Normal,
    /// Heard within 100 m.
    Shout,
}

impl SayType {
    /// The viewer's string for it.
    pub fn as_str(self) -> &'static str {
        match self {
            SayType::Whisper => "Whisper",
            SayType::Normal => "Normal",
            SayType::Shout => "Shout",
        }
    }
}

/// `[outbox]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxSettings {
    /// The sled directory.
    pub path: PathBuf,
    /// sled's page cache in bytes.
    #[serde(deserialize_with = "integer")]
    pub cache_bytes: u64,
    /// Bytes of pending lines at most.
    #[serde(deserialize_with = "integer")]
    pub max_bytes: u64,
    /// Pending lines older than this are dropped.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// What happens at `max_bytes`.
    pub when_full: crate::outbox::WhenFull,
    /// Bytes of quarantined records at most; unusable bodies beyond it are counted, not kept.
    pub max_quarantine_bytes: u64,
    /// Disk space the outbox keeps in reserve, given back when its disk is full (0 = none).
    pub reserve_bytes: u64,
}

/// `[retry]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    /// First delay after a transient failure.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Largest delay between attempts.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Failures of a line's own (the CMS failing its POST, or its read-back, while it answers other
    /// requests) after which the line goes to the dead letters. An outage does not count.
    pub max_line_failures: u32,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// Default filter; `RUST_LOG` overrides it.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// `[http]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Where `/healthz`, `/readyz`, `/metrics` and `/status` are served (port 0 picks one); `None`
    /// (an empty string) turns the endpoint off.
    #[serde(
        deserialize_with = "empty_addr_is_none",
        serialize_with = "none_is_empty"
    )]
    pub listen: Option<std::net::SocketAddr>,
    /// `/readyz` fails its cms check once every delivery attempt has failed for this long, while
    /// lines wait (0 = at the first failure).
    #[serde(with = "humantime_serde")]
    pub cms_unready_after: Duration,
}

/// `log.format`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line (journald, Loki).
    Json,
}

/// The chat types the viewer produces (spec §2.5); anything else in `filter.types` is a typo.
const KNOWN_TYPES: [&str; 5] = ["Normal", "Whisper", "Shout", "Debug", "OwnerSay"];

impl Settings {
    /// Loads the layers: defaults, then `file` (if any), then `RELAY__…` environment variables, then
    /// `overrides` (dotted key, value; used by the demo and the tests), and validates the result.
    pub fn load(file: Option<&Path>, overrides: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("RELAY")
                .prefix_separator("__")
                .separator("__")
                // Every value stays the string it was: `007` is a password, not 7. The typed keys
                // parse their strings themselves (`integer`, `float`, `boolean`, `string_list`).
                .try_parsing(false),
        );
        for (key, value) in overrides {
            builder = builder.set_override(*key, *value)?;
        }
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| ConfigError::Invalid {
            key,
            reason: reason.to_owned(),
        };
        check_url("viewer.chat_url", &self.viewer.chat_url)?;
        if let Some(url) = &self.viewer.avatars_url {
            check_url("viewer.avatars_url", url)?;
        }
        if let Some(url) = &self.viewer.status_url {
            check_url("viewer.status_url", url)?;
        }
        check_url("cms.base_url", &self.cms.base_url)?;
        if !(self.viewer.hearing_range.is_finite() && self.viewer.hearing_range > 0.0) {
            return Err(invalid(
                "viewer.hearing_range",
                "must be more than 0 metres (OpenSim's say_distance, 20 by default)",
            ));
        }
        if let Some(login) = &self.viewer.login {
            login.validate()?;
        }
        if self.viewer.poll_interval.is_zero() {
            return Err(invalid("viewer.poll_interval", "must be more than 0"));
        }
        if self.viewer.request_timeout < Duration::from_secs(30) {
            return Err(invalid(
                "viewer.request_timeout",
                "must be at least 30s: ending a viewer request early can abort a response, which kills the viewer",
            ));
        }
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
        if self.viewer.max_response_bytes < 4096 {
            return Err(invalid(
                "viewer.max_response_bytes",
                "must be at least 4096",
            ));
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

    /// What is allowed but probably wrong, one sentence each naming its key. Loading logs nothing
    /// (logging starts after the configuration is known): the caller logs these once it has.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.cms.anonymous_user_id == 0 {
            warnings.push(
                "cms.anonymous_user_id is 0: stock OpenSim-CMS 1.1 rejects it (foreign key); use -1 unless your CMS was patched"
                    .to_owned(),
            );
        }
        if self.cms.ca_file.is_some() && !self.cms.base_url.starts_with("https:") {
            warnings.push(
                "cms.ca_file is set but cms.base_url is not https://: the certificates are not used"
                    .to_owned(),
            );
        }
        if self.privacy.optout_command.trim().is_empty() {
            warnings.push(
                "privacy.optout_command is empty: speakers cannot opt out of recording in-world"
                    .to_owned(),
            );
        }
        if self.privacy.greet && self.privacy.notice.trim().is_empty() {
            warnings.push(
                "privacy.greet is on but privacy.notice is empty: nobody is greeted".to_owned(),
            );
        }
        warnings
    }

    /// The effective configuration as TOML that loads again (`check-config`): every key, with the
    /// password replaced by `MASK` (an operator puts it back, or uses `cms.password_file`).
    pub fn redacted(&self) -> Result<String, ConfigError> {
        let body = toml::to_string(self).map_err(|err| ConfigError::Print(err.to_string()))?;
        let mut text = String::from(
            "# opensim-chat-relay: the effective configuration (built-in defaults < file < RELAY__ environment).\n",
        );
        if !self.cms.password.expose_secret().is_empty() {
            text.push_str(&format!(
                "# cms.password is masked as {MASK:?}: put the real one back (or use cms.password_file) before loading this.\n"
            ));
        }
        text.push('\n');
        text.push_str(body.trim_end());
        text.push('\n');
        Ok(text)
    }
}

/// What `check-config` prints instead of a password.
pub const MASK: &str = "********";

impl CmsSettings {
    /// The part of `[cms]` delivery needs, without the secret.
    pub fn delivery(&self) -> DeliverySettings {
        DeliverySettings {
            timezone: self.timezone,
            anonymous_user_id: self.anonymous_user_id,
            anonymous_format: self.anonymous_format.clone(),
            batch_max_messages: self.batch_max_messages,
            batch_max_bytes: self.batch_max_bytes,
            batch_linger: self.batch_linger,
            pacing: PacingSettings {
                adaptive: self.adaptive_pacing,
                max_requests_per_second: self.max_requests_per_second,
            },
            verify: self.verify,
        }
    }

    /// The password, read from `password_file` when that is set (surrounding whitespace trimmed).
    pub fn load_password(&self) -> Result<SecretString, ConfigError> {
        match &self.password_file {
            None => Ok(self.password.clone()),
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) if !text.trim().is_empty() => {
                    Ok(SecretString::from(text.trim().to_owned()))
                }
                Ok(_) => Err(ConfigError::Invalid {
                    key: "cms.password_file",
                    reason: format!("{} is empty", path.display()),
                }),
                Err(err) => Err(ConfigError::Invalid {
                    key: "cms.password_file",
                    reason: format!("cannot read {}: {err}", path.display()),
                }),
            },
        }
    }
}

impl CmsSettings {
    /// The certificates of `ca_file`, trusted for the CMS besides the system's store; none when it
    /// is not set. A file that cannot be read, or that holds no certificate rustls can use, is an
    /// error naming the key.
    pub fn load_ca_certificates(&self) -> Result<Vec<reqwest::Certificate>, ConfigError> {
        let Some(path) = &self.ca_file else {
            return Ok(Vec::new());
        };
        let invalid = |reason: String| ConfigError::Invalid {
            key: "cms.ca_file",
            reason: format!("{}: {reason}", path.display()),
        };
        let pem = std::fs::read(path).map_err(|err| invalid(format!("cannot read it: {err}")))?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|err| invalid(format!("not a PEM bundle: {err}")))?;
        if certificates.is_empty() {
            return Err(invalid(
                "holds no certificate (expected -----BEGIN CERTIFICATE----- blocks)".to_owned(),
            ));
        }
        // The PEM parser checks the armour only: a client built with these roots and no others
        // checks that each is a certificate rustls can trust, here rather than at the first login.
        let mut builder = reqwest::Client::builder().tls_built_in_root_certs(false);
        for certificate in &certificates {
            builder = builder.add_root_certificate(certificate.clone());
        }
        builder
            .build()
            .map_err(|err| invalid(format!("holds a certificate that cannot be used: {err}")))?;
        Ok(certificates)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const CREDENTIALS: [(&str, &str); 2] = [("cms.username", "relay"), ("cms.password", "pw")];

    #[test]
    fn the_defaults_with_credentials_load() {
        let settings = Settings::load(None, &CREDENTIALS).expect("defaults load");
        assert_eq!(settings.viewer.poll_interval, Duration::from_millis(500));
        assert_eq!(settings.cms.anonymous_user_id, -1);
        assert_eq!(
            settings.viewer.avatars_url.as_deref(),
            Some("http://127.0.0.1:9144/api/avatars")
        );
    }

    #[test]
    fn the_http_endpoint_is_on_loopback_by_default_and_empty_turns_it_off() {
        let settings = Settings::load(None, &CREDENTIALS).expect("defaults load");
        assert_eq!(
            settings.http.listen,
            Some("127.0.0.1:9188".parse().expect("address"))
        );
        let mut off = CREDENTIALS.to_vec();
        off.push(("http.listen", ""));
        assert_eq!(Settings::load(None, &off).expect("load").http.listen, None);
        let mut bad = CREDENTIALS.to_vec();
        bad.push(("http.listen", "localhost:9188"));
        let err = Settings::load(None, &bad).unwrap_err().to_string();
        assert!(err.contains("127.0.0.1:9188"), "{err}");
    }

    #[test]
    fn a_missing_username_names_the_key() {
        let err = Settings::load(None, &[]).unwrap_err().to_string();
        assert!(err.contains("cms.username"), "{err}");
    }

    #[test]
    fn the_password_never_appears_in_the_redacted_view() {
        let settings = Settings::load(
            None,
            &[
                ("cms.username", "relay"),
                ("cms.password", "hunter2-secret"),
            ],
        )
        .expect("load");
        let text = settings.redacted().expect("prints");
        assert!(!text.contains("hunter2-secret"), "{text}");
        assert!(text.contains("username = \"relay\""), "{text}");
        assert!(text.contains("password = \"********\""), "{text}");
    }

    fn load_toml(toml: &str) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("relay.toml");
        std::fs::write(&file, toml).expect("write");
        Settings::load(Some(&file), &CREDENTIALS)
    }

    #[test]
    fn typed_keys_in_a_file_take_only_their_own_type() {
        for (toml, key) in [
            ("[cms]\ngrid_id = 1.5\n", "cms.grid_id"),
            (
                "[cms]\nbatch_max_messages = true\n",
                "cms.batch_max_messages",
            ),
            ("[inworld]\nenabled = 1\n", "inworld.enabled"),
            (
                "[cms]\nadaptive_pacing = \"often\"\n",
                "cms.adaptive_pacing",
            ),
            ("[inworld]\nchannel = 99999999999\n", "inworld.channel"),
            (
                "[mapping.users]\n\"Alice Resident\" = 3.5\n",
                "mapping.users",
            ),
            ("[filter]\ntypes = [1]\n", "filter.types"),
        ] {
            let err = load_toml(toml).unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
        let settings = load_toml(
            "[cms]\nmax_requests_per_second = 3\n[mapping.users]\n\"Alice Resident\" = 3\n",
        )
        .expect("loads");
        assert_eq!(settings.cms.max_requests_per_second, 3.0);
        assert_eq!(settings.mapping.users["Alice Resident"], 3);
    }

    #[test]
    fn typed_keys_parse_their_text_and_strings_keep_theirs() {
        let mut overrides = vec![
            ("cms.username", "0123"),
            ("cms.password", "007"),
            ("cms.grid_id", "2"),
            ("inworld.enabled", "off"),
            ("filter.types", "Normal, Shout"),
            ("cms.max_requests_per_second", "2.5"),
            ("cms.adaptive_pacing", "false"),
        ];
        let settings = Settings::load(None, &overrides).expect("loads");
        assert_eq!(settings.cms.username, "0123");
        assert_eq!(settings.cms.password.expose_secret(), "007");
        assert_eq!(settings.cms.grid_id, 2);
        assert!(!settings.inworld.enabled);
        assert_eq!(settings.filter.types, ["Normal", "Shout"]);
        assert_eq!(settings.cms.max_requests_per_second, 2.5);
        assert!(!settings.cms.adaptive_pacing);
        overrides.push(("cms.grid_id", "-1"));
        let err = Settings::load(None, &overrides).unwrap_err().to_string();
        assert!(err.contains("cms.grid_id"), "{err}");
    }

    #[test]
    fn anonymous_id_zero_is_a_warning_not_an_error() {
        let mut overrides = CREDENTIALS.to_vec();
        assert!(
            Settings::load(None, &overrides)
                .expect("loads")
                .warnings()
                .is_empty()
        );
        overrides.push(("cms.anonymous_user_id", "0"));
        let warnings = Settings::load(None, &overrides).expect("loads").warnings();
        assert!(
            warnings[0].contains("cms.anonymous_user_id"),
            "{warnings:?}"
        );
    }
}
