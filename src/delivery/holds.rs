//! The lines that wait for their own retry after the CMS failed them while it answered other
//! requests, the probe that tells such a failure from an outage, and their schedule.
//!
//! Must not: count an outage as a failure of the lines' own.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::cms::CmsError;
use crate::delivery::{
    ChatApi, Delivery, DeliveryError, PROBE_AHEAD_SECS, SCAN_LIMIT, Tally, lock,
};
use crate::metrics::Stats;
use crate::outbox::{OutboxError, PendingLine};
use crate::pacing::Answer;

/// What failed: a POST the CMS answered with an error (outcome unknown), the read-back of lines
/// of unknown outcome, or the insert of one line (`{"success":false,"id":0}` to a POST of that
/// line alone: proven not stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Attempt {
    Post,
    ReadBack,
    Insert,
}

/// A line that failed on its own, passed over until `not_before`.
pub(super) struct Held {
    pub(super) not_before: tokio::time::Instant,
    /// The speaker whose newer lines wait behind it: after a failed POST or a read-back the CMS
    /// could not answer, the line is resent if a later read-back finds it missing, and must not
    /// arrive after them. The wait is bounded: after `retry.max_line_failures` the line goes to the
    /// dead letters and its speaker goes on.
    pub(super) speaker: String,
    /// It waits for a read-back (its outcome is unknown), not for a POST: such lines share one
    /// schedule and one read per round (`Holds::readers`).
    pub(super) reads: bool,
}

#[derive(Default)]
pub(super) struct Holds {
    pub(super) lines: HashMap<u64, Held>,
    /// CMS ids this process confirmed for other lines while lines were held: their read-back must
    /// not take one of those rows for theirs (a speaker saying the same words twice in a second).
    pub(super) claimed: HashSet<i64>,
    /// The error of the last failure that held lines, for `/readyz`.
    pub(super) last_error: String,
    /// Inserts of lines sent alone that failed (`Attempt::Insert`) since the CMS last stored a row
    /// of ours. The first is a failure of the line's own; a later one (the same line again
    /// included) is one only when the CMS has no user of the line's id, and otherwise the CMS
    /// failing every insert (its database cannot write): an outage that counts against no line
    /// (`insert_failed`).
    pub(super) inserts_failed_since_stored: usize,
}

impl Holds {
    /// The held lines that wait for a read-back: they are read back together, in one GET.
    pub(super) fn readers(&self) -> HashSet<u64> {
        self.lines
            .iter()
            .filter(|(_, held)| held.reads)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether `line` may be sent now: it does not wait for a retry, and no older line of its
    /// speaker is held.
    pub(super) fn may_send(&self, line: &PendingLine, now: tokio::time::Instant) -> bool {
        if self
            .lines
            .get(&line.id)
            .is_some_and(|held| held.not_before > now)
        {
            return false;
        }
        !self
            .lines
            .iter()
            .any(|(id, held)| *id < line.id && held.speaker == line.line.speaker)
    }
}

impl<C: ChatApi> Delivery<C> {
    /// A POST of `line` alone answered `{"success":false,"id":0}`: its insert failed, so it is
    /// proven not stored (spec §3.3) and is sent again, never read back. The failure is the line's
    /// own (an unknown `userId`, a linked user deleted since the lookup) when the CMS stored a row of
    /// ours since the last such failure, or when the CMS says it has no user of the line's id: the
    /// line is retried on its own schedule up to `retry.max_line_failures`, then dead-lettered with
    /// the reason. Otherwise the CMS fails every insert (a full disk, a lost database connection, a
    /// lock wait): an outage, counted against no line, that the loop backs off from and `/readyz`
    /// reports; a database that cannot write never dead-letters a speaker's lines, even when that
    /// speaker is alone. (A line that fails for another cause where no one else speaks waits,
    /// reported as that outage, until the CMS stores someone's line.)
    pub(super) async fn insert_failed(
        &self,
        line: &PendingLine,
        tally: &mut Tally,
    ) -> Result<(), DeliveryError> {
        let line = line.clone().not_stored();
        let (stored_since, n_failing) = {
            let mut holds = lock(&self.holds);
            let stored_since = holds.inserts_failed_since_stored == 0;
            holds.inserts_failed_since_stored += 1;
            (stored_since, holds.inserts_failed_since_stored)
        };
        let own = stored_since || self.user_unknown(&line).await;
        if !own {
            self.deps
                .outbox
                .mark_not_stored(std::slice::from_ref(&line))
                .await?;
            return Err(DeliveryError::InsertsFailing { n_lines: n_failing });
        }
        self.failed(&[line], CmsError::LastRowFailed, Attempt::Insert, tally)
            .await
    }

