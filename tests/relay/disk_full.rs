//! A write error (disk full) pauses polling and resumes when writing works again, without a restart
//! and without losing or duplicating a line in either direction.
//!
//! Provoked without root: the relay runs as a child process and the test lowers its file size limit
//! (RLIMIT_FSIZE, soft) to 0 with `prlimit`, so every write to the outbox fails with EFBIG as it would
//! with ENOSPC on a full disk; then it lifts the limit. The relay catches SIGXFSZ, so the limit is a
//! write error and not a kill.
//!
//! `disk_fills_at_random_moments_lose_and_duplicate_nothing` fills the disk `RELAY_DISK_FULL_CYCLES`
//! times (default 3) while avatars chat; the long run of docs/RELIABILITY.md:
//! `RELAY_DISK_FULL_CYCLES=30 cargo test --test relay disk_fills -- --nocapture`.
//!
//! Also here: a relay whose log cannot be written (its reader gone, or a redirected log on the full
//! disk) loses the log lines and nothing else.

use std::collections::HashSet;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opensim_chat_relay::sim::lookingglass::spawn_chatter;
use tokio_util::sync::CancellationToken;

use opensim_chat_relay::sim::cms::{Fault, Permissions};

use crate::helpers::{
    PATIENCE, TestEnv, collect_stderr, cycles, eventually, health_port, metric, metrics, readyz,
    set_file_size_limit, sigterm, until_done_or_stalled,
};

const SPEAKER: &str = "Alice Resident";

/// Starts the relay binary; its log (stderr, JSON) is collected, or with `capture_log` false its
/// reader is closed at once so that every log write fails. The CMS → in-world direction is fast.
fn start_relay_process(env: &TestEnv, capture_log: bool) -> (Child, Arc<Mutex<String>>) {
    let mut child = env.spawn_relay_process(
        &[
            ("inworld.poll_interval", "50ms"),
            ("inworld.max_lines_per_second", "100"),
            ("log.format", "json"),
        ],
        Stdio::piped(),
    );
    if !capture_log {
        drop(child.stderr.take());
        return (child, Arc::default());
    }
    let log = collect_stderr(&mut child);
    (child, log)
}

/// Waits until `/readyz` says the outbox check holds again.
pub async fn outbox_ready_again(port: u16) {
    eventually(PATIENCE, "the outbox ready again", || async {
        readyz(port)
            .await
            .is_some_and(|body| body["checks"]["outbox"]["ok"] == true)
    })
    .await;
}

