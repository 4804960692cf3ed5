//! The relay knows whether it hears the region (issue 20, spec §10): a region restart that leaves
//! the viewer disconnected while its status says `login`, a logged-out viewer, a viewer in another
//! region; `/readyz`, `/metrics` and the recovery through the viewer's REST login; the gap marker
//! the CMS chat gets, once, across a restart of the relay too; and who is beyond hearing range.

use std::time::Duration;

use opensim_chat_relay::check::Outcome;
use opensim_chat_relay::outbox::Cursor;

use crate::health::{Observed, sample};
use crate::helpers::{
    PATIENCE, TestEnv, collect_stderr, eventually, health_port, metric, metrics, sigterm,
};

/// A check every 5 s (`presence::CHECK_INTERVAL`), a recovery at the first out-of-region check and
/// the marker at the next: well within this on a busy machine.
const LONG_PATIENCE: Duration = Duration::from_secs(60);

fn markers(env: &TestEnv) -> Vec<String> {
    env.stored_messages()
        .into_iter()
        .filter(|message| message.starts_with("[relay]"))
        .collect()
}

/// Whether the CMS stored `text` (an unlinked speaker's line carries the anonymous prefix).
fn stored_line(env: &TestEnv, text: &str) -> bool {
    env.stored_messages()
        .iter()
        .any(|message| message.ends_with(text))
}

async fn viewer_check(relay: &Observed) -> (bool, String) {
    let (_, body) = relay.get_json("/readyz").await;
    let viewer = &body["checks"]["viewer"];
    (
        viewer["ok"] == true,
        viewer["reason"].as_str().unwrap_or("").to_owned(),
    )
}

async fn post(url: &str, body: &str) -> serde_json::Value {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .post(url)
        .body(body.to_owned())
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("json")
}

/// What `/readyz` tells an operator without `[viewer.login]` to do: log the viewer out and in again
/// through its REST calls.
async fn log_out_and_in_by_hand(env: &TestEnv) {
    assert_eq!(
        post(&env.viewer.connect_url("logout"), "").await,
        serde_json::json!({})
    );
    let login = "LOGINFIRST=Relay&LOGINLAST=Bot&LOGINPASS=x&LOGINGRID=OSGrid&LOGINSIM=Sim";
    assert_eq!(
        post(&env.viewer.connect_url("login"), login).await,
        serde_json::json!({})
    );
}

/// A `[viewer.login]` for the simulated viewer, its password in a file.
fn login_toml(env: &TestEnv) -> String {
    let file = env.dir.path().join("viewer-password");
    std::fs::write(&file, "bot-secret\n").expect("write password file");
    format!(
        "[viewer.login]\nfirst = \"Relay\"\nlast = \"Bot\"\npassword_file = \"{}\"\ngrid = \"OSGrid\"\nregion = \"Sim\"\nstart_position = \"128/128/25\"\n",
        file.display()
    )
}

