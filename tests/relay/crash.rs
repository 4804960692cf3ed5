//! Crash safety: the relay binary is killed with SIGKILL at random moments while avatars chat, and
//! restarted on the same outbox. At the end an oracle checks that every line the viewer handed out in
//! a completed response reached the CMS exactly once, in per-speaker order. The only loss allowed is a
//! response read from the viewer but not yet flushed when the kill landed; it is counted separately.
//!
//! `RELAY_CRASH_CYCLES` sets the number of kills (default 20). The long run of docs/RELIABILITY.md:
//! `RELAY_CRASH_CYCLES=200 cargo test --release --test relay crash -- --nocapture`.

use std::collections::HashSet;
use std::process::{Child, Stdio};
use std::time::Duration;

use opensim_chat_relay::sim::lookingglass::spawn_chatter;
use tokio_util::sync::CancellationToken;

use opensim_chat_relay::outbox::Outbox;

use crate::helpers::{PATIENCE, TestEnv, cycles, sigterm};

fn start_relay_process(env: &TestEnv) -> Child {
    env.spawn_relay_process(
        &[
            ("cms.batch_max_messages", "20"),
            ("inworld.enabled", "false"),
            ("log.level", "warn"),
            ("http.listen", ""),
        ],
        Stdio::null(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_duplicates_nothing_persisted() {
    let n_cycles = cycles("RELAY_CRASH_CYCLES", 20);
    let env = TestEnv::start().await;

    // Avatars chat continuously, 250 lines a second in turn.
    let chatting = CancellationToken::new();
    let chatter = spawn_chatter(env.lg.clone(), 250.0, chatting.clone());

    // Kill at random moments; the allowed window of each kill is the last response handed out.
    let mut windows = HashSet::new();
    for _ in 0..n_cycles {
        let mut child = start_relay_process(&env);
        tokio::time::sleep(Duration::from_millis(fastrand::u64(50..400))).await;
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        // No GET can start once the relay is dead: the last one counted is the only response that
        // may have been read but not flushed.
        windows.insert(env.lg.n_gets());
    }

    // A last relay runs to the end and drains everything.
    chatting.cancel();
    chatter.await.expect("chatter stops");
    let last = start_relay_process(&env);
    env.viewer_drained(PATIENCE).await;
    let must_arrive = env.must_arrive(&windows);
    env.until_arrived(&must_arrive).await;
    sigterm(last);

    // The oracle.
    let verdict = env.verdict();
    let n_lost_outside_windows = verdict.lost_outside(&must_arrive).len();
    eprintln!(
        "crash run: {n_cycles} SIGKILLs, {} lines handed out, {} stored, {} lost in the read-but-not-flushed window, {n_lost_outside_windows} lost otherwise, {} duplicated, {} reordered, {} responses abandoned mid-write",
        verdict.n_handed,
        verdict.n_stored,
        verdict.lost.len() - n_lost_outside_windows,
        verdict.duplicated.len(),
        verdict.n_reordered,
        env.lg.n_aborted()
    );
    verdict.assert_kept(&must_arrive, "crash run");
}

/// Lines said in one second by an unmapped speaker, "backlog 0" to "backlog `n - 1`": a backlog
/// after an outage, whose batches await one shared read of their proof while newer ones go out.
fn backlog(n: usize) -> Vec<opensim_chat_relay::model::CapturedLine> {
    backlog_of(n, |i| format!("backlog {i}"))
}

/// `n` lines said in one second by one speaker, the `i`-th saying `message(i)`.
fn backlog_of(
    n: usize,
    message: impl Fn(usize) -> String,
) -> Vec<opensim_chat_relay::model::CapturedLine> {
    let at = chrono::Utc::now() - chrono::Duration::seconds(60);
    (0..n)
        .map(|i| opensim_chat_relay::model::CapturedLine {
            source: opensim_chat_relay::model::LineSource::Avatar,
            region: String::new(),
            speaker: "Alice Resident".into(),
            owner_id: None,
            message: message(i),
            spoken_at: at,
            captured_at: at,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_batches_await_their_proof_loses_and_duplicates_nothing() {
    // Arrange: 3 000 lines waiting, said in the same second.
    const N: usize = 3_000;
    let n_cycles = cycles("RELAY_CRASH_CYCLES", 6);
    let env = TestEnv::start().await;
    let outbox_path = env.dir.path().join("outbox");
    {
        let outbox = Outbox::open(&outbox_path, 8 << 20).expect("open");
        outbox.append(&backlog(N)).await.expect("append");
    }

    // Act: the relay is killed in the middle of the drain, again and again; each time the outbox
    // is opened to see what the kill left in flight (posted and not yet proven stored).
    let mut most_in_flight = 0;
    for cycle in 0..n_cycles {
        let mut child = start_relay_process(&env);
        let stored_before = env.db.chats().len();
        let target = stored_before + fastrand::usize(40..400).min(N - stored_before);
        let deadline = std::time::Instant::now() + PATIENCE;
        while env.db.chats().len() < target && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        let outbox = Outbox::open(&outbox_path, 8 << 20).expect("open after the kill");
        let in_flight = outbox
            .oldest(usize::MAX)
            .expect("read")
            .iter()
            .filter(|l| l.is_in_flight())
            .count();
        most_in_flight = most_in_flight.max(in_flight);
        eprintln!("cycle {cycle}: {in_flight} lines in flight at the kill");
        if outbox.is_empty() {
            break;
        }
    }
    let last = start_relay_process(&env);
    let deadline = std::time::Instant::now() + PATIENCE;
    while env.db.chats().len() < N && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A moment for a duplicate to arrive, had one been sent.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sigterm(last);

    // Assert: each line at the CMS once, none dead; a kill found batches awaiting their proof
    // (more in flight than one batch of 20).
    let mut seen = HashSet::new();
    for row in env.db.chats() {
        assert!(
            seen.insert(row.message.clone()),
            "{} stored twice",
            row.message
        );
    }
    let numbers: HashSet<String> = seen
        .iter()
        .filter_map(|m| m.rsplit_once("backlog ").map(|(_, i)| i.to_owned()))
        .collect();
    let missing: Vec<usize> = (0..N)
        .filter(|i| !numbers.contains(&i.to_string()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} lines never stored: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let outbox = Outbox::open(&outbox_path, 8 << 20).expect("open at the end");
    assert!(outbox.is_empty(), "{} lines left", outbox.len());
    assert_eq!(outbox.dead_len(), 0);
    assert!(
        most_in_flight > 20,
        "no kill met batches awaiting their proof ({most_in_flight} in flight at most)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_batches_are_marked_ahead_stores_the_same_words_once_a_line() {
    // Arrange: lines of the same words in the same second (2 000, or 300 a kill for more kills).
    // Every row of ours matches every line, so a batch marked ahead (issue 21 item 7) that was
    // read back against the rows of a batch already removed would lose lines, and one sent again
    // would duplicate them: only the count tells, and it must be exact.
    let n_cycles = cycles("RELAY_CRASH_CYCLES", 6);
    let n_lines = (n_cycles * 300).max(2_000);
    let env = TestEnv::start().await;
    let outbox_path = env.dir.path().join("outbox");
    {
        let outbox = Outbox::open(&outbox_path, 8 << 20).expect("open");
        outbox
            .append(&backlog_of(n_lines, |_| "the same words".into()))
            .await
            .expect("append");
    }
    let stored = || {
        env.db
            .chats()
            .iter()
            .filter(|row| row.message.ends_with("the same words"))
            .count()
    };

    // Act: kills at random moments of the drain, each time with batches posted, marked ahead,
    // awaiting their proof or being settled.
    let mut n_kills = 0;
    for _ in 0..n_cycles {
        let mut child = start_relay_process(&env);
        let target = stored() + fastrand::usize(40..400);
        let deadline = std::time::Instant::now() + PATIENCE;
        while stored() < target.min(n_lines) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..30))).await;
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        n_kills += 1;
        if Outbox::open(&outbox_path, 8 << 20)
            .expect("open")
            .is_empty()
        {
            break;
        }
    }
    let last = start_relay_process(&env);
    let deadline = std::time::Instant::now() + PATIENCE;
    while stored() < n_lines && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A moment for a duplicate to arrive, had one been sent.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sigterm(last);

    // Assert: as many rows as lines, none dead, nothing left.
    let outbox = Outbox::open(&outbox_path, 8 << 20).expect("open at the end");
    let left = outbox.oldest(usize::MAX).expect("read");
    eprintln!(
        "same words: {n_lines} lines, {n_kills} SIGKILLs, {} rows",
        stored()
    );
    assert_eq!(
        stored(),
        n_lines,
        "rows of the same words; {} lines left ({} in flight), {} dead",
        left.len(),
        left.iter().filter(|l| l.is_in_flight()).count(),
        outbox.dead_len()
    );
    assert!(outbox.is_empty(), "{} lines left", outbox.len());
    assert_eq!(outbox.dead_len(), 0);
}
