//! The model-based test of delivery's whole promise (issue 21 item 6): random sequences of avatars
//! speaking, delivery steps, CMS answers of every shape, another writer, a clock that crosses the
//! autumn fold or jumps, and restarts from the outbox, against the scripted CMS (`scripted`: an id
//! consumed by every insert, stored or not; reads that compare local wall-clock strings).
//!
//! A crash at any point between the relay's durable writes is a restart after one of the faults:
//! The in-world reader's reads (`ReaderRead`, published on delivery's board) come at random too,
//! from the speaking clock's view of the present: a read sent before a batch's answer, or from a
//! start a jump of the clock put after the batch's window, must settle nothing.
//!
//! `LostAfterStore` (the CMS stored the rows, the relay never learnt it), `LostBeforeStore` (marked in
//! flight, never sent), a kill while a POST is on its way (`DieAfterStore`, `DieBeforeStore`: the
//! step is dropped there, with the next batch marked ahead and a read beside settled or not), or a
//! restart between steps (batches answered `success: true` and awaiting
//! their shared read among them: batches are of three lines, so several wait at once). After each sequence the faults end and delivery
//! runs until its outbox is empty; then every spoken line is at the CMS exactly once or in the dead
//! letters with a reason (a line dead as `outcome unknown` may also be at the CMS: that is the
//! operator's to decide), each speaker's lines are at the CMS in the order spoken, and the lines
//! counted delivered are exactly those at the CMS and not dead.
//!
//! Cases: 200 by default (about 35 s in a debug build on a shared 2-core machine); set
//! `DELIVERY_MODEL_CASES` for more.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;

use super::scripted::{PostFault, ScriptedCms};
use super::tests::{ALICE, BOB, CAROL, Setup, delivery_of, said};
use super::*;
use crate::zone::Zone;

/// What the world does next.
#[derive(Debug, Clone)]
enum Action {
    /// Speaker 0 (Alice, user 3), 1 (Bob, user 99: the CMS has none) or 2 (Carol, anonymous) says
    /// `n` lines, a second apart on the speaking clock.
    Speak { speaker: usize, n: usize },
    /// One delivery step, 25 ms of the holds' clock later.
    Step,
    /// The next POST meets this.
    Fault(PostFault),
    /// A CMS web user stores a row now.
    OtherWriter,
    /// The CMS's database cannot insert (every insert fails), or can again.
    InsertsFail(bool),
    /// Reads of more than two rows die of PHP's memory limit, or no longer do.
    ReadsTooLarge(bool),
    /// The speaking clock jumps by this many seconds (back too).
    Clock(i64),
    /// The in-world reader reads the CMS (from 4 s before the speaking clock, or from where
    /// delivery wants it) and publishes the read on the board, which settles batches with it.
    ReaderRead,
    /// The process dies and starts again on its outbox: delivery's memory (holds, the board) is
    /// lost.
    Restart,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (0..3usize, 1..4usize).prop_map(|(speaker, n)| Action::Speak { speaker, n }),
        8 => Just(Action::Step),
        1 => Just(Action::Fault(PostFault::LostAfterStore)),
        1 => Just(Action::Fault(PostFault::LostBeforeStore)),
        1 => Just(Action::Fault(PostFault::DieAfterStore)),
        1 => Just(Action::Fault(PostFault::DieBeforeStore)),
        1 => Just(Action::Fault(PostFault::Http {
            status: 503,
            retry_after: Some(Duration::from_secs(3600)),
        })),
        1 => Just(Action::OtherWriter),
        1 => any::<bool>().prop_map(Action::InsertsFail),
        1 => any::<bool>().prop_map(Action::ReadsTooLarge),
        1 => (-1800..1800i64).prop_map(Action::Clock),
        1 => Just(Action::Restart),
        3 => Just(Action::ReaderRead),
    ]
}

const SPEAKERS: [&str; 3] = [ALICE, BOB, CAROL];

