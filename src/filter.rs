//! Which viewer lines are relayed: avatar chat of the configured types, never the viewer's own avatar,
//! system lines, OwnerSay or (unless `filter.objects`) objects; and the operator's moderation:
//! speakers and messages ignored (`filter.ignore_speakers`, `filter.ignore_messages`) and the
//! rewrites of `filter.redact`.
//!
//! Pure: no I/O. The viewer's own name is passed in by the poller, which learns it; the poller also
//! decides the order of the checks (the echo memory and the privacy commands come between them).

use std::borrow::Cow;
use std::collections::HashSet;

use crate::config::{FilterSettings, Redaction};
pub use crate::model::FilterReason;
use crate::model::{ChatType, EntryType, ViewerLine, ZERO_UUID};

/// The filter rules of `[filter]`.
#[derive(Debug, Clone)]
pub struct Filter {
    types: Vec<ChatType>,
    objects: bool,
    /// `filter.ignore_speakers`, trimmed and lower-cased.
    ignore_speakers: HashSet<String>,
    ignore_messages: Vec<regex::Regex>,
    redact: Vec<Redaction>,
}

impl Filter {
    /// Builds the filter from its settings (validated by `config`, the patterns compiled there).
    pub fn new(settings: &FilterSettings) -> Filter {
        let types = settings
            .types
            .iter()
            .map(|t| ChatType::from_viewer(t))
            .collect();
        Filter {
            types,
            objects: settings.objects,
            ignore_speakers: settings
                .ignore_speakers
                .iter()
                .map(|name| name.trim().to_lowercase())
                .collect(),
            ignore_messages: settings
                .ignore_messages
                .iter()
                .map(|pattern| pattern.regex().clone())
                .collect(),
            redact: settings.redact.clone(),
        }
    }

    /// Whether `speaker` is in `filter.ignore_speakers`.
    pub fn ignores_speaker(&self, speaker: &str) -> bool {
        !self.ignore_speakers.is_empty()
            && self
                .ignore_speakers
                .contains(&speaker.trim().to_lowercase())
    }

    /// Whether `text` matches one of `filter.ignore_messages`.
    pub fn ignores_message(&self, text: &str) -> bool {
        self.ignore_messages.iter().any(|re| re.is_match(text))
    }

    /// `text` with every `filter.redact` rewrite applied in order; borrowed when none matched.
    pub fn redact<'t>(&self, text: &'t str) -> Cow<'t, str> {
        let mut text = Cow::Borrowed(text);
        for redaction in &self.redact {
            let regex = redaction.pattern.regex();
            if let Cow::Owned(rewritten) = regex.replace_all(&text, redaction.replacement.as_str())
            {
                text = Cow::Owned(rewritten);
            }
        }
        text
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

    fn settings(types: &[&str], objects: bool) -> FilterSettings {
        FilterSettings {
            types: types.iter().map(|t| (*t).to_owned()).collect(),
            objects,
            ignore_speakers: Vec::new(),
            ignore_messages: Vec::new(),
            redact: Vec::new(),
        }
    }

    fn default_filter() -> Filter {
        Filter::new(&settings(&["Normal", "Whisper", "Shout"], false))
    }

    fn pattern(text: &str) -> crate::config::Pattern {
        crate::config::Pattern::parse(text).expect("a valid pattern")
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
        let filter = Filter::new(&settings(&["Normal"], true));
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

    #[test]
    fn ignored_speakers_compare_without_case_and_messages_match_their_patterns() {
        let filter = Filter::new(&FilterSettings {
            ignore_speakers: vec![" Greeter Bot ".into()],
            ignore_messages: vec![pattern(r"^\(\(.*\)\)$"), pattern("^/")],
            ..settings(&["Normal"], false)
        });
        assert!(filter.ignores_speaker("greeter bot"));
        assert!(!filter.ignores_speaker("Alice Resident"));
        assert!(filter.ignores_message("((brb, dinner))"));
        assert!(filter.ignores_message("/me waves"));
        assert!(!filter.ignores_message("hello (really) ((not ooc)) here"));
        assert!(!default_filter().ignores_message("anything"));
    }

    #[test]
    fn redactions_apply_in_order_and_leave_other_text_borrowed() {
        let filter = Filter::new(&FilterSettings {
            redact: vec![
                Redaction {
                    pattern: pattern(r"[\w.+-]+@[\w-]+(\.[\w-]+)+"),
                    replacement: "[e-mail]".into(),
                },
                Redaction {
                    pattern: pattern(r"\+?\d[\d ()/-]{7,}\d"),
                    replacement: "[phone]".into(),
                },
                Redaction {
                    pattern: pattern(r"(?i)secret (\w+)"),
                    replacement: "secret ${1}-redacted $$".into(),
                },
            ],
            ..settings(&["Normal"], false)
        });
        assert_eq!(
            filter.redact("mail alice.r@example.co.uk or call +31 (0)20 123 4567"),
            "mail [e-mail] or call [phone]"
        );
        assert_eq!(
            filter.redact("the Secret door"),
            "the secret door-redacted $"
        );
        assert!(matches!(filter.redact("nothing here"), Cow::Borrowed(_)));
    }
}
