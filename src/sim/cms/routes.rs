//! The front controller of the simulated CMS, `api/index.php` behind Apache: the request log and
//! the offline, unavailable, fault and poison switches, the `RewriteRule` that turns the path into
//! `_url`, the token check that runs before routing, the anchored route table with each route's
//! permission, and the writing of an answer (`json_encode`, pretty with an exact-case `User-Agent`,
//! the status of each kind of error per dialect, PHP's debug noise and its "headers already sent").
//!
//! It must not implement an endpoint (`auth`, `chat` and `users` do) nor touch the HTTP wire
//! (`crate::sim::http` reads requests and writes responses).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sim::cms::cost::{RequestKind, Work};
use crate::sim::cms::db::{Shared, State, now_in};
use crate::sim::cms::json::Json;
use crate::sim::cms::php::{PHP_ROOT, php_error_html};
use crate::sim::cms::{
    API_ROOT, CmsDialect, EXECUTE, Fault, READ, RecordedRequest, auth, chat, users,
};
use crate::sim::http::{Reply, Request, Response};

/// The `Content-Type` PHP sends when the code sets none (PHP 5.6 `default_charset`).
const PHP_DEFAULT_CONTENT_TYPE: &str = "text/html; charset=UTF-8";
/// The 401 message of `api/api.php:82-83`, for every permission failure.
const UNAUTHORIZED: &str = "Unauthorized to access this API URL";
/// How many requests [`CmsHandle::requests`](crate::sim::cms::CmsHandle::requests) keeps: far
/// more than any test makes, and a bound on the memory of a `sim cms` left running for days.
pub(super) const MAX_RECORDED_REQUESTS: usize = 100_000;

/// What the handler does after the synchronous part.
enum Plan {
    Now(Reply),
    After(Duration, Response),
}

/// The sim-only path of the busy time by kind (`CmsHandle::busy` as JSON); not PHP, never costed.
pub(super) const BUSY_PATH: &str = "/sim/busy";

pub(super) async fn handle(shared: Arc<Shared>, request: Request) -> Reply {
    if request.method == "GET" && request.path == BUSY_PATH {
        let body = shared.meter.totals().to_json();
        return Reply::Respond(Response::new(200, "application/json", body));
    }
    record(&shared, &request);
    // A request waits for a PHP worker (only under a cost model), then holds it for its cost.
    let arrived = Instant::now();
    let worker = shared.meter.worker().await;
    let started = Instant::now();
    let (plan, work) = plan(&shared, &request);
    if let Some(work) = work {
        shared
            .meter
            .spend(&worker, work, started, started - arrived)
            .await;
    }
    drop(worker);
    match plan {
        Plan::Now(reply) => reply,
        Plan::After(delay, response) => {
            tokio::time::sleep(delay).await;
            Reply::Respond(response)
        }
    }
}

/// The request log, in the order requests arrive (before any waits for a worker).
fn record(shared: &Shared, request: &Request) {
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
}

/// What to answer, and the work PHP did for it (`None` when PHP never ran: offline, outside the
/// API, a proxy's error or hang in front of it).
fn plan(shared: &Shared, request: &Request) -> (Plan, Option<Work>) {
    let mut state = shared.lock();
    if state.offline {
        return (Plan::Now(Reply::Close), None);
    }
    if let Some(status) = state.unavailable {
        return (Plan::Now(Reply::Respond(proxy_error(status))), None);
    }
    let Some(url) = api_url(request) else {
        let not_found = Response::new(404, "text/plain", "Not Found\n");
        return (Plan::Now(Reply::Respond(not_found)), None);
    };
    let route = route(&request.method, &url);
    let mut fault = None;
    if matches!(route, Some((Route::PostChats { .. }, _, _))) {
        state.n_chat_posts += 1;
        fault = state.take_fault();
    }
    let poisoned = state.poison.as_ref().is_some_and(|text| {
        request
            .body
            .windows(text.len().max(1))
            .any(|window| window == text.as_bytes())
    });
    if poisoned && matches!(route, Some((Route::PostChats { .. }, _, _))) {
        return (Plan::Now(Reply::Respond(proxy_error(500))), None);
    }
    match fault {
        Some(Fault::Status(status)) => {
            return (Plan::Now(Reply::Respond(proxy_error(status))), None);
        }
        Some(Fault::Maintenance { retry_after_secs }) => {
            let page = proxy_error(503).with_header("Retry-After", retry_after_secs.to_string());
            return (Plan::Now(Reply::Respond(page)), None);
        }
        Some(Fault::Hang) => return (Plan::Now(Reply::NoAnswer), None),
        _ => {}
    }
    let kind = match &route {
        Some((Route::Login(_), _, _)) => RequestKind::Login,
        Some((Route::PostChats { .. }, _, _)) => RequestKind::ChatPost,
        Some((Route::GetChats { .. }, _, _)) => RequestKind::ChatGet,
        Some((Route::GetAvatar { .. }, _, _)) => RequestKind::AvatarLookup,
        _ => RequestKind::Other,
    };
    let n_rows_before = state.chats.len();
    let answer = answer(
        shared,
        &mut state,
        request,
        route,
        fault == Some(Fault::FailLastElement),
    );
    let n_stored = state.chats.len() - n_rows_before;
    let stored = n_stored > 0;
    drop(state);
    let work = match (&answer, kind) {
        (Answer::Json(rows), RequestKind::ChatGet) => Work::chat_get(rows),
        _ => Work {
            rows_stored: n_stored,
            ..Work::of(kind)
        },
    };
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
    let plan = match fault {
        Some(Fault::HangAfterStore) => Plan::Now(Reply::NoAnswer),
        Some(Fault::CloseAfterStore) => Plan::Now(Reply::Close),
        Some(Fault::StatusAfterStore(status)) => Plan::Now(Reply::Respond(proxy_error(status))),
        Some(Fault::Slow(delay)) => Plan::After(delay, response),
        _ => Plan::Now(Reply::Respond(response)),
    };
    (plan, Some(work))
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
pub(super) enum Module {
    Auth,
    Chat,
    Grid,
    User,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LoginBy {
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
pub(super) enum Answer {
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

pub(super) struct ApiError {
    kind: ErrorKind,
    message: String,
    /// The exception code, file and line: shown only in debug mode.
    code: i64,
    file: &'static str,
    line: u32,
}

pub(super) fn failure(
    message: impl Into<String>,
    code: i64,
    file: &'static str,
    line: u32,
) -> Answer {
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
        Route::Login(by) => auth::login(shared, state, request, by),
        Route::PostChats { grid } => {
            chat::post_chats(shared, state, request, grid, fail_last_element)
        }
        Route::GetChats { grid, since } => chat::get_chats(shared, state, grid, since.as_deref()),
        Route::GetAvatar { grid, uuid } => users::get_avatar(state, grid, &uuid),
        Route::GetGrid { grid } => match state.grids.get(&grid) {
            Some(grid) => Answer::Json(users::grid_json(grid)),
            None => failure("Grid not found", 1, "models/grid.php", 112),
        },
        Route::GetGrids => Answer::Json(Json::Arr(
            state.grids.values().map(users::grid_json).collect(),
        )),
        Route::GetUser { id } => match state.users.get(&id) {
            Some(user) => Answer::Json(users::full_user_json(state, user)),
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

#[cfg(test)]
mod tests {
    use super::*;

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
