//! The simulated LookingGlass viewer: its chat REST interface (`/api/chat`), `/api/avatars` and
//! `/api/LLLP/status`, faithful to `../shared/specs/lookingglass-chat-api.md` (LookingGlass HEAD
//! `c80120e`), with the KeeKee dialect of §6 as a variant.
//!
//! It owns the viewer's side of every quirk the relay must survive: one global chat queue drained
//! by any GET, keys and `Time` on a 12-hour clock in the viewer's zone, `1`-suffixed keys on
//! collisions, hand-written pure-ASCII JSON, `Host` checking, requests that are never answered, the
//! POST body sniffing with its required `Channel` and `Type`, the simulator's echo of channel 0, a
//! REST thread that serves one request at a time, and the crash when a client abandons a response.
//! Tests and the `sim viewer` subcommand drive it through [`ViewerHandle`].
//!
//! It must not use the relay's wire types or serde for the chat JSON: it writes the JSON by hand
//! from the spec, so a mistake in the relay's decoding cannot be mirrored here.

use std::collections::{HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use indexmap::IndexMap;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::sim::http::{self, Reply, Request, Response};

/// The grid name the simulated viewer is logged in to: the prefix of `/api/avatars` keys and the
/// `grid` of `/api/LLLP/status`.
const GRID_NAME: &str = "OSGrid";
/// The region the viewer and every simulated avatar stand in.
const REGION_NAME: &str = "Sim";
/// The zero UUID: system lines carry it as `OwnerID`.
const ZERO_UUID: &str = "00000000-0000-0000-0000-000000000000";
/// OpenSim's `ChatModule` truncates delivered chat to 1000 characters (spec §3.5), so the echo of
/// a longer POST comes back cut.
const ECHO_MAX_UTF16_UNITS: usize = 1000;

/// Which implementation of the interface to simulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Dialect {
    /// LookingGlass at HEAD `c80120e` (the default and the reference).
    Lookingglass,
    /// KeeKee (spec §6): path `/api/LLLP/chat`, host `localhost`, `application/json`, `OwnerID`
    /// omitted when zero, POST answered with an empty body, or not at all on failure.
    Keekee,
}

/// How to start a [`ViewerSim`].
#[derive(Clone, Debug)]
pub struct ViewerSimSettings {
    /// Where to listen (`127.0.0.1:0` in tests). An unspecified address (`0.0.0.0`) accepts any
    /// `Host`, as the real listener does with `BaseURL` `http://+`.
    pub listen: SocketAddr,
    /// Which implementation to simulate.
    pub dialect: Dialect,
    /// The viewer machine's local zone, used for `Time` and the keys.
    pub timezone: Tz,
    /// The viewer's own avatar, e.g. `Relay Bot`: `/api/LLLP/status` first/last, and the `From`
    /// of the echo of what it says.
    pub own_name: String,
    /// Stop answering anything (as the real viewer process dies) when a client abandons a response
    /// mid-write.
    pub crash_on_abort: bool,
}

/// One chat line as the simulator delivers it to the viewer (`ChatFromSimulator`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimChatLine {
    /// The speaker's name as the simulator sends it; `None` or empty is omitted from the JSON.
    pub from: Option<String>,
    /// The text; an empty one is never queued (the viewer drops typing notifications so).
    pub message: String,
    /// The `Type` string (`Normal`, `Whisper`, `Shout`, `Debug`, `OwnerSay`, ...).
    pub chat_type: String,
    /// The `EntryType` string (`ChatTypeNormal`, `ChatTypeLindenChat`, `ChatTypeObjectChat`,
    /// `ChatTypeOwnerSay`).
    pub entry_type: String,
    /// The lower-case hyphenated `OwnerID`.
    pub owner_id: String,
    /// The `Position` string, `"<x, y, z>"`.
    pub position: String,
    /// When the viewer received it; `None` means the moment it is pushed.
    pub received_at: Option<DateTime<Utc>>,
}

impl SimChatLine {
    /// An avatar saying `message` on channel 0. `EntryType` follows the viewer's rule: an agent
    /// whose name ends with `Linden` (case-sensitive) is `ChatTypeLindenChat`. `OwnerID` is the
    /// avatar's own UUID, as newer OpenSim sends it.
    pub fn avatar(name: &str, message: &str) -> Self {
        let entry_type = if name.ends_with("Linden") {
            "ChatTypeLindenChat"
        } else {
            "ChatTypeNormal"
        };
        SimChatLine {
            from: Some(name.to_owned()),
            message: message.to_owned(),
            chat_type: "Normal".to_owned(),
            entry_type: entry_type.to_owned(),
            owner_id: name_uuid(name),
            position: "<128, 128, 25>".to_owned(),
            received_at: None,
        }
    }

    /// A Linden (staff) avatar: `ChatTypeLindenChat` whatever the name (the name should end with
    /// `Linden`, which [`SimChatLine::avatar`] already recognises).
    pub fn linden(name: &str, message: &str) -> Self {
        SimChatLine {
            entry_type: "ChatTypeLindenChat".to_owned(),
            ..SimChatLine::avatar(name, message)
        }
    }

    /// An avatar whispering.
    pub fn whisper(name: &str, message: &str) -> Self {
        SimChatLine {
            chat_type: "Whisper".to_owned(),
            ..SimChatLine::avatar(name, message)
        }
    }

    /// An avatar shouting.
    pub fn shout(name: &str, message: &str) -> Self {
        SimChatLine {
            chat_type: "Shout".to_owned(),
            ..SimChatLine::avatar(name, message)
        }
    }

    /// An object saying something (`llSay`): `ChatTypeObjectChat`, `OwnerID` the UUID of its
    /// (made-up) owner.
    pub fn object(name: &str, message: &str) -> Self {
        SimChatLine {
            from: Some(name.to_owned()),
            message: message.to_owned(),
            chat_type: "Normal".to_owned(),
            entry_type: "ChatTypeObjectChat".to_owned(),
            owner_id: object_owner_uuid(name),
            position: "<1, 2, 3>".to_owned(),
            received_at: None,
        }
    }

