//! Privacy's storage: who opted out, kept as records in the outbox's `privacy` tree so that they
//! survive restarts, and the erasure of their lines still waiting, on every path that can leave
//! one: a command read in-world (`Privacy::save`), a line delivery is about to send
//! (`Privacy::withhold`), the start after a crash or a `privacy add` (`Privacy::erase_waiting`) and
//! the operator's subcommand (`Privacy::add`, `remove`, `stored`).
//!
//! Owns the records: their keys (`uuid:<avatar uuid>` or `name:<lower-cased name>`) and their
//! value (JSON, `v` = 1). The outbox stores them unread and removes the lines this module picks
//! (`OptOut::matches`), in the same flush as the record (`Outbox::put_privacy_record_and_erase`).
//! Must not reach the outbox's trees any other way.

use chrono::{TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::model::CapturedLine;
use crate::outbox::{OutboxError, PendingLine};
use crate::privacy::{Change, Command, OptOut, Privacy, SpeakerKey};

/// The key of an opt-out in the `privacy` tree: `uuid:<avatar uuid>` or `name:<lower-cased name>`.
fn encode_key(key: &SpeakerKey) -> String {
    match key {
        SpeakerKey::Uuid(uuid) => format!("uuid:{uuid}"),
        SpeakerKey::Name(name) => format!("name:{name}"),
    }
}

/// The speaker of a key of the `privacy` tree; `None` for a key this version does not know.
fn decode_key(key: &[u8]) -> Option<SpeakerKey> {
    let key = std::str::from_utf8(key).ok()?;
    if let Some(uuid) = key.strip_prefix("uuid:") {
        return Some(SpeakerKey::Uuid(uuid.to_owned()));
    }
    key.strip_prefix("name:")
        .map(|name| SpeakerKey::Name(name.to_owned()))
}

/// The stored form of an opt-out.
#[derive(Serialize, Deserialize)]
struct OptOutV1 {
    v: u8,
    name: String,
    since_ms: i64,
}

/// Whether one of `opt_outs` covers `line`.
fn covered(opt_outs: &[OptOut], line: &CapturedLine) -> bool {
    opt_outs
        .iter()
        .any(|o| o.matches(&line.speaker, line.owner_id.as_deref()))
}

impl Privacy {
    /// Every opt-out stored, in key order. A record that cannot be read is skipped.
    pub fn stored(&self) -> Result<Vec<OptOut>, OutboxError> {
        let mut opt_outs = Vec::new();
        for (key, value) in self.outbox.privacy_records()? {
            let Some(key) = decode_key(&key) else {
                continue;
            };
            let Ok(record) = serde_json::from_slice::<OptOutV1>(&value) else {
                continue;
            };
            if record.v != 1 {
                continue;
            }
            opt_outs.push(OptOut {
                key,
                name: record.name,
                since: Utc
                    .timestamp_millis_opt(record.since_ms)
                    .single()
                    .unwrap_or_default(),
            });
        }
        Ok(opt_outs)
    }

    /// Records a change in the outbox; an opt-out erases the speaker's waiting lines (up to its
    /// watermark). Returns how many were erased.
    pub async fn save(&self, change: &Change) -> Result<usize, OutboxError> {
        let uuid = change.uuid.as_deref();
        match change.command {
            Command::OptOut => {
                let opt_out = OptOut {
                    key: SpeakerKey::of(&change.speaker, uuid),
                    name: change.speaker.trim().to_owned(),
                    since: change.at,
                };
                self.store_opt_out(&opt_out, change.watermark).await
            }
            Command::OptIn => self.forget(&change.speaker, uuid).await.map(|_| 0),
        }
    }

    /// Opts `name` out by name (the operator's `privacy add`, while the relay is stopped): stored,
    /// and their waiting lines erased. Returns the opt-out and how many lines were erased.
    pub async fn add(&self, name: &str) -> Result<(OptOut, usize), OutboxError> {
        let opt_out = OptOut {
            key: SpeakerKey::of(name, None),
            name: name.trim().to_owned(),
            since: Utc::now(),
        };
        let n_erased = self.store_opt_out(&opt_out, u64::MAX).await?;
        Ok((opt_out, n_erased))
    }

    /// Forgets every stored opt-out of `name` (the operator's `privacy remove`). Returns how many.
    pub async fn remove(&self, name: &str) -> Result<usize, OutboxError> {
        self.forget(name, None).await
    }

    /// Remembers `opt_out` and erases the committed pending lines of that speaker up to the key
    /// `up_to` (a `pending_watermark` taken when the command was read: lines stored after it are
    /// not the ones waiting when the speaker opted out) and their dead letters, in one flush.
    /// Returns how many lines were erased. The opt-out is written first: sled keeps write order,
    /// so a crash may leave it without the erasure (which the next start makes, `erase_waiting`),
    /// never the erasure without it.
    ///
    /// A line in flight is erased too: a POST that ends later cannot bring the record back (the
    /// outbox rewrites only records still pending), and delivery sends no line of a speaker who
    /// opted out (`withhold`).
    async fn store_opt_out(&self, opt_out: &OptOut, up_to: u64) -> Result<usize, OutboxError> {
        let record = OptOutV1 {
            v: 1,
            name: opt_out.name.clone(),
            since_ms: opt_out.since.timestamp_millis(),
        };
        let value =
            serde_json::to_vec(&record).expect("serializing strings and integers cannot fail");
        let theirs = std::slice::from_ref(opt_out);
        self.outbox
            .put_privacy_record_and_erase(
                encode_key(&opt_out.key).as_bytes(),
                &value,
                up_to,
                |line| covered(theirs, line),
            )
            .await
    }

    /// Forgets every stored opt-out of the speaker (`OptOut::matches`), and flushes. Returns how
    /// many.
    async fn forget(&self, speaker: &str, uuid: Option<&str>) -> Result<usize, OutboxError> {
        let keys: Vec<Vec<u8>> = self
            .stored()?
            .iter()
            .filter(|opt_out| opt_out.matches(speaker, uuid))
            .map(|opt_out| encode_key(&opt_out.key).into_bytes())
            .collect();
        self.outbox.remove_privacy_records(&keys).await
    }

    /// Erases every committed pending line (and dead letter) of a speaker who opted out, and
    /// flushes. Returns how many. Run at start, it completes an opt-out a crash interrupted, and
    /// one `privacy add` made while the relay was stopped.
    pub async fn erase_waiting(&self) -> Result<usize, OutboxError> {
        let opt_outs = self.stored()?;
        if opt_outs.is_empty() {
            return Ok(0);
        }
        self.outbox
            .erase(u64::MAX, |line| covered(&opt_outs, line))
            .await
    }

    /// Splits `lines` (read by delivery to be sent) into those to send and those of a speaker who
    /// opted out since they were read, which are erased from the outbox (and flushed) if still
    /// there. Returns the lines to send and how many were erased now. For a line in flight when its
    /// speaker opted out, whose POST's outcome is unknown: a read-back that does not find it must
    /// not send it again. Judged by the stored opt-outs, as the erasure at the opt-out was.
    pub async fn withhold(
        &self,
        lines: Vec<PendingLine>,
    ) -> Result<(Vec<PendingLine>, usize), OutboxError> {
        let opt_outs = self.stored()?;
        if opt_outs.is_empty() {
            return Ok((lines, 0));
        }
        self.outbox
            .erase_read(lines, |line| covered(&opt_outs, line))
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::DateTime;

    use super::*;
    use crate::outbox::Outbox;

    fn line(speaker: &str, uuid: Option<&str>, text: &str) -> CapturedLine {
        CapturedLine::said_now(speaker, uuid, text)
    }

    const ALICE: &str = "aaaaaaaa-0000-4000-8000-000000000001";

    /// Alice's command, read when the outbox's watermark was `watermark`.
    fn alice_says(command: Command, watermark: u64) -> Change {
        Change {
            speaker: "Alice Resident".into(),
            uuid: Some(ALICE.into()),
            command,
            at: DateTime::default(),
            watermark,
        }
    }

    fn open(dir: &std::path::Path) -> (Arc<Outbox>, Privacy) {
        let outbox = Arc::new(Outbox::open(dir, 1 << 20).expect("open"));
        let privacy = Privacy::open(outbox.clone()).expect("privacy");
        (outbox, privacy)
    }

    #[tokio::test]
    async fn opting_out_erases_the_speakers_waiting_lines_up_to_the_watermark_and_survives_a_reopen()
     {
        let dir = tempfile::tempdir().expect("tempdir");
        let (outbox, privacy) = open(dir.path());
        outbox
            .append(&[
                line("Alice Resident", Some(ALICE), "before"),
                line("Bob Builder", None, "bob's"),
                line("alice resident", None, "before, no uuid"),
            ])
            .await
            .expect("append");
        let watermark = outbox.pending_watermark();
        outbox
            .append(&[line("Alice Resident", Some(ALICE), "after the command")])
            .await
            .expect("append");

        let n_erased = privacy
            .save(&alice_says(Command::OptOut, watermark))
            .await
            .expect("opt out");

        assert_eq!(n_erased, 2);
        let texts: Vec<String> = outbox
            .oldest(10)
            .expect("read")
            .into_iter()
            .map(|p| p.line.message)
            .collect();
        assert_eq!(texts, ["bob's", "after the command"]);
        assert_eq!(outbox.len(), 2);
        drop((outbox, privacy));

        let (_outbox, privacy) = open(dir.path());
        assert_eq!(privacy.len(), 1, "remembered on disk");
        assert!(privacy.is_opted_out("Alice Resident", Some(ALICE)));
        assert_eq!(
            privacy.erase_waiting().await.expect("erase"),
            1,
            "the rest at start"
        );
        privacy
            .save(&alice_says(Command::OptIn, 0))
            .await
            .expect("opt in");
        assert!(privacy.stored().expect("read").is_empty());
    }

    #[tokio::test]
    async fn the_operator_adds_and_removes_an_opt_out_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (outbox, privacy) = open(dir.path());
        outbox
            .append(&[
                line("Carol Visitor", Some(ALICE), "waiting"),
                line("Bob Builder", None, "bob's"),
            ])
            .await
            .expect("append");

        let (opt_out, n_erased) = privacy.add(" Carol Visitor ").await.expect("add");

        assert_eq!((opt_out.name.as_str(), n_erased), ("Carol Visitor", 1));
        assert_eq!(outbox.len(), 1);
        assert_eq!(privacy.stored().expect("read").len(), 1);
        assert_eq!(privacy.remove("carol visitor").await.expect("remove"), 1);
        assert_eq!(privacy.remove("carol visitor").await.expect("remove"), 0);
        assert!(privacy.stored().expect("read").is_empty());
    }

    #[tokio::test]
    async fn opting_out_removes_the_speakers_dead_letters_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (outbox, privacy) = open(dir.path());
        outbox
            .append(&[
                line("Alice Resident", Some(ALICE), "refused by the cms"),
                line("Bob Builder", None, "refused too"),
            ])
            .await
            .expect("append");
        for pending in outbox.oldest(10).expect("read") {
            outbox
                .dead_letter(&pending, "refused")
                .await
                .expect("dead letter");
        }
        assert_eq!(outbox.dead_len(), 2);

        let n_erased = privacy
            .save(&alice_says(Command::OptOut, outbox.pending_watermark()))
            .await
            .expect("opt out");

        assert_eq!(n_erased, 1);
        let left: Vec<String> = outbox
            .dead_letters()
            .expect("read")
            .into_iter()
            .map(|dead| dead.pending.line.message)
            .collect();
        assert_eq!(left, ["refused too"]);
        assert_eq!(outbox.dead_len(), 1);
    }

    #[tokio::test]
    async fn delivery_is_not_handed_a_line_whose_speaker_opted_out_after_it_was_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (outbox, privacy) = open(dir.path());
        outbox
            .append(&[line("Bob Builder", None, "delivered already")])
            .await
            .expect("append");
        let delivered = outbox.oldest(1).expect("read");
        outbox.remove(&[delivered[0].id]).await.expect("confirmed");
        let watermark = outbox.pending_watermark();
        outbox
            .append(&[
                line("Alice Resident", Some(ALICE), "read before the opt-out"),
                line("Bob Builder", None, "bob's"),
            ])
            .await
            .expect("append");
        let read = outbox.oldest(10).expect("read");
        let (unchanged, n_erased) = privacy.withhold(read.clone()).await.expect("withhold");
        assert_eq!((unchanged.len(), n_erased), (2, 0), "nobody opted out");

        // The opt-out is stored, but its erasure stopped short of the line (a watermark from before
        // it was stored: as after a crash between the two writes).
        privacy
            .save(&alice_says(Command::OptOut, watermark))
            .await
            .expect("opt out");
        let (to_send, n_erased) = privacy.withhold(read).await.expect("withhold");

        assert_eq!(n_erased, 1);
        assert_eq!(to_send.len(), 1);
        assert_eq!(to_send[0].line.message, "bob's");
        assert_eq!(outbox.len(), 1, "the line left the outbox");
    }
}