/// Waits until the viewer handed out everything and the CMS stored as many rows (or storing
/// stalls for 30 s, when the relay's last log lines are printed): a fault run's catch-up, judged
/// by the oracle afterwards.
pub async fn catch_up(env: &TestEnv, log: &Mutex<String>) {
    env.viewer_drained(Duration::from_secs(60)).await;
    let handed = env.lg.handed_out().len();
    let all_stored = until_done_or_stalled(Duration::from_secs(30), || {
        let n_stored = env.stored().len();
        (n_stored >= handed, n_stored)
    })
    .await;
    if !all_stored {
        let log = log.lock().expect("log");
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!("relay log, last lines (newest first):\n{}", tail.join("\n"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_error_pauses_polling_and_writing_resumes_without_a_restart() {
    let env = TestEnv::start().await;
    let dora = env
        .db
        .add_user("dora", "pw", "Dora", "Admin", Permissions::all());
    let (mut relay, log) = start_relay_process(&env, true);
    let port = health_port(&log).await;
    let pid = relay.id();
    let say = |range: std::ops::Range<u32>| {
        for n in range {
            env.lg.say(SPEAKER, &format!("line {n}"));
        }
    };
    // Rows the relay stored (the CMS also holds the lines typed in it).
    let relayed = || -> Vec<String> {
        env.stored()
            .into_iter()
            .filter(|c| c.user_id != Some(dora))
            .map(|c| c.message)
            .collect()
    };
    let n_stored = || relayed().len();

    // Lines flow both ways while the disk has room (the in-world reader has made its first read,
    // which starts it from now, when it reads a second time).
    say(0..5);
    eventually(PATIENCE, "the first lines delivered", || async {
        n_stored() == 5
    })
    .await;
    eventually(PATIENCE, "two in-world reads", || async {
        env.db
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.contains("/chats/"))
            .count()
            >= 2
    })
    .await;
    env.db.add_cms_line(1, dora, "cms 0");
    eventually(PATIENCE, "the first cms line said", || async {
        !env.lg.said().is_empty()
    })
    .await;

    // The disk is full: the next lines read cannot be stored.
    set_file_size_limit(pid, "0");
    // Usually the first write to fail is the in-world cursor, right after its line was said (the
    // line must not be said again after the recovery). sled's background writes can fail first;
    // then the line waits for the recovery like the rest.
    env.db.add_cms_line(1, dora, "cms 1");
    let said_while_full = tokio::time::timeout(Duration::from_secs(2), async {
        while env.lg.said().len() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .is_ok();
    eprintln!("disk full: a cms line said while the cursor could not be stored: {said_while_full}");
    say(5..10);
    eventually(PATIENCE, "readiness reports the failed write", || async {
        readyz(port).await.is_some_and(|body| {
            body["checks"]["outbox"]["ok"] == false
                && body["checks"]["outbox"]["reason"]
                    .as_str()
                    .is_some_and(|reason| reason.contains("File too large"))
        })
    })
    .await;

    // Polling is paused: the viewer keeps what is said meanwhile, nothing unstored is delivered.
    say(10..15);
    env.db.add_cms_line(1, dora, "cms 2");
    let n_gets = env.lg.n_gets();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.lg.n_gets(), n_gets, "no GET while writes fail");
    // (At least: the echo of a line said in-world meanwhile queues too.)
    assert!(env.lg.queue_len() >= 5, "the viewer keeps the newest lines");
    assert_eq!(
        n_stored(),
        5,
        "nothing that could not be stored is delivered"
    );
    assert!(
        relay.try_wait().expect("wait").is_none(),
        "the relay runs on"
    );

    // Room again: the same process stores what it held, polls again, delivers everything once.
    set_file_size_limit(pid, "unlimited");
    say(15..20);
    env.db.add_cms_line(1, dora, "cms 3");
    eventually(PATIENCE, "every line delivered", || async {
        n_stored() >= 20
    })
    .await;
    eventually(PATIENCE, "every cms line said", || async {
        env.lg.said().len() >= 4
    })
    .await;
    outbox_ready_again(port).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let stored = relayed();
    let expected: Vec<String> = (0..20).map(|n| format!("[{SPEAKER}] line {n}")).collect();
    let unique: HashSet<&String> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "no duplicates: {stored:?}");
    assert_eq!(stored, expected, "all delivered once, in order");
    let said: Vec<String> = env.lg.said().into_iter().map(|s| s.message).collect();
    let expected_said: Vec<String> = (0..4).map(|n| format!("[Dora Admin] cms {n}")).collect();
    assert_eq!(said, expected_said, "each cms line said once, in order");
    assert!(relay.try_wait().expect("wait").is_none(), "never restarted");

    assert!(sigterm(relay).success(), "clean stop after the recovery");
    let log = log.lock().expect("log").clone();
    assert!(
        log.contains("viewer polling paused until the outbox accepts writes")
            && log.contains("the outbox accepts writes again"),
        "the operator is told both: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_cannot_be_written_costs_the_log_lines_and_nothing_else() {
    // Every write to stderr fails with EPIPE from the start; the relay logs at info (every delivered
    // batch, among others).
    let env = TestEnv::start().await;
    let (mut relay, _) = start_relay_process(&env, false);

    for n in 0..5 {
        env.lg.say(SPEAKER, &format!("line {n}"));
    }
    eventually(PATIENCE, "every line delivered", || async {
        env.stored().len() == 5
    })
    .await;

    assert!(
        relay.try_wait().expect("wait").is_none(),
        "the relay runs on"
    );
    assert!(sigterm(relay).success(), "clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_fills_at_random_moments_lose_and_duplicate_nothing() {
    let n_cycles = cycles("RELAY_DISK_FULL_CYCLES", 3);
    let env = TestEnv::start().await;
    let (relay, log) = start_relay_process(&env, true);
    let chatting = CancellationToken::new();
    let chatter = spawn_chatter(env.lg.clone(), 250.0, chatting.clone());

    // The disk fills at random moments (a poll, a batch in flight, a removal after the CMS
    // answered), stays full until the relay has noticed, and gets room again; no restart.
    let port = health_port(&log).await;
    let outbox_ok = || async {
        readyz(port)
            .await
            .map(|body| body["checks"]["outbox"]["ok"] == true)
    };
    for _ in 0..n_cycles {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(50..400))).await;
        set_file_size_limit(relay.id(), "0");
        eventually(PATIENCE, "the failed write reported", || async {
            outbox_ok().await == Some(false)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..300))).await;
        set_file_size_limit(relay.id(), "unlimited");
        eventually(PATIENCE, "writing again", || async {
            outbox_ok().await == Some(true)
        })
        .await;
    }
    chatting.cancel();
    chatter.await.expect("chatter stops");
    catch_up(&env, &log).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sigterm(relay).success(), "clean stop");

    let verdict = env.verdict();
    let n_polls_failed = log
        .lock()
        .expect("log")
        .matches("cannot store polled lines")
        .count();
    eprintln!(
        "disk-full run: {n_cycles} fills, {} lines handed out, {} stored, {} lost, {} duplicated, {} reordered; the poller held read lines in memory in {n_polls_failed} runs of failed writes",
        verdict.n_handed,
        verdict.n_stored,
        verdict.lost.len(),
        verdict.duplicated.len(),
        verdict.n_reordered
    );
    assert!(verdict.lost.is_empty(), "lost: {:?}", verdict.lost);
    assert!(
        verdict.duplicated.is_empty(),
        "duplicated: {:?}",
        verdict.duplicated
    );
    assert_eq!(verdict.n_reordered, 0);
    assert!(verdict.phantom.is_empty(), "{:?}", verdict.phantom);
    assert!(verdict.n_handed > 100, "the run carried real traffic");
}

#[tokio::test]
async fn a_line_the_cms_stored_while_its_removal_failed_is_found_by_its_read_back() {
    let env = TestEnv::start().await;
    // Alice's line is refused while the CMS takes others: it waits for its own retry (a minute
    // away), and meanwhile the rows confirmed for other lines are kept apart from its read-back.
    env.db.fail_posts_carrying(Some("poison"));
    let mut relay = env.spawn_relay_process(
        &[
            ("inworld.enabled", "false"),
            ("retry.initial", "60s"),
            ("retry.max", "60s"),
            ("retry.max_line_failures", "1000"),
            ("log.format", "json"),
        ],
        Stdio::piped(),
    );
    let log = collect_stderr(&mut relay);
    let port = health_port(&log).await;
    env.lg.say(SPEAKER, "poison pill");
    eventually(
        PATIENCE,
        "the refused POST checked with a probe",
        || async {
            env.db
                .requests()
                .iter()
                .any(|r| r.method == "GET" && r.path.contains("/chats/"))
        },
    )
    .await;

    // Bob's line is stored and answered two seconds later; the disk fills meanwhile, so its
    // removal from the outbox fails.
    env.db.fault_next(1, Fault::Slow(Duration::from_secs(2)));
    env.lg.say("Bob Resident", "bob's line");
    let bobs = || {
        env.stored_messages()
            .iter()
            .filter(|m| *m == "[Bob Resident] bob's line")
            .count()
    };
    eventually(PATIENCE, "bob's line stored", || async { bobs() == 1 }).await;
    set_file_size_limit(relay.id(), "0");
    eventually(PATIENCE, "delivery failed to remove the line", || async {
        log.lock()
            .unwrap()
            .lines()
            .any(|l| l.contains("delivery failed") && l.contains("outbox storage error"))
    })
    .await;
    set_file_size_limit(relay.id(), "unlimited");
    // Room again: the next line's write reopens the outbox and wakes delivery, which reads Bob's
    // line back and finds its row.
    env.lg.say("Bob Resident", "after");
    eventually(
        PATIENCE,
        "the next line stored, only the refused one left",
        || async {
            env.stored_messages()
                .contains(&"[Bob Resident] after".to_owned())
                && metric(&metrics(port).await, "opensim_chat_relay_outbox_lines") == Some(1.0)
        },
    )
    .await;
    sigterm(relay);

    assert_eq!(bobs(), 1, "stored once: {:?}", env.stored_messages());
}
