//! One run that mixes the faults: while avatars chat, a schedule drawn from a seed kills the relay
//! binary with SIGKILL (and restarts it on the same outbox), fills its disk (the file size limit of
//! `disk_full.rs`), takes the CMS down (connections closed, or every request answered 500 or 503),
//! and queues faults on the CMS's next chat POSTs: errors that store nothing (500, 503, no answer),
//! failures after the CMS stored the rows (no answer, a reset, a 502 or 504), and slow answers.
//! Faults overlap: a disk fill or a CMS outage lasts several steps, and queued POST faults meet
//! whatever comes next (a kill with a batch in flight, a read-back during an outage). At the end the
//! crash test's oracle judges the CMS's rows against what the viewer handed out: nothing
//! duplicated, nothing lost outside the kill windows (a response read but not yet flushed when a
//! kill landed), per-speaker order, no row the viewer never handed out; and the relay never exited
//! by itself.
//!
//! The schedule comes from `RELAY_MIXED_FAULT_SEED` (default: a random seed, printed at the start,
//! so a failure can be replayed with the same schedule; the timing of the machine is not replayed)
//! and has `RELAY_MIXED_FAULT_STEPS` steps (default 30, about 15 s). The long run of
//! docs/RELIABILITY.md: `RELAY_MIXED_FAULT_STEPS=500 cargo test --test relay mixed_faults --
//! --nocapture`. With `RELAY_MIXED_FAULT_LOGS=<dir>`, the relays log delivery and the outbox at
//! info and a failed run writes the schedule as it ran, every relay's log and the CMS's rows of
//! the duplicated lines there.
//!
//! Left out on purpose: `Fault::FailLastElement`, a row the CMS refuses, whose right outcome is a
//! dead letter, not a stored row (`faults.rs` and `delivery.rs` cover it).

use std::collections::HashSet;
use std::fmt;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opensim_chat_relay::sim::cms::Fault;
use opensim_chat_relay::sim::lookingglass::spawn_chatter;
use tokio_util::sync::CancellationToken;

use crate::helpers::{
    TestEnv, collect_stderr, cycles, health_port, readyz, set_file_size_limit, sigterm,
};

/// The chat POST timeout the relay runs with: short, so that a POST that is never answered costs
/// a step or two, and longer than most slow answers, so that those are waited for.
const CMS_TIMEOUT: Duration = Duration::from_secs(2);

/// How the CMS is down.
#[derive(Clone, Copy, Debug)]
enum Outage {
    /// Every connection closed at its request (the CMS host gone, a proxy dropping connections).
    Offline,
    /// Every request, login and read-back included, answered with this status by the web server.
    Status(u16),
}

/// One step of the schedule.
#[derive(Clone, Debug)]
enum Step {
    /// SIGKILL; the relay is started again after `down` (the avatars chat on meanwhile).
    Kill { down: Duration },
    /// The disk fills; the step waits until the relay's `/readyz` says so (or gives up after a
    /// while). It stays full until `FreeDisk` or a kill (a restarted relay has room).
    FillDisk,
    /// Room on the disk again.
    FreeDisk,
    /// The CMS goes down until `CmsUp`.
    CmsDown(Outage),
    /// The CMS answers again.
    CmsUp,
    /// The next `n` chat POSTs get `fault`, unless faults queued earlier still wait for their POST
    /// (then the step is skipped: the queue would outgrow the relay's POSTs and turn the end of
    /// the run into minutes of faults).
    PostFaults { n: usize, fault: Fault },
}

/// A step and the pause after it.
struct Planned {
    step: Step,
    then: Duration,
}

/// The schedule of `n_steps` steps drawn from `seed`. It knows what is on (a full disk, a CMS
/// outage) and ends both before the last step.
fn schedule(seed: u64, n_steps: usize) -> Vec<Planned> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut disk_full = false;
    let mut cms_down = false;
    let mut plan = Vec::with_capacity(n_steps + 2);
    for _ in 0..n_steps {
        let step = if disk_full && rng.u8(0..2) == 0 {
            disk_full = false;
            Step::FreeDisk
        } else if cms_down && rng.u8(0..3) == 0 {
            cms_down = false;
            Step::CmsUp
        } else {
            match rng.u8(0..100) {
                0..20 => {
                    // A restarted relay has room on its disk.
                    disk_full = false;
                    Step::Kill {
                        down: Duration::from_millis(rng.u64(0..300)),
                    }
                }
                20..35 if !disk_full => {
                    disk_full = true;
                    Step::FillDisk
                }
                35..48 if !cms_down => {
                    cms_down = true;
                    Step::CmsDown(match rng.u8(0..3) {
                        0 => Outage::Offline,
                        1 => Outage::Status(500),
                        _ => Outage::Status(503),
                    })
                }
                _ => Step::PostFaults {
                    n: rng.usize(1..=3),
                    fault: post_fault(&mut rng),
                },
            }
        };
        plan.push(Planned {
            step,
            then: Duration::from_millis(rng.u64(50..500)),
        });
    }
    for (on, step) in [(disk_full, Step::FreeDisk), (cms_down, Step::CmsUp)] {
        if on {
            plan.push(Planned {
                step,
                then: Duration::ZERO,
            });
        }
    }
    plan
}

