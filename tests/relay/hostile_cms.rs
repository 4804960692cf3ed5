//! A CMS that does not play fair: redirects, a certificate of its own, junk login answers. Each peer
//! is a raw HTTP server on a loopback port, so the test decides every byte the relay gets.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opensim_chat_relay::cms::CmsClient;
use opensim_chat_relay::cms::client::CmsEndpoint;
use opensim_chat_relay::config::Settings;
use serde_json::Value;
use std::process::Stdio;

use crate::helpers::{PATIENCE, RELAY_PASSWORD, TestEnv, eventually, sigterm};
use secrecy::SecretString;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// One request as the raw peer read it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `POST /api/auth/username/ HTTP/1.1`
    pub request_line: String,
    /// The body as sent.
    pub body: String,
}

/// An HTTP/1.1 peer on `127.0.0.1:0` that answers every request with what `answer` makes of it
/// (the whole response, head and body) and closes the connection. It records what it was sent.
pub struct RawPeer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl RawPeer {
    pub async fn start(answer: impl Fn(&Seen) -> Vec<u8> + Send + Sync + 'static) -> RawPeer {
        RawPeer::serve(None, answer).await
    }

    /// The same behind TLS with `tls`'s certificate: `https://127.0.0.1:<port>`.
    pub async fn start_tls(
        tls: tokio_rustls::TlsAcceptor,
        answer: impl Fn(&Seen) -> Vec<u8> + Send + Sync + 'static,
    ) -> RawPeer {
        RawPeer::serve(Some(tls), answer).await
    }

    async fn serve(
        tls: Option<tokio_rustls::TlsAcceptor>,
        answer: impl Fn(&Seen) -> Vec<u8> + Send + Sync + 'static,
    ) -> RawPeer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(answer);
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (log, answer, tls) = (log.clone(), answer.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => exchange(stream, &log, &*answer).await,
                        // A refused handshake (the client does not trust us) ends here.
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                exchange(stream, &log, &*answer).await;
                            }
                        }
                    }
                });
            }
        });
        RawPeer { addr, seen }
    }

    /// What the peer was sent so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("log").clone()
    }

    /// `http://<addr>/OpenSim-CMS/api`
    pub fn base_url(&self) -> String {
        format!("http://{}/OpenSim-CMS/api", self.addr)
    }
}

/// Reads one request, records it, writes `answer`'s response and closes.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    log: &Mutex<Vec<Seen>>,
    answer: &(dyn Fn(&Seen) -> Vec<u8> + Send + Sync),
) {
    let Some(request) = read_request(&mut stream).await else {
        return;
    };
    log.lock().expect("log").push(request.clone());
    let _ = stream.write_all(&answer(&request)).await;
    let _ = stream.shutdown().await;
}

async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(Seen {
        request_line: head.lines().next().unwrap_or_default().to_owned(),
        body: String::from_utf8_lossy(&buf[head_end..]).into_owned(),
    })
}

/// A complete response with a body.
pub fn response(status: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut text = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("Connection: close\r\n\r\n");
    text.push_str(body);
    text.into_bytes()
}

/// The login answer of a stock CMS, with a 48-character token.
pub const TOKEN: &str = "otwk9ERPQS9ietocskWTS5qTG4ow1qrqTXK2CBStt1LHv9UY";
pub const PASSWORD: &str = "hostile-test-pw-7731";

