//! The outbox across outages and restarts.

use crate::helpers::{PATIENCE, TestEnv, eventually};

#[tokio::test]
async fn lines_wait_in_the_outbox_while_the_cms_is_down_and_arrive_once_it_is_up() {
    let env = TestEnv::start().await;
    env.db.set_offline(true);
    let relay = env.start_relay("", &[]).await;
    let expected = env.alice_says_numbered_lines(3);
    eventually(PATIENCE, "lines in the outbox", || async {
        relay.outbox.len() == 3
    })
    .await;
    assert!(env.stored().is_empty());

    env.db.set_offline(false);
    eventually(PATIENCE, "lines delivered", || async {
        env.stored().len() == 3 && relay.outbox.is_empty()
    })
    .await;
    relay.stop().await;

    assert_eq!(env.stored_messages(), expected);
}

#[tokio::test]
async fn a_new_relay_on_the_same_outbox_delivers_what_the_stopped_one_left() {
    let env = TestEnv::start().await;
    env.db.set_offline(true);
    let first = env.start_relay("", &[]).await;
    env.lg.say("Alice Resident", "left behind");
    eventually(PATIENCE, "line in the outbox", || async {
        first.outbox.len() == 1
    })
    .await;
    first.stop().await;

    env.db.set_offline(false);
    let second = env.start_relay("", &[]).await;
    eventually(PATIENCE, "line delivered", || async {
        env.stored().len() == 1 && second.outbox.is_empty()
    })
    .await;
    second.stop().await;

    assert_eq!(env.stored_messages(), ["[Alice Resident] left behind"]);
}
