//! The versioned record: how a pending line and a dead letter are stored (JSON, `v` = 2) under a
//! big-endian id key, and how they are read back. Version 1 (`prepared`, `in_flight` and
//! `sent_after` as loose fields) is read and migrated to the `state` of version 2; every write is
//! version 2. A relay older than version 2 quarantines a version 2 record, so a downgrade needs an
//! empty outbox.
//!
//! Pure: owns the stored format only. Must not touch sled or decide what an undecodable record
//! becomes (the queue quarantines it, the dead letters skip it).

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{CapturedLine, LineSource};
use crate::outbox::{DeadLine, LineState, PendingLine, Prepared};

/// The stored form of a pending line. `v` versions the format; unknown versions are quarantined.
#[derive(Serialize, Deserialize)]
struct Record {
    v: u8,
    /// Absent for an avatar's line (every line written before objects and the relay's own lines
    /// were told apart was stored as an avatar's).
    #[serde(default, skip_serializing_if = "StoredSource::is_avatar")]
    source: StoredSource,
    speaker: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner_id: Option<String>,
    /// The `[[regions]]` name of the region the line was said in. Absent: the only region (every
    /// line written before a relay served several regions, and every line of one that serves one).
    /// An optional field of version 2, not a version of its own: a relay that does not know it
    /// reads the line as its only region's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    region: String,
    message: String,
    spoken_at_ms: i64,
    captured_at_ms: i64,
    attempts: u32,
    /// Version 2: the line's state. Absent: captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state: Option<StoredState>,
    /// Version 1 only.
    #[serde(default, skip_serializing)]
    prepared: Option<Prepared>,
    /// Version 1 only.
    #[serde(default, skip_serializing)]
    in_flight: bool,
    /// Version 1 only.
    #[serde(default, skip_serializing)]
    sent_after: Option<i64>,
    #[serde(default, skip_serializing_if = "is_zero")]
    failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dead_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dead_at_ms: Option<i64>,
}

/// `LineState` as stored (version 2).
#[derive(Serialize, Deserialize)]
#[serde(tag = "at", rename_all = "snake_case")]
enum StoredState {
    Prepared {
        row: Prepared,
    },
    InFlight {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        row: Option<Prepared>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<i64>,
    },
}

/// `LineSource` as stored: a separate type, so the domain enum carries no serde.
#[derive(Serialize, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum StoredSource {
    #[default]
    Avatar,
    Object,
    Relay,
}

impl StoredSource {
    fn is_avatar(&self) -> bool {
        *self == StoredSource::Avatar
    }
}

impl From<LineSource> for StoredSource {
    fn from(source: LineSource) -> StoredSource {
        match source {
            LineSource::Avatar => StoredSource::Avatar,
            LineSource::Object => StoredSource::Object,
            LineSource::Relay => StoredSource::Relay,
        }
    }
}

impl From<StoredSource> for LineSource {
    fn from(source: StoredSource) -> LineSource {
        match source {
            StoredSource::Avatar => LineSource::Avatar,
            StoredSource::Object => LineSource::Object,
            StoredSource::Relay => LineSource::Relay,
        }
    }
}

impl Record {
    fn from_pending(pending: &PendingLine) -> Record {
        let line = &pending.line;
        let state = match &pending.state {
            LineState::Captured => None,
            LineState::Prepared(row) => Some(StoredState::Prepared { row: row.clone() }),
            LineState::InFlight { row, after } => Some(StoredState::InFlight {
                row: row.clone(),
                after: *after,
            }),
        };
        Record {
            v: 2,
            source: line.source.into(),
            speaker: line.speaker.clone(),
            owner_id: line.owner_id.clone(),
            region: line.region.clone(),
            message: line.message.clone(),
            spoken_at_ms: line.spoken_at.timestamp_millis(),
            captured_at_ms: line.captured_at.timestamp_millis(),
            attempts: pending.attempts,
            state,
            prepared: None,
            in_flight: false,
            sent_after: None,
            failures: pending.failures,
            last_error: pending.last_error.clone(),
            dead_reason: None,
            dead_at_ms: None,
        }
    }

