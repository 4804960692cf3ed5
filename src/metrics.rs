//! `Stats`: the relay's counters and histograms, shared by every task as `Arc<Stats>` (one for the
//! process, one for each region's viewer side), and their Prometheus text exposition
//! (`render_prometheus`, driven by one table of every metric, encoded by the Prometheus project's
//! `prometheus-client` crate; region-scoped families carry a `region` label).
//!
//! The stages only write here (one atomic add, one short mutex); `health` reads it for `/metrics`
//! and `/status`. `Stats` also carries the readiness signals and loop heartbeats so that a stage
//! holds one handle, but what they mean (and so when `/readyz` fails and systemd restarts the relay)
//! is owned by `liveness`. Must not: serve HTTP, do I/O (`render_prometheus` only formats numbers
//! it is given), or decide readiness or liveness.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use crate::liveness::{Heartbeat, Readiness};
use crate::model::FilterReason;

/// Counters since start, histograms, and (defined in `liveness`) the signals readiness and the
/// watchdog are decided on.
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
    /// Lines read from the viewer that could not be stored before shutdown: lost.
    pub lines_unstored: AtomicU64,
    /// Lines the CMS confirmed.
    pub lines_delivered: AtomicU64,
    /// Lines found already stored by a read-back after an unknown outcome.
    pub lines_reconciled: AtomicU64,
    /// Lines moved to the dead letters.
    pub lines_dead_lettered: AtomicU64,
    /// Of those, lines whose outcome no read-back could settle (the CMS could not answer it).
    pub lines_unresolved: AtomicU64,
    /// Lines that wait for their own retry after the CMS failed them (a gauge, set by delivery).
    pub lines_held_back: AtomicU64,
    /// Failed delivery attempts.
    pub delivery_retries: AtomicU64,
    /// Batches posted successfully.
    pub batches_delivered: AtomicU64,
    /// Chat POSTs that shared the CMS with another of the relay's own requests (`pacing`'s
    /// `Answer::Shared`: their answer time does not pace delivery).
    pub cms_posts_shared: AtomicU64,
    /// The idle time delivery leaves between its CMS requests, microseconds (a gauge, `pacing`).
    pub cms_pacing_gap_micros: AtomicU64,
    /// Lines in the last chat POST tried (for the failure logs).
    pub last_batch_size: AtomicU64,
    /// CMS lines said in-world (each part of a split line counts).
    pub inworld_said: AtomicU64,
    /// CMS lines not said: too old, or beyond the queue limit.
    pub inworld_skipped: AtomicU64,
    /// 1 while the region's CMS lines wait for its viewer to hear the region again (a gauge, set
    /// by `inworld`).
    pub inworld_paused: AtomicU64,
    /// Viewer lines dropped because they echo what the relay said in-world.
    pub inworld_echoes_dropped: AtomicU64,
    /// Chat GET answers longer than `viewer.max_response_bytes`.
    pub viewer_answers_oversized: AtomicU64,
    /// Bytes of those answers read and not kept.
    pub viewer_bytes_discarded: AtomicU64,
    /// Unreadable viewer answers not quarantined: the same body was kept before.
    pub quarantine_repeats: AtomicU64,
    /// Unreadable viewer answers not quarantined: the quarantine holds `outbox.max_quarantine_bytes`.
    pub quarantine_full: AtomicU64,
    /// 1 while the viewer does not hear its region (a gauge, set by `presence`).
    pub viewer_out_of_region: AtomicU64,
    /// Stretches of the viewer out of its region that began.
    pub viewer_out_of_region_stretches: AtomicU64,
    /// REST logins the relay made to bring the viewer back.
    pub viewer_logins: AtomicU64,
    /// Avatars in the viewer's region, its own left out (a gauge, set by `presence`).
    pub avatars_in_region: AtomicU64,
    /// Of those, the ones beyond `viewer.hearing_range` (a gauge, set by `presence`).
    pub avatars_beyond_hearing: AtomicU64,
    /// Gap markers written to the outbox.
    pub gap_markers: AtomicU64,
    /// Lines per chat POST.
    pub batch_size: Histogram<BatchSizeBuckets>,
    /// Duration of each chat POST, answered or failed.
    pub post_seconds: Histogram<PostSecondsBuckets>,
    /// From the viewer answer that carried a line to the CMS confirming it.
    pub capture_to_cms_seconds: Histogram<CaptureSecondsBuckets>,
    /// What `/readyz` decides on.
    pub readiness: Readiness,
    /// The poller loop's heartbeat (systemd watchdog).
    pub poller_heartbeat: Heartbeat,
    /// The delivery loop's heartbeat (systemd watchdog).
    pub delivery_heartbeat: Heartbeat,
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
        Stats::add(&self.lines_filtered[filter_idx(reason)], 1);
    }

    /// A chat POST of `n_messages` lines is about to be sent.
    pub fn batch_attempted(&self, n_messages: usize) {
        self.batch_size.observe(n_messages as f64);
        self.last_batch_size
            .store(n_messages as u64, Ordering::Relaxed);
    }

    /// The CMS confirmed a line read from the viewer at `captured_at`.
    pub fn confirmed(&self, captured_at: chrono::DateTime<chrono::Utc>) {
        let seconds = (chrono::Utc::now() - captured_at).num_microseconds();
        self.capture_to_cms_seconds
            .observe(seconds.unwrap_or(i64::MAX) as f64 / 1e6);
    }

    /// Lines filtered for `reason`.
    pub fn n_filtered(&self, reason: FilterReason) -> u64 {
        Stats::get(&self.lines_filtered[filter_idx(reason)])
    }
}

