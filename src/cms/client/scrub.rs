//! What may be shown of a CMS answer that can echo a secret (a failed login's page): its start as
//! one line, the password and token-shaped words masked. Must not: log or keep anything.

/// At most this much of a failed login's answer is shown (in `/readyz`, errors, logs).
const LOGIN_SNIPPET_CHARS: usize = 200;

/// What may be shown of a CMS answer: its start as one line of text (HTML tags and runs of white
/// space collapsed), at most `LOGIN_SNIPPET_CHARS` characters, with the password and every
/// token-shaped word (16+ letters and digits, both present) replaced. Scrubbed before it is cut, so
/// a secret across the cut cannot leave half of itself.
pub(super) fn scrub(body: &[u8], password: &str) -> String {
    // Enough of the body for the shown part, however many tags collapse, plus one password.
    const WINDOW: usize = 16 * 1024;
    let end = body.len().min(WINDOW + password.len());
    let mut text = String::from_utf8_lossy(&body[..end]).into_owned();
    if !password.is_empty() {
        text = text.replace(password, "[password]");
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

    #[test]
    fn a_scrubbed_answer_has_no_password_no_token_and_no_markup() {
        let page = format!(
            "<br />\n<b>Warning</b>: bad  password 'hunter2-pw' for otwk9ERPQS9ietocskWTS5qTG4ow1qrqTXK2CBStt1LHv9UY{}",
            "<p>x</p>".repeat(1000)
        );
        let shown = scrub(page.as_bytes(), "hunter2-pw");
        assert!(
            shown.starts_with("Warning : bad password '[password]' for [redacted] x x"),
            "{shown}"
        );
        assert!(shown.chars().count() <= LOGIN_SNIPPET_CHARS + 1, "{shown}");
        // Numbers, paths and words stay: they are what an operator needs.
        let shown = scrub(
            b"Allowed memory size of 134217728 bytes exhausted in /var/www/api/class.Auth.php",
            "pw",
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
        let shown = scrub(&body, "s3cret-password");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("[password]"), "{shown}");
    }
}
