//! CMS → in-world: lines typed in the CMS are said by the viewer's avatar once each, in order.

use std::time::{Duration, Instant};

use opensim_chat_relay::outbox::Cursor;
use opensim_chat_relay::sim::cms::Permissions;

use crate::helpers::{Logs, PATIENCE, RunningRelay, TestEnv, eventually};

/// Fast in-world settings for tests.
const FAST: [(&str, &str); 2] = [
    ("inworld.poll_interval", "30ms"),
    ("inworld.max_lines_per_second", "100"),
];

/// Starts the relay with fast in-world settings and waits until its in-world cursor is set (lines
/// added to the CMS afterwards are said).
pub async fn start(env: &TestEnv, overrides: &[(&str, &str)]) -> RunningRelay {
    let mut all = FAST.to_vec();
    all.extend_from_slice(overrides);
    let relay = env.start_relay("", &all).await;
    let outbox = relay.outbox.clone();
    eventually(PATIENCE, "the in-world cursor set", || {
        let outbox = outbox.clone();
        async move { outbox.cursor(Cursor::LastSaidId).ok().flatten().is_some() }
    })
    .await;
    relay
}

fn said(env: &TestEnv) -> Vec<String> {
    env.lg.said().into_iter().map(|s| s.message).collect()
}

/// Dora, a CMS user who types in the CMS.
pub fn cms_user(env: &TestEnv) -> i64 {
    env.db
        .add_user("dora", "pw", "Dora", "Admin", Permissions::all())
}

#[tokio::test]
async fn cms_lines_reach_the_viewer_once_in_order_and_formatted() {
    let env = TestEnv::start().await;
    let dora = cms_user(&env);
    env.db
        .add_cms_line(1, dora, "typed before the relay ever ran");
    let relay = start(&env, &[]).await;

    for text in ["one", "two", "three"] {
        env.db.add_cms_line(1, dora, text);
    }
    eventually(PATIENCE, "three lines said", || async {
        env.lg.said().len() >= 3
    })
    .await;
    // Several more CMS reads, so a repeat would show.
    let n_posts = env.db.requests().len();
    eventually(PATIENCE, "more cms reads", || async {
        env.db.requests().len() > n_posts + 5
    })
    .await;
    relay.stop().await;

    assert_eq!(
        said(&env),
        ["[Dora Admin] one", "[Dora Admin] two", "[Dora Admin] three"]
    );
    let said = env.lg.said();
    assert!(
        said.iter()
            .all(|s| s.channel == 0 && s.chat_type == "Normal"),
        "{said:?}"
    );
    // The CMS's own chat GET without a timestamp returns the whole history: never used.
    assert!(
        env.db
            .requests()
            .iter()
            .all(|r| !(r.method == "GET" && r.path.ends_with("/chats/")))
    );
}

#[tokio::test]
async fn the_relays_own_echo_never_reaches_the_cms() {
    for status_url in ["keep", ""] {
        // With the viewer's status the own name filters the echo; without it, the memory of what was
        // said does.
        let env = TestEnv::start().await;
        let dora = cms_user(&env);
        let overrides: Vec<(&str, &str)> = if status_url.is_empty() {
            vec![("viewer.status_url", "")]
        } else {
            vec![]
        };
        let relay = start(&env, &overrides).await;
        env.db.add_cms_line(1, dora, "hello grid");
        eventually(PATIENCE, "the line said", || async {
            env.lg.said().len() == 1
        })
        .await;
        env.lg.say("Alice Resident", "marker after the echo");
        eventually(PATIENCE, "the marker relayed", || async {
            env.stored().iter().any(|c| !c.from_cms)
        })
        .await;
        relay.stop().await;

        let relayed: Vec<_> = env
            .stored()
            .into_iter()
            .filter(|c| !c.from_cms)
            .map(|c| c.message)
            .collect();
        assert_eq!(
            relayed,
            ["[Alice Resident] marker after the echo"],
            "status_url {status_url:?}"
        );
    }
}

#[tokio::test]
async fn a_restart_resumes_after_the_last_said_line() {
    let env = TestEnv::start().await;
    let dora = cms_user(&env);
    let first = start(&env, &[]).await;
    env.db.add_cms_line(1, dora, "before the restart");
    eventually(PATIENCE, "first line said", || async {
        env.lg.said().len() == 1
    })
    .await;
    first.stop().await;

    env.db.add_cms_line(1, dora, "while the relay was down");
    let second = start(&env, &[]).await;
    env.db.add_cms_line(1, dora, "after the restart");
    eventually(PATIENCE, "three lines said", || async {
        env.lg.said().len() >= 3
    })
    .await;
    second.stop().await;

    assert_eq!(
        said(&env),
        [
            "[Dora Admin] before the restart",
            "[Dora Admin] while the relay was down",
            "[Dora Admin] after the restart"
        ]
    );
}

