//! The simulated CMS's cost model (`sim cms --cost-model php`): PHP workers that requests queue
//! for, a cost that grows with the rows a request touches, and the busy time by kind of request.
//! Asserted through counts and the order of the busy spans, never through timing thresholds
//! beyond the lower bounds the model guarantees.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use clap::Parser;
use opensim_chat_relay::sim::cms::{
    BusySpan, CmsArgs, CmsDialect, CmsHandle, CmsSim, CmsSimSettings, CostMode, CostModel,
    Permissions, RequestKind,
};
use serde_json::{Value, json};

const PASSWORD: &str = "s3cret";

struct Cms {
    _sim: CmsSim,
    handle: CmsHandle,
    base: String,
    http: reqwest::Client,
    token: String,
    relay_id: i64,
}

async fn spawn_cms() -> Cms {
    let sim = CmsSim::start(CmsSimSettings {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        dialect: CmsDialect::Stock,
        timezone: chrono_tz::Europe::Amsterdam,
        debug_noise: false,
    })
    .await
    .expect("the simulated cms starts");
    let handle = sim.handle();
    let relay_id = handle.add_user("relay", PASSWORD, "Chat", "Relay", Permissions::relay());
    let base = sim.base_url();
    let http = reqwest::Client::builder()
        .http1_title_case_headers()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("a client builds");
    let login = json(
        http.post(format!("{base}/auth/username/"))
            .form(&[("username", "relay"), ("password", PASSWORD)]),
    )
    .await;
    let token = login["token"].as_str().expect("a token").to_owned();
    Cms {
        _sim: sim,
        handle,
        base,
        http,
        token,
        relay_id,
    }
}

impl Cms {
    async fn post(&self, lines: &[&str]) -> Value {
        let batch: Vec<Value> = lines
            .iter()
            .map(|message| {
                json!({"userId": self.relay_id, "message": message,
                       "timestamp": "2026-01-01 12:00:05", "fromCMS": 0})
            })
            .collect();
        json(
            self.http
                .post(format!("{}/grid/1/chats/?token={}", self.base, self.token))
                .header("Content-Type", "application/json")
                .body(Value::Array(batch).to_string()),
        )
        .await
    }

    /// Every row (the cursor 1 is 1970, before any row).
    async fn get_all(&self) -> Vec<Value> {
        let value = json(self.http.get(format!(
            "{}/grid/1/chats/1/?token={}",
            self.base, self.token
        )))
        .await;
        value.as_array().expect("a list of rows").clone()
    }

    fn spans(&self, kind: RequestKind) -> Vec<BusySpan> {
        let mut spans: Vec<BusySpan> = self
            .handle
            .busy_spans()
            .into_iter()
            .filter(|span| span.work.kind == kind)
            .collect();
        spans.sort_by_key(|span| span.started);
        spans
    }
}

/// Sends `request` and reads its JSON answer.
async fn json(request: reqwest::RequestBuilder) -> Value {
    let response = request.send().await.expect("answered");
    response.json().await.expect("a JSON answer")
}

fn model(per_request_ms: u64, workers: usize) -> CostModel {
    CostModel {
        per_request: Duration::from_millis(per_request_ms),
        ..CostModel::php().with_workers(workers)
    }
}

#[tokio::test]
async fn with_one_worker_requests_queue_behind_each_other() {
    let cms = spawn_cms().await;
    cms.handle.set_cost_model(Some(model(30, 1)));

    let (a, b, c, d) = tokio::join!(
        cms.post(&["line 0"]),
        cms.post(&["line 1"]),
        cms.post(&["line 2"]),
        cms.post(&["line 3"]),
    );
    let answers = [a, b, c, d];

    assert!(
        answers.iter().all(|answer| answer["success"] == true),
        "{answers:?}"
    );
    let spans = cms.spans(RequestKind::ChatPost);
    assert_eq!(spans.len(), 4);
    for pair in spans.windows(2) {
        assert!(pair[1].started >= pair[0].ended, "overlapping: {pair:?}");
    }
    // Each held the worker for at least its cost (2.1 ms is replaced by 30 ms, plus 0.3 ms a row).
    assert!(
        spans
            .iter()
            .all(|span| span.ended - span.started >= Duration::from_micros(30_300))
    );
}