#[tokio::test]
async fn a_region_restart_mid_chat_is_noticed_recovered_and_marked_once() {
    // Arrange
    let env = TestEnv::start().await;
    env.lg.set_login_password("bot-secret");
    let relay = Observed::start(&env, &login_toml(&env), &[]).await;
    env.lg.say("Alice Resident", "before the restart");
    eventually(PATIENCE, "the first line at the cms", || async {
        stored_line(&env, "before the restart")
    })
    .await;

    // Act: the region restarts while Alice talks on.
    env.lg.restart_region();
    env.lg
        .say("Alice Resident", "while the viewer is disconnected");
    eventually(
        LONG_PATIENCE,
        "the relay logs the viewer in again",
        || async {
            env.lg.connection() == opensim_chat_relay::sim::lookingglass::Connection::Connected
        },
    )
    .await;
    env.lg.say("Alice Resident", "after the recovery");
    eventually(
        LONG_PATIENCE,
        "the line after the recovery and a marker",
        || async { stored_line(&env, "after the recovery") && !markers(&env).is_empty() },
    )
    .await;

    // Assert
    let stored = env.stored_messages();
    assert!(
        !stored.iter().any(|m| m.contains("while the viewer")),
        "{stored:?}"
    );
    let markers = markers(&env);
    assert_eq!(markers.len(), 1, "{markers:?}");
    let marker = &markers[0];
    assert!(
        marker.starts_with("[relay] chat in Sim was not recorded between ")
            && marker.ends_with(": the region restarted"),
        "{marker}"
    );
    assert!(
        !marker.contains("Alice"),
        "a marker names no speaker: {marker}"
    );
    let row = env
        .stored()
        .into_iter()
        .find(|row| row.message == *marker)
        .expect("the row");
    assert_eq!(row.user_id, None, "the relay's own line is anonymous");
    assert_eq!(env.lg.n_logouts(), 1);
    let (_, metrics) = relay.get("/metrics").await;
    assert_eq!(
        sample(&metrics, "opensim_chat_relay_viewer_out_of_region"),
        0.0
    );
    assert_eq!(
        sample(&metrics, "opensim_chat_relay_viewer_out_of_region_total"),
        1.0
    );
    assert_eq!(
        sample(&metrics, "opensim_chat_relay_viewer_logins_total"),
        1.0
    );
    assert_eq!(
        sample(&metrics, "opensim_chat_relay_gap_markers_total"),
        1.0
    );
    assert!(viewer_check(&relay).await.0);
    assert_eq!(
        env.lg.max_concurrent_requests(),
        1,
        "one viewer request at a time"
    );
    assert_eq!(env.lg.n_aborted(), 0);
    let (_, status) = relay.get("/status").await;
    let (_, readyz) = relay.get("/readyz").await;
    let texts = [
        ("/status", status),
        ("/readyz", readyz),
        ("/metrics", metrics),
    ];
    for (what, text) in texts {
        assert!(
            !text.contains("bot-secret"),
            "the viewer's password in {what}"
        );
    }
    relay.stop().await;
}

#[tokio::test]
async fn without_a_login_readyz_says_what_to_do_and_the_marker_survives_a_relay_restart() {
    // Arrange
    let env = TestEnv::start().await;
    let relay = Observed::start(&env, "", &[]).await;
    eventually(PATIENCE, "ready", || async {
        relay.get("/readyz").await.0 == 200
    })
    .await;

    // Act: the region restarts; the relay is restarted while the viewer is out.
    env.lg.restart_region();
    eventually(LONG_PATIENCE, "/readyz names the viewer", || async {
        !viewer_check(&relay).await.0
    })
    .await;
    let (status, _) = relay.get("/readyz").await;
    let (_, reason) = viewer_check(&relay).await;
    let (_, metrics) = relay.get("/metrics").await;
    relay.stop().await;
    let relay = Observed::start(&env, "", &[]).await;
    eventually(LONG_PATIENCE, "/readyz names the viewer again", || async {
        !viewer_check(&relay).await.0
    })
    .await;
    // The operator does what /readyz says.
    log_out_and_in_by_hand(&env).await;
    eventually(LONG_PATIENCE, "ready again and the gap marked", || async {
        viewer_check(&relay).await.0 && !markers(&env).is_empty()
    })
    .await;

    // Assert
    assert_eq!(status, 503);
    assert!(reason.contains("the region restarted"), "{reason}");
    assert!(
        reason.contains("POST /api/LLLP/connect/logout") && reason.contains("[viewer.login]"),
        "{reason}"
    );
    assert_eq!(
        sample(&metrics, "opensim_chat_relay_viewer_out_of_region"),
        1.0
    );
    assert_eq!(markers(&env).len(), 1, "{:?}", markers(&env));
    let (_, metrics) = relay.get("/metrics").await;
    assert_eq!(
        sample(&metrics, "opensim_chat_relay_viewer_out_of_region_total"),
        0.0,
        "the stretch began before this run"
    );
    assert_eq!(
        sample(&metrics, "opensim_chat_relay_gap_markers_total"),
        1.0
    );
    relay.stop().await;
}

/// The chat POSTs the viewer received, heard or not.
fn chat_posts(env: &TestEnv) -> usize {
    env.lg
        .requests()
        .iter()
        .filter(|(method, path)| method == "POST" && path == "/api/chat")
        .count()
}

/// Waits for a few more CMS reads (in-world's), so that whatever they would say had its turn.
async fn some_cms_reads(env: &TestEnv) {
    let n_reads = env.db.requests().len();
    eventually(PATIENCE, "more cms reads", || async {
        env.db.requests().len() > n_reads + 5
    })
    .await;
}