    /// An object speaking to its owner only (`llOwnerSay`).
    pub fn owner_say(name: &str, message: &str) -> Self {
        SimChatLine {
            chat_type: "OwnerSay".to_owned(),
            entry_type: "ChatTypeOwnerSay".to_owned(),
            position: "<0, 0, 0>".to_owned(),
            ..SimChatLine::object(name, message)
        }
    }

    /// A script error or `DEBUG_CHANNEL` line from an object: `Type` `Debug`, `ChatTypeObjectChat`.
    pub fn debug(name: &str, message: &str) -> Self {
        SimChatLine {
            chat_type: "Debug".to_owned(),
            ..SimChatLine::object(name, message)
        }
    }

    /// A system line: `From` `Second Life`, the zero `OwnerID`, `ChatTypeNormal` (the viewer does
    /// not tell system chat apart).
    pub fn system(message: &str) -> Self {
        SimChatLine {
            from: Some("Second Life".to_owned()),
            message: message.to_owned(),
            chat_type: "Normal".to_owned(),
            entry_type: "ChatTypeNormal".to_owned(),
            owner_id: ZERO_UUID.to_owned(),
            position: "<0, 0, 0>".to_owned(),
            received_at: None,
        }
    }

    /// The same line, received by the viewer at `received_at`.
    pub fn at(self, received_at: DateTime<Utc>) -> Self {
        SimChatLine {
            received_at: Some(received_at),
            ..self
        }
    }
}

/// One chat message the viewer sent to the simulator (a chat POST that got as far as sending).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaidLine {
    /// The text after the viewer's decoding (`+` → space, then `%XX`); empty when the POST had no
    /// usable `Message` (the real viewer sends an empty message then).
    pub message: String,
    /// The channel.
    pub channel: i32,
    /// `Whisper`, `Normal` or `Shout`, as the simulator hears it.
    pub chat_type: String,
}

/// One line handed out in a chat GET response that was completely written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandedOut {
    /// The key in the response (the `Time`, maybe with `1`s appended).
    pub key: String,
    /// The `Time` field.
    pub time: String,
    /// The `From` field, `None` when omitted.
    pub from: Option<String>,
    /// The `Message` field.
    pub message: String,
    /// The `Type` field.
    pub chat_type: String,
    /// The `EntryType` field.
    pub entry_type: String,
    /// Which chat GET handed it out (1 for the first answered GET, as `n_gets` counts them): lines
    /// of one response share it.
    pub response: u64,
}

/// A queued line, stamped with its receive time.
#[derive(Clone, Debug)]
struct QueuedLine {
    line: SimChatLine,
    received_at: DateTime<Utc>,
}

/// Everything the handlers and the handle share, behind one short-held lock.
struct ViewerState {
    queue: VecDeque<QueuedLine>,
    /// Avatar name → UUID, in the order they became visible.
    avatars: IndexMap<String, String>,
    said: Vec<SaidLine>,
    handed_out: Vec<HandedOut>,
    /// Bytes of the chat responses whose write completed.
    n_bytes_handed_out: u64,
    n_gets: u64,
    n_aborted: u64,
    response_delay: Duration,
    trickle: Option<(usize, Duration)>,
    logged_in: bool,
}

