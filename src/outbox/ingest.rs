//! `Ingest`: the lines of one viewer answer on their way into the outbox, written one by one as they
//! are parsed, flushed and made visible to delivery at the commit; and `append`, built on it.
//!
//! Owns the keys of an ingest (a retry writes the same records again) and the committed watermark's
//! rise. Must not parse or filter (that is the poller's), and must not keep the lines it was handed.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::model::CapturedLine;
use crate::outbox::record::encode_pending;
use crate::outbox::store::Store;
use crate::outbox::{Outbox, OutboxError, PendingLine};

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

impl Outbox {
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

    /// Fails the ingest as a write error does (a test's stand-in for a full disk).
    #[cfg(test)]
    pub(super) fn fail(&mut self, err: OutboxError) {
        self.failed = Some(err);
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
                let id = outbox.db.new_id(&store)?;
                self.keys.push(id);
                id
            }
        };
        let pending = PendingLine::captured(id, line.clone());
        let value = encode_pending(&pending);
        let n_bytes = value.len() as u64;
        // A retry finds the records of the failed try that reached the disk: counted once.
        match outbox
            .db
            .io(store.pending.insert(id.to_be_bytes(), value))?
        {
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
            (None, Some(store)) => self.outbox.db.flush(store).await,
        };
        // After an I/O error the database is reopened once this ingest lets go of it, and the
        // reopen counts the depth from what reached the disk.
        if flushed.is_ok() || !self.outbox.db.is_broken() {
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
