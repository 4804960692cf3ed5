//! What the relay asks of the CMS: its requests do not wait for each other (a chat POST is never
//! held behind a slow chat GET), a login is shared by whoever needs it at the same time, and the
//! in-world reads follow the new rows instead of re-reading two minutes of the grid, and delivery
//! leaves a CMS that slows down idle between its requests until it is fast again. Checked through
//! the simulator's busy spans and request log (counts and order) and the relay's metrics, not
//! through timing.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use opensim_chat_relay::cms::client::CmsEndpoint;
use opensim_chat_relay::cms::{ChatItem, CmsClient};
use opensim_chat_relay::sim::cms::{BusySpan, CostModel, Fault, RequestKind};
use secrecy::SecretString;

use crate::health::Observed;
use crate::helpers::{PATIENCE, RELAY_PASSWORD, RELAY_USER, TestEnv, eventually, metric};
use crate::inworld::cms_user;

fn client(env: &TestEnv) -> Arc<CmsClient> {
    Arc::new(
        CmsClient::new(CmsEndpoint {
            base_url: env.cms.base_url(),
            grid_id: 1,
            username: RELAY_USER.to_owned(),
            password: SecretString::from(RELAY_PASSWORD),
            timeout: Duration::from_secs(30),
            max_response_bytes: 16 << 20,
            ca_certificates: Vec::new(),
        })
        .expect("client builds"),
    )
}

fn spans(env: &TestEnv, kind: RequestKind) -> Vec<BusySpan> {
    env.db
        .busy_spans()
        .into_iter()
        .filter(|span| span.work.kind == kind)
        .collect()
}

fn is_chat_get(method: &str, path: &str) -> bool {
    method == "GET" && path.contains("/chats/")
}

#[tokio::test]
async fn a_chat_post_is_not_held_behind_a_slow_chat_get() {
    let env = TestEnv::start().await;
    let dora = cms_user(&env);
    for n in 0..200 {
        env.db
            .add_cms_line(1, dora, &format!("typed in the cms {n}"));
    }
    // A GET of these 200 rows takes a PHP worker 2 s; there are workers to spare.
    env.db.set_cost_model(Some(CostModel {
        per_row_read: Duration::from_millis(10),
        ..CostModel::php().with_workers(4)
    }));
    let cms = client(&env);
    cms.ensure_logged_in().await.expect("logged in");

    let reader = Arc::clone(&cms);
    let read = tokio::spawn(async move { reader.chats_since(0).await });
    eventually(PATIENCE, "the slow GET sent", || async {
        env.db
            .requests()
            .iter()
            .any(|r| is_chat_get(&r.method, &r.path))
    })
    .await;
    let posted = cms
        .post_chats(&[ChatItem {
            user_id: -1,
            message: "said while the CMS reads".to_owned(),
            timestamp: "2026-01-01 12:00:05".to_owned(),
            from_cms: 0,
        }])
        .await;
    let rows = read.await.expect("the read task ends");

    assert!(posted.is_ok(), "{posted:?}");
    assert_eq!(rows.expect("the read succeeds").len(), 200);
    let (get, post) = (
        spans(&env, RequestKind::ChatGet),
        spans(&env, RequestKind::ChatPost),
    );
    assert_eq!((get.len(), post.len()), (1, 1));
    // The POST was sent, worked on and answered while the GET was still being worked on.
    assert!(post[0].started > get[0].started, "{get:?} {post:?}");
    assert!(post[0].ended < get[0].ended, "{get:?} {post:?}");
}

#[tokio::test]
async fn requests_that_need_a_login_at_the_same_time_share_one() {
    let env = TestEnv::start().await;
    // Every request takes a little while, so the five overlap.
    env.db.set_cost_model(Some(CostModel {
        per_request: Duration::from_millis(50),
        ..CostModel::php().with_workers(8)
    }));
    let cms = client(&env);

    let read = || {
        let cms = Arc::clone(&cms);
        tokio::spawn(async move { cms.chats_since(0).await })
    };
    let first: Vec<_> = (0..5).map(|_| read()).collect();
    for task in first {
        assert!(task.await.expect("task ends").is_ok());
    }
    let logins_first = (env.db.n_logins(), cms.n_logins());
    env.db.expire_tokens();
    let second: Vec<_> = (0..5).map(|_| read()).collect();
    for task in second {
        assert!(task.await.expect("task ends").is_ok());
    }

    assert_eq!(logins_first, (1, 1));
    // Each refused request logs in again only if nobody else has meanwhile.
    assert_eq!((env.db.n_logins(), cms.n_logins()), (2, 2));
}

