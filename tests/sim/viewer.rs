//! Tests of the simulated LookingGlass viewer (`sim::lookingglass`) and of the HTTP server it runs
//! on (`sim::http`), over raw TCP so header case, unanswered requests and aborted writes are seen
//! exactly as a client sees them.

use std::net::SocketAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use indexmap::IndexMap;
use opensim_chat_relay::sim::lookingglass::{
    Dialect, SaidLine, SimChatLine, ViewerArgs, ViewerSim, ViewerSimSettings, run_cli,
    spawn_chatter,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long a request must stay unanswered to count as "never answered". The server answers
/// everything else in well under a millisecond on loopback.
const NO_ANSWER_WAIT: Duration = Duration::from_millis(300);
/// Deadline for anything that should happen promptly.
const DEADLINE: Duration = Duration::from_secs(10);

/// A response as read off the wire.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("a UTF-8 body")
    }
}

/// A client connection that reads responses (skipping `100 Continue`).
struct RawClient {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl RawClient {
    async fn connect(addr: SocketAddr) -> RawClient {
        RawClient {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buffer: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write request");
    }

    /// Reads more bytes; false on EOF.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16384];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buffer.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Reads one final response (1xx are skipped), within the deadline.
    async fn response(&mut self) -> RawResponse {
        tokio::time::timeout(DEADLINE, self.read_response())
            .await
            .expect("a response within the deadline")
    }

    async fn read_response(&mut self) -> RawResponse {
        loop {
            let head_end = loop {
                if let Some(end) = find(&self.buffer, b"\r\n\r\n") {
                    break end;
                }
                assert!(
                    self.fill().await,
                    "connection closed before a response head"
                );
            };
            let head = String::from_utf8(self.buffer[..head_end].to_vec()).expect("ASCII head");
            self.buffer.drain(..head_end + 4);
            let mut lines = head.split("\r\n");
            let status_line = lines.next().expect("status line");
            let status: u16 = status_line
                .split(' ')
                .nth(1)
                .and_then(|code| code.parse().ok())
                .expect("status code");
            let headers: Vec<(String, String)> = lines
                .map(|line| {
                    let (name, value) = line.split_once(':').expect("header colon");
                    (name.to_owned(), value.trim().to_owned())
                })
                .collect();
            if (100..200).contains(&status) {
                continue;
            }
            let length: usize = headers
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                .map(|(_, value)| value.parse().expect("numeric content-length"))
                .unwrap_or(0);
            while self.buffer.len() < length {
                assert!(self.fill().await, "connection closed inside a body");
            }
            let body = self.buffer.drain(..length).collect();
            return RawResponse {
                status,
                headers,
                body,
            };
        }
    }

    /// True if nothing at all arrives within `NO_ANSWER_WAIT` (the connection stays open).
    async fn stays_silent(&mut self) -> bool {
        let mut byte = [0u8; 1];
        tokio::time::timeout(NO_ANSWER_WAIT, self.stream.read(&mut byte))
            .await
            .is_err()
    }

    /// True if the server closes the connection (EOF or reset) within the deadline, without
    /// sending a byte.
    async fn closed_without_answer(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(DEADLINE, self.stream.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) | Err(_) => false,
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Sends one request on a fresh connection and reads its response.
async fn exchange(addr: SocketAddr, request: &str) -> RawResponse {
    let mut client = RawClient::connect(addr).await;
    client.send(request.as_bytes()).await;
    client.response().await
}

/// Waits until `condition` holds, failing after the deadline.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

mod http_server {
    //! The hand-written HTTP/1.1 server.

    use super::*;
    use opensim_chat_relay::sim::http::{self, Reply, Request, Response};
    use tokio::sync::{mpsc, oneshot};
    use tokio_util::sync::CancellationToken;

    struct TestServer {
        addr: SocketAddr,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        written: mpsc::UnboundedReceiver<oneshot::Receiver<bool>>,
    }

    /// A server with test routes: `/echo` describes the request, `/silent` never answers,
    /// `/close` closes, `/big` writes 64 KiB in 512-byte pieces every 5 ms, `/small` answers
    /// `ok`; `/big` and `/small` hand their `written` receivers to the test.
    async fn start() -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let (written_tx, written) = mpsc::unbounded_channel();
        let handler = move |request: Request| {
            let written_tx = written_tx.clone();
            async move {
                match request.path.as_str() {
                    "/echo" => {
                        let mut text = format!(
                            "method={} target={} path={} query={} chunked={} q={:?}\n",
                            request.method,
                            request.target,
                            request.path,
                            request.query,
                            request.chunked,
                            request.query_param("q"),
                        );
                        for (name, value) in &request.headers {
                            text.push_str(&format!("{name}: {value}\n"));
                        }
                        text.push_str(&format!(
                            "exact Content-Type={:?} any content-type={:?}\n",
                            request.header_exact("Content-Type"),
                            request.header("content-type"),
                        ));
                        text.push_str("body=");
                        text.push_str(&String::from_utf8_lossy(&request.body));
                        Reply::Respond(
                            Response::new(200, "text/plain", text).with_header("X-lower-Case", "1"),
                        )
                    }
                    "/silent" => Reply::NoAnswer,
                    "/close" => Reply::Close,
                    "/big" | "/small" => {
                        let (tx, rx) = oneshot::channel();
                        let _ = written_tx.send(rx);
                        let mut response = if request.path == "/big" {
                            let mut response = Response::new(200, "text/plain", vec![b'x'; 65536]);
                            response.trickle = Some((512, Duration::from_millis(5)));
                            response
                        } else {
                            Response::new(200, "text/plain", "ok")
                        };
                        response.written = Some(tx);
                        Reply::Respond(response)
                    }
                    _ => Reply::Respond(Response::new(404, "text/plain", "no")),
                }
            }
        };
        let task = tokio::spawn(http::serve(listener, handler, shutdown.clone()));
        TestServer {
            addr,
            shutdown,
            task,
            written,
        }
    }

    #[tokio::test]
    async fn header_names_keep_the_case_the_client_sent() {
        let server = start().await;

        let response = exchange(
            server.addr,
            "GET /echo?q=a+b%2Bc&x HTTP/1.1\r\nHost: h\r\nX-MiXeD-CaSe: v1\r\ncontent-type: text/plain\r\n\r\n",
        )
        .await;

        let text = response.text();
        assert_eq!(response.status, 200);
        assert!(text.contains("X-MiXeD-CaSe: v1\n"), "{text}");
        assert!(text.contains("content-type: text/plain\n"), "{text}");
        assert!(
            text.contains("exact Content-Type=None any content-type=Some(\"text/plain\")"),
            "{text}"
        );
        assert!(
            text.contains("path=/echo query=q=a+b%2Bc&x chunked=false q=Some(\"a b+c\")"),
            "{text}"
        );
        assert_eq!(response.header("X-lower-Case"), Some("1"));
        assert!(
            response
                .headers
                .iter()
                .any(|(name, _)| name == "X-lower-Case")
        );
        assert_eq!(
            response.header("Content-Length"),
            Some(text.len().to_string().as_str())
        );
    }

    #[tokio::test]
    async fn keep_alive_serves_several_requests_and_connection_close_is_honoured() {
        let server = start().await;
        let mut client = RawClient::connect(server.addr).await;

        client
            .send(b"GET /echo HTTP/1.1\r\nHost: h\r\n\r\nPOST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")
            .await;
        let first = client.response().await;
        let second = client.response().await;
        client
            .send(b"GET /echo HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            .await;
        let third = client.response().await;

        assert!(first.text().starts_with("method=GET"));
        assert!(second.text().ends_with("body=abc"));
        assert_eq!(third.header("Connection"), Some("close"));
        assert!(client.closed_without_answer().await);
    }

    #[tokio::test]
    async fn no_answer_keeps_the_connection_open_until_shutdown() {
        let server = start().await;
        let mut client = RawClient::connect(server.addr).await;

        client
            .send(b"GET /silent HTTP/1.1\r\nHost: h\r\n\r\n")
            .await;
        let silent = client.stays_silent().await;
        server.shutdown.cancel();

        assert!(silent);
        assert!(client.closed_without_answer().await);
        tokio::time::timeout(DEADLINE, server.task)
            .await
            .expect("serve returns after shutdown")
            .expect("serve task");
    }

    #[tokio::test]
    async fn close_drops_the_connection_without_an_answer() {
        let server = start().await;
        let mut client = RawClient::connect(server.addr).await;

        client.send(b"GET /close HTTP/1.1\r\nHost: h\r\n\r\n").await;

        assert!(client.closed_without_answer().await);
    }

    #[tokio::test]
    async fn written_reports_a_completed_write_and_a_client_leaving_mid_trickle() {
        let mut server = start().await;

        let small = exchange(server.addr, "GET /small HTTP/1.1\r\nHost: h\r\n\r\n").await;
        let small_written = server.written.recv().await.expect("receiver");
        assert_eq!(small.text(), "ok");
        assert_eq!(small_written.await, Ok(true));

        let mut client = RawClient::connect(server.addr).await;
        client.send(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n").await;
        assert!(client.fill().await, "the head and a first piece arrive");
        drop(client);
        let big_written = server.written.recv().await.expect("receiver");

        let outcome = tokio::time::timeout(DEADLINE, big_written).await;
        assert_eq!(outcome.expect("told within the deadline"), Ok(false));
    }

    #[tokio::test]
    async fn expect_100_continue_is_answered_before_the_body_is_sent() {
        let server = start().await;
        let mut client = RawClient::connect(server.addr).await;

        client
            .send(b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            .await;
        while find(&client.buffer, b"\r\n\r\n").is_none() {
            assert!(client.fill().await);
        }
        let interim = String::from_utf8_lossy(&client.buffer).into_owned();
        client.send(b"hello").await;
        let response = client.response().await;

        assert!(
            interim.starts_with("HTTP/1.1 100 Continue\r\n"),
            "{interim}"
        );
        assert!(response.text().ends_with("body=hello"));
    }

    #[tokio::test]
    async fn chunked_bodies_are_dechunked_and_flagged() {
        let server = start().await;

        let response = exchange(
            server.addr,
            "POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        )
        .await;

        let text = response.text();
        assert!(text.contains("chunked=true"), "{text}");
        assert!(text.ends_with("body=hello world"), "{text}");
    }

    #[tokio::test]
    async fn bare_line_feeds_and_empty_lines_before_a_request_are_accepted() {
        let server = start().await;
        let mut client = RawClient::connect(server.addr).await;

        client
            .send(b"\r\n\nGET /echo?q=1 HTTP/1.1\nHost: h\nX-Bare: lf\n\n")
            .await;
        let bare = client.response().await;
        client
            .send(b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok\r\nGET /echo HTTP/1.1\r\nHost: h\r\n\r\n")
            .await;
        let with_body = client.response().await;
        let after_stray_line_end = client.response().await;

        assert_eq!(bare.status, 200);
        assert!(bare.text().contains("X-Bare: lf\n"), "{}", bare.text());
        assert!(bare.text().contains("q=Some(\"1\")"), "{}", bare.text());
        assert!(with_body.text().ends_with("body=ok"));
        assert!(after_stray_line_end.text().starts_with("method=GET"));
    }

    #[tokio::test]
    async fn malformed_requests_get_400_and_oversized_bodies_413() {
        let server = start().await;

        let bad_line = exchange(server.addr, "NONSENSE\r\n\r\n").await;
        let bad_length = exchange(
            server.addr,
            "POST /echo HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        )
        .await;
        let too_large = exchange(
            server.addr,
            "POST /echo HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n",
        )
        .await;

        assert_eq!(bad_line.status, 400);
        assert_eq!(bad_length.status, 400);
        assert_eq!(too_large.status, 413);
    }
}

// ---------------------------------------------------------------------------------------------
// The simulated viewer.

async fn start_viewer(
    dialect: Dialect,
    timezone: chrono_tz::Tz,
    crash_on_abort: bool,
) -> ViewerSim {
    ViewerSim::start(ViewerSimSettings {
        listen: "127.0.0.1:0".parse().expect("address"),
        dialect,
        timezone,
        own_name: "Relay Bot".to_owned(),
        crash_on_abort,
    })
    .await
    .expect("start the viewer simulator")
}

async fn lookingglass() -> ViewerSim {
    start_viewer(Dialect::Lookingglass, chrono_tz::UTC, false).await
}

/// The `Host` header value the viewer accepts.
fn host(sim: &ViewerSim) -> String {
    format!("127.0.0.1:{}", sim.addr().port())
}

fn get_request(sim: &ViewerSim, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        host(sim)
    )
}

fn post_request(host: &str, path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

type Batch = IndexMap<String, IndexMap<String, String>>;

/// GETs the chat and parses it keeping document order.
async fn get_chat(sim: &ViewerSim) -> (RawResponse, Batch) {
    let response = exchange(sim.addr(), &get_request(sim, "/api/chat")).await;
    let batch: Batch = serde_json::from_slice(&response.body).expect("a map of maps of strings");
    (response, batch)
}

async fn post_chat(sim: &ViewerSim, body: &str) -> RawResponse {
    exchange(sim.addr(), &post_request(&host(sim), "/api/chat", body)).await
}

fn utc(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .expect("an RFC 3339 time")
        .with_timezone(&Utc)
}

fn said(message: &str, channel: i32, chat_type: &str) -> SaidLine {
    SaidLine {
        message: message.to_owned(),
        channel,
        chat_type: chat_type.to_owned(),
    }
}

#[tokio::test]
async fn a_host_other_than_the_listener_prefix_gets_400_invalid_host() {
    let sim = lookingglass().await;
    sim.handle().say("Alice Resident", "still queued");

    let response = exchange(
        sim.addr(),
        &format!(
            "GET /api/chat HTTP/1.1\r\nHost: localhost:{}\r\n\r\n",
            sim.addr().port()
        ),
    )
    .await;

    assert_eq!(response.status, 400);
    assert_eq!(response.text(), "<h1>Bad Request (Invalid host)</h1>");
    assert_eq!(response.header("Server"), Some("Mono-HTTPAPI/1.0"));
    assert_eq!(sim.handle().queue_len(), 1, "the handler never ran");
    assert!(sim.chat_url().starts_with("http://127.0.0.1:"));
}

#[tokio::test]
async fn a_get_drains_the_whole_queue_and_the_next_get_is_empty() {
    let sim = lookingglass().await;
    let handle = sim.handle();
    handle.say("Alice Resident", "one");
    handle.push(SimChatLine::whisper("Bob Builder", "two"));
    handle.push(SimChatLine::avatar("Bob Builder", ""));

    let (response, first) = get_chat(&sim).await;
    let (second_response, second) = get_chat(&sim).await;

    assert_eq!(response.status, 200);
    assert_eq!(response.header("Content-Type"), Some("text/json"));
    assert_eq!(response.header("Server"), Some("LookingGlass"));
    assert_eq!(response.header("Cache-Control"), Some("no-cache"));
    let messages: Vec<&str> = first
        .values()
        .map(|entry| entry["Message"].as_str())
        .collect();
    assert_eq!(
        messages,
        ["one", "two"],
        "the empty message was never queued"
    );
    let alice = &first[0];
    assert_eq!(alice["From"], "Alice Resident");
    assert_eq!(alice["Type"], "Normal");
    assert_eq!(alice["EntryType"], "ChatTypeNormal");
    assert_eq!(alice["OwnerID"], handle.avatar_uuid("Alice Resident"));
    assert_eq!(first[1]["Type"], "Whisper");
    assert_eq!(second_response.text(), "{}");
    assert!(second.is_empty());
    assert_eq!(handle.n_gets(), 2);
    eventually("both lines handed out", || handle.handed_out().len() == 2).await;
    assert_eq!(handle.handed_out()[1].message, "two");
}

#[tokio::test]
async fn lines_of_the_same_millisecond_get_1_suffixed_keys_in_queue_order() {
    let sim = lookingglass().await;
    let handle = sim.handle();
    let instant = utc("2026-11-22T01:40:05.043Z");
    for text in ["first", "second", "third", "fourth"] {
        handle.push(SimChatLine::avatar("Alice Resident", text).at(instant));
    }

    let (response, batch) = get_chat(&sim).await;

    let keys: Vec<&str> = batch.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "20261122014005043",
            "202611220140050431",
            "2026112201400504311",
            "20261122014005043111"
        ]
    );
    assert!(
        batch
            .values()
            .all(|entry| entry["Time"] == "20261122014005043")
    );
    let messages: Vec<&str> = batch
        .values()
        .map(|entry| entry["Message"].as_str())
        .collect();
    assert_eq!(messages, ["first", "second", "third", "fourth"]);
    assert!(response.text().find("first") < response.text().find("fourth"));
}

#[tokio::test]
async fn time_is_a_12_hour_clock_in_the_viewer_zone_around_noon_and_midnight() {
    let sim = start_viewer(Dialect::Lookingglass, chrono_tz::Europe::Berlin, false).await;
    let handle = sim.handle();
    // Berlin is UTC+1 in January.
    let cases = [
        ("2026-01-15T11:05:07.123Z", "20260115120507123"), // 12:05 local: noon shows 12
        ("2026-01-15T12:05:07.123Z", "20260115010507123"), // 13:05 local shows 01
        ("2026-01-14T23:05:07.123Z", "20260115120507123"), // 00:05 local, next day: 12
        ("2026-01-15T00:05:07.123Z", "20260115010507123"), // 01:05 local, same as 13:05
    ];
    for (index, (instant, _)) in cases.iter().enumerate() {
        handle
            .push(SimChatLine::avatar("Alice Resident", &format!("line {index}")).at(utc(instant)));
    }

    let (_, batch) = get_chat(&sim).await;

    let times: Vec<&str> = batch.values().map(|entry| entry["Time"].as_str()).collect();
    let expected: Vec<&str> = cases.iter().map(|(_, time)| *time).collect();
    assert_eq!(times, expected);
    let keys: Vec<&str> = batch.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "20260115120507123",
            "20260115010507123",
            "202601151205071231",
            "202601150105071231"
        ],
        "AM and PM collide in one response"
    );
}

#[tokio::test]
async fn non_ascii_is_escaped_as_uppercase_u_escapes_with_surrogate_pairs() {
    let sim = lookingglass().await;
    sim.handle().push(SimChatLine::avatar(
        "Jürgen Müller",
        "café 日本 😀 \"quoted\" back\\slash tab\there\nnewline\u{1} </script> & <b>",
    ));

    let (response, batch) = get_chat(&sim).await;

    let body = response.text();
    assert!(body.is_ascii());
    assert!(
        body.contains(r#""From":"J\u00FCrgen M\u00FCller""#),
        "{body}"
    );
    assert!(
        body.contains(
            r#""Message":"caf\u00E9 \u65E5\u672C \uD83D\uDE00 \"quoted\" back\\slash tab\there\nnewline\u0001 </script> & <b>""#
        ),
        "{body}"
    );
    assert_eq!(
        batch[0]["Message"],
        "café 日本 😀 \"quoted\" back\\slash tab\there\nnewline\u{1} </script> & <b>"
    );
}

#[tokio::test]
async fn from_is_omitted_when_empty_and_every_kind_of_line_has_its_types() {
    let sim = lookingglass().await;
    let handle = sim.handle();
    let mut nameless = SimChatLine::object("", "no name");
    nameless.from = None;
    handle.push(nameless);
    handle.push(SimChatLine::system("sys notice"));
    handle.push(SimChatLine::avatar("Governor Linden", "welcome"));
    handle.push(SimChatLine::object("Box", "I am a box"));
    handle.push(SimChatLine::owner_say("My HUD", "only you"));
    handle.push(SimChatLine::debug("Broken thing", "script error"));
    handle.push(SimChatLine::shout("Alice Resident", "HEY"));

    let (_, batch) = get_chat(&sim).await;

    let entries: Vec<&IndexMap<String, String>> = batch.values().collect();
    assert!(!entries[0].contains_key("From"));
    assert_eq!(
        entries[0].keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "Time",
            "Message",
            "Type",
            "EntryType",
            "Position",
            "OwnerID"
        ]
    );
    assert_eq!(entries[1]["From"], "Second Life");
    assert_eq!(
        entries[1]["OwnerID"],
        "00000000-0000-0000-0000-000000000000"
    );
    assert_eq!(entries[1]["EntryType"], "ChatTypeNormal");
    assert_eq!(entries[2]["EntryType"], "ChatTypeLindenChat");
    assert_eq!(entries[3]["EntryType"], "ChatTypeObjectChat");
    assert_ne!(entries[3]["OwnerID"], handle.avatar_uuid("Box"));
    assert_eq!(
        (
            entries[4]["Type"].as_str(),
            entries[4]["EntryType"].as_str()
        ),
        ("OwnerSay", "ChatTypeOwnerSay")
    );
    assert_eq!(
        (
            entries[5]["Type"].as_str(),
            entries[5]["EntryType"].as_str()
        ),
        ("Debug", "ChatTypeObjectChat")
    );
    assert_eq!(entries[6]["Type"], "Shout");
    assert!(
        entries
            .iter()
            .all(|entry| entry["Position"].starts_with('<'))
    );
}

#[tokio::test]
async fn routing_is_a_case_insensitive_prefix_match_that_ignores_the_query() {
    let sim = lookingglass().await;
    let handle = sim.handle();

    for path in ["/API/Chat", "/api/chat/anything?xx=0.5", "/api/chatter"] {
        handle.say("Alice Resident", path);
        let response = exchange(sim.addr(), &get_request(&sim, path)).await;
        assert_eq!(response.status, 200, "{path}");
        assert!(response.text().contains(path), "{path}");
    }
}

#[tokio::test]
async fn unknown_paths_and_methods_other_than_get_and_post_are_never_answered() {
    let sim = lookingglass().await;
    let port = sim.addr().port();
    sim.handle().say("Alice Resident", "kept");

    for request in [
        get_request(&sim, "/api/nothing"),
        get_request(&sim, "/static/ViewChat.html"),
        format!("HEAD /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"),
        format!("OPTIONS /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"),
    ] {
        let mut client = RawClient::connect(sim.addr()).await;
        client.send(request.as_bytes()).await;
        assert!(client.stays_silent().await, "{request}");
    }
    let lowercase_get = exchange(
        sim.addr(),
        &format!("get /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"),
    )
    .await;

    assert_eq!(lowercase_get.status, 200);
    assert!(
        lowercase_get.text().contains("kept"),
        "the queue was not drained before"
    );
}

#[tokio::test]
async fn a_json_post_decodes_plus_and_percent_in_message_even_inside_json() {
    let sim = lookingglass().await;

    let response = post_chat(
        &sim,
        r#"{"Message":"Caf%C3%A9%20%2B%201%20%3D%20100%25%20%F0%9F%98%80 a+b 100% %zz %E9","Channel":"0","Type":"Normal"}"#,
    )
    .await;
    post_chat(&sim, r#"{"Message":"x","Channel":1.0,"Type":"whisper"}"#).await;
    post_chat(
        &sim,
        r#"{"Message":"y","Channel":" 7 ","Type":"Whisper","Type":"Shout"}"#,
    )
    .await;
    post_chat(
        &sim,
        "{'Message':'z', /* comment */ 'Channel':-3,'Type':'Whisper'}",
    )
    .await;

    assert_eq!(response.status, 200);
    assert_eq!(response.header("Content-Type"), Some("text/json"));
    assert_eq!(response.text(), "{}");
    assert_eq!(
        sim.handle().said(),
        [
            said("Café + 1 = 100% 😀 a b 100% %zz %E9", 0, "Normal"),
            said("x", 1, "Normal"),
            said("y", 7, "Shout"),
            said("z", -3, "Whisper"),
        ]
    );
}

#[tokio::test]
async fn a_post_without_channel_or_type_or_with_bad_json_says_nothing_but_answers_200() {
    let sim = lookingglass().await;

    let bodies = [
        r#"{"Message":"x","Type":"Normal"}"#,
        r#"{"Message":"x","Channel":"0"}"#,
        r#"{"Message":"x","Channel":"0","Type":"Normal",}"#,
        r#" {"Message":"x","Channel":"0","Type":"Normal"}"#,
        r#"{"Message":"x","Channel":"abc","Type":"Normal"}"#,
        r#"{"Message":"x","Channel":"99999999999","Type":"Normal"}"#,
        r#"{"Message":"x","Channel":1.5,"Type":"Normal"}"#,
        "",
    ];
    for body in bodies {
        let response = post_chat(&sim, body).await;
        assert_eq!(
            (response.status, response.text()),
            (200, "{}".to_owned()),
            "{body}"
        );
    }

    assert!(sim.handle().said().is_empty());
    assert_eq!(sim.handle().queue_len(), 0);
}

#[tokio::test]
async fn a_chat_post_made_to_fail_answers_500_and_says_nothing_and_the_next_one_works() {
    let sim = lookingglass().await;
    sim.handle().fail_chat_post(1);
    let body = r#"{"Message":"hello","Channel":"0","Type":"Normal"}"#;

    let failed = post_chat(&sim, body).await;
    let next = post_chat(&sim, body).await;

    assert_eq!(failed.status, 500);
    assert!(
        failed.text().contains("FAILED GETTING"),
        "{}",
        failed.text()
    );
    assert_eq!((next.status, next.text()), (200, "{}".to_owned()));
    assert_eq!(sim.handle().said(), [said("hello", 0, "Normal")]);
}

#[tokio::test]
async fn requests_are_recorded_and_those_in_flight_at_once_are_counted() {
    // Arrange: a chat GET that takes a while; a status GET sent meanwhile waits for the REST thread.
    let sim = lookingglass().await;
    sim.handle().set_response_delay(Duration::from_millis(300));
    let (addr, request) = (sim.addr(), get_request(&sim, "/api/chat"));
    let slow = tokio::spawn(async move { exchange(addr, &request).await });
    eventually("the chat GET arrived", || {
        sim.handle().requests().len() == 1
    })
    .await;

    // Act
    let status = exchange(sim.addr(), &get_request(&sim, "/api/LLLP/status")).await;
    let chat = slow.await.expect("join");
    let after = exchange(sim.addr(), &get_request(&sim, "/api/avatars")).await;

    // Assert
    assert_eq!((chat.status, status.status, after.status), (200, 200, 200));
    assert_eq!(sim.handle().max_concurrent_requests(), 2);
    let paths: Vec<String> = sim
        .handle()
        .requests()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(paths, ["/api/chat", "/api/LLLP/status", "/api/avatars"]);
}

#[tokio::test]
async fn a_form_post_is_split_trimmed_and_only_message_is_decoded() {
    let sim = lookingglass().await;

    post_chat(
        &sim,
        "Message=hello+form+%26+friends%3D%2B&Type=Shout&Channel=0",
    )
    .await;
    post_chat(&sim, "\u{feff}Message = spaced &Type= Say &Channel= 3 ").await;
    post_chat(&sim, "Message=a=b&Type=Normal&Channel=0").await;
    post_chat(&sim, "Message=x&Type=Normal&Channel=%30").await;

    assert_eq!(
        sim.handle().said(),
        [
            said("hello form & friends=+", 0, "Shout"),
            said("spaced", 3, "Normal"),
            said("", 0, "Normal"),
        ]
    );
}

#[tokio::test]
async fn what_is_said_on_channel_0_comes_back_through_get_as_the_own_avatar() {
    let sim = lookingglass().await;

    post_chat(
        &sim,
        r#"{"Message":"Hello%20from%20the%20CMS%21","Channel":"0","Type":"Whisper"}"#,
    )
    .await;
    post_chat(
        &sim,
        r#"{"Message":"to%20scripts","Channel":"5","Type":"Normal"}"#,
    )
    .await;
    post_chat(&sim, r#"{"Channel":"0","Type":"Normal"}"#).await;
    let long = "é".repeat(1200);
    post_chat(
        &sim,
        &format!(r#"{{"Message":"{long}","Channel":"0","Type":"Normal"}}"#),
    )
    .await;
    let (_, batch) = get_chat(&sim).await;

    let entries: Vec<&IndexMap<String, String>> = batch.values().collect();
    assert_eq!(
        entries.len(),
        2,
        "channel 5 and the empty message are not echoed"
    );
    assert_eq!(entries[0]["From"], "Relay Bot");
    assert_eq!(entries[0]["Message"], "Hello from the CMS!");
    assert_eq!(entries[0]["Type"], "Whisper");
    assert_eq!(entries[0]["EntryType"], "ChatTypeNormal");
    assert_eq!(
        entries[1]["Message"].chars().count(),
        1000,
        "the sim truncates"
    );
    assert_eq!(sim.handle().said().len(), 4);
    assert_eq!(sim.handle().said()[3].message.chars().count(), 1200);
}

#[tokio::test]
async fn a_client_leaving_mid_write_is_counted_and_its_lines_are_lost() {
    let sim = lookingglass().await;
    let handle = sim.handle();
    for index in 0..300 {
        handle.say("Alice Resident", &format!("line {index} of a long backlog"));
    }
    handle.set_trickle(Some((256, Duration::from_millis(5))));

    let mut client = RawClient::connect(sim.addr()).await;
    client.send(get_request(&sim, "/api/chat").as_bytes()).await;
    assert!(client.fill().await, "the response starts");
    drop(client);

    eventually("the abort to be counted", || handle.n_aborted() == 1).await;
    assert!(handle.handed_out().is_empty());
    assert_eq!(handle.queue_len(), 0, "drained before writing, so lost");
    handle.set_trickle(None);
    let (_, batch) = get_chat(&sim).await;
    assert!(
        batch.is_empty(),
        "without --crash-on-abort the viewer keeps serving"
    );
}

#[tokio::test]
async fn a_client_giving_up_during_a_slow_response_counts_as_an_abort() {
    let sim = lookingglass().await;
    let handle = sim.handle();
    handle.say("Alice Resident", "slow");
    // Long enough that even a loaded machine drops the client before the answer is due.
    handle.set_response_delay(Duration::from_secs(1));

    let mut client = RawClient::connect(sim.addr()).await;
    client.send(get_request(&sim, "/api/chat").as_bytes()).await;
    eventually("the GET to drain the queue", || handle.n_gets() == 1).await;
    drop(client);

    eventually("the abort to be counted", || handle.n_aborted() == 1).await;
    assert!(handle.handed_out().is_empty());
}

#[tokio::test]
async fn with_crash_on_abort_the_viewer_stops_answering_after_an_abort() {
    let sim = start_viewer(Dialect::Lookingglass, chrono_tz::UTC, true).await;
    let handle = sim.handle();
    for index in 0..300 {
        handle.say("Alice Resident", &format!("line {index} of a long backlog"));
    }
    handle.set_trickle(Some((256, Duration::from_millis(5))));

    let mut client = RawClient::connect(sim.addr()).await;
    client.send(get_request(&sim, "/api/chat").as_bytes()).await;
    assert!(client.fill().await);
    drop(client);
    tokio::time::timeout(DEADLINE, sim.crashed())
        .await
        .expect("the viewer crashes");

    let refused = match TcpStream::connect(sim.addr()).await {
        Err(_) => true,
        Ok(stream) => {
            let mut client = RawClient {
                stream,
                buffer: Vec::new(),
            };
            let _ = client
                .stream
                .write_all(get_request(&sim, "/api/chat").as_bytes())
                .await;
            client.closed_without_answer().await
        }
    };
    assert!(refused);
    assert_eq!(handle.n_aborted(), 1);
}

#[tokio::test]
async fn avatars_lists_known_avatars_by_grid_and_uuid() {
    let sim = lookingglass().await;
    let handle = sim.handle();
    handle.say("Alice Resident", "hi");
    handle.add_avatar("Carol Visitor");

    let response = exchange(sim.addr(), &get_request(&sim, "/api/avatars")).await;

    let avatars: IndexMap<String, serde_json::Value> =
        serde_json::from_slice(&response.body).expect("a map");
    let alice_uuid = handle.avatar_uuid("Alice Resident");
    let alice = &avatars[&format!("OSGrid-Avatar-{alice_uuid}")];
    assert_eq!(alice["Name"], "Alice Resident");
    assert_eq!(alice["Distance"], "0");
    assert_eq!(alice["X"], "128");
    assert!(alice["LLtextures"].is_object());
    assert!(avatars.contains_key(&format!(
        "OSGrid-Avatar-{}",
        handle.avatar_uuid("Carol Visitor")
    )));
    assert_eq!(alice_uuid, handle.avatar_uuid("Alice Resident"), "stable");
    assert_eq!(alice_uuid.len(), 36);
    assert_eq!(&alice_uuid[14..15], "4", "version 4");
    assert_eq!(alice_uuid, alice_uuid.to_lowercase());
}

#[tokio::test]
async fn status_reports_the_own_name_and_the_login_state() {
    let sim = lookingglass().await;

    let logged_in = exchange(sim.addr(), &get_request(&sim, "/api/LLLP/status")).await;
    sim.handle().set_logged_in(false);
    let logged_out = exchange(sim.addr(), &get_request(&sim, "/api/LLLP/status")).await;
    let suffixed = exchange(sim.addr(), &get_request(&sim, "/api/LLLP/status/first")).await;

    let status: serde_json::Value = serde_json::from_slice(&logged_in.body).expect("json");
    assert_eq!(status["first"]["value"], "Relay");
    assert_eq!(status["last"]["value"], "Bot");
    assert_eq!(status["loginstate"]["value"], "login");
    assert_eq!(status["grid"]["value"], "OSGrid");
    assert_eq!(status["password"], serde_json::json!({}));
    let status: serde_json::Value = serde_json::from_slice(&logged_out.body).expect("json");
    assert_eq!(status["loginstate"]["value"], "logout");
    assert_eq!(suffixed.text(), "{}");
}

#[tokio::test]
async fn the_keekee_dialect_has_its_own_path_host_content_type_and_post_answers() {
    let sim = start_viewer(Dialect::Keekee, chrono_tz::UTC, false).await;
    let handle = sim.handle();
    let port = sim.addr().port();
    let keekee_host = format!("localhost:{port}");
    handle.push(SimChatLine::system("zero owner"));
    handle.say("Alice Resident", "hi");

    let wrong_host = exchange(
        sim.addr(),
        &format!("GET /api/LLLP/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"),
    )
    .await;
    let mut old_path = RawClient::connect(sim.addr()).await;
    old_path
        .send(format!("GET /api/chat HTTP/1.1\r\nHost: {keekee_host}\r\n\r\n").as_bytes())
        .await;
    let old_path_silent = old_path.stays_silent().await;
    let response = exchange(
        sim.addr(),
        &format!("GET /api/LLLP/chat HTTP/1.1\r\nHost: {keekee_host}\r\n\r\n"),
    )
    .await;
    let posted = exchange(
        sim.addr(),
        &post_request(
            &keekee_host,
            "/api/LLLP/chat",
            r#"{"Message":"m","Channel":"0","Type":"Normal"}"#,
        ),
    )
    .await;
    let mut failed_post = RawClient::connect(sim.addr()).await;
    failed_post
        .send(post_request(&keekee_host, "/api/LLLP/chat", r#"{"Message":"m"}"#).as_bytes())
        .await;

    assert_eq!(
        sim.chat_url(),
        format!("http://localhost:{port}/api/LLLP/chat")
    );
    assert_eq!(wrong_host.status, 400);
    assert!(old_path_silent);
    assert_eq!(response.header("Content-Type"), Some("application/json"));
    let batch: Batch = serde_json::from_slice(&response.body).expect("json");
    let entries: Vec<&IndexMap<String, String>> = batch.values().collect();
    assert!(!entries[0].contains_key("OwnerID"), "zero OwnerID omitted");
    assert_eq!(entries[1]["OwnerID"], handle.avatar_uuid("Alice Resident"));
    assert_eq!((posted.status, posted.body.len()), (200, 0));
    assert!(
        failed_post.stays_silent().await,
        "a failed POST is never answered"
    );
    assert_eq!(handle.said(), [said("m", 0, "Normal")]);
}

#[tokio::test]
async fn chatter_makes_three_avatars_talk() {
    let sim = lookingglass().await;
    let handle = sim.handle();
    let shutdown = tokio_util::sync::CancellationToken::new();

    let chatter = spawn_chatter(handle.clone(), 500.0, shutdown.clone());
    eventually("six chatter lines", || handle.queue_len() >= 6).await;
    shutdown.cancel();
    chatter.await.expect("chatter task");
    let (_, batch) = get_chat(&sim).await;

    let speakers: std::collections::HashSet<&str> =
        batch.values().map(|entry| entry["From"].as_str()).collect();
    assert_eq!(
        speakers,
        ["Alice Resident", "Bob Builder", "Carol Visitor"].into()
    );
    assert!(batch[0]["Message"].starts_with("hello #1 from "));
}

#[test]
fn the_cli_arguments_have_the_documented_defaults() {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        viewer: ViewerArgs,
    }

    let defaults = <Cli as clap::Parser>::try_parse_from(["sim-viewer"]).expect("defaults parse");
    let custom = <Cli as clap::Parser>::try_parse_from([
        "sim-viewer",
        "--listen",
        "0.0.0.0:9200",
        "--dialect",
        "keekee",
        "--timezone",
        "America/Los_Angeles",
        "--own-name",
        "Some One",
        "--crash-on-abort",
        "--chatter",
        "2",
    ])
    .expect("custom parse");
    let bad_zone = <Cli as clap::Parser>::try_parse_from(["sim-viewer", "--timezone", "Mars/Base"]);

    let viewer = defaults.viewer;
    assert_eq!(viewer.listen, "127.0.0.1:9144".parse().expect("address"));
    assert_eq!(viewer.dialect, Dialect::Lookingglass);
    assert_eq!(viewer.timezone, chrono_tz::UTC);
    assert_eq!(viewer.own_name, "Relay Bot");
    assert!(!viewer.crash_on_abort);
    assert_eq!(viewer.chatter, 0.0);
    let viewer = custom.viewer;
    assert_eq!(viewer.dialect, Dialect::Keekee);
    assert_eq!(viewer.timezone, chrono_tz::America::Los_Angeles);
    assert!(viewer.crash_on_abort);
    assert_eq!(viewer.chatter, 2.0);
    assert!(bad_zone.is_err());
}

#[tokio::test]
async fn run_cli_serves_until_shutdown_and_rejects_a_negative_chatter() {
    let args = ViewerArgs {
        listen: "127.0.0.1:0".parse().expect("address"),
        dialect: Dialect::Lookingglass,
        timezone: chrono_tz::UTC,
        own_name: "Relay Bot".to_owned(),
        region: "Sim".to_owned(),
        crash_on_abort: false,
        chatter: 50.0,
        chatter_stamp: false,
        chatter_bytes: 0,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();

    let running = tokio::spawn(run_cli(args.clone(), shutdown.clone()));
    shutdown.cancel();
    let outcome = tokio::time::timeout(DEADLINE, running)
        .await
        .expect("run_cli returns after shutdown")
        .expect("run_cli task");
    let negative = run_cli(
        ViewerArgs {
            chatter: -1.0,
            ..args
        },
        tokio_util::sync::CancellationToken::new(),
    )
    .await;

    assert!(outcome.is_ok());
    assert!(negative.is_err());
}
