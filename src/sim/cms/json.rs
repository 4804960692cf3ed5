//! PHP 5's `json_encode`, the only JSON writer of the simulated CMS: `\/` escaped, every non-ASCII
//! character as a lower-case `\uXXXX` (surrogate pairs beyond the BMP), an empty array as `[]`
//! whether it was meant as a list or a map, and `JSON_PRETTY_PRINT`'s four-space layout.
//!
//! It must not use serde or the relay's wire types: the simulator writes its JSON by hand from the
//! spec, so a serde mistake in the relay cannot pass on both sides.

use std::fmt::Write as _;

/// A value for PHP's `json_encode`.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// PHP `empty()`.
    pub(super) fn is_empty(&self) -> bool {
        match self {
            Json::Null => true,
            Json::Bool(flag) => !flag,
            Json::Int(number) => *number == 0,
            Json::Str(text) => text.is_empty() || text == "0",
            Json::Arr(items) => items.is_empty(),
            Json::Obj(fields) => fields.is_empty(),
        }
    }

    /// `json_encode($value)` or `json_encode($value, JSON_PRETTY_PRINT)`.
    pub(super) fn encode(&self, pretty: bool) -> String {
        let mut out = String::new();
        self.write(&mut out, pretty, 0);
        out
    }

    fn write(&self, out: &mut String, pretty: bool, indent: usize) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(flag) => out.push_str(if *flag { "true" } else { "false" }),
            Json::Int(number) => {
                let _ = write!(out, "{number}");
            }
            Json::Str(text) => write_json_string(out, text),
            // An empty PHP array is `[]`, whether it was meant as a list or a map.
            Json::Arr(items) if items.is_empty() => out.push_str("[]"),
            Json::Obj(fields) if fields.is_empty() => out.push_str("[]"),
            Json::Arr(items) => {
                out.push('[');
                for (index, item) in items.iter().enumerate() {
                    if index > 0 {
                        out.push(',');
                    }
                    newline(out, pretty, indent + 1);
                    item.write(out, pretty, indent + 1);
                }
                newline(out, pretty, indent);
                out.push(']');
            }
            Json::Obj(fields) => {
                out.push('{');
                for (index, (key, value)) in fields.iter().enumerate() {
                    if index > 0 {
                        out.push(',');
                    }
                    newline(out, pretty, indent + 1);
                    write_json_string(out, key);
                    out.push_str(if pretty { ": " } else { ":" });
                    value.write(out, pretty, indent + 1);
                }
                newline(out, pretty, indent);
                out.push('}');
            }
        }
    }
}

fn newline(out: &mut String, pretty: bool, indent: usize) {
    if pretty {
        out.push('\n');
        for _ in 0..indent {
            out.push_str("    ");
        }
    }
}

/// PHP's default string escaping: `\/`, and every non-ASCII character as `\uXXXX` (lower-case
/// hex, surrogate pairs beyond the BMP).
fn write_json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' => out.push_str("\\/"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
            c if c == '\u{7f}' => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_encode_escapes_like_php() {
        let value = Json::Obj(vec![
            ("a/b".to_owned(), Json::Str("é😀\n".to_owned())),
            ("list".to_owned(), Json::Arr(vec![Json::Int(1)])),
            ("empty".to_owned(), Json::Obj(Vec::new())),
        ]);
        assert_eq!(
            value.encode(false),
            r#"{"a\/b":"\u00e9\ud83d\ude00\n","list":[1],"empty":[]}"#
        );
        assert_eq!(
            value.encode(true),
            "{\n    \"a\\/b\": \"\\u00e9\\ud83d\\ude00\\n\",\n    \"list\": [\n        1\n    ],\n    \"empty\": []\n}"
        );
    }
}
