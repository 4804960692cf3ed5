//! The bounds of the outbox: `outbox.max_bytes`, `outbox.max_age` and `outbox.when_full`. Oldest
//! lines are dropped first, each counted and logged, or polling pauses while the outbox is full (and,
//! whatever `when_full` says, while its disk is full: `reserve`).
//!
//! Must not drop a line that is not committed yet (it reads only up to the committed watermark), and
//! must not pause anything itself: the poller asks `is_full_and_paused`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};

pub use crate::config::WhenFull;
use crate::outbox::record::decode_pending;
use crate::outbox::store::Store;
use crate::outbox::{GapKind, GapNote, Outbox, OutboxError, PendingLine};

/// The bounds of the outbox.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of pending records at most.
    pub max_bytes: u64,
    /// Pending lines older than this (since capture) are dropped.
    pub max_age: Duration,
    /// What happens at `max_bytes`.
    pub when_full: WhenFull,
    /// Disk space kept in reserve for a full disk (`outbox.reserve_bytes`, `reserve`); 0 is none.
    pub reserve_bytes: u64,
}

/// At most this many dropped lines are logged one by one per drop; the rest are summed up.
const MAX_DROPS_LOGGED: usize = 100;

impl Outbox {
    /// Sets the bounds (`outbox.max_bytes`, `outbox.max_age`, `outbox.when_full`) and writes the
    /// reserve (`outbox.reserve_bytes`).
    pub fn with_limits(mut self, limits: Limits) -> Outbox {
        self.limits = limits;
        self.db.reserve().keep(limits.reserve_bytes);
        self
    }

    /// Whether polling is to pause: the outbox holds `max_bytes` or more under `pause_polling`, or
    /// its disk is full (`is_disk_full`), under either setting.
    pub fn is_full_and_paused(&self) -> bool {
        self.is_disk_full()
            || (self.limits.when_full == WhenFull::PausePolling
                && self.bytes() >= self.limits.max_bytes)
    }

    /// Lines dropped for space or age since the outbox was opened.
    pub fn n_dropped(&self) -> u64 {
        self.n_dropped.load(Ordering::Relaxed)
    }

    /// Drops pending lines captured more than `max_age` ago, and quarantine records older than that
    /// (`drop_expired_quarantine`: nothing the outbox keeps outlives `outbox.max_age`). Returns how
    /// many lines. A line in flight may be dropped too: `save` never brings a removed record back,
    /// so a POST that ends later cannot resurrect it (at worst a dropped line was in fact stored by
    /// the CMS).
    pub async fn drop_expired(&self) -> Result<usize, OutboxError> {
        self.drop_expired_quarantine(self.limits.max_age).await?;
        let Ok(max_age) = chrono::Duration::from_std(self.limits.max_age) else {
            return Ok(0);
        };
        let Some(cutoff) = Utc::now().checked_sub_signed(max_age) else {
            return Ok(0);
        };
        let store = self.store()?;
        self.drop_while(&store, GapKind::DroppedForAge, false, |line, _| {
            line.line.captured_at < cutoff
        })
        .await
    }

    /// Under `drop_oldest`, drops the oldest lines while the outbox holds more than `max_bytes`. Run
    /// after every write that can grow it (an append, a rewrite). Lines in flight are passed over:
    /// their POST may store them whatever the outbox does, so dropping them would free nothing for
    /// long and count as dropped a line the CMS has (and marking a batch in flight, which writes its
    /// prepared rows, grows exactly the oldest records). The bound can thus be passed by at most one
    /// batch while it is in flight.
    pub(super) async fn enforce_max_bytes(&self, store: &Store) -> Result<(), OutboxError> {
        let max_bytes = self.limits.max_bytes;
        if self.limits.when_full == WhenFull::DropOldest && self.bytes() > max_bytes {
            self.drop_while(store, GapKind::DroppedForSpace, true, |_, outbox| {
                outbox.bytes() > max_bytes
            })
            .await?;
        }
        Ok(())
    }

    /// Drops pending lines from the oldest on while `condition` holds, logging each at warn; with
    /// `spare_in_flight`, lines in flight are passed over, neither dropped nor ending the walk.
    async fn drop_while(
        &self,
        store: &Store,
        kind: GapKind,
        spare_in_flight: bool,
        condition: impl Fn(&PendingLine, &Outbox) -> bool,
    ) -> Result<usize, OutboxError> {
        let reason = match kind {
            GapKind::DroppedForAge => "older than outbox.max_age",
            _ => "outbox.max_bytes reached",
        };
        let mut n_dropped = 0;
        // When the lines dropped were said, for the gap marker (`gaps`).
        let mut said: Option<(DateTime<Utc>, DateTime<Utc>, u64)> = None;
        // Lazily, oldest first: this runs on every delivery step and must stop at the first line
        // that stays.
        for entry in self.committed_pending(store) {
            let (key, value) = self.db.io(entry)?;
            let Some(line) = decode_pending(&key, &value) else {
                continue;
            };
            if spare_in_flight && line.is_in_flight() {
                continue;
            }
            if !condition(&line, self) {
                break;
            }
            if !self.remove_pending(store, &key)? {
                continue;
            }
            // Counted with the removal, so that depth + dropped never dips or jumps.
            self.n_dropped.fetch_add(1, Ordering::Relaxed);
            n_dropped += 1;
            // A dropped marker (the relay's own line) is not chat: noting it would mark it again
            // at every max_age of a long outage.
            if line.line.source != crate::model::LineSource::Relay {
                let at = line.line.spoken_at;
                said = Some(said.map_or((at, at, 1), |(from, to, n)| {
                    (from.min(at), to.max(at), n + 1)
                }));
            }
            if n_dropped <= MAX_DROPS_LOGGED {
                tracing::warn!(outbox_id = line.id, speaker = %line.line.speaker, captured_at = %line.line.captured_at, reason, "line dropped from the outbox");
            }
        }
        if let Some((from, to, n)) = said {
            let noted_at = Utc::now();
            self.note_gap(
                store,
                GapNote {
                    kind,
                    from,
                    to,
                    n,
                    noted_at,
                },
            )?;
        }
        if n_dropped > 0 {
            self.db.flush(store).await?;
            tracing::warn!(
                n_lines = n_dropped,
                reason,
                outbox_depth = self.len(),
                "lines dropped from the outbox"
            );
        }
        Ok(n_dropped)
    }
}
