//! How the relay says a text in-world, whoever wants it said (`inworld` for CMS lines, `notice` for
//! its own): split into parts that OpenSim and the viewers keep whole, each part recorded in the echo
//! memory before its POST so that the poller drops it when the viewer hands it back. Must not: decide
//! what is said or when (the callers pace), or read the viewer's chat.

use tokio_util::sync::CancellationToken;

use crate::echo::RecentlySaid;
use crate::lookingglass::{LookingGlassClient, ViewerError};

/// OpenSim truncates chat to 1000 characters and Second Life viewers to 1023 bytes (spec §3.5).
const MAX_PART_CHARS: usize = 1000;
const MAX_PART_BYTES: usize = 1023;

/// Says one `part` through the viewer on `channel`, recording it in the echo memory first (and, on
/// channel 0, awaiting its echo: only channel 0 is echoed back to the speaker, spec §2.8), so that
/// the poller drops it when the viewer hands it back. A part that was not said is not awaited.
pub async fn say_part(
    viewer: &LookingGlassClient,
    recently_said: &RecentlySaid,
    part: &str,
    channel: i32,
    say_type: &str,
    stop: &CancellationToken,
) -> Result<(), ViewerError> {
    recently_said.remember(part);
    let echoed = channel == 0;
    if echoed {
        recently_said.await_echo();
    }
    let said = viewer.say(part, channel, say_type, stop).await;
    if said.is_err() && echoed {
        recently_said.forget_last_awaited();
    }
    said
}

/// Splits `text` into parts of at most 1000 characters and 1023 UTF-8 bytes, at the last white space
/// that fits (or mid-word when a word alone is longer).
pub fn split_message(text: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let mut end = 0;
        for (n_chars, (idx, c)) in rest.char_indices().enumerate() {
            if n_chars >= MAX_PART_CHARS || idx + c.len_utf8() > MAX_PART_BYTES {
                break;
            }
            end = idx + c.len_utf8();
        }
        if end == rest.len() {
            parts.push(rest.to_owned());
            break;
        }
        let cut = rest[..end]
            .rfind(char::is_whitespace)
            .filter(|idx| *idx > 0)
            .unwrap_or(end);
        parts.push(rest[..cut].trim_end().to_owned());
        rest = rest[cut..].trim_start();
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_split_at_word_boundaries_within_both_limits() {
        let text = "word ".repeat(450); // 2250 characters
        let parts = split_message(&text);
        assert!(parts.len() >= 3, "{}", parts.len());
        assert!(
            parts
                .iter()
                .all(|p| p.chars().count() <= 1000 && p.len() <= 1023)
        );
        assert!(
            parts
                .iter()
                .all(|p| !p.starts_with(' ') && !p.ends_with(' ') && p.ends_with("word"))
        );
        assert_eq!(parts.join(" "), text.trim());
    }

    #[test]
    fn multibyte_text_respects_the_byte_limit() {
        let text = "日本語".repeat(400); // 1200 characters, 3600 bytes, no spaces
        let parts = split_message(&text);
        assert!(
            parts.iter().all(|p| p.len() <= 1023),
            "{:?}",
            parts.iter().map(String::len).collect::<Vec<_>>()
        );
        assert_eq!(parts.concat(), text);
    }

    #[test]
    fn a_short_line_is_one_part() {
        assert_eq!(split_message("hello"), ["hello"]);
        assert!(split_message("   ").is_empty());
    }
}
