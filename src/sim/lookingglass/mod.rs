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
//! This file owns the public face: [`ViewerSim`] (start, URLs, stop, crash), [`ViewerHandle`] and
//! the lines they speak of. The rest is split by seam: `queue` (the shared state and its one chat
//! queue), `presence` (where the viewer is: connected, disconnected by a region restart, logged
//! out, elsewhere; CommLLLP's counters, the REST login and logout, who is heard), `routes` (the REST server's routing and handlers), `dotnet` (the .NET and Mono rules
//! the viewer inherits), `json` (LitJson's writer and the lenient reader of POST bodies),
//! `chatter` (generated avatar chat) and `cli` (the `sim viewer` entry point, [`run_cli`]).
//!
//! It must not use the relay's wire types or serde for the chat JSON: it writes the JSON by hand
//! from the spec, so a mistake in the relay's decoding cannot be mirrored here.

mod chatter;
mod cli;
mod dotnet;
mod json;
mod presence;
mod queue;
mod routes;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::sim::http::Request;
pub use crate::sim::lookingglass::chatter::{ChatterStyle, spawn_chatter, spawn_chatter_styled};
pub use crate::sim::lookingglass::cli::{ViewerArgs, run_cli};
pub use crate::sim::lookingglass::presence::{
    CommCounters, Connection, SAY_DISTANCE, SHOUT_DISTANCE, SimAvatar, WHISPER_DISTANCE,
};
use crate::sim::lookingglass::queue::{Shared, enqueue, name_uuid, object_owner_uuid};
use crate::sim::server::{self, Server};

/// The grid name the simulated viewer is logged in to: the prefix of `/api/avatars` keys and the
/// `grid` of `/api/LLLP/status`.
const GRID_NAME: &str = "OSGrid";
/// The region the viewer and every simulated avatar stand in at the start.
pub const REGION_NAME: &str = "Sim";
/// The zero UUID: system lines carry it as `OwnerID`.
const ZERO_UUID: &str = "00000000-0000-0000-0000-000000000000";

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

/// A running simulated viewer.
pub struct ViewerSim {
    server: Server,
    shared: Arc<Shared>,
}

