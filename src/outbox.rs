//! `Outbox`: the durable queue between the viewer and the CMS, in one sled database.
//!
//! Trees: `pending` (lines not yet confirmed by the CMS, keyed by a big-endian id from
//! `Outbox::new_id`, so key order is capture order), `dead` (lines the CMS refused, with the reason),
//! `quarantine` (records that could not be decoded and viewer bodies that could not be parsed, kept
//! raw for an operator), `meta` (small cursors).
//!
//! Invariants: `Ingest::commit` (and `append`, built on it) returns only after the lines are flushed
//! to disk; readers see pending lines only up to the last committed key, so the lines of an ingest
//! that failed part way wait for its retry, which writes the same records; a line leaves `pending`
//! only through `remove` (the CMS confirmed it), `dead_letter`, or the bounds (`max_bytes`,
//! `max_age`). This is the only module that imports sled.
//!
//! After an I/O error (disk full) sled 0.34 fails every later write until the database is opened
//! again, so the outbox reopens it in place on its next use, once no operation holds the failed
//! handles. What the reopened database holds is what was flushed, exactly as after a crash: a write
//! whose flush failed returned its error to the caller, which still has the data (the poller keeps
//! the lines it read, delivery's marks and removals are redone or reconciled).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::model::CapturedLine;

// The read-only view `health` gets (in its own file, so that it can be checked to write nothing).
mod reader;
pub use reader::OutboxReader;

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
    Storage(sled::Error),
    /// An earlier I/O error left the database to be reopened, and it cannot be reopened yet (the disk
    /// is still full, or an operation still holds the failed handles). Retried on a later use.
    #[error("outbox storage error: {0}")]
    Reopen(String),
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

/// The open sled database and its trees. Replaced as a whole when the database is reopened.
struct Store {
    db: sled::Db,
    pending: sled::Tree,
    dead: sled::Tree,
    quarantine: sled::Tree,
    meta: sled::Tree,
}

impl Store {
    fn open(path: &Path, cache_bytes: u64) -> Result<Store, OutboxError> {
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
        Ok(Store {
            pending: open_tree("pending")?,
            dead: open_tree("dead")?,
            quarantine: open_tree("quarantine")?,
            meta: open_tree("meta")?,
            db,
        })
    }

    /// An id above every key stored in the trees keyed by ids.
    fn next_free_id(&self) -> u64 {
        [&self.pending, &self.dead, &self.quarantine]
            .into_iter()
            .map(last_key)
            .max()
            .map_or(0, |last| last.saturating_add(1))
    }

    /// Pending lines and their bytes, counted from the records.
    fn count_pending(&self) -> (usize, u64) {
        let n_bytes = self
            .pending
            .iter()
            .values()
            .flatten()
            .map(|v| v.len() as u64)
            .sum();
        (self.pending.len(), n_bytes)
    }
}

/// The open database; `store` is `None` only after a reopen failed. An operation clones the `Arc`
/// for its duration, so a reopen can tell when nobody uses the failed handles any more.
struct Slot {
    store: Option<Arc<Store>>,
    /// When the next reopen may be tried.
    next_reopen: Option<Instant>,
    /// Reopens tried since the database last stayed healthy for `REOPEN_MAX`.
    n_reopens: u32,
    /// When the last reopen succeeded.
    reopened_at: Option<Instant>,
    /// The error that made the database fail, or the last reopen fail: what `/readyz` shows.
    cause: String,
}

/// A failed database is opened again after this long, doubling with each try up to `REOPEN_MAX`
/// while it keeps failing (an open that works, followed by a write that fails again, counts as a
/// try): an open reads the whole database, and a disk stays full for a while.
const REOPEN_FIRST: Duration = Duration::from_secs(1);
const REOPEN_MAX: Duration = Duration::from_secs(10);

/// The durable queue. Share it as `Arc<Outbox>`.
pub struct Outbox {
    path: PathBuf,
    cache_bytes: u64,
    /// The open database, and when a reopen was last tried.
    store: Mutex<Slot>,
    /// An I/O error was seen: reopen before the next use.
    broken: AtomicBool,
    /// The highest pending key whose ingest was flushed. Delivery and the bounds see only keys up to
    /// it, so lines of an ingest that failed part way (some of them may be on disk) stay out of reach
    /// until the retry stores them under the same keys: they can be neither sent nor dropped twice.
    /// Everything found on disk at open counts as committed.
    committed: AtomicU64,
    /// No id this process hands out is below this (`new_id`).
    next_id: AtomicU64,
    n_pending: AtomicUsize,
    n_bytes: AtomicU64,
    n_dropped: AtomicU64,
    limits: Limits,
    appended: Notify,
}

