//! One struct per section of the configuration but `[cms]` (in `cms`), with a `///` on every key.
//! Must not: validate across keys (`validate`), or open anything.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Pattern;
use super::Redaction;
use super::ViewerLoginSettings;
use super::fields::{
    boolean, display, empty_addr_is_none, empty_is_none, float, integer, none_is_empty,
    pattern_list, string_list, user_map,
};
use crate::zone::Zone;

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
    pub when_full: WhenFull,
    /// Bytes of quarantined records at most; unusable bodies beyond it are counted, not kept.
    pub max_quarantine_bytes: u64,
    /// Disk space the outbox keeps in reserve, given back when its disk is full (0 = none).
    pub reserve_bytes: u64,
}

/// `outbox.when_full`: what to do when the outbox holds `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Drop the oldest pending lines to make room (each counted and logged).
    DropOldest,
    /// Stop polling the viewer until delivery makes room (the viewer keeps the lines meanwhile).
    PausePolling,
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
