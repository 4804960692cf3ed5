//! The simulated viewer's state: its one global chat queue (drained by any GET, each line stamped
//! with its receive time), the avatars it sees, what it said and handed out, the requests and the
//! counters (how many were in flight at once), the test switches (delay, trickle, failing POSTs),
//! where the viewer is (`presence::Place`), the one "REST Input" thread, and the crash and shutdown
//! tokens, behind one short-held lock ([`Shared`]). Also the stable UUIDs of simulated avatars.
//!
//! It must not write JSON or answer requests: `routes` reads and changes this state to do that.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use indexmap::IndexMap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::sim::lookingglass::presence::{Place, SimAvatar, hears};
use crate::sim::lookingglass::{
    Dialect, HandedOut, REGION_NAME, SaidLine, SimChatLine, ViewerSimSettings,
};

/// A queued line, stamped with its receive time.
#[derive(Clone, Debug)]
pub(super) struct QueuedLine {
    pub(super) line: SimChatLine,
    pub(super) received_at: DateTime<Utc>,
}

/// Everything the handlers and the handle share, behind one short-held lock.
pub(super) struct ViewerState {
    pub(super) queue: VecDeque<QueuedLine>,
    /// Avatar name → what the viewer knows of it, in the order they became visible (kept, stale,
    /// when the viewer is disconnected).
    pub(super) avatars: IndexMap<String, SimAvatar>,
    pub(super) said: Vec<SaidLine>,
    pub(super) handed_out: Vec<HandedOut>,
    /// Bytes of the chat responses whose write completed.
    pub(super) n_bytes_handed_out: u64,
    pub(super) n_gets: u64,
    pub(super) n_aborted: u64,
    pub(super) response_delay: Duration,
    pub(super) trickle: Option<(usize, Duration)>,
    /// Where the viewer's avatar is and how it is connected.
    pub(super) place: Place,
    /// Every request that reached the REST server, as (method, path), in arrival order.
    pub(super) requests: Vec<(String, String)>,
    /// Requests arrived and not yet completely answered.
    pub(super) n_in_flight: u64,
    /// The most requests that were in flight at once.
    pub(super) max_in_flight: u64,
    /// Chat POSTs received.
    pub(super) n_posts: u64,
    /// The chat POSTs (by their `n_posts` number) answered 500 without saying anything.
    pub(super) failing_posts: Vec<u64>,
}

/// The simulator's shared core.
pub(super) struct Shared {
    pub(super) dialect: Dialect,
    pub(super) timezone: Tz,
    pub(super) own_name: String,
    pub(super) crash_on_abort: bool,
    /// The `Host` header value accepted (compared case-insensitively); `None` accepts any.
    pub(super) accepted_host: Option<String>,
    /// The lower-cased chat path prefix.
    pub(super) chat_prefix: &'static str,
    state: Mutex<ViewerState>,
    /// LookingGlass handles requests on one "REST Input" thread, one after another; a slow
    /// response blocks every other request. Held by a handler until its response is written.
    pub(super) rest_thread: Arc<tokio::sync::Mutex<()>>,
    /// Cancelled when the server must stop (stop() or a crash).
    pub(super) server_shutdown: CancellationToken,
    /// Cancelled when the viewer "crashed".
    pub(super) crashed: CancellationToken,
    /// Woken after every said line, for the CLI's printer.
    pub(super) said_notify: Notify,
}

impl Shared {
    pub(super) fn state(&self) -> MutexGuard<'_, ViewerState> {
        // A panic while holding this lock could only come from a bug in this module; the state
        // stays usable, so a poisoned lock is taken over rather than spreading the panic.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The state of a viewer just started with `settings`: logged in, its own avatar visible,
    /// nothing queued. `accepted_host` and `chat_prefix` are the dialect's (see the fields).
    pub(super) fn new(
        settings: ViewerSimSettings,
        accepted_host: Option<String>,
        chat_prefix: &'static str,
    ) -> Self {
        let place = Place::new(REGION_NAME);
        let mut avatars = IndexMap::new();
        avatars.insert(
            settings.own_name.clone(),
            SimAvatar {
                uuid: name_uuid(&settings.own_name),
                position: place.own_position,
                region: place.region.clone(),
            },
        );
        Shared {
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
                place,
                requests: Vec::new(),
                n_in_flight: 0,
                max_in_flight: 0,
                n_posts: 0,
                failing_posts: Vec::new(),
            }),
            rest_thread: Arc::new(tokio::sync::Mutex::new(())),
            server_shutdown: CancellationToken::new(),
            crashed: CancellationToken::new(),
            said_notify: Notify::new(),
        }
    }
}

/// Enqueues `line` unless its message is empty or the viewer does not hear it (not connected, or
/// the speaker out of range: `presence::hears`), stamping it with its receive time.
pub(super) fn enqueue(shared: &Shared, line: SimChatLine) {
    if line.message.is_empty() {
        return;
    }
    let received_at = line.received_at.unwrap_or_else(Utc::now);
    let mut state = shared.state();
    if !hears(&state, &line) {
        state.place.n_unheard += 1;
        return;
    }
    state.queue.push_back(QueuedLine { line, received_at });
}

/// A stable lower-case v4 UUID derived from `name` (two FNV-1a 64-bit hashes with different
/// offsets), so tests can predict it and it never changes between runs.
pub(super) fn name_uuid(name: &str) -> String {
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
pub(super) fn object_owner_uuid(name: &str) -> String {
    name_uuid(&format!("owner of {name}"))
}
