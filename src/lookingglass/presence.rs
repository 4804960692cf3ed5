//! Whether the viewer hears its region, decided from what it tells (spec §10): CommLLLP's network
//! counters (`GET /api/stats/Comm/stats`), the login status (`GET /api/LLLP/status`) and the
//! avatar list (`GET /api/avatars`). Pure: the readers of those answers and the decisions on them;
//! the client (`client`) fetches, the `presence` task acts.
//!
//! The status alone misleads: after a region restart it keeps `loginstate: login`, and after a
//! REST login it never shows `currentsim` or the position again. What tells is whether
//! `network_simconnected` rose after the last rise of `network_disconnected`. The counters carry no
//! order, so the last judgement is remembered ([`LinkMemory`], kept in the outbox by the caller)
//! and each new reading is compared with it. Must not do I/O or know the outbox.

use serde_json::Value;

/// CommLLLP's two counters that tell whether the viewer is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommCounters {
    /// `network_disconnected`: a region restart and a logout each add one.
    pub disconnected: u64,
    /// `network_simconnected`: a login (and each region entered) adds one.
    pub simconnected: u64,
}

impl CommCounters {
    /// Reads `{"network_disconnected":{"value":"N",…},…}`; `None` when either counter is missing
    /// or not a number (another viewer, or a broken answer).
    pub fn from_json(value: &Value) -> Option<CommCounters> {
        let counter = |name: &str| -> Option<u64> {
            let value = value.get(name)?.get("value")?;
            match value {
                Value::String(text) => text.trim().parse().ok(),
                Value::Number(number) => number.as_u64(),
                _ => None,
            }
        };
        Some(CommCounters {
            disconnected: counter("network_disconnected")?,
            simconnected: counter("network_simconnected")?,
        })
    }
}

/// What the relay remembers of the counters at its last judgement: the counters carry no order, so
/// only a comparison with an earlier reading tells which rose last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkMemory {
    /// The counters then.
    pub counters: CommCounters,
    /// Whether the viewer was connected then.
    pub connected: bool,
}

/// The viewer's login status, as far as it matters here.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ViewerStatus {
    /// `first` and `last` joined, when the status names both.
    pub own_name: Option<String>,
    /// `loginstate`: `login`, `loggingin`, `loggingout`, `logout`.
    pub login_state: Option<String>,
    /// `currentsim`, when shown (only after the viewer's own start login).
    pub current_sim: Option<String>,
    /// `positionx/y/z`, when shown.
    pub position: Option<[f64; 3]>,
}

impl ViewerStatus {
    /// Reads the ParameterSet map (`{"name":{"value":…}}`, empty values as `{}`).
    pub fn from_json(value: &Value) -> ViewerStatus {
        let part = |key: &str| {
            value
                .get(key)
                .and_then(|v| v.get("value"))
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|text| !text.is_empty())
        };
        // Both parts, as LookingGlass names always have them (a `{}` last name: not logged in).
        let own_name = match (part("first"), part("last")) {
            (Some(first), Some(last)) => Some(format!("{first} {last}")),
            _ => None,
        };
        let position = match (
            part("positionx").and_then(coordinate),
            part("positiony").and_then(coordinate),
            part("positionz").and_then(coordinate),
        ) {
            (Some(x), Some(y), Some(z)) => Some([x, y, z]),
            _ => None,
        };
        ViewerStatus {
            own_name,
            login_state: part("loginstate").map(str::to_lowercase),
            current_sim: part("currentsim").map(str::to_owned),
            position,
        }
    }
}

/// A coordinate as the viewer writes it (`"###0.###"` in its culture: `128.5` or `128,5`).
pub fn coordinate(text: &str) -> Option<f64> {
    let value: f64 = text.trim().replace(',', ".").parse().ok()?;
    value.is_finite().then_some(value)
}

/// An avatar in the viewer's avatar list.
#[derive(Debug, Clone, PartialEq)]
pub struct SeenAvatar {
    /// `Name`.
    pub name: String,
    /// `Region`, e.g. `localhost/Welcome`.
    pub region: Option<String>,
    /// `X`, `Y`, `Z`, when all three read.
    pub position: Option<[f64; 3]>,
}