#[tokio::test]
async fn long_lines_are_split_and_special_text_arrives_unchanged() {
    let env = TestEnv::start().await;
    let dora = cms_user(&env);
    let relay = start(&env, &[("inworld.format", "{message}")]).await;
    let special = "a+b=c & 100% \"quoted\" 'single'\nnew line: café 日本";
    env.db.add_cms_line(1, dora, special);
    let long = "word ".repeat(450);
    env.db.add_cms_line(1, dora, long.trim());
    eventually(PATIENCE, "all parts said", || async {
        env.lg.said().len() >= 4
    })
    .await;
    relay.stop().await;

    let said = said(&env);
    assert_eq!(said[0], special);
    assert!(
        said[1..]
            .iter()
            .all(|p| p.chars().count() <= 1000 && p.len() <= 1023)
    );
    assert_eq!(said[1..].join(" "), long.trim());
}

#[tokio::test]
async fn the_flood_limit_paces_a_burst() {
    let env = TestEnv::start().await;
    let dora = cms_user(&env);
    let relay = start(&env, &[("inworld.max_lines_per_second", "10")]).await;
    for i in 0..6 {
        env.db.add_cms_line(1, dora, &format!("burst {i}"));
    }
    let started = Instant::now();
    eventually(PATIENCE, "six lines said", || async {
        env.lg.said().len() == 6
    })
    .await;
    let elapsed = started.elapsed();
    relay.stop().await;

    // Six lines at 10 per second need at least five gaps of 100 ms (a lower bound: a slow machine only
    // makes it longer).
    assert!(
        elapsed >= Duration::from_millis(500),
        "six lines said in {elapsed:?}"
    );
}