    /// Whether the CMS says it has no user of `line`'s row (-1 is stored as NULL and has none to
    /// lack; a `cms.anonymous_user_id` of 0 is asked about like any other; a lookup that fails
    /// proves nothing).
    async fn user_unknown(&self, line: &PendingLine) -> bool {
        let Some(user_id) = line.row().map(|row| row.user_id).filter(|id| *id != -1) else {
            return false;
        };
        matches!(self.deps.cms.user_exists(user_id).await, Ok(false))
    }

    /// An attempt of `lines` that the CMS answered with an error (`answered_with_error`), or an
    /// insert of one line that failed (`insert_failed`). If the CMS answers a probe (an insert's
    /// failure needs none: the CMS answered), the failure is theirs: each counts it, waits for its
    /// own retry, and the lines that can no longer be settled (a read-back that failed
    /// `retry.max_line_failures` times) or stored (an insert that did) go to the dead letters.
    /// Otherwise the CMS fails everything (its database is down, say): an outage, and the error goes
    /// back to the loop, the lines in their place.
    pub(super) async fn failed(
        &self,
        lines: &[PendingLine],
        err: CmsError,
        attempt: Attempt,
        tally: &mut Tally,
    ) -> Result<(), DeliveryError> {
        if attempt != Attempt::Insert && !self.cms_answers_a_probe().await {
            return Err(err.into());
        }
        Stats::add(&self.deps.stats.delivery_retries, 1);
        let error = err.to_string();
        let max = self.deps.max_line_failures;
        let mut kept = Vec::with_capacity(lines.len());
        let mut n_unresolved = 0;
        for original in lines {
            // As the dead letter keeps it: the failure counted.
            let line = PendingLine {
                failures: original.failures.saturating_add(1),
                last_error: Some(error.clone()),
                ..original.clone()
            };
            if attempt == Attempt::ReadBack && line.failures >= max {
                let reason = format!(
                    "outcome unknown: the cms could not answer the read-back ({error}) {} times; check the cms chat for this line before `outbox requeue`",
                    line.failures
                );
                self.dead_letter(&line, &reason, tally).await?;
                n_unresolved += 1;
            } else if attempt == Attempt::Insert && line.failures >= max {
                let reason = format!(
                    "{} ({} tries, other lines stored meanwhile)",
                    err.refusal_reason(line.row().map(|p| p.user_id)),
                    line.failures
                );
                self.dead_letter(&line, &reason, tally).await?;
            } else {
                kept.push(original.clone());
            }
        }
        Stats::add(&self.deps.stats.lines_unresolved, n_unresolved);
        let kept = self.deps.outbox.record_failure(&kept, &error).await?;
        let n_failures = kept.iter().map(|l| l.failures).max().unwrap_or(1);
        let delay = self.hold_delay(n_failures);
        let not_before = tally.now + delay;
        let reads = attempt != Attempt::Insert;
        {
            let mut holds = lock(&self.holds);
            for line in &kept {
                holds.lines.insert(
                    line.id,
                    Held {
                        not_before,
                        speaker: line.line.speaker.clone(),
                        reads,
                    },
                );
            }
            if reads {
                // One schedule for every line that waits for a read-back: they are due together
                // and read back in one GET, so a CMS that cannot answer reads gets one (and a
                // probe) per round, however many lines wait (issue 22 item 6).
                for held in holds.lines.values_mut().filter(|held| held.reads) {
                    held.not_before = not_before;
                }
            }
            holds.last_error = error.clone();
        }
        tally.n_held += kept.len();
        let attempt = match attempt {
            Attempt::Post => "post",
            Attempt::ReadBack => "read-back",
            Attempt::Insert => "insert",
        };
        // The loop's message, with what tells this failure apart: the lines wait on their own.
        tracing::warn!(error = %error, retry_in = ?delay, n_messages = lines.len(), outbox_depth = self.deps.outbox.len(), attempt, n_failures, n_unresolved, held = true, "delivery failed");
        Ok(())
    }

