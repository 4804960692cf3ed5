//! Tests of the simulated OpenSim-CMS 1.1 against `../shared/specs/opensim-cms-api.md`.
//!
//! Requests go through reqwest with title-case headers (as a correct relay sends them), or as raw
//! bytes over TCP where the exact case of a header name is the point of the test.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use chrono::{NaiveDateTime, Utc};
use clap::Parser;
use opensim_chat_relay::sim::cms::{
    CmsArgs, CmsDialect, CmsHandle, CmsSim, CmsSimSettings, Fault, Permissions, StoredChat, run_cli,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const PASSWORD: &str = "s3cret";
const UNAUTHORIZED: &str = "Unauthorized to access this API URL";
/// 2026-01-01 12:00:05 in Europe/Amsterdam (UTC+1 in winter).
const NOON_05_UNIX: i64 = 1_767_265_205;

/// A started simulator with a relay account (id 3).
struct TestCms {
    sim: CmsSim,
    cms: CmsHandle,
    base: String,
    relay_id: i64,
}

async fn spawn_cms_with(dialect: CmsDialect, debug_noise: bool) -> TestCms {
    let sim = CmsSim::start(CmsSimSettings {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        dialect,
        timezone: chrono_tz::Europe::Amsterdam,
        debug_noise,
    })
    .await
    .expect("the simulated cms starts");
    let cms = sim.handle();
    let relay_id = cms.add_user("relay", PASSWORD, "Chat", "Relay", Permissions::relay());
    let base = sim.base_url();
    TestCms {
        sim,
        cms,
        base,
        relay_id,
    }
}

async fn spawn_cms() -> TestCms {
    spawn_cms_with(CmsDialect::Stock, false).await
}

fn client() -> reqwest::Client {
    client_from(None)
}

fn client_from(local_address: Option<IpAddr>) -> reqwest::Client {
    client_with(local_address, Duration::from_secs(5))
}

/// A client that gives up after 300 ms: for requests the simulator never answers.
fn impatient_client() -> reqwest::Client {
    client_with(None, Duration::from_millis(300))
}

fn client_with(local_address: Option<IpAddr>, timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .http1_title_case_headers()
        .no_proxy()
        .local_address(local_address)
        .timeout(timeout)
        .build()
        .expect("a reqwest client builds")
}

impl TestCms {
    async fn login_with(&self, client: &reqwest::Client, form: &str) -> (u16, Value) {
        let response = client
            .post(format!("{}/auth/username/", self.base))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(form.to_owned())
            .send()
            .await
            .expect("login request completes");
        let status = response.status().as_u16();
        let body = response.text().await.expect("login body");
        (
            status,
            serde_json::from_str(&body).expect("login answer is JSON"),
        )
    }

    async fn token(&self) -> String {
        let (status, body) = self
            .login_with(&client(), &format!("username=relay&password={PASSWORD}"))
            .await;
        assert_eq!(status, 200, "{body}");
        body["token"].as_str().expect("a token").to_owned()
    }

    async fn post_chats(&self, token: &str, body: &Value) -> (u16, String) {
        self.post_chats_with(&client(), token, body.to_string())
            .await
            .expect("chat post completes")
    }

    async fn post_chats_with(
        &self,
        client: &reqwest::Client,
        token: &str,
        body: String,
    ) -> reqwest::Result<(u16, String)> {
        let response = client
            .post(format!("{}/grid/1/chats/?token={token}", self.base))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.text().await?))
    }

    async fn get(&self, path_and_query: &str) -> (u16, String) {
        let response = client()
            .get(format!("{}{path_and_query}", self.base))
            .send()
            .await
            .expect("get completes");
        let status = response.status().as_u16();
        (status, response.text().await.expect("get body"))
    }

    async fn get_json(&self, path_and_query: &str) -> Value {
        let (status, body) = self.get(path_and_query).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("JSON answer")
    }

    /// Posts one line with [`impatient_client`]: the outcome of a POST that may never be answered.
    async fn post_line_impatiently(
        &self,
        token: &str,
        message: &str,
    ) -> reqwest::Result<(u16, String)> {
        let line = self.line(message, "2026-01-01 12:00:05");
        self.post_chats_with(&impatient_client(), token, line.to_string())
            .await
    }

    fn line(&self, message: &str, timestamp: &str) -> Value {
        json!({"userId": self.relay_id, "message": message, "timestamp": timestamp, "fromCMS": 0})
    }
}

/// A response read from a raw socket.
struct RawResponse {
    status: u16,
    head: String,
    body: String,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// Sends `head_lines` (each ending in CRLF) and `body` exactly as written, with `Connection:
/// close`, and reads the whole answer.
async fn raw(addr: SocketAddr, request_line: &str, head_lines: &str, body: &str) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "{request_line} HTTP/1.1\r\nHost: {addr}\r\n{head_lines}Connection: close\r\n\r\n{body}"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the answer arrives in time")
        .expect("read answer");
    let answer = String::from_utf8(answer).expect("UTF-8 answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a complete answer");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    RawResponse {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

fn content_length(body: &str) -> String {
    format!("Content-Length: {}\r\n", body.len())
}

fn messages(chats: &[StoredChat]) -> Vec<&str> {
    chats.iter().map(|chat| chat.message.as_str()).collect()
}

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|error| panic!("not JSON ({error}): {body}"))
}

