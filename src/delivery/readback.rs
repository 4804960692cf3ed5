//! The read-back: reading the CMS's rows over the window of lines whose outcome is unknown, and
//! matching them to those lines.
//!
//! Must not: take a row for a line's unless it is a relay row above the id confirmed when the line
//! went out, not claimed by another line, with the line's exact user, text and timestamp.

use std::collections::{HashMap, HashSet};

use chrono::NaiveDateTime;

use crate::cms::CmsChat;
use crate::delivery::holds::Attempt;
use crate::delivery::{
    ChatApi, Delivery, DeliveryError, READ_BACK_MARGIN_SECS, Tally, answered_with_error, lock,
};
use crate::outbox::{Cursor, PendingLine};
use crate::pacing::Answer;
use crate::zone::Zone;

/// The format of a row's timestamp (spec §3.3).
pub(super) const ROW_TIME: &str = "%Y-%m-%d %H:%M:%S";

/// Why a read-back is made: the lines it finds count as delivered after a `success: true` that
/// proves nothing of a batch's middle rows, as reconciled after an answer that was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settle {
    AfterSuccess,
    Unknown,
}

impl<C: ChatApi> Delivery<C> {
    /// Reads back the CMS over the window of `uncertain` lines; confirms those found and returns the
    /// rest with their in-flight mark cleared, but for lines that failed `retry.max_line_failures`
    /// times, which go to the dead letters. A read-back that fails is handled by `failed`.
    pub(super) async fn reconcile(
        &self,
        uncertain: Vec<PendingLine>,
        settle: Settle,
        tally: &mut Tally,
    ) -> Result<Vec<PendingLine>, DeliveryError> {
        let uncertain = read_once_more(uncertain);
        let since = read_back_start(
            &uncertain,
            self.deps.settings.timezone,
            self.deps.cms.offset_seen(),
        );
        let started = self.pacer.wait().await;
        let read = self.deps.cms.read_since(since).await;
        self.paced(started, &read, Answer::Read);
        let rows = match read {
            Ok(rows) => {
                lock(&self.awaiting).last_read_rows = rows.len().saturating_sub(uncertain.len());
                rows
            }
            Err(err) if answered_with_error(&err) => {
                self.failed(&uncertain, err, Attempt::ReadBack, tally)
                    .await?;
                return Ok(Vec::new());
            }
            Err(err) => return Err(err.into()),
        };
        self.settle_rows(uncertain, &rows, settle, tally).await
    }

    /// Settles `uncertain` (their read counted as an attempt) from `rows`, a read that reached back
    /// over their window and was sent after their POSTs were answered: confirms those found and
    /// returns the rest as `reconcile` does.
    pub(super) async fn settle_rows(
        &self,
        uncertain: Vec<PendingLine>,
        rows: &[CmsChat],
        settle: Settle,
        tally: &mut Tally,
    ) -> Result<Vec<PendingLine>, DeliveryError> {
        let cursor = self
            .deps
            .outbox
            .cursor(Cursor::LastConfirmedId)?
            .unwrap_or(0);
        // A line's row, if stored, is above the id confirmed when it went out, whatever was
        // confirmed since; below the cursor only if the cursor started again (`send`).
        let after = |line: &PendingLine| line.sent_after().map_or(cursor, |sent| sent.min(cursor));
        // A line awaiting its proof (`settle`) was answered with its batch's last id: its row is
        // not above it, whatever rows of the same words came later.
        let upto = lock(&self.awaiting).ids.clone();
        let window = |line: &PendingLine| {
            let last = upto.get(&line.id).map_or(i64::MAX, |posted| posted.last_id);
            (after(line), last)
        };
        let claimed = lock(&self.holds).claimed.clone();
        let (found, unsent) = match_rows(
            &uncertain,
            rows,
            window,
            &claimed,
            self.deps.settings.anonymous_user_id,
        );
        if !found.is_empty() {
            let ids: Vec<u64> = found.iter().map(|(id, _)| *id).collect();
            self.confirm(&ids, None).await?;
            self.claim(found.iter().map(|(_, row_id)| *row_id));
            let found_lines = uncertain.iter().filter(|line| ids.contains(&line.id));
            match settle {
                Settle::AfterSuccess => {
                    self.deps.count_delivered(found_lines, false);
                    tally.n_delivered += found.len();
                }
                Settle::Unknown => {
                    self.deps.count_delivered(found_lines, true);
                    tally.n_reconciled += found.len();
                }
            }
            let found_ids: HashSet<u64> = ids.iter().copied().collect();
            uncertain
                .iter()
                .filter(|l| found_ids.contains(&l.id))
                .for_each(|l| self.deps.stats.confirmed(l.line.captured_at));
        }
        let (exhausted, unsent): (Vec<PendingLine>, Vec<PendingLine>) = unsent
            .into_iter()
            .map(PendingLine::not_stored)
            .partition(|l| l.failures >= self.deps.max_line_failures);
        for line in &exhausted {
            let reason = format!(
                "the cms failed this line {} times (last: {}); a read-back found it not stored: fix the cause, then `outbox requeue`",
                line.failures,
                line.last_error.as_deref().unwrap_or("unknown")
            );
            self.dead_letter(line, &reason, tally).await?;
        }
        let unsent = if unsent.is_empty() {
            unsent
        } else {
            self.deps.outbox.mark_not_stored(&unsent).await?
        };
        tracing::info!(
            n_found = found.len(),
            n_resend = unsent.len(),
            n_dead = exhausted.len(),
            n_messages = uncertain.len(),
            outbox_depth = self.deps.outbox.len(),
            "read back lines of unknown outcome"
        );
        Ok(unsent)
    }
}

