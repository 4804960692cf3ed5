//! `LookingGlassClient`: the HTTP side of the viewer chat interface.
//!
//! Invariant: a request is never aborted while the viewer may be writing its answer (an aborted
//! response kills the real viewer, spec §1.4). There is no total timeout, only a long inactivity
//! limit, and callers never drop a `poll` future: shutdown waits for it.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

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
}

/// The most a response's `Content-Length` reserves in advance; a longer body grows the buffer.
const MAX_RESERVE: u64 = 1 << 30;

/// Talks to one viewer. Requests go one at a time (the viewer serves one at a time anyway).
#[derive(Debug, Clone)]
pub struct LookingGlassClient {
    http: reqwest::Client,
    chat_url: String,
    avatars_url: Option<String>,
    status_url: Option<String>,
}

impl LookingGlassClient {
    /// Builds the client. `inactivity` bounds the wait for each read, never the whole response.
    pub fn new(
        chat_url: String,
        avatars_url: Option<String>,
        status_url: Option<String>,
        inactivity: Duration,
    ) -> Result<LookingGlassClient, reqwest::Error> {
        let http = reqwest::Client::builder()
            // The viewer is on this host; a proxy would at best add a hop and at worst see the chat.
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(inactivity)
            .pool_max_idle_per_host(1)
            .build()?;
        Ok(LookingGlassClient {
            http,
            chat_url,
            avatars_url,
            status_url,
        })
    }

    /// The chat URL (for logs; it holds no secret).
    pub fn chat_url(&self) -> &str {
        &self.chat_url
    }

    /// GETs the chat URL and reads the whole body. This drains the viewer's queue: whatever it returns
    /// exists nowhere else any more.
    pub async fn poll(&self) -> Result<Vec<u8>, ViewerError> {
        self.exchange(self.http.get(&self.chat_url)).await
    }

    /// Says `text` in-world through the viewer's chat POST. The viewer decodes `+` and `%XX` in
    /// `Message` even in JSON, so every byte outside `[A-Za-z0-9]` is percent-encoded (pure ASCII, no
    /// JSON escaping needed); `Channel` and `Type` are always sent (without either the viewer says
    /// nothing and still answers `200 {}`); the body starts with `{` (else it is read as a form). The
    /// answer never reports failure, so success here only means the viewer took the request.
    pub async fn say(&self, text: &str, channel: i32, say_type: &str) -> Result<(), ViewerError> {
        let message =
            percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC);
        let body =
            format!(r#"{{"Message":"{message}","Channel":"{channel}","Type":"{say_type}"}}"#);
        let request = self
            .http
            .post(&self.chat_url)
            .header("Content-Type", "application/json")
            .body(body);
        self.exchange(request).await?;
        Ok(())
    }

    /// The viewer's own avatar name from `status_url` (`first` + `last`), `None` when it is off or the
    /// viewer is not logged in.
    pub async fn own_name(&self) -> Result<Option<String>, ViewerError> {
        let Some(url) = &self.status_url else {
            return Ok(None);
        };
        let value = self.get_json(url, "status").await?;
        let part = |key: &str| {
            value
                .get(key)
                .and_then(|v| v.get("value"))
                .and_then(Value::as_str)
                .map(str::trim)
        };
        Ok(match (part("first"), part("last")) {
            (Some(first), Some(last)) if !first.is_empty() => {
                Some(format!("{first} {last}").trim().to_owned())
            }
            _ => None,
        })
    }

    /// Avatar names (lower-cased) to UUIDs from `avatars_url`; empty when it is off.
    pub async fn avatars(&self) -> Result<HashMap<String, String>, ViewerError> {
        let Some(url) = &self.avatars_url else {
            return Ok(HashMap::new());
        };
        let value = self.get_json(url, "avatar list").await?;
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

    async fn get_json(&self, url: &str, what: &'static str) -> Result<Value, ViewerError> {
        let body = self.exchange(self.http.get(url)).await?;
        serde_json::from_slice(&body).map_err(|_| ViewerError::Decode {
            what,
            snippet: snippet(&body),
        })
    }
}

impl LookingGlassClient {
    /// Sends a request and reads the answer to its end, whatever its status: dropping a response
    /// half-read would abort it, which kills the real viewer.
    async fn exchange(&self, request: reqwest::RequestBuilder) -> Result<Vec<u8>, ViewerError> {
        let mut response = request.send().await.map_err(ViewerError::Transport)?;
        let status = response.status().as_u16();
        // Read into one buffer of the announced size (the viewer always sends Content-Length), so a
        // response of tens of megabytes is held once, not as its chunks plus their concatenation.
        let mut body = Vec::new();
        if let Some(len) = response.content_length() {
            // A reservation that cannot be had (an absurd length) is not an error: the buffer grows.
            let _ = body.try_reserve_exact(len.min(MAX_RESERVE) as usize);
        }
        while let Some(chunk) = response.chunk().await.map_err(ViewerError::Transport)? {
            body.extend_from_slice(&chunk);
        }
        if status != 200 {
            return Err(status_error(status, &body));
        }
        Ok(body)
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
