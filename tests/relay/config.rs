//! Start-up refuses a bad configuration with one line naming the key.

use std::path::{Path, PathBuf};
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

#[test]
fn environment_strings_stay_verbatim_and_typed_keys_still_parse() {
    let (code, stdout, stderr) = check_config_env(
        "",
        &[
            ("RELAY__CMS__USERNAME", "0123"),
            ("RELAY__CMS__PASSWORD", "007"),
            ("RELAY__OUTBOX__PATH", "1e3"),
            ("RELAY__LOG__LEVEL", "TRUE"),
            ("RELAY__CMS__GRID_ID", "2"),
            ("RELAY__CMS__BATCH_MAX_MESSAGES", "50"),
            ("RELAY__CMS__ANONYMOUS_USER_ID", "-1"),
            ("RELAY__CMS__MAX_REQUESTS_PER_SECOND", "2.5"),
            ("RELAY__CMS__ADAPTIVE_PACING", "false"),
            ("RELAY__CMS__VERIFY", "true"),
            ("RELAY__INWORLD__ENABLED", "false"),
            ("RELAY__INWORLD__CHANNEL", "-7"),
            ("RELAY__FILTER__TYPES", "Normal,Shout"),
            ("RELAY__RETRY__INITIAL", "2s"),
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    let printed: toml::Table = stdout.parse().unwrap_or_else(|e| panic!("{e}\n{stdout}"));
    let get = |section: &str, key: &str| printed[section][key].clone();
    assert_eq!(get("cms", "username").as_str(), Some("0123"), "{stdout}");
    assert_eq!(get("outbox", "path").as_str(), Some("1e3"), "{stdout}");
    assert_eq!(get("log", "level").as_str(), Some("TRUE"), "{stdout}");
    assert_eq!(get("cms", "grid_id").as_integer(), Some(2));
    assert_eq!(get("cms", "batch_max_messages").as_integer(), Some(50));
    assert_eq!(get("cms", "anonymous_user_id").as_integer(), Some(-1));
    assert_eq!(get("cms", "max_requests_per_second").as_float(), Some(2.5));
    assert_eq!(get("cms", "adaptive_pacing").as_bool(), Some(false));
    assert_eq!(get("cms", "verify").as_bool(), Some(true));
    assert_eq!(get("inworld", "enabled").as_bool(), Some(false));
    assert_eq!(get("inworld", "channel").as_integer(), Some(-7));
    assert_eq!(get("retry", "initial").as_str(), Some("2s"));
    let types: Vec<&str> = printed["filter"]["types"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert_eq!(types, ["Normal", "Shout"]);
    assert!(!stdout.contains("007"), "the password is masked: {stdout}");
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
    let (logged_in, _) = run_until_first_login(
        &env,
        &[
            ("cms.username", "0123"),
            ("cms.password", "007"),
            ("inworld.enabled", "false"),
            ("http.listen", ""),
        ],
    )
    .await;
    assert!(logged_in, "account 0123 with password 007 never logged in");
}

/// Runs the relay binary with `overrides` as `RELAY__…` variables until the CMS saw a login (or
/// `PATIENCE` passed), stops it with SIGTERM: whether it logged in, and its log (stderr).
async fn run_until_first_login(env: &TestEnv, overrides: &[(&str, &str)]) -> (bool, String) {
    let mut relay = env.spawn_relay_process(overrides, Stdio::piped());
    let stderr = relay.stderr.take().expect("piped");
    let log = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let logged_in = tokio::time::timeout(PATIENCE, async {
        while env.db.n_logins() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok();
    assert!(sigterm(relay).success(), "clean stop");
    (logged_in, log.join().expect("log reader"))
}

/// A warning about the configuration reaches the log, which starts after the configuration loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warning_about_the_configuration_is_in_the_log() {
    let env = TestEnv::start().await;
    let (logged_in, log) = run_until_first_login(
        &env,
        &[
            ("cms.anonymous_user_id", "0"),
            ("inworld.enabled", "false"),
            ("http.listen", ""),
        ],
    )
    .await;
    assert!(logged_in, "the relay runs");
    let warning = log
        .lines()
        .find(|l| l.contains("cms.anonymous_user_id"))
        .unwrap_or_else(|| panic!("no warning in the log:\n{log}"));
    assert!(warning.contains("WARN"), "{warning}");
}

/// What `check-config` prints is a configuration: pasted into a file, with the masked password put
/// back, it loads to the same effective configuration.
#[test]
fn the_printed_configuration_loads_again_to_the_same_configuration() {
    let file = "[viewer]\npoll_interval = \"750ms\"\ntimezone = \"America/New_York\"\n\
                [cms]\nusername = \"relay\"\nanonymous_format = \"<{name}> {message}\"\n\
                [mapping.users]\n\"Alice Resident\" = 3\n\"Bob O'Hara\" = 4\n\
                [http]\nlisten = \"\"\n";
    let envs = [
        ("RELAY__CMS__PASSWORD", "pa\"ss=007 #x"),
        ("RELAY__CMS__GRID_ID", "3"),
        ("RELAY__VIEWER__STATUS_URL", ""),
        ("RELAY__FILTER__TYPES", "Shout"),
        ("RELAY__OUTBOX__MAX_AGE", "36h"),
    ];
    let (code, first, stderr) = check_config_env(file, &envs);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(first.contains("password = \"********\""), "{first}");
    let pasted = first.replace("\"********\"", r#""pa\"ss=007 #x""#);
    let (code, second, stderr) = check_config_env(&pasted, &[]);
    assert_eq!(code, Some(0), "{stderr}\n{pasted}");
    assert_eq!(first, second);
    let printed: toml::Table = second.parse().expect("TOML");
    assert_eq!(
        printed["mapping"]["users"]["Bob O'Hara"].as_integer(),
        Some(4)
    );
    assert_eq!(printed["viewer"]["status_url"].as_str(), Some(""));
    assert_eq!(printed["http"]["listen"].as_str(), Some(""));
}

#[test]
fn an_unreadable_password_file_fails_check_config_as_it_fails_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-such-secret");
    let file = format!(
        "[cms]\nusername = \"relay\"\npassword_file = {:?}\n",
        missing.display()
    );
    let (code, stdout, stderr) = check_config_env(&file, &[]);
    assert_eq!(code, Some(78), "{stdout}");
    assert!(stderr.contains("cms.password_file"), "{stderr}");
    std::fs::write(&missing, "from-a-file\n").expect("write");
    let (code, stdout, stderr) = check_config_env(&file, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stdout.contains("from-a-file"), "{stdout}");
}

#[test]
fn a_missing_or_bad_ca_file_names_its_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let not_pem = dir.path().join("not-pem.txt");
    std::fs::write(&not_pem, "hello\n").expect("write");
    let bad_der = dir.path().join("bad-der.pem");
    std::fs::write(
        &bad_der,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    for path in [dir.path().join("missing.pem"), not_pem, bad_der] {
        let (code, stdout, stderr) =
            check_config_env(&format!("{GOOD}ca_file = {:?}\n", path.display()), &[]);
        assert_eq!(code, Some(78), "{}: {stdout}", path.display());
        assert!(stderr.contains("cms.ca_file"), "{stderr}");
    }
}

/// A password as an operator pastes it, with a `"` and a `\`: written as is, the file is not TOML.
pub(crate) const PASTED_PASSWORD: &str = r#"S3cret"Pa\55word"#;

/// What of `PASTED_PASSWORD` must never be printed: each part an error could quote.
pub(crate) fn shows_the_pasted_password(text: &str) -> bool {
    ["S3cret", r"Pa\55", "55word"]
        .iter()
        .any(|part| text.contains(part))
}

/// A config file whose third line holds `PASTED_PASSWORD` unescaped.
pub(crate) fn pasted_password_file(dir: &Path) -> PathBuf {
    let file = dir.join("relay.toml");
    std::fs::write(
        &file,
        format!("[cms]\nusername = \"relay\"\npassword = \"{PASTED_PASSWORD}\"\n"),
    )
    .expect("write");
    file
}

#[test]
fn a_syntax_error_on_the_password_line_names_file_line_and_key_but_never_the_password() {
    // Arrange: the file an operator writes, with the password pasted between double quotes.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = pasted_password_file(dir.path());

    for command in ["check-config", "run"] {
        // Act
        let output = Command::new(env!("CARGO_BIN_EXE_opensim-chat-relay"))
            .args([command, "--config"])
            .arg(&file)
            .env_remove("RELAY_CONFIG")
            .output()
            .expect("binary runs");

        // Assert: refused as a configuration error, with where it is and what to do, no value.
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(78), "{command}: {stderr}");
        assert!(
            !shows_the_pasted_password(&stderr) && !shows_the_pasted_password(&stdout),
            "{command} printed the password: {stderr}{stdout}"
        );
        for needle in [
            "relay.toml",
            "line 3",
            "column",
            "cms.password",
            "cms.password_file",
        ] {
            assert!(
                stderr.contains(needle),
                "{command}: no {needle:?} in {stderr}"
            );
        }
    }
}

/// The examples the Debian package installs load as an operator fills them in (the password from
/// the unit's credential, here the environment), and the regions example serves both its regions.
#[test]
fn the_packaged_example_configurations_load() {
    for (file, regions) in [
        ("deploy/deb/example.toml", &[][..]),
        (
            "deploy/deb/example-regions.toml",
            &["Welcome", "Sandbox"][..],
        ),
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let toml = std::fs::read_to_string(&path).expect("the example is in the repository");

        let (code, stdout, stderr) = check_config_env(&toml, &[("RELAY__CMS__PASSWORD", "pw")]);

        assert_eq!(code, Some(0), "{file}: {stderr}");
        for region in regions {
            assert!(
                stdout.contains(&format!("name = \"{region}\"")),
                "{file}: region {region} not in the effective configuration: {stdout}"
            );
        }
    }
}
