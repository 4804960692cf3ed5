//! Delivery to the CMS: batch limits, retries, dead letters, token expiry.

use std::time::Duration;

use opensim_chat_relay::sim::cms::Fault;
use opensim_chat_relay::sim::lookingglass::SimChatLine;

use crate::helpers::{GHOST, PATIENCE, TestEnv, eventually};

/// The chat POST bodies the CMS received, parsed.
fn chat_posts(env: &TestEnv) -> Vec<serde_json::Value> {
    env.db
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/chats/"))
        .map(|r| serde_json::from_slice(&r.body).expect("the relay posts JSON"))
        .collect()
}

#[tokio::test]
async fn batches_respect_the_count_limit() {
    let env = TestEnv::start().await;
    let expected = env.alice_says_numbered_lines(10);

    let relay = env
        .start_relay("", &[("cms.batch_max_messages", "3")])
        .await;
    eventually(PATIENCE, "ten lines stored", || async {
        env.stored().len() == 10
    })
    .await;
    relay.stop().await;

    let sizes: Vec<usize> = chat_posts(&env)
        .iter()
        .map(|b| b.as_array().expect("array").len())
        .collect();
    assert_eq!(sizes, [3, 3, 3, 1]);
    assert_eq!(env.stored_messages(), expected);
}

#[tokio::test]
async fn batches_respect_the_byte_limit() {
    let env = TestEnv::start().await;
    let long = "x".repeat(300);
    for i in 0..6 {
        env.lg.say("Alice Resident", &format!("{i} {long}"));
    }

    let relay = env
        .start_relay("", &[("cms.batch_max_bytes", "1024")])
        .await;
    eventually(PATIENCE, "six lines stored", || async {
        env.stored().len() == 6
    })
    .await;
    relay.stop().await;

    let bodies: Vec<Vec<u8>> = env
        .db
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/chats/"))
        .map(|r| r.body)
        .collect();
    assert!(
        bodies.len() >= 2,
        "six 330-byte lines cannot fit one 1024-byte batch"
    );
    assert!(
        bodies.iter().all(|b| b.len() <= 1024),
        "{:?}",
        bodies.iter().map(Vec::len).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn the_cms_failing_three_times_with_500_loses_and_duplicates_nothing() {
    let env = TestEnv::start().await;
    env.db.fault_next(3, Fault::Status(500));
    let expected = env.alice_says_numbered_lines(5);

    let relay = env.start_relay("", &[]).await;
    eventually(PATIENCE, "five lines stored", || async {
        env.stored().len() >= 5
    })
    .await;
    // Let any wrong resend arrive before judging.
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.stop().await;

    assert_eq!(env.stored_messages(), expected);
    assert!(env.db.n_chat_posts() >= 4, "three failures then success");
}

#[tokio::test]
async fn a_line_the_cms_rejects_goes_to_the_dead_letters_and_its_batch_mates_are_delivered() {
    // "Ghost Avatar" is mapped to a user id the CMS does not have: its row fails the foreign key,
    // silently in the middle of a batch (OpenSim-CMS 1.1 still answers success: true).
    let env = TestEnv::start().await;
    env.lg.say("Alice Resident", "before");
    env.lg.say(GHOST, "I do not exist");
    env.lg.say("Alice Resident", "after");

    let relay = env.start_relay_with_a_ghost(&[]).await;
    relay.dead_letters_reach(1).await;
    eventually(PATIENCE, "the outbox empty", || async {
        relay.outbox.is_empty()
    })
    .await;
    let dead = relay.outbox.dead_letters().expect("dead letters");
    relay.stop().await;

    assert_eq!(
        env.stored_messages(),
        ["[Alice Resident] before", "[Alice Resident] after"]
    );
    assert_eq!(dead[0].pending.line.message, "I do not exist");
    assert!(!dead[0].reason.is_empty());
}

#[tokio::test]
async fn a_silently_skipped_middle_row_after_a_confirmed_batch_is_not_counted_delivered() {
    // Issue 21 defect 1: once a batch is confirmed, the next one's ids may span exactly its size
    // although its middle row (the ghost's unknown user) was skipped: every insert consumes an id.
    let env = TestEnv::start().await;
    let relay = env.start_relay_with_a_ghost(&[]).await;
    env.lg.say("Alice Resident", "first");
    eventually(PATIENCE, "the first line stored", || async {
        env.stored().len() == 1 && relay.outbox.is_empty()
    })
    .await;
    env.lg.say("Alice Resident", "before");
    env.lg.say(GHOST, "I do not exist");
    env.lg.say("Alice Resident", "after");

    relay.dead_letters_reach(1).await;
    let dead = relay.outbox.dead_letters().expect("dead letters");
    relay.stop().await;

    assert_eq!(
        env.stored_messages(),
        [
            "[Alice Resident] first",
            "[Alice Resident] before",
            "[Alice Resident] after"
        ]
    );
    assert_eq!(dead[0].pending.line.message, "I do not exist");
}

#[tokio::test]
async fn an_expired_token_is_replaced_and_nothing_is_lost() {
    let env = TestEnv::start().await;
    let relay = env.start_relay("", &[]).await;
    env.lg.say("Alice Resident", "one");
    eventually(PATIENCE, "first line stored", || async {
        env.stored().len() == 1
    })
    .await;

    env.db.expire_tokens();
    env.lg.say("Alice Resident", "two");
    eventually(PATIENCE, "second line stored", || async {
        env.stored().len() == 2
    })
    .await;
    relay.stop().await;

    assert_eq!(
        env.stored_messages(),
        ["[Alice Resident] one", "[Alice Resident] two"]
    );
    assert_eq!(env.db.n_logins(), 2);
}

#[tokio::test]
async fn the_token_travels_in_the_query_only_and_headers_are_title_case() {
    let env = TestEnv::start().await;
    env.lg.push(SimChatLine::avatar("Alice Resident", "hi"));
    let relay = env.start_relay("", &[]).await;
    eventually(PATIENCE, "line stored", || async {
        env.stored().len() == 1
    })
    .await;
    relay.stop().await;

    let post = env
        .db
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/chats/"))
        .expect("a chat post");
    assert!(post.query.starts_with("token="), "{}", post.query);
    assert!(
        post.headers
            .iter()
            .any(|(k, v)| k == "Content-Type" && v.contains("application/json")),
        "{:?}",
        post.headers
    );
    assert!(
        post.headers.iter().any(|(k, _)| k == "Content-Length"),
        "{:?}",
        post.headers
    );
}

#[tokio::test]
async fn requests_that_time_out_do_not_cost_a_login_each() {
    let env = TestEnv::start().await;
    env.db.fault_next(3, Fault::Hang);
    env.lg.say("Alice Resident", "patience");
    let relay = env.start_relay("", &[("cms.request_timeout", "1s")]).await;
    eventually(PATIENCE, "the line delivered", || async {
        env.stored().len() == 1 && relay.outbox.is_empty()
    })
    .await;
    relay.stop().await;

    assert_eq!(env.stored_messages(), ["[Alice Resident] patience"]);
    assert_eq!(
        env.db.n_logins(),
        1,
        "a timeout says nothing about the token"
    );
}
