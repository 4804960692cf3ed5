//! `[viewer.login]`: the viewer's own login, so that the relay can log it out and in again through
//! its REST calls after a region restart (spec §10). Optional: without it the relay only says what
//! to do by hand. The password is read from `password_file` (like `cms.password_file`), never held
//! in the configuration or printed. Must not open sockets; reads only `password_file`.

use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::fields::{empty_path_is_none, none_is_empty};

/// `[viewer.login]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ViewerLoginSettings {
    /// The avatar's first name (`LOGINFIRST`).
    pub first: String,
    /// The avatar's last name (`LOGINLAST`).
    pub last: String,
    /// A file holding the avatar's password (`LOGINPASS`), required.
    #[serde(
        deserialize_with = "empty_path_is_none",
        serialize_with = "none_is_empty"
    )]
    pub password_file: Option<PathBuf>,
    /// The grid name as the viewer knows it (`LOGINGRID`, one of its `possiblegrids`).
    pub grid: String,
    /// The region to log in to (`LOGINSIM`); also the region the viewer must be in.
    pub region: String,
    /// Where in the region the avatar starts, `X/Y/Z` in metres (e.g. `128/128/25`); also the
    /// viewer's own position for the hearing picture when its status shows none.
    pub start_position: String,
}

impl ViewerLoginSettings {
    /// Checks the names and the position; the viewer does not URL-decode form values, so `&`,
    /// `=` and line breaks cannot be sent in them.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| ConfigError::Invalid {
            key,
            reason: reason.to_owned(),
        };
        for (key, value) in [
            ("viewer.login.first", &self.first),
            ("viewer.login.last", &self.last),
            ("viewer.login.grid", &self.grid),
            ("viewer.login.region", &self.region),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(key, "is required in [viewer.login]"));
            }
            if !form_safe(value) {
                return Err(invalid(
                    key,
                    "must not hold '&', '=' or a line break (the viewer's login form does not decode them)",
                ));
            }
        }
        if self.password_file.is_none() {
            return Err(invalid(
                "viewer.login.password_file",
                "is required in [viewer.login] (a file holding the avatar's password)",
            ));
        }
        if self.start_position().is_none() {
            return Err(invalid(
                "viewer.login.start_position",
                "must be X/Y/Z in metres, e.g. 128/128/25",
            ));
        }
        Ok(())
    }

    /// `start_position` as X, Y, Z (checked at load).
    pub fn start_position(&self) -> Option<[f64; 3]> {
        let mut parts = self.start_position.split('/').map(|part| {
            part.trim()
                .parse::<f64>()
                .ok()
                .filter(|value| value.is_finite() && *value >= 0.0)
        });
        let position = [parts.next()??, parts.next()??, parts.next()??];
        parts.next().is_none().then_some(position)
    }

    /// The password from `password_file`, surrounding whitespace trimmed.
    pub fn load_password(&self) -> Result<SecretString, ConfigError> {
        let key = "viewer.login.password_file";
        let Some(path) = &self.password_file else {
            return Err(ConfigError::Invalid {
                key,
                reason: "is required in [viewer.login]".to_owned(),
            });
        };
        match std::fs::read_to_string(path) {
            Ok(text) if text.trim().is_empty() => Err(ConfigError::Invalid {
                key,
                reason: format!("{} is empty", path.display()),
            }),
            Ok(text) if !form_safe(text.trim()) => Err(ConfigError::Invalid {
                key,
                reason: format!(
                    "the password in {} holds '&', '=' or a line break, which the viewer's login form cannot carry",
                    path.display()
                ),
            }),
            Ok(text) => Ok(SecretString::from(text.trim().to_owned())),
            Err(err) => Err(ConfigError::Invalid {
                key,
                reason: format!("cannot read {}: {err}", path.display()),
            }),
        }
    }

    /// The login form (`LOGINFIRST`…`LOGINSIM`), the start as libomv's start URI
    /// `uri:Region&X&Y&Z`. Holds the password: never log it.
    pub fn form(&self, password: &SecretString) -> Vec<(&'static str, String)> {
        let [x, y, z] = self.start_position().unwrap_or([128.0, 128.0, 25.0]);
        vec![
            ("LOGINFIRST", self.first.trim().to_owned()),
            ("LOGINLAST", self.last.trim().to_owned()),
            ("LOGINPASS", password.expose_secret().to_owned()),
            ("LOGINGRID", self.grid.trim().to_owned()),
            (
                "LOGINSIM",
                format!("uri:{}&{x}&{y}&{z}", self.region.trim()),
            ),
        ]
    }
}

fn form_safe(value: &str) -> bool {
    !value.contains(['&', '=', '\n', '\r'])
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use crate::config::{ConfigError, Settings};

    /// Loads `login` as the `[viewer.login]` section of a file, its password file holding
    /// `password`.
    fn load(login: &str, password: &str) -> (Result<Settings, ConfigError>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let password_file = dir.path().join("viewer-password");
        std::fs::write(&password_file, password).expect("write");
        let file = dir.path().join("relay.toml");
        let toml = format!(
            "[viewer.login]\npassword_file = \"{}\"\n{login}",
            password_file.display()
        );
        std::fs::write(&file, toml).expect("write");
        let credentials = [("cms.username", "relay"), ("cms.password", "pw")];
        (Settings::load(Some(&file), &credentials), dir)
    }

    const GOOD: &str = "first = \"Relay\"\nlast = \"Bot\"\ngrid = \"OSGrid\"\nregion = \"Welcome\"\nstart_position = \"128/128.5/25\"\n";

    #[test]
    fn a_login_section_gives_the_form_the_region_and_the_position() {
        let (settings, _dir) = load(GOOD, " s3cret\n");
        let settings = settings.expect("loads");
        let login = settings.viewer.login.as_ref().expect("a login");
        assert_eq!(login.start_position(), Some([128.0, 128.5, 25.0]));
        assert_eq!(settings.viewer.expected_region(), Some("Welcome"));
        let password = login.load_password().expect("password");
        assert_eq!(password.expose_secret(), "s3cret");
        let form = login.form(&password);
        assert_eq!(form[4], ("LOGINSIM", "uri:Welcome&128&128.5&25".to_owned()));
        let printed = settings.redacted().expect("prints");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("[viewer.login]"), "{printed}");
    }

    #[test]
    fn a_bad_login_value_names_its_key() {
        let missing_region = GOOD.replace("region = \"Welcome\"\n", "");
        let cases = [
            (
                GOOD.replace("128/128.5/25", "128,128,25"),
                "viewer.login.start_position",
            ),
            (GOOD.replace("Bot", "B&t"), "viewer.login.last"),
            (
                GOOD.replace("first = \"Relay\"", "first = \"\""),
                "viewer.login.first",
            ),
        ];
        for (toml, key) in cases {
            let (result, _dir) = load(&toml, "pw");
            let err = result.expect_err("refused").to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        let (result, _dir) = load(&missing_region, "pw");
        assert!(result.expect_err("refused").to_string().contains("region"));
        let (settings, _dir) = load(GOOD, "a&b");
        let login = settings.expect("loads").viewer.login.expect("a login");
        let err = login.load_password().expect_err("refused").to_string();
        assert!(
            err.contains("viewer.login.password_file") && !err.contains("a&b"),
            "{err}"
        );
    }
}
