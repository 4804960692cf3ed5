//! Batches awaiting their proof (`settle`) against a scripted CMS: what the shared read costs the
//! CMS as a backlog grows, that a line awaiting proof is neither resent nor counted, and what a
//! restart or an outage in that state leaves.

use chrono::{TimeZone, Utc};

use super::settle::{AWAIT_MAX_LINES, Awaiting, MIN_LINES_PER_READ};
use super::tests::{ALICE, BOB, CAROL, Rig, now_said, rig, said};
use super::*;

/// Drains a backlog of `n` lines said in the same second (a relay catching up after an outage of
/// a busy region); returns the chat GETs and the rows they returned.
async fn drain_of_one_second(n: usize) -> (usize, usize) {
    let rig = rig(3);
    let at = Utc::now() - chrono::Duration::seconds(600);
    let lines: Vec<_> = (0..n)
        .map(|i| said(if i % 2 == 0 { ALICE } else { CAROL }, &format!("l{i}"), at))
        .collect();
    rig.say(&lines).await;
    for _ in 0..(n / 50 + 20) {
        if rig.outbox.is_empty() {
            break;
        }
        rig.delivery.try_deliver_batch().await.expect("step");
    }
    assert!(rig.outbox.is_empty(), "{} lines left", rig.outbox.len());
    assert_eq!(rig.counted(), n as u64);
    assert_eq!(rig.cms.relay_messages().len(), n);
    rig.cms.with(|m| (m.n_reads, m.n_rows_read))
}

#[tokio::test]
async fn a_backlog_in_one_second_costs_the_cms_rows_in_proportion_to_its_lines() {
    // A read per batch returned every row stored since that second: 1 000 lines read 5 500 rows
    // and 4 000 lines 82 000 (a quadratic drain). The shared read: 2 900 and 12 700, in 6 and 9
    // GETs.
    let (reads_small, rows_small) = drain_of_one_second(1_000).await;
    let (reads_large, rows_large) = drain_of_one_second(4_000).await;

    assert!(
        rows_small <= 4 * 1_000 && rows_large <= 4 * 4_000,
        "rows read: {rows_small} for 1 000 lines, {rows_large} for 4 000"
    );
    assert!(
        reads_large < 2 * reads_small,
        "chat GETs: {reads_small} for 1 000 lines, {reads_large} for 4 000"
    );
}

#[test]
fn the_shared_read_is_due_when_nothing_else_goes_or_enough_lines_wait() {
    let waiting = |n: usize, last_read_rows: usize| Awaiting {
        ids: (0..n as u64)
            .map(|id| {
                let posted = super::settle::Posted {
                    last_id: 0,
                    answered_at: std::time::Instant::now(),
                    start: 0,
                };
                (id, posted)
            })
            .collect(),
        last_read_rows,
        ..Awaiting::default()
    };
    let backlog = 100_000;
    assert!(!waiting(0, 0).read_due(0), "nothing awaits");
    assert!(waiting(1, 10_000).read_due(0), "nothing else to send");
    assert!(
        !waiting(100, 10_000).read_due(backlog),
        "the read would cost 100 rows a line"
    );
    assert!(
        !waiting(8_999, 3_000).read_due(backlog),
        "fewer than three lines a row beyond them"
    );
    assert!(
        waiting(9_000, 3_000).read_due(backlog),
        "three lines a row beyond them"
    );
    assert!(
        !waiting(MIN_LINES_PER_READ - 1, 0).read_due(backlog),
        "fewer lines than a read is worth, behind a backlog"
    );
    assert!(
        waiting(MIN_LINES_PER_READ, 0).read_due(backlog),
        "enough lines"
    );
    assert!(
        waiting(2, 0).read_due(1),
        "a trickle: the read does not wait for lines that are not coming"
    );
    assert!(
        waiting(AWAIT_MAX_LINES, 1 << 30).read_due(backlog),
        "the bound"
    );
}