pub fn login_ok() -> Vec<u8> {
    response(
        "200 OK",
        &[("Content-Type", "application/json")],
        &format!(r#"{{"token":"{TOKEN}","ip":"127.0.0.1","userId":"3","lastLogin":null}}"#),
    )
}

pub fn client(base_url: &str) -> CmsClient {
    CmsClient::new(CmsEndpoint {
        base_url: base_url.to_owned(),
        grid_id: 1,
        username: "relay".to_owned(),
        password: SecretString::from(PASSWORD),
        timeout: Duration::from_secs(5),
        max_response_bytes: 1 << 20,
        ca_certificates: Vec::new(),
    })
    .expect("client builds")
}

#[tokio::test]
async fn a_redirected_login_is_not_followed_and_the_error_names_the_host_only() {
    let elsewhere = RawPeer::start(|_| login_ok()).await;
    let target = format!("http://{}/steal/?token=abc", elsewhere.addr);
    let cms = RawPeer::start(move |_| {
        response(
            "307 Temporary Redirect",
            &[("Location", target.as_str())],
            "",
        )
    })
    .await;
    let err = client(&cms.base_url())
        .login()
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(cms.seen().len(), 1, "one login POST");
    assert!(cms.seen()[0].body.contains(PASSWORD), "{:?}", cms.seen());
    assert!(
        elsewhere.seen().is_empty(),
        "the password went to another host: {:?}",
        elsewhere.seen()
    );
    assert!(err.contains("307"), "{err}");
    assert!(err.contains(&elsewhere.addr.to_string()), "{err}");
    assert!(
        !err.contains("steal") && !err.contains("token=") && !err.contains(PASSWORD),
        "{err}"
    );
}

#[tokio::test]
async fn a_redirected_chat_request_does_not_carry_the_token_away() {
    let elsewhere = RawPeer::start(|_| response("200 OK", &[], "[]")).await;
    let target = format!(
        "http://{}/OpenSim-CMS/api/grid/1/chats/0/?token={TOKEN}",
        elsewhere.addr
    );
    let cms = RawPeer::start(move |seen| {
        if seen.request_line.starts_with("POST") {
            login_ok()
        } else {
            response("302 Found", &[("Location", target.as_str())], "")
        }
    })
    .await;
    let err = client(&cms.base_url())
        .chats_since(0)
        .await
        .unwrap_err()
        .to_string();
    assert!(elsewhere.seen().is_empty(), "{:?}", elsewhere.seen());
    assert!(
        err.contains("302") && err.contains(&elsewhere.addr.to_string()),
        "{err}"
    );
    assert!(!err.contains(TOKEN) && !err.contains("chats"), "{err}");
}

/// A self-signed certificate for `127.0.0.1` (PEM) and a TLS acceptor serving it.
fn self_signed() -> (String, tokio_rustls::TlsAcceptor) {
    use tokio_rustls::rustls;
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("cert");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(vec![certified.cert.der().clone()], key)
    .expect("server config");
    (
        certified.cert.pem(),
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    )
}

/// The client the relay builds from its settings, with `ca_file` as given.
fn client_from_settings(base_url: &str, ca_file: &str) -> CmsClient {
    let settings = Settings::load(
        None,
        &[
            ("cms.base_url", base_url),
            ("cms.username", "relay"),
            ("cms.password", PASSWORD),
            ("cms.ca_file", ca_file),
        ],
    )
    .expect("settings load");
    CmsClient::new(CmsEndpoint {
        base_url: settings.cms.base_url.clone(),
        grid_id: settings.cms.grid_id,
        username: settings.cms.username.clone(),
        password: settings.cms.load_password().expect("password"),
        timeout: Duration::from_secs(5),
        max_response_bytes: settings.cms.max_response_bytes,
        ca_certificates: settings.cms.load_ca_certificates().expect("ca_file loads"),
    })
    .expect("client builds")
}

#[tokio::test]
async fn a_cms_with_its_own_certificate_is_trusted_through_ca_file_only() {
    let (pem, tls) = self_signed();
    let cms = RawPeer::start_tls(tls, |_| login_ok()).await;
    let base_url = format!("https://{}/OpenSim-CMS/api", cms.addr);

    let err = client_from_settings(&base_url, "")
        .login()
        .await
        .expect_err("an unknown issuer is refused");
    assert!(
        err.to_string().contains("UnknownIssuer") && err.to_string().contains("cms.ca_file"),
        "{err}"
    );
    assert!(cms.seen().is_empty(), "no request went out over it");

    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("cms-ca.pem");
    std::fs::write(&ca_file, &pem).expect("write");
    let client = client_from_settings(&base_url, &ca_file.to_string_lossy());
    client.login().await.expect("trusted through cms.ca_file");
    assert_eq!(client.n_logins(), 1);
    assert!(cms.seen()[0].body.contains(PASSWORD));
}

/// `check` against the TLS peer, with `SSL_CERT_FILE` (read by the system trust store's loader on
/// Linux) set to `trust_store` or unset: its report.
async fn check_over_tls(base_url: &str, trust_store: Option<&std::path::Path>) -> String {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_opensim-chat-relay"));
    command
        .arg("check")
        .env_remove("RELAY_CONFIG")
        .env_remove("SSL_CERT_DIR")
        .env("RELAY__CMS__BASE_URL", base_url)
        .env("RELAY__CMS__USERNAME", "relay")
        .env("RELAY__CMS__PASSWORD", PASSWORD)
        // Nothing listens on port 9: the viewer's checks fail fast, the CMS's are what counts.
        .env("RELAY__VIEWER__CHAT_URL", "http://127.0.0.1:9/api/chat")
        .env("RELAY__VIEWER__AVATARS_URL", "")
        .env("RELAY__VIEWER__STATUS_URL", "");
    match trust_store {
        Some(path) => command.env("SSL_CERT_FILE", path),
        None => command.env_remove("SSL_CERT_FILE"),
    };
    let output = command.output().await.expect("check runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn the_system_trust_store_is_trusted_too() {
    let (pem, tls) = self_signed();
    let cms = RawPeer::start_tls(tls, |_| login_ok()).await;
    let base_url = format!("https://{}/OpenSim-CMS/api", cms.addr);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("system-store.pem");
    std::fs::write(&store, &pem).expect("write");

    let report = check_over_tls(&base_url, None).await;
    assert!(report.contains("FAIL cms.login"), "{report}");
    let report = check_over_tls(&base_url, Some(&store)).await;
    assert!(report.contains("ok   cms.login"), "{report}");
}

/// A login answer that is no login answer: a PHP warning page that echoes the password and holds a
/// token-shaped string, longer than anyone wants in a log line.
fn junk_login_page() -> String {
    format!(
        "<b>Warning</b>: MySQL server has gone away checking password '{RELAY_PASSWORD}' for \
         session {TOKEN} in <b>/var/www/OpenSim-CMS/api/includes/class.Auth.php</b> on line \
         212<br />\n{}",
        "<p>stack frame</p>\n".repeat(200)
    )
}

/// A free loopback port (bound and released: nothing else on this machine picks it in between in
/// practice, and a clash fails the test loudly).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

async fn get_text(url: &str) -> String {
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .get(url)
        .send()
        .await
        .expect("the endpoint answers");
    response.text().await.expect("body")
}

/// Every task of the relay that needs the CMS (start-up, delivery, the avatar lookups, in-world)
/// meets a CMS whose login answers junk. Logins follow the retry schedule, and what the relay shows
/// of the answer (`/readyz`, `/status`, its log) is a short snippet without the password or anything
/// token-shaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_after_junk_answers_back_off_and_the_answer_is_shown_scrubbed() {
    let env = TestEnv::start().await;
    let page = junk_login_page();
    let cms =
        RawPeer::start(move |_| response("200 OK", &[("Content-Type", "text/html")], &page)).await;
    for speaker in ["Alice Resident", "Bob Resident", "Carol Resident"] {
        env.lg.add_avatar(speaker);
        env.lg.say(speaker, "hello");
    }
    let port = free_port();
    let health = format!("127.0.0.1:{port}");
    let base_url = cms.base_url();
    let mut relay = env.spawn_relay_process(
        &[
            ("cms.base_url", &base_url),
            ("retry.initial", "200ms"),
            ("retry.max", "60s"),
            ("inworld.poll_interval", "100ms"),
            ("http.listen", &health),
        ],
        Stdio::piped(),
    );
    let stderr = relay.stderr.take().expect("piped");
    let log = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    eventually(PATIENCE, "a first login", || async {
        !cms.seen().is_empty()
    })
    .await;
    let n_before = cms.seen().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n_logins = cms.seen().len() - n_before;
    let readyz = get_text(&format!("http://{health}/readyz")).await;
    let status = get_text(&format!("http://{health}/status")).await;
    assert!(sigterm(relay).success(), "clean stop");
    let log = log.join().expect("log reader");

    assert!(
        cms.seen()
            .iter()
            .all(|s| s.request_line.contains("/auth/username/")),
        "only logins: {:?}",
        cms.seen()
    );
    assert!(
        n_logins <= 6,
        "{n_logins} logins in 2 s with retry.initial = 200ms: not backing off"
    );
    let readyz: Value = serde_json::from_str(&readyz).expect("JSON");
    let reason = readyz["checks"]["cms"]["reason"]
        .as_str()
        .expect("a reason");
    assert!(reason.contains("HTTP 200"), "{reason}");
    for (what, text) in [("/readyz", reason), ("/status", &status), ("the log", &log)] {
        assert!(
            !text.contains(RELAY_PASSWORD),
            "{what} echoes the password: {text}"
        );
        assert!(
            !text.contains(TOKEN),
            "{what} holds the token-shaped string: {text}"
        );
        assert!(
            !text.contains("stack frame</p>\n<p>stack frame"),
            "{what} copies the page"
        );
    }
    assert!(reason.len() <= 400, "{} bytes: {reason}", reason.len());
    let failures: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("MySQL server has gone away"))
        .collect();
    assert!(
        !failures.is_empty(),
        "the log says what the CMS answered:\n{log}"
    );
    assert!(failures.iter().all(|l| l.len() <= 800), "{failures:?}");
}
