//! `Stats`: the relay's counters, shared by every task as `Arc<Stats>`.
//!
//! Plain atomics, written by the stages and read by logs, tests and (later) the HTTP endpoint. No HTTP
//! here.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::filter::FilterReason;

/// Counters since start.
#[derive(Debug, Default)]
pub struct Stats {
    /// Chat GETs answered by the viewer.
    pub polls: AtomicU64,
    /// Viewer polls that failed.
    pub poll_errors: AtomicU64,
    /// Lines the viewer handed out.
    pub lines_polled: AtomicU64,
    /// Lines that passed the filter and were stored in the outbox.
    pub lines_relayed: AtomicU64,
    /// Lines filtered out, by reason (index of `FilterReason::ALL`).
    pub lines_filtered: [AtomicU64; FilterReason::ALL.len()],
    /// Viewer entries that could not be parsed.
    pub lines_unreadable: AtomicU64,
    /// Lines the CMS confirmed.
    pub lines_delivered: AtomicU64,
    /// Lines found already stored by a read-back after an unknown outcome.
    pub lines_reconciled: AtomicU64,
    /// Lines moved to the dead letters.
    pub lines_dead_lettered: AtomicU64,
    /// Failed delivery attempts.
    pub delivery_retries: AtomicU64,
    /// Batches posted successfully.
    pub batches_delivered: AtomicU64,
    /// CMS lines said in-world (each part of a split line counts).
    pub inworld_said: AtomicU64,
    /// CMS lines not said: too old, or beyond the queue limit.
    pub inworld_skipped: AtomicU64,
    /// Viewer lines dropped because they echo what the relay said in-world.
    pub inworld_echoes_dropped: AtomicU64,
}

impl Stats {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Counts a filtered line.
    pub fn filtered(&self, reason: FilterReason) {
        let idx = FilterReason::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("ALL lists every reason");
        Stats::add(&self.lines_filtered[idx], 1);
    }

    /// Lines filtered for `reason`.
    pub fn n_filtered(&self, reason: FilterReason) -> u64 {
        let idx = FilterReason::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("ALL lists every reason");
        Stats::get(&self.lines_filtered[idx])
    }
}