/// A fault for the next chat POSTs: one that stores nothing, one after the store, or a slow answer.
fn post_fault(rng: &mut fastrand::Rng) -> Fault {
    match rng.u8(0..9) {
        0 => Fault::Status(500),
        1 => Fault::Status(503),
        2 => Fault::Hang,
        3 => Fault::HangAfterStore,
        4 => Fault::CloseAfterStore,
        5 => Fault::StatusAfterStore(502),
        6 => Fault::StatusAfterStore(504),
        // Mostly within the relay's timeout, sometimes beyond it (then it is a failure after
        // the store).
        _ => Fault::Slow(Duration::from_millis(rng.u64(100..2500))),
    }
}

/// What the run did, for its report.
#[derive(Default)]
struct Tally {
    n_steps: usize,
    n_kills: usize,
    n_fills: usize,
    /// Fills the relay reported on `/readyz` before the step gave up waiting.
    n_fills_seen: usize,
    n_outages_offline: usize,
    n_outages_5xx: usize,
    /// Queued POST faults of each kind: nothing stored, stored then the answer lost, slow.
    n_post_failures: usize,
    n_after_store: usize,
    n_slow: usize,
    /// `PostFaults` steps skipped because earlier faults still waited.
    n_post_faults_skipped: usize,
    /// The relay exited without being killed (it must not).
    unexpected_exits: Vec<String>,
}

impl Tally {
    fn count(&mut self, step: &Step) {
        match step {
            Step::Kill { .. } => self.n_kills += 1,
            Step::FillDisk => self.n_fills += 1,
            Step::CmsDown(Outage::Offline) => self.n_outages_offline += 1,
            Step::CmsDown(Outage::Status(_)) => self.n_outages_5xx += 1,
            Step::PostFaults { n, fault } => match fault {
                Fault::Status(_) | Fault::Hang => self.n_post_failures += n,
                Fault::Slow(_) => self.n_slow += n,
                _ => self.n_after_store += n,
            },
            Step::FreeDisk | Step::CmsUp => {}
        }
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} steps: {} SIGKILLs, {} disk fills ({} seen on /readyz), {} CMS outages ({} closing connections, {} answering 5xx), POST faults: {} storing nothing, {} after the store, {} slow ({} such steps skipped: faults still queued)",
            self.n_steps,
            self.n_kills,
            self.n_fills,
            self.n_fills_seen,
            self.n_outages_offline + self.n_outages_5xx,
            self.n_outages_offline,
            self.n_outages_5xx,
            self.n_post_failures,
            self.n_after_store,
            self.n_slow,
            self.n_post_faults_skipped
        )
    }
}

/// The CMS's queue of POST faults as the run sees it: while faults are queued, every chat POST
/// takes one.
#[derive(Default)]
struct FaultQueue {
    /// Queued at the last push.
    pending: u64,
    /// The CMS's chat POST count at the last push.
    posts_then: u64,
}

impl FaultQueue {
    fn pending(&self, posts_now: u64) -> u64 {
        self.pending
            .saturating_sub(posts_now.saturating_sub(self.posts_then))
    }

    fn push(&mut self, n: usize, posts_now: u64) {
        self.pending = self.pending(posts_now) + n as u64;
        self.posts_then = posts_now;
    }
}

/// The relay binary as the run drives it.
struct Relay {
    child: Child,
    log: Arc<Mutex<String>>,
    /// Its health port, once read from its log.
    port: Option<u16>,
}

impl Relay {
    fn start(env: &TestEnv, verbose: bool) -> Relay {
        let timeout = humantime::format_duration(CMS_TIMEOUT).to_string();
        let level = if verbose {
            "warn,opensim_chat_relay::health=info,opensim_chat_relay::delivery=info,opensim_chat_relay::outbox=info,opensim_chat_relay::poller=info"
        } else {
            "warn,opensim_chat_relay::health=info"
        };
        let mut child = env.spawn_relay_process(
            &[
                ("cms.batch_max_messages", "20"),
                ("cms.request_timeout", &timeout),
                ("inworld.enabled", "false"),
                // The start-up line with the health port, and every warning.
                ("log.level", level),
                ("log.format", "json"),
            ],
            Stdio::piped(),
        );
        let log = collect_stderr(&mut child);
        Relay {
            child,
            log,
            port: None,
        }
    }

