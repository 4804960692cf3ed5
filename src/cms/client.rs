//! `CmsClient`: login, token upkeep, chat POST and GET, and the avatar lookup.
//! Longer than 600 lines on purpose: one concern, the secrets and the token's rules, which must stay
//! in one place so that nothing else holds the password (`scrub`, redirects and TLS included).
//!
//! Owns the token and the rules around it (query string only, bound to our address, 30-minute sliding
//! expiry, log in again on a refusal). The token and the password never leave this module: URLs are
//! stripped from errors and nothing here logs a URL with a query.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use reqwest::header::{LOCATION, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use crate::backoff::RetryPolicy;
use crate::cms::error::CmsError;
use crate::cms::wire::{self, ChatItem, CmsChat, PostReply};
use crate::text::snippet;

/// The CMS deletes a token after 30 idle minutes; log in again a little before that.
const TOKEN_IDLE_LIMIT: Duration = Duration::from_secs(25 * 60);

/// The login schedule until `with_login_retry` sets the configured one (`retry.*`'s defaults).
const DEFAULT_LOGIN_RETRY: RetryPolicy = RetryPolicy {
    initial: Duration::from_secs(1),
    max: Duration::from_secs(60),
};

/// At most this much of a failed login's answer is shown (in `/readyz`, errors, logs).
const LOGIN_SNIPPET_CHARS: usize = 200;

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

struct Token {
    value: SecretString,
    last_used: Instant,
    /// Which login issued it (1 upward): a request that saw it refused logs in again only if no
    /// other task has done so meanwhile.
    generation: u64,
}

/// One CMS answer, read to its end and parsed once (`wire::parse_lenient` tries up to 64 offsets
/// on a body with PHP noise in front, so it is not run again by the caller).
struct Answer {
    status: u16,
    retry_after: Option<Duration>,
    /// The raw body, for error snippets.
    body: Vec<u8>,
    /// The body as JSON; `None` when it is none (a PHP fatal error page, a proxy's page).
    value: Option<Value>,
}

/// Whether the CMS accepts the relay's account, as last seen (for `/readyz`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginState {
    /// No login tried yet.
    NotYet,
    /// The last login, or the last request with its token, was accepted.
    Valid,
    /// The last login failed, or the CMS refused a fresh token; the error says why (no secret).
    Failed(String),
}

/// What the last successful login answered besides the token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoginInfo {
    /// The account's `users.id` (`userId`, a string in the answer).
    pub user_id: Option<i64>,
    /// The address the CMS bound the token to (`ip`): requests from any other address are refused.
    pub ip: Option<String>,
    /// `expires`, in the CMS's PHP zone, and when the answer came: together they show the CMS's
    /// UTC offset (`zone::cms_offset_seen`).
    pub expires: Option<(String, chrono::DateTime<chrono::Utc>)>,
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

/// Failed logins back off on the retry schedule, whichever task asks: delivery, each avatar lookup,
/// in-world's reads and start-up each needed a login, and each asked at once after a junk answer.
struct LoginGate {
    policy: RetryPolicy,
    /// Failed logins in a row.
    n_failed: u32,
    /// No login before this.
    not_before: Option<Instant>,
    /// The last failure as shown (scrubbed).
    last: String,
}

impl LoginGate {
    /// `Some(wait)` while logins are held back.
    fn wait(&self) -> Option<Duration> {
        let left = self.not_before?.checked_duration_since(Instant::now())?;
        (!left.is_zero()).then_some(left)
    }

    /// A login failed: the next waits `initial · 2^(n-1)` up to `max`, drawn from its upper half
    /// (jittered, so relays restarted together do not log in together, and never much shorter).
    fn failed(&mut self, shown: String) {
        self.n_failed = self.n_failed.saturating_add(1);
        let doubled = self
            .policy
            .initial
            .saturating_mul(1u32 << self.n_failed.saturating_sub(1).min(20));
        let ceiling = doubled.min(self.policy.max);
        let delay = ceiling.mul_f64(0.5 + fastrand::f64() / 2.0);
        self.not_before = Some(Instant::now() + delay);
        self.last = shown;
    }

    fn succeeded(&mut self) {
        self.n_failed = 0;
        self.not_before = None;
    }
}

impl CmsClient {
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

    /// Failed logins are retried on this schedule (`retry.initial`, `retry.max`), whoever asks for
    /// one; meanwhile a request that needs a login fails at once with `CmsError::LoginDeferred`.
    pub fn with_login_retry(self, policy: RetryPolicy) -> CmsClient {
        self.lock_login_gate().policy = policy;
        self
    }

