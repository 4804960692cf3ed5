//! `api/modules/auth.php` of the simulated CMS: login by user name or e-mail (the three routes,
//! `FILTER_VALIDATE_EMAIL` deciding whatever the route), the `OpenSim` account that may log in
//! only from the grid (and the `X-SecondLife-Shard` loophole), the `auth` permission, and the
//! 48-character token with its sliding idle lifetime, bound to the login's `ip` field or address.
//!
//! It must not check tokens on other requests (`routes` does, through `db::State::authenticate`)
//! nor write JSON text (it answers a `Json` value).

use std::time::{Duration, Instant};

use crate::sim::cms::READ;
use crate::sim::cms::db::{DATE_FORMAT, Shared, State, Token, now_in};
use crate::sim::cms::json::Json;
use crate::sim::cms::php::{Php, php_string};
use crate::sim::cms::php_input::get_input;
use crate::sim::cms::routes::{Answer, LoginBy, failure};
use crate::sim::http::Request;

/// `SERVER_API_TOKEN_EXPIRES`: a token's sliding idle lifetime.
const TOKEN_IDLE: Duration = Duration::from_secs(30 * 60);
/// `SERVER_API_TOKEN_EXPIRES2`: the sliding lifetime of the `OpenSim` user's (id 1) tokens.
const TOKEN_IDLE_OPENSIM: Duration = Duration::from_secs(24 * 60 * 60);

/// `api/modules/auth.php`.
pub(super) fn login(shared: &Shared, state: &mut State, request: &Request, by: LoginBy) -> Answer {
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