// ------------------------------------------------------------------------------------------
// Login and tokens
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn login_answers_a_token_with_a_string_user_id_and_no_success_key() {
    let cms = spawn_cms().await;

    let (status, first) = cms
        .login_with(&client(), &format!("username=relay&password={PASSWORD}"))
        .await;
    let (_, second) = cms
        .login_with(&client(), &format!("username=relay&password={PASSWORD}"))
        .await;

    assert_eq!(status, 200);
    let token = first["token"].as_str().expect("token");
    assert_eq!(token.len(), 48);
    assert!(token.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_eq!(first["ip"], "127.0.0.1");
    assert_eq!(first["userId"], json!(cms.relay_id.to_string()));
    assert!(first.get("success").is_none());
    assert_eq!(first["lastLogin"], Value::Null);
    assert!(second["lastLogin"].is_string());
    let expires = NaiveDateTime::parse_from_str(
        first["expires"].as_str().expect("expires"),
        "%Y-%m-%d %H:%M:%S",
    )
    .expect("expires is YYYY-MM-DD HH:MM:SS");
    let now_in_cms = Utc::now()
        .with_timezone(&chrono_tz::Europe::Amsterdam)
        .naive_local();
    let minutes = (expires - now_in_cms).num_minutes();
    assert!((29..=30).contains(&minutes), "expires in {minutes} min");
    assert_eq!(cms.cms.n_logins(), 2);
}

#[tokio::test]
async fn login_failures_are_http_200_with_success_false() {
    let cms = spawn_cms().await;
    cms.cms
        .add_user("nobody", "pw", "No", "Body", Permissions::none());
    let client = client();

    let unknown = cms.login_with(&client, "username=ghost&password=x").await;
    let wrong = cms
        .login_with(&client, "username=relay&password=wrong")
        .await;
    let forbidden = cms.login_with(&client, "username=nobody&password=pw").await;
    let opensim = cms
        .login_with(&client, "username=OpenSim&password=opensim")
        .await;

    assert_eq!(
        unknown,
        (200, json!({"success": false, "error": "User not found"}))
    );
    assert_eq!(
        wrong,
        (
            200,
            json!({"success": false, "error": "Invalid username/password combination used"})
        )
    );
    assert_eq!(
        forbidden,
        (
            200,
            json!({"success": false, "error": "You do not have permission to use the API"})
        )
    );
    assert_eq!(
        opensim.1["error"],
        "Not allowed to login as OpenSim outside the Grid"
    );
    assert_eq!(cms.cms.n_logins(), 0);
}

#[tokio::test]
async fn login_accepts_a_json_object_and_the_user_route() {
    let cms = spawn_cms().await;

    let json_login: Value = client()
        .post(format!("{}/auth/username", cms.base))
        .header("Content-Type", "application/json")
        .body(json!({"username": "relay", "password": PASSWORD}).to_string())
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("JSON");
    let user_login: Value = client()
        .post(format!("{}/auth/user/", cms.base))
        .body(format!("user=relay@example.com&password={PASSWORD}"))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("JSON");

    assert!(json_login["token"].is_string(), "{json_login}");
    assert!(user_login["token"].is_string(), "{user_login}");
}

#[tokio::test]
async fn the_token_is_read_only_from_the_query_string() {
    let cms = spawn_cms().await;
    let token = cms.token().await;

    let in_headers = client()
        .get(format!("{}/grid/1/chats/0/", cms.base))
        .header("Authorization", format!("Bearer {token}"))
        .header("Cookie", format!("token={token}"))
        .header("Token", token.clone())
        .send()
        .await
        .expect("get");
    let in_headers_status = in_headers.status().as_u16();
    let in_headers_body: Value = in_headers.json().await.expect("JSON");
    let in_query = cms.get(&format!("/grid/1/chats/0/?token={token}")).await;

    assert_eq!(in_headers_status, 401);
    assert_eq!(
        in_headers_body,
        json!({"success": false, "error": UNAUTHORIZED})
    );
    assert_eq!(in_query, (200, "[]".to_owned()));
}

#[tokio::test]
async fn a_token_is_bound_to_the_address_it_was_issued_to() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    let other_address = client_from(Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))));
    // The `ip` login field binds a token to another address.
    let (_, for_other) = cms
        .login_with(
            &client(),
            &format!("username=relay&password={PASSWORD}&ip=127.0.0.2"),
        )
        .await;
    let for_other = for_other["token"].as_str().expect("token").to_owned();

    let from_other = other_address
        .get(format!("{}/grid/1/chats/0/?token={token}", cms.base))
        .send()
        .await
        .expect("get from 127.0.0.2");
    let bound_elsewhere = other_address
        .get(format!("{}/grid/1/chats/0/?token={for_other}", cms.base))
        .send()
        .await
        .expect("get from 127.0.0.2");
    let from_issuer = cms
        .get(&format!("/grid/1/chats/0/?token={for_other}"))
        .await;

    assert_eq!(from_other.status().as_u16(), 401);
    assert_eq!(bound_elsewhere.status().as_u16(), 200);
    assert_eq!(from_issuer.0, 401);
}

#[tokio::test]
async fn expired_tokens_are_refused_with_401_and_a_new_login_works() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    assert_eq!(
        cms.get(&format!("/grid/1/chats/0/?token={token}")).await.0,
        200
    );

    cms.cms.expire_tokens();
    let (status, body) = cms.get(&format!("/grid/1/chats/0/?token={token}")).await;
    let fresh = cms.token().await;

    assert_eq!(status, 401);
    assert_eq!(parse(&body)["error"], UNAUTHORIZED);
    assert_eq!(
        cms.get(&format!("/grid/1/chats/0/?token={fresh}")).await.0,
        200
    );
}

#[tokio::test]
async fn permission_levels_are_checked_per_route() {
    let cms = spawn_cms().await;
    cms.cms.add_user(
        "reader",
        "pw",
        "Re",
        "Ader",
        Permissions {
            chat: 4,
            ..Permissions::relay()
        },
    );
    let (_, login) = cms
        .login_with(&client(), "username=reader&password=pw")
        .await;
    let token = login["token"].as_str().expect("token");

    let read = cms.get(&format!("/grid/1/chats/0/?token={token}")).await;
    let (post_status, post_body) = cms
        .post_chats(token, &cms.line("hi", "2026-01-01 12:00:05"))
        .await;

    assert_eq!(read.0, 200);
    assert_eq!(post_status, 401);
    assert_eq!(parse(&post_body)["error"], UNAUTHORIZED);
    assert!(cms.cms.chats().is_empty());
}