/// Reads `/api/avatars`: a map of `<grid>-Avatar-<uuid>` to details; entries without a name are
/// passed over. `None` when the answer is not a map.
pub fn seen_avatars(value: &Value) -> Option<Vec<SeenAvatar>> {
    let map = value.as_object()?;
    Some(
        map.values()
            .filter_map(|avatar| {
                let field = |key: &str| avatar.get(key).and_then(Value::as_str);
                let name = field("Name")?.trim().to_owned();
                let position = match (
                    field("X").and_then(coordinate),
                    field("Y").and_then(coordinate),
                    field("Z").and_then(coordinate),
                ) {
                    (Some(x), Some(y), Some(z)) => Some([x, y, z]),
                    _ => None,
                };
                Some(SeenAvatar {
                    name,
                    region: field("Region").map(str::to_owned),
                    position,
                })
            })
            .collect(),
    )
}

/// A region label without its host part: `localhost/Welcome` → `Welcome`.
pub fn region_name(label: &str) -> &str {
    label.split_once('/').map_or(label, |(_, name)| name).trim()
}

/// Whether two region labels name the same region (host part and case ignored).
pub fn same_region(a: &str, b: &str) -> bool {
    region_name(a).eq_ignore_ascii_case(region_name(b))
}

/// Decides whether the viewer is connected from its counters now, what was remembered, and the
/// status:
/// - counters below the remembered ones: the viewer process restarted, the memory is void;
/// - with a memory: unchanged counters keep its verdict; only `network_disconnected` rose: out;
///   only `network_simconnected` rose: in; both rose: in (a recovery, by hand or ours, ends with
///   its login);
/// - without one: more connects than disconnects: in; no connect: out; otherwise the order is
///   unknown, and a `currentsim` in the status (shown only while the viewer's start login holds)
///   decides: shown is in, empty is out (a REST login after a restart looks the same; said in
///   OPERATIONS.md).
pub fn connected(memory: Option<LinkMemory>, now: CommCounters, status: &ViewerStatus) -> bool {
    let memory = memory.filter(|memory| {
        now.disconnected >= memory.counters.disconnected
            && now.simconnected >= memory.counters.simconnected
    });
    if let Some(memory) = memory {
        let disconnects = now.disconnected > memory.counters.disconnected;
        let connects = now.simconnected > memory.counters.simconnected;
        return match (disconnects, connects) {
            (false, false) => memory.connected,
            (true, false) => false,
            (_, true) => true,
        };
    }
    if now.simconnected == 0 {
        false
    } else if now.simconnected > now.disconnected {
        true
    } else {
        status.current_sim.is_some()
    }
}

/// Where the viewer is, as the relay tells the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// Connected, in the configured region (or no region is configured).
    InRegion,
    /// Disconnected by its region (a restart): its status still says `login`.
    Disconnected,
    /// Logged out, or logging in or out (`loginstate`).
    LoggedOut(String),
    /// Connected, in another region than the configured one.
    OtherRegion(String),
}

impl Place {
    /// Whether the viewer hears the configured region.
    pub fn hears_region(&self) -> bool {
        *self == Place::InRegion
    }

    /// Why it does not, for the log, `/readyz`, `check` and the gap marker (`None` when it does).
    pub fn why_not(&self) -> Option<String> {
        match self {
            Place::InRegion => None,
            Place::Disconnected => Some(
                "the region restarted or dropped the viewer: it is disconnected for good (its status still says login)"
                    .to_owned(),
            ),
            Place::LoggedOut(state) => Some(format!("the viewer is not logged in ({state})")),
            Place::OtherRegion(region) => Some(format!("the viewer is in another region ({region})")),
        }
    }

    /// The short reason a gap marker gives.
    pub fn marker_reason(&self) -> &'static str {
        match self {
            Place::InRegion => "",
            Place::Disconnected => "the region restarted",
            Place::LoggedOut(_) => "the viewer was logged out",
            Place::OtherRegion(_) => "the viewer was in another region",
        }
    }
}

