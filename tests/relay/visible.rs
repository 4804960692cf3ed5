//! Failures the operator must see (issue 15 item 5): scrapes of a large outbox that show true counts
//! without scanning it, `/readyz` while the CMS keeps failing or a stage died, the exit codes of
//! start-up errors, the outbox's permission errors, and dead-letter reasons that name the CMS's cause.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::Utc;
use opensim_chat_relay::model::CapturedLine;
use opensim_chat_relay::outbox::Outbox;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

use crate::admin::outbox_cli;
use crate::health::{Observed, sample};
use crate::helpers::{GHOST, PATIENCE, TestEnv, eventually};

/// Lines spoken now by an unmapped speaker, "line 0" to "line `n - 1`".
fn captured_lines(n: usize) -> Vec<CapturedLine> {
    let now = Utc::now();
    (0..n)
        .map(|i| CapturedLine {
            source: opensim_chat_relay::model::LineSource::Avatar,
            speaker: "Alice Resident".into(),
            owner_id: None,
            message: format!("line {i}"),
            spoken_at: now,
            captured_at: now,
            region: String::new(),
        })
        .collect()
}

#[tokio::test]
async fn a_large_outbox_scraped_many_times_shows_true_counts_without_being_scanned() {
    // Arrange: 20,000 lines stored, 1,000 of them refused by the CMS, 100 unusable viewer answers
    // kept; the relay starts on that outbox with the CMS down, so nothing moves while it is scraped.
    let env = TestEnv::start().await;
    {
        let outbox = Outbox::open(&env.dir.path().join("outbox"), 8 << 20).expect("open");
        outbox
            .append(&captured_lines(20_000))
            .await
            .expect("append");
        for line in outbox.oldest(1_000).expect("read") {
            outbox
                .dead_letter(&line, "refused")
                .await
                .expect("dead letter");
        }
        // Distinct bodies: the quarantine keeps a repeated one once.
        for i in 0..100 {
            outbox
                .quarantine_unreadable("chat", format!("not json {i}").as_bytes(), 0)
                .await
                .expect("quarantine");
        }
    }
    env.db.set_offline(true);
    // No gap markers: the 100 unusable answers' marker would enter the outbox once settled, while
    // the counts below are looked at (`presence`'s tests cover it).
    let relay = Observed::start(
        &env,
        &format!("[mapping.users]\n\"{GHOST}\" = 999\n"),
        &[("cms.gap_markers", "false")],
    )
    .await;
    let reader = relay.outbox.reader();
    let n_read_before = reader.records_read();

    // Act: 50 scrapes of each.
    const N_SCRAPES: u64 = 50;
    for _ in 0..N_SCRAPES {
        let (_, metrics) = relay.get("/metrics").await;
        let (_, status) = relay.get_json("/status").await;

        // Assert: every scrape shows the true counts.
        assert_eq!(
            sample(&metrics, "opensim_chat_relay_outbox_lines"),
            19_000.0
        );
        assert_eq!(sample(&metrics, "opensim_chat_relay_dead_letters"), 1_000.0);
        assert_eq!(sample(&metrics, "opensim_chat_relay_quarantined"), 100.0);
        assert!(sample(&metrics, "opensim_chat_relay_outbox_oldest_age_seconds") >= 0.0);
        assert_eq!(status["outbox"]["lines"], 19_000);
        assert_eq!(status["outbox"]["dead_letters"], 1_000);
        assert_eq!(status["outbox"]["quarantined"], 100);
    }
    // One record a scrape (the oldest pending line, for its age), not the trees.
    let n_read = reader.records_read() - n_read_before;
    assert!(
        n_read <= 2 * N_SCRAPES,
        "{n_read} records read for {} scrapes",
        2 * N_SCRAPES
    );

    // Act: the CMS is back, the backlog goes out, and one more line is refused.
    env.db.set_offline(false);
    eventually(PATIENCE, "the backlog delivered", || async {
        relay.outbox.is_empty()
    })
    .await;
    env.lg.say(GHOST, "I do not exist");
    // (A dead letter is written before its pending record is removed, in one flush: a look
    // between the two sees the line in both.)
    eventually(PATIENCE, "the ghost's line dead-lettered", || async {
        relay.outbox.dead_letters().expect("dead letters").len() == 1_001 && relay.outbox.is_empty()
    })
    .await;

    // Assert: the counts follow.
    let (_, metrics) = relay.get("/metrics").await;
    assert_eq!(sample(&metrics, "opensim_chat_relay_outbox_lines"), 0.0);
    assert_eq!(sample(&metrics, "opensim_chat_relay_dead_letters"), 1_001.0);
    assert_eq!(sample(&metrics, "opensim_chat_relay_quarantined"), 100.0);
    assert_eq!(
        sample(&metrics, "opensim_chat_relay_outbox_oldest_age_seconds"),
        0.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn readyz_is_503_while_deliveries_keep_failing_and_200_again_once_one_succeeds() {
    // Arrange: a relay that was ready.
    let env = TestEnv::start().await;
    let relay = Observed::start(&env, "", &[("http.cms_unready_after", "300ms")]).await;
    eventually(PATIENCE, "/readyz 200", || async {
        relay.get("/readyz").await.0 == 200
    })
    .await;

    // Act: the CMS goes away while a line waits.
    env.db.set_offline(true);
    env.lg.say("Alice Resident", "is anybody there?");

    // Assert: not ready, and the cms check says why.
    eventually(PATIENCE, "/readyz 503", || async {
        relay.get("/readyz").await.0 == 503
    })
    .await;
    let (_, body) = relay.get_json("/readyz").await;
    assert_eq!(body["checks"]["cms"]["ok"], false, "{body}");
    let reason = body["checks"]["cms"]["reason"].as_str().expect("reason");
    assert!(
        reason.contains("delivery to the cms has failed"),
        "{reason}"
    );
    assert!(reason.contains("http.cms_unready_after"), "{reason}");
    assert!(reason.contains("cms unreachable"), "{reason}");
    assert_eq!(body["checks"]["viewer"]["ok"], true, "{body}");
    assert_eq!(body["checks"]["outbox"]["ok"], true, "{body}");
    let (_, metrics) = relay.get("/metrics").await;
    assert_eq!(sample(&metrics, "opensim_chat_relay_ready"), 0.0);

    // Act: the CMS is back.
    env.db.set_offline(false);

    // Assert: the line is delivered and the relay is ready again.
    eventually(PATIENCE, "/readyz 200 again", || async {
        relay.get("/readyz").await.0 == 200
    })
    .await;
    assert_eq!(
        env.stored_messages(),
        ["[Alice Resident] is anybody there?"]
    );
    relay.stop().await;
}

/// A log layer that panics inside the first event with this message, and only there: a stand-in for
/// a bug anywhere in the code a stage runs (the panic unwinds through the stage's task as a real one
/// would). No hook in the relay: the test installs it on its own thread, where the relay's tasks run.
struct PanicAt {
    message: &'static str,
    fired: AtomicBool,
}

impl<S: tracing::Subscriber> Layer<S> for PanicAt {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        struct Message(Option<String>);
        impl Visit for Message {
            fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = Some(format!("{value:?}"));
                }
            }
        }
        let mut message = Message(None);
        event.record(&mut message);
        if message.0.as_deref() == Some(self.message) && !self.fired.swap(true, Ordering::SeqCst) {
            panic!("a bug in the stage (test)");
        }
    }
}

