//! The batch marked ahead (`ahead`) against a scripted CMS: marked while the batch before it is
//! posted, carried to that batch's answered id, cleared after any other answer, and never read
//! back against the rows of a batch already removed (the same words in the same second).

use std::sync::Arc;

use chrono::Utc;

use super::scripted::PostFault;
use super::tests::{ALICE, CAROL, FAST_RETRY, Rig, delivery_of, now_said, rig, said};
use super::*;
use crate::zone::Zone;

/// How each pending line stands: (message, in flight, the id it goes out after).
fn marks(rig: &Rig) -> Vec<(String, bool, Option<i64>)> {
    rig.outbox
        .oldest(usize::MAX)
        .expect("read")
        .into_iter()
        .map(|l| (l.line.message.clone(), l.is_in_flight(), l.sent_after()))
        .collect()
}

async fn six_lines_two_a_batch() -> Rig {
    let mut rig = rig(3);
    rig.delivery.deps.settings.batch_max_messages = 2;
    let lines: Vec<_> = (0..6)
        .map(|i| now_said(if i % 2 == 0 { ALICE } else { CAROL }, &format!("l{i}")))
        .collect();
    rig.say(&lines).await;
    rig
}

/// Alice says the same words four times in the same second: every row of ours matches every line.
async fn say_the_same_words_four_times(rig: &Rig) {
    let at = Utc::now();
    let lines: Vec<_> = (0..4).map(|_| said(ALICE, "same", at)).collect();
    rig.say(&lines).await;
}

/// The process starts again on the rig's outbox (batches of two) and delivers it: four lines,
/// four rows, each counted once.
async fn restart_and_expect_four_rows(rig: &Rig) {
    let mut restarted = delivery_of(
        rig.outbox.clone(),
        rig.cms.clone(),
        rig.stats.clone(),
        (3, FAST_RETRY, Zone::Named(chrono_tz::Europe::Amsterdam), 3),
    );
    restarted.deps.settings.batch_max_messages = 2;
    for _ in 0..10 {
        restarted.try_deliver_batch().await.expect("step");
    }
    assert_eq!(
        rig.cms.relay_messages(),
        ["same"; 4],
        "four lines, four rows"
    );
    assert!(rig.outbox.is_empty());
    assert_eq!(rig.counted(), 4);
}

#[tokio::test]
async fn the_next_batch_is_marked_while_one_is_posted_and_goes_out_after_its_answered_id() {
    let rig = six_lines_two_a_batch().await;

    rig.delivery.try_deliver_batch().await.expect("first batch");

    assert_eq!(rig.cms.with(|m| m.n_posts), 1);
    let marks = marks(&rig);
    // The first batch awaits its proof; the second is marked, after the first's last id (2).
    assert_eq!(marks[2], ("l2".into(), true, Some(2)));
    assert_eq!(marks[3], ("l3".into(), true, Some(2)));
    assert!(!marks[4].1, "only one batch is marked ahead");

    rig.steps(10).await;
    assert_eq!(rig.cms.relay_messages().len(), 6, "each line once");
    assert!(rig.outbox.is_empty());
    assert_eq!(rig.counted(), 6);
}

#[tokio::test]
async fn after_an_outage_the_batch_marked_ahead_is_pending_again_and_each_line_is_sent_once() {
    let rig = six_lines_two_a_batch().await;
    rig.cms.with(|m| {
        m.post_faults.push_back(PostFault::Http {
            status: 503,
            retry_after: None,
        })
    });

    assert!(rig.delivery.try_deliver_batch().await.is_err());

    let marks = marks(&rig);
    assert!(
        marks[0].1 && marks[1].1,
        "the first batch's outcome is unknown"
    );
    assert_eq!(marks[2], ("l2".into(), false, None), "never sent: pending");
    rig.steps(20).await;
    assert_eq!(
        rig.cms.relay_messages(),
        [
            "l0",
            "[Carol Visitor] l1",
            "l2",
            "[Carol Visitor] l3",
            "l4",
            "[Carol Visitor] l5"
        ]
    );
    assert!(rig.outbox.is_empty());
}

#[tokio::test]
async fn a_restart_after_the_batch_before_was_settled_does_not_take_its_rows_for_the_marked_batch()
{
    // Four lines of the same words in the same second: rows of the first batch match the second
    // batch's lines as well as their own.
    let mut rig = rig(3);
    rig.delivery.deps.settings.batch_max_messages = 2;
    rig.delivery
        .deps
        .board
        .serve(std::time::Duration::from_secs(60));
    say_the_same_words_four_times(&rig).await;
    rig.delivery.try_deliver_batch().await.expect("first batch");

    // The reader's read settles the first batch and its lines leave the outbox, before the batch
    // marked ahead is posted.
    let since = Utc::now().timestamp() - 60;
    let sent_at = std::time::Instant::now();
    let rows = rig.cms.read_since(since).await.expect("rows");
    rig.delivery
        .deps
        .board
        .publish(since, sent_at, Arc::new(rows));
    rig.delivery.try_deliver_batch().await.expect("settled");
    assert_eq!(rig.counted(), 2);
    assert_eq!(rig.cms.relay_messages().len(), 2);

    // The process dies: the marked batch is read back, and its lines were never sent.
    restart_and_expect_four_rows(&rig).await;
}

#[tokio::test]
async fn batches_in_flight_after_the_same_id_are_read_back_together_after_a_restart() {
    // The process died while batch A was posted and batch B marked ahead, both after id 0; the
    // CMS stored A. Read back one at a time, A's rows would be found for A, A removed, and then
    // taken for B's same words.
    let mut rig = rig(3);
    rig.delivery.deps.settings.batch_max_messages = 2;
    say_the_same_words_four_times(&rig).await;
    let mut lines = rig.outbox.oldest(4).expect("read");
    rig.delivery.prepare(&mut lines).await;
    let marked = rig.outbox.mark_in_flight(&lines, 0).await.expect("mark");
    let items: Vec<_> = marked[..2].iter().map(super::row::item_of).collect();
    rig.cms.post(&items).await.0.expect("A stored");

    restart_and_expect_four_rows(&rig).await;
}
