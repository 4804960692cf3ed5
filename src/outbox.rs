//! `Outbox`: the durable queue between the viewer and the CMS, in one sled database.
//!
//! Trees: `pending` (lines not yet confirmed by the CMS, keyed by a big-endian id from
//! `generate_id`, so key order is capture order), `dead` (lines the CMS refused, with the reason),
//! `quarantine` (records that could not be decoded and viewer bodies that could not be parsed, kept
//! raw for an operator), `meta` (small cursors).
//!
//! Invariants: `append` returns only after the lines are flushed to disk; a line leaves `pending` only
//! through `remove` (the CMS confirmed it) or `dead_letter`. This is the only module that imports sled.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::model::CapturedLine;

/// Why the outbox failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// Another process holds the database.
    #[error(
        "outbox {path} is in use by another process (another relay?): stop it, or give this one its own outbox.path"
    )]
    Locked {
        /// The directory.
        path: String,
    },
    /// The database cannot be opened (damaged, unreadable).
    #[error(
        "outbox {path} cannot be opened: {source}; to recover, stop the relay, move the directory aside (mv {path} {path}.broken) and start again"
    )]
    Open {
        /// The directory.
        path: String,
        /// sled's error.
        source: sled::Error,
    },
    /// A read or write failed (disk full, I/O error).
    #[error("outbox storage error: {0}")]
    Storage(#[from] sled::Error),
}

/// What delivery decided to send for a line, fixed before the first POST so that a retry sends exactly
/// the same row (and a read-back can recognise it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepared {
    /// CMS user id.
    pub user_id: i64,
    /// The text as sent.
    pub message: String,
    /// The timestamp as sent.
    pub timestamp: String,
}

/// A line waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingLine {
    /// Outbox id; increases with capture order.
    pub id: u64,
    /// The line.
    pub line: CapturedLine,
    /// Failed delivery attempts so far.
    pub attempts: u32,
    /// The row as it will be sent, once decided.
    pub prepared: Option<Prepared>,
    /// A POST carrying this line was sent and its outcome is not known: read back before resending.
    pub in_flight: bool,
}

/// A line the CMS refused.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLine {
    /// The pending line as it was.
    pub pending: PendingLine,
    /// Why.
    pub reason: String,
    /// When it was dead-lettered.
    pub dead_at: DateTime<Utc>,
}

/// The stored form of a pending line. `v` versions the format; unknown versions are quarantined.
#[derive(Serialize, Deserialize)]
struct RecordV1 {
    v: u8,
    speaker: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner_id: Option<String>,
    message: String,
    spoken_at_ms: i64,
    captured_at_ms: i64,
    attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prepared: Option<Prepared>,
    #[serde(default)]
    in_flight: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dead_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dead_at_ms: Option<i64>,
}

impl RecordV1 {
    fn from_pending(pending: &PendingLine) -> RecordV1 {
        let line = &pending.line;
        RecordV1 {
            v: 1,
            speaker: line.speaker.clone(),
            owner_id: line.owner_id.clone(),
            message: line.message.clone(),
            spoken_at_ms: line.spoken_at.timestamp_millis(),
            captured_at_ms: line.captured_at.timestamp_millis(),
            attempts: pending.attempts,
            prepared: pending.prepared.clone(),
            in_flight: pending.in_flight,
            dead_reason: None,
            dead_at_ms: None,
        }
    }

    fn into_pending(self, id: u64) -> Option<PendingLine> {
        if self.v != 1 {
            return None;
        }
        Some(PendingLine {
            id,
            line: CapturedLine {
                speaker: self.speaker,
                owner_id: self.owner_id,
                message: self.message,
                spoken_at: Utc.timestamp_millis_opt(self.spoken_at_ms).single()?,
                captured_at: Utc.timestamp_millis_opt(self.captured_at_ms).single()?,
            },
            attempts: self.attempts,
            prepared: self.prepared,
            in_flight: self.in_flight,
        })
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serializing strings and integers cannot fail")
    }
}

/// The durable queue. Share it as `Arc<Outbox>`.
pub struct Outbox {
    db: sled::Db,
    pending: sled::Tree,
    dead: sled::Tree,
    quarantine: sled::Tree,
    meta: sled::Tree,
    n_pending: AtomicUsize,
    appended: Notify,
}

