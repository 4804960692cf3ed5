//! Start-up refuses a bad configuration with one line naming the key.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::helpers::{PATIENCE, TestEnv, sigterm};

fn check_config(toml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, toml).expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_opensim-chat-relay"))
        .args(["check-config", "--config"])
        .arg(&file)
        .env_remove("RELAY_CONFIG")
        .output()
        .expect("binary runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

const GOOD: &str = "[cms]\nusername = \"relay\"\npassword = \"pw\"\n";

#[test]
fn a_good_configuration_passes_and_its_password_is_masked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("relay.toml");
    std::fs::write(
        &file,
        "[cms]\nusername = \"relay\"\npassword = \"very-secret-pw\"\n",
    )
    .expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_opensim-chat-relay"))
        .args(["check-config", "--config"])
        .arg(&file)
        .output()
        .expect("binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("relay") && !stdout.contains("very-secret-pw"),
        "{stdout}"
    );
}

#[test]
fn a_bad_value_names_its_key() {
    let (ok, stderr) = check_config(&format!("{GOOD}grid_id = \"abc\"\n"));
    assert!(!ok);
    assert!(stderr.contains("cms.grid_id"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn an_unknown_key_names_it() {
    let (ok, stderr) = check_config(&format!("{GOOD}[viewer]\npoll_intervall = \"1s\"\n"));
    assert!(!ok);
    assert!(
        stderr.contains("poll_intervall") && stderr.contains("viewer"),
        "{stderr}"
    );
}

#[test]
fn a_bad_duration_names_its_key() {
    let (ok, stderr) = check_config(&format!("{GOOD}[retry]\ninitial = \"soon\"\n"));
    assert!(!ok);
    assert!(stderr.contains("retry.initial"), "{stderr}");
}

#[test]
fn a_missing_password_names_its_key() {
    let (ok, stderr) = check_config("[cms]\nusername = \"relay\"\n");
    assert!(!ok);
    assert!(stderr.contains("cms.password"), "{stderr}");
}

#[test]
fn an_unknown_time_zone_names_its_key() {
    let (ok, stderr) = check_config(&format!("{GOOD}timezone = \"Mars/Olympus\"\n"));
    assert!(!ok);
    assert!(
        stderr.contains("cms.timezone") && stderr.contains("Mars/Olympus"),
        "{stderr}"
    );
}

/// `check-config` with `toml` as the file and `envs` as `RELAY__…` variables: (exit code, stdout,
/// stderr). A child process, so the variables are its own and no other test sees them.
fn check_config_env(toml: &str, envs: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, toml).expect("write");
    let mut command = Command::new(env!("CARGO_BIN_EXE_opensim-chat-relay"));
    command
        .args(["check-config", "--config"])
        .arg(&file)
        .env_remove("RELAY_CONFIG");
    for (key, value) in envs {
        command.env(key, value);
    }
    let output = command.output().expect("binary runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_fractional_grid_id_is_an_error_naming_the_key_not_rounded() {
    for (toml, envs) in [
        (format!("{GOOD}grid_id = 1.5\n"), vec![]),
        (GOOD.to_owned(), vec![("RELAY__CMS__GRID_ID", "1.5")]),
        (GOOD.to_owned(), vec![("RELAY__CMS__GRID_ID", "true")]),
        (
            GOOD.to_owned(),
            vec![("RELAY__CMS__BATCH_MAX_MESSAGES", "1e2")],
        ),
    ] {
        let (code, stdout, stderr) = check_config_env(&toml, &envs);
        assert_eq!(code, Some(78), "{envs:?} {toml}: {stdout}");
        let key = if envs.iter().any(|(k, _)| k.contains("BATCH")) {
            "cms.batch_max_messages"
        } else {
            "cms.grid_id"
        };
        assert!(stderr.contains(key), "{envs:?}: {stderr}");
    }
}

/// The password and the username reach the CMS exactly as the environment gave them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_numeric_looking_password_from_the_environment_logs_in() {
    let env = TestEnv::start().await;
    env.db.add_user(
        "0123",
        "007",
        "Zero",
        "Account",
        opensim_chat_relay::sim::cms::Permissions::relay(),
    );
    let relay = env.spawn_relay_process(
        &[
            ("cms.username", "0123"),
            ("cms.password", "007"),
            ("inworld.enabled", "false"),
            ("http.listen", ""),
        ],
        Stdio::null(),
    );
    let logged_in = tokio::time::timeout(PATIENCE, async {
        while env.db.n_logins() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(sigterm(relay).success(), "clean stop");
    assert!(
        logged_in.is_ok(),
        "account 0123 with password 007 never logged in"
    );
}

/// A warning about the configuration reaches the log, which starts after the configuration loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warning_about_the_configuration_is_in_the_log() {
    let env = TestEnv::start().await;
    let relay = env.spawn_relay_process(
        &[
            ("cms.anonymous_user_id", "0"),
            ("inworld.enabled", "false"),
            ("http.listen", ""),
        ],
        Stdio::piped(),
    );
    let logged_in = tokio::time::timeout(PATIENCE, async {
        while env.db.n_logins() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut relay = relay;
    let stderr = relay.stderr.take().expect("piped");
    assert!(sigterm(relay).success(), "clean stop");
    assert!(logged_in.is_ok(), "the relay runs");
    let log = std::io::read_to_string(stderr).expect("log read");
    let warning = log
        .lines()
        .find(|l| l.contains("cms.anonymous_user_id"))
        .unwrap_or_else(|| panic!("no warning in the log:\n{log}"));
    assert!(warning.contains("WARN"), "{warning}");
}
