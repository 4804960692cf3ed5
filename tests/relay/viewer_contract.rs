//! The viewer contract of spec §1.2 and §9, across every task that talks to the viewer: one request
//! at a time (the chat GET, the in-world POST, the status and avatars reads), and a status or avatars
//! URL the viewer never answers slows neither polling nor delivery and is warned about once.

use std::time::Duration;

use opensim_chat_relay::sim::cms::Permissions;

use crate::helpers::{Logs, PATIENCE, TestEnv, eventually};
use crate::inworld;

/// How many of `requests` went to a path ending in `suffix`.
fn n_to(requests: &[(String, String)], suffix: &str) -> usize {
    requests
        .iter()
        .filter(|(_, path)| path.ends_with(suffix))
        .count()
}

#[tokio::test]
async fn the_relay_sends_the_viewer_one_request_at_a_time_across_every_task() {
    // Arrange: every chat GET takes 100 ms to answer, so that a request any other task sent
    // meanwhile would wait in the viewer behind it.
    let env = TestEnv::start().await;
    let dora = env
        .db
        .add_user("dora", "pw", "Dora", "Admin", Permissions::all());
    env.lg.set_response_delay(Duration::from_millis(100));
    let relay = inworld::start(&env, &[]).await;

    // Act: lines typed in the CMS (in-world POSTs) and new speakers in the region (whose avatars
    // delivery looks up in the viewer's avatar list), while the poller polls.
    for i in 0..5 {
        env.db.add_cms_line(1, dora, &format!("from the cms {i}"));
    }
    for name in ["Erin Newcomer", "Frank Newcomer", "Gina Newcomer"] {
        env.lg.say(name, &format!("hello from {name}"));
    }
    eventually(PATIENCE, "five lines said and three relayed", || async {
        env.lg.said().len() == 5 && env.relayed_rows().len() == 3
    })
    .await;
    relay.stop().await;

    // Assert
    let requests = env.lg.requests();
    assert!(n_to(&requests, "/api/LLLP/status") >= 1, "{requests:?}");
    assert!(n_to(&requests, "/api/avatars") >= 1, "{requests:?}");
    assert!(requests.iter().filter(|(m, _)| m == "POST").count() >= 5);
    assert_eq!(
        env.lg.max_concurrent_requests(),
        1,
        "a request was sent while another was in the viewer"
    );
    assert_eq!(env.lg.n_aborted(), 0);
}

#[tokio::test]
async fn status_and_avatars_urls_the_viewer_never_answers_slow_neither_polling_nor_delivery() {
    // Arrange: paths the viewer has no handler for; it never answers them (spec §1.4).
    let (logs, _guard) = Logs::capture();
    let env = TestEnv::start().await;
    let status = env
        .viewer
        .status_url()
        .replace("/api/LLLP/status", "/api/LLLP/state");
    let avatars = env
        .viewer
        .avatars_url()
        .replace("/api/avatars", "/api/avatar");
    env.lg.say("Alice Resident", "said before the relay starts");

    // Act
    let relay = env
        .start_relay(
            "",
            &[
                ("viewer.status_url", &status),
                ("viewer.avatars_url", &avatars),
                ("viewer.request_timeout", "30s"),
            ],
        )
        .await;
    eventually(PATIENCE, "the first line delivered", || async {
        env.relayed_rows().len() == 1
    })
    .await;
    env.lg.say("Bob Builder", "said while the relay runs");
    let n_gets = env.lg.n_gets();
    eventually(PATIENCE, "twenty more chat GETs", || async {
        env.lg.n_gets() >= n_gets + 20
    })
    .await;
    eventually(PATIENCE, "the second line delivered", || async {
        env.relayed_rows().len() == 2
    })
    .await;
    relay.stop().await;

    // Assert: both paths were asked, and each is named once at warn with what to check.
    let requests = env.lg.requests();
    assert!(n_to(&requests, "/api/LLLP/state") >= 1, "{requests:?}");
    assert!(n_to(&requests, "/api/avatar") >= 1, "{requests:?}");
    for key in ["viewer.status_url", "viewer.avatars_url"] {
        let warnings: Vec<String> = logs
            .lines_with(key)
            .into_iter()
            .filter(|line| line.contains("WARN"))
            .collect();
        assert_eq!(warnings.len(), 1, "{key} warned once: {warnings:#?}");
        assert!(warnings[0].contains("never answers"), "{}", warnings[0]);
    }
    assert_eq!(env.lg.n_aborted(), 0);
}
