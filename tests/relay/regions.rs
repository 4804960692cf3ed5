//! Several regions in one relay (issue 23): a `[[regions]]` configuration with two simulated
//! viewers, one per region, against one CMS. Each region's lines reach the CMS with their region,
//! each CMS line is said once in each region, and a region whose viewer is down holds up neither
//! the other region nor the CMS lines, while `/readyz` and `/metrics` name it.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use opensim_chat_relay::outbox::Cursor;
use opensim_chat_relay::sim::lookingglass::{
    Dialect, ViewerHandle, ViewerSim, ViewerSimSettings, spawn_chatter,
};
use tokio_util::sync::CancellationToken;

use crate::health::{Observed, sample};
use crate::helpers::{
    Logs, OWN_NAME, PATIENCE, TestEnv, VIEWER_ZONE, cycles, eventually, sigterm,
    until_done_or_stalled,
};
use crate::inworld::cms_user;

/// A presence check comes every 5 s (`presence::CHECK_INTERVAL`): room for a few.
const LONG_PATIENCE: Duration = Duration::from_secs(60);

/// The second region's viewer, besides `TestEnv`'s (the first region's).
pub struct Sandbox {
    pub viewer: ViewerSim,
    pub lg: ViewerHandle,
}

impl Sandbox {
    pub async fn start() -> Sandbox {
        let localhost: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let viewer = ViewerSim::start(ViewerSimSettings {
            listen: localhost,
            dialect: Dialect::Lookingglass,
            timezone: VIEWER_ZONE.parse().expect("zone"),
            own_name: OWN_NAME.into(),
            crash_on_abort: false,
        })
        .await
        .expect("viewer simulator starts");
        let lg = viewer.handle();
        Sandbox { viewer, lg }
    }
}

/// Two regions, Welcome on `env`'s viewer and Sandbox on `sandbox`'s; both simulated viewers stand
/// in the simulator's region "Sim", which each entry names as the region its viewer must be in.
pub fn two_regions(env: &TestEnv, sandbox: &Sandbox) -> String {
    let entry = |name: &str, viewer: &ViewerSim| {
        format!(
            "[[regions]]\nname = \"{name}\"\nregion = \"Sim\"\nchat_url = \"{}\"\nstatus_url = \"{}\"\navatars_url = \"{}\"\n",
            viewer.chat_url(),
            viewer.status_url(),
            viewer.avatars_url()
        )
    };
    format!(
        "[cms]\nanonymous_format = \"[{{name}} in {{region}}] {{message}}\"\n[inworld]\npoll_interval = \"30ms\"\nmax_lines_per_second = 100.0\n\n{}\n{}",
        entry("Welcome", &env.viewer),
        entry("Sandbox", &sandbox.viewer)
    )
}

fn said(lg: &ViewerHandle) -> Vec<String> {
    lg.said().into_iter().map(|s| s.message).collect()
}

/// Waits until both regions' in-world cursors are set (CMS lines added afterwards are said).
async fn cursors_set(relay: &Observed) {
    eventually(PATIENCE, "both in-world cursors set", || async {
        ["Welcome", "Sandbox"].iter().all(|region| {
            relay
                .outbox
                .cursor(Cursor::LastSaidId.of(region))
                .ok()
                .flatten()
                .is_some()
        })
    })
    .await;
}

