//! The harness: both simulators on `127.0.0.1:0`, the relay configured from `config/default.toml`
//! plus overrides, and `eventually` to wait on a condition with a deadline.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use opensim_chat_relay::app::Relay;
use opensim_chat_relay::config::Settings;
use opensim_chat_relay::metrics::Stats;
use opensim_chat_relay::outbox::Outbox;
use opensim_chat_relay::sim::cms::{
    CmsDialect, CmsHandle, CmsSim, CmsSimSettings, Permissions, StoredChat,
};
use opensim_chat_relay::sim::lookingglass::{Dialect, ViewerHandle, ViewerSim, ViewerSimSettings};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The viewer machine's zone in the tests: not the CMS's, and (on CI) not the machine's.
pub const VIEWER_ZONE: &str = "America/New_York";
/// The CMS's zone in the tests.
pub const CMS_ZONE: &str = "Europe/Amsterdam";
/// The relay's CMS account.
pub const RELAY_USER: &str = "relay";
/// Its password (a test value).
pub const RELAY_PASSWORD: &str = "relay-test-password-0451";
/// The viewer's own avatar.
pub const OWN_NAME: &str = "Relay Bot";
/// A speaker whose lines the CMS refuses, once `TestEnv::start_relay_with_a_ghost` maps it to user
/// 999, which the CMS does not have: its row fails the foreign key (silently inside a batch on
/// OpenSim-CMS 1.1), so its line ends in the dead letters.
pub const GHOST: &str = "Ghost Avatar";

static TRACING: LazyLock<()> = LazyLock::new(|| {
    if std::env::var_os("TEST_LOG").is_some() {
        opensim_chat_relay::telemetry::init("debug", opensim_chat_relay::config::LogFormat::Pretty);
    }
});

/// Both simulators and a directory for the outbox and config files.
pub struct TestEnv {
    pub viewer: ViewerSim,
    pub cms: CmsSim,
    pub lg: ViewerHandle,
    pub db: CmsHandle,
    pub dir: TempDir,
    /// The viewer's zone, which the relay is told too.
    viewer_zone: String,
}

/// Which variants of the simulators a test needs.
pub struct SimOptions {
    pub viewer_dialect: Dialect,
    /// An IANA name.
    pub viewer_zone: String,
    pub cms_dialect: CmsDialect,
    pub debug_noise: bool,
}

impl SimOptions {
    /// What `TestEnv::start` uses: LookingGlass in `VIEWER_ZONE`, the stock CMS without noise.
    pub fn standard() -> SimOptions {
        SimOptions {
            viewer_dialect: Dialect::Lookingglass,
            viewer_zone: VIEWER_ZONE.to_owned(),
            cms_dialect: CmsDialect::Stock,
            debug_noise: false,
        }
    }
}

/// A relay running in this process.
pub struct RunningRelay {
    pub token: CancellationToken,
    pub stats: Arc<Stats>,
    pub outbox: Arc<Outbox>,
    task: JoinHandle<anyhow::Result<()>>,
    /// The relay runs on a runtime of its own, so a kill can drop all of its tasks at once.
    runtime: tokio::runtime::Runtime,
}

impl TestEnv {
    pub async fn start() -> TestEnv {
        TestEnv::start_with(SimOptions::standard()).await
    }

    pub async fn start_with(options: SimOptions) -> TestEnv {
        LazyLock::force(&TRACING);
        let localhost: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let viewer = ViewerSim::start(ViewerSimSettings {
            listen: localhost,
            dialect: options.viewer_dialect,
            timezone: options.viewer_zone.parse().expect("zone"),
            own_name: OWN_NAME.into(),
            crash_on_abort: false,
        })
        .await
        .expect("viewer simulator starts");
        let cms = CmsSim::start(CmsSimSettings {
            listen: localhost,
            dialect: options.cms_dialect,
            timezone: CMS_ZONE.parse().expect("zone"),
            debug_noise: options.debug_noise,
        })
        .await
        .expect("cms simulator starts");
        let db = cms.handle();
        db.add_user(
            RELAY_USER,
            RELAY_PASSWORD,
            "Chat",
            "Relay",
            Permissions::relay(),
        );
        let lg = viewer.handle();
        TestEnv {
            viewer,
            cms,
            lg,
            db,
            dir: tempfile::tempdir().expect("tempdir"),
            viewer_zone: options.viewer_zone,
        }
    }

