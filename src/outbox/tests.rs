//! Unit tests of the outbox, through its facade as the stages use it (and, where a test must set
//! up what only a fault or an older relay produces, the trees behind it).

use std::sync::Arc;

use crate::model::CapturedLine;
use crate::outbox::reader::disk_usage;
use crate::outbox::{
    Cursor, Limits, LineState, Outbox, OutboxError, PendingLine, Prepared, WhenFull,
};

/// Alice's line captured now (to the millisecond, as stored).
fn line(text: &str) -> CapturedLine {
    CapturedLine::said_now("Alice Resident", None, text)
}

/// The outbox in `dir`, with a page cache of 1 MiB.
fn open(dir: &tempfile::TempDir) -> Outbox {
    Outbox::open(dir.path(), 1 << 20).expect("open")
}

/// Appends lines with these texts, in order.
async fn append(outbox: &Outbox, texts: &[&str]) {
    let lines: Vec<CapturedLine> = texts.iter().map(|text| line(text)).collect();
    outbox.append(&lines).await.expect("append");
}

/// The texts of the pending lines delivery can see, oldest first.
fn texts(outbox: &Outbox) -> Vec<String> {
    let pending = outbox.oldest(10).expect("read");
    pending.into_iter().map(|p| p.line.message).collect()
}

/// Moves a line to the dead letters as delivery does when the CMS refuses it, with the reason
/// "refused".
async fn refuse(outbox: &Outbox, line: &PendingLine) {
    outbox
        .dead_letter(line, "refused")
        .await
        .expect("dead letter");
}

/// Pending lines and their bytes, counted from the records on disk (what the depth counters
/// must show).
fn counted_on_disk(outbox: &Outbox) -> (usize, u64) {
    outbox.store().expect("open").count_pending()
}

// The pending queue.

#[tokio::test]
async fn lines_come_back_in_capture_order_across_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let outbox = open(&dir);
        append(&outbox, &["one", "two"]).await;
        append(&outbox, &["three"]).await;
    }
    let outbox = open(&dir);
    assert_eq!(outbox.len(), 3);
    assert_eq!(texts(&outbox), ["one", "two", "three"]);
}

#[tokio::test]
async fn a_damaged_record_is_quarantined_and_the_rest_flows() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let outbox = open(&dir);
        append(&outbox, &["one"]).await;
        outbox
            .store()
            .expect("open")
            .pending
            .insert((1u64 << 60).to_be_bytes(), b"not json".to_vec())
            .expect("insert");
    }
    let outbox = open(&dir);
    assert_eq!(texts(&outbox), ["one"]);
    assert_eq!(outbox.quarantine_len(), 1);
}

// Ingest.

#[tokio::test]
async fn a_failed_ingest_stays_out_of_reach_and_its_retry_stores_each_line_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = open(&dir);
    append(&outbox, &["before"]).await;
    // A try that wrote its lines and then failed (as a flush on a full disk does).
    let mut ingest = outbox.ingest(Vec::new());
    ingest.push(&line("one"));
    ingest.push(&line("two"));
    ingest.fail(OutboxError::Reopen("disk full".into()));
    let (_, keys) = ingest.commit().await.expect_err("failed");
    assert_eq!(keys.len(), 2);
    assert_eq!(texts(&outbox), ["before"], "delivery cannot see them yet");

    // The retry writes the same records, and one more line.
    let mut ingest = outbox.ingest(keys);
    for text in ["one", "two", "three"] {
        ingest.push(&line(text));
    }
    assert_eq!(ingest.commit().await.expect("committed"), 3);
    assert_eq!(texts(&outbox), ["before", "one", "two", "three"]);
    assert_eq!(outbox.len(), 4);
    assert_eq!((outbox.len(), outbox.bytes()), counted_on_disk(&outbox));
}

// Dead letters and the quarantine.

#[tokio::test]
async fn dead_letters_keep_the_line_and_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = open(&dir);
    append(&outbox, &["bad", "good"]).await;
    let pending = outbox.oldest(10).expect("read");
    refuse(&outbox, &pending[0]).await;
    assert_eq!(outbox.len(), 1);
    let dead = outbox.dead_letters().expect("dead");
    assert_eq!(dead[0].pending.line.message, "bad");
    assert_eq!(dead[0].reason, "refused");
}