#[tokio::test]
async fn each_region_relays_its_lines_with_its_name_and_says_each_cms_line_once() {
    // Arrange
    let env = TestEnv::start().await;
    let sandbox = Sandbox::start().await;
    let dora = cms_user(&env);
    let relay = Observed::start(&env, &two_regions(&env, &sandbox), &[]).await;
    cursors_set(&relay).await;

    // Act: one avatar in each region speaks; Dora types two lines in the CMS.
    env.lg.say("Alice Resident", "hello from the welcome area");
    sandbox.lg.say("Bob Builder", "hello from the sandbox");
    env.db.add_cms_line(1, dora, "one");
    env.db.add_cms_line(1, dora, "two");

    // Assert: both lines reached the CMS, each with its region.
    eventually(PATIENCE, "both regions' lines relayed", || async {
        env.relayed_rows().len() >= 2
    })
    .await;
    let mut relayed: Vec<String> = env.relayed_rows().into_iter().map(|(_, m)| m).collect();
    relayed.sort();
    assert_eq!(
        relayed,
        [
            "[Alice Resident in Welcome] hello from the welcome area",
            "[Bob Builder in Sandbox] hello from the sandbox",
        ]
    );
    // Each CMS line said once in each region, in order; several reads later, still once.
    eventually(PATIENCE, "the cms lines said in both regions", || async {
        said(&env.lg).len() >= 2 && said(&sandbox.lg).len() >= 2
    })
    .await;
    let n_requests = env.db.requests().len();
    eventually(PATIENCE, "more cms reads", || async {
        env.db.requests().len() > n_requests + 5
    })
    .await;
    for lg in [&env.lg, &sandbox.lg] {
        assert_eq!(said(lg), ["[Dora Admin] one", "[Dora Admin] two"]);
    }
    // The viewers' echoes of what the relay said were not relayed back.
    assert_eq!(env.relayed_rows().len(), 2, "{:?}", env.relayed_rows());
    // /metrics labels the region-scoped families by region.
    let (_, metrics) = relay.get("/metrics").await;
    for region in ["Welcome", "Sandbox"] {
        let relayed = format!("opensim_chat_relay_lines_relayed_total{{region=\"{region}\"}}");
        let said = format!("opensim_chat_relay_inworld_said_total{{region=\"{region}\"}}");
        assert_eq!(sample(&metrics, &relayed), 1.0, "{metrics}");
        assert_eq!(sample(&metrics, &said), 2.0, "{metrics}");
    }
    for region in ["Welcome", "Sandbox"] {
        let delivered = format!("opensim_chat_relay_lines_delivered_total{{region=\"{region}\"}}");
        assert_eq!(sample(&metrics, &delivered), 1.0, "{metrics}");
    }
    let (_, status) = relay.get_json("/status").await;
    assert_eq!(status["regions"][1]["name"], "Sandbox", "{status}");
    assert_eq!(status["regions"][1]["lines"]["relayed"], 1, "{status}");
    assert_eq!(status["lines"]["relayed"], 2, "{status}");
    assert_eq!(status["regions"][1]["lines"]["delivered"], 1, "{status}");
    assert_eq!(status["lines"]["delivered"], 2, "{status}");
    relay.stop().await;
}

#[tokio::test]
async fn a_region_whose_viewer_is_down_holds_up_neither_the_other_nor_the_cms_lines() {
    // Arrange: both regions run, then Sandbox's viewer goes away.
    let env = TestEnv::start().await;
    let sandbox = Sandbox::start().await;
    let dora = cms_user(&env);
    let relay = Observed::start(&env, &two_regions(&env, &sandbox), &[]).await;
    cursors_set(&relay).await;
    eventually(PATIENCE, "ready with both regions", || async {
        relay.get("/readyz").await.0 == 200
    })
    .await;
    sandbox.viewer.stop().await;

    // Act: Welcome goes on talking; Dora types in the CMS.
    for n in 0..5 {
        env.lg.say("Alice Resident", &format!("still here {n}"));
    }
    env.db.add_cms_line(1, dora, "for everyone");

    // Assert: Welcome's lines and the CMS line flow; /readyz names Sandbox, and only Sandbox.
    eventually(PATIENCE, "Welcome's lines relayed", || async {
        env.relayed_rows().len() >= 5
    })
    .await;
    eventually(PATIENCE, "the cms line said in Welcome", || async {
        said(&env.lg) == ["[Dora Admin] for everyone"]
    })
    .await;
    eventually(PATIENCE, "readyz names the region that is down", || async {
        let (status, body) = relay.get_json("/readyz").await;
        let reason = body["checks"]["viewer"]["reason"].as_str().unwrap_or("");
        status == 503 && reason.starts_with("viewer (Sandbox): ") && !reason.contains("Welcome")
    })
    .await;
    let (_, metrics) = relay.get("/metrics").await;
    assert!(
        sample(
            &metrics,
            "opensim_chat_relay_viewer_poll_errors_total{region=\"Sandbox\"}"
        ) > 0.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "opensim_chat_relay_viewer_poll_errors_total{region=\"Welcome\"}"
        ),
        0.0,
        "{metrics}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_region_whose_viewer_is_out_of_its_region_is_named_while_the_other_flows() {
    // Arrange
    let env = TestEnv::start().await;
    let sandbox = Sandbox::start().await;
    let relay = Observed::start(&env, &two_regions(&env, &sandbox), &[]).await;
    eventually(PATIENCE, "ready with both regions", || async {
        relay.get("/readyz").await.0 == 200
    })
    .await;

    // Act: Welcome's region restarts (its viewer is disconnected for good: no [regions.login]);
    // both regions talk on.
    env.lg.restart_region();
    env.lg.say("Alice Resident", "unheard in the welcome area");
    sandbox.lg.say("Bob Builder", "the sandbox carries on");

    // Assert: Sandbox's line arrives; /readyz and /metrics name Welcome, and only Welcome.
    eventually(PATIENCE, "Sandbox's line relayed", || async {
        env.stored_messages()
            .iter()
            .any(|m| m == "[Bob Builder in Sandbox] the sandbox carries on")
    })
    .await;
    eventually(
        LONG_PATIENCE,
        "readyz names the region out of its region",
        || async {
            let (_, body) = relay.get_json("/readyz").await;
            let reason = body["checks"]["viewer"]["reason"].as_str().unwrap_or("");
            reason.starts_with("viewer (Welcome): ") && !reason.contains("Sandbox")
        },
    )
    .await;
    let (_, metrics) = relay.get("/metrics").await;
    let out = |region: &str| {
        sample(
            &metrics,
            &format!("opensim_chat_relay_viewer_out_of_region{{region=\"{region}\"}}"),
        )
    };
    assert_eq!((out("Welcome"), out("Sandbox")), (1.0, 0.0), "{metrics}");
    sandbox.lg.say("Bob Builder", "still carrying on");
    eventually(PATIENCE, "Sandbox's second line relayed", || async {
        env.stored_messages()
            .iter()
            .any(|m| m == "[Bob Builder in Sandbox] still carrying on")
    })
    .await;
    assert!(
        !env.stored_messages()
            .iter()
            .any(|m| m.contains("unheard in the welcome area")),
        "{:?}",
        env.stored_messages()
    );
    relay.stop().await;
}

