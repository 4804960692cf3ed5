//! Simulated OpenSim-CMS 1.1: the login, chat, avatar, grid and user endpoints of
//! `../shared/specs/opensim-cms-api.md`, behaving as the PHP 5 code on MySQL 5.6 in strict mode does,
//! quirks included (§1, §2, §3, §4.1, §10 of the spec).
//!
//! This file owns the public face: [`CmsSim`] (start, address, stop), [`CmsHandle`] (seed, inspect
//! and steer it, fault switches for tests) and the types they speak. The rest is split by seam:
//! `cli` (the `sim cms` entry point, [`run_cli`]), `cost` (the PHP-speed cost model, its workers and
//! the busy time by kind of request), `db` (the in-memory MySQL tables, their insert and the token
//! lookup), `routes` (`api/index.php`: routing, permissions, writing the answer),
//! the endpoints `auth`, `chat` and `users`, `php` (PHP's values and error pages), `php_input`
//! (`getInput`, `parse_str`, `urldecode`, `strip_tags`) and `json` (`json_encode`).
//!
//! It must not use the relay's wire types or its CMS client: it parses and writes its own JSON from
//! the spec, so a serde mistake in the relay cannot pass on both sides. It must not know about the
//! HTTP wire either: `crate::sim::http` reads requests and writes responses.
//!
//! Where the spec is silent, the simulator follows what PHP 5 and MySQL 5.6 would do and says so in
//! a comment. Two simplifications are deliberate: a multipart body is parsed as a query string (no
//! client of the chat API sends one), and the token truthiness bug of spec §10 ("a request without a
//! token is not always refused") is not reproduced, so "no token" is always a 401 here.

mod auth;
mod chat;
mod cli;
mod cost;
mod db;
mod json;
mod php;
mod php_input;
mod routes;
mod users;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use chrono_tz::Tz;
use indexmap::IndexMap;
use tokio_util::sync::CancellationToken;

use crate::sim::cms::chat::controller_prepare;
pub use crate::sim::cms::cli::{CmsArgs, CostMode, run_cli};
pub use crate::sim::cms::cost::{BusySpan, BusyTime, CostModel, KindBusy, RequestKind, Work};
use crate::sim::cms::db::{AvatarLink, ChatRow, DATE_FORMAT, Grid, Shared, now_in};
use crate::sim::cms::php::Php;
use crate::sim::cms::routes::Module;
use crate::sim::http::Request;
use crate::sim::server::{self, Server};

/// `SERVER_ROOT` plus `/api`: every route lives below it.
const API_ROOT: &str = "/OpenSim-CMS/api";

/// Permission levels of `class.Auth.php`.
const READ: u8 = 4;
const EXECUTE: u8 = 5;

/// Which OpenSim-CMS the simulator imitates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CmsDialect {
    /// OpenSim-CMS 1.1 as its code behaves (the spec): `userId` 0 fails the insert, errors are
    /// HTTP 200 with `success:false`.
    Stock,
    /// As the repository's API documentation says: `userId` 0 is stored as anonymous, and every
    /// `success:false` error envelope is answered with HTTP 400.
    Documented,
}

/// How to run a simulated CMS.
#[derive(Clone, Debug)]
pub struct CmsSimSettings {
    /// Address to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Code behaviour or documented behaviour.
    pub dialect: CmsDialect,
    /// The PHP `date_default_timezone_set` zone: token expiry, numeric timestamps and the GET
    /// cursor are converted in it.
    pub timezone: Tz,
    /// The example configuration's `SERVER_DEBUG`/`SERVER_PHP_ERRORS` with no `logs/` directory:
    /// every body starts with a PHP warning, error JSON carries `Code/File/Line/Trace`, and because
    /// output has started no header can be set any more (status stays 200, `Content-Type` stays
    /// PHP's default `text/html`).
    pub debug_noise: bool,
}

