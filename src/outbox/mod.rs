//! `Outbox`: the durable queue between the viewer and the CMS, in one sled database. `Outbox` is the
//! facade the stages use; the files behind it are its own.
//!
//! Trees: `pending` (lines not yet confirmed by the CMS, keyed by a big-endian id from
//! `Database::new_id`, so key order is capture order), `dead` (lines the CMS refused, with the
//! reason), `quarantine` (records that could not be decoded, as stored, and the metadata and hash
//! of viewer answers that could not be parsed, never their bodies; each for `max_age` at most), `meta` (the cursors, `Cursor`), `privacy` (records
//! `crate::privacy` writes and reads: who opted out; opaque here).
//!
//! Invariants: `Ingest::commit` (and `append`, built on it) returns only after the lines are flushed
//! to disk; readers see pending lines only up to the last committed key, so the lines of an ingest
//! that failed part way wait for its retry, which writes the same records; a line leaves `pending`
//! only through `remove` (the CMS confirmed it), `dead_letter`, or the bounds (`max_bytes`,
//! `max_age`). This is the only module that imports sled.
//!
//! The files, one concern each: `store` (the database, its ids, reopening it after an I/O error),
//! `record` (the stored format, versioned and migrated), `queue` (pending lines: read, the lifecycle's verbs, remove), `ingest` (storing a
//! viewer answer line by line), `bounds` (`max_bytes`, `max_age`, `when_full`), `dead` (dead letters
//! and the quarantine), `cursor` (the stages' persisted cursors), `erasure` (the `privacy` tree's
//! records, and removing the lines a caller's predicate picks in the same flush), `reader` (the read-only view `health` gets: it
//! never quarantines or reopens), `reserve` (disk space given back when the disk is full, so that
//! delivery can still remove lines), `tests` (through the facade).
//! This file holds the types the stages see and the counters the others keep true (the depth, the
//! dead letters and the quarantine: `reader` reads them instead of the trees). Must not
//! do anything but storage: whose line an opt-out covers is `crate::privacy`'s to say.

mod bounds;
mod cursor;
mod dead;
mod erasure;
mod gaps;
mod ingest;
mod queue;
mod reader;
mod record;
mod reserve;
mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::model::CapturedLine;
use crate::outbox::store::{Database, Store, last_key};

pub use bounds::{Limits, WhenFull};
pub use cursor::{Cursor, RegionCursor};
pub use dead::{Quarantined, QuarantinedRecord};
pub use erasure::PrivacyRecord;
pub use gaps::{GapKind, GapNote};
pub use ingest::Ingest;
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
    /// The relay's user may not write the directory or its files (permissions, ownership, a
    /// read-only file system). The database is not damaged: the fix is access, and moving the
    /// directory aside would strand the lines waiting in it.
    #[error(
        "outbox {path} cannot be opened by {user}: {detail}; keep the directory where it is: it holds the lines not yet delivered"
    )]
    NotWritable {
        /// The directory.
        path: String,
        /// Who the relay runs as (`user NAME (uid N)`).
        user: String,
        /// What the OS refused and how to fix it.
        detail: String,
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
/// the same row (and a read-back can recognise it). Stored as is in the record (`LineState`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepared {
    /// CMS user id.
    pub user_id: i64,
    /// The text as sent.
    pub message: String,
    /// The timestamp as sent.
    pub timestamp: String,
}

/// Where a line is in its life at the relay. Its other ends are not states of a pending line:
/// confirmation removes it (`Outbox::remove`), a refusal moves it to the dead letters
/// (`Outbox::dead_letter`), and a line held for its own retry keeps its state, with its failures
/// counted on the record (`PendingLine::failures`) and its wait in delivery's memory.
///
/// ```text
/// Captured ──prepare──► (row decided, in memory) ──mark_in_flight──► InFlight { row, after }
///    ▲                                                               │        │
///    │                                           found / success ◄───┘        │ not found, or
///    │                                           (removed)                    │ proven not stored
///    └── requeue (from the dead letters)          Prepared(row) ◄─────────────┘ (not_in_flight)
///                                                     └──mark_in_flight──► InFlight again
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineState {
    /// As captured: its row is decided before its first POST.
    Captured,
    /// Its row is decided and it is not in flight: never sent, or proven not stored (a read-back
    /// did not find it, or its own insert failed). It is sent again exactly as decided.
    Prepared(Prepared),
    /// A POST carried it and its outcome is not known: read back before it is sent again.
    InFlight {
        /// The row as sent; `None` only in a record damaged or written by another tool: the
        /// row is decided again and read back.
        row: Option<Prepared>,
        /// Delivery's last confirmed CMS id when the POST went out: its row, if stored, is above
        /// it, whatever delivery confirmed since. `None` in records written before it was kept:
        /// the read-back then looks above the current cursor.
        after: Option<i64>,
    },
}

/// A line waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingLine {
    /// Outbox id; increases with capture order.
    pub id: u64,
    /// The line.
    pub line: CapturedLine,
    /// Delivery attempts so far: each POST that carried the line (counted before it is sent, so a
    /// POST a crash cut short counts too) and each read-back the CMS answered.
    pub attempts: u32,
    /// Where it is in its life.
    pub state: LineState,
    /// The attempts that failed while the CMS answered other requests: an error page, HTTP 500 or
    /// `success: false` for its POST, or a read-back it could not answer. Delivery moves the line
    /// to the dead letters when they reach `retry.max_line_failures`; an outage does not count.
    pub failures: u32,
    /// The error of the last of those failures, for the dead-letter reason.
    pub last_error: Option<String>,
}

