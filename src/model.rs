//! Domain types shared by the stages: what a viewer line is once parsed, and what a captured line is
//! once it passed the filter.
//!
//! Also why a line was not relayed (`FilterReason`, which `filter`, the poller and `metrics` share),
//! and the `{name}` templates of the configuration. No serde for foreign formats and no I/O here: the peers' wire types live in `lookingglass::wire`
//! and `cms::wire`, the stored record in `outbox`.

use chrono::{DateTime, Utc};

/// The all-zero UUID the viewer sends for system lines (and KeeKee omits).
pub const ZERO_UUID: &str = "00000000-0000-0000-0000-000000000000";

/// The chat `Type` of a viewer line; unknown strings are Normal, as the viewer itself maps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatType {
    /// `Whisper`
    Whisper,
    /// `Normal` and anything unknown
    Normal,
    /// `Shout`
    Shout,
    /// `Debug`: script errors from objects
    Debug,
    /// `OwnerSay`: `llOwnerSay`, private to the owner
    OwnerSay,
}

impl ChatType {
    /// Parses the viewer's `Type` string (case-sensitive, as the viewer writes it).
    pub fn from_viewer(text: &str) -> ChatType {
        match text {
            "Whisper" => ChatType::Whisper,
            "Shout" => ChatType::Shout,
            "Debug" => ChatType::Debug,
            "OwnerSay" => ChatType::OwnerSay,
            _ => ChatType::Normal,
        }
    }

    /// The name used in `filter.types`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChatType::Whisper => "Whisper",
            ChatType::Normal => "Normal",
            ChatType::Shout => "Shout",
            ChatType::Debug => "Debug",
            ChatType::OwnerSay => "OwnerSay",
        }
    }
}

/// The viewer's `EntryType`: who spoke, as far as the viewer can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryType {
    /// `ChatTypeNormal` (and anything unknown): an avatar or the system.
    Normal,
    /// `ChatTypeLindenChat`: an avatar whose name ends in Linden.
    LindenChat,
    /// `ChatTypeObjectChat`: an object.
    ObjectChat,
    /// `ChatTypeOwnerSay`: an object speaking to its owner.
    OwnerSay,
}

impl EntryType {
    /// Parses the viewer's `EntryType` string.
    pub fn from_viewer(text: &str) -> EntryType {
        match text {
            "ChatTypeLindenChat" => EntryType::LindenChat,
            "ChatTypeObjectChat" => EntryType::ObjectChat,
            "ChatTypeOwnerSay" => EntryType::OwnerSay,
            _ => EntryType::Normal,
        }
    }
}

/// One line as the viewer handed it out, before filtering.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewerLine {
    /// `From`, absent for some system and object lines.
    pub from: Option<String>,
    /// The text, raw.
    pub message: String,
    /// `Type`
    pub chat_type: ChatType,
    /// `EntryType`
    pub entry_type: EntryType,
    /// `OwnerID` when present (for avatars on OpenSim: the avatar's own UUID).
    pub owner_id: Option<String>,
    /// When it was said: rebuilt from the 12-hour `Time`, or the receive time when that failed.
    pub spoken_at: DateTime<Utc>,
}

/// Who a captured line comes from. It decides whether the speaker's name may be mapped to a CMS
/// account: only an avatar's may. An object can name itself after any avatar ("Alice Resident"),
/// so its lines are always stored anonymously; the relay's own lines (gap markers) carry no speaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LineSource {
    /// An avatar (`ChatTypeNormal` or `ChatTypeLindenChat` with a speaker UUID).
    #[default]
    Avatar,
    /// An object (`ChatTypeObjectChat`), relayed only with `filter.objects`.
    Object,
    /// The relay itself: a line it composed (a record of chat it missed), said by no one.
    Relay,
}

impl LineSource {
    /// The source of a viewer line that passed the filter.
    pub fn of(entry_type: EntryType) -> LineSource {
        match entry_type {
            EntryType::ObjectChat | EntryType::OwnerSay => LineSource::Object,
            EntryType::Normal | EntryType::LindenChat => LineSource::Avatar,
        }
    }
}