/// The simulator's shared core.
struct Shared {
    dialect: Dialect,
    timezone: Tz,
    own_name: String,
    crash_on_abort: bool,
    /// The `Host` header value accepted (compared case-insensitively); `None` accepts any.
    accepted_host: Option<String>,
    /// The lower-cased chat path prefix.
    chat_prefix: &'static str,
    state: Mutex<ViewerState>,
    /// LookingGlass handles requests on one "REST Input" thread, one after another; a slow
    /// response blocks every other request. Held by a handler until its response is written.
    rest_thread: Arc<tokio::sync::Mutex<()>>,
    /// Cancelled when the server must stop (stop() or a crash).
    server_shutdown: CancellationToken,
    /// Cancelled when the viewer "crashed".
    crashed: CancellationToken,
    /// Woken after every said line, for the CLI's printer.
    said_notify: Notify,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, ViewerState> {
        // A panic while holding this lock could only come from a bug in this module; the state
        // stays usable, so a poisoned lock is taken over rather than spreading the panic.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A running simulated viewer.
pub struct ViewerSim {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl ViewerSim {
    /// Binds `settings.listen` and starts serving.
    pub async fn start(settings: ViewerSimSettings) -> anyhow::Result<ViewerSim> {
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("bind the viewer simulator on {}", settings.listen))?;
        let addr = listener
            .local_addr()
            .context("read the viewer simulator's address")?;
        let accepted_host = if addr.ip().is_unspecified() {
            None
        } else {
            Some(match settings.dialect {
                Dialect::Lookingglass => format!("{}:{}", url_host(addr.ip()), addr.port()),
                Dialect::Keekee => format!("localhost:{}", addr.port()),
            })
        };
        let chat_prefix = match settings.dialect {
            Dialect::Lookingglass => "/api/chat",
            Dialect::Keekee => "/api/lllp/chat",
        };
        let mut avatars = IndexMap::new();
        avatars.insert(settings.own_name.clone(), name_uuid(&settings.own_name));
        let shared = Arc::new(Shared {
            dialect: settings.dialect,
            timezone: settings.timezone,
            own_name: settings.own_name,
            crash_on_abort: settings.crash_on_abort,
            accepted_host,
            chat_prefix,
            state: Mutex::new(ViewerState {
                queue: VecDeque::new(),
                avatars,
                said: Vec::new(),
                handed_out: Vec::new(),
                n_gets: 0,
                n_aborted: 0,
                n_bytes_handed_out: 0,
                response_delay: Duration::ZERO,
                trickle: None,
                logged_in: true,
            }),
            rest_thread: Arc::new(tokio::sync::Mutex::new(())),
            server_shutdown: CancellationToken::new(),
            crashed: CancellationToken::new(),
            said_notify: Notify::new(),
        });
        let handler_shared = shared.clone();
        let handler = move |request: Request| handle_request(handler_shared.clone(), request);
        let server = tokio::spawn(http::serve(
            listener,
            handler,
            shared.server_shutdown.clone(),
        ));
        Ok(ViewerSim {
            addr,
            shared,
            server,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://HOST:PORT` with the host the dialect accepts.
    fn base_url(&self) -> String {
        match self.shared.dialect {
            Dialect::Lookingglass => {
                let ip = if self.addr.ip().is_unspecified() {
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                } else {
                    self.addr.ip()
                };
                format!("http://{}:{}", url_host(ip), self.addr.port())
            }
            Dialect::Keekee => format!("http://localhost:{}", self.addr.port()),
        }
    }

    /// The chat URL: `http://127.0.0.1:PORT/api/chat` (KeeKee: `http://localhost:PORT/api/LLLP/chat`).
    pub fn chat_url(&self) -> String {
        match self.shared.dialect {
            Dialect::Lookingglass => format!("{}/api/chat", self.base_url()),
            Dialect::Keekee => format!("{}/api/LLLP/chat", self.base_url()),
        }
    }

    /// The avatars URL, `.../api/avatars`.
    pub fn avatars_url(&self) -> String {
        format!("{}/api/avatars", self.base_url())
    }

    /// The status URL, `.../api/LLLP/status`.
    pub fn status_url(&self) -> String {
        format!("{}/api/LLLP/status", self.base_url())
    }

    /// A handle to inject chat and read what happened.
    pub fn handle(&self) -> ViewerHandle {
        ViewerHandle {
            shared: self.shared.clone(),
        }
    }

    /// Stops listening, closes every connection and waits for the server task.
    pub async fn stop(self) {
        self.shared.server_shutdown.cancel();
        if let Err(error) = self.server.await {
            tracing::warn!(error = %error, "viewer simulator server task failed");
        }
    }

    /// Resolves when the viewer "crashed": `crash_on_abort` was set and a client abandoned a
    /// response mid-write. Never resolves otherwise.
    pub async fn crashed(&self) {
        self.shared.crashed.cancelled().await;
    }
}

/// Control of a running [`ViewerSim`]: cheap to clone, usable from any task.
#[derive(Clone)]
pub struct ViewerHandle {
    shared: Arc<Shared>,
}

impl ViewerHandle {
    /// An avatar says something on channel 0 ([`SimChatLine::avatar`]); it also becomes visible in
    /// `/api/avatars`.
    pub fn say(&self, from: &str, message: &str) {
        self.add_avatar(from);
        self.push(SimChatLine::avatar(from, message));
    }

    /// Enqueues any line, as the viewer does on `ChatFromSimulator`. An empty message is ignored.
    pub fn push(&self, line: SimChatLine) {
        enqueue(&self.shared, line);
    }

    /// The stable lower-case v4 UUID of the avatar `name`: what its `OwnerID` carries and what
    /// `/api/avatars` lists.
    pub fn avatar_uuid(&self, name: &str) -> String {
        name_uuid(name)
    }

    /// Makes the avatar visible in `/api/avatars`.
    pub fn add_avatar(&self, name: &str) {
        let mut state = self.shared.state();
        if !state.avatars.contains_key(name) {
            state.avatars.insert(name.to_owned(), name_uuid(name));
        }
    }

    /// Every chat message the viewer sent to the simulator, in order.
    pub fn said(&self) -> Vec<SaidLine> {
        self.shared.state().said.clone()
    }

    /// Every line handed out in a completely written chat GET response, in order. They are
    /// recorded just after the last byte reaches the socket, so a client that has just read a
    /// response should poll for them rather than expect them at once.
    pub fn handed_out(&self) -> Vec<HandedOut> {
        self.shared.state().handed_out.clone()
    }

    /// Bytes of the completely written chat GET responses.
    pub fn n_bytes_handed_out(&self) -> u64 {
        self.shared.state().n_bytes_handed_out
    }

    /// Chat GETs answered (the queue was drained for each).
    pub fn n_gets(&self) -> u64 {
        self.shared.state().n_gets
    }

    /// Responses the client abandoned before they were completely written: each would have
    /// crashed the real viewer.
    pub fn n_aborted(&self) -> u64 {
        self.shared.state().n_aborted
    }

    /// Lines waiting in the queue.
    pub fn queue_len(&self) -> usize {
        self.shared.state().queue.len()
    }

    /// Wait this long before answering a chat GET. The queue is drained before the wait, as the
    /// real viewer drains before writing.
    pub fn set_response_delay(&self, delay: Duration) {
        self.shared.state().response_delay = delay;
    }

    /// Write chat GET bodies in pieces of `chunk` bytes with a pause between them.
    pub fn set_trickle(&self, trickle: Option<(usize, Duration)>) {
        self.shared.state().trickle = trickle;
    }

    /// Logged in or out, as `/api/LLLP/status` reports it. The chat queue survives either.
    pub fn set_logged_in(&self, logged_in: bool) {
        self.shared.state().logged_in = logged_in;
    }
}

/// Enqueues `line` unless its message is empty, stamping it with its receive time.
fn enqueue(shared: &Shared, line: SimChatLine) {
    if line.message.is_empty() {
        return;
    }
    let received_at = line.received_at.unwrap_or_else(Utc::now);
    shared
        .state()
        .queue
        .push_back(QueuedLine { line, received_at });
}

/// A stable lower-case v4 UUID derived from `name` (two FNV-1a 64-bit hashes with different
/// offsets), so tests can predict it and it never changes between runs.
fn name_uuid(name: &str) -> String {
    let mut first: u64 = 0xcbf2_9ce4_8422_2325;
    let mut second: u64 = 0x6c62_272e_07bb_0142;
    for byte in name.bytes() {
        first = (first ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        second = (second ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    second = second.rotate_left(17) ^ first;
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&first.to_be_bytes());
    bytes[8..].copy_from_slice(&second.to_be_bytes());
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The made-up owner of an object named `name`.
fn object_owner_uuid(name: &str) -> String {
    name_uuid(&format!("owner of {name}"))
}

/// An IP as it appears in a URL or a `Host` header.
fn url_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// `DateTime.Now.ToString("yyyyMMddhhmmssfff")` in the viewer's zone: `hh` is the 12-hour clock
/// (01–12) with no AM/PM, so 13:05 and 01:05 give the same string, and 00:05 shows `12`.
fn viewer_time(received_at: DateTime<Utc>, timezone: Tz) -> String {
    received_at
        .with_timezone(&timezone)
        .format("%Y%m%d%I%M%S%3f")
        .to_string()
}

/// Appends `text` as a JSON string the way LitJson writes it: every non-ASCII character as
/// `\uXXXX` (uppercase hex, UTF-16 surrogate pairs), short escapes for `"` `\` `\n` `\r` `\t`
/// `\b` `\f`, `\u00XX` for other controls, and `/` left alone. The output is pure ASCII.
fn push_json_string(out: &mut String, text: &str) {
    out.push('"');
    for character in text.chars() {
        match character {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(character),
            _ => {
                let mut units = [0u16; 2];
                for unit in character.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04X}"));
                }
            }
        }
    }
    out.push('"');
}

/// Appends `"name":"value"` to an object body, with a comma when needed, or nothing for an
/// empty value: `SerializeJsonString` drops "default" values (the empty string) from maps.
fn push_field(out: &mut String, first: &mut bool, name: &str, value: &str) {
    if value.is_empty() {
        return;
    }
    if !*first {
        out.push(',');
    }
    *first = false;
    push_json_string(out, name);
    out.push(':');
    push_json_string(out, value);
}

/// The routes of the simulated viewer, after host checking.
enum Route {
    Chat,
    Avatars,
    /// `/api/LLLP/status`, with whether a path suffix followed (which always answers `{}`).
    Status {
        suffix: bool,
    },
    /// No handler: the real viewer never answers.
    Unknown,
}

fn route(shared: &Shared, path: &str) -> Route {
    // `request.Url.AbsolutePath.ToLower()` then the first registered prefix that matches.
    let lower = path.to_lowercase();
    if lower.starts_with(shared.chat_prefix) {
        Route::Chat
    } else if lower.starts_with("/api/avatars") {
        Route::Avatars
    } else if let Some(rest) = lower.strip_prefix("/api/lllp/status") {
        Route::Status {
            suffix: !rest.is_empty(),
        }
    } else {
        Route::Unknown
    }
}

/// Serves one request the way the viewer's REST server does.
async fn handle_request(shared: Arc<Shared>, request: Request) -> Reply {
    if shared.crashed.is_cancelled() {
        return Reply::Close;
    }
    // The HTTP stack checks the Host header against the listener prefix before LookingGlass sees
    // anything (spec §1.1).
    if let Some(accepted) = &shared.accepted_host {
        let host_ok = request
            .header("host")
            .is_some_and(|host| host.trim().eq_ignore_ascii_case(accepted));
        if !host_ok {
            return Reply::Respond(
                Response::new(400, "text/html", "<h1>Bad Request (Invalid host)</h1>")
                    .with_header("Server", "Mono-HTTPAPI/1.0")
                    .with_header("Connection", "close"),
            );
        }
    }
    let route = route(&shared, &request.path);
    let is_get = request.method.eq_ignore_ascii_case("GET");
    let is_post = request.method.eq_ignore_ascii_case("POST");
    if matches!(route, Route::Unknown) || !(is_get || is_post) {
        // No handler for the path, or a method RestHandler does not handle: the request is
        // dropped on the floor and the client waits forever.
        return Reply::NoAnswer;
    }

    let rest_thread = shared.rest_thread.clone().lock_owned().await;
    match route {
        Route::Chat if is_get => chat_get(&shared, rest_thread).await,
        Route::Chat => chat_post(&shared, &request.body),
        Route::Avatars if is_get => Reply::Respond(ok_response(&shared, avatars_body(&shared))),
        Route::Status { suffix } if is_get => {
            let body = if suffix {
                "{}".to_owned()
            } else {
                status_body(&shared)
            };
            Reply::Respond(ok_response(&shared, body))
        }
        // POSTs to the avatars and status handlers change nothing and answer `{}`.
        Route::Avatars | Route::Status { .. } => {
            Reply::Respond(ok_response(&shared, "{}".to_owned()))
        }
        Route::Unknown => Reply::NoAnswer,
    }
}

/// A `200` with the viewer's headers (`RestManager.ConstructSimpleResponse`).
fn ok_response(shared: &Shared, body: String) -> Response {
    let content_type = match shared.dialect {
        Dialect::Lookingglass => "text/json",
        Dialect::Keekee => "application/json",
    };
    Response::new(200, "", body)
        .with_header("Server", "LookingGlass")
        .with_header("Cache-Control", "no-cache")
        .with_header("Content-Type", content_type)
}

/// `GET /api/chat`: drain the whole queue, then (after the configured delay) write it; the lines
/// count as handed out only if the write completes.
async fn chat_get(shared: &Arc<Shared>, rest_thread: tokio::sync::OwnedMutexGuard<()>) -> Reply {
    let (batch, delay, trickle, response) = {
        let mut state = shared.state();
        state.n_gets += 1;
        let batch: Vec<QueuedLine> = state.queue.drain(..).collect();
        (batch, state.response_delay, state.trickle, state.n_gets)
    };

    let mut body = String::from("{");
    let mut handed_out = Vec::with_capacity(batch.len());
    let mut keys = HashSet::with_capacity(batch.len());
    for (index, queued) in batch.iter().enumerate() {
        let time = viewer_time(queued.received_at, shared.timezone);
        // LLChat.cs:192-195: append "1" until the key is unique within this response.
        let mut key = time.clone();
        while keys.contains(&key) {
            key.push('1');
        }
        keys.insert(key.clone());

        let line = &queued.line;
        let owner_id = match shared.dialect {
            Dialect::Keekee if line.owner_id == ZERO_UUID => "",
            _ => line.owner_id.as_str(),
        };
        if index > 0 {
            body.push(',');
        }
        push_json_string(&mut body, &key);
        body.push_str(":{");
        let mut first = true;
        push_field(&mut body, &mut first, "Time", &time);
        push_field(
            &mut body,
            &mut first,
            "From",
            line.from.as_deref().unwrap_or(""),
        );
        push_field(&mut body, &mut first, "Message", &line.message);
        push_field(&mut body, &mut first, "Type", &line.chat_type);
        push_field(&mut body, &mut first, "EntryType", &line.entry_type);
        push_field(&mut body, &mut first, "Position", &line.position);
        push_field(&mut body, &mut first, "OwnerID", owner_id);
        body.push('}');

        handed_out.push(HandedOut {
            key,
            time,
            from: line.from.clone().filter(|from| !from.is_empty()),
            message: line.message.clone(),
            chat_type: line.chat_type.clone(),
            entry_type: line.entry_type.clone(),
            response,
        });
    }
    body.push('}');

    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    let (written_tx, written_rx) = oneshot::channel();
    let n_bytes = body.len() as u64;
    let mut response = ok_response(shared, body);
    response.trickle = trickle;
    response.written = Some(written_tx);

    let shared = shared.clone();
    tokio::spawn(async move {
        // The REST thread stays busy until the response is written (or fails).
        let _rest_thread = rest_thread;
        match written_rx.await {
            Ok(true) => {
                let mut state = shared.state();
                state.handed_out.extend(handed_out);
                state.n_bytes_handed_out += n_bytes;
            }
            // The server is stopping (or dropped the response): that is our own doing, not a
            // client abandoning a response.
            Err(_) => {}
            Ok(false) if shared.server_shutdown.is_cancelled() => {}
            Ok(false) => {
                let n_lost = handed_out.len();
                shared.state().n_aborted += 1;
                tracing::warn!(
                    n_lost,
                    "a client abandoned a chat response mid-write: the real viewer would have crashed"
                );
                if shared.crash_on_abort {
                    shared.crashed.cancel();
                    shared.server_shutdown.cancel();
                }
            }
        }
    });
    Reply::Respond(response)
}

/// A value of the POST body map, reduced to what `OSD.AsString()` gives (or its absence).
type BodyMap = IndexMap<String, String>;

/// `POST /api/chat`: sniff and parse the body, send the chat if `Channel` and `Type` are usable,
/// and answer `200 {}` whatever happened (KeeKee: an empty body, or no answer on failure).
fn chat_post(shared: &Shared, raw_body: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw_body);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let map = if text.starts_with('{') {
        lenient_json::parse_object(text).unwrap_or_default()
    } else {
        parse_form(text)
    };
    let outcome = said_line_from(&map);
    match &outcome {
        Some(said) => {
            {
                let mut state = shared.state();
                state.said.push(said.clone());
            }
            shared.said_notify.notify_one();
            if said.channel == 0 {
                // The simulator echoes chat on channel 0 back to the speaker (spec §2.8); it
                // truncates to 1000 characters on delivery, and an empty message is never queued.
                let mut echo =
                    SimChatLine::avatar(&shared.own_name, &truncate_utf16(&said.message));
                echo.chat_type = said.chat_type.clone();
                enqueue(shared, echo);
            }
        }
        None => tracing::debug!("viewer simulator: chat post without a usable Channel or Type"),
    }
    match (shared.dialect, outcome) {
        (Dialect::Lookingglass, _) => Reply::Respond(ok_response(shared, "{}".to_owned())),
        (Dialect::Keekee, Some(_)) => Reply::Respond(ok_response(shared, String::new())),
        (Dialect::Keekee, None) => Reply::NoAnswer,
    }
}

/// LLChat.PostHandler's field handling: `Channel` and `Type` must be present (a missing key is a
/// NullReferenceException), `Channel` must pass `Int32.Parse`, a missing `Message` is empty.
fn said_line_from(map: &BodyMap) -> Option<SaidLine> {
    let channel = int32_parse(map.get("Channel")?)?;
    let chat_type = match map.get("Type")?.as_str() {
        "Whisper" => "Whisper",
        "Shout" => "Shout",
        _ => "Normal",
    };
    let message = map
        .get("Message")
        .map(|message| unescape_data_string(&message.replace('+', " ")))
        .unwrap_or_default();
    Some(SaidLine {
        message,
        channel,
        chat_type: chat_type.to_owned(),
    })
}

/// `RestHandler.MapizeTheBody`'s form branch: split on `&`, then `=`, keep pairs of exactly two
/// pieces, trim both, no URL-decoding. A later duplicate key wins.
fn parse_form(text: &str) -> BodyMap {
    let mut map = BodyMap::new();
    for pair in text.split('&') {
        let pieces: Vec<&str> = pair.split('=').collect();
        if let [key, value] = pieces.as_slice() {
            map.insert(key.trim().to_owned(), value.trim().to_owned());
        }
    }
    map
}

/// .NET `Int32.Parse(s)` with `NumberStyles.Integer` in en-US: optional surrounding white space
/// (U+0009–U+000D, U+0020), an optional sign, ASCII digits, within `i32`.
fn int32_parse(text: &str) -> Option<i32> {
    let trimmed = text.trim_matches(|character: char| {
        character == ' ' || ('\u{9}'..='\u{d}').contains(&character)
    });
    let (negative, digits) = match trimmed.as_bytes().first() {
        Some(b'-') => (true, &trimmed[1..]),
        Some(b'+') => (false, &trimmed[1..]),
        _ => (false, trimmed),
    };
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let magnitude: i64 = digits
        .trim_start_matches('0')
        .parse()
        .ok()
        .or_else(|| digits.bytes().all(|byte| byte == b'0').then_some(0))?;
    let value = if negative { -magnitude } else { magnitude };
    i32::try_from(value).ok()
}

/// `Uri.UnescapeDataString`: decodes `%XX` sequences that form valid UTF-8; an invalid or stray
/// `%` (`100%`, `%zz`, a lone `%E9`) is left as it is.
fn unescape_data_string(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] != b'%' {
            // Copy everything up to the next '%' (a char boundary, since '%' is ASCII).
            let next = bytes[index..]
                .iter()
                .position(|byte| *byte == b'%')
                .map_or(bytes.len(), |offset| index + offset);
            out.push_str(&text[index..next]);
            index = next;
            continue;
        }
        // A run of consecutive %XX escapes, decoded together so multi-byte characters work.
        let mut run = Vec::new();
        let mut cursor = index;
        while let Some(byte) = escaped_byte(bytes, cursor) {
            run.push(byte);
            cursor += 3;
        }
        if run.is_empty() {
            out.push('%');
            index += 1;
            continue;
        }
        let mut position = 0;
        while position < run.len() {
            let width = utf8_width(run[position]);
            let decoded = run
                .get(position..position + width)
                .and_then(|piece| std::str::from_utf8(piece).ok());
            match decoded {
                Some(piece) if width > 0 => {
                    out.push_str(piece);
                    position += width;
                }
                _ => {
                    // Keep the original escape text (with its hex digits' case).
                    let start = index + position * 3;
                    out.push_str(&text[start..start + 3]);
                    position += 1;
                }
            }
        }
        index = cursor;
    }
    out
}

/// The byte of a `%XX` escape starting at `at`, if there is one.
fn escaped_byte(bytes: &[u8], at: usize) -> Option<u8> {
    if bytes.get(at) != Some(&b'%') {
        return None;
    }
    let high = char::from(*bytes.get(at + 1)?).to_digit(16)?;
    let low = char::from(*bytes.get(at + 2)?).to_digit(16)?;
    u8::try_from(high * 16 + low).ok()
}

/// The length of the UTF-8 sequence a leading byte announces; 0 for a byte that cannot lead.
fn utf8_width(byte: u8) -> usize {
    match byte {
        0x00..=0x7f => 1,
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => 0,
    }
}

/// The longest prefix of `text` of at most 1000 UTF-16 code units, not splitting a character.
fn truncate_utf16(text: &str) -> String {
    let mut units = 0;
    let mut end = text.len();
    for (offset, character) in text.char_indices() {
        units += character.len_utf16();
        if units > ECHO_MAX_UTF16_UNITS {
            end = offset;
            break;
        }
    }
    text[..end].to_owned()
}

/// `GET /api/avatars`: `<grid>-Avatar-<uuid>` → the avatar's details, all strings.
fn avatars_body(shared: &Shared) -> String {
    let avatars = shared.state().avatars.clone();
    let mut body = String::from("{");
    for (index, (name, uuid)) in avatars.iter().enumerate() {
        if index > 0 {
            body.push(',');
        }
        push_json_string(&mut body, &format!("{GRID_NAME}-Avatar-{uuid}"));
        body.push_str(":{");
        let fields = [
            ("Name", name.as_str()),
            ("Region", REGION_NAME),
            ("X", "128"),
            ("Y", "128"),
            ("Z", "25"),
            ("Distance", "0"),
            ("Flags", ""),
        ];
        for (field_index, (field, value)) in fields.iter().enumerate() {
            if field_index > 0 {
                body.push(',');
            }
            push_json_string(&mut body, field);
            body.push(':');
            push_json_string(&mut body, value);
        }
        body.push_str(",\"LLtextures\":{}}");
    }
    body.push('}');
    body
}

/// `GET /api/LLLP/status`: the login ParameterSet, `{"name":{"value":…}}`, empty values as `{}`.
fn status_body(shared: &Shared) -> String {
    let logged_in = shared.state().logged_in;
    let (first, last) = shared
        .own_name
        .split_once(' ')
        .unwrap_or((shared.own_name.as_str(), ""));
    let when_in = |value: &'static str| if logged_in { value } else { "" };
    let parameters: [(&str, &str); 12] = [
        ("first", first),
        ("last", last),
        ("password", ""),
        ("grid", GRID_NAME),
        ("sim", ""),
        ("msg", when_in("Login successful")),
        ("currentsim", when_in(REGION_NAME)),
        ("currentgrid", when_in(GRID_NAME)),
        ("loginstate", if logged_in { "login" } else { "logout" }),
        ("positionx", when_in("128")),
        ("positiony", when_in("128")),
        ("positionz", when_in("25")),
    ];
    let mut body = String::from("{");
    for (index, (name, value)) in parameters.iter().enumerate() {
        if index > 0 {
            body.push(',');
        }
        push_json_string(&mut body, name);
        if value.is_empty() {
            body.push_str(":{}");
        } else {
            body.push_str(":{\"value\":");
            push_json_string(&mut body, value);
            body.push('}');
        }
        if *name == "currentgrid" {
            body.push_str(",\"possiblegrids\":{\"value\":[");
            push_json_string(&mut body, GRID_NAME);
            body.push_str("]}");
        }
    }
    body.push('}');
    body
}

/// A lenient JSON reader standing in for LitJson + `OSDParser.DeserializeJson`, reduced to what
/// the chat POST needs: the top-level object's values as `OSD.AsString()` gives them.
mod lenient_json {
    use super::BodyMap;

    /// Parses a top-level object. LitJson accepts single-quoted strings and `/* */` (and `//`)
    /// comments, and the last of duplicate keys wins; any syntax error (a trailing comma, for
    /// one) gives `None`, which the viewer turns into an empty map.
    pub(super) fn parse_object(text: &str) -> Option<BodyMap> {
        let mut parser = Parser {
            chars: text.chars().collect(),
            position: 0,
        };
        let value = parser.value(0)?;
        parser.skip_blank()?;
        match value {
            Value::Object(map) => Some(map),
            _ => None,
        }
    }

    /// Nesting deeper than this is refused rather than risking the stack.
    const MAX_DEPTH: usize = 64;

    enum Value {
        /// The `AsString()` of a scalar (or of an array, which is `""`).
        Scalar(String),
        Object(BodyMap),
    }

    impl Value {
        fn into_osd_string(self) -> String {
            match self {
                Value::Scalar(text) => text,
                // OSDMap inherits OSD.AsString(), the empty string.
                Value::Object(_) => String::new(),
            }
        }
    }

    struct Parser {
        chars: Vec<char>,
        position: usize,
    }

    impl Parser {
        fn peek(&self) -> Option<char> {
            self.chars.get(self.position).copied()
        }

        fn bump(&mut self) -> Option<char> {
            let character = self.peek()?;
            self.position += 1;
            Some(character)
        }

        /// Skips white space and comments; `None` on an unterminated comment.
        fn skip_blank(&mut self) -> Option<()> {
            loop {
                match self.peek() {
                    Some(character) if character.is_whitespace() => self.position += 1,
                    Some('/') => match self.chars.get(self.position + 1) {
                        Some('*') => {
                            self.position += 2;
                            loop {
                                if self.bump()? == '*' && self.peek() == Some('/') {
                                    self.position += 1;
                                    break;
                                }
                            }
                        }
                        Some('/') => while !matches!(self.bump(), None | Some('\n')) {},
                        _ => return Some(()),
                    },
                    _ => return Some(()),
                }
            }
        }

        fn value(&mut self, depth: usize) -> Option<Value> {
            if depth > MAX_DEPTH {
                return None;
            }
            self.skip_blank()?;
            match self.peek()? {
                '{' => self.object(depth).map(Value::Object),
                '[' => {
                    self.array(depth)?;
                    Some(Value::Scalar(String::new()))
                }
                '"' | '\'' => self.string().map(Value::Scalar),
                _ => self.literal().map(Value::Scalar),
            }
        }

        fn object(&mut self, depth: usize) -> Option<BodyMap> {
            self.bump()?; // '{'
            let mut map = BodyMap::new();
            self.skip_blank()?;
            if self.peek()? == '}' {
                self.position += 1;
                return Some(map);
            }
            loop {
                self.skip_blank()?;
                let key = match self.peek()? {
                    '"' | '\'' => self.string()?,
                    _ => return None,
                };
                self.skip_blank()?;
                if self.bump()? != ':' {
                    return None;
                }
                let value = self.value(depth + 1)?;
                // IndexMap::insert keeps the first position but takes the last value.
                map.insert(key, value.into_osd_string());
                self.skip_blank()?;
                match self.bump()? {
                    ',' => continue,
                    '}' => return Some(map),
                    _ => return None,
                }
            }
        }

        fn array(&mut self, depth: usize) -> Option<()> {
            self.bump()?; // '['
            self.skip_blank()?;
            if self.peek()? == ']' {
                self.position += 1;
                return Some(());
            }
            loop {
                self.value(depth + 1)?;
                self.skip_blank()?;
                match self.bump()? {
                    ',' => continue,
                    ']' => return Some(()),
                    _ => return None,
                }
            }
        }

        fn string(&mut self) -> Option<String> {
            let quote = self.bump()?;
            let mut out = String::new();
            loop {
                match self.bump()? {
                    character if character == quote => return Some(out),
                    '\\' => match self.bump()? {
                        'n' => out.push('\n'),
                        'r' => out.push('\r'),
                        't' => out.push('\t'),
                        'b' => out.push('\u{8}'),
                        'f' => out.push('\u{c}'),
                        'u' => {
                            let unit = self.hex4()?;
                            if (0xd800..0xdc00).contains(&unit)
                                && self.peek() == Some('\\')
                                && self.chars.get(self.position + 1) == Some(&'u')
                            {
                                let saved = self.position;
                                self.position += 2;
                                let low = self.hex4()?;
                                if (0xdc00..0xe000).contains(&low) {
                                    let combined =
                                        0x10000 + ((unit - 0xd800) << 10) + (low - 0xdc00);
                                    out.push(char::from_u32(combined).unwrap_or('\u{fffd}'));
                                    continue;
                                }
                                self.position = saved;
                            }
                            out.push(char::from_u32(unit).unwrap_or('\u{fffd}'));
                        }
                        other => out.push(other),
                    },
                    character => out.push(character),
                }
            }
        }

        fn hex4(&mut self) -> Option<u32> {
            let mut value = 0;
            for _ in 0..4 {
                value = value * 16 + self.bump()?.to_digit(16)?;
            }
            Some(value)
        }

        /// A number, `true`, `false` or `null`, as `AsString()` renders it.
        fn literal(&mut self) -> Option<String> {
            let start = self.position;
            while self.peek().is_some_and(|character| {
                character.is_ascii_alphanumeric() || "+-.".contains(character)
            }) {
                self.position += 1;
            }
            let word: String = self.chars[start..self.position].iter().collect();
            match word.as_str() {
                // OSDBoolean.AsString() is "1" or "0"; an undefined OSD's is "".
                "true" => Some("1".to_owned()),
                "false" => Some("0".to_owned()),
                "null" => Some(String::new()),
                _ => number_as_string(&word),
            }
        }
    }

    /// A JSON number as .NET prints the OSDInteger/OSDReal LitJson makes of it: integers as
    /// digits, reals in the shortest form (`1.0` → `1`, so `Channel` `1.0` parses as 1).
    fn number_as_string(word: &str) -> Option<String> {
        let body = word.strip_prefix('-').unwrap_or(word);
        if body.is_empty() || !body.starts_with(|character: char| character.is_ascii_digit()) {
            return None;
        }
        if body.bytes().all(|byte| byte.is_ascii_digit()) {
            let trimmed = body.trim_start_matches('0');
            let digits = if trimmed.is_empty() { "0" } else { trimmed };
            let negative = word.starts_with('-') && digits != "0";
            return Some(format!("{}{digits}", if negative { "-" } else { "" }));
        }
        let value: f64 = word.parse().ok()?;
        if value.fract() == 0.0 && value.abs() < 1e15 {
            // Exact: the value is an integer well within f64's exact range.
            Some(format!("{}", value as i64))
        } else {
            Some(format!("{value}"))
        }
    }
}

/// `opensim-chat-relay sim viewer`: serve the simulated viewer until Ctrl-C.
#[derive(clap::Args, Debug, Clone)]
pub struct ViewerArgs {
    /// Address to listen on. The viewer accepts only requests whose Host header names this
    /// address (KeeKee: `localhost:PORT`); `0.0.0.0` accepts any Host.
    #[arg(long, default_value = "127.0.0.1:9144")]
    pub listen: SocketAddr,
    /// Which implementation to simulate.
    #[arg(long, value_enum, default_value_t = Dialect::Lookingglass)]
    pub dialect: Dialect,
    /// The viewer machine's time zone (IANA name), used for the 12-hour `Time` field.
    #[arg(long, default_value = "UTC", value_parser = parse_timezone)]
    pub timezone: Tz,
    /// The viewer's own avatar name, shown by /api/LLLP/status.
    #[arg(long, default_value = "Relay Bot")]
    pub own_name: String,
    /// Exit with an error, as the real viewer dies, when a client abandons a response mid-write.
    #[arg(long)]
    pub crash_on_abort: bool,
    /// Lines per second of generated avatar chat (0 = none).
    #[arg(long, default_value_t = 0.0)]
    pub chatter: f64,
    /// End each chatter line with ` @<unix microseconds>` of the moment it was said, so a load test
    /// can measure capture → CMS latency across processes.
    #[arg(long)]
    pub chatter_stamp: bool,
    /// Pad each chatter line with words to at least this many bytes (0 = no padding).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub chatter_bytes: usize,
}

/// Parses an IANA time zone name for clap.
fn parse_timezone(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>().map_err(|_| {
        format!("unknown time zone {name:?} (expected an IANA name such as Europe/Berlin)")
    })
}

/// The avatars of the generated chatter: two that a relay typically maps and one it does not.
const CHATTER_AVATARS: [&str; 3] = ["Alice Resident", "Bob Builder", "Carol Visitor"];

/// How chatter lines look beyond `hello #N from NAME` (see [`ViewerArgs`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct ChatterStyle {
    /// Append ` @<unix microseconds>` of the moment the line is said.
    pub stamp: bool,
    /// Pad the line with words to at least this many bytes.
    pub min_bytes: usize,
}

/// Makes the chatter avatars say numbered lines, `lines_per_second` in all, until `shutdown` is
/// cancelled. Used by `--chatter` and by the demo.
pub fn spawn_chatter(
    handle: ViewerHandle,
    lines_per_second: f64,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    spawn_chatter_styled(handle, lines_per_second, ChatterStyle::default(), shutdown)
}

/// [`spawn_chatter`] with lines shaped by `style`. The timer ticks at most 1000 times a second;
/// each tick says every line due by then, so rates above 1000 lines/s come in small bursts.
pub fn spawn_chatter_styled(
    handle: ViewerHandle,
    lines_per_second: f64,
    style: ChatterStyle,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if !lines_per_second.is_finite() || lines_per_second <= 0.0 {
            return;
        }
        let period = Duration::from_secs_f64(1.0 / lines_per_second.min(1000.0));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let started = tokio::time::Instant::now();
        let mut line_number: u64 = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            // At least one line per tick (the first one at once), then catch up with the clock.
            let due = (started.elapsed().as_secs_f64() * lines_per_second) as u64;
            let until = due.max(line_number + 1);
            while line_number < until {
                line_number += 1;
                let index = usize::try_from(line_number % 3).unwrap_or(0);
                let speaker = CHATTER_AVATARS[index];
                handle.say(speaker, &chatter_line(line_number, speaker, style));
            }
        }
    })
}

