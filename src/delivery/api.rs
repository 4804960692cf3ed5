//! `ChatApi`: the two chat requests delivery makes to the CMS, as a trait so that the delivery step
//! runs against a scripted CMS in unit tests; `CmsClient` is the real one.
//!
//! Owns nothing but the seam: no retries, no interpretation of the answers (that is the step's and
//! the proof's).

use std::future::Future;

use crate::cms::{ChatItem, CmsChat, CmsClient, CmsError};

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
}