#[tokio::test]
async fn a_stage_that_panics_stops_the_relay_with_an_error_that_names_it() {
    // Arrange: a panic in delivery, right after its first batch.
    let env = TestEnv::start().await;
    let layer = PanicAt {
        message: "delivered batch",
        fired: AtomicBool::new(false),
    };
    let _logs = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
    let relay = Observed::start(&env, "", &[]).await;

    // Act
    env.lg.say("Alice Resident", "the last words");

    // Assert: the relay stops by itself with an error (the binary exits non-zero with it), once.
    let result = tokio::time::timeout(PATIENCE, relay.task)
        .await
        .expect("the relay stops by itself")
        .expect("the relay's own task does not panic");
    let err = result.expect_err("a stage panicked");
    let text = format!("{err:#}");
    assert!(text.contains("delivery"), "{text}");
    assert!(text.contains("panicked"), "{text}");
    assert!(text.contains("a bug in the stage (test)"), "{text}");
    assert_eq!(env.stored_messages(), ["[Alice Resident] the last words"]);
    assert!(
        !relay.token.is_cancelled(),
        "the caller's token is the caller's"
    );
}

/// The relay binary's exit code and stderr, run with these overrides until it exits by itself.
fn run_until_exit(env: &TestEnv, overrides: &[(&str, &str)]) -> (Option<i32>, String) {
    let child = env.spawn_relay_process(overrides, Stdio::piped());
    let output = child.wait_with_output().expect("the relay exits");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_taken_health_port_stops_start_up_with_exit_78_naming_http_listen() {
    // Arrange: another process holds the port.
    let env = TestEnv::start().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();

    // Act
    let (code, stderr) = run_until_exit(&env, &[("http.listen", &addr)]);

    // Assert: EX_CONFIG, which systemd does not restart (RestartPreventExitStatus=78).
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("http.listen") && stderr.contains(&addr),
        "{stderr}"
    );
}

