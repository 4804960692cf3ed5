//! The CMS password and token as a hostile or broken CMS can echo them back: every encoding a peer
//! can write them in is masked wherever the relay shows an answer (errors, `check`, `/readyz`).

use std::os::unix::fs::MetadataExt;
use std::process::Stdio;
use std::time::Duration;

use opensim_chat_relay::cms::CmsClient;
use opensim_chat_relay::cms::client::{CmsEndpoint, LoginState};
use secrecy::SecretString;

use crate::helpers::{
    PATIENCE, RELAY_PASSWORD, RELAY_USER, TestEnv, collect_stderr, eventually, sigterm,
};
use crate::hostile_cms::{RawPeer, Seen, response};

/// A password with what each encoding changes: `&`, `/`, `!`, a space, `"`, `<`, `>`, `'` and a
/// letter beyond ASCII.
const ODD_PASSWORD: &str = "S3cret&Pa55/word! \"q\" <\u{fc}> 'x'";

/// Runs of `ODD_PASSWORD` in the encodings below that must never be shown: each is at least 4
/// characters of the password's own letters around an encoded character.
fn shows_the_odd_password(text: &str) -> Option<&'static str> {
    [
        "S3cret",
        "Pa55",
        "55%2F",
        "55%2f",
        "word%21",
        "word!",
        "S3cret%26",
        "%26Pa",
        "&amp;Pa",
        "&#38;Pa",
        "\\/word",
        "\\u00fc",
        "\\u00FC",
        "%C3%BC",
        "%c3%bc",
        "Pa55\\/",
    ]
    .into_iter()
    .find(|part| text.contains(part))
}

/// The form body the relay sent (`username=…&password=…`), in the ways a PHP page can echo it: as
/// read from `php://input`, with lower-case escapes, through `rawurlencode`, `json_encode`,
/// `htmlspecialchars` and as numeric entities.
fn echoes(seen: &Seen) -> Vec<(&'static str, String)> {
    let raw = seen.body.clone();
    let json = serde_json::to_string(ODD_PASSWORD)
        .expect("json")
        .replace('/', "\\/")
        .replace('\u{fc}', "\\u00fc");
    let html = ODD_PASSWORD
        .replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&#039;");
    let numeric: String = ODD_PASSWORD
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_string()
            } else {
                format!("&#{};", c as u32)
            }
        })
        .collect();
    vec![
        ("the raw form body", raw.clone()),
        ("lower-case escapes", lower_escapes(&raw)),
        ("rawurlencode", raw.replace('+', "%20")),
        ("json_encode", format!("{{\"password\":{json}}}")),
        ("htmlspecialchars", html),
        ("numeric entities", numeric),
        ("json inside html", json.replace('"', "&quot;")),
    ]
}

/// `%2F` → `%2f`: some servers print escapes in lower case.
fn lower_escapes(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let escape = rest.get(at..at + 3).unwrap_or(&rest[at..]);
        out.push_str(&escape.to_lowercase());
        rest = &rest[at + escape.len()..];
    }
    out.push_str(rest);
    out
}

fn client_with(base_url: &str, password: &str) -> CmsClient {
    CmsClient::new(CmsEndpoint {
        base_url: base_url.to_owned(),
        grid_id: 1,
        username: "relay".to_owned(),
        password: SecretString::from(password.to_owned()),
        timeout: Duration::from_secs(5),
        max_response_bytes: 1 << 20,
        ca_certificates: Vec::new(),
    })
    .expect("client builds")
}

#[tokio::test]
async fn a_login_page_that_echoes_the_form_body_shows_the_password_in_no_encoding() {
    for variant in 0..7 {
        // Arrange: a CMS whose failed login prints what it was sent, the `variant`th way.
        let peer = RawPeer::start(move |seen| {
            let (_, echo) = echoes(seen).swap_remove(variant);
            let page = format!("<b>Warning</b>: login failed for {echo} in class.Auth.php");
            response(
                "500 Internal Server Error",
                &[("Content-Type", "text/html")],
                &page,
            )
        })
        .await;
        let client = client_with(&peer.base_url(), ODD_PASSWORD);

        // Act
        let err = client.login().await.expect_err("no token").to_string();
        let state = format!("{:?}", client.login_state());

        // Assert: what an error, the log and /readyz show has no trace of the password.
        let (how, _) = echoes(&peer.seen()[0]).swap_remove(variant);
        assert!(err.contains("class.Auth.php"), "{how}: {err}");
        for shown in [&err, &state] {
            assert_eq!(shows_the_odd_password(shown), None, "{how}: {shown}");
        }
        assert!(matches!(client.login_state(), LoginState::Failed(_)));
    }
}

