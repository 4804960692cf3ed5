//! Bad input from either peer: no panic, and nothing already persisted is lost.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::Utc;
use opensim_chat_relay::cms::wire as cms_wire;
use opensim_chat_relay::lookingglass::wire as viewer_wire;
use opensim_chat_relay::sim::http::{self, Reply, Response};
use opensim_chat_relay::zone::Zone;
use proptest::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::helpers::{PATIENCE, TestEnv, eventually};

const VALID_CHAT: &str = r#"{"20261122014005043":{"Time":"20261122014005043","From":"Alice Resident","Message":"caf\u00E9 \uD83D\uDE00","Type":"Normal","EntryType":"ChatTypeNormal","Position":"<1, 2, 3>","OwnerID":"11111111-2222-3333-4444-555555555555"}}"#;
const VALID_POST_REPLY: &str = r#"{"success":true,"id":17}"#;

fn all_cms_parsers(body: &[u8]) {
    let _ = cms_wire::parse_post_reply(body);
    if let Some(value) = cms_wire::parse_lenient(body) {
        let _ = cms_wire::parse_chats(&value);
        let _ = cms_wire::confirmed_user(&value, 1);
        let _ = cms_wire::token_of(&value);
        let _ = cms_wire::error_of(&value);
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_parsers(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = viewer_wire::parse_chat(&body, Utc::now(), Zone::Local);
        all_cms_parsers(&body);
    }

    #[test]
    fn truncated_and_corrupted_json_never_panics(cut in 0usize..VALID_CHAT.len(), flip in 0usize..VALID_CHAT.len(), byte in any::<u8>()) {
        let mut body = VALID_CHAT.as_bytes()[..cut].to_vec();
        viewer_wire::parse_chat(&body, Utc::now(), Zone::Local).ok();
        let mut corrupted = VALID_CHAT.as_bytes().to_vec();
        corrupted[flip] = byte;
        viewer_wire::parse_chat(&corrupted, Utc::now(), Zone::Local).ok();
        body.extend_from_slice(&corrupted);
        all_cms_parsers(&body);
        let reply = &VALID_POST_REPLY.as_bytes()[..cut.min(VALID_POST_REPLY.len())];
        all_cms_parsers(reply);
    }

    #[test]
    fn entries_with_odd_values_are_skipped_not_fatal(key in ".{0,300}", time in any::<String>(), message in any::<String>(), number in any::<i64>()) {
        let body = serde_json::json!({
            key.clone(): {"Time": time, "From": "A B", "Message": message, "Type": number, "EntryType": null},
            "x": {"Message": number},
            "y": [1, 2, 3],
        });
        let parsed = viewer_wire::parse_chat(body.to_string().as_bytes(), Utc::now(), Zone::Local).expect("an object parses");
        prop_assert_eq!(parsed.lines.len() + parsed.skipped.len(), 3);
    }
}

#[test]
fn html_error_pages_and_php_noise_are_not_json() {
    for body in [
        "<html><body><h1>500 Internal Server Error</h1></body></html>",
        "<br />\n<b>Fatal error</b>:  Unknown column 'name' in <b>/var/www/api/includes/class.Db.php</b>",
        "",
        "\u{FEFF}",
    ] {
        assert!(viewer_wire::parse_chat(body.as_bytes(), Utc::now(), Zone::Local).is_err());
        assert_eq!(cms_wire::parse_post_reply(body.as_bytes()), None);
    }
}

#[test]
fn a_ten_megabyte_viewer_response_parses_in_order() {
    let mut body = String::from("{");
    for i in 0..40_000 {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!(
            r#""k{i}":{{"Time":"x","From":"Alice Resident","Message":"line {i} {}","Type":"Normal","EntryType":"ChatTypeNormal","OwnerID":"11111111-2222-3333-4444-555555555555"}}"#,
            "y".repeat(120)
        ));
    }
    body.push('}');
    assert!(body.len() > 7_000_000);
    let parsed = viewer_wire::parse_chat(body.as_bytes(), Utc::now(), Zone::Local).expect("parses");
    assert_eq!(parsed.lines.len(), 40_000);
    assert!(parsed.lines[39_999].message.starts_with("line 39999 "));
    // Invalid UTF-8 in the middle of such a body is an error, not a panic.
    let mut broken = body.into_bytes();
    broken[5_000_000] = 0xFF;
    assert!(viewer_wire::parse_chat(&broken, Utc::now(), Zone::Local).is_err());
}

#[tokio::test]
async fn a_viewer_answering_garbage_loses_nothing_already_stored_and_keeps_the_bodies() {
    // A "viewer" that answers, in turn: a good line, HTML, invalid UTF-8, truncated JSON, a good line.
    let env = TestEnv::start().await;
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(vec![
        VALID_CHAT
            .replace("caf\\u00E9 \\uD83D\\uDE00", "first")
            .into_bytes(),
        b"<html><body>Bad Gateway</body></html>".to_vec(),
        vec![b'{', 0xFF, 0xFE, b'}'],
        VALID_CHAT.as_bytes()[..40].to_vec(),
        VALID_CHAT
            .replace("caf\\u00E9 \\uD83D\\uDE00", "second")
            .into_bytes(),
    ]);
    let n_served = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let handler = {
        let (bodies, n_served) = (bodies.clone(), n_served.clone());
        move |_request: http::Request| {
            let (bodies, n_served) = (bodies.clone(), n_served.clone());
            async move {
                let idx = n_served.fetch_add(1, Ordering::SeqCst);
                let body = bodies.get(idx).cloned().unwrap_or_else(|| b"{}".to_vec());
                Reply::Respond(Response::new(200, "text/json", body))
            }
        }
    };
    tokio::spawn(http::serve(listener, handler, stop.clone()));

    let chat_url = format!("http://{addr}/api/chat");
    let relay = env
        .start_relay(
            "",
            &[
                ("viewer.chat_url", &chat_url),
                ("viewer.status_url", ""),
                ("viewer.avatars_url", ""),
            ],
        )
        .await;
    eventually(PATIENCE, "both good lines delivered", || async {
        env.stored().len() == 2
    })
    .await;
    let n_quarantined = relay.outbox.quarantine_len();
    relay.stop().await;
    stop.cancel();

    assert_eq!(
        env.stored_messages(),
        ["[Alice Resident] first", "[Alice Resident] second"]
    );
    assert_eq!(
        n_quarantined, 3,
        "each unreadable body is kept for an operator"
    );
}