fn chatter_line(line_number: u64, speaker: &str, style: ChatterStyle) -> String {
    const FILLER: &str = " the quick brown fox jumps over the lazy dog";
    let mut line = format!("hello #{line_number} from {speaker}");
    while line.len() < style.min_bytes {
        let missing = style.min_bytes - line.len();
        line.push_str(&FILLER[..missing.min(FILLER.len())]);
    }
    if style.stamp {
        let micros = Utc::now().timestamp_micros();
        line.push_str(&format!(" @{micros}"));
    }
    line
}

/// Runs the simulated viewer for the CLI: prints what it serves and, line by line, what is said
/// in-world; returns an error if it "crashed".
pub async fn run_cli(args: ViewerArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if !args.chatter.is_finite() || args.chatter < 0.0 {
        anyhow::bail!("--chatter must be a number of lines per second, 0 or more");
    }
    let sim = ViewerSim::start(ViewerSimSettings {
        listen: args.listen,
        dialect: args.dialect,
        timezone: args.timezone,
        own_name: args.own_name.clone(),
        crash_on_abort: args.crash_on_abort,
    })
    .await?;
    println!(
        "viewer simulator ({:?}, {}, own avatar {:?}) on {}",
        args.dialect,
        args.timezone,
        args.own_name,
        sim.addr()
    );
    println!("  chat:    {}", sim.chat_url());
    println!("  avatars: {}", sim.avatars_url());
    println!("  status:  {}", sim.status_url());

    let handle = sim.handle();
    let style = ChatterStyle {
        stamp: args.chatter_stamp,
        min_bytes: args.chatter_bytes,
    };
    let chatter = spawn_chatter_styled(handle.clone(), args.chatter, style, shutdown.child_token());
    let mut n_printed = 0;
    let outcome = loop {
        for said in handle.said().iter().skip(n_printed) {
            println!(
                "said in-world: channel {} {}: {}",
                said.channel, said.chat_type, said.message
            );
            n_printed += 1;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            () = sim.crashed() => break Err(anyhow::anyhow!(
                "the viewer crashed: a client abandoned a chat response mid-write"
            )),
            () = sim.shared.said_notify.notified() => {}
        }
    };
    chatter.abort();
    sim.stop().await;
    outcome
}
