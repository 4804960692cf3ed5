//! Failures the operator must see (issue 15 item 5): scrapes of a large outbox that show true counts
//! without scanning it, `/readyz` while the CMS keeps failing or a stage died, the exit codes of
//! start-up errors, the outbox's permission errors, and dead-letter reasons that name the CMS's cause.

use chrono::Utc;
use opensim_chat_relay::model::CapturedLine;
use opensim_chat_relay::outbox::Outbox;

use crate::health::{Observed, sample};
use crate::helpers::{GHOST, PATIENCE, TestEnv, eventually};

/// Lines spoken now by an unmapped speaker, "line 0" to "line `n - 1`".
fn captured_lines(n: usize) -> Vec<CapturedLine> {
    let now = Utc::now();
    (0..n)
        .map(|i| CapturedLine {
            speaker: "Alice Resident".into(),
            owner_id: None,
            message: format!("line {i}"),
            spoken_at: now,
            captured_at: now,
        })
        .collect()
}

#[tokio::test]
async fn a_large_outbox_scraped_many_times_shows_true_counts_without_being_scanned() {
    // Arrange: 20,000 lines stored, 1,000 of them refused by the CMS, 100 unusable viewer answers
    // kept; the relay starts on that outbox with the CMS down, so nothing moves while it is scraped.
    let env = TestEnv::start().await;
    {
        let outbox = Outbox::open(&env.dir.path().join("outbox"), 8 << 20).expect("open");
        outbox
            .append(&captured_lines(20_000))
            .await
            .expect("append");
        for line in outbox.oldest(1_000).expect("read") {
            outbox
                .dead_letter(&line, "refused")
                .await
                .expect("dead letter");
        }
        for _ in 0..100 {
            outbox
                .quarantine_raw("chat", b"not json")
                .await
                .expect("quarantine");
        }
    }
    env.db.set_offline(true);
    let relay = Observed::start(&env, &format!("[mapping.users]\n\"{GHOST}\" = 999\n"), &[]).await;
    let reader = relay.outbox.reader();
    let n_read_before = reader.records_read();

    // Act: 50 scrapes of each.
    const N_SCRAPES: u64 = 50;
    for _ in 0..N_SCRAPES {
        let (_, metrics) = relay.get("/metrics").await;
        let (_, status) = relay.get_json("/status").await;

        // Assert: every scrape shows the true counts.
        assert_eq!(
            sample(&metrics, "opensim_chat_relay_outbox_lines"),
            19_000.0
        );
        assert_eq!(sample(&metrics, "opensim_chat_relay_dead_letters"), 1_000.0);
        assert_eq!(sample(&metrics, "opensim_chat_relay_quarantined"), 100.0);
        assert!(sample(&metrics, "opensim_chat_relay_outbox_oldest_age_seconds") >= 0.0);
        assert_eq!(status["outbox"]["lines"], 19_000);
        assert_eq!(status["outbox"]["dead_letters"], 1_000);
        assert_eq!(status["outbox"]["quarantined"], 100);
    }
    // One record a scrape (the oldest pending line, for its age), not the trees.
    let n_read = reader.records_read() - n_read_before;
    assert!(
        n_read <= 2 * N_SCRAPES,
        "{n_read} records read for {} scrapes",
        2 * N_SCRAPES
    );

    // Act: the CMS is back, the backlog goes out, and one more line is refused.
    env.db.set_offline(false);
    eventually(PATIENCE, "the backlog delivered", || async {
        relay.outbox.is_empty()
    })
    .await;
    env.lg.say(GHOST, "I do not exist");
    eventually(PATIENCE, "the ghost's line dead-lettered", || async {
        relay.outbox.dead_letters().expect("dead letters").len() == 1_001
    })
    .await;

    // Assert: the counts follow.
    let (_, metrics) = relay.get("/metrics").await;
    assert_eq!(sample(&metrics, "opensim_chat_relay_outbox_lines"), 0.0);
    assert_eq!(sample(&metrics, "opensim_chat_relay_dead_letters"), 1_001.0);
    assert_eq!(sample(&metrics, "opensim_chat_relay_quarantined"), 100.0);
    assert_eq!(
        sample(&metrics, "opensim_chat_relay_outbox_oldest_age_seconds"),
        0.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn readyz_is_503_while_deliveries_keep_failing_and_200_again_once_one_succeeds() {
    // Arrange: a relay that was ready.
    let env = TestEnv::start().await;
    let relay = Observed::start(&env, "", &[("http.cms_unready_after", "300ms")]).await;
    eventually(PATIENCE, "/readyz 200", || async {
        relay.get("/readyz").await.0 == 200
    })
    .await;

    // Act: the CMS goes away while a line waits.
    env.db.set_offline(true);
    env.lg.say("Alice Resident", "is anybody there?");

    // Assert: not ready, and the cms check says why.
    eventually(PATIENCE, "/readyz 503", || async {
        relay.get("/readyz").await.0 == 503
    })
    .await;
    let (_, body) = relay.get_json("/readyz").await;
    assert_eq!(body["checks"]["cms"]["ok"], false, "{body}");
    let reason = body["checks"]["cms"]["reason"].as_str().expect("reason");
    assert!(
        reason.contains("delivery to the cms has failed"),
        "{reason}"
    );
    assert!(reason.contains("http.cms_unready_after"), "{reason}");
    assert!(reason.contains("cms unreachable"), "{reason}");
    assert_eq!(body["checks"]["viewer"]["ok"], true, "{body}");
    assert_eq!(body["checks"]["outbox"]["ok"], true, "{body}");
    let (_, metrics) = relay.get("/metrics").await;
    assert_eq!(sample(&metrics, "opensim_chat_relay_ready"), 0.0);

    // Act: the CMS is back.
    env.db.set_offline(false);

    // Assert: the line is delivered and the relay is ready again.
    eventually(PATIENCE, "/readyz 200 again", || async {
        relay.get("/readyz").await.0 == 200
    })
    .await;
    assert_eq!(
        env.stored_messages(),
        ["[Alice Resident] is anybody there?"]
    );
    relay.stop().await;
}
