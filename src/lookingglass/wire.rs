//! The viewer's JSON, quirk by quirk: a map of maps in document order with opaque keys, every value a
//! string, `From` sometimes missing, and a `Time` on a 12-hour clock without AM/PM.
//!
//! Parsing never fails because of one bad entry: such an entry is reported back with its reason so the
//! caller can log it. Only a body that is not a JSON object at all is an error.

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, Utc};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::model::{ChatType, EntryType, ViewerLine};
use crate::zone::Zone;

/// How far before the poll a rebuilt time may lie before it is judged nonsense (another calendar, a
/// broken clock) and the receive time is used instead.
const MAX_LINE_AGE: Duration = Duration::days(30);

/// How far after the poll a rebuilt time may lie: the viewer and the relay share a host, but their
/// clocks are read at different moments.
const CLOCK_SLACK: Duration = Duration::seconds(2);

/// A chat GET body that is not a JSON object.
#[derive(Debug, thiserror::Error)]
#[error("viewer chat response is not a JSON object: {0}")]
pub struct ChatParseError(#[from] serde_json::Error);

/// One entry of a chat GET response that could not be used, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct SkippedEntry {
    /// The entry's key in the response.
    pub key: String,
    /// What was wrong with it.
    pub reason: String,
}

/// The result of parsing one chat GET response.
#[derive(Debug, Default)]
pub struct ParsedChat {
    /// The usable lines, in document (= arrival) order.
    pub lines: Vec<ViewerLine>,
    /// Entries that could not be used.
    pub skipped: Vec<SkippedEntry>,
    /// Lines whose `Time` could not be rebuilt (their receive time is used).
    pub n_untimed: usize,
}

/// What `for_each_line` saw besides the lines it handed on.
#[derive(Debug, Default)]
pub struct ChatTally {
    /// Lines handed on.
    pub n_lines: usize,
    /// Entries that could not be used.
    pub skipped: Vec<SkippedEntry>,
    /// Lines whose `Time` could not be rebuilt (their receive time is used).
    pub n_untimed: usize,
}

#[derive(Deserialize)]
struct LgChatEntry {
    #[serde(rename = "Time", default)]
    time: Option<String>,
    #[serde(rename = "From", default)]
    from: Option<String>,
    #[serde(rename = "Message")]
    message: String,
    #[serde(rename = "Type", default)]
    kind: Option<String>,
    #[serde(rename = "EntryType", default)]
    entry_type: Option<String>,
    #[serde(rename = "OwnerID", default)]
    owner_id: Option<String>,
}

/// Parses a chat GET body received at `polled_at` from a viewer whose clock is in `zone`, all of it.
pub fn parse_chat(
    body: &[u8],
    polled_at: DateTime<Utc>,
    zone: Zone,
) -> Result<ParsedChat, ChatParseError> {
    let mut lines = Vec::new();
    let tally = for_each_line(body, polled_at, zone, |line| lines.push(line))?;
    Ok(ParsedChat {
        lines,
        skipped: tally.skipped,
        n_untimed: tally.n_untimed,
    })
}

/// Parses a chat GET body and hands each usable line to `on_line` as soon as it is read, in document
/// order (the only reliable order, spec §2.3). The map is read entry by entry, never as a tree of the
/// whole body, so a caller that stores each line as it comes holds a response of tens of megabytes
/// about once: the body itself.
///
/// The same body, `polled_at` and `zone` always give the same lines. On an error (the body is not a
/// JSON object, or stops being one part way) the lines before it have been handed on.
pub fn for_each_line(
    body: &[u8],
    polled_at: DateTime<Utc>,
    zone: Zone,
    on_line: impl FnMut(ViewerLine),
) -> Result<ChatTally, ChatParseError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let tally = deserializer.deserialize_map(ChatVisitor {
        polled_at,
        zone,
        on_line,
    })?;
    deserializer.end()?;
    Ok(tally)
}

struct ChatVisitor<F> {
    polled_at: DateTime<Utc>,
    zone: Zone,
    on_line: F,
}

