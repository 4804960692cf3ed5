//! The presence task against the simulated viewer, one check at a time, and its pure parts.

use super::OutboxGaps;
use super::*;
use crate::config::ViewerLoginSettings;
use crate::lookingglass::ViewerEndpoint;
use crate::outbox::{GapKind, GapNote};
use crate::sim::lookingglass::{Connection, Dialect, ViewerSim, ViewerSimSettings};

/// The task against the simulated viewer, driven one check at a time (also by the in-world
/// speaker's tests, which pause on what it decides).
pub(crate) struct Rig {
    pub(crate) sim: ViewerSim,
    /// A client of the same viewer (and gate) as the task's.
    pub(crate) viewer: LookingGlassClient,
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) presence: Presence,
    pub(crate) _dir: tempfile::TempDir,
}

async fn rig(with_login: bool) -> Rig {
    rig_with(with_login, true).await
}

/// The rig, with `[viewer.login]` when `with_login` and `viewer.status_url` when `with_status`.
pub(crate) async fn rig_with(with_login: bool, with_status: bool) -> Rig {
    let sim = ViewerSim::start(ViewerSimSettings {
        listen: "127.0.0.1:0".parse().expect("address"),
        dialect: Dialect::Lookingglass,
        timezone: chrono_tz::UTC,
        own_name: "Relay Bot".to_owned(),
        crash_on_abort: true,
    })
    .await
    .expect("viewer simulator");
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = Arc::new(Outbox::open(dir.path(), 1 << 20).expect("outbox"));
    let stats = Arc::new(Stats::default());
    let viewer = LookingGlassClient::new(ViewerEndpoint {
        chat_url: sim.chat_url(),
        avatars_url: Some(sim.avatars_url()),
        status_url: with_status.then(|| sim.status_url()),
        inactivity: Duration::from_secs(30),
        max_response_bytes: 1 << 20,
    })
    .expect("client");
    // The password comes from its file, as the operator writes it, and the viewer takes no other.
    let login = with_login.then(|| {
        sim.handle().set_login_password("pw");
        let password_file = dir.path().join("viewer-password");
        std::fs::write(&password_file, "pw\n").expect("password file");
        ViewerLogin::from_settings(&ViewerLoginSettings {
            first: "Relay".to_owned(),
            last: "Bot".to_owned(),
            password_file: Some(password_file),
            grid: "OSGrid".to_owned(),
            region: "Sim".to_owned(),
            start_position: "128/128/25".to_owned(),
        })
        .expect("login")
    });
    let presence = Presence::new(PresenceDeps {
        viewer: viewer.clone(),
        outbox: outbox.clone(),
        stats: stats.clone(),
        region: Some("Sim".to_owned()),
        login,
        hearing_range: 20.0,
        gap_markers: true,
        cms_zone: Zone::Named(chrono_tz::UTC),
        name: String::new(),
        outbox_gaps: OutboxGaps::Here,
    })
    .expect("presence");
    Rig {
        sim,
        viewer,
        outbox,
        stats,
        presence,
        _dir: dir,
    }
}

async fn check(presence: &mut Presence) -> Place {
    let stop = CancellationToken::new();
    presence.try_check_once(&stop).await.expect("checked")
}

fn texts(outbox: &Outbox) -> Vec<String> {
    outbox
        .oldest(100)
        .expect("read")
        .into_iter()
        .map(|line| line.line.message)
        .collect()
}

#[tokio::test]
async fn a_restart_is_recovered_and_marked_and_a_second_one_asks_for_a_viewer_restart_once() {
    let mut rig = rig(true).await;
    let handle = rig.sim.handle();
    assert_eq!(check(&mut rig.presence).await, Place::InRegion);

    handle.restart_region();
    assert_eq!(check(&mut rig.presence).await, Place::Disconnected);
    assert_eq!(
        handle.connection(),
        Connection::Connected,
        "logged in again at once"
    );
    assert_eq!(rig.stats.viewer_out_of_region.load(Ordering::Relaxed), 1);
    assert_eq!(check(&mut rig.presence).await, Place::InRegion);
    let markers = texts(&rig.outbox);
    assert_eq!(markers.len(), 1, "{markers:?}");
    assert!(
        markers[0].ends_with(": the region restarted"),
        "{markers:?}"
    );
    assert_eq!(rig.stats.readiness.viewer_place_problem(), None);

    handle.restart_region();
    assert_eq!(check(&mut rig.presence).await, Place::Disconnected);
    let problem = rig
        .stats
        .readiness
        .viewer_place_problem()
        .expect("a problem");
    assert!(problem.contains("restart the viewer process"), "{problem}");
    let n_requests = handle.requests().len();
    assert_eq!(check(&mut rig.presence).await, Place::Disconnected);
    let posts: Vec<_> = handle.requests()[n_requests..]
        .iter()
        .filter(|(method, _)| method == "POST")
        .cloned()
        .collect();
    assert!(posts.is_empty(), "no further attempt: {posts:?}");
    assert_eq!(handle.n_logouts(), 1);
    assert_eq!(handle.n_aborted(), 0);
}

#[tokio::test]
async fn a_restart_between_the_two_reads_of_the_first_check_is_noticed_by_the_next() {
    // The relay has no memory yet, and the region restarts between its status read and its
    // counters read: whichever it reads first, the next check must see the viewer out.
    let mut rig = rig(false).await;
    let handle = rig.sim.handle();
    handle.restart_region_after_next_read();
    check(&mut rig.presence).await;
    assert_eq!(handle.connection(), Connection::Disconnected);
    assert_eq!(check(&mut rig.presence).await, Place::Disconnected);
}

