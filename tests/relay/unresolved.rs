//! Lines the CMS cannot settle hold back only themselves and their speaker's newer lines: a
//! read-back the CMS cannot answer (a live OpenSim-CMS runs out of PHP memory on a chat GET of more
//! than about 50 000 rows) and a line whose POST it keeps failing wait for their own bounded retries
//! while other speakers' lines are delivered,
//! then end in the dead letters with a reason that says what to check; nothing is resent blindly,
//! and `/readyz`, the metrics and `outbox dead` show it.

use opensim_chat_relay::metrics::Stats;
use opensim_chat_relay::sim::cms::{Fault, Permissions};

use crate::admin::outbox_cli;
use crate::health::Observed;
use crate::helpers::{PATIENCE, TestEnv, eventually, metric};

const ALICE: &str = "Alice Resident";
const BOB: &str = "Bob Resident";

/// A relay with its health endpoint, the in-world direction off.
async fn start(env: &TestEnv, overrides: &[(&str, &str)]) -> Observed {
    let mut all = vec![("inworld.enabled", "false")];
    all.extend_from_slice(overrides);
    Observed::start(env, "", &all).await
}

async fn dead_letters_reach(relay: &Observed, n: usize) {
    eventually(PATIENCE, &format!("{n} dead letters"), || async {
        relay.outbox.dead_len() == n
    })
    .await;
}

/// The chat GETs the CMS has received (with the in-world direction off: delivery's read-backs and
/// probes).
fn chat_gets(env: &TestEnv) -> usize {
    env.db
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/chats/"))
        .count()
}

fn count_of(env: &TestEnv, message: &str) -> usize {
    env.stored_messages()
        .iter()
        .filter(|m| *m == message)
        .count()
}

async fn stored(env: &TestEnv, message: &str) {
    eventually(PATIENCE, &format!("{message:?} stored"), || async {
        count_of(env, message) > 0
    })
    .await;
}

/// The grid is busy: more rows than the CMS can read in one answer were stored just now.
fn busy_grid(env: &TestEnv) {
    let dora = env
        .db
        .add_user("dora", "pw", "Dora", "Admin", Permissions::all());
    env.db.set_memory_limit_rows(Some(20));
    for n in 0..30 {
        env.db.add_cms_line(1, dora, &format!("busy {n}"));
    }
}

/// `busy_grid`, and the answer to the next chat POST is lost after the CMS stored it.
fn busy_grid_that_loses_the_next_answer(env: &TestEnv) {
    busy_grid(env);
    env.db.fault_next(1, Fault::CloseAfterStore);
}

#[tokio::test]
async fn a_read_back_the_cms_cannot_answer_blocks_no_newer_line_and_ends_in_the_dead_letters() {
    let env = TestEnv::start().await;
    busy_grid_that_loses_the_next_answer(&env);
    let relay = start(&env, &[("retry.max_line_failures", "3")]).await;

    env.lg.say(ALICE, "uncertain");
    stored(&env, "[Alice Resident] uncertain").await;
    // Newer lines, one poll each, are delivered while the uncertain one waits for its read-back.
    for n in 0..3 {
        env.lg.say(BOB, &format!("newer {n}"));
        stored(&env, &format!("[Bob Resident] newer {n}")).await;
    }
    dead_letters_reach(&relay, 1).await;
    // Given up: no more read-backs, while delivery goes on.
    let n_gets = chat_gets(&env);
    env.lg.say(BOB, "after");
    stored(&env, "[Bob Resident] after").await;
    let (_, metrics) = relay.get("/metrics").await;
    let dead = relay.outbox.dead_letters().expect("dead letters");
    let (_, readyz) = relay.get_json("/readyz").await;
    relay.stop().await;
    let (listed, dead_listing, _) = outbox_cli(&env, &["dead"]);

    assert_eq!(
        count_of(&env, "[Alice Resident] uncertain"),
        1,
        "never resent"
    );
    for n in 0..3 {
        assert_eq!(count_of(&env, &format!("[Bob Resident] newer {n}")), 1);
    }
    assert_eq!(
        chat_gets(&env),
        n_gets,
        "no read-back after the dead letter"
    );
    // Three read-backs, each failure checked with one probe, and nothing else.
    assert_eq!(n_gets, 6);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].pending.line.message, "uncertain");
    assert!(
        dead[0]
            .reason
            .starts_with("outcome unknown: the cms could not answer the read-back")
            && dead[0].reason.contains("Allowed memory size")
            && dead[0]
                .reason
                .contains("check the cms chat for this line before `outbox requeue`"),
        "{}",
        dead[0].reason
    );
    // One POST and three read-backs; three failures of its own.
    assert_eq!((dead[0].pending.attempts, dead[0].pending.failures), (4, 3));
    assert!(
        metrics.contains("opensim_chat_relay_lines_unresolved_total 1\n"),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "opensim_chat_relay_lines_held_back"),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(readyz["checks"]["delivery"]["ok"], true, "{readyz}");
    assert!(listed);
    assert!(
        dead_listing.contains("uncertain")
            && dead_listing.contains("outcome unknown")
            && dead_listing.contains("4 attempts, 3 failures"),
        "{dead_listing}"
    );
}