impl<'de, F: FnMut(ViewerLine)> serde::de::Visitor<'de> for ChatVisitor<F> {
    type Value = ChatTally;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object of chat entries")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        mut self,
        mut map: A,
    ) -> Result<ChatTally, A::Error> {
        let mut tally = ChatTally::default();
        while let Some(key) = map.next_key::<String>()? {
            // One entry at a time as a small tree, so a bad entry is skipped, not fatal.
            let value: Value = map.next_value()?;
            let entry = match LgChatEntry::deserialize(value) {
                Ok(entry) => entry,
                Err(err) => {
                    tally.skipped.push(SkippedEntry {
                        key,
                        reason: err.to_string(),
                    });
                    continue;
                }
            };
            let spoken_at = match entry
                .time
                .as_deref()
                .and_then(|t| rebuild_time(t, self.polled_at, self.zone))
            {
                Some(t) => t,
                None => {
                    tally.n_untimed += 1;
                    self.polled_at
                }
            };
            tally.n_lines += 1;
            (self.on_line)(ViewerLine {
                from: entry.from.filter(|f| !f.is_empty()),
                message: entry.message,
                chat_type: ChatType::from_viewer(entry.kind.as_deref().unwrap_or("Normal")),
                entry_type: EntryType::from_viewer(
                    entry.entry_type.as_deref().unwrap_or("ChatTypeNormal"),
                ),
                owner_id: entry.owner_id.filter(|o| !o.is_empty()),
                spoken_at,
            });
        }
        Ok(tally)
    }
}

