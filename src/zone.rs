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
    fn an_unknown_zone_is_refused_with_its_name() {
        let err = "Mars/Olympus".parse::<Zone>().unwrap_err();
        assert!(err.contains("Mars/Olympus"), "{err}");
    }
}
