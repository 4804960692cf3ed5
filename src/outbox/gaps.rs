//! Gaps the outbox knows of: lines it dropped (`outbox.max_bytes`, `outbox.max_age`) and viewer
//! answers it quarantined unread, noted in the `meta` tree under one key in the same write (and
//! flush) as the drop or the quarantine, so a crash cannot lose the note while keeping the loss.
//! `presence` turns settled notes into gap markers and removes them in the flush that stores the
//! markers (`mark_gaps`), so each is marked once, across restarts too.
//!
//! Owns the key `gaps.pending` and its encoding (JSON, a list of [`GapNote`]). Must not compose the
//! marker text (the outbox does not know regions or zones).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::CapturedLine;
use crate::outbox::store::Store;
use crate::outbox::{Outbox, OutboxError};

/// The `meta` key of the notes.
const KEY: &str = "gaps.pending";

/// At most this many notes are kept; beyond, the last one is widened (a broken CMS that lets the
/// outbox drop for days must not grow the key without bound).
const MAX_NOTES: usize = 1000;

/// Why lines were lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GapKind {
    /// Dropped, oldest first, to keep the outbox within `outbox.max_bytes`.
    DroppedForSpace,
    /// Dropped because they waited longer than `outbox.max_age`.
    DroppedForAge,
    /// A viewer answer that could not be read (kept in the quarantine, or counted when it repeats
    /// one kept or the quarantine is full).
    Unreadable,
}

/// One loss the outbox knows of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GapNote {
    /// Why.
    pub kind: GapKind,
    /// When the first line lost was said (or the answer received).
    pub from: DateTime<Utc>,
    /// When the last line lost was said (or the answer received).
    pub to: DateTime<Utc>,
    /// Lines lost (answers, for `Unreadable`).
    pub n: u64,
    /// When the note was written: markers wait until the notes have settled.
    pub noted_at: DateTime<Utc>,
}

impl Outbox {
    /// Adds `note` to the pending notes, without flushing (the caller's flush carries it with the
    /// loss it records).
    pub(super) fn note_gap(&self, store: &Store, note: GapNote) -> Result<(), OutboxError> {
        let mut note = Some(note);
        self.db.io(store.meta.update_and_fetch(KEY, |old| {
            let mut notes = decode(old);
            if let Some(note) = note.take() {
                push_note(&mut notes, note);
            }
            Some(encode(&notes))
        }))?;
        Ok(())
    }

    /// The notes not yet marked, oldest first.
    pub fn pending_gaps(&self) -> Result<Vec<GapNote>, OutboxError> {
        let store = self.store()?;
        Ok(decode(self.db.io(store.meta.get(KEY))?.as_deref()))
    }

    /// Stores `markers` and removes the first `n_notes` notes (those the markers tell) in one
    /// flush: a marker is written once.
    pub async fn mark_gaps(
        &self,
        markers: &[CapturedLine],
        n_notes: usize,
    ) -> Result<(), OutboxError> {
        let store = self.store()?;
        let taken = self.db.io(store.meta.fetch_and_update(KEY, |old| {
            let mut notes = decode(old);
            notes.drain(..n_notes.min(notes.len()));
            Some(encode(&notes))
        }))?;
        let appended = self.append(markers).await;
        if appended.is_err() {
            // The markers did not reach the disk: the notes must stay for the next try.
            let _ = match taken {
                Some(old) => self.db.io(store.meta.insert(KEY, old)).map(drop),
                None => self.db.io(store.meta.remove(KEY)).map(drop),
            };
        }
        appended
    }
}

fn push_note(notes: &mut Vec<GapNote>, note: GapNote) {
    let full = notes.len() >= MAX_NOTES;
    match notes.last_mut() {
        Some(last) if full => {
            last.from = last.from.min(note.from);
            last.to = last.to.max(note.to);
            last.n += note.n;
            last.noted_at = note.noted_at;
        }
        _ => notes.push(note),
    }
}

/// A note as stored: times in Unix milliseconds.
#[derive(Serialize, Deserialize)]
struct Wire {
    kind: GapKind,
    from: i64,
    to: i64,
    n: u64,
    noted_at: i64,
}