/// A rig whose last read returned many rows: the next batches go out before the shared read.
async fn rig_after_a_wide_read() -> Rig {
    let rig = rig(99);
    lock(&rig.delivery.awaiting).last_read_rows = 1_000;
    rig
}

#[tokio::test]
async fn lines_awaiting_their_proof_are_neither_resent_nor_counted_while_newer_batches_go_out() {
    let mut rig = rig_after_a_wide_read().await;
    rig.delivery.deps.settings.batch_max_messages = 2;
    rig.say(&[
        now_said(BOB, "b1"),
        now_said(ALICE, "a1"),
        now_said(CAROL, "c1"),
        now_said(ALICE, "a2"),
    ])
    .await;

    // Two POSTs, each answered `success: true` (Bob's row skipped: the CMS has no user 99).
    rig.delivery.try_deliver_batch().await.expect("first batch");
    rig.delivery
        .try_deliver_batch()
        .await
        .expect("second batch");
    assert_eq!(rig.cms.with(|m| (m.n_posts, m.n_reads)), (2, 0));
    assert_eq!(rig.counted(), 0);
    assert_eq!(rig.outbox.len(), 4);

    // Nothing else to send: one read settles both batches; Bob's line goes out alone.
    rig.delivery
        .try_deliver_batch()
        .await
        .expect("the shared read");
    assert_eq!(rig.cms.with(|m| m.n_reads), 1);
    assert_eq!(rig.cms.relay_messages(), ["a1", "[Carol Visitor] c1", "a2"]);
    assert_eq!(rig.counted(), 3);
    assert_eq!(rig.outbox.len() + rig.outbox.dead_len(), 1);
}

#[tokio::test]
async fn a_restart_while_batches_await_their_proof_reads_them_back_and_sends_nothing_twice() {
    let rig = rig_after_a_wide_read().await;
    rig.say(&[now_said(ALICE, "a1"), now_said(CAROL, "c1")])
        .await;
    rig.delivery.try_deliver_batch().await.expect("the batch");
    assert_eq!(rig.counted(), 0);

    // The process dies: what awaited its proof is, on disk, in flight.
    let restarted = super::tests::delivery_of(
        rig.outbox.clone(),
        rig.cms.clone(),
        rig.stats.clone(),
        (
            99,
            super::tests::FAST_RETRY,
            crate::zone::Zone::Named(chrono_tz::Europe::Amsterdam),
            3,
        ),
    );
    for _ in 0..5 {
        restarted.try_deliver_batch().await.expect("step");
    }

    assert_eq!(rig.cms.relay_messages(), ["a1", "[Carol Visitor] c1"]);
    assert!(rig.outbox.is_empty());
    assert_eq!(Stats::get(&rig.stats.lines_reconciled), 2);
}

#[tokio::test]
async fn an_outage_of_the_shared_read_keeps_the_lines_awaiting_and_sends_nothing_twice() {
    let rig = rig(3);
    rig.say(&[now_said(ALICE, "a1"), now_said(CAROL, "c1")])
        .await;
    rig.delivery.try_deliver_batch().await.expect("the batch");
    rig.cms.with(|m| {
        m.reads_down = Some(std::time::Duration::from_secs(1));
        m.probes_down = true;
    });

    assert!(rig.delivery.try_deliver_batch().await.is_err());
    assert!(rig.delivery.try_deliver_batch().await.is_err());
    assert_eq!(rig.cms.with(|m| m.n_posts), 1);
    assert_eq!(rig.outbox.len(), 2);

    rig.cms.with(|m| {
        m.reads_down = None;
        m.probes_down = false;
    });
    rig.steps(5).await;
    assert_eq!(rig.cms.relay_messages(), ["a1", "[Carol Visitor] c1"]);
    assert!(rig.outbox.is_empty());
    assert_eq!(rig.counted(), 2);
}