/// The output of `id` with these arguments (`-u`, `-un`).
fn id(args: &[&str]) -> String {
    let output = std::process::Command::new("id")
        .args(args)
        .output()
        .expect("id runs");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[tokio::test]
async fn an_outbox_the_relay_may_not_write_is_named_with_its_user_and_never_to_be_moved_aside() {
    // Arrange: an outbox with a line waiting, which the relay may not write. Permissions do not stop
    // root, so as root the relay runs as nobody (as a relay once started as root and now run as its
    // service user would find it: a directory owned by root, 0755).
    let env = TestEnv::start().await;
    let path = env.dir.path().join("outbox");
    {
        let outbox = Outbox::open(&path, 1 << 20).expect("open");
        outbox.append(&captured_lines(1)).await.expect("append");
    }
    let as_root = id(&["-u"]) == "0";
    let (wrapper, user): (&[&str], String) = if as_root {
        set_mode(env.dir.path(), 0o755);
        (
            &[
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
            ],
            "nobody".to_owned(),
        )
    } else {
        set_mode(&path, 0o000);
        (&[], id(&["-un"]))
    };

    // Act
    let output = env
        .relay_command(wrapper, &[("http.listen", "")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("the relay runs");
    set_mode(&path, 0o755);
    let stderr = String::from_utf8_lossy(&output.stderr);

    // Assert: an operator's error naming the path, the cause and the user, and no advice to move the
    // directory aside, which would strand the waiting line.
    assert_eq!(output.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");
    assert!(stderr.contains(&format!("user {user}")), "{stderr}");
    assert!(
        !stderr.contains("aside") && !stderr.contains("mv "),
        "{stderr}"
    );
    let outbox = Outbox::open(&path, 1 << 20).expect("open");
    assert_eq!(outbox.len(), 1);
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[tokio::test]
async fn a_dead_letter_names_what_the_cms_refused_and_what_to_change() {
    // Arrange: an unmapped speaker posted as user 0 (which stock OpenSim-CMS 1.1 rejects) and the
    // ghost as user 999 (which this CMS does not have). The CMS answers both with
    // {"success":false,"id":0}, which names no cause.
    let env = TestEnv::start().await;
    env.lg.say("Alice Resident", "nobody is user 0");
    env.lg.say(GHOST, "I do not exist");
    let relay = env
        .start_relay_with_a_ghost(&[("cms.anonymous_user_id", "0")])
        .await;
    relay.dead_letters_reach(2).await;
    relay.stop().await;

    // Act
    let (ok, stdout, stderr) = outbox_cli(&env, &["dead"]);

    // Assert: each reason names the row's user id, the foreign key it fails, and the fix.
    assert!(ok, "{stderr}");
    let reason_of = |text: &str| {
        let mut lines = stdout.lines().skip_while(|line| !line.contains(text));
        lines.nth(1).unwrap_or_default().to_owned()
    };
    let anonymous = reason_of("Alice Resident: nobody is user 0");
    assert!(anonymous.contains("user id 0"), "{stdout}");
    assert!(anonymous.contains("foreign key"), "{stdout}");
    assert!(anonymous.contains("cms.anonymous_user_id = -1"), "{stdout}");
    let ghost = reason_of("Ghost Avatar: I do not exist");
    assert!(ghost.contains("user id 999"), "{stdout}");
    assert!(ghost.contains("foreign key"), "{stdout}");
    assert!(ghost.contains("mapping.users"), "{stdout}");
}
