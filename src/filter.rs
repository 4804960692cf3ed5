//! Which viewer lines are relayed: avatar chat of the configured types, never the viewer's own avatar,
//! system lines, OwnerSay or (unless `filter.objects`) objects.
//!
//! Pure: no I/O. The viewer's own name is passed in by the poller, which learns it.

use crate::config::FilterSettings;
use crate::model::{ChatType, EntryType, ViewerLine, ZERO_UUID};

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
    /// No text.
    Empty,
}

impl FilterReason {
    /// Every reason, for metrics.
    pub const ALL: [FilterReason; 6] = [
        FilterReason::Object,
        FilterReason::OwnerSay,
        FilterReason::Type,
        FilterReason::System,
        FilterReason::OwnAvatar,
        FilterReason::Empty,
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
        }
    }
}

/// The filter rules of `[filter]`.
#[derive(Debug, Clone)]
pub struct Filter {
    types: Vec<ChatType>,
    objects: bool,
}

impl Filter {
    /// Builds the filter from its settings (validated by `config`).
    pub fn new(settings: &FilterSettings) -> Filter {
        let types = settings
            .types
            .iter()
            .map(|t| ChatType::from_viewer(t))
            .collect();
        Filter {
            types,
            objects: settings.objects,
        }
    }

    /// `Ok` when `line` is to be relayed. `own_name` is the viewer's own avatar, when known.
    pub fn check(&self, line: &ViewerLine, own_name: Option<&str>) -> Result<(), FilterReason> {
        if line.message.is_empty() {
            return Err(FilterReason::Empty);
        }
        let Some(from) = line.from.as_deref() else {
            return Err(FilterReason::System);
        };
        // LookingGlass always sends `OwnerID`; KeeKee omits it exactly when it is the zero UUID
        // (spec §6). A missing one therefore means zero, and "Second Life" notices stay out of the CMS
        // with either viewer.
        let zero_owner = line.owner_id.as_deref().is_none_or(|o| o == ZERO_UUID);
        if line.entry_type == EntryType::Normal && zero_owner {
            return Err(FilterReason::System);
        }
        if own_name.is_some_and(|own| own.eq_ignore_ascii_case(from.trim())) {
            return Err(FilterReason::OwnAvatar);
        }
        if line.entry_type == EntryType::OwnerSay || line.chat_type == ChatType::OwnerSay {
            return Err(FilterReason::OwnerSay);
        }
        if line.entry_type == EntryType::ObjectChat && !self.objects {
            return Err(FilterReason::Object);
        }
        if !self.types.contains(&line.chat_type) {
            return Err(FilterReason::Type);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn line(
        from: Option<&str>,
        chat_type: ChatType,
        entry_type: EntryType,
        owner: Option<&str>,
    ) -> ViewerLine {
        ViewerLine {
            from: from.map(str::to_owned),
            message: "text".into(),
            chat_type,
            entry_type,
            owner_id: owner.map(str::to_owned),
            spoken_at: Utc::now(),
        }
    }

    fn default_filter() -> Filter {
        Filter::new(&FilterSettings {
            types: vec!["Normal".into(), "Whisper".into(), "Shout".into()],
            objects: false,
        })
    }

    const AVATAR: Option<&str> = Some("11111111-2222-3333-4444-555555555555");

    #[test]
    fn avatar_chat_passes_and_everything_else_is_told_apart() {
        let filter = default_filter();
        let own = Some("Relay Bot");
        assert_eq!(
            filter.check(
                &line(
                    Some("Alice Resident"),
                    ChatType::Whisper,
                    EntryType::Normal,
                    AVATAR
                ),
                own
            ),
            Ok(())
        );
        assert_eq!(
            filter.check(
                &line(
                    Some("Gov Linden"),
                    ChatType::Normal,
                    EntryType::LindenChat,
                    AVATAR
                ),
                own
            ),
            Ok(())
        );
        let cases = [
            (
                line(Some("Box"), ChatType::Normal, EntryType::ObjectChat, AVATAR),
                FilterReason::Object,
            ),
            (
                line(Some("HUD"), ChatType::OwnerSay, EntryType::OwnerSay, AVATAR),
                FilterReason::OwnerSay,
            ),
            (
                line(Some("Box"), ChatType::Debug, EntryType::ObjectChat, AVATAR),
                FilterReason::Object,
            ),
            (
                line(None, ChatType::Normal, EntryType::Normal, AVATAR),
                FilterReason::System,
            ),
            (
                line(
                    Some("Second Life"),
                    ChatType::Normal,
                    EntryType::Normal,
                    Some(ZERO_UUID),
                ),
                FilterReason::System,
            ),
            // KeeKee omits a zero OwnerID: a normal line without one is a system line.
            (
                line(
                    Some("Second Life"),
                    ChatType::Normal,
                    EntryType::Normal,
                    None,
                ),
                FilterReason::System,
            ),
            (
                line(
                    Some("relay bot"),
                    ChatType::Normal,
                    EntryType::Normal,
                    AVATAR,
                ),
                FilterReason::OwnAvatar,
            ),
        ];
        for (line, reason) in cases {
            assert_eq!(filter.check(&line, own), Err(reason), "{line:?}");
        }
    }

    #[test]
    fn objects_pass_when_enabled_but_debug_needs_its_type() {
        let filter = Filter::new(&FilterSettings {
            types: vec!["Normal".into()],
            objects: true,
        });
        assert_eq!(
            filter.check(
                &line(Some("Box"), ChatType::Normal, EntryType::ObjectChat, AVATAR),
                None
            ),
            Ok(())
        );
        assert_eq!(
            filter.check(
                &line(Some("Box"), ChatType::Debug, EntryType::ObjectChat, AVATAR),
                None
            ),
            Err(FilterReason::Type)
        );
    }
}
