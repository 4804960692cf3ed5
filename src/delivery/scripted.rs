//! A scripted CMS for the delivery tests: a model of the stock CMS's chat table (every insert
//! consumes an id, stored or not; an unknown `userId` fails its foreign key; reads compare local
//! wall-clock strings in the CMS's zone, spec §3.2 and §10.2) with faults queued by the test.
//!
//! Test-only. Must not: do I/O or sleep (a read waits only for a gate the test opens), so that
//! tests stay fast and deterministic.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use chrono::TimeZone;
use chrono_tz::Tz;

use crate::cms::{ChatItem, CmsChat, CmsError};
use crate::delivery::{ChatApi, lock};

/// What the next POST meets instead of a plain insert.
#[derive(Debug, Clone)]
pub(crate) enum PostFault {
    /// An HTTP error before anything is stored (a proxy, a maintenance page).
    Http {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// The rows are inserted, then the answer is lost (a reset or a timeout).
    LostAfterStore,
    /// Nothing is stored and no answer comes.
    LostBeforeStore,
    /// The rows are inserted and the relay dies before the answer comes: the POST never ends (the
    /// test drops the step, as a kill would).
    DieAfterStore,
    /// The relay dies while the POST is on its way, before the CMS read it.
    DieBeforeStore,
}

/// The CMS's state.
#[derive(Debug)]
pub(crate) struct Model {
    pub zone: Tz,
    /// Every stored row, in insert order.
    pub rows: Vec<CmsChat>,
    pub last_id: i64,
    pub users: HashSet<i64>,
    /// The database cannot insert (disk full, lost connection): every insert fails.
    pub inserts_fail: bool,
    pub post_faults: VecDeque<PostFault>,
    /// A read that returns more rows than this dies of the memory limit.
    pub max_read_rows: usize,
    pub n_posts: usize,
    pub n_reads: usize,
    /// Rows the reads returned, all of them.
    pub n_rows_read: usize,
    /// Every read is answered by a maintenance page (HTTP 503 with this `Retry-After`).
    pub reads_down: Option<Duration>,
    /// POSTs too get that page.
    pub posts_down: bool,
    /// Reads that start in the future (delivery's probe) get that page too, whatever `reads_down`
    /// says: a test that must tell a probe's answer from new lines.
    pub probes_down: bool,
    /// The UTC offset its login answer showed (`ChatApi::offset_seen`).
    pub offset_seen: Option<i64>,
    /// When set, a read is answered only once the test adds a permit (a slow read of a busy PHP
    /// worker); it then reads the rows stored by that moment.
    pub read_gate: Option<std::sync::Arc<tokio::sync::Semaphore>>,
}

/// The scripted CMS.
#[derive(Debug)]
pub(crate) struct ScriptedCms {
    pub model: Mutex<Model>,
}

impl ScriptedCms {
    /// A CMS in `zone` that knows `users`.
    pub(crate) fn new(zone: Tz, users: &[i64]) -> ScriptedCms {
        ScriptedCms {
            model: Mutex::new(Model {
                zone,
                rows: Vec::new(),
                last_id: 0,
                users: users.iter().copied().collect(),
                inserts_fail: false,
                post_faults: VecDeque::new(),
                max_read_rows: usize::MAX,
                n_posts: 0,
                n_reads: 0,
                n_rows_read: 0,
                offset_seen: None,
                reads_down: None,
                posts_down: false,
                probes_down: false,
                read_gate: None,
            }),
        }
    }

    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut Model) -> T) -> T {
        f(&mut lock(&self.model))
    }

    /// The messages of the relay's rows (`fromCMS = 0`), in id order.
    pub(crate) fn relay_messages(&self) -> Vec<String> {
        self.with(|m| {
            m.rows
                .iter()
                .filter(|r| !r.from_cms)
                .map(|r| r.message.clone())
                .collect()
        })
    }

    /// Another writer (a CMS web user) stores a row now.
    pub(crate) fn other_writer(&self, message: &str, timestamp: &str) {
        self.with(|m| {
            m.last_id += 1;
            let id = m.last_id;
            m.rows.push(row(id, 3, message, timestamp, true));
        });
    }
}

