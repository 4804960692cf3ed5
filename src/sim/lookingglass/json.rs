//! The simulated viewer's JSON, as LitJson and `OSDParser` handle it: the writer (pure ASCII,
//! upper-case `\uXXXX` escapes, `/` left alone, empty values dropped from maps) used for every
//! answer, and a lenient reader for the chat POST body (single quotes, comments, the last of
//! duplicate keys, every value reduced to its `OSD.AsString()`).
//!
//! It must not use serde or the relay's wire types: the simulator writes its JSON by hand from the
//! spec, so a mistake in the relay's decoding cannot be mirrored here.

use crate::sim::lookingglass::dotnet::BodyMap;

/// Appends `text` as a JSON string the way LitJson writes it: every non-ASCII character as
/// `\uXXXX` (uppercase hex, UTF-16 surrogate pairs), short escapes for `"` `\` `\n` `\r` `\t`
/// `\b` `\f`, `\u00XX` for other controls, and `/` left alone. The output is pure ASCII.
pub(super) fn push_json_string(out: &mut String, text: &str) {
    out.push('"');
    for character in text.chars() {
        match character {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(character),
            _ => {
                let mut units = [0u16; 2];
                for unit in character.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04X}"));
                }
            }
        }
    }
    out.push('"');
}

/// Appends `"name":"value"` to an object body, with a comma when needed, or nothing for an
/// empty value: `SerializeJsonString` drops "default" values (the empty string) from maps.
pub(super) fn push_field(out: &mut String, first: &mut bool, name: &str, value: &str) {
    if value.is_empty() {
        return;
    }
    if !*first {
        out.push(',');
    }
    *first = false;
    push_json_string(out, name);
    out.push(':');
    push_json_string(out, value);
}