#[tokio::test]
async fn cms_lines_wait_out_a_region_restart_and_a_relay_restart_and_are_said_once_when_the_viewer_is_back()
 {
    // Arrange: no [viewer.login], so the viewer stays out until the operator brings it back.
    let env = TestEnv::start().await;
    let dora = crate::inworld::cms_user(&env);
    let fast = [
        ("inworld.poll_interval", "200ms"),
        ("inworld.max_lines_per_second", "100"),
    ];
    let relay = Observed::start(&env, "", &fast).await;
    eventually(PATIENCE, "ready, the in-world cursor set", || async {
        relay.get("/readyz").await.0 == 200
            && relay
                .outbox
                .cursor(Cursor::LastSaidId)
                .ok()
                .flatten()
                .is_some()
    })
    .await;

    // Act: the region restarts; once the relay knows, Dora types a line in the CMS.
    env.lg.restart_region();
    eventually(LONG_PATIENCE, "/readyz names the viewer", || async {
        !viewer_check(&relay).await.0
    })
    .await;
    let n_posts = chat_posts(&env);
    env.db.add_cms_line(1, dora, "typed during the restart");
    some_cms_reads(&env).await;

    // Assert: nothing sent to the disconnected viewer (it would be lost); /status says why.
    assert_eq!(
        chat_posts(&env),
        n_posts,
        "a chat POST to a viewer out of its region"
    );
    let (_, status) = relay.get_json("/status").await;
    assert_eq!(status["regions"][0]["inworld"]["paused"], true, "{status}");

    // Act: the relay is restarted while the viewer is still out, and Dora types again.
    relay.stop().await;
    env.db
        .add_cms_line(1, dora, "typed while the relay was down");
    let relay = Observed::start(&env, "", &fast).await;
    some_cms_reads(&env).await;

    // Assert: the new relay sends nothing either, from its first read on.
    assert_eq!(
        chat_posts(&env),
        n_posts,
        "a chat POST after the relay's restart"
    );

    // Act: the operator logs the viewer out and in again, as /readyz says.
    log_out_and_in_by_hand(&env).await;

    // Assert: both lines said, in order, once; several reads later, still once.
    let both = [
        "[Dora Admin] typed during the restart",
        "[Dora Admin] typed while the relay was down",
    ];
    let said = || -> Vec<String> { env.lg.said().into_iter().map(|s| s.message).collect() };
    eventually(LONG_PATIENCE, "both lines said in-world", || async {
        said() == both
    })
    .await;
    some_cms_reads(&env).await;
    assert_eq!(said(), both);
    let (_, status) = relay.get_json("/status").await;
    assert_eq!(status["regions"][0]["inworld"]["paused"], false, "{status}");
    relay.stop().await;
}

#[tokio::test]
async fn a_second_restart_after_the_one_logout_asks_for_a_viewer_restart_instead_of_looping() {
    // Arrange: the viewer's one logout is spent on a first recovery.
    let env = TestEnv::start().await;
    let relay = Observed::start(&env, &login_toml(&env), &[]).await;
    env.lg.restart_region();
    eventually(LONG_PATIENCE, "the first recovery", || async {
        env.lg.connection() == opensim_chat_relay::sim::lookingglass::Connection::Connected
    })
    .await;
    eventually(LONG_PATIENCE, "ready again", || async {
        viewer_check(&relay).await.0
    })
    .await;

    // Act
    env.lg.restart_region();
    eventually(
        LONG_PATIENCE,
        "/readyz asks for a viewer restart",
        || async {
            viewer_check(&relay)
                .await
                .1
                .contains("restart the viewer process")
        },
    )
    .await;
    let logouts = |env: &TestEnv| {
        env.lg
            .requests()
            .iter()
            .filter(|(method, path)| method == "POST" && path.ends_with("/logout"))
            .count()
    };
    let n_logouts = logouts(&env);
    let n_status = env.lg.requests().len();
    eventually(LONG_PATIENCE, "two more checks", || async {
        env.lg
            .requests()
            .iter()
            .skip(n_status)
            .filter(|(_, path)| path.ends_with("/status"))
            .count()
            >= 2
    })
    .await;

    // Assert: no further logout or login was tried.
    assert_eq!(logouts(&env), n_logouts);
    assert_eq!(
        n_logouts, 2,
        "one per restart, none after the one that changed nothing"
    );
    assert!(
        !env.lg
            .requests()
            .iter()
            .skip(n_status)
            .any(|(method, _)| method == "POST"),
        "the relay stopped trying"
    );
    assert!(!viewer_check(&relay).await.0);
    relay.stop().await;
}

