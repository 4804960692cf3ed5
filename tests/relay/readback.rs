//! The read-back recognises each line as the CMS stored it, whatever the text, the outbox record or
//! the CMS's ids: a line of unknown outcome that the CMS stored is never sent again.

use std::time::Duration;

use chrono::Utc;
use opensim_chat_relay::model::CapturedLine;
use opensim_chat_relay::outbox::Outbox;
use opensim_chat_relay::sim::cms::{CostModel, Fault, Permissions, RequestKind};

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
                source: opensim_chat_relay::model::LineSource::Avatar,
                speaker: ALICE.into(),
                owner_id: None,
                message: "half written".into(),
                spoken_at: now,
                captured_at: now,
                region: String::new(),
            }])
            .await
            .expect("appended");
        // Marked in flight as captured: no row.
        let line = outbox.oldest(1).expect("read")[0].clone();
        outbox.mark_in_flight(&[line], 0).await.expect("saved");
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

#[tokio::test]
async fn a_read_back_reads_the_rows_around_its_line_not_a_minute_of_the_grid() {
    let env = TestEnv::start().await;
    // The grid was busy half a minute ago: 50 rows by another writer.
    let dora = env
        .db
        .add_user("dora", "pw", "Dora", "Admin", Permissions::all());
    for n in 0..50 {
        env.db
            .add_cms_line_dated(1, dora, &format!("busy {n}"), Duration::from_secs(30));
    }
    // The cost model accounts every request's rows (at no cost worth waiting for).
    env.db.set_cost_model(Some(CostModel {
        per_request: Duration::ZERO,
        per_row_stored: Duration::ZERO,
        per_row_read: Duration::ZERO,
        per_user_joined: Duration::ZERO,
        workers: 4,
    }));
    env.db.fault_next(1, Fault::CloseAfterStore);
    env.lg.say(ALICE, "uncertain");
    let relay = env.start_relay("", &[("inworld.enabled", "false")]).await;
    settled(&env, &relay, 51).await;
    marker_then_stop(&env, relay, 51).await;

    let rows_read: Vec<usize> = env
        .db
        .busy_spans()
        .iter()
        .filter(|span| span.work.kind == RequestKind::ChatGet)
        .map(|span| span.work.rows_read)
        .collect();
    // The read-back found the line (stored once) and returned only it: the rows of half a minute
    // ago cost the CMS nothing. (The probes after failures return none.)
    assert_eq!(
        env.stored_messages()
            .iter()
            .filter(|m| *m == "[Alice Resident] uncertain")
            .count(),
        1
    );
    assert_eq!(rows_read.iter().max(), Some(&1), "{rows_read:?}");
}

#[tokio::test]
async fn a_crash_in_the_middle_of_clearing_in_flight_marks_sends_nothing_out_of_order() {
    // A read-back found two lines not stored and cleared their in-flight marks; the process died
    // (or the disk filled) after the first record was written: the older line is pending, the
    // newer still marked in flight.
    let env = TestEnv::start().await;
    {
        let outbox = Outbox::open(&env.dir.path().join("outbox"), 8 << 20).expect("outbox opens");
        let now = Utc::now();
        let line = |message: &str| CapturedLine {
            source: opensim_chat_relay::model::LineSource::Avatar,
            speaker: ALICE.into(),
            owner_id: None,
            message: message.into(),
            spoken_at: now,
            captured_at: now,
            region: String::new(),
        };
        outbox
            .append(&[line("older"), line("newer")])
            .await
            .expect("appended");
        let newer = outbox.oldest(2).expect("read")[1].clone();
        outbox.mark_in_flight(&[newer], 0).await.expect("saved");
    }
    let relay = env.start_relay("", &[]).await;

    settled(&env, &relay, 2).await;
    marker_then_stop(&env, relay, 2).await;

    assert_eq!(
        env.stored_messages(),
        [
            "[Alice Resident] older",
            "[Alice Resident] newer",
            "[Alice Resident] marker"
        ]
    );
}
