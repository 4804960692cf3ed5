//! Long outages while chat goes on, paced catch-up, and the outbox's bounds.

use std::time::{Duration, Instant};

use opensim_chat_relay::sim::cms::Fault;

use crate::helpers::{PATIENCE, RunningRelay, TestEnv, eventually};

/// Alice says `n` numbered lines, a few per poll, while the relay runs; returns what the CMS must
/// store.
async fn chat_during(env: &TestEnv, relay: &RunningRelay, n: usize) -> Vec<String> {
    let mut expected = Vec::new();
    for i in 0..n {
        let text = format!("line {i:03} {}", "x".repeat(80));
        env.lg.say("Alice Resident", &text);
        expected.push(format!("[Alice Resident] {text}"));
        if i % 5 == 4 {
            let n_stored = i + 1;
            eventually(
                PATIENCE,
                "every line stored, delivered or dropped",
                || async {
                    env.lg.queue_len() == 0
                        && relay.outbox.len()
                            + env.stored().len()
                            + relay.outbox.n_dropped() as usize
                            >= n_stored
                },
            )
            .await;
        }
    }
    expected
}

#[tokio::test]
async fn a_long_outage_while_chat_goes_on_ends_with_everything_delivered_in_order_and_paced() {
    let env = TestEnv::start().await;
    env.db.set_offline(true);
    let relay = env
        .start_relay(
            "",
            &[
                ("cms.batch_max_messages", "5"),
                ("cms.max_requests_per_second", "20"),
            ],
        )
        .await;
    let expected = chat_during(&env, &relay, 40).await;
    assert!(env.stored().is_empty());

    env.db.set_offline(false);
    let up = Instant::now();
    eventually(PATIENCE, "the backlog delivered", || async {
        relay.outbox.is_empty() && env.stored().len() >= 40
    })
    .await;
    let catch_up = up.elapsed();
    relay.stop().await;

    assert_eq!(env.stored_messages(), expected);
    // Eight batches at 20 requests per second need at least seven gaps of 50 ms (a lower bound: a slow
    // machine only makes it longer).
    assert!(
        catch_up >= Duration::from_millis(350),
        "caught up in {catch_up:?}"
    );
}

#[tokio::test]
async fn a_cms_that_hangs_or_answers_503_for_a_while_loses_nothing() {
    let env = TestEnv::start().await;
    env.db.fault_next(3, Fault::Hang);
    let relay = env
        .start_relay(
            "",
            &[
                ("cms.request_timeout", "300ms"),
                ("cms.batch_max_messages", "5"),
            ],
        )
        .await;
    let mut expected = chat_during(&env, &relay, 10).await;
    eventually(PATIENCE, "delivered after the hangs", || async {
        relay.outbox.is_empty()
    })
    .await;
    env.db.fault_next(15, Fault::Status(503));
    expected.extend(chat_during(&env, &relay, 10).await);
    eventually(PATIENCE, "delivered after the 503s", || async {
        relay.outbox.is_empty() && env.stored().len() >= 20
    })
    .await;
    relay.stop().await;

    assert_eq!(env.stored_messages(), expected);
}

#[tokio::test]
async fn a_maintenance_page_asking_for_an_hour_is_honoured_only_up_to_retry_max() {
    // Issue 21 defect 3: one 503 with Retry-After: 3600 parked delivery for the hour.
    let env = TestEnv::start().await;
    env.db.fault_next(
        1,
        Fault::Maintenance {
            retry_after_secs: 3600,
        },
    );
    env.lg.say("Alice Resident", "during maintenance");
    let relay = env
        .start_relay("", &[("retry.initial", "100ms"), ("retry.max", "1s")])
        .await;

    eventually(
        PATIENCE,
        "the line delivered after the maintenance",
        || async { relay.outbox.is_empty() && env.stored().len() == 1 },
    )
    .await;
    relay.stop().await;

    assert_eq!(
        env.stored_messages(),
        ["[Alice Resident] during maintenance"]
    );
}

#[tokio::test]
async fn a_full_outbox_drops_its_oldest_lines_and_counts_them() {
    let env = TestEnv::start().await;
    env.db.set_offline(true);
    let relay = env.start_relay("", &[("outbox.max_bytes", "4096")]).await;
    let expected = chat_during(&env, &relay, 40).await;
    // The bound is restored right after each write that passes it.
    eventually(PATIENCE, "the outbox within 4096 bytes", || async {
        relay.outbox.bytes() <= 4096
    })
    .await;
    assert!(
        relay.outbox.n_dropped() > 0,
        "40 lines of about 250 bytes cannot fit 4096 bytes"
    );

    env.db.set_offline(false);
    eventually(PATIENCE, "the rest delivered", || async {
        relay.outbox.is_empty()
    })
    .await;
    // Counted at the end: each attempt while the CMS is away rewrites its lines' records, and one
    // that grows past the bound drops another of the oldest lines.
    let n_dropped = relay.outbox.n_dropped() as usize;
    relay.stop().await;

    // What survives is in order and ends with the newest line; every line is either stored or
    // counted as dropped, never both (a batch in flight is not dropped, so it may outlive lines
    // captured after it).
    let stored = env.stored_messages();
    assert_eq!(
        stored.len() + n_dropped,
        expected.len(),
        "stored: {stored:?}"
    );
    assert_eq!(stored.last(), expected.last());
    let mut rest = expected.iter();
    assert!(
        stored.iter().all(|line| rest.any(|e| e == line)),
        "out of order or not spoken: {stored:?}"
    );
}

#[tokio::test]
async fn a_full_outbox_can_pause_polling_instead_and_lose_nothing() {
    let env = TestEnv::start().await;
    env.db.set_offline(true);
    let relay = env
        .start_relay(
            "",
            &[
                ("outbox.max_bytes", "4096"),
                ("outbox.when_full", "pause_polling"),
            ],
        )
        .await;
    let mut expected = Vec::new();
    for i in 0..40 {
        let text = format!("line {i:03} {}", "x".repeat(80));
        env.lg.say("Alice Resident", &text);
        expected.push(format!("[Alice Resident] {text}"));
    }
    // The first poll takes all 40 (the outbox is not full yet); the next lines wait in the viewer.
    eventually(PATIENCE, "the first poll stored", || async {
        relay.outbox.len() == 40
    })
    .await;
    env.lg.say("Alice Resident", "said while full");
    expected.push("[Alice Resident] said while full".into());
    let n_gets = env.lg.n_gets();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(env.lg.n_gets(), n_gets, "no GET while the outbox is full");
    assert_eq!(env.lg.queue_len(), 1, "the viewer keeps the line meanwhile");

    env.db.set_offline(false);
    eventually(PATIENCE, "everything delivered", || async {
        env.stored().len() == 41 && relay.outbox.is_empty()
    })
    .await;
    let n_dropped = relay.outbox.n_dropped();
    relay.stop().await;

    assert_eq!(env.stored_messages(), expected);
    assert_eq!(n_dropped, 0);
}

#[tokio::test]
async fn lines_older_than_max_age_are_dropped_and_counted() {
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
    assert!(relay.outbox.is_empty());

    env.db.set_offline(false);
    env.lg.say("Alice Resident", "fresh");
    eventually(PATIENCE, "the fresh line delivered", || async {
        env.stored().len() == 1
    })
    .await;
    relay.stop().await;

    assert_eq!(env.stored_messages(), ["[Alice Resident] fresh"]);
}
