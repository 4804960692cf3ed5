//! Where the simulated viewer's avatar is, as the real viewer shows it with a real OpenSim region
//! (spec §10): logged in and connected, disconnected for good by a region restart (while its status
//! still says `login`), logging out or logged out, or in another region; CommLLLP's counters
//! (`GET /api/stats/Comm/stats`); the REST login and logout (`POST /api/LLLP/connect/...`) with
//! their refusals and the one-logout limit; the positions of the avatars and of the viewer's own,
//! and what it hears from them (whisper 10 m, say 20 m, shout 100 m, OpenSim's `[Chat]` defaults).
//!
//! It must not answer requests or write the HTTP wire: `routes` does, with the bodies built here.

use crate::sim::lookingglass::dotnet::BodyMap;
use crate::sim::lookingglass::json::push_json_string;
use crate::sim::lookingglass::queue::{Shared, ViewerState};
use crate::sim::lookingglass::{GRID_NAME, SimChatLine};

/// OpenSim's `[Chat]` defaults: `whisper_distance`, `say_distance`, `shout_distance`, in metres.
pub const WHISPER_DISTANCE: f64 = 10.0;
/// See [`WHISPER_DISTANCE`].
pub const SAY_DISTANCE: f64 = 20.0;
/// See [`WHISPER_DISTANCE`].
pub const SHOUT_DISTANCE: f64 = 100.0;

/// The viewer's connection to its region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connection {
    /// Logged in and connected: it hears the region.
    Connected,
    /// The region went away (a restart): disconnected for good, though the status still says
    /// `login` (with `currentsim` and the position empty).
    Disconnected,
    /// A REST logout was asked for: the status says `loggingout` until the next login.
    LoggingOut,
    /// Logged out (`loginstate: logout`).
    LoggedOut,
}

/// CommLLLP's network counters, as `GET /api/stats/Comm/stats` shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommCounters {
    /// `network_disconnected`: a region restart and a logout each add one.
    pub disconnected: u64,
    /// `network_simconnected`: each login (and each region the avatar enters) adds one.
    pub simconnected: u64,
    /// `network_simchanged`: each change of region.
    pub simchanged: u64,
    /// `network_loginprogress`: the login's progress events (four a login).
    pub loginprogress: u64,
    /// `network_eventqueuerunning`: each region's event queue starting.
    pub eventqueuerunning: u64,
}

/// An avatar the viewer has seen: where it stands and in which region.
#[derive(Clone, Debug, PartialEq)]
pub struct SimAvatar {
    /// Its stable UUID.
    pub uuid: String,
    /// X, Y, Z in metres, region coordinates.
    pub position: [f64; 3],
    /// The region it stands in (its name).
    pub region: String,
}

/// The viewer's place in the world: what the status, the counters and the avatar list tell.
#[derive(Clone, Debug)]
pub(super) struct Place {
    pub(super) connection: Connection,
    /// The region the avatar is (or was last) in.
    pub(super) region: String,
    /// The viewer's own avatar's position.
    pub(super) own_position: [f64; 3],
    /// Whether the status shows `currentsim` and the position: only after the login the viewer
    /// made at its start, never after a REST login (spec §10).
    pub(super) place_shown: bool,
    pub(super) counters: CommCounters,
    /// Logouts the viewer process has made: its code logs out only once (spec §10).
    pub(super) n_logouts: u32,
    /// The password a REST login must give (`None`: any).
    pub(super) password: Option<String>,
    /// Format the avatar coordinates with a decimal comma (a viewer in a German culture).
    pub(super) decimal_comma: bool,
    /// Lines said in the region that the viewer did not hear (out of range, or not connected).
    pub(super) n_unheard: u64,
    /// The region restarts right after the next status or counters answer is written (a restart
    /// that falls between two reads of a client).
    pub(super) restart_after_read: bool,
}

impl Place {
    /// A viewer that logged in at its start, into `region`, at the region's centre.
    pub(super) fn new(region: &str) -> Place {
        Place {
            connection: Connection::Connected,
            region: region.to_owned(),
            own_position: [128.0, 128.0, 25.0],
            place_shown: true,
            counters: CommCounters {
                simconnected: 1,
                loginprogress: 4,
                eventqueuerunning: 1,
                ..CommCounters::default()
            },
            n_logouts: 0,
            password: None,
            decimal_comma: false,
            n_unheard: 0,
            restart_after_read: false,
        }
    }

    /// A status or counters answer was written: the restart queued for that moment happens.
    pub(super) fn read(&mut self) {
        if std::mem::take(&mut self.restart_after_read) {
            self.region_restarted();
        }
    }

    /// The region restarts: a connected viewer is disconnected for good.
    pub(super) fn region_restarted(&mut self) {
        if self.connection == Connection::Connected {
            self.connection = Connection::Disconnected;
            self.counters.disconnected += 1;
        }
    }

    /// The avatar moves to `region` (a teleport the viewer was told to make elsewhere).
    pub(super) fn moved_to(&mut self, region: &str) {
        if self.connection == Connection::Connected && self.region != region {
            self.region = region.to_owned();
            self.counters.simconnected += 1;
            self.counters.simchanged += 1;
            self.counters.eventqueuerunning += 1;
        }
    }
}

