//! `ReadBoard`: one process's reads of the CMS chat, shared between the stage that reads anyway and
//! the stage that needs a read now and then. The in-world reader reads every row of the grid every
//! `inworld.poll_interval`; delivery needs a read after each batch the CMS answered `success: true`
//! (a span of ids proves nothing of a batch's middle rows, issue 21). Delivery posts the earliest
//! start it needs (`want`), the reader starts its next read no later than that when it is near
//! (`start_for`) and publishes what it read (`publish`), and delivery settles from it the batches
//! answered before that read was sent. One GET then serves both: at a steady rate the proof of
//! delivery's batches costs the CMS the few seconds of rows its window adds to a read made anyway,
//! not a read of its own per batch (`docs/PERFORMANCE.md`, grid phase).
//!
//! Must not: decide what a read proves (delivery's `settle` does, from the read's start and the
//! moment it was sent), keep more than the latest read, or make a request itself.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::cms::CmsChat;

/// How far back of the present a wanted start may lie for the reader to take it: a start further
/// back belongs to lines of a backlog (an outage drained), whose window would make every read of
/// the reader a wide one. Those are settled by delivery's own shared read, which is made once for
/// many batches. 30 s is a few reads' worth of rows on a busy grid (1 200 at 40 lines/s).
pub const MAX_REACH_SECS: i64 = 30;

/// One read as the reader made it.
#[derive(Debug)]
pub struct BoardRead {
    /// The `<unix>` of its `GET /chats/<unix>/`.
    pub since: i64,
    /// When the request was sent (this process's monotonic clock): the read holds every row the
    /// CMS had committed by then.
    pub sent_at: Instant,
    /// What it returned.
    pub rows: Arc<Vec<CmsChat>>,
}

/// What the reader and delivery share.
#[derive(Debug, Default)]
pub struct ReadBoard {
    /// The earliest start delivery needs (`None`: nothing awaits its proof).
    wanted: Mutex<Option<i64>>,
    /// The reader's latest successful read.
    latest: Mutex<Option<Arc<BoardRead>>>,
    /// The reader's interval, once a reader serves the board.
    interval: Mutex<Option<Duration>>,
    /// Wakes delivery when a read is published.
    published: tokio::sync::Notify,
}

impl ReadBoard {
    /// A board no reader serves yet.
    pub fn new() -> ReadBoard {
        ReadBoard::default()
    }

    /// A reader serves the board, reading every `interval`.
    pub fn serve(&self, interval: Duration) {
        *lock(&self.interval) = Some(interval);
    }

    /// The serving reader's interval (`None`: no reader; delivery reads for itself).
    pub fn interval(&self) -> Option<Duration> {
        *lock(&self.interval)
    }

    /// Delivery needs a read from `since` (`None`: from nothing).
    pub fn want(&self, since: Option<i64>) {
        *lock(&self.wanted) = since;
    }

    /// Whether a start of `since` is near enough to `now_unix` for the reader to take it.
    pub fn within_reach(since: i64, now_unix: i64) -> bool {
        since >= now_unix - MAX_REACH_SECS
    }

    /// Where the reader's next read starts: its own start, or delivery's wanted one when that is
    /// earlier and within reach of `now_unix`.
    pub fn start_for(&self, own: i64, now_unix: i64) -> i64 {
        match *lock(&self.wanted) {
            Some(wanted) if wanted < own && ReadBoard::within_reach(wanted, now_unix) => wanted,
            _ => own,
        }
    }

    /// The reader read `rows` from `since` with a request sent at `sent_at`.
    pub fn publish(&self, since: i64, sent_at: Instant, rows: Arc<Vec<CmsChat>>) {
        *lock(&self.latest) = Some(Arc::new(BoardRead {
            since,
            sent_at,
            rows,
        }));
        // One consumer (delivery): a read published while it was busy leaves a permit, so its
        // next wait returns at once instead of missing the read.
        self.published.notify_one();
    }

    /// The latest read, if any.
    pub fn latest(&self) -> Option<Arc<BoardRead>> {
        lock(&self.latest).clone()
    }

    /// Returns when the next read is published.
    pub async fn next_read(&self) {
        self.published.notified().await;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each mutex guards a value assigned whole: a panic elsewhere leaves it usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reader_takes_a_wanted_start_only_when_earlier_and_within_reach() {
        let board = ReadBoard::new();
        let now = 1_800_000_000;
        assert_eq!(board.start_for(now - 4, now), now - 4, "nothing wanted");
        board.want(Some(now - 9));
        assert_eq!(board.start_for(now - 4, now), now - 9);
        assert_eq!(board.start_for(now - 600, now), now - 600, "a wide read");
        board.want(Some(now - MAX_REACH_SECS - 1));
        assert_eq!(board.start_for(now - 4, now), now - 4, "a backlog's start");
        board.want(None);
        assert_eq!(board.start_for(now - 4, now), now - 4);
    }
}
