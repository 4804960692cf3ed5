//! `opensim-chat-relay outbox …` on a stopped relay's outbox, and its refusal while one runs.

use std::path::Path;
use std::process::Command;

use crate::helpers::{GHOST, PATIENCE, TestEnv, eventually};

/// Runs `opensim-chat-relay outbox <args>` on the test outbox; (success, stdout, stderr).
pub fn outbox_cli(env: &TestEnv, args: &[&str]) -> (bool, String, String) {
    let (code, stdout, stderr) = outbox_cli_code(env, args);
    (code == Some(0), stdout, stderr)
}

/// Like `outbox_cli`, with the exit code.
fn outbox_cli_code(env: &TestEnv, args: &[&str]) -> (Option<i32>, String, String) {
    let file = env.dir.path().join("admin.toml");
    let outbox = env.dir.path().join("outbox");
    write_config(&file, &outbox);
    let output = Command::new(env!("CARGO_BIN_EXE_opensim-chat-relay"))
        .args(["outbox", "--config"])
        .arg(&file)
        .args(args)
        .output()
        .expect("binary runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn write_config(file: &Path, outbox: &Path) {
    let text = format!(
        "[cms]\nusername = \"relay\"\npassword = \"pw\"\n[outbox]\npath = \"{}\"\n",
        outbox.display()
    );
    std::fs::write(file, text).expect("write config");
}

#[tokio::test]
async fn dead_letters_can_be_listed_requeued_and_delivered() {
    // Arrange: one line dead-lettered (its user id does not exist in the CMS), relay stopped.
    let env = TestEnv::start().await;
    env.lg.say(GHOST, "lost soul");
    let relay = env.start_relay_with_a_ghost(&[]).await;
    relay.dead_letters_reach(1).await;

    // While the relay runs, the outbox is refused with a clear message.
    let (ok, _, stderr) = outbox_cli(&env, &["stats"]);
    assert!(!ok);
    assert!(stderr.contains("in use by another process"), "{stderr}");
    relay.stop().await;

    // Act and assert: stats, dead, requeue.
    let (ok, stdout, stderr) = outbox_cli(&env, &["stats"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("pending      0 lines") && stdout.contains("dead         1 lines"),
        "{stdout}"
    );
    let (ok, stdout, _) = outbox_cli(&env, &["dead"]);
    assert!(
        ok && stdout.contains("Ghost Avatar: lost soul") && stdout.contains("could not store"),
        "{stdout}"
    );
    let (ok, stdout, _) = outbox_cli(&env, &["requeue", "--all"]);
    assert!(ok && stdout.contains("requeued 1"), "{stdout}");
    let (_, stdout, _) = outbox_cli(&env, &["list"]);
    assert!(stdout.contains("Ghost Avatar: lost soul"), "{stdout}");

    // The mapping fixed, the requeued line goes out at the next start.
    let relay = env.start_relay("", &[]).await;
    eventually(PATIENCE, "the requeued line delivered", || async {
        env.stored().len() == 1
    })
    .await;
    relay.stop().await;
    assert_eq!(env.stored_messages(), ["[Ghost Avatar] lost soul"]);
}

#[tokio::test]
async fn purge_deletes_the_dead_letters() {
    let env = TestEnv::start().await;
    env.lg.say(GHOST, "lost soul");
    let relay = env.start_relay_with_a_ghost(&[]).await;
    relay.dead_letters_reach(1).await;
    relay.stop().await;

    let (ok, stdout, _) = outbox_cli(&env, &["purge"]);
    assert!(ok && stdout.contains("purged 1 dead letters"), "{stdout}");
    let (_, stdout, _) = outbox_cli(&env, &["stats"]);
    assert!(stdout.contains("dead         0 lines"), "{stdout}");
}

#[tokio::test]
async fn an_outbox_that_cannot_be_opened_says_how_to_recover() {
    let env = TestEnv::start().await;
    // A file where the outbox directory should be.
    std::fs::write(env.dir.path().join("outbox"), b"not a database").expect("write");
    let (ok, _, stderr) = outbox_cli(&env, &["stats"]);
    assert!(!ok);
    assert!(
        stderr.contains("cannot be opened") && stderr.contains("move the directory aside"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}
