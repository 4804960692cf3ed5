//! Opting out of recording, in-world: the commands (`privacy.optout_command`,
//! `privacy.optin_command`), who opted out (`Privacy`, the running copy of the outbox's opt-outs),
//! and the texts the relay says about it (the confirmation, the notice).
//!
//! The poller asks `command` and `is_opted_out` of every line before it is stored, and records each
//! change with `save` once the lines read with it are stored; the notice task says what `notice`
//! and `confirmation` give. Must not do I/O beyond the outbox calls of `save`, and must not say
//! anything itself.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::config::PrivacySettings;
use crate::model::fill_template;
use crate::outbox::{OptOut, Outbox, OutboxError, SpeakerKey};

/// A speaker who repeats a command is confirmed for it at most this often, so that the relay cannot
/// be made to flood the region.
const CONFIRM_COOLDOWN: Duration = Duration::from_secs(30);

/// A privacy command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Stop relaying me.
    OptOut,
    /// Relay me again.
    OptIn,
}

/// A command a speaker said, to be recorded in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The speaker's name as the viewer gave it.
    pub speaker: String,
    /// The speaker's avatar UUID, when the viewer gave one.
    pub uuid: Option<String>,
    /// What they asked.
    pub command: Command,
    /// When the line was read.
    pub at: DateTime<Utc>,
    /// `Outbox::pending_watermark` before the lines read with the command were stored: an opt-out
    /// drops the speaker's lines up to it.
    pub watermark: u64,
}

/// Which command `text` is (the whole line, trimmed, any case), if any; an empty command is off.
pub fn command(settings: &PrivacySettings, text: &str) -> Option<Command> {
    let said = text.trim();
    let is = |command: &str| {
        let command = command.trim();
        !command.is_empty() && said.to_lowercase() == command.to_lowercase()
    };
    if is(&settings.optout_command) {
        Some(Command::OptOut)
    } else if is(&settings.optin_command) {
        Some(Command::OptIn)
    } else {
        None
    }
}

/// Whether `body` may hold a line that is `command`: a cheap test, before the viewer's answer is
/// read twice for it. The viewer writes pure ASCII JSON (`\u` escapes for the rest), so an ASCII
/// command appears as its bytes; a command with other characters is always looked for.
pub fn may_contain(body: &[u8], command: &str) -> bool {
    let command = command.trim().as_bytes();
    if command.is_empty() {
        return false;
    }
    if !command.is_ascii() {
        return true;
    }
    body.windows(command.len())
        .any(|window| window.eq_ignore_ascii_case(command))
}

/// The notice to say (`privacy.notice` with the commands filled in), `None` when it is off.
pub fn notice(settings: &PrivacySettings) -> Option<String> {
    if settings.notice.trim().is_empty() {
        return None;
    }
    Some(fill_template(
        settings.notice.trim(),
        &[
            ("optout", settings.optout_command.trim()),
            ("optin", settings.optin_command.trim()),
        ],
    ))
}

/// Who opted out, as the poller sees it: loaded from the outbox at start and changed as commands are
/// read (the outbox follows once the lines read with them are stored).
#[derive(Debug, Default)]
pub struct Privacy {
    opt_outs: Mutex<Vec<OptOut>>,
    /// When each speaker (lower-cased name) was last confirmed for each command.
    confirmed: Mutex<HashMap<(String, Command), Instant>>,
}

impl Privacy {
    /// The opt-outs stored in `outbox`.
    pub fn load(outbox: &Outbox) -> Result<Privacy, OutboxError> {
        Ok(Privacy {
            opt_outs: Mutex::new(outbox.opt_outs()?),
            confirmed: Mutex::default(),
        })
    }