/// `POST /api/LLLP/connect/<action>`: `Ok(())` answers `{}`, `Err(msg)` answers
/// `{"RESTRequestError":1,"RESTRequestMsg":msg}` (CommLLLPRest.cs:119-214).
pub(super) fn connect(state: &mut ViewerState, action: &str, form: &BodyMap) -> Result<(), String> {
    let place = &mut state.place;
    match action {
        "login" => {
            // The viewer starts a login only when it thinks it is logged out: after a region restart
            // its state is still `login`, so it refuses until a logout.
            if matches!(
                place.connection,
                Connection::Connected | Connection::Disconnected
            ) {
                return Err("Could not log in".to_owned());
            }
            let given = |key: &str| form.get(key).map(String::as_str).unwrap_or("");
            if given("LOGINFIRST").is_empty() || given("LOGINLAST").is_empty() {
                return Err("Could not log in".to_owned());
            }
            if place
                .password
                .as_deref()
                .is_some_and(|password| password != given("LOGINPASS"))
            {
                return Err("Could not log in".to_owned());
            }
            let sim = given("LOGINSIM");
            if !sim.is_empty() {
                // `uri:Region&x&y&z`, or a bare region name.
                let name = sim.strip_prefix("uri:").unwrap_or(sim);
                let name = name.split('&').next().unwrap_or(name);
                if !name.is_empty() {
                    place.region = name.to_owned();
                }
            }
            place.connection = Connection::Connected;
            // Seen on a real region: after a REST login the status never shows the place again.
            place.place_shown = false;
            place.counters.simconnected += 1;
            place.counters.loginprogress += 4;
            place.counters.eventqueuerunning += 1;
            Ok(())
        }
        "logout" => {
            // CommLLLP logs out only once per process: later logouts are taken and do nothing.
            if place.n_logouts == 0
                && matches!(
                    place.connection,
                    Connection::Connected | Connection::Disconnected
                )
            {
                place.n_logouts += 1;
                place.connection = Connection::LoggingOut;
                place.counters.disconnected += 1;
            }
            Ok(())
        }
        "teleport" => {
            if place.connection != Connection::Connected {
                return Err("Not logged in".to_owned());
            }
            let destination = form.get("DESTINATION").cloned().unwrap_or_default();
            place.moved_to(destination.split('/').next().unwrap_or(&destination));
            Ok(())
        }
        "exit" => Ok(()),
        _ => Err("Unknown action".to_owned()),
    }
}

/// The error answer of the connect handler.
pub(super) fn connect_error_body(message: &str) -> String {
    let mut body = String::from("{\"RESTRequestError\":1,\"RESTRequestMsg\":");
    push_json_string(&mut body, message);
    body.push('}');
    body
}

/// `GET /api/stats/Comm/stats`: each counter as `{"value":"N","description":…}`.
pub(super) fn comm_stats_body(place: &Place) -> String {
    let counters = place.counters;
    let rows: [(&str, u64, &str); 5] = [
        (
            "network_disconnected",
            counters.disconnected,
            "Number of 'disconnected' network events",
        ),
        (
            "network_eventqueuerunning",
            counters.eventqueuerunning,
            "Number of 'event queue running' network events",
        ),
        (
            "network_loginprogress",
            counters.loginprogress,
            "Number of 'login progress' network events",
        ),
        (
            "network_simchanged",
            counters.simchanged,
            "Number of 'sim changed' network events",
        ),
        (
            "network_simconnected",
            counters.simconnected,
            "Number of 'sim connected' network events",
        ),
    ];
    let mut body = String::from("{");
    for (index, (name, value, description)) in rows.iter().enumerate() {
        if index > 0 {
            body.push(',');
        }
        push_json_string(&mut body, name);
        body.push_str(":{\"value\":");
        push_json_string(&mut body, &value.to_string());
        body.push_str(",\"description\":");
        push_json_string(&mut body, description);
        body.push('}');
    }
    body.push('}');
    body
}

/// A coordinate as .NET's `ToString("###0.###")` writes it in the viewer's culture.
pub(super) fn coordinate(value: f64, decimal_comma: bool) -> String {
    let text = format!("{value:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    let text = if text == "-0" { "0" } else { text };
    if decimal_comma {
        text.replace('.', ",")
    } else {
        text.to_owned()
    }
}

/// The `Region` of an avatar in `/api/avatars`: the viewer's region context name, host and region.
pub(super) fn region_label(region: &str) -> String {
    format!("localhost/{region}")
}

/// Whether the viewer hears `line`: it is connected, and the speaker (when it is a known avatar)
/// stands in its region within the distance of the line's type. Lines of speakers it has not seen
/// (objects, system lines) are heard while connected.
pub(super) fn hears(state: &ViewerState, line: &SimChatLine) -> bool {
    let place = &state.place;
    if place.connection != Connection::Connected {
        return false;
    }
    let Some(avatar) = line
        .from
        .as_deref()
        .and_then(|from| state.avatars.get(from))
    else {
        return true;
    };
    if avatar.region != place.region {
        return false;
    }
    let range = match line.chat_type.as_str() {
        "Whisper" => WHISPER_DISTANCE,
        "Shout" => SHOUT_DISTANCE,
        _ => SAY_DISTANCE,
    };
    distance(avatar.position, place.own_position) <= range
}

fn distance(a: [f64; 3], b: [f64; 3]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt()
}

/// The grid the viewer is logged in to, shown while the status shows its place.
pub(super) fn current_grid(place: &Place) -> &'static str {
    if place.place_shown && place.connection == Connection::Connected {
        GRID_NAME
    } else {
        ""
    }
}

/// `Shared` helpers for the handle.
impl Shared {
    /// Runs `change` on the viewer's place.
    pub(super) fn with_place<T>(&self, change: impl FnOnce(&mut Place) -> T) -> T {
        change(&mut self.state().place)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinates_are_written_as_dotnet_writes_them() {
        assert_eq!(coordinate(128.0, false), "128");
        assert_eq!(coordinate(128.5, true), "128,5");
        assert_eq!(coordinate(12.34567, false), "12.346");
        assert_eq!(coordinate(-0.0001, false), "0");
    }
}
