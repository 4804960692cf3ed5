//! What PHP 5 makes of a request to the simulated CMS: `Helper::getInput` (JSON by an exact-case
//! `Content-Type` or by braces, else form fields, and nothing from a chunked body), `parse_str`
//! with its bracket syntax and nesting limit, `urldecode`, and `strip_tags`, which the chat
//! controller applies to every message. These are the lenient parsing quirks a client meets.
//!
//! It must not know the CMS's endpoints or tables, nor the HTTP wire: it reads a parsed
//! `sim::http::Request` and returns PHP values.

use indexmap::IndexMap;

use crate::sim::cms::php::Php;
use crate::sim::http::Request;

/// `Helper::getInput(TRUE)` (spec §1.3): the body read by Content-Length (a chunked body has
/// none, so it reads as empty), JSON if the exact-case `Content-Type` says so or the body is
/// `{…}`, otherwise form fields.
pub(super) fn get_input(request: &Request) -> Php {
    let body: &[u8] = if request.chunked { &[] } else { &request.body };
    let json_header = request
        .header_exact("Content-Type")
        .is_some_and(|value| value.contains("application/json"));
    let json_braces = body.first() == Some(&b'{') && body.last() == Some(&b'}');
    if json_header || json_braces {
        // `json_decode` gives NULL for anything it cannot parse (including depth over its limit).
        return serde_json::from_slice::<Php>(body).unwrap_or(Php::Null);
    }
    Php::Arr(parse_str(body))
}

/// PHP's default `max_input_nesting_level`.
const MAX_INPUT_NESTING_LEVEL: usize = 64;

/// PHP `parse_str` (also what fills `$_POST` for a form body), bracket syntax included.
fn parse_str(body: &[u8]) -> IndexMap<String, Php> {
    let mut out = IndexMap::new();
    for pair in body.split(|byte| *byte == b'&') {
        if pair.is_empty() {
            continue;
        }
        let (key, value) = match pair.iter().position(|byte| *byte == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &b""[..]),
        };
        let key = String::from_utf8_lossy(&urldecode(key)).into_owned();
        register_variable(&mut out, &key, Php::Str(urldecode(value)));
    }
    out
}

/// `php_register_variable_ex`: leading spaces dropped, `a[b][]` nesting, ` ` and `.` in the base
/// name turned into `_`, an empty base name ignored (which is why a JSON array read as a form
/// yields nothing).
fn register_variable(out: &mut IndexMap<String, Php>, key: &str, value: Php) {
    let key = key.trim_start_matches(' ');
    let (base, mut rest) = match key.find('[') {
        Some(at) => (&key[..at], &key[at..]),
        None => (key, ""),
    };
    if base.is_empty() {
        return;
    }
    let mut base: String = base
        .chars()
        .map(|c| if c == ' ' || c == '.' { '_' } else { c })
        .collect();
    let mut indices: Vec<Option<String>> = Vec::new();
    while let Some(after) = rest.strip_prefix('[') {
        match after.find(']') {
            Some(close) => {
                let index = &after[..close];
                indices.push((!index.is_empty()).then(|| index.to_owned()));
                rest = &after[close + 1..];
            }
            None => {
                // An unclosed `[` on the first level becomes `_` and the rest stays in the name.
                if indices.is_empty() {
                    base.push('_');
                    base.push_str(after);
                }
                break;
            }
        }
    }
    // `max_input_nesting_level`: a deeper variable is dropped (and the recursion stays bounded).
    if indices.len() > MAX_INPUT_NESTING_LEVEL {
        return;
    }
    insert_path(out, Some(base), &indices, value);
}

fn insert_path(
    map: &mut IndexMap<String, Php>,
    key: Option<String>,
    rest: &[Option<String>],
    value: Php,
) {
    let key = key.unwrap_or_else(|| next_index(map));
    match rest.split_first() {
        None => {
            map.insert(key, value);
        }
        Some((next_key, deeper)) => {
            let slot = map.entry(key).or_insert_with(|| Php::Arr(IndexMap::new()));
            if !matches!(slot, Php::Arr(_)) {
                *slot = Php::Arr(IndexMap::new());
            }
            if let Php::Arr(inner) = slot {
                insert_path(inner, next_key.clone(), deeper, value);
            }
        }
    }
}

/// The key `$a[] = …` uses: one past the largest integer key.
fn next_index(map: &IndexMap<String, Php>) -> String {
    map.keys()
        .filter_map(|key| key.parse::<i64>().ok())
        .filter(|index| *index >= 0)
        .max()
        .map_or(0, |index| index.saturating_add(1))
        .to_string()
}

/// PHP `urldecode`: `+` is a space, valid `%XX` a byte, anything else kept.
pub(super) fn urldecode(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut index = 0;
    while index < text.len() {
        let byte = text[index];
        if byte == b'+' {
            out.push(b' ');
        } else if byte == b'%'
            && index + 2 < text.len()
            && let (Some(high), Some(low)) =
                (hex_value(text[index + 1]), hex_value(text[index + 2]))
        {
            out.push(high * 16 + low);
            index += 2;
        } else {
            out.push(byte);
        }
        index += 1;
    }
    out
}

