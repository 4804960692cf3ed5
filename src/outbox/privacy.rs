//! The opt-outs' storage: who asked not to be recorded (`privacy.optout_command`,
//! `opensim-chat-relay privacy add`), kept in the `privacy` tree so that they survive restarts, and
//! the dropping of their lines still pending.
//!
//! Owns the tree, its keys (`uuid:<avatar uuid>` or `name:<lower-cased name>`) and its record (JSON,
//! `v` = 1). Must not decide who opted out or whose line is whose: those rules are `crate::privacy`'s
//! (`OptOut::matches`, applied here to the waiting lines). Must not touch lines that are not
//! committed yet (a failed ingest's retry writes them again).

use chrono::{TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::outbox::record::decode_pending;
use crate::outbox::store::Store;
use crate::outbox::{Outbox, OutboxError, PendingLine};
use crate::privacy::{OptOut, SpeakerKey};

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

impl Outbox {
    /// Every opt-out, in key order. A record that cannot be read is skipped.
    pub fn opt_outs(&self) -> Result<Vec<OptOut>, OutboxError> {
        let store = self.store()?;
        let mut opt_outs = Vec::new();
        for entry in store.privacy.iter() {
            let (key, value) = self.db.io(entry)?;
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

    /// The highest pending key that is committed: every line stored so far lies at or below it, and
    /// every line stored from now on above it.
    pub fn pending_watermark(&self) -> u64 {
        self.committed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Remembers `opt_out` and drops the committed pending lines of that speaker up to the key
    /// `up_to` (a `pending_watermark` taken when the command was read: lines stored after it are
    /// not the ones waiting when the speaker opted out) and their dead letters, then flushes.
    /// Returns how many lines were dropped. The opt-out is written first: sled keeps write order, so a crash may leave it without
    /// the drop (which the next start makes, `drop_opted_out`), never the drop without it.
    ///
    /// A line in flight is dropped too: a POST that ends later cannot bring the record back (`save`
    /// rewrites only records still pending), and delivery sends no line of a speaker who opted out
    /// (`withhold_opted_out`).
    pub async fn opt_out(&self, opt_out: &OptOut, up_to: u64) -> Result<usize, OutboxError> {
        let store = self.store()?;
        let record = OptOutV1 {
            v: 1,
            name: opt_out.name.clone(),
            since_ms: opt_out.since.timestamp_millis(),
        };
        let value =
            serde_json::to_vec(&record).expect("serializing strings and integers cannot fail");
        self.db
            .io(store.privacy.insert(encode_key(&opt_out.key), value))?;
        let n_dropped = self.drop_pending_of(&store, std::slice::from_ref(opt_out), up_to)?;
        self.db.flush(&store).await?;
        Ok(n_dropped)
    }

    /// Forgets every opt-out of the speaker (`OptOut::matches`), and flushes. Returns how many.
    pub async fn opt_in(&self, speaker: &str, uuid: Option<&str>) -> Result<usize, OutboxError> {
        let store = self.store()?;
        let mut n_removed = 0;
        for opt_out in self.opt_outs()? {
            if opt_out.matches(speaker, uuid) {
                self.db.io(store.privacy.remove(encode_key(&opt_out.key)))?;
                n_removed += 1;
            }
        }
        self.db.flush(&store).await?;
        Ok(n_removed)
    }

    /// Drops every committed pending line of a speaker who opted out, and flushes. Returns how many.
    /// Run at start, it completes an opt-out a crash interrupted, and one `privacy add` made while
    /// the relay was stopped.
    pub async fn drop_opted_out(&self) -> Result<usize, OutboxError> {
        let opt_outs = self.opt_outs()?;
        if opt_outs.is_empty() {
            return Ok(0);
        }
        let store = self.store()?;
        let n_dropped = self.drop_pending_of(&store, &opt_outs, u64::MAX)?;
        self.db.flush(&store).await?;
        Ok(n_dropped)
    }

    /// Splits `lines` (read to be sent) into those to send and those of a speaker who opted out
    /// since they were read, which are dropped from the outbox (and flushed) if still there. Returns
    /// the lines to send and how many were dropped now. For a line in flight when its speaker opted
    /// out, whose POST's outcome is unknown: a read-back that does not find it must not send it again.
    pub async fn withhold_opted_out(
        &self,
        lines: Vec<PendingLine>,
    ) -> Result<(Vec<PendingLine>, usize), OutboxError> {
        let opt_outs = self.opt_outs()?;
        if opt_outs.is_empty() {
            return Ok((lines, 0));
        }
        let store = self.store()?;
        let (mut kept, mut n_dropped) = (Vec::with_capacity(lines.len()), 0);
        for pending in lines {
            let line = &pending.line;
            if !opt_outs
                .iter()
                .any(|o| o.matches(&line.speaker, line.owner_id.as_deref()))
            {
                kept.push(pending);
            } else if self.remove_pending(&store, &pending.id.to_be_bytes())? {
                n_dropped += 1;
            }
        }
        if n_dropped > 0 {
            self.db.flush(&store).await?;
        }
        Ok((kept, n_dropped))
    }

    /// Removes the committed pending lines, with keys up to `up_to`, that one of `opt_outs` matches,
    /// and their dead letters (kept for an operator until requeued or purged: an opt-out removes
    /// them too). A record that cannot be decoded is left for delivery to quarantine.
    fn drop_pending_of(
        &self,
        store: &Store,
        opt_outs: &[OptOut],
        up_to: u64,
    ) -> Result<usize, OutboxError> {
        let mut theirs = Vec::new();
        for entry in self.committed_pending(store) {
            let (key, value) = self.db.io(entry)?;
            let Some(pending) = decode_pending(&key, &value) else {
                continue;
            };
            if pending.id > up_to {
                break;
            }
            let line = &pending.line;
            if opt_outs
                .iter()
                .any(|o| o.matches(&line.speaker, line.owner_id.as_deref()))
            {
                theirs.push(key);
            }
        }
        let mut n_dropped = self.remove_dead_where(store, |pending| {
            let line = &pending.line;
            opt_outs
                .iter()
                .any(|o| o.matches(&line.speaker, line.owner_id.as_deref()))
        })?;
        for key in theirs {
            if self.remove_pending(store, &key)? {
                n_dropped += 1;
            }
        }
        Ok(n_dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CapturedLine;

    fn line(speaker: &str, uuid: Option<&str>, text: &str) -> CapturedLine {
        let now = Utc
            .timestamp_millis_opt(Utc::now().timestamp_millis())
            .single()
            .expect("now");
        CapturedLine {
            source: crate::model::LineSource::Avatar,
            speaker: speaker.into(),
            owner_id: uuid.map(str::to_owned),
            message: text.into(),
            spoken_at: now,
            captured_at: now,
            region: String::new(),
        }
    }

    const ALICE: &str = "aaaaaaaa-0000-4000-8000-000000000001";

    fn alice_opts_out() -> OptOut {
        OptOut {
            key: SpeakerKey::of("Alice Resident", Some(ALICE)),
            name: "Alice Resident".into(),
            since: Utc::now(),
        }
    }

    #[tokio::test]
    async fn opting_out_drops_the_speakers_waiting_lines_up_to_the_watermark_and_survives_a_reopen()
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::open(dir.path(), 1 << 20).expect("open");
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

        let n_dropped = outbox
            .opt_out(&alice_opts_out(), watermark)
            .await
            .expect("opt out");

        assert_eq!(n_dropped, 2);
        let texts: Vec<String> = outbox
            .oldest(10)
            .expect("read")
            .into_iter()
            .map(|p| p.line.message)
            .collect();
        assert_eq!(texts, ["bob's", "after the command"]);
        assert_eq!(outbox.len(), 2);
        drop(outbox);

        let outbox = Outbox::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!(
            outbox.opt_outs().expect("read").len(),
            1,
            "remembered on disk"
        );
        assert_eq!(
            outbox.drop_opted_out().await.expect("drop"),
            1,
            "the rest at start"
        );
        assert_eq!(
            outbox
                .opt_in("Alice Resident", Some(ALICE))
                .await
                .expect("opt in"),
            1
        );
        assert!(outbox.opt_outs().expect("read").is_empty());
    }

    #[tokio::test]
    async fn opting_out_removes_the_speakers_dead_letters_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::open(dir.path(), 1 << 20).expect("open");
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

        let n_dropped = outbox
            .opt_out(&alice_opts_out(), outbox.pending_watermark())
            .await
            .expect("opt out");

        assert_eq!(n_dropped, 1);
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
        let outbox = Outbox::open(dir.path(), 1 << 20).expect("open");
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
        let (unchanged, n_dropped) = outbox
            .withhold_opted_out(read.clone())
            .await
            .expect("withhold");
        assert_eq!((unchanged.len(), n_dropped), (2, 0), "nobody opted out");

        // The opt-out is stored, but its drop stopped short of the line (a watermark from before it
        // was stored: as after a crash between the two writes).
        outbox
            .opt_out(&alice_opts_out(), watermark)
            .await
            .expect("opt out");
        let (to_send, n_dropped) = outbox.withhold_opted_out(read).await.expect("withhold");

        assert_eq!(n_dropped, 1);
        assert_eq!(to_send.len(), 1);
        assert_eq!(to_send[0].line.message, "bob's");
        assert_eq!(outbox.len(), 1, "the line left the outbox");
    }
}
