//! Privacy, decided in one place: the opt-out and opt-in commands (`privacy.optout_command`,
//! `privacy.optin_command`) and who may give them, who opted out (`Privacy`: the running copy and,
//! in `store`, the stored records), whether a line is relayed or kept for privacy's sake, and the
//! texts the relay says about it (the confirmation, the notice).
//!
//! The rules, in one table (the poller asks `Privacy::judge` of every line the filter lets through,
//! or would let through but for its chat type; delivery asks `Privacy::withhold` of every batch; the
//! start and the operator's `privacy` subcommand ask `store`'s other verbs; all apply
//! `OptOut::matches`, which no other module can call):
//!
//! | line | verdict |
//! |---|---|
//! | an avatar's (`ChatTypeNormal`/`ChatTypeLindenChat`, a name, a non-zero `OwnerID`), Whisper, Normal or Shout, the whole text a command | `Command`: applied at once, stored with `save`; never relayed, whatever `filter.types` says |
//! | an object's, an OwnerSay, a system line, the viewer's own avatar | never a command (an object can name itself after any avatar) |
//! | a speaker who opted out (by UUID, or by name without one), or who opts out later in the same answer (`Ahead`) | `OptedOut` |
//! | a stored line of a speaker who opted out (waiting, in flight, or a dead letter) | erased at the opt-out, withheld from delivery, erased at the next start |
//! | anything else | `Relay` |
//!
//! What is kept of a line that could not be relayed is also privacy's: the quarantine keeps no
//! chat text (`outbox::dead`). The files: this one (the rules and the running copy), `store` (the
//! records and the erasure of waiting lines, through the outbox's storage primitives).
//!
//! Must not: do I/O beyond those outbox calls, say anything itself (confirmations go back to the
//! poller), or let another module reach the opt-out records or `OptOut::matches` (the poller and
//! delivery hold a `Privacy` and ask it; `tests/relay/architecture.rs` checks it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::config::PrivacySettings;
use crate::model::{ChatType, EntryType, ViewerLine, ZERO_UUID, fill_template};
use crate::outbox::{Outbox, OutboxError};

mod store;

/// A speaker who repeats a command is confirmed for it at most this often, so that the relay cannot
/// be made to flood the region.
const CONFIRM_COOLDOWN: Duration = Duration::from_secs(30);

/// Who an opt-out is remembered by: the avatar's UUID where the viewer gave one (it survives a
/// change of name), else its name. Both lower-cased.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SpeakerKey {
    /// The avatar's UUID (a line's `OwnerID`).
    Uuid(String),
    /// The avatar's name.
    Name(String),
}

impl SpeakerKey {
    /// The key of a speaker: by `uuid` when given, else by `name`.
    pub fn of(name: &str, uuid: Option<&str>) -> SpeakerKey {
        match uuid {
            Some(uuid) => SpeakerKey::Uuid(uuid.trim().to_lowercase()),
            None => SpeakerKey::Name(name.trim().to_lowercase()),
        }
    }
}

/// One speaker who opted out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptOut {
    /// Who.
    pub key: SpeakerKey,
    /// The name as it was said or typed, for `privacy list`.
    pub name: String,
    /// When.
    pub since: DateTime<Utc>,
}

impl OptOut {
    /// Whether a line of `speaker` (with the avatar UUID `uuid`, when the viewer gave one) is theirs:
    /// by UUID, or by name (for an opt-out by name, or a line that came without a UUID). Private to
    /// `privacy`: every other module asks `Privacy`.
    fn matches(&self, speaker: &str, uuid: Option<&str>) -> bool {
        let same_name = || self.name.trim().eq_ignore_ascii_case(speaker.trim());
        match &self.key {
            SpeakerKey::Uuid(key) => match uuid {
                Some(uuid) => key.eq_ignore_ascii_case(uuid.trim()),
                None => same_name(),
            },
            SpeakerKey::Name(key) => *key == speaker.trim().to_lowercase(),
        }
    }
}

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

/// Which command a viewer line is, if any: only an avatar gives commands, in any chat type an avatar
/// speaks in (a whisper and a shout count as much as normal chat: `filter.types` chooses what is
/// relayed, not who may opt out). An object (`ChatTypeObjectChat`) is never taken at its word: it
/// can name itself after any avatar, and its `OwnerID` is its owner's, so an object saying `!log`
/// would undo its owner's opt-out.
pub fn command_of(settings: &PrivacySettings, line: &ViewerLine) -> Option<Command> {
    let is_avatar = matches!(line.entry_type, EntryType::Normal | EntryType::LindenChat)
        && matches!(
            line.chat_type,
            ChatType::Normal | ChatType::Whisper | ChatType::Shout
        )
        && line
            .from
            .as_deref()
            .is_some_and(|from| !from.trim().is_empty())
        && line.owner_id.as_deref().is_some_and(|o| o != ZERO_UUID);
    if !is_avatar {
        return None;
    }
    command(settings, &line.message)
}

