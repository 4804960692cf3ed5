//! The simulated CMS's MySQL 5.6 database in strict mode: the `users`, `grids`, avatar-link,
//! `chats` and token tables with their seed rows, the insert of one chat row (column matching,
//! foreign keys, `utf8mb3`, `TIMESTAMP` range, auto-increment gaps), the token lookup of
//! `api/index.php`, and the counters and fault queue the handle reads and steers, all behind one
//! short-held lock ([`Shared`]).
//!
//! It must not know the HTTP routes or write JSON: the endpoints read and change these tables and
//! answer for themselves.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chrono::{NaiveDateTime, TimeZone as _, Utc};
use chrono_tz::Tz;
use indexmap::IndexMap;
use tokio::sync::Notify;

use crate::sim::cms::cost::Meter;
use crate::sim::cms::php::{Php, parse_decimal, php_error_html, php_string};
use crate::sim::cms::{
    CmsDialect, CmsSimSettings, Fault, Permissions, RecordedRequest, StoredChat,
};
use crate::sim::http::Request;

pub(super) const DATE_FORMAT: &str = "%Y-%m-%d %H:%M:%S";

pub(super) struct User {
    pub(super) id: i64,
    pub(super) username: String,
    pub(super) password: String,
    pub(super) first_name: String,
    pub(super) last_name: String,
    pub(super) email: String,
    pub(super) permissions: Permissions,
    /// The previous login, in the CMS zone; `None` before the first login.
    pub(super) last_login: Option<String>,
}

pub(super) struct Grid {
    pub(super) id: i64,
    pub(super) name: String,
}

pub(super) struct AvatarLink {
    pub(super) grid_id: i64,
    pub(super) uuid: String,
    pub(super) user_id: i64,
    pub(super) confirmed: bool,
}

#[derive(Clone)]
pub(super) struct ChatRow {
    pub(super) id: i64,
    pub(super) grid_id: i64,
    pub(super) user_id: Option<i64>,
    pub(super) message: String,
    pub(super) timestamp: NaiveDateTime,
    pub(super) from_cms: bool,
}

impl ChatRow {
    pub(super) fn to_stored(&self) -> StoredChat {
        StoredChat {
            id: self.id,
            grid_id: self.grid_id,
            user_id: self.user_id,
            message: self.message.clone(),
            timestamp: self.timestamp.format(DATE_FORMAT).to_string(),
            from_cms: self.from_cms,
        }
    }
}

pub(super) struct Token {
    pub(super) token: String,
    /// The address the token is bound to: the login's `ip` field or the client's address.
    pub(super) ip: String,
    pub(super) user_id: i64,
    pub(super) expires: Instant,
    pub(super) idle: Duration,
}

/// The "database" plus the simulator's counters, behind one mutex. Critical sections are short
/// and never span an `.await`, so a `std` mutex is the right tool.
pub(super) struct State {
    pub(super) users: BTreeMap<i64, User>,
    next_user_id: i64,
    pub(super) grids: BTreeMap<i64, Grid>,
    pub(super) avatars: Vec<AvatarLink>,
    /// In insertion order (which is what `run_cli` prints); ids may have gaps or be out of order.
    pub(super) chats: Vec<ChatRow>,
    /// The `AUTO_INCREMENT` counter of `chats`.
    next_chat_id: i64,
    pub(super) tokens: Vec<Token>,
    /// Pending faults: how many more chat POSTs get each one.
    pub(super) faults: VecDeque<(usize, Fault)>,
    pub(super) offline: bool,
    /// While set, every request is answered with this status (see `CmsHandle::set_unavailable`).
    pub(super) unavailable: Option<u16>,
    /// PHP's `memory_limit` as a number of rows: a chat GET that would return more fails with
    /// PHP's fatal error page (`CmsHandle::set_memory_limit_rows`). `None`: no limit.
    pub(super) memory_limit_rows: Option<usize>,
    /// Chat POSTs whose body carries this text fail (`CmsHandle::fail_posts_carrying`).
    pub(super) poison: Option<String>,
    /// While set, every token is refused (`CmsHandle::set_refuse_tokens`).
    pub(super) refuse_tokens: bool,
    pub(super) n_logins: u64,
    pub(super) n_chat_posts: u64,
    /// The newest `routes::MAX_RECORDED_REQUESTS` requests, oldest first.
    pub(super) requests: VecDeque<RecordedRequest>,
}

