//! The quirks of LookingGlass and OpenSim-CMS 1.1 the relay must survive (issue 3), end to end
//! against the simulators. Each test fails when the relay's handling of its quirk is removed;
//! `docs/COMPATIBILITY.md` lists every quirk with what the relay does about it and where it is tested.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Offset, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use opensim_chat_relay::echo::ECHO_DEADLINE;
use opensim_chat_relay::metrics::Stats;
use opensim_chat_relay::sim::cms::{CmsDialect, Fault, Permissions};
use opensim_chat_relay::sim::lookingglass::{Dialect, SimChatLine};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::helpers::{CMS_ZONE, GHOST, PATIENCE, SimOptions, TestEnv, eventually};

// ---------------------------------------------------------------------------------------------
// The viewer
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_wrong_viewer_host_is_reported_once_with_its_fix_and_retried_gently_without_draining() {
    // Arrange: the URLs say localhost; LookingGlass listens on 127.0.0.1 and refuses any other Host.
    let (logs, _guard) = Logs::capture();
    let env = TestEnv::start().await;
    env.lg.say("Alice Resident", "waiting for the right host");
    let wrong = |url: String| url.replace("127.0.0.1", "localhost");
    let (chat, avatars, status) = (
        wrong(env.viewer.chat_url()),
        wrong(env.viewer.avatars_url()),
        wrong(env.viewer.status_url()),
    );

    // Act
    let started = Instant::now();
    let relay = env
        .start_relay(
            "",
            &[
                ("viewer.chat_url", &chat),
                ("viewer.avatars_url", &avatars),
                ("viewer.status_url", &status),
            ],
        )
        .await;
    let stats = relay.stats.clone();
    eventually(PATIENCE, "three refused polls", || async {
        Stats::get(&stats.poll_errors) >= 3
    })
    .await;
    let elapsed = started.elapsed();
    relay.stop().await;

    // Assert: one warning that says what to fix, retries at most once a second, nothing drained.
    let refusals = logs.lines_with("Invalid host");
    assert_eq!(refusals.len(), 1, "warned once: {refusals:#?}");
    assert!(
        refusals[0].contains("WARN")
            && refusals[0].contains("HTTP 400")
            && refusals[0].contains("http://127.0.0.1:9144")
            && refusals[0].contains("viewer.chat_url"),
        "{}",
        refusals[0]
    );
    assert!(
        elapsed >= Duration::from_secs(2),
        "three polls in {elapsed:?}: the relay hammers a viewer that refuses it"
    );
    assert_eq!(env.lg.n_gets(), 0, "no GET reached the chat handler");
    assert_eq!(env.lg.queue_len(), 1, "the viewer still holds the line");
    assert_eq!(env.lg.n_aborted(), 0);
    assert!(env.stored().is_empty());
}

#[tokio::test]
async fn another_client_draining_the_viewer_queue_is_warned_about_once() {
    // Arrange: a client drains the chat queue as ViewChat does, only faster, so it takes the echoes
    // of what the relay says in-world.
    let (logs, _guard) = Logs::capture();
    let env = TestEnv::start().await;
    let dora = cms_user(&env);
    let relay = crate::inworld::start(&env, &[("viewer.poll_interval", "300ms")]).await;
    let stats = relay.stats.clone();
    let other = OtherConsumer::spawn(env.viewer.chat_url());

    // Act: two lines said 2 s apart, so their echoes are judged missing by different polls.
    env.db.add_cms_line(1, dora, "first");
    eventually(PATIENCE, "the first line said", || async {
        env.lg.said().len() == 1
    })
    .await;
    let first_said = Instant::now();
    eventually(PATIENCE, "two seconds", || async {
        first_said.elapsed() > Duration::from_secs(2)
    })
    .await;
    env.db.add_cms_line(1, dora, "second");
    eventually(PATIENCE, "the second line said", || async {
        env.lg.said().len() == 2
    })
    .await;
    let second_said = Instant::now();
    eventually(PATIENCE, "the warning", || async {
        !logs.lines_with("another client").is_empty()
    })
    .await;
    eventually(
        PATIENCE,
        "a poll past the second echo's deadline",
        || async { second_said.elapsed() > ECHO_DEADLINE + Duration::from_millis(500) },
    )
    .await;
    let n_polls = Stats::get(&stats.polls);
    eventually(PATIENCE, "two more polls", || async {
        Stats::get(&stats.polls) >= n_polls + 2
    })
    .await;
    let n_taken = other.stop().await;
    relay.stop().await;

    // Assert
    assert!(n_taken >= 1, "the other client took an echo");
    let warnings = logs.lines_with("another client");
    assert_eq!(warnings.len(), 1, "warned once: {warnings:#?}");
    assert!(
        warnings[0].contains("WARN")
            && warnings[0].contains("ViewChat")
            && warnings[0].contains("Modules.json")
            && warnings[0].contains("/static/ViewChat.html"),
        "{}",
        warnings[0]
    );
    assert_eq!(env.lg.n_aborted(), 0);
}