/// One user's level per module (`user_permissions`): 0 none, 4 read, 5 execute, 6 write, 7 all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permissions {
    /// Logging in needs 4.
    pub auth: u8,
    /// GET chat needs 4, POST chat 5.
    pub chat: u8,
    /// Comments (not simulated).
    pub comment: u8,
    /// Documents (not simulated).
    pub document: u8,
    /// Files (not simulated).
    pub file: u8,
    /// `GET /grid/<g>/` and `/grids/` need 4.
    pub grid: u8,
    /// Meetings (not simulated).
    pub meeting: u8,
    /// Meeting rooms (not simulated).
    pub meetingroom: u8,
    /// Presentations (not simulated).
    pub presentation: u8,
    /// Avatar and user lookups need 4.
    pub user: u8,
}

impl Permissions {
    /// What a relay account needs (spec §2.4): auth 4, chat 5, user 4, grid 4, nothing else.
    pub fn relay() -> Self {
        Permissions {
            auth: READ,
            chat: EXECUTE,
            user: READ,
            grid: READ,
            ..Permissions::none()
        }
    }

    /// 7 on every module, as the seeded `OpenSim` and `admin` accounts have.
    pub fn all() -> Self {
        Permissions {
            auth: 7,
            chat: 7,
            comment: 7,
            document: 7,
            file: 7,
            grid: 7,
            meeting: 7,
            meetingroom: 7,
            presentation: 7,
            user: 7,
        }
    }

    /// 0 everywhere, as for a user without a `user_permissions` row.
    pub fn none() -> Self {
        Permissions {
            auth: 0,
            chat: 0,
            comment: 0,
            document: 0,
            file: 0,
            grid: 0,
            meeting: 0,
            meetingroom: 0,
            presentation: 0,
            user: 0,
        }
    }

    fn level(&self, module: Module) -> u8 {
        match module {
            Module::Auth => self.auth,
            Module::Chat => self.chat,
            Module::Grid => self.grid,
            Module::User => self.user,
        }
    }
}

/// One row of the `chats` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredChat {
    /// The auto-increment id (or a client-supplied one).
    pub id: i64,
    /// The grid from the URL.
    pub grid_id: i64,
    /// `None` for anonymous (`userId` -1, stored as NULL).
    pub user_id: Option<i64>,
    /// The text as stored: after `urldecode` (numeric timestamps) and `strip_tags`.
    pub message: String,
    /// `YYYY-MM-DD HH:MM:SS`, wall-clock time without a zone.
    pub timestamp: String,
    /// `fromCMS`: true for lines typed in the CMS (and for posts that omit the field).
    pub from_cms: bool,
}

/// A failure injected into the next chat POSTs (see [`CmsHandle::fault_next`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this HTTP status and a generic HTML error page (a proxy or a broken PHP), store nothing.
    Status(u16),
    /// A maintenance page: HTTP 503 with `Retry-After: <seconds>`, store nothing.
    Maintenance {
        /// The `Retry-After` value, in seconds.
        retry_after_secs: u64,
    },
    /// Never answer, store nothing.
    Hang,
    /// Store the batch, then never answer: the client times out without knowing the outcome.
    HangAfterStore,
    /// Store the batch, then close the connection without answering.
    CloseAfterStore,
    /// Store the batch, then answer with this status (502/504: a proxy lost the answer).
    StatusAfterStore(u16),
    /// Process the request at once (storing what it stores), then hold the answer this long.
    Slow(Duration),
    /// The last element's insert fails (consuming an id): earlier elements are stored and the
    /// answer is `{"success":false,"id":0}`, the silent partial batch of spec §10.
    FailLastElement,
}

/// A request as the simulator received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// The method as sent.
    pub method: String,
    /// The path before `?`, not decoded.
    pub path: String,
    /// The raw query string.
    pub query: String,
    /// Header names in the exact case sent.
    pub headers: Vec<(String, String)>,
    /// The body as the HTTP layer read it.
    pub body: Vec<u8>,
    /// The client's address.
    pub peer: SocketAddr,
}

/// A running simulated CMS. Dropping it stops the server too; [`CmsSim::stop`] also waits for it.
pub struct CmsSim {
    server: Server,
    shared: Arc<Shared>,
}