#[tokio::test]
async fn a_dead_letter_requeued_into_an_empty_outbox_is_deliverable() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let outbox = open(&dir);
        append(&outbox, &["delivered", "refused"]).await;
        let pending = outbox.oldest(10).expect("read");
        outbox.remove(&[pending[0].id]).await.expect("remove");
        refuse(&outbox, &pending[1]).await;
    }
    // Opened with nothing pending, as `outbox requeue` does on a stopped relay's outbox.
    let outbox = open(&dir);
    assert_eq!(outbox.requeue(None).await.expect("requeue"), 1);
    assert_eq!(texts(&outbox), ["refused"]);
}

#[tokio::test]
async fn the_counts_of_dead_letters_and_quarantined_records_follow_every_write_and_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = open(&dir);
    append(&outbox, &["one", "two", "three"]).await;
    for line in outbox.oldest(10).expect("read") {
        refuse(&outbox, &line).await;
    }
    outbox
        .quarantine_unreadable("chat", b"not json", 0)
        .await
        .expect("keep");
    outbox
        .quarantine_unreadable("chat", b"nor this", 0)
        .await
        .expect("keep");
    let counts = |outbox: &Outbox| (outbox.dead_len(), outbox.quarantine_len());
    assert_eq!(counts(&outbox), (3, 2));

    let first = outbox.dead_letters().expect("dead")[0].pending.id;
    assert_eq!(outbox.requeue(Some(&[first])).await.expect("requeue"), 1);
    assert_eq!(counts(&outbox), (2, 2));
    assert_eq!(outbox.purge_quarantine().await.expect("purge"), 2);
    assert_eq!(counts(&outbox), (2, 0));
    let store = outbox.store().expect("open");
    assert_eq!(store.count_kept(), (2, 0));
    drop(store);
    drop(outbox);

    let outbox = open(&dir);
    assert_eq!(counts(&outbox), (2, 0));
    assert_eq!(outbox.purge_dead().await.expect("purge"), 2);
    assert_eq!(counts(&outbox), (0, 0));
}

// Cursors.

#[tokio::test]
async fn cursors_keep_the_keys_and_encoding_existing_databases_hold() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let outbox = open(&dir);
        assert_eq!(outbox.cursor(Cursor::LastSaidId).expect("read"), None);
        let store = outbox.store().expect("open");
        // As written by the relays that kept the keys in the stages.
        store
            .meta
            .insert("delivery.last_confirmed_id", &41i64.to_be_bytes())
            .expect("insert");
        store
            .meta
            .insert("inworld.last_said_id", &(-3i64).to_be_bytes())
            .expect("insert");
        outbox.flush().await.expect("flush");
    }
    let outbox = open(&dir);
    assert_eq!(
        outbox.cursor(Cursor::LastConfirmedId).expect("read"),
        Some(41)
    );
    assert_eq!(outbox.cursor(Cursor::LastSaidId).expect("read"), Some(-3));
    outbox
        .set_cursor(Cursor::LastConfirmedId, 42)
        .await
        .expect("set");
    let raw = outbox
        .store()
        .expect("open")
        .meta
        .get("delivery.last_confirmed_id")
        .expect("read")
        .expect("stored");
    assert_eq!(raw.as_ref(), 42i64.to_be_bytes());
}

// The database.

#[tokio::test]
async fn a_second_open_of_the_same_outbox_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = open(&dir);
    let err = Outbox::open(dir.path(), 1 << 20)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("in use by another process"), "{err}");
}

#[tokio::test]
async fn after_an_io_error_the_outbox_reopens_in_place_once_nobody_holds_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = open(&dir);
    append(&outbox, &["one", "two"]).await;
    let failed: sled::Result<()> = Err(sled::Error::Io(std::io::Error::other("disk full")));
    assert!(outbox.db.io(failed).is_err());

    // An operation still using the failed handles keeps the reopen waiting.
    let held = outbox.db.current();
    let err = outbox.append(&[line("three")]).await.expect_err("waits");
    assert!(matches!(err, OutboxError::Reopen(_)), "{err}");
    drop(held);

    // sled lets go of its file lock in this process, and the lines and counters survive.
    outbox.append(&[line("three")]).await.expect("reopened");
    assert_eq!(texts(&outbox), ["one", "two", "three"]);
    assert_eq!(outbox.len(), 3);
    assert_eq!((outbox.len(), outbox.bytes()), counted_on_disk(&outbox));
}