#[tokio::test]
async fn echoes_that_come_back_raise_no_second_consumer_warning() {
    let (logs, _guard) = Logs::capture();
    let env = TestEnv::start().await;
    let dora = cms_user(&env);
    let relay = crate::inworld::start(&env, &[]).await;

    env.db.add_cms_line(1, dora, "heard by the relay alone");
    eventually(PATIENCE, "the line said", || async {
        env.lg.said().len() == 1
    })
    .await;
    let said_at = Instant::now();
    // Polls after the echo deadline are the ones that would judge the echo missing.
    let stats = relay.stats.clone();
    eventually(PATIENCE, "polls past the echo deadline", || async {
        said_at.elapsed() > ECHO_DEADLINE + Duration::from_millis(300)
            && Stats::get(&stats.polls) > 0
    })
    .await;
    let n_polls = Stats::get(&stats.polls);
    eventually(PATIENCE, "two more polls", || async {
        Stats::get(&stats.polls) >= n_polls + 2
    })
    .await;
    relay.stop().await;

    assert!(
        logs.lines_with("another client").is_empty(),
        "{}",
        logs.text()
    );
    assert!(
        env.stored().iter().all(|c| c.from_cms),
        "the echo was relayed"
    );
}

#[tokio::test]
async fn a_burst_in_one_millisecond_with_ever_longer_keys_arrives_complete_and_in_order() {
    // Arrange: 150 lines the viewer received in the same millisecond: keys T, T1, T11, … up to 166
    // characters, far beyond any integer.
    let env = TestEnv::start().await;
    let at = Utc::now() - chrono::Duration::minutes(5);
    let expected: Vec<String> = (0..150).map(|i| format!("burst line {i}")).collect();
    for text in &expected {
        env.lg
            .push(SimChatLine::avatar("Alice Resident", text).at(at));
    }
    let alice = env.linked_user("Alice Resident", "alice");

    // Act
    let relay = env.start_relay("", &[]).await;
    eventually(PATIENCE, "150 lines stored", || async {
        env.stored().len() >= 150
    })
    .await;
    relay.stop().await;

    // Assert
    let longest_key = env
        .lg
        .handed_out()
        .iter()
        .map(|h| h.key.len())
        .max()
        .unwrap_or(0);
    assert_eq!(longest_key, 17 + 149, "the viewer suffixed the keys");
    let stored = env.stored();
    assert_eq!(
        stored.iter().map(|c| c.message.clone()).collect::<Vec<_>>(),
        expected
    );
    assert!(stored.iter().all(|c| c.user_id == Some(alice)));
}

#[tokio::test]
async fn the_12_hour_clock_around_midnight_and_across_the_date_change_gives_the_right_instants() {
    // Arrange: a viewer zone (no DST) where it is now between 02:00 and 05:00, unlike the CMS's and
    // the machine's; lines from just before midnight (the previous date) to 01:00, all written with
    // `hh`: 11, 12, 12, 01.
    let zone = zone_where_the_hour_is(&[2, 3, 4]);
    let midnight = local_instant(zone, 0);
    let instants = [
        midnight - chrono::Duration::milliseconds(100),
        midnight,
        midnight + chrono::Duration::milliseconds(30 * 60 * 1000 + 500),
        midnight + chrono::Duration::milliseconds(60 * 60 * 1000 + 250),
    ];
    let hours = check_12_hour_clock(zone, &instants).await;

    assert_eq!(hours, ["11", "12", "12", "01"]);
}