// ------------------------------------------------------------------------------------------
// Routing and output
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn routing_is_anchored_and_unknown_urls_or_methods_get_400() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    let addr = cms.sim.addr();
    let invalid = json!({"success": false, "error": "Invalid API URL used"});

    let outside = raw(addr, "GET /elsewhere/grid/1/chats/", "", "").await;
    let unknown = raw(addr, "GET /OpenSim-CMS/api/nothing/", "", "").await;
    let head = raw(
        addr,
        &format!("HEAD /OpenSim-CMS/api/grid/1/chats/0/?token={token}"),
        "",
        "",
    )
    .await;
    let options = raw(addr, "OPTIONS /OpenSim-CMS/api/grid/1/chats/", "", "").await;
    let double_slash = raw(
        addr,
        &format!("GET /OpenSim-CMS/api/grid/1/chats//?token={token}"),
        "",
        "",
    )
    .await;
    let without_slash = cms.get(&format!("/grid/1/chats/0?token={token}")).await;

    assert_eq!(outside.status, 404);
    assert_eq!(
        (unknown.status, parse(&unknown.body)),
        (400, invalid.clone())
    );
    assert_eq!(head.status, 400);
    assert_eq!(
        (options.status, parse(&options.body)),
        (400, invalid.clone())
    );
    assert_eq!(
        (double_slash.status, parse(&double_slash.body)),
        (400, invalid)
    );
    assert_eq!(without_slash, (200, "[]".to_owned()));
}

#[tokio::test]
async fn output_is_pretty_only_with_an_exact_case_user_agent() {
    let cms = spawn_cms().await;
    let addr = cms.sim.addr();
    let token = cms.token().await;
    cms.post_chats(&token, &cms.line("a/b é", "2026-01-01 12:00:05"))
        .await;
    let path = format!("GET /OpenSim-CMS/api/grid/1/chats/0/?token={token}");

    let pretty = raw(addr, &path, "User-Agent: test\r\n", "").await;
    let lower = raw(addr, &path, "user-agent: test\r\n", "").await;

    assert!(
        pretty.body.starts_with("[\n    {\n        \"id\": 1,"),
        "{}",
        pretty.body
    );
    assert!(!lower.body.contains('\n'), "{}", lower.body);
    assert!(
        lower.body.contains(r#""message":"a\/b \u00e9""#),
        "{}",
        lower.body
    );
    assert_eq!(pretty.header("Content-Type"), Some("application/json"));
    assert_eq!(parse(&pretty.body), parse(&lower.body));
}

#[tokio::test]
async fn requests_are_recorded_with_the_exact_header_case() {
    let cms = spawn_cms().await;
    let body = r#"{"x":1}"#;

    raw(
        cms.sim.addr(),
        "POST /OpenSim-CMS/api/grid/1/chats/?token=abc",
        &format!(
            "X-SecondLife-Shard: Testing\r\ncontent-type: application/json\r\n{}",
            content_length(body)
        ),
        body,
    )
    .await;

    let requests = cms.cms.requests();
    let last = requests.last().expect("one request recorded");
    assert_eq!(last.method, "POST");
    assert_eq!(last.path, "/OpenSim-CMS/api/grid/1/chats/");
    assert_eq!(last.query, "token=abc");
    assert!(
        last.headers
            .iter()
            .any(|(name, _)| name == "X-SecondLife-Shard")
    );
    assert!(last.headers.iter().any(|(name, _)| name == "content-type"));
    assert_eq!(last.body, body.as_bytes());
    assert_eq!(last.peer.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(cms.cms.n_chat_posts(), 1);
}

// ------------------------------------------------------------------------------------------
// POST chat: body parsing and validation
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_json_array_needs_the_exact_case_content_type_header() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    let addr = cms.sim.addr();
    let post = format!("POST /OpenSim-CMS/api/grid/1/chats/?token={token}");
    let array = json!([cms.line("one", "2026-01-01 12:00:05")]).to_string();
    let object = cms.line("two", "2026-01-01 12:00:06").to_string();

    let lower_array = raw(
        addr,
        &post,
        &format!(
            "content-type: application/json\r\n{}",
            content_length(&array)
        ),
        &array,
    )
    .await;
    let lower_object = raw(
        addr,
        &post,
        &format!(
            "content-type: application/json\r\n{}",
            content_length(&object)
        ),
        &object,
    )
    .await;
    let title_array = raw(
        addr,
        &post,
        &format!(
            "Content-Type: application/json\r\n{}",
            content_length(&array)
        ),
        &array,
    )
    .await;

    assert_eq!(
        (lower_array.status, parse(&lower_array.body)),
        (
            200,
            json!({"success": false, "error": "Expected 3 parameters, 0 given"})
        )
    );
    assert_eq!(parse(&lower_object.body), json!({"success": true, "id": 1}));
    assert_eq!(parse(&title_array.body), json!({"success": true, "id": 2}));
    assert_eq!(messages(&cms.cms.chats()), ["two", "one"]);
}

#[tokio::test]
async fn a_chunked_body_reads_as_empty() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    let object = cms.line("chunked", "2026-01-01 12:00:05").to_string();
    let chunked = format!("{:x}\r\n{object}\r\n0\r\n\r\n", object.len());

    let answer = raw(
        cms.sim.addr(),
        &format!("POST /OpenSim-CMS/api/grid/1/chats/?token={token}"),
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
        &chunked,
    )
    .await;

    assert_eq!(
        parse(&answer.body),
        json!({"success": false, "error": "Expected 3 parameters, 0 given"})
    );
    assert!(cms.cms.chats().is_empty());
}

