//! The login and the token's rules: one login at a time for whoever needs it, a token not held
//! across a request, 25 idle minutes before a fresh login, failed logins retried on the `retry.*`
//! schedule (`LoginGate`). What a failed login answered is shown only through `scrub`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};

use super::{CmsClient, is_transient_status, redirect_error};
use crate::backoff::RetryPolicy;
use crate::cms::error::CmsError;
use crate::cms::wire;

/// The CMS deletes a token after 30 idle minutes; log in again a little before that.
const TOKEN_IDLE_LIMIT: Duration = Duration::from_secs(25 * 60);

/// The login schedule until `with_login_retry` sets the configured one (`retry.*`'s defaults).
pub(super) const DEFAULT_LOGIN_RETRY: RetryPolicy = RetryPolicy {
    initial: Duration::from_secs(1),
    max: Duration::from_secs(60),
};

pub(super) struct Token {
    pub(super) value: SecretString,
    pub(super) last_used: Instant,
    /// Which login issued it (1 upward): a request that saw it refused logs in again only if no
    /// other task has done so meanwhile.
    pub(super) generation: u64,
    /// Whether a request has used it yet, and how the CMS took it.
    pub(super) usage: TokenUsage,
}

/// What the CMS made of a token so far. A token refused before any request accepted it says that
/// logging in again would only get another the CMS refuses (it binds tokens to an address a proxy
/// changes, or its token table is broken): that refusal counts as a failed login, so logins follow
/// the retry schedule instead of one per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TokenUsage {
    /// No request has used it.
    Fresh,
    /// A request with it was answered (not refused).
    Accepted,
    /// Refused before any request was accepted with it.
    Refused,
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

/// Failed logins back off on the retry schedule, whichever task asks: delivery, each avatar lookup,
/// in-world's reads and start-up each needed a login, and each asked at once after a junk answer.
pub(super) struct LoginGate {
    pub(super) policy: RetryPolicy,
    /// Failed logins in a row.
    pub(super) n_failed: u32,
    /// No login before this.
    pub(super) not_before: Option<Instant>,
    /// The last failure as shown (scrubbed).
    pub(super) last: String,
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

    fn lock_login_state(&self) -> std::sync::MutexGuard<'_, (LoginState, LoginInfo)> {
        self.login_state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn set_login_state(&self, state: LoginState) {
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

    pub(super) fn lock_token(&self) -> std::sync::MutexGuard<'_, Option<Token>> {
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
            usage: TokenUsage::Fresh,
        });
        generation
    }

    /// A request with generation `generation` was answered without a refusal: its idle expiry was
    /// extended (unless a newer login replaced it) and, on its first such answer, the token has
    /// proved good, so failed logins are forgotten.
    pub(super) fn token_answered(&self, generation: u64, proves_token: bool) {
        let first_acceptance = {
            let mut held = self.lock_token();
            match held.as_mut() {
                Some(token) if token.generation == generation => {
                    token.last_used = Instant::now();
                    let first = proves_token && token.usage != TokenUsage::Accepted;
                    if proves_token {
                        token.usage = TokenUsage::Accepted;
                    }
                    first
                }
                _ => false,
            }
        };
        if first_acceptance {
            self.lock_login_gate().succeeded();
        }
    }

    /// The CMS refused generation `generation`. The first refusal of a token no request was
    /// accepted with counts as a failed login (logins then wait for the retry schedule); returns
    /// whether it was that one.
    pub(super) fn token_refused(&self, generation: u64) -> bool {
        let fresh = {
            let mut held = self.lock_token();
            match held.as_mut() {
                Some(token)
                    if token.generation == generation && token.usage == TokenUsage::Fresh =>
                {
                    token.usage = TokenUsage::Refused;
                    true
                }
                _ => false,
            }
        };
        if fresh {
            let shown = "the cms refused a token its login had just issued: the account may not use this route, or the token is bound to another address (a proxy that changes the relay's address?)".to_owned();
            self.set_login_state(LoginState::Failed(shown.clone()));
            self.lock_login_gate().failed(shown);
        }
        fresh
    }

    /// A token for the next request: the one held, or a fresh login when there is none, it idled
    /// out, or the CMS just refused generation `refused`. One login at a time: a task that waited
    /// for another's login uses its token.
    pub(super) async fn token_for_request(
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
                // The gate opens again only once a request is accepted with the token
                // (`token_answered`): a CMS may issue tokens it then refuses.
                self.set_login_state(LoginState::Valid);
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
                        .and_then(serde_json::Value::as_str)
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
                Some(error) => Err(CmsError::Login(self.shown(error.as_bytes()))),
                None if is_transient_status(status) => Err(CmsError::Http {
                    status,
                    retry_after: None,
                    snippet: self.shown(&body),
                }),
                None => Err(CmsError::Login(format!(
                    "unexpected answer (HTTP {status}): {}",
                    self.shown(&body)
                ))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
