//! The CMS's JSON and the text rules of its stock database.
//!
//! Requests carry exactly the keys the CMS inserts (an extra key is a PHP fatal error after the earlier
//! rows were stored). Responses are read leniently (`cms::lenient`): PHP warnings may come before the
//! JSON (`json_start` finds it, within a bounded number of scans), errors arrive with HTTP 200 and
//! `success: false`, and ids may be strings or numbers.
//!
//! Memory follows what is kept: the answers that can be large (a chat GET, tens of megabytes on a
//! busy grid; a POST reply a peer can make as large) are read straight into typed rows, only the
//! fields used, each lenient; no `serde_json::Value` tree is made of them.
//! The small answers (login, avatar, grid, the account) are read as a `Value`, up to
//! `MAX_VALUE_BYTES`.

use std::fmt;

use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::cms::lenient::json_start;
use crate::cms::lenient::{Flag, FromMap, Int, Object, Text, from_map, give};

/// The five validation errors of `ChatController::validateParametersCreate` (spec §3.3): when one
/// comes back, nothing of the batch was stored.
const VALIDATION_ERRORS: [&str; 5] = [
    "Expected 3 parameters",
    "Missing parameter (integer) \"userId\"",
    "Missing parameter (string) \"message\"",
    "Missing parameter (string) \"timestamp\"",
    "Invalid parameter (integer) \"fromCMS\"",
];

/// The error string of every permission failure, whatever the HTTP status (spec §1.6).
pub const UNAUTHORIZED: &str = "Unauthorized to access this API URL";

/// One element of a chat POST: exactly the four keys the `chats` table takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatItem {
    /// The CMS user id, or the anonymous id.
    #[serde(rename = "userId")]
    pub user_id: i64,
    /// The text, already made safe by `sanitize_message`.
    pub message: String,
    /// `YYYY-MM-DD HH:MM:SS` in the CMS's zone: the string form stores the message as sent.
    pub timestamp: String,
    /// Always 0: an omitted `fromCMS` is stored as 1 and would be read back as a CMS line.
    #[serde(rename = "fromCMS")]
    pub from_cms: u8,
}

/// A chat row as `GET /grid/<g>/chats/<unix>/` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmsChat {
    /// `chats.id`
    pub id: i64,
    /// `user.id`; -1 for anonymous.
    pub user_id: i64,
    /// `user.username`
    pub username: String,
    /// `user.firstName`
    pub first_name: String,
    /// `user.lastName`
    pub last_name: String,
    /// The stored text.
    pub message: String,
    /// Wall-clock `YYYY-MM-DD HH:MM:SS` in the CMS's zone.
    pub timestamp: String,
    /// Typed in the CMS (1) or relayed from the grid (0).
    pub from_cms: bool,
}

/// Makes text survive the stock database unchanged in meaning, and sends it as the CMS will store
/// it (a read-back compares the stored text with what was sent): characters outside the Basic
/// Multilingual Plane (emoji) fail the insert under utf8mb3, silently inside a batch, so they become
/// U+FFFD; a `<` that PHP's `strip_tags` would take as the start of a tag (`I <3 you` → `I `) becomes
/// the full-width `＜`, which reads the same and is kept; a U+0000, which `strip_tags` drops
/// wherever it is, is dropped here.
pub fn sanitize_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\0' => {}
            '<' if chars.peek().is_none_or(|next| !next.is_ascii_whitespace()) => out.push('＜'),
            c if u32::from(c) > 0xFFFF => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// The JSON body of a chat POST.
pub fn encode_batch(items: &[ChatItem]) -> Vec<u8> {
    serde_json::to_vec(items).expect("serializing strings and integers cannot fail")
}

/// The number of bytes `item` adds to a batch body (its JSON plus a separating comma).
pub fn encoded_len(item: &ChatItem) -> usize {
    serde_json::to_vec(item)
        .map(|v| v.len() + 1)
        .unwrap_or(usize::MAX)
}

/// The largest JSON document read as a `Value` tree. A login, avatar, grid or account answer is a
/// few hundred bytes; a tree costs up to ten times its text, so a larger answer to one of them
/// (a broken or hostile peer) is not read at all rather than held ten times over.
pub const MAX_VALUE_BYTES: usize = 1 << 20;

/// Reads a JSON document (from `json_start`) as a `Value`, if it is at most `MAX_VALUE_BYTES`.
pub fn value_of(json: &[u8]) -> Option<Value> {
    if json.len() > MAX_VALUE_BYTES {
        return None;
    }
    serde_json::from_slice(json).ok()
}