    /// The line's state: version 2's `state`, or version 1's loose fields migrated (in flight, with
    /// or without its row and cursor; a decided row not in flight; nothing decided).
    fn state(&mut self) -> Option<LineState> {
        match self.v {
            1 => Some(match (self.in_flight, self.prepared.take()) {
                (true, row) => LineState::InFlight {
                    row,
                    after: self.sent_after,
                },
                (false, Some(row)) => LineState::Prepared(row),
                (false, None) => LineState::Captured,
            }),
            2 => Some(match self.state.take() {
                None => LineState::Captured,
                Some(StoredState::Prepared { row }) => LineState::Prepared(row),
                Some(StoredState::InFlight { row, after }) => LineState::InFlight { row, after },
            }),
            _ => None,
        }
    }

    fn into_pending(mut self, id: u64) -> Option<PendingLine> {
        let state = self.state()?;
        Some(PendingLine {
            id,
            line: CapturedLine {
                source: self.source.into(),
                speaker: self.speaker,
                owner_id: self.owner_id,
                message: self.message,
                spoken_at: Utc.timestamp_millis_opt(self.spoken_at_ms).single()?,
                captured_at: Utc.timestamp_millis_opt(self.captured_at_ms).single()?,
                region: self.region,
            },
            attempts: self.attempts,
            state,
            failures: self.failures,
            last_error: self.last_error,
        })
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serializing strings and integers cannot fail")
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The stored value of a pending line.
pub(super) fn encode_pending(pending: &PendingLine) -> Vec<u8> {
    Record::from_pending(pending).encode()
}

/// The stored value of a dead letter: the pending line, why, and when.
pub(super) fn encode_dead(pending: &PendingLine, reason: &str, dead_at: DateTime<Utc>) -> Vec<u8> {
    let mut record = Record::from_pending(pending);
    record.dead_reason = Some(reason.to_owned());
    record.dead_at_ms = Some(dead_at.timestamp_millis());
    record.encode()
}

/// A pending line from its key and value (`None` when either cannot be read).
pub(super) fn decode_pending(key: &[u8], value: &[u8]) -> Option<PendingLine> {
    let id = <[u8; 8]>::try_from(key).ok()?;
    let record: Record = serde_json::from_slice(value).ok()?;
    record.into_pending(u64::from_be_bytes(id))
}

/// A dead letter from its key and value (`None` when either cannot be read). A missing reason or
/// time reads as empty.
pub(super) fn decode_dead(key: &[u8], value: &[u8]) -> Option<DeadLine> {
    let id = <[u8; 8]>::try_from(key).ok()?;
    let record: Record = serde_json::from_slice(value).ok()?;
    let reason = record.dead_reason.clone().unwrap_or_default();
    let dead_at = record
        .dead_at_ms
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
        .unwrap_or_default();
    let pending = record.into_pending(u64::from_be_bytes(id))?;
    Some(DeadLine {
        pending,
        reason,
        dead_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> Prepared {
        Prepared {
            user_id: 3,
            message: "hi".into(),
            timestamp: "2026-11-22 12:00:00".into(),
        }
    }

    #[test]
    fn a_version_1_record_in_flight_is_migrated_to_its_state() {
        let stored = br#"{"v":1,"speaker":"Alice Resident","message":"hi","spoken_at_ms":1700000000000,"captured_at_ms":1700000001000,"attempts":2,"prepared":{"user_id":3,"message":"hi","timestamp":"2026-11-22 12:00:00"},"in_flight":true,"failures":1,"last_error":"cms error: x","sent_after":41}"#;
        let line = decode_pending(&7u64.to_be_bytes(), stored).expect("decoded");
        assert_eq!(line.id, 7);
        assert_eq!(line.line.speaker, "Alice Resident");
        assert_eq!(line.line.source, LineSource::Avatar);
        assert_eq!(line.line.captured_at.timestamp_millis(), 1_700_000_001_000);
        assert_eq!(
            line.state,
            LineState::InFlight {
                row: Some(row()),
                after: Some(41)
            }
        );
        assert_eq!((line.attempts, line.failures), (2, 1));
        assert_eq!(line.last_error.as_deref(), Some("cms error: x"));
        // Written again, it is version 2 and reads back the same.
        let written = encode_pending(&line);
        assert!(String::from_utf8_lossy(&written).starts_with(r#"{"v":2,"#));
        assert_eq!(
            decode_pending(&7u64.to_be_bytes(), &written),
            Some(line.clone())
        );
    }

    #[test]
    fn version_1_records_of_every_shape_keep_their_meaning() {
        let v1 = |fields: &str| {
            let json = format!(
                r#"{{"v":1,"speaker":"A","message":"hi","spoken_at_ms":0,"captured_at_ms":0,"attempts":0{fields}}}"#
            );
            decode_pending(&1u64.to_be_bytes(), json.as_bytes()).map(|line| line.state)
        };
        assert_eq!(v1(""), Some(LineState::Captured));
        assert_eq!(
            v1(r#","in_flight":true"#),
            Some(LineState::InFlight {
                row: None,
                after: None
            })
        );
        assert_eq!(
            v1(r#","prepared":{"user_id":3,"message":"hi","timestamp":"2026-11-22 12:00:00"}"#),
            Some(LineState::Prepared(row()))
        );
    }

    #[test]
    fn every_state_and_source_reads_back_and_an_unknown_version_does_not() {
        let line = PendingLine::captured(
            7,
            CapturedLine {
                source: LineSource::Object,
                speaker: "Box".into(),
                owner_id: None,
                message: "hi".into(),
                spoken_at: Utc.timestamp_millis_opt(1_700_000_000_000).unwrap(),
                captured_at: Utc.timestamp_millis_opt(1_700_000_001_000).unwrap(),
                region: String::new(),
            },
        );
        for state in [
            LineState::Captured,
            LineState::Prepared(row()),
            LineState::InFlight {
                row: Some(row()),
                after: Some(41),
            },
            LineState::InFlight {
                row: None,
                after: None,
            },
        ] {
            let line = PendingLine {
                state,
                failures: 3,
                last_error: Some("cms sent an unreadable answer (HTTP 200)".into()),
                ..line.clone()
            };
            let stored = encode_pending(&line);
            assert!(String::from_utf8_lossy(&stored).contains(r#""source":"object""#));
            assert_eq!(decode_pending(&7u64.to_be_bytes(), &stored), Some(line));
        }
        let newer = br#"{"v":3,"speaker":"A","message":"hi","spoken_at_ms":0,"captured_at_ms":0,"attempts":0}"#;
        assert_eq!(decode_pending(&7u64.to_be_bytes(), newer), None);
    }

    #[test]
    fn a_line_keeps_its_region_and_a_record_without_one_is_the_only_regions() {
        let stored = br#"{"v":2,"speaker":"Alice Resident","message":"hi","spoken_at_ms":1700000000000,"captured_at_ms":1700000001000,"attempts":0}"#;
        let mut line = decode_pending(&7u64.to_be_bytes(), stored).expect("decoded");
        assert_eq!(line.line.region, "");
        let written = encode_pending(&line);
        assert!(!String::from_utf8_lossy(&written).contains("region"));
        line.line.region = "Sandbox".into();
        let again = decode_pending(&7u64.to_be_bytes(), &encode_pending(&line)).expect("decoded");
        assert_eq!(again.line.region, "Sandbox");
        let v1 = br#"{"v":1,"speaker":"Alice Resident","message":"hi","spoken_at_ms":1700000000000,"captured_at_ms":1700000001000,"attempts":0}"#;
        let old = decode_pending(&8u64.to_be_bytes(), v1).expect("decoded");
        assert_eq!(old.line.region, "");
    }
}