impl PendingLine {
    /// A line as captured, not yet tried.
    pub fn captured(id: u64, line: CapturedLine) -> PendingLine {
        PendingLine {
            id,
            line,
            attempts: 0,
            state: LineState::Captured,
            failures: 0,
            last_error: None,
        }
    }

    /// Its row, once decided.
    pub fn row(&self) -> Option<&Prepared> {
        match &self.state {
            LineState::Captured => None,
            LineState::Prepared(row) => Some(row),
            LineState::InFlight { row, .. } => row.as_ref(),
        }
    }

    /// Whether a POST carried it and its outcome is unknown.
    pub fn is_in_flight(&self) -> bool {
        matches!(self.state, LineState::InFlight { .. })
    }

    /// Out of flight, proven not stored: its row kept to be sent again as it is (`Prepared`), or,
    /// in a record that lost it, as captured.
    pub fn not_stored(self) -> PendingLine {
        let state = match self.state {
            LineState::InFlight { row: Some(row), .. } => LineState::Prepared(row),
            LineState::InFlight { row: None, .. } => LineState::Captured,
            other => other,
        };
        PendingLine { state, ..self }
    }

    /// The last confirmed id its POST went out after, when in flight and known.
    pub fn sent_after(&self) -> Option<i64> {
        match self.state {
            LineState::InFlight { after, .. } => after,
            _ => None,
        }
    }
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

/// The durable queue. Share it as `Arc<Outbox>`.
pub struct Outbox {
    /// The database, reopened in place after an I/O error.
    db: Database,
    /// The highest pending key whose ingest was flushed. Delivery and the bounds see only keys up to
    /// it, so lines of an ingest that failed part way (some of them may be on disk) stay out of reach
    /// until the retry stores them under the same keys: they can be neither sent nor dropped twice.
    /// Everything found on disk at open counts as committed.
    committed: AtomicU64,
    n_pending: AtomicUsize,
    n_bytes: AtomicU64,
    /// Records in the dead letters and in the quarantine, kept with every write to those trees so
    /// that a scrape never counts them (sled's `len` reads the whole tree).
    n_dead: AtomicUsize,
    n_quarantined: AtomicUsize,
    n_dropped: AtomicU64,
    /// Records read by the read-only views (`OutboxReader::records_read`).
    n_read_by_views: AtomicU64,
    limits: Limits,
    appended: Notify,
    /// The quarantine's bound (`dead`).
    quarantine: dead::QuarantineBound,
}

impl Outbox {
    /// Opens (or creates) the outbox at `path` with a page cache of `cache_bytes`.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Outbox, OutboxError> {
        let store = Store::open(path, cache_bytes)?;
        let (n_pending, n_bytes) = store.count_pending();
        let (n_dead, n_quarantined) = store.count_kept();
        let committed = last_key(&store.pending);
        let quarantine = dead::QuarantineBound::of(&store);
        Ok(Outbox {
            db: Database::new(path, cache_bytes, store),
            committed: AtomicU64::new(committed),
            n_pending: AtomicUsize::new(n_pending),
            n_bytes: AtomicU64::new(n_bytes),
            n_dead: AtomicUsize::new(n_dead),
            n_quarantined: AtomicUsize::new(n_quarantined),
            n_dropped: AtomicU64::new(0),
            n_read_by_views: AtomicU64::new(0),
            limits: Limits {
                max_bytes: u64::MAX,
                max_age: Duration::MAX,
                when_full: WhenFull::DropOldest,
                reserve_bytes: 0,
            },
            appended: Notify::new(),
            quarantine,
        })
    }

    /// The open database, reopened first if an I/O error broke it; the depth counters are counted
    /// again from what a reopen finds.
    fn store(&self) -> Result<Arc<Store>, OutboxError> {
        self.db.store(|store| {
            let (n_pending, n_bytes) = store.count_pending();
            self.n_pending.store(n_pending, Ordering::Relaxed);
            self.n_bytes.store(n_bytes, Ordering::Relaxed);
            let (n_dead, n_quarantined) = store.count_kept();
            self.n_dead.store(n_dead, Ordering::Relaxed);
            self.n_quarantined.store(n_quarantined, Ordering::Relaxed);
            tracing::debug!(
                outbox_depth = n_pending,
                "outbox reopened after a storage error"
            );
        })
    }

    /// The directory.
    pub fn path(&self) -> PathBuf {
        self.db.path().to_owned()
    }

    /// Pending lines.
    pub fn len(&self) -> usize {
        self.n_pending.load(Ordering::Relaxed)
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of pending records.
    pub fn bytes(&self) -> u64 {
        self.n_bytes.load(Ordering::Relaxed)
    }

    /// Flushes everything written so far.
    pub async fn flush(&self) -> Result<(), OutboxError> {
        let store = self.store()?;
        self.db.flush(&store).await
    }
}

#[cfg(test)]
mod tests;