    fn lock_login_gate(&self) -> std::sync::MutexGuard<'_, LoginGate> {
        self.login_gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Successful logins so far.
    pub fn n_logins(&self) -> u64 {
        self.n_logins.load(Ordering::Relaxed)
    }

    /// Whether the CMS accepts the account, as last seen.
    pub fn login_state(&self) -> LoginState {
        self.lock_login_state().0.clone()
    }

    /// What the last successful login answered (user id, bound address).
    pub fn login_info(&self) -> LoginInfo {
        self.lock_login_state().1.clone()
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
            snippet: snippet(value.to_string().as_bytes()),
        })?;
        Ok(OwnAccount {
            user_id,
            permissions,
        })
    }

    /// Whether the CMS has user `user_id` (`GET /user/<id>/`, needs `user` ≥ 4): a chat row with an
    /// unknown `userId` fails its foreign key (spec §3.3), so `run` and `check` ask this of every
    /// `mapping.users` id.
    pub async fn user_exists(&self, user_id: i64) -> Result<bool, CmsError> {
        let value = self.get_json(&format!("/user/{user_id}/")).await?;
        match wire::error_of(&value) {
            Some("User not found") => Ok(false),
            Some(error) => Err(CmsError::Failed(error.to_owned())),
            None => Ok(true),
        }
    }

    fn lock_login_state(&self) -> std::sync::MutexGuard<'_, (LoginState, LoginInfo)> {
        self.login_state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_login_state(&self, state: LoginState) {
        self.lock_login_state().0 = state;
    }

    /// Logs in unless a token that has not idled out is held (start-up, so readiness is known
    /// before the first chat line).
    pub async fn ensure_logged_in(&self) -> Result<(), CmsError> {
        self.token_for_request(None).await.map(|_| ())
    }

    /// Logs in now, replacing any token.
    pub async fn login(&self) -> Result<(), CmsError> {
        let _login = self.login_lock.lock().await;
        let value = self.fresh_token().await?;
        self.store_token(value);
        Ok(())
    }

    fn lock_token(&self) -> std::sync::MutexGuard<'_, Option<Token>> {
        self.token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The token and its generation, unless none is held or it has idled out.
    fn usable_token(&self) -> Option<(SecretString, u64)> {
        self.lock_token()
            .as_ref()
            .filter(|t| t.last_used.elapsed() < TOKEN_IDLE_LIMIT)
            .map(|t| (t.value.clone(), t.generation))
    }

    fn store_token(&self, value: SecretString) -> u64 {
        let generation = self.n_generations.fetch_add(1, Ordering::Relaxed) + 1;
        *self.lock_token() = Some(Token {
            value,
            last_used: Instant::now(),
            generation,
        });
        generation
    }

    /// A token for the next request: the one held, or a fresh login when there is none, it idled
    /// out, or the CMS just refused generation `refused`. One login at a time: a task that waited
    /// for another's login uses its token.
    async fn token_for_request(
        &self,
        refused: Option<u64>,
    ) -> Result<(SecretString, u64), CmsError> {
        let usable = |held: Option<(SecretString, u64)>| {
            held.filter(|(_, generation)| Some(*generation) != refused)
        };
        if let Some(held) = usable(self.usable_token()) {
            return Ok(held);
        }
        let _login = self.login_lock.lock().await;
        if let Some(held) = usable(self.usable_token()) {
            return Ok(held);
        }
        let value = self.fresh_token().await?;
        let generation = self.store_token(value.clone());
        Ok((value, generation))
    }

    /// POSTs a batch to `/grid/<g>/chats/`; the id of the last row on success.
    pub async fn post_chats(&self, items: &[ChatItem]) -> Result<i64, CmsError> {
        let path = format!("/grid/{}/chats/", self.endpoint.grid_id);
        let answer = self
            .call(Method::POST, &path, Some(wire::encode_batch(items)))
            .await?;
        match answer.value.as_ref().and_then(wire::post_reply_of) {
            Some(PostReply::Stored { last_id }) => Ok(last_id),
            Some(PostReply::Invalid(error)) => Err(CmsError::Invalid(error)),
            Some(PostReply::LastRowFailed) => Err(CmsError::LastRowFailed),
            Some(PostReply::Failed(error)) => Err(CmsError::Failed(error)),
            None => Err(unreadable(&answer)),
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
        let value = self.get_json(&path).await?;
        if let Some(error) = wire::error_of(&value) {
            return Err(CmsError::Failed(error.to_owned()));
        }
        wire::parse_chats(&value).ok_or_else(|| CmsError::Decode {
            status: 200,
            snippet: snippet(value.to_string().as_bytes()),
        })
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
        match answer.value {
            Some(value) => Ok(value),
            None => Err(unreadable(&answer)),
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
            let value = wire::parse_lenient(&body);
            let refused = status == 401
                || value.as_ref().and_then(wire::error_of) == Some(wire::UNAUTHORIZED);
            if !refused {
                self.set_login_state(LoginState::Valid);
                // The CMS extended the token's idle expiry (unless a newer login replaced it).
                if let Some(held) = self.lock_token().as_mut()
                    && held.generation == generation
                {
                    held.last_used = Instant::now();
                }
                if is_transient_status(status) {
                    return Err(CmsError::Http {
                        status,
                        retry_after,
                        snippet: snippet(&body),
                    });
                }
                return Ok(Answer {
                    status,
                    retry_after,
                    body,
                    value,
                });
            }
            tracing::info!(attempt, "cms refused the token; logging in again");
            refused_generation = Some(generation);
        }
        // Not a failed login: a refusal can mean this route needs a permission the account lacks
        // (spec §2.2: "no token" and "not allowed" look alike), and other routes may work.
        self.set_login_state(LoginState::Failed(CmsError::Unauthorized.to_string()));
        Err(CmsError::Unauthorized)
    }

    async fn fresh_token(&self) -> Result<SecretString, CmsError> {
        {
            let gate = self.lock_login_gate();
            if let Some(retry_in) = gate.wait() {
                return Err(CmsError::LoginDeferred {
                    last: gate.last.clone(),
                    retry_in,
                });
            }
        }
        let token = self.try_fresh_token().await;
        match &token {
            Ok(_) => {
                self.set_login_state(LoginState::Valid);
                self.lock_login_gate().succeeded();
            }
            Err(err) => {
                self.set_login_state(LoginState::Failed(err.to_string()));
                self.lock_login_gate().failed(match err {
                    CmsError::Login(text) => text.clone(),
                    other => other.to_string(),
                });
            }
        }
        token
    }

    async fn try_fresh_token(&self) -> Result<SecretString, CmsError> {
        let url = format!("{}/auth/username/", self.endpoint.base_url);
        let form = [
            ("username", self.endpoint.username.as_str()),
            ("password", self.endpoint.password.expose_secret()),
        ];
        let response = self
            .http
            .post(url)
            .form(&form)
            .send()
            .await
            .map_err(CmsError::transport)?;
        if let Some(err) = redirect_error(&response) {
            return Err(err);
        }
        let status = response.status().as_u16();
        let body = self.read_body(response).await?;
        let value = wire::parse_lenient(&body);
        match value.as_ref().and_then(wire::token_of) {
            Some(token) => {
                self.n_logins.fetch_add(1, Ordering::Relaxed);
                if let Some(value) = &value {
                    let (user_id, ip) = wire::login_info_of(value);
                    let expires = value
                        .get("expires")
                        .and_then(Value::as_str)
                        .map(|expires| (expires.to_owned(), chrono::Utc::now()));
                    self.lock_login_state().1 = LoginInfo {
                        user_id,
                        ip,
                        expires,
                    };
                }
                tracing::info!(username = %self.endpoint.username, "logged in to the cms");
                Ok(SecretString::from(token.to_owned()))
            }
            // Whatever the CMS said is shown scrubbed: a PHP page can echo the password or a token.
            None => match value.as_ref().and_then(wire::error_of) {
                Some(error) => Err(CmsError::Login(self.scrubbed(error.as_bytes()))),
                None if is_transient_status(status) => Err(CmsError::Http {
                    status,
                    retry_after: None,
                    snippet: self.scrubbed(&body),
                }),
                None => Err(CmsError::Login(format!(
                    "unexpected answer (HTTP {status}): {}",
                    self.scrubbed(&body)
                ))),
            },
        }
    }

    /// `scrub` with this client's password.
    fn scrubbed(&self, body: &[u8]) -> String {
        scrub(body, self.endpoint.password.expose_secret())
    }

    async fn read_body(&self, mut response: reqwest::Response) -> Result<Vec<u8>, CmsError> {
        let status = response.status().as_u16();
        let mut body = Vec::new();
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

/// What may be shown of a CMS answer: its start as one line of text (HTML tags and runs of white
/// space collapsed), at most `LOGIN_SNIPPET_CHARS` characters, with the password and every
/// token-shaped word (16+ letters and digits, both present) replaced. Scrubbed before it is cut, so
/// a secret across the cut cannot leave half of itself.
fn scrub(body: &[u8], password: &str) -> String {
    // Enough of the body for the shown part, however many tags collapse, plus one password.
    const WINDOW: usize = 16 * 1024;
    let end = body.len().min(WINDOW + password.len());
    let mut text = String::from_utf8_lossy(&body[..end]).into_owned();
    if !password.is_empty() {
        text = text.replace(password, "[password]");
    }
    if end < body.len() {
        // A word cut at the window's end may be a token's head.
        let kept = text
            .trim_end_matches(|c: char| c.is_ascii_alphanumeric())
            .len();
        text.truncate(kept);
    }
    let mut plain = String::with_capacity(text.len().min(4 * LOGIN_SNIPPET_CHARS));
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                plain.push(' ');
            }
            _ if in_tag => {}
            c if c.is_whitespace() || c.is_control() => plain.push(' '),
            c => plain.push(c),
        }
    }
    let words: Vec<&str> = plain.split(' ').filter(|w| !w.is_empty()).collect();
    let mut shown = String::new();
    for word in words {
        let masked = mask_tokens(word);
        if !shown.is_empty() {
            shown.push(' ');
        }
        shown.push_str(&masked);
        if shown.chars().count() > LOGIN_SNIPPET_CHARS {
            let cut: String = shown.chars().take(LOGIN_SNIPPET_CHARS).collect();
            return format!("{cut}…");
        }
    }
    shown
}

