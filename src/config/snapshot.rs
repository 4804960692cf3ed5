//! `Snapshot`: the configuration in force as dotted key → printed value, kept by the reloader to
//! name the keys a reload changed. The password is kept only as a keyed digest (SipHash with keys
//! drawn at start, never printed), so that the reloader can tell it changed without holding it.
//! Must not: print the digest, or keep the `Settings` it was taken from.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::LazyLock;

use secrecy::ExposeSecret;

use super::Settings;

/// The digest's keys: one random pair for the process, so that two snapshots compare and the digest
/// says nothing outside it.
static DIGEST_KEYS: LazyLock<RandomState> = LazyLock::new(RandomState::new);

/// The key the password's digest is kept under.
const PASSWORD_KEY: &str = "cms.password";

/// Every key of a configuration and its value, the password as a digest.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    values: BTreeMap<String, toml::Value>,
}

impl Settings {
    /// What a reload compares against. A configuration that cannot be printed (a path that is not
    /// UTF-8) has only its password in the snapshot, so its other keys compare as unchanged.
    pub fn snapshot(&self) -> Snapshot {
        let mut values = BTreeMap::new();
        if let Ok(table) = toml::Table::try_from(self) {
            flatten("", &table, &mut values);
        }
        // The printed form masks the password: its digest stands in for it.
        let digest = DIGEST_KEYS.hash_one(self.cms.password.expose_secret());
        values.insert(
            PASSWORD_KEY.to_owned(),
            toml::Value::String(format!("{digest:016x}")),
        );
        Snapshot { values }
    }
}

impl Snapshot {
    /// The dotted keys whose values differ from `loaded`'s, in order, leaving out those `is_live`
    /// says a reload applies.
    pub fn changed_keys(&self, loaded: &Snapshot, is_live: impl Fn(&str) -> bool) -> Vec<String> {
        let mut keys: Vec<String> = self
            .values
            .keys()
            .chain(loaded.values.keys())
            .filter(|key| self.values.get(*key) != loaded.values.get(*key))
            .filter(|key| !is_live(key))
            .cloned()
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// Takes `loaded`'s values of the keys `is_live` names (a reload applied them); the others keep
    /// the values the relay runs with.
    pub fn adopt(&mut self, loaded: &Snapshot, is_live: impl Fn(&str) -> bool) {
        self.values.retain(|key, _| !is_live(key));
        for (key, value) in &loaded.values {
            if is_live(key) {
                self.values.insert(key.clone(), value.clone());
            }
        }
    }
}

/// Every leaf of `table` under its dotted key; an array is one leaf.
fn flatten(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, toml::Value>) {
    for (name, value) in table {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match value {
            toml::Value::Table(inner) => flatten(&key, inner, out),
            leaf => {
                out.insert(key, leaf.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Settings;

    fn load(overrides: &[(&str, &str)]) -> Settings {
        let mut all = vec![("cms.username", "relay"), ("cms.password", "hunter2-pw")];
        all.extend_from_slice(overrides);
        Settings::load(None, &all).expect("loads")
    }

    #[test]
    fn a_snapshot_tells_a_changed_password_without_holding_it() {
        let running = load(&[]).snapshot();
        let shown = format!("{running:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        let changed = load(&[("cms.password", "hunter3-pw")]).snapshot();
        assert_eq!(running.changed_keys(&changed, |_| false), ["cms.password"]);
        assert!(
            running
                .changed_keys(&load(&[]).snapshot(), |_| false)
                .is_empty()
        );
    }

    #[test]
    fn adopting_takes_only_the_live_keys() {
        let mut running = load(&[]).snapshot();
        let loaded = load(&[("viewer.poll_interval", "2s"), ("privacy.notice", "x")]).snapshot();
        let is_live = |key: &str| key.starts_with("privacy.");
        running.adopt(&loaded, is_live);
        assert_eq!(
            running.changed_keys(&loaded, |_| false),
            ["viewer.poll_interval"]
        );
    }
}