/// The viewer's place from whether it is connected, its status and the configured region (`None`:
/// any region will do).
pub fn place(connected: bool, status: &ViewerStatus, region: Option<&str>) -> Place {
    match status.login_state.as_deref() {
        Some("login") | None => {}
        Some(other) => return Place::LoggedOut(other.to_owned()),
    }
    if !connected {
        return Place::Disconnected;
    }
    match (&status.current_sim, region) {
        (Some(current), Some(wanted)) if !same_region(current, wanted) => {
            Place::OtherRegion(current.clone())
        }
        _ => Place::InRegion,
    }
}

/// Who is around the viewer: avatars in its region, and of those how many beyond hearing range.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hearing {
    /// Avatars in the viewer's region, the viewer's own left out.
    pub in_region: usize,
    /// Of those, the ones farther than the hearing range (0 when the viewer's position is unknown).
    pub beyond: usize,
    /// Their names and distances in metres, for `check` (not logged: a log names no one).
    pub far: Vec<(String, f64)>,
    /// Whether the viewer's own position was known (from its status or the configured start).
    pub position_known: bool,
}

/// Works out [`Hearing`] from the avatar list, the viewer's own name and position, its region and
/// the hearing range in metres.
pub fn hearing(
    avatars: &[SeenAvatar],
    own_name: Option<&str>,
    own_position: Option<[f64; 3]>,
    region: Option<&str>,
    range: f64,
) -> Hearing {
    let mut out = Hearing {
        position_known: own_position.is_some(),
        ..Hearing::default()
    };
    for avatar in avatars {
        if own_name.is_some_and(|own| own.eq_ignore_ascii_case(&avatar.name)) {
            continue;
        }
        let here = match (&avatar.region, region) {
            (Some(theirs), Some(ours)) => same_region(theirs, ours),
            _ => true,
        };
        if !here {
            continue;
        }
        out.in_region += 1;
        if let (Some(theirs), Some(ours)) = (avatar.position, own_position) {
            let distance = distance(theirs, ours);
            if distance > range {
                out.beyond += 1;
                out.far.push((avatar.name.clone(), distance));
            }
        }
    }
    out
}

