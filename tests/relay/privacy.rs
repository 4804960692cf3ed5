//! Opting out of recording in-world, the operator's `privacy` subcommand, and the notice that chat is
//! recorded.

use std::process::Stdio;

use opensim_chat_relay::filter::FilterReason;
use opensim_chat_relay::metrics::{Gauges, RegionStats, render_prometheus};
use opensim_chat_relay::sim::cms::Fault;
use opensim_chat_relay::sim::lookingglass::SimChatLine;

use crate::admin::admin_cli;
use crate::helpers::{OWN_NAME, PATIENCE, RunningRelay, TestEnv, eventually};

/// The confirmation of `!nolog` for Alice, as `privacy.confirm_format` says it by default.
const ALICE_OPTED_OUT: &str = "Alice Resident: your local chat is now not recorded by the chat relay (say !nolog to stop, !log to resume)";

/// What the relay said in-world, in order.
fn said(env: &TestEnv) -> Vec<String> {
    env.lg.said().into_iter().map(|s| s.message).collect()
}

/// The messages the relay stored in the CMS, oldest first.
fn relayed(env: &TestEnv) -> Vec<String> {
    env.relayed_rows().into_iter().map(|(_, m)| m).collect()
}

/// Waits until `text` was relayed.
async fn relayed_eventually(env: &TestEnv, text: &str) {
    eventually(PATIENCE, &format!("{text:?} relayed"), || async {
        relayed(env).iter().any(|m| m == text)
    })
    .await;
}

/// Waits until the relay has stored `n` opt-outs (in its outbox).
async fn opt_outs_reach(relay: &RunningRelay, n: usize) {
    eventually(PATIENCE, &format!("{n} opt-outs stored"), || async {
        relay.privacy.stored().is_ok_and(|o| o.len() == n)
    })
    .await;
}

/// Waits until the echo of everything the relay said came back from the viewer (and was dropped),
/// so that a line said afterwards shows whether an echo reached the CMS.
async fn echoes_handed_out(env: &TestEnv) {
    eventually(PATIENCE, "the echoes of what the relay said", || async {
        let echoes = env
            .lg
            .handed_out()
            .into_iter()
            .filter(|h| h.from.as_deref() == Some(OWN_NAME))
            .count();
        echoes >= env.lg.said().len()
    })
    .await;
}

#[tokio::test]
async fn a_speaker_who_opts_out_is_not_relayed_and_the_command_never_reaches_the_cms() {
    // Arrange
    let env = TestEnv::start().await;
    let relay = env.start_relay("", &[]).await;
    env.lg.say("Alice Resident", "before opting out");
    relayed_eventually(&env, "[Alice Resident] before opting out").await;

    // Act
    env.lg.say("Alice Resident", "  !NoLog ");
    env.lg.say("Alice Resident", "a secret");
    eventually(PATIENCE, "the confirmation said", || async {
        !env.lg.said().is_empty()
    })
    .await;
    echoes_handed_out(&env).await;
    env.lg.say("Bob Builder", "marker");
    relayed_eventually(&env, "[Bob Builder] marker").await;
    relay.stop().await;

    // Assert: neither the command, nor what followed, nor the confirmation's echo was relayed.
    assert_eq!(
        relayed(&env),
        ["[Alice Resident] before opting out", "[Bob Builder] marker"]
    );
    assert_eq!(said(&env), [ALICE_OPTED_OUT]);
    let confirmation = &env.lg.said()[0];
    assert_eq!(
        (confirmation.channel, confirmation.chat_type.as_str()),
        (0, "Normal")
    );
}

#[tokio::test]
async fn an_opt_out_is_remembered_across_a_restart_until_the_speaker_opts_in() {
    let env = TestEnv::start().await;
    let first = env.start_relay("", &[]).await;
    env.lg.say("Alice Resident", "!nolog");
    opt_outs_reach(&first, 1).await;
    first.stop().await;

    let second = env.start_relay("", &[]).await;
    env.lg
        .say("Alice Resident", "still private after the restart");
    env.lg.say("Bob Builder", "marker");
    relayed_eventually(&env, "[Bob Builder] marker").await;
    env.lg.say("Alice Resident", "!log");
    env.lg.say("Alice Resident", "public again");
    relayed_eventually(&env, "[Alice Resident] public again").await;
    second.stop().await;

    assert_eq!(
        relayed(&env),
        ["[Bob Builder] marker", "[Alice Resident] public again"]
    );
    assert_eq!(
        said(&env).last().map(String::as_str),
        Some(
            "Alice Resident: your local chat is now recorded by the chat relay (say !nolog to stop, !log to resume)"
        )
    );
}

