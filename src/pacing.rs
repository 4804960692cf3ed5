//! `Pacer`: how long delivery leaves the CMS idle between two of its requests. The adaptive
//! controller (`Controller`, pure: every call takes the `Instant` it is about) finds what the CMS
//! can take from its answer times, as Vector's adaptive request concurrency does: additive increase
//! of the relay's duty cycle while answers stay near their baseline, multiplicative decrease at once
//! when an answer is slower than `SLOW_FACTOR` x its baseline (and `SLOW_DEVIATIONS` mean deviations
//! above it), fails or times out.
//! Delivery passes a POST that shared the CMS with another request of the relay's own (an in-world
//! read queued in front of it on a one-worker PHP) as `Answer::Shared`: the relay does not yield to
//! itself.
//! `cms.max_requests_per_second` (0 = none) is a hard cap on top; `cms.adaptive_pacing = false`
//! leaves only that cap.
//! Must not: send, sleep in the controller, or know what a request carries beyond its row count.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Answer times are compared within a class of batch sizes (rows 1, 2-3, 4-7, ..., 128 and more):
/// a PHP CMS costs ~2.1 ms a request plus 0.3 ms a row, so a 100-row POST takes ~15 x a 1-row one.
const N_CLASSES: usize = 9;

/// An answer slower than this many times its class's baseline is a sign the CMS is loaded.
pub const SLOW_FACTOR: f64 = 1.5;

/// ... and slower than its baseline by this many mean deviations: on a CMS whose answer times
/// vary (a busy PHP host, another process on its disk) about a fifth of ordinary answers pass 1.5x
/// their mean, and halving at each kept the relay at about a third of the CMS's speed. Vector's adaptive
/// request concurrency uses 2.5 standard deviations; three mean absolute deviations are about that.
pub const SLOW_DEVIATIONS: f64 = 3.0;

/// The duty cycle added after each answer near its baseline: from the floor back to
/// back-to-back requests in about 20 answers.
pub const DUTY_STEP: f64 = 0.05;

/// The factor the duty cycle is multiplied by on a slow or failed answer.
pub const DUTY_DECREASE: f64 = 0.5;

/// The lowest duty cycle: the relay keeps the CMS busy at least 1/16 of the time, so a backlog
/// still drains on a CMS that others load.
pub const DUTY_FLOOR: f64 = 1.0 / 16.0;

/// How much of each answer goes into its class's baseline and deviation (exponential means over
/// ~50 answers): slow enough that a burst of slow answers is a signal, fast enough that a CMS that
/// stays slower becomes the new baseline after a few dozen answers.
pub const BASELINE_WEIGHT: f64 = 0.02;

/// The longest gap: after a request that timed out (`cms.request_timeout`, 30 s) the gap would
/// otherwise be minutes.
pub const MAX_GAP: Duration = Duration::from_secs(2);

/// How the pacer is set: `cms.adaptive_pacing` and `cms.max_requests_per_second`.
#[derive(Debug, Clone, Copy)]
pub struct PacingSettings {
    /// The adaptive controller is on.
    pub adaptive: bool,
    /// Requests per second at most (0 = no cap).
    pub max_requests_per_second: f64,
}

/// How a request ended, for `Controller::answered`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A chat POST of `n_rows` rows was answered.
    Stored {
        /// The rows the POST carried.
        n_rows: usize,
    },
    /// A chat GET (a read-back or a probe) was answered: its cost depends on rows and users it
    /// cannot know beforehand, so it only sets the gap (the CMS rests in proportion to it).
    Read,
    /// A chat POST of `n_rows` rows that shared the CMS with another of the relay's own requests
    /// (an in-world read, an avatar lookup): on a CMS with few PHP workers it waited for that
    /// request, so its time says nothing about the CMS alone. It is neither judged nor let set the
    /// gap by its waiting: the gap after it is the one its class's usual answer sets (the relay
    /// does not yield to itself).
    Shared {
        /// The rows the POST carried.
        n_rows: usize,
    },
    /// The request failed or timed out.
    Failed,
}

