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
