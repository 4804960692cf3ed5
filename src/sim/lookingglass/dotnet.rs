//! The .NET and Mono behaviour the simulated viewer inherits: `DateTime.ToString` with its 12-hour
//! `hh`, `RestHandler`'s form parsing (no URL-decoding), `Int32.Parse`, `Uri.UnescapeDataString`
//! (only escapes that form valid UTF-8), and string lengths counted in UTF-16 units (OpenSim's
//! 1000-character cut of delivered chat).
//!
//! It must not know the viewer's routes or state: these are the runtime's rules, applied by
//! `routes`.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use indexmap::IndexMap;

/// OpenSim's `ChatModule` truncates delivered chat to 1000 characters (spec §3.5), so the echo of
/// a longer POST comes back cut.
const ECHO_MAX_UTF16_UNITS: usize = 1000;

/// A value of the POST body map, reduced to what `OSD.AsString()` gives (or its absence).
pub(super) type BodyMap = IndexMap<String, String>;

/// `DateTime.Now.ToString("yyyyMMddhhmmssfff")` in the viewer's zone: `hh` is the 12-hour clock
/// (01–12) with no AM/PM, so 13:05 and 01:05 give the same string, and 00:05 shows `12`.
pub(super) fn viewer_time(received_at: DateTime<Utc>, timezone: Tz) -> String {
    received_at
        .with_timezone(&timezone)
        .format("%Y%m%d%I%M%S%3f")
        .to_string()
}

/// `RestHandler.MapizeTheBody`'s form branch: split on `&`, then `=`, keep pairs of exactly two
/// pieces, trim both, no URL-decoding. A later duplicate key wins.
pub(super) fn parse_form(text: &str) -> BodyMap {
    let mut map = BodyMap::new();
    for pair in text.split('&') {
        let pieces: Vec<&str> = pair.split('=').collect();
        if let [key, value] = pieces.as_slice() {
            map.insert(key.trim().to_owned(), value.trim().to_owned());
        }
    }
    map
}

/// .NET `Int32.Parse(s)` with `NumberStyles.Integer` in en-US: optional surrounding white space
/// (U+0009–U+000D, U+0020), an optional sign, ASCII digits, within `i32`.
pub(super) fn int32_parse(text: &str) -> Option<i32> {
    let trimmed = text.trim_matches(|character: char| {
        character == ' ' || ('\u{9}'..='\u{d}').contains(&character)
    });
    let (negative, digits) = match trimmed.as_bytes().first() {
        Some(b'-') => (true, &trimmed[1..]),
        Some(b'+') => (false, &trimmed[1..]),
        _ => (false, trimmed),
    };
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let magnitude: i64 = digits
        .trim_start_matches('0')
        .parse()
        .ok()
        .or_else(|| digits.bytes().all(|byte| byte == b'0').then_some(0))?;
    let value = if negative { -magnitude } else { magnitude };
    i32::try_from(value).ok()
}

/// `Uri.UnescapeDataString`: decodes `%XX` sequences that form valid UTF-8; an invalid or stray
/// `%` (`100%`, `%zz`, a lone `%E9`) is left as it is.
pub(super) fn unescape_data_string(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] != b'%' {
            // Copy everything up to the next '%' (a char boundary, since '%' is ASCII).
            let next = bytes[index..]
                .iter()
                .position(|byte| *byte == b'%')
                .map_or(bytes.len(), |offset| index + offset);
            out.push_str(&text[index..next]);
            index = next;
            continue;
        }
        // A run of consecutive %XX escapes, decoded together so multi-byte characters work.
        let mut run = Vec::new();
        let mut cursor = index;
        while let Some(byte) = escaped_byte(bytes, cursor) {
            run.push(byte);
            cursor += 3;
        }
        if run.is_empty() {
            out.push('%');
            index += 1;
            continue;
        }
        let mut position = 0;
        while position < run.len() {
            let width = utf8_width(run[position]);
            let decoded = run
                .get(position..position + width)
                .and_then(|piece| std::str::from_utf8(piece).ok());
            match decoded {
                Some(piece) if width > 0 => {
                    out.push_str(piece);
                    position += width;
                }
                _ => {
                    // Keep the original escape text (with its hex digits' case).
                    let start = index + position * 3;
                    out.push_str(&text[start..start + 3]);
                    position += 1;
                }
            }
        }
        index = cursor;
    }
    out
}

/// The byte of a `%XX` escape starting at `at`, if there is one.
fn escaped_byte(bytes: &[u8], at: usize) -> Option<u8> {
    if bytes.get(at) != Some(&b'%') {
        return None;
    }
    let high = char::from(*bytes.get(at + 1)?).to_digit(16)?;
    let low = char::from(*bytes.get(at + 2)?).to_digit(16)?;
    u8::try_from(high * 16 + low).ok()
}

/// The length of the UTF-8 sequence a leading byte announces; 0 for a byte that cannot lead.
fn utf8_width(byte: u8) -> usize {
    match byte {
        0x00..=0x7f => 1,
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => 0,
    }
}

/// The longest prefix of `text` of at most 1000 UTF-16 code units, not splitting a character.
pub(super) fn truncate_utf16(text: &str) -> String {
    let mut units = 0;
    let mut end = text.len();
    for (offset, character) in text.char_indices() {
        units += character.len_utf16();
        if units > ECHO_MAX_UTF16_UNITS {
            end = offset;
            break;
        }
    }
    text[..end].to_owned()
}