fn hex_value(byte: u8) -> Option<u8> {
    (byte as char)
        .to_digit(16)
        .and_then(|digit| u8::try_from(digit).ok())
}

/// PHP 5 `strip_tags` without allowed tags (`php_strip_tags_ex`): a `<` followed by whitespace is
/// text; any other `<` starts a tag that lasts until its `>` (or the end of the text), with
/// quotes, nesting, `<?…?>` and `<!--…-->` handled as PHP does. NUL bytes are dropped.
pub(super) fn strip_tags(text: &[u8]) -> Vec<u8> {
    #[derive(PartialEq)]
    enum State {
        Text,
        Tag,
        Php,
        Bang,
        Comment,
    }
    let mut out = Vec::with_capacity(text.len());
    let mut state = State::Text;
    let mut depth = 0usize;
    let mut in_quote: Option<u8> = None;
    let previous = |index: usize, back: usize| index.checked_sub(back).map(|at| text[at]);
    for (index, &byte) in text.iter().enumerate() {
        let next = text.get(index + 1).copied();
        match byte {
            0 => {}
            b'<' => {
                if in_quote.is_some() {
                    continue;
                }
                if next.is_some_and(|next| next.is_ascii_whitespace() || next == 0x0b) {
                    if state == State::Text {
                        out.push(byte);
                    }
                    continue;
                }
                match state {
                    State::Text => state = State::Tag,
                    State::Tag => depth += 1,
                    _ => {}
                }
            }
            b'>' => {
                if depth > 0 {
                    depth -= 1;
                    continue;
                }
                if in_quote.is_some() {
                    continue;
                }
                match state {
                    State::Text => out.push(byte),
                    State::Tag | State::Bang => {
                        state = State::Text;
                        in_quote = None;
                    }
                    State::Php => {
                        if previous(index, 1) == Some(b'?') {
                            state = State::Text;
                            in_quote = None;
                        }
                    }
                    State::Comment => {
                        if previous(index, 1) == Some(b'-') && previous(index, 2) == Some(b'-') {
                            state = State::Text;
                            in_quote = None;
                        }
                    }
                }
            }
            b'"' | b'\'' => match state {
                State::Text => out.push(byte),
                State::Comment => {}
                _ => {
                    if state == State::Php && previous(index, 1) == Some(b'\\') {
                        continue;
                    }
                    match in_quote {
                        None => in_quote = Some(byte),
                        Some(open) if open == byte => in_quote = None,
                        Some(_) => {}
                    }
                }
            },
            b'!' if state == State::Tag && previous(index, 1) == Some(b'<') => {
                state = State::Bang;
            }
            b'?' if state == State::Tag && previous(index, 1) == Some(b'<') => {
                state = State::Php;
            }
            b'-' if state == State::Bang
                && previous(index, 1) == Some(b'-')
                && previous(index, 2) == Some(b'!') =>
            {
                state = State::Comment;
            }
            _ => {
                if state == State::Text {
                    out.push(byte);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip(text: &str) -> String {
        String::from_utf8(strip_tags(text.as_bytes())).expect("strip_tags keeps UTF-8 here")
    }

    #[test]
    fn strip_tags_follows_php() {
        assert_eq!(strip("I <3 you"), "I ");
        assert_eq!(strip("x<y"), "x");
        assert_eq!(strip("a < b"), "a < b");
        assert_eq!(strip("pos <1,2,3> end"), "pos  end");
        assert_eq!(strip("<b>bold</b> text"), "bold text");
        assert_eq!(strip("<a href=\"x>y\">link</a>"), "link");
        assert_eq!(strip("a <!-- c > d --> b"), "a  b");
        assert_eq!(strip("1 > 0"), "1 > 0");
        assert_eq!(strip("<br>"), "");
        assert_eq!(strip("tail <"), "tail ");
    }

    #[test]
    fn parse_str_handles_brackets_and_json_arrays() {
        let parsed = parse_str(b"0[userId]=3&0[message]=hi+there&a.b=1");
        let Some(Php::Arr(first)) = parsed.get("0") else {
            panic!("expected a nested array, got {parsed:?}");
        };
        assert_eq!(first.get("message"), Some(&Php::Str(b"hi there".to_vec())));
        assert!(parsed.contains_key("a_b"));
        assert!(parse_str(br#"[{"userId":3,"message":"x"}]"#).is_empty());
        assert_eq!(
            parse_str(b"list[]=a&list[]=b")
                .get("list")
                .map(|v| match v {
                    Php::Arr(map) => map.len(),
                    _ => 0,
                }),
            Some(2)
        );
    }

    #[test]
    fn form_keys_nested_too_deeply_are_dropped() {
        let deep = format!("a{}=1&b=2", "[x]".repeat(100));
        let parsed = parse_str(deep.as_bytes());
        assert!(!parsed.contains_key("a"));
        assert!(parsed.contains_key("b"));
    }

    #[test]
    fn urldecode_decodes_plus_and_percent() {
        assert_eq!(urldecode(b"a+b%2Bc%25d%zz%4"), b"a b+c%d%zz%4".to_vec());
    }
}
