//! The delivery loop's waits against the scripted CMS: a server's `Retry-After` honoured up to
//! `retry.max`, the heartbeat beating meanwhile, and new lines or a CMS that answers again ending
//! the wait.

use std::sync::Arc;
use std::time::Duration;

use chrono_tz::Europe::Amsterdam;

use super::scripted::{PostFault, ScriptedCms};
use super::tests::{ALICE, Rig, now_said, rig_with};
use super::*;
use crate::zone::Zone;

/// Waits for `condition`, checked every 10 ms, for at most 20 s (a stuck loop fails the test).
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The loop of `rig` running; stopped when the guard is dropped.
fn running(
    rig: Rig,
) -> (
    Arc<ScriptedCms>,
    Arc<Outbox>,
    Arc<Stats>,
    tokio_util::sync::DropGuard,
) {
    let token = tokio_util::sync::CancellationToken::new();
    let (cms, outbox, stats) = (rig.cms.clone(), rig.outbox.clone(), rig.stats.clone());
    let dir = rig.dir;
    let delivery = rig.delivery;
    let stop = token.clone();
    tokio::spawn(async move {
        delivery.run_until_stopped(stop).await;
        drop(dir);
    });
    (cms, outbox, stats, token.drop_guard())
}

/// `retry.max` of an hour: a `Retry-After: 3600` is within it and honoured.
const HOUR_RETRY: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(20),
    max: Duration::from_secs(3600),
};

#[tokio::test]
async fn the_heartbeat_beats_while_the_loop_honours_a_long_retry_after() {
    let rig = rig_with(3, HOUR_RETRY, Zone::Named(Amsterdam));
    rig.cms.with(|m| {
        m.reads_down = Some(Duration::from_secs(3600));
        m.posts_down = true;
    });
    rig.say(&[now_said(ALICE, "during maintenance")]).await;
    let (cms, _outbox, stats, _stop) = running(rig);

    eventually("the first POST", || cms.with(|m| m.n_posts) == 1).await;
    let answered = std::time::Instant::now();
    eventually("a beat after the POST was answered", || {
        stats
            .delivery_heartbeat
            .since_last_beat()
            .is_some_and(|since| since < answered.elapsed())
    })
    .await;
    assert_eq!(
        cms.with(|m| m.n_posts),
        1,
        "the maintenance page is honoured"
    );
}

#[tokio::test]
async fn new_lines_end_a_long_retry_after() {
    // The CMS's probe fails throughout, so only the new line can end the wait.
    let rig = rig_with(3, HOUR_RETRY, Zone::Named(Amsterdam));
    rig.cms.with(|m| {
        m.probes_down = true;
        m.post_faults.push_back(PostFault::Http {
            status: 503,
            retry_after: Some(Duration::from_secs(3600)),
        });
    });
    rig.say(&[now_said(ALICE, "first")]).await;
    let outbox = rig.outbox.clone();
    let (cms, _outbox, _stats, _stop) = running(rig);

    eventually("the first POST", || cms.with(|m| m.n_posts) == 1).await;
    outbox
        .append(&[now_said(ALICE, "second")])
        .await
        .expect("append");

    eventually("both lines POSTed", || {
        cms.relay_messages() == ["first", "second"]
    })
    .await;
}

#[tokio::test]
async fn a_cms_that_answers_again_ends_a_long_retry_after() {
    let rig = rig_with(3, HOUR_RETRY, Zone::Named(Amsterdam));
    rig.cms.with(|m| {
        m.post_faults.push_back(PostFault::Http {
            status: 503,
            retry_after: Some(Duration::from_secs(3600)),
        })
    });
    rig.say(&[now_said(ALICE, "after maintenance")]).await;
    let (cms, outbox, _stats, _stop) = running(rig);

    eventually("the line delivered", || {
        outbox.is_empty() && cms.relay_messages() == ["after maintenance"]
    })
    .await;
}