impl ViewerSim {
    /// Binds `settings.listen` and starts serving.
    pub async fn start(settings: ViewerSimSettings) -> anyhow::Result<ViewerSim> {
        let bound = server::bind(settings.listen, "viewer simulator").await?;
        let addr = bound.addr();
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
        let shared = Arc::new(Shared::new(settings, accepted_host, chat_prefix));
        let handler_shared = shared.clone();
        let handler =
            move |request: Request| routes::handle_request(handler_shared.clone(), request);
        // The viewer stops its own server when it "crashes", so the token is the shared one.
        let server = bound.serve(handler, shared.server_shutdown.clone());
        Ok(ViewerSim { server, shared })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://HOST:PORT` with the host the dialect accepts.
    fn base_url(&self) -> String {
        let addr = self.addr();
        match self.shared.dialect {
            Dialect::Lookingglass => {
                let ip = if addr.ip().is_unspecified() {
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                } else {
                    addr.ip()
                };
                format!("http://{}:{}", url_host(ip), addr.port())
            }
            Dialect::Keekee => format!("http://localhost:{}", addr.port()),
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

    /// CommLLLP's counters, `.../api/stats/Comm/stats`.
    pub fn comm_stats_url(&self) -> String {
        format!("{}/api/stats/Comm/stats", self.base_url())
    }

    /// The REST login, `.../api/LLLP/connect/login` (`logout` likewise).
    pub fn connect_url(&self, action: &str) -> String {
        format!("{}/api/LLLP/connect/{action}", self.base_url())
    }

    /// A handle to inject chat and read what happened.
    pub fn handle(&self) -> ViewerHandle {
        ViewerHandle {
            shared: self.shared.clone(),
        }
    }

    /// Stops listening, closes every connection and waits for the server task.
    pub async fn stop(mut self) {
        self.server.stop().await;
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

    /// Makes the avatar visible in `/api/avatars`, next to the viewer's own (where it stands in
    /// the viewer's region at the start), unless it is already.
    pub fn add_avatar(&self, name: &str) {
        let mut state = self.shared.state();
        if !state.avatars.contains_key(name) {
            let avatar = SimAvatar {
                uuid: name_uuid(name),
                position: [128.0, 128.0, 25.0],
                region: state.place.region.clone(),
            };
            state.avatars.insert(name.to_owned(), avatar);
        }
    }

    /// Puts the avatar `name` at `position` in `region` (making it visible). What it says is heard
    /// only within OpenSim's chat distances of the viewer's own avatar, in its region.
    pub fn place_avatar(&self, name: &str, region: &str, position: [f64; 3]) {
        let avatar = SimAvatar {
            uuid: name_uuid(name),
            position,
            region: region.to_owned(),
        };
        self.shared.state().avatars.insert(name.to_owned(), avatar);
    }

    /// Moves the viewer's own avatar to `position` in its region.
    pub fn set_own_position(&self, position: [f64; 3]) {
        let mut state = self.shared.state();
        state.place.own_position = position;
        let own = self.shared.own_name.clone();
        if let Some(avatar) = state.avatars.get_mut(&own) {
            avatar.position = position;
        }
    }

    /// The region restarts (spec §10): a connected viewer is disconnected for good. Its status
    /// keeps `loginstate: login` with `currentsim` and the position empty, its avatar list keeps
    /// the avatars it last saw, `network_disconnected` rises, and nothing said is heard until a
    /// REST logout and login.
    pub fn restart_region(&self) {
        self.shared.with_place(|place| place.region_restarted());
    }

    /// The region restarts right after the viewer answers its next status or counters read: a
    /// restart that falls between a client's two reads.
    pub fn restart_region_after_next_read(&self) {
        self.shared
            .with_place(|place| place.restart_after_read = true);
    }

    /// The viewer logged in to `region` at its start instead of [`REGION_NAME`]: its status names
    /// it and the avatars added from now on stand in it. Unlike [`move_to_region`](Self::move_to_region)
    /// no region change is counted; call it before a client reads the viewer.
    pub fn start_in_region(&self, region: &str) {
        let mut state = self.shared.state();
        state.place.region = region.to_owned();
        let own = self.shared.own_name.clone();
        if let Some(avatar) = state.avatars.get_mut(&own) {
            avatar.region = region.to_owned();
        }
    }

    /// The viewer's avatar goes to `region` (say, someone teleported it): it hears that region's
    /// chat, not its own.
    pub fn move_to_region(&self, region: &str) {
        self.shared.with_place(|place| place.moved_to(region));
    }

    /// The password a REST login must give (by default any is taken).
    pub fn set_login_password(&self, password: &str) {
        self.shared
            .with_place(|place| place.password = Some(password.to_owned()));
    }

    /// Writes the avatar coordinates with a decimal comma, as a viewer in a German culture does.
    pub fn set_decimal_comma(&self, on: bool) {
        self.shared.with_place(|place| place.decimal_comma = on);
    }

    /// How the viewer is connected now.
    pub fn connection(&self) -> Connection {
        self.shared.with_place(|place| place.connection)
    }

    /// The region the viewer's avatar is (or was last) in.
    pub fn region(&self) -> String {
        self.shared.with_place(|place| place.region.clone())
    }

    /// CommLLLP's counters now.
    pub fn comm_counters(&self) -> CommCounters {
        self.shared.with_place(|place| place.counters)
    }

    /// Logouts the viewer made (it makes one at most).
    pub fn n_logouts(&self) -> u32 {
        self.shared.with_place(|place| place.n_logouts)
    }

    /// Lines said that the viewer did not hear (not connected, or the speaker out of range).
    pub fn n_unheard(&self) -> u64 {
        self.shared.with_place(|place| place.n_unheard)
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

    /// Logged in (connected, as at the viewer's start) or logged out, as `/api/LLLP/status`
    /// reports it. The chat queue survives either; nothing is heard while logged out.
    pub fn set_logged_in(&self, logged_in: bool) {
        self.shared.with_place(|place| {
            place.connection = if logged_in {
                Connection::Connected
            } else {
                Connection::LoggedOut
            };
            place.place_shown = logged_in;
        });
    }

    /// Every request that reached the viewer (its `Host` accepted or not), as (method, path), in
    /// the order they arrived.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.shared.state().requests.clone()
    }

    /// The most requests the viewer had at once, each counted from its arrival until its answer
    /// was completely written (a request it never answers counts only at its arrival). The real
    /// viewer serves one at a time: every one beyond the first waited behind another.
    pub fn max_concurrent_requests(&self) -> u64 {
        self.shared.state().max_in_flight
    }

    /// The `k`-th chat POST from now (1 for the next) is answered `500` by the handler, as an
    /// exception outside LLChat's own try block would be, and nothing is said.
    pub fn fail_chat_post(&self, k: u64) {
        let mut state = self.shared.state();
        let n_post = state.n_posts + k;
        state.failing_posts.push(n_post);
    }
}

/// An IP as it appears in a URL or a `Host` header.
fn url_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}
