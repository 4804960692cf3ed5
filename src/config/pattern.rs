//! `Pattern`, a regular expression of the configuration compiled when it is loaded, and `Redaction`,
//! one `filter.redact` entry. Must not: apply them (`filter` does).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One `filter.redact` entry: every match of `pattern` in a line's text becomes `replacement`
/// (`$1` or `${name}` insert a group; `$$` is a dollar sign).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Redaction {
    /// What to find.
    pub pattern: Pattern,
    /// What it becomes.
    pub replacement: String,
}

/// A regular expression of the configuration (`regex` syntax), compiled when it is loaded, so that a
/// bad one stops start-up (and a reload) naming its key and the pattern's error.
#[derive(Debug, Clone)]
pub struct Pattern(regex::Regex);

impl Pattern {
    /// Compiles `text`; the error is one line: the pattern and what is wrong with it.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        regex::Regex::new(text).map(Pattern).map_err(|err| {
            // regex's syntax errors span several lines (the pattern, a caret, `error: …`): the
            // last line says what is wrong.
            let shown = err.to_string();
            let reason = shown
                .lines()
                .rev()
                .find_map(|line| line.trim().strip_prefix("error: "))
                .map_or_else(
                    || shown.split_whitespace().collect::<Vec<_>>().join(" "),
                    str::to_owned,
                );
            format!("{text:?} is not a regular expression: {reason}")
        })
    }

    /// The compiled expression.
    pub fn regex(&self) -> &regex::Regex {
        &self.0
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Pattern, D::Error> {
        let text = String::deserialize(deserializer)?;
        Pattern::parse(&text).map_err(serde::de::Error::custom)
    }
}
