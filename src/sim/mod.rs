//! Simulators of the two peers, faithful to `../shared/specs/`: the LookingGlass viewer chat API
//! (`lookingglass`) and the OpenSim-CMS 1.1 API (`cms`), on a minimal HTTP/1.1 server of our own
//! (`http`) so that header case, never-answered requests and aborted writes can be reproduced.
//! `server` is the start-up both share (bind, serve on a task, stop); [`parse_timezone`] reads the
//! zone both command lines take.
//!
//! They must not use the relay's wire types: they write their own JSON from the specs, so a serde
//! mistake cannot pass on both sides.

pub mod cms;
pub mod http;
pub mod lookingglass;
mod server;

use chrono_tz::Tz;

/// Parses an IANA time zone name for clap (`--timezone` of `sim viewer` and `sim cms`).
pub(crate) fn parse_timezone(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>().map_err(|_| {
        format!("unknown time zone {name:?} (expected an IANA name such as Europe/Amsterdam)")
    })
}
