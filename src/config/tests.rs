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

const TWO_REGIONS: &str = r#"
[viewer]
timezone = "Europe/Amsterdam"
hearing_range = 30.0

[[regions]]
name = "Welcome"
chat_url = "http://127.0.0.1:9144/api/chat"
status_url = "http://127.0.0.1:9144/api/LLLP/status"
avatars_url = "http://127.0.0.1:9144/api/avatars"

[[regions]]
name = "Sandbox"
chat_url = "http://127.0.0.1:9145/api/chat"
status_url = "http://127.0.0.1:9145/api/LLLP/status"
avatars_url = ""
hearing_range = 96.0
region = "Sandbox Annex"
"#;

#[test]
fn without_regions_the_only_region_is_the_viewer_and_its_region_names_it_in_text() {
    let settings = Settings::load(None, &CREDENTIALS).expect("defaults load");
    let regions = settings.regions();
    assert_eq!(regions.len(), 1);
    assert_eq!(regions[0].name, "");
    assert_eq!(regions[0].label, "the region");
    assert_eq!(regions[0].viewer.chat_url, settings.viewer.chat_url);
    let mut named = CREDENTIALS.to_vec();
    named.push(("viewer.region", "Welcome"));
    let settings = Settings::load(None, &named).expect("loads");
    // Still the only region (today's keys, no label), but its text names it.
    assert_eq!(settings.regions()[0].name, "");
    assert_eq!(settings.regions()[0].label, "Welcome");
}

#[test]
fn each_region_takes_its_keys_over_the_viewer_section() {
    let settings = load_toml(TWO_REGIONS).expect("loads");
    let regions = settings.regions();
    assert_eq!(regions.len(), 2);
    let (welcome, sandbox) = (&regions[0], &regions[1]);
    assert_eq!(welcome.name, "Welcome");
    assert_eq!(welcome.viewer.chat_url, "http://127.0.0.1:9144/api/chat");
    assert_eq!(welcome.viewer.expected_region(), Some("Welcome"));
    assert_eq!(welcome.viewer.hearing_range, 30.0);
    assert_eq!(welcome.viewer.timezone.to_string(), "Europe/Amsterdam");
    assert_eq!(welcome.viewer.poll_interval, Duration::from_millis(500));
    assert_eq!(sandbox.viewer.chat_url, "http://127.0.0.1:9145/api/chat");
    assert_eq!(sandbox.viewer.avatars_url, None);
    assert_eq!(sandbox.viewer.hearing_range, 96.0);
    assert_eq!(sandbox.viewer.expected_region(), Some("Sandbox Annex"));
    // The printed configuration loads again to the same regions.
    let printed = settings.redacted().expect("prints");
    let again = load_toml(&printed).expect("the printed configuration loads");
    assert_eq!(again.regions().len(), 2);
    assert_eq!(again.regions()[1].viewer.hearing_range, 96.0);
}

#[test]
fn environment_defaults_reach_every_region() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, TWO_REGIONS).expect("write");
    let mut overrides = CREDENTIALS.to_vec();
    overrides.push(("viewer.poll_interval", "2s"));
    let settings = Settings::load(Some(&file), &overrides).expect("loads");
    assert!(
        settings
            .regions()
            .iter()
            .all(|region| region.viewer.poll_interval == Duration::from_secs(2))
    );
}

#[test]
fn a_bad_region_entry_names_its_index_and_key() {
    for (entry, key) in [
        (
            "chat_url = \"http://127.0.0.1:1/api/chat\"\n",
            "regions[1].name",
        ),
        ("name = \"\"\n", "regions[1].name"),
        ("name = \"welcome\"\n", "regions[1].name"),
        ("name = 3\n", "regions[1].name"),
        (
            "name = \"B\"\nchat_url = \"http://127.0.0.1:2/api/chat\"\nchat_ur = \"http://x/\"\n",
            "regions[1].chat_ur",
        ),
        (
            "name = \"B\"\nchat_url = \"ftp://x/\"\n",
            "regions[1].chat_url",
        ),
        (
            "name = \"B\"\nchat_url = \"http://127.0.0.1:2/api/chat\"\nhearing_range = \"far\"\n",
            "regions[1].hearing_range",
        ),
        (
            "name = \"B\"\nchat_url = \"http://127.0.0.1:2/api/chat\"\nhearing_range = -1.0\n",
            "regions[1].hearing_range",
        ),
        (
            "name = \"B\"\nchat_url = \"http://127.0.0.1:2/api/chat\"\nrequest_timeout = \"5s\"\n",
            "regions[1].request_timeout",
        ),
        // The same viewer for two regions: each GET would take the other's lines.
        ("name = \"B\"\n", "regions[1].chat_url"),
        (
            "name = \"B\"\nchat_url = \"http://127.0.0.1:2/api/chat\"\n[regions.login]\nfirst = \"Relay\"\n",
            "regions[1].login",
        ),
    ] {
        let toml = format!(
            "[[regions]]\nname = \"Welcome\"\nchat_url = \"http://127.0.0.1:9144/api/chat\"\n[[regions]]\n{entry}"
        );
        let err = load_toml(&toml).unwrap_err().to_string();
        assert!(err.contains(key), "{entry}: {err}");
    }
}

#[test]
fn a_region_login_is_its_own_and_never_inherited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let password = dir.path().join("viewer-password");
    std::fs::write(&password, "pw").expect("write");
    let login = |region: &str| {
        format!(
            "first = \"Relay\"\nlast = \"Bot\"\npassword_file = {password:?}\ngrid = \"OSGrid\"\nregion = \"{region}\"\nstart_position = \"128/128/25\"\n"
        )
    };
    let toml = format!(
        "[viewer.login]\n{}\n[[regions]]\nname = \"Welcome\"\n[regions.login]\n{}\n[[regions]]\nname = \"Sandbox\"\nchat_url = \"http://127.0.0.1:9145/api/chat\"\n",
        login("Welcome"),
        login("Welcome")
    );
    let settings = load_toml(&toml).expect("loads");
    assert_eq!(
        settings.regions()[0]
            .viewer
            .login
            .as_ref()
            .map(|login| login.first.as_str()),
        Some("Relay")
    );
    assert!(settings.regions()[1].viewer.login.is_none());
}