impl CmsSim {
    /// Binds `settings.listen`, seeds the database (users 1 `OpenSim`/`opensim` and 2
    /// `admin`/`password` with all permissions, grid 1 "OpenSim's test grid") and starts serving.
    pub async fn start(settings: CmsSimSettings) -> anyhow::Result<CmsSim> {
        let bound = server::bind(settings.listen, "simulated cms").await?;
        let shared = Arc::new(Shared::new(&settings));
        let handler_shared = Arc::clone(&shared);
        let handler = move |request: Request| routes::handle(Arc::clone(&handler_shared), request);
        Ok(CmsSim {
            server: bound.serve(handler, CancellationToken::new()),
            shared,
        })
    }

    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://<addr>/OpenSim-CMS/api`, with a loopback address if it listens on all addresses.
    pub fn base_url(&self) -> String {
        let addr = self.addr();
        let ip = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}{API_ROOT}", SocketAddr::new(ip, addr.port()))
    }

    /// A handle to inspect and steer the simulator (cheap to clone).
    pub fn handle(&self) -> CmsHandle {
        CmsHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Stops serving (open connections are closed) and waits until the server has ended.
    pub async fn stop(mut self) {
        self.server.stop().await;
    }
}

impl Drop for CmsSim {
    fn drop(&mut self) {
        self.server.cancel();
    }
}

/// Inspects and steers a running simulated CMS.
#[derive(Clone)]
pub struct CmsHandle {
    shared: Arc<Shared>,
}

impl CmsHandle {
    /// Creates a user (password stored as given) and returns its `users.id` (3 upward).
    pub fn add_user(
        &self,
        username: &str,
        password: &str,
        first: &str,
        last: &str,
        permissions: Permissions,
    ) -> i64 {
        self.shared
            .lock()
            .add_user(username, password, first, last, permissions)
    }

    /// Links avatar `uuid` on grid `grid_id` to user `user_id` (replacing an earlier link).
    pub fn link_avatar(&self, grid_id: i64, uuid: &str, user_id: i64, confirmed: bool) {
        let mut state = self.shared.lock();
        state
            .avatars
            .retain(|link| !(link.grid_id == grid_id && link.uuid == uuid));
        state.avatars.push(AvatarLink {
            grid_id,
            uuid: uuid.to_owned(),
            user_id,
            confirmed,
        });
    }

    /// Creates (or renames) grid `grid_id`.
    pub fn add_grid(&self, grid_id: i64, name: &str) {
        self.shared.lock().grids.insert(
            grid_id,
            Grid {
                id: grid_id,
                name: name.to_owned(),
            },
        );
    }

    /// Every chat row, ascending id.
    pub fn chats(&self) -> Vec<StoredChat> {
        let state = self.shared.lock();
        let mut rows: Vec<StoredChat> = state.chats.iter().map(ChatRow::to_stored).collect();
        rows.sort_by_key(|row| row.id);
        rows
    }

    /// Stores a line as the CMS web page does when someone types in the CMS: `fromCMS` 1, the
    /// timestamp now in the CMS zone, `strip_tags` applied, `user_id` -1 for anonymous. Returns the
    /// new id, or 0 when the insert fails (unknown user or grid, text outside the BMP), as the API
    /// would answer.
    pub fn add_cms_line(&self, grid_id: i64, user_id: i64, message: &str) -> i64 {
        self.add_cms_line_dated(grid_id, user_id, message, Duration::ZERO)
    }

    /// [`CmsHandle::add_cms_line`], dated `behind` before now: typed in a browser whose clock is
    /// behind (the CMS page sends the browser's time).
    pub fn add_cms_line_dated(
        &self,
        grid_id: i64,
        user_id: i64,
        message: &str,
        behind: Duration,
    ) -> i64 {
        let shared = &self.shared;
        let behind = chrono::Duration::from_std(behind).unwrap_or_default();
        let timestamp = (now_in(shared.timezone) - behind)
            .format(DATE_FORMAT)
            .to_string();
        let mut element = IndexMap::new();
        element.insert("userId".to_owned(), Php::Int(user_id));
        element.insert("message".to_owned(), Php::Str(message.as_bytes().to_vec()));
        element.insert("timestamp".to_owned(), Php::Str(timestamp.into_bytes()));
        let outcome = {
            let mut state = shared.lock();
            let element = controller_prepare(element, grid_id);
            state.insert_chat(shared.dialect, shared.timezone, &element, false)
        };
        match outcome {
            Ok(id) => {
                shared.stored.notify_one();
                id
            }
            Err(_) => 0,
        }
    }