/// Reads a CMS body as a JSON `Value`, PHP warning text in front skipped (`json_start`). For the
/// small answers only (`MAX_VALUE_BYTES`): a chat GET and a POST reply are read into typed rows.
pub fn parse_lenient(body: &[u8]) -> Option<Value> {
    value_of(&body[json_start(body)?..])
}

/// What a chat POST answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostReply {
    /// `success: true`: every row stored, unless a middle row failed silently (spec §10).
    Stored {
        /// The id of the last row.
        last_id: i64,
    },
    /// A validation error: nothing was stored.
    Invalid(String),
    /// `success: false` without an error: the last row failed, earlier rows may be stored.
    LastRowFailed,
    /// `success: false` with another error.
    Failed(String),
}

/// Interprets a chat POST body; `None` when it is not JSON at all (a PHP fatal error page).
pub fn parse_post_reply(body: &[u8]) -> Option<PostReply> {
    post_reply_in(&body[json_start(body)?..])
}

/// Interprets the JSON document of a chat POST answer (from `json_start`); `None` when it is not
/// an object.
pub fn post_reply_in(json: &[u8]) -> Option<PostReply> {
    let Ok(Object(reply)) = serde_json::from_slice::<Object<Envelope>>(json) else {
        return None;
    };
    if reply.success.0 == Some(true) {
        return Some(PostReply::Stored {
            last_id: reply.id.0.unwrap_or(0),
        });
    }
    Some(match reply.error.0 {
        Some(error) if VALIDATION_ERRORS.iter().any(|v| error.starts_with(v)) => {
            PostReply::Invalid(error)
        }
        Some(error) => PostReply::Failed(error),
        None => PostReply::LastRowFailed,
    })
}

/// The `error` string of a `success: false` answer, from its JSON document (`json_start`):
/// a typed read that skips every other field, whatever the answer's size.
pub fn error_in(json: &[u8]) -> Option<String> {
    let Ok(Object(envelope)) = serde_json::from_slice::<Object<Envelope>>(json) else {
        return None;
    };
    if envelope.success.0 == Some(false) {
        envelope.error.0
    } else {
        None
    }
}

/// The `error` string of a `success: false` body, if that is what `value` is.
pub fn error_of(value: &Value) -> Option<&str> {
    if value.get("success").and_then(Value::as_bool) == Some(false) {
        value.get("error").and_then(Value::as_str)
    } else {
        None
    }
}

/// The token of a login answer (success has no `success` key, only a `token`).
pub fn token_of(value: &Value) -> Option<&str> {
    value
        .get("token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
}

/// The account id and the bound address of a login answer (`userId` is a string there, spec §2.1).
pub fn login_info_of(value: &Value) -> (Option<i64>, Option<String>) {
    let user_id = value.get("userId").and_then(as_i64).filter(|id| *id > 0);
    let ip = value
        .get("ip")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .filter(|ip| !ip.is_empty());
    (user_id, ip)
}

/// The `permissions` object (module → level) of a full user from `GET /user/<id>/`.
pub fn permissions_of(value: &Value) -> Option<std::collections::BTreeMap<String, i64>> {
    let permissions = value.get("permissions")?.as_object()?;
    Some(
        permissions
            .iter()
            .filter_map(|(module, level)| Some((module.clone(), as_i64(level)?)))
            .collect(),
    )
}

/// The user linked to an avatar on `grid_id` by a confirmed link, from `GET /grid/<g>/avatar/<uuid>/`.
pub fn confirmed_user(value: &Value, grid_id: u32) -> Option<i64> {
    let user_id = value.get("id").and_then(as_i64).filter(|id| *id > 0)?;
    let confirmed = value.get("avatars")?.as_array()?.iter().any(|avatar| {
        avatar.get("gridId").and_then(as_i64) == Some(i64::from(grid_id))
            && avatar.get("confirmed").and_then(as_i64) == Some(1)
    });
    confirmed.then_some(user_id)
}

/// What a chat GET answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatAnswer {
    /// The rows (an element without an id is passed over).
    Rows(Vec<CmsChat>),
    /// An object: `success: false` with this error, if any.
    Failed(Option<String>),
}

/// Reads the JSON document of a chat GET answer (from `json_start`) straight into rows, holding
/// nothing of a row but what `CmsChat` keeps; `None` when it is neither an array nor an object.
pub fn parse_chat_answer(json: &[u8]) -> Option<ChatAnswer> {
    serde_json::from_slice::<ChatAnswerWire>(json)
        .ok()
        .and_then(|answer| answer.0)
}

/// A chat GET answer: an array of rows, or an object (an error); anything else is `None`.
struct ChatAnswerWire(Option<ChatAnswer>);

