//! The versioned record: how a pending line and a dead letter are stored (JSON, `v` = 1) under a
//! big-endian id key, and how they are read back.
//!
//! Pure: owns the stored format only. Must not touch sled or decide what an undecodable record
//! becomes (the queue quarantines it, the dead letters skip it).

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{CapturedLine, LineSource};
use crate::outbox::{DeadLine, PendingLine, Prepared};

/// The stored form of a pending line. `v` versions the format; unknown versions are quarantined.
#[derive(Serialize, Deserialize)]
struct RecordV1 {
    v: u8,
    /// Absent for an avatar's line (every line written before objects and the relay's own lines
    /// were told apart was stored as an avatar's).
    #[serde(default, skip_serializing_if = "StoredSource::is_avatar")]
    source: StoredSource,
    speaker: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner_id: Option<String>,
    message: String,
    spoken_at_ms: i64,
    captured_at_ms: i64,
    attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prepared: Option<Prepared>,
    #[serde(default)]
    in_flight: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sent_after: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dead_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dead_at_ms: Option<i64>,
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

impl RecordV1 {
    fn from_pending(pending: &PendingLine) -> RecordV1 {
        let line = &pending.line;
        RecordV1 {
            v: 1,
            source: line.source.into(),
            speaker: line.speaker.clone(),
            owner_id: line.owner_id.clone(),
            message: line.message.clone(),
            spoken_at_ms: line.spoken_at.timestamp_millis(),
            captured_at_ms: line.captured_at.timestamp_millis(),
            attempts: pending.attempts,
            prepared: pending.prepared.clone(),
            in_flight: pending.in_flight,
            failures: pending.failures,
            last_error: pending.last_error.clone(),
            sent_after: pending.sent_after,
            dead_reason: None,
            dead_at_ms: None,
        }
    }

    fn into_pending(self, id: u64) -> Option<PendingLine> {
        if self.v != 1 {
            return None;
        }
        Some(PendingLine {
            id,
            line: CapturedLine {
                source: self.source.into(),
                speaker: self.speaker,
                owner_id: self.owner_id,
                message: self.message,
                spoken_at: Utc.timestamp_millis_opt(self.spoken_at_ms).single()?,
                captured_at: Utc.timestamp_millis_opt(self.captured_at_ms).single()?,
            },
            attempts: self.attempts,
            prepared: self.prepared,
            in_flight: self.in_flight,
            failures: self.failures,
            last_error: self.last_error,
            sent_after: self.sent_after,
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
    RecordV1::from_pending(pending).encode()
}

/// The stored value of a dead letter: the pending line, why, and when.
pub(super) fn encode_dead(pending: &PendingLine, reason: &str, dead_at: DateTime<Utc>) -> Vec<u8> {
    let mut record = RecordV1::from_pending(pending);
    record.dead_reason = Some(reason.to_owned());
    record.dead_at_ms = Some(dead_at.timestamp_millis());
    record.encode()
}

/// A pending line from its key and value (`None` when either cannot be read).
pub(super) fn decode_pending(key: &[u8], value: &[u8]) -> Option<PendingLine> {
    let id = <[u8; 8]>::try_from(key).ok()?;
    let record: RecordV1 = serde_json::from_slice(value).ok()?;
    record.into_pending(u64::from_be_bytes(id))
}

/// A dead letter from its key and value (`None` when either cannot be read). A missing reason or
/// time reads as empty.
pub(super) fn decode_dead(key: &[u8], value: &[u8]) -> Option<DeadLine> {
    let id = <[u8; 8]>::try_from(key).ok()?;
    let record: RecordV1 = serde_json::from_slice(value).ok()?;
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

    #[test]
    fn a_record_written_by_an_earlier_relay_reads_back_and_an_unknown_version_does_not() {
        let stored = br#"{"v":1,"speaker":"Alice Resident","message":"hi","spoken_at_ms":1700000000000,"captured_at_ms":1700000001000,"attempts":2,"in_flight":true}"#;
        let line = decode_pending(&7u64.to_be_bytes(), stored).expect("decoded");
        assert_eq!(line.id, 7);
        assert_eq!(line.line.speaker, "Alice Resident");
        assert_eq!(line.line.source, LineSource::Avatar);
        assert_eq!(line.line.message, "hi");
        assert_eq!(line.line.captured_at.timestamp_millis(), 1_700_000_001_000);
        assert_eq!((line.attempts, line.in_flight), (2, true));
        assert_eq!(
            (line.failures, &line.last_error, line.sent_after),
            (0, &None, None)
        );
        assert_eq!(
            decode_pending(&7u64.to_be_bytes(), &encode_pending(&line)),
            Some(line.clone())
        );

        let failing = PendingLine {
            failures: 3,
            last_error: Some("cms sent an unreadable answer (HTTP 200)".into()),
            sent_after: Some(41),
            ..line.clone()
        };
        assert_eq!(
            decode_pending(&7u64.to_be_bytes(), &encode_pending(&failing)),
            Some(failing)
        );

        let object = PendingLine {
            line: CapturedLine {
                source: LineSource::Object,
                ..line.line.clone()
            },
            ..line.clone()
        };
        let stored_object = encode_pending(&object);
        assert!(String::from_utf8_lossy(&stored_object).contains(r#""source":"object""#));
        assert_eq!(
            decode_pending(&7u64.to_be_bytes(), &stored_object),
            Some(object)
        );

        let newer = br#"{"v":2,"speaker":"A","message":"hi","spoken_at_ms":0,"captured_at_ms":0,"attempts":0}"#;
        assert_eq!(decode_pending(&7u64.to_be_bytes(), newer), None);
    }
}