#[tokio::test]
async fn lines_waiting_in_the_outbox_when_the_speaker_opts_out_are_dropped_and_counted() {
    // Arrange: the CMS is down, three lines wait (one batch of them in flight).
    let env = TestEnv::start().await;
    env.db.set_offline(true);
    let relay = env.start_relay("", &[]).await;
    env.lg.say("Alice Resident", "waiting one");
    env.lg.say("Bob Builder", "bob waiting");
    env.lg.say("Alice Resident", "waiting two");
    eventually(PATIENCE, "three lines waiting", || async {
        relay.outbox.len() == 3
    })
    .await;

    // Act
    env.lg.say("Alice Resident", "!nolog");
    eventually(PATIENCE, "Alice's waiting lines dropped", || async {
        relay.outbox.len() == 1
    })
    .await;
    env.db.set_offline(false);
    env.lg.say("Bob Builder", "marker");
    relayed_eventually(&env, "[Bob Builder] marker").await;
    let stats = relay.stats.clone();
    relay.stop().await;

    // Assert: what the CMS got, and what /metrics shows.
    assert_eq!(
        relayed(&env),
        ["[Bob Builder] bob waiting", "[Bob Builder] marker"]
    );
    assert_eq!(stats.n_filtered(FilterReason::OptedOut), 2);
    let metrics = render_prometheus(
        &stats,
        &[RegionStats {
            name: "",
            stats: &stats,
        }],
        &Gauges::default(),
    );
    for sample in [
        "opensim_chat_relay_lines_filtered_total{reason=\"opted_out\"} 2\n",
        "opensim_chat_relay_lines_filtered_total{reason=\"privacy_command\"} 1\n",
    ] {
        assert!(metrics.contains(sample), "{sample} in {metrics}");
    }
}

#[tokio::test]
async fn lines_said_before_the_command_in_the_same_answer_are_not_relayed_either() {
    // The viewer queued everything while the relay was down: one answer holds it all.
    let env = TestEnv::start().await;
    env.lg.say("Alice Resident", "said before the command");
    env.lg.say("Bob Builder", "bob's line");
    env.lg.say("Alice Resident", "!nolog");
    env.lg.say("Alice Resident", "said while opted out");
    env.lg.say("Alice Resident", "!log");
    env.lg.say("Alice Resident", "said after opting in");

    let relay = env.start_relay("", &[]).await;
    relayed_eventually(&env, "[Alice Resident] said after opting in").await;
    relay.stop().await;

    assert_eq!(
        relayed(&env),
        [
            "[Bob Builder] bob's line",
            "[Alice Resident] said after opting in"
        ]
    );
}