#[tokio::test]
async fn without_a_login_nothing_is_posted_and_the_memory_outlives_the_task() {
    let mut rig = rig(false).await;
    let handle = rig.sim.handle();
    let stop = CancellationToken::new();
    assert_eq!(
        rig.presence.try_check_once(&stop).await.expect("checked"),
        Place::InRegion
    );
    handle.restart_region();
    assert_eq!(
        rig.presence.try_check_once(&stop).await.expect("checked"),
        Place::Disconnected
    );
    // A new task (a relay restart) remembers the verdict: 1 and 1 is still out.
    let Rig { presence, .. } = rig;
    let deps = presence.deps;
    let mut again = Presence::new(deps).expect("presence");
    assert_eq!(
        again.try_check_once(&stop).await.expect("checked"),
        Place::Disconnected
    );
    assert!(!handle.requests().iter().any(|(method, _)| method == "POST"));
}

#[tokio::test]
async fn a_viewer_out_when_the_relay_stopped_counts_as_out_until_the_first_check() {
    // Arrange: the viewer logged out, seen by the task.
    let mut rig = rig(false).await;
    let handle = rig.sim.handle();
    assert_eq!(check(&mut rig.presence).await, Place::InRegion);
    handle.set_logged_in(false);
    assert!(!check(&mut rig.presence).await.hears_region());

    // Act: the relay restarts (a new task, fresh counters and signals); the viewer logs back in.
    let Rig { presence, .. } = rig;
    let mut deps = presence.deps;
    let stats = Arc::new(Stats::default());
    deps.stats = stats.clone();
    let mut again = Presence::new(deps).expect("presence");

    // Assert: out before any check (in-world sends nothing meanwhile), in after the first.
    assert!(stats.readiness.viewer_place_problem().is_some());
    assert_eq!(stats.viewer_out_of_region.load(Ordering::Relaxed), 1);
    handle.set_logged_in(true);
    assert_eq!(check(&mut again).await, Place::InRegion);
    assert_eq!(stats.readiness.viewer_place_problem(), None);
    assert_eq!(stats.viewer_out_of_region.load(Ordering::Relaxed), 0);
}

#[test]
fn avatars_beyond_hearing_are_warned_about_once_after_ten_minutes_of_it() {
    let mut watch = BeyondWatch::default();
    let start = Instant::now();
    let at = |minutes: u64| start + Duration::from_secs(60 * minutes);
    let readings = [(0, 2), (5, 1), (10, 1), (15, 3), (16, 0), (17, 1), (27, 1)];
    let warned: Vec<bool> = readings
        .iter()
        .map(|(minute, n_beyond)| watch.warn_now(*n_beyond, at(*minute)))
        .collect();
    assert_eq!(warned, [false, false, true, false, false, false, true]);
}

#[test]
fn a_marker_says_what_where_when_and_why_in_the_cms_zone() {
    let from = DateTime::parse_from_rfc3339("2026-12-07T02:00:12Z")
        .expect("time")
        .with_timezone(&Utc);
    let to = DateTime::parse_from_rfc3339("2026-12-07T02:04:40Z")
        .expect("time")
        .with_timezone(&Utc);
    let zone = Zone::Named(chrono_tz::Europe::Amsterdam);
    assert_eq!(
        gap_marker("Welcome", from, to, "the region restarted", zone),
        "[relay] chat in Welcome was not recorded between 03:00:12 and 03:04:40: the region restarted"
    );
    let next_day = to + chrono::Duration::hours(22);
    assert_eq!(
        gap_marker("Welcome", from, next_day, "the viewer was logged out", zone),
        "[relay] chat in Welcome was not recorded between 2026-12-07 03:00:12 and 2026-12-08 01:04:40: the viewer was logged out"
    );
}

#[test]
fn the_outbox_notes_make_one_marker_per_kind_spanning_its_notes() {
    let at = |text: &str| {
        DateTime::parse_from_rfc3339(text)
            .expect("time")
            .with_timezone(&Utc)
    };
    let note = |kind, from: &str, to: &str, n| GapNote {
        kind,
        from: at(from),
        to: at(to),
        n,
        noted_at: at(to),
    };
    let notes = [
        note(
            GapKind::DroppedForAge,
            "2026-12-07T02:00:00Z",
            "2026-12-07T02:00:05Z",
            2,
        ),
        note(
            GapKind::Unreadable,
            "2026-12-07T02:01:00Z",
            "2026-12-07T02:01:00Z",
            1,
        ),
        note(
            GapKind::DroppedForAge,
            "2026-12-07T01:59:00Z",
            "2026-12-07T02:03:00Z",
            1,
        ),
    ];
    let zone = Zone::Named(chrono_tz::UTC);
    assert_eq!(
        outbox_gap_markers(&notes, "Welcome", zone),
        [
            "[relay] 3 lines of chat in Welcome said between 01:59:00 and 02:03:00 were not recorded: they waited longer than outbox.max_age for the CMS",
            "[relay] some chat in Welcome received at 02:01:00 was not recorded: the viewer's answer could not be read whole (kept in the outbox quarantine)",
        ]
    );
    let one = [note(
        GapKind::DroppedForSpace,
        "2026-12-07T02:00:00Z",
        "2026-12-07T02:00:00Z",
        1,
    )];
    assert_eq!(
        outbox_gap_markers(&one, "Welcome", zone),
        [
            "[relay] 1 line of chat in Welcome said between 02:00:00 and 02:00:00 was not recorded: the relay's outbox was full (outbox.max_bytes) while the CMS did not take them"
        ]
    );
}
