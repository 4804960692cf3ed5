//! Stopping never aborts a viewer GET, keeps what it read, and exits promptly.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::helpers::{PATIENCE, TestEnv, eventually, sigterm};

#[tokio::test]
async fn a_stop_during_a_slow_viewer_answer_waits_for_it_and_keeps_its_lines() {
    let env = TestEnv::start().await;
    env.db.set_offline(true); // keep the lines in the outbox, where the test can see them
    let relay = env.start_relay("", &[]).await;
    eventually(PATIENCE, "the relay polling", || async {
        env.lg.n_gets() >= 1
    })
    .await;

    // The next answer takes 1.5 s to come; the stop arrives while the relay waits for it.
    env.lg.set_response_delay(Duration::from_millis(1500));
    env.lg.say("Alice Resident", "said just before the stop");
    let n_gets = env.lg.n_gets();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outbox = relay.outbox.clone();
    relay.stop().await;

    assert_eq!(env.lg.n_aborted(), 0, "the viewer would have crashed");
    assert!(env.lg.n_gets() > n_gets, "the slow GET was answered");
    assert_eq!(outbox.len(), 1, "the line read during shutdown is stored");
}

#[tokio::test]
async fn sigterm_stops_the_binary_with_exit_code_0_within_10_seconds() {
    let env = TestEnv::start().await;
    let child = env.spawn_relay_process(&[("viewer.poll_interval", "50ms")], Stdio::null());
    env.lg.say("Alice Resident", "hello");
    eventually(PATIENCE, "the line delivered", || async {
        env.stored().len() == 1
    })
    .await;

    let started = Instant::now();
    let exit = tokio::task::spawn_blocking(move || sigterm(child))
        .await
        .expect("join");
    assert_eq!(exit.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_stop_never_cuts_a_viewer_answer_that_outlasts_the_shutdown_grace() {
    // Arrange: 400 lines wait in the viewer; its answer comes in 4 KiB pieces 100 ms apart (about
    // two seconds), four times the relay's shutdown grace.
    const N_LINES: usize = 400;
    let env = TestEnv::start().await;
    env.db.set_offline(true); // keep the lines in the outbox, where the test can see them
    let padding = "word ".repeat(20);
    for i in 0..N_LINES {
        env.lg.say("Alice Resident", &format!("line {i} {padding}"));
    }
    env.lg.set_trickle(Some((4096, Duration::from_millis(100))));
    let relay = env
        .start_relay_with("", &[], |relay| {
            relay.with_shutdown_grace(Duration::from_millis(500))
        })
        .await;
    eventually(PATIENCE, "the viewer answering the first GET", || async {
        env.lg.queue_len() == 0
    })
    .await;

    // Act: the stop arrives while the answer is arriving.
    let outbox = relay.outbox.clone();
    relay.stop().await;

    // Assert: the viewer reports the write's end (or the client gone) just after the last byte.
    eventually(PATIENCE, "the answer written or cut", || async {
        env.lg.handed_out().len() == N_LINES || env.lg.n_aborted() > 0
    })
    .await;
    assert_eq!(
        env.lg.n_aborted(),
        0,
        "the answer was cut: the real viewer would have crashed or lost its lines"
    );
    assert_eq!(outbox.len(), N_LINES, "every line of the answer stored");
}
