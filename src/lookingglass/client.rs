//! `LookingGlassClient`: the HTTP side of the viewer chat interface.
//!
//! Invariants (spec §1.2, §1.4, §9): one request at a time across every task that holds a clone
//! (the chat GET, the in-world POST, the status, avatars and network-counters reads and the REST
//! login and logout take turns at one gate, since the viewer serves one request at a time and a
//! request waiting behind another may outwait its client); a request is never aborted while the
//! viewer may be writing its answer (an aborted response kills the real viewer or loses its
//! lines), so there is no total timeout, only a long inactivity limit, and every answer is read to
//! its end, but never held beyond `viewer.max_response_bytes` (the rest is read and discarded, up
//! to `DISCARD_FACTOR` times the limit). A stop is honoured only before a request is sent, and by a
//! status, avatars or counters read only while no byte of its answer has come.
//!
//! The viewer's login password (`[viewer.login] password_file`) is reached here and in `config`
//! only: `ViewerLogin::from_settings` loads it, `LookingGlassClient::login` puts it in the one
//! request body that carries it, and whoever holds a `ViewerLogin` cannot read it. Must not know
//! the CMS or the outbox, or put the password in a log line or an error.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use serde_json::Value;
use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, ViewerLoginSettings};
use crate::lookingglass::presence::{CommCounters, SeenAvatar, ViewerStatus, seen_avatars};
use crate::text::snippet;

/// Why a viewer request failed.
#[derive(Debug, thiserror::Error)]
pub enum ViewerError {
    /// Connection refused, reset, or the inactivity limit passed.
    #[error("viewer unreachable: {0}")]
    Transport(#[source] reqwest::Error),
    /// The viewer answered with an unexpected status.
    #[error("viewer answered HTTP {status}{hint}: {snippet}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// A fix, when the status tells one.
        hint: &'static str,
        /// The start of the body.
        snippet: String,
    },
    /// The body was not what the spec describes.
    #[error("viewer sent an unreadable {what}: {snippet}")]
    Decode {
        /// Which endpoint.
        what: &'static str,
        /// The start of the body.
        snippet: String,
    },
    /// A status or avatars answer larger than `viewer.max_response_bytes`.
    #[error(
        "viewer sent a {what} of {n_bytes} bytes, more than viewer.max_response_bytes ({limit})"
    )]
    TooLarge {
        /// Which endpoint.
        what: &'static str,
        /// The answer's size.
        n_bytes: u64,
        /// `viewer.max_response_bytes`.
        limit: usize,
    },
    /// A status or avatars read whose answer did not begin within `SIDE_READ_LIMIT`: the viewer
    /// never answers a path it has no handler for (spec §1.4), so the URL is probably wrong.
    #[error(
        "the viewer did not begin to answer within {waited:?}: it never answers a path it does not serve (or it is busy)"
    )]
    Unanswered {
        /// How long it was given.
        waited: Duration,
    },
    /// The relay is stopping: the request was not sent (or, for a status or avatars read, given up
    /// before its answer began).
    #[error("the relay is stopping")]
    Stopping,
}

/// Beyond `viewer.max_response_bytes` an answer is read and discarded up to this many times the
/// limit (1 GiB with the default 64 MiB), then given up: LookingGlass always sends a
/// `Content-Length` of what it drained, so only a broken or hostile peer sends more, or never ends.
pub const DISCARD_FACTOR: usize = 16;

/// How long a status or avatars read waits for its answer to begin. The viewer answers both at once
/// from memory, and no request of the relay's own is ahead of it (they take turns), so an answer
/// that has not begun after this long is one that never comes: a path the viewer does not serve
/// hangs for ever (spec §1.4). Nothing of an answer has been written then, so giving the request up
/// cuts nothing; a chat GET or POST is never given up so (the viewer may be building a large
/// answer, or saying the line).
pub const SIDE_READ_LIMIT: Duration = Duration::from_secs(3);