#[tokio::test]
async fn the_12_hour_clock_around_noon_gives_the_right_instants_and_keeps_document_order() {
    // 12:59:59.999 is written `…1259…` and 13:00 `…0100…`: sorting the keys would swap them.
    let zone = zone_where_the_hour_is(&[14, 15, 16]);
    let noon = local_instant(zone, 12);
    let instants = [
        noon - chrono::Duration::milliseconds(100),
        noon,
        noon + chrono::Duration::milliseconds(60 * 60 * 1000 - 1),
        noon + chrono::Duration::hours(1),
    ];
    let hours = check_12_hour_clock(zone, &instants).await;

    assert_eq!(hours, ["11", "12", "12", "01"]);
}

#[tokio::test]
async fn a_slow_trickling_viewer_answer_is_read_to_its_end_and_never_aborted() {
    // Arrange: a backlog whose answer comes after 500 ms, then in 1 KiB pieces every 40 ms (about
    // 2 s in all): longer than any total timeout a client might think is generous.
    let env = TestEnv::start().await;
    let expected: Vec<String> = (0..300)
        .map(|i| format!("[Carol Visitor] backlog line {i:03} {}", "x".repeat(40)))
        .collect();
    for i in 0..300 {
        env.lg.say(
            "Carol Visitor",
            &format!("backlog line {i:03} {}", "x".repeat(40)),
        );
    }
    env.lg.set_response_delay(Duration::from_millis(500));
    env.lg.set_trickle(Some((1024, Duration::from_millis(40))));

    // Act
    let relay = env.start_relay("", &[]).await;
    eventually(PATIENCE, "the backlog stored", || async {
        env.stored().len() >= 300
    })
    .await;
    relay.stop().await;

    // Assert
    assert_eq!(env.lg.n_aborted(), 0, "the viewer would have crashed");
    assert_eq!(env.stored_messages(), expected);
}

#[tokio::test]
async fn keekee_works_end_to_end_in_both_directions() {
    // Arrange: KeeKee listens on localhost at /api/LLLP/chat, omits a zero OwnerID (so its system
    // lines carry none) and answers a chat POST with an empty body.
    let env = TestEnv::start_with(SimOptions {
        viewer_dialect: Dialect::Keekee,
        ..SimOptions::standard()
    })
    .await;
    assert!(
        env.viewer.chat_url().contains("//localhost:")
            && env.viewer.chat_url().ends_with("/api/LLLP/chat")
    );
    let alice = env.linked_user("Alice Resident", "alice");
    let dora = cms_user(&env);
    env.lg.say("Alice Resident", "1+1 = 2, 100% sure");
    env.lg
        .push(SimChatLine::system("Alice Resident has entered"));
    env.lg.say("Carol Visitor", "hello %41 + you");
    let relay = crate::inworld::start(&env, &[]).await;

    // Act
    env.db.add_cms_line(1, dora, "a+b=c & 100%");
    eventually(PATIENCE, "the cms line said", || async {
        !env.lg.said().is_empty()
    })
    .await;
    env.lg.say("Alice Resident", "marker after the echo");
    eventually(PATIENCE, "the marker relayed", || async {
        env.stored()
            .iter()
            .any(|c| c.message == "marker after the echo")
    })
    .await;
    let stats = relay.stats.clone();
    relay.stop().await;

    // Assert
    assert_eq!(
        env.relayed_rows(),
        [
            (Some(alice), "1+1 = 2, 100% sure".to_owned()),
            (None, "[Carol Visitor] hello %41 + you".to_owned()),
            (Some(alice), "marker after the echo".to_owned()),
        ]
    );
    let said: Vec<_> = env.lg.said().into_iter().map(|s| s.message).collect();
    assert_eq!(said, ["[Dora Admin] a+b=c & 100%"]);
    assert_eq!(Stats::get(&stats.poll_errors), 0);
    assert_eq!(env.lg.n_aborted(), 0);
}

