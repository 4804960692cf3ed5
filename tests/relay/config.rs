//! Start-up refuses a bad configuration with one line naming the key.

use std::process::Command;

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
