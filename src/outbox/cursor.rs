//! The cursors: small numbers other stages persist in the outbox's database, so that they survive a
//! restart together with the lines they describe.
//!
//! Owns the `meta` tree, its keys and their encoding (an `i64`, big-endian). The keys are fixed: an
//! existing database must keep its cursors. A cursor of one region among several (`Cursor::of`)
//! takes the key `<key>/<region>`; the only region (empty name) keeps the bare key, so a relay that
//! serves one region reads the cursors it always wrote. Must not know what a cursor means to its
//! stage.

use std::borrow::Cow;

use crate::outbox::store::Store;
use crate::outbox::{Outbox, OutboxError};

/// A persisted cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    /// Delivery: the highest CMS chat id known to hold one of our rows. A read-back ignores rows at
    /// or below it.
    LastConfirmedId,
    /// In-world: the highest CMS chat id said in the region (or passed over).
    LastSaidId,
    /// In-world: the time of the row at `LastSaidId` (unix seconds, as read in the CMS's zone).
    LastSaidAt,
    /// In-world: a fingerprint of the row at `LastSaidId` (its text and timestamp).
    LastSaidRow,
    /// Presence: the viewer's `network_disconnected` at the last judgement.
    ViewerDisconnects,
    /// Presence: the viewer's `network_simconnected` at the last judgement.
    ViewerConnects,
    /// Presence: 1 when the viewer was connected at the last judgement, else 0.
    ViewerConnected,
    /// Presence: when the viewer's current stretch out of its region began (Unix milliseconds;
    /// 0 when it is in), so that the stretch is marked once, across restarts too.
    ViewerOutSince,
}

/// A cursor of one region (`region` empty: the only region, today's key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionCursor {
    /// Which cursor.
    pub cursor: Cursor,
    /// The region's name.
    pub region: String,
}

impl From<Cursor> for RegionCursor {
    fn from(cursor: Cursor) -> RegionCursor {
        RegionCursor {
            cursor,
            region: String::new(),
        }
    }
}

impl From<&Cursor> for RegionCursor {
    fn from(cursor: &Cursor) -> RegionCursor {
        RegionCursor::from(*cursor)
    }
}

impl From<&RegionCursor> for RegionCursor {
    fn from(cursor: &RegionCursor) -> RegionCursor {
        cursor.clone()
    }
}

impl RegionCursor {
    /// The key in the `meta` tree.
    fn key(&self) -> Cow<'static, str> {
        if self.region.is_empty() {
            Cow::Borrowed(self.cursor.key())
        } else {
            Cow::Owned(format!("{}/{}", self.cursor.key(), self.region))
        }
    }
}

impl Cursor {
    /// This cursor of `region` (empty: the only region).
    pub fn of(self, region: &str) -> RegionCursor {
        RegionCursor {
            cursor: self,
            region: region.to_owned(),
        }
    }

    /// The key in the `meta` tree of the only region.
    fn key(self) -> &'static str {
        match self {
            Cursor::LastConfirmedId => "delivery.last_confirmed_id",
            Cursor::LastSaidId => "inworld.last_said_id",
            Cursor::LastSaidAt => "inworld.last_said_at",
            Cursor::LastSaidRow => "inworld.last_said_row",
            Cursor::ViewerDisconnects => "presence.viewer_disconnects",
            Cursor::ViewerConnects => "presence.viewer_connects",
            Cursor::ViewerConnected => "presence.viewer_connected",
            Cursor::ViewerOutSince => "presence.viewer_out_since",
        }
    }
}

impl Outbox {
    /// The cursor's value, `None` until it is first set.
    pub fn cursor(&self, cursor: impl Into<RegionCursor>) -> Result<Option<i64>, OutboxError> {
        let store = self.store()?;
        Ok(self
            .db
            .io(store.meta.get(cursor.into().key().as_bytes()))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(i64::from_be_bytes))
    }

    /// Sets the cursor and flushes.
    pub async fn set_cursor(
        &self,
        cursor: impl Into<RegionCursor>,
        value: i64,
    ) -> Result<(), OutboxError> {
        let store = self.store()?;
        self.write_cursor(&store, &cursor.into(), value)?;
        self.db.flush(&store).await
    }

    /// Sets a cursor without a flush: for a value whose loss at a crash leaves a state the relay
    /// could have crashed in anyway (delivery's last confirmed id, raised on an answer: every
    /// write after it is lost with it, as sled keeps write order). The next flush carries it.
    pub fn note_cursor(
        &self,
        cursor: impl Into<RegionCursor>,
        value: i64,
    ) -> Result<(), OutboxError> {
        let store = self.store()?;
        self.write_cursor(&store, &cursor.into(), value)
    }

    /// Sets several cursors in one atomic batch and flushes: a crash leaves all of them or none.
    pub async fn set_cursors<C>(&self, cursors: &[(C, i64)]) -> Result<(), OutboxError>
    where
        for<'c> &'c C: Into<RegionCursor>,
    {
        let store = self.store()?;
        let mut batch = sled::Batch::default();
        for (cursor, value) in cursors {
            batch.insert(cursor.into().key().as_bytes(), &value.to_be_bytes());
        }
        self.db.io(store.meta.apply_batch(batch))?;
        self.db.flush(&store).await
    }

    /// Stores `lines` and sets the cursor in one flush: a marker line and the cursor that says it
    /// was written reach the disk together, so a restart neither loses nor repeats it.
    pub async fn append_and_set_cursor(
        &self,
        lines: &[crate::model::CapturedLine],
        cursor: impl Into<RegionCursor>,
        value: i64,
    ) -> Result<(), OutboxError> {
        let cursor = cursor.into();
        let before = self.cursor(&cursor)?;
        let store = self.store()?;
        self.write_cursor(&store, &cursor, value)?;
        let appended = self.append(lines).await;
        if appended.is_err() {
            // The lines did not reach the disk: the cursor must not say they did (a failed write
            // is retried by the caller as a whole).
            let _ = match before {
                Some(before) => self.write_cursor(&store, &cursor, before),
                None => self
                    .db
                    .io(store.meta.remove(cursor.key().as_bytes()))
                    .map(drop),
            };
        }
        appended
    }

    /// Writes the cursor, without flushing.
    pub(super) fn write_cursor(
        &self,
        store: &Store,
        cursor: &RegionCursor,
        value: i64,
    ) -> Result<(), OutboxError> {
        self.db.io(store
            .meta
            .insert(cursor.key().as_bytes(), &value.to_be_bytes()))?;
        Ok(())
    }
}