// ---------------------------------------------------------------------------------------------
// The CMS
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_1000_character_line_arrives_intact_even_beyond_the_batch_byte_limit() {
    // 1000 characters, 2800 bytes of UTF-8, with the `+` and `%` a numeric timestamp would decode.
    let env = TestEnv::start().await;
    let alice = env.linked_user("Alice Resident", "alice");
    let long: String = "é日+%a".chars().cycle().take(1000).collect();
    env.lg.say("Alice Resident", &long);
    env.lg.say("Alice Resident", "short after");

    let relay = env
        .start_relay("", &[("cms.batch_max_bytes", "1024")])
        .await;
    eventually(PATIENCE, "both lines stored", || async {
        env.stored().len() >= 2
    })
    .await;
    relay.stop().await;

    let stored = env.stored();
    assert_eq!(stored[0].message.chars().count(), 1000);
    assert_eq!(stored[0].message, long);
    assert_eq!(stored[0].user_id, Some(alice));
    assert_eq!(stored[1].message, "short after");
    assert_eq!(stored.len(), 2);
}

#[tokio::test]
async fn php_warnings_before_the_json_and_debug_fields_are_read_through_in_both_directions() {
    // Arrange: the example configuration's SERVER_DEBUG with no logs/ directory: every answer starts
    // with a PHP warning, and since output has begun every status is 200 (a refused token too).
    let env = TestEnv::start_with(SimOptions {
        debug_noise: true,
        ..SimOptions::standard()
    })
    .await;
    let alice = env.linked_user("Alice Resident", "alice");
    let dora = cms_user(&env);
    env.lg.say("Alice Resident", "through the noise");
    env.lg.say("Carol Visitor", "me too");
    let relay = crate::inworld::start(&env, &[]).await;
    eventually(PATIENCE, "two lines stored", || async {
        env.stored().iter().filter(|c| !c.from_cms).count() == 2
    })
    .await;

    // Act: the token expires; the refusal arrives as 200 with noise before its JSON.
    env.db.expire_tokens();
    env.db.add_cms_line(1, dora, "typed in the noisy cms");
    env.lg.say("Alice Resident", "after the expiry");
    eventually(
        PATIENCE,
        "the third line stored and the cms line said",
        || async {
            env.stored().iter().filter(|c| !c.from_cms).count() == 3 && env.lg.said().len() == 1
        },
    )
    .await;
    let dead = relay.outbox.dead_len();
    relay.stop().await;

    // Assert
    assert_eq!(
        env.relayed_rows(),
        [
            (Some(alice), "through the noise".to_owned()),
            (None, "[Carol Visitor] me too".to_owned()),
            (Some(alice), "after the expiry".to_owned()),
        ]
    );
    assert_eq!(
        env.lg.said()[0].message,
        "[Dora Admin] typed in the noisy cms"
    );
    assert_eq!(dead, 0);
    assert_eq!(env.db.n_logins(), 2);
}

#[tokio::test]
async fn an_html_answer_with_status_200_is_read_back_before_anything_is_resent() {
    // Arrange: the first POST gets an HTML page with status 200 and stores nothing; the next one
    // stores its line and then answers with such a page too (a PHP fatal error after the insert).
    let env = TestEnv::start().await;
    env.db.fault_next(1, Fault::Status(200));
    env.db.fault_next(1, Fault::StatusAfterStore(200));
    env.lg.say("Alice Resident", "one");
    env.lg.say("Alice Resident", "two");

    // Act
    let relay = env.start_relay("", &[]).await;
    eventually(PATIENCE, "the outbox empty", || async {
        env.stored().len() >= 2 && relay.outbox.is_empty()
    })
    .await;
    let dead = relay.outbox.dead_len();
    relay.stop().await;

    // Assert: each line once, none given up.
    assert_eq!(
        env.stored_messages(),
        ["[Alice Resident] one", "[Alice Resident] two"]
    );
    assert_eq!(dead, 0);
    assert!(env.db.n_chat_posts() >= 3);
}

#[tokio::test]
async fn success_false_for_a_batch_whose_earlier_rows_were_stored_duplicates_nothing() {
    // The last row's insert fails: {"success":false,"id":0} with HTTP 200, the rows before it stored.
    let env = TestEnv::start().await;
    env.db.fault_next(1, Fault::FailLastElement);
    for text in ["a", "b", "c"] {
        env.lg.say("Alice Resident", text);
    }

    let relay = env.start_relay("", &[]).await;
    eventually(PATIENCE, "the outbox empty", || async {
        env.stored().len() >= 3 && relay.outbox.is_empty()
    })
    .await;
    let dead = relay.outbox.dead_len();
    relay.stop().await;

    assert_eq!(
        env.stored_messages(),
        [
            "[Alice Resident] a",
            "[Alice Resident] b",
            "[Alice Resident] c"
        ]
    );
    assert_eq!(dead, 0);
}