/// Rebuilds the instant of a viewer `Time` (`yyyyMMddhhmmssfff`, 12-hour `hh`, viewer-local): of the
/// two hours it can mean, the candidate not after the poll that is closest to it. `None` when the text
/// cannot be read or gives nothing plausible (another calendar, a clock far off).
pub fn rebuild_time(time: &str, polled_at: DateTime<Utc>, zone: Zone) -> Option<DateTime<Utc>> {
    if time.len() != 17 || !time.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let field = |range: std::ops::Range<usize>| time[range].parse::<u32>().ok();
    let date = NaiveDate::from_ymd_opt(field(0..4)? as i32, field(4..6)?, field(6..8)?)?;
    let hour12 = field(8..10)?;
    if !(1..=12).contains(&hour12) {
        return None;
    }
    let (minute, second, milli) = (field(10..12)?, field(12..14)?, field(14..17)?);
    let latest = polled_at + CLOCK_SLACK;
    [hour12 % 12, hour12 % 12 + 12]
        .into_iter()
        .filter_map(|hour| NaiveTime::from_hms_milli_opt(hour, minute, second, milli))
        .flat_map(|t| zone.resolve(date.and_time(t)))
        .filter(|candidate| *candidate <= latest && polled_at - *candidate <= MAX_LINE_AGE)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn amsterdam() -> Zone {
        "Europe/Amsterdam".parse().expect("zone")
    }

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
            .single()
            .expect("valid")
    }

    #[test]
    fn an_afternoon_time_is_read_as_pm_when_polled_in_the_afternoon() {
        // 13:05:07.123 in Amsterdam (UTC+1 in November) is written 01:05:07.123.
        let polled = utc(2026, 11, 22, 12, 5, 8);
        let t = rebuild_time("20261122010507123", polled, amsterdam()).expect("rebuilt");
        assert_eq!(t, utc(2026, 11, 22, 12, 5, 7) + Duration::milliseconds(123));
    }

    #[test]
    fn a_morning_time_stays_am() {
        let polled = utc(2026, 11, 22, 0, 5, 8); // 01:05:08 local
        let t = rebuild_time("20261122010507000", polled, amsterdam()).expect("rebuilt");
        assert_eq!(t, utc(2026, 11, 22, 0, 5, 7));
    }

    #[test]
    fn hour_twelve_means_noon_or_midnight() {
        // 00:30 local is written 12:30; polled at 00:31 local it must be midnight, not noon.
        let polled = utc(2026, 11, 21, 23, 31, 0);
        let t = rebuild_time("20261122123000000", polled, amsterdam()).expect("rebuilt");
        assert_eq!(t, utc(2026, 11, 21, 23, 30, 0));
        // 12:30 local polled at 12:31 local is noon.
        let polled = utc(2026, 11, 22, 11, 31, 0);
        let t = rebuild_time("20261122123000000", polled, amsterdam()).expect("rebuilt");
        assert_eq!(t, utc(2026, 11, 22, 11, 30, 0));
    }

    #[test]
    fn a_line_from_before_midnight_keeps_its_date() {
        // Queued 23:59:59.900 local on the 21st, polled at 00:00:01 local on the 22nd.
        let polled = utc(2026, 11, 21, 23, 0, 1);
        let t = rebuild_time("20261121115959900", polled, amsterdam()).expect("rebuilt");
        assert_eq!(
            t,
            utc(2026, 11, 21, 22, 59, 59) + Duration::milliseconds(900)
        );
    }

    #[test]
    fn another_calendar_falls_back_to_nothing() {
        let polled = utc(2026, 11, 22, 12, 0, 0);
        assert_eq!(rebuild_time("25691122120000000", polled, amsterdam()), None); // Thai year
        assert_eq!(rebuild_time("garbage", polled, amsterdam()), None);
        assert_eq!(rebuild_time("20261122130000000", polled, amsterdam()), None); // hh is never 13
    }

    #[test]
    fn entries_keep_document_order_and_tolerate_missing_fields() {
        let body = br#"{"20261122014005043":{"Time":"20261122014005043","From":"Alice Resident","Message":"one","Type":"Normal","EntryType":"ChatTypeNormal","Position":"<1, 2, 3>","OwnerID":"11111111-2222-3333-4444-555555555555"},
            "202611220140050431":{"Time":"20261122014005043","Message":"no name","Type":"Weird","EntryType":"ChatTypeObjectChat"},
            "0":{"Time":"x","From":"Bob","Message":"bad time","Type":"Whisper","EntryType":"ChatTypeNormal"},
            "1":{"From":"Nobody"},
            "2":{"Time":"20261122014005043","From":"Z","Message":"caf\u00E9 \uD83D\uDE00","Type":"Shout","EntryType":"ChatTypeLindenChat"}}"#;
        let parsed = parse_chat(body, utc(2026, 11, 22, 0, 41, 0), amsterdam()).expect("parsed");
        let messages: Vec<_> = parsed.lines.iter().map(|l| l.message.as_str()).collect();
        assert_eq!(messages, ["one", "no name", "bad time", "café 😀"]);
        assert_eq!(parsed.lines[1].from, None);
        assert_eq!(parsed.lines[1].chat_type, ChatType::Normal);
        assert_eq!(parsed.lines[1].entry_type, EntryType::ObjectChat);
        assert_eq!(parsed.n_untimed, 1);
        assert_eq!(parsed.skipped.len(), 1);
        assert_eq!(parsed.skipped[0].key, "1");
    }

    #[test]
    fn a_body_that_breaks_off_hands_on_the_lines_before_the_break() {
        let body =
            br#"{"a":{"From":"A B","Message":"one"},"b":{"From":"A B","Message":"two"},"c":{"Fr"#;
        let mut messages = Vec::new();
        let result = for_each_line(body, Utc::now(), Zone::Local, |line| {
            messages.push(line.message)
        });
        assert!(result.is_err());
        assert_eq!(messages, ["one", "two"]);
    }

    #[test]
    fn a_body_that_is_not_an_object_is_an_error() {
        assert!(parse_chat(b"<html>", Utc::now(), Zone::Local).is_err());
        assert!(parse_chat(b"[]", Utc::now(), Zone::Local).is_err());
        assert!(
            parse_chat(b"{}", Utc::now(), Zone::Local)
                .expect("empty")
                .lines
                .is_empty()
        );
    }
}