/// The holds' retry schedule: at most 20 ms, so a step 50 ms later finds every held line due.
const RETRY: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(5),
    max: Duration::from_millis(20),
};

const SETUP: Setup = (99, RETRY, Zone::Named(chrono_tz::Europe::Amsterdam), 3);

/// A step still running after this met a POST that never ends (`PostFault::Die*`): the process
/// was killed there. Steps of this test take milliseconds; one that takes longer on a loaded machine
/// is killed there too, which is a crash like any other.
const DIES_AFTER: Duration = Duration::from_millis(30);

/// Delivery in batches of at most three lines: a sequence of a few dozen lines then has several
/// batches posted and awaiting their proof (`settle`) while newer ones go out, and a crash or a
/// fault can meet them in that state.
fn model_delivery(
    outbox: Arc<Outbox>,
    cms: Arc<ScriptedCms>,
    stats: Arc<Stats>,
) -> Delivery<ScriptedCms> {
    let mut delivery = delivery_of(outbox, cms, stats, SETUP);
    delivery.deps.settings.batch_max_messages = 3;
    delivery.deps.board.serve(Duration::from_millis(10));
    delivery
}

/// The reader's read at speaking-clock time `clock`, published on delivery's board (a read the
/// CMS cannot answer publishes nothing).
async fn reader_reads(delivery: &Delivery<ScriptedCms>, cms: &ScriptedCms, clock: DateTime<Utc>) {
    let board = &delivery.deps.board;
    let since = board.start_for(clock.timestamp() - 4, clock.timestamp());
    let sent_at = std::time::Instant::now();
    if let Ok(rows) = cms.read_since(since).await {
        board.publish(since, sent_at, Arc::new(rows));
    }
}

/// One sequence run; the first broken promise, if any.
async fn run(actions: &[Action]) -> Result<(), String> {
    // In memory where the machine has it: a case flushes the outbox hundreds of times.
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .map_err(|e| e.to_string())?;
    let path = dir.path().join("outbox");
    let cms = Arc::new(ScriptedCms::new(chrono_tz::Europe::Amsterdam, &[3]));
    let stats = Arc::new(Stats::default());
    let open = || Outbox::open(&path, 1 << 20).map(Arc::new);
    let mut outbox = open().map_err(|e| e.to_string())?;
    let mut delivery = model_delivery(outbox.clone(), cms.clone(), stats.clone());
    let mut now = tokio::time::Instant::now();
    // 02:59:40 CEST: the autumn fold (02:00-02:59 twice) comes 20 s of speaking later.
    let mut clock: DateTime<Utc> = Utc.with_ymd_and_hms(2026, 10, 25, 0, 59, 40).unwrap();
    // (speaker, token) in speaking order.
    let mut spoken: Vec<(usize, String)> = Vec::new();
    for action in actions {
        match action {
            Action::Speak { speaker, n } => {
                let mut lines = Vec::new();
                for _ in 0..*n {
                    let token = format!("t{}.", spoken.len());
                    lines.push(said(SPEAKERS[*speaker], &token, clock));
                    spoken.push((*speaker, token));
                    clock += chrono::Duration::seconds(1);
                }
                outbox.append(&lines).await.map_err(|e| e.to_string())?;
            }
            Action::Step => {
                let step = delivery.try_deliver_batch_at(now);
                let died = tokio::time::timeout(DIES_AFTER, step).await.is_err();
                now += Duration::from_millis(25);
                if died {
                    // Killed with a POST on its way (and whatever was marked or written beside
                    // it): the process starts again on its outbox.
                    drop(delivery);
                    drop(outbox);
                    outbox = open().map_err(|e| e.to_string())?;
                    delivery = model_delivery(outbox.clone(), cms.clone(), stats.clone());
                }
            }
            Action::Fault(fault) => cms.with(|m| m.post_faults.push_back(fault.clone())),
            Action::OtherWriter => {
                let stamp = chrono_tz::Europe::Amsterdam
                    .from_utc_datetime(&clock.naive_utc())
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string();
                cms.other_writer("from the web", &stamp);
            }
            Action::InsertsFail(fail) => cms.with(|m| m.inserts_fail = *fail),
            Action::ReadsTooLarge(on) => {
                cms.with(|m| m.max_read_rows = if *on { 2 } else { usize::MAX })
            }
            Action::Clock(seconds) => clock += chrono::Duration::seconds(*seconds),
            Action::ReaderRead => reader_reads(&delivery, &cms, clock).await,
            Action::Restart => {
                drop(delivery);
                drop(outbox);
                outbox = open().map_err(|e| e.to_string())?;
                delivery = model_delivery(outbox.clone(), cms.clone(), stats.clone());
            }
        }
    }
    // The world calms down; delivery settles everything.
    cms.with(|m| {
        m.post_faults.clear();
        m.inserts_fail = false;
        m.max_read_rows = usize::MAX;
    });
    // Carol chats on for a while: a line the CMS alone refuses (Bob's) is counted a failure of its
    // own only once the CMS stored other rows since its last try.
    for round in 0..400 {
        if outbox.is_empty() {
            break;
        }
        if round < 300 && round % 3 == 0 {
            let token = format!("t{}.", spoken.len());
            outbox
                .append(&[said(CAROL, &token, clock)])
                .await
                .map_err(|e| e.to_string())?;
            spoken.push((2, token));
            clock += chrono::Duration::seconds(1);
        }
        if round % 4 == 0 {
            reader_reads(&delivery, &cms, clock).await;
        }
        let _ = delivery.try_deliver_batch_at(now).await;
        now += Duration::from_millis(50);
    }
    if !outbox.is_empty() {
        return Err(format!("{} lines never settled", outbox.len()));
    }
    check(&spoken, &cms, &outbox, &stats)
}