/// What to do when the outbox holds `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Drop the oldest pending lines to make room (each counted and logged).
    DropOldest,
    /// Stop polling the viewer until delivery makes room (the viewer keeps the lines meanwhile).
    PausePolling,
}

/// The bounds of the outbox.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of pending records at most.
    pub max_bytes: u64,
    /// Pending lines older than this (since capture) are dropped.
    pub max_age: Duration,
    /// What happens at `max_bytes`.
    pub when_full: WhenFull,
}

/// At most this many dropped lines are logged one by one per drop; the rest are summed up.
const MAX_DROPS_LOGGED: usize = 100;

impl Outbox {
    /// Opens (or creates) the outbox at `path` with a page cache of `cache_bytes`.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Outbox, OutboxError> {
        let store = Store::open(path, cache_bytes)?;
        let (n_pending, n_bytes) = store.count_pending();
        let committed = last_key(&store.pending);
        let next_id = store.next_free_id();
        Ok(Outbox {
            path: path.to_owned(),
            cache_bytes,
            store: Mutex::new(Slot {
                store: Some(Arc::new(store)),
                next_reopen: None,
                n_reopens: 0,
                reopened_at: None,
                cause: String::new(),
            }),
            broken: AtomicBool::new(false),
            committed: AtomicU64::new(committed),
            next_id: AtomicU64::new(next_id),
            n_pending: AtomicUsize::new(n_pending),
            n_bytes: AtomicU64::new(n_bytes),
            n_dropped: AtomicU64::new(0),
            limits: Limits {
                max_bytes: u64::MAX,
                max_age: Duration::MAX,
                when_full: WhenFull::DropOldest,
            },
            appended: Notify::new(),
        })
    }

    /// The open database, reopened first if an I/O error broke it.
    fn store(&self) -> Result<Arc<Store>, OutboxError> {
        let mut slot = self.store.lock().unwrap_or_else(PoisonError::into_inner);
        if self.broken.load(Ordering::Acquire) {
            self.reopen(&mut slot)?;
        }
        slot.store
            .clone()
            .ok_or_else(|| OutboxError::Reopen("the outbox is not open".into()))
    }

    /// Drops the failed database once no operation holds it, and opens it again. sled recovers what
    /// was flushed; the depth counters are counted again from it. Blocks the callers for the time
    /// an open takes (a rare event: after a write error, at most every `REOPEN_FIRST` to
    /// `REOPEN_MAX`).
    fn reopen(&self, slot: &mut Slot) -> Result<(), OutboxError> {
        if slot
            .store
            .as_ref()
            .is_some_and(|store| Arc::strong_count(store) > 1)
        {
            return Err(OutboxError::Reopen(format!(
                "{}; the outbox is reopened once the operations using it end",
                slot.cause
            )));
        }
        let now = Instant::now();
        if let Some(next) = slot.next_reopen.filter(|next| now < *next) {
            return Err(OutboxError::Reopen(format!(
                "{}; the outbox is reopened in {}",
                slot.cause,
                humantime::format_duration(Duration::from_secs((next - now).as_secs() + 1))
            )));
        }
        if slot
            .reopened_at
            .is_some_and(|at| at.elapsed() >= REOPEN_MAX)
        {
            slot.n_reopens = 0;
        }
        let wait = REOPEN_FIRST
            .saturating_mul(1 << slot.n_reopens.min(16))
            .min(REOPEN_MAX);
        slot.n_reopens += 1;
        slot.next_reopen = Some(now + wait);
        // sled lets go of its file lock when the last handle is dropped.
        slot.store = None;
        let store = Store::open(&self.path, self.cache_bytes).map_err(|err| {
            // Not OutboxError::Open's text: its advice (move the directory aside) is for damage.
            slot.cause = match err {
                OutboxError::Open { source, .. } => source.to_string(),
                other => other.to_string(),
            };
            OutboxError::Reopen(format!("{}; reopening the outbox failed", slot.cause))
        })?;
        let (n_pending, n_bytes) = store.count_pending();
        self.next_id
            .fetch_max(store.next_free_id(), Ordering::AcqRel);
        self.n_pending.store(n_pending, Ordering::Relaxed);
        self.n_bytes.store(n_bytes, Ordering::Relaxed);
        slot.store = Some(Arc::new(store));
        slot.reopened_at = Some(Instant::now());
        self.broken.store(false, Ordering::Release);
        tracing::debug!(
            outbox_depth = n_pending,
            "outbox reopened after a storage error"
        );
        Ok(())
    }

    /// A new key, above every key handed out before. sled's `generate_id` alone is not enough: it
    /// persists its counter lazily, so a database reopened after an I/O error can hand out again
    /// the ids a failed ingest was given, which its retry has stored since.
    fn new_id(&self, store: &Store) -> Result<u64, OutboxError> {
        let generated = self.io(store.db.generate_id())?;
        let mut next = self.next_id.load(Ordering::Acquire);
        loop {
            let id = generated.max(next);
            match self.next_id.compare_exchange(
                next,
                id.saturating_add(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(id),
                Err(current) => next = current,
            }
        }
    }

    /// Converts a sled error, noting an I/O error so that the next use reopens the database.
    fn io<T>(&self, result: sled::Result<T>) -> Result<T, OutboxError> {
        result.map_err(|err| {
            if matches!(err, sled::Error::Io(_)) && !self.broken.swap(true, Ordering::AcqRel) {
                let mut slot = self.store.lock().unwrap_or_else(PoisonError::into_inner);
                slot.cause = err.to_string();
            }
            OutboxError::Storage(err)
        })
    }

    /// Stores `lines` in order and flushes them to disk before returning.
    pub async fn append(&self, lines: &[CapturedLine]) -> Result<(), OutboxError> {
        let mut ingest = self.ingest(Vec::new());
        for line in lines {
            ingest.push(line);
        }
        ingest.commit().await.map(drop).map_err(|(err, _)| err)
    }

    /// Starts storing a response's lines one by one, as they are parsed. `keys` are the keys an
    /// earlier, failed ingest of the same lines gave them (empty the first time): the retry writes the
    /// same records again, never second copies.
    pub fn ingest(&self, keys: Vec<u64>) -> Ingest<'_> {
        Ingest {
            outbox: self,
            store: None,
            keys,
            n_pushed: 0,
            failed: None,
            n_new: 0,
            n_bytes_new: 0,
            n_bytes_old: 0,
        }
    }

    /// The committed pending keys, oldest first: what delivery and the bounds may touch.
    fn committed_pending(&self, store: &Store) -> sled::Iter {
        store
            .pending
            .range(..=self.committed.load(Ordering::Acquire).to_be_bytes())
    }

    /// Resolves after the next `append` (or at once if one happened since the last wait).
    pub async fn wait_for_lines(&self) {
        self.appended.notified().await;
    }

    /// Up to `max` pending lines, oldest first. A record that cannot be decoded is moved to the
    /// quarantine (and logged) so the rest keeps flowing.
    pub fn oldest(&self, max: usize) -> Result<Vec<PendingLine>, OutboxError> {
        let store = self.store()?;
        let mut lines = Vec::with_capacity(max.min(1024));
        for entry in self.committed_pending(&store) {
            if lines.len() >= max {
                break;
            }
            let (key, value) = self.io(entry)?;
            match decode_pending(&key, &value) {
                Some(line) => lines.push(line),
                None => {
                    tracing::error!(key = ?key.as_ref(), "outbox record cannot be decoded; moved to the quarantine");
                    let quarantine_key = self.new_id(&store)?.to_be_bytes();
                    self.io(store.quarantine.insert(quarantine_key, value))?;
                    self.remove_pending(&store, &key)?;
                }
            }
        }
        Ok(lines)
    }

    /// Rewrites the given pending lines (their `prepared`, `in_flight`, `attempts`) and flushes.
    pub async fn save(&self, lines: &[PendingLine]) -> Result<(), OutboxError> {
        let store = self.store()?;
        for line in lines {
            let value = RecordV1::from_pending(line).encode();
            let new_len = value.len() as u64;
            // Only a record that is still pending is rewritten: a line dropped for space meanwhile
            // must not come back.
            let old = self.io(store
                .pending
                .fetch_and_update(line.id.to_be_bytes(), |old| old.map(|_| value.clone())))?;
            if let Some(old) = old {
                self.n_bytes.fetch_add(new_len, Ordering::Relaxed);
                self.n_bytes.fetch_sub(old.len() as u64, Ordering::Relaxed);
            }
        }
        self.io(store.db.flush_async().await)?;
        // A rewrite grows a record (its prepared row): the bound holds after it too.
        self.enforce_max_bytes(&store).await?;
        Ok(())
    }

    /// Removes lines the CMS confirmed, and flushes.
    pub async fn remove(&self, ids: &[u64]) -> Result<(), OutboxError> {
        self.remove_with_meta(ids, None).await
    }

    /// Removes lines the CMS confirmed and then, when given, stores a small value, with one flush for
    /// both. sled keeps write order, so after a crash the removal may be stored without the value,
    /// never the value without the removal: a raised last-confirmed id with its lines still pending
    /// would make a read-back ignore their rows and send them twice.
    pub async fn remove_with_meta(
        &self,
        ids: &[u64],
        meta: Option<(&str, i64)>,
    ) -> Result<(), OutboxError> {
        let store = self.store()?;
        for id in ids {
            self.remove_pending(&store, &id.to_be_bytes())?;
        }
        if let Some((key, value)) = meta {
            self.io(store.meta.insert(key, &value.to_be_bytes()))?;
        }
        self.io(store.db.flush_async().await)?;
        Ok(())
    }

    /// Moves a line to the dead letters with `reason`, and flushes. The dead record is written before
    /// the pending one is removed: sled keeps write order, so a crash leaves the line in at least one.
    pub async fn dead_letter(&self, line: &PendingLine, reason: &str) -> Result<(), OutboxError> {
        let store = self.store()?;
        let mut record = RecordV1::from_pending(line);
        record.dead_reason = Some(reason.to_owned());
        record.dead_at_ms = Some(Utc::now().timestamp_millis());
        self.io(store.dead.insert(line.id.to_be_bytes(), record.encode()))?;
        self.remove_pending(&store, &line.id.to_be_bytes())?;
        self.io(store.db.flush_async().await)?;
        Ok(())
    }

    /// Moves dead letters back to the pending lines (all when `ids` is `None`), to be prepared
    /// afresh (the mapping may have been fixed meanwhile). Returns how many.
    pub async fn requeue(&self, ids: Option<&[u64]>) -> Result<usize, OutboxError> {
        let store = self.store()?;
        let (mut n_requeued, mut last_requeued) = (0, 0);
        for dead in self.dead_letters_in(&store)? {
            if ids.is_some_and(|ids| !ids.contains(&dead.pending.id)) {
                continue;
            }
            let pending = PendingLine {
                attempts: 0,
                prepared: None,
                in_flight: false,
                ..dead.pending
            };
            let value = RecordV1::from_pending(&pending).encode();
            let n_bytes = value.len() as u64;
            // Written to pending before it leaves the dead letters: a crash leaves it in at least one.
            if self
                .io(store.pending.insert(pending.id.to_be_bytes(), value))?
                .is_none()
            {
                self.n_pending.fetch_add(1, Ordering::Relaxed);
                self.n_bytes.fetch_add(n_bytes, Ordering::Relaxed);
            }
            self.io(store.dead.remove(pending.id.to_be_bytes()))?;
            last_requeued = last_requeued.max(pending.id);
            n_requeued += 1;
        }
        self.io(store.db.flush_async().await)?;
        // Committed lines again, under their old keys, which may lie above the committed watermark
        // (an outbox opened with nothing pending starts it at 0).
        self.committed.fetch_max(last_requeued, Ordering::AcqRel);
        Ok(n_requeued)
    }

    /// Deletes every dead letter. Returns how many.
    pub async fn purge_dead(&self) -> Result<usize, OutboxError> {
        let store = self.store()?;
        let n = store.dead.len();
        self.io(store.dead.clear())?;
        self.io(store.db.flush_async().await)?;
        Ok(n)
    }

    /// Deletes every quarantined record. Returns how many.
    pub async fn purge_quarantine(&self) -> Result<usize, OutboxError> {
        let store = self.store()?;
        let n = store.quarantine.len();
        self.io(store.quarantine.clear())?;
        self.io(store.db.flush_async().await)?;
        Ok(n)
    }

    /// Keeps a raw body that could not be used (a viewer response that is not JSON), for an operator.
    pub async fn quarantine_raw(&self, what: &str, body: &[u8]) -> Result<(), OutboxError> {
        let store = self.store()?;
        let mut value = Vec::with_capacity(what.len() + 1 + body.len());
        value.extend_from_slice(what.as_bytes());
        value.push(b'\n');
        value.extend_from_slice(body);
        let key = self.new_id(&store)?.to_be_bytes();
        self.io(store.quarantine.insert(key, value))?;
        self.io(store.db.flush_async().await)?;
        Ok(())
    }

    /// The dead letters, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<DeadLine>, OutboxError> {
        let store = self.store()?;
        self.dead_letters_in(&store)
    }

    fn dead_letters_in(&self, store: &Store) -> Result<Vec<DeadLine>, OutboxError> {
        let mut lines = Vec::new();
        for entry in store.dead.iter() {
            let (key, value) = self.io(entry)?;
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

    /// Sets the bounds (`outbox.max_bytes`, `outbox.max_age`, `outbox.when_full`).
    pub fn with_limits(mut self, limits: Limits) -> Outbox {
        self.limits = limits;
        self
    }

    /// Bytes of pending records.
    pub fn bytes(&self) -> u64 {
        self.n_bytes.load(Ordering::Relaxed)
    }

    /// Whether the outbox holds `max_bytes` or more and polling is to pause.
    pub fn is_full_and_paused(&self) -> bool {
        self.limits.when_full == WhenFull::PausePolling && self.bytes() >= self.limits.max_bytes
    }

    /// Lines dropped for space or age since the outbox was opened.
    pub fn n_dropped(&self) -> u64 {
        self.n_dropped.load(Ordering::Relaxed)
    }

    /// When the oldest pending line was captured.
    pub fn oldest_captured_at(&self) -> Result<Option<DateTime<Utc>>, OutboxError> {
        Ok(self.oldest(1)?.first().map(|p| p.line.captured_at))
    }

    /// Drops pending lines captured more than `max_age` ago. Returns how many. A line in flight may
    /// be dropped too: `save` never brings a removed record back, so a POST that ends later cannot
    /// resurrect it (at worst a dropped line was in fact stored by the CMS).
    pub async fn drop_expired(&self) -> Result<usize, OutboxError> {
        let Ok(max_age) = chrono::Duration::from_std(self.limits.max_age) else {
            return Ok(0);
        };
        let Some(cutoff) = Utc::now().checked_sub_signed(max_age) else {
            return Ok(0);
        };
        let store = self.store()?;
        self.drop_while(&store, "older than outbox.max_age", |line, _| {
            line.line.captured_at < cutoff
        })
        .await
    }

    /// Under `drop_oldest`, drops the oldest lines while the outbox holds more than `max_bytes`. Run
    /// after every write that can grow it (an append, a rewrite). A line dropped while its batch is in
    /// flight may still reach the CMS; it is counted as dropped all the same.
    async fn enforce_max_bytes(&self, store: &Store) -> Result<(), OutboxError> {
        let max_bytes = self.limits.max_bytes;
        if self.limits.when_full == WhenFull::DropOldest && self.bytes() > max_bytes {
            self.drop_while(store, "outbox.max_bytes reached", |_, outbox| {
                outbox.bytes() > max_bytes
            })
            .await?;
        }
        Ok(())
    }

    /// Drops pending lines from the oldest on while `condition` holds, logging each at warn.
    async fn drop_while(
        &self,
        store: &Store,
        reason: &str,
        condition: impl Fn(&PendingLine, &Outbox) -> bool,
    ) -> Result<usize, OutboxError> {
        let mut n_dropped = 0;
        // Lazily, oldest first: this runs on every delivery step and must stop at the first line
        // that stays.
        for entry in self.committed_pending(store) {
            let (key, value) = self.io(entry)?;
            let Some(line) = decode_pending(&key, &value) else {
                continue;
            };
            if !condition(&line, self) {
                break;
            }
            if !self.remove_pending(store, &key)? {
                continue;
            }
            // Counted with the removal, so that depth + dropped never dips or jumps.
            self.n_dropped.fetch_add(1, Ordering::Relaxed);
            n_dropped += 1;
            if n_dropped <= MAX_DROPS_LOGGED {
                tracing::warn!(outbox_id = line.id, speaker = %line.line.speaker, captured_at = %line.line.captured_at, reason, "line dropped from the outbox");
            }
        }
        if n_dropped > 0 {
            self.io(store.db.flush_async().await)?;
            tracing::warn!(
                n_lines = n_dropped,
                reason,
                outbox_depth = self.len(),
                "lines dropped from the outbox"
            );
        }
        Ok(n_dropped)
    }

    /// Removes one pending record and keeps the depth counters true.
    /// Whether it was there: two tasks can drop the same line at once (both see the bound passed).
    fn remove_pending(&self, store: &Store, key: &[u8]) -> Result<bool, OutboxError> {
        let Some(old) = self.io(store.pending.remove(key))? else {
            return Ok(false);
        };
        self.n_pending.fetch_sub(1, Ordering::Relaxed);
        self.n_bytes.fetch_sub(old.len() as u64, Ordering::Relaxed);
        Ok(true)
    }

    /// The directory.
    pub fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Pending lines.
    pub fn len(&self) -> usize {
        self.n_pending.load(Ordering::Relaxed)
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Dead letters (0 while the outbox cannot be reopened).
    pub fn dead_len(&self) -> usize {
        self.store().map_or(0, |store| store.dead.len())
    }

    /// Quarantined records (0 while the outbox cannot be reopened).
    pub fn quarantine_len(&self) -> usize {
        self.store().map_or(0, |store| store.quarantine.len())
    }

    /// A small persisted value (cursors).
    pub fn meta_i64(&self, key: &str) -> Result<Option<i64>, OutboxError> {
        let store = self.store()?;
        Ok(self
            .io(store.meta.get(key))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(i64::from_be_bytes))
    }

    /// Stores a small value and flushes.
    pub async fn set_meta_i64(&self, key: &str, value: i64) -> Result<(), OutboxError> {
        let store = self.store()?;
        self.io(store.meta.insert(key, &value.to_be_bytes()))?;
        self.io(store.db.flush_async().await)?;
        Ok(())
    }

    /// Flushes everything written so far.
    pub async fn flush(&self) -> Result<(), OutboxError> {
        let store = self.store()?;
        self.io(store.db.flush_async().await)?;
        Ok(())
    }
}

/// Lines of one viewer response on their way into the outbox (`Outbox::ingest`). Each `push` writes
/// its line at once, without waiting for the disk, so the caller never holds more than the line it is
/// handing over; `commit` flushes and makes the lines visible to delivery. A write error stops the
/// writing (the rest is only counted) and is returned by `commit`, with the keys given so far, for
/// a retry of the same lines.
///
/// One record per write, not one sled batch for the whole response: sled 0.34 keeps every page a
/// batch touches until the batch ends, which for a response of 200 000 lines costs gigabytes.
pub struct Ingest<'a> {
    outbox: &'a Outbox,
    /// The database, held from the first push to the commit (a reopen waits for it, so that the
    /// depth this ingest counts and the one a reopen counts never mix).
    store: Option<Arc<Store>>,
    /// The key of each line pushed so far, and of lines an earlier try pushed.
    keys: Vec<u64>,
    /// Lines pushed.
    n_pushed: usize,
    /// The first write error; nothing more is written after it.
    failed: Option<OutboxError>,
    /// Records written that were not there before, their bytes, and the bytes of those replaced.
    n_new: usize,
    n_bytes_new: u64,
    n_bytes_old: u64,
}

impl Ingest<'_> {
    /// Writes the next line (not yet flushed).
    pub fn push(&mut self, line: &CapturedLine) {
        let index = self.n_pushed;
        self.n_pushed += 1;
        if self.failed.is_some() {
            return;
        }
        if let Err(err) = self.write(index, line) {
            self.failed = Some(err);
        }
    }

    fn write(&mut self, index: usize, line: &CapturedLine) -> Result<(), OutboxError> {
        let outbox = self.outbox;
        let store = match &self.store {
            Some(store) => store.clone(),
            None => self.store.insert(outbox.store()?).clone(),
        };
        let id = match self.keys.get(index) {
            Some(id) => *id,
            None => {
                let id = outbox.new_id(&store)?;
                self.keys.push(id);
                id
            }
        };
        let pending = PendingLine {
            id,
            line: line.clone(),
            attempts: 0,
            prepared: None,
            in_flight: false,
        };
        let value = RecordV1::from_pending(&pending).encode();
        let n_bytes = value.len() as u64;
        // A retry finds the records of the failed try that reached the disk: counted once.
        match outbox.io(store.pending.insert(id.to_be_bytes(), value))? {
            Some(old) => self.n_bytes_old += old.len() as u64,
            None => self.n_new += 1,
        }
        self.n_bytes_new += n_bytes;
        Ok(())
    }

    /// Moves the depth counters by what was written: at the commit, so that the bound is enforced
    /// as soon as they show it (after a write error, the reopen counts them afresh from the disk).
    fn count(&mut self) {
        let outbox = self.outbox;
        outbox.n_pending.fetch_add(self.n_new, Ordering::Relaxed);
        outbox
            .n_bytes
            .fetch_add(self.n_bytes_new, Ordering::Relaxed);
        outbox
            .n_bytes
            .fetch_sub(self.n_bytes_old, Ordering::Relaxed);
        (self.n_new, self.n_bytes_new, self.n_bytes_old) = (0, 0, 0);
    }

    /// Flushes the lines pushed and hands them to delivery. Returns how many, or the error and the
    /// keys to give the retry (`Outbox::ingest`).
    pub async fn commit(mut self) -> Result<usize, (OutboxError, Vec<u64>)> {
        // Held to the end: no reopen can recount the depth while this ingest counts its share.
        let store = self.store.take();
        let flushed = match (self.failed.take(), &store) {
            (Some(err), _) => Err(err),
            (None, None) => return Ok(0),
            (None, Some(store)) => self.outbox.io(store.db.flush_async().await),
        };
        // After an I/O error the database is reopened once this ingest lets go of it, and the
        // reopen counts the depth from what reached the disk.
        if flushed.is_ok() || !self.outbox.broken.load(Ordering::Acquire) {
            self.count();
        }
        let Ingest {
            outbox,
            keys,
            n_pushed,
            ..
        } = self;
        if let Err(err) = flushed {
            return Err((err, keys));
        }
        let Some(store) = store else {
            return Ok(0);
        };
        if let Some(last) = keys.last() {
            outbox.committed.fetch_max(*last, Ordering::AcqRel);
        }
        // The lines are stored: a failure to make room is the next operation's to meet, never a
        // reason to store them again.
        if let Err(err) = outbox.enforce_max_bytes(&store).await {
            tracing::warn!(error = %err, "cannot drop the oldest lines for outbox.max_bytes");
        }
        outbox.appended.notify_one();
        Ok(n_pushed)
    }
}