#[tokio::test]
async fn a_scrape_passes_over_a_damaged_record_and_leaves_the_quarantine_to_delivery() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = Arc::new(open(&dir));
    let kept = line("kept");
    outbox
        .append(&[line("damaged"), kept.clone()])
        .await
        .expect("append");
    let oldest_key = outbox.oldest(1).expect("read")[0].id.to_be_bytes();
    let store = outbox.store().expect("open");
    store
        .pending
        .insert(oldest_key, b"not json".to_vec())
        .expect("damage");
    drop(store);
    let reader = outbox.reader();

    for _ in 0..2 {
        let oldest = reader.oldest_captured_at().expect("read");
        assert_eq!(oldest, Some(kept.captured_at));
        assert_eq!((reader.quarantine_len(), reader.len()), (0, 2));
    }

    // Delivery's read is the one that moves it.
    assert_eq!(texts(&outbox), ["kept"]);
    assert_eq!((reader.quarantine_len(), reader.len()), (1, 1));
}

#[tokio::test]
async fn a_scrape_leaves_a_broken_outbox_to_be_reopened_by_a_stage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = Arc::new(open(&dir));
    append(&outbox, &["one"]).await;
    let reader = outbox.reader();
    let failed: sled::Result<()> = Err(sled::Error::Io(std::io::Error::other("disk full")));
    assert!(outbox.db.io(failed).is_err());

    let err = reader.oldest_captured_at().expect_err("not read");
    assert!(err.to_string().contains("disk full"), "{err}");
    assert_eq!((reader.dead_len(), reader.quarantine_len()), (0, 0));
    assert_eq!(reader.len(), 1);
    // A reopen would have cleared the mark.
    assert!(outbox.db.is_broken(), "the scrape reopened it");

    append(&outbox, &["two"]).await;
    assert!(reader.oldest_captured_at().expect("read").is_some());
    assert_eq!(reader.len(), 2);
}

// The space on disk.

#[tokio::test]
async fn an_outbox_churning_at_its_bound_takes_at_most_4_times_max_bytes_plus_12_mib_on_disk() {
    // Delivery falls behind while lines arrive: at the bound, lines are appended, marked in flight
    // with their row (a rewrite that grows them), confirmed or left, and the oldest dropped.
    let dir = tempfile::tempdir().expect("tempdir");
    let max_bytes = 2 << 20;
    let outbox = open(&dir).with_limits(Limits {
        max_bytes,
        max_age: std::time::Duration::MAX,
        when_full: WhenFull::DropOldest,
        reserve_bytes: 0,
    });
    let mut peak = 0;
    for round in 0..400 {
        let text = format!("hello #{round} {}", "x".repeat(fastrand::usize(0..120)));
        let lines: Vec<CapturedLine> = (0..200).map(|_| line(&text)).collect();
        outbox.append(&lines).await.expect("append");
        let marked: Vec<PendingLine> = outbox
            .oldest(120)
            .expect("read")
            .into_iter()
            .map(|pending| PendingLine {
                state: LineState::Prepared(Prepared {
                    user_id: -1,
                    message: format!("[Alice Resident] {}", pending.line.message),
                    timestamp: "2026-01-01 12:00:00".into(),
                }),
                ..pending
            })
            .collect();
        let marked = outbox.mark_in_flight(&marked, 123_456).await.expect("mark");
        if round % 3 != 0 {
            let ids: Vec<u64> = marked.iter().map(|p| p.id).collect();
            outbox.remove(&ids).await.expect("remove");
        }
        peak = peak.max(disk_usage(dir.path()));
    }

    assert!(outbox.bytes() <= max_bytes && outbox.n_dropped() > 0);
    assert!(
        peak <= 4 * max_bytes + (12 << 20),
        "{peak} bytes on disk for outbox.max_bytes = {max_bytes}"
    );
}