fn filter_idx(reason: FilterReason) -> usize {
    FilterReason::ALL
        .iter()
        .position(|r| *r == reason)
        .expect("ALL lists every reason")
}

// ---------------------------------------------------------------------------------------------
// Histograms
// ---------------------------------------------------------------------------------------------

/// The upper bounds of a histogram's buckets (ascending; `+Inf` is implied).
pub trait Buckets {
    /// The bounds.
    const BOUNDS: &'static [f64];
}

/// Lines per POST: `cms.batch_max_messages` is 100 by default.
#[derive(Debug, Default)]
pub struct BatchSizeBuckets;
impl Buckets for BatchSizeBuckets {
    const BOUNDS: &'static [f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0];
}

/// A POST takes milliseconds on a LAN and up to `cms.request_timeout` (30 s) when it fails.
#[derive(Debug, Default)]
pub struct PostSecondsBuckets;
impl Buckets for PostSecondsBuckets {
    const BOUNDS: &'static [f64] = &[
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
}

/// Capture → CMS: under a second when all is well, up to hours after an outage.
#[derive(Debug, Default)]
pub struct CaptureSecondsBuckets;
impl Buckets for CaptureSecondsBuckets {
    const BOUNDS: &'static [f64] = &[
        0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0,
    ];
}

/// A fixed-bucket histogram (Prometheus semantics), lock-free to observe.
#[derive(Debug)]
pub struct Histogram<B> {
    /// Observations per bucket, not cumulative; the last is `+Inf`.
    counts: Vec<AtomicU64>,
    /// The sum in millionths, so it stays an integer atomic.
    sum_micros: AtomicU64,
    buckets: PhantomData<B>,
}

impl<B: Buckets> Default for Histogram<B> {
    fn default() -> Self {
        Histogram {
            counts: (0..=B::BOUNDS.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            buckets: PhantomData,
        }
    }
}

impl<B: Buckets> Histogram<B> {
    /// Records one value (negative values count as 0).
    pub fn observe(&self, value: f64) {
        let value = if value.is_finite() {
            value.max(0.0)
        } else {
            0.0
        };
        let idx = B::BOUNDS
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(B::BOUNDS.len());
        self.counts[idx].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((value * 1e6).round() as u64, Ordering::Relaxed);
    }