#[tokio::test]
async fn a_form_post_of_one_message_works() {
    let cms = spawn_cms().await;
    let token = cms.token().await;

    let answer = client()
        .post(format!("{}/grid/1/chats/?token={token}", cms.base))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("userId=-1&message=%5BFred%5D+hi&timestamp=2026-01-01+12%3A00%3A05&fromCMS=0")
        .send()
        .await
        .expect("post")
        .text()
        .await
        .expect("body");

    // A form with a numeric timestamp is decoded twice: by PHP's form parsing, then `urldecode`.
    let twice = client()
        .post(format!("{}/grid/1/chats/?token={token}", cms.base))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!(
            "userId=-1&message=100%2525+sure%252B&timestamp={NOON_05_UNIX}&fromCMS=0"
        ))
        .send()
        .await
        .expect("post")
        .text()
        .await
        .expect("body");

    assert_eq!(parse(&answer), json!({"success": true, "id": 1}));
    assert_eq!(parse(&twice), json!({"success": true, "id": 2}));
    assert_eq!(messages(&cms.cms.chats()), ["[Fred] hi", "100% sure+"]);
}

#[tokio::test]
async fn a_validation_error_anywhere_stores_nothing_of_the_batch() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    let good = cms.line("good", "2026-01-01 12:00:05");
    let id = cms.relay_id;
    let cases = [
        (
            json!({"userId": id, "message": "x"}),
            "Expected 3 parameters, 2 given",
        ),
        (
            json!({"userId": "abc", "message": "x", "timestamp": "2026-01-01 12:00:05"}),
            "Missing parameter (integer) \"userId\"",
        ),
        (
            json!({"userId": id, "message": "", "timestamp": "2026-01-01 12:00:05"}),
            "Missing parameter (string) \"message\" with a minumum length of 1 character",
        ),
        (
            json!({"userId": id, "message": "x", "timestamp": "2026-01-01T12:00:05"}),
            "Missing parameter (string) \"timestamp\", which should be in the format YYYY-MM-DD HH:mm:ss",
        ),
        (
            json!({"userId": id, "message": "x", "timestamp": "2026-01-01 12:00:05", "fromCMS": 2}),
            "Invalid parameter (integer) \"fromCMS\", which should be a 1 (for TRUE) or 0 (for FALSE)",
        ),
        (json!([]), "Expected 3 parameters, 0 given"),
    ];

    for (bad, error) in cases {
        let batch = if bad.is_array() {
            bad
        } else {
            json!([good, bad, good])
        };
        let (status, body) = cms.post_chats(&token, &batch).await;
        assert_eq!(
            (status, parse(&body)),
            (200, json!({"success": false, "error": error})),
            "batch {batch}"
        );
    }

    assert!(cms.cms.chats().is_empty());
}

// ------------------------------------------------------------------------------------------
// POST chat: inserts
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_unknown_key_is_an_html_fatal_error_after_earlier_rows_were_stored() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    let mut extra = cms.line("third", "2026-01-01 12:00:07");
    extra["name"] = json!("Fred");
    let batch = json!([
        cms.line("first", "2026-01-01 12:00:05"),
        cms.line("second", "2026-01-01 12:00:06"),
        extra,
        cms.line("fourth", "2026-01-01 12:00:08"),
    ]);

    let response = client()
        .post(format!("{}/grid/1/chats/?token={token}", cms.base))
        .header("Content-Type", "application/json")
        .body(batch.to_string())
        .send()
        .await
        .expect("post");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response.text().await.expect("body");

    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/html"), "{content_type}");
    assert!(body.starts_with("<br />\n<b>Fatal error</b>:  "), "{body}");
    assert!(
        body.contains("Unknown column &#039;name&#039; in &#039;field list&#039;"),
        "{body}"
    );
    assert_eq!(messages(&cms.cms.chats()), ["first", "second"]);
}

#[tokio::test]
async fn user_id_0_and_unknown_ids_fail_the_insert_and_minus_1_is_anonymous() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    let line = |user: i64, message: &str| json!({"userId": user, "message": message, "timestamp": "2026-01-01 12:00:05", "fromCMS": 0});

    let zero = cms.post_chats(&token, &line(0, "zero")).await;
    let unknown = cms.post_chats(&token, &line(99, "unknown")).await;
    let anonymous = cms
        .post_chats(&token, &line(-1, "[Fred Flintstone] hi"))
        .await;
    let read = cms
        .get_json(&format!("/grid/1/chats/0/?token={token}"))
        .await;

    assert_eq!(parse(&zero.1), json!({"success": false, "id": 0}));
    assert_eq!(parse(&unknown.1), json!({"success": false, "id": 0}));
    // Two failed inserts consumed ids 1 and 2.
    assert_eq!(parse(&anonymous.1), json!({"success": true, "id": 3}));
    let chats = cms.cms.chats();
    assert_eq!(chats.len(), 1);
    assert_eq!(chats[0].user_id, None);
    assert_eq!(
        read[0]["user"],
        json!({"id": -1, "username": "Anonymous", "firstName": "", "lastName": "",
               "email": "Anonymous", "picture": false, "lastLogin": "0000-00-00 00:00:00"})
    );
}

#[tokio::test]
async fn an_emoji_fails_its_insert_silently_in_the_middle_of_a_batch() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    let batch = json!([
        cms.line("before", "2026-01-01 12:00:05"),
        cms.line("party 🎉", "2026-01-01 12:00:06"),
        cms.line("after", "2026-01-01 12:00:07"),
    ]);

    let (status, body) = cms.post_chats(&token, &batch).await;

    assert_eq!(
        (status, parse(&body)),
        (200, json!({"success": true, "id": 3}))
    );
    let chats = cms.cms.chats();
    assert_eq!(messages(&chats), ["before", "after"]);
    assert_eq!(chats.iter().map(|chat| chat.id).collect::<Vec<_>>(), [1, 3]);
}

