//! What reaches the CMS, and as what: user ids, text, timestamps, order, filtering.

use chrono::{TimeZone, Utc};
use opensim_chat_relay::sim::lookingglass::SimChatLine;

use crate::helpers::{OWN_NAME, PATIENCE, TestEnv, eventually};

#[tokio::test]
async fn mapped_and_anonymous_speakers_arrive_with_the_right_user_message_timestamp_and_order() {
    // Arrange: Alice linked and confirmed in the CMS, Bob mapped in the config, Carol unknown,
    // Dave linked but never confirmed.
    let env = TestEnv::start().await;
    let alice = env.linked_user("Alice Resident", "alice");
    let bob = env.db.add_user(
        "bob",
        "pw",
        "Bob",
        "Builder",
        opensim_chat_relay::sim::cms::Permissions::relay(),
    );
    let dave = env.db.add_user(
        "dave",
        "pw",
        "Dave",
        "Unconfirmed",
        opensim_chat_relay::sim::cms::Permissions::relay(),
    );
    env.lg.add_avatar("Dave Unconfirmed");
    env.db
        .link_avatar(1, &env.lg.avatar_uuid("Dave Unconfirmed"), dave, false);
    let mapping = format!("[mapping.users]\n\"Bob Builder\" = {bob}\n");
    // Said 90 minutes ago: the viewer writes it on a 12-hour clock in New York, the CMS must get it as
    // Amsterdam wall-clock time.
    let said_at = Utc
        .timestamp_opt(Utc::now().timestamp() - 90 * 60, 0)
        .single()
        .expect("time");
    let expected_timestamp = said_at
        .with_timezone(&chrono_tz::Europe::Amsterdam)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string();
    env.lg
        .push(SimChatLine::avatar("Alice Resident", "hello from alice").at(said_at));
    env.lg
        .push(SimChatLine::avatar("Bob Builder", "hello from bob").at(said_at));
    env.lg
        .push(SimChatLine::whisper("Carol Visitor", "psst from carol").at(said_at));
    env.lg
        .push(SimChatLine::shout("Dave Unconfirmed", "HELLO FROM DAVE").at(said_at));

    // Act
    let relay = env.start_relay(&mapping, &[]).await;
    eventually(PATIENCE, "four lines stored", || async {
        env.stored().len() == 4
    })
    .await;
    relay.stop().await;

    // Assert
    let stored = env.stored();
    let rows: Vec<_> = stored
        .iter()
        .map(|c| (c.user_id, c.message.as_str(), c.from_cms))
        .collect();
    assert_eq!(
        rows,
        [
            (Some(alice), "hello from alice", false),
            (Some(bob), "hello from bob", false),
            (None, "[Carol Visitor] psst from carol", false),
            (None, "[Dave Unconfirmed] HELLO FROM DAVE", false),
        ]
    );
    assert!(
        stored.iter().all(|c| c.timestamp == expected_timestamp),
        "{expected_timestamp} {stored:?}"
    );
}

#[tokio::test]
async fn filtered_lines_never_reach_the_cms() {
    let env = TestEnv::start().await;
    env.lg.push(SimChatLine::object("Magic Box", "I am a box"));
    env.lg.push(SimChatLine::owner_say("My HUD", "only you"));
    env.lg
        .push(SimChatLine::debug("Broken Thing", "script error"));
    env.lg.push(SimChatLine::system("sys notice"));
    env.lg.say(OWN_NAME, "my own echo");
    env.lg.say("Alice Resident", "the only relayed line");

    let relay = env.start_relay("", &[]).await;
    eventually(PATIENCE, "the avatar line stored", || async {
        !env.stored().is_empty()
    })
    .await;
    // One more poll cycle after the marker, so a wrongly relayed line would have arrived too.
    env.lg.say("Alice Resident", "marker");
    eventually(PATIENCE, "the marker stored", || async {
        env.stored().len() >= 2
    })
    .await;
    relay.stop().await;

    assert_eq!(
        env.stored_messages(),
        [
            "[Alice Resident] the only relayed line",
            "[Alice Resident] marker"
        ]
    );
}

#[tokio::test]
async fn emoji_and_strip_tags_bait_arrive_readable() {
    let env = TestEnv::start().await;
    let alice = env.linked_user("Alice Resident", "alice");
    env.lg
        .say("Alice Resident", "I <3 you 😀 & x<y, 100% + more");

    let relay = env.start_relay("", &[]).await;
    eventually(PATIENCE, "the line stored", || async {
        !env.stored().is_empty()
    })
    .await;
    relay.stop().await;

    let stored = env.stored();
    assert_eq!(stored[0].user_id, Some(alice));
    assert_eq!(stored[0].message, "I ＜3 you \u{FFFD} & x＜y, 100% + more");
}