#[tokio::test]
async fn lines_older_than_max_age_are_skipped_and_counted() {
    let env = TestEnv::start().await;
    let dora = cms_user(&env);
    let first = start(&env, &[("inworld.max_age", "1s")]).await;
    first.stop().await;
    env.db.add_cms_line(1, dora, "stale 1");
    env.db.add_cms_line(1, dora, "stale 2");
    // The CMS stores seconds: wait until the lines are certainly more than a second old.
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let second = env
        .start_relay("", &[FAST[0], FAST[1], ("inworld.max_age", "1s")])
        .await;
    env.db.add_cms_line(1, dora, "fresh");
    eventually(PATIENCE, "the fresh line said", || async {
        !env.lg.said().is_empty()
    })
    .await;
    let stats = second.stats.clone();
    second.stop().await;

    assert_eq!(said(&env), ["[Dora Admin] fresh"]);
    assert_eq!(
        stats
            .inworld_skipped
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[tokio::test]
async fn the_in_world_direction_can_be_turned_off() {
    let env = TestEnv::start().await;
    let dora = cms_user(&env);
    let relay = env.start_relay("", &[("inworld.enabled", "false")]).await;
    env.db.add_cms_line(1, dora, "nobody hears this");
    env.lg.say("Alice Resident", "marker");
    eventually(PATIENCE, "the marker relayed", || async {
        env.stored().iter().any(|c| !c.from_cms)
    })
    .await;
    relay.stop().await;

    assert!(env.lg.said().is_empty());
    assert!(
        env.db
            .requests()
            .iter()
            .all(|r| r.method != "GET" || !r.path.contains("/chats/"))
    );
}

#[tokio::test]
async fn a_failed_part_of_a_split_line_is_said_again_without_the_parts_before_it() {
    // Arrange: a CMS line of three parts; the viewer fails the POST of the second.
    let env = TestEnv::start().await;
    let dora = cms_user(&env);
    let relay = start(&env, &[("inworld.format", "{message}")]).await;
    env.lg.fail_chat_post(2);
    let long = "word ".repeat(450);

    // Act
    env.db.add_cms_line(1, dora, long.trim());
    env.db.add_cms_line(1, dora, "after the long line");
    eventually(PATIENCE, "the line after it said", || async {
        said(&env)
            .last()
            .is_some_and(|s| s == "after the long line")
    })
    .await;
    relay.stop().await;

    // Assert: each part once, in order, then the next line.
    let said = said(&env);
    assert_eq!(said.len(), 4, "{said:#?}");
    assert_eq!(said[..3].join(" "), long.trim());
    assert_eq!(said[3], "after the long line");
}

/// Dora types "one", "two" and "three" in the CMS; returns the id of "one" once all three are said.
async fn three_lines_said(env: &TestEnv, dora: i64) -> i64 {
    let first = env.db.add_cms_line(1, dora, "one");
    for text in ["two", "three"] {
        env.db.add_cms_line(1, dora, text);
    }
    eventually(PATIENCE, "three lines said", || async {
        env.lg.said().len() == 3
    })
    .await;
    first
}

#[tokio::test]
async fn after_a_cms_database_restore_in_world_goes_on_with_the_new_lines() {
    // Arrange: three CMS lines said; then the CMS database is restored from a backup taken after the
    // first, so the next line gets the id of the second.
    let (logs, _guard) = Logs::capture();
    let env = TestEnv::start().await;
    let dora = cms_user(&env);
    let relay = start(&env, &[]).await;
    let first = three_lines_said(&env, dora).await;

    // Act
    env.db.restore_chats(first);
    env.db.add_cms_line(1, dora, "after the restore");
    env.db.add_cms_line(1, dora, "and later");
    eventually(PATIENCE, "the new lines said", || async {
        env.lg.said().len() >= 5
    })
    .await;
    relay.stop().await;

    // Assert: the new lines said once, nothing said again, and the operator told.
    assert_eq!(
        said(&env),
        [
            "[Dora Admin] one",
            "[Dora Admin] two",
            "[Dora Admin] three",
            "[Dora Admin] after the restore",
            "[Dora Admin] and later"
        ]
    );
    let warned = logs.lines_with("cms ids went backwards");
    assert!(
        warned
            .iter()
            .any(|line| line.contains("WARN") && line.contains("in-world")),
        "{}",
        logs.text()
    );
}

#[tokio::test]
async fn a_cms_database_restored_while_the_relay_was_stopped_does_not_silence_in_world() {
    // Arrange: three lines said; the relay stops; the CMS database is restored from a backup taken
    // after the first of them.
    let env = TestEnv::start().await;
    let dora = cms_user(&env);
    let relay = start(&env, &[]).await;
    let first = three_lines_said(&env, dora).await;
    let typed_at = chrono::Utc::now().timestamp();
    relay.stop().await;
    env.db.restore_chats(first);
    // A restore takes longer than the rest of a second: the next line is typed in a later one.
    eventually(PATIENCE, "a later second", || async {
        chrono::Utc::now().timestamp() > typed_at
    })
    .await;

    // Act
    let relay = start(&env, &[]).await;
    env.db.add_cms_line(1, dora, "after the restore");
    eventually(PATIENCE, "the new line said", || async {
        env.lg.said().len() >= 4
    })
    .await;
    relay.stop().await;

    // Assert
    assert_eq!(
        said(&env),
        [
            "[Dora Admin] one",
            "[Dora Admin] two",
            "[Dora Admin] three",
            "[Dora Admin] after the restore"
        ]
    );
}

#[tokio::test]
async fn a_wide_read_the_cms_cannot_answer_is_not_repeated_after_every_narrow_read() {
    // Arrange: 30 lines typed 5 minutes ago, more rows than the CMS can build in one answer (its
    // PHP memory_limit, 20 rows here): every read reaching back over them dies.
    let env = TestEnv::start().await;
    let dora = cms_user(&env);
    for n in 0..30 {
        env.db
            .add_cms_line_dated(1, dora, &format!("old {n}"), Duration::from_secs(300));
    }
    env.db.set_memory_limit_rows(Some(20));
    let wide_since = chrono::Utc::now().timestamp() - 60;
    let chat_gets = || {
        env.db
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.contains("/chats/"))
            .filter_map(|r| {
                let since = r.path.split('/').rev().nth(1)?.parse::<i64>().ok()?;
                Some(since <= wide_since)
            })
            .collect::<Vec<bool>>()
    };

    // Act: 40 in-world reads.
    let relay = env
        .start_relay("", &[("inworld.poll_interval", "30ms")])
        .await;
    eventually(PATIENCE, "40 in-world reads", || async {
        chat_gets().len() >= 40
    })
    .await;
    relay.stop().await;

    // Assert: the narrow reads went on; the wide one was tried a few times, each reaching less
    // far, not every other read (20 of 40 before).
    let reads = chat_gets();
    let n_wide = reads.iter().filter(|wide| **wide).count();
    assert!(
        n_wide <= 5,
        "{n_wide} of {} reads reached back 5 minutes",
        reads.len()
    );
}