pub(super) struct Shared {
    pub(super) dialect: CmsDialect,
    pub(super) timezone: Tz,
    pub(super) debug_noise: bool,
    state: Mutex<State>,
    /// Woken whenever a chat row is stored (for `run_cli`).
    pub(super) stored: Notify,
    /// The cost model, its workers and the busy time (kept out of `state`: a request waits for a
    /// worker without holding the tables).
    pub(super) meter: Meter,
}

impl Shared {
    pub(super) fn new(settings: &CmsSimSettings) -> Self {
        let mut state = State {
            users: BTreeMap::new(),
            next_user_id: 1,
            grids: BTreeMap::new(),
            avatars: Vec::new(),
            chats: Vec::new(),
            next_chat_id: 1,
            tokens: Vec::new(),
            faults: VecDeque::new(),
            offline: false,
            unavailable: None,
            memory_limit_rows: None,
            poison: None,
            refuse_tokens: false,
            n_logins: 0,
            n_chat_posts: 0,
            requests: VecDeque::new(),
        };
        // `assets/users.sql`: the two default accounts, both with 7 on every module.
        state.add_user("OpenSim", "opensim", "OpenSim", "", Permissions::all());
        state.add_user("admin", "password", "Admin", "", Permissions::all());
        state.grids.insert(
            1,
            Grid {
                id: 1,
                name: "OpenSim's test grid".to_owned(),
            },
        );
        Shared {
            dialect: settings.dialect,
            timezone: settings.timezone,
            debug_noise: settings.debug_noise,
            state: Mutex::new(state),
            stored: Notify::new(),
            meter: Meter::default(),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the tables half-updated in a way that
        // matters to a simulator, so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    pub(super) fn add_user(
        &mut self,
        username: &str,
        password: &str,
        first: &str,
        last: &str,
        permissions: Permissions,
    ) -> i64 {
        let id = self.next_user_id;
        self.next_user_id += 1;
        self.users.insert(
            id,
            User {
                id,
                username: username.to_owned(),
                password: password.to_owned(),
                first_name: first.to_owned(),
                last_name: last.to_owned(),
                email: format!("{}@example.com", username.to_lowercase()),
                permissions,
                last_login: None,
            },
        );
        id
    }

    pub(super) fn user_label(&self, user_id: Option<i64>) -> String {
        match user_id.and_then(|id| self.users.get(&id)) {
            Some(user) => format!("{} ({})", user.id, user.username),
            None => "-1 (Anonymous)".to_owned(),
        }
    }

    pub(super) fn take_fault(&mut self) -> Option<Fault> {
        let (remaining, fault) = self.faults.front_mut()?;
        let fault = fault.clone();
        *remaining -= 1;
        if *remaining == 0 {
            self.faults.pop_front();
        }
        Some(fault)
    }

    /// `api/index.php`: delete expired tokens, then look up `?token=` for the client's address and
    /// extend it (sliding expiry). Returns the user the request runs as.
    pub(super) fn authenticate(&mut self, request: &Request) -> Option<i64> {
        let now = Instant::now();
        self.tokens.retain(|token| token.expires >= now);
        if self.refuse_tokens {
            return None;
        }
        let presented = request.query_param("token")?;
        let ip = request.peer.ip().to_string();
        let token = self
            .tokens
            .iter_mut()
            .find(|token| token.token == presented && token.ip == ip)?;
        token.expires = now + token.idle;
        Some(token.user_id)
    }

    /// One `INSERT INTO chats` of the controller's loop, with MySQL 5.6 strict-mode semantics.
    /// `element` is what the controller passes to `$db->insert` (see `chat::controller_prepare`).
    pub(super) fn insert_chat(
        &mut self,
        dialect: CmsDialect,
        timezone: Tz,
        element: &IndexMap<String, Php>,
        force_failure: bool,
    ) -> Result<i64, InsertError> {
        // Preparing the statement: every key is a column name, matched case-insensitively as
        // MySQL does. An unknown or repeated column fails `prepare()`, which MysqliDb turns into
        // an E_USER_ERROR: a PHP fatal error.
        let mut columns: BTreeMap<&'static str, &Php> = BTreeMap::new();
        for (key, value) in element {
            let Some(column) = CHAT_COLUMNS
                .iter()
                .find(|column| column.eq_ignore_ascii_case(key))
            else {
                return Err(InsertError::Fatal(prepare_failure(
                    element,
                    &format!("Unknown column '{key}' in 'field list'"),
                )));
            };
            if columns.insert(column, value).is_some() {
                return Err(InsertError::Fatal(prepare_failure(
                    element,
                    &format!("Column '{column}' specified twice"),
                )));
            }
        }

        let explicit_id = match columns.get("id") {
            None => None,
            Some(value) => match mysql_int(value) {
                // 0 and NULL ask for the next auto-increment value.
                Ok(None | Some(0)) => None,
                Ok(Some(id)) => Some(id),
                Err(()) => return Err(self.failed_insert(None)),
            },
        };
        if explicit_id.is_some_and(|id| self.chats.iter().any(|row| row.id == id)) {
            // Duplicate primary key: nothing was allocated.
            return Err(InsertError::Failed);
        }
        if force_failure {
            return Err(self.failed_insert(explicit_id));
        }
        let row = match self.chat_row_values(dialect, timezone, &columns) {
            Some(row) => row,
            None => return Err(self.failed_insert(explicit_id)),
        };
        let id = match explicit_id {
            Some(id) => {
                // MySQL moves the counter past an explicitly inserted larger id.
                self.next_chat_id = self.next_chat_id.max(id + 1);
                id
            }
            None => {
                let id = self.next_chat_id;
                self.next_chat_id += 1;
                id
            }
        };
        self.chats.push(ChatRow { id, ..row });
        Ok(id)
    }

    /// The `chats` table as a backup taken when its last id was `last_id` restores it: later rows
    /// are gone and the auto-increment counter is back at `last_id + 1` (a dump records it).
    pub(super) fn restore_chats(&mut self, last_id: i64) {
        self.chats.retain(|row| row.id <= last_id);
        self.next_chat_id = last_id.max(0) + 1;
    }

    /// A failed insert consumes an auto-increment value (InnoDB allocates it before the row is
    /// rejected), which leaves a gap in the ids (spec §10).
    fn failed_insert(&mut self, explicit_id: Option<i64>) -> InsertError {
        if explicit_id.is_none() {
            self.next_chat_id += 1;
        }
        InsertError::Failed
    }

    /// Converts the bound values as strict-mode MySQL would; `None` if the row is rejected.
    fn chat_row_values(
        &self,
        dialect: CmsDialect,
        timezone: Tz,
        columns: &BTreeMap<&'static str, &Php>,
    ) -> Option<ChatRow> {
        // The foreign key to `grids`.
        let grid_id = match columns.get("gridId") {
            Some(value) => mysql_int(value).ok()??,
            None => return None,
        };
        if !self.grids.contains_key(&grid_id) {
            return None;
        }
        // The foreign key to `users`; NULL is anonymous.
        let user_id = match columns.get("userId") {
            None => None,
            Some(value) => match mysql_int(value).ok()? {
                None => None,
                Some(0) if dialect == CmsDialect::Documented => None,
                Some(id) if self.users.contains_key(&id) => Some(id),
                Some(_) => return None,
            },
        };
        // `utf8` is utf8mb3: invalid UTF-8 and characters outside the BMP are rejected.
        let message = match columns.get("message") {
            None | Some(Php::Null) => String::new(),
            Some(value) => {
                let text = String::from_utf8(php_string(value)).ok()?;
                if text.chars().any(|c| u32::from(c) > 0xFFFF) {
                    return None;
                }
                text
            }
        };
        let timestamp = match columns.get("timestamp") {
            None | Some(Php::Null) => now_in(timezone).naive_local(),
            Some(value) => mysql_timestamp(&php_string(value), timezone)?,
        };
        let from_cms = match columns.get("fromCMS") {
            // The column default.
            None => true,
            Some(value) => match mysql_int(value).ok()? {
                None => false,
                Some(flag) if (-128..=127).contains(&flag) => flag != 0,
                Some(_) => return None,
            },
        };
        Some(ChatRow {
            id: 0,
            grid_id,
            user_id,
            message,
            timestamp,
            from_cms,
        })
    }
}

/// The columns of `chats` (`assets/database.sql:43-55`).
const CHAT_COLUMNS: [&str; 6] = ["id", "gridId", "userId", "message", "timestamp", "fromCMS"];

pub(super) enum InsertError {
    /// `MysqliDb::insert` returned false.
    Failed,
    /// `prepare()` failed: the text of the PHP fatal error.
    Fatal(String),
}

/// The HTML PHP prints for the E_USER_ERROR of `MysqliDb::_prepareQuery`.
fn prepare_failure(element: &IndexMap<String, Php>, mysql_error: &str) -> String {
    let columns: Vec<String> = element.keys().map(|key| format!("`{key}`")).collect();
    let placeholders = vec!["?"; element.len()].join(", ");
    let message = format!(
        "Problem preparing query (INSERT into chats ({})  VALUES ({placeholders})) {mysql_error}",
        columns.join(", ")
    );
    php_error_html("Fatal error", &message, "includes/class.MysqliDb.php", 1029)
}

pub(super) fn now_in(timezone: Tz) -> chrono::DateTime<Tz> {
    Utc::now().with_timezone(&timezone)
}

/// A `TIMESTAMP` column in strict mode: exactly `YYYY-MM-DD HH:MM:SS`, a real date and time,
/// within 1970-01-01 00:00:01 .. 2038-01-19 03:14:07 UTC.
pub(super) fn mysql_timestamp(text: &[u8], timezone: Tz) -> Option<NaiveDateTime> {
    let shape = b"dddd-dd-dd dd:dd:dd";
    if text.len() != shape.len()
        || !text
            .iter()
            .zip(shape)
            .all(|(byte, expected)| match expected {
                b'd' => byte.is_ascii_digit(),
                other => byte == other,
            })
    {
        return None;
    }
    let text = std::str::from_utf8(text).ok()?;
    let naive = NaiveDateTime::parse_from_str(text, DATE_FORMAT).ok()?;
    // A local time in a DST gap has no UTC instant; MySQL shifts it rather than refusing it.
    if let Some(instant) = timezone.from_local_datetime(&naive).earliest() {
        let unix = instant.timestamp();
        if !(1..=i64::from(i32::MAX)).contains(&unix) {
            return None;
        }
    }
    Some(naive)
}

/// A value bound to an `INT`/`TINYINT` column in strict mode: `Ok(None)` for NULL, `Err` when
/// MySQL refuses the conversion ("Incorrect integer value", "Out of range value").
fn mysql_int(value: &Php) -> Result<Option<i64>, ()> {
    let number = match value {
        Php::Null => return Ok(None),
        Php::Bool(flag) => i64::from(*flag),
        Php::Int(number) => *number,
        Php::Float(number) => float_to_int(number.round())?,
        Php::Str(text) => {
            let text = std::str::from_utf8(text).map_err(|_| ())?.trim_matches(' ');
            let parsed = parse_decimal(text.as_bytes()).ok_or(())?;
            if parsed.1 != text.len() {
                return Err(());
            }
            float_to_int(parsed.0.round())?
        }
        Php::Arr(_) => return Err(()),
    };
    if (i64::from(i32::MIN)..=i64::from(i32::MAX)).contains(&number) {
        Ok(Some(number))
    } else {
        Err(())
    }
}

fn float_to_int(number: f64) -> Result<i64, ()> {
    if number.is_finite() && number.abs() < 9.0e15 {
        // Checked just above: the value is integral and well within i64.
        Ok(number as i64)
    } else {
        Err(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::cms::chat::contains_datetime;

    #[test]
    fn timestamps_must_be_exact_for_the_insert() {
        let zone = chrono_tz::Europe::Amsterdam;
        assert!(mysql_timestamp(b"2026-01-01 12:00:05", zone).is_some());
        assert!(mysql_timestamp(b"2026-01-01 12:00:05+02:00", zone).is_none());
        assert!(mysql_timestamp(b"2026-02-30 12:00:05", zone).is_none());
        assert!(mysql_timestamp(b"1969-12-31 12:00:05", zone).is_none());
        assert!(contains_datetime(b"at 2026-01-01 12:00:05+02:00"));
        assert!(!contains_datetime(b"2026-01-01T12:00:05"));
    }
}
