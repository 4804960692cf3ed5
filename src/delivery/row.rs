//! The row a line becomes: the CMS user its speaker maps to (or the anonymous user, its name in
//! the text), the text as the CMS stores it, and the timestamp string in the CMS's zone, decided
//! once before the line's first POST and kept with it.
//!
//! Must not: decide a row again for a line that was sent (its read-back looks for the row it was
//! sent as), or take an object's name for an avatar's.

use crate::cms::wire::{ChatItem, sanitize_message};
use crate::delivery::readback::ROW_TIME;
use crate::delivery::{ChatApi, Delivery};
use crate::model::{LineSource, fill_template};
use crate::outbox::{LineState, PendingLine, Prepared};

impl<C: ChatApi> Delivery<C> {
    /// Fixes the row of every line that has none yet. The decision is stored with the in-flight mark
    /// (`mark_in_flight`), in the same write, before the first POST: a line that is not sent this
    /// time was never sent, so deciding it again later is harmless, and one write and one flush per
    /// batch fewer is a third of delivery's outbox work.
    pub(super) async fn prepare(&self, lines: &mut [PendingLine]) {
        for pending in lines.iter_mut().filter(|l| l.row().is_none()) {
            let line = &pending.line;
            // Only an avatar's name is looked up: an object may name itself after any avatar, and
            // the relay's own lines are said by no one.
            let user = match line.source {
                LineSource::Avatar => {
                    self.deps
                        .mapper
                        .resolve(&line.speaker, line.owner_id.as_deref())
                        .await
                }
                LineSource::Object | LineSource::Relay => None,
            };
            let message = match (user, line.source) {
                (Some(_), _) => line.message.clone(),
                (None, LineSource::Relay) => line.message.clone(),
                (None, LineSource::Avatar) => fill_template(
                    &self.deps.settings.anonymous_format,
                    &[
                        ("name", &line.speaker),
                        ("message", &line.message),
                        ("region", self.deps.region_label(&line.region)),
                    ],
                ),
                (None, LineSource::Object) => fill_template(
                    &self.deps.settings.anonymous_format,
                    &[
                        ("name", &format!("{} (object)", line.speaker)),
                        ("message", &line.message),
                        ("region", self.deps.region_label(&line.region)),
                    ],
                ),
            };
            let row = Prepared {
                user_id: user.unwrap_or(self.deps.settings.anonymous_user_id),
                message: sanitize_message(&message),
                timestamp: self
                    .deps
                    .settings
                    .timezone
                    .wall_clock(line.spoken_at)
                    .format(ROW_TIME)
                    .to_string(),
            };
            // In memory: written with the in-flight mark. A record in flight without its row keeps
            // its place in flight, to be read back for the row decided now.
            pending.state = match &pending.state {
                LineState::InFlight { after, .. } => LineState::InFlight {
                    row: Some(row),
                    after: *after,
                },
                _ => LineState::Prepared(row),
            };
        }
    }
}

/// The row of a prepared line.
pub(super) fn item_of(line: &PendingLine) -> ChatItem {
    let prepared = line
        .row()
        .expect("every path prepares its lines (`prepare`) before it sends them");
    ChatItem {
        user_id: prepared.user_id,
        message: prepared.message.clone(),
        timestamp: prepared.timestamp.clone(),
        from_cms: 0,
    }
}