    /// Whether the CMS answers a chat GET that returns no row: after a failure, it tells an outage
    /// from a failure of the lines' own.
    pub(super) async fn cms_answers_a_probe(&self) -> bool {
        let started = self.pacer.wait().await;
        let ahead = chrono::Utc::now().timestamp() + PROBE_AHEAD_SECS;
        let probe = self.deps.cms.read_since(ahead).await;
        self.paced(started, &probe, Answer::Read);
        probe.is_ok()
    }

    /// The wait after a line's `n_failures`-th failure: the delivery schedule's, full jitter.
    pub(super) fn hold_delay(&self, n_failures: u32) -> Duration {
        let mut schedule = self.deps.retry.schedule();
        (1..n_failures.clamp(1, 32)).for_each(|_| {
            schedule.next_delay(None);
        });
        schedule.next_delay(None)
    }

    /// The committed lines this step may send, oldest first (not those awaiting their proof, nor
    /// those posted now or marked ahead). The scan starts past the lines known to await their
    /// proof (`Awaiting::scan_from`), and moves that start up to the first line it finds that does
    /// not await it.
    pub(super) fn due_lines(
        &self,
        now: tokio::time::Instant,
    ) -> Result<Vec<PendingLine>, OutboxError> {
        let holds = lock(&self.holds);
        let ahead = lock(&self.ahead);
        let mut awaiting = lock(&self.awaiting);
        // The first id from `scan_from` on that does not await its proof, and the last before it.
        let first_other = std::cell::Cell::new(None::<u64>);
        let last_awaiting = std::cell::Cell::new(None::<u64>);
        let lines = self.deps.outbox.oldest_where_past(
            awaiting.scan_from,
            self.deps.settings.batch_max_messages,
            SCAN_LIMIT,
            |id| {
                let waits = awaiting.ids.contains_key(&id);
                if first_other.get().is_none() {
                    if waits {
                        last_awaiting.set(Some(id));
                    } else {
                        first_other.set(Some(id));
                    }
                }
                waits || ahead.holds(id)
            },
            |line| holds.may_send(line, now),
        )?;
        if let Some(from) = first_other.get().or(last_awaiting.get().map(|id| id + 1)) {
            awaiting.scan_from = from;
        }
        Ok(lines)
    }

    /// How long until the next held line may be tried.
    pub(super) fn next_due(&self) -> Option<Duration> {
        let now = tokio::time::Instant::now();
        lock(&self.holds)
            .lines
            .values()
            .map(|held| held.not_before.saturating_duration_since(now))
            .min()
    }

    /// Notes CMS ids confirmed for our lines while others are held.
    pub(super) fn claim(&self, row_ids: impl IntoIterator<Item = i64>) {
        let mut holds = lock(&self.holds);
        if !holds.lines.is_empty() {
            holds.claimed.extend(row_ids);
        }
    }

    pub(super) fn forget_holds(&self, ids: &[u64]) {
        let mut holds = lock(&self.holds);
        for id in ids {
            holds.lines.remove(id);
        }
        if holds.lines.is_empty() {
            holds.claimed.clear();
        }
    }

    /// Forgets held lines that left the outbox otherwise (dropped by its bounds).
    pub(super) fn forget_gone_holds(&self) -> Result<(), OutboxError> {
        let held: Vec<u64> = lock(&self.holds).lines.keys().copied().collect();
        let mut gone = Vec::new();
        for id in held {
            if !self.deps.outbox.is_pending(id)? {
                gone.push(id);
            }
        }
        self.forget_holds(&gone);
        Ok(())
    }

    /// Tells `/readyz` and the metrics how many lines wait for their own retry, and why.
    pub(super) fn publish_holds(&self) {
        let holds = lock(&self.holds);
        let n_held = holds.lines.len();
        self.deps
            .stats
            .lines_held_back
            .store(n_held as u64, std::sync::atomic::Ordering::Relaxed);
        let reason = (n_held > 0).then(|| {
            format!(
                "{n_held} lines wait for a retry after the cms failed them while it answered other requests (last error: {}); each is tried up to retry.max_line_failures = {} times, then moved to the dead letters (`outbox dead`)",
                holds.last_error, self.deps.max_line_failures
            )
        });
        self.deps.stats.readiness.delivery_held(reason);
    }
}
