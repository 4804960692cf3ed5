//! The operator's endpoint: `/healthz`, `/readyz` (each failing condition), `/metrics` after a known
//! run, `/status`, and that neither it nor the JSON logs ever show the password or the token.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opensim_chat_relay::app::Relay;
use opensim_chat_relay::metrics::Stats;
use opensim_chat_relay::outbox::Outbox;
use opensim_chat_relay::sim::cms::Fault;
use opensim_chat_relay::sim::lookingglass::SimChatLine;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::helpers::{PATIENCE, RELAY_PASSWORD, RELAY_USER, TestEnv, eventually, send_sigterm};

/// A relay with its health endpoint, started in this process.
pub struct Observed {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    pub outbox: Arc<Outbox>,
    pub token: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl Observed {
    pub async fn start(env: &TestEnv, toml: &str, overrides: &[(&str, &str)]) -> Observed {
        let relay = Relay::build(&env.settings(toml, overrides)).expect("relay builds");
        let addr = relay.health_addr().expect("the endpoint is on");
        let (stats, outbox) = (relay.stats(), relay.outbox());
        let token = CancellationToken::new();
        let task = tokio::spawn(relay.run_until_stopped(token.clone()));
        Observed {
            addr,
            stats,
            outbox,
            token,
            task,
        }
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
            .get(format!("http://{}{path}", self.addr))
            .send()
            .await
            .expect("the endpoint answers");
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let (status, body) = self.get(path).await;
        (status, serde_json::from_str(&body).expect("a JSON body"))
    }

    pub async fn stop(self) {
        self.token.cancel();
        self.task
            .await
            .expect("relay task joins")
            .expect("relay stops cleanly");
    }
}

/// A URL on which nothing listens.
fn closed_url(path: &str) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}{path}")
}

/// The value of one sample line of the exposition (`name` includes any labels).
pub fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name} in:\n{metrics}"))
        .parse()
        .expect("a number")
}

#[tokio::test]
async fn healthz_answers_at_once_and_readyz_turns_ready_once_both_peers_answer() {
    let env = TestEnv::start().await;
    let relay = Observed::start(&env, "", &[]).await;

    let (status, body) = relay.get("/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    eventually(PATIENCE, "/readyz 200", || async {
        relay.get("/readyz").await.0 == 200
    })
    .await;
    let (_, ready) = relay.get_json("/readyz").await;
    assert_eq!(ready["ready"], true);
    for check in ["outbox", "viewer", "cms"] {
        assert_eq!(ready["checks"][check]["ok"], true, "{ready}");
        assert_eq!(ready["checks"][check]["reason"], Value::Null, "{ready}");
    }
    assert_eq!(relay.get("/nothing-here").await.0, 404);
    relay.stop().await;
}

#[tokio::test]
async fn readyz_is_503_and_names_the_viewer_when_the_viewer_does_not_answer() {
    let env = TestEnv::start().await;
    let chat_url = closed_url("/api/chat");
    let relay = Observed::start(
        &env,
        "",
        &[
            ("viewer.chat_url", &chat_url),
            ("viewer.status_url", ""),
            ("viewer.avatars_url", ""),
        ],
    )
    .await;

    eventually(PATIENCE, "a failed poll and a cms login", || async {
        Stats::get(&relay.stats.poll_errors) > 0
            && relay.get_json("/readyz").await.1["checks"]["cms"]["ok"] == true
    })
    .await;
    let (status, body) = relay.get_json("/readyz").await;

    assert_eq!(status, 503);
    assert_eq!(body["ready"], false);
    assert_eq!(body["checks"]["viewer"]["ok"], false);
    let reason = body["checks"]["viewer"]["reason"].as_str().expect("reason");
    assert!(reason.contains("no chat poll answered yet"), "{reason}");
    assert!(reason.contains("viewer unreachable"), "{reason}");
    assert_eq!(body["checks"]["outbox"]["ok"], true);
    relay.stop().await;
}

