//! One region's speaker against the simulated viewer, one turn at a time, with that region's
//! presence task deciding where the viewer is: while it is out of its region (a region restart, a
//! logout, another region) nothing is sent to it, and the lines that waited are said once after.

use std::time::Duration;

use super::*;
use crate::cms::CmsClient;
use crate::config::{InworldSettings, SayType};
use crate::lookingglass::presence::Place;
use crate::outbox::Outbox;
use crate::presence::{self, Presence};
use crate::sim::lookingglass::{ViewerHandle, ViewerSim};

/// A speaker, its region's presence task and the viewer both talk to.
struct Rig {
    sim: ViewerSim,
    presence: Presence,
    speaker: Speaker,
    deps: Shared,
    inbox: Inbox,
    outbox: Arc<Outbox>,
    stats: Arc<Stats>,
    _dir: tempfile::TempDir,
}

/// The rig, with `[viewer.login]` (the relay brings the viewer back after a region restart itself)
/// and `viewer.status_url` when `with_status`.
async fn rig(with_status: bool) -> Rig {
    let presence::tests::Rig {
        sim,
        viewer,
        outbox,
        stats,
        presence,
        _dir,
    } = presence::tests::rig_with(true, with_status).await;
    // The speaker never reads the CMS (the stage's reader does): nothing listens here.
    let cms = CmsClient::unreachable();
    let deps = Shared {
        cms: Arc::new(cms),
        outbox: outbox.clone(),
        settings: InworldSettings {
            enabled: true,
            poll_interval: Duration::from_millis(30),
            look_back: Duration::from_secs(120),
            format: "[{first} {last}] {message}".to_owned(),
            channel: 0,
            say_type: SayType::Normal,
            max_lines_per_second: 1000.0,
            max_age: Duration::from_secs(600),
            max_queue: 50,
        },
        cms_zone: Zone::Named(chrono_tz::UTC),
        board: Arc::new(crate::cms::ReadBoard::new()),
    };
    let speaker = Speaker {
        region: InworldRegion {
            name: String::new(),
            label: "Sim".to_owned(),
            viewer,
            recently_said: Arc::new(crate::echo::RecentlySaid::default()),
            stats: stats.clone(),
        },
        next_slot: Instant::now(),
        handled_up_to: None,
        parts_said: None,
        held: None,
        paused_since: None,
    };
    Rig {
        sim,
        presence,
        speaker,
        deps,
        inbox: Inbox::new(),
        outbox,
        stats,
        _dir,
    }
}

/// A line Dora typed in the CMS just now.
fn cms_line(id: i64, message: &str) -> CmsChat {
    crate::inworld::tests::dora_typed(
        id,
        message,
        Utc::now().format("%Y-%m-%d %H:%M:%S").to_string(),
    )
}

/// A read of `rows` as the stage's reader hands it over.
fn read_of(rows: Vec<CmsChat>) -> Arc<Read> {
    let known = vec![None; rows.len()];
    Arc::new(Read {
        since: Utc::now() - chrono::Duration::seconds(5),
        rows: Arc::new(rows),
        known,
        seen_empty: false,
    })
}

impl Rig {
    async fn check(&mut self) -> Place {
        let stop = CancellationToken::new();
        self.presence.try_check_once(&stop).await.expect("checked")
    }

    async fn turn(&mut self) -> Turn {
        let stop = CancellationToken::new();
        self.speaker
            .try_say_once(&self.deps, &self.inbox, &stop)
            .await
            .expect("a turn")
    }

    fn cursor(&self) -> Option<i64> {
        self.outbox.cursor(Cursor::LastSaidId).expect("cursor")
    }

    /// Checks until presence hears the region again (a REST login takes a check to be seen).
    async fn back_in(&mut self) -> Place {
        let mut place = self.check().await;
        for _ in 0..2 {
            if place.hears_region() {
                break;
            }
            place = self.check().await;
        }
        place
    }

    fn paused_gauge(&self) -> u64 {
        Stats::get(&self.stats.inworld_paused)
    }
}

fn said(handle: &ViewerHandle) -> Vec<String> {
    handle.said().into_iter().map(|said| said.message).collect()
}

fn chat_posts(handle: &ViewerHandle) -> usize {
    handle
        .requests()
        .iter()
        .filter(|(method, path)| method == "POST" && path == "/api/chat")
        .count()
}

/// How the viewer leaves its region, and how it comes back (nothing: the relay's REST login).
type Move = fn(&ViewerHandle);