    /// A CMS user whose avatar (`name`) is linked and confirmed on grid 1.
    pub fn linked_user(&self, name: &str, username: &str) -> i64 {
        let (first, last) = name.split_once(' ').unwrap_or((name, ""));
        let id = self
            .db
            .add_user(username, "user-password", first, last, Permissions::relay());
        self.lg.add_avatar(name);
        self.db.link_avatar(1, &self.lg.avatar_uuid(name), id, true);
        id
    }

    /// What every test relay is given: the simulators' URLs and zones, the relay's account, fast
    /// intervals, an outbox in the test directory, a health endpoint on a free port.
    fn base_overrides(&self) -> Vec<(&'static str, String)> {
        vec![
            ("viewer.chat_url", self.viewer.chat_url()),
            ("viewer.avatars_url", self.viewer.avatars_url()),
            ("viewer.status_url", self.viewer.status_url()),
            ("viewer.poll_interval", "20ms".into()),
            ("viewer.timezone", self.viewer_zone.clone()),
            ("cms.base_url", self.cms.base_url()),
            ("cms.username", RELAY_USER.into()),
            ("cms.password", RELAY_PASSWORD.into()),
            ("cms.timezone", CMS_ZONE.into()),
            ("cms.request_timeout", "5s".into()),
            ("cms.max_requests_per_second", "0".into()),
            (
                "outbox.path",
                self.dir
                    .path()
                    .join("outbox")
                    .to_string_lossy()
                    .into_owned(),
            ),
            ("retry.initial", "20ms".into()),
            ("retry.max", "200ms".into()),
            ("http.listen", "127.0.0.1:0".into()),
        ]
    }

    /// The settings of a relay pointed at the simulators, with fast intervals, `toml` layered as the
    /// config file and `overrides` on top.
    pub fn settings(&self, toml: &str, overrides: &[(&str, &str)]) -> Settings {
        let file = self.dir.path().join("relay.toml");
        std::fs::write(&file, toml).expect("write config");
        let base = self.base_overrides();
        let mut all: Vec<(&str, &str)> = base.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.extend_from_slice(overrides);
        Settings::load(Some(&file), &all).expect("test settings load")
    }

    /// The relay binary (`run`) as a child process, with the settings of `settings` and `overrides`
    /// given as `RELAY__SECTION__KEY` environment variables, and its stderr sent to `stderr`.
    pub fn spawn_relay_process(&self, overrides: &[(&str, &str)], stderr: Stdio) -> Child {
        let mut command = self.relay_command(overrides);
        command.stderr(stderr);
        command.spawn().expect("relay starts")
    }

    /// The command `spawn_relay_process` runs (stdout to null), for a test that wraps it.
    pub fn relay_command(&self, overrides: &[(&str, &str)]) -> Command {
        let base = self.base_overrides();
        let mut command = Command::new(env!("CARGO_BIN_EXE_opensim-chat-relay"));
        command.arg("run").stdout(Stdio::null());
        command.env_remove("RELAY_CONFIG");
        for (key, value) in base
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .chain(overrides.iter().copied())
        {
            command.env(
                format!("RELAY__{}", key.replace('.', "__").to_uppercase()),
                value,
            );
        }
        command
    }