/// A rig whose board is served by a reader reading every `interval` (played by the test).
fn rig_with_a_reader(interval: Duration) -> Rig {
    let rig = rig(99);
    rig.delivery.deps.board.serve(interval);
    rig
}

impl Rig {
    /// The reader's read: from its own start (`own_back` seconds before now) or delivery's wanted
    /// one, through the same CMS; published as the reader does.
    async fn reader_reads(&self, own_back: i64) {
        let board = &self.delivery.deps.board;
        let now = Utc::now().timestamp();
        let since = board.start_for(now - own_back, now);
        let sent_at = std::time::Instant::now();
        let rows = self.cms.read_since(since).await.expect("the reader's read");
        board.publish(since, sent_at, Arc::new(rows));
    }
}

#[tokio::test]
async fn the_readers_next_read_settles_a_batch_and_delivery_reads_nothing_itself() {
    let rig = rig_with_a_reader(Duration::from_secs(60));
    rig.say(&[now_said(ALICE, "a1"), now_said(CAROL, "c1")])
        .await;
    rig.delivery.try_deliver_batch().await.expect("the batch");
    // Nothing else to send: without the reader this step would read; it waits for the reader.
    assert_eq!(
        rig.delivery.try_deliver_batch().await.expect("idle"),
        DeliveryOutcome::Idle
    );
    assert_eq!(rig.cms.with(|m| (m.n_posts, m.n_reads)), (1, 0));
    assert_eq!(rig.counted(), 0);

    // The reader's narrow read (2 s back) reaches back to where the batch needs it.
    rig.reader_reads(2).await;
    rig.delivery.try_deliver_batch().await.expect("settled");
    assert_eq!(rig.cms.with(|m| m.n_reads), 1, "the reader's read only");
    assert_eq!(rig.counted(), 2);
    assert!(rig.outbox.is_empty());
}

#[tokio::test]
async fn a_readers_read_sent_before_the_answer_or_starting_after_the_window_proves_nothing() {
    let rig = rig_with_a_reader(Duration::from_secs(60));
    let board = rig.delivery.deps.board.clone();
    // A read sent before the batch was answered.
    let early = std::time::Instant::now();
    rig.say(&[now_said(ALICE, "a1"), now_said(CAROL, "c1")])
        .await;
    rig.delivery.try_deliver_batch().await.expect("the batch");
    let rows = rig.cms.read_since(0).await.expect("rows");
    board.publish(0, early, Arc::new(rows.clone()));
    rig.delivery.try_deliver_batch().await.expect("idle");
    assert_eq!(rig.counted(), 0, "a read sent before the answer");
    // A read sent now, from a start after the batch's window (a narrow read that did not take the
    // wanted start): the rows are all there, yet it proves nothing.
    let late_start = Utc::now().timestamp() + 1;
    board.publish(late_start, std::time::Instant::now(), Arc::new(rows));
    rig.delivery.try_deliver_batch().await.expect("idle");
    assert_eq!(rig.counted(), 0, "a read starting after the window");
    assert_eq!(rig.outbox.len(), 2);
    assert_eq!(rig.cms.relay_messages().len(), 2, "nothing resent");
}

#[tokio::test]
async fn a_middle_row_the_readers_read_lacks_is_counted_nowhere_and_sent_again_alone() {
    // Issue 21, defect 1, settled by the reader's read: Bob's user 99 does not exist, the CMS
    // skips his row and answers `success: true` for the batch.
    let rig = rig_with_a_reader(Duration::from_secs(60));
    rig.say(&[
        now_said(ALICE, "a1"),
        now_said(BOB, "b1"),
        now_said(CAROL, "c1"),
    ])
    .await;
    rig.delivery.try_deliver_batch().await.expect("the batch");
    // Caught up: delivery asks the reader to reach back to the batch.
    rig.delivery.try_deliver_batch().await.expect("idle");
    rig.reader_reads(2).await;
    rig.delivery.try_deliver_batch().await.expect("settled");
    // Counted: only what the CMS holds; Bob's line went out alone (its own answer, a failed
    // insert) and is still the relay's to settle, as after a read of delivery's own.
    assert_eq!(rig.cms.relay_messages(), ["a1", "[Carol Visitor] c1"]);
    assert_eq!(rig.cms.with(|m| (m.n_posts, m.n_reads)), (2, 1));
    assert_eq!(rig.counted(), 2);
    assert_eq!(rig.outbox.len() + rig.outbox.dead_len(), 1);
}

