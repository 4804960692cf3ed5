//! The retry schedule of CMS deliveries: exponential from `retry.initial` to `retry.max`, full jitter,
//! no limit on attempts, and a server's `Retry-After` honoured up to `retry.max`.
//!
//! Pure policy: no I/O and no timers. The exponential sequence comes from `backon` (the maintained
//! successor of `backoff`, RUSTSEC-2025-0012); full jitter is applied here because backon's jitter
//! only adds to the delay.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// The floor of a jittered delay, so a run of unlucky draws never spins.
const MIN_DELAY: Duration = Duration::from_millis(10);

/// Builds schedules.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// First delay.
    pub initial: Duration,
    /// Cap.
    pub max: Duration,
}

impl RetryPolicy {
    /// A fresh schedule, for the first failure of a run of failures.
    pub fn schedule(&self) -> Backoff {
        let inner = ExponentialBuilder::default()
            .with_min_delay(self.initial)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .without_max_times()
            .build();
        Backoff {
            inner,
            max: self.max,
        }
    }
}

/// One run of retries.
#[derive(Debug)]
pub struct Backoff {
    inner: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// The delay before the next attempt: uniform in `[0, d]` where `d` doubles from `initial` up to
    /// `max`, but never less than what the server asked for, up to `max`: a maintenance page's
    /// `Retry-After: 3600` must not park delivery for an hour when `retry.max` is a minute.
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        let ceiling = self.inner.next().unwrap_or(self.max);
        let jittered = ceiling.mul_f64(fastrand::f64()).max(MIN_DELAY);
        match retry_after {
            Some(asked) => jittered.max(asked.min(self.max)),
            None => jittered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_stay_within_it() {
        let policy = RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let mut backoff = policy.schedule();
        let delays: Vec<_> = (0..50).map(|_| backoff.next_delay(None)).collect();
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(1)),
            "{delays:?}"
        );
        assert!(
            delays[..2].iter().all(|d| *d <= Duration::from_millis(200)),
            "{delays:?}"
        );
        // 40 draws uniform in [0, 1s]: all below 0.5s has probability 2^-40.
        assert!(
            delays[10..].iter().any(|d| *d > Duration::from_millis(500)),
            "{delays:?}"
        );
    }

    #[test]
    fn retry_after_is_honoured_up_to_retry_max() {
        let policy = RetryPolicy {
            initial: Duration::from_millis(10),
            max: Duration::from_secs(60),
        };
        let mut backoff = policy.schedule();
        assert!(backoff.next_delay(Some(Duration::from_secs(5))) >= Duration::from_secs(5));
        // A maintenance page's hour is cut to retry.max.
        assert_eq!(
            backoff.next_delay(Some(Duration::from_secs(3600))),
            Duration::from_secs(60)
        );
    }
}
