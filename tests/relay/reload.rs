//! SIGHUP reloads the configuration file of a running relay process: the live keys apply to the next
//! line, other changes are named as needing a restart, and a bad file changes nothing.

use std::path::Path;
use std::process::Stdio;

use opensim_chat_relay::sim::cms::Permissions;

use crate::config::{pasted_password_file, shows_the_pasted_password};
use crate::helpers::{PATIENCE, TestEnv, eventually, send_signal, sigterm};

/// The relay's log so far.
fn log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until the relay's log holds `n` lines containing `needle`.
async fn logged(path: &Path, needle: &str, n: usize) {
    eventually(
        PATIENCE,
        &format!("{n} log lines with {needle:?}"),
        || async { log(path).lines().filter(|l| l.contains(needle)).count() >= n },
    )
    .await;
}

/// Waits until the CMS holds the row `(user, message)`.
async fn stored(env: &TestEnv, user: Option<i64>, message: &str) {
    eventually(PATIENCE, &format!("{message:?} stored"), || async {
        env.relayed_rows()
            .iter()
            .any(|(u, m)| *u == user && m == message)
    })
    .await;
}

#[tokio::test]
async fn sighup_applies_the_live_keys_names_the_others_and_keeps_the_running_ones_on_a_bad_file() {
    // Arrange: a relay process reading relay.toml, logging to a file.
    let env = TestEnv::start().await;
    let bob = env
        .db
        .add_user("bob", "pw", "Bob", "Builder", Permissions::relay());
    let config = env.dir.path().join("relay.toml");
    std::fs::write(&config, "").expect("write config");
    let log_path = env.dir.path().join("relay.log");
    let log_file = std::fs::File::create(&log_path).expect("log file");
    let relay = env.spawn_relay_process_with_config(Some(&config), &[], Stdio::from(log_file));
    env.lg.say("Alice Resident", "before the reload");
    stored(&env, None, "[Alice Resident] before the reload").await;

    // Act: a new filter, opt-out command and mapping, and a key that needs a restart.
    std::fs::write(
        &config,
        format!(
            "[filter]\nignore_speakers = [\"Alice Resident\"]\n\
             [privacy]\noptout_command = \"!private\"\n\
             [mapping.users]\n\"Bob Builder\" = {bob}\n\
             [cms]\nbatch_max_messages = 7\n"
        ),
    )
    .expect("write config");
    send_signal(relay.id(), "HUP");
    logged(&log_path, "configuration reloaded", 1).await;
    env.lg.say("Alice Resident", "ignored after the reload");
    env.lg.say("Carol Visitor", "!private");
    env.lg.say("Carol Visitor", "private after the reload");
    env.lg.say("Bob Builder", "mapped after the reload");
    stored(&env, Some(bob), "mapped after the reload").await;

    // A file that does not load: one error line, and the configuration in force stays.
    std::fs::write(&config, "[filter]\nignore_messages = ['((']\n").expect("write config");
    send_signal(relay.id(), "HUP");
    logged(&log_path, "reload (SIGHUP) failed", 1).await;
    env.lg.say("Alice Resident", "still ignored");
    env.lg.say("Bob Builder", "still mapped");
    stored(&env, Some(bob), "still mapped").await;
    let status = sigterm(relay);

    // Assert
    assert!(status.success(), "{status:?}");
    assert_eq!(
        env.relayed_rows(),
        [
            (None, "[Alice Resident] before the reload".to_owned()),
            (Some(bob), "mapped after the reload".to_owned()),
            (Some(bob), "still mapped".to_owned()),
        ]
    );
    let log = log(&log_path);
    let restart: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("only after a restart"))
        .collect();
    assert_eq!(restart.len(), 1, "{log}");
    assert!(
        restart[0].contains("cms.batch_max_messages")
            && !restart[0].contains("filter")
            && !restart[0].contains("privacy")
            && !restart[0].contains("mapping"),
        "{log}"
    );
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(
        errors[0].contains("filter.ignore_messages") && errors[0].contains("unclosed group"),
        "{log}"
    );
}

// Multi-threaded: `sigterm` blocks while the simulators must go on answering the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_a_file_whose_password_breaks_the_syntax_logs_where_not_the_password() {
    // Arrange: a relay process reading relay.toml, logging to a file.
    let env = TestEnv::start().await;
    let config = env.dir.path().join("relay.toml");
    std::fs::write(&config, "").expect("write config");
    let log_path = env.dir.path().join("relay.log");
    let log_file = std::fs::File::create(&log_path).expect("log file");
    let relay = env.spawn_relay_process_with_config(Some(&config), &[], Stdio::from(log_file));
    logged(&log_path, "logged in to the cms", 1).await;

    // Act: the operator pastes a password with a `"` and a `\` into the file, and reloads.
    pasted_password_file(env.dir.path());
    send_signal(relay.id(), "HUP");
    logged(&log_path, "reload (SIGHUP) failed", 1).await;
    let status = sigterm(relay);

    // Assert: the error line (ERROR, so the journal keeps it) says where, never the password.
    assert!(status.success(), "{status:?}");
    let log = log(&log_path);
    assert!(!shows_the_pasted_password(&log), "{log}");
    let failed = log
        .lines()
        .find(|l| l.contains("reload (SIGHUP) failed"))
        .expect("logged");
    for needle in ["ERROR", "relay.toml", "line 3", "cms.password"] {
        assert!(failed.contains(needle), "no {needle:?} in {failed}");
    }
}
