//! What may be shown of a CMS answer that can echo a secret (a failed login's page, an error page
//! that prints the request): its start as one line, the password and the token masked in every
//! encoding a peer can write them back in, and token-shaped words masked. Must not: log or keep
//! anything.

/// At most this much of a failed login's answer is shown (in `/readyz`, errors, logs).
const LOGIN_SNIPPET_CHARS: usize = 200;

/// The longest a peer writes one character of a secret back (`&#x10ffff;`, `%F0%9F%98%80`, two
/// `\uXXXX`): how far past the shown window a secret that starts in it can reach.
const MAX_SPELLING_BYTES: usize = 12;

/// A secret the answer may echo and what is shown in its place.
pub(super) struct Secret<'a> {
    /// The secret itself; empty is none.
    pub(super) value: &'a str,
    /// E.g. `[password]`.
    pub(super) mask: &'static str,
}

/// What may be shown of a CMS answer: its start as one line of text (HTML tags and runs of white
/// space collapsed), at most `LOGIN_SNIPPET_CHARS` characters, with each of `secrets` (in any
/// encoding `spellings` knows) and every token-shaped word (16+ letters and digits, both present)
/// replaced. Scrubbed before it is cut, so a secret across the cut cannot leave half of itself.
pub(super) fn scrub(body: &[u8], secrets: &[Secret<'_>]) -> String {
    // Enough of the body for the shown part, however many tags collapse, plus one secret written
    // in its longest encoding.
    const WINDOW: usize = 16 * 1024;
    let longest = secrets.iter().map(|s| s.value.len()).max().unwrap_or(0);
    let end = body.len().min(WINDOW + longest * MAX_SPELLING_BYTES);
    let mut text = String::from_utf8_lossy(&body[..end]).into_owned();
    for secret in secrets {
        text = mask_secret(&text, secret.value, secret.mask);
    }
    if end < body.len() {
        // A word cut at the window's end may be a token's head.
        let kept = text
            .trim_end_matches(|c: char| c.is_ascii_alphanumeric())
            .len();
        text.truncate(kept);
    }
    let mut plain = String::with_capacity(text.len().min(4 * LOGIN_SNIPPET_CHARS));
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                plain.push(' ');
            }
            _ if in_tag => {}
            c if c.is_whitespace() || c.is_control() => plain.push(' '),
            c => plain.push(c),
        }
    }
    let words: Vec<&str> = plain.split(' ').filter(|w| !w.is_empty()).collect();
    let mut shown = String::new();
    for word in words {
        let masked = mask_tokens(word);
        if !shown.is_empty() {
            shown.push(' ');
        }
        shown.push_str(&masked);
        if shown.chars().count() > LOGIN_SNIPPET_CHARS {
            let cut: String = shown.chars().take(LOGIN_SNIPPET_CHARS).collect();
            return format!("{cut}…");
        }
    }
    shown
}

