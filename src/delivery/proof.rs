//! What the CMS's answer to a chat POST proves about the lines it carried: a pure function of the
//! batch's size, the last confirmed id it went out after, and the answer.
//!
//! Must not: do I/O, or take anything but a read of the rows (`readback`) as proof of a line the
//! answer leaves unknown.

use crate::cms::CmsError;

/// What an answer proves of a batch of `n` lines, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Proof {
    /// Every line is stored, the last as row `last_id` (a batch of one).
    Stored {
        /// The row's id.
        last_id: i64,
    },
    /// The last line is stored as row `last_id`; the others are unknown (a middle row may have
    /// failed silently): read back before anything is resent.
    LastStored {
        /// The last row's id.
        last_id: i64,
    },
    /// The last line is not stored; the others are unknown: read back, then send what is missing
    /// line by line.
    LastNotStored,
    /// No line is stored: the CMS refused the content (a validation error stops the whole batch
    /// before any insert).
    NoneStored,
    /// Nothing is known: the lines stay in flight and are read back before anything is resent.
    Unknown,
}

/// What a chat POST's `answer` proves of a batch of `n` lines (`n` ≥ 1) sent after the last
/// confirmed id `before`, and whether the CMS's ids went backwards (a restored database: the
/// read-back cursor must start again from 0). One row per answer shape of CMS spec §3.3, §10,
/// §10.1 and §10.2:
///
/// | answer | `n` = 1 | `n` > 1 |
/// |---|---|---|
/// | `{"success":true,"id":N}` | `Stored` (row N) | `LastStored`: every insert consumes an id, stored or not, so even `N = before + n` does not prove a middle row stored |
/// | `success:true`, a middle row failed silently (unknown `userId`, an emoji under strict SQL) | as above | as above: the read-back finds the gap |
/// | `success:true`, other writers' rows interleaved (`N > before + n`) | as above | as above |
/// | `success:true` with `N < before + n` (ids going backwards: a restored database) | as above, and the cursor starts again | as above, and the cursor starts again |
/// | `{"success":false,"id":0}`: the last insert failed | `LastNotStored`: this line is not stored | `LastNotStored`: earlier rows may be stored |
/// | `{"success":false,"error":...}` validation error (§3.3 errors 1-5) | `NoneStored` | `NoneStored` (the first invalid element aborts the batch) |
/// | `{"success":false,"error":...}` another error | `Unknown` | `Unknown` |
/// | an HTML/text PHP fatal error with HTTP 200 (an extra key, `memory_limit`), after some rows | `Unknown` | `Unknown` |
/// | HTTP 500 | `Unknown` | `Unknown` |
/// | HTTP 502/503/504/429 from a proxy (may come after PHP stored the rows) | `Unknown` | `Unknown` |
/// | connection reset, timeout, a kept-alive connection closed under the POST (§10.1) | `Unknown` | `Unknown` |
/// | a redirect (not followed), a refused token or login | `Unknown` (kept in flight: harmless, the read-back settles it) | `Unknown` |
pub(super) fn what_a_post_proves(
    n: usize,
    before: i64,
    answer: &Result<i64, CmsError>,
) -> (Proof, bool) {
    match answer {
        Ok(last_id) => {
            // Each of the `n` inserts took a new id above every earlier one: a last id less than
            // `n` above the cursor means the CMS's ids went back.
            let went_back = *last_id > 0 && before > 0 && *last_id - before < n as i64;
            let proof = if n == 1 {
                Proof::Stored { last_id: *last_id }
            } else {
                Proof::LastStored { last_id: *last_id }
            };
            (proof, went_back)
        }
        Err(CmsError::LastRowFailed) => (Proof::LastNotStored, false),
        Err(CmsError::Invalid(_)) => (Proof::NoneStored, false),
        Err(_) => (Proof::Unknown, false),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn proves(n: usize, before: i64, answer: Result<i64, CmsError>) -> (Proof, bool) {
        what_a_post_proves(n, before, &answer)
    }

    #[test]
    fn success_proves_a_single_line_stored_and_only_the_last_of_a_batch() {
        assert_eq!(proves(1, 7, Ok(8)), (Proof::Stored { last_id: 8 }, false));
        // An id span of exactly n: no other writer came between, yet a middle row may be missing.
        assert_eq!(
            proves(3, 7, Ok(10)),
            (Proof::LastStored { last_id: 10 }, false)
        );
    }

    #[test]
    fn a_middle_row_that_failed_silently_leaves_the_batch_to_a_read_back() {
        // Rows 8 and 10 stored, 9 consumed by the failed insert: the answer is the same.
        assert_eq!(
            proves(3, 7, Ok(10)),
            (Proof::LastStored { last_id: 10 }, false)
        );
    }

    #[test]
    fn other_writers_rows_between_prove_nothing_more() {
        assert_eq!(
            proves(3, 7, Ok(42)),
            (Proof::LastStored { last_id: 42 }, false)
        );
        assert_eq!(proves(1, 7, Ok(42)), (Proof::Stored { last_id: 42 }, false));
    }

    #[test]
    fn ids_going_backwards_restart_the_cursor() {
        assert_eq!(
            proves(1, 500, Ok(12)),
            (Proof::Stored { last_id: 12 }, true)
        );
        assert_eq!(
            proves(3, 500, Ok(12)),
            (Proof::LastStored { last_id: 12 }, true)
        );
        // No cursor yet: nothing to go back from.
        assert_eq!(
            proves(3, 0, Ok(2)),
            (Proof::LastStored { last_id: 2 }, false)
        );
    }

    #[test]
    fn a_failed_last_insert_proves_the_last_line_not_stored() {
        assert_eq!(
            proves(1, 7, Err(CmsError::LastRowFailed)),
            (Proof::LastNotStored, false)
        );
        assert_eq!(
            proves(4, 7, Err(CmsError::LastRowFailed)),
            (Proof::LastNotStored, false)
        );
    }

    #[test]
    fn a_validation_error_proves_nothing_stored() {
        let invalid = || Err(CmsError::Invalid("Expected 3 parameters, 2 given".into()));
        assert_eq!(proves(1, 7, invalid()), (Proof::NoneStored, false));
        assert_eq!(proves(5, 7, invalid()), (Proof::NoneStored, false));
    }

    #[test]
    fn another_cms_error_proves_nothing() {
        let failed = Err(CmsError::Failed(
            "Storing token at the server side failed".into(),
        ));
        assert_eq!(proves(2, 7, failed), (Proof::Unknown, false));
    }

    #[test]
    fn a_php_fatal_error_after_some_rows_proves_nothing() {
        let fatal = Err(CmsError::Decode {
            status: 200,
            snippet: "Fatal error: Unknown column 'name'".into(),
        });
        assert_eq!(proves(3, 7, fatal), (Proof::Unknown, false));
    }

    #[test]
    fn a_5xx_proves_nothing() {
        let http = |status| {
            Err(CmsError::Http {
                status,
                retry_after: Some(Duration::from_secs(3600)),
                snippet: String::new(),
            })
        };
        for status in [500, 502, 503, 504, 429] {
            assert_eq!(proves(3, 7, http(status)), (Proof::Unknown, false));
            assert_eq!(proves(1, 7, http(status)), (Proof::Unknown, false));
        }
    }

    #[test]
    fn a_reset_a_timeout_or_a_closed_connection_proves_nothing() {
        for text in [
            "connection reset by peer",
            "operation timed out",
            "connection closed before message completed",
        ] {
            let lost = Err(CmsError::Transport(text.into()));
            assert_eq!(proves(3, 7, lost), (Proof::Unknown, false));
        }
    }

    #[test]
    fn a_redirect_or_a_refused_account_keeps_the_lines_unknown() {
        let redirect = Err(CmsError::Redirect {
            status: 302,
            host: "cms.example".into(),
        });
        assert_eq!(proves(2, 7, redirect), (Proof::Unknown, false));
        assert_eq!(
            proves(2, 7, Err(CmsError::Unauthorized)),
            (Proof::Unknown, false)
        );
    }
}
