//! The `Settings` tree: layered loading, redacted printing for `check-config`, and the warnings.
//! One concern a file: `sections` (one struct per section, a `///` on every key), `cms` (`[cms]`,
//! the part of it delivery gets, and the password and CA files), `pattern` (the regular expressions
//! of `[filter]`), `validate` (the checks across keys), `snapshot` (what a reload compares, the
//! password as a digest), `syntax` (the file read and checked as TOML, its errors without
//! values), `fields` (how each value is read from its
//! text, and the password masked when printed).
//!
//! Layers, lowest first: `config/default.toml` (embedded in the binary), the file named by `--config`
//! or `RELAY_CONFIG`, then environment variables `RELAY__SECTION__KEY`. Every struct denies unknown
//! keys, so a typo stops start-up with the key's name. This module opens no sockets and no files other
//! than the config file, `cms.password_file` and `cms.ca_file`.

use std::path::Path;

use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

mod cms;
mod fields;
mod pattern;
mod regions;
mod sections;
mod snapshot;
mod syntax;
mod validate;
mod viewer_login;

pub use cms::{CmsSettings, DeliverySettings};
pub use pattern::{Pattern, Redaction};
pub use regions::Region;
pub use sections::{
    FilterSettings, HttpSettings, InworldSettings, LogFormat, LogSettings, MappingSettings,
    OutboxSettings, PrivacySettings, RetrySettings, SayType, ViewerSettings, WhenFull,
};
pub use snapshot::Snapshot;
pub use viewer_login::ViewerLoginSettings;

/// The built-in defaults, embedded so the binary runs without any file next to it.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Why the configuration could not be loaded. The message names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be read or parsed, or a value has the wrong type.
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// The configuration file cannot be read.
    #[error("configuration: cannot read {file}: {reason}")]
    File {
        /// The file as given.
        file: String,
        /// Why.
        reason: String,
    },
    /// The configuration file is not TOML. Names the place and the key, never a value.
    #[error("configuration: {file}: line {line}, column {column}{}: {reason}", key_part(key.as_deref()))]
    Syntax {
        /// The file as given.
        file: String,
        /// From 1.
        line: usize,
        /// From 1, in characters.
        column: usize,
        /// The dotted key set on that line (or the nearest above it), if any.
        key: Option<String>,
        /// What is wrong, without the line's value.
        reason: String,
    },
    /// The effective configuration cannot be printed as TOML (e.g. a path that is not UTF-8).
    #[error("configuration: cannot print it as TOML: {0}")]
    Print(String),
    /// A key of a `[[regions]]` entry is missing, of the wrong type or unusable.
    #[error("configuration: key `{key}`{}: {reason}", region_part(name))]
    Region {
        /// The entry and its key, e.g. `regions[1].chat_url` (entries counted from 0).
        key: String,
        /// The entry's `name`, when it has one.
        name: String,
        /// What is wrong with it and how to fix it.
        reason: String,
    },
    /// A value is well-typed but unusable.
    #[error("configuration: key `{key}`: {reason}")]
    Invalid {
        /// The dotted key, e.g. `cms.base_url`.
        key: &'static str,
        /// What is wrong with it and how to fix it.
        reason: String,
    },
}

fn region_part(name: &str) -> String {
    if name.is_empty() {
        String::new()
    } else {
        format!(" (region {name:?})")
    }
}

fn key_part(key: Option<&str>) -> String {
    key.map(|key| format!(" (key `{key}`)")).unwrap_or_default()
}