    pub async fn start_relay(&self, toml: &str, overrides: &[(&str, &str)]) -> RunningRelay {
        let settings = self.settings(toml, overrides);
        let deadline = Instant::now() + PATIENCE;
        let relay = loop {
            match Relay::build(&settings) {
                Ok(relay) => break relay,
                // After `kill`, sled's threads may hold the lock a moment longer.
                Err(err) if err.to_string().contains("in use") && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(err) => panic!("relay builds: {err:#}"),
            }
        };
        let token = CancellationToken::new();
        let (stats, outbox) = (relay.stats(), relay.outbox());
        // The relay's threads log to whatever subscriber the test installed (some tests read logs).
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .on_thread_start(move || {
                // The guard would reset the thread's default at its drop: keep it for the thread's life.
                std::mem::forget(tracing::dispatcher::set_default(&dispatch));
            })
            .enable_all()
            .build()
            .expect("relay runtime");
        let task = runtime.spawn(relay.run_until_stopped(token.clone()));
        RunningRelay {
            token,
            stats,
            outbox,
            task,
            runtime,
        }
    }

    /// Waits until the relay has taken everything the viewer holds: the queue is empty, and the relay
    /// has asked again since, so that the answer that emptied the queue was handed out to its end
    /// (a GET drains the queue when it starts, its lines count as handed out once the write ends,
    /// and the relay sends the next GET only after it stored the previous answer).
    pub async fn viewer_drained(&self, limit: Duration) {
        eventually(limit, "the viewer's queue drained", || async {
            self.lg.queue_len() == 0
        })
        .await;
        let n_gets = self.lg.n_gets();
        eventually(limit, "the relay asked the viewer again", || async {
            self.lg.n_gets() > n_gets
        })
        .await;
    }

    /// Chat rows the CMS stored, oldest first.
    pub fn stored(&self) -> Vec<StoredChat> {
        self.db.chats()
    }

    /// The stored messages, oldest first.
    pub fn stored_messages(&self) -> Vec<String> {
        self.stored().into_iter().map(|c| c.message).collect()
    }

    /// The rows the relay stored (not those typed in the CMS), as (user, message), oldest first.
    pub fn relayed_rows(&self) -> Vec<(Option<i64>, String)> {
        self.stored()
            .into_iter()
            .filter(|c| !c.from_cms)
            .map(|c| (c.user_id, c.message))
            .collect()
    }

    /// Alice Resident (unmapped) says "line 0" to "line `n - 1`" in the viewer; returns what the
    /// CMS is to store for them, in order.
    pub fn alice_says_numbered_lines(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                self.lg.say("Alice Resident", &format!("line {i}"));
                format!("[Alice Resident] line {i}")
            })
            .collect()
    }

    /// A relay like `start_relay`'s whose `mapping.users` maps `GHOST` to user 999, which the CMS
    /// does not have.
    pub async fn start_relay_with_a_ghost(&self, overrides: &[(&str, &str)]) -> RunningRelay {
        self.start_relay(&format!("[mapping.users]\n\"{GHOST}\" = 999\n"), overrides)
            .await
    }
}

impl RunningRelay {
    /// Ends the relay abruptly, as a crash would: every task is dropped wherever it is (a POST in
    /// flight included), and nothing is flushed beyond what was already flushed.
    pub async fn kill(self) {
        let RunningRelay {
            runtime, outbox, ..
        } = self;
        runtime.shutdown_background();
        // The last reference to the sled database goes here, releasing its file lock.
        drop(outbox);
    }

    /// Waits until `n` lines are in the dead letters.
    pub async fn dead_letters_reach(&self, n: usize) {
        eventually(PATIENCE, &format!("{n} dead letters"), || async {
            self.outbox.dead_len() == n
        })
        .await;
    }

    /// Stops the relay as SIGTERM would and waits for it.
    pub async fn stop(self) {
        self.token.cancel();
        self.task
            .await
            .expect("relay task joins")
            .expect("relay stops cleanly");
        self.runtime.shutdown_background();
    }
}