#[tokio::test]
async fn a_refused_login_names_the_cms_reason_whether_it_comes_with_200_or_400() {
    for dialect in [CmsDialect::Stock, CmsDialect::Documented] {
        let (logs, _guard) = Logs::capture();
        let env = TestEnv::start_with(SimOptions {
            cms_dialect: dialect,
            ..SimOptions::standard()
        })
        .await;
        env.lg
            .say("Alice Resident", "kept until the password is fixed");

        let relay = env
            .start_relay("", &[("cms.password", "not-the-password")])
            .await;
        eventually(PATIENCE, "the refusal logged", || async {
            !logs.lines_with("cms login failed").is_empty()
        })
        .await;
        eventually(PATIENCE, "the line kept in the outbox", || async {
            relay.outbox.len() == 1
        })
        .await;
        relay.stop().await;

        let refusals = logs.lines_with("cms login failed");
        assert!(
            refusals[0].contains("Invalid username/password combination used"),
            "{dialect:?}: {}",
            refusals[0]
        );
        assert!(env.stored().is_empty());
    }
}

#[tokio::test]
async fn every_cms_request_comes_from_one_address_across_logins() {
    // Tokens are bound to the address they were issued to: a relay whose source address changed
    // would log in and be refused forever.
    let env = TestEnv::start().await;
    let relay = env.start_relay("", &[]).await;
    for (i, text) in ["one", "two", "three"].into_iter().enumerate() {
        if i > 0 {
            env.db.expire_tokens();
        }
        env.lg.say("Alice Resident", text);
        eventually(PATIENCE, "the line stored", || async {
            env.stored().len() == i + 1
        })
        .await;
    }
    relay.stop().await;

    let requests = env.db.requests();
    let addresses: std::collections::HashSet<_> = requests.iter().map(|r| r.peer.ip()).collect();
    assert_eq!(addresses.len(), 1, "{addresses:?}");
    assert_eq!(env.db.n_logins(), 3);
    let n_logins = requests
        .iter()
        .filter(|r| r.path.contains("/auth/"))
        .count();
    assert_eq!(n_logins, 3, "no login was refused and retried");
}

#[tokio::test]
async fn the_documented_cms_dialect_works_with_anonymous_user_id_0() {
    // Arrange: the CMS as its API docs describe it (anonymous 0, errors with 400). The first batch is
    // stored but its answer lost (a proxy's 502), so the relay must recognise its anonymous rows,
    // which come back as user -1, in the read-back. The ghost's row fails the foreign key.
    let env = TestEnv::start_with(SimOptions {
        cms_dialect: CmsDialect::Documented,
        ..SimOptions::standard()
    })
    .await;
    let alice = env.linked_user("Alice Resident", "alice");
    env.db.fault_next(1, Fault::StatusAfterStore(502));
    env.lg.say("Alice Resident", "mapped");
    env.lg.say(GHOST, "no such user");
    env.lg.say("Carol Visitor", "anonymous");

    // Act
    let relay = env
        .start_relay_with_a_ghost(&[("cms.anonymous_user_id", "0")])
        .await;
    eventually(PATIENCE, "the outbox settled", || async {
        relay.outbox.is_empty() && relay.outbox.dead_len() == 1
    })
    .await;
    let dead = relay.outbox.dead_letters().expect("dead letters");
    relay.stop().await;

    // Assert
    let stored: Vec<_> = env
        .stored()
        .into_iter()
        .map(|c| (c.user_id, c.message))
        .collect();
    assert_eq!(
        stored,
        [
            (Some(alice), "mapped".to_owned()),
            (None, "[Carol Visitor] anonymous".to_owned()),
        ]
    );
    assert_eq!(dead[0].pending.line.message, "no such user");
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A CMS user who types in the CMS.
fn cms_user(env: &TestEnv) -> i64 {
    env.db
        .add_user("dora", "pw", "Dora", "Admin", Permissions::all())
}

/// The relay's log lines, captured on this thread (a `#[tokio::test]` runs the relay's tasks on the
/// test's own thread).
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log lock")).into_owned()
    }

    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|line| line.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Another client of the viewer's chat GET, as the ViewChat window is (every 1.5 s), only faster.