/// A token that is not token-shaped (words and dashes), so that only knowing it masks it.
const ODD_TOKEN: &str = "tok-en/with+odd&chars";

#[tokio::test]
async fn an_error_page_that_prints_the_request_shows_no_token() {
    // Arrange: a CMS that logs in and answers every chat read with a page that prints the request
    // line, its query decoded and escaped, as PHP's error pages do.
    let peer = RawPeer::start(|seen| {
        if seen.request_line.contains("/auth/username/") {
            let body = format!(
                r#"{{"token":{},"ip":"127.0.0.1","userId":"3"}}"#,
                serde_json::to_string(ODD_TOKEN).expect("json")
            );
            return response("200 OK", &[("Content-Type", "application/json")], &body);
        }
        let page = format!(
            "<b>Fatal error</b>: in {} (token {})",
            seen.request_line,
            ODD_TOKEN.replace('&', "&amp;")
        );
        let status = if seen.request_line.contains("/chats/") {
            "503 Service Unavailable"
        } else {
            "200 OK"
        };
        response(status, &[("Content-Type", "text/html")], &page)
    })
    .await;
    let client = client_with(&peer.base_url(), "pw");

    // Act: a read that fails for its status, and one whose 200 is no JSON.
    let transient = client.chats_since(0).await.expect_err("503").to_string();
    let unreadable = client.grid_exists().await.expect_err("no JSON").to_string();

    // Assert
    for shown in [&transient, &unreadable] {
        assert!(shown.contains("Fatal error"), "{shown}");
        for part in ["tok-en", "odd%26", "odd&amp;", "odd&chars"] {
            assert!(!shown.contains(part), "{part:?} in {shown}");
        }
    }
}

/// A relay process (behind `wrapper`, if given; no HTTP endpoint) once it has logged in to the
/// CMS, and its log so far.
pub(crate) async fn spawn_logged_in(
    env: &TestEnv,
    wrapper: &[&str],
) -> (
    std::process::Child,
    std::sync::Arc<std::sync::Mutex<String>>,
) {
    let mut relay = env
        .relay_command(wrapper, &[("http.listen", "")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the relay starts");
    let log = collect_stderr(&mut relay);
    eventually(PATIENCE, "the relay logged in", || async {
        log.lock().expect("log").contains("logged in to the cms")
    })
    .await;
    (relay, log)
}

/// `id -u`
fn running_as_root() -> bool {
    let output = std::process::Command::new("id")
        .arg("-u")
        .output()
        .expect("id runs");
    String::from_utf8_lossy(&output.stdout).trim() == "0"
}

/// The value of `name` in `/proc/<pid>/status` or `/proc/<pid>/limits`'s line that starts with it.
fn proc_line(pid: u32, file: &str, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .expect("proc readable")
        .lines()
        .find(|line| line.starts_with(name))
        .unwrap_or_default()
        .to_owned()
}

// Multi-threaded: `sigterm` blocks while the simulators must go on answering the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_process_can_write_no_core_dump() {
    // Arrange: the relay as a service user (nobody when the tests run as root, since root's
    // /proc entries tell nothing), running and logged in.
    let env = TestEnv::start().await;
    let wrapper: &[&str] = if running_as_root() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ]
    } else {
        &[]
    };
    let (relay, _log) = spawn_logged_in(&env, wrapper).await;
    let pid = relay.id();

    // Act: what the kernel says of the running process.
    let uid_line = proc_line(pid, "status", "Uid:");
    let core_line = proc_line(pid, "limits", "Max core file size");
    let proc_owner = std::fs::metadata(format!("/proc/{pid}/status")).map(|m| m.uid());
    let status = sigterm(relay);

    // Assert: not root itself, yet its /proc entries belong to root (the kernel's sign of a
    // non-dumpable process), and its core size limit is 0 soft and hard.
    assert!(status.success(), "{status:?}");
    let effective_uid = uid_line.split_whitespace().nth(2);
    assert!(effective_uid.is_some_and(|uid| uid != "0"), "{uid_line}");
    assert_eq!(
        proc_owner.expect("proc entry"),
        0,
        "dumpable: /proc/{pid}/status is the user's"
    );
    let limits: Vec<&str> = core_line.split_whitespace().collect();
    assert_eq!(limits.get(4..6), Some(&["0", "0"][..]), "{core_line}");
}

