//! How the settings' values are read and written: the strict parsers that keep every environment
//! value a string and read numbers, booleans and lists from their own text (a key whose value does
//! not parse is an error naming it, never a rounded or guessed value), the empty-is-off rules, and
//! the masking of the password when the settings are printed. Must not: validate across keys (that is
//! `Settings::validate`), or open anything.

use std::collections::BTreeMap;
use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{MASK, Pattern};

pub(super) fn masked<S: Serializer>(
    secret: &SecretString,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(if secret.expose_secret().is_empty() {
        ""
    } else {
        MASK
    })
}

pub(super) fn display<T: std::fmt::Display, S: Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// `None` is printed as the empty string that loads as `None` again.
pub(super) fn none_is_empty<T: Serialize, S: Serializer>(
    value: &Option<T>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(value) => value.serialize(serializer),
        None => serializer.serialize_str(""),
    }
}

pub(super) fn empty_is_none<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    let value = String::deserialize(deserializer)?;
    Ok(if value.trim().is_empty() {
        None
    } else {
        Some(value)
    })
}

pub(super) fn empty_path_is_none<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<PathBuf>, D::Error> {
    Ok(empty_is_none(deserializer)?.map(PathBuf::from))
}

pub(super) fn empty_addr_is_none<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<std::net::SocketAddr>, D::Error> {
    match empty_is_none(deserializer)? {
        None => Ok(None),
        Some(text) => text.trim().parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!(
                "{text:?} is not an address such as 127.0.0.1:9188 (empty turns the endpoint off)"
            ))
        }),
    }
}

/// A whole number: a TOML integer, or the text of one (an environment variable, an override). A
/// float (`1.5`, `1e2`) or a bool is an error, where `config` would round it or read `true` as 1.
pub(super) fn integer<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64> + TryFrom<u64> + std::str::FromStr,
{
    struct Integer<T>(std::marker::PhantomData<T>);
    impl<T> serde::de::Visitor<'_> for Integer<T>
    where
        T: TryFrom<i64> + TryFrom<u64> + std::str::FromStr,
    {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a whole number in range")
        }
        fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<T, E> {
            T::try_from(value).map_err(|_| E::custom(format!("{value} is out of range")))
        }
        fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<T, E> {
            T::try_from(value).map_err(|_| E::custom(format!("{value} is out of range")))
        }
        fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<T, E> {
            value
                .trim()
                .parse()
                .map_err(|_| E::custom(format!("{value:?} is not a whole number in range")))
        }
    }
    deserializer.deserialize_any(Integer(std::marker::PhantomData))
}

/// A number: a TOML integer or float, or the text of one. A bool is an error.
pub(super) fn float<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    struct Float;
    impl serde::de::Visitor<'_> for Float {
        type Value = f64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a number")
        }
        fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<f64, E> {
            Ok(value)
        }
        fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<f64, E> {
            Ok(value as f64)
        }
        fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<f64, E> {
            Ok(value as f64)
        }
        fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<f64, E> {
            value
                .trim()
                .parse()
                .map_err(|_| E::custom(format!("{value:?} is not a number")))
        }
    }
    deserializer.deserialize_any(Float)
}

/// A bool: a TOML bool, or `true`/`false` (also `yes`/`no`, `on`/`off`, `1`/`0`) as text. A TOML
/// number is an error.
pub(super) fn boolean<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    struct Boolean;
    impl serde::de::Visitor<'_> for Boolean {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("true or false")
        }
        fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<bool, E> {
            Ok(value)
        }
        fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<bool, E> {
            match value.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "1" => Ok(true),
                "false" | "no" | "off" | "0" => Ok(false),
                _ => Err(E::custom(format!("{value:?} is not true or false"))),
            }
        }
    }
    deserializer.deserialize_any(Boolean)
}

/// A list of strings: a TOML array, or one comma-separated string (`RELAY__FILTER__TYPES=Normal,Shout`).
pub(super) fn string_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<String>, D::Error> {
    list_or_text(
        deserializer,
        "a list of strings, or one string of comma-separated names",
        |text| {
            Ok(text
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect())
        },
    )
}

/// A list of `Pattern`s: a TOML array, or one string holding one pattern (an environment variable;
/// never split at commas, which regular expressions use).
pub(super) fn pattern_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<Pattern>, D::Error> {
    list_or_text(
        deserializer,
        "a list of regular expressions, or one as a string",
        |text| match text {
            "" => Ok(Vec::new()),
            text => Ok(vec![Pattern::parse(text)?]),
        },
    )
}

/// A list: a TOML array of `T`, or one string (an environment variable, an override) that `parse`
/// turns into the list.
fn list_or_text<'de, D, T>(
    deserializer: D,
    expecting: &'static str,
    parse: fn(&str) -> Result<Vec<T>, String>,
) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct List<T> {
        expecting: &'static str,
        parse: fn(&str) -> Result<Vec<T>, String>,
    }
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for List<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element::<T>()? {
                items.push(item);
            }
            Ok(items)
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            (self.parse)(text).map_err(E::custom)
        }
    }
    deserializer.deserialize_any(List { expecting, parse })
}

/// `mapping.users`: name → user id, each id by the rules of `integer`.
pub(super) fn user_map<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, i64>, D::Error> {
    #[derive(Deserialize)]
    struct UserId(#[serde(deserialize_with = "integer")] i64);
    let users = BTreeMap::<String, UserId>::deserialize(deserializer)?;
    Ok(users.into_iter().map(|(name, id)| (name, id.0)).collect())
}