/// `word` with each run of 16+ ASCII letters and digits that has both replaced by `[redacted]`.
fn mask_tokens(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        let token_like = run.len() >= 16
            && run.chars().any(|c| c.is_ascii_digit())
            && run.chars().any(|c| c.is_ascii_alphabetic());
        out.push_str(if token_like {
            "[redacted]"
        } else {
            run.as_str()
        });
        run.clear();
    };
    for c in word.chars() {
        if c.is_ascii_alphanumeric() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// An answer that is not the CMS's JSON: a PHP fatal error page when the status says 200, a proxy's
/// or server's page otherwise.
fn unreadable(answer: &Answer) -> CmsError {
    if answer.status == 200 {
        CmsError::Decode {
            status: answer.status,
            snippet: snippet(&answer.body),
        }
    } else {
        CmsError::Http {
            status: answer.status,
            retry_after: answer.retry_after,
            snippet: snippet(&answer.body),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrubbed_answer_has_no_password_no_token_and_no_markup() {
        let page = format!(
            "<br />\n<b>Warning</b>: bad  password 'hunter2-pw' for otwk9ERPQS9ietocskWTS5qTG4ow1qrqTXK2CBStt1LHv9UY{}",
            "<p>x</p>".repeat(1000)
        );
        let shown = scrub(page.as_bytes(), "hunter2-pw");
        assert!(
            shown.starts_with("Warning : bad password '[password]' for [redacted] x x"),
            "{shown}"
        );
        assert!(shown.chars().count() <= LOGIN_SNIPPET_CHARS + 1, "{shown}");
        // Numbers, paths and words stay: they are what an operator needs.
        let shown = scrub(
            b"Allowed memory size of 134217728 bytes exhausted in /var/www/api/class.Auth.php",
            "pw",
        );
        assert_eq!(
            shown,
            "Allowed memory size of 134217728 bytes exhausted in /var/www/api/class.Auth.php"
        );
    }

    #[test]
    fn a_password_across_the_window_is_masked_whole() {
        let mut body = vec![b'<'; 16 * 1024 - 3];
        body.push(b'>');
        body.extend_from_slice(b"s3cret-password and more");
        let shown = scrub(&body, "s3cret-password");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("[password]"), "{shown}");
    }

    #[test]
    fn failed_logins_wait_longer_each_time_up_to_the_cap() {
        let mut gate = LoginGate {
            policy: RetryPolicy {
                initial: Duration::from_millis(100),
                max: Duration::from_millis(400),
            },
            n_failed: 0,
            not_before: None,
            last: String::new(),
        };
        assert_eq!(gate.wait(), None);
        let mut waits = Vec::new();
        for _ in 0..5 {
            gate.failed("junk".into());
            waits.push(gate.wait().expect("held back"));
        }
        let floors = [50, 100, 200, 200, 200];
        for (wait, floor) in waits.iter().zip(floors) {
            assert!(
                *wait >= Duration::from_millis(floor - 5) && *wait <= Duration::from_millis(400),
                "{waits:?}"
            );
        }
        gate.succeeded();
        assert_eq!(gate.wait(), None);
    }
}
