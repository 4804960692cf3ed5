//! `CmsError`: every way a CMS request can fail, classified so the delivery loop never matches strings.
//!
//! Messages never contain the token or the password: URLs are stripped from transport errors.

use std::time::Duration;

/// Why a CMS request failed.
#[derive(Debug, thiserror::Error)]
pub enum CmsError {
    /// Connection refused or reset, or a timeout. Whether a POST was stored is unknown.
    #[error("cms unreachable: {0}")]
    Transport(String),
    /// An HTTP status that is not the CMS's own answer (a proxy, a 5xx, a rate limit).
    #[error("cms answered HTTP {status}: {snippet}")]
    Http {
        /// The HTTP status.
        status: u16,
        /// `Retry-After`, when the server sent one.
        retry_after: Option<Duration>,
        /// The start of the body.
        snippet: String,
    },
    /// Refused with "Unauthorized to access this API URL" even after a fresh login: the account lacks
    /// permission, or the token is bound to another address.
    #[error(
        "cms refused the relay's account (needs auth >= 4, chat >= 5, user >= 4; token bound to another address?)"
    )]
    Unauthorized,
    /// The login itself failed.
    #[error("cms login failed: {0}")]
    Login(String),
    /// No login was tried: the last one failed a moment ago and logins follow the retry schedule
    /// (`retry.initial` doubling to `retry.max`), whoever asks. Carries the last failure's text.
    #[error("cms login failed: {last} (next login attempt in {}ms)", retry_in.as_millis())]
    LoginDeferred {
        /// The last login failure, as shown (scrubbed).
        last: String,
        /// How long until a login is tried again.
        retry_in: Duration,
    },
    /// A validation error: nothing of the batch was stored.
    #[error("cms rejected the batch: {0}")]
    Invalid(String),
    /// `success: false` and no error: the last row failed, earlier rows may be stored.
    #[error("cms could not store the last line of the batch (earlier lines may be stored)")]
    LastRowFailed,
    /// `success: false` with another error.
    #[error("cms error: {0}")]
    Failed(String),
    /// A 3xx: not followed, because the request carries the password (a login) or the token (its
    /// query). Only the target's host is kept: the rest of the `Location` may hold the token.
    #[error(
        "cms answered HTTP {status}, a redirect to {host}: not followed (the password and the token go only to cms.base_url; set it to the address that answers)"
    )]
    Redirect {
        /// The HTTP status.
        status: u16,
        /// `host[:port]` of the `Location`, or a note that it had none.
        host: String,
    },
    /// The body is not JSON (a PHP fatal error page, a proxy's page).
    #[error("cms sent an unreadable answer (HTTP {status}): {snippet}")]
    Decode {
        /// The HTTP status.
        status: u16,
        /// The start of the body.
        snippet: String,
    },
}

impl CmsError {
    /// Whether trying again later may succeed. Everything but a rejection of the content is worth
    /// retrying: a chat line is never dropped because the CMS was having a bad moment.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, CmsError::Invalid(_) | CmsError::LastRowFailed)
    }

    /// Why a line the CMS refused on its own (a POST of that one line) is dead-lettered: the text
    /// `outbox dead` shows. A validation error is the CMS's own words. `{"success":false,"id":0}`
    /// carries none (spec §3.3: the insert failed), so the reason names what the row points at:
    /// `chats.userId` and `chats.gridId` are foreign keys, user 0 does not exist in a stock
    /// OpenSim-CMS 1.1, and -1 is stored as NULL (anonymous), which leaves the grid. `user_id` is
    /// the row's, when it was decided.
    pub fn refusal_reason(&self, user_id: Option<i64>) -> String {
        const NO_CAUSE: &str = "the cms could not store the line and gave no reason ({\"success\":false,\"id\":0}: its insert failed)";
        match (self, user_id) {
            (CmsError::Invalid(error), _) => format!("the cms rejected the line: {error}"),
            (CmsError::LastRowFailed, Some(0)) => format!(
                "{NO_CAUSE}; it was sent with user id 0, which stock OpenSim-CMS 1.1 rejects (chats.userId is a foreign key to users, and no user 0 exists): set cms.anonymous_user_id = -1 (the default), then requeue it (outbox requeue)"
            ),
            (CmsError::LastRowFailed, Some(-1)) => format!(
                "{NO_CAUSE}; it was sent as anonymous (user id -1, stored as NULL), so the likely cause is the grid: chats.gridId is a foreign key, check that cms.grid_id exists (opensim-chat-relay check); then requeue it (outbox requeue)"
            ),
            (CmsError::LastRowFailed, Some(user_id)) => format!(
                "{NO_CAUSE}; it was sent with user id {user_id}: if the cms has no user {user_id}, the insert fails its foreign key (chats.userId); check mapping.users and the avatar's link in the cms, then requeue it (outbox requeue)"
            ),
            (other, _) => other.to_string(),
        }
    }

    /// The delay the server asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CmsError::Http { retry_after, .. } => *retry_after,
            CmsError::LoginDeferred { retry_in, .. } => Some(*retry_in),
            _ => None,
        }
    }

    /// Builds a transport error without the URL (it holds the token).
    pub(crate) fn transport(err: reqwest::Error) -> CmsError {
        let timeout = err.is_timeout();
        let err = err.without_url();
        let mut text = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        if text.contains("invalid peer certificate") {
            text.push_str(
                " (a CMS behind a private CA or with a self-signed certificate: set cms.ca_file to its PEM)",
            );
        }
        if timeout && !text.contains("timed out") {
            text.push_str(" (timed out)");
        }
        CmsError::Transport(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_reason_is_the_cms_words_or_names_what_the_row_points_at() {
        let invalid = CmsError::Invalid(
            "Missing parameter (string) \"message\" with a minumum length of 1 character".into(),
        );
        assert_eq!(
            invalid.refusal_reason(Some(3)),
            "the cms rejected the line: Missing parameter (string) \"message\" with a minumum length of 1 character"
        );
        let anonymous = CmsError::LastRowFailed.refusal_reason(Some(-1));
        assert!(
            anonymous.contains("anonymous") && anonymous.contains("cms.grid_id"),
            "{anonymous}"
        );
        let undecided = CmsError::LastRowFailed.refusal_reason(None);
        assert_eq!(undecided, CmsError::LastRowFailed.to_string());
    }
}
