//! systemd notifications: `READY=1` once polling starts, `WATCHDOG=1` keep-alives while the loops
//! run, `STOPPING=1` at shutdown; in process (the notifier passed in) and from the binary (systemd's
//! `NOTIFY_SOCKET` and `WATCHDOG_USEC` in its environment).

use std::process::Stdio;
use std::time::{Duration, Instant};

use opensim_chat_relay::app::Relay;
use opensim_chat_relay::notify::Notifier;
use tokio::net::UnixDatagram;
use tokio_util::sync::CancellationToken;

use crate::helpers::{PATIENCE, RELAY_PASSWORD, RELAY_USER, TestEnv, send_sigterm};

/// Receives notifications until one contains `wanted`; returns everything received so far.
async fn receive_until(socket: &UnixDatagram, wanted: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + PATIENCE;
    let mut buf = vec![0u8; 4096];
    while !seen.iter().any(|m| m.contains(wanted)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, socket.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {wanted} within {PATIENCE:?}; got {seen:?}"))
            .expect("recv");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
}

#[tokio::test]
async fn ready_then_watchdog_keep_alives_then_stopping_are_sent() {
    let env = TestEnv::start().await;
    let path = env.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    let notifier = Notifier::new(
        path.to_string_lossy().into_owned(),
        Some(Duration::from_millis(200)),
    );
    let relay = Relay::build(&env.settings("", &[]))
        .expect("builds")
        .with_notifier(notifier);
    let token = CancellationToken::new();
    let task = tokio::spawn(relay.run_until_stopped(token.clone()));

    let mut seen = Vec::new();
    receive_until(&socket, "READY=1", &mut seen).await;
    assert!(seen[0].starts_with("READY=1"), "{seen:?}");
    let after_ready = seen.len();
    receive_until(&socket, "WATCHDOG=1", &mut seen).await;
    // A second keep-alive: they keep coming at half the watchdog period.
    seen.retain(|m| m != "WATCHDOG=1");
    receive_until(&socket, "WATCHDOG=1", &mut seen).await;
    token.cancel();
    receive_until(&socket, "STOPPING=1", &mut seen).await;
    task.await.expect("joins").expect("stops cleanly");

    assert!(after_ready >= 1);
}

#[tokio::test]
async fn the_binary_notifies_the_socket_systemd_names_in_its_environment() {
    let env = TestEnv::start().await;
    let path = env.dir.path().join("systemd-notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    let config = env.dir.path().join("notify.toml");
    std::fs::write(
        &config,
        format!(
            "[viewer]\nchat_url = \"{}\"\nstatus_url = \"{}\"\navatars_url = \"\"\npoll_interval = \"50ms\"\n\
             [cms]\nbase_url = \"{}\"\nusername = \"{RELAY_USER}\"\n\
             [outbox]\npath = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
            env.viewer.chat_url(),
            env.viewer.status_url(),
            env.cms.base_url(),
            env.dir.path().join("notify-outbox").display(),
        ),
    )
    .expect("write config");
    // The password comes as systemd's LoadCredential= would hand it over: a file.
    let password_file = env.dir.path().join("cms-password");
    std::fs::write(&password_file, format!("{RELAY_PASSWORD}\n")).expect("write password");

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_opensim-chat-relay"))
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "300000")
        .env("RELAY__CMS__PASSWORD_FILE", &password_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("relay starts");
    let mut seen = Vec::new();
    receive_until(&socket, "READY=1", &mut seen).await;
    receive_until(&socket, "WATCHDOG=1", &mut seen).await;
    env.lg.say("Alice Resident", "under systemd");
    crate::helpers::eventually(PATIENCE, "the line delivered", || async {
        env.stored().len() == 1
    })
    .await;
    send_sigterm(child.id().expect("pid"));
    receive_until(&socket, "STOPPING=1", &mut seen).await;
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits")
        .expect("wait");

    assert_eq!(status.code(), Some(0));
}
