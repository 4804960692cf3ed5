//! Several regions in one relay (issue 23): a `[[regions]]` configuration with two simulated
//! viewers, one per region, against one CMS. Each region's lines reach the CMS with their region,
//! each CMS line is said once in each region, and a region whose viewer is down holds up neither
//! the other region nor the CMS lines, while `/readyz` and `/metrics` name it.

use std::net::SocketAddr;

use opensim_chat_relay::outbox::Cursor;
use opensim_chat_relay::sim::lookingglass::{Dialect, ViewerHandle, ViewerSim, ViewerSimSettings};

use crate::health::{Observed, sample};
use crate::helpers::{OWN_NAME, PATIENCE, TestEnv, VIEWER_ZONE, eventually};
use crate::inworld::cms_user;

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
    assert_eq!(
        sample(&metrics, "opensim_chat_relay_lines_delivered_total"),
        2.0
    );
    let (_, status) = relay.get_json("/status").await;
    assert_eq!(status["regions"][1]["name"], "Sandbox", "{status}");
    assert_eq!(status["regions"][1]["lines"]["relayed"], 1, "{status}");
    assert_eq!(status["lines"]["relayed"], 2, "{status}");
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