#[tokio::test]
async fn a_logged_out_viewer_and_one_in_another_region_fail_readyz_with_their_reason() {
    let env = TestEnv::start().await;
    let relay = Observed::start(&env, "", &[("viewer.region", "Sim")]).await;
    eventually(PATIENCE, "ready", || async {
        relay.get("/readyz").await.0 == 200
    })
    .await;

    env.lg.set_logged_in(false);
    eventually(LONG_PATIENCE, "logged out named", || async {
        viewer_check(&relay)
            .await
            .1
            .contains("not logged in (logout)")
    })
    .await;
    env.lg.set_logged_in(true);
    eventually(LONG_PATIENCE, "ready again", || async {
        viewer_check(&relay).await.0
    })
    .await;
    env.lg.move_to_region("Elsewhere");
    eventually(LONG_PATIENCE, "another region named", || async {
        let reason = viewer_check(&relay).await.1;
        reason.contains("another region (Elsewhere)") && reason.contains("teleport")
    })
    .await;
    env.lg.move_to_region("Sim");
    eventually(LONG_PATIENCE, "two markers", || async {
        markers(&env).len() == 2
    })
    .await;
    let markers = markers(&env);
    assert!(
        markers[0].ends_with(": the viewer was logged out"),
        "{markers:?}"
    );
    assert!(
        markers[1].ends_with(": the viewer was in another region"),
        "{markers:?}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn avatars_beyond_hearing_range_are_counted_from_the_viewers_position() {
    let env = TestEnv::start().await;
    env.lg.set_decimal_comma(true);
    env.lg
        .place_avatar("Near Resident", "Sim", [130.5, 128.0, 25.0]);
    env.lg
        .place_avatar("Far Resident", "Sim", [20.5, 40.0, 25.0]);
    env.lg
        .place_avatar("Other Resident", "Elsewhere", [128.0, 128.0, 25.0]);
    let relay = Observed::start(&env, "", &[("viewer.hearing_range", "20")]).await;

    eventually(LONG_PATIENCE, "the hearing gauges", || async {
        let (_, metrics) = relay.get("/metrics").await;
        sample(&metrics, "opensim_chat_relay_avatars_in_region") == 2.0
            && sample(&metrics, "opensim_chat_relay_avatars_beyond_hearing") == 1.0
    })
    .await;
    let (_, status) = relay.get_json("/status").await;
    assert_eq!(status["viewer"]["hears_region"], true);
    assert_eq!(status["viewer"]["avatars_beyond_hearing"], 1);
    relay.stop().await;
}

#[tokio::test]
async fn check_prints_the_viewers_place_and_whom_it_cannot_hear() {
    let env = TestEnv::start().await;
    env.lg
        .place_avatar("Near Resident", "Sim", [130.0, 128.0, 25.0]);
    env.lg
        .place_avatar("Far Resident", "Sim", [20.5, 40.0, 25.0]);
    let settings = env.settings("", &[("viewer.region", "Sim")]);

    let before = opensim_chat_relay::check::run(&settings).await;
    env.lg.restart_region();
    let after = opensim_chat_relay::check::run(&settings).await;

    let region = before.line("viewer.region").expect("a region line");
    assert_eq!(region.outcome, Outcome::Ok, "{region:?}");
    let hearing = before.line("viewer.hearing").expect("a hearing line");
    assert_eq!(hearing.outcome, Outcome::Warn, "{hearing:?}");
    assert!(
        hearing.detail.contains("1 of 2 avatars") && hearing.detail.contains("Far Resident 139 m"),
        "{hearing:?}"
    );
    assert!(
        hearing
            .fix
            .as_deref()
            .unwrap_or("")
            .contains("say_distance")
    );
    let region = after.line("viewer.region").expect("a region line");
    assert_eq!(region.outcome, Outcome::Fail, "{region:?}");
    assert!(region.detail.contains("the region restarted"), "{region:?}");
    assert!(
        region
            .fix
            .as_deref()
            .unwrap_or("")
            .contains("POST /api/LLLP/connect/logout"),
        "{region:?}"
    );
    assert!(!after.passed());
}

#[tokio::test]
async fn lines_dropped_by_outbox_max_age_get_one_marker_without_their_text_or_speaker() {
    let env = TestEnv::start().await;
    env.db.set_offline(true);
    let relay = env.start_relay("", &[("outbox.max_age", "1s")]).await;
    for i in 0..3 {
        env.lg.say("Alice Resident", &format!("stale {i}"));
    }
    eventually(PATIENCE, "the stale lines dropped", || async {
        relay.outbox.n_dropped() == 3
    })
    .await;

    env.db.set_offline(false);
    eventually(LONG_PATIENCE, "a marker at the cms", || async {
        !markers(&env).is_empty()
    })
    .await;
    let stats = relay.stats.clone();
    relay.stop().await;

    let markers = markers(&env);
    assert_eq!(markers.len(), 1, "{markers:?}");
    let marker = &markers[0];
    assert!(
        marker.starts_with("[relay] 3 lines of chat in Sim said between ")
            && marker
                .ends_with("were not recorded: they waited longer than outbox.max_age for the CMS"),
        "{marker}"
    );
    assert!(
        !marker.contains("stale") && !marker.contains("Alice"),
        "{marker}"
    );
    assert_eq!(
        opensim_chat_relay::metrics::Stats::get(&stats.gap_markers),
        1
    );
}

#[tokio::test]
async fn an_unreadable_viewer_answer_gets_a_marker_once_across_a_relay_restart() {
    let env = TestEnv::start().await;
    let bodies = vec![b"<html><body>Bad Gateway</body></html>".to_vec()];
    // Kill the relay as soon as the body is quarantined, before any marker: the note must survive.
    let (relay, stop) = env.start_relay_on_scripted_viewer(bodies, &[]).await;
    eventually(PATIENCE, "the body quarantined", || async {
        relay.outbox.quarantine_len() == 1
    })
    .await;
    relay.kill().await;
    stop.cancel();
    assert!(
        markers(&env).is_empty(),
        "no marker before the notes settle"
    );

    let (relay, stop) = env.start_relay_on_scripted_viewer(Vec::new(), &[]).await;
    eventually(LONG_PATIENCE, "a marker at the cms", || async {
        !markers(&env).is_empty()
    })
    .await;
    // The notes leave the outbox in the flush that stores the marker: none is left to mark again.
    assert!(relay.outbox.pending_gaps().expect("notes").is_empty());
    relay.stop().await;
    stop.cancel();

    let markers = markers(&env);
    assert_eq!(markers.len(), 1, "{markers:?}");
    assert!(
        markers[0].starts_with("[relay] some chat in the region received at ")
            && markers[0].ends_with(
                "was not recorded: the viewer's answer could not be read whole (kept in the outbox quarantine)"
            ),
        "{}",
        markers[0]
    );
}

#[tokio::test]
async fn the_log_tells_each_end_of_a_stretch_once_and_never_the_viewers_password() {
    // A real relay process, logging JSON to stderr, with [viewer.login] from the environment.
    let env = TestEnv::start().await;
    env.lg.set_login_password("bot-secret");
    let password_file = env.dir.path().join("viewer-password");
    std::fs::write(&password_file, "bot-secret\n").expect("write password file");
    let password_file = password_file.to_string_lossy().into_owned();
    let overrides = [
        ("log.format", "json"),
        ("viewer.login.first", "Relay"),
        ("viewer.login.last", "Bot"),
        ("viewer.login.password_file", password_file.as_str()),
        ("viewer.login.grid", "OSGrid"),
        ("viewer.login.region", "Sim"),
        ("viewer.login.start_position", "128/128/25"),
    ];
    let mut relay = env.spawn_relay_process(&overrides, std::process::Stdio::piped());
    let log = collect_stderr(&mut relay);
    let port = health_port(&log).await;

    env.lg.restart_region();
    eventually(LONG_PATIENCE, "recovered and marked", || async {
        metric(&metrics(port).await, "opensim_chat_relay_gap_markers_total") == Some(1.0)
    })
    .await;
    let status = sigterm(relay);

    assert!(status.success(), "{status:?}");
    let log = log.lock().expect("log").clone();
    let told = |needle: &str| log.lines().filter(|line| line.contains(needle)).count();
    assert_eq!(told("the viewer does not hear its region"), 1, "{log}");
    assert_eq!(told("the viewer hears its region again"), 1, "{log}");
    assert_eq!(told("logged the viewer out and in again"), 1, "{log}");
    assert!(!log.contains("bot-secret"), "the password in the log");
}
