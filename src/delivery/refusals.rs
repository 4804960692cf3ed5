//! Inserts the CMS fails, against the scripted CMS: a line's own failure (a user the CMS lacks)
//! retried then dead-lettered, and a database that cannot write, which dead-letters nothing.

use std::time::Duration;

use chrono_tz::Europe::Amsterdam;

use super::tests::{ALICE, BOB, CAROL, Rig, now_said, rig_with};
use super::*;
use crate::zone::Zone;

/// A retry schedule of at most 20 ms, so that a held line is due again after `rounds`' sleep.
const SHORT_RETRY: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(5),
    max: Duration::from_millis(20),
};

/// Steps `n` times, longer than `SHORT_RETRY.max` apart; the errors of the failed steps.
async fn rounds(rig: &Rig, n: usize) -> Vec<String> {
    let mut errors = Vec::new();
    for _ in 0..n {
        if let Err(err) = rig.delivery.try_deliver_batch().await {
            errors.push(err.to_string());
        }
        tokio::time::sleep(SHORT_RETRY.max + Duration::from_millis(5)).await;
    }
    errors
}

#[tokio::test]
async fn a_database_that_briefly_cannot_insert_makes_no_dead_letters() {
    // Disk full at the database: every insert answers {"success":false,"id":0} while reads work.
    let rig = rig_with(3, SHORT_RETRY, Zone::Named(Amsterdam));
    rig.cms.with(|m| m.inserts_fail = true);
    rig.say(&[
        now_said(ALICE, "a1"),
        now_said(CAROL, "c1"),
        now_said(ALICE, "a2"),
    ])
    .await;

    let errors = rounds(&rig, 12).await;

    assert_eq!(rig.dead(), Vec::<String>::new());
    assert!(
        errors.iter().any(|e| e.contains("fails every insert")),
        "an outage, not the lines' own failures: {errors:?}"
    );
    rig.cms.with(|m| m.inserts_fail = false);
    rounds(&rig, 12).await;
    assert_eq!(rig.cms.relay_messages(), ["a1", "[Carol Visitor] c1", "a2"]);
    assert!(rig.outbox.is_empty());
}

#[tokio::test]
async fn a_line_the_cms_alone_cannot_store_is_retried_then_dead_lettered_with_the_reason() {
    // Bob's user 99 does not exist: his insert fails its foreign key each time, while Alice's
    // lines, one a round, are stored.
    let rig = rig_with(99, SHORT_RETRY, Zone::Named(Amsterdam));
    rig.say(&[now_said(BOB, "b1")]).await;
    for round in 0..12 {
        rig.say(&[now_said(ALICE, &format!("a{round}"))]).await;
        rounds(&rig, 1).await;
    }
    rounds(&rig, 2).await;

    assert_eq!(rig.cms.relay_messages().len(), 12);
    let dead = rig.outbox.dead_letters().expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].pending.line.message, "b1");
    assert_eq!(dead[0].pending.failures, 3, "retry.max_line_failures tries");
    assert!(dead[0].reason.contains("user id 99"), "{}", dead[0].reason);
    assert!(rig.outbox.is_empty());
}

#[tokio::test]
async fn a_lone_line_of_a_user_the_cms_lacks_is_dead_lettered_after_its_tries() {
    // No one else speaks: the CMS's own answer (no user 99) makes the failure Bob's.
    let rig = rig_with(99, SHORT_RETRY, Zone::Named(Amsterdam));
    rig.say(&[now_said(BOB, "b1")]).await;

    rounds(&rig, 12).await;

    assert_eq!(rig.dead(), ["b1"]);
    assert!(rig.outbox.is_empty());
}

#[tokio::test]
async fn a_database_that_cannot_write_does_not_dead_letter_a_lone_speaker() {
    // Alice (user 3, whom the CMS has) is the only one speaking while every insert fails: nothing
    // tells her lines apart from an outage, so none is counted against her.
    let rig = rig_with(3, SHORT_RETRY, Zone::Named(Amsterdam));
    rig.cms.with(|m| m.inserts_fail = true);
    rig.say(&[now_said(ALICE, "a1"), now_said(ALICE, "a2")])
        .await;

    let errors = rounds(&rig, 12).await;

    assert!(rig.dead().is_empty(), "{:?}", rig.dead());
    assert_eq!(rig.outbox.len(), 2);
    assert!(
        errors
            .last()
            .is_some_and(|e| e.contains("fails every insert")),
        "{errors:?}"
    );
    rig.cms.with(|m| m.inserts_fail = false);
    rounds(&rig, 6).await;
    assert_eq!(rig.cms.relay_messages(), ["a1", "a2"]);
}