/// The pure controller: what the next request waits for, from the answers so far.
#[derive(Debug)]
pub struct Controller {
    settings: PacingSettings,
    /// The share of time the relay keeps the CMS busy, in `DUTY_FLOOR..=1`.
    duty: f64,
    /// Per batch-size class: the slow mean of answer times and of their deviation from it, seconds.
    baselines: [Option<Baseline>; N_CLASSES],
    /// The last answer's time, seconds (what the gap is computed from).
    last_answer: f64,
    /// When the last answer came (the gap runs from there).
    last_end: Option<Instant>,
    /// When the last request started (the cap runs from there).
    last_start: Option<Instant>,
}

impl Controller {
    /// A controller that starts at back-to-back requests.
    pub fn new(settings: PacingSettings) -> Controller {
        Controller {
            settings,
            duty: 1.0,
            baselines: [None; N_CLASSES],
            last_answer: 0.0,
            last_end: None,
            last_start: None,
        }
    }

    /// The idle time the controller leaves after an answer: `answer x (1 / duty - 1)`, so that
    /// the relay keeps the CMS busy `duty` of the time, at most `MAX_GAP`.
    pub fn gap(&self) -> Duration {
        if !self.settings.adaptive {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(self.last_answer * (1.0 / self.duty - 1.0)).min(MAX_GAP)
    }

    /// The duty cycle, in `DUTY_FLOOR..=1` (1 when the controller is off).
    pub fn duty(&self) -> f64 {
        self.duty
    }

    /// The earliest moment a request may start, after the controller's gap and the cap.
    pub fn next_start(&self, now: Instant) -> Instant {
        let after_gap = self.last_end.map_or(now, |end| end + self.gap());
        let cap = self.settings.max_requests_per_second;
        let after_cap = match self.last_start {
            Some(start) if cap > 0.0 => start + Duration::from_secs_f64(1.0 / cap),
            _ => now,
        };
        now.max(after_gap).max(after_cap)
    }

    /// A request starts at `at`.
    pub fn started(&mut self, at: Instant) {
        self.last_start = Some(at);
    }

    /// A request that started at `started` ended at `ended` with `answer`. A failure, a timeout
    /// included, halves the duty cycle and leaves the baselines as they were; a read only sets
    /// the gap that follows it (its cost depends on rows and users it cannot know beforehand).
    pub fn answered(&mut self, started: Instant, ended: Instant, answer: Answer) {
        let answer_secs = ended.saturating_duration_since(started).as_secs_f64();
        self.last_end = Some(ended);
        self.last_answer = answer_secs;
        let n_rows = match answer {
            Answer::Stored { n_rows } => n_rows,
            Answer::Read => return,
            Answer::Shared { n_rows } => {
                if let Some(usual) = self.baselines[class_of(n_rows)] {
                    self.last_answer = usual.mean.min(answer_secs);
                }
                return;
            }
            Answer::Failed => {
                self.decrease();
                return;
            }
        };
        let answer = answer_secs;
        let baseline = &mut self.baselines[class_of(n_rows)];
        let slow = baseline.is_some_and(|b| b.is_slow(answer));
        *baseline = Some(baseline.map_or(
            Baseline {
                mean: answer,
                deviation: 0.0,
            },
            |b| b.with(answer),
        ));
        if slow {
            self.decrease();
        } else {
            self.duty = (self.duty + DUTY_STEP).min(1.0);
        }
    }

    fn decrease(&mut self) {
        self.duty = (self.duty * DUTY_DECREASE).max(DUTY_FLOOR);
    }
}

/// A class's answer times: their slow mean and mean absolute deviation, seconds.
#[derive(Debug, Clone, Copy)]
struct Baseline {
    mean: f64,
    deviation: f64,
}

impl Baseline {
    /// Slower than `SLOW_FACTOR` x the mean and than `SLOW_DEVIATIONS` deviations above it.
    fn is_slow(&self, answer: f64) -> bool {
        answer > self.mean * SLOW_FACTOR && answer > self.mean + self.deviation * SLOW_DEVIATIONS
    }