impl Model {
    /// `INSERT` of one element: consumes an id whether or not it is stored.
    fn insert(&mut self, item: &ChatItem) -> bool {
        self.last_id += 1;
        let known = item.user_id == -1 || self.users.contains(&item.user_id);
        if self.inserts_fail || !known {
            return false;
        }
        let user_id = item.user_id;
        let id = self.last_id;
        self.rows
            .push(row(id, user_id, &item.message, &item.timestamp, false));
        true
    }

    /// The stock POST: each element in order, no transaction; the answer speaks of the last only.
    fn post(&mut self, items: &[ChatItem]) -> Result<i64, CmsError> {
        self.n_posts += 1;
        let fault = self.post_faults.pop_front();
        if let Some(PostFault::Http {
            status,
            retry_after,
        }) = fault
        {
            return Err(CmsError::Http {
                status,
                retry_after,
                snippet: "maintenance".into(),
            });
        }
        if let Some(retry_after) = self.reads_down.filter(|_| self.posts_down) {
            return Err(CmsError::Http {
                status: 503,
                retry_after: Some(retry_after),
                snippet: "maintenance".into(),
            });
        }
        if let Some(PostFault::LostBeforeStore) = fault {
            return Err(CmsError::Transport("connection reset".into()));
        }
        let mut last = false;
        for item in items {
            last = self.insert(item);
        }
        if let Some(PostFault::LostAfterStore) = fault {
            return Err(CmsError::Transport("operation timed out".into()));
        }
        if last {
            Ok(self.last_id)
        } else {
            Err(CmsError::LastRowFailed)
        }
    }

    /// `timestamp >= date('Y-m-d H:i:s', unix)` in the CMS's zone, compared as strings, newest
    /// first.
    fn read(&mut self, since_unix: i64) -> Result<Vec<CmsChat>, CmsError> {
        self.n_reads += 1;
        let probe = since_unix > chrono::Utc::now().timestamp() + 3600;
        if let Some(retry_after) = self
            .reads_down
            .or(Some(Duration::from_secs(3600)).filter(|_| probe && self.probes_down))
        {
            return Err(CmsError::Http {
                status: 503,
                retry_after: Some(retry_after),
                snippet: "maintenance".into(),
            });
        }
        let since = self
            .zone
            .timestamp_opt(since_unix.max(0), 0)
            .single()
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default();
        let mut rows: Vec<CmsChat> = self
            .rows
            .iter()
            .filter(|r| r.timestamp >= since)
            .cloned()
            .collect();
        if rows.len() > self.max_read_rows {
            return Err(memory_limit());
        }
        rows.sort_by(|a, b| b.timestamp.cmp(&a.timestamp));
        self.n_rows_read += rows.len();
        Ok(rows)
    }
}

fn memory_limit() -> CmsError {
    CmsError::Decode {
        status: 200,
        snippet: "Fatal error: Allowed memory size of 134217728 bytes exhausted".into(),
    }
}

/// A stored row as the CMS returns it.
pub(crate) fn row(
    id: i64,
    user_id: i64,
    message: &str,
    timestamp: &str,
    from_cms: bool,
) -> CmsChat {
    CmsChat {
        id,
        user_id,
        username: String::new(),
        first_name: String::new(),
        last_name: String::new(),
        message: message.into(),
        timestamp: timestamp.into(),
        from_cms,
    }
}

impl ChatApi for ScriptedCms {
    async fn post(&self, items: &[ChatItem]) -> (Result<i64, CmsError>, bool) {
        let dies = self.with(|m| match m.post_faults.front() {
            Some(PostFault::DieAfterStore | PostFault::DieBeforeStore) => {
                let stores = matches!(m.post_faults.pop_front(), Some(PostFault::DieAfterStore));
                m.n_posts += 1;
                if stores {
                    items.iter().for_each(|item| {
                        m.insert(item);
                    });
                }
                true
            }
            _ => false,
        });
        if dies {
            std::future::pending::<()>().await;
        }
        (self.with(|m| m.post(items)), false)
    }

    async fn read_since(&self, since_unix: i64) -> Result<Vec<CmsChat>, CmsError> {
        let gate = self.with(|m| m.read_gate.clone());
        if let Some(gate) = gate {
            gate.acquire().await.expect("the gate stays open").forget();
        }
        self.with(|m| m.read(since_unix))
    }

    async fn user_exists(&self, user_id: i64) -> Result<bool, CmsError> {
        Ok(self.with(|m| m.users.contains(&user_id)))
    }

    fn offset_seen(&self) -> Option<i64> {
        self.with(|m| m.offset_seen)
    }
}
