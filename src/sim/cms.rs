//! Simulated OpenSim-CMS 1.1: the login, chat, avatar, grid and user endpoints of
//! `../shared/specs/opensim-cms-api.md`, behaving as the PHP 5 code on MySQL 5.6 in strict mode does,
//! quirks included (§1, §2, §3, §4.1, §10 of the spec).
//!
//! It owns an in-memory "database" (users, permissions, grids, avatar links, chats, tokens), the
//! PHP request handling on top of it (routing, token checks, body parsing, the chat validation and
//! insert loop, `strip_tags`, `urldecode`, `json_encode`), fault switches for tests, and the
//! `sim cms` command-line entry point ([`run_cli`]).
//!
//! It must not use the relay's wire types or its CMS client: it parses and writes its own JSON from
//! the spec, so a serde mistake in the relay cannot pass on both sides. It must not know about the
//! HTTP wire either: `crate::sim::http` reads requests and writes responses.
//!
//! Where the spec is silent, the simulator follows what PHP 5 and MySQL 5.6 would do and says so in
//! a comment. Two simplifications are deliberate: a multipart body is parsed as a query string (no
//! client of the chat API sends one), and the token truthiness bug of spec §10 ("a request without a
//! token is not always refused") is not reproduced, so "no token" is always a 401 here.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{NaiveDateTime, TimeZone as _, Utc};
use chrono_tz::Tz;
use indexmap::IndexMap;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::sim::http::{self, Reply, Request, Response};

/// `SERVER_ROOT` plus `/api`: every route lives below it.
const API_ROOT: &str = "/OpenSim-CMS/api";
/// `SERVER_API_TOKEN_EXPIRES`: a token's sliding idle lifetime.
const TOKEN_IDLE: Duration = Duration::from_secs(30 * 60);
/// `SERVER_API_TOKEN_EXPIRES2`: the sliding lifetime of the `OpenSim` user's (id 1) tokens.
const TOKEN_IDLE_OPENSIM: Duration = Duration::from_secs(24 * 60 * 60);
/// Where a stock install lives; it only shows up in PHP error texts and debug fields.
const PHP_ROOT: &str = "/var/www/OpenSim-CMS/api";
/// The `Content-Type` PHP sends when the code sets none (PHP 5.6 `default_charset`).
const PHP_DEFAULT_CONTENT_TYPE: &str = "text/html; charset=UTF-8";
/// The 401 message of `api/api.php:82-83`, for every permission failure.
const UNAUTHORIZED: &str = "Unauthorized to access this API URL";

/// How many requests [`CmsHandle::requests`] keeps: far more than any test makes, and a bound on
/// the memory of a `sim cms` left running for days.
const MAX_RECORDED_REQUESTS: usize = 100_000;

/// Permission levels of `class.Auth.php`.
const READ: u8 = 4;
const EXECUTE: u8 = 5;