    fn with(self, answer: f64) -> Baseline {
        Baseline {
            mean: self.mean + (answer - self.mean) * BASELINE_WEIGHT,
            deviation: self.deviation
                + ((answer - self.mean).abs() - self.deviation) * BASELINE_WEIGHT,
        }
    }
}

/// The class of a request of `n_rows` rows: 0 for none or one, then one per power of two.
fn class_of(n_rows: usize) -> usize {
    (usize::BITS - n_rows.max(1).leading_zeros() - 1).min(N_CLASSES as u32 - 1) as usize
}

/// The `Controller` behind a lock, with the waiting: what delivery holds.
#[derive(Debug)]
pub struct Pacer {
    controller: Mutex<Controller>,
}

impl Pacer {
    /// A pacer with `settings`.
    pub fn new(settings: PacingSettings) -> Pacer {
        Pacer {
            controller: Mutex::new(Controller::new(settings)),
        }
    }

    /// Waits for the next request's turn and notes its start; returns the start, to pass to
    /// `answered`.
    pub async fn wait(&self) -> Instant {
        let slot = self.lock().next_start(Instant::now());
        tokio::time::sleep_until(slot.into()).await;
        let now = Instant::now();
        self.lock().started(now);
        now
    }

    /// The request that started at `started` was answered now (`Controller::answered`); returns
    /// the gap that follows.
    pub fn answered(&self, started: Instant, answer: Answer) -> Duration {
        let mut controller = self.lock();
        controller.answered(started, Instant::now(), answer);
        controller.gap()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Controller> {
        // A panic while the lock is held cannot leave the controller half-updated in a way that
        // matters: its fields are each valid alone.
        self.controller
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADAPTIVE: PacingSettings = PacingSettings {
        adaptive: true,
        max_requests_per_second: 0.0,
    };

    /// Feeds `n` answers of `answer` for `n_rows` rows, each sent when the controller allows.
    fn feed(controller: &mut Controller, clock: &mut Instant, n: usize, answer: Duration) {
        for _ in 0..n {
            let start = controller.next_start(*clock);
            controller.started(start);
            *clock = start + answer;
            controller.answered(start, *clock, Answer::Stored { n_rows: 100 });
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn steady_answers_leave_no_gap() {
        let mut controller = Controller::new(ADAPTIVE);
        let mut clock = Instant::now();
        feed(&mut controller, &mut clock, 50, ms(30));
        assert_eq!(controller.gap(), Duration::ZERO);
        assert_eq!(controller.next_start(clock), clock);
    }

    #[test]
    fn answers_that_double_open_a_gap_at_once_and_recover_additively() {
        let mut controller = Controller::new(ADAPTIVE);
        let mut clock = Instant::now();
        feed(&mut controller, &mut clock, 50, ms(30));
        feed(&mut controller, &mut clock, 1, ms(60));
        assert_eq!(controller.duty(), 0.5);
        assert_eq!(controller.gap(), ms(60), "idle as long as the slow answer");
        feed(&mut controller, &mut clock, 1, ms(30));
        assert!((controller.duty() - 0.55).abs() < 1e-9);
        feed(&mut controller, &mut clock, 9, ms(30));
        assert_eq!(controller.gap(), Duration::ZERO);
    }

    #[test]
    fn answers_that_vary_around_a_steady_mean_keep_requests_back_to_back() {
        let mut controller = Controller::new(ADAPTIVE);
        let mut clock = Instant::now();
        // Exponentially distributed answers, mean 10 ms, from a fixed linear congruential
        // sequence: about 22 % of them pass 1.5x the mean.
        let mut state: u64 = 12345;
        let mut duties = Vec::new();
        for _ in 0..2000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let uniform = ((state >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            let answer = Duration::from_secs_f64(-uniform.ln() * 0.010);
            feed(&mut controller, &mut clock, 1, answer);
            duties.push(controller.duty());
        }
        let mean_duty = duties[1000..].iter().sum::<f64>() / 1000.0;
        assert!(mean_duty > 0.8, "mean duty {mean_duty}");
    }

    #[test]
    fn a_post_that_waited_for_the_relays_own_read_opens_only_its_usual_gap() {
        let mut controller = Controller::new(ADAPTIVE);
        let mut clock = Instant::now();
        feed(&mut controller, &mut clock, 50, ms(30));
        // A slow answer of the CMS's own halves the duty cycle: the gap is as long as it.
        feed(&mut controller, &mut clock, 1, ms(60));
        assert_eq!(controller.gap(), ms(60));
        let duty = controller.duty();
        // A POST queued 400 ms behind an in-world read: the gap after it is the one a usual
        // 100-row answer sets, and the duty cycle is neither cut nor raised by it.
        let start = controller.next_start(clock);
        controller.answered(start, start + ms(400), Answer::Shared { n_rows: 100 });
        assert_eq!(controller.duty(), duty);
        let usual = 0.030 + (0.060 - 0.030) * BASELINE_WEIGHT;
        let expected = usual * (1.0 / duty - 1.0);
        assert!(
            (controller.gap().as_secs_f64() - expected).abs() < 1e-6,
            "{:?}",
            controller.gap()
        );
    }

    #[test]
    fn a_failed_answer_opens_a_gap_and_the_floor_holds() {
        let mut controller = Controller::new(ADAPTIVE);
        let start = Instant::now();
        for _ in 0..10 {
            controller.answered(start, start + ms(30), Answer::Failed);
        }
        assert_eq!(controller.duty(), DUTY_FLOOR);
        assert_eq!(controller.gap(), ms(30 * 15));
    }

    #[test]
    fn a_timed_out_request_leaves_at_most_the_longest_gap() {
        let mut controller = Controller::new(ADAPTIVE);
        let start = Instant::now();
        controller.answered(start, start + Duration::from_secs(30), Answer::Failed);
        assert_eq!(controller.gap(), MAX_GAP);
    }

    #[test]
    fn a_cms_that_stays_slower_becomes_the_baseline() {
        let mut controller = Controller::new(ADAPTIVE);
        let mut clock = Instant::now();
        feed(&mut controller, &mut clock, 50, ms(30));
        feed(&mut controller, &mut clock, 400, ms(90));
        assert_eq!(controller.gap(), Duration::ZERO);
    }

    #[test]
    fn answer_times_compare_within_a_batch_size_class() {
        let mut controller = Controller::new(ADAPTIVE);
        let start = Instant::now();
        controller.answered(start, start + ms(2), Answer::Stored { n_rows: 1 });
        controller.answered(start, start + ms(32), Answer::Stored { n_rows: 100 });
        assert_eq!(controller.duty(), 1.0, "a bigger batch is not a slower cms");
        controller.answered(start, start + ms(5), Answer::Stored { n_rows: 1 });
        assert_eq!(controller.duty(), 0.5);
    }

    #[test]
    fn the_hard_cap_holds_when_answers_are_fast() {
        let mut controller = Controller::new(PacingSettings {
            adaptive: true,
            max_requests_per_second: 10.0,
        });
        let start = Instant::now();
        controller.started(start);
        controller.answered(start, start + ms(5), Answer::Stored { n_rows: 100 });
        assert_eq!(controller.next_start(start + ms(5)), start + ms(100));
    }

    #[test]
    fn off_the_controller_leaves_no_gap_after_slow_answers() {
        let mut controller = Controller::new(PacingSettings {
            adaptive: false,
            max_requests_per_second: 0.0,
        });
        let start = Instant::now();
        controller.answered(start, start + ms(30), Answer::Stored { n_rows: 100 });
        controller.answered(start, start + ms(300), Answer::Failed);
        assert_eq!(controller.gap(), Duration::ZERO);
        assert_eq!(controller.next_start(start + ms(300)), start + ms(300));
    }

    #[test]
    fn batch_sizes_fall_in_power_of_two_classes() {
        assert_eq!(class_of(0), 0);
        assert_eq!(class_of(1), 0);
        assert_eq!(class_of(3), 1);
        assert_eq!(class_of(100), 6);
        assert_eq!(class_of(100_000), N_CLASSES - 1);
    }
}