#[tokio::test]
async fn readyz_is_503_and_names_the_cms_when_the_login_fails() {
    let env = TestEnv::start().await;
    let relay = Observed::start(&env, "", &[("cms.password", "not-the-password")]).await;

    eventually(
        PATIENCE,
        "the viewer answered and the login failed",
        || async {
            let (_, body) = relay.get_json("/readyz").await;
            body["checks"]["viewer"]["ok"] == true && body["checks"]["cms"]["ok"] == false
        },
    )
    .await;
    let (status, body) = relay.get_json("/readyz").await;

    assert_eq!(status, 503);
    let reason = body["checks"]["cms"]["reason"].as_str().expect("reason");
    assert!(
        reason.contains("Invalid username/password combination used"),
        "{reason}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn readyz_is_503_while_outbox_writes_fail_and_ready_again_after_a_good_write() {
    // A sled write failure (disk full) cannot be provoked portably without root, so the test raises
    // the signal the poller and delivery raise on a failed write, and checks that the next good
    // poll clears it.
    let env = TestEnv::start().await;
    let relay = Observed::start(&env, "", &[]).await;
    eventually(PATIENCE, "ready", || async {
        relay.get("/readyz").await.0 == 200
    })
    .await;

    relay
        .stats
        .readiness
        .outbox_failed(&"outbox storage error: No space left on device");
    let (status, body) = relay.get_json("/readyz").await;

    assert_eq!(status, 503);
    let reason = body["checks"]["outbox"]["reason"].as_str().expect("reason");
    assert!(reason.contains("No space left on device"), "{reason}");
    eventually(PATIENCE, "ready after the next stored poll", || async {
        relay.get("/readyz").await.0 == 200
    })
    .await;
    relay.stop().await;
}

#[tokio::test]
async fn metrics_count_a_known_run() {
    // Arrange: three avatar lines, one object line, one system line; the first POST fails.
    let env = TestEnv::start().await;
    env.db.fault_next(1, Fault::Status(500));
    env.alice_says_numbered_lines(3);
    env.lg.push(SimChatLine::object("Door", "creak"));
    env.lg.push(SimChatLine::system("Region restarting"));

    // Act
    let relay = Observed::start(&env, "", &[]).await;
    eventually(PATIENCE, "three lines delivered", || async {
        let (_, text) = relay.get("/metrics").await;
        sample(&text, "opensim_chat_relay_lines_delivered_total") == 3.0
    })
    .await;
    let (status, text) = relay.get("/metrics").await;
    relay.stop().await;

    // Assert
    assert_eq!(status, 200);
    assert_eq!(sample(&text, "opensim_chat_relay_lines_polled_total"), 5.0);
    assert_eq!(sample(&text, "opensim_chat_relay_lines_relayed_total"), 3.0);
    let filtered = "opensim_chat_relay_lines_filtered_total";
    assert_eq!(
        sample(&text, &format!("{filtered}{{reason=\"object\"}}")),
        1.0
    );
    assert_eq!(
        sample(&text, &format!("{filtered}{{reason=\"system\"}}")),
        1.0
    );
    assert_eq!(
        sample(&text, &format!("{filtered}{{reason=\"type\"}}")),
        0.0
    );
    assert!(sample(&text, "opensim_chat_relay_delivery_retries_total") >= 1.0);
    assert_eq!(
        sample(&text, "opensim_chat_relay_lines_dead_lettered_total"),
        0.0
    );
    let dropped = "opensim_chat_relay_lines_dropped_total";
    assert_eq!(
        sample(&text, &format!("{dropped}{{reason=\"unreadable\"}}")),
        0.0
    );
    assert_eq!(sample(&text, "opensim_chat_relay_outbox_lines"), 0.0);
    assert_eq!(sample(&text, "opensim_chat_relay_outbox_bytes"), 0.0);
    assert_eq!(
        sample(&text, "opensim_chat_relay_outbox_oldest_age_seconds"),
        0.0
    );
    assert!(sample(&text, "opensim_chat_relay_cms_logins_total") >= 1.0);
    // The failed POST and the good one both carried the three lines.
    assert!(sample(&text, "opensim_chat_relay_batch_size_count") >= 2.0);
    assert_eq!(
        sample(&text, "opensim_chat_relay_batch_size_bucket{le=\"5\"}"),
        sample(&text, "opensim_chat_relay_batch_size_count")
    );
    assert!(sample(&text, "opensim_chat_relay_post_seconds_count") >= 2.0);
    assert_eq!(
        sample(&text, "opensim_chat_relay_capture_to_cms_seconds_count"),
        3.0
    );
    assert_eq!(
        sample(
            &text,
            "opensim_chat_relay_capture_to_cms_seconds_bucket{le=\"+Inf\"}"
        ),
        3.0
    );
    assert_eq!(sample(&text, "opensim_chat_relay_inworld_said_total"), 0.0);
    assert_eq!(
        sample(&text, "opensim_chat_relay_inworld_skipped_total"),
        0.0
    );
    assert!(text.contains("# TYPE opensim_chat_relay_post_seconds histogram"));
}

#[tokio::test]
async fn a_backlog_shows_in_the_outbox_gauges_while_the_cms_is_down() {
    let env = TestEnv::start().await;
    env.db.set_offline(true);
    env.lg.say("Alice Resident", "waiting");
    let relay = Observed::start(&env, "", &[]).await;

    eventually(PATIENCE, "the line stored in the outbox", || async {
        let (_, text) = relay.get("/metrics").await;
        sample(&text, "opensim_chat_relay_outbox_lines") == 1.0
    })
    .await;
    let (_, text) = relay.get("/metrics").await;
    let (_, status) = relay.get_json("/status").await;
    env.db.set_offline(false);
    relay.stop().await;

    assert!(sample(&text, "opensim_chat_relay_outbox_bytes") > 20.0);
    assert!(sample(&text, "opensim_chat_relay_outbox_oldest_age_seconds") >= 0.0);
    assert_eq!(sample(&text, "opensim_chat_relay_ready"), 0.0);
    assert_eq!(status["outbox"]["lines"], 1);
    assert_eq!(status["ready"], false);
}

#[tokio::test]
async fn status_summarises_and_no_endpoint_shows_the_password_or_the_token() {
    let env = TestEnv::start().await;
    env.lg.say("Alice Resident", "hello");
    let relay = Observed::start(&env, "", &[]).await;
    // The relay's own view: the CMS stores the line a moment before the relay counts it delivered.
    eventually(PATIENCE, "delivered and ready", || async {
        let (_, status) = relay.get_json("/status").await;
        env.stored().len() == 1
            && status["ready"] == true
            && status["lines"]["delivered"] == 1
            && status["outbox"]["lines"] == 0
    })
    .await;

    let (status_code, status) = relay.get_json("/status").await;
    let bodies = [
        relay.get("/status").await.1,
        relay.get("/metrics").await.1,
        relay.get("/readyz").await.1,
        relay.get("/healthz").await.1,
    ];
    relay.stop().await;

    assert_eq!(status_code, 200);
    assert_eq!(status["ready"], true);
    assert_eq!(status["cms"]["username"], RELAY_USER);
    assert_eq!(status["cms"]["login"], "valid");
    assert_eq!(
        status["cms"]["pacing_gap_seconds"], 0.0,
        "alone, back to back"
    );
    assert_eq!(status["lines"]["delivered"], 1);
    assert_eq!(status["outbox"]["lines"], 0);
    assert_eq!(
        status["viewer"]["chat_url"].as_str(),
        Some(env.viewer.chat_url().as_str())
    );
    let tokens = issued_tokens(&env);
    assert!(!tokens.is_empty(), "the relay used a token");
    for body in &bodies {
        assert!(!body.contains(RELAY_PASSWORD), "{body}");
        for token in &tokens {
            assert!(!body.contains(token.as_str()), "{body}");
        }
    }
}

#[tokio::test]
async fn the_endpoint_is_off_when_http_listen_is_empty() {
    let env = TestEnv::start().await;
    let relay = Relay::build(&env.settings("", &[("http.listen", "")])).expect("builds");
    assert_eq!(relay.health_addr(), None);
}

#[tokio::test]
async fn json_logs_carry_batch_size_and_depth_on_every_delivery_line_and_never_a_secret() {
    // Arrange: the first POST fails, so there are failure lines as well as a success line.
    let env = TestEnv::start().await;
    env.db.fault_next(1, Fault::Status(500));
    env.lg.say("Alice Resident", "one");
    env.lg.say("Alice Resident", "two");
    let config = env.dir.path().join("logs.toml");
    std::fs::write(
        &config,
        format!(
            "[viewer]\nchat_url = \"{}\"\nstatus_url = \"{}\"\navatars_url = \"{}\"\npoll_interval = \"50ms\"\n\
             [cms]\nbase_url = \"{}\"\nusername = \"{RELAY_USER}\"\npassword = \"{RELAY_PASSWORD}\"\n\
             [retry]\ninitial = \"50ms\"\nmax = \"200ms\"\n\
             [outbox]\npath = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\nlevel = \"info\"\n",
            env.viewer.chat_url(),
            env.viewer.status_url(),
            env.viewer.avatars_url(),
            env.cms.base_url(),
            env.dir.path().join("logs-outbox").display(),
        ),
    )
    .expect("write config");

    // Act
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_opensim-chat-relay"))
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("relay starts");
    eventually(PATIENCE, "both lines delivered", || async {
        env.stored().len() == 2
    })
    .await;
    send_sigterm(child.id().expect("pid"));
    let started = Instant::now();
    let output = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("exits within the grace")
        .expect("output");
    assert!(started.elapsed() < Duration::from_secs(10));
    let logs = String::from_utf8(output.stderr).expect("utf-8 logs");

    // Assert
    assert_eq!(output.status.code(), Some(0), "{logs}");
    let lines: Vec<Value> = logs
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    let delivery_lines: Vec<&Value> = lines
        .iter()
        .filter(|line| {
            let message = line["message"].as_str().unwrap_or_default();
            message.contains("deliver") && !message.contains("stopped")
        })
        .collect();
    assert!(
        delivery_lines
            .iter()
            .any(|l| l["message"] == "delivery failed"),
        "{logs}"
    );
    assert!(
        delivery_lines
            .iter()
            .any(|l| l["message"] == "delivered batch"),
        "{logs}"
    );
    for line in &delivery_lines {
        assert!(line["n_messages"].is_u64(), "{line}");
        assert!(line["outbox_depth"].is_u64(), "{line}");
    }
    let failed = delivery_lines
        .iter()
        .find(|l| l["message"] == "delivery failed")
        .expect("a failure line");
    assert_eq!(failed["n_messages"], 2, "{failed}");
    assert!(!logs.contains(RELAY_PASSWORD), "{logs}");
    for token in issued_tokens(&env) {
        assert!(!logs.contains(&token), "{logs}");
    }
}

/// Every token the CMS saw in a query string.
fn issued_tokens(env: &TestEnv) -> Vec<String> {
    let mut tokens: Vec<String> = env
        .db
        .requests()
        .iter()
        .flat_map(|r| {
            r.query
                .split('&')
                .filter_map(|pair| pair.strip_prefix("token="))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|token| !token.is_empty())
        .collect();
    tokens.sort();
    tokens.dedup();
    tokens
}