    /// The next `n` chat POSTs get `fault` (after any faults queued earlier). A POST consumes its
    /// fault whatever its outcome (even a 401); other requests are not affected. `usize::MAX`
    /// makes it permanent.
    pub fn fault_next(&self, n: usize, fault: Fault) {
        if n > 0 {
            self.shared.lock().faults.push_back((n, fault));
        }
    }

    /// Restores the chat table from a backup taken when its last id was `last_id`: the later rows
    /// are gone and new rows get the ids they had (a restored database's ids go backwards).
    pub fn restore_chats(&self, last_id: i64) {
        self.shared.lock().restore_chats(last_id);
    }

    /// While offline, every request on every connection is answered by closing the connection.
    pub fn set_offline(&self, offline: bool) {
        self.shared.lock().offline = offline;
    }

    /// While `Some(status)`, every request (login, reads, chat POSTs) is answered with that status
    /// and the error page of the web server in front of PHP, and nothing is stored: the CMS's PHP or
    /// database is down behind a web server that still answers (500, 503). `None` ends it.
    pub fn set_unavailable(&self, status: Option<u16>) {
        self.shared.lock().unavailable = status;
    }

    /// PHP's `memory_limit` counted in rows: a chat GET that would return more than `rows` rows
    /// answers PHP's fatal error page instead (HTTP 200, HTML: "Allowed memory size of 134217728
    /// bytes exhausted"), as a live OpenSim-CMS with 128M does beyond about 50 000 rows (spec
    /// §10.1). `None` (the default) is no limit.
    pub fn set_memory_limit_rows(&self, rows: Option<usize>) {
        self.shared.lock().memory_limit_rows = rows;
    }

    /// While set, every chat POST whose body carries `text` answers HTTP 500 with Apache's error
    /// page and stores nothing: a line this CMS cannot take however often it is sent, while it
    /// takes every other. `None` lifts it.
    pub fn fail_posts_carrying(&self, text: Option<&str>) {
        self.shared.lock().poison = text.map(str::to_owned);
    }

    /// While set, logins succeed but every token is refused, as when the CMS binds a token to an
    /// address other than the one the relay's requests come from (a proxy that changes it).
    pub fn set_refuse_tokens(&self, refuse: bool) {
        self.shared.lock().refuse_tokens = refuse;
    }

    /// Every token expires now, as after 30 idle minutes.
    pub fn expire_tokens(&self) {
        // Expired tokens are deleted at the start of the next request anyway, so deleting them
        // now is indistinguishable from the outside.
        self.shared.lock().tokens.clear();
    }

    /// Successful logins so far.
    pub fn n_logins(&self) -> u64 {
        self.shared.lock().n_logins
    }

    /// Every request received, in order (the newest 100 000 of them).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.iter().cloned().collect()
    }

    /// Puts a cost model in force for the requests that start from now: each waits for one of
    /// `model.workers` PHP workers and holds it as long as the live CMS would take. `None` (the
    /// default) is fast mode: answered as soon as done, to measure the relay's own cost.
    pub fn set_cost_model(&self, model: Option<CostModel>) {
        self.shared.meter.set(model);
    }

    /// The CMS's busy time by kind of request so far (also served as JSON at `GET /sim/busy`,
    /// outside the API).
    pub fn busy(&self) -> BusyTime {
        self.shared.meter.totals()
    }

    /// Each request PHP worked on, in the order workers finished them (the newest 100 000).
    pub fn busy_spans(&self) -> Vec<BusySpan> {
        self.shared.meter.spans()
    }

    /// Requests that matched the chat POST route, whatever their outcome.
    pub fn n_chat_posts(&self) -> u64 {
        self.shared.lock().n_chat_posts
    }
}