#[tokio::test]
async fn each_region_keeps_its_own_cursor_and_the_only_region_keeps_todays_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = Outbox::open(&dir.path().join("outbox"), 1 << 20).expect("open");
    outbox
        .set_cursor(Cursor::LastSaidId, 7)
        .await
        .expect("write");
    outbox
        .set_cursors(&[
            (Cursor::LastSaidId.of("Sandbox"), 9),
            (Cursor::LastSaidAt.of("Sandbox"), 90),
        ])
        .await
        .expect("write");
    assert_eq!(outbox.cursor(Cursor::LastSaidId).expect("read"), Some(7));
    assert_eq!(
        outbox.cursor(Cursor::LastSaidId.of("")).expect("read"),
        Some(7)
    );
    assert_eq!(
        outbox
            .cursor(Cursor::LastSaidId.of("Sandbox"))
            .expect("read"),
        Some(9)
    );
    assert_eq!(
        outbox
            .cursor(Cursor::LastSaidId.of("Welcome"))
            .expect("read"),
        None
    );
    assert_eq!(outbox.cursor(Cursor::LastSaidAt).expect("read"), None);
}

#[tokio::test]
async fn an_outbox_written_by_a_version_1_relay_opens_and_its_line_in_flight_carries_on() {
    // A record as the relay before the lifecycle enum wrote it: marked in flight after id 41,
    // with its row, one failure counted.
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let outbox = open(&dir);
        let store = outbox.store().expect("store");
        let v1 = br#"{"v":1,"speaker":"Alice Resident","message":"hi","spoken_at_ms":1700000000000,"captured_at_ms":1700000001000,"attempts":1,"prepared":{"user_id":3,"message":"hi","timestamp":"2023-11-14 23:13:20"},"in_flight":true,"failures":1,"last_error":"cms error: x","sent_after":41}"#;
        store
            .pending
            .insert(9u64.to_be_bytes(), &v1[..])
            .expect("insert");
        outbox.flush().await.expect("flush");
    }
    let outbox = open(&dir);
    let lines = outbox.oldest(10).expect("read");
    assert_eq!(lines.len(), 1);
    let row = Prepared {
        user_id: 3,
        message: "hi".into(),
        timestamp: "2023-11-14 23:13:20".into(),
    };
    assert_eq!(
        lines[0].state,
        LineState::InFlight {
            row: Some(row.clone()),
            after: Some(41)
        }
    );
    assert_eq!((lines[0].attempts, lines[0].failures), (1, 1));

    // It goes on through the verbs, written as version 2, and leaves when confirmed.
    let unsent = outbox.mark_not_stored(&lines).await.expect("not stored");
    assert_eq!(unsent[0].state, LineState::Prepared(row.clone()));
    drop(outbox);
    let outbox = open(&dir);
    assert_eq!(outbox.oldest(10).expect("read"), unsent);
    let marked = outbox.mark_in_flight(&unsent, 50).await.expect("mark");
    assert_eq!(marked[0].attempts, 2);
    outbox.remove(&[9]).await.expect("remove");
    assert!(outbox.is_empty());
}

#[test]
fn many_tasks_writing_and_flushing_at_once_all_finish() {
    // Arrange: what a relay with many regions does, each region's poller and presence task
    // writing and flushing on its own, on tokio's two workers. With sled 0.34's flushes run side by
    // side they waited for each other and the writers behind them: the relay hung (8 regions). The
    // writers run on a runtime in a thread of their own, so that a hang fails this test instead of
    // blocking it.
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = Arc::new(open(&dir));
    const N_TASKS: usize = 24;
    const N_ROUNDS: usize = 40;
    let (done, finished) = std::sync::mpsc::channel();
    let writers = outbox.clone();

    // Act
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let tasks: Vec<_> = (0..N_TASKS)
                .map(|task| {
                    let outbox = writers.clone();
                    tokio::spawn(async move {
                        for round in 0..N_ROUNDS {
                            append(&outbox, &[&format!("task {task} round {round}")]).await;
                            let cursor = Cursor::LastSaidId.of(&format!("region {task}"));
                            outbox
                                .set_cursors(&[(cursor, round as i64)])
                                .await
                                .expect("cursor");
                        }
                    })
                })
                .collect();
            futures_util::future::join_all(tasks).await;
        });
        let _ = done.send(());
    });

    // Assert: every write and flush came back (a hang is a failure, not a slow machine: a minute
    // is a hundred times what these take).
    let result = finished.recv_timeout(std::time::Duration::from_secs(60));
    assert!(result.is_ok(), "writers and flushes hung");
    assert_eq!(outbox.len(), N_TASKS * N_ROUNDS);
}
