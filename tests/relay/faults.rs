//! Posts whose outcome is unknown are read back before anything is resent: no duplicates.

use std::time::Duration;

use opensim_chat_relay::sim::cms::Fault;

use crate::helpers::{PATIENCE, TestEnv, eventually};

/// Five lines from Alice, one poll, one batch.
fn chat(env: &TestEnv) -> Vec<String> {
    let lines: Vec<String> = (0..5).map(|i| format!("line {i}")).collect();
    for line in &lines {
        env.lg.say("Alice Resident", line);
    }
    lines
        .iter()
        .map(|l| format!("[Alice Resident] {l}"))
        .collect()
}

/// Runs one ambiguous fault on the first chat POST and checks every line arrives exactly once.
async fn survives(fault: Fault, overrides: &[(&str, &str)]) {
    let env = TestEnv::start().await;
    env.db.fault_next(1, fault.clone());
    let expected = chat(&env);
    let relay = env.start_relay("", overrides).await;
    eventually(PATIENCE, "the outbox emptied", || async {
        relay.outbox.is_empty() && env.stored().len() >= 5
    })
    .await;
    // More polls and delivery rounds, so a wrong resend would arrive.
    let n_requests = env.db.requests().len();
    env.lg.say("Alice Resident", "marker");
    eventually(PATIENCE, "the marker", || async {
        env.stored().len() >= 6 && env.db.requests().len() > n_requests
    })
    .await;
    relay.stop().await;

    let mut expected = expected;
    expected.push("[Alice Resident] marker".into());
    assert_eq!(env.stored_messages(), expected, "fault {fault:?}");
}

#[tokio::test]
async fn a_timeout_after_the_cms_stored_the_batch_duplicates_nothing() {
    survives(Fault::HangAfterStore, &[("cms.request_timeout", "300ms")]).await;
}

#[tokio::test]
async fn a_connection_reset_before_the_answer_duplicates_nothing() {
    survives(Fault::CloseAfterStore, &[]).await;
}

#[tokio::test]
async fn a_502_or_504_after_the_cms_stored_the_batch_duplicates_nothing() {
    survives(Fault::StatusAfterStore(502), &[]).await;
    survives(Fault::StatusAfterStore(504), &[]).await;
}

#[tokio::test]
async fn success_false_after_a_partial_insert_duplicates_nothing() {
    // The CMS stores all but the last row and answers {"success":false,"id":0}.
    survives(Fault::FailLastElement, &[]).await;
}

#[tokio::test]
async fn a_slow_answer_is_waited_for() {
    survives(Fault::Slow(Duration::from_millis(500)), &[]).await;
}

#[tokio::test]
async fn a_crash_with_a_batch_in_flight_duplicates_nothing_after_the_restart() {
    let env = TestEnv::start().await;
    // The CMS stores the batch and never answers; the relay dies waiting.
    env.db.fault_next(1, Fault::HangAfterStore);
    let expected = chat(&env);
    let first = env.start_relay("", &[]).await;
    eventually(PATIENCE, "the batch stored", || async {
        env.stored().len() == 5
    })
    .await;
    first.kill().await;

    let second = env.start_relay("", &[]).await;
    eventually(PATIENCE, "the outbox emptied", || async {
        second.outbox.is_empty()
    })
    .await;
    second.stop().await;

    assert_eq!(env.stored_messages(), expected);
}

#[tokio::test]
async fn verified_delivery_reads_back_every_batch() {
    let env = TestEnv::start().await;
    let expected = chat(&env);
    let relay = env.start_relay("", &[("cms.verify", "true")]).await;
    eventually(PATIENCE, "the outbox emptied", || async {
        relay.outbox.is_empty() && env.stored().len() == 5
    })
    .await;
    relay.stop().await;

    assert_eq!(env.stored_messages(), expected);
    let requests = env.db.requests();
    let post = requests
        .iter()
        .position(|r| r.method == "POST" && r.path.ends_with("/chats/"))
        .expect("a post");
    assert!(
        requests[post..]
            .iter()
            .any(|r| r.method == "GET" && r.path.contains("/chats/")),
        "the batch was read back after success"
    );
}
