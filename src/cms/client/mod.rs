//! `CmsClient`: chat POST and GET, the avatar lookup and the grid, each request with the token. The
//! token's rules and the login are `login`'s; what may be shown of an answer that can echo a secret is
//! `scrub`'s. The three files are one room: nothing outside `cms::client` holds the password or the
//! token (redirects and TLS included).
//!
//! Owns the token and the rules around it (query string only, bound to our address, 30-minute sliding
//! expiry, log in again on a refusal). The token and the password never leave this module: URLs are
//! stripped from errors and nothing here logs a URL with a query.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::Method;
use reqwest::header::{LOCATION, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use crate::cms::error::CmsError;
use crate::cms::wire::{self, ChatAnswer, ChatItem, CmsChat, PostReply};
use crate::config::{CmsSettings, ConfigError};

mod login;
mod scrub;

use scrub::{Secret, scrub};

use login::{DEFAULT_LOGIN_RETRY, LoginGate, Token};
pub use login::{LoginInfo, LoginState};

/// How long an idle connection to the CMS is kept for the next request: below Apache's stock
/// `KeepAliveTimeout` of 5 s, with a second's margin for a busy machine.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Where the CMS and how to log in.
#[derive(Debug, Clone)]
pub struct CmsEndpoint {
    /// E.g. `http://127.0.0.1/OpenSim-CMS/api`.
    pub base_url: String,
    /// `grids.id`
    pub grid_id: u32,
    /// The relay's account.
    pub username: String,
    /// Its password.
    pub password: SecretString,
    /// Limit on one request.
    pub timeout: Duration,
    /// Bodies larger than this are refused.
    pub max_response_bytes: usize,
    /// Trusted for the CMS's certificate besides the system's store (`cms.ca_file`).
    pub ca_certificates: Vec<reqwest::Certificate>,
}

impl CmsEndpoint {
    /// The endpoint `[cms]` names: the password (read from `cms.password_file` when that is set) and
    /// the certificates of `cms.ca_file` loaded here, so that the password goes from `config`
    /// straight to the client. An unreadable file is an error naming its key.
    pub fn from_settings(cms: &CmsSettings) -> Result<CmsEndpoint, ConfigError> {
        Ok(CmsEndpoint {
            base_url: cms.base_url.clone(),
            grid_id: cms.grid_id,
            username: cms.username.clone(),
            password: cms.load_password()?,
            timeout: cms.request_timeout,
            max_response_bytes: cms.max_response_bytes,
            ca_certificates: cms.load_ca_certificates()?,
        })
    }
}

/// One CMS answer, read to its end, its JSON found once (`wire::json_start` skips PHP noise in
/// front). Held as its body only: each caller reads the JSON into what it keeps (typed rows for a
/// chat GET, a `Value` for the small answers), so an answer costs a small multiple of its size.
struct Answer {
    status: u16,
    retry_after: Option<Duration>,
    /// The raw body, for error snippets.
    body: Vec<u8>,
    /// Where its JSON starts; `None` when it is none (a PHP fatal error page, a proxy's page).
    json_at: Option<usize>,
}

impl Answer {
    /// The JSON document of the body.
    fn json(&self) -> Option<&[u8]> {
        self.json_at.map(|at| &self.body[at..])
    }

    /// The JSON as a `Value`: for the small answers only (`wire::MAX_VALUE_BYTES`).
    fn value(&self) -> Option<Value> {
        wire::value_of(self.json()?)
    }
}

/// The relay account's own record, read by `check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnAccount {
    /// `users.id`
    pub user_id: i64,
    /// Module → level (0 none, 4 read, 5 execute, 6 write, 7 all).
    pub permissions: std::collections::BTreeMap<String, i64>,
}

/// A client of one CMS grid.
pub struct CmsClient {
    http: reqwest::Client,
    endpoint: CmsEndpoint,
    /// The token every request uses. Only read and replaced here, never held across a request, so
    /// delivery, the in-world reads and the avatar lookups do not wait for each other.
    token: std::sync::Mutex<Option<Token>>,
    /// Held while logging in: tasks that find no usable token queue here, and all but the first
    /// find the token the first one got (one login however many need it at once).
    login_lock: tokio::sync::Mutex<()>,
    /// The last token's `generation`.
    n_generations: AtomicU64,
    n_logins: AtomicU64,
    /// Short critical sections, no `.await` while held.
    login_state: std::sync::Mutex<(LoginState, LoginInfo)>,
    /// When the next login may be tried after failed ones (shared by every task that needs one).
    login_gate: std::sync::Mutex<LoginGate>,
    /// Requests begun and still in flight, by every task: whether two of them shared the CMS.
    n_begun: AtomicU64,
    n_in_flight: AtomicUsize,
}