#[tokio::test]
async fn with_two_workers_two_requests_are_worked_on_at_once() {
    let cms = spawn_cms().await;
    cms.handle.set_cost_model(Some(model(500, 2)));

    let (first, second) = tokio::join!(cms.get_all(), cms.get_all());

    assert_eq!((first.len(), second.len()), (0, 0));
    let spans = cms.spans(RequestKind::ChatGet);
    assert_eq!(spans.len(), 2);
    assert!(
        spans[1].started < spans[0].ended,
        "not overlapping: {spans:?}"
    );
}

#[tokio::test]
async fn a_gets_busy_time_grows_with_its_rows_and_joined_users() {
    let cms = spawn_cms().await;
    let lines: Vec<String> = (0..100).map(|n| format!("row {n}")).collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    cms.post(&lines[..10]).await;
    let php = CostModel::php();
    cms.handle.set_cost_model(Some(php));

    let small = cms.get_all().await;
    cms.post(&lines[10..]).await;
    let large = cms.get_all().await;

    assert_eq!((small.len(), large.len()), (10, 100));
    let gets = cms.spans(RequestKind::ChatGet);
    assert_eq!(
        gets.iter()
            .map(|span| (span.work.rows_read, span.work.users_joined))
            .collect::<Vec<_>>(),
        [(10, 10), (100, 100)]
    );
    let took = |span: &BusySpan| span.ended - span.started;
    assert!(took(&gets[1]) > took(&gets[0]), "{gets:?}");
    assert!(took(&gets[1]) >= php.per_request + 100 * (php.per_row_read + php.per_user_joined));
    let post = cms
        .spans(RequestKind::ChatPost)
        .pop()
        .expect("the 90-row post");
    assert_eq!(post.work.rows_stored, 90);
    assert!(took(&post) >= php.per_request + 90 * php.per_row_stored);
}

#[tokio::test]
async fn busy_time_is_accounted_by_kind_in_the_handle_and_at_sim_busy() {
    let cms = spawn_cms().await;
    cms.handle.link_avatar(
        1,
        "6c7d2c8f-b9b9-43e9-9ce3-8d56232b51c9",
        cms.relay_id,
        true,
    );
    cms.post(&["one", "two"]).await;
    cms.get_all().await;
    cms.get_all().await;
    let avatar = cms
        .http
        .get(format!(
            "{}/grid/1/avatar/6c7d2c8f-b9b9-43e9-9ce3-8d56232b51c9/?token={}",
            cms.base, cms.token
        ))
        .send()
        .await
        .expect("lookup answered");
    assert_eq!(avatar.status(), 200);

    let busy = cms.handle.busy();
    let root = cms.base.trim_end_matches("/OpenSim-CMS/api");
    let served = json(cms.http.get(format!("{root}/sim/busy"))).await;

    let counts = |kind: RequestKind| (busy.of(kind).n_requests, busy.of(kind).n_rows);
    assert_eq!(counts(RequestKind::Login), (1, 0));
    assert_eq!(counts(RequestKind::ChatPost), (1, 2));
    assert_eq!(counts(RequestKind::ChatGet), (2, 4));
    assert_eq!(counts(RequestKind::AvatarLookup), (1, 0));
    assert!(busy.total() >= busy.chat_get.busy + busy.chat_post.busy);
    assert_eq!(served["chat_get"]["requests"], 2);
    assert_eq!(served["chat_get"]["rows"], 4);
    assert_eq!(served["chat_post"]["rows"], 2);
    assert_eq!(served["login"]["requests"], 1);
    // The sim-only endpoint is not a request to the CMS: neither logged nor accounted.
    assert_eq!(cms.handle.busy().other.n_requests, 0);
    assert!(cms.handle.requests().iter().all(|r| r.path != "/sim/busy"));
}

#[derive(Parser)]
struct TestCli {
    #[command(flatten)]
    cms: CmsArgs,
}

#[test]
fn the_cost_model_is_fast_unless_asked_and_php_takes_a_worker_count() {
    let defaults = TestCli::parse_from(["sim"]).cms;
    let php = TestCli::parse_from(["sim", "--cost-model", "php", "--workers", "4"]).cms;

    assert_eq!((defaults.cost_model, defaults.workers), (CostMode::Fast, 1));
    assert_eq!((php.cost_model, php.workers), (CostMode::Php, 4));
    assert!(TestCli::try_parse_from(["sim", "--workers", "0"]).is_err());
    assert!(TestCli::try_parse_from(["sim", "--cost-model", "slow"]).is_err());
}