/// A chat GET's answer, read to its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatAnswer {
    /// The body, or its first `viewer.max_response_bytes` when it was longer.
    pub body: Vec<u8>,
    /// Bytes the viewer sent in all, those kept included.
    pub n_bytes: u64,
    /// The answer had not ended after `DISCARD_FACTOR` times the limit and was given up.
    pub given_up: bool,
}

impl ChatAnswer {
    /// Bytes read and not kept.
    pub fn n_discarded(&self) -> u64 {
        self.n_bytes.saturating_sub(self.body.len() as u64)
    }
}

/// Where the viewer is and how it is read.
#[derive(Debug, Clone)]
pub struct ViewerEndpoint {
    /// `viewer.chat_url`.
    pub chat_url: String,
    /// `viewer.avatars_url`, `None` when off.
    pub avatars_url: Option<String>,
    /// `viewer.status_url`, `None` when off.
    pub status_url: Option<String>,
    /// The longest wait for each read, never for a whole answer (`viewer.request_timeout`).
    pub inactivity: Duration,
    /// `viewer.max_response_bytes`.
    pub max_response_bytes: usize,
}

/// The viewer's own login (`[viewer.login]`) with its password, read from `password_file` here so
/// that the password goes from `config` straight to the client that sends it, like the CMS's
/// (`CmsEndpoint::from_settings`). Its `Debug` shows no password (`SecretString` redacts it).
#[derive(Debug, Clone)]
pub struct ViewerLogin {
    settings: ViewerLoginSettings,
    password: SecretString,
}

impl ViewerLogin {
    /// The login `[viewer.login]` names, its password loaded: an unreadable or empty
    /// `password_file`, or a password the viewer's form cannot carry, is an error naming the key.
    pub fn from_settings(login: &ViewerLoginSettings) -> Result<ViewerLogin, ConfigError> {
        Ok(ViewerLogin {
            settings: login.clone(),
            password: login.load_password()?,
        })
    }

    /// The names, the region and the start position (everything but the password).
    pub fn settings(&self) -> &ViewerLoginSettings {
        &self.settings
    }
}

/// Talks to one viewer. Clones share one gate: their requests go one at a time.
#[derive(Debug, Clone)]
pub struct LookingGlassClient {
    http: reqwest::Client,
    chat_url: String,
    avatars_url: Option<String>,
    status_url: Option<String>,
    /// CommLLLP's counters, `/api/stats/Comm/stats` on the chat URL's host (spec §4, §10).
    comm_stats_url: Option<String>,
    /// `/api/LLLP/connect/` on the chat URL's host, for the REST login and logout.
    connect_url: Option<String>,
    max_response_bytes: usize,
    /// The viewer's one turn: held from before a request is sent until its answer is read to its end.
    gate: Arc<Mutex<()>>,
}

/// How a request may end before its answer is read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Patience {
    /// A chat GET or POST: never given up (only the inactivity limit ends it).
    Whole,
    /// A status, avatars or counters read: given up when its answer has not begun within `SIDE_READ_LIMIT`
    /// or at a stop before it began.
    SideRead,
}

impl LookingGlassClient {
    /// Builds the client.
    pub fn new(endpoint: ViewerEndpoint) -> Result<LookingGlassClient, reqwest::Error> {
        let http = reqwest::Client::builder()
            // The viewer is on this host; a proxy would at best add a hop and at worst see the chat.
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(endpoint.inactivity)
            .pool_max_idle_per_host(1)
            .build()?;
        // The other LookingGlass endpoints live on the chat URL's host (spec §4).
        let origin = reqwest::Url::parse(&endpoint.chat_url)
            .ok()
            .map(|url| url.origin().ascii_serialization())
            .filter(|origin| origin.starts_with("http"));
        Ok(LookingGlassClient {
            http,
            comm_stats_url: origin
                .as_ref()
                .map(|origin| format!("{origin}/api/stats/Comm/stats")),
            connect_url: origin.map(|origin| format!("{origin}/api/LLLP/connect/")),
            chat_url: endpoint.chat_url,
            avatars_url: endpoint.avatars_url,
            status_url: endpoint.status_url,
            max_response_bytes: endpoint.max_response_bytes,
            gate: Arc::new(Mutex::new(())),
        })
    }