/// `lines` with their read counted: a read-back is an attempt of each line, stored with the write
/// that follows an answer (an outage adds no write: a disk the outbox filled has little room to
/// spare).
pub(super) fn read_once_more(lines: Vec<PendingLine>) -> Vec<PendingLine> {
    lines
        .into_iter()
        .map(|l| PendingLine {
            attempts: l.attempts.saturating_add(1),
            ..l
        })
        .collect()
}

/// Whether a read from `since` holds every row a read-back from `start` would: it starts no later,
/// as an instant and as the wall-clock string the CMS compares in `zone` (across an autumn fold a
/// later instant can carry an earlier string). Under a fixed offset (the CMS's own, `offset_seen`)
/// the instants decide alone.
pub(super) fn reaches_back_to(since: i64, start: i64, zone: Zone) -> bool {
    let (Some(since_at), Some(start_at)) = (
        chrono::DateTime::from_timestamp(since, 0),
        chrono::DateTime::from_timestamp(start, 0),
    ) else {
        return false;
    };
    since <= start && zone.wall_clock(since_at) <= zone.wall_clock(start_at)
}

/// The `<unix>` of a read-back's `GET /chats/<unix>/`. The CMS turns it into
/// `date('Y-m-d H:i:s', unix)` in its own zone and compares that string with the stored ones
/// (spec §3.2, §10.2), so the start is taken from the strings the lines were stored with: the
/// earliest of them minus `READ_BACK_MARGIN_SECS`, as the first instant whose wall-clock time in
/// `zone` (`cms.timezone`) is that string. An instant would not do: across the autumn fold a line
/// said later can carry an earlier string (02:00:01 after 02:59:58), and a window started from the
/// earliest instant hides it. In a spring gap the string names no instant: the start moves back a
/// minute at a time to one that exists (at most the gap, an hour). A line with no row yet (or one
/// that does not parse) falls back to its spoken time. When the CMS's own offset is known
/// (`offset_seen`, from its login answer) and puts the string earlier, the read starts there: a
/// `cms.timezone` that disagrees with the CMS (warned at start and by `check`) hides no row either.
pub(super) fn read_back_start(lines: &[PendingLine], zone: Zone, offset_seen: Option<i64>) -> i64 {
    let margin = chrono::Duration::seconds(READ_BACK_MARGIN_SECS);
    let stored = lines.iter().map(|line| {
        line.row()
            .and_then(|p| NaiveDateTime::parse_from_str(&p.timestamp, ROW_TIME).ok())
            .unwrap_or_else(|| zone.wall_clock(line.line.spoken_at))
    });
    let Some(earliest) = stored.min() else {
        return 0;
    };
    let by_cms_clock = offset_seen.map(|offset| (earliest - margin).and_utc().timestamp() - offset);
    let by_zone = start_in_zone(earliest - margin, zone);
    match by_cms_clock {
        Some(by_cms_clock) => by_zone.min(by_cms_clock),
        None => by_zone,
    }
}

/// The first instant whose wall-clock time in `zone` is `start`, or the last before a gap.
fn start_in_zone(start: NaiveDateTime, zone: Zone) -> i64 {
    let mut start = start;
    // A spring gap is an hour (half an hour in a few zones); three hours bound the walk.
    for _ in 0..180 {
        if let Some(first) = zone.resolve(start).into_iter().min() {
            return first.timestamp();
        }
        start -= chrono::Duration::minutes(1);
    }
    // No zone has a gap this long; read from the string taken as UTC, 14 h early (the widest
    // offset), rather than miss a row.
    start.and_utc().timestamp() - 14 * 3600
}

