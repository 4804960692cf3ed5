//! The simulated viewer's place in the world, as the real one shows it with a real OpenSim region
//! (spec §10): a region restart that disconnects it for good while its status says `login`, the REST
//! login refused until a logout, one logout only, CommLLLP's counters, and what it hears.

use opensim_chat_relay::sim::lookingglass::{
    CommCounters, Connection, Dialect, SimChatLine, ViewerSim, ViewerSimSettings,
};
use serde_json::Value;

async fn viewer() -> ViewerSim {
    ViewerSim::start(ViewerSimSettings {
        listen: "127.0.0.1:0".parse().expect("address"),
        dialect: Dialect::Lookingglass,
        timezone: chrono_tz::UTC,
        own_name: "Relay Bot".to_owned(),
        crash_on_abort: false,
    })
    .await
    .expect("start the viewer simulator")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

async fn get(url: &str) -> Value {
    answer(client().get(url)).await
}

async fn post(url: &str, body: &str) -> Value {
    answer(client().post(url).body(body.to_owned())).await
}

async fn answer(request: reqwest::RequestBuilder) -> Value {
    let body = request
        .send()
        .await
        .expect("answered")
        .bytes()
        .await
        .expect("body");
    serde_json::from_slice(&body).expect("json")
}

const LOGIN_FORM: &str =
    "LOGINFIRST=Relay&LOGINLAST=Bot&LOGINPASS=secret&LOGINGRID=OSGrid&LOGINSIM=uri:Sim&128&128&25";

fn counter(stats: &Value, name: &str) -> String {
    stats[name]["value"]
        .as_str()
        .expect("a string value")
        .to_owned()
}

#[tokio::test]
async fn a_region_restart_disconnects_the_viewer_for_good_while_its_status_says_login() {
    let sim = viewer().await;
    let handle = sim.handle();
    handle.say("Alice Resident", "before");
    let status = get(&sim.status_url()).await;
    assert_eq!(status["currentsim"]["value"], "Sim");
    assert_eq!(status["positionx"]["value"], "128");
    let stats = get(&sim.comm_stats_url()).await;
    assert_eq!(counter(&stats, "network_disconnected"), "0");
    assert_eq!(counter(&stats, "network_simconnected"), "1");
    assert!(stats["network_simconnected"]["description"].is_string());

    handle.restart_region();
    handle.say("Alice Resident", "during");

    let chat = get(&sim.chat_url()).await;
    let messages: Vec<&str> = chat
        .as_object()
        .expect("a map")
        .values()
        .map(|line| line["Message"].as_str().expect("text"))
        .collect();
    assert_eq!(
        messages,
        ["before"],
        "what was said after the restart is never heard"
    );
    assert_eq!(get(&sim.chat_url()).await, serde_json::json!({}));
    let status = get(&sim.status_url()).await;
    assert_eq!(
        status["loginstate"]["value"], "login",
        "the misleading login"
    );
    for empty in [
        "currentsim",
        "currentgrid",
        "positionx",
        "positiony",
        "positionz",
    ] {
        assert_eq!(status[empty], serde_json::json!({}), "{empty}");
    }
    let avatars = get(&sim.avatars_url()).await;
    assert!(
        avatars
            .as_object()
            .expect("a map")
            .values()
            .any(|avatar| avatar["Name"] == "Alice Resident"),
        "the avatars it last saw stay listed: {avatars}"
    );
    let stats = get(&sim.comm_stats_url()).await;
    assert_eq!(counter(&stats, "network_disconnected"), "1");
    assert_eq!(counter(&stats, "network_simconnected"), "1");
    assert_eq!(handle.connection(), Connection::Disconnected);
    assert_eq!(handle.n_unheard(), 1);
}

#[tokio::test]
async fn a_login_is_refused_until_a_logout_and_the_viewer_logs_out_only_once() {
    let sim = viewer().await;
    let handle = sim.handle();
    handle.set_login_password("secret");
    handle.restart_region();

    let refused = post(&sim.connect_url("login"), LOGIN_FORM).await;
    assert_eq!(
        refused,
        serde_json::json!({"RESTRequestError": 1, "RESTRequestMsg": "Could not log in"})
    );
    assert_eq!(
        post(&sim.connect_url("logout"), "").await,
        serde_json::json!({})
    );
    assert_eq!(
        get(&sim.status_url()).await["loginstate"]["value"],
        "loggingout"
    );
    let wrong = LOGIN_FORM.replace("secret", "wrong");
    assert_eq!(
        post(&sim.connect_url("login"), &wrong).await["RESTRequestError"],
        1
    );
    assert_eq!(
        post(&sim.connect_url("login"), LOGIN_FORM).await,
        serde_json::json!({})
    );

    handle.say("Alice Resident", "after");
    let chat = get(&sim.chat_url()).await;
    assert_eq!(
        chat.as_object()
            .expect("a map")
            .values()
            .next()
            .expect("a line")["Message"],
        "after",
        "chat flows again after logout and login"
    );
    let status = get(&sim.status_url()).await;
    assert_eq!(status["loginstate"]["value"], "login");
    assert_eq!(
        status["currentsim"],
        serde_json::json!({}),
        "stays empty after a REST login"
    );
    assert_eq!(status["positionx"], serde_json::json!({}));
    let counters = handle.comm_counters();
    assert_eq!((counters.disconnected, counters.simconnected), (2, 2));

    // A second restart: the viewer's one logout is spent, so it stays out.
    handle.restart_region();
    assert_eq!(
        post(&sim.connect_url("logout"), "").await,
        serde_json::json!({})
    );
    assert_eq!(get(&sim.status_url()).await["loginstate"]["value"], "login");
    assert_eq!(
        post(&sim.connect_url("login"), LOGIN_FORM).await["RESTRequestMsg"],
        "Could not log in"
    );
    assert_eq!(handle.n_logouts(), 1);
    assert_eq!(handle.connection(), Connection::Disconnected);
    assert_eq!(
        handle.comm_counters(),
        CommCounters {
            disconnected: 3,
            simconnected: 2,
            simchanged: 0,
            loginprogress: 8,
            eventqueuerunning: 2,
        }
    );
}

#[tokio::test]
async fn a_logged_out_viewer_says_logout_and_hears_nothing() {
    let sim = viewer().await;
    let handle = sim.handle();
    handle.set_logged_in(false);
    handle.say("Alice Resident", "unheard");
    assert_eq!(
        get(&sim.status_url()).await["loginstate"]["value"],
        "logout"
    );
    assert_eq!(get(&sim.chat_url()).await, serde_json::json!({}));
    assert_eq!(
        post(&sim.connect_url("login"), LOGIN_FORM).await,
        serde_json::json!({})
    );
    handle.say("Alice Resident", "heard");
    assert_eq!(
        get(&sim.chat_url()).await.as_object().expect("map").len(),
        1
    );
}

#[tokio::test]
async fn in_another_region_the_status_names_it_and_that_region_is_heard() {
    let sim = viewer().await;
    let handle = sim.handle();
    handle.move_to_region("Elsewhere");
    handle.place_avatar("Alice Resident", "Sim", [128.0, 128.0, 25.0]);
    handle.place_avatar("Bob Resident", "Elsewhere", [128.0, 128.0, 25.0]);
    handle.say("Alice Resident", "in Sim");
    handle.say("Bob Resident", "in Elsewhere");

    assert_eq!(
        get(&sim.status_url()).await["currentsim"]["value"],
        "Elsewhere"
    );
    let chat = get(&sim.chat_url()).await;
    let messages: Vec<&Value> = chat
        .as_object()
        .expect("map")
        .values()
        .map(|l| &l["Message"])
        .collect();
    assert_eq!(messages, ["in Elsewhere"]);
    let stats = get(&sim.comm_stats_url()).await;
    assert_eq!(counter(&stats, "network_simchanged"), "1");
    assert_eq!(counter(&stats, "network_simconnected"), "2");
}

#[tokio::test]
async fn only_what_is_said_within_hearing_range_is_heard_and_positions_may_use_a_decimal_comma() {
    let sim = viewer().await;
    let handle = sim.handle();
    handle.set_decimal_comma(true);
    handle.place_avatar("Near Resident", "Sim", [130.0, 128.0, 25.0]);
    handle.place_avatar("Far Resident", "Sim", [20.5, 40.25, 25.0]);
    handle.say("Near Resident", "near");
    handle.say("Far Resident", "far say");
    handle.push(SimChatLine::shout("Far Resident", "far shout"));
    handle.push(SimChatLine::whisper("Near Resident", "near whisper"));

    let chat = get(&sim.chat_url()).await;
    let messages: Vec<&Value> = chat
        .as_object()
        .expect("map")
        .values()
        .map(|l| &l["Message"])
        .collect();
    assert_eq!(messages, ["near", "near whisper"]);
    let avatars = get(&sim.avatars_url()).await;
    let far = avatars
        .as_object()
        .expect("map")
        .values()
        .find(|avatar| avatar["Name"] == "Far Resident")
        .expect("listed");
    assert_eq!(far["X"], "20,5");
    assert_eq!(far["Y"], "40,25");
    assert_eq!(far["Region"], "localhost/Sim");
    assert!(far.get("Flags").is_none(), "empty strings are dropped");
}

#[tokio::test]
async fn a_viewer_started_in_a_named_region_shows_it_hears_it_and_counts_no_region_change() {
    // Arrange: a viewer logged in to "Welcome" from its start (`sim viewer --region Welcome`), as
    // each viewer of a relay with several [[regions]] is.
    let sim = viewer().await;
    let handle = sim.handle();
    handle.start_in_region("Welcome");

    // Act
    handle.say("Alice Resident", "hello Welcome");

    // Assert: the status names the region, the avatars stand in it (the viewer's own too), what
    // is said there is heard, and no change of region was counted.
    assert_eq!(
        get(&sim.status_url()).await["currentsim"]["value"],
        "Welcome"
    );
    let avatars = get(&sim.avatars_url()).await;
    let regions: Vec<&Value> = avatars
        .as_object()
        .expect("map")
        .values()
        .map(|avatar| &avatar["Region"])
        .collect();
    assert_eq!(regions, ["localhost/Welcome", "localhost/Welcome"]);
    let chat = get(&sim.chat_url()).await;
    let messages: Vec<&Value> = chat
        .as_object()
        .expect("map")
        .values()
        .map(|l| &l["Message"])
        .collect();
    assert_eq!(messages, ["hello Welcome"]);
    let stats = get(&sim.comm_stats_url()).await;
    assert_eq!(counter(&stats, "network_simchanged"), "0");
    assert_eq!(counter(&stats, "network_simconnected"), "1");
}
