//! The read-back recognises each line as the CMS stored it, whatever the text, the outbox record or
//! the CMS's ids: a line of unknown outcome that the CMS stored is never sent again.

use chrono::Utc;
use opensim_chat_relay::model::CapturedLine;
use opensim_chat_relay::outbox::Outbox;
use opensim_chat_relay::sim::cms::Fault;

use crate::helpers::{Logs, PATIENCE, RunningRelay, TestEnv, eventually};

const ALICE: &str = "Alice Resident";

/// Waits until the CMS holds `n` rows and the outbox is empty.
async fn settled(env: &TestEnv, relay: &RunningRelay, n: usize) {
    eventually(
        PATIENCE,
        &format!("{n} rows stored, the outbox empty"),
        || async { env.stored().len() >= n && relay.outbox.is_empty() },
    )
    .await;
}

/// Then one more line through the same steps, so that a wrong resend would have arrived before
/// it, and stops the relay.
async fn marker_then_stop(env: &TestEnv, relay: RunningRelay, n_before: usize) {
    env.lg.say(ALICE, "marker");
    settled(env, &relay, n_before + 1).await;
    relay.stop().await;
}

#[tokio::test]
async fn a_nul_in_a_line_is_sent_as_the_cms_stores_it_so_its_read_back_finds_it() {
    // PHP's strip_tags drops every NUL byte before the insert; the answer to the POST is lost
    // after the CMS stored the row, so only the read-back can tell.
    let env = TestEnv::start().await;
    env.db.fault_next(1, Fault::CloseAfterStore);
    env.lg.say(ALICE, "nul\u{0}inside");
    let relay = env.start_relay("", &[]).await;

    settled(&env, &relay, 1).await;
    marker_then_stop(&env, relay, 1).await;

    assert_eq!(
        env.stored_messages(),
        ["[Alice Resident] nulinside", "[Alice Resident] marker"]
    );
}

#[tokio::test]
async fn a_stored_record_in_flight_without_its_row_is_read_back_and_delivered_once() {
    // Another tool (or a damaged write) left a record marked in flight but without the row it
    // was sent as.
    let env = TestEnv::start().await;
    {
        let outbox = Outbox::open(&env.dir.path().join("outbox"), 8 << 20).expect("outbox opens");
        let now = Utc::now();
        outbox
            .append(&[CapturedLine {
                speaker: ALICE.into(),
                owner_id: None,
                message: "half written".into(),
                spoken_at: now,
                captured_at: now,
            }])
            .await
            .expect("appended");
        let mut line = outbox.oldest(1).expect("read")[0].clone();
        line.in_flight = true;
        line.prepared = None;
        outbox.save(&[line]).await.expect("saved");
    }
    let relay = env.start_relay("", &[]).await;

    settled(&env, &relay, 1).await;
    marker_then_stop(&env, relay, 1).await;

    assert_eq!(
        env.stored_messages(),
        ["[Alice Resident] half written", "[Alice Resident] marker"]
    );
}

#[tokio::test]
async fn a_cms_database_restored_to_lower_ids_makes_no_line_be_sent_twice() {
    let (logs, _guard) = Logs::capture();
    let env = TestEnv::start().await;
    let relay = env.start_relay("", &[]).await;
    for n in 0..3 {
        env.lg.say(ALICE, &format!("before {n}"));
    }
    settled(&env, &relay, 3).await;

    // The CMS's database is restored from a backup taken when its last chat id was 1: the
    // relay's last confirmed id (3) is now above the ids the CMS hands out.
    env.db.restore_chats(1);
    for n in 0..3 {
        env.lg.say(ALICE, &format!("after {n}"));
    }
    settled(&env, &relay, 4).await;
    // And later batches go on as usual.
    for n in 0..3 {
        env.lg.say(ALICE, &format!("later {n}"));
    }
    settled(&env, &relay, 7).await;
    relay.stop().await;

    let expected: Vec<String> = std::iter::once("before 0".to_owned())
        .chain((0..3).map(|n| format!("after {n}")))
        .chain((0..3).map(|n| format!("later {n}")))
        .map(|text| format!("[Alice Resident] {text}"))
        .collect();
    assert_eq!(env.stored_messages(), expected);
    assert_eq!(
        logs.lines_with("cms ids went backwards").len(),
        1,
        "warned once"
    );
    assert!(logs.lines_with("cms ids went backwards")[0].contains("WARN"));
}
