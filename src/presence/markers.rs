//! The gap markers: the relay's own lines in the outbox that say chat was not recorded, for a
//! stretch out of the region (written by the task when the stretch ends) and for the losses the
//! outbox noted (lines dropped by its bounds, answers quarantined unread) once they settle. Must
//! not quote a missed line's text or speaker, or write a marker for notes still coming in.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{OutboxGaps, Presence};
use crate::metrics::Stats;
use crate::model::{CapturedLine, LineSource};
use crate::outbox::{GapKind, GapNote, OutboxError};
use crate::zone::Zone;

/// How long the outbox's gap notes must have stopped coming before their markers are written: a
/// CMS outage that makes the outbox drop lines at every poll gets one marker when it ends, not one
/// a poll.
pub const GAP_SETTLE: Duration = Duration::from_secs(10);

impl Presence {
    /// Writes one marker per kind of loss for the outbox's gap notes once they have settled, and
    /// removes the notes in the same flush.
    pub(super) async fn mark_settled_gaps(&mut self) -> Result<(), OutboxError> {
        let notes = self.deps.outbox.pending_gaps()?;
        let Some(newest) = notes.iter().map(|note| note.noted_at).max() else {
            return Ok(());
        };
        let now = Utc::now();
        if (now - newest).to_std().unwrap_or_default() < GAP_SETTLE {
            return Ok(());
        }
        let markers: Vec<CapturedLine> = if self.deps.gap_markers {
            let region = match &self.deps.outbox_gaps {
                OutboxGaps::Here => self.region_label(),
                OutboxGaps::Of(regions) => regions.as_str(),
                OutboxGaps::Elsewhere => return Ok(()),
            };
            outbox_gap_markers(&notes, region, self.deps.cms_zone)
                .into_iter()
                .map(|message| relay_line(message, now, &self.deps.name))
                .collect()
        } else {
            Vec::new()
        };
        self.deps.outbox.mark_gaps(&markers, notes.len()).await?;
        if !markers.is_empty() {
            Stats::add(&self.deps.stats.gap_markers, markers.len() as u64);
            tracing::info!(
                n_markers = markers.len(),
                "gap markers written for lines the outbox dropped or could not read"
            );
        }
        Ok(())
    }
}

/// A line of the relay's own, said by no one: delivery stores it anonymously, as it is.
pub(super) fn relay_line(message: String, at: DateTime<Utc>, region: &str) -> CapturedLine {
    CapturedLine {
        source: LineSource::Relay,
        speaker: String::new(),
        owner_id: None,
        message,
        spoken_at: at,
        captured_at: at,
        region: region.to_owned(),
    }
}

/// The marker line: what, where, between which times (wall clock in `zone`; with the date when
/// the two fall on different days) and why; never a missed line's text or speaker.
pub fn gap_marker(
    region: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    why: &str,
    zone: Zone,
) -> String {
    let (from, to) = wall_clock_pair(from, to, zone);
    format!("[relay] chat in {region} was not recorded between {from} and {to}: {why}")
}

/// The markers for the outbox's gap notes: one per kind, spanning its notes, in the order the
/// kinds first occur.
pub fn outbox_gap_markers(notes: &[GapNote], region: &str, zone: Zone) -> Vec<String> {
    let mut spans: Vec<(GapKind, DateTime<Utc>, DateTime<Utc>, u64)> = Vec::new();
    for note in notes {
        match spans.iter_mut().find(|(kind, ..)| *kind == note.kind) {
            Some((_, from, to, n)) => {
                *from = (*from).min(note.from);
                *to = (*to).max(note.to);
                *n += note.n;
            }
            None => spans.push((note.kind, note.from, note.to, note.n)),
        }
    }
    spans
        .into_iter()
        .map(|(kind, from, to, n)| {
            let (from, to) = wall_clock_pair(from, to, zone);
            let lines = if n == 1 {
                "1 line".to_owned()
            } else {
                format!("{n} lines")
            };
            let were = if n == 1 { "was" } else { "were" };
            match kind {
                GapKind::DroppedForSpace => format!(
                    "[relay] {lines} of chat in {region} said between {from} and {to} {were} not recorded: the relay's outbox was full (outbox.max_bytes) while the CMS did not take them"
                ),
                GapKind::DroppedForAge => format!(
                    "[relay] {lines} of chat in {region} said between {from} and {to} {were} not recorded: they waited longer than outbox.max_age for the CMS"
                ),
                // The lines of the answer before the point where it broke are relayed: "some".
                GapKind::Unreadable if n == 1 => format!(
                    "[relay] some chat in {region} received at {to} was not recorded: the viewer's answer could not be read whole (kept in the outbox quarantine)"
                ),
                GapKind::Unreadable => format!(
                    "[relay] some chat in {region} received between {from} and {to} was not recorded: {n} viewer answers could not be read whole (kept in the outbox quarantine)"
                ),
            }
        })
        .collect()
}

/// Two instants as wall-clock times in `zone`: `HH:MM:SS`, with the date when they fall on
/// different days.
fn wall_clock_pair(from: DateTime<Utc>, to: DateTime<Utc>, zone: Zone) -> (String, String) {
    let (from, to) = (zone.wall_clock(from), zone.wall_clock(to));
    let format = if from.date() == to.date() {
        "%H:%M:%S"
    } else {
        "%Y-%m-%d %H:%M:%S"
    };
    (
        from.format(format).to_string(),
        to.format(format).to_string(),
    )
}
