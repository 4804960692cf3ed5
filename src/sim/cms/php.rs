//! PHP 5's values as the simulated CMS's code sees them: the `Php` value that `json_decode($body,
//! TRUE)` and `parse_str` produce, its string conversion, `is_numeric`, loose `==` against an
//! integer, `(string)$float` at `precision = 14`, `date()`, and the HTML of a PHP error as
//! `display_errors` prints it.
//!
//! It must not know the CMS's endpoints or tables: it is the language, not the application.

use chrono::TimeZone as _;
use chrono_tz::Tz;
use indexmap::IndexMap;

use crate::sim::cms::db::DATE_FORMAT;

/// Where a stock install lives; it only shows up in PHP error texts and debug fields.
pub(super) const PHP_ROOT: &str = "/var/www/OpenSim-CMS/api";

/// A PHP value as `json_decode($body, TRUE)` or `parse_str` produce it. Strings are bytes, as in
/// PHP; arrays keep insertion order, with list indices as the keys `"0"`, `"1"`, ….
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Php {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Vec<u8>),
    Arr(IndexMap<String, Php>),
}

impl<'de> serde::Deserialize<'de> for Php {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PhpVisitor)
    }
}

struct PhpVisitor;

impl<'de> serde::de::Visitor<'de> for PhpVisitor {
    type Value = Php;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<Php, E> {
        Ok(Php::Bool(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Php, E> {
        Ok(Php::Int(value))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Php, E> {
        // PHP turns integers beyond PHP_INT_MAX into floats.
        Ok(i64::try_from(value).map_or(Php::Float(value as f64), Php::Int))
    }

    fn visit_f64<E>(self, value: f64) -> Result<Php, E> {
        Ok(Php::Float(value))
    }

    fn visit_str<E>(self, value: &str) -> Result<Php, E> {
        Ok(Php::Str(value.as_bytes().to_vec()))
    }

    fn visit_unit<E>(self) -> Result<Php, E> {
        Ok(Php::Null)
    }

    fn visit_none<E>(self) -> Result<Php, E> {
        Ok(Php::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Php, A::Error> {
        let mut map = IndexMap::new();
        while let Some(value) = seq.next_element::<Php>()? {
            map.insert(map.len().to_string(), value);
        }
        Ok(Php::Arr(map))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut access: A) -> Result<Php, A::Error> {
        // A repeated key keeps its first position and takes the last value, as in PHP.
        let mut map = IndexMap::new();
        while let Some((key, value)) = access.next_entry::<String, Php>()? {
            map.insert(key, value);
        }
        Ok(Php::Arr(map))
    }
}

/// PHP's string conversion (`(string)$value`, what `strlen`, `strip_tags` and `urldecode` see).
pub(super) fn php_string(value: &Php) -> Vec<u8> {
    match value {
        Php::Null | Php::Bool(false) => Vec::new(),
        Php::Bool(true) => b"1".to_vec(),
        Php::Int(number) => number.to_string().into_bytes(),
        Php::Float(number) => php_float_string(*number).into_bytes(),
        Php::Str(text) => text.clone(),
        Php::Arr(_) => b"Array".to_vec(),
    }
}

/// `(string)$float` with PHP's `precision = 14`: 14 significant digits, written in the shortest
/// form, with PHP's `1.0E+20` notation outside 1e-4 .. 1e15.
fn php_float_string(number: f64) -> String {
    if number.is_nan() {
        return "NAN".to_owned();
    }
    if number.is_infinite() {
        return if number > 0.0 { "INF" } else { "-INF" }.to_owned();
    }
    let rounded: f64 = format!("{number:.13e}").parse().unwrap_or(number);
    let magnitude = rounded.abs();
    if rounded == 0.0 {
        return "0".to_owned();
    }
    if (1e-4..1e15).contains(&magnitude) {
        return format!("{rounded}");
    }
    let scientific = format!("{rounded:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let point = if mantissa.contains('.') { "" } else { ".0" };
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let sign = if exponent < 0 { '-' } else { '+' };
    format!("{mantissa}{point}E{sign}{}", exponent.unsigned_abs())
}

/// PHP 5 `is_numeric`.
pub(super) fn php_is_numeric(value: &Php) -> bool {
    php_numeric_value(value).is_some()
}

/// The number an `is_numeric` value stands for.
pub(super) fn php_numeric_value(value: &Php) -> Option<f64> {
    match value {
        Php::Int(number) => Some(*number as f64),
        Php::Float(number) => Some(*number),
        Php::Str(text) => numeric_string(text),
        _ => None,
    }
}

/// A PHP 5 numeric string: leading whitespace, then a decimal number with optional sign,
/// fraction and exponent, and nothing after it; or a hexadecimal `0x…` (accepted before PHP 7).
fn numeric_string(text: &[u8]) -> Option<f64> {
    let start = text
        .iter()
        .position(|byte| !matches!(byte, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c))?;
    let text = &text[start..];
    if let Some(hex) = text
        .strip_prefix(b"0x")
        .or_else(|| text.strip_prefix(b"0X"))
    {
        if hex.is_empty() || !hex.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let hex = std::str::from_utf8(hex).ok()?;
        return Some(u64::from_str_radix(hex, 16).map_or(f64::INFINITY, |value| value as f64));
    }
    let (value, length) = parse_decimal(text)?;
    (length == text.len()).then_some(value)
}

/// The longest decimal number at the start of `text` (`[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?`):
/// its value and length.
pub(super) fn parse_decimal(text: &[u8]) -> Option<(f64, usize)> {
    let mut at = 0;
    if matches!(text.first(), Some(b'+' | b'-')) {
        at += 1;
    }
    let int_digits = text[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    at += int_digits;
    let mut frac_digits = 0;
    if text.get(at) == Some(&b'.') {
        frac_digits = text[at + 1..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if int_digits > 0 || frac_digits > 0 {
            at += 1 + frac_digits;
        }
    }
    if int_digits == 0 && frac_digits == 0 {
        return None;
    }
    if matches!(text.get(at), Some(b'e' | b'E')) {
        let mut exponent_at = at + 1;
        if matches!(text.get(exponent_at), Some(b'+' | b'-')) {
            exponent_at += 1;
        }
        let exponent_digits = text[exponent_at.min(text.len())..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if exponent_digits > 0 {
            at = exponent_at + exponent_digits;
        }
    }
    let number = std::str::from_utf8(&text[..at]).ok()?.parse::<f64>().ok()?;
    Some((number, at))
}

/// PHP 5 loose `$value == $int`.
pub(super) fn php_loose_eq_int(value: &Php, int: i64) -> bool {
    match value {
        Php::Null => int == 0,
        Php::Bool(flag) => *flag == (int != 0),
        Php::Int(number) => *number == int,
        Php::Float(number) => *number == int as f64,
        // A numeric string compares as its number; any other string is converted with its
        // leading number (0 if none): `"abc" == 0` is true in PHP 5.
        Php::Str(text) => {
            let number = numeric_string(text).unwrap_or_else(|| {
                let start = text
                    .iter()
                    .position(|byte| !byte.is_ascii_whitespace())
                    .unwrap_or(text.len());
                parse_decimal(&text[start..]).map_or(0.0, |(value, _)| value)
            });
            number == int as f64
        }
        Php::Arr(_) => false,
    }
}

/// What `date()` makes of a numeric timestamp: the integer part, saturated.
pub(super) fn unix_seconds(value: f64) -> i64 {
    if value.is_nan() {
        0
    } else {
        // `as` saturates at the i64 bounds, which `php_date` then cannot represent.
        value.trunc() as i64
    }
}

/// PHP `date('Y-m-d H:i:s', $unix)` in the CMS zone. A value chrono cannot represent gives a
/// string that still matches the validation regex but no insert accepts, as PHP's far-away
/// dates do.
pub(super) fn php_date(timezone: Tz, unix: i64) -> String {
    match timezone.timestamp_opt(unix, 0).single() {
        Some(date) => date.format(DATE_FORMAT).to_string(),
        None => "0000-00-00 00:00:00".to_owned(),
    }
}

/// PHP's `display_errors` HTML format (with `html_errors` on, the message is escaped).
pub(super) fn php_error_html(kind: &str, message: &str, file: &str, line: u32) -> String {
    format!(
        "<br />\n<b>{kind}</b>:  {} in <b>{PHP_ROOT}/{file}</b> on line <b>{line}</b><br />\n",
        html_escape(message)
    )
}

fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#039;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_numeric_follows_php_5() {
        let numeric = |text: &str| numeric_string(text.as_bytes()).is_some();
        assert!(numeric("1403608462"));
        assert!(numeric(" 12"));
        assert!(numeric("-1"));
        assert!(numeric("1.5e3"));
        assert!(numeric(".5"));
        assert!(numeric("0x1A"));
        assert!(!numeric("12 "));
        assert!(!numeric("1e"));
        assert!(!numeric(""));
        assert!(!numeric("abc"));
        assert!(!numeric("2026-01-01 12:00:00"));
    }

    #[test]
    fn loose_comparison_follows_php_5() {
        let text = |text: &str| Php::Str(text.as_bytes().to_vec());
        assert!(php_loose_eq_int(&text("abc"), 0));
        assert!(php_loose_eq_int(&text("1abc"), 1));
        assert!(php_loose_eq_int(&text("-1"), -1));
        assert!(php_loose_eq_int(&Php::Bool(true), 1));
        assert!(!php_loose_eq_int(&text("2"), 1));
        assert!(!php_loose_eq_int(&Php::Arr(IndexMap::new()), 0));
    }

    #[test]
    fn floats_print_as_php_does() {
        assert_eq!(php_float_string(1.5), "1.5");
        assert_eq!(php_float_string(3.0), "3");
        assert_eq!(php_float_string(0.1 + 0.2), "0.3");
        assert_eq!(php_float_string(1e20), "1.0E+20");
        assert_eq!(php_float_string(1.5e-7), "1.5E-7");
    }
}
