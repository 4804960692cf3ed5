//! The outbox fills its disk itself (a long CMS outage on a small file system): delivery still
//! removes what the CMS confirms, the relay takes lines again once there is room, and the space the
//! outbox takes on disk stays within the stated factor of `outbox.max_bytes`.
//!
//! The disk is a small tmpfs that only the relay sees: the relay binary runs under `unshare
//! --user --map-root-user --mount` (util-linux; an unprivileged user namespace, so no root is
//! needed), which mounts the tmpfs over the outbox's directory first. The test reads the outbox
//! through `/proc/<pid>/root`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use opensim_chat_relay::sim::lookingglass::spawn_chatter;
use tokio_util::sync::CancellationToken;

use crate::disk_full::{catch_up, outbox_ready_again};
use crate::helpers::{
    PATIENCE, TestEnv, collect_stderr, eventually, health_port, metric, metrics, readyz, sigterm,
};

/// The relay binary in a mount namespace of its own, with a tmpfs of `size` on `disk`.
fn relay_on_small_disk(
    env: &TestEnv,
    disk: &Path,
    size: &str,
    overrides: &[(&str, &str)],
) -> Child {
    std::fs::create_dir_all(disk).expect("mount point");
    let outbox = disk.join("outbox");
    let outbox = outbox.to_string_lossy();
    let mut all = vec![
        ("outbox.path", outbox.as_ref()),
        ("inworld.enabled", "false"),
        ("log.format", "json"),
    ];
    all.extend_from_slice(overrides);
    let relay = env.relay_command(&[], &all);
    let mut command = Command::new("unshare");
    command
        .args(["--user", "--map-root-user", "--mount", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o "size=$1" tmpfs "$2" && shift 2 && exec "$@""#)
        .args(["sh", size])
        .arg(disk)
        .arg(relay.get_program())
        .args(relay.get_args())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (key, value) in relay.get_envs() {
        match value {
            Some(value) => command.env(key, value),
            None => command.env_remove(key),
        };
    }
    command
        .spawn()
        .expect("unshare runs (util-linux, with unprivileged user namespaces)")
}

/// The bytes of every file below `dir`.
fn du(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => du(&entry.path()),
            Ok(meta) => std::os::unix::fs::MetadataExt::blocks(&meta) * 512,
            Err(_) => 0,
        })
        .sum()
}

/// `dir` as the process `pid` sees it.
fn seen_by(pid: u32, dir: &Path) -> PathBuf {
    Path::new(&format!("/proc/{pid}/root")).join(dir.strip_prefix("/").expect("absolute"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_that_filled_its_disk_still_removes_what_the_cms_confirmed() {
    let env = TestEnv::start().await;
    let disk = env.dir.path().join("disk");
    env.db.set_offline(true);
    let mut relay = relay_on_small_disk(&env, &disk, "8m", &[("outbox.reserve_bytes", "4194304")]);
    let log = collect_stderr(&mut relay);
    let port = health_port(&log).await;
    let pid = relay.id();

    // A long outage while avatars chat: the outbox grows until its disk is full.
    let chatting = CancellationToken::new();
    let chatter = spawn_chatter(env.lg.clone(), 1000.0, chatting.clone());
    eventually(Duration::from_secs(120), "the disk full", || async {
        readyz(port).await.is_some_and(|body| {
            body["checks"]["outbox"]["reason"]
                .as_str()
                .is_some_and(|reason| reason.contains("No space left"))
        })
    })
    .await;
    chatting.cancel();
    chatter.await.expect("chatter stops");
    let text = metrics(port).await;
    let on_disk = du(&seen_by(pid, &disk.join("outbox")));
    eprintln!(
        "full: {} lines, {} bytes of records, {on_disk} bytes on disk",
        metric(&text, "opensim_chat_relay_outbox_lines").unwrap_or(-1.0),
        metric(&text, "opensim_chat_relay_outbox_bytes").unwrap_or(-1.0),
    );

    // The CMS is back: what it confirms leaves the outbox, and the viewer is read again.
    env.db.set_offline(false);
    catch_up(&env, &log).await;
    let text = metrics(port).await;
    eprintln!(
        "after: {} handed, {} stored, {} lines left",
        env.lg.handed_out().len(),
        env.stored().len(),
        metric(&text, "opensim_chat_relay_outbox_lines").unwrap_or(-1.0),
    );
    eventually(PATIENCE, "the outbox empty", || async {
        metric(&metrics(port).await, "opensim_chat_relay_outbox_lines") == Some(0.0)
    })
    .await;
    outbox_ready_again(port).await;
    assert!(sigterm(relay).success(), "clean stop");
    let log = log.lock().expect("log").clone();
    assert!(
        log.contains("its reserve is given back") && log.contains("viewer polling resumes"),
        "the operator is told: {log}"
    );

    let verdict = env.verdict();
    assert!(verdict.lost.is_empty(), "lost: {}", verdict.lost.len());
    assert!(verdict.duplicated.is_empty(), "{:?}", verdict.duplicated);
    assert!(verdict.n_handed > 100);
}