/// Everything the relay reads from its configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The LookingGlass viewer chat interface.
    pub viewer: ViewerSettings,
    /// The OpenSim-CMS API.
    pub cms: CmsSettings,
    /// Avatar name to CMS user mapping.
    pub mapping: MappingSettings,
    /// Which viewer lines are relayed, and what is redacted in them.
    pub filter: FilterSettings,
    /// Opting out in-world, and the notice that chat is recorded.
    pub privacy: PrivacySettings,
    /// CMS → in-world.
    pub inworld: InworldSettings,
    /// The durable outbox.
    pub outbox: OutboxSettings,
    /// Retry schedule for CMS deliveries.
    pub retry: RetrySettings,
    /// Logging.
    pub log: LogSettings,
    /// The health, readiness and metrics endpoint.
    pub http: HttpSettings,
    /// `[[regions]]` as written: each a `name` and keys of `[viewer]` (see `regions()`).
    pub regions: Vec<toml::Table>,
    /// `regions` over `[viewer]`, resolved when loaded.
    #[serde(skip)]
    resolved: Vec<Region>,
}

impl Settings {
    /// Loads the layers: defaults, then `file` (if any), then `RELAY__…` environment variables, then
    /// `overrides` (dotted key, value; used by the demo and the tests), and validates the result.
    pub fn load(file: Option<&Path>, overrides: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(file) = file {
            // Read and checked here, so that a syntax error names its place and key rather than
            // quoting a line that may hold the password.
            let text = syntax::read_file(file)?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("RELAY")
                .prefix_separator("__")
                .separator("__")
                // Every value stays the string it was: `007` is a password, not 7. The typed keys
                // parse their strings themselves (`integer`, `float`, `boolean`, `string_list`).
                .try_parsing(false),
        );
        for (key, value) in overrides {
            builder = builder.set_override(*key, *value)?;
        }
        let mut settings: Settings = builder.build()?.try_deserialize()?;
        settings.resolved = regions::resolve(&settings.viewer, &settings.regions)?;
        settings.validate()?;
        Ok(settings)
    }

    /// The regions the relay serves, at least one: each `[[regions]]` entry over `[viewer]`, or
    /// `[viewer]` alone without `[[regions]]` (named `viewer.region`, else `viewer.login.region`,
    /// else empty: the only region).
    pub fn regions(&self) -> &[Region] {
        &self.resolved
    }

    /// What is allowed but probably wrong, one sentence each naming its key. Loading logs nothing
    /// (logging starts after the configuration is known): the caller logs these once it has.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.cms.anonymous_user_id == 0 {
            warnings.push(
                "cms.anonymous_user_id is 0: stock OpenSim-CMS 1.1 rejects it (foreign key); use -1 unless your CMS was patched"
                    .to_owned(),
            );
        }
        if self.cms.ca_file.is_some() && !self.cms.base_url.starts_with("https:") {
            warnings.push(
                "cms.ca_file is set but cms.base_url is not https://: the certificates are not used"
                    .to_owned(),
            );
        }
        if self.privacy.optout_command.trim().is_empty() {
            warnings.push(
                "privacy.optout_command is empty: speakers cannot opt out of recording in-world"
                    .to_owned(),
            );
        }
        if self.privacy.greet && self.privacy.notice.trim().is_empty() {
            warnings.push(
                "privacy.greet is on but privacy.notice is empty: nobody is greeted".to_owned(),
            );
        }
        warnings
    }

    /// The effective configuration as TOML that loads again (`check-config`): every key, with the
    /// password replaced by `MASK` (an operator puts it back, or uses `cms.password_file`).
    pub fn redacted(&self) -> Result<String, ConfigError> {
        let body = toml::to_string(self).map_err(|err| ConfigError::Print(err.to_string()))?;
        let mut text = String::from(
            "# opensim-chat-relay: the effective configuration (built-in defaults < file < RELAY__ environment).\n",
        );
        if !self.cms.password.expose_secret().is_empty() {
            text.push_str(&format!(
                "# cms.password is masked as {MASK:?}: put the real one back (or use cms.password_file) before loading this.\n"
            ));
        }
        text.push('\n');
        text.push_str(body.trim_end());
        text.push('\n');
        Ok(text)
    }
}

/// What `check-config` prints instead of a password.
pub const MASK: &str = "********";

#[cfg(test)]
mod tests;
