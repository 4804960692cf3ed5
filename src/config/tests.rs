//! The loading, typing and printing of the configuration, from the text an operator writes.

use std::time::Duration;

use secrecy::ExposeSecret;

use super::*;

const CREDENTIALS: [(&str, &str); 2] = [("cms.username", "relay"), ("cms.password", "pw")];

#[test]
fn the_defaults_with_credentials_load() {
    let settings = Settings::load(None, &CREDENTIALS).expect("defaults load");
    assert_eq!(settings.viewer.poll_interval, Duration::from_millis(500));
    assert_eq!(settings.cms.anonymous_user_id, -1);
    assert_eq!(
        settings.viewer.avatars_url.as_deref(),
        Some("http://127.0.0.1:9144/api/avatars")
    );
}

#[test]
fn the_http_endpoint_is_on_loopback_by_default_and_empty_turns_it_off() {
    let settings = Settings::load(None, &CREDENTIALS).expect("defaults load");
    assert_eq!(
        settings.http.listen,
        Some("127.0.0.1:9188".parse().expect("address"))
    );
    let mut off = CREDENTIALS.to_vec();
    off.push(("http.listen", ""));
    assert_eq!(Settings::load(None, &off).expect("load").http.listen, None);
    let mut bad = CREDENTIALS.to_vec();
    bad.push(("http.listen", "localhost:9188"));
    let err = Settings::load(None, &bad).unwrap_err().to_string();
    assert!(err.contains("127.0.0.1:9188"), "{err}");
}

#[test]
fn a_missing_username_names_the_key() {
    let err = Settings::load(None, &[]).unwrap_err().to_string();
    assert!(err.contains("cms.username"), "{err}");
}

#[test]
fn the_password_never_appears_in_the_redacted_view() {
    let settings = Settings::load(
        None,
        &[
            ("cms.username", "relay"),
            ("cms.password", "hunter2-secret"),
        ],
    )
    .expect("load");
    let text = settings.redacted().expect("prints");
    assert!(!text.contains("hunter2-secret"), "{text}");
    assert!(text.contains("username = \"relay\""), "{text}");
    assert!(text.contains("password = \"********\""), "{text}");
}

fn load_toml(toml: &str) -> Result<Settings, ConfigError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, toml).expect("write");
    Settings::load(Some(&file), &CREDENTIALS)
}

#[test]
fn typed_keys_in_a_file_take_only_their_own_type() {
    for (toml, key) in [
        ("[cms]\ngrid_id = 1.5\n", "cms.grid_id"),
        (
            "[cms]\nbatch_max_messages = true\n",
            "cms.batch_max_messages",
        ),
        ("[inworld]\nenabled = 1\n", "inworld.enabled"),
        (
            "[cms]\nadaptive_pacing = \"often\"\n",
            "cms.adaptive_pacing",
        ),
        ("[inworld]\nchannel = 99999999999\n", "inworld.channel"),
        (
            "[mapping.users]\n\"Alice Resident\" = 3.5\n",
            "mapping.users",
        ),
        ("[filter]\ntypes = [1]\n", "filter.types"),
    ] {
        let err = load_toml(toml).unwrap_err().to_string();
        assert!(err.contains(key), "{toml}: {err}");
    }
    let settings =
        load_toml("[cms]\nmax_requests_per_second = 3\n[mapping.users]\n\"Alice Resident\" = 3\n")
            .expect("loads");
    assert_eq!(settings.cms.max_requests_per_second, 3.0);
    assert_eq!(settings.mapping.users["Alice Resident"], 3);
}

#[test]
fn typed_keys_parse_their_text_and_strings_keep_theirs() {
    let mut overrides = vec![
        ("cms.username", "0123"),
        ("cms.password", "007"),
        ("cms.grid_id", "2"),
        ("inworld.enabled", "off"),
        ("filter.types", "Normal, Shout"),
        ("cms.max_requests_per_second", "2.5"),
        ("cms.adaptive_pacing", "false"),
    ];
    let settings = Settings::load(None, &overrides).expect("loads");
    assert_eq!(settings.cms.username, "0123");
    assert_eq!(settings.cms.password.expose_secret(), "007");
    assert_eq!(settings.cms.grid_id, 2);
    assert!(!settings.inworld.enabled);
    assert_eq!(settings.filter.types, ["Normal", "Shout"]);
    assert_eq!(settings.cms.max_requests_per_second, 2.5);
    assert!(!settings.cms.adaptive_pacing);
    overrides.push(("cms.grid_id", "-1"));
    let err = Settings::load(None, &overrides).unwrap_err().to_string();
    assert!(err.contains("cms.grid_id"), "{err}");
}

#[test]
fn anonymous_id_zero_is_a_warning_not_an_error() {
    let mut overrides = CREDENTIALS.to_vec();
    assert!(
        Settings::load(None, &overrides)
            .expect("loads")
            .warnings()
            .is_empty()
    );
    overrides.push(("cms.anonymous_user_id", "0"));
    let warnings = Settings::load(None, &overrides).expect("loads").warnings();
    assert!(
        warnings[0].contains("cms.anonymous_user_id"),
        "{warnings:?}"
    );
}