/// A line that passed the filter: what the outbox stores and the CMS will get.
#[derive(Debug, Clone, PartialEq)]
pub struct CapturedLine {
    /// Who said it: only an avatar's name is ever mapped to a CMS account.
    pub source: LineSource,
    /// The speaker's name as the viewer gave it, e.g. `Alice Resident` (an object's name for an
    /// object; empty for the relay's own lines).
    pub speaker: String,
    /// The speaker's UUID as the viewer reported it (`OwnerID`), if any and not zero.
    pub owner_id: Option<String>,
    /// The text as said.
    pub message: String,
    /// When it was said.
    pub spoken_at: DateTime<Utc>,
    /// When the relay received it from the viewer.
    pub captured_at: DateTime<Utc>,
    /// The region it was said in (`[[regions]]` name); empty: the only region.
    pub region: String,
}

impl CapturedLine {
    /// An avatar's line captured now, to the millisecond as the outbox stores it (for tests).
    #[cfg(test)]
    pub(crate) fn said_now(speaker: &str, owner_id: Option<&str>, text: &str) -> CapturedLine {
        use chrono::TimeZone;
        let now = chrono::Utc
            .timestamp_millis_opt(chrono::Utc::now().timestamp_millis())
            .single()
            .expect("a millisecond in range");
        CapturedLine {
            source: LineSource::Avatar,
            speaker: speaker.into(),
            owner_id: owner_id.map(str::to_owned),
            message: text.into(),
            spoken_at: now,
            captured_at: now,
            region: String::new(),
        }
    }
}

/// `format` with each `{name}` replaced, in one pass (replaced text is never scanned again).
pub fn fill_template(format: &str, values: &[(&str, &str)]) -> String {
    let mut out =
        String::with_capacity(format.len() + values.iter().map(|(_, v)| v.len()).sum::<usize>());
    let mut rest = format;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let hit = values.iter().find_map(|(name, value)| {
            let after = tail
                .strip_prefix('{')?
                .strip_prefix(name)?
                .strip_prefix('}')?;
            Some((value, after))
        });
        match hit {
            Some((value, after)) => {
                out.push_str(value);
                rest = after;
            }
            None => {
                out.push('{');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Why a line was not relayed (the `reason` label of the filtered metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FilterReason {
    /// Said by an object and `filter.objects` is off.
    Object,
    /// `llOwnerSay`: private to the object's owner.
    OwnerSay,
    /// Its `Type` is not in `filter.types` (Debug by default).
    Type,
    /// A system line: no `From`, or a zero `OwnerID` on normal chat.
    System,
    /// The viewer's own avatar: relaying it would echo what the relay itself said.
    OwnAvatar,
    /// No text (or none left after `filter.redact`).
    Empty,
    /// The speaker is in `filter.ignore_speakers`.
    IgnoredSpeaker,
    /// The text matches `filter.ignore_messages`.
    IgnoredMessage,
    /// The speaker opted out (`privacy.optout_command`), or the line was waiting in the outbox when
    /// they did.
    OptedOut,
    /// `privacy.optout_command` or `privacy.optin_command` itself.
    PrivacyCommand,
}

impl FilterReason {
    /// Every reason, for metrics.
    pub const ALL: [FilterReason; 10] = [
        FilterReason::Object,
        FilterReason::OwnerSay,
        FilterReason::Type,
        FilterReason::System,
        FilterReason::OwnAvatar,
        FilterReason::Empty,
        FilterReason::IgnoredSpeaker,
        FilterReason::IgnoredMessage,
        FilterReason::OptedOut,
        FilterReason::PrivacyCommand,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FilterReason::Object => "object",
            FilterReason::OwnerSay => "owner_say",
            FilterReason::Type => "type",
            FilterReason::System => "system",
            FilterReason::OwnAvatar => "own_avatar",
            FilterReason::Empty => "empty",
            FilterReason::IgnoredSpeaker => "ignored_speaker",
            FilterReason::IgnoredMessage => "ignored_message",
            FilterReason::OptedOut => "opted_out",
            FilterReason::PrivacyCommand => "privacy_command",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_is_filled_once() {
        let values = [
            ("first", "Dora"),
            ("last", "{message}"),
            ("username", "dora"),
            ("message", "hi {first}"),
        ];
        assert_eq!(
            fill_template("[{first} {last}] {message} ({username}) {other}", &values),
            "[Dora {message}] hi {first} (dora) {other}"
        );
    }
}
