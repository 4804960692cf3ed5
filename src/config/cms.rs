//! `[cms]`: its keys, the part of them delivery gets (`DeliverySettings`, no password), and reading
//! `cms.password_file` and `cms.ca_file`. Must not: open a socket (the CMS client does).

use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::fields::{boolean, display, empty_path_is_none, float, integer, masked, none_is_empty};
use crate::pacing::PacingSettings;
use crate::zone::Zone;

/// `[cms]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CmsSettings {
    /// E.g. `http://127.0.0.1/OpenSim-CMS/api`, without a trailing slash.
    pub base_url: String,
    /// The CMS's `grids.id`.
    #[serde(deserialize_with = "integer")]
    pub grid_id: u32,
    /// The relay's CMS account.
    pub username: String,
    /// The password, unless `password_file` is used.
    #[serde(serialize_with = "masked")]
    pub password: SecretString,
    /// A file holding the password (a systemd credential, a Docker secret); `None` when empty.
    #[serde(
        deserialize_with = "empty_path_is_none",
        serialize_with = "none_is_empty"
    )]
    pub password_file: Option<PathBuf>,
    /// A PEM bundle trusted for the CMS's certificate besides the system's store (a private CA, a
    /// self-signed certificate); `None` when empty.
    #[serde(
        deserialize_with = "empty_path_is_none",
        serialize_with = "none_is_empty"
    )]
    pub ca_file: Option<PathBuf>,
    /// The CMS server's clock.
    #[serde(serialize_with = "display")]
    pub timezone: Zone,
    /// The user id of unmapped speakers (-1 for OpenSim-CMS 1.1).
    #[serde(deserialize_with = "integer")]
    pub anonymous_user_id: i64,
    /// Message of an unmapped speaker, with `{name}` and `{message}`.
    pub anonymous_format: String,
    /// At most this many lines per POST.
    #[serde(deserialize_with = "integer")]
    pub batch_max_messages: usize,
    /// At most this many bytes of JSON per POST.
    #[serde(deserialize_with = "integer")]
    pub batch_max_bytes: usize,
    /// How long a batch that is not full waits for more lines.
    #[serde(with = "humantime_serde")]
    pub batch_linger: Duration,
    /// Limit on one CMS request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A CMS answer larger than this is refused.
    #[serde(deserialize_with = "integer")]
    pub max_response_bytes: usize,
    /// CMS requests of the delivery per second at most (0 = no cap): a hard cap on top of the
    /// adaptive pacing.
    #[serde(deserialize_with = "float")]
    pub max_requests_per_second: f64,
    /// Delivery finds the pace the CMS can take from its answer times (`pacing`); off, only
    /// `max_requests_per_second` paces it.
    #[serde(deserialize_with = "boolean")]
    pub adaptive_pacing: bool,
    /// Read back every batch after `success: true` (OpenSim-CMS 1.1 can report success for a batch
    /// that lost a middle line). Off: batches are read back only when the returned id leaves a gap.
    #[serde(deserialize_with = "boolean")]
    pub verify: bool,
    /// Post one `[relay] …` line to the CMS chat for each stretch the relay knows it did not record
    /// (the viewer out of its region, lines dropped by the outbox bounds, a quarantined answer).
    #[serde(deserialize_with = "boolean")]
    pub gap_markers: bool,
}

/// What delivery takes from `[cms]`: how rows are made, batched and paced. Built by
/// `CmsSettings::delivery`; it has no address, account or password, which stay with `CmsClient`
/// (the keys stay in `[cms]`, where operators know them).
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// `cms.timezone`: the zone a row's timestamp is written in.
    pub timezone: Zone,
    /// `cms.anonymous_user_id`
    pub anonymous_user_id: i64,
    /// `cms.anonymous_format`
    pub anonymous_format: String,
    /// `cms.batch_max_messages`
    pub batch_max_messages: usize,
    /// `cms.batch_max_bytes`
    pub batch_max_bytes: usize,
    /// `cms.batch_linger`
    pub batch_linger: Duration,
    /// `cms.adaptive_pacing` and `cms.max_requests_per_second` (0 = no cap).
    pub pacing: PacingSettings,
    /// `cms.verify`
    pub verify: bool,
}

impl CmsSettings {
    /// The part of `[cms]` delivery needs, without the secret.
    pub fn delivery(&self) -> DeliverySettings {
        DeliverySettings {
            timezone: self.timezone,
            anonymous_user_id: self.anonymous_user_id,
            anonymous_format: self.anonymous_format.clone(),
            batch_max_messages: self.batch_max_messages,
            batch_max_bytes: self.batch_max_bytes,
            batch_linger: self.batch_linger,
            pacing: PacingSettings {
                adaptive: self.adaptive_pacing,
                max_requests_per_second: self.max_requests_per_second,
            },
            verify: self.verify,
        }
    }

    /// The password, read from `password_file` when that is set (surrounding whitespace trimmed).
    pub fn load_password(&self) -> Result<SecretString, ConfigError> {
        match &self.password_file {
            None => Ok(self.password.clone()),
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) if !text.trim().is_empty() => {
                    Ok(SecretString::from(text.trim().to_owned()))
                }
                Ok(_) => Err(ConfigError::Invalid {
                    key: "cms.password_file",
                    reason: format!("{} is empty", path.display()),
                }),
                Err(err) => Err(ConfigError::Invalid {
                    key: "cms.password_file",
                    reason: format!("cannot read {}: {err}", path.display()),
                }),
            },
        }
    }
}

impl CmsSettings {
    /// The certificates of `ca_file`, trusted for the CMS besides the system's store; none when it
    /// is not set. A file that cannot be read, or that holds no certificate rustls can use, is an
    /// error naming the key.
    pub fn load_ca_certificates(&self) -> Result<Vec<reqwest::Certificate>, ConfigError> {
        let Some(path) = &self.ca_file else {
            return Ok(Vec::new());
        };
        let invalid = |reason: String| ConfigError::Invalid {
            key: "cms.ca_file",
            reason: format!("{}: {reason}", path.display()),
        };
        let pem = std::fs::read(path).map_err(|err| invalid(format!("cannot read it: {err}")))?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|err| invalid(format!("not a PEM bundle: {err}")))?;
        if certificates.is_empty() {
            return Err(invalid(
                "holds no certificate (expected -----BEGIN CERTIFICATE----- blocks)".to_owned(),
            ));
        }
        // The PEM parser checks the armour only: a client built with these roots and no others
        // checks that each is a certificate rustls can trust, here rather than at the first login.
        let mut builder = reqwest::Client::builder().tls_built_in_root_certs(false);
        for certificate in &certificates {
            builder = builder.add_root_certificate(certificate.clone());
        }
        builder
            .build()
            .map_err(|err| invalid(format!("holds a certificate that cannot be used: {err}")))?;
        Ok(certificates)
    }
}
