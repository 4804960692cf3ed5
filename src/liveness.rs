//! The signals that decide whether the relay is ready and alive: `Readiness` (what the stages last
//! saw of the viewer, the outbox and delivery to the CMS, and the lines delivery holds back, read
//! by `/readyz`) and each loop's `Heartbeat` (read by the systemd watchdog, through `notify`, to
//! decide a restart).
//!
//! The stages write these through `Stats` (`stats.readiness`, `stats.poller_heartbeat`,
//! `stats.delivery_heartbeat`), so that each stage holds one shared handle; what the signals mean
//! lives here, apart from the counters, so that an edit to the metrics cannot change when the relay
//! is restarted. Must not: do I/O, or decide readiness itself (`health` judges these signals against
//! its limits, `app` combines the heartbeats for the watchdog).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// What the stages last saw of the viewer, the outbox and delivery to the CMS, and why delivery
/// holds lines back (the CMS login state is kept by the CMS client itself). Each mutex is held for
/// one assignment.
#[derive(Debug, Default)]
pub struct Readiness {
    viewer: Mutex<ViewerState>,
    outbox_error: Mutex<Option<String>>,
    delivery: Mutex<Option<DeliveryFailing>>,
    delivery_held: Mutex<Option<String>>,
    /// Why the viewer does not hear its region, with what to do (set by `presence`).
    viewer_place: Mutex<Option<String>>,
}

/// Delivery attempts that failed in a row, none succeeding since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryFailing {
    /// When the first of them failed.
    pub since: Instant,
    /// How many.
    pub n_failed: u64,
    /// The last one's error.
    pub last_error: String,
}

#[derive(Debug, Default, Clone)]
struct ViewerState {
    last_ok: Option<Instant>,
    last_error: Option<String>,
}

impl Readiness {
    /// A viewer poll was answered.
    pub fn viewer_ok(&self) {
        let mut viewer = lock(&self.viewer);
        viewer.last_ok = Some(Instant::now());
        viewer.last_error = None;
    }

    /// The viewer does not hear its region (`Some`: why, and what to do), or does again (`None`).
    pub fn viewer_place(&self, problem: Option<String>) {
        *lock(&self.viewer_place) = problem;
    }

    /// Why the viewer does not hear its region, if it does not.
    pub fn viewer_place_problem(&self) -> Option<String> {
        lock(&self.viewer_place).clone()
    }

    /// A viewer poll failed.
    pub fn viewer_failed(&self, error: &dyn std::fmt::Display) {
        lock(&self.viewer).last_error = Some(error.to_string());
    }

    /// When the viewer last answered a poll, and the error of the polls since, if they failed.
    pub fn viewer(&self) -> (Option<Instant>, Option<String>) {
        let viewer = lock(&self.viewer).clone();
        (viewer.last_ok, viewer.last_error)
    }

    /// An outbox write succeeded.
    pub fn outbox_ok(&self) {
        *lock(&self.outbox_error) = None;
    }

    /// An outbox write failed.
    pub fn outbox_failed(&self, error: &dyn std::fmt::Display) {
        *lock(&self.outbox_error) = Some(error.to_string());
    }

    /// The error of the last outbox write, if it failed.
    pub fn outbox_error(&self) -> Option<String> {
        lock(&self.outbox_error).clone()
    }

    /// A delivery step made progress: the CMS answered and settled lines.
    pub fn delivery_ok(&self) {
        *lock(&self.delivery) = None;
    }

    /// Nothing was left to deliver: the failures in a row, if any, end without a verdict.
    pub fn delivery_idle(&self) {
        *lock(&self.delivery) = None;
    }

    /// A delivery attempt failed at the CMS.
    pub fn delivery_failed(&self, error: &dyn std::fmt::Display) {
        let mut delivery = lock(&self.delivery);
        let failing = delivery.get_or_insert_with(|| DeliveryFailing {
            since: Instant::now(),
            n_failed: 0,
            last_error: String::new(),
        });
        failing.n_failed += 1;
        failing.last_error = error.to_string();
    }

    /// The delivery attempts failing in a row since the last success, if the last one failed.
    pub fn delivery_failing(&self) -> Option<DeliveryFailing> {
        lock(&self.delivery).clone()
    }

    /// Delivery holds lines back after failures of their own (why), or holds none (`None`).
    pub fn delivery_held(&self, reason: Option<String>) {
        *lock(&self.delivery_held) = reason;
    }

    /// Why delivery holds lines back, if it does.
    pub fn delivery_held_reason(&self) -> Option<String> {
        lock(&self.delivery_held).clone()
    }
}

/// A task loop's pulse: `beat` once per turn, and hold the guard of `alive` for the loop's life so a
/// loop that ended (or panicked) is noticed at once.
#[derive(Debug, Default)]
pub struct Heartbeat {
    last: Mutex<Option<Instant>>,
    alive: AtomicBool,
}

impl Heartbeat {
    /// Marks the loop alive until the guard is dropped.
    pub fn alive(&self) -> AliveGuard<'_> {
        self.alive.store(true, Ordering::Relaxed);
        self.beat();
        AliveGuard { heartbeat: self }
    }

    /// One turn of the loop.
    pub fn beat(&self) {
        *lock(&self.last) = Some(Instant::now());
    }

    /// Whether the loop runs and came round within `stall_limit`.
    pub fn is_healthy(&self, stall_limit: Duration) -> bool {
        self.is_running()
            && self
                .since_last_beat()
                .is_some_and(|since| since <= stall_limit)
    }

    /// Whether the loop runs: it started and has neither ended nor panicked.
    pub fn is_running(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// How long ago the loop last came round (`None` before it first did).
    pub fn since_last_beat(&self) -> Option<Duration> {
        lock(&self.last).map(|last| last.elapsed())
    }
}

/// Marks a loop dead when dropped (also on panic).
#[derive(Debug)]
pub struct AliveGuard<'a> {
    heartbeat: &'a Heartbeat,
}

impl Drop for AliveGuard<'_> {
    fn drop(&mut self) {
        self.heartbeat.alive.store(false, Ordering::Relaxed);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these mutexes leaves a plain value behind; keep using it.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_ended_or_stalled_is_not_healthy() {
        let heartbeat = Heartbeat::default();
        assert!(!heartbeat.is_healthy(Duration::from_secs(60)));
        {
            let _alive = heartbeat.alive();
            assert!(heartbeat.is_healthy(Duration::from_secs(60)));
        }
        assert!(!heartbeat.is_healthy(Duration::from_secs(60)));
    }
}