/// The distance between two points, in metres.
pub fn distance(a: [f64; 3], b: [f64; 3]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn counters(disconnected: u64, simconnected: u64) -> CommCounters {
        CommCounters {
            disconnected,
            simconnected,
        }
    }

    fn remembered(disconnected: u64, simconnected: u64, connected: bool) -> Option<LinkMemory> {
        Some(LinkMemory {
            counters: counters(disconnected, simconnected),
            connected,
        })
    }

    #[test]
    fn the_counters_read_as_the_viewer_writes_them() {
        let stats = json!({
            "network_disconnected": {"value": "1", "description": "Number of disconnects"},
            "network_simconnected": {"value": "1", "description": "x"},
        });
        assert_eq!(CommCounters::from_json(&stats), Some(counters(1, 1)));
        assert_eq!(CommCounters::from_json(&json!({})), None);
        assert_eq!(
            CommCounters::from_json(
                &json!({"network_disconnected": {"value": "x"}, "network_simconnected": {"value": "1"}})
            ),
            None
        );
    }

    #[test]
    fn the_order_of_rises_decides_not_the_counts() {
        let login = ViewerStatus {
            login_state: Some("login".to_owned()),
            ..ViewerStatus::default()
        };
        // Spec §10: restart (1/1) is out; restart + logout + login (2/2) is in.
        let fresh = remembered(0, 1, true);
        let after_restart = counters(1, 1);
        assert!(!connected(fresh, after_restart, &login));
        let after_logout = counters(2, 1);
        assert!(!connected(remembered(1, 1, false), after_logout, &login));
        let after_login = counters(2, 2);
        assert!(connected(remembered(2, 1, false), after_login, &login));
        assert!(
            connected(remembered(2, 2, true), after_login, &login),
            "kept"
        );
        assert!(
            !connected(remembered(1, 1, false), after_restart, &login),
            "kept"
        );
        // Both rose since the last reading: a recovery ends with its login.
        assert!(connected(remembered(1, 1, false), after_login, &login));
        // The viewer process restarted: its counters fell, the memory is void.
        assert!(connected(remembered(3, 2, false), counters(0, 1), &login));
    }

    #[test]
    fn without_a_memory_a_tie_is_decided_by_the_place_the_status_shows() {
        let mut status = ViewerStatus {
            login_state: Some("login".to_owned()),
            ..ViewerStatus::default()
        };
        assert!(connected(None, counters(0, 1), &status));
        assert!(
            connected(None, counters(1, 2), &status),
            "logged out and in by hand"
        );
        assert!(!connected(None, counters(0, 0), &status), "never connected");
        assert!(
            !connected(None, counters(1, 1), &status),
            "a restart, no place shown"
        );
        status.current_sim = Some("Welcome".to_owned());
        assert!(connected(None, counters(1, 1), &status));
    }

    #[test]
    fn the_place_names_a_logout_a_disconnect_and_another_region() {
        let status = |state: &str, sim: Option<&str>| ViewerStatus {
            login_state: Some(state.to_owned()),
            current_sim: sim.map(str::to_owned),
            ..ViewerStatus::default()
        };
        assert_eq!(
            place(true, &status("logout", None), Some("Welcome")),
            Place::LoggedOut("logout".to_owned())
        );
        assert_eq!(
            place(false, &status("login", None), Some("Welcome")),
            Place::Disconnected
        );
        assert_eq!(
            place(true, &status("login", Some("Elsewhere")), Some("Welcome")),
            Place::OtherRegion("Elsewhere".to_owned())
        );
        assert_eq!(
            place(
                true,
                &status("login", Some("localhost/welcome")),
                Some("Welcome")
            ),
            Place::InRegion
        );
        assert_eq!(
            place(true, &status("login", None), Some("Welcome")),
            Place::InRegion
        );
        assert_eq!(
            place(true, &status("login", Some("Elsewhere")), None),
            Place::InRegion
        );
    }

    #[test]
    fn the_status_and_the_avatar_list_read_decimal_commas_and_empty_values() {
        let status = ViewerStatus::from_json(&json!({
            "first": {"value": "Relay"}, "last": {"value": "Bot"},
            "loginstate": {"value": "login"}, "currentsim": {},
            "positionx": {"value": "128,5"}, "positiony": {"value": "10"}, "positionz": {"value": "22.25"},
        }));
        assert_eq!(status.own_name.as_deref(), Some("Relay Bot"));
        assert_eq!(status.current_sim, None);
        assert_eq!(status.position, Some([128.5, 10.0, 22.25]));

        let avatars = seen_avatars(&json!({
            "OSGrid-Avatar-1": {"Name": "Near Resident", "Region": "localhost/Welcome", "X": "130", "Y": "128", "Z": "25"},
            "OSGrid-Avatar-2": {"Name": "Far Resident", "Region": "localhost/Welcome", "X": "20,5", "Y": "40", "Z": "25"},
            "OSGrid-Avatar-3": {"Name": "Other Resident", "Region": "localhost/Elsewhere", "X": "1", "Y": "1", "Z": "1"},
            "OSGrid-Avatar-4": {"Name": "Relay Bot", "Region": "localhost/Welcome", "X": "128", "Y": "128", "Z": "25"},
            "OSGrid-Avatar-5": {"Region": "localhost/Welcome"},
        }))
        .expect("a map");
        assert_eq!(avatars.len(), 4);
        let picture = hearing(
            &avatars,
            Some("Relay Bot"),
            Some([128.0, 128.0, 25.0]),
            Some("Welcome"),
            20.0,
        );
        assert_eq!((picture.in_region, picture.beyond), (2, 1));
        assert_eq!(picture.far[0].0, "Far Resident");
        assert!((picture.far[0].1 - 138.9).abs() < 0.1, "{:?}", picture.far);
        let unknown = hearing(&avatars, Some("Relay Bot"), None, Some("Welcome"), 20.0);
        assert_eq!((unknown.in_region, unknown.beyond), (2, 0));
        assert!(!unknown.position_known);
    }
}