// ---------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------

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
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl CmsSim {
    /// Binds `settings.listen`, seeds the database (users 1 `OpenSim`/`opensim` and 2
    /// `admin`/`password` with all permissions, grid 1 "OpenSim's test grid") and starts serving.
    pub async fn start(settings: CmsSimSettings) -> anyhow::Result<CmsSim> {
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("could not bind the simulated cms to {}", settings.listen))?;
        let addr = listener
            .local_addr()
            .context("could not read the simulated cms address")?;
        let shared = Arc::new(Shared::new(&settings));
        let shutdown = CancellationToken::new();
        let handler_shared = Arc::clone(&shared);
        let handler = move |request: Request| handle(Arc::clone(&handler_shared), request);
        let task = tokio::spawn(http::serve(listener, handler, shutdown.clone()));
        Ok(CmsSim {
            addr,
            shared,
            shutdown,
            task: Some(task),
        })
    }

    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>/OpenSim-CMS/api`, with a loopback address if it listens on all addresses.
    pub fn base_url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}{API_ROOT}", SocketAddr::new(ip, self.addr.port()))
    }

    /// A handle to inspect and steer the simulator (cheap to clone).
    pub fn handle(&self) -> CmsHandle {
        CmsHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Stops serving (open connections are closed) and waits until the server has ended.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            // A join error means the server task panicked; there is nothing left to stop.
            let _ = task.await;
        }
    }
}

impl Drop for CmsSim {
    fn drop(&mut self) {
        self.shutdown.cancel();
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
        let shared = &self.shared;
        let timestamp = now_in(shared.timezone).format(DATE_FORMAT).to_string();
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

    /// While offline, every request on every connection is answered by closing the connection.
    pub fn set_offline(&self, offline: bool) {
        self.shared.lock().offline = offline;
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

    /// Requests that matched the chat POST route, whatever their outcome.
    pub fn n_chat_posts(&self) -> u64 {
        self.shared.lock().n_chat_posts
    }
}

/// `sim cms`: serves a simulated OpenSim-CMS 1.1 and prints every chat line it stores.
#[derive(clap::Args, Debug, Clone)]
pub struct CmsArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// `stock` behaves as the OpenSim-CMS 1.1 code does; `documented` as its API docs say.
    #[arg(long, value_enum, default_value = "stock")]
    pub dialect: CmsDialect,
    /// The CMS's PHP time zone (IANA name).
    #[arg(long, default_value = "Europe/Amsterdam", value_parser = parse_timezone)]
    pub timezone: Tz,
    /// Print PHP warnings before the JSON and add debug fields to errors, as the example config does.
    #[arg(long)]
    pub debug_noise: bool,
    /// A user with the relay's permissions (auth 4, chat 5, user 4, grid 4); repeatable.
    #[arg(
        long = "user",
        value_name = "NAME:PASSWORD",
        default_value = "relay:relay-secret-changeme"
    )]
    pub users: Vec<String>,
    /// Fail the next N chat POSTs with `--fail-status`.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub fail_next: usize,
    /// The HTTP status `--fail-next` answers with.
    #[arg(long, value_name = "STATUS", default_value_t = 500)]
    pub fail_status: u16,
    /// Never answer the next N chat POSTs (after the `--fail-next` ones).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub hang_next: usize,
    /// Hold every other chat POST's answer this many milliseconds.
    #[arg(long, value_name = "DURATION_MS")]
    pub slow: Option<u64>,
    /// Print `stored N` (the number of chat rows so far) instead of every row: for load tests,
    /// where printing each row would cost more than storing it.
    #[arg(long)]
    pub quiet: bool,
}

fn parse_timezone(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>().map_err(|_| {
        format!("unknown time zone {name:?} (expected an IANA name such as Europe/Amsterdam)")
    })
}

/// Runs `sim cms` until `shutdown` is cancelled, printing each stored chat line on stdout.
pub async fn run_cli(args: CmsArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut accounts = Vec::new();
    for user in &args.users {
        let Some((name, password)) = user.split_once(':') else {
            anyhow::bail!("--user {user:?} is not NAME:PASSWORD");
        };
        anyhow::ensure!(!name.is_empty(), "--user {user:?} has an empty name");
        accounts.push((name.to_owned(), password.to_owned()));
    }
    let sim = CmsSim::start(CmsSimSettings {
        listen: args.listen,
        dialect: args.dialect,
        timezone: args.timezone,
        debug_noise: args.debug_noise,
    })
    .await?;
    let handle = sim.handle();
    for (name, password) in &accounts {
        let id = handle.add_user(name, password, name, "", Permissions::relay());
        println!("user {id} {name:?} created with the relay's permissions");
    }
    handle.fault_next(args.fail_next, Fault::Status(args.fail_status));
    handle.fault_next(args.hang_next, Fault::Hang);
    if let Some(millis) = args.slow {
        handle.fault_next(usize::MAX, Fault::Slow(Duration::from_millis(millis)));
    }
    println!(
        "simulated OpenSim-CMS 1.1 ({:?}, time zone {}) at {}",
        args.dialect,
        args.timezone,
        sim.base_url()
    );

    let shared = Arc::clone(&sim.shared);
    let mut n_printed = 0;
    loop {
        // Rows are appended in insertion order and never removed, so an index is a cursor. With a
        // single waiter, `notify_one` keeps a permit when nobody waits: no line is missed.
        if args.quiet {
            let n_rows = shared.lock().chats.len();
            if n_rows != n_printed {
                println!("stored {n_rows}");
                n_printed = n_rows;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                () = shared.stored.notified() => {}
            }
            continue;
        }
        let new_rows: Vec<(ChatRow, String)> = {
            let state = shared.lock();
            let rows = state.chats[n_printed..]
                .iter()
                .map(|row| (row.clone(), state.user_label(row.user_id)))
                .collect();
            n_printed = state.chats.len();
            rows
        };
        for (row, user) in new_rows {
            println!(
                "chat {} grid {} user {} at {} fromCMS {}: {}",
                row.id,
                row.grid_id,
                user,
                row.timestamp.format(DATE_FORMAT),
                u8::from(row.from_cms),
                row.message
            );
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            () = shared.stored.notified() => {}
        }
    }
    sim.stop().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

const DATE_FORMAT: &str = "%Y-%m-%d %H:%M:%S";

struct User {
    id: i64,
    username: String,
    password: String,
    first_name: String,
    last_name: String,
    email: String,
    permissions: Permissions,
    /// The previous login, in the CMS zone; `None` before the first login.
    last_login: Option<String>,
}

struct Grid {
    id: i64,
    name: String,
}

struct AvatarLink {
    grid_id: i64,
    uuid: String,
    user_id: i64,
    confirmed: bool,
}

#[derive(Clone)]
struct ChatRow {
    id: i64,
    grid_id: i64,
    user_id: Option<i64>,
    message: String,
    timestamp: NaiveDateTime,
    from_cms: bool,
}

impl ChatRow {
    fn to_stored(&self) -> StoredChat {
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

struct Token {
    token: String,
    /// The address the token is bound to: the login's `ip` field or the client's address.
    ip: String,
    user_id: i64,
    expires: Instant,
    idle: Duration,
}

/// The "database" plus the simulator's counters, behind one mutex. Critical sections are short
/// and never span an `.await`, so a `std` mutex is the right tool.
struct State {
    users: BTreeMap<i64, User>,
    next_user_id: i64,
    grids: BTreeMap<i64, Grid>,
    avatars: Vec<AvatarLink>,
    /// In insertion order (which is what `run_cli` prints); ids may have gaps or be out of order.
    chats: Vec<ChatRow>,
    /// The `AUTO_INCREMENT` counter of `chats`.
    next_chat_id: i64,
    tokens: Vec<Token>,
    /// Pending faults: how many more chat POSTs get each one.
    faults: VecDeque<(usize, Fault)>,
    offline: bool,
    n_logins: u64,
    n_chat_posts: u64,
    /// The newest [`MAX_RECORDED_REQUESTS`] requests, oldest first.
    requests: VecDeque<RecordedRequest>,
}

struct Shared {
    dialect: CmsDialect,
    timezone: Tz,
    debug_noise: bool,
    state: Mutex<State>,
    /// Woken whenever a chat row is stored (for `run_cli`).
    stored: Notify,
}

impl Shared {
    fn new(settings: &CmsSimSettings) -> Self {
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
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the tables half-updated in a way that
        // matters to a simulator, so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn add_user(
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

    fn user_label(&self, user_id: Option<i64>) -> String {
        match user_id.and_then(|id| self.users.get(&id)) {
            Some(user) => format!("{} ({})", user.id, user.username),
            None => "-1 (Anonymous)".to_owned(),
        }
    }

    fn take_fault(&mut self) -> Option<Fault> {
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
    fn authenticate(&mut self, request: &Request) -> Option<i64> {
        let now = Instant::now();
        self.tokens.retain(|token| token.expires >= now);
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
    /// `element` is what the controller passes to `$db->insert` (see [`controller_prepare`]).
    fn insert_chat(
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

enum InsertError {
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

/// PHP's `display_errors` HTML format (with `html_errors` on, the message is escaped).
fn php_error_html(kind: &str, message: &str, file: &str, line: u32) -> String {
    format!(
        "<br />\n<b>{kind}</b>:  {} in <b>{PHP_ROOT}/{file}</b> on line <b>{line}</b><br />\n",
        html_escape(message)
    )
}

fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#039;"),
            c => out.push(c),
        }
    }
    out
}

fn now_in(timezone: Tz) -> chrono::DateTime<Tz> {
    Utc::now().with_timezone(&timezone)
}

/// PHP `date('Y-m-d H:i:s', $unix)` in the CMS zone. A value chrono cannot represent gives a
/// string that still matches the validation regex but no insert accepts, as PHP's far-away
/// dates do.
fn php_date(timezone: Tz, unix: i64) -> String {
    match timezone.timestamp_opt(unix, 0).single() {
        Some(date) => date.format(DATE_FORMAT).to_string(),
        None => "0000-00-00 00:00:00".to_owned(),
    }
}

/// A `TIMESTAMP` column in strict mode: exactly `YYYY-MM-DD HH:MM:SS`, a real date and time,
/// within 1970-01-01 00:00:01 .. 2038-01-19 03:14:07 UTC.
fn mysql_timestamp(text: &[u8], timezone: Tz) -> Option<NaiveDateTime> {
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

// ---------------------------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------------------------

/// What the handler does after the synchronous part.
enum Plan {
    Now(Reply),
    After(Duration, Response),
}

async fn handle(shared: Arc<Shared>, request: Request) -> Reply {
    match plan(&shared, &request) {
        Plan::Now(reply) => reply,
        Plan::After(delay, response) => {
            tokio::time::sleep(delay).await;
            Reply::Respond(response)
        }
    }
}

fn plan(shared: &Shared, request: &Request) -> Plan {
    let mut state = shared.lock();
    if state.requests.len() == MAX_RECORDED_REQUESTS {
        state.requests.pop_front();
    }
    state.requests.push_back(RecordedRequest {
        method: request.method.clone(),
        path: request.path.clone(),
        query: request.query.clone(),
        headers: request.headers.clone(),
        body: request.body.clone(),
        peer: request.peer,
    });
    if state.offline {
        return Plan::Now(Reply::Close);
    }
    let Some(url) = api_url(request) else {
        return Plan::Now(Reply::Respond(Response::new(
            404,
            "text/plain",
            "Not Found\n",
        )));
    };
    let route = route(&request.method, &url);
    let mut fault = None;
    if matches!(route, Some((Route::PostChats { .. }, _, _))) {
        state.n_chat_posts += 1;
        fault = state.take_fault();
    }
    match fault {
        Some(Fault::Status(status)) => return Plan::Now(Reply::Respond(proxy_error(status))),
        Some(Fault::Hang) => return Plan::Now(Reply::NoAnswer),
        _ => {}
    }
    let n_rows_before = state.chats.len();
    let answer = answer(
        shared,
        &mut state,
        request,
        route,
        fault == Some(Fault::FailLastElement),
    );
    let stored = state.chats.len() > n_rows_before;
    drop(state);
    if stored {
        shared.stored.notify_one();
    }
    let response = render(shared, request, answer);
    tracing::debug!(
        method = %request.method,
        path = %request.path,
        status = response.status,
        fault = ?fault,
        "sim cms request"
    );
    match fault {
        Some(Fault::HangAfterStore) => Plan::Now(Reply::NoAnswer),
        Some(Fault::CloseAfterStore) => Plan::Now(Reply::Close),
        Some(Fault::StatusAfterStore(status)) => Plan::Now(Reply::Respond(proxy_error(status))),
        Some(Fault::Slow(delay)) => Plan::After(delay, response),
        _ => Plan::Now(Reply::Respond(response)),
    }
}

/// An error page such as Apache or a proxy in front of PHP writes.
fn proxy_error(status: u16) -> Response {
    let reason = match status {
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    let body = format!(
        "<!DOCTYPE HTML PUBLIC \"-//IETF//DTD HTML 2.0//EN\">\n<html><head>\n<title>{status} {reason}</title>\n</head><body>\n<h1>{reason}</h1>\n<p>The server encountered an error and could not complete your request.</p>\n</body></html>\n"
    );
    Response::new(status, "text/html; charset=iso-8859-1", body)
}

/// The `_url` PHP sees: the decoded path below the API root (Apache decodes the path before
/// `RewriteRule ^(.*)$ index.php?_url=/$1 [QSA]`). With QSA a client's own `_url` parameter comes
/// after the rewritten one, and PHP keeps the last: it wins. `None` outside the API root.
fn api_url(request: &Request) -> Option<String> {
    let path = percent_encoding::percent_decode_str(&request.path)
        .decode_utf8_lossy()
        .into_owned();
    let rest = path.strip_prefix(API_ROOT)?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    if let Some(url) = request.query_param("_url") {
        return Some(url);
    }
    Some(if rest.is_empty() {
        "/".to_owned()
    } else {
        rest.to_owned()
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Module {
    Auth,
    Chat,
    Grid,
    User,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LoginBy {
    /// `/auth/user/`: field `user`, username or e-mail.
    User,
    /// `/auth/username/`: field `username`.
    Username,
    /// `/auth/email/`: field `email`.
    Email,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Route {
    Login(LoginBy),
    GetChats { grid: i64, since: Option<String> },
    PostChats { grid: i64 },
    GetAvatar { grid: i64, uuid: String },
    GetGrid { grid: i64 },
    GetGrids,
    GetUser { id: i64 },
}

/// The route table (spec §6, the simulated subset): each regex is anchored and ends in `\/?`.
/// Returns the route, the module its permission is on and the level it needs.
fn route(method: &str, url: &str) -> Option<(Route, Module, u8)> {
    let body = url.strip_prefix('/')?;
    let body = body.strip_suffix('/').unwrap_or(body);
    let segments: Vec<&str> = body.split('/').collect();
    let digits = |text: &str| !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit());
    // `\d+` can be longer than any id; such a grid or user simply does not exist.
    let id = |text: &str| text.parse::<i64>().unwrap_or(i64::MAX);
    let uuid_shaped = |text: &str| {
        text.len() == 36
            && text
                .bytes()
                .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
    };
    let found = match (method, segments.as_slice()) {
        ("POST", ["auth", "user"]) => (Route::Login(LoginBy::User), Module::Auth, 0),
        ("POST", ["auth", "username"]) => (Route::Login(LoginBy::Username), Module::Auth, 0),
        ("POST", ["auth", "email"]) => (Route::Login(LoginBy::Email), Module::Auth, 0),
        ("GET", ["grid", grid, "chats"]) if digits(grid) => (
            Route::GetChats {
                grid: id(grid),
                since: None,
            },
            Module::Chat,
            READ,
        ),
        ("GET", ["grid", grid, "chats", since]) if digits(grid) && digits(since) => (
            Route::GetChats {
                grid: id(grid),
                since: Some((*since).to_owned()),
            },
            Module::Chat,
            READ,
        ),
        ("POST", ["grid", grid, "chats"]) if digits(grid) => {
            (Route::PostChats { grid: id(grid) }, Module::Chat, EXECUTE)
        }
        ("GET", ["grid", grid, "avatar", uuid]) if digits(grid) && uuid_shaped(uuid) => (
            Route::GetAvatar {
                grid: id(grid),
                uuid: (*uuid).to_owned(),
            },
            Module::User,
            READ,
        ),
        ("GET", ["grid", grid]) if digits(grid) => {
            (Route::GetGrid { grid: id(grid) }, Module::Grid, READ)
        }
        ("GET", ["grids"]) => (Route::GetGrids, Module::Grid, READ),
        ("GET", ["user", user]) if digits(user) => {
            (Route::GetUser { id: id(user) }, Module::User, READ)
        }
        _ => return None,
    };
    Some(found)
}

/// What the PHP code produced, before it is written out.
enum Answer {
    /// `$result`, encoded by `json_encode`.
    Json(Json),
    /// An exception caught in `index.php`.
    Error(ApiError),
    /// A PHP fatal error (HTML, status 200).
    Fatal(String),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ErrorKind {
    /// No route: 400.
    InvalidUrl,
    /// Any permission failure: 401.
    Unauthorized,
    /// Everything else: 200 (400 in the documented dialect).
    Failure,
}

struct ApiError {
    kind: ErrorKind,
    message: String,
    /// The exception code, file and line: shown only in debug mode.
    code: i64,
    file: &'static str,
    line: u32,
}

fn failure(message: impl Into<String>, code: i64, file: &'static str, line: u32) -> Answer {
    Answer::Error(ApiError {
        kind: ErrorKind::Failure,
        message: message.into(),
        code,
        file,
        line,
    })
}

fn answer(
    shared: &Shared,
    state: &mut State,
    request: &Request,
    route: Option<(Route, Module, u8)>,
    fail_last_element: bool,
) -> Answer {
    // `api/index.php` checks the token before it routes, so even a bad URL extends a token.
    let user_id = state.authenticate(request);
    let Some((route, module, needed)) = route else {
        return Answer::Error(ApiError {
            kind: ErrorKind::InvalidUrl,
            message: "Invalid API URL used".to_owned(),
            code: 0,
            file: "index.php",
            line: 70,
        });
    };
    if needed > 0 {
        let level = user_id
            .and_then(|id| state.users.get(&id))
            .map_or(0, |user| user.permissions.level(module));
        if level < needed {
            return Answer::Error(ApiError {
                kind: ErrorKind::Unauthorized,
                message: UNAUTHORIZED.to_owned(),
                code: 0,
                file: "api.php",
                line: 83,
            });
        }
    }
    match route {
        Route::Login(by) => login(shared, state, request, by),
        Route::PostChats { grid } => post_chats(shared, state, request, grid, fail_last_element),
        Route::GetChats { grid, since } => get_chats(shared, state, grid, since.as_deref()),
        Route::GetAvatar { grid, uuid } => get_avatar(state, grid, &uuid),
        Route::GetGrid { grid } => match state.grids.get(&grid) {
            Some(grid) => Answer::Json(grid_json(grid)),
            None => failure("Grid not found", 1, "models/grid.php", 112),
        },
        Route::GetGrids => Answer::Json(Json::Arr(state.grids.values().map(grid_json).collect())),
        Route::GetUser { id } => match state.users.get(&id) {
            Some(user) => Answer::Json(full_user_json(state, user)),
            None => failure("User not found", 1, "models/user.php", 153),
        },
    }
}

/// Writes an [`Answer`] as `api/index.php` does.
fn render(shared: &Shared, request: &Request, answer: Answer) -> Response {
    // `isset($headers['User-Agent'])` on `getallheaders()`: the key is case-sensitive.
    let pretty = request.header_exact("User-Agent").is_some();
    let mut body = String::new();
    if shared.debug_noise {
        let day = now_in(shared.timezone).format("%Y-%m-%d");
        body.push_str(&php_error_html(
            "Warning",
            &format!(
                "file_put_contents(logs/access-{day}.log): failed to open stream: No such file or directory"
            ),
            "index.php",
            42,
        ));
    }
    let (status, json_content) = match answer {
        Answer::Json(result) => {
            // `if(!empty($result)) header('Content-Type: application/json')`.
            let non_empty = !result.is_empty();
            body.push_str(&result.encode(pretty));
            (200, non_empty)
        }
        Answer::Error(error) => {
            let mut fields = vec![
                ("success".to_owned(), Json::Bool(false)),
                ("error".to_owned(), Json::Str(error.message)),
            ];
            if shared.debug_noise {
                fields.push(("Code".to_owned(), Json::Int(error.code)));
                fields.push((
                    "File".to_owned(),
                    Json::Str(format!("{PHP_ROOT}/{}", error.file)),
                ));
                fields.push(("Line".to_owned(), Json::Int(i64::from(error.line))));
                fields.push(("Trace".to_owned(), Json::Arr(Vec::new())));
            }
            body.push_str(&Json::Obj(fields).encode(pretty));
            let status = match (error.kind, shared.dialect) {
                (ErrorKind::InvalidUrl, _) => 400,
                (ErrorKind::Unauthorized, _) => 401,
                (ErrorKind::Failure, CmsDialect::Stock) => 200,
                (ErrorKind::Failure, CmsDialect::Documented) => 400,
            };
            (status, true)
        }
        Answer::Fatal(html) => {
            body.push_str(&html);
            (200, false)
        }
    };
    if shared.debug_noise {
        // The warning was output before any `header()` call: "headers already sent".
        return Response::new(200, PHP_DEFAULT_CONTENT_TYPE, body);
    }
    let content_type = if json_content {
        "application/json"
    } else {
        PHP_DEFAULT_CONTENT_TYPE
    };
    Response::new(status, content_type, body)
}

// ---------------------------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------------------------

/// `api/modules/auth.php`.
fn login(shared: &Shared, state: &mut State, request: &Request, by: LoginBy) -> Answer {
    let input = get_input(request);
    let field = |key: &str| match &input {
        Php::Arr(map) => map
            .get(key)
            .filter(|value| !matches!(value, Php::Null))
            .map(php_string),
        _ => None,
    };
    let field_name = match by {
        LoginBy::User => "user",
        LoginBy::Username => "username",
        LoginBy::Email => "email",
    };
    let Some(identity) = field(field_name) else {
        return failure(
            "No username, E-mail or ID provided",
            1,
            "models/user.php",
            140,
        );
    };
    let identity = String::from_utf8_lossy(&identity).into_owned();
    let password = field("password").unwrap_or_default();
    let ip = match field("ip") {
        Some(ip) => String::from_utf8_lossy(&ip).into_owned(),
        None => request.peer.ip().to_string(),
    };

    // `$username == "OpenSim"` is case-sensitive; that account may only log in from the grid.
    if identity == "OpenSim" && !is_grid(request) {
        return failure(
            "Not allowed to login as OpenSim outside the Grid",
            2,
            "modules/auth.php",
            112,
        );
    }
    // FILTER_VALIDATE_EMAIL decides between e-mail and username, whatever the route.
    let by_email = by == LoginBy::Email || looks_like_email(&identity);
    // The `users` columns use a case-insensitive collation.
    let found = state.users.values().find(|user| {
        if by_email {
            user.email.eq_ignore_ascii_case(&identity)
        } else {
            user.username.to_lowercase() == identity.to_lowercase()
        }
    });
    let Some(user) = found else {
        return failure("User not found", 1, "models/user.php", 153);
    };
    if user.password.as_bytes() != password.as_slice() {
        return failure(
            "Invalid username/password combination used",
            1,
            "modules/auth.php",
            120,
        );
    }
    if user.permissions.auth < READ {
        return failure(
            "You do not have permission to use the API",
            2,
            "modules/auth.php",
            131,
        );
    }
    let user_id = user.id;
    let idle = if user_id == 1 {
        TOKEN_IDLE_OPENSIM
    } else {
        TOKEN_IDLE
    };
    let token = fastrand_token();
    let now = now_in(shared.timezone);
    let expires = (now + chrono::Duration::from_std(idle).unwrap_or(chrono::Duration::zero()))
        .format(DATE_FORMAT)
        .to_string();
    state.tokens.push(Token {
        token: token.clone(),
        ip: ip.clone(),
        user_id,
        expires: Instant::now() + idle,
        idle,
    });
    state.n_logins += 1;
    let last_login = state
        .users
        .get_mut(&user_id)
        .and_then(|user| user.last_login.replace(now.format(DATE_FORMAT).to_string()));
    // No `success` key; `userId` went through `$db->escape()` and is a string.
    Answer::Json(Json::Obj(vec![
        ("token".to_owned(), Json::Str(token)),
        ("ip".to_owned(), Json::Str(ip)),
        ("expires".to_owned(), Json::Str(expires)),
        ("userId".to_owned(), Json::Str(user_id.to_string())),
        (
            "lastLogin".to_owned(),
            last_login.map_or(Json::Null, Json::Str),
        ),
    ]))
}

/// `Helper::generateToken(48)`. Tokens start with a letter so the `WHERE token` truthiness bug
/// of spec §10, which this simulator does not reproduce, could not apply to them either.
fn fastrand_token() -> String {
    let mut token = String::with_capacity(48);
    token.push(if fastrand::bool() {
        fastrand::lowercase()
    } else {
        fastrand::uppercase()
    });
    token.extend(std::iter::repeat_with(fastrand::alphanumeric).take(47));
    token
}

/// `Auth::isGrid`: the exact-case `X-SecondLife-Shard` header, and the token IP is 127.0.0.1 or
/// some grid's `osIp` is 127.0.0.1. The seeded grid runs on the CMS host (`osIp` 127.0.0.1), so
/// with this simulator the header alone suffices: the loophole of spec §2.3.
fn is_grid(request: &Request) -> bool {
    request.header_exact("X-SecondLife-Shard").is_some()
}

/// A rough `FILTER_VALIDATE_EMAIL`.
fn looks_like_email(text: &str) -> bool {
    match text.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !text.contains(char::is_whitespace)
                && !domain.contains('@')
        }
        None => false,
    }
}

/// `addChats` (`api/modules/chat.php`) and `ChatController` (spec §3.3).
fn post_chats(
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
fn controller_prepare(mut element: IndexMap<String, Php>, grid: i64) -> IndexMap<String, Php> {
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
fn contains_datetime(text: &[u8]) -> bool {
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

/// `getChats` (spec §3.2): `timestamp >= date(<unix>)`, newest first, same-second order not
/// stable; without a timestamp the whole history (the `$args[1] > 0` bug).
fn get_chats(shared: &Shared, state: &State, grid: i64, since: Option<&str>) -> Answer {
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

/// `getUserByAvatar` (spec §4.1).
fn get_avatar(state: &State, grid: i64, uuid: &str) -> Answer {
    if !is_v4_uuid(uuid) {
        return failure("Invalid UUID provided", 1, "modules/user.php", 303);
    }
    let link = state
        .avatars
        .iter()
        .find(|link| link.grid_id == grid && link.uuid == uuid);
    match link.and_then(|link| state.users.get(&link.user_id)) {
        Some(user) => Answer::Json(full_user_json(state, user)),
        None => failure("Avatar not found on this Grid", 1, "modules/user.php", 310),
    }
}

/// `Helper::isValidUuid`: the v4 form, lower case (the route already refused upper case).
fn is_v4_uuid(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(index, byte)| match index {
            8 | 13 | 18 | 23 => *byte == b'-',
            14 => *byte == b'4',
            19 => matches!(byte, b'8' | b'9' | b'a' | b'b'),
            _ => byte.is_ascii_digit() || (b'a'..=b'f').contains(byte),
        })
}

fn short_user_fields(user: &User) -> Vec<(String, Json)> {
    vec![
        ("id".to_owned(), Json::Int(user.id)),
        ("username".to_owned(), Json::Str(user.username.clone())),
        ("firstName".to_owned(), Json::Str(user.first_name.clone())),
        ("lastName".to_owned(), Json::Str(user.last_name.clone())),
        ("email".to_owned(), Json::Str(user.email.clone())),
        ("picture".to_owned(), Json::Bool(false)),
        (
            "lastLogin".to_owned(),
            user.last_login.clone().map_or(Json::Null, Json::Str),
        ),
    ]
}

/// How a row with `userId IS NULL` reads back.
fn anonymous_user_fields() -> Vec<(String, Json)> {
    vec![
        ("id".to_owned(), Json::Int(-1)),
        ("username".to_owned(), Json::Str("Anonymous".to_owned())),
        ("firstName".to_owned(), Json::Str(String::new())),
        ("lastName".to_owned(), Json::Str(String::new())),
        ("email".to_owned(), Json::Str("Anonymous".to_owned())),
        ("picture".to_owned(), Json::Bool(false)),
        (
            "lastLogin".to_owned(),
            Json::Str("0000-00-00 00:00:00".to_owned()),
        ),
    ]
}

/// `getUserData($user, TRUE)`: the short form plus permissions, avatars and groups. The grid has
/// no reachable OpenSim database here, so avatar names are empty and the live fields zero.
fn full_user_json(state: &State, user: &User) -> Json {
    let mut fields = short_user_fields(user);
    let permissions = user.permissions;
    let level = |value: u8| Json::Int(i64::from(value));
    fields.push((
        "permissions".to_owned(),
        Json::Obj(vec![
            ("auth".to_owned(), level(permissions.auth)),
            ("chat".to_owned(), level(permissions.chat)),
            ("comment".to_owned(), level(permissions.comment)),
            ("document".to_owned(), level(permissions.document)),
            ("grid".to_owned(), level(permissions.grid)),
            ("file".to_owned(), level(permissions.file)),
            ("meeting".to_owned(), level(permissions.meeting)),
            ("meetingroom".to_owned(), level(permissions.meetingroom)),
            ("presentation".to_owned(), level(permissions.presentation)),
            ("user".to_owned(), level(permissions.user)),
        ]),
    ));
    let avatars = state
        .avatars
        .iter()
        .filter(|link| link.user_id == user.id)
        .map(|link| {
            let grid_name = state
                .grids
                .get(&link.grid_id)
                .map(|grid| grid.name.clone())
                .unwrap_or_default();
            Json::Obj(vec![
                ("uuid".to_owned(), Json::Str(link.uuid.clone())),
                ("firstName".to_owned(), Json::Str(String::new())),
                ("lastName".to_owned(), Json::Str(String::new())),
                ("email".to_owned(), Json::Str(String::new())),
                ("gridId".to_owned(), Json::Int(link.grid_id)),
                ("gridName".to_owned(), Json::Str(grid_name)),
                ("confirmed".to_owned(), Json::Int(i64::from(link.confirmed))),
                ("online".to_owned(), Json::Int(0)),
                ("lastRegion".to_owned(), Json::Int(0)),
                ("lastLogin".to_owned(), Json::Int(0)),
                ("lastPosition".to_owned(), Json::Str("<0,0,0>".to_owned())),
            ])
        })
        .collect();
    fields.push(("avatars".to_owned(), Json::Arr(avatars)));
    fields.push(("groups".to_owned(), Json::Arr(Vec::new())));
    Json::Obj(fields)
}

fn grid_json(grid: &Grid) -> Json {
    Json::Obj(vec![
        ("id".to_owned(), Json::Int(grid.id)),
        ("name".to_owned(), Json::Str(grid.name.clone())),
        (
            "openSim".to_owned(),
            Json::Obj(vec![
                ("protocol".to_owned(), Json::Str("http".to_owned())),
                ("ip".to_owned(), Json::Str("127.0.0.1".to_owned())),
                ("port".to_owned(), Json::Int(9000)),
            ]),
        ),
        ("isOnline".to_owned(), Json::Int(0)),
        ("totalUsers".to_owned(), Json::Int(0)),
        ("activeUsers".to_owned(), Json::Int(0)),
        ("regions".to_owned(), Json::Arr(Vec::new())),
    ])
}

// ---------------------------------------------------------------------------------------------
// PHP semantics
// ---------------------------------------------------------------------------------------------

/// A PHP value as `json_decode($body, TRUE)` or `parse_str` produce it. Strings are bytes, as in
/// PHP; arrays keep insertion order, with list indices as the keys `"0"`, `"1"`, ….
#[derive(Clone, Debug, PartialEq)]
enum Php {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Vec<u8>),
    Arr(IndexMap<String, Php>),
}

impl<'de> serde::Deserialize<'de> for Php {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PhpVisitor)
    }
}

struct PhpVisitor;

impl<'de> serde::de::Visitor<'de> for PhpVisitor {
    type Value = Php;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<Php, E> {
        Ok(Php::Bool(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Php, E> {
        Ok(Php::Int(value))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Php, E> {
        // PHP turns integers beyond PHP_INT_MAX into floats.
        Ok(i64::try_from(value).map_or(Php::Float(value as f64), Php::Int))
    }

    fn visit_f64<E>(self, value: f64) -> Result<Php, E> {
        Ok(Php::Float(value))
    }

    fn visit_str<E>(self, value: &str) -> Result<Php, E> {
        Ok(Php::Str(value.as_bytes().to_vec()))
    }

    fn visit_unit<E>(self) -> Result<Php, E> {
        Ok(Php::Null)
    }

    fn visit_none<E>(self) -> Result<Php, E> {
        Ok(Php::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Php, A::Error> {
        let mut map = IndexMap::new();
        while let Some(value) = seq.next_element::<Php>()? {
            map.insert(map.len().to_string(), value);
        }
        Ok(Php::Arr(map))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut access: A) -> Result<Php, A::Error> {
        // A repeated key keeps its first position and takes the last value, as in PHP.
        let mut map = IndexMap::new();
        while let Some((key, value)) = access.next_entry::<String, Php>()? {
            map.insert(key, value);
        }
        Ok(Php::Arr(map))
    }
}

/// `Helper::getInput(TRUE)` (spec §1.3): the body read by Content-Length (a chunked body has
/// none, so it reads as empty), JSON if the exact-case `Content-Type` says so or the body is
/// `{…}`, otherwise form fields.
fn get_input(request: &Request) -> Php {
    let body: &[u8] = if request.chunked { &[] } else { &request.body };
    let json_header = request
        .header_exact("Content-Type")
        .is_some_and(|value| value.contains("application/json"));
    let json_braces = body.first() == Some(&b'{') && body.last() == Some(&b'}');
    if json_header || json_braces {
        // `json_decode` gives NULL for anything it cannot parse (including depth over its limit).
        return serde_json::from_slice::<Php>(body).unwrap_or(Php::Null);
    }
    Php::Arr(parse_str(body))
}

/// PHP's default `max_input_nesting_level`.
const MAX_INPUT_NESTING_LEVEL: usize = 64;

/// PHP `parse_str` (also what fills `$_POST` for a form body), bracket syntax included.
fn parse_str(body: &[u8]) -> IndexMap<String, Php> {
    let mut out = IndexMap::new();
    for pair in body.split(|byte| *byte == b'&') {
        if pair.is_empty() {
            continue;
        }
        let (key, value) = match pair.iter().position(|byte| *byte == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &b""[..]),
        };
        let key = String::from_utf8_lossy(&urldecode(key)).into_owned();
        register_variable(&mut out, &key, Php::Str(urldecode(value)));
    }
    out
}

/// `php_register_variable_ex`: leading spaces dropped, `a[b][]` nesting, ` ` and `.` in the base
/// name turned into `_`, an empty base name ignored (which is why a JSON array read as a form
/// yields nothing).
fn register_variable(out: &mut IndexMap<String, Php>, key: &str, value: Php) {
    let key = key.trim_start_matches(' ');
    let (base, mut rest) = match key.find('[') {
        Some(at) => (&key[..at], &key[at..]),
        None => (key, ""),
    };
    if base.is_empty() {
        return;
    }
    let mut base: String = base
        .chars()
        .map(|c| if c == ' ' || c == '.' { '_' } else { c })
        .collect();
    let mut indices: Vec<Option<String>> = Vec::new();
    while let Some(after) = rest.strip_prefix('[') {
        match after.find(']') {
            Some(close) => {
                let index = &after[..close];
                indices.push((!index.is_empty()).then(|| index.to_owned()));
                rest = &after[close + 1..];
            }
            None => {
                // An unclosed `[` on the first level becomes `_` and the rest stays in the name.
                if indices.is_empty() {
                    base.push('_');
                    base.push_str(after);
                }
                break;
            }
        }
    }
    // `max_input_nesting_level`: a deeper variable is dropped (and the recursion stays bounded).
    if indices.len() > MAX_INPUT_NESTING_LEVEL {
        return;
    }
    insert_path(out, Some(base), &indices, value);
}

fn insert_path(
    map: &mut IndexMap<String, Php>,
    key: Option<String>,
    rest: &[Option<String>],
    value: Php,
) {
    let key = key.unwrap_or_else(|| next_index(map));
    match rest.split_first() {
        None => {
            map.insert(key, value);
        }
        Some((next_key, deeper)) => {
            let slot = map.entry(key).or_insert_with(|| Php::Arr(IndexMap::new()));
            if !matches!(slot, Php::Arr(_)) {
                *slot = Php::Arr(IndexMap::new());
            }
            if let Php::Arr(inner) = slot {
                insert_path(inner, next_key.clone(), deeper, value);
            }
        }
    }
}

/// The key `$a[] = …` uses: one past the largest integer key.
fn next_index(map: &IndexMap<String, Php>) -> String {
    map.keys()
        .filter_map(|key| key.parse::<i64>().ok())
        .filter(|index| *index >= 0)
        .max()
        .map_or(0, |index| index.saturating_add(1))
        .to_string()
}

/// PHP `urldecode`: `+` is a space, valid `%XX` a byte, anything else kept.
fn urldecode(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut index = 0;
    while index < text.len() {
        let byte = text[index];
        if byte == b'+' {
            out.push(b' ');
        } else if byte == b'%'
            && index + 2 < text.len()
            && let (Some(high), Some(low)) =
                (hex_value(text[index + 1]), hex_value(text[index + 2]))
        {
            out.push(high * 16 + low);
            index += 2;
        } else {
            out.push(byte);
        }
        index += 1;
    }
    out
}

fn hex_value(byte: u8) -> Option<u8> {
    (byte as char)
        .to_digit(16)
        .and_then(|digit| u8::try_from(digit).ok())
}

/// PHP 5 `strip_tags` without allowed tags (`php_strip_tags_ex`): a `<` followed by whitespace is
/// text; any other `<` starts a tag that lasts until its `>` (or the end of the text), with
/// quotes, nesting, `<?…?>` and `<!--…-->` handled as PHP does. NUL bytes are dropped.
fn strip_tags(text: &[u8]) -> Vec<u8> {
    #[derive(PartialEq)]
    enum State {
        Text,
        Tag,
        Php,
        Bang,
        Comment,
    }
    let mut out = Vec::with_capacity(text.len());
    let mut state = State::Text;
    let mut depth = 0usize;
    let mut in_quote: Option<u8> = None;
    let previous = |index: usize, back: usize| index.checked_sub(back).map(|at| text[at]);
    for (index, &byte) in text.iter().enumerate() {
        let next = text.get(index + 1).copied();
        match byte {
            0 => {}
            b'<' => {
                if in_quote.is_some() {
                    continue;
                }
                if next.is_some_and(|next| next.is_ascii_whitespace() || next == 0x0b) {
                    if state == State::Text {
                        out.push(byte);
                    }
                    continue;
                }
                match state {
                    State::Text => state = State::Tag,
                    State::Tag => depth += 1,
                    _ => {}
                }
            }
            b'>' => {
                if depth > 0 {
                    depth -= 1;
                    continue;
                }
                if in_quote.is_some() {
                    continue;
                }
                match state {
                    State::Text => out.push(byte),
                    State::Tag | State::Bang => {
                        state = State::Text;
                        in_quote = None;
                    }
                    State::Php => {
                        if previous(index, 1) == Some(b'?') {
                            state = State::Text;
                            in_quote = None;
                        }
                    }
                    State::Comment => {
                        if previous(index, 1) == Some(b'-') && previous(index, 2) == Some(b'-') {
                            state = State::Text;
                            in_quote = None;
                        }
                    }
                }
            }
            b'"' | b'\'' => match state {
                State::Text => out.push(byte),
                State::Comment => {}
                _ => {
                    if state == State::Php && previous(index, 1) == Some(b'\\') {
                        continue;
                    }
                    match in_quote {
                        None => in_quote = Some(byte),
                        Some(open) if open == byte => in_quote = None,
                        Some(_) => {}
                    }
                }
            },
            b'!' if state == State::Tag && previous(index, 1) == Some(b'<') => {
                state = State::Bang;
            }
            b'?' if state == State::Tag && previous(index, 1) == Some(b'<') => {
                state = State::Php;
            }
            b'-' if state == State::Bang
                && previous(index, 1) == Some(b'-')
                && previous(index, 2) == Some(b'!') =>
            {
                state = State::Comment;
            }
            _ => {
                if state == State::Text {
                    out.push(byte);
                }
            }
        }
    }
    out
}

/// PHP's string conversion (`(string)$value`, what `strlen`, `strip_tags` and `urldecode` see).
fn php_string(value: &Php) -> Vec<u8> {
    match value {
        Php::Null | Php::Bool(false) => Vec::new(),
        Php::Bool(true) => b"1".to_vec(),
        Php::Int(number) => number.to_string().into_bytes(),
        Php::Float(number) => php_float_string(*number).into_bytes(),
        Php::Str(text) => text.clone(),
        Php::Arr(_) => b"Array".to_vec(),
    }
}

/// `(string)$float` with PHP's `precision = 14`: 14 significant digits, written in the shortest
/// form, with PHP's `1.0E+20` notation outside 1e-4 .. 1e15.
fn php_float_string(number: f64) -> String {
    if number.is_nan() {
        return "NAN".to_owned();
    }
    if number.is_infinite() {
        return if number > 0.0 { "INF" } else { "-INF" }.to_owned();
    }
    let rounded: f64 = format!("{number:.13e}").parse().unwrap_or(number);
    let magnitude = rounded.abs();
    if rounded == 0.0 {
        return "0".to_owned();
    }
    if (1e-4..1e15).contains(&magnitude) {
        return format!("{rounded}");
    }
    let scientific = format!("{rounded:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let point = if mantissa.contains('.') { "" } else { ".0" };
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let sign = if exponent < 0 { '-' } else { '+' };
    format!("{mantissa}{point}E{sign}{}", exponent.unsigned_abs())
}

/// PHP 5 `is_numeric`.
fn php_is_numeric(value: &Php) -> bool {
    php_numeric_value(value).is_some()
}

/// The number an `is_numeric` value stands for.
fn php_numeric_value(value: &Php) -> Option<f64> {
    match value {
        Php::Int(number) => Some(*number as f64),
        Php::Float(number) => Some(*number),
        Php::Str(text) => numeric_string(text),
        _ => None,
    }
}

/// A PHP 5 numeric string: leading whitespace, then a decimal number with optional sign,
/// fraction and exponent, and nothing after it; or a hexadecimal `0x…` (accepted before PHP 7).
fn numeric_string(text: &[u8]) -> Option<f64> {
    let start = text
        .iter()
        .position(|byte| !matches!(byte, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c))?;
    let text = &text[start..];
    if let Some(hex) = text
        .strip_prefix(b"0x")
        .or_else(|| text.strip_prefix(b"0X"))
    {
        if hex.is_empty() || !hex.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let hex = std::str::from_utf8(hex).ok()?;
        return Some(u64::from_str_radix(hex, 16).map_or(f64::INFINITY, |value| value as f64));
    }
    let (value, length) = parse_decimal(text)?;
    (length == text.len()).then_some(value)
}

/// The longest decimal number at the start of `text` (`[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?`):
/// its value and length.
fn parse_decimal(text: &[u8]) -> Option<(f64, usize)> {
    let mut at = 0;
    if matches!(text.first(), Some(b'+' | b'-')) {
        at += 1;
    }
    let int_digits = text[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    at += int_digits;
    let mut frac_digits = 0;
    if text.get(at) == Some(&b'.') {
        frac_digits = text[at + 1..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if int_digits > 0 || frac_digits > 0 {
            at += 1 + frac_digits;
        }
    }
    if int_digits == 0 && frac_digits == 0 {
        return None;
    }
    if matches!(text.get(at), Some(b'e' | b'E')) {
        let mut exponent_at = at + 1;
        if matches!(text.get(exponent_at), Some(b'+' | b'-')) {
            exponent_at += 1;
        }
        let exponent_digits = text[exponent_at.min(text.len())..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if exponent_digits > 0 {
            at = exponent_at + exponent_digits;
        }
    }
    let number = std::str::from_utf8(&text[..at]).ok()?.parse::<f64>().ok()?;
    Some((number, at))
}

/// PHP 5 loose `$value == $int`.
fn php_loose_eq_int(value: &Php, int: i64) -> bool {
    match value {
        Php::Null => int == 0,
        Php::Bool(flag) => *flag == (int != 0),
        Php::Int(number) => *number == int,
        Php::Float(number) => *number == int as f64,
        // A numeric string compares as its number; any other string is converted with its
        // leading number (0 if none): `"abc" == 0` is true in PHP 5.
        Php::Str(text) => {
            let number = numeric_string(text).unwrap_or_else(|| {
                let start = text
                    .iter()
                    .position(|byte| !byte.is_ascii_whitespace())
                    .unwrap_or(text.len());
                parse_decimal(&text[start..]).map_or(0.0, |(value, _)| value)
            });
            number == int as f64
        }
        Php::Arr(_) => false,
    }
}

/// What `date()` makes of a numeric timestamp: the integer part, saturated.
fn unix_seconds(value: f64) -> i64 {
    if value.is_nan() {
        0
    } else {
        // `as` saturates at the i64 bounds, which `php_date` then cannot represent.
        value.trunc() as i64
    }
}

// ---------------------------------------------------------------------------------------------
// json_encode
// ---------------------------------------------------------------------------------------------

/// A value for PHP's `json_encode`.
#[derive(Clone, Debug, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// PHP `empty()`.
    fn is_empty(&self) -> bool {
        match self {
            Json::Null => true,
            Json::Bool(flag) => !flag,
            Json::Int(number) => *number == 0,
            Json::Str(text) => text.is_empty() || text == "0",
            Json::Arr(items) => items.is_empty(),
            Json::Obj(fields) => fields.is_empty(),
        }
    }

    /// `json_encode($value)` or `json_encode($value, JSON_PRETTY_PRINT)`.
    fn encode(&self, pretty: bool) -> String {
        let mut out = String::new();
        self.write(&mut out, pretty, 0);
        out
    }

    fn write(&self, out: &mut String, pretty: bool, indent: usize) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(flag) => out.push_str(if *flag { "true" } else { "false" }),
            Json::Int(number) => {
                let _ = write!(out, "{number}");
            }
            Json::Str(text) => write_json_string(out, text),
            // An empty PHP array is `[]`, whether it was meant as a list or a map.
            Json::Arr(items) if items.is_empty() => out.push_str("[]"),
            Json::Obj(fields) if fields.is_empty() => out.push_str("[]"),
            Json::Arr(items) => {
                out.push('[');
                for (index, item) in items.iter().enumerate() {
                    if index > 0 {
                        out.push(',');
                    }
                    newline(out, pretty, indent + 1);
                    item.write(out, pretty, indent + 1);
                }
                newline(out, pretty, indent);
                out.push(']');
            }
            Json::Obj(fields) => {
                out.push('{');
                for (index, (key, value)) in fields.iter().enumerate() {
                    if index > 0 {
                        out.push(',');
                    }
                    newline(out, pretty, indent + 1);
                    write_json_string(out, key);
                    out.push_str(if pretty { ": " } else { ":" });
                    value.write(out, pretty, indent + 1);
                }
                newline(out, pretty, indent);
                out.push('}');
            }
        }
    }
}

fn newline(out: &mut String, pretty: bool, indent: usize) {
    if pretty {
        out.push('\n');
        for _ in 0..indent {
            out.push_str("    ");
        }
    }
}

/// PHP's default string escaping: `\/`, and every non-ASCII character as `\uXXXX` (lower-case
/// hex, surrogate pairs beyond the BMP).
fn write_json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' => out.push_str("\\/"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
            c if c == '\u{7f}' => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip(text: &str) -> String {
        String::from_utf8(strip_tags(text.as_bytes())).expect("strip_tags keeps UTF-8 here")
    }

    #[test]
    fn strip_tags_follows_php() {
        assert_eq!(strip("I <3 you"), "I ");
        assert_eq!(strip("x<y"), "x");
        assert_eq!(strip("a < b"), "a < b");
        assert_eq!(strip("pos <1,2,3> end"), "pos  end");
        assert_eq!(strip("<b>bold</b> text"), "bold text");
        assert_eq!(strip("<a href=\"x>y\">link</a>"), "link");
        assert_eq!(strip("a <!-- c > d --> b"), "a  b");
        assert_eq!(strip("1 > 0"), "1 > 0");
        assert_eq!(strip("<br>"), "");
        assert_eq!(strip("tail <"), "tail ");
    }

    #[test]
    fn is_numeric_follows_php_5() {
        let numeric = |text: &str| numeric_string(text.as_bytes()).is_some();
        assert!(numeric("1403608462"));
        assert!(numeric(" 12"));
        assert!(numeric("-1"));
        assert!(numeric("1.5e3"));
        assert!(numeric(".5"));
        assert!(numeric("0x1A"));
        assert!(!numeric("12 "));
        assert!(!numeric("1e"));
        assert!(!numeric(""));
        assert!(!numeric("abc"));
        assert!(!numeric("2026-01-01 12:00:00"));
    }

    #[test]
    fn loose_comparison_follows_php_5() {
        let text = |text: &str| Php::Str(text.as_bytes().to_vec());
        assert!(php_loose_eq_int(&text("abc"), 0));
        assert!(php_loose_eq_int(&text("1abc"), 1));
        assert!(php_loose_eq_int(&text("-1"), -1));
        assert!(php_loose_eq_int(&Php::Bool(true), 1));
        assert!(!php_loose_eq_int(&text("2"), 1));
        assert!(!php_loose_eq_int(&Php::Arr(IndexMap::new()), 0));
    }

    #[test]
    fn parse_str_handles_brackets_and_json_arrays() {
        let parsed = parse_str(b"0[userId]=3&0[message]=hi+there&a.b=1");
        let Some(Php::Arr(first)) = parsed.get("0") else {
            panic!("expected a nested array, got {parsed:?}");
        };
        assert_eq!(first.get("message"), Some(&Php::Str(b"hi there".to_vec())));
        assert!(parsed.contains_key("a_b"));
        assert!(parse_str(br#"[{"userId":3,"message":"x"}]"#).is_empty());
        assert_eq!(
            parse_str(b"list[]=a&list[]=b")
                .get("list")
                .map(|v| match v {
                    Php::Arr(map) => map.len(),
                    _ => 0,
                }),
            Some(2)
        );
    }

    #[test]
    fn floats_print_as_php_does() {
        assert_eq!(php_float_string(1.5), "1.5");
        assert_eq!(php_float_string(3.0), "3");
        assert_eq!(php_float_string(0.1 + 0.2), "0.3");
        assert_eq!(php_float_string(1e20), "1.0E+20");
        assert_eq!(php_float_string(1.5e-7), "1.5E-7");
    }

    #[test]
    fn form_keys_nested_too_deeply_are_dropped() {
        let deep = format!("a{}=1&b=2", "[x]".repeat(100));
        let parsed = parse_str(deep.as_bytes());
        assert!(!parsed.contains_key("a"));
        assert!(parsed.contains_key("b"));
    }

    #[test]
    fn urldecode_decodes_plus_and_percent() {
        assert_eq!(urldecode(b"a+b%2Bc%25d%zz%4"), b"a b+c%d%zz%4".to_vec());
    }

    #[test]
    fn json_encode_escapes_like_php() {
        let value = Json::Obj(vec![
            ("a/b".to_owned(), Json::Str("é😀\n".to_owned())),
            ("list".to_owned(), Json::Arr(vec![Json::Int(1)])),
            ("empty".to_owned(), Json::Obj(Vec::new())),
        ]);
        assert_eq!(
            value.encode(false),
            r#"{"a\/b":"\u00e9\ud83d\ude00\n","list":[1],"empty":[]}"#
        );
        assert_eq!(
            value.encode(true),
            "{\n    \"a\\/b\": \"\\u00e9\\ud83d\\ude00\\n\",\n    \"list\": [\n        1\n    ],\n    \"empty\": []\n}"
        );
    }

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

    #[test]
    fn routes_are_anchored_with_an_optional_trailing_slash() {
        assert!(route("POST", "/grid/1/chats").is_some());
        assert!(route("POST", "/grid/1/chats/").is_some());
        assert!(route("POST", "/grid/1/chats//").is_none());
        assert!(route("HEAD", "/grid/1/chats/").is_none());
        assert!(
            route(
                "GET",
                "/grid/1/avatar/6C7D2C8F-B9B9-43E9-9CE3-8D56232B51C9/"
            )
            .is_none()
        );
        assert!(route("GET", "/x/grid/1/chats/").is_none());
    }
}
