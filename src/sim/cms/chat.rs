//! `api/modules/chat.php` and `ChatController` of the simulated CMS: the chat POST (one element or
//! a list, `urldecode` and `date()` for numeric timestamps, the validation where the first invalid
//! element aborts the batch, one insert per element with no transaction and the last result
//! answering) and the chat GET (`timestamp >=` the cursor in the CMS zone, newest first with
//! same-second rows in no stable order, the whole history without a cursor, and PHP's fatal error
//! page when the rows exceed `memory_limit`).
//!
//! It must not decide the columns' conversions or the ids (`db` does, as MySQL would) nor write
//! JSON text (it answers a `Json` value).

use chrono::NaiveDateTime;
use indexmap::IndexMap;

use crate::sim::cms::db::{ChatRow, DATE_FORMAT, InsertError, Shared, State};
use crate::sim::cms::json::Json;
use crate::sim::cms::php::{
    Php, php_date, php_error_html, php_is_numeric, php_loose_eq_int, php_numeric_value, php_string,
    unix_seconds,
};
use crate::sim::cms::php_input::{get_input, strip_tags, urldecode};
use crate::sim::cms::routes::{Answer, failure};
use crate::sim::cms::users::{anonymous_user_fields, short_user_fields};
use crate::sim::http::Request;

/// `addChats` (`api/modules/chat.php`) and `ChatController` (spec §3.3).
pub(super) fn post_chats(
    shared: &Shared,
    state: &mut State,
    request: &Request,
    grid: i64,
    fail_last_element: bool,
) -> Answer {
    let input = get_input(request);
    // `if(!isset($input[0])) $input = array($input);`
    let batch: Vec<Php> = match input {
        Php::Arr(map)
            if map
                .get("0")
                .is_some_and(|first| !matches!(first, Php::Null)) =>
        {
            map.into_values().collect()
        }
        // `isset($string[0])` is true for a non-empty string, and `foreach` over a string does
        // nothing: validation returns FALSE and nothing is inserted.
        Php::Str(text) if !text.is_empty() => Vec::new(),
        other => vec![other],
    };
    if batch.is_empty() {
        return chat_result(None);
    }

    // Numeric timestamps: `message = urldecode(message)`, `timestamp = date(...)`.
    let batch: Vec<Php> = batch
        .into_iter()
        .map(|row| match row {
            Php::Arr(mut map) => {
                let numeric = map
                    .get("timestamp")
                    .filter(|value| !matches!(value, Php::Null))
                    .and_then(php_numeric_value);
                if let Some(unix) = numeric {
                    let message = map.get("message").map(php_string).unwrap_or_default();
                    map.insert("message".to_owned(), Php::Str(urldecode(&message)));
                    let date = php_date(shared.timezone, unix_seconds(unix));
                    map.insert("timestamp".to_owned(), Php::Str(date.into_bytes()));
                }
                Php::Arr(map)
            }
            other => other,
        })
        .collect();

    // `validateParametersCreate`: the first invalid element aborts the whole batch.
    for row in &batch {
        if let Some(error) = validate_chat(row) {
            return error;
        }
    }

    // `ChatController::addChats`: one insert per element, no transaction, the last result wins.
    let last_index = batch.len() - 1;
    let mut last = None;
    for (index, row) in batch.into_iter().enumerate() {
        let Php::Arr(element) = row else {
            // Validation lets only arrays through (a scalar counts 1 < 3).
            continue;
        };
        let element = controller_prepare(element, grid);
        let force_failure = fail_last_element && index == last_index;
        match state.insert_chat(shared.dialect, shared.timezone, &element, force_failure) {
            Ok(id) => last = Some(id),
            Err(InsertError::Failed) => last = None,
            Err(InsertError::Fatal(html)) => return Answer::Fatal(html),
        }
    }
    chat_result(last)
}

fn chat_result(last_id: Option<i64>) -> Answer {
    Answer::Json(Json::Obj(vec![
        ("success".to_owned(), Json::Bool(last_id.is_some())),
        ("id".to_owned(), Json::Int(last_id.unwrap_or(0))),
    ]))
}

/// What `ChatController::addChats` does to an element before `$db->insert`: `userId == -1`
/// (loose) becomes NULL, `message = strip_tags(message)`, `gridId` from the URL.
pub(super) fn controller_prepare(
    mut element: IndexMap<String, Php>,
    grid: i64,
) -> IndexMap<String, Php> {
    if element
        .get("userId")
        .is_some_and(|user| php_loose_eq_int(user, -1))
    {
        element.insert("userId".to_owned(), Php::Null);
    }
    let message = element.get("message").map(php_string).unwrap_or_default();
    element.insert("message".to_owned(), Php::Str(strip_tags(&message)));
    element.insert("gridId".to_owned(), Php::Int(grid));
    element
}

