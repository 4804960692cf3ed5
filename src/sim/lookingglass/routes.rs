//! The simulated viewer's REST server: the `Host` check of the HTTP stack, the lower-cased prefix
//! routing (an unknown path or method is never answered), the one request at a time of the "REST
//! Input" thread, and the handlers: the chat GET (drain the queue, `1`-suffixed keys, handed out
//! only when completely written, the crash when a client abandons it), the chat POST (body
//! sniffing, the required `Channel` and `Type`, the simulator's echo of channel 0, a 500 when a
//! test asks for one), the avatars and the login status; and, for the tests, the record of every
//! request and of how many were in flight at once.
//!
//! It must not touch the HTTP wire (`crate::sim::http` reads requests and writes responses) nor
//! format JSON by hand outside `json`.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::sim::http::{Reply, Request, Response};
use crate::sim::lookingglass::dotnet::{
    BodyMap, int32_parse, parse_form, truncate_utf16, unescape_data_string, viewer_time,
};
use crate::sim::lookingglass::json::{self, push_field, push_json_string};
use crate::sim::lookingglass::presence::{self, Connection};
use crate::sim::lookingglass::queue::{QueuedLine, Shared, enqueue};
use crate::sim::lookingglass::{Dialect, GRID_NAME, HandedOut, SaidLine, SimChatLine, ZERO_UUID};

/// The routes of the simulated viewer, after host checking.
enum Route {
    Chat,
    Avatars,
    /// `/api/LLLP/status`, with whether a path suffix followed (which always answers `{}`).
    Status {
        suffix: bool,
    },
    /// `/api/stats/Comm/stats`: CommLLLP's counters.
    CommStats,
    /// `/api/LLLP/connect/<action>`, with the lower-cased action.
    Connect {
        action: String,
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
    } else if lower.starts_with("/api/stats/comm/stats") {
        Route::CommStats
    } else if let Some(rest) = lower.strip_prefix("/api/lllp/connect") {
        Route::Connect {
            action: rest.trim_start_matches('/').to_owned(),
        }
    } else {
        Route::Unknown
    }
}

/// Serves one request the way the viewer's REST server does, and counts it as in flight from its
/// arrival until its answer is completely written (or it is closed, or left unanswered: a request
/// the viewer never answers counts as ended at once, since the server does not learn when its
/// client gives up).
pub(super) async fn handle_request(shared: Arc<Shared>, request: Request) -> Reply {
    if shared.crashed.is_cancelled() {
        return Reply::Close;
    }
    {
        let mut state = shared.state();
        state
            .requests
            .push((request.method.clone(), request.path.clone()));
        state.n_in_flight += 1;
        state.max_in_flight = state.max_in_flight.max(state.n_in_flight);
    }
    match serve(&shared, request).await {
        Reply::Respond(response) => Reply::Respond(in_flight_until_written(shared, response)),
        other => {
            shared.state().n_in_flight -= 1;
            other
        }
    }
}

/// Keeps `response` counted as in flight until the server reports it written (or not), then
/// passes the report on to whoever asked for it.
fn in_flight_until_written(shared: Arc<Shared>, mut response: Response) -> Response {
    let (written_tx, written_rx) = oneshot::channel();
    let asked = response.written.replace(written_tx);
    tokio::spawn(async move {
        let written = written_rx.await;
        shared.state().n_in_flight -= 1;
        if let (Some(asked), Ok(written)) = (asked, written) {
            // The asker may have stopped listening; that is its choice.
            let _ = asked.send(written);
        }
    });
    response
}

