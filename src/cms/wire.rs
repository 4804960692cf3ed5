//! The CMS's JSON and the text rules of its stock database.
//!
//! Requests carry exactly the keys the CMS inserts (an extra key is a PHP fatal error after the earlier
//! rows were stored). Responses are read leniently: PHP warnings may come before the JSON, errors
//! arrive with HTTP 200 and `success: false`, and ids may be strings or numbers.

use serde::Serialize;
use serde_json::Value;

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

/// Reads a CMS body as JSON, skipping PHP warning text in front of it: first the whole body, then
/// from each `{` or `[` (the first 64) until one parses to the end. Costly on noise, so `CmsClient`
/// calls it once per answer and keeps the value.
pub fn parse_lenient(body: &[u8]) -> Option<Value> {
    if let Ok(value) = serde_json::from_slice(body) {
        return Some(value);
    }
    body.iter()
        .enumerate()
        .filter(|(_, b)| **b == b'{' || **b == b'[')
        .take(64)
        .find_map(|(start, _)| serde_json::from_slice(&body[start..]).ok())
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
    post_reply_of(&parse_lenient(body)?)
}

/// Interprets a chat POST answer already read by `parse_lenient`; `None` when it is not an object.
pub fn post_reply_of(value: &Value) -> Option<PostReply> {
    let object = value.as_object()?;
    if object.get("success").and_then(Value::as_bool) == Some(true) {
        return Some(PostReply::Stored {
            last_id: object.get("id").and_then(as_i64).unwrap_or(0),
        });
    }
    Some(match object.get("error").and_then(Value::as_str) {
        Some(error) if VALIDATION_ERRORS.iter().any(|v| error.starts_with(v)) => {
            PostReply::Invalid(error.to_owned())
        }
        Some(error) => PostReply::Failed(error.to_owned()),
        None => PostReply::LastRowFailed,
    })
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

/// The rows of a chat GET.
pub fn parse_chats(value: &Value) -> Option<Vec<CmsChat>> {
    let rows = value.as_array()?;
    let text = |v: &Value, k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    Some(
        rows.iter()
            .filter_map(|row| {
                let user = row.get("user").cloned().unwrap_or(Value::Null);
                Some(CmsChat {
                    id: row.get("id").and_then(as_i64)?,
                    user_id: user.get("id").and_then(as_i64).unwrap_or(-1),
                    username: text(&user, "username"),
                    first_name: text(&user, "firstName"),
                    last_name: text(&user, "lastName"),
                    message: text(row, "message"),
                    timestamp: text(row, "timestamp"),
                    from_cms: row.get("fromCMS").and_then(as_i64) == Some(1),
                })
            })
            .collect(),
    )
}

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
    fn only_a_confirmed_link_on_this_grid_maps() {
        let user: Value = serde_json::from_str(
            r#"{"id":4,"avatars":[{"uuid":"u","gridId":2,"confirmed":1},{"uuid":"u","gridId":1,"confirmed":"0"}]}"#,
        )
        .expect("json");
        assert_eq!(confirmed_user(&user, 1), None);
        assert_eq!(confirmed_user(&user, 2), Some(4));
    }
}