/// The client's requests at one moment (`CmsClient::activity_mark`), to tell afterwards whether
/// another request shared the CMS with one (`CmsClient::overlapped_since`).
#[derive(Debug, Clone, Copy)]
pub struct ActivityMark {
    n_begun: u64,
    n_in_flight: usize,
}

/// Counts a request in flight until dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl CmsClient {
    /// A client of a CMS that is never there (nothing listens at port 9), for the tests of a stage
    /// that holds a client it must not use.
    #[cfg(test)]
    pub(crate) fn unreachable() -> CmsClient {
        CmsClient::new(CmsEndpoint {
            base_url: "http://127.0.0.1:9/OpenSim-CMS/api".into(),
            grid_id: 1,
            username: "relay".into(),
            password: "secret".into(),
            timeout: Duration::from_secs(1),
            max_response_bytes: 1 << 20,
            ca_certificates: Vec::new(),
        })
        .expect("a client of an address")
    }

    /// Builds the client.
    pub fn new(mut endpoint: CmsEndpoint) -> Result<CmsClient, reqwest::Error> {
        endpoint.base_url = endpoint.base_url.trim_end_matches('/').to_owned();
        let http = reqwest::Client::builder()
            // PHP's getallheaders() is case-sensitive: a lower-case `content-type` hides a JSON array
            // from the CMS (spec §1.4).
            .http1_title_case_headers()
            .no_proxy()
            // A redirect would re-send the password (a 307 on login) or the token in the query to
            // wherever it points: never followed, a 3xx is an error (`redirect_error`).
            .redirect(reqwest::redirect::Policy::none())
            .timeout(endpoint.timeout)
            .connect_timeout(endpoint.timeout.min(Duration::from_secs(10)))
            // Requests run side by side (delivery, in-world reads, avatar lookups), each kept alive
            // on its own connection; the token is bound to the address, not to a connection.
            .pool_max_idle_per_host(4)
            // Apache closes a kept-alive connection after 5 s idle (spec §10.1); a request sent on
            // one as it closes fails with no answer, an unknown outcome. Idle ones are dropped
            // before that (reqwest's default keeps them 90 s).
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .user_agent(concat!("opensim-chat-relay/", env!("CARGO_PKG_VERSION")));
        // Trusted: the system's store, the bundled web roots, and `cms.ca_file`.
        let http = endpoint
            .ca_certificates
            .iter()
            .fold(http, |builder, certificate| {
                builder.add_root_certificate(certificate.clone())
            })
            .build()?;
        Ok(CmsClient {
            http,
            endpoint,
            token: std::sync::Mutex::new(None),
            login_lock: tokio::sync::Mutex::new(()),
            n_generations: AtomicU64::new(0),
            n_logins: AtomicU64::new(0),
            login_state: std::sync::Mutex::new((LoginState::NotYet, LoginInfo::default())),
            login_gate: std::sync::Mutex::new(LoginGate {
                policy: DEFAULT_LOGIN_RETRY,
                n_failed: 0,
                not_before: None,
                last: String::new(),
            }),
            n_begun: AtomicU64::new(0),
            n_in_flight: AtomicUsize::new(0),
        })
    }

    /// The requests begun so far and in flight now, taken right before a request.
    pub fn activity_mark(&self) -> ActivityMark {
        ActivityMark {
            n_begun: self.n_begun.load(Ordering::Relaxed),
            n_in_flight: self.n_in_flight.load(Ordering::Relaxed),
        }
    }

    /// Whether a request other than the one begun right after `mark` was in flight at the mark
    /// or began since: a CMS with few PHP workers answered the two one after the other, so the
    /// time of one says as much about the other as about the CMS.
    pub fn overlapped_since(&self, mark: ActivityMark) -> bool {
        mark.n_in_flight > 0 || self.n_begun.load(Ordering::Relaxed) > mark.n_begun + 1
    }

    /// The CMS's base URL (no secret in it).
    pub fn base_url(&self) -> &str {
        &self.endpoint.base_url
    }

    /// `GET /user/<own id>/`: the account's own permissions (logs in first when needed). Needs
    /// `user` ≥ 4; a refusal is `CmsError::Unauthorized`.
    pub async fn own_permissions(&self) -> Result<OwnAccount, CmsError> {
        if self.login_info().user_id.is_none() {
            self.login().await?;
        }
        let Some(user_id) = self.login_info().user_id else {
            return Err(CmsError::Login(
                "the login answer carries no userId".to_owned(),
            ));
        };
        let value = self.get_json(&format!("/user/{user_id}/")).await?;
        if let Some(error) = wire::error_of(&value) {
            return Err(CmsError::Failed(error.to_owned()));
        }
        let permissions = wire::permissions_of(&value).ok_or_else(|| CmsError::Decode {
            status: 200,
            snippet: self.shown(value.to_string().as_bytes()),
        })?;
        Ok(OwnAccount {
            user_id,
            permissions,
        })
    }

    /// Whether the CMS has user `user_id` (`GET /user/<id>/`, needs `user` ≥ 4): a chat row with an
    /// unknown `userId` fails its foreign key (spec §3.3), so `run` and `check` ask this of every
    /// `mapping.users` id, and delivery of a line whose lone insert failed.
    pub async fn user_exists(&self, user_id: i64) -> Result<bool, CmsError> {
        let value = self.get_json(&format!("/user/{user_id}/")).await?;
        match wire::error_of(&value) {
            Some("User not found") => Ok(false),
            Some(error) => Err(CmsError::Failed(error.to_owned())),
            None => Ok(true),
        }
    }

    /// POSTs a batch to `/grid/<g>/chats/`; the id of the last row on success.
    pub async fn post_chats(&self, items: &[ChatItem]) -> Result<i64, CmsError> {
        let path = format!("/grid/{}/chats/", self.endpoint.grid_id);
        let answer = self
            .call(Method::POST, &path, Some(wire::encode_batch(items)))
            .await?;
        match answer.json().and_then(wire::post_reply_in) {
            Some(PostReply::Stored { last_id }) => Ok(last_id),
            Some(PostReply::Invalid(error)) => Err(CmsError::Invalid(error)),
            Some(PostReply::LastRowFailed) => Err(CmsError::LastRowFailed),
            Some(PostReply::Failed(error)) => Err(CmsError::Failed(error)),
            None => Err(self.unreadable(&answer)),
        }
    }

    /// The chat rows stored at or after `since_unix` (read in the CMS's zone), in the order the CMS
    /// returns them. Never calls the form without a timestamp: it returns the whole history.
    pub async fn chats_since(&self, since_unix: i64) -> Result<Vec<CmsChat>, CmsError> {
        let path = format!(
            "/grid/{}/chats/{}/",
            self.endpoint.grid_id,
            since_unix.max(0)
        );
        let answer = self.call(Method::GET, &path, None).await?;
        match answer.json().and_then(wire::parse_chat_answer) {
            Some(ChatAnswer::Rows(rows)) => Ok(rows),
            Some(ChatAnswer::Failed(Some(error))) => Err(CmsError::Failed(error)),
            Some(ChatAnswer::Failed(None)) => Err(CmsError::Decode {
                status: answer.status,
                snippet: self.shown(&answer.body),
            }),
            None => Err(self.unreadable(&answer)),
        }
    }

    /// The CMS user linked to an avatar by a confirmed link on this grid; `None` when there is none.
    pub async fn avatar_user(&self, uuid: &str) -> Result<Option<i64>, CmsError> {
        // The route only accepts lower-case UUIDs (spec §1.1).
        let path = format!(
            "/grid/{}/avatar/{}/",
            self.endpoint.grid_id,
            uuid.to_lowercase()
        );
        let value = self.get_json(&path).await?;
        if wire::error_of(&value).is_some() {
            return Ok(None);
        }
        Ok(wire::confirmed_user(&value, self.endpoint.grid_id))
    }

    /// `GET /grid/<g>/`: whether the grid exists (used by `check`).
    pub async fn grid_exists(&self) -> Result<bool, CmsError> {
        let value = self
            .get_json(&format!("/grid/{}/", self.endpoint.grid_id))
            .await?;
        Ok(wire::error_of(&value).is_none())
    }

    async fn get_json(&self, path: &str) -> Result<Value, CmsError> {
        let answer = self.call(Method::GET, path, None).await?;
        match answer.value() {
            Some(value) => Ok(value),
            None => Err(self.unreadable(&answer)),
        }
    }

    /// One authenticated request, logging in again once when the CMS refuses the token. A transient
    /// status (408, 429, 5xx) is `CmsError::Http`; any other answer comes back parsed.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, CmsError> {
        self.n_begun.fetch_add(1, Ordering::Relaxed);
        self.n_in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(&self.n_in_flight);
        let mut refused_generation = None;
        for attempt in 0..2 {
            let (current, generation) = self.token_for_request(refused_generation).await?;
            let url = format!(
                "{}{}?token={}",
                self.endpoint.base_url,
                path,
                current.expose_secret()
            );
            let mut request = self.http.request(method.clone(), url);
            if let Some(body) = &body {
                // A Vec body gets a Content-Length; the CMS reads nothing from a chunked body.
                request = request
                    .header("Content-Type", "application/json")
                    .body(body.clone());
            }
            // A request that fails in transport says nothing about the token: it stays for the
            // retry rather than logging in again each time.
            let response = request.send().await.map_err(CmsError::transport)?;
            if let Some(err) = redirect_error(&response) {
                return Err(err);
            }
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = self.read_body(response).await?;
            let json_at = wire::json_start(&body);
            let refused = status == 401
                || json_at
                    .and_then(|at| wire::error_in(&body[at..]))
                    .as_deref()
                    == Some(wire::UNAUTHORIZED);
            if !refused {
                self.set_login_state(LoginState::Valid);
                // A proxy's 502 or 503 says nothing of the token; the CMS's own answers do.
                self.token_answered(generation, !is_transient_status(status));
                if is_transient_status(status) {
                    return Err(CmsError::Http {
                        status,
                        retry_after,
                        snippet: self.shown(&body),
                    });
                }
                return Ok(Answer {
                    status,
                    retry_after,
                    body,
                    json_at,
                });
            }
            if self.token_refused(generation) {
                // A fresh login would get a token the CMS refuses alike (or this route is not
                // the account's): the refusal is the answer, and the next login waits.
                return Err(CmsError::Unauthorized);
            }
            tracing::info!(attempt, "cms refused the token; logging in again");
            refused_generation = Some(generation);
        }
        // Not a failed login: a refusal can mean this route needs a permission the account lacks
        // (spec §2.2: "no token" and "not allowed" look alike), and other routes may work.
        self.set_login_state(LoginState::Failed(CmsError::Unauthorized.to_string()));
        Err(CmsError::Unauthorized)
    }

    /// An answer that is not the CMS's JSON: a PHP fatal error page when the status says 200, a
    /// proxy's or server's page otherwise.
    fn unreadable(&self, answer: &Answer) -> CmsError {
        if answer.status == 200 {
            CmsError::Decode {
                status: answer.status,
                snippet: self.shown(&answer.body),
            }
        } else {
            CmsError::Http {
                status: answer.status,
                retry_after: answer.retry_after,
                snippet: self.shown(&answer.body),
            }
        }
    }

    /// What may be shown of an answer to this client (`scrub`): an error page can print the
    /// request, its form body (the password) or its query (the token), in any encoding.
    fn shown(&self, body: &[u8]) -> String {
        let token = self.lock_token().as_ref().map(|held| held.value.clone());
        scrub(
            body,
            &[
                Secret {
                    value: self.endpoint.password.expose_secret(),
                    mask: "[password]",
                },
                Secret {
                    value: token.as_ref().map_or("", |t| t.expose_secret()),
                    mask: "[token]",
                },
            ],
        )
    }

    async fn read_body(&self, mut response: reqwest::Response) -> Result<Vec<u8>, CmsError> {
        let status = response.status().as_u16();
        // Sized once from Content-Length (within the bound): growing by doubling would hold up to
        // three times the body while it is copied.
        let expected = response.content_length().map_or(0, |n| {
            n.min(self.endpoint.max_response_bytes as u64) as usize
        });
        let mut body = Vec::with_capacity(expected);
        while let Some(chunk) = response.chunk().await.map_err(CmsError::transport)? {
            if body.len() + chunk.len() > self.endpoint.max_response_bytes {
                return Err(CmsError::Decode {
                    status,
                    snippet: format!(
                        "answer larger than {} bytes refused",
                        self.endpoint.max_response_bytes
                    ),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// A 3xx as an error naming only the host it points to (a relative `Location` points to the CMS
/// itself). The request's URL, which the `Location` is resolved against, holds the token: only its
/// host leaves this function.
fn redirect_error(response: &reqwest::Response) -> Option<CmsError> {
    if !response.status().is_redirection() {
        return None;
    }
    let target = response
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|location| response.url().join(location).ok());
    let host = match target
        .as_ref()
        .and_then(|url| Some((url.host_str()?, url.port())))
    {
        Some((host, Some(port))) => format!("{host}:{port}"),
        Some((host, None)) => host.to_owned(),
        None => "an address it did not give (no usable Location)".to_owned(),
    };
    Some(CmsError::Redirect {
        status: response.status().as_u16(),
        host,
    })
}

fn is_transient_status(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}