/// The REST server's own handling of one request.
async fn serve(shared: &Arc<Shared>, request: Request) -> Reply {
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
    let route = route(shared, &request.path);
    let is_get = request.method.eq_ignore_ascii_case("GET");
    let is_post = request.method.eq_ignore_ascii_case("POST");
    if matches!(route, Route::Unknown) || !(is_get || is_post) {
        // No handler for the path, or a method RestHandler does not handle: the request is
        // dropped on the floor and the client waits forever.
        return Reply::NoAnswer;
    }

    let rest_thread = shared.rest_thread.clone().lock_owned().await;
    match route {
        Route::Chat if is_get => chat_get(shared, rest_thread).await,
        Route::Chat => chat_post(shared, &request.body),
        Route::Avatars if is_get => Reply::Respond(ok_response(shared, avatars_body(shared))),
        Route::Status { suffix } if is_get => {
            let body = if suffix {
                "{}".to_owned()
            } else {
                status_body(shared)
            };
            shared.state().place.read();
            Reply::Respond(ok_response(shared, body))
        }
        Route::CommStats if is_get => {
            let body = presence::comm_stats_body(&shared.state().place);
            shared.state().place.read();
            Reply::Respond(ok_response(shared, body))
        }
        Route::Connect { action } if is_post => {
            let map = body_map(&request.body);
            let outcome = presence::connect(&mut shared.state(), &action, &map);
            let body = match outcome {
                Ok(()) => "{}".to_owned(),
                Err(message) => presence::connect_error_body(&message),
            };
            Reply::Respond(ok_response(shared, body))
        }
        // The connect handler has no GET: RestHandler's 500 page.
        Route::Connect { .. } => Reply::Respond(
            Response::new(
                500,
                "text/html",
                "<body>\r\n<div>FAILED GETTING '/api/LLLP/connect'</div><div>ERROR = 'System.NotImplementedException'</div></body>\r\n</html>\r\n\r\n",
            )
            .with_header("Server", "LookingGlass"),
        ),
        // POSTs to the avatars, status and stats handlers change nothing and answer `{}`.
        Route::Avatars | Route::Status { .. } | Route::CommStats => {
            Reply::Respond(ok_response(shared, "{}".to_owned()))
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

/// `POST /api/chat`: sniff and parse the body, send the chat if `Channel` and `Type` are usable,
/// and answer `200 {}` whatever happened (KeeKee: an empty body, or no answer on failure).
fn chat_post(shared: &Shared, raw_body: &[u8]) -> Reply {
    let failing = {
        let mut state = shared.state();
        state.n_posts += 1;
        let n_post = state.n_posts;
        state.failing_posts.contains(&n_post)
    };
    if failing {
        // A handler exception outside LLChat's try block: RestHandler's 500 page, nothing said.
        return Reply::Respond(
            Response::new(
                500,
                "text/html",
                "<body>\r\n<div>FAILED GETTING '/api/chat'</div><div>ERROR = 'System.IO.IOException'</div></body>\r\n</html>\r\n\r\n",
            )
            .with_header("Server", "LookingGlass"),
        );
    }
    let map = body_map(raw_body);
    let outcome = said_line_from(&map);
    let heard = shared.state().place.connection == Connection::Connected;
    match &outcome {
        // Not connected: the simulator never gets the line (and never echoes it).
        Some(_) if !heard => {}
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

/// `RestHandler.MapizeTheBody`: a body starting with `{` is JSON (an unreadable one is an empty
/// map), anything else a form.
fn body_map(raw_body: &[u8]) -> BodyMap {
    let text = String::from_utf8_lossy(raw_body);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    if text.starts_with('{') {
        json::parse_object(text).unwrap_or_default()
    } else {
        parse_form(text)
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

/// `GET /api/avatars`: `<grid>-Avatar-<uuid>` → the avatar's details, all strings, coordinates
/// in the viewer's culture. A disconnected viewer keeps listing the avatars it last saw.
fn avatars_body(shared: &Shared) -> String {
    let (avatars, decimal_comma) = {
        let state = shared.state();
        (state.avatars.clone(), state.place.decimal_comma)
    };
    let mut body = String::from("{");
    for (index, (name, avatar)) in avatars.iter().enumerate() {
        if index > 0 {
            body.push(',');
        }
        push_json_string(&mut body, &format!("{GRID_NAME}-Avatar-{}", avatar.uuid));
        body.push_str(":{");
        let [x, y, z] = avatar
            .position
            .map(|c| presence::coordinate(c, decimal_comma));
        let region = presence::region_label(&avatar.region);
        let fields = [
            ("Name", name.as_str()),
            ("Region", region.as_str()),
            ("X", x.as_str()),
            ("Y", y.as_str()),
            ("Z", z.as_str()),
            ("Distance", "0"),
            ("Flags", ""),
        ];
        let mut first = true;
        for (field, value) in fields {
            push_field(&mut body, &mut first, field, value);
        }
        body.push_str(",\"LLtextures\":{}}");
    }
    body.push('}');
    body
}

/// `GET /api/LLLP/status`: the login ParameterSet, `{"name":{"value":…}}`, empty values as `{}`.
/// `currentsim`, `currentgrid` and the position show only while connected after the viewer's own
/// start login; a region restart leaves `loginstate` at `login` (spec §10).
fn status_body(shared: &Shared) -> String {
    let place = shared.state().place.clone();
    let (first, last) = shared
        .own_name
        .split_once(' ')
        .unwrap_or((shared.own_name.as_str(), ""));
    let shown = place.place_shown && place.connection == Connection::Connected;
    let [x, y, z] = place.own_position.map(|c| {
        if shown {
            presence::coordinate(c, false)
        } else {
            String::new()
        }
    });
    let loginstate = match place.connection {
        Connection::Connected | Connection::Disconnected => "login",
        Connection::LoggingOut => "loggingout",
        Connection::LoggedOut => "logout",
    };
    let msg = if place.connection == Connection::Connected {
        "Login successful"
    } else {
        ""
    };
    let current_sim = if shown { place.region.as_str() } else { "" };
    let parameters: [(&str, &str); 12] = [
        ("first", first),
        ("last", last),
        ("password", ""),
        ("grid", GRID_NAME),
        ("sim", ""),
        ("msg", msg),
        ("currentsim", current_sim),
        ("currentgrid", presence::current_grid(&place)),
        ("loginstate", loginstate),
        ("positionx", &x),
        ("positiony", &y),
        ("positionz", &z),
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
