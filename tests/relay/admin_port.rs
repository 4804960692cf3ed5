//! The operator's port (`http.listen`) cannot starve the relay: clients that open connections and
//! never finish their request are closed, at most a bounded number are held at once, and `/readyz`
//! still answers; the process raises its soft open-file limit at start.

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::health::Observed;
use crate::helpers::{PATIENCE, TestEnv, cycles, eventually, sigterm};
use crate::secrets::spawn_logged_in;

/// Whether the relay has closed `stream` (an end of file or a reset), without waiting.
fn is_closed(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match stream.try_read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(err) => err.kind() != std::io::ErrorKind::WouldBlock,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_are_bounded_and_closed_and_readyz_still_answers() {
    // Arrange: a relay with its endpoint, and many clients that each send half a request head
    // or nothing (RELAY_TEST_HALF_OPEN of them; more than the relay holds at once).
    let env = TestEnv::start().await;
    let relay = Observed::start(&env, "", &[("http.listen", "127.0.0.1:0")]).await;
    let n_clients = cycles("RELAY_TEST_HALF_OPEN", 300);
    let mut clients = Vec::with_capacity(n_clients);
    for n in 0..n_clients {
        let mut stream = TcpStream::connect(relay.addr).await.expect("connects");
        // Every other client sends nothing at all.
        if n % 2 == 0 {
            stream
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: relay\r\n")
                .await
                .expect("half a head");
        }
        clients.push(stream);
    }

    // Act and assert: the relay keeps only a bounded number of them...
    eventually(
        PATIENCE,
        "at most 64 half-open connections held",
        || async { clients.iter().filter(|c| !is_closed(c)).count() <= 64 },
    )
    .await;
    // ...answers /readyz meanwhile (a try may meet the limit: it is tried again)...
    eventually(PATIENCE, "/readyz answers", || async {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
            .get(format!("http://{}/readyz", relay.addr))
            .send()
            .await
            .is_ok()
    })
    .await;
    // ...and closes every one whose head never ends.
    eventually(PATIENCE, "every half-open connection closed", || async {
        clients.iter().all(is_closed)
    })
    .await;
    relay.stop().await;
}

// Multi-threaded: `sigterm` blocks while the simulators must go on answering the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_open_file_limit_is_raised_to_the_hard_one_at_start() {
    // Arrange: a relay started under systemd's default soft limit of 1,024 (and a hard limit above).
    let env = TestEnv::start().await;
    let (relay, log) = spawn_logged_in(&env, &["prlimit", "--nofile=1024:4096", "--"]).await;

    // Act
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", relay.id())).expect("limits");
    let status = sigterm(relay);

    // Assert: the soft limit is the hard one now, and the log says so.
    assert!(status.success(), "{status:?}");
    let open_files: Vec<&str> = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("a line")
        .split_whitespace()
        .collect();
    assert_eq!(
        open_files.get(3..5),
        Some(&["4096", "4096"][..]),
        "{limits}"
    );
    let log = log.lock().expect("log").clone();
    assert!(log.contains("raised the soft open-file limit"), "{log}");
}