    fn opt_outs(&self) -> std::sync::MutexGuard<'_, Vec<OptOut>> {
        self.opt_outs
            .lock()
            .expect("privacy lock is never poisoned")
    }

    /// Whether the speaker opted out.
    pub fn is_opted_out(&self, speaker: &str, uuid: Option<&str>) -> bool {
        self.opt_outs().iter().any(|o| o.matches(speaker, uuid))
    }

    /// How many speakers opted out.
    pub fn len(&self) -> usize {
        self.opt_outs().len()
    }

    /// Whether nobody opted out.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies a command to the running copy, from this line on.
    pub fn apply(&self, change: &Change) {
        let mut opt_outs = self.opt_outs();
        let uuid = change.uuid.as_deref();
        match change.command {
            Command::OptOut => {
                let key = SpeakerKey::of(&change.speaker, uuid);
                opt_outs.retain(|o| o.key != key);
                opt_outs.push(OptOut {
                    key,
                    name: change.speaker.trim().to_owned(),
                    since: change.at,
                });
            }
            Command::OptIn => opt_outs.retain(|o| !o.matches(&change.speaker, uuid)),
        }
    }

    /// Records a change in the outbox; an opt-out drops the speaker's waiting lines (up to its
    /// watermark). Returns how many were dropped.
    pub async fn save(outbox: &Outbox, change: &Change) -> Result<usize, OutboxError> {
        let uuid = change.uuid.as_deref();
        match change.command {
            Command::OptOut => {
                let opt_out = OptOut {
                    key: SpeakerKey::of(&change.speaker, uuid),
                    name: change.speaker.trim().to_owned(),
                    since: change.at,
                };
                outbox.opt_out(&opt_out, change.watermark).await
            }
            Command::OptIn => outbox.opt_in(&change.speaker, uuid).await.map(|_| 0),
        }
    }

    /// The in-world confirmation of a change (`privacy.confirm_format`): `None` when it is off, or
    /// when the speaker was confirmed for the same command less than `CONFIRM_COOLDOWN` ago.
    pub fn confirmation(&self, settings: &PrivacySettings, change: &Change) -> Option<String> {
        if settings.confirm_format.trim().is_empty() {
            return None;
        }
        let now = Instant::now();
        let mut confirmed = self
            .confirmed
            .lock()
            .expect("privacy lock is never poisoned");
        confirmed.retain(|_, at| now.duration_since(*at) < CONFIRM_COOLDOWN);
        let who = (change.speaker.trim().to_lowercase(), change.command);
        if confirmed.contains_key(&who) {
            return None;
        }
        confirmed.insert(who, now);
        let state = match change.command {
            Command::OptOut => "not recorded",
            Command::OptIn => "recorded",
        };
        Some(fill_template(
            settings.confirm_format.trim(),
            &[
                ("name", change.speaker.trim()),
                ("state", state),
                ("optout", settings.optout_command.trim()),
                ("optin", settings.optin_command.trim()),
            ],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PrivacySettings {
        PrivacySettings {
            optout_command: "!nolog".into(),
            optin_command: "!log".into(),
            confirm_format: "{name}: {state} ({optin} to undo)".into(),
            notice: "Chat is recorded; say {optout} to opt out".into(),
            notice_interval: Duration::from_secs(3600),
            greet: false,
        }
    }

    fn change(command: Command) -> Change {
        Change {
            speaker: "Alice Resident".into(),
            uuid: Some("aaaaaaaa-0000-4000-8000-000000000001".into()),
            command,
            at: Utc::now(),
            watermark: 0,
        }
    }

    #[test]
    fn a_command_is_the_whole_line_in_any_case_and_an_empty_one_is_off() {
        let settings = settings();
        assert_eq!(command(&settings, "  !NoLog "), Some(Command::OptOut));
        assert_eq!(command(&settings, "!log"), Some(Command::OptIn));
        assert_eq!(command(&settings, "say !nolog to opt out"), None);
        let off = PrivacySettings {
            optin_command: String::new(),
            ..settings
        };
        assert_eq!(command(&off, ""), None);
        assert_eq!(command(&off, "!log"), None);
    }

    #[test]
    fn a_body_is_searched_for_a_command_only_when_it_may_hold_one() {
        assert!(may_contain(br#"{"Message":"!NOLOG"}"#, "!nolog"));
        assert!(!may_contain(br#"{"Message":"hello"}"#, "!nolog"));
        assert!(!may_contain(b"anything", " "));
        assert!(may_contain(b"anything", "!p\u{e9}"));
    }

    #[test]
    fn opting_out_and_in_changes_the_running_copy_and_is_confirmed_once_a_while() {
        let privacy = Privacy::default();
        let settings = settings();
        privacy.apply(&change(Command::OptOut));
        assert!(privacy.is_opted_out("Alice Resident", change(Command::OptOut).uuid.as_deref()));
        assert_eq!(
            privacy.confirmation(&settings, &change(Command::OptOut)),
            Some("Alice Resident: not recorded (!log to undo)".into())
        );
        assert_eq!(
            privacy.confirmation(&settings, &change(Command::OptOut)),
            None,
            "a repeat within the cooldown"
        );
        assert_eq!(
            privacy.confirmation(&settings, &change(Command::OptIn)),
            Some("Alice Resident: recorded (!log to undo)".into())
        );
        privacy.apply(&change(Command::OptIn));
        assert!(privacy.is_empty());
        assert_eq!(
            notice(&settings).as_deref(),
            Some("Chat is recorded; say !nolog to opt out")
        );
    }
}