/// The promise, from what the CMS holds, the dead letters and the counters.
fn check(
    spoken: &[(usize, String)],
    cms: &ScriptedCms,
    outbox: &Outbox,
    stats: &Stats,
) -> Result<(), String> {
    let rows = cms.relay_messages();
    let dead = outbox.dead_letters().map_err(|e| e.to_string())?;
    let position = |token: &str| -> Vec<usize> {
        rows.iter()
            .enumerate()
            .filter(|(_, row)| *row == token || row.ends_with(&format!("] {token}")))
            .map(|(i, _)| i)
            .collect()
    };
    let mut last_at: [Option<usize>; 3] = [None; 3];
    let mut n_kept = 0u64;
    for (speaker, token) in spoken {
        let at = position(token);
        let dead_reason = dead
            .iter()
            .find(|d| d.pending.line.message == *token)
            .map(|d| d.reason.as_str());
        match (at.as_slice(), dead_reason) {
            ([], None) => return Err(format!("{token} is neither at the cms nor dead")),
            ([], Some("")) => return Err(format!("{token} is dead without a reason")),
            ([], Some(_)) => {}
            ([_], Some(reason)) if !reason.starts_with("outcome unknown") => {
                return Err(format!("{token} is at the cms and dead: {reason}"));
            }
            ([at], reason) => {
                if last_at[*speaker].is_some_and(|last| last > *at) {
                    return Err(format!(
                        "{token} arrived before an earlier line of its speaker"
                    ));
                }
                last_at[*speaker] = Some(*at);
                if reason.is_none() {
                    n_kept += 1;
                }
            }
            (many, _) => return Err(format!("{token} is at the cms {} times", many.len())),
        }
    }
    let counted = Stats::get(&stats.lines_delivered) + Stats::get(&stats.lines_reconciled);
    if counted != n_kept {
        return Err(format!(
            "{counted} lines counted delivered, {n_kept} at the cms and not dead"
        ));
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("DELIVERY_MODEL_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_spoken_line_is_at_the_cms_once_or_dead_with_a_reason(
        actions in proptest::collection::vec(action(), 1..60)
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let outcome = runtime.block_on(run(&actions));
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
    }
}