/// The opt-out a viewer line gives, if it is an avatar's opt-out command (`command_of`).
fn opt_out_of(settings: &PrivacySettings, line: &ViewerLine) -> Option<OptOut> {
    if command_of(settings, line) != Some(Command::OptOut) {
        return None;
    }
    let speaker = line.from.as_deref().unwrap_or_default();
    Some(OptOut {
        key: SpeakerKey::of(speaker, speaker_uuid(line)),
        name: speaker.trim().to_owned(),
        since: line.spoken_at,
    })
}

/// A line's speaker UUID, when the viewer gave a real one.
fn speaker_uuid(line: &ViewerLine) -> Option<&str> {
    line.owner_id.as_deref().filter(|o| *o != ZERO_UUID)
}

/// The opt-outs said in one viewer answer, with each command's index in it: a speaker's lines
/// before their opt-out in the same answer were waiting when they opted out, and are not relayed
/// either (`Privacy::judge`).
#[derive(Debug, Default)]
pub struct Ahead {
    opt_outs: Vec<(usize, OptOut)>,
}

impl Ahead {
    /// Notes `line`, the `index`th of its answer, if it is an avatar's opt-out command. The caller
    /// hands over only the lines its own checks let through up to the command.
    pub fn note(&mut self, settings: &PrivacySettings, index: usize, line: &ViewerLine) {
        if let Some(opt_out) = opt_out_of(settings, line) {
            self.opt_outs.push((index, opt_out));
        }
    }

    /// Whether the speaker opts out after the `index`th line.
    fn opts_out_after(&self, index: usize, speaker: &str, uuid: Option<&str>) -> bool {
        self.opt_outs
            .iter()
            .any(|(at, opt_out)| *at > index && opt_out.matches(speaker, uuid))
    }
}

/// What privacy makes of a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judgement {
    /// A command: applied to the running copy already; to be stored (`Privacy::save`) once the
    /// lines read with it are stored. The line itself is not relayed.
    Command(Change),
    /// Its speaker opted out, now or later in the same answer: not relayed.
    OptedOut,
    /// Privacy has nothing against relaying it.
    Relay,
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

/// The notice to say in region `region` (`privacy.notice` with the commands and `{region}` filled
/// in), `None` when it is off.
pub fn notice(settings: &PrivacySettings, region: &str) -> Option<String> {
    if settings.notice.trim().is_empty() {
        return None;
    }
    Some(fill_template(
        settings.notice.trim(),
        &[
            ("optout", settings.optout_command.trim()),
            ("optin", settings.optin_command.trim()),
            ("region", region),
        ],
    ))
}

/// Who opted out, the one handle every stage asks: the running copy (loaded from the outbox at
/// start and changed as commands are read; the outbox follows once the lines read with them are
/// stored) and the stored records (`store`).
pub struct Privacy {
    /// Where the records are kept (the `privacy` tree), and the lines they erase.
    outbox: Arc<Outbox>,
    opt_outs: Mutex<Vec<OptOut>>,
    /// When each speaker (lower-cased name) was last confirmed for each command.
    confirmed: Mutex<HashMap<(String, Command), Instant>>,
}