#[tokio::test]
async fn behind_a_backlog_delivery_asks_the_reader_for_nothing_and_reads_for_itself() {
    // A backlog's lines share their seconds with every row drained since: a reader reaching back
    // to them would read those rows at every poll.
    let mut rig = rig_with_a_reader(Duration::from_secs(60));
    // The last read returned many rows: the next batches go out before a read of delivery's own.
    lock(&rig.delivery.awaiting).last_read_rows = 1_000;
    rig.delivery.deps.settings.batch_max_messages = 2;
    rig.say(&[
        now_said(ALICE, "a1"),
        now_said(CAROL, "c1"),
        now_said(ALICE, "a2"),
        now_said(CAROL, "c2"),
    ])
    .await;
    rig.delivery
        .try_deliver_batch()
        .await
        .expect("the first batch");
    rig.delivery
        .try_deliver_batch()
        .await
        .expect("the second batch");
    let now = Utc::now().timestamp();
    let board = &rig.delivery.deps.board;
    assert_eq!(board.start_for(now, now), now, "nothing wanted");
    assert_eq!(rig.delivery.board_wait(), None, "no wait for the reader");
    // Caught up: now it asks, and waits.
    rig.delivery.try_deliver_batch().await.expect("idle");
    assert!(rig.delivery.board_wait().is_some());
    assert!(board.start_for(now, now) < now, "the batches' start wanted");
    assert_eq!(rig.cms.with(|m| (m.n_posts, m.n_reads)), (2, 0));
}

#[tokio::test]
async fn a_reader_that_reads_nothing_leaves_delivery_to_read_for_itself_after_its_wait() {
    let rig = rig_with_a_reader(Duration::from_millis(10));
    rig.say(&[now_said(ALICE, "a1"), now_said(CAROL, "c1")])
        .await;
    rig.delivery.try_deliver_batch().await.expect("the batch");
    rig.delivery.try_deliver_batch().await.expect("idle");
    let wait = rig.delivery.board_wait().expect("waiting for the reader");
    tokio::time::sleep(wait + Duration::from_millis(50)).await;
    assert_eq!(rig.delivery.board_wait(), None);
    rig.delivery
        .try_deliver_batch()
        .await
        .expect("its own read");
    assert_eq!(rig.cms.with(|m| m.n_reads), 1);
    assert_eq!(rig.counted(), 2);
}

#[test]
fn a_read_reaches_back_only_when_its_start_is_no_later_as_an_instant_and_as_a_string() {
    use super::readback::reaches_back_to;
    let zone = crate::zone::Zone::Named(chrono_tz::Europe::Amsterdam);
    let at = |h, m, s| {
        Utc.with_ymd_and_hms(2026, 10, 25, h, m, s)
            .unwrap()
            .timestamp()
    };
    // 00:59:58 UTC is 02:59:58 CEST; 01:00:01 UTC is 02:00:01 CET, after the fold.
    assert!(reaches_back_to(at(0, 59, 50), at(0, 59, 58), zone));
    assert!(
        !reaches_back_to(at(0, 59, 58), at(0, 59, 50), zone),
        "later"
    );
    assert!(
        !reaches_back_to(at(0, 59, 58), at(1, 0, 1), zone),
        "an earlier instant whose string (02:59:58) is after the start's (02:00:01)"
    );
}