#[tokio::test]
async fn a_line_in_flight_when_its_speaker_opts_out_is_not_sent_again_and_its_neighbour_arrives_once()
 {
    // Arrange: Alice's and Bob's lines go out in one POST, which the CMS never answers.
    let env = TestEnv::start().await;
    env.db.fault_next(1, Fault::Hang);
    env.lg.say("Alice Resident", "in flight");
    env.lg.say("Bob Builder", "neighbour");
    let relay = env.start_relay("", &[("cms.request_timeout", "1s")]).await;
    eventually(PATIENCE, "the batch posted", || async {
        env.db.n_chat_posts() >= 1
    })
    .await;

    // Act: Alice opts out while the POST hangs.
    env.lg.say("Alice Resident", "!nolog");
    opt_outs_reach(&relay, 1).await;
    relayed_eventually(&env, "[Bob Builder] neighbour").await;
    env.lg.say("Bob Builder", "marker");
    relayed_eventually(&env, "[Bob Builder] marker").await;
    relay.stop().await;

    // Assert
    assert_eq!(
        relayed(&env),
        ["[Bob Builder] neighbour", "[Bob Builder] marker"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opt_out_confirmed_before_a_sigkill_holds_after_it_and_the_lines_it_dropped_never_arrive()
 {
    // Arrange: the CMS is down, so Alice's and Bob's lines wait in a relay process's outbox.
    let env = TestEnv::start().await;
    env.db.set_offline(true);
    env.lg.say("Alice Resident", "alice waiting");
    env.lg.say("Bob Builder", "bob waiting");
    let mut child = env.spawn_relay_process(&[("http.listen", "")], Stdio::null());
    env.viewer_drained(PATIENCE).await;

    // Act: Alice opts out; once the relay confirms it in-world (said after the opt-out and the
    // drop of her waiting line are flushed), the process is killed, then started again.
    env.lg.say("Alice Resident", "!nolog");
    eventually(PATIENCE, "the opt-out confirmed", || async {
        said(&env).iter().any(|s| s == ALICE_OPTED_OUT)
    })
    .await;
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    env.db.set_offline(false);
    let relay = env.start_relay("", &[]).await;
    env.lg.say("Alice Resident", "alice after the restart");
    env.lg.say("Bob Builder", "marker");
    relayed_eventually(&env, "[Bob Builder] marker").await;
    let n_opt_outs = relay.privacy.stored().expect("opt-outs").len();
    relay.stop().await;

    // Assert
    assert_eq!(n_opt_outs, 1);
    assert_eq!(
        relayed(&env),
        ["[Bob Builder] bob waiting", "[Bob Builder] marker"]
    );
}

#[tokio::test]
async fn the_operator_lists_adds_and_removes_opt_outs_while_the_relay_is_stopped() {
    // Arrange: Alice opted out in-world; Carol has a line waiting (the CMS is down).
    let env = TestEnv::start().await;
    env.db.set_offline(true);
    let relay = env.start_relay("", &[]).await;
    env.lg.say("Alice Resident", "!nolog");
    env.lg.say("Carol Visitor", "carol waiting");
    opt_outs_reach(&relay, 1).await;
    eventually(PATIENCE, "Carol's line waiting", || async {
        relay.outbox.len() == 1
    })
    .await;
    let (code, _, stderr) = admin_cli(&env, "privacy", &["list"]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("in use by another process"), "{stderr}");
    relay.stop().await;

    // Act and assert
    let (code, stdout, stderr) = admin_cli(&env, "privacy", &["list"]);
    assert_eq!(code, Some(0), "{stderr}");
    let alice_uuid = env.lg.avatar_uuid("Alice Resident");
    assert!(
        stdout.contains("Alice Resident") && stdout.contains(&alice_uuid),
        "{stdout}"
    );
    assert!(stdout.contains("1 opted out"), "{stdout}");
    let (code, stdout, _) = admin_cli(&env, "privacy", &["add", "Carol", "Visitor"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("1 waiting lines dropped"), "{stdout}");
    let (code, stdout, _) = admin_cli(&env, "privacy", &["remove", "alice resident"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("opted in again"), "{stdout}");
    let (_, stdout, _) = admin_cli(&env, "privacy", &["list"]);
    assert!(
        stdout.contains("Carol Visitor")
            && !stdout.contains("Alice")
            && stdout.contains("1 opted out"),
        "{stdout}"
    );

    // The next start follows the list.
    env.db.set_offline(false);
    let relay = env.start_relay("", &[]).await;
    env.lg.say("Carol Visitor", "carol after the start");
    env.lg.say("Alice Resident", "alice after the start");
    relayed_eventually(&env, "[Alice Resident] alice after the start").await;
    relay.stop().await;
    assert_eq!(relayed(&env), ["[Alice Resident] alice after the start"]);
}

/// A notice with the opt-out command in it.
const NOTICE: &str = "Chat here is copied to the CMS. Say {optout} to opt out.";
const NOTICE_SAID: &str = "Chat here is copied to the CMS. Say !nolog to opt out.";

#[tokio::test]
async fn the_notice_is_said_at_start_and_every_interval_and_never_relayed_back() {
    for status_url in ["keep", ""] {
        // With the viewer's status its own name drops the echo; without, the echo memory does.
        let env = TestEnv::start().await;
        let mut overrides = vec![
            ("privacy.notice", NOTICE),
            ("privacy.notice_interval", "300ms"),
        ];
        if status_url.is_empty() {
            overrides.push(("viewer.status_url", ""));
        }
        let relay = env.start_relay("", &overrides).await;
        eventually(PATIENCE, "the notice said twice", || async {
            env.lg.said().len() >= 2
        })
        .await;
        echoes_handed_out(&env).await;
        env.lg.say("Bob Builder", "marker");
        relayed_eventually(&env, "[Bob Builder] marker").await;
        relay.stop().await;

        assert_eq!(relayed(&env), ["[Bob Builder] marker"], "{status_url:?}");
        let said = said(&env);
        assert!(said.iter().all(|s| s == NOTICE_SAID), "{said:?}");
    }
}

#[tokio::test]
async fn an_arriving_avatar_hears_the_notice_once() {
    let env = TestEnv::start().await;
    env.lg.add_avatar("Alice Resident");
    let relay = env
        .start_relay(
            "",
            &[
                ("privacy.notice", NOTICE),
                ("privacy.notice_interval", "0s"),
                ("privacy.greet", "true"),
            ],
        )
        .await;
    eventually(PATIENCE, "the notice said at start", || async {
        env.lg.said().len() == 1
    })
    .await;

    env.lg.add_avatar("Dave Arrival");
    eventually(PATIENCE, "Dave greeted", || async {
        env.lg.said().len() == 2
    })
    .await;
    env.lg.add_avatar("Eve Arrival");
    eventually(PATIENCE, "Eve greeted", || async {
        env.lg.said().len() == 3
    })
    .await;
    relay.stop().await;

    // Dave, still there when Eve came, was not greeted again; nobody else was.
    assert_eq!(said(&env), [NOTICE_SAID; 3]);
}

#[tokio::test]
async fn an_object_named_like_an_avatar_and_owned_by_it_is_stored_anonymously_as_an_object() {
    // Arrange: Alice is linked to a CMS account through her avatar UUID and through `mapping.users`;
    // her own object names itself "Alice Resident", so its OwnerID is her UUID too.
    let env = TestEnv::start().await;
    let alice = env.linked_user("Alice Resident", "alice");
    let mut object = SimChatLine::object("Alice Resident", "I speak for Alice");
    object.owner_id = env.lg.avatar_uuid("Alice Resident");
    let relay = env
        .start_relay(
            &format!("[filter]\nobjects = true\n[mapping.users]\n\"Alice Resident\" = {alice}\n"),
            &[],
        )
        .await;

    // Act
    env.lg.push(object);
    env.lg.say("Alice Resident", "the real Alice");
    relayed_eventually(&env, "the real Alice").await;
    relay.stop().await;

    // Assert: the object's line is anonymous and marked, the avatar's is Alice's.
    assert_eq!(
        env.relayed_rows(),
        [
            (
                None,
                "[Alice Resident (object)] I speak for Alice".to_owned()
            ),
            (Some(alice), "the real Alice".to_owned()),
        ]
    );
}

#[tokio::test]
async fn a_shouted_or_whispered_opt_out_counts_whatever_filter_types_says() {
    // Arrange: only normal chat is relayed.
    let env = TestEnv::start().await;
    let relay = env
        .start_relay("[filter]\ntypes = [\"Normal\"]\n", &[])
        .await;
    let mut shout = SimChatLine::avatar("Alice Resident", "!nolog");
    shout.chat_type = "Shout".into();
    let mut whisper = SimChatLine::avatar("Bob Builder", "!NOLOG");
    whisper.chat_type = "Whisper".into();

    // Act
    env.lg.add_avatar("Alice Resident");
    env.lg.add_avatar("Bob Builder");
    env.lg.push(shout);
    env.lg.push(whisper);
    opt_outs_reach(&relay, 2).await;
    env.lg.say("Alice Resident", "private now");
    env.lg.say("Bob Builder", "private too");
    env.lg.say("Carol Tester", "marker");
    relayed_eventually(&env, "[Carol Tester] marker").await;
    relay.stop().await;

    // Assert
    assert_eq!(relayed(&env), ["[Carol Tester] marker"]);
}

#[tokio::test]
async fn an_object_saying_the_opt_in_command_does_not_undo_an_avatars_opt_out() {
    // Arrange: objects are relayed; Alice opted out; her own object names itself after her.
    let env = TestEnv::start().await;
    let relay = env.start_relay("[filter]\nobjects = true\n", &[]).await;
    env.lg.say("Alice Resident", "!nolog");
    opt_outs_reach(&relay, 1).await;
    let mut object = SimChatLine::object("Alice Resident", "!log");
    object.owner_id = env.lg.avatar_uuid("Alice Resident");

    // Act
    env.lg.push(object);
    env.lg.say("Alice Resident", "still private");
    env.lg.say("Bob Builder", "marker");
    relayed_eventually(&env, "[Bob Builder] marker").await;
    let n_opt_outs = relay.privacy.stored().expect("opt-outs").len();
    relay.stop().await;

    // Assert: the opt-out stands; the object's line is its own chat, not a command.
    assert_eq!(n_opt_outs, 1);
    assert!(
        !relayed(&env).iter().any(|m| m.contains("still private")),
        "{:?}",
        relayed(&env)
    );
}

/// Every directory and file under `dir` (itself included), with its permission bits.
fn modes_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut found = Vec::new();
    let mut to_visit = vec![dir.to_owned()];
    while let Some(path) = to_visit.pop() {
        let meta = std::fs::metadata(&path).expect("metadata");
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).expect("read_dir") {
                to_visit.push(entry.expect("entry").path());
            }
        }
        found.push((path, meta.permissions().mode() & 0o777));
    }
    found
}

#[tokio::test]
async fn the_outbox_is_readable_by_the_relays_user_only_whatever_the_umask() {
    // Arrange: the relay run by hand, under the usual umask 022.
    let env = TestEnv::start().await;
    let mut command = env.relay_command(
        &["sh", "-c", "umask 022; exec \"$0\" \"$@\""],
        &[("inworld.enabled", "false"), ("http.listen", "")],
    );
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let child = command.spawn().expect("relay starts");

    // Act: chat and an opt-out are stored.
    env.lg.say("Alice Resident", "!nolog");
    env.lg.say("Bob Builder", "hello");
    relayed_eventually(&env, "[Bob Builder] hello").await;
    crate::helpers::sigterm(child);

    // Assert
    let outbox = env.dir.path().join("outbox");
    let modes = modes_under(&outbox);
    assert!(modes.len() > 2, "{modes:?}");
    for (path, mode) in modes {
        let expected = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, expected, "{} is {mode:o}", path.display());
    }
}

/// One viewer chat entry, the `n`th millisecond of a moment, said by `from` with `owner` as its UUID.
fn viewer_entry(n: u32, from: &str, owner: &str, message: &str) -> String {
    format!(
        r#""20261122014005{n:03}":{{"Time":"20261122014005{n:03}","From":"{from}","Message":"{message}","Type":"Normal","EntryType":"ChatTypeNormal","Position":"<1, 2, 3>","OwnerID":"{owner}"}}"#
    )
}

/// Every byte of every file under `dir`.
fn all_bytes_under(dir: &std::path::Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    for (path, _) in modes_under(dir) {
        if path.is_file() {
            bytes.extend(std::fs::read(&path).expect("read"));
        }
    }
    bytes
}

#[tokio::test]
async fn an_unreadable_viewer_answer_leaves_nothing_on_disk_that_the_filters_removed() {
    // Arrange: Carol opted out; the operator ignores a bot and redacts e-mail addresses. The viewer
    // then answers a body that breaks off after lines of all three.
    let env = TestEnv::start().await;
    const CAROL: &str = "cccccccc-0000-4000-8000-000000000003";
    const BOT: &str = "dddddddd-0000-4000-8000-000000000004";
    const ALICE: &str = "aaaaaaaa-0000-4000-8000-000000000001";
    let bodies = vec![
        format!("{{{}}}", viewer_entry(1, "Carol Tester", CAROL, "!nolog")).into_bytes(),
        format!(
            "{{{},{},{},\"20261122014005009\":{{\"Fr",
            viewer_entry(2, "Carol Tester", CAROL, "carol-private-words"),
            viewer_entry(3, "Greeter Bot", BOT, "ignored-bot-words"),
            viewer_entry(4, "Alice Resident", ALICE, "write to alice.r@example.org"),
        )
        .into_bytes(),
        format!("{{{}}}", viewer_entry(5, "Bob Builder", ALICE, "marker")).into_bytes(),
    ];
    let filters = r#"
[filter]
ignore_speakers = ["Greeter Bot"]
redact = [{ pattern = '[\w.+-]+@[\w-]+(\.[\w-]+)+', replacement = '[e-mail]' }]
# The scripted viewer answers a POST with the next body too: the relay says nothing.
[privacy]
confirm_format = ""
notice = ""
"#;

    // Act
    let (relay, stop) = env
        .start_relay_on_scripted_viewer_with(filters, bodies, &[])
        .await;
    relayed_eventually(&env, "[Bob Builder] marker").await;
    let n_quarantined = relay.outbox.quarantine_len();
    relay.stop().await;
    stop.cancel();

    // Assert: the answer is on record for an operator, but none of what the filters removed is on
    // disk, not even in the quarantine.
    assert_eq!(n_quarantined, 1);
    assert!(relayed(&env).contains(&"[Alice Resident] write to [e-mail]".to_owned()));
    let on_disk =
        String::from_utf8_lossy(&all_bytes_under(&env.dir.path().join("outbox"))).into_owned();
    for removed in [
        "carol-private-words",
        "ignored-bot-words",
        "alice.r@example.org",
    ] {
        assert!(
            !on_disk.contains(removed),
            "{removed:?} is in the outbox files"
        );
    }
}