impl Privacy {
    /// Privacy over `outbox`, its running copy the opt-outs stored there.
    pub fn open(outbox: Arc<Outbox>) -> Result<Privacy, OutboxError> {
        let privacy = Privacy {
            outbox,
            opt_outs: Mutex::default(),
            confirmed: Mutex::default(),
        };
        *privacy.opt_outs() = privacy.stored()?;
        Ok(privacy)
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

    /// What privacy makes of `line`, the `index`th of its answer: a command is applied at once (from
    /// this line on); `ahead` are the opt-outs said in the same answer: a speaker's lines before
    /// their opt-out were waiting when they opted out, and are not relayed either.
    pub fn judge(
        &self,
        settings: &PrivacySettings,
        line: &ViewerLine,
        index: usize,
        ahead: &Ahead,
    ) -> Judgement {
        let speaker = line.from.as_deref().unwrap_or_default();
        let uuid = speaker_uuid(line);
        if let Some(command) = command_of(settings, line) {
            let change = Change {
                speaker: speaker.to_owned(),
                uuid: uuid.map(str::to_owned),
                command,
                at: line.spoken_at,
                watermark: 0,
            };
            self.apply(&change);
            return Judgement::Command(change);
        }
        if ahead.opts_out_after(index, speaker, uuid) || self.is_opted_out(speaker, uuid) {
            return Judgement::OptedOut;
        }
        Judgement::Relay
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

    /// The in-world confirmation of a change (`privacy.confirm_format`): `None` when it is off, or
    /// when the speaker was confirmed for the same command less than `CONFIRM_COOLDOWN` ago.
    pub fn confirmation(
        &self,
        settings: &PrivacySettings,
        change: &Change,
        region: &str,
    ) -> Option<String> {
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
                ("region", region),
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

    const ALICE: &str = "aaaaaaaa-0000-4000-8000-000000000001";

    #[test]
    fn an_opt_out_by_uuid_matches_that_avatar_and_its_name_without_a_uuid() {
        let by_uuid = OptOut {
            key: SpeakerKey::of("Alice Resident", Some(ALICE)),
            name: "Alice Resident".into(),
            since: Utc::now(),
        };
        assert!(by_uuid.matches("Someone Renamed", Some(&ALICE.to_uppercase())));
        assert!(by_uuid.matches("alice resident", None));
        assert!(!by_uuid.matches(
            "Alice Resident",
            Some("bbbbbbbb-0000-4000-8000-000000000002")
        ));
        let by_name = OptOut {
            key: SpeakerKey::of(" Alice Resident ", None),
            ..by_uuid.clone()
        };
        assert!(by_name.matches("ALICE RESIDENT", Some(ALICE)));
        assert!(!by_name.matches("Bob Builder", None));
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
    fn commands_are_taken_from_avatars_in_every_chat_type_and_never_from_objects() {
        let settings = settings();
        let line = |chat_type, entry_type, owner: Option<&str>| ViewerLine {
            from: Some("Alice Resident".into()),
            message: "!nolog".into(),
            chat_type,
            entry_type,
            owner_id: owner.map(str::to_owned),
            spoken_at: Utc::now(),
        };
        let alice = Some("aaaaaaaa-0000-4000-8000-000000000001");
        for chat_type in [ChatType::Normal, ChatType::Whisper, ChatType::Shout] {
            for entry_type in [EntryType::Normal, EntryType::LindenChat] {
                assert_eq!(
                    command_of(&settings, &line(chat_type, entry_type, alice)),
                    Some(Command::OptOut),
                    "{chat_type:?} {entry_type:?}"
                );
            }
        }
        let not_commands = [
            line(ChatType::Normal, EntryType::ObjectChat, alice),
            line(ChatType::OwnerSay, EntryType::OwnerSay, alice),
            line(ChatType::Debug, EntryType::Normal, alice),
            line(ChatType::Normal, EntryType::Normal, Some(ZERO_UUID)),
            line(ChatType::Normal, EntryType::Normal, None),
        ];
        for line in not_commands {
            assert_eq!(command_of(&settings, &line), None, "{line:?}");
        }
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
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::open(dir.path(), 1 << 20).expect("open");
        let privacy = Privacy::open(Arc::new(outbox)).expect("privacy");
        let settings = settings();
        privacy.apply(&change(Command::OptOut));
        assert!(privacy.is_opted_out("Alice Resident", change(Command::OptOut).uuid.as_deref()));
        assert_eq!(
            privacy.confirmation(&settings, &change(Command::OptOut), "Welcome"),
            Some("Alice Resident: not recorded (!log to undo)".into())
        );
        assert_eq!(
            privacy.confirmation(&settings, &change(Command::OptOut), "Welcome"),
            None,
            "a repeat within the cooldown"
        );
        assert_eq!(
            privacy.confirmation(&settings, &change(Command::OptIn), "Welcome"),
            Some("Alice Resident: recorded (!log to undo)".into())
        );
        privacy.apply(&change(Command::OptIn));
        assert!(privacy.is_empty());
        assert_eq!(
            notice(&settings, "Welcome").as_deref(),
            Some("Chat is recorded; say !nolog to opt out")
        );
        let in_region = PrivacySettings {
            notice: "Chat in {region} is recorded; say {optout} to opt out".into(),
            ..settings.clone()
        };
        assert_eq!(
            notice(&in_region, "Sandbox").as_deref(),
            Some("Chat in Sandbox is recorded; say !nolog to opt out")
        );
    }
}
