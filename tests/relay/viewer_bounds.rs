//! Hostile and huge viewer answers: an answer is read to its end (cutting it would kill the real
//! viewer) but never held beyond `viewer.max_response_bytes`, an endless one is given up within a
//! memory bound, and unreadable answers repeated every poll keep the quarantine within
//! `outbox.max_quarantine_bytes`.

use std::fs::File;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use opensim_chat_relay::metrics::Stats;
use opensim_chat_relay::outbox::Outbox;
use opensim_chat_relay::sim::lookingglass::SimChatLine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::helpers::{PATIENCE, TestEnv, eventually, peak_memory, sigterm};

/// `viewer.max_response_bytes` in these tests: 1 MiB.
const MAX_RESPONSE: usize = 1 << 20;

/// The `i`-th entry of the endless answer, with the comma before it.
fn endless_entry(i: usize) -> String {
    let comma = if i > 0 { "," } else { "" };
    format!(
        r#"{comma}"k{i}":{{"Time":"20261122014005043","From":"Alice Resident","Message":"endless {i}","Type":"Normal","EntryType":"ChatTypeNormal","Position":"<1, 2, 3>","OwnerID":"11111111-2222-3333-4444-555555555555"}}"#
    )
}

/// How many entries of the endless answer end within its first `n_bytes` bytes.
fn entries_within(n_bytes: usize) -> usize {
    let mut end = 1; // the opening brace
    (0..)
        .take_while(|i| {
            end += endless_entry(*i).len();
            end <= n_bytes
        })
        .count()
}

/// A "viewer" on a raw socket whose first chat GET is answered with a chunked body that never ends
/// (chat entries one after another, the object never closed; half a second after the request, so
/// the relay's memory can be measured first). Every later request gets `{}`.
struct EndlessViewer {
    addr: SocketAddr,
    n_requests: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl EndlessViewer {
    async fn start() -> EndlessViewer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (n_requests, stop) = (Arc::new(AtomicUsize::new(0)), CancellationToken::new());
        let (counter, stopped) = (n_requests.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => return,
                    accepted = listener.accept() => {
                        if let Ok((stream, _)) = accepted {
                            tokio::spawn(serve_endless(stream, counter.clone(), stopped.clone()));
                        }
                    }
                }
            }
        });
        EndlessViewer {
            addr,
            n_requests,
            stop,
        }
    }

    fn n_requests(&self) -> usize {
        self.n_requests.load(Ordering::SeqCst)
    }
}