    /// Records a duration in seconds.
    pub fn observe_duration(&self, duration: Duration) {
        self.observe(duration.as_secs_f64());
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The sum of the observations.
    pub fn sum(&self) -> f64 {
        self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: B::BOUNDS,
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            sum: self.sum(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Exposition
// ---------------------------------------------------------------------------------------------

/// Values that live outside `Stats` (the outbox, the CMS client), read when `/metrics` is served.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Lines waiting in the outbox.
    pub outbox_lines: u64,
    /// Bytes of those lines.
    pub outbox_bytes: u64,
    /// The outbox's space on disk (its database and its reserve).
    pub outbox_disk_bytes: u64,
    /// Lines the outbox dropped for `outbox.max_bytes` or `outbox.max_age` since start.
    pub outbox_dropped: u64,
    /// Age of the oldest waiting line, 0 when none waits.
    pub oldest_age_seconds: f64,
    /// Lines in the dead letters.
    pub dead_letters: u64,
    /// Records in the quarantine.
    pub quarantined: u64,
    /// Successful CMS logins since start.
    pub cms_logins: u64,
    /// Whether `/readyz` would answer 200.
    pub ready: bool,
    /// Seconds since the relay started.
    pub uptime_seconds: f64,
}

/// Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// One region's counters as `/metrics` shows them: `name` is its `region` label (empty: the only
/// region of a configuration without `[[regions]]`, whose samples carry no `region` label, as
/// before; Prometheus reads an absent label and `region=""` alike).
#[derive(Clone, Copy)]
pub struct RegionStats<'a> {
    /// The region's name.
    pub name: &'a str,
    /// Its counters.
    pub stats: &'a Stats,
}

/// The metrics in the Prometheus text format, through the `prometheus-client` crate's encoder, in
/// the order of the table in `families`. Every name starts with `opensim_chat_relay_`. `process`
/// holds what belongs to the process (delivery, the CMS, the outbox); `regions` each region's
/// viewer side and its delivered lines, whose families carry a `region` label.
pub fn render_prometheus(process: &Stats, regions: &[RegionStats<'_>], gauges: &Gauges) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    for (name, help, metric) in families(process, regions, gauges) {
        // The crate writes the `_total` of a counter and the final period of a help text itself.
        let name = match metric {
            Metric::Counter(_) => name.trim_end_matches("_total"),
            _ => name,
        };
        registry.register(name, help.trim_end_matches('.'), metric);
    }
    let mut out = String::with_capacity(8192);
    // Writing to a `String` cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

/// A sample's labels: `region` (when named) and the family's own.
type Labels = Vec<(&'static str, String)>;

/// The labels of region `name`'s sample, with `more`.
fn labels(name: &str, more: &[(&'static str, &str)]) -> Labels {
    let region = (!name.is_empty()).then(|| ("region", name.to_owned()));
    region
        .into_iter()
        .chain(more.iter().map(|(key, value)| (*key, (*value).to_owned())))
        .collect()
}

/// A counter of the process: one sample without labels.
fn one<T>(value: T) -> Vec<(Labels, T)> {
    vec![(Vec::new(), value)]
}

/// Every metric (name, help, samples), one row each, in the order they are exposed.
fn families(
    process: &Stats,
    regions: &[RegionStats<'_>],
    gauges: &Gauges,
) -> Vec<(&'static str, &'static str, Metric)> {
    use Metric::{Counter, Gauge, Histogram};
    let get = Stats::get;
    // A counter per region.
    let each = |read: &dyn Fn(&Stats) -> u64| -> Vec<(Labels, u64)> {
        regions
            .iter()
            .map(|region| (labels(region.name, &[]), read(region.stats)))
            .collect()
    };
    // A counter per region, and the process's own count when it is not a region's (lines of a
    // region no longer configured), without a label, when there is any.
    let each_and_rest = |read: &dyn Fn(&Stats) -> u64| -> Vec<(Labels, u64)> {
        let mut samples = each(read);
        let shared = regions
            .iter()
            .any(|region| std::ptr::eq(region.stats, process));
        if !shared && read(process) > 0 {
            samples.push((Vec::new(), read(process)));
        }
        samples
    };
    let each_gauge = |read: &dyn Fn(&Stats) -> u64| -> Vec<(Labels, f64)> {
        regions
            .iter()
            .map(|region| (labels(region.name, &[]), read(region.stats) as f64))
            .collect()
    };
    let filtered = regions
        .iter()
        .flat_map(|region| {
            FilterReason::ALL.iter().map(|reason| {
                (
                    labels(region.name, &[("reason", reason.as_str())]),
                    region.stats.n_filtered(*reason),
                )
            })
        })
        .collect();
    let mut dropped: Vec<(Labels, u64)> = regions
        .iter()
        .flat_map(|region| {
            [
                ("unreadable", get(&region.stats.lines_unreadable)),
                ("unstored", get(&region.stats.lines_unstored)),
            ]
            .map(|(reason, n)| (labels(region.name, &[("reason", reason)]), n))
        })
        .collect();
    // The outbox's limits drop lines of every region alike.
    dropped.push((
        labels("", &[("reason", "outbox_limit")]),
        gauges.outbox_dropped,
    ));
    let not_quarantined = regions
        .iter()
        .flat_map(|region| {
            [
                ("repeat", get(&region.stats.quarantine_repeats)),
                ("full", get(&region.stats.quarantine_full)),
            ]
            .map(|(reason, n)| (labels(region.name, &[("reason", reason)]), n))
        })
        .collect();
    let version = vec![(labels("", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0)];
    let ready = if gauges.ready { 1.0 } else { 0.0 };
    // A gauge that counts (lines, bytes) is shown as a float, like every gauge.
    #[rustfmt::skip]
    let families = vec![
        ("opensim_chat_relay_viewer_polls_total", "Chat GETs the viewer answered.", Counter(each(&|s| get(&s.polls)))),
        ("opensim_chat_relay_viewer_poll_errors_total", "Chat GETs that failed (viewer down, wrong host, bad answer).", Counter(each(&|s| get(&s.poll_errors)))),
        ("opensim_chat_relay_viewer_answers_oversized_total", "Chat GET answers longer than viewer.max_response_bytes: read to their end, only the lines in their first part kept.", Counter(each(&|s| get(&s.viewer_answers_oversized)))),
        ("opensim_chat_relay_viewer_bytes_discarded_total", "Bytes of those answers read and not kept.", Counter(each(&|s| get(&s.viewer_bytes_discarded)))),
        ("opensim_chat_relay_lines_polled_total", "Lines the viewer handed out.", Counter(each(&|s| get(&s.lines_polled)))),
        ("opensim_chat_relay_lines_relayed_total", "Lines that passed the filter and were stored in the outbox.", Counter(each(&|s| get(&s.lines_relayed)))),
        ("opensim_chat_relay_lines_filtered_total", "Lines not relayed, by reason.", Counter(filtered)),
        ("opensim_chat_relay_lines_delivered_total", "Lines the CMS confirmed (including those a read-back found).", Counter(each_and_rest(&|s| get(&s.lines_delivered) + get(&s.lines_reconciled)))),
        ("opensim_chat_relay_lines_reconciled_total", "Lines a read-back found stored after a POST of unknown outcome.", Counter(each_and_rest(&|s| get(&s.lines_reconciled)))),
        ("opensim_chat_relay_delivery_retries_total", "Failed delivery attempts (each is retried with backoff).", Counter(one(get(&process.delivery_retries)))),
        ("opensim_chat_relay_lines_dead_lettered_total", "Lines the CMS refused, moved to the dead letters.", Counter(one(get(&process.lines_dead_lettered)))),
        ("opensim_chat_relay_lines_unresolved_total", "Lines moved to the dead letters because the CMS could not answer their read-back: they may be stored; check the CMS before requeueing.", Counter(one(get(&process.lines_unresolved)))),
        ("opensim_chat_relay_cms_pacing_gap_seconds", "Idle time delivery leaves the CMS between its requests (0: back to back), set by the adaptive pacing from the CMS's answer times.", Gauge(one(get(&process.cms_pacing_gap_micros) as f64 / 1e6))),
        ("opensim_chat_relay_viewer_out_of_region", "1 while the viewer does not hear its region (disconnected by a region restart, logged out, or in another region); /readyz says what to do.", Gauge(each_gauge(&|s| get(&s.viewer_out_of_region)))),
        ("opensim_chat_relay_viewer_out_of_region_total", "Stretches of the viewer out of its region that began.", Counter(each(&|s| get(&s.viewer_out_of_region_stretches)))),
        ("opensim_chat_relay_viewer_logins_total", "REST logins the relay made to bring the viewer back into its region ([viewer.login]).", Counter(each(&|s| get(&s.viewer_logins)))),
        ("opensim_chat_relay_avatars_in_region", "Avatars the viewer lists in its region, its own left out.", Gauge(each_gauge(&|s| get(&s.avatars_in_region)))),
        ("opensim_chat_relay_avatars_beyond_hearing", "Of the avatars in the region, those farther from the viewer's avatar than viewer.hearing_range: what they say is not heard.", Gauge(each_gauge(&|s| get(&s.avatars_beyond_hearing)))),
        ("opensim_chat_relay_gap_markers_total", "Gap markers written for the CMS chat: stretches the relay knows it did not record (cms.gap_markers).", Counter(each(&|s| get(&s.gap_markers)))),
        ("opensim_chat_relay_lines_held_back", "Lines waiting for their own retry after the CMS failed them while it answered other requests.", Gauge(one(get(&process.lines_held_back) as f64))),
        ("opensim_chat_relay_lines_dropped_total", "Lines read from the viewer and lost: unreadable entries, not stored before shutdown, or dropped by the outbox limits (outbox.max_bytes, outbox.max_age).", Counter(dropped)),
        ("opensim_chat_relay_batches_delivered_total", "Chat POSTs the CMS answered with success.", Counter(one(get(&process.batches_delivered)))),
        ("opensim_chat_relay_cms_posts_shared_total", "Chat POSTs that shared the CMS with another of the relay's own requests (an in-world read, an avatar lookup): their answer time does not pace delivery.", Counter(one(get(&process.cms_posts_shared)))),
        ("opensim_chat_relay_cms_logins_total", "Successful CMS logins (a steady climb means tokens are refused).", Counter(one(gauges.cms_logins))),
        ("opensim_chat_relay_inworld_said_total", "CMS lines said in-world.", Counter(each(&|s| get(&s.inworld_said)))),
        ("opensim_chat_relay_inworld_skipped_total", "CMS lines not said in-world (too old, or beyond the queue limit).", Counter(each(&|s| get(&s.inworld_skipped)))),
        ("opensim_chat_relay_inworld_paused", "1 while in-world is paused for the region: its viewer does not hear the region, so the CMS lines wait and are said once it is back (older than inworld.max_age by then: skipped).", Gauge(each_gauge(&|s| get(&s.inworld_paused)))),
        ("opensim_chat_relay_inworld_echoes_dropped_total", "Viewer lines dropped as the echo of what the relay said in-world.", Counter(each(&|s| get(&s.inworld_echoes_dropped)))),
        ("opensim_chat_relay_outbox_lines", "Lines waiting in the outbox.", Gauge(one(gauges.outbox_lines as f64))),
        ("opensim_chat_relay_outbox_bytes", "Bytes of the lines waiting in the outbox.", Gauge(one(gauges.outbox_bytes as f64))),
        ("opensim_chat_relay_outbox_disk_bytes", "Disk space of the outbox's directory (its database, which never shrinks, and its reserve): up to 4 x outbox.max_bytes + 12 MiB + outbox.reserve_bytes.", Gauge(one(gauges.outbox_disk_bytes as f64))),
        ("opensim_chat_relay_outbox_oldest_age_seconds", "Age of the oldest line waiting in the outbox (0 when empty).", Gauge(one(gauges.oldest_age_seconds))),
        ("opensim_chat_relay_dead_letters", "Lines kept in the dead letters.", Gauge(one(gauges.dead_letters as f64))),
        ("opensim_chat_relay_quarantined", "Unreadable records kept in the quarantine.", Gauge(one(gauges.quarantined as f64))),
        ("opensim_chat_relay_unreadable_answers_not_quarantined_total", "Unreadable viewer answers not kept: the same body was kept before (repeat), or the quarantine holds outbox.max_quarantine_bytes (full).", Counter(not_quarantined)),
        ("opensim_chat_relay_batch_size", "Lines per chat POST.", Histogram(process.batch_size.snapshot())),
        ("opensim_chat_relay_post_seconds", "Duration of each chat POST.", Histogram(process.post_seconds.snapshot())),
        ("opensim_chat_relay_capture_to_cms_seconds", "From the viewer answer carrying a line to the CMS confirming it.", Histogram(process.capture_to_cms_seconds.snapshot())),
        ("opensim_chat_relay_ready", "1 when /readyz answers 200.", Gauge(one(ready))),
        ("opensim_chat_relay_uptime_seconds", "Seconds since start.", Gauge(one(gauges.uptime_seconds))),
        ("opensim_chat_relay_build_info", "The running version.", Gauge(version)),
    ];
    families
}

/// The samples of one metric, read once at a scrape, which also give its type: the relay keeps its
/// own atomics (one add on the hot path, no registry lookups), and the crate encodes them.
#[derive(Debug)]
enum Metric {
    /// A counter's samples, each with its labels (none: the family's one sample).
    Counter(Vec<(Labels, u64)>),
    /// A gauge's samples.
    Gauge(Vec<(Labels, f64)>),
    /// Cumulative buckets, the sum and the count.
    Histogram(HistogramSnapshot),
}

/// A histogram read once, so that its buckets, sum and count are rendered from the same values.
#[derive(Debug)]
struct HistogramSnapshot {
    bounds: &'static [f64],
    /// Per bucket, not cumulative; one more than `bounds` (the last is `+Inf`).
    counts: Vec<u64>,
    sum: f64,
}

impl EncodeMetric for Metric {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> std::fmt::Result {
        match self {
            Metric::Counter(samples) => {
                for (labels, value) in samples {
                    if labels.is_empty() {
                        encoder.encode_counter::<NoLabelSet, _, u64>(value, None)?;
                    } else {
                        encoder
                            .encode_family(labels)?
                            .encode_counter::<NoLabelSet, _, u64>(value, None)?;
                    }
                }
            }
            Metric::Gauge(samples) => {
                for (labels, value) in samples {
                    if labels.is_empty() {
                        encoder.encode_gauge(value)?;
                    } else {
                        encoder.encode_family(labels)?.encode_gauge(value)?;
                    }
                }
            }
            Metric::Histogram(histogram) => {
                let buckets: Vec<(f64, u64)> = histogram
                    .counts
                    .iter()
                    .enumerate()
                    .map(|(idx, count)| {
                        let bound = histogram.bounds.get(idx).copied();
                        (bound.unwrap_or(f64::INFINITY), *count)
                    })
                    .collect();
                let count = histogram.counts.iter().sum();
                encoder.encode_histogram::<NoLabelSet>(histogram.sum, count, &buckets, None)?;
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        match self {
            Metric::Counter(_) => MetricType::Counter,
            Metric::Gauge(_) => MetricType::Gauge,
            Metric::Histogram(_) => MetricType::Histogram,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_is_cumulative_with_an_inf_bucket_and_a_sum() {
        let stats = Stats::default();
        for size in [1.0, 3.0, 3.0, 1000.0] {
            stats.batch_size.observe(size);
        }
        let text = render_prometheus(&stats, &[], &Gauges::default());
        assert!(text.contains("opensim_chat_relay_batch_size_bucket{le=\"1\"} 1\n"));
        assert!(text.contains("opensim_chat_relay_batch_size_bucket{le=\"5\"} 3\n"));
        assert!(text.contains("opensim_chat_relay_batch_size_bucket{le=\"500\"} 3\n"));
        assert!(text.contains("opensim_chat_relay_batch_size_bucket{le=\"+Inf\"} 4\n"));
        assert!(text.contains("opensim_chat_relay_batch_size_sum 1007.0\n"));
        assert!(text.contains("opensim_chat_relay_batch_size_count 4\n"));
    }

    #[test]
    fn every_metric_has_help_and_type_and_a_conventional_name() {
        let text = render_prometheus(
            &Stats::default(),
            &[RegionStats {
                name: "",
                stats: &Stats::default(),
            }],
            &Gauges::default(),
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(name.starts_with("opensim_chat_relay_"), "{line}");
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {family} "))
                    || text.contains(&format!("# TYPE {name} ")),
                "{name} has no TYPE"
            );
        }
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let mut parts = line.split(' ').skip(2);
            let (name, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
    }
}
