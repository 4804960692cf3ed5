//! Crash safety: the relay binary is killed with SIGKILL at random moments while avatars chat, and
//! restarted on the same outbox. At the end an oracle checks that every line the viewer handed out in
//! a completed response reached the CMS exactly once, in per-speaker order. The only loss allowed is a
//! response read from the viewer but not yet flushed when the kill landed; it is counted separately.
//!
//! `RELAY_CRASH_CYCLES` sets the number of kills (default 20). The long run of docs/RELIABILITY.md:
//! `RELAY_CRASH_CYCLES=200 cargo test --release --test relay crash -- --nocapture`.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::helpers::{PATIENCE, TestEnv, eventually, sigterm};

const SPEAKERS: [&str; 3] = ["Alice Resident", "Bob Builder", "Carol Visitor"];

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

/// "<speaker>:<n>" said by `speaker` as its n-th line.
fn parse(text: &str) -> Option<(&str, u64)> {
    let (speaker, n) = text.rsplit_once(':')?;
    Some((speaker, n.parse().ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_duplicates_nothing_persisted() {
    let n_cycles: usize = std::env::var("RELAY_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let env = TestEnv::start().await;

    // Avatars chat continuously, one line every 3 ms in turn.
    let chatting = Arc::new(AtomicBool::new(true));
    let chatter = {
        let (lg, chatting) = (env.lg.clone(), chatting.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while chatting.load(Ordering::Relaxed) {
                let speaker = SPEAKERS[(n % 3) as usize];
                lg.say(speaker, &format!("{speaker}:{}", n / 3));
                n += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };

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
    chatting.store(false, Ordering::Relaxed);
    chatter.await.expect("chatter stops");
    let last = start_relay_process(&env);
    eventually(PATIENCE, "the viewer drained", || async {
        env.lg.queue_len() == 0
    })
    .await;
    let handed = env.lg.handed_out();
    let must_arrive: HashSet<String> = handed
        .iter()
        .filter(|h| !windows.contains(&h.response))
        .map(|h| h.message.clone())
        .collect();
    eventually(
        Duration::from_secs(60),
        "every line outside the kill windows stored",
        || async {
            let stored: HashSet<String> = env
                .stored()
                .into_iter()
                .map(|c| unprefixed(&c.message))
                .collect();
            must_arrive.is_subset(&stored)
        },
    )
    .await;
    sigterm(last);

    // The oracle.
    let stored: Vec<String> = env
        .stored()
        .into_iter()
        .map(|c| unprefixed(&c.message))
        .collect();
    let mut seen = HashSet::new();
    let duplicates: Vec<&String> = stored.iter().filter(|m| !seen.insert(*m)).collect();
    let mut last_seq: HashMap<&str, u64> = HashMap::new();
    let mut n_reordered = 0;
    for message in &stored {
        let (speaker, seq) = parse(message).expect("a chatter line");
        if last_seq.get(speaker).is_some_and(|prev| *prev > seq) {
            n_reordered += 1;
        }
        last_seq.insert(speaker, seq);
    }
    let handed_messages: HashSet<&String> = handed.iter().map(|h| &h.message).collect();
    let lost: Vec<&String> = handed_messages
        .iter()
        .copied()
        .filter(|m| !seen.contains(*m))
        .collect();
    let lost_outside_windows: Vec<&&String> =
        lost.iter().filter(|m| must_arrive.contains(**m)).collect();
    let phantom: Vec<&String> = stored
        .iter()
        .filter(|m| !handed_messages.contains(m))
        .collect();
    eprintln!(
        "crash run: {n_cycles} SIGKILLs, {} lines handed out, {} stored, {} lost in the read-but-not-flushed window, {} lost otherwise, {} duplicated, {} reordered, {} responses abandoned mid-write",
        handed.len(),
        stored.len(),
        lost.len() - lost_outside_windows.len(),
        lost_outside_windows.len(),
        duplicates.len(),
        n_reordered,
        env.lg.n_aborted()
    );
    assert!(duplicates.is_empty(), "duplicates: {duplicates:?}");
    assert!(
        lost_outside_windows.is_empty(),
        "lost outside the kill windows: {lost_outside_windows:?}"
    );
    assert_eq!(n_reordered, 0);
    assert!(
        phantom.is_empty(),
        "stored but never handed out: {phantom:?}"
    );
    assert!(handed.len() > 100, "the run carried real traffic");
}

/// Unmapped speakers' lines arrive as "[Name] text"; the oracle compares the text.
fn unprefixed(message: &str) -> String {
    message
        .split_once("] ")
        .map_or(message, |(_, text)| text)
        .to_owned()
}