/// Splits `uncertain` into the (line id, row id) pairs found among `rows` (relay rows inside the
/// line's `window`, above the id confirmed when it went out and at most the last id of its batch's
/// answer when known, not `claimed` by another line, each row matching at most one line) and the
/// lines not found. The rows are indexed by text and timestamp, so a shared read of thousands of
/// lines against thousands of rows costs their sum, not their product.
pub(super) fn match_rows(
    uncertain: &[PendingLine],
    rows: &[CmsChat],
    window: impl Fn(&PendingLine) -> (i64, i64),
    claimed: &HashSet<i64>,
    anonymous_user_id: i64,
) -> (Vec<(u64, i64)>, Vec<PendingLine>) {
    let mut by_text: HashMap<(&str, &str), Vec<&CmsChat>> = HashMap::new();
    for row in rows.iter().filter(|row| !row.from_cms) {
        by_text
            .entry((row.message.as_str(), row.timestamp.as_str()))
            .or_default()
            .push(row);
    }
    // The lowest id first: of a speaker's same words in the same second, the oldest line takes
    // the oldest row.
    by_text
        .values_mut()
        .for_each(|rows| rows.sort_by_key(|row| row.id));
    let mut used = claimed.clone();
    let mut found = Vec::new();
    let mut unsent = Vec::new();
    for line in uncertain {
        let Some(prepared) = line.row() else {
            unsent.push(line.clone());
            continue;
        };
        let (after, upto) = window(line);
        let candidates = by_text.get(&(prepared.message.as_str(), prepared.timestamp.as_str()));
        let hit = candidates.into_iter().flatten().find(|row| {
            row.id > after
                && row.id <= upto
                && !used.contains(&row.id)
                && (row.user_id == prepared.user_id
                    || (prepared.user_id == anonymous_user_id && row.user_id == -1))
        });
        match hit {
            Some(row) => {
                used.insert(row.id);
                found.push((line.id, row.id));
            }
            None => unsent.push(line.clone()),
        }
    }
    (found, unsent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CapturedLine;
    use crate::outbox::{LineState, Prepared};
    use chrono::Utc;

    fn pending(id: u64, user_id: i64, message: &str, timestamp: &str) -> PendingLine {
        let now = Utc::now();
        PendingLine {
            id,
            line: CapturedLine {
                source: crate::model::LineSource::Avatar,
                speaker: "S".into(),
                owner_id: None,
                message: message.into(),
                spoken_at: now,
                captured_at: now,
                region: String::new(),
            },
            attempts: 0,
            state: LineState::InFlight {
                row: Some(Prepared {
                    user_id,
                    message: message.into(),
                    timestamp: timestamp.into(),
                }),
                after: None,
            },
            failures: 0,
            last_error: None,
        }
    }

    fn row(id: i64, user_id: i64, message: &str, timestamp: &str) -> CmsChat {
        crate::delivery::scripted::row(id, user_id, message, timestamp, false)
    }

    #[test]
    fn a_read_back_starts_at_the_earliest_stored_string_whatever_the_instants() {
        let zone = Zone::Named(chrono_tz::Europe::Amsterdam);
        let at = |t: &str| pending(1, 3, "hi", t);
        let date = |unix: i64| {
            zone.wall_clock(chrono::DateTime::from_timestamp(unix, 0).unwrap())
                .format(ROW_TIME)
                .to_string()
        };
        // The autumn fold: the earlier string wins though it was said later.
        let fold = [at("2026-10-25 02:59:58"), at("2026-10-25 02:00:01")];
        assert_eq!(
            date(read_back_start(&fold, zone, None)),
            "2026-10-25 02:00:00"
        );
        // The spring gap: 03:00:00 - 1 s (02:59:59) names no instant; the start moves back to one
        // that exists.
        let gap = [at("2026-03-29 03:00:00")];
        assert!(date(read_back_start(&gap, zone, None)).as_str() <= "2026-03-29 02:59:59");
    }

    #[test]
    fn a_read_back_matches_each_row_once_and_ignores_old_rows() {
        let t = "2026-11-22 12:00:00";
        let uncertain = [
            pending(1, 3, "hi", t),
            pending(2, 3, "hi", t),
            pending(3, -1, "[C] yo", t),
        ];
        // Row 5 is from before the last confirmed id; row 7 matches one of the two "hi" lines.
        let rows = [
            row(5, 3, "hi", t),
            row(7, 3, "hi", t),
            row(8, -1, "[C] yo", t),
        ];
        let (found, unsent) = match_rows(&uncertain, &rows, |_| (6, i64::MAX), &HashSet::new(), -1);
        assert_eq!(found, [(1, 7), (3, 8)]);
        assert_eq!(unsent.iter().map(|l| l.id).collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn a_read_back_uses_each_lines_own_cursor_and_skips_rows_claimed_by_other_lines() {
        let t = "2026-11-22 12:00:00";
        // Line 1 went out when the cursor was 4; lines confirmed since raised it to 9, and row 9
        // is the same words by the same speaker, confirmed for another line.
        let mut held = pending(1, 3, "lol", t);
        held.state = LineState::InFlight {
            row: held.row().cloned(),
            after: Some(4),
        };
        let rows = [row(5, 3, "lol", t), row(9, 3, "lol", t)];

        let (found, _) = match_rows(
            std::slice::from_ref(&held),
            &rows,
            |line| (line.sent_after().unwrap_or(9), i64::MAX),
            &HashSet::from([9]),
            -1,
        );

        assert_eq!(found, [(1, 5)]);
    }
}
