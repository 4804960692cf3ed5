//! The operator's filters: ignored speakers and messages never reach the outbox, redactions rewrite
//! the text before it is stored, and a bad pattern stops start-up.

use std::process::Command;

use opensim_chat_relay::filter::FilterReason;

use crate::helpers::{PATIENCE, TestEnv, eventually};

/// Ignores a bot and out-of-character lines, and redacts e-mail addresses and phone numbers.
const FILTERS: &str = r#"
[filter]
ignore_speakers = ["greeter bot"]
ignore_messages = ['^\(\(.*\)\)$']
redact = [
  { pattern = '[\w.+-]+@[\w-]+(\.[\w-]+)+', replacement = "[e-mail]" },
  { pattern = '\+?\d[\d ()/-]{7,}\d', replacement = "[phone]" },
]
"#;

#[tokio::test]
async fn ignored_speakers_and_messages_are_not_stored_and_redactions_are_applied_first() {
    // Arrange
    let env = TestEnv::start().await;
    let relay = env.start_relay(FILTERS, &[]).await;

    // Act
    env.lg.say("Greeter Bot", "Welcome to the region!");
    env.lg.say("Alice Resident", "((brb, dinner))");
    env.lg.say(
        "Alice Resident",
        "mail alice.r@example.org or call +31 (0)20 123 4567",
    );
    env.lg.say("Bob Builder", "nothing to hide ((really))");
    eventually(PATIENCE, "two lines relayed", || async {
        env.relayed_rows().len() == 2
    })
    .await;
    env.viewer_drained(PATIENCE).await;
    let stats = relay.stats.clone();
    relay.stop().await;

    // Assert: the outbox, and so the CMS, never saw the originals.
    assert_eq!(
        env.stored_messages(),
        [
            "[Alice Resident] mail [e-mail] or call [phone]",
            "[Bob Builder] nothing to hide ((really))"
        ]
    );
    assert_eq!(stats.n_filtered(FilterReason::IgnoredSpeaker), 1);
    assert_eq!(stats.n_filtered(FilterReason::IgnoredMessage), 1);
}

#[test]
fn a_bad_pattern_stops_start_up_naming_the_key_and_the_error() {
    for (filter, key, error) in [
        (
            "ignore_messages = ['ok', '((unclosed']",
            "filter.ignore_messages",
            "unclosed group",
        ),
        (
            "redact = [{ pattern = '[a-', replacement = 'x' }]",
            "filter.redact",
            "unclosed character class",
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("relay.toml");
        std::fs::write(
            &file,
            format!("[cms]\nusername = \"relay\"\npassword = \"pw\"\n[filter]\n{filter}\n"),
        )
        .expect("write");
        let output = Command::new(env!("CARGO_BIN_EXE_opensim-chat-relay"))
            .args(["run", "--config"])
            .arg(&file)
            .env_remove("RELAY_CONFIG")
            .output()
            .expect("binary runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(78), "{stderr}");
        assert!(stderr.contains(key) && stderr.contains(error), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
}