/// The chat POSTs `lg` received, heard or not (a POST to a viewer out of its region is answered
/// and lost: spec §10).
fn chat_posts(lg: &ViewerHandle) -> usize {
    lg.requests()
        .iter()
        .filter(|(method, path)| method == "POST" && path.starts_with("/api/chat"))
        .count()
}

#[tokio::test]
async fn cms_lines_wait_for_a_region_whose_viewer_is_out_and_are_said_there_once_when_it_is_back() {
    // Arrange: two regions; CMS reads every 200 ms, so the reads that wait for Welcome stay far
    // below its inbox's 1,000 however slow the machine.
    let (logs, _guard) = Logs::capture();
    let env = TestEnv::start().await;
    let sandbox = Sandbox::start().await;
    let dora = cms_user(&env);
    let relay = Observed::start(
        &env,
        &two_regions(&env, &sandbox),
        &[("inworld.poll_interval", "200ms")],
    )
    .await;
    cursors_set(&relay).await;
    eventually(PATIENCE, "ready with both regions", || async {
        relay.get("/readyz").await.0 == 200
    })
    .await;

    // Act: Welcome's viewer is logged out (no [regions.login]: it stays out); once the relay knows,
    // Dora types two lines in the CMS.
    env.lg.set_logged_in(false);
    eventually(LONG_PATIENCE, "readyz names Welcome", || async {
        let (_, body) = relay.get_json("/readyz").await;
        let reason = body["checks"]["viewer"]["reason"].as_str().unwrap_or("");
        reason.starts_with("viewer (Welcome): ") && !reason.contains("Sandbox")
    })
    .await;
    let n_posts_before = chat_posts(&env.lg);
    env.db.add_cms_line(1, dora, "while you were out");
    env.db.add_cms_line(1, dora, "and another");

    // Assert: Sandbox says both at once; Welcome's viewer is sent nothing while it is out, and
    // /status and /metrics show Welcome's in-world paused, and only Welcome's.
    let both = [
        "[Dora Admin] while you were out",
        "[Dora Admin] and another",
    ];
    eventually(PATIENCE, "the cms lines said in Sandbox", || async {
        said(&sandbox.lg) == both
    })
    .await;
    let n_reads = env.db.requests().len();
    eventually(PATIENCE, "more cms reads", || async {
        env.db.requests().len() > n_reads + 5
    })
    .await;
    assert_eq!(
        chat_posts(&env.lg),
        n_posts_before,
        "no chat POST to a viewer out of its region"
    );
    let (_, status) = relay.get_json("/status").await;
    assert_eq!(status["regions"][0]["name"], "Welcome", "{status}");
    assert_eq!(status["regions"][0]["inworld"]["paused"], true, "{status}");
    assert_eq!(status["regions"][1]["inworld"]["paused"], false, "{status}");
    let (_, metrics) = relay.get("/metrics").await;
    let paused = |metrics: &str, region: &str| {
        sample(
            metrics,
            &format!("opensim_chat_relay_inworld_paused{{region=\"{region}\"}}"),
        )
    };
    assert_eq!(
        (paused(&metrics, "Welcome"), paused(&metrics, "Sandbox")),
        (1.0, 0.0),
        "{metrics}"
    );

    // Act: Welcome's viewer logs in again.
    env.lg.set_logged_in(true);

    // Assert: Welcome says both lines, in order, once; several reads later, still once.
    eventually(LONG_PATIENCE, "the cms lines said in Welcome", || async {
        said(&env.lg) == both
    })
    .await;
    let n_reads = env.db.requests().len();
    eventually(PATIENCE, "more cms reads", || async {
        env.db.requests().len() > n_reads + 5
    })
    .await;
    assert_eq!(said(&env.lg), both);
    assert_eq!(said(&sandbox.lg), both);
    let (_, metrics) = relay.get("/metrics").await;
    assert_eq!(paused(&metrics, "Welcome"), 0.0, "{metrics}");
    let (_, status) = relay.get_json("/status").await;
    assert_eq!(status["regions"][0]["inworld"]["paused"], false, "{status}");
    relay.stop().await;
    // The log told the pause once, with its region and why, and the resume once.
    let paused = logs.lines_with("in-world is paused for this region");
    assert_eq!(paused.len(), 1, "{paused:?}");
    assert!(
        paused[0].contains("Welcome") && paused[0].contains("not logged in"),
        "{paused:?}"
    );
    let resumed = logs.lines_with("in-world resumes for this region");
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert!(resumed[0].contains("Welcome"), "{resumed:?}");
}

