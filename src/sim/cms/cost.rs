//! What a request costs the simulated CMS, and the account of the time it spent: the cost model of
//! a live OpenSim-CMS (PHP, MariaDB, Apache; spec §10 and §10.1), its PHP workers (a request waits
//! for a free one, so with one worker requests queue behind each other), and the busy time spent on
//! each kind of request (login, chat POST, chat GET, avatar lookup).
//!
//! Without a model (the default, "fast mode") the simulator answers as soon as it has done the work,
//! so what a benchmark measures is the relay's own cost; the busy time is then the simulator's real
//! processing time. With [`CostModel::php`] every request holds a worker for what the live instance
//! would take. It must not decide what a request does or answers (`routes` and the endpoints do):
//! it only prices the work they report.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::sim::cms::json::Json;

/// How many spans [`CmsHandle::busy_spans`](crate::sim::cms::CmsHandle::busy_spans) keeps.
const MAX_SPANS: usize = 100_000;

/// What each request costs the CMS and how many it works on at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CostModel {
    /// Every request that reaches PHP: start-up, the token check, the answer (spec §10: 2.1 ms for
    /// a one-line POST).
    pub per_request: Duration,
    /// Each chat row a POST inserts (one autocommit `INSERT`: 0.3 ms, spec §10).
    pub per_row_stored: Duration,
    /// Each chat row a GET returns (the `SELECT` and `getChatData`).
    pub per_row_read: Duration,
    /// Each returned row with a user, whose `getUserData` is one more query (spec §4, §10.1).
    pub per_user_joined: Duration,
    /// PHP workers: how many requests are worked on at once; the rest wait for one.
    pub workers: usize,
}

impl CostModel {
    /// The live instance of spec §10/§10.1 with one PHP worker: 2.1 ms a request, 0.3 ms a stored
    /// row, and a GET at 0.06 ms a row plus 0.04 ms a joined user (two minutes of a chat at 100
    /// lines/s, 12 000 rows, keep the worker busy for about 1.2 s: "a large share" of a 2 s poll).
    pub fn php() -> CostModel {
        CostModel {
            per_request: Duration::from_micros(2_100),
            per_row_stored: Duration::from_micros(300),
            per_row_read: Duration::from_micros(60),
            per_user_joined: Duration::from_micros(40),
            workers: 1,
        }
    }

    /// The same with `workers` PHP workers (at least one).
    pub fn with_workers(self, workers: usize) -> CostModel {
        CostModel {
            workers: workers.max(1),
            ..self
        }
    }

    /// What `work` costs.
    pub fn cost(&self, work: &Work) -> Duration {
        let times =
            |each: Duration, n: usize| each.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX));
        self.per_request
            + times(self.per_row_stored, work.rows_stored)
            + times(self.per_row_read, work.rows_read)
            + times(self.per_user_joined, work.users_joined)
    }
}

/// The kinds of request the busy time is accounted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// `POST /auth/…`.
    Login,
    /// `POST /grid/<g>/chats/`.
    ChatPost,
    /// `GET /grid/<g>/chats/…` (in-world reads and read-backs alike).
    ChatGet,
    /// `GET /grid/<g>/avatar/<uuid>/`.
    AvatarLookup,
    /// Everything else PHP answers (grids, users, unknown URLs).
    Other,
}

/// What one request made PHP do, as the route reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Work {
    /// Which kind of request.
    pub kind: RequestKind,
    /// Chat rows inserted.
    pub rows_stored: usize,
    /// Chat rows returned.
    pub rows_read: usize,
    /// Returned rows with a user (not anonymous).
    pub users_joined: usize,
}

impl Work {
    /// A request of `kind` that touched no chat row.
    pub(super) fn of(kind: RequestKind) -> Work {
        Work {
            kind,
            rows_stored: 0,
            rows_read: 0,
            users_joined: 0,
        }
    }

    /// A chat GET's rows and joined users, counted from its answer (a list of chat objects).
    pub(super) fn chat_get(answer: &Json) -> Work {
        let Json::Arr(items) = answer else {
            return Work::of(RequestKind::ChatGet);
        };
        let has_user = |item: &Json| {
            let Json::Obj(fields) = item else {
                return false;
            };
            fields.iter().any(|(key, value)| {
                key == "user"
                    && matches!(value, Json::Obj(user)
                        if user.iter().any(|(k, v)| k == "id" && !matches!(v, Json::Int(-1))))
            })
        };
        Work {
            kind: RequestKind::ChatGet,
            rows_stored: 0,
            rows_read: items.len(),
            users_joined: items.iter().filter(|item| has_user(item)).count(),
        }
    }
}

/// One request as a worker spent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusySpan {
    /// What it was and the rows it touched.
    pub work: Work,
    /// When a worker took it up.
    pub started: Instant,
    /// When the worker was done with it (before the answer was written).
    pub ended: Instant,
}

/// Requests and busy time of one kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindBusy {
    /// Requests worked on.
    pub n_requests: u64,
    /// Chat rows they stored or read.
    pub n_rows: u64,
    /// Worker time they took.
    pub busy: Duration,
    /// Time they waited for a free worker (behind other requests) before it.
    pub waited: Duration,
}

/// The CMS's busy time by kind of request, since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BusyTime {
    /// Logins.
    pub login: KindBusy,
    /// Chat POSTs.
    pub chat_post: KindBusy,
    /// Chat GETs.
    pub chat_get: KindBusy,
    /// Avatar lookups.
    pub avatar_lookup: KindBusy,
    /// Everything else.
    pub other: KindBusy,
}