#[tokio::test]
async fn a_failing_last_element_answers_success_false_though_earlier_rows_are_stored() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    let batch = json!([
        cms.line("one", "2026-01-01 12:00:05"),
        cms.line("two", "2026-01-01 12:00:06"),
        cms.line("zone", "2026-01-01 12:00:07+02:00"),
    ]);

    let (_, body) = cms.post_chats(&token, &batch).await;

    assert_eq!(parse(&body), json!({"success": false, "id": 0}));
    assert_eq!(messages(&cms.cms.chats()), ["one", "two"]);
}

#[tokio::test]
async fn a_client_supplied_id_becomes_the_primary_key() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    let mut with_id = cms.line("chosen", "2026-01-01 12:00:05");
    with_id["id"] = json!(100);

    let (_, first) = cms.post_chats(&token, &with_id).await;
    let (_, next) = cms
        .post_chats(&token, &cms.line("next", "2026-01-01 12:00:06"))
        .await;
    let (_, duplicate) = cms.post_chats(&token, &with_id).await;

    assert_eq!(parse(&first), json!({"success": true, "id": 100}));
    assert_eq!(parse(&next), json!({"success": true, "id": 101}));
    assert_eq!(parse(&duplicate), json!({"success": false, "id": 0}));
}

#[tokio::test]
async fn strip_tags_is_applied_before_storing() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    let texts = ["I <3 you", "x<y", "a < b", "pos <1,2,3> end", "<b>bold</b>"];
    let batch: Vec<Value> = texts
        .iter()
        .map(|text| cms.line(text, "2026-01-01 12:00:05"))
        .collect();

    cms.post_chats(&token, &json!(batch)).await;

    assert_eq!(
        messages(&cms.cms.chats()),
        ["I ", "x", "a < b", "pos  end", "bold"]
    );
}

#[tokio::test]
async fn a_numeric_timestamp_url_decodes_the_message_and_converts_in_the_cms_zone() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    let batch = json!([
        {"userId": cms.relay_id, "message": "a+b%2Bc%25", "timestamp": NOON_05_UNIX, "fromCMS": 0},
        {"userId": cms.relay_id, "message": "x%20y", "timestamp": NOON_05_UNIX.to_string(), "fromCMS": 0},
        cms.line("a+b%2B", "2026-01-01 12:00:05"),
    ]);

    cms.post_chats(&token, &batch).await;

    let chats = cms.cms.chats();
    assert_eq!(messages(&chats), ["a b+c%", "x y", "a+b%2B"]);
    assert!(
        chats
            .iter()
            .all(|chat| chat.timestamp == "2026-01-01 12:00:05")
    );
}

#[tokio::test]
async fn an_omitted_from_cms_is_stored_as_1() {
    let cms = spawn_cms().await;
    let token = cms.token().await;

    cms.post_chats(
        &token,
        &json!({"userId": cms.relay_id, "message": "no flag", "timestamp": "2026-01-01 12:00:05"}),
    )
    .await;
    cms.post_chats(&token, &cms.line("flag 0", "2026-01-01 12:00:05"))
        .await;

    let flags: Vec<bool> = cms.cms.chats().iter().map(|chat| chat.from_cms).collect();
    assert_eq!(flags, [true, false]);
}

// ------------------------------------------------------------------------------------------
// GET chat
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn get_with_a_timestamp_is_inclusive_and_newest_first() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    let batch = json!([
        cms.line("too early", "2026-01-01 12:00:04"),
        cms.line("at the second A", "2026-01-01 12:00:05"),
        cms.line("newest", "2026-01-01 12:00:10"),
        cms.line("at the second B", "2026-01-01 12:00:05"),
    ]);
    cms.post_chats(&token, &batch).await;

    let rows = cms
        .get_json(&format!("/grid/1/chats/{NOON_05_UNIX}/?token={token}"))
        .await;

    let rows = rows.as_array().expect("an array");
    assert_eq!(rows.len(), 3);
    assert_eq!(
        rows[0],
        json!({
            "id": 3,
            "user": {"id": cms.relay_id, "username": "relay", "firstName": "Chat", "lastName": "Relay",
                     "email": "relay@example.com", "picture": false, "lastLogin": rows[0]["user"]["lastLogin"]},
            "message": "newest",
            "timestamp": "2026-01-01 12:00:10",
            "fromCMS": 0
        })
    );
    assert!(rows[0]["user"]["lastLogin"].is_string());
    let mut same_second: Vec<&str> = rows[1..]
        .iter()
        .map(|row| row["message"].as_str().expect("message"))
        .collect();
    same_second.sort_unstable();
    assert_eq!(same_second, ["at the second A", "at the second B"]);
}

#[tokio::test]
async fn rows_of_the_same_second_come_back_in_no_fixed_order() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    let batch: Vec<Value> = (0..30)
        .map(|index| cms.line(&format!("line {index}"), "2026-01-01 12:00:05"))
        .collect();
    cms.post_chats(&token, &json!(batch)).await;

    let mut orders = Vec::new();
    for _ in 0..4 {
        let rows = cms
            .get_json(&format!("/grid/1/chats/0/?token={token}"))
            .await;
        let ids: Vec<i64> = rows
            .as_array()
            .expect("an array")
            .iter()
            .map(|row| row["id"].as_i64().expect("id"))
            .collect();
        orders.push(ids);
    }

    assert!(orders.iter().all(|ids| ids.len() == 30));
    // Four identical shuffles of 30 rows by chance: about 1 in 10^96.
    assert!(orders.windows(2).any(|pair| pair[0] != pair[1]));
}

