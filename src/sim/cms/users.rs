//! The user, avatar and grid lookups of the simulated CMS (`api/modules/user.php`,
//! `api/modules/grid.php`): `getUserByAvatar` with its v4 UUID check, `getUserData` in its short
//! form (the `user` of a chat row, `Anonymous` for NULL) and its full form (permissions, avatars,
//! groups), and a grid as the API describes it.
//!
//! It must not change the tables (every lookup reads them) nor write JSON text (it answers a `Json`
//! value).

use crate::sim::cms::db::{Grid, State, User};
use crate::sim::cms::json::Json;
use crate::sim::cms::routes::{Answer, failure};

/// `getUserByAvatar` (spec §4.1).
pub(super) fn get_avatar(state: &State, grid: i64, uuid: &str) -> Answer {
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

pub(super) fn short_user_fields(user: &User) -> Vec<(String, Json)> {
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
pub(super) fn anonymous_user_fields() -> Vec<(String, Json)> {
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
pub(super) fn full_user_json(state: &State, user: &User) -> Json {
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

pub(super) fn grid_json(grid: &Grid) -> Json {
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
