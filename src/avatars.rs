//! `AvatarMapper`: speaker name → CMS user id.
//!
//! Order: `mapping.users`; else the avatar's UUID (from the viewer's avatar list, or the line's
//! `OwnerID`, which on OpenSim is the avatar's own UUID) looked up in the CMS, where only a confirmed
//! link on this grid counts. Results, found or not, are cached for `mapping.cache_ttl`. A failed lookup
//! never blocks delivery: the line goes out anonymous and the failure is cached briefly. A reload
//! replaces `mapping.users` (`set_users`) for the next line prepared. It does not touch the outbox.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::cms::CmsClient;
use crate::lookingglass::LookingGlassClient;
use crate::model::ZERO_UUID;

/// How long a failed lookup is remembered, so a CMS that is slow to answer costs one timeout per
/// speaker per half minute, not one per line.
const FAILURE_TTL: Duration = Duration::from_secs(30);

/// How often the viewer's avatar list may be fetched again for a name it did not know.
const AVATAR_LIST_REFRESH: Duration = Duration::from_secs(5);

/// Maps speakers to CMS users.
pub struct AvatarMapper {
    configured: RwLock<HashMap<String, i64>>,
    viewer: LookingGlassClient,
    cms: Arc<CmsClient>,
    ttl: Duration,
    cache: Mutex<HashMap<String, (Option<i64>, Instant)>>,
    avatar_list: Mutex<(HashMap<String, String>, Option<Instant>)>,
}

impl AvatarMapper {
    /// Builds the mapper; `configured` is `mapping.users`.
    pub fn new(
        configured: &std::collections::BTreeMap<String, i64>,
        viewer: LookingGlassClient,
        cms: Arc<CmsClient>,
        ttl: Duration,
    ) -> AvatarMapper {
        AvatarMapper {
            configured: RwLock::new(lower_cased(configured)),
            viewer,
            cms,
            ttl,
            cache: Mutex::new(HashMap::new()),
            avatar_list: Mutex::new((HashMap::new(), None)),
        }
    }

    /// Replaces `mapping.users` (a reload).
    pub fn set_users(&self, configured: &std::collections::BTreeMap<String, i64>) {
        *self
            .configured
            .write()
            .expect("mapping lock is never poisoned") = lower_cased(configured);
    }

    /// The CMS user of `speaker`, or `None` (anonymous).
    pub async fn resolve(&self, speaker: &str, owner_id: Option<&str>) -> Option<i64> {
        let name = speaker.trim().to_lowercase();
        let configured = self
            .configured
            .read()
            .expect("mapping lock is never poisoned")
            .get(&name)
            .copied();
        if let Some(id) = configured {
            return Some(id);
        }
        if let Some((user, expires)) = self
            .cache
            .lock()
            .expect("cache lock is never poisoned")
            .get(&name)
            && *expires > Instant::now()
        {
            return *user;
        }
        let uuid = match self.uuid_of(&name).await {
            Some(uuid) => Some(uuid),
            None => owner_id
                .filter(|o| *o != ZERO_UUID && o.len() == 36)
                .map(str::to_lowercase),
        };
        let (user, ttl) = match uuid {
            None => (None, self.ttl),
            Some(uuid) => match self.cms.avatar_user(&uuid).await {
                Ok(user) => (user, self.ttl),
                Err(err) => {
                    tracing::warn!(speaker, error = %err, "avatar lookup failed; the line goes out anonymous");
                    (None, FAILURE_TTL.min(self.ttl))
                }
            },
        };
        self.cache
            .lock()
            .expect("cache lock is never poisoned")
            .insert(name, (user, Instant::now() + ttl));
        user
    }

    async fn uuid_of(&self, name: &str) -> Option<String> {
        let stale = {
            let list = self
                .avatar_list
                .lock()
                .expect("avatar list lock is never poisoned");
            if let Some(uuid) = list.0.get(name) {
                return Some(uuid.clone());
            }
            list.1
                .is_none_or(|fetched| fetched.elapsed() >= AVATAR_LIST_REFRESH)
        };
        if !stale {
            return None;
        }
        match self.viewer.avatars().await {
            Ok(avatars) => {
                let uuid = avatars.get(name).cloned();
                *self
                    .avatar_list
                    .lock()
                    .expect("avatar list lock is never poisoned") = (avatars, Some(Instant::now()));
                uuid
            }
            Err(err) => {
                tracing::debug!(error = %err, "viewer avatar list unavailable");
                self.avatar_list
                    .lock()
                    .expect("avatar list lock is never poisoned")
                    .1 = Some(Instant::now());
                None
            }
        }
    }
}

/// `mapping.users` with its names trimmed and lower-cased, as speakers are looked up.
fn lower_cased(configured: &std::collections::BTreeMap<String, i64>) -> HashMap<String, i64> {
    configured
        .iter()
        .map(|(name, id)| (name.trim().to_lowercase(), *id))
        .collect()
}
