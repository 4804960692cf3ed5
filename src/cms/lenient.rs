//! Reading the CMS's JSON leniently, without building what is not kept: where the JSON starts after
//! PHP noise (`json_start`), scalars whatever shape PHP gave them (`Text`, `Int`, `Flag`: a value of
//! another type is `None`, never an error), and objects read field by field into a struct
//! (`Object`, `from_map!`), every field not listed skipped without being built.
//!
//! No `serde_json::Value` tree is made: a chat GET of tens of megabytes costs its body and the rows
//! kept from it. Must not know what an answer means (`wire` does).

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

/// Where the JSON document of a CMS body starts, skipping PHP warning text in front of it: 0 when
/// the whole body is JSON, else the first `{` or `[` (of the first 64) from which the rest is one
/// JSON document. Each try only checks the syntax (nothing is built), and the tries together read
/// at most `MAX_SCANS` times the body: a body that breaks off (which no start can fix) or a page of
/// brackets costs a few scans, not 64 parses.
pub fn json_start(body: &[u8]) -> Option<usize> {
    /// A long body that is JSON from a later start costs its noise plus one scan; one that breaks
    /// off costs about one scan (each later start inside it fails at its first element's end).
    const MAX_SCANS: usize = 3;
    let mut budget = MAX_SCANS.saturating_mul(body.len()).max(64 * 1024);
    // Whether the rest of `body` from `start` is one JSON document; a failed try is charged what
    // it read.
    let is_json_from = |start: usize, budget: &mut usize| -> bool {
        let rest = &body[start..];
        match serde_json::from_slice::<IgnoredAny>(rest) {
            Ok(_) => true,
            Err(err) => {
                *budget = budget.saturating_sub(error_offset(rest, &err));
                false
            }
        }
    };
    if is_json_from(0, &mut budget) {
        return Some(0);
    }
    let candidates = body
        .iter()
        .enumerate()
        .filter(|(start, b)| *start > 0 && (**b == b'{' || **b == b'['))
        .map(|(start, _)| start)
        .take(64);
    for start in candidates {
        if budget == 0 {
            return None;
        }
        if is_json_from(start, &mut budget) {
            return Some(start);
        }
    }
    None
}

/// How far into `text` serde_json read before `err` (its line and byte column).
fn error_offset(text: &[u8], err: &serde_json::Error) -> usize {
    if err.is_eof() || err.line() == 0 {
        return text.len();
    }
    let line_start = if err.line() == 1 {
        0
    } else {
        text.iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(err.line() - 2)
            .map_or(text.len(), |(at, _)| at + 1)
    };
    (line_start + err.column()).min(text.len())
}

/// `visit_*` methods that give `$value` for the listed kinds of JSON value (`bool`, `i64`, `u64`,
/// `f64`, `str`, `unit`; `map` and `seq` are read to their end, unbuilt): what a lenient visitor
/// makes of the values it does not want.
macro_rules! give {
    ($value:expr; $($kind:ident),* $(,)?) => { $( $crate::cms::lenient::give!(@one $value; $kind); )* };
    (@one $value:expr; bool) => {
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> { Ok($value) }
    };
    (@one $value:expr; i64) => {
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> { Ok($value) }
    };
    (@one $value:expr; u64) => {
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> { Ok($value) }
    };
    (@one $value:expr; f64) => {
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> { Ok($value) }
    };
    (@one $value:expr; str) => {
        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> { Ok($value) }
    };
    (@one $value:expr; unit) => {
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> { Ok($value) }
    };
    (@one $value:expr; map) => {
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
            Ok($value)
        }
    };
    (@one $value:expr; seq) => {
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok($value)
        }
    };
}
pub(crate) use give;

/// Writes `FromMap` for a struct of lenient fields: each listed key is read into its field, every
/// other key's value is skipped unbuilt.
macro_rules! from_map {
    ($ty:ident { $($key:literal => $field:ident),* $(,)? }) => {
        impl<'de> $crate::cms::lenient::FromMap<'de> for $ty {
            fn from_map<A: serde::de::MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
                let mut read = $ty::default();
                while let Some(key) = map.next_key::<$crate::cms::lenient::Key<'de>>()? {
                    match key.0.as_ref() {
                        $($key => read.$field = map.next_value()?,)*
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(read)
            }
        }
    };
}
pub(crate) use from_map;

/// A type read from the fields of a JSON object (`from_map!`).
pub(crate) trait FromMap<'de>: Sized + Default {
    fn from_map<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error>;
}

/// A JSON object read field by field (`FromMap`); any other value gives `T::default()`, skipped
/// without being built.
#[derive(Debug, Default)]
pub(crate) struct Object<T>(pub(crate) T);

impl<'de, T: FromMap<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: FromMap<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::from_map(map).map(Object)
            }
            give!(Object(T::default()); bool, i64, u64, f64, str, unit, seq);
        }
        deserializer.deserialize_any(ObjectVisitor(std::marker::PhantomData))
    }
}

/// An object key, borrowed from the body unless it holds an escape.
pub(crate) struct Key<'de>(pub(crate) Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: de::Error>(self, key: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(key)))
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(key.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Defines a lenient scalar: `$visit` gives a value, every other JSON value gives `None`.
macro_rules! lenient {
    ($name:ident, $out:ty, $what:literal, [$($other:ident),*], { $($visit:item)* }) => {
        #[doc = concat!("A lenient ", $what, ": `None` for a value of another type.")]
        #[derive(Debug, Default)]
        pub(crate) struct $name(pub(crate) Option<$out>);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct LenientVisitor;
                impl<'de> Visitor<'de> for LenientVisitor {
                    type Value = Option<$out>;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($what)
                    }
                    $($visit)*
                    give!(None; unit, map, seq, $($other),*);
                }
                deserializer.deserialize_any(LenientVisitor).map($name)
            }
        }
    };
}

lenient!(Text, String, "string", [bool, i64, u64, f64], {
    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Some(text.to_owned()))
    }
    fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
        Ok(Some(text))
    }
});

// PHP hands out ids as numbers or as strings, depending on the code path.
lenient!(Int, i64, "integer, or one as a string", [bool, f64], {
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
        Ok(Some(n))
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
        Ok(i64::try_from(n).ok())
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(text.trim().parse().ok())
    }
});

lenient!(Flag, bool, "boolean", [i64, u64, f64, str], {
    fn visit_bool<E: de::Error>(self, flag: bool) -> Result<Self::Value, E> {
        Ok(Some(flag))
    }
});