impl Outbox {
    /// Opens (or creates) the outbox at `path` with a page cache of `cache_bytes`.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Outbox, OutboxError> {
        let shown = path.display().to_string();
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .open()
            .map_err(|source| {
                // sled reports a held file lock as an I/O error "could not acquire lock".
                if source.to_string().contains("lock") {
                    OutboxError::Locked {
                        path: shown.clone(),
                    }
                } else {
                    OutboxError::Open {
                        path: shown.clone(),
                        source,
                    }
                }
            })?;
        let open_tree = |name: &str| {
            db.open_tree(name).map_err(|source| OutboxError::Open {
                path: shown.clone(),
                source,
            })
        };
        let pending = open_tree("pending")?;
        let outbox = Outbox {
            dead: open_tree("dead")?,
            quarantine: open_tree("quarantine")?,
            meta: open_tree("meta")?,
            n_pending: AtomicUsize::new(pending.len()),
            pending,
            db,
            appended: Notify::new(),
        };
        Ok(outbox)
    }

    /// Stores `lines` in order and flushes them to disk before returning.
    pub async fn append(&self, lines: &[CapturedLine]) -> Result<(), OutboxError> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for line in lines {
            let id = self.db.generate_id()?;
            let pending = PendingLine {
                id,
                line: line.clone(),
                attempts: 0,
                prepared: None,
                in_flight: false,
            };
            batch.insert(&id.to_be_bytes(), RecordV1::from_pending(&pending).encode());
        }
        self.pending.apply_batch(batch)?;
        self.db.flush_async().await?;
        self.n_pending.fetch_add(lines.len(), Ordering::Relaxed);
        self.appended.notify_one();
        Ok(())
    }

    /// Resolves after the next `append` (or at once if one happened since the last wait).
    pub async fn wait_for_lines(&self) {
        self.appended.notified().await;
    }

    /// Up to `max` pending lines, oldest first. A record that cannot be decoded is moved to the
    /// quarantine (and logged) so the rest keeps flowing.
    pub fn oldest(&self, max: usize) -> Result<Vec<PendingLine>, OutboxError> {
        let mut lines = Vec::with_capacity(max.min(1024));
        for entry in self.pending.iter() {
            if lines.len() >= max {
                break;
            }
            let (key, value) = entry?;
            let decoded = <[u8; 8]>::try_from(key.as_ref()).ok().and_then(|id| {
                let record: RecordV1 = serde_json::from_slice(&value).ok()?;
                record.into_pending(u64::from_be_bytes(id))
            });
            match decoded {
                Some(line) => lines.push(line),
                None => {
                    tracing::error!(key = ?key.as_ref(), "outbox record cannot be decoded; moved to the quarantine");
                    self.quarantine.insert(quarantine_key(&self.db)?, value)?;
                    if self.pending.remove(key)?.is_some() {
                        self.n_pending.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
        }
        Ok(lines)
    }

    /// Rewrites the given pending lines (their `prepared`, `in_flight`, `attempts`) and flushes.
    pub async fn save(&self, lines: &[PendingLine]) -> Result<(), OutboxError> {
        let mut batch = sled::Batch::default();
        for line in lines {
            batch.insert(
                &line.id.to_be_bytes(),
                RecordV1::from_pending(line).encode(),
            );
        }
        self.pending.apply_batch(batch)?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Removes lines the CMS confirmed, and flushes.
    pub async fn remove(&self, ids: &[u64]) -> Result<(), OutboxError> {
        self.remove_with_meta(ids, None).await
    }

    /// Stores a small value (when given) and then removes lines the CMS confirmed, with one flush
    /// for both. sled keeps write order: after a crash the value may be stored without the removal,
    /// never the removal without the value.
    pub async fn remove_with_meta(
        &self,
        ids: &[u64],
        meta: Option<(&str, i64)>,
    ) -> Result<(), OutboxError> {
        if let Some((key, value)) = meta {
            self.meta.insert(key, &value.to_be_bytes())?;
        }
        let mut n_removed = 0;
        for id in ids {
            if self.pending.remove(id.to_be_bytes())?.is_some() {
                n_removed += 1;
            }
        }
        self.db.flush_async().await?;
        self.n_pending.fetch_sub(n_removed, Ordering::Relaxed);
        Ok(())
    }

    /// Moves a line to the dead letters with `reason`, and flushes. The dead record is written before
    /// the pending one is removed: sled keeps write order, so a crash leaves the line in at least one.
    pub async fn dead_letter(&self, line: &PendingLine, reason: &str) -> Result<(), OutboxError> {
        let mut record = RecordV1::from_pending(line);
        record.dead_reason = Some(reason.to_owned());
        record.dead_at_ms = Some(Utc::now().timestamp_millis());
        self.dead.insert(line.id.to_be_bytes(), record.encode())?;
        let removed = self.pending.remove(line.id.to_be_bytes())?.is_some();
        self.db.flush_async().await?;
        if removed {
            self.n_pending.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Keeps a raw body that could not be used (a viewer response that is not JSON), for an operator.
    pub async fn quarantine_raw(&self, what: &str, body: &[u8]) -> Result<(), OutboxError> {
        let mut value = Vec::with_capacity(what.len() + 1 + body.len());
        value.extend_from_slice(what.as_bytes());
        value.push(b'\n');
        value.extend_from_slice(body);
        self.quarantine.insert(quarantine_key(&self.db)?, value)?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// The dead letters, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<DeadLine>, OutboxError> {
        let mut lines = Vec::new();
        for entry in self.dead.iter() {
            let (key, value) = entry?;
            let Ok(id) = <[u8; 8]>::try_from(key.as_ref()) else {
                continue;
            };
            let Ok(record) = serde_json::from_slice::<RecordV1>(&value) else {
                continue;
            };
            let reason = record.dead_reason.clone().unwrap_or_default();
            let dead_at = record
                .dead_at_ms
                .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
                .unwrap_or_default();
            if let Some(pending) = record.into_pending(u64::from_be_bytes(id)) {
                lines.push(DeadLine {
                    pending,
                    reason,
                    dead_at,
                });
            }
        }
        Ok(lines)
    }

    /// Pending lines.
    pub fn len(&self) -> usize {
        self.n_pending.load(Ordering::Relaxed)
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Dead letters.
    pub fn dead_len(&self) -> usize {
        self.dead.len()
    }

    /// Quarantined records.
    pub fn quarantine_len(&self) -> usize {
        self.quarantine.len()
    }

    /// A small persisted value (cursors).
    pub fn meta_i64(&self, key: &str) -> Result<Option<i64>, OutboxError> {
        Ok(self
            .meta
            .get(key)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(i64::from_be_bytes))
    }

    /// Stores a small value and flushes.
    pub async fn set_meta_i64(&self, key: &str, value: i64) -> Result<(), OutboxError> {
        self.meta.insert(key, &value.to_be_bytes())?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Flushes everything written so far.
    pub async fn flush(&self) -> Result<(), OutboxError> {
        self.db.flush_async().await?;
        Ok(())
    }
}

fn quarantine_key(db: &sled::Db) -> Result<[u8; 8], sled::Error> {
    Ok(db.generate_id()?.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str) -> CapturedLine {
        let now = Utc
            .timestamp_millis_opt(Utc::now().timestamp_millis())
            .single()
            .expect("now");
        CapturedLine {
            speaker: "Alice Resident".into(),
            owner_id: None,
            message: text.into(),
            spoken_at: now,
            captured_at: now,
        }
    }

    #[tokio::test]
    async fn lines_come_back_in_capture_order_across_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let outbox = Outbox::open(dir.path(), 1 << 20).expect("open");
            outbox
                .append(&[line("one"), line("two")])
                .await
                .expect("append");
            outbox.append(&[line("three")]).await.expect("append");
        }
        let outbox = Outbox::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!(outbox.len(), 3);
        let texts: Vec<_> = outbox
            .oldest(10)
            .expect("read")
            .into_iter()
            .map(|p| p.line.message)
            .collect();
        assert_eq!(texts, ["one", "two", "three"]);
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_outbox_is_refused_clearly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = Outbox::open(dir.path(), 1 << 20).expect("open");
        let err = Outbox::open(dir.path(), 1 << 20)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("in use by another process"), "{err}");
    }

    #[tokio::test]
    async fn a_damaged_record_is_quarantined_and_the_rest_flows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::open(dir.path(), 1 << 20).expect("open");
        outbox.append(&[line("one")]).await.expect("append");
        outbox
            .pending
            .insert((1u64 << 60).to_be_bytes(), b"not json".to_vec())
            .expect("insert");
        let texts: Vec<_> = outbox
            .oldest(10)
            .expect("read")
            .into_iter()
            .map(|p| p.line.message)
            .collect();
        assert_eq!(texts, ["one"]);
        assert_eq!(outbox.quarantine_len(), 1);
    }

    #[tokio::test]
    async fn dead_letters_keep_the_line_and_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::open(dir.path(), 1 << 20).expect("open");
        outbox
            .append(&[line("bad"), line("good")])
            .await
            .expect("append");
        let pending = outbox.oldest(10).expect("read");
        outbox
            .dead_letter(&pending[0], "refused")
            .await
            .expect("dead letter");
        assert_eq!(outbox.len(), 1);
        let dead = outbox.dead_letters().expect("dead");
        assert_eq!(dead[0].pending.line.message, "bad");
        assert_eq!(dead[0].reason, "refused");
    }
}