#[tokio::test]
async fn get_without_a_timestamp_returns_the_whole_history() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    cms.post_chats(
        &token,
        &json!([
            cms.line("ancient", "2000-01-01 00:00:00"),
            cms.line("recent", "2026-01-01 12:00:05"),
        ]),
    )
    .await;
    cms.cms.add_grid(2, "Other grid");

    let all = cms.get_json(&format!("/grid/1/chats/?token={token}")).await;
    let other_grid = cms
        .get_json(&format!("/grid/2/chats/0/?token={token}"))
        .await;
    let unknown_grid = cms
        .get_json(&format!("/grid/9/chats/0/?token={token}"))
        .await;

    let texts: Vec<&str> = all
        .as_array()
        .expect("an array")
        .iter()
        .map(|row| row["message"].as_str().expect("message"))
        .collect();
    assert_eq!(texts, ["recent", "ancient"]);
    assert_eq!(other_grid, json!([]));
    assert_eq!(unknown_grid, json!([]));
}

#[tokio::test]
async fn a_chat_get_of_more_rows_than_the_memory_limit_is_a_php_fatal_error_page() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    let batch: Vec<Value> = (0..5)
        .map(|index| cms.line(&format!("line {index}"), "2026-01-01 12:00:05"))
        .collect();
    cms.post_chats(&token, &json!(batch)).await;
    cms.cms.set_memory_limit_rows(Some(4));

    let (status, too_many) = cms.get(&format!("/grid/1/chats/0/?token={token}")).await;
    let recent = cms
        .get_json(&format!(
            "/grid/1/chats/{}/?token={token}",
            NOON_05_UNIX + 1
        ))
        .await;
    cms.cms.set_memory_limit_rows(None);
    let unlimited = cms
        .get_json(&format!("/grid/1/chats/0/?token={token}"))
        .await;

    assert_eq!(status, 200);
    assert!(
        too_many.contains("<b>Fatal error</b>")
            && too_many.contains("Allowed memory size of 134217728 bytes exhausted")
            && too_many.contains("chat.php</b> on line <b>77</b>"),
        "{too_many}"
    );
    assert!(serde_json::from_str::<Value>(&too_many).is_err());
    assert_eq!(recent, json!([]), "a read under the limit is answered");
    assert_eq!(unlimited.as_array().map(Vec::len), Some(5));
}

#[tokio::test]
async fn a_cms_line_is_stored_with_from_cms_1_at_the_cms_time() {
    let cms = spawn_cms().await;
    let token = cms.token().await;

    let id = cms.cms.add_cms_line(1, 2, "hello <b>world</b>");
    let failed = cms.cms.add_cms_line(1, 99, "nobody");

    assert_eq!(id, 1);
    assert_eq!(failed, 0);
    let chats = cms.cms.chats();
    assert_eq!(messages(&chats), ["hello world"]);
    assert!(chats[0].from_cms);
    assert_eq!(chats[0].user_id, Some(2));
    let stored = NaiveDateTime::parse_from_str(&chats[0].timestamp, "%Y-%m-%d %H:%M:%S")
        .expect("a timestamp");
    let now_in_cms = Utc::now()
        .with_timezone(&chrono_tz::Europe::Amsterdam)
        .naive_local();
    assert!((now_in_cms - stored).num_seconds().abs() <= 5);
    let rows = cms
        .get_json(&format!("/grid/1/chats/0/?token={token}"))
        .await;
    assert_eq!(rows[0]["fromCMS"], 1);
    assert_eq!(rows[0]["user"]["username"], "admin");
}

// ------------------------------------------------------------------------------------------
// Avatars, grids, users
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn avatar_lookup_takes_lower_case_v4_uuids_and_reports_confirmed() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    let uuid = "6c7d2c8f-b9b9-43e9-9ce3-8d56232b51c9";
    let fred = cms
        .cms
        .add_user("fred", "pw", "Fred", "Flintstone", Permissions::relay());
    cms.cms.link_avatar(1, uuid, fred, false);

    let linked = cms
        .get_json(&format!("/grid/1/avatar/{uuid}/?token={token}"))
        .await;
    let upper = cms
        .get(&format!(
            "/grid/1/avatar/{}/?token={token}",
            uuid.to_uppercase()
        ))
        .await;
    let not_v4 = cms
        .get_json(&format!(
            "/grid/1/avatar/00000000-0000-0000-0000-000000000000/?token={token}"
        ))
        .await;
    let unlinked = cms
        .get_json(&format!(
            "/grid/1/avatar/11111111-2222-4333-8444-555555555555/?token={token}"
        ))
        .await;
    let other_grid = cms
        .get_json(&format!("/grid/2/avatar/{uuid}/?token={token}"))
        .await;
    cms.cms.link_avatar(1, uuid, fred, true);
    let confirmed = cms
        .get_json(&format!("/grid/1/avatar/{uuid}?token={token}"))
        .await;

    assert_eq!(linked["id"], fred);
    assert_eq!(linked["username"], "fred");
    assert_eq!(linked["avatars"][0]["uuid"], uuid);
    assert_eq!(linked["avatars"][0]["gridId"], 1);
    assert_eq!(linked["avatars"][0]["confirmed"], 0);
    assert_eq!(linked["permissions"]["chat"], 5);
    assert_eq!(confirmed["avatars"][0]["confirmed"], 1);
    assert_eq!(
        (upper.0, parse(&upper.1)),
        (
            400,
            json!({"success": false, "error": "Invalid API URL used"})
        )
    );
    assert_eq!(
        not_v4,
        json!({"success": false, "error": "Invalid UUID provided"})
    );
    let not_found = json!({"success": false, "error": "Avatar not found on this Grid"});
    assert_eq!(unlinked, not_found);
    assert_eq!(other_grid, not_found);
}