#[tokio::test]
async fn nothing_is_sent_to_a_viewer_out_of_its_region_and_the_waiting_lines_are_said_once_after() {
    let ways: [(&str, Move, Move); 3] = [
        ("a region restart", |lg| lg.restart_region(), |_| {}),
        (
            "a logout",
            |lg| lg.set_logged_in(false),
            |lg| lg.set_logged_in(true),
        ),
        (
            "another region",
            |lg| lg.move_to_region("Elsewhere"),
            |lg| lg.move_to_region("Sim"),
        ),
    ];
    for (way, leave, come_back) in ways {
        // Arrange: the viewer in its region; the speaker's cursor set by a first read.
        let mut rig = rig(true).await;
        let lg = rig.sim.handle();
        assert_eq!(rig.check().await, Place::InRegion, "{way}");
        rig.inbox.push(read_of(Vec::new()));
        assert_eq!(rig.turn().await, Turn::Stepped(InworldOutcome::default()));
        assert_eq!(rig.cursor(), Some(0), "{way}");

        // Act: the viewer leaves its region, presence notices, and Dora types two lines.
        leave(&lg);
        assert!(!rig.check().await.hears_region(), "{way}");
        let n_posts = chat_posts(&lg);
        rig.inbox
            .push(read_of(vec![cms_line(1, "one"), cms_line(2, "two")]));
        rig.inbox.push(read_of(vec![cms_line(2, "two")]));
        let turns = [rig.turn().await, rig.turn().await];

        // Assert: paused, nothing sent, the cursor still before both lines.
        assert_eq!(turns, [Turn::Paused, Turn::Paused], "{way}");
        assert_eq!(chat_posts(&lg), n_posts, "{way}: nothing sent while out");
        assert_eq!(rig.cursor(), Some(0), "{way}");
        assert_eq!(rig.paused_gauge(), 1, "{way}");

        // Act: the viewer is back and presence says so.
        come_back(&lg);
        assert_eq!(rig.back_in().await, Place::InRegion, "{way}");
        let turns = [rig.turn().await, rig.turn().await];

        // Assert: both lines said once, in order, from the first read; the second has nothing new.
        let said_both = InworldOutcome {
            n_said: 2,
            n_skipped: 0,
        };
        assert_eq!(
            turns,
            [
                Turn::Stepped(said_both),
                Turn::Stepped(InworldOutcome::default())
            ],
            "{way}"
        );
        assert_eq!(said(&lg), ["[Dora Admin] one", "[Dora Admin] two"], "{way}");
        assert_eq!(rig.cursor(), Some(2), "{way}");
        assert_eq!(rig.paused_gauge(), 0, "{way}");
    }
}

#[tokio::test]
async fn a_viewer_that_leaves_between_two_lines_of_a_read_is_sent_the_second_once_it_is_back() {
    // Arrange: a slot every 1,000 s, so the second line of the read waits long for its turn.
    let mut rig = rig(true).await;
    let lg = rig.sim.handle();
    rig.check().await;
    rig.inbox.push(read_of(Vec::new()));
    rig.turn().await;
    rig.deps.settings.max_lines_per_second = 0.001;
    rig.inbox
        .push(read_of(vec![cms_line(1, "one"), cms_line(2, "two")]));

    // Act: once the first line is said, the viewer is logged out and presence notices.
    let Rig {
        speaker,
        deps,
        inbox,
        presence,
        ..
    } = &mut rig;
    let stop = CancellationToken::new();
    let leave = async {
        for _ in 0..3000 {
            if !said(&lg).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        lg.set_logged_in(false);
        presence.try_check_once(&stop).await.expect("checked")
    };
    let (turn, place) = tokio::join!(speaker.try_say_once(deps, inbox, &stop), leave);

    // Assert: the turn ended without the second line, which stays before the cursor.
    assert!(!place.hears_region());
    let one_said = InworldOutcome {
        n_said: 1,
        n_skipped: 0,
    };
    assert_eq!(turn.expect("a turn"), Turn::Stepped(one_said));
    assert_eq!(said(&lg), ["[Dora Admin] one"]);
    assert_eq!(chat_posts(&lg), 1);
    assert_eq!(rig.cursor(), Some(1));
    assert_eq!(rig.turn().await, Turn::Paused);

    // Act: back in its region (the relay's REST login), its slot come.
    assert_eq!(rig.back_in().await, Place::InRegion);
    rig.speaker.next_slot = Instant::now();
    let turn = rig.turn().await;

    // Assert: the held read's second line is said, once.
    assert_eq!(turn, Turn::Stepped(one_said));
    assert_eq!(said(&lg), ["[Dora Admin] one", "[Dora Admin] two"]);
    assert_eq!(rig.cursor(), Some(2));
}

#[tokio::test]
async fn lines_older_than_max_age_when_the_viewer_is_back_are_skipped_and_counted() {
    // Arrange: the viewer logged out; a line typed 20 minutes ago (max_age is 10) and one now wait.
    let mut rig = rig(true).await;
    let lg = rig.sim.handle();
    rig.check().await;
    rig.inbox.push(read_of(Vec::new()));
    rig.turn().await;
    lg.set_logged_in(false);
    rig.check().await;
    let mut old = cms_line(1, "long ago");
    old.timestamp = (Utc::now() - chrono::Duration::minutes(20))
        .format("%Y-%m-%d %H:%M:%S")
        .to_string();
    rig.inbox.push(read_of(vec![old, cms_line(2, "now")]));
    assert_eq!(rig.turn().await, Turn::Paused);

    // Act: back in its region.
    lg.set_logged_in(true);
    assert_eq!(rig.back_in().await, Place::InRegion);
    let turn = rig.turn().await;

    // Assert: the old line skipped and counted as before, the new one said.
    let outcome = InworldOutcome {
        n_said: 1,
        n_skipped: 1,
    };
    assert_eq!(turn, Turn::Stepped(outcome));
    assert_eq!(said(&lg), ["[Dora Admin] now"]);
    assert_eq!(Stats::get(&rig.stats.inworld_skipped), 1);
}

#[tokio::test]
async fn without_the_viewers_status_the_speaker_never_pauses() {
    // Arrange: no viewer.status_url, so presence cannot tell where the viewer is; it logs out.
    let mut rig = rig(false).await;
    let lg = rig.sim.handle();
    rig.inbox.push(read_of(Vec::new()));
    rig.turn().await;
    lg.set_logged_in(false);
    assert_eq!(rig.check().await, Place::InRegion);

    // Act
    rig.inbox.push(read_of(vec![cms_line(1, "one")]));
    let turn = rig.turn().await;

    // Assert: said (and unheard) as before: nothing changes without the status.
    let outcome = InworldOutcome {
        n_said: 1,
        n_skipped: 0,
    };
    assert_eq!(turn, Turn::Stepped(outcome));
    assert_eq!(chat_posts(&lg), 1);
    assert_eq!(rig.paused_gauge(), 0);
}