/// The lines a viewer handed out outside `windows` (each the last response before a kill).
fn must_arrive(lg: &ViewerHandle, windows: &HashSet<u64>) -> HashSet<String> {
    lg.handed_out()
        .into_iter()
        .filter(|h| !windows.contains(&h.response))
        .map(|h| h.message)
        .collect()
}

/// The stored rows of region `region`, their text without the anonymous prefix.
fn stored_in(env: &TestEnv, region: &str) -> Vec<String> {
    let prefix = format!(" in {region}] ");
    env.stored_messages()
        .into_iter()
        .filter_map(|m| Some(m.split_once(&prefix)?.1.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_two_region_relay_loses_and_duplicates_nothing_in_either_region() {
    // Arrange: a relay process on two regions, avatars chatting in both.
    let n_cycles = cycles("RELAY_REGIONS_CRASH_CYCLES", 8);
    let env = TestEnv::start().await;
    let sandbox = Sandbox::start().await;
    let config = env.dir.path().join("regions.toml");
    std::fs::write(&config, two_regions(&env, &sandbox)).expect("write config");
    let start = || {
        env.spawn_relay_process_with_config(
            Some(&config),
            &[
                ("cms.batch_max_messages", "20"),
                ("inworld.enabled", "false"),
                ("log.level", "warn"),
                ("http.listen", ""),
            ],
            Stdio::null(),
        )
    };
    let chatting = CancellationToken::new();
    let chatters = [
        spawn_chatter(env.lg.clone(), 150.0, chatting.clone()),
        spawn_chatter(sandbox.lg.clone(), 150.0, chatting.clone()),
    ];

    // Act: SIGKILL at random moments, restarting on the same outbox.
    let (mut welcome_windows, mut sandbox_windows) = (HashSet::new(), HashSet::new());
    for _ in 0..n_cycles {
        let mut child = start();
        tokio::time::sleep(Duration::from_millis(fastrand::u64(100..500))).await;
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        welcome_windows.insert(env.lg.n_gets());
        sandbox_windows.insert(sandbox.lg.n_gets());
    }
    chatting.cancel();
    for chatter in chatters {
        chatter.await.expect("chatter stops");
    }
    let last = start();
    env.viewer_drained(PATIENCE).await;
    eventually(PATIENCE, "Sandbox's viewer drained", || async {
        sandbox.lg.queue_len() == 0
    })
    .await;
    let regions = [
        ("Welcome", must_arrive(&env.lg, &welcome_windows), &env.lg),
        (
            "Sandbox",
            must_arrive(&sandbox.lg, &sandbox_windows),
            &sandbox.lg,
        ),
    ];
    until_done_or_stalled(Duration::from_secs(30), || {
        let n_stored = env.stored_messages().len();
        let done = regions.iter().all(|(region, must, _)| {
            let stored: HashSet<String> = stored_in(&env, region).into_iter().collect();
            must.is_subset(&stored)
        });
        (done, n_stored)
    })
    .await;
    sigterm(last);

    // Assert, per region: every line outside the kill windows stored once, none duplicated, none
    // that region's viewer did not hand out (a line in the wrong region would be one).
    for (region, must, lg) in &regions {
        let stored = stored_in(&env, region);
        let handed: HashSet<String> = lg.handed_out().into_iter().map(|h| h.message).collect();
        let mut seen = HashSet::new();
        let duplicated: Vec<&String> = stored.iter().filter(|m| !seen.insert(*m)).collect();
        assert!(duplicated.is_empty(), "{region}: duplicated {duplicated:?}");
        let lost: Vec<&String> = must.iter().filter(|m| !seen.contains(*m)).collect();
        assert!(
            lost.is_empty(),
            "{region}: lost {} lines: {lost:?}",
            lost.len()
        );
        let phantom: Vec<&String> = stored.iter().filter(|m| !handed.contains(*m)).collect();
        assert!(
            phantom.is_empty(),
            "{region}: never handed out: {phantom:?}"
        );
        assert!(handed.len() > 50, "{region}: the run carried real traffic");
    }
}

#[tokio::test]
async fn an_opt_out_in_one_region_holds_in_every_region_and_is_confirmed_where_it_was_said() {
    // Arrange
    let env = TestEnv::start().await;
    let sandbox = Sandbox::start().await;
    let relay = Observed::start(&env, &two_regions(&env, &sandbox), &[]).await;

    // Act: Alice opts out in Welcome, then speaks in both regions (she walked over); Bob speaks
    // after her in Sandbox.
    env.lg.say("Alice Resident", "!nolog");
    eventually(PATIENCE, "the confirmation said in Welcome", || async {
        said(&env.lg).iter().any(|m| m.contains("not recorded"))
    })
    .await;
    env.lg.say("Alice Resident", "private in the welcome area");
    sandbox.lg.say("Alice Resident", "private in the sandbox");
    sandbox.lg.say("Bob Builder", "bob in the sandbox");

    // Assert
    eventually(PATIENCE, "Bob's line relayed", || async {
        env.stored_messages()
            .iter()
            .any(|m| m.ends_with("bob in the sandbox"))
    })
    .await;
    let stored = env.stored_messages();
    assert_eq!(
        stored,
        ["[Bob Builder in Sandbox] bob in the sandbox"],
        "{stored:?}"
    );
    assert!(said(&sandbox.lg).is_empty(), "{:?}", said(&sandbox.lg));
    relay.stop().await;
}

#[tokio::test]
async fn lines_of_both_regions_wait_out_a_cms_outage_and_arrive_each_with_its_region() {
    // Arrange
    let env = TestEnv::start().await;
    let sandbox = Sandbox::start().await;
    let relay = Observed::start(&env, &two_regions(&env, &sandbox), &[]).await;
    env.db.set_offline(true);

    // Act: both regions talk while the CMS is down, then it comes back.
    for n in 0..3 {
        env.lg.say("Alice Resident", &format!("welcome {n}"));
        sandbox.lg.say("Bob Builder", &format!("sandbox {n}"));
    }
    eventually(PATIENCE, "six lines waiting in the outbox", || async {
        relay.outbox.len() == 6
    })
    .await;
    env.db.set_offline(false);

    // Assert: every line once, with its region, in each region's order.
    eventually(PATIENCE, "six lines relayed", || async {
        env.relayed_rows().len() >= 6
    })
    .await;
    assert_eq!(
        stored_in(&env, "Welcome"),
        ["welcome 0", "welcome 1", "welcome 2"]
    );
    assert_eq!(
        stored_in(&env, "Sandbox"),
        ["sandbox 0", "sandbox 1", "sandbox 2"]
    );
    assert_eq!(env.relayed_rows().len(), 6);
    relay.stop().await;
}

#[tokio::test]
async fn a_region_whose_viewer_hangs_holds_up_no_cms_line_in_the_other() {
    // Arrange: Sandbox's viewer takes a chat GET and never answers it (a frozen viewer process):
    // its gate stays taken, so nothing can be said there.
    let env = TestEnv::start().await;
    let sandbox = Sandbox::start().await;
    let dora = cms_user(&env);
    let relay = Observed::start(&env, &two_regions(&env, &sandbox), &[]).await;
    cursors_set(&relay).await;
    sandbox.lg.set_response_delay(Duration::from_secs(3600));
    let n_gets = sandbox.lg.n_gets();
    eventually(PATIENCE, "a GET to Sandbox's viewer hanging", || async {
        sandbox.lg.n_gets() > n_gets
    })
    .await;

    // Act: Dora types one line, then another once the first was said.
    env.db.add_cms_line(1, dora, "first");
    eventually(PATIENCE, "the first line said in Welcome", || async {
        said(&env.lg) == ["[Dora Admin] first"]
    })
    .await;
    env.db.add_cms_line(1, dora, "second");

    // Assert: Welcome goes on with the next line while Sandbox cannot say the first.
    eventually(PATIENCE, "the second line said in Welcome", || async {
        said(&env.lg) == ["[Dora Admin] first", "[Dora Admin] second"]
    })
    .await;
    assert!(said(&sandbox.lg).is_empty());
    // The hanging GET ends with its viewer; then the relay stops as always.
    sandbox.viewer.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn check_probes_every_regions_viewer_and_names_the_one_that_fails() {
    // Arrange: Sandbox's viewer is gone.
    let env = TestEnv::start().await;
    let sandbox = Sandbox::start().await;
    let settings = env.settings(&two_regions(&env, &sandbox), &[]);
    sandbox.viewer.stop().await;

    // Act
    let report = opensim_chat_relay::check::run(&settings).await;

    // Assert: Welcome's status answers, Sandbox's fails, each line naming its region.
    let status: Vec<_> = report
        .lines
        .iter()
        .filter(|line| line.name == "viewer.status")
        .collect();
    assert_eq!(status.len(), 2, "{report:?}");
    assert!(
        status[0].detail.starts_with("region \"Welcome\": ")
            && status[0].outcome == opensim_chat_relay::check::Outcome::Ok,
        "{:?}",
        status[0]
    );
    assert!(
        status[1].detail.starts_with("region \"Sandbox\": ")
            && status[1].outcome == opensim_chat_relay::check::Outcome::Fail,
        "{:?}",
        status[1]
    );
    assert!(!report.passed());
}

#[tokio::test]
async fn a_one_region_outbox_taken_over_by_a_two_region_relay_delivers_its_waiting_lines() {
    // Arrange: a one-region relay left two lines waiting (the CMS was down when it stopped).
    let env = TestEnv::start().await;
    let sandbox = Sandbox::start().await;
    env.db.set_offline(true);
    let single = Observed::start(&env, "", &[]).await;
    env.lg.say("Alice Resident", "said before the regions");
    env.lg.say("Alice Resident", "and this too");
    eventually(PATIENCE, "two lines waiting", || async {
        single.outbox.len() == 2
    })
    .await;
    single.stop().await;
    env.db.set_offline(false);

    // Act: the same outbox under a two-region relay.
    let relay = Observed::start(&env, &two_regions(&env, &sandbox), &[]).await;
    sandbox.lg.say("Bob Builder", "new in the sandbox");

    // Assert: the old lines arrive once each (their rows were decided by the first relay, its
    // anonymous prefix kept), beside the new one with its region.
    eventually(PATIENCE, "three lines relayed", || async {
        env.relayed_rows().len() >= 3
    })
    .await;
    let stored: Vec<String> = env.relayed_rows().into_iter().map(|(_, m)| m).collect();
    assert_eq!(stored.len(), 3, "{stored:?}");
    for text in ["said before the regions", "and this too"] {
        let n = stored.iter().filter(|m| m.ends_with(text)).count();
        assert_eq!(n, 1, "{text:?} in {stored:?}");
    }
    assert!(
        stored.contains(&"[Bob Builder in Sandbox] new in the sandbox".to_owned()),
        "{stored:?}"
    );
    relay.stop().await;
}
