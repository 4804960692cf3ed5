//! `AvatarMapper`: speaker name → CMS user id.
//!
//! Order: `mapping.users`; else the avatar's UUID (from the viewer's avatar list, or the line's
//! `OwnerID`, which on OpenSim is the avatar's own UUID) looked up in the CMS, where only a confirmed
//! link on this grid counts. Results, found or not, are cached for `mapping.cache_ttl`. A failed lookup
//! never blocks delivery: the line goes out anonymous and the failure is cached briefly. The avatar
//! lists are the last ones `lookingglass::facts` read, one per region's viewer (an avatar's name is
//! unique on its grid, so whichever region lists it gives its UUID): a name missing from them asks
//! for fresh ones
//! without waiting, so the viewer never delays delivery. A reload replaces `mapping.users`
//! (`set_users`) for the next line prepared. It does not touch the outbox or the viewer.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::cms::CmsClient;
use crate::lookingglass::ViewerFacts;
use crate::model::ZERO_UUID;

/// How long a failed lookup is remembered, so a CMS that is slow to answer costs one timeout per
/// speaker per half minute, not one per line; also how long a speaker whose avatar nobody named (not
/// in the avatar list, no `OwnerID`) stays anonymous before the list, read again meanwhile, is asked.
const FAILURE_TTL: Duration = Duration::from_secs(30);

/// Maps speakers to CMS users.
pub struct AvatarMapper {
    configured: RwLock<HashMap<String, i64>>,
    facts: Vec<Arc<ViewerFacts>>,
    cms: Arc<CmsClient>,
    ttl: Duration,
    cache: Mutex<HashMap<String, (Option<i64>, Instant)>>,
}

impl AvatarMapper {
    /// Builds the mapper; `configured` is `mapping.users`.
    pub fn new(
        configured: &std::collections::BTreeMap<String, i64>,
        facts: Vec<Arc<ViewerFacts>>,
        cms: Arc<CmsClient>,
        ttl: Duration,
    ) -> AvatarMapper {
        AvatarMapper {
            configured: RwLock::new(lower_cased(configured)),
            facts,
            cms,
            ttl,
            cache: Mutex::new(HashMap::new()),
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
        let uuid = match self.facts.iter().find_map(|facts| facts.avatar_uuid(&name)) {
            Some(uuid) => Some(uuid),
            None => {
                for facts in &self.facts {
                    facts.want_avatars();
                }
                owner_id
                    .filter(|o| *o != ZERO_UUID && o.len() == 36)
                    .map(str::to_lowercase)
            }
        };
        let (user, ttl) = match uuid {
            None => (None, FAILURE_TTL.min(self.ttl)),
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
}

/// `mapping.users` with its names trimmed and lower-cased, as speakers are looked up.
fn lower_cased(configured: &std::collections::BTreeMap<String, i64>) -> HashMap<String, i64> {
    configured
        .iter()
        .map(|(name, id)| (name.trim().to_lowercase(), *id))
        .collect()
}
