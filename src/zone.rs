//! The clocks of the two peers: an IANA time zone or the machine's local one.
//!
//! Owns the conversion between the peers' wall-clock times (which carry no offset) and UTC. It knows
//! nothing about either peer's formats.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Local, LocalResult, NaiveDateTime, TimeZone, Utc};
use serde::Deserialize;

/// A peer's clock: `local` (the machine's zone) or an IANA zone name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Zone {
    /// The zone of the machine the relay runs on.
    Local,
    /// A named zone from the embedded tz database (works on hosts without tzdata).
    Named(chrono_tz::Tz),
}

impl Zone {
    /// Every UTC instant the wall-clock time `naive` can denote in this zone: none in a spring-forward
    /// gap, two in an autumn fold.
    pub fn resolve(self, naive: NaiveDateTime) -> Vec<DateTime<Utc>> {
        fn all<T: TimeZone>(result: LocalResult<DateTime<T>>) -> Vec<DateTime<Utc>> {
            match result {
                LocalResult::Single(t) => vec![t.with_timezone(&Utc)],
                LocalResult::Ambiguous(a, b) => vec![a.with_timezone(&Utc), b.with_timezone(&Utc)],
                LocalResult::None => Vec::new(),
            }
        }
        match self {
            Zone::Local => all(Local.from_local_datetime(&naive)),
            Zone::Named(tz) => all(tz.from_local_datetime(&naive)),
        }
    }

    /// The wall-clock time of `instant` in this zone.
    pub fn wall_clock(self, instant: DateTime<Utc>) -> NaiveDateTime {
        match self {
            Zone::Local => instant.with_timezone(&Local).naive_local(),
            Zone::Named(tz) => instant.with_timezone(&tz).naive_local(),
        }
    }
}

impl FromStr for Zone {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("local") {
            return Ok(Zone::Local);
        }
        s.parse::<chrono_tz::Tz>().map(Zone::Named).map_err(|_| {
            format!(
                "unknown time zone {s:?} (an IANA name like \"Europe/Amsterdam\", or \"local\")"
            )
        })
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Zone::Local => f.write_str("local"),
            Zone::Named(tz) => f.write_str(tz.name()),
        }
    }
}

impl<'de> Deserialize<'de> for Zone {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// How long a login's token lives at the CMS (spec §2.2): 30 minutes, a day for user 1 (`OpenSim`).
fn token_lifetime(user_id: Option<i64>) -> chrono::Duration {
    if user_id == Some(1) {
        chrono::Duration::days(1)
    } else {
        chrono::Duration::minutes(30)
    }
}

/// The CMS's UTC offset in seconds, as a login answer shows it: `expires` is `now + lifetime` in
/// the CMS's PHP zone (spec §2.1, §10.2), so `expires - lifetime - answered_at` is its offset,
/// rounded to the quarter hour (offsets are whole quarters; the request took well under 7 min).
/// `None` when `expires` does not parse.
pub fn cms_offset_seen(
    expires: &str,
    answered_at: DateTime<Utc>,
    user_id: Option<i64>,
) -> Option<i64> {
    let expires = NaiveDateTime::parse_from_str(expires.trim(), "%Y-%m-%d %H:%M:%S").ok()?;
    let seconds = (expires - token_lifetime(user_id) - answered_at.naive_utc()).num_seconds();
    Some((seconds as f64 / 900.0).round() as i64 * 900)
}

/// The UTC offset of `zone` at `instant`, in seconds.
pub fn offset_at(zone: Zone, instant: DateTime<Utc>) -> i64 {
    (zone.wall_clock(instant) - instant.naive_utc()).num_seconds()
}

/// What is wrong when `cms.timezone` (`zone`) and the CMS's own clock, as its login answer
/// showed it, disagree at `answered_at`; `None` when they agree or the answer had no time.
pub fn cms_zone_disagreement(
    zone: Zone,
    expires: &str,
    answered_at: DateTime<Utc>,
    user_id: Option<i64>,
) -> Option<String> {
    let seen = cms_offset_seen(expires, answered_at, user_id)?;
    let configured = offset_at(zone, answered_at);
    (seen != configured).then(|| {
        format!(
            "cms.timezone = {zone} is UTC{} now, but the cms's own clock is UTC{} (its login answer's expires, {expires}, is in its PHP zone): rows are dated in the wrong zone",
            utc_offset(configured),
            utc_offset(seen)
        )
    })
}

/// `+01:00`, `-03:30`, `+00:00`.
fn utc_offset(seconds: i64) -> String {
    let sign = if seconds < 0 { '-' } else { '+' };
    let minutes = seconds.abs() / 60;
    format!("{sign}{:02}:{:02}", minutes / 60, minutes % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_zone_resolves_an_autumn_fold_to_two_instants() {
        let zone: Zone = "Europe/Amsterdam".parse().expect("valid zone");
        let naive = NaiveDateTime::parse_from_str("2026-10-25 02:30:00", "%Y-%m-%d %H:%M:%S")
            .expect("valid");
        assert_eq!(zone.resolve(naive).len(), 2);
    }

    #[test]
    fn the_cms_zone_is_read_from_the_login_answer_and_a_disagreement_is_named() {
        let zone: Zone = "Europe/Amsterdam".parse().expect("valid zone");
        // 2026-07-01 10:00:00 UTC is 12:00 in Amsterdam (CEST); the token lives 30 minutes.
        let at = Utc.with_ymd_and_hms(2026, 7, 1, 10, 0, 0).unwrap();
        assert_eq!(
            cms_offset_seen("2026-07-01 12:30:01", at, Some(3)),
            Some(7200)
        );
        assert_eq!(
            cms_zone_disagreement(zone, "2026-07-01 12:30:01", at, Some(3)),
            None
        );
        // User 1's token lives a day.
        assert_eq!(
            cms_zone_disagreement(zone, "2026-07-02 12:00:00", at, Some(1)),
            None
        );
        // A CMS in UTC, configured as Amsterdam.
        let said = cms_zone_disagreement(zone, "2026-07-01 10:30:00", at, Some(3)).expect("named");
        assert!(
            said.contains("UTC+02:00") && said.contains("UTC+00:00"),
            "{said}"
        );
        assert_eq!(cms_offset_seen("soon", at, None), None);
    }

    #[test]
    fn an_unknown_zone_is_refused_with_its_name() {
        let err = "Mars/Olympus".parse::<Zone>().unwrap_err();
        assert!(err.contains("Mars/Olympus"), "{err}");
    }
}
