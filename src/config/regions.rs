//! `[[regions]]`: the regions one relay serves, each with its own viewer. An entry holds a `name`
//! and any key of `[viewer]`; a key it does not give comes from `[viewer]`, which so holds the
//! defaults every region shares. Without `[[regions]]` the relay serves one region exactly as
//! before: `[viewer]` itself, with an empty name ("the only region": no `region` label, today's
//! cursor keys) and `viewer.region` (else `viewer.login.region`, else "the region") as its
//! `{region}` text. Must not: open anything, or check a viewer key itself (that is `validate`, the
//! same checks for `[viewer]` and every entry).
//!
//! Two exceptions to the inheritance, written down in README: `region` defaults to the entry's own
//! `name` (the region its viewer must be in), and `[viewer.login]` is never inherited (one avatar
//! cannot be logged in to two viewers; each entry gives its own `[regions.login]` or none).

use serde::Deserialize;

use super::{ConfigError, ViewerSettings};

/// One region the relay serves: its name and its viewer.
#[derive(Debug, Clone)]
pub struct Region {
    /// The `region` label of `/metrics`, the key of its cursors and its part of `/status`: the
    /// entry's `name`, or empty for the only region of a configuration without `[[regions]]`
    /// (which so keeps its unlabelled metrics and its cursors' keys).
    pub name: String,
    /// The `{region}` text: the name, or for the only region `viewer.region`, else
    /// `viewer.login.region`, else "the region".
    pub label: String,
    /// Its viewer: the entry's keys over `[viewer]`.
    pub viewer: ViewerSettings,
}

/// The keys an entry may give besides those of `[viewer]`.
const NAME: &str = "name";

/// The regions of `entries` (the `[[regions]]` tables as written) over `viewer`, or `viewer` alone
/// when there are none. Each error names its entry (`regions[1].chat_url`, counted from 0 as in
/// the file's order, and the region's name when it has one).
pub(super) fn resolve(
    viewer: &ViewerSettings,
    entries: &[toml::Table],
) -> Result<Vec<Region>, ConfigError> {
    if entries.is_empty() {
        return Ok(vec![Region {
            name: String::new(),
            label: viewer
                .expected_region()
                .filter(|region| !region.is_empty())
                .unwrap_or("the region")
                .to_owned(),
            viewer: viewer.clone(),
        }]);
    }
    let mut base = match toml::Value::try_from(viewer) {
        Ok(toml::Value::Table(table)) => table,
        Ok(_) => return Err(ConfigError::Print("[viewer] is not a table".to_owned())),
        Err(err) => return Err(ConfigError::Print(err.to_string())),
    };
    base.remove("login");
    let known: Vec<String> = base.keys().cloned().chain(["login".to_owned()]).collect();
    let mut regions: Vec<Region> = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let name = match entry.get(NAME) {
            Some(toml::Value::String(name)) => name.trim().to_owned(),
            Some(_) => return Err(entry_error(index, "", NAME, "must be a string")),
            None => {
                return Err(entry_error(
                    index,
                    "",
                    NAME,
                    "is required: the region's name (the value of {region})",
                ));
            }
        };
        if name.is_empty() {
            return Err(entry_error(index, "", NAME, "must not be empty"));
        }
        if name.chars().any(char::is_control) {
            return Err(entry_error(
                index,
                "",
                NAME,
                "must not hold a line break or control character",
            ));
        }
        // OpenSim compares region names without regard to case.
        if let Some(earlier) = regions
            .iter()
            .position(|region| region.name.eq_ignore_ascii_case(&name))
        {
            return Err(entry_error(
                index,
                &name,
                NAME,
                &format!("is already the name of regions[{earlier}]"),
            ));
        }
        let mut table = base.clone();
        table.insert("region".to_owned(), toml::Value::String(name.clone()));
        for (key, value) in entry.iter().filter(|(key, _)| key.as_str() != NAME) {
            if !known.contains(key) {
                return Err(entry_error(
                    index,
                    &name,
                    key,
                    &format!("unknown key (known: name, {})", known.join(", ")),
                ));
            }
            // Each key alone over [viewer] first, so that a value of the wrong type names its key.
            let mut alone = base.clone();
            alone.insert(key.clone(), value.clone());
            if let Err(err) = ViewerSettings::deserialize(toml::Value::Table(alone)) {
                return Err(entry_error(index, &name, key, err.message().trim()));
            }
            table.insert(key.clone(), value.clone());
        }
        let viewer = ViewerSettings::deserialize(toml::Value::Table(table))
            .map_err(|err| entry_error(index, &name, "", err.message().trim()))?;
        if let Some(earlier) = regions
            .iter()
            .position(|region| same_url(&region.viewer.chat_url, &viewer.chat_url))
        {
            return Err(entry_error(
                index,
                &name,
                "chat_url",
                &format!(
                    "is also regions[{earlier}]'s: every GET drains the viewer's one chat queue, so each region needs its own viewer"
                ),
            ));
        }
        regions.push(Region {
            label: name.clone(),
            name,
            viewer,
        });
    }
    Ok(regions)
}

fn same_url(a: &str, b: &str) -> bool {
    match (reqwest::Url::parse(a), reqwest::Url::parse(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a.trim() == b.trim(),
    }
}

/// An error about entry `index`'s `key` (empty: the entry as a whole).
pub(super) fn entry_error(index: usize, name: &str, key: &str, reason: &str) -> ConfigError {
    ConfigError::Region {
        key: if key.is_empty() {
            format!("regions[{index}]")
        } else {
            format!("regions[{index}].{key}")
        },
        name: name.to_owned(),
        reason: reason.to_owned(),
    }
}
