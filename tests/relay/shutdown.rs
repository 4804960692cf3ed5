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