#[tokio::test]
async fn grid_and_user_lookups_answer_or_say_not_found() {
    let cms = spawn_cms().await;
    let token = cms.token().await;

    let grid = cms.get_json(&format!("/grid/1/?token={token}")).await;
    let no_grid = cms.get_json(&format!("/grid/7/?token={token}")).await;
    let user = cms.get_json(&format!("/user/2/?token={token}")).await;
    let no_user = cms.get_json(&format!("/user/77/?token={token}")).await;

    assert_eq!(grid["id"], 1);
    assert_eq!(grid["name"], "OpenSim's test grid");
    assert_eq!(
        no_grid,
        json!({"success": false, "error": "Grid not found"})
    );
    assert_eq!(user["username"], "admin");
    assert_eq!(user["permissions"]["user"], 7);
    assert_eq!(
        no_user,
        json!({"success": false, "error": "User not found"})
    );
}

// ------------------------------------------------------------------------------------------
// Debug noise and the documented dialect
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn debug_noise_puts_php_warnings_before_the_json_and_keeps_status_200() {
    let cms = spawn_cms_with(CmsDialect::Stock, true).await;

    let unauthorized = raw(
        cms.sim.addr(),
        "GET /OpenSim-CMS/api/grid/1/chats/0/",
        "",
        "",
    )
    .await;
    let login = client()
        .post(format!("{}/auth/username/", cms.base))
        .body(format!("username=relay&password={PASSWORD}"))
        .send()
        .await
        .expect("login")
        .text()
        .await
        .expect("body");

    assert_eq!(unauthorized.status, 200);
    assert!(
        unauthorized
            .body
            .starts_with("<br />\n<b>Warning</b>:  file_put_contents(logs/access-"),
        "{}",
        unauthorized.body
    );
    let json_start = unauthorized.body.find('{').expect("JSON after the warning");
    let error = parse(&unauthorized.body[json_start..]);
    assert_eq!(error["success"], false);
    assert_eq!(error["error"], UNAUTHORIZED);
    assert_eq!(error["Code"], 0);
    assert!(error["File"].as_str().expect("File").ends_with("api.php"));
    assert!(error["Line"].is_i64());
    assert_eq!(error["Trace"], json!([]));
    let last_line = login.lines().last().expect("a last line");
    assert!(parse(last_line)["token"].is_string(), "{login}");
}

#[tokio::test]
async fn the_documented_dialect_accepts_user_id_0_and_answers_errors_with_400() {
    let cms = spawn_cms_with(CmsDialect::Documented, false).await;
    let token = cms.token().await;

    let zero = cms
        .post_chats(
            &token,
            &json!({"userId": 0, "message": "anon", "timestamp": "2026-01-01 12:00:05", "fromCMS": 0}),
        )
        .await;
    let invalid = cms
        .post_chats(&token, &json!({"userId": 0, "message": "x"}))
        .await;
    let (login_status, _) = cms
        .login_with(&client(), "username=relay&password=wrong")
        .await;
    let unauthorized = cms.get("/grid/1/chats/0/").await;

    assert_eq!(
        (zero.0, parse(&zero.1)),
        (200, json!({"success": true, "id": 1}))
    );
    assert_eq!(cms.cms.chats()[0].user_id, None);
    assert_eq!(
        (invalid.0, parse(&invalid.1)),
        (
            400,
            json!({"success": false, "error": "Expected 3 parameters, 2 given"})
        )
    );
    assert_eq!(login_status, 400);
    assert_eq!(unauthorized.0, 401);
}

// ------------------------------------------------------------------------------------------
// Faults
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn fault_status_answers_that_status_and_stores_nothing() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    cms.cms.fault_next(2, Fault::Status(500));
    let line = cms.line("retry me", "2026-01-01 12:00:05");

    // Faults apply to chat POSTs only.
    let read = cms.get(&format!("/grid/1/chats/0/?token={token}")).await;
    let first = cms.post_chats(&token, &line).await;
    let second = cms.post_chats(&token, &line).await;
    let third = cms.post_chats(&token, &line).await;

    assert_eq!(read.0, 200);
    assert_eq!(first.0, 500);
    assert!(first.1.contains("Internal Server Error"));
    assert_eq!(second.0, 500);
    assert_eq!(
        (third.0, parse(&third.1)),
        (200, json!({"success": true, "id": 1}))
    );
    assert_eq!(cms.cms.chats().len(), 1);
    assert_eq!(cms.cms.n_chat_posts(), 3);
}

#[tokio::test]
async fn fault_hang_never_answers_and_stores_nothing() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    cms.cms.fault_next(1, Fault::Hang);

    let outcome = cms.post_line_impatiently(&token, "lost").await;

    assert!(
        outcome.as_ref().is_err_and(reqwest::Error::is_timeout),
        "{outcome:?}"
    );
    assert!(cms.cms.chats().is_empty());
}

#[tokio::test]
async fn fault_hang_after_store_stores_then_never_answers() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    cms.cms.fault_next(1, Fault::HangAfterStore);

    let outcome = cms.post_line_impatiently(&token, "stored").await;

    assert!(
        outcome.as_ref().is_err_and(reqwest::Error::is_timeout),
        "{outcome:?}"
    );
    assert_eq!(messages(&cms.cms.chats()), ["stored"]);
}

#[tokio::test]
async fn fault_close_after_store_stores_then_closes_without_answering() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    cms.cms.fault_next(1, Fault::CloseAfterStore);

    let outcome = cms
        .post_chats_with(
            &client(),
            &token,
            cms.line("stored", "2026-01-01 12:00:05").to_string(),
        )
        .await;

    assert!(
        outcome.as_ref().is_err_and(|error| !error.is_timeout()),
        "{outcome:?}"
    );
    assert_eq!(messages(&cms.cms.chats()), ["stored"]);
}