fn decode(value: Option<&[u8]>) -> Vec<GapNote> {
    // An unreadable list (a newer relay's format) is started afresh: markers are a courtesy, the
    // counters in /metrics keep the losses.
    let wire: Vec<Wire> = value
        .and_then(|bytes| serde_json::from_slice(bytes).ok())
        .unwrap_or_default();
    let time = |millis| DateTime::<Utc>::from_timestamp_millis(millis).unwrap_or_default();
    wire.into_iter()
        .map(|note| GapNote {
            kind: note.kind,
            from: time(note.from),
            to: time(note.to),
            n: note.n,
            noted_at: time(note.noted_at),
        })
        .collect()
}

fn encode(notes: &[GapNote]) -> Vec<u8> {
    let wire: Vec<Wire> = notes
        .iter()
        .map(|note| Wire {
            kind: note.kind,
            from: note.from.timestamp_millis(),
            to: note.to.timestamp_millis(),
            n: note.n,
            noted_at: note.noted_at.timestamp_millis(),
        })
        .collect();
    serde_json::to_vec(&wire).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str, spoken_at: DateTime<Utc>) -> CapturedLine {
        CapturedLine {
            source: crate::model::LineSource::Avatar,
            speaker: "Alice Resident".into(),
            owner_id: None,
            message: text.into(),
            spoken_at,
            captured_at: spoken_at,
            region: String::new(),
        }
    }

    #[tokio::test]
    async fn a_drop_is_noted_with_its_span_and_the_note_outlives_a_reopen_until_marked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = Utc::now() - chrono::Duration::hours(2);
        {
            let outbox = Outbox::open(dir.path(), 1 << 20)
                .expect("open")
                .with_limits(crate::outbox::Limits {
                    max_bytes: 1 << 30,
                    max_age: std::time::Duration::from_secs(3600),
                    when_full: crate::outbox::WhenFull::DropOldest,
                    reserve_bytes: 0,
                });
            let lines = [
                line("a", old),
                line("b", old + chrono::Duration::seconds(30)),
                line("fresh", Utc::now()),
            ];
            outbox.append(&lines).await.expect("append");
            assert_eq!(outbox.drop_expired().await.expect("drop"), 2);
        }
        let outbox = Outbox::open(dir.path(), 1 << 20).expect("reopen");
        let notes = outbox.pending_gaps().expect("notes");
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert_eq!(notes[0].kind, GapKind::DroppedForAge);
        assert_eq!(notes[0].n, 2);
        assert_eq!(notes[0].from.timestamp_millis(), old.timestamp_millis());
        assert_eq!(
            notes[0].to.timestamp_millis(),
            (old + chrono::Duration::seconds(30)).timestamp_millis()
        );
        assert!(
            !format!("{notes:?}").contains("Alice"),
            "a note keeps no speaker"
        );

        let marker = line("[relay] marker", Utc::now());
        outbox
            .mark_gaps(&[marker], notes.len())
            .await
            .expect("mark");
        drop(outbox);
        let outbox = Outbox::open(dir.path(), 1 << 20).expect("reopen");
        assert!(outbox.pending_gaps().expect("notes").is_empty());
        assert_eq!(outbox.len(), 2, "the fresh line and the marker");
    }

    #[tokio::test]
    async fn a_dropped_marker_is_not_noted_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::open(dir.path(), 1 << 20)
            .expect("open")
            .with_limits(crate::outbox::Limits {
                max_bytes: 1 << 30,
                max_age: std::time::Duration::from_secs(60),
                when_full: crate::outbox::WhenFull::DropOldest,
                reserve_bytes: 0,
            });
        let marker = CapturedLine {
            source: crate::model::LineSource::Relay,
            speaker: String::new(),
            ..line(
                "[relay] chat in Welcome was not recorded …",
                Utc::now() - chrono::Duration::hours(1),
            )
        };
        outbox.append(&[marker]).await.expect("append");
        assert_eq!(outbox.drop_expired().await.expect("drop"), 1);
        assert!(outbox.pending_gaps().expect("notes").is_empty());
    }
}