/// The lenient reader standing in for LitJson + `OSDParser.DeserializeJson`, reduced to what the
/// chat POST needs: the top-level object's values as `OSD.AsString()` gives them.
///
/// It parses a top-level object. LitJson accepts single-quoted strings and `/* */` (and `//`)
/// comments, and the last of duplicate keys wins; any syntax error (a trailing comma, for
/// one) gives `None`, which the viewer turns into an empty map.
pub(super) fn parse_object(text: &str) -> Option<BodyMap> {
    let mut parser = Parser {
        chars: text.chars().collect(),
        position: 0,
    };
    let value = parser.value(0)?;
    parser.skip_blank()?;
    match value {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

/// Nesting deeper than this is refused rather than risking the stack.
const MAX_DEPTH: usize = 64;

enum Value {
    /// The `AsString()` of a scalar (or of an array, which is `""`).
    Scalar(String),
    Object(BodyMap),
}

impl Value {
    fn into_osd_string(self) -> String {
        match self {
            Value::Scalar(text) => text,
            // OSDMap inherits OSD.AsString(), the empty string.
            Value::Object(_) => String::new(),
        }
    }
}

struct Parser {
    chars: Vec<char>,
    position: usize,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.position).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let character = self.peek()?;
        self.position += 1;
        Some(character)
    }

    /// Skips white space and comments; `None` on an unterminated comment.
    fn skip_blank(&mut self) -> Option<()> {
        loop {
            match self.peek() {
                Some(character) if character.is_whitespace() => self.position += 1,
                Some('/') => match self.chars.get(self.position + 1) {
                    Some('*') => {
                        self.position += 2;
                        loop {
                            if self.bump()? == '*' && self.peek() == Some('/') {
                                self.position += 1;
                                break;
                            }
                        }
                    }
                    Some('/') => while !matches!(self.bump(), None | Some('\n')) {},
                    _ => return Some(()),
                },
                _ => return Some(()),
            }
        }
    }

    fn value(&mut self, depth: usize) -> Option<Value> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.skip_blank()?;
        match self.peek()? {
            '{' => self.object(depth).map(Value::Object),
            '[' => {
                self.array(depth)?;
                Some(Value::Scalar(String::new()))
            }
            '"' | '\'' => self.string().map(Value::Scalar),
            _ => self.literal().map(Value::Scalar),
        }
    }

    fn object(&mut self, depth: usize) -> Option<BodyMap> {
        self.bump()?; // '{'
        let mut map = BodyMap::new();
        self.skip_blank()?;
        if self.peek()? == '}' {
            self.position += 1;
            return Some(map);
        }
        loop {
            self.skip_blank()?;
            let key = match self.peek()? {
                '"' | '\'' => self.string()?,
                _ => return None,
            };
            self.skip_blank()?;
            if self.bump()? != ':' {
                return None;
            }
            let value = self.value(depth + 1)?;
            // IndexMap::insert keeps the first position but takes the last value.
            map.insert(key, value.into_osd_string());
            self.skip_blank()?;
            match self.bump()? {
                ',' => continue,
                '}' => return Some(map),
                _ => return None,
            }
        }
    }

    fn array(&mut self, depth: usize) -> Option<()> {
        self.bump()?; // '['
        self.skip_blank()?;
        if self.peek()? == ']' {
            self.position += 1;
            return Some(());
        }
        loop {
            self.value(depth + 1)?;
            self.skip_blank()?;
            match self.bump()? {
                ',' => continue,
                ']' => return Some(()),
                _ => return None,
            }
        }
    }

    fn string(&mut self) -> Option<String> {
        let quote = self.bump()?;
        let mut out = String::new();
        loop {
            match self.bump()? {
                character if character == quote => return Some(out),
                '\\' => match self.bump()? {
                    'n' => out.push('\n'),
                    'r' => out.push('\r'),
                    't' => out.push('\t'),
                    'b' => out.push('\u{8}'),
                    'f' => out.push('\u{c}'),
                    'u' => {
                        let unit = self.hex4()?;
                        if (0xd800..0xdc00).contains(&unit)
                            && self.peek() == Some('\\')
                            && self.chars.get(self.position + 1) == Some(&'u')
                        {
                            let saved = self.position;
                            self.position += 2;
                            let low = self.hex4()?;
                            if (0xdc00..0xe000).contains(&low) {
                                let combined = 0x10000 + ((unit - 0xd800) << 10) + (low - 0xdc00);
                                out.push(char::from_u32(combined).unwrap_or('\u{fffd}'));
                                continue;
                            }
                            self.position = saved;
                        }
                        out.push(char::from_u32(unit).unwrap_or('\u{fffd}'));
                    }
                    other => out.push(other),
                },
                character => out.push(character),
            }
        }
    }

    fn hex4(&mut self) -> Option<u32> {
        let mut value = 0;
        for _ in 0..4 {
            value = value * 16 + self.bump()?.to_digit(16)?;
        }
        Some(value)
    }

    /// A number, `true`, `false` or `null`, as `AsString()` renders it.
    fn literal(&mut self) -> Option<String> {
        let start = self.position;
        while self
            .peek()
            .is_some_and(|character| character.is_ascii_alphanumeric() || "+-.".contains(character))
        {
            self.position += 1;
        }
        let word: String = self.chars[start..self.position].iter().collect();
        match word.as_str() {
            // OSDBoolean.AsString() is "1" or "0"; an undefined OSD's is "".
            "true" => Some("1".to_owned()),
            "false" => Some("0".to_owned()),
            "null" => Some(String::new()),
            _ => number_as_string(&word),
        }
    }
}

/// A JSON number as .NET prints the OSDInteger/OSDReal LitJson makes of it: integers as
/// digits, reals in the shortest form (`1.0` → `1`, so `Channel` `1.0` parses as 1).
fn number_as_string(word: &str) -> Option<String> {
    let body = word.strip_prefix('-').unwrap_or(word);
    if body.is_empty() || !body.starts_with(|character: char| character.is_ascii_digit()) {
        return None;
    }
    if body.bytes().all(|byte| byte.is_ascii_digit()) {
        let trimmed = body.trim_start_matches('0');
        let digits = if trimmed.is_empty() { "0" } else { trimmed };
        let negative = word.starts_with('-') && digits != "0";
        return Some(format!("{}{digits}", if negative { "-" } else { "" }));
    }
    let value: f64 = word.parse().ok()?;
    if value.fract() == 0.0 && value.abs() < 1e15 {
        // Exact: the value is an integer well within f64's exact range.
        Some(format!("{}", value as i64))
    } else {
        Some(format!("{value}"))
    }
}