    async fn port(&mut self) -> u16 {
        if self.port.is_none() {
            self.port = Some(health_port(&self.log).await);
        }
        self.port.expect("just read")
    }

    /// The newest lines of its log, newest first.
    fn log_tail(&self, n: usize) -> String {
        let log = self.log.lock().expect("log");
        log.lines().rev().take(n).collect::<Vec<_>>().join("\n")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_faults_from_a_seed_lose_and_duplicate_nothing_persisted() {
    let n_steps = cycles("RELAY_MIXED_FAULT_STEPS", 30);
    let seed = std::env::var("RELAY_MIXED_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("mixed faults: seed {seed} (replay: RELAY_MIXED_FAULT_SEED={seed}), {n_steps} steps");
    let plan = schedule(seed, n_steps);
    let started = Instant::now();
    let logs_dir = std::env::var_os("RELAY_MIXED_FAULT_LOGS").map(std::path::PathBuf::from);
    let verbose = logs_dir.is_some();
    let mut ran = Vec::new();
    let mut logs = Vec::new();

    let env = TestEnv::start().await;
    // One of the three speakers is a linked CMS user, so its lookups meet the faults too.
    env.linked_user("Bob Builder", "bob");
    let chatting = CancellationToken::new();
    let chatter = spawn_chatter(env.lg.clone(), 250.0, chatting.clone());

    let mut relay = Relay::start(&env, verbose);
    logs.push(relay.log.clone());
    // The GET of each kill's window, and those of kills while the disk was full (the poller held
    // that answer in memory, unstored, since the fill).
    let mut windows = HashSet::new();
    let mut held_windows = HashSet::new();
    let mut disk_full = false;
    let mut queue = FaultQueue::default();
    let mut tally = Tally::default();
    for Planned { step, then } in &plan {
        if let Some(status) = relay.child.try_wait().expect("wait") {
            tally.unexpected_exits.push(format!(
                "{status} before step {}; log, newest first:\n{}",
                tally.n_steps,
                relay.log_tail(20)
            ));
            relay = Relay::start(&env, verbose);
            logs.push(relay.log.clone());
            disk_full = false;
        }
        ran.push(format!(
            "{} ({:>7.3} s)  relay {}: {step:?} then {then:?}",
            chrono::Utc::now().format("%H:%M:%S%.3f"),
            started.elapsed().as_secs_f64(),
            logs.len() - 1
        ));
        tally.n_steps += 1;
        let posts_now = env.db.n_chat_posts();
        if matches!(step, Step::PostFaults { .. }) && queue.pending(posts_now) > 0 {
            tally.n_post_faults_skipped += 1;
        } else {
            tally.count(step);
        }
        match step {
            Step::Kill { down } => {
                relay.child.kill().expect("SIGKILL");
                relay.child.wait().expect("reaped");
                // No GET can start once the relay is dead: the last one counted is the only
                // response that may have been read but not flushed.
                windows.insert(env.lg.n_gets());
                if disk_full {
                    held_windows.insert(env.lg.n_gets());
                }
                disk_full = false;
                tokio::time::sleep(*down).await;
                relay = Relay::start(&env, verbose);
                logs.push(relay.log.clone());
            }
            Step::FillDisk => {
                let port = relay.port().await;
                set_file_size_limit(relay.child.id(), "0");
                disk_full = true;
                let seen = tokio::time::timeout(Duration::from_secs(5), async {
                    loop {
                        let body = readyz(port).await;
                        if body.is_some_and(|b| b["checks"]["outbox"]["ok"] == false) {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
                .await
                .is_ok();
                tally.n_fills_seen += usize::from(seen);
            }
            Step::FreeDisk => {
                set_file_size_limit(relay.child.id(), "unlimited");
                disk_full = false;
            }
            Step::CmsDown(Outage::Offline) => env.db.set_offline(true),
            Step::CmsDown(Outage::Status(status)) => env.db.set_unavailable(Some(*status)),
            Step::CmsUp => {
                env.db.set_offline(false);
                env.db.set_unavailable(None);
            }
            Step::PostFaults { n, fault } => {
                if queue.pending(posts_now) == 0 {
                    env.db.fault_next(*n, fault.clone());
                    queue.push(*n, posts_now);
                }
            }
        }
        tokio::time::sleep(*then).await;
    }

    // The last relay runs to the end and delivers everything (the POST faults still queued meet
    // it; the schedule has ended the fill and the outage).
    let faulted_for = started.elapsed();
    chatting.cancel();
    chatter.await.expect("chatter stops");
    env.viewer_drained(Duration::from_secs(60)).await;
    let must_arrive = env.must_arrive(&windows);
    let all_arrived = env.until_arrived(&must_arrive).await;
    if !all_arrived {
        eprintln!(
            "the last relay's log, newest first:\n{}",
            relay.log_tail(40)
        );
    }
    let still_running = relay.child.try_wait().expect("wait").is_none();
    let stopped = sigterm(relay.child);

    // The oracle.
    let verdict = env.verdict();
    let n_lost_outside_windows = verdict.lost_outside(&must_arrive).len();
    let lost: HashSet<&String> = verdict.lost.iter().collect();
    let n_lost_held_while_full = env
        .lg
        .handed_out()
        .iter()
        .filter(|h| held_windows.contains(&h.response) && lost.contains(&h.message))
        .count();
    eprintln!(
        "mixed faults, seed {seed}: {tally}; {:.0} s of faults, {:.0} s in all; {} lines handed out, {} stored, {} lost in the read-but-not-flushed window ({} of them held in memory while the disk was full), {} lost otherwise, {} duplicated, {} reordered, {} phantom, {} responses abandoned mid-write, {} unexpected exits",
        faulted_for.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        verdict.n_handed,
        verdict.n_stored,
        verdict.lost.len() - n_lost_outside_windows,
        n_lost_held_while_full,
        n_lost_outside_windows,
        verdict.duplicated.len(),
        verdict.n_reordered,
        verdict.phantom.len(),
        env.lg.n_aborted(),
        tally.unexpected_exits.len()
    );
    if let Some(dir) = &logs_dir
        && (!verdict.duplicated.is_empty() || n_lost_outside_windows > 0 || verdict.n_reordered > 0)
    {
        keep_logs(dir, seed, &ran, &logs, &env, &verdict.duplicated);
    }
    assert!(
        tally.unexpected_exits.is_empty(),
        "the relay exited by itself (seed {seed}): {:?}",
        tally.unexpected_exits
    );
    assert!(still_running, "the last relay ran to the end (seed {seed})");
    assert!(stopped.success(), "clean stop (seed {seed}): {stopped}");
    verdict.assert_kept(&must_arrive, &format!("mixed faults, seed {seed}"));
}

/// Writes a failed run's schedule as it ran, every relay's log and the CMS's rows of the
/// `duplicated` lines under `dir/<seed>/`.
fn keep_logs(
    dir: &std::path::Path,
    seed: u64,
    ran: &[String],
    logs: &[Arc<Mutex<String>>],
    env: &TestEnv,
    duplicated: &[String],
) {
    let dir = dir.join(seed.to_string());
    std::fs::create_dir_all(&dir).expect("logs dir");
    std::fs::write(dir.join("schedule.txt"), ran.join("\n")).expect("schedule");
    for (i, log) in logs.iter().enumerate() {
        let log = log.lock().expect("log").clone();
        std::fs::write(dir.join(format!("relay-{i:03}.log")), log).expect("relay log");
    }
    let rows: Vec<String> = env
        .stored()
        .iter()
        .filter(|row| duplicated.iter().any(|d| row.message.ends_with(d.as_str())))
        .map(|row| format!("{row:?}"))
        .collect();
    std::fs::write(dir.join("duplicated-rows.txt"), rows.join("\n")).expect("rows");
    eprintln!("mixed faults: the run's logs are in {}", dir.display());
}

#[test]
fn the_schedule_is_the_seeds_and_ends_every_outage_and_fill() {
    let render = |plan: &[Planned]| -> Vec<String> {
        plan.iter()
            .map(|p| format!("{:?} {:?}", p.step, p.then))
            .collect()
    };
    for seed in 0..200 {
        let plan = schedule(seed, 40);
        assert_eq!(render(&plan), render(&schedule(seed, 40)), "seed {seed}");
        let (mut disk_full, mut cms_down) = (false, false);
        for Planned { step, .. } in &plan {
            match step {
                Step::Kill { .. } => disk_full = false,
                Step::FillDisk => {
                    assert!(!disk_full, "seed {seed}: a fill while full");
                    disk_full = true;
                }
                Step::FreeDisk => disk_full = false,
                Step::CmsDown(_) => {
                    assert!(!cms_down, "seed {seed}: an outage while down");
                    cms_down = true;
                }
                Step::CmsUp => cms_down = false,
                Step::PostFaults { .. } => {}
            }
        }
        assert!(!disk_full && !cms_down, "seed {seed}: the run ends clean");
    }
    // Every kind of step occurs over the seeds.
    let all: Vec<String> = (0..200)
        .flat_map(|seed| render(&schedule(seed, 40)))
        .collect();
    for kind in [
        "Kill",
        "FillDisk",
        "FreeDisk",
        "Offline",
        "Status(500)",
        "Status(503)",
        "CmsUp",
        "fault: Hang }",
        "HangAfterStore",
        "CloseAfterStore",
        "StatusAfterStore(502)",
        "StatusAfterStore(504)",
        "Slow",
    ] {
        assert!(all.iter().any(|s| s.contains(kind)), "{kind} never drawn");
    }
}
