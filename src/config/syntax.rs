//! Reading the configuration file and checking that it is TOML before the layers are merged, so that
//! a syntax error is reported by place and key and never by quoting the line: the line may hold the
//! password (one with a `"` or `\` pasted between double quotes is not a TOML string). Must not: show
//! any part of a line's value.

use std::path::Path;

use super::ConfigError;

/// The keys whose values are secret: an error on their line shows no TOML message that could carry
/// part of the value.
const SECRET_KEYS: [&str; 1] = ["cms.password"];

/// What to do when a secret's line is not TOML.
const SECRET_HINT: &str = "a password holding \" or \\ goes between single quotes ('…'), or escaped (\\\" and \\\\), or in the file named by cms.password_file";

/// The text of `file`, once it is known to be TOML.
pub(super) fn read_file(file: &Path) -> Result<String, ConfigError> {
    let shown = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|err| ConfigError::File {
        file: shown.clone(),
        reason: err.to_string(),
    })?;
    match text.parse::<toml::Table>() {
        Ok(_) => Ok(text),
        Err(err) => Err(syntax_error(shown, &text, &err)),
    }
}

/// Where `err` is in `text` (line and column from 1, the column in characters) and the dotted key of
/// that line, with toml's reason unless it could quote a secret.
fn syntax_error(file: String, text: &str, err: &toml::de::Error) -> ConfigError {
    let at = err.span().map_or(0, |span| span.start).min(text.len());
    // A span may start inside a multi-byte character of a broken line: step back to its start.
    let at = (0..=at)
        .rev()
        .find(|idx| text.is_char_boundary(*idx))
        .unwrap_or(0);
    let line_start = text[..at].rfind('\n').map_or(0, |idx| idx + 1);
    let line = text[..at].matches('\n').count() + 1;
    let column = text[line_start..at].chars().count() + 1;
    let key = key_of_line(text, line);
    let message = err.message().replace('\n', " ");
    let reason = match key.as_deref() {
        Some(key) if SECRET_KEYS.contains(&key) => {
            let value = text
                .lines()
                .nth(line - 1)
                .and_then(|l| l.split_once('='))
                .map_or("", |(_, value)| value);
            if quotes_part_of(&message, value) {
                format!("not valid TOML; {SECRET_HINT}")
            } else {
                format!("not valid TOML: {message}; {SECRET_HINT}")
            }
        }
        _ if secret_lines(text).any(|value| quotes_part_of(&message, value)) => {
            "not valid TOML".to_owned()
        }
        _ => format!("not valid TOML: {message}"),
    };
    ConfigError::Syntax {
        file,
        line,
        column,
        key,
        reason,
    }
}

/// Whether `message` holds 4 characters in a row of `value`.
fn quotes_part_of(message: &str, value: &str) -> bool {
    let chars: Vec<char> = value.trim().chars().collect();
    chars
        .windows(4)
        .any(|window| message.contains(&window.iter().collect::<String>()))
}

/// The values (the text after `=`) of the lines that set a secret key.
fn secret_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut section = String::new();
    text.lines().filter_map(move |line| {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            section = table_name(trimmed);
            return None;
        }
        let (name, value) = trimmed.split_once('=')?;
        let key = dotted(&section, name);
        SECRET_KEYS.contains(&key.as_str()).then_some(value)
    })
}

/// The dotted key set on line `line` (from 1), or by the nearest line above it that sets one (an
/// array or a string over several lines); `None` on a table header or before any key.
fn key_of_line(text: &str, line: usize) -> Option<String> {
    let mut section = String::new();
    let mut key = None;
    for current in text.lines().take(line) {
        let trimmed = current.trim();
        if trimmed.starts_with('[') {
            section = table_name(trimmed);
            key = None;
        } else if let Some((name, _)) = trimmed.split_once('=')
            && !name.trim().is_empty()
            && (!name.contains(['"', '\'']) || is_quoted_key(name))
        {
            key = Some(dotted(&section, name));
        }
    }
    key
}

/// Whether `name` is one quoted key (`"Alice Resident"`), not a string's content.
fn is_quoted_key(name: &str) -> bool {
    let name = name.trim();
    (name.starts_with('"') && name.ends_with('"') && name.len() >= 2)
        || (name.starts_with('\'') && name.ends_with('\'') && name.len() >= 2)
}

/// `[cms]` → `cms`, `[mapping.users]` → `mapping.users`.
fn table_name(header: &str) -> String {
    let inner = header.trim_start_matches('[');
    let inner = inner.split(']').next().unwrap_or_default();
    normalise(inner)
}

/// `section` and the key `name`, dotted.
fn dotted(section: &str, name: &str) -> String {
    let name = normalise(name);
    if section.is_empty() {
        name
    } else {
        format!("{section}.{name}")
    }
}

/// A key path without quotes or white space around its dots.
fn normalise(path: &str) -> String {
    path.split('.')
        .map(|part| part.trim().trim_matches(['"', '\'']))
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        let err = text.parse::<toml::Table>().expect_err("not TOML");
        syntax_error("relay.toml".to_owned(), text, &err).to_string()
    }

    #[test]
    fn an_error_names_line_column_and_the_dotted_key() {
        let shown = error_of("[viewer]\nchat_url = \"http://x\n");
        assert!(shown.contains("relay.toml: line 2, column"), "{shown}");
        assert!(shown.contains("key `viewer.chat_url`"), "{shown}");
        let shown = error_of("[mapping.users]\n\"Alice Resident\" = 3\n\"Bob\" = = 4\n");
        assert!(shown.contains("line 3"), "{shown}");
        assert!(shown.contains("key `mapping.users.Bob`"), "{shown}");
    }

    #[test]
    fn a_password_line_shows_no_part_of_its_value_whatever_the_message() {
        for line in [
            r#"password = "S3cret"Pa\55word""#,
            r#"password = "S3cret\qPa55word""#,
            r#"password = "S3cretPa55word"#,
            "password = \"S3cret\u{e9}Pa55\\word\"",
        ] {
            let shown = error_of(&format!("[cms]\nusername = \"relay\"\n{line}\n"));
            assert!(
                !shown.contains("S3cr") && !shown.contains("Pa55"),
                "{shown}"
            );
            assert!(shown.contains("key `cms.password`"), "{shown}");
            assert!(shown.contains("cms.password_file"), "{shown}");
        }
        // An error on another line does not quote the password either.
        let shown = error_of("[cms]\npassword = \"S3cretPa55word\"\nusername = relay\n");
        assert!(!shown.contains("S3cr"), "{shown}");
        assert!(shown.contains("key `cms.username`"), "{shown}");
    }

    #[test]
    fn quotes_part_of_needs_four_characters_in_a_row() {
        assert!(quotes_part_of("unexpected `cret`", " \"S3cret\" "));
        assert!(!quotes_part_of("expected newline, `#`", " \"S3cret\" "));
    }
}