/// Another writer on the grid (a second relay): `per_tick` rows every 50 ms, dated now in the
/// CMS's zone, until `stop` is cancelled.
fn spawn_other_relay(
    env: &TestEnv,
    per_tick: usize,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let cms = client(env);
    tokio::spawn(async move {
        let mut n = 0;
        while !stop.is_cancelled() {
            let now = Utc::now().with_timezone(&chrono_tz::Europe::Amsterdam);
            let batch: Vec<ChatItem> = (0..per_tick)
                .map(|_| {
                    n += 1;
                    ChatItem {
                        user_id: -1,
                        message: format!("[Bob Resident] elsewhere on the grid {n}"),
                        timestamp: now.format("%Y-%m-%d %H:%M:%S").to_string(),
                        from_cms: 0,
                    }
                })
                .collect();
            cms.post_chats(&batch).await.expect("the other relay posts");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

#[tokio::test]
async fn in_world_reads_follow_the_new_rows_not_two_minutes_of_the_grid() {
    let env = TestEnv::start().await;
    let relay = env
        .start_relay("", &[("inworld.poll_interval", "1s")])
        .await;
    let stop = CancellationToken::new();
    // 100 lines/s from elsewhere on the grid.
    let writer = spawn_other_relay(&env, 5, stop.clone());
    tokio::time::sleep(Duration::from_secs(9)).await;
    stop.cancel();
    writer.await.expect("the writer ends");
    relay.stop().await;

    let gets = spans(&env, RequestKind::ChatGet);
    let posts = spans(&env, RequestKind::ChatPost);
    assert!(gets.len() >= 6, "{} reads", gets.len());
    // Per read: the rows it returned, and the rows stored since the read before it began.
    let per_read: Vec<(usize, usize)> = gets
        .windows(2)
        .map(|pair| {
            let added = posts
                .iter()
                .filter(|post| post.ended > pair[0].started && post.ended <= pair[1].started)
                .map(|post| post.work.rows_stored)
                .sum();
            (pair[1].work.rows_read, added)
        })
        .collect();
    // The first reads start the stage (the wide read back over max_age) and meet the writer's start.
    // Each later one returns the rows since 2 s before the newest seen, in whole seconds: about 3.4
    // times the new rows at this poll interval (by the same count about 2.3 at the default 2 s).
    // Reading `look_back` each time
    // returned 1, 2, 3 … times them, growing to about 120 after two minutes.
    for &(read, added) in &per_read[2..] {
        assert!(added > 0, "{per_read:?}");
        assert!(
            read <= 5 * added,
            "read {read} rows for {added} new: {per_read:?}"
        );
    }
}

#[tokio::test]
async fn a_cms_line_dated_behind_the_newest_rows_is_still_said_once() {
    let env = TestEnv::start().await;
    let dora = cms_user(&env);
    let relay = crate::inworld::start(&env, &[("inworld.look_back", "6s")]).await;
    let stop = CancellationToken::new();
    let writer = spawn_other_relay(&env, 1, stop.clone());
    // The narrow reads start 2 s before the newest row; the browser's clock is 4 s behind.
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.db
        .add_cms_line_dated(1, dora, "typed with a slow clock", Duration::from_secs(4));

    eventually(PATIENCE, "the back-dated line said", || async {
        !env.lg.said().is_empty()
    })
    .await;
    // Another wide read (every 6 s) reads the line again: it is not said twice.
    tokio::time::sleep(Duration::from_secs(7)).await;
    stop.cancel();
    writer.await.expect("the writer ends");
    relay.stop().await;

    let said: Vec<String> = env.lg.said().into_iter().map(|s| s.message).collect();
    assert_eq!(said, ["[Dora Admin] typed with a slow clock"]);
}

#[tokio::test]
async fn a_wide_read_that_keeps_failing_does_not_stop_the_narrow_reads() {
    let env = TestEnv::start().await;
    let dora = cms_user(&env);
    // Five minutes ago another relay stored 500 lines: the wide read (back over max_age) gets them
    // all, more than the relay accepts in one answer; the narrow reads do not reach them.
    let five_minutes_ago = (Utc::now() - chrono::Duration::minutes(5))
        .with_timezone(&chrono_tz::Europe::Amsterdam)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string();
    let old: Vec<ChatItem> = (0..500)
        .map(|n| ChatItem {
            user_id: -1,
            message: format!("[Bob Resident] an old line of some length, number {n}"),
            timestamp: five_minutes_ago.clone(),
            from_cms: 0,
        })
        .collect();
    client(&env).post_chats(&old).await.expect("stored");
    let relay = crate::inworld::start(&env, &[("cms.max_response_bytes", "65536")]).await;

    env.db
        .add_cms_line(1, dora, "typed while the wide reads fail");
    eventually(PATIENCE, "the line said", || async {
        !env.lg.said().is_empty()
    })
    .await;
    relay.stop().await;

    let said: Vec<String> = env.lg.said().into_iter().map(|s| s.message).collect();
    assert_eq!(said, ["[Dora Admin] typed while the wide reads fail"]);
    // The wide read was tried again between the narrow ones, and failed each time.
    let gets = spans(&env, RequestKind::ChatGet);
    assert!(gets.iter().filter(|get| get.work.rows_read >= 500).count() >= 2);
}

const PACING_GAP: &str = "opensim_chat_relay_cms_pacing_gap_seconds";

async fn pacing_gap(relay: &Observed) -> f64 {
    metric(&relay.get("/metrics").await.1, PACING_GAP).expect("the pacing gauge")
}

/// Alice says lines `from..from + n`; returns once the CMS stored them.
async fn say_and_wait(env: &TestEnv, from: usize, n: usize) {
    for i in from..from + n {
        env.lg.say("Alice Resident", &format!("line {i}"));
    }
    eventually(PATIENCE, "every line stored", || async {
        env.stored().len() >= from + n
    })
    .await;
}

#[tokio::test]
async fn delivery_backs_off_a_cms_that_slows_down_and_is_back_to_back_once_it_is_fast_again() {
    let env = TestEnv::start().await;
    // One line per POST, so that each line is an answer the controller sees.
    let relay = Observed::start(
        &env,
        "",
        &[
            ("inworld.enabled", "false"),
            ("cms.batch_max_messages", "1"),
        ],
    )
    .await;
    // Fast answers set the baselines and leave no gap worth the name (a busy machine may answer
    // one late).
    say_and_wait(&env, 0, 5).await;
    assert!(pacing_gap(&relay).await < 0.1);

    // Three answers of half a second, far above a loopback POST's baseline: each halves the share
    // of time the relay keeps the CMS busy, and the idle gap after an answer grows.
    env.db
        .fault_next(3, Fault::Slow(Duration::from_millis(500)));
    say_and_wait(&env, 5, 3).await;
    let gap_when_slow = pacing_gap(&relay).await;

    // Fast again: the duty cycle grows back by additive steps to back-to-back requests (from 1/8
    // in 18 answers; 40 leave room for an answer a busy machine makes look slow).
    say_and_wait(&env, 8, 40).await;
    eventually(PATIENCE, "no gap once the CMS is fast again", || async {
        pacing_gap(&relay).await == 0.0
    })
    .await;
    relay.stop().await;

    // The eighth line stored, the second slow answer has come: the duty cycle is 1/4 or less, a
    // gap of at least 3 x 0.5 s (after the third, 1/8: 7 x 0.5 s, capped at 2 s).
    assert!(
        gap_when_slow >= 1.0,
        "a gap of {gap_when_slow} s after three slow answers"
    );
    assert_eq!(env.stored().len(), 48, "each line once");
}

#[tokio::test]
async fn a_post_queued_behind_the_relays_own_in_world_read_is_taken_as_shared_not_as_a_slow_cms() {
    let env = TestEnv::start().await;
    // One PHP worker, and rows expensive to read: each in-world read of the relay's own rows (the
    // API returns every row of the grid) keeps the worker busy for a few hundred milliseconds,
    // and a POST that comes meanwhile waits for it.
    env.db.set_cost_model(Some(CostModel {
        per_row_read: Duration::from_millis(10),
        ..CostModel::php()
    }));
    // One line a POST: a one-line POST's answer is its proof, so delivery makes no read of its
    // own (a read sets the gap after it by design); the only reads are in-world's.
    let relay = Observed::start(
        &env,
        "",
        &[
            ("inworld.poll_interval", "1s"),
            ("cms.batch_max_messages", "1"),
        ],
    )
    .await;
    for i in 0..60 {
        env.lg.say("Alice Resident", &format!("line {i}"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually(PATIENCE, "every line stored", || async {
        env.stored().len() >= 60
    })
    .await;
    let metrics_text = relay.get("/metrics").await.1;
    relay.stop().await;

    let posts = spans(&env, RequestKind::ChatPost);
    let gets = spans(&env, RequestKind::ChatGet);
    // The premise: POSTs waited for a read (the one worker took them up the moment it finished
    // one; a POST sent to an idle CMS would be taken up at some other moment).
    let queued = posts
        .iter()
        .filter(|post| {
            gets.iter().any(|get| {
                post.started >= get.ended && post.started - get.ended < Duration::from_millis(1)
            })
        })
        .count();
    assert!(queued > 0, "no POST waited for a read: {gets:?}");
    // Those answers were slow because of the relay's own read, not the CMS: each was taken as one
    // that shared the CMS (`Answer::Shared`, which sets only its usual gap: `pacing`'s unit
    // tests). Counted, not timed: on a loaded machine a POST answered late for want of CPU is
    // rightly taken for a slower CMS, and its gap says nothing of this.
    let shared = metric(&metrics_text, "opensim_chat_relay_cms_posts_shared_total")
        .expect("the shared counter");
    assert!(
        shared >= queued as f64,
        "{shared} POSTs taken as shared, {queued} waited for a read"
    );
}