/// `text` with every occurrence of `secret`, each of its characters written in any of its
/// `spellings` (a peer may echo a form body raw, through `json_encode`, `htmlspecialchars`, or a
/// mix), replaced by `mask`.
fn mask_secret(text: &str, secret: &str, mask: &str) -> String {
    if secret.is_empty() {
        return text.to_owned();
    }
    let table: Vec<Vec<String>> = secret.chars().map(spellings).collect();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut at = 0;
    while at < text.len() {
        match match_end(text, at, &table) {
            Some(end) => {
                out.push_str(&text[copied..at]);
                out.push_str(mask);
                copied = end;
                at = end;
            }
            None => at += text[at..].chars().next().map_or(1, char::len_utf8),
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// Where the longest spelling of the secret `table` describes that starts at `start` ends, if one
/// does. Each step keeps the set of ends reached so far (a few at most), so a character with two
/// spellings that share a start (`&` and `&amp;`) costs no backtracking.
fn match_end(text: &str, start: usize, table: &[Vec<String>]) -> Option<usize> {
    let mut ends = vec![start];
    for spellings in table {
        let mut next: Vec<usize> = Vec::new();
        for &at in &ends {
            for spelling in spellings {
                if text[at..].starts_with(spelling.as_str())
                    && !next.contains(&(at + spelling.len()))
                {
                    next.push(at + spelling.len());
                }
            }
        }
        if next.is_empty() {
            return None;
        }
        ends = next;
    }
    ends.into_iter().max()
}

/// The ways a peer writes `c` back: as is; percent-encoded (each UTF-8 byte `%XX`, upper or lower
/// case, and `+` for a space, as in the form body the login sends); JSON-escaped (`\"`, `\\`, `\/`,
/// `\uXXXX` in either case, a pair of them beyond the BMP); as an HTML entity (the named ones
/// `htmlspecialchars` writes, decimal with and without PHP's leading zero, hex in either case); and
/// a JSON escape printed in HTML (`\&quot;`).
fn spellings(c: char) -> Vec<String> {
    let mut out = vec![c.to_string()];
    let mut utf8 = [0u8; 4];
    let bytes = c.encode_utf8(&mut utf8).as_bytes();
    let upper: String = bytes.iter().map(|b| format!("%{b:02X}")).collect();
    let lower: String = bytes.iter().map(|b| format!("%{b:02x}")).collect();
    out.push(upper);
    out.push(lower);
    if c == ' ' {
        out.push("+".to_owned());
    }
    let mut utf16 = [0u16; 2];
    let units = c.encode_utf16(&mut utf16);
    out.push(units.iter().map(|u| format!("\\u{u:04x}")).collect());
    out.push(units.iter().map(|u| format!("\\u{u:04X}")).collect());
    match c {
        '"' => out.extend(["\\\"", "\\&quot;", "\\&#34;"].map(str::to_owned)),
        '\\' => out.push("\\\\".to_owned()),
        '/' => out.push("\\/".to_owned()),
        _ => {}
    }
    let named = match c {
        '&' => Some("&amp;"),
        '"' => Some("&quot;"),
        '<' => Some("&lt;"),
        '>' => Some("&gt;"),
        '\'' => Some("&apos;"),
        _ => None,
    };
    out.extend(named.map(str::to_owned));
    let code = u32::from(c);
    out.push(format!("&#{code};"));
    out.push(format!("&#{code:03};"));
    out.push(format!("&#x{code:x};"));
    out.push(format!("&#x{code:X};"));
    out.sort();
    out.dedup();
    out
}

/// `word` with each run of 16+ ASCII letters and digits that has both replaced by `[redacted]`.
fn mask_tokens(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        let token_like = run.len() >= 16
            && run.chars().any(|c| c.is_ascii_digit())
            && run.chars().any(|c| c.is_ascii_alphabetic());
        out.push_str(if token_like {
            "[redacted]"
        } else {
            run.as_str()
        });
        run.clear();
    };
    for c in word.chars() {
        if c.is_ascii_alphanumeric() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn password(value: &str) -> [Secret<'_>; 1] {
        [Secret {
            value,
            mask: "[password]",
        }]
    }

    #[test]
    fn a_secret_is_masked_in_each_encoding_and_in_a_mix_of_them() {
        let secret = "a&b/c d\"\u{e9}";
        for echoed in [
            "a&b/c d\"\u{e9}",
            "a%26b%2Fc+d%22%C3%A9",
            "a%26b%2fc%20d%22%c3%a9",
            "a&amp;b\\/c d&quot;&#233;",
            "a\\u0026b\\/c d\\\"\\u00e9",
            "a&#038;b&#x2F;c&#32;d\\&quot;\\u00E9",
        ] {
            let shown = mask_secret(&format!("before {echoed} after"), secret, "[pw]");
            assert_eq!(shown, "before [pw] after", "{echoed}");
        }
        assert_eq!(mask_secret("a&b/c", secret, "[pw]"), "a&b/c");
        let emoji = "x\u{1f600}y";
        assert_eq!(mask_secret("x\\ud83d\\ude00y", emoji, "[pw]"), "[pw]");
    }

    #[test]
    fn a_scrubbed_answer_has_no_password_no_token_and_no_markup() {
        let page = format!(
            "<br />\n<b>Warning</b>: bad  password 'hunter2-pw' for otwk9ERPQS9ietocskWTS5qTG4ow1qrqTXK2CBStt1LHv9UY{}",
            "<p>x</p>".repeat(1000)
        );
        let shown = scrub(page.as_bytes(), &password("hunter2-pw"));
        assert!(
            shown.starts_with("Warning : bad password '[password]' for [redacted] x x"),
            "{shown}"
        );
        assert!(shown.chars().count() <= LOGIN_SNIPPET_CHARS + 1, "{shown}");
        // Numbers, paths and words stay: they are what an operator needs.
        let shown = scrub(
            b"Allowed memory size of 134217728 bytes exhausted in /var/www/api/class.Auth.php",
            &password("pw"),
        );
        assert_eq!(
            shown,
            "Allowed memory size of 134217728 bytes exhausted in /var/www/api/class.Auth.php"
        );
    }

    #[test]
    fn a_password_across_the_window_is_masked_whole() {
        let mut body = vec![b'<'; 16 * 1024 - 3];
        body.push(b'>');
        body.extend_from_slice(b"s3cret-password and more");
        let shown = scrub(&body, &password("s3cret-password"));
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("[password]"), "{shown}");
    }
}