impl<'de> Deserialize<'de> for ChatAnswerWire {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AnswerVisitor;
        impl<'de> Visitor<'de> for AnswerVisitor {
            type Value = ChatAnswerWire;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a chat GET answer")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut rows = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(Object(row)) = seq.next_element::<Object<RowWire>>()? {
                    let Some(id) = row.id.0 else {
                        continue;
                    };
                    let user = row.user.0;
                    rows.push(CmsChat {
                        id,
                        user_id: user.id.0.unwrap_or(-1),
                        username: user.username.0.unwrap_or_default(),
                        first_name: user.first_name.0.unwrap_or_default(),
                        last_name: user.last_name.0.unwrap_or_default(),
                        message: row.message.0.unwrap_or_default(),
                        timestamp: row.timestamp.0.unwrap_or_default(),
                        from_cms: row.from_cms.0 == Some(1),
                    });
                }
                rows.shrink_to_fit();
                Ok(ChatAnswerWire(Some(ChatAnswer::Rows(rows))))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let envelope = Envelope::from_map(map)?;
                let error = if envelope.success.0 == Some(false) {
                    envelope.error.0
                } else {
                    None
                };
                Ok(ChatAnswerWire(Some(ChatAnswer::Failed(error))))
            }
            give!(ChatAnswerWire(None); bool, i64, u64, f64, str, unit);
        }
        deserializer.deserialize_any(AnswerVisitor)
    }
}

/// `{"success": …, "error": …, "id": …}`: the envelope of an error or a POST reply.
#[derive(Default)]
struct Envelope {
    success: Flag,
    error: Text,
    id: Int,
}

from_map!(Envelope {
    "success" => success,
    "error" => error,
    "id" => id,
});

/// One element of a chat GET answer: the fields `CmsChat` keeps.
#[derive(Default)]
struct RowWire {
    id: Int,
    user: Object<UserWire>,
    message: Text,
    timestamp: Text,
    from_cms: Int,
}

from_map!(RowWire {
    "id" => id,
    "user" => user,
    "message" => message,
    "timestamp" => timestamp,
    "fromCMS" => from_cms,
});

/// A row's `user`: the fields `CmsChat` keeps (not `email`, `picture`, `lastLogin`).
#[derive(Default)]
struct UserWire {
    id: Int,
    username: Text,
    first_name: Text,
    last_name: Text,
}

from_map!(UserWire {
    "id" => id,
    "username" => username,
    "firstName" => first_name,
    "lastName" => last_name,
});

