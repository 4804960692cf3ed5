//! Text helpers below the peers' clients: the start of a body, made printable, for error messages
//! (the viewer client's; the CMS client quotes answers only through `cms::client::scrub`, since its
//! requests carry the password or the token), and a stable hash for fingerprints that are stored or
//! shown (`fnv1a64`).
//!
//! Owns no peer's rules. Must not know either peer's format or do I/O; it sits below `lookingglass`
//! and `cms` so that neither client imports the other.

/// How many bytes of a body an error message quotes.
const SNIPPET_MAX: usize = 200;

/// The start of a body, for error messages: at most 200 bytes (lossy UTF-8, line breaks as spaces),
/// with `…` when the body is longer.
pub(crate) fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(SNIPPET_MAX)]);
    let text = text.replace(['\r', '\n'], " ");
    if body.len() > SNIPPET_MAX {
        format!("{text}…")
    } else {
        text
    }
}

/// FNV-1a 64 of `bytes`: a hash that stays the same across versions and machines (the standard
/// library's may change), for fingerprints that are stored or shown to an operator.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_body_is_cut_and_marked_and_line_breaks_become_spaces() {
        assert_eq!(snippet(b"<b>Fatal</b>\r\nerror"), "<b>Fatal</b>  error");
        let long = "x".repeat(300);
        assert_eq!(snippet(long.as_bytes()), format!("{}…", "x".repeat(200)));
    }
}
