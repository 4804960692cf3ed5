//! The reader's pure parts: where a read starts, and what a read tells of a restored database.

use chrono::NaiveDateTime;

use super::*;

/// A line Dora typed in the CMS, stored with `timestamp` (the reader's and the speaker's tests).
pub(super) fn dora_typed(id: i64, message: &str, timestamp: String) -> CmsChat {
    CmsChat {
        id,
        user_id: 4,
        username: "dora".into(),
        first_name: "Dora".into(),
        last_name: "Admin".into(),
        message: message.into(),
        timestamp,
        from_cms: true,
    }
}

fn row(id: i64, message: &str, second: u32) -> CmsChat {
    dora_typed(id, message, format!("2026-12-07 06:00:{second:02}"))
}

fn dated(row: &CmsChat) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(&row.timestamp, "%Y-%m-%d %H:%M:%S")
        .ok()
        .map(|naive| naive.and_utc())
}

fn seen(rows: &[CmsChat]) -> BTreeMap<i64, SeenRow> {
    rows.iter()
        .map(|row| {
            let seen = SeenRow {
                fingerprint: fingerprint(row),
                at: dated(row),
            };
            (row.id, seen)
        })
        .collect()
}

fn at_cursor(row: &CmsChat) -> CursorRow {
    CursorRow {
        id: row.id,
        row: Some(SeenRow {
            fingerprint: fingerprint(row),
            at: dated(row),
        }),
    }
}

#[test]
fn ids_going_backwards_are_told_from_the_rows_a_read_returns() {
    let before = [row(1, "one", 10), row(2, "two", 11), row(3, "three", 12)];
    let since = dated(&before[0]).expect("dated") - chrono::Duration::seconds(5);
    let late = dated(&before[2]).expect("dated") + chrono::Duration::seconds(1);
    let known = seen(&before);
    let cursor = at_cursor(&before[2]);
    // A read like the last one, or one that does not reach back to the cursor's row.
    assert_eq!(went_back(&before, &known, &cursor, since, dated), None);
    assert_eq!(went_back(&[], &known, &cursor, late, dated), None);
    // Restored after row 1: row 2 is another line now, row 3 is gone.
    let restored = [row(1, "one", 10), row(2, "after the restore", 30)];
    assert_eq!(went_back(&restored, &known, &cursor, since, dated), Some(1));
    // The same after a restart (nothing seen): rows dated by the cursor's row are old.
    let nothing = BTreeMap::new();
    assert_eq!(
        went_back(&restored, &nothing, &cursor, since, dated),
        Some(1)
    );
    // A cursor stored by an older relay, without its row: only reused ids tell.
    let bare = CursorRow { id: 3, row: None };
    assert_eq!(went_back(&restored, &nothing, &bare, since, dated), None);
    assert_eq!(went_back(&restored, &known, &bare, since, dated), Some(1));
}

#[test]
fn a_wide_read_that_fails_waits_longer_each_time_and_reaches_less_far() {
    // Arrange: a CMS that cannot answer a wide read (PHP's memory_limit); narrow reads succeed
    // every 2 s.
    let look_back = chrono::Duration::minutes(10);
    let max_age = chrono::Duration::minutes(5);
    let poll = chrono::Duration::seconds(2);
    let start = Utc::now();
    let mut reader = Reader::new(Vec::new());

    // Act: three minutes of polls.
    let mut wide_reads = Vec::new();
    let mut now = start;
    while now < start + chrono::Duration::minutes(3) {
        let (since, wide) = reader.since(now, look_back, max_age);
        if wide {
            wide_reads.push((now, now - since));
            reader.wide_failed(now, look_back, poll);
        } else {
            reader.last_read = Some(now);
        }
        now += poll;
    }

    // Assert: 90 polls tried the wide read 6 times (not every other poll), the waits doubling,
    // and each reached half as far back as the one before, never under `look_back`'s 1/64.
    assert_eq!(wide_reads.len(), 6, "{wide_reads:?}");
    let gaps: Vec<i64> = wide_reads
        .windows(2)
        .map(|w| (w[1].0 - w[0].0).num_seconds())
        .collect();
    assert_eq!(gaps, [4, 8, 16, 32, 64], "{wide_reads:?}");
    let reaches: Vec<i64> = wide_reads.iter().map(|(_, r)| r.num_seconds()).collect();
    assert_eq!(reaches[0], (look_back + max_age).num_seconds());
    assert!(
        reaches.windows(2).all(|w| w[1] * 2 <= w[0] + 1),
        "each reach about half the one before: {reaches:?}"
    );

    // A wide read that succeeds ends the backoff.
    reader.wide_succeeded(now);
    assert_eq!(reader.wide_failures, 0);
    let (_, wide) = reader.since(now + look_back, look_back, max_age);
    assert!(wide, "a wide read is due again after look_back");
}

#[test]
fn a_narrow_read_follows_rows_dated_behind_by_a_few_seconds_only() {
    let (look_back, max_age) = (chrono::Duration::minutes(2), chrono::Duration::minutes(10));
    let now = Utc::now();
    let read = now - chrono::Duration::seconds(2);
    let mut reader = Reader::new(Vec::new());
    reader.last_wide = Some(now);
    reader.last_read = Some(read);
    // Steady: the newest row a second behind the previous read.
    reader.newest_seen = Some(read - chrono::Duration::seconds(1));
    let (since, wide) = reader.since(now, look_back, max_age);
    assert!(!wide);
    assert_eq!(since, read - chrono::Duration::seconds(1) - NARROW_MARGIN);
    // A backlog drains: the newest row seen (the relay's own) a minute behind.
    reader.newest_seen = Some(read - chrono::Duration::seconds(60));
    assert_eq!(reader.since(now, look_back, max_age).0, read - FOLLOW_MAX);
}

#[test]
fn a_browser_behind_is_followed_as_far_as_its_lines_lagged_for_look_back() {
    let (look_back, max_age) = (chrono::Duration::minutes(2), chrono::Duration::minutes(10));
    let zone = Zone::Named(chrono_tz::UTC);
    let now = Utc::now();
    let mut reader = Reader::new(Vec::new());
    reader.last_wide = Some(now);
    // A line typed in a browser 30 s behind, first seen by a read at `now`.
    let mut typed = row(7, "typed behind", 0);
    typed.timestamp = (now - chrono::Duration::seconds(30))
        .format("%Y-%m-%d %H:%M:%S")
        .to_string();
    reader.note_cms_lag(now, look_back, &[typed.clone()], &[None], zone);
    // Seen again later (known): it counts no more.
    reader.note_cms_lag(now, look_back, &[typed], &[Some(true)], zone);
    reader.last_read = Some(now);
    reader.newest_seen = Some(now - chrono::Duration::seconds(60));
    let since = reader
        .since(now + chrono::Duration::seconds(2), look_back, max_age)
        .0;
    let reach = (now - since).num_seconds();
    assert!((34..=36).contains(&reach), "{reach} s back");
    // After look_back the lag is forgotten.
    let later = now + look_back + chrono::Duration::seconds(1);
    reader.last_read = Some(later);
    reader.last_wide = Some(later);
    reader.newest_seen = Some(later - chrono::Duration::seconds(60));
    assert_eq!(
        reader.since(later, look_back, max_age).0,
        later - FOLLOW_MAX
    );
}