#[test]
fn every_systemd_unit_forbids_core_dumps() {
    let units = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd");
    let mut n_units = 0;
    for entry in std::fs::read_dir(&units).expect("deploy/systemd") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|ext| ext == "service") {
            let unit = std::fs::read_to_string(&path).expect("unit");
            assert!(
                unit.lines().any(|line| line.trim() == "LimitCORE=0"),
                "{} allows a core dump",
                path.display()
            );
            n_units += 1;
        }
    }
    assert!(n_units >= 2, "{n_units} units");
}

#[tokio::test]
async fn a_cms_that_refuses_every_fresh_token_gets_backed_off_logins_not_one_per_request() {
    // Arrange: a CMS whose logins succeed and whose every other answer refuses the token.
    let peer = RawPeer::start(|seen| {
        if seen.request_line.contains("/auth/username/") {
            return crate::hostile_cms::login_ok();
        }
        response(
            "401 Unauthorized",
            &[("Content-Type", "application/json")],
            r#"{"error":"Unauthorized to access this API URL"}"#,
        )
    })
    .await;
    let client = client_with(&peer.base_url(), "pw").with_login_retry(
        opensim_chat_relay::backoff::RetryPolicy {
            initial: Duration::from_secs(30),
            max: Duration::from_secs(60),
        },
    );

    // Act: twenty requests, as delivery, in-world and the avatar lookups make them.
    let mut errors = Vec::new();
    for _ in 0..20 {
        errors.push(
            client
                .chats_since(0)
                .await
                .expect_err("refused")
                .to_string(),
        );
    }

    // Assert: one login, then the next waits for the retry schedule (each a token row in the
    // CMS's database); the errors say so.
    let n_logins = peer
        .seen()
        .iter()
        .filter(|s| s.request_line.contains("/auth/username/"))
        .count();
    assert_eq!(n_logins, 1, "{:?}", peer.seen());
    assert!(
        errors[1..]
            .iter()
            .all(|e| e.contains("next login attempt in")),
        "{errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_tokens_the_cms_refuses_logs_in_on_the_retry_schedule() {
    // Arrange: a running relay reading the CMS for in-world lines every 50 ms, whose CMS then
    // starts refusing every token (a proxy that changes the relay's address).
    let env = TestEnv::start().await;
    let relay = env
        .start_relay(
            "",
            &[
                ("inworld.poll_interval", "50ms"),
                ("retry.initial", "20s"),
                ("retry.max", "60s"),
            ],
        )
        .await;
    eventually(PATIENCE, "the first login", || async {
        env.db.n_logins() >= 1
    })
    .await;
    env.db.set_refuse_tokens(true);
    let (n_logins_before, n_requests_before) = (env.db.n_logins(), env.db.requests().len());

    // Act: twenty requests or more reach the CMS meanwhile.
    eventually(PATIENCE, "20 more requests at the cms", || async {
        env.db.requests().len() >= n_requests_before + 20
    })
    .await;

    // Assert: at most the one login a refusal of a proven token calls for, not one per request.
    let n_logins = env.db.n_logins() - n_logins_before;
    assert!(n_logins <= 1, "{n_logins} logins for 20 requests");
    relay.stop().await;
}

#[tokio::test]
async fn a_connection_idle_for_apaches_keep_alive_timeout_is_not_used_again() {
    // Arrange: a client of the simulated CMS (which keeps connections alive), logged in, that has
    // read the grid once.
    let env = TestEnv::start().await;
    let client = CmsClient::new(CmsEndpoint {
        base_url: env.cms.base_url(),
        grid_id: 1,
        username: RELAY_USER.to_owned(),
        password: SecretString::from(RELAY_PASSWORD),
        timeout: Duration::from_secs(5),
        max_response_bytes: 1 << 20,
        ca_certificates: Vec::new(),
    })
    .expect("client builds");
    client.grid_exists().await.expect("first read");

    // Act: the connection idles 4.5 s (Apache closes a kept-alive connection after 5 s idle, spec
    // §10.1: a request sent on it then may find it closing), then the next read.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    client.grid_exists().await.expect("second read");

    // Assert: the second read came on a new connection (another client port).
    let ports: Vec<u16> = env
        .db
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/grid/1/"))
        .map(|r| r.peer.port())
        .collect();
    assert_eq!(ports.len(), 2, "{ports:?}");
    assert_ne!(ports[0], ports[1], "the idle connection was used again");
}