/// Serves one connection of the endless viewer.
async fn serve_endless(
    mut stream: TcpStream,
    n_requests: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let head_end = loop {
            if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        buffer.drain(..head_end);
        if n_requests.fetch_add(1, Ordering::SeqCst) > 0 {
            let empty = "HTTP/1.1 200 OK\r\nContent-Type: text/json\r\nContent-Length: 2\r\n\r\n{}";
            if stream.write_all(empty.as_bytes()).await.is_err() {
                return;
            }
            continue;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let head = "HTTP/1.1 200 OK\r\nContent-Type: text/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n";
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for first in (0..).step_by(256) {
            if stop.is_cancelled() {
                return;
            }
            let piece: String = (first..first + 256).map(endless_entry).collect();
            let chunk = format!("{:x}\r\n{piece}\r\n", piece.len());
            if stream.write_all(chunk.as_bytes()).await.is_err() {
                return; // the relay gave the answer up
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_viewer_answer_is_given_up_within_a_memory_bound_and_polling_goes_on() {
    // Arrange: the relay binary, its log in a file, the CMS away so the lines stay in the outbox.
    let env = TestEnv::start().await;
    let viewer = EndlessViewer::start().await;
    let chat_url = format!("http://{}/api/chat", viewer.addr);
    let log_path = env.dir.path().join("relay.log");
    let log = File::create(&log_path).expect("log file");
    let max_response = MAX_RESPONSE.to_string();
    let mut relay = env.spawn_relay_process(
        &[
            ("viewer.chat_url", &chat_url),
            ("viewer.status_url", ""),
            ("viewer.avatars_url", ""),
            ("viewer.max_response_bytes", &max_response),
            ("inworld.enabled", "false"),
            ("http.listen", ""),
            ("cms.base_url", "http://127.0.0.1:9/OpenSim-CMS/api"),
        ],
        Stdio::from(log),
    );
    eventually(PATIENCE, "the relay asks the viewer", || async {
        viewer.n_requests() >= 1
    })
    .await;
    let baseline = peak_memory(&relay);

    // Act: the answer never ends; the relay must give it up and poll again.
    let bound = baseline + MAX_RESPONSE as u64 + (32 << 20);
    let deadline = std::time::Instant::now() + PATIENCE;
    while viewer.n_requests() < 3 {
        let peak = peak_memory(&relay);
        if peak > bound || std::time::Instant::now() > deadline {
            relay.kill().expect("kill");
            relay.wait().expect("reaped");
            panic!(
                "after {} requests the relay's peak is {peak} bytes over a baseline of {baseline} (bound {bound})",
                viewer.n_requests()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let peak = peak_memory(&relay);
    assert!(sigterm(relay).success(), "clean stop");
    viewer.stop.cancel();

    // Assert: memory stayed bounded, the lines of the first MiB are stored, the operator was told
    // once.
    assert!(peak <= bound, "peak {peak} over a baseline of {baseline}");
    let outbox = Outbox::open(&env.dir.path().join("outbox"), 1 << 20).expect("outbox opens");
    assert_eq!(outbox.len(), entries_within(MAX_RESPONSE));
    let text = std::fs::read_to_string(&log_path).expect("log");
    let told: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("viewer.max_response_bytes"))
        .collect();
    assert_eq!(told.len(), 1, "{text}");
    assert!(told[0].contains("ERROR"), "{}", told[0]);
}

#[tokio::test]
async fn a_viewer_answer_over_the_limit_is_read_to_its_end_and_the_lines_before_the_limit_kept() {
    // Arrange: a backlog of about 1.3 MB in the viewer, five times a limit of 256 KiB.
    const N_LINES: usize = 5_000;
    const LIMIT: usize = 256 << 10;
    let env = TestEnv::start().await;
    env.db.set_offline(true); // keep the lines in the outbox, where the test can see them
    let padding = "word ".repeat(20);
    for i in 0..N_LINES {
        env.lg.push(SimChatLine::avatar(
            "Alice Resident",
            &format!("backlog {i} {padding}"),
        ));
    }

    // Act
    let limit = LIMIT.to_string();
    let relay = env
        .start_relay("", &[("viewer.max_response_bytes", &limit)])
        .await;
    env.viewer_drained(PATIENCE).await;
    env.lg.say("Bob Builder", "after the backlog");
    env.viewer_drained(PATIENCE).await;
    let (stats, outbox) = (relay.stats.clone(), relay.outbox.clone());
    relay.stop().await;

    // Assert: never cut, the first lines kept in order, the rest counted.
    assert_eq!(env.lg.n_aborted(), 0, "the answer was read to its end");
    assert_eq!(env.lg.handed_out().len(), N_LINES + 1);
    let backlog_bytes = env.lg.n_bytes_handed_out();
    assert!(backlog_bytes > 4 * LIMIT as u64, "{backlog_bytes}");
    let kept: Vec<String> = outbox
        .oldest(N_LINES + 1)
        .expect("outbox")
        .into_iter()
        .map(|l| l.line.message)
        .collect();
    let n_backlog = kept.len() - 1;
    assert!(
        n_backlog > 200 && n_backlog < N_LINES / 4,
        "{n_backlog} backlog lines kept"
    );
    for (i, message) in kept[..n_backlog].iter().enumerate() {
        assert!(message.starts_with(&format!("backlog {i} ")), "{message}");
    }
    assert_eq!(kept[n_backlog], "after the backlog");
    assert_eq!(Stats::get(&stats.viewer_answers_oversized), 1);
    assert!(Stats::get(&stats.viewer_bytes_discarded) > 3 * LIMIT as u64);
}

#[tokio::test]
async fn unreadable_viewer_answers_repeated_every_poll_keep_the_quarantine_bounded() {
    // Arrange: a "viewer" that answers the same 100 KB HTML page 20 times, then 20 different ones,
    // then good chat.
    let env = TestEnv::start().await;
    let page = |n: usize| format!("<html><body>{n} {}</body></html>", "x".repeat(100_000));
    let mut bodies: Vec<Vec<u8>> = (0..20).map(|_| page(0).into_bytes()).collect();
    bodies.extend((1..=20).map(|n| page(n).into_bytes()));
    bodies.push(
        br#"{"20261122014005043":{"Time":"20261122014005043","From":"Alice Resident","Message":"readable again","Type":"Normal","EntryType":"ChatTypeNormal","Position":"<1, 2, 3>","OwnerID":"11111111-2222-3333-4444-555555555555"}}"#
            .to_vec(),
    );

    // Act
    let (relay, stop) = env
        // About seven records: each holds an answer's metadata and hash, never its body.
        .start_relay_on_scripted_viewer(bodies, &[("outbox.max_quarantine_bytes", "1000")])
        .await;
    eventually(PATIENCE, "the readable line delivered", || async {
        env.stored().len() == 1
    })
    .await;
    let (stats, outbox) = (relay.stats.clone(), relay.outbox.clone());
    relay.stop().await;
    stop.cancel();

    // Assert: the repeated page kept once, the quarantine within its bound, every answer counted.
    assert!(
        outbox.quarantine_bytes() <= 1000,
        "{} bytes quarantined",
        outbox.quarantine_bytes()
    );
    let n_kept = outbox.quarantine_len() as u64;
    assert!((2..=11).contains(&n_kept), "{n_kept} records kept");
    assert_eq!(Stats::get(&stats.quarantine_repeats), 19);
    assert_eq!(n_kept - 1 + Stats::get(&stats.quarantine_full), 20);
    assert_eq!(env.stored_messages(), ["[Alice Resident] readable again"]);
}