    /// The chat URL (for logs; it holds no secret).
    pub fn chat_url(&self) -> &str {
        &self.chat_url
    }

    /// The status URL, `None` when off (for logs; it holds no secret).
    pub fn status_url(&self) -> Option<&str> {
        self.status_url.as_deref()
    }

    /// The avatars URL, `None` when off (for logs; it holds no secret).
    pub fn avatars_url(&self) -> Option<&str> {
        self.avatars_url.as_deref()
    }

    /// GETs the chat URL and reads the answer to its end. This drains the viewer's queue: whatever it
    /// returns exists nowhere else any more. Not sent when `stop` is cancelled while it waits for
    /// its turn; never given up once sent.
    pub async fn poll(&self, stop: &CancellationToken) -> Result<ChatAnswer, ViewerError> {
        self.exchange(self.http.get(&self.chat_url), Patience::Whole, stop)
            .await
    }

    /// Says `text` in-world through the viewer's chat POST. The viewer decodes `+` and `%XX` in
    /// `Message` even in JSON, so every byte outside `[A-Za-z0-9]` is percent-encoded (pure ASCII, no
    /// JSON escaping needed); `Channel` and `Type` are always sent (without either the viewer says
    /// nothing and still answers `200 {}`); the body starts with `{` (else it is read as a form). The
    /// answer never reports failure, so success here only means the viewer took the request. Not
    /// sent when `stop` is cancelled while it waits for its turn.
    pub async fn say(
        &self,
        text: &str,
        channel: i32,
        say_type: &str,
        stop: &CancellationToken,
    ) -> Result<(), ViewerError> {
        let message =
            percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC);
        let body =
            format!(r#"{{"Message":"{message}","Channel":"{channel}","Type":"{say_type}"}}"#);
        let request = self
            .http
            .post(&self.chat_url)
            .header("Content-Type", "application/json")
            .body(body);
        self.exchange(request, Patience::Whole, stop).await?;
        Ok(())
    }

    /// The viewer's own avatar name from `status_url` (`first` + `last`), `None` when it is off or the
    /// viewer is not logged in.
    pub async fn own_name(&self, stop: &CancellationToken) -> Result<Option<String>, ViewerError> {
        Ok(self.status(stop).await?.and_then(|status| status.own_name))
    }

    /// Avatar names (lower-cased) to UUIDs from `avatars_url`; empty when it is off.
    pub async fn avatars(
        &self,
        stop: &CancellationToken,
    ) -> Result<HashMap<String, String>, ViewerError> {
        let Some(url) = &self.avatars_url else {
            return Ok(HashMap::new());
        };
        let value = self.get_json(url, "avatar list", stop).await?;
        let Some(map) = value.as_object() else {
            return Err(ViewerError::Decode {
                what: "avatar list",
                snippet: snippet(value.to_string().as_bytes()),
            });
        };
        // Keys are `<grid>-Avatar-<uuid>`; the UUID is the last 36 characters.
        Ok(map
            .iter()
            .filter_map(|(key, avatar)| {
                let name = avatar.get("Name")?.as_str()?.trim().to_lowercase();
                let uuid = key.get(key.len().checked_sub(36)?..)?.to_lowercase();
                Some((name, uuid))
            })
            .collect())
    }

    /// The viewer's login status from `status_url`, `None` when it is off.
    pub async fn status(
        &self,
        stop: &CancellationToken,
    ) -> Result<Option<ViewerStatus>, ViewerError> {
        let Some(url) = &self.status_url else {
            return Ok(None);
        };
        let value = self.get_json(url, "status", stop).await?;
        Ok(Some(ViewerStatus::from_json(&value)))
    }