/// One element of `validateParametersCreate`; `Some` with the error if it is invalid.
fn validate_chat(row: &Php) -> Option<Answer> {
    const FILE: &str = "controllers/chatController.php";
    let count = match row {
        Php::Null => 0,
        Php::Arr(map) => map.len(),
        _ => 1,
    };
    let Php::Arr(map) = row else {
        return Some(failure(
            format!("Expected 3 parameters, {count} given"),
            1,
            FILE,
            64,
        ));
    };
    if count < 3 {
        return Some(failure(
            format!("Expected 3 parameters, {count} given"),
            1,
            FILE,
            64,
        ));
    }
    let isset = |key: &str| map.get(key).filter(|value| !matches!(value, Php::Null));
    if !isset("userId").is_some_and(php_is_numeric) {
        return Some(failure(
            "Missing parameter (integer) \"userId\"",
            2,
            FILE,
            66,
        ));
    }
    // `strlen(array)` is NULL (with a warning), which is `== 0`.
    let message_ok = isset("message")
        .is_some_and(|message| !matches!(message, Php::Arr(_)) && !php_string(message).is_empty());
    if !message_ok {
        return Some(failure(
            "Missing parameter (string) \"message\" with a minumum length of 1 character",
            3,
            FILE,
            68,
        ));
    }
    let timestamp_ok = isset("timestamp").is_some_and(|timestamp| {
        !matches!(timestamp, Php::Arr(_)) && contains_datetime(&php_string(timestamp))
    });
    if !timestamp_ok {
        return Some(failure(
            "Missing parameter (string) \"timestamp\", which should be in the format YYYY-MM-DD HH:mm:ss",
            4,
            FILE,
            70,
        ));
    }
    if let Some(from_cms) = isset("fromCMS")
        && !php_loose_eq_int(from_cms, 1)
        && !php_loose_eq_int(from_cms, 0)
    {
        return Some(failure(
            "Invalid parameter (integer) \"fromCMS\", which should be a 1 (for TRUE) or 0 (for FALSE)",
            5,
            FILE,
            72,
        ));
    }
    None
}

/// `preg_match("/[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}/", ...)`: unanchored.
pub(super) fn contains_datetime(text: &[u8]) -> bool {
    let shape = b"dddd-dd-dd dd:dd:dd";
    text.windows(shape.len()).any(|window| {
        window
            .iter()
            .zip(shape)
            .all(|(byte, expected)| match expected {
                b'd' => byte.is_ascii_digit(),
                other => byte == other,
            })
    })
}

/// The page PHP prints when `getChats` builds more rows than `memory_limit` holds (seen live with
/// 128M at about 50 000 rows, spec §10.1): HTTP 200, HTML, no JSON.
fn memory_exhausted() -> String {
    php_error_html(
        "Fatal error",
        "Allowed memory size of 134217728 bytes exhausted (tried to allocate 20480 bytes)",
        "modules/chat.php",
        77,
    )
}

/// `getChats` (spec §3.2): `timestamp >= date(<unix>)`, newest first, same-second order not
/// stable; without a timestamp the whole history (the `$args[1] > 0` bug).
pub(super) fn get_chats(shared: &Shared, state: &State, grid: i64, since: Option<&str>) -> Answer {
    let since = if grid > 0 {
        // `\d+` beyond the integer range: PHP 7 and later turn it into 0; read it so.
        let unix = since.map_or(0, |text| text.parse::<i64>().unwrap_or(0));
        match NaiveDateTime::parse_from_str(&php_date(shared.timezone, unix), DATE_FORMAT) {
            Ok(since) => Some(since),
            // A date no row can reach.
            Err(_) => return Answer::Json(Json::Arr(Vec::new())),
        }
    } else {
        None
    };
    let mut rows: Vec<&ChatRow> = state
        .chats
        .iter()
        .filter(|row| row.grid_id == grid && since.is_none_or(|since| row.timestamp >= since))
        .collect();
    rows.sort_by_key(|row| std::cmp::Reverse(row.timestamp));
    // `ORDER BY c.timestamp DESC` has no secondary key: shuffle each run of equal timestamps.
    let mut start = 0;
    while start < rows.len() {
        let end = start
            + rows[start..]
                .iter()
                .take_while(|row| row.timestamp == rows[start].timestamp)
                .count();
        fastrand::shuffle(&mut rows[start..end]);
        start = end;
    }
    if since.is_none() {
        // The "latest 50" limit applies only where no starting timestamp was set (grid 0).
        rows.truncate(50);
    }
    if let Some(limit) = state.memory_limit_rows
        && rows.len() > limit
    {
        return Answer::Fatal(memory_exhausted());
    }
    let items = rows
        .into_iter()
        .map(|row| {
            let user = match row.user_id.and_then(|id| state.users.get(&id)) {
                Some(user) => short_user_fields(user),
                None => anonymous_user_fields(),
            };
            Json::Obj(vec![
                ("id".to_owned(), Json::Int(row.id)),
                ("user".to_owned(), Json::Obj(user)),
                ("message".to_owned(), Json::Str(row.message.clone())),
                (
                    "timestamp".to_owned(),
                    Json::Str(row.timestamp.format(DATE_FORMAT).to_string()),
                ),
                ("fromCMS".to_owned(), Json::Int(i64::from(row.from_cms))),
            ])
        })
        .collect();
    Answer::Json(Json::Arr(items))
}