/// Waits until `condition` holds, for at most `limit`; panics with `what` otherwise.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `check` says done, for as long as the count it also returns keeps growing: gives up
/// after `stall` without growth. Whether it got done. For a fault run's catch-up, whose length
/// depends on the backlog and on how busy the machine is, not on a fixed limit; the run then reports
/// its verdict (what was lost, what was duplicated) whether or not everything arrived.
pub async fn until_done_or_stalled(
    stall: Duration,
    mut check: impl FnMut() -> (bool, usize),
) -> bool {
    let mut best = 0;
    let mut since = Instant::now();
    loop {
        let (done, progress) = check();
        if done {
            return true;
        }
        if progress > best {
            best = progress;
            since = Instant::now();
        } else if since.elapsed() >= stall {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A generous limit for conditions that take milliseconds on an idle machine.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The size of a long fault run: the environment variable `var` (an operator's long run), else
/// `default` (the suite's short run).
pub fn cycles(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sends SIGTERM to a relay process and waits for its exit.
pub fn sigterm(mut relay: Child) -> ExitStatus {
    send_sigterm(relay.id());
    relay.wait().expect("reaped")
}

/// Sends SIGTERM to process `pid` (`kill -TERM`, which returns at once), without waiting for it to
/// exit: for a `tokio::process::Child` whose exit the test awaits itself.
pub fn send_sigterm(pid: u32) {
    let sent = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "kill -TERM");
}

/// The CMS's rows judged against the lines the viewer handed out, for runs driven by the simulator's
/// chatter (`spawn_chatter`: "hello #<n> from <speaker>", `n` rising).
#[derive(Debug)]
pub struct Verdict {
    /// Lines the viewer handed out.
    pub n_handed: usize,
    /// Rows the CMS stored.
    pub n_stored: usize,
    /// Handed out, never stored.
    pub lost: Vec<String>,
    /// Stored more than once (each extra row once).
    pub duplicated: Vec<String>,
    /// Rows stored after a later line of the same speaker.
    pub n_reordered: usize,
    /// Stored, never handed out.
    pub phantom: Vec<String>,
}

impl TestEnv {
    /// The stored texts, oldest first; unmapped speakers' lines arrive as "[Name] text" and the
    /// prefix is taken off.
    pub fn stored_texts(&self) -> Vec<String> {
        self.stored()
            .into_iter()
            .map(|c| {
                c.message
                    .split_once("] ")
                    .map_or(c.message.as_str(), |(_, text)| text)
                    .to_owned()
            })
            .collect()
    }

    /// Judges what the CMS holds against what the viewer handed out.
    pub fn verdict(&self) -> Verdict {
        let handed: HashSet<String> = self
            .lg
            .handed_out()
            .into_iter()
            .map(|h| h.message)
            .collect();
        let stored = self.stored_texts();
        let mut seen = HashSet::new();
        let duplicated = stored
            .iter()
            .filter(|m| !seen.insert(*m))
            .cloned()
            .collect();
        let mut last_seq: HashMap<&str, u64> = HashMap::new();
        let mut n_reordered = 0;
        for text in &stored {
            let Some((speaker, seq)) = chatter_seq(text) else {
                continue;
            };
            if last_seq.get(speaker).is_some_and(|prev| *prev > seq) {
                n_reordered += 1;
            }
            last_seq.insert(speaker, seq);
        }
        Verdict {
            n_handed: handed.len(),
            n_stored: stored.len(),
            lost: handed
                .iter()
                .filter(|m| !seen.contains(m))
                .cloned()
                .collect(),
            duplicated,
            n_reordered,
            phantom: stored
                .iter()
                .filter(|m| !handed.contains(*m))
                .cloned()
                .collect(),
        }
    }
}

/// The speaker of a chatter line and its number.
fn chatter_seq(text: &str) -> Option<(&str, u64)> {
    let (n, speaker) = text.strip_prefix("hello #")?.split_once(" from ")?;
    Some((speaker, n.parse().ok()?))
}