    /// The counters URL (for logs and `check`).
    pub fn comm_stats_url(&self) -> Option<&str> {
        self.comm_stats_url.as_deref()
    }

    /// CommLLLP's `network_disconnected` and `network_simconnected`; `Decode` when the answer lacks
    /// them (a viewer other than LookingGlass).
    pub async fn comm_counters(
        &self,
        stop: &CancellationToken,
    ) -> Result<CommCounters, ViewerError> {
        let Some(url) = &self.comm_stats_url else {
            return Err(ViewerError::Decode {
                what: "chat url (no host for the counters)",
                snippet: snippet(self.chat_url.as_bytes()),
            });
        };
        let value = self.get_json(url, "network counters", stop).await?;
        CommCounters::from_json(&value).ok_or_else(|| ViewerError::Decode {
            what: "network counters",
            snippet: snippet(value.to_string().as_bytes()),
        })
    }

    /// The avatar list with regions and positions, `None` when `avatars_url` is off.
    pub async fn seen_avatars(
        &self,
        stop: &CancellationToken,
    ) -> Result<Option<Vec<SeenAvatar>>, ViewerError> {
        let Some(url) = &self.avatars_url else {
            return Ok(None);
        };
        let value = self.get_json(url, "avatar list", stop).await?;
        seen_avatars(&value)
            .map(Some)
            .ok_or_else(|| ViewerError::Decode {
                what: "avatar list",
                snippet: snippet(value.to_string().as_bytes()),
            })
    }

    /// `POST /api/LLLP/connect/<action>` (`login`, `logout`) with `form` as the body. The viewer
    /// does not URL-decode form values, so they are sent as they are (the caller refuses `&`, `=`
    /// and line breaks in them). `Ok(Err(msg))` is the viewer's refusal
    /// (`{"RESTRequestError":1,"RESTRequestMsg":msg}`). Never given up once sent.
    pub async fn connect(
        &self,
        action: &str,
        form: &[(&str, &str)],
        stop: &CancellationToken,
    ) -> Result<Result<(), String>, ViewerError> {
        let Some(base) = &self.connect_url else {
            return Err(ViewerError::Decode {
                what: "chat url (no host for the login)",
                snippet: snippet(self.chat_url.as_bytes()),
            });
        };
        let body = form
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect::<Vec<_>>()
            .join("&");
        let request = self
            .http
            .post(format!("{base}{action}"))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body);
        let answer = self.exchange(request, Patience::Whole, stop).await?;
        let value: Value =
            serde_json::from_slice(&answer.body).map_err(|_| ViewerError::Decode {
                what: "login answer",
                snippet: snippet(&answer.body),
            })?;
        match value.get("RESTRequestError") {
            None => Ok(Ok(())),
            Some(_) => Ok(Err(value
                .get("RESTRequestMsg")
                .and_then(Value::as_str)
                .unwrap_or("refused without a reason")
                .to_owned())),
        }
    }

    /// `POST /api/LLLP/connect/login` with `login`'s form, password included (the one place it is
    /// opened outside `config`); answered like `connect`.
    pub async fn login(
        &self,
        login: &ViewerLogin,
        stop: &CancellationToken,
    ) -> Result<Result<(), String>, ViewerError> {
        let form = login.settings.form(&login.password);
        let form: Vec<(&str, &str)> = form
            .iter()
            .map(|(key, value)| (*key, value.as_str()))
            .collect();
        self.connect("login", &form, stop).await
    }

    /// Waits until no request is in flight (the gate is free). A shutdown waits for this: an answer
    /// still arriving is never cut.
    pub async fn idle(&self) {
        drop(self.gate.lock().await);
    }

    async fn get_json(
        &self,
        url: &str,
        what: &'static str,
        stop: &CancellationToken,
    ) -> Result<Value, ViewerError> {
        let answer = self
            .exchange(self.http.get(url), Patience::SideRead, stop)
            .await?;
        if answer.n_discarded() > 0 {
            return Err(ViewerError::TooLarge {
                what,
                n_bytes: answer.n_bytes,
                limit: self.max_response_bytes,
            });
        }
        serde_json::from_slice(&answer.body).map_err(|_| ViewerError::Decode {
            what,
            snippet: snippet(&answer.body),
        })
    }
}

