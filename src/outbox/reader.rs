//! `OutboxReader`: the outbox as the operator's endpoint sees it, for `/readyz`, `/metrics` and
//! `/status`.
//!
//! Must not write, in any way, so that a scrape changes nothing: an undecodable pending record is
//! skipped, not quarantined (delivery's `Outbox::oldest` quarantines it on its next step), and a
//! database broken by an I/O error is neither marked broken nor reopened (the stages that write find
//! it broken on their next use and reopen it). Must not scan a tree either, so that a scrape costs
//! the same for 20 lines as for 20 million: the depth and the counts of dead letters and quarantined
//! records are the counters the outbox keeps with its writes (the last known while the database
//! waits to be reopened), and the oldest line's age is read from at most `OLDEST_MAX_READ` records.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};

use crate::outbox::record::decode_pending;
use crate::outbox::{Outbox, OutboxError};

/// At most this many pending records are read for the oldest line's age. More than one only when the
/// first are undecodable, which delivery's next step moves to the quarantine; beyond it the age
/// reads as unknown (`None`) for that scrape.
pub const OLDEST_MAX_READ: usize = 16;

/// Read-only access to a shared outbox: none of its methods writes.
#[derive(Clone)]
pub struct OutboxReader {
    outbox: Arc<Outbox>,
}

impl Outbox {
    /// A read-only handle on this outbox.
    pub fn reader(self: &Arc<Self>) -> OutboxReader {
        OutboxReader {
            outbox: self.clone(),
        }
    }
}

impl OutboxReader {
    /// Pending lines.
    pub fn len(&self) -> usize {
        self.outbox.len()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.outbox.is_empty()
    }

    /// Bytes of pending records.
    pub fn bytes(&self) -> u64 {
        self.outbox.bytes()
    }

    /// Lines dropped for space or age since the outbox was opened.
    pub fn n_dropped(&self) -> u64 {
        self.outbox.n_dropped()
    }

    /// Whether polling is to pause (the outbox or its disk is full).
    pub fn is_full_and_paused(&self) -> bool {
        self.outbox.is_full_and_paused()
    }

    /// Whether its disk is full and its reserve given back.
    pub fn is_disk_full(&self) -> bool {
        self.outbox.is_disk_full()
    }

    /// When the oldest decodable pending line was captured (an undecodable one is passed over, up
    /// to `OLDEST_MAX_READ` records). While an I/O error has left the database to be reopened, that
    /// error.
    pub fn oldest_captured_at(&self) -> Result<Option<DateTime<Utc>>, OutboxError> {
        let store = self.open_store().map_err(OutboxError::Reopen)?;
        for entry in self.outbox.committed_pending(&store).take(OLDEST_MAX_READ) {
            let (key, value) = entry.map_err(OutboxError::Storage)?;
            self.count_read(1);
            if let Some(line) = decode_pending(&key, &value) {
                return Ok(Some(line.line.captured_at));
            }
        }
        Ok(None)
    }

    /// The disk space of the outbox's directory, its reserve included: the allocated blocks of
    /// its files (one directory listing, no record read).
    pub fn disk_bytes(&self) -> u64 {
        disk_usage(&self.outbox.path())
    }

    /// Dead letters (the outbox's counter).
    pub fn dead_len(&self) -> usize {
        self.outbox.dead_len()
    }

    /// Quarantined records (the outbox's counter).
    pub fn quarantine_len(&self) -> usize {
        self.outbox.quarantine_len()
    }

    /// Records the read-only views of this outbox have read since it was opened: what a scrape
    /// costs, which must not grow with the outbox.
    pub fn records_read(&self) -> u64 {
        self.outbox.n_read_by_views.load(Ordering::Relaxed)
    }

    fn count_read(&self, n: usize) {
        self.outbox
            .n_read_by_views
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The open database as it is (`Database::peek`): never reopened.
    fn open_store(&self) -> Result<Arc<crate::outbox::store::Store>, String> {
        self.outbox.db.peek()
    }
}

/// The allocated blocks of the files below `dir`, in bytes (sled's file can be sparse).
pub(super) fn disk_usage(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => disk_usage(&entry.path()),
            Ok(meta) => meta.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}