/// The last key of a tree keyed by big-endian ids (0 when it is empty or cannot be read).
fn last_key(tree: &sled::Tree) -> u64 {
    tree.last()
        .ok()
        .flatten()
        .and_then(|(key, _)| <[u8; 8]>::try_from(key.as_ref()).ok())
        .map_or(0, u64::from_be_bytes)
}

fn decode_pending(key: &[u8], value: &[u8]) -> Option<PendingLine> {
    let id = <[u8; 8]>::try_from(key).ok()?;
    let record: RecordV1 = serde_json::from_slice(value).ok()?;
    record.into_pending(u64::from_be_bytes(id))
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
        {
            let outbox = Outbox::open(dir.path(), 1 << 20).expect("open");
            outbox.append(&[line("one")]).await.expect("append");
            outbox
                .store()
                .expect("open")
                .pending
                .insert((1u64 << 60).to_be_bytes(), b"not json".to_vec())
                .expect("insert");
        }
        let outbox = Outbox::open(dir.path(), 1 << 20).expect("reopen");
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

    #[tokio::test]
    async fn a_dead_letter_requeued_into_an_empty_outbox_is_deliverable() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let outbox = Outbox::open(dir.path(), 1 << 20).expect("open");
            outbox
                .append(&[line("delivered"), line("refused")])
                .await
                .expect("append");
            let pending = outbox.oldest(10).expect("read");
            outbox.remove(&[pending[0].id]).await.expect("remove");
            outbox
                .dead_letter(&pending[1], "refused")
                .await
                .expect("dead letter");
        }
        // Opened with nothing pending, as `outbox requeue` does on a stopped relay's outbox.
        let outbox = Outbox::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!(outbox.requeue(None).await.expect("requeue"), 1);
        let texts: Vec<_> = outbox
            .oldest(10)
            .expect("read")
            .into_iter()
            .map(|p| p.line.message)
            .collect();
        assert_eq!(texts, ["refused"]);
    }

    #[tokio::test]
    async fn a_failed_ingest_stays_out_of_reach_and_its_retry_stores_each_line_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::open(dir.path(), 1 << 20).expect("open");
        outbox.append(&[line("before")]).await.expect("append");
        // A try that wrote its lines and then failed (as a flush on a full disk does).
        let mut ingest = outbox.ingest(Vec::new());
        ingest.push(&line("one"));
        ingest.push(&line("two"));
        ingest.failed = Some(OutboxError::Reopen("disk full".into()));
        let (_, keys) = ingest.commit().await.expect_err("failed");
        assert_eq!(keys.len(), 2);
        let texts = |outbox: &Outbox| -> Vec<String> {
            let pending = outbox.oldest(10).expect("read");
            pending.into_iter().map(|p| p.line.message).collect()
        };
        assert_eq!(texts(&outbox), ["before"], "delivery cannot see them yet");

        // The retry writes the same records, and one more line.
        let mut ingest = outbox.ingest(keys);
        for text in ["one", "two", "three"] {
            ingest.push(&line(text));
        }
        assert_eq!(ingest.commit().await.expect("committed"), 3);
        assert_eq!(texts(&outbox), ["before", "one", "two", "three"]);
        assert_eq!(outbox.len(), 4);
        let (n_pending, n_bytes) = outbox.store().expect("open").count_pending();
        assert_eq!((outbox.len(), outbox.bytes()), (n_pending, n_bytes));
    }

    #[tokio::test]
    async fn after_an_io_error_the_outbox_reopens_in_place_once_nobody_holds_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::open(dir.path(), 1 << 20).expect("open");
        outbox
            .append(&[line("one"), line("two")])
            .await
            .expect("append");
        let failed: sled::Result<()> = Err(sled::Error::Io(std::io::Error::other("disk full")));
        assert!(outbox.io(failed).is_err());

        // An operation still using the failed handles keeps the reopen waiting.
        let held = outbox.store.lock().expect("lock").store.clone();
        let err = outbox.append(&[line("three")]).await.expect_err("waits");
        assert!(matches!(err, OutboxError::Reopen(_)), "{err}");
        drop(held);

        // sled lets go of its file lock in this process, and the lines and counters survive.
        outbox.append(&[line("three")]).await.expect("reopened");
        let texts: Vec<_> = outbox
            .oldest(10)
            .expect("read")
            .into_iter()
            .map(|p| p.line.message)
            .collect();
        assert_eq!(texts, ["one", "two", "three"]);
        assert_eq!(outbox.len(), 3);
        let (n_pending, n_bytes) = outbox.store().expect("open").count_pending();
        assert_eq!((outbox.len(), outbox.bytes()), (n_pending, n_bytes));
    }

    #[tokio::test]
    async fn a_scrape_passes_over_a_damaged_record_and_leaves_the_quarantine_to_delivery() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Arc::new(Outbox::open(dir.path(), 1 << 20).expect("open"));
        let (damaged, kept) = (line("damaged"), line("kept"));
        outbox
            .append(&[damaged, kept.clone()])
            .await
            .expect("append");
        let oldest_key = outbox.oldest(1).expect("read")[0].id.to_be_bytes();
        let store = outbox.store().expect("open");
        store
            .pending
            .insert(oldest_key, b"not json".to_vec())
            .expect("damage");
        drop(store);
        let reader = outbox.reader();

        for _ in 0..2 {
            let oldest = reader.oldest_captured_at().expect("read");
            assert_eq!(oldest, Some(kept.captured_at));
            assert_eq!((reader.quarantine_len(), reader.len()), (0, 2));
        }

        // Delivery's read is the one that moves it.
        let delivered_next = outbox.oldest(10).expect("read");
        assert_eq!(delivered_next[0].line.message, "kept");
        assert_eq!((reader.quarantine_len(), reader.len()), (1, 1));
    }

    #[tokio::test]
    async fn a_scrape_leaves_a_broken_outbox_to_be_reopened_by_a_stage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Arc::new(Outbox::open(dir.path(), 1 << 20).expect("open"));
        outbox.append(&[line("one")]).await.expect("append");
        let reader = outbox.reader();
        let failed: sled::Result<()> = Err(sled::Error::Io(std::io::Error::other("disk full")));
        assert!(outbox.io(failed).is_err());

        let err = reader.oldest_captured_at().expect_err("not read");
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!((reader.dead_len(), reader.quarantine_len()), (0, 0));
        assert_eq!(reader.len(), 1);
        // A reopen would have cleared the mark.
        assert!(
            outbox.broken.load(Ordering::Acquire),
            "the scrape reopened it"
        );

        outbox.append(&[line("two")]).await.expect("reopened");
        assert!(reader.oldest_captured_at().expect("read").is_some());
        assert_eq!(reader.len(), 2);
    }
}