impl LookingGlassClient {
    /// Takes the viewer's turn, then sends a request and reads the answer to its end, whatever its
    /// status: dropping a response half-read would abort it, which kills the real viewer.
    async fn exchange(
        &self,
        request: reqwest::RequestBuilder,
        patience: Patience,
        stop: &CancellationToken,
    ) -> Result<ChatAnswer, ViewerError> {
        let _turn = self.turn(stop).await?;
        let sent = request.send();
        let mut response = match patience {
            Patience::Whole => sent.await,
            Patience::SideRead => tokio::select! {
                biased;
                sent = sent => sent,
                _ = tokio::time::sleep(SIDE_READ_LIMIT) => {
                    return Err(ViewerError::Unanswered { waited: SIDE_READ_LIMIT });
                }
                _ = stop.cancelled() => return Err(ViewerError::Stopping),
            },
        }
        .map_err(ViewerError::Transport)?;
        let status = response.status().as_u16();
        let answer = self.read_to_end(&mut response).await?;
        if status != 200 {
            return Err(status_error(status, &answer.body));
        }
        Ok(answer)
    }

    /// Waits for the viewer's turn; `Stopping` when `stop` comes first (nothing was sent).
    async fn turn(&self, stop: &CancellationToken) -> Result<OwnedMutexGuard<()>, ViewerError> {
        tokio::select! {
            biased;
            _ = stop.cancelled() => Err(ViewerError::Stopping),
            turn = self.gate.clone().lock_owned() => Ok(turn),
        }
    }

    /// Reads the body to its end, keeping at most `max_response_bytes` of it, in one buffer of the
    /// announced size (the viewer always sends `Content-Length`), so a response of tens of megabytes
    /// is held once, not as its chunks plus their concatenation.
    async fn read_to_end(
        &self,
        response: &mut reqwest::Response,
    ) -> Result<ChatAnswer, ViewerError> {
        let limit = self.max_response_bytes;
        let discard_bound = limit.saturating_mul(DISCARD_FACTOR) as u64;
        let mut body = Vec::new();
        if let Some(len) = response.content_length() {
            // A reservation that cannot be had is not an error: the buffer grows.
            let _ = body.try_reserve_exact(len.min(limit as u64) as usize);
        }
        let mut n_bytes = 0u64;
        while let Some(chunk) = response.chunk().await.map_err(ViewerError::Transport)? {
            n_bytes += chunk.len() as u64;
            let room = limit.saturating_sub(body.len());
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if n_bytes > discard_bound {
                // Dropping the response closes the connection: no viewer sends this much.
                return Ok(ChatAnswer {
                    body,
                    n_bytes,
                    given_up: true,
                });
            }
        }
        Ok(ChatAnswer {
            body,
            n_bytes,
            given_up: false,
        })
    }
}

fn status_error(status: u16, body: &[u8]) -> ViewerError {
    let text = String::from_utf8_lossy(body);
    let hint = if status == 400 && text.contains("Invalid host") {
        // LookingGlass listens on http://127.0.0.1 and KeeKee on http://localhost (spec §1.1, §6):
        // the advice must fit both, since either can be the one refusing.
        " (the viewer accepts only the exact host of its listener: LookingGlass http://127.0.0.1:9144 \
         (its RestManager.BaseURL), KeeKee http://localhost:9144; fix the host in viewer.chat_url, \
         viewer.avatars_url and viewer.status_url)"
    } else {
        ""
    };
    ViewerError::Status {
        status,
        hint,
        snippet: snippet(body),
    }
}