impl BusyTime {
    /// The account of one kind.
    pub fn of(&self, kind: RequestKind) -> KindBusy {
        match kind {
            RequestKind::Login => self.login,
            RequestKind::ChatPost => self.chat_post,
            RequestKind::ChatGet => self.chat_get,
            RequestKind::AvatarLookup => self.avatar_lookup,
            RequestKind::Other => self.other,
        }
    }

    fn of_mut(&mut self, kind: RequestKind) -> &mut KindBusy {
        match kind {
            RequestKind::Login => &mut self.login,
            RequestKind::ChatPost => &mut self.chat_post,
            RequestKind::ChatGet => &mut self.chat_get,
            RequestKind::AvatarLookup => &mut self.avatar_lookup,
            RequestKind::Other => &mut self.other,
        }
    }

    /// The sum over every kind.
    pub fn total(&self) -> Duration {
        self.login.busy
            + self.chat_post.busy
            + self.chat_get.busy
            + self.avatar_lookup.busy
            + self.other.busy
    }

    /// `{"chat_get":{"requests":n,"rows":n,"busy_ms":x,"waited_ms":x},…}` for the sim-only
    /// `/sim/busy`.
    pub(super) fn to_json(self) -> String {
        let kinds = [
            ("login", self.login),
            ("chat_post", self.chat_post),
            ("chat_get", self.chat_get),
            ("avatar_lookup", self.avatar_lookup),
            ("other", self.other),
        ];
        let fields: Vec<String> = kinds
            .iter()
            .map(|(name, kind)| {
                format!(
                    "\"{name}\":{{\"requests\":{},\"rows\":{},\"busy_ms\":{:.3},\"waited_ms\":{:.3}}}",
                    kind.n_requests,
                    kind.n_rows,
                    kind.busy.as_secs_f64() * 1000.0,
                    kind.waited.as_secs_f64() * 1000.0
                )
            })
            .collect();
        format!("{{{}}}\n", fields.join(","))
    }
}

/// The model in force, its workers and the account, shared by every request.
#[derive(Default)]
pub(super) struct Meter {
    /// `None`: fast mode.
    model: Mutex<Option<(CostModel, Arc<Semaphore>)>>,
    account: Mutex<Account>,
}

#[derive(Default)]
struct Account {
    totals: BusyTime,
    /// The newest `MAX_SPANS`, oldest first.
    spans: VecDeque<BusySpan>,
}

/// A request's hold on a PHP worker (nothing in fast mode).
pub(super) struct Worker {
    model: Option<CostModel>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Meter {
    /// Puts `model` in force for the requests that start from now (`None`: fast mode).
    pub(super) fn set(&self, model: Option<CostModel>) {
        *lock(&self.model) = model.map(|model| {
            let model = model.with_workers(model.workers);
            (model, Arc::new(Semaphore::new(model.workers)))
        });
    }

    /// Waits for a free worker.
    pub(super) async fn worker(&self) -> Worker {
        let current = lock(&self.model).clone();
        match current {
            None => Worker {
                model: None,
                _permit: None,
            },
            Some((model, workers)) => Worker {
                model: Some(model),
                // The semaphore is never closed, so acquiring fails only in theory.
                _permit: workers.acquire_owned().await.ok(),
            },
        }
    }

    /// Holds `worker` until `work` has cost what the model says (counted from `started`), then
    /// accounts it, with the time it `waited` for the worker.
    pub(super) async fn spend(
        &self,
        worker: &Worker,
        work: Work,
        started: Instant,
        waited: Duration,
    ) {
        if let Some(model) = worker.model {
            tokio::time::sleep_until((started + model.cost(&work)).into()).await;
        }
        let span = BusySpan {
            work,
            started,
            ended: Instant::now(),
        };
        let mut account = lock(&self.account);
        let kind = account.totals.of_mut(work.kind);
        kind.n_requests += 1;
        kind.n_rows += (work.rows_stored + work.rows_read) as u64;
        kind.busy += span.ended - span.started;
        kind.waited += waited;
        if account.spans.len() == MAX_SPANS {
            account.spans.pop_front();
        }
        account.spans.push_back(span);
    }

    pub(super) fn totals(&self) -> BusyTime {
        lock(&self.account).totals
    }

    pub(super) fn spans(&self) -> Vec<BusySpan> {
        lock(&self.account).spans.iter().copied().collect()
    }
}

/// A poisoned lock holds counters only: used as is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_get_costs_in_proportion_to_its_rows_and_joined_users() {
        let model = CostModel::php();
        let get = |rows_read, users_joined| Work {
            rows_read,
            users_joined,
            ..Work::of(RequestKind::ChatGet)
        };
        assert_eq!(model.cost(&get(0, 0)), Duration::from_micros(2_100));
        assert_eq!(
            model.cost(&get(12_000, 12_000)),
            Duration::from_micros(2_100 + 12_000 * 100)
        );
        assert!(model.cost(&get(100, 0)) < model.cost(&get(100, 100)));
        let post = Work {
            rows_stored: 100,
            ..Work::of(RequestKind::ChatPost)
        };
        assert_eq!(model.cost(&post), Duration::from_micros(2_100 + 30_000));
        assert_eq!(CostModel::php().with_workers(0).workers, 1);
    }
}