struct OtherConsumer {
    stop: CancellationToken,
    task: JoinHandle<u64>,
}

impl OtherConsumer {
    fn spawn(chat_url: String) -> OtherConsumer {
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client");
            let mut n_taken = 0;
            while !stopped.is_cancelled() {
                // Each answer is read to its end: abandoning one would crash the viewer.
                if let Ok(response) = http.get(&chat_url).send().await {
                    if response.text().await.is_ok_and(|body| body != "{}") {
                        n_taken += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            n_taken
        });
        OtherConsumer { stop, task }
    }

    /// Stops after the request in flight; how many non-empty answers it took.
    async fn stop(self) -> u64 {
        self.stop.cancel();
        self.task.await.expect("other consumer joins")
    }
}

/// An `Etc/GMT…` zone (whole hours, no DST) in which the local hour now is one of `hours`, with an
/// offset that is neither the machine's nor the CMS's at this moment (so a relay reading the
/// viewer's `Time` in the wrong zone is caught).
fn zone_where_the_hour_is(hours: &[u32]) -> Tz {
    let now = Utc::now();
    let machine = chrono::Local
        .offset_from_utc_datetime(&now.naive_utc())
        .fix()
        .local_minus_utc();
    let cms_zone: Tz = CMS_ZONE.parse().expect("zone");
    let cms = cms_zone
        .offset_from_utc_datetime(&now.naive_utc())
        .fix()
        .local_minus_utc();
    for &hour in hours {
        let mut offset = (hour as i32 - now.hour() as i32).rem_euclid(24);
        if offset > 12 {
            offset -= 24;
        }
        if offset * 3600 == machine || offset * 3600 == cms {
            continue;
        }
        // POSIX sign: Etc/GMT-3 is three hours ahead of UTC.
        let name = match offset {
            0 => "Etc/GMT".to_owned(),
            o if o > 0 => format!("Etc/GMT-{o}"),
            o => format!("Etc/GMT+{}", -o),
        };
        return name.parse().expect("an Etc zone");
    }
    panic!("three candidate hours cannot all collide with two offsets");
}

/// Today's `hour`:00:00.000 in `zone`, as an instant.
fn local_instant(zone: Tz, hour: u32) -> DateTime<Utc> {
    let today = Utc::now().with_timezone(&zone).date_naive();
    zone.from_local_datetime(&today.and_hms_opt(hour, 0, 0).expect("valid hour"))
        .single()
        .expect("Etc zones have no gaps")
        .with_timezone(&Utc)
}

/// Has a viewer in `zone` hand out one line per instant, relays them, and checks each arrives in
/// order with its instant as CMS (Amsterdam) wall-clock time. Returns the `hh` the viewer wrote.
async fn check_12_hour_clock(zone: Tz, instants: &[DateTime<Utc>]) -> Vec<String> {
    let env = TestEnv::start_with(SimOptions {
        viewer_zone: zone.name().to_owned(),
        ..SimOptions::standard()
    })
    .await;
    let alice = env.linked_user("Alice Resident", "alice");
    for (i, at) in instants.iter().enumerate() {
        env.lg
            .push(SimChatLine::avatar("Alice Resident", &format!("line {i}")).at(*at));
    }

    let relay = env.start_relay("", &[]).await;
    eventually(PATIENCE, "every line stored", || async {
        env.stored().len() >= instants.len()
    })
    .await;
    relay.stop().await;

    let cms_zone: Tz = CMS_ZONE.parse().expect("zone");
    let expected: Vec<(Option<i64>, String, String)> = instants
        .iter()
        .enumerate()
        .map(|(i, at)| {
            (
                Some(alice),
                format!("line {i}"),
                at.with_timezone(&cms_zone)
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string(),
            )
        })
        .collect();
    let stored: Vec<_> = env
        .stored()
        .into_iter()
        .map(|c| (c.user_id, c.message, c.timestamp))
        .collect();
    assert_eq!(stored, expected, "viewer zone {}", zone.name());
    env.lg
        .handed_out()
        .iter()
        .map(|h| h.time[8..10].to_owned())
        .collect()
}