#[tokio::test]
async fn fault_status_after_store_stores_then_answers_a_gateway_error() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    cms.cms.fault_next(1, Fault::StatusAfterStore(502));

    let (status, body) = cms
        .post_chats(&token, &cms.line("stored", "2026-01-01 12:00:05"))
        .await;

    assert_eq!(status, 502);
    assert!(body.contains("Bad Gateway"));
    assert_eq!(messages(&cms.cms.chats()), ["stored"]);
}

#[tokio::test]
async fn fault_slow_answers_normally_after_the_delay() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    cms.cms
        .fault_next(1, Fault::Slow(Duration::from_millis(300)));

    let started = Instant::now();
    let (status, body) = cms
        .post_chats(&token, &cms.line("slow", "2026-01-01 12:00:05"))
        .await;

    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        (status, parse(&body)),
        (200, json!({"success": true, "id": 1}))
    );
}

#[tokio::test]
async fn fault_fail_last_element_stores_the_others_and_reports_failure() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    cms.cms.fault_next(1, Fault::FailLastElement);
    let batch = json!([
        cms.line("one", "2026-01-01 12:00:05"),
        cms.line("two", "2026-01-01 12:00:06"),
        cms.line("three", "2026-01-01 12:00:07"),
    ]);

    let (_, body) = cms.post_chats(&token, &batch).await;
    let (_, next) = cms
        .post_chats(&token, &cms.line("four", "2026-01-01 12:00:08"))
        .await;

    assert_eq!(parse(&body), json!({"success": false, "id": 0}));
    assert_eq!(parse(&next), json!({"success": true, "id": 4}));
    assert_eq!(messages(&cms.cms.chats()), ["one", "two", "four"]);
}

#[tokio::test]
async fn offline_closes_every_connection_until_back_online() {
    let cms = spawn_cms().await;
    cms.cms.set_offline(true);

    let down = client()
        .post(format!("{}/auth/username/", cms.base))
        .body(format!("username=relay&password={PASSWORD}"))
        .send()
        .await;
    cms.cms.set_offline(false);
    let token = cms.token().await;

    assert!(down.is_err());
    assert_eq!(token.len(), 48);
    assert_eq!(cms.cms.requests().len(), 2);
}

#[tokio::test]
async fn unavailable_answers_every_request_with_that_status_and_stores_nothing() {
    let cms = spawn_cms().await;
    let token = cms.token().await;
    cms.cms.set_unavailable(Some(503));

    let login = client()
        .post(format!("{}/auth/username/", cms.base))
        .body(format!("username=relay&password={PASSWORD}"))
        .send()
        .await
        .expect("login answered");
    let read = cms.get(&format!("/grid/1/chats/0/?token={token}")).await;
    let post = cms
        .post_chats(&token, &cms.line("not now", "2026-01-01 12:00:05"))
        .await;
    cms.cms.set_unavailable(None);
    let after = cms
        .post_chats(&token, &cms.line("now", "2026-01-01 12:00:06"))
        .await;

    assert_eq!(login.status().as_u16(), 503);
    assert_eq!(read.0, 503);
    assert!(read.1.contains("Service Unavailable"), "{}", read.1);
    assert_eq!(post.0, 503);
    assert_eq!(
        (after.0, parse(&after.1)),
        (200, json!({"success": true, "id": 1}))
    );
    assert_eq!(messages(&cms.cms.chats()), ["now"]);
}

// ------------------------------------------------------------------------------------------
// Command line
// ------------------------------------------------------------------------------------------

#[derive(Parser)]
struct TestCli {
    #[command(flatten)]
    cms: CmsArgs,
}

#[test]
fn the_command_line_has_the_documented_defaults() {
    let defaults = TestCli::parse_from(["sim"]).cms;
    let custom = TestCli::parse_from([
        "sim",
        "--dialect",
        "documented",
        "--timezone",
        "America/New_York",
        "--user",
        "a:b",
        "--user",
        "c:d",
        "--fail-next",
        "3",
        "--fail-status",
        "503",
        "--slow",
        "250",
        "--memory-limit-rows",
        "50000",
    ])
    .cms;

    assert_eq!(defaults.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
    assert_eq!(defaults.dialect, CmsDialect::Stock);
    assert_eq!(defaults.timezone, chrono_tz::Europe::Amsterdam);
    assert_eq!(defaults.users, ["relay:relay-secret-changeme"]);
    assert!(!defaults.debug_noise);
    assert_eq!(custom.dialect, CmsDialect::Documented);
    assert_eq!(custom.timezone, chrono_tz::America::New_York);
    assert_eq!(custom.users, ["a:b", "c:d"]);
    assert_eq!((custom.fail_next, custom.fail_status), (3, 503));
    assert_eq!(custom.slow, Some(250));
    assert_eq!(
        (defaults.memory_limit_rows, custom.memory_limit_rows),
        (None, Some(50_000))
    );
    assert!(TestCli::try_parse_from(["sim", "--timezone", "Mars/Base"]).is_err());
}

#[tokio::test]
async fn run_cli_stops_when_cancelled_and_refuses_a_bad_user() {
    let mut args = TestCli::parse_from(["sim", "--listen", "127.0.0.1:0"]).cms;
    let shutdown = CancellationToken::new();
    shutdown.cancel();

    let stopped = tokio::time::timeout(
        Duration::from_secs(5),
        run_cli(args.clone(), shutdown.clone()),
    )
    .await
    .expect("run_cli returns once cancelled");
    args.users = vec!["no-colon".to_owned()];
    let refused = run_cli(args, shutdown).await;

    assert!(stopped.is_ok(), "{stopped:?}");
    assert!(refused.is_err());
}