/// PHP hands out ids as numbers or as strings, depending on the code path.
fn as_i64(value: &Value) -> Option<i64> {
    value
        .as_i64()
        .or_else(|| value.as_str()?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_answer_gives_the_user_id_as_a_string_and_the_bound_ip() {
        let value: Value = serde_json::from_str(
            r#"{"token":"abc","ip":"192.168.1.102","expires":"2014-02-19 12:19:55","userId":"3","lastLogin":null}"#,
        )
        .expect("json");
        assert_eq!(
            login_info_of(&value),
            (Some(3), Some("192.168.1.102".to_owned()))
        );
    }

    #[test]
    fn permissions_are_read_whether_numbers_or_strings() {
        let value: Value =
            serde_json::from_str(r#"{"id":4,"permissions":{"auth":4,"chat":"5","user":4}}"#)
                .expect("json");
        let permissions = permissions_of(&value).expect("permissions");
        assert_eq!(permissions.get("chat"), Some(&5));
        assert_eq!(permissions.get("auth"), Some(&4));
    }

    #[test]
    fn strip_tags_bait_and_emoji_are_made_safe() {
        assert_eq!(sanitize_message("I <3 you"), "I ＜3 you");
        assert_eq!(sanitize_message("x<y and a < b"), "x＜y and a < b");
        assert_eq!(sanitize_message("end <"), "end ＜");
        assert_eq!(sanitize_message("hi 😀 café"), "hi \u{FFFD} café");
        assert_eq!(sanitize_message("nul\0inside\0"), "nulinside");
    }

    #[test]
    fn a_batch_has_exactly_the_four_keys() {
        let item = ChatItem {
            user_id: -1,
            message: "m".into(),
            timestamp: "2026-01-01 00:00:00".into(),
            from_cms: 0,
        };
        let body = String::from_utf8(encode_batch(std::slice::from_ref(&item))).expect("utf8");
        assert_eq!(
            body,
            r#"[{"userId":-1,"message":"m","timestamp":"2026-01-01 00:00:00","fromCMS":0}]"#
        );
        assert_eq!(encoded_len(&item), body.len() - 2 + 1);
    }

    #[test]
    fn php_noise_before_the_json_is_skipped() {
        let body = b"<br />\n<b>Warning</b>: file_put_contents(logs/x): failed in <b>index.php</b> on line <b>42</b><br />\n{\"success\":true,\"id\":\"17\"}";
        assert_eq!(
            parse_post_reply(body),
            Some(PostReply::Stored { last_id: 17 })
        );
    }

    #[test]
    fn post_replies_are_classified() {
        assert_eq!(
            parse_post_reply(br#"{"success":false,"error":"Expected 3 parameters, 0 given"}"#),
            Some(PostReply::Invalid("Expected 3 parameters, 0 given".into()))
        );
        assert_eq!(
            parse_post_reply(br#"{"success":false,"id":0}"#),
            Some(PostReply::LastRowFailed)
        );
        assert_eq!(
            parse_post_reply(b"<b>Fatal error</b>: Unknown column"),
            None
        );
    }

    #[test]
    fn chat_rows_are_read_leniently_into_what_is_kept() {
        let body = br#"<br /><b>Notice</b>: Undefined index [x] in <b>chat.php</b><br />
[{"id":"7","user":{"id":3,"username":"johndoe","firstName":"John","lastName":"Doe","email":"j@d.com","picture":false},"message":"Hi \u00e9","timestamp":"2014-04-08 13:15:03","fromCMS":"1"},
 {"id":6,"user":null,"message":["odd"],"timestamp":"2014-04-08 13:15:01","fromCMS":0,"extra":{"a":[1,2]}},
 {"user":{"id":4},"message":"no id"}, 17, null]"#;
        let json = &body[json_start(body).expect("json found")..];
        let Some(ChatAnswer::Rows(rows)) = parse_chat_answer(json) else {
            panic!("rows expected");
        };
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0],
            CmsChat {
                id: 7,
                user_id: 3,
                username: "johndoe".into(),
                first_name: "John".into(),
                last_name: "Doe".into(),
                message: "Hi \u{e9}".into(),
                timestamp: "2014-04-08 13:15:03".into(),
                from_cms: true,
            }
        );
        assert_eq!(
            (rows[1].id, rows[1].user_id, rows[1].message.as_str()),
            (6, -1, "")
        );
        assert!(!rows[1].from_cms);
        assert_eq!(
            parse_chat_answer(
                br#"{"success":false,"error":"Unauthorized to access this API URL"}"#
            ),
            Some(ChatAnswer::Failed(Some(UNAUTHORIZED.to_owned())))
        );
        assert_eq!(parse_chat_answer(b"\"text\""), None);
    }

    #[test]
    fn a_body_that_breaks_off_is_given_up_within_a_few_scans() {
        let row = r#"{"id":1,"user":{"id":3,"username":"u"},"message":"[x] {y}","timestamp":"t","fromCMS":0},"#;
        let mut body = b"<b>Warning</b>: [noise] {more}<br />\n[".to_vec();
        for _ in 0..10_000 {
            body.extend_from_slice(row.as_bytes());
        }
        assert_eq!(json_start(&body), None, "it breaks off");
        body.pop();
        body.push(b']');
        let start = json_start(&body).expect("whole again");
        assert_eq!(body[start], b'[');
        let Some(ChatAnswer::Rows(rows)) = parse_chat_answer(&body[start..]) else {
            panic!("rows expected");
        };
        assert_eq!(rows.len(), 10_000);
    }

    #[test]
    fn a_small_answer_larger_than_its_bound_is_not_read_as_a_tree() {
        let padding = "x".repeat(MAX_VALUE_BYTES);
        let huge = format!(r#"{{"token":"abc","padding":"{padding}"}}"#);
        assert_eq!(parse_lenient(huge.as_bytes()), None);
        assert!(parse_lenient(br#"{"token":"abc"}"#).is_some());
        // A POST reply of any size is read typed, its unused fields skipped.
        let reply = format!(r#"{{"success":true,"id":"9","padding":"{padding}"}}"#);
        assert_eq!(
            parse_post_reply(reply.as_bytes()),
            Some(PostReply::Stored { last_id: 9 })
        );
    }

    #[test]
    fn only_a_confirmed_link_on_this_grid_maps() {
        let user: Value = serde_json::from_str(
            r#"{"id":4,"avatars":[{"uuid":"u","gridId":2,"confirmed":1},{"uuid":"u","gridId":1,"confirmed":"0"}]}"#,
        )
        .expect("json");
        assert_eq!(confirmed_user(&user, 1), None);
        assert_eq!(confirmed_user(&user, 2), Some(4));
    }
}