#[tokio::test]
async fn a_line_waiting_for_its_read_back_shows_in_readyz_and_is_settled_once_the_cms_can_answer() {
    let env = TestEnv::start().await;
    busy_grid_that_loses_the_next_answer(&env);
    let relay = start(&env, &[("retry.max_line_failures", "1000")]).await;

    env.lg.say(ALICE, "uncertain");
    stored(&env, "[Alice Resident] uncertain").await;
    eventually(PATIENCE, "readyz names the held line", || async {
        let (status, body) = relay.get_json("/readyz").await;
        status == 503 && body["checks"]["delivery"]["ok"] == false
    })
    .await;
    let (_, held) = relay.get_json("/readyz").await;
    let (_, metrics) = relay.get("/metrics").await;
    env.lg.say(BOB, "newer");
    stored(&env, "[Bob Resident] newer").await;
    // The grid quietens down (or the CMS gets more memory): the next read-back finds the line.
    env.db.set_memory_limit_rows(None);
    eventually(PATIENCE, "the outbox empty and ready", || async {
        relay.outbox.is_empty() && relay.get_json("/readyz").await.0 == 200
    })
    .await;
    let n_dead = relay.outbox.dead_len();
    let n_reconciled = Stats::get(&relay.stats.lines_reconciled);
    relay.stop().await;

    let reason = held["checks"]["delivery"]["reason"]
        .as_str()
        .expect("a reason");
    assert!(
        reason.starts_with("1 lines wait for a retry") && reason.contains("Allowed memory size"),
        "{reason}"
    );
    assert_eq!(
        metric(&metrics, "opensim_chat_relay_lines_held_back"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        env.relayed_rows()
            .into_iter()
            .map(|(_, message)| message)
            .collect::<Vec<_>>(),
        ["[Alice Resident] uncertain", "[Bob Resident] newer"],
        "each once"
    );
    assert_eq!((n_dead, n_reconciled), (0, 1), "found by the read-back");
}

#[tokio::test]
async fn a_line_whose_read_back_fails_keeps_its_speakers_order_when_it_turns_out_unsent() {
    let env = TestEnv::start().await;
    busy_grid(&env);
    // The POST is lost before the CMS stores it: its outcome is unknown, and its read-back fails
    // on the memory limit while the CMS answers the probe.
    env.db.fault_next(1, Fault::Hang);
    let relay = start(
        &env,
        &[
            ("retry.max_line_failures", "1000"),
            ("cms.request_timeout", "300ms"),
        ],
    )
    .await;

    env.lg.say(ALICE, "first");
    eventually(PATIENCE, "the line held after its read-back", || async {
        metric(
            &relay.get("/metrics").await.1,
            "opensim_chat_relay_lines_held_back",
        ) == Some(1.0)
    })
    .await;
    env.lg.say(ALICE, "second");
    env.lg.say(BOB, "bob's line");
    // Another speaker is not held back.
    stored(&env, "[Bob Resident] bob's line").await;
    env.db.set_memory_limit_rows(None);
    eventually(PATIENCE, "the outbox empty", || async {
        relay.outbox.is_empty()
    })
    .await;
    relay.stop().await;

    let alice: Vec<String> = env
        .relayed_rows()
        .into_iter()
        .map(|(_, message)| message)
        .filter(|m| m.starts_with("[Alice"))
        .collect();
    // The read-back finds the first line missing and resends it; the second waited behind it.
    assert_eq!(
        alice,
        ["[Alice Resident] first", "[Alice Resident] second"],
        "each once, in order"
    );
}

#[tokio::test]
async fn a_line_the_cms_keeps_failing_holds_back_only_its_speaker_and_ends_in_the_dead_letters() {
    let env = TestEnv::start().await;
    // The CMS answers every POST that carries this line with HTTP 500, and takes every other.
    env.db.fail_posts_carrying(Some("poison"));
    env.lg.say(ALICE, "poison pill");
    env.lg.say(BOB, "bob's line");
    env.lg.say(ALICE, "alice after");
    let relay = start(&env, &[("retry.max_line_failures", "3")]).await;

    stored(&env, "[Bob Resident] bob's line").await;
    dead_letters_reach(&relay, 1).await;
    stored(&env, "[Alice Resident] alice after").await;
    let dead = relay.outbox.dead_letters().expect("dead letters");
    relay.stop().await;

    // Bob's line did not wait for Alice's; Alice's next line did, so her order holds.
    assert_eq!(
        env.stored_messages(),
        ["[Bob Resident] bob's line", "[Alice Resident] alice after"]
    );
    assert_eq!(dead[0].pending.line.message, "poison pill");
    assert!(
        dead[0]
            .reason
            .starts_with("the cms failed this line 3 times (last: cms answered HTTP 500")
            && dead[0].reason.contains("a read-back found it not stored"),
        "{}",
        dead[0].reason
    );
    // Three POSTs (the batch, then twice alone), each followed by a read-back.
    assert_eq!((dead[0].pending.attempts, dead[0].pending.failures), (6, 3));
}
