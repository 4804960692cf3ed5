//! `ChatApi`: the two chat requests delivery makes to the CMS, as a trait so that the delivery step
//! runs against a scripted CMS in unit tests; `CmsClient` is the real one.
//!
//! Owns nothing but the seam: no retries, no interpretation of the answers (that is the step's and
//! the proof's).

use std::future::Future;

use crate::cms::{ChatItem, CmsChat, CmsClient, CmsError};
use crate::zone::Zone;

/// The chat requests of delivery.
pub trait ChatApi: Send + Sync + 'static {
    /// POSTs a batch (`CmsClient::post_chats`): the id of the last row, and whether another request
    /// of this process shared the CMS while it ran (the pacer reads its time as a read's then).
    fn post(
        &self,
        items: &[ChatItem],
    ) -> impl Future<Output = (Result<i64, CmsError>, bool)> + Send;

    /// The rows stored at or after `since_unix` (`CmsClient::chats_since`): the CMS turns it into
    /// its own local wall-clock string and compares strings.
    fn read_since(
        &self,
        since_unix: i64,
    ) -> impl Future<Output = Result<Vec<CmsChat>, CmsError>> + Send;

    /// Whether the CMS has user `user_id` (`CmsClient::user_exists`): after a line's insert
    /// failed, a user it does not have is a cause of the line's own.
    fn user_exists(&self, user_id: i64) -> impl Future<Output = Result<bool, CmsError>> + Send;

    /// The CMS's UTC offset in seconds as its last login answer showed it, if known: a read-back
    /// also starts from it, so that a `cms.timezone` that disagrees cannot hide a row.
    fn offset_seen(&self) -> Option<i64> {
        None
    }
}

impl ChatApi for CmsClient {
    async fn post(&self, items: &[ChatItem]) -> (Result<i64, CmsError>, bool) {
        let mark = self.activity_mark();
        let posted = self.post_chats(items).await;
        (posted, self.overlapped_since(mark))
    }

    async fn read_since(&self, since_unix: i64) -> Result<Vec<CmsChat>, CmsError> {
        self.chats_since(since_unix).await
    }

    async fn user_exists(&self, user_id: i64) -> Result<bool, CmsError> {
        CmsClient::user_exists(self, user_id).await
    }

    fn offset_seen(&self) -> Option<i64> {
        let info = self.login_info();
        let (expires, answered_at) = info.expires?;
        crate::zone::cms_offset_seen(&expires, answered_at, info.user_id)
    }
}

/// What `run` warns of and `check` reports when `cms.timezone` (`zone`) disagrees with the CMS's own
/// clock as its last login answer showed it (`zone::cms_zone_disagreement`); `None` when they agree
/// or no login answered yet.
pub fn zone_disagreement(zone: Zone, cms: &CmsClient) -> Option<String> {
    let info = cms.login_info();
    let (expires, answered_at) = info.expires?;
    crate::zone::cms_zone_disagreement(zone, &expires, answered_at, info.user_id)
}

/// The `mapping.users` entries whose CMS user the CMS does not have (name, id), and the error of
/// the first lookup that failed, if one did. `-1` (anonymous) is never asked about.
pub async fn unknown_mapped_users(
    users: &std::collections::BTreeMap<String, i64>,
    cms: &CmsClient,
) -> (Vec<(String, i64)>, Option<CmsError>) {
    let mut unknown = Vec::new();
    for (name, id) in users.iter().filter(|(_, id)| **id != -1) {
        match cms.user_exists(*id).await {
            Ok(true) => {}
            Ok(false) => unknown.push((name.clone(), *id)),
            Err(err) => return (unknown, Some(err)),
        }
    }
    (unknown, None)
}

/// How `run` and `check` name the unknown `mapping.users` entries.
pub fn describe_unknown_users(unknown: &[(String, i64)]) -> String {
    let listed: Vec<String> = unknown
        .iter()
        .map(|(name, id)| format!("{name:?} = {id}"))
        .collect();
    format!(
        "mapping.users names users the cms does not have ({}): their lines fail their insert (chats.userId is a foreign key) and go to the dead letters after retry.max_line_failures tries",
        listed.join(", ")
    )
}
