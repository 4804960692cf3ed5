//! The harness: both simulators on `127.0.0.1:0`, the relay configured from `config/default.toml`
//! plus overrides, and `eventually` to wait on a condition with a deadline.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use opensim_chat_relay::app::Relay;
use opensim_chat_relay::config::Settings;
use opensim_chat_relay::metrics::Stats;
use opensim_chat_relay::outbox::Outbox;
use opensim_chat_relay::privacy::Privacy;
use opensim_chat_relay::sim::cms::{
    CmsDialect, CmsHandle, CmsSim, CmsSimSettings, Permissions, StoredChat,
};
use opensim_chat_relay::sim::http::{self, Reply, Response};
use opensim_chat_relay::sim::lookingglass::{Dialect, ViewerHandle, ViewerSim, ViewerSimSettings};
use serde_json::Value;
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
    /// Who opted out, as the relay keeps it (its records are in `outbox`).
    pub privacy: Arc<Privacy>,
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
        self.spawn_relay_process_with_config(None, overrides, stderr)
    }

    /// Like `spawn_relay_process`, with `--config FILE` when `config` is given (the environment
    /// still wins over it).
    pub fn spawn_relay_process_with_config(
        &self,
        config: Option<&Path>,
        overrides: &[(&str, &str)],
        stderr: Stdio,
    ) -> Child {
        let mut command = self.relay_command(&[], overrides);
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        command.stdout(Stdio::null()).stderr(stderr);
        command.spawn().expect("relay starts")
    }

    /// The command `spawn_relay_process` runs, not started: the relay binary's `run`, behind
    /// `wrapper` if one is given (e.g. `setpriv --reuid=…`, to run it as another user).
    pub fn relay_command(&self, wrapper: &[&str], overrides: &[(&str, &str)]) -> Command {
        let base = self.base_overrides();
        let binary = env!("CARGO_BIN_EXE_opensim-chat-relay");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        command.arg("run");
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
        self.start_relay_with(toml, overrides, |relay| relay).await
    }

    /// A relay like `start_relay`'s, changed by `adjust` after it is built (e.g. its shutdown grace).
    pub async fn start_relay_with(
        &self,
        toml: &str,
        overrides: &[(&str, &str)],
        adjust: impl FnOnce(Relay) -> Relay,
    ) -> RunningRelay {
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
        let relay = adjust(relay);
        let token = CancellationToken::new();
        let (stats, outbox, privacy) = (relay.stats(), relay.outbox(), relay.privacy());
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
            privacy,
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
            runtime,
            outbox,
            privacy,
            ..
        } = self;
        runtime.shutdown_background();
        // The last references to the sled database go here, releasing its file lock.
        drop(privacy);
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

/// The `/metrics` text of a relay whose health endpoint is on `port`; empty when it does not answer.
pub async fn metrics(port: u16) -> String {
    let Ok(client) = reqwest::Client::builder().no_proxy().build() else {
        return String::new();
    };
    match client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
    {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The value of the unlabelled metric `name` in a `/metrics` text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
}

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
    send_signal(pid, "TERM");
}

/// Sends the signal `name` (`TERM`, `HUP`) to process `pid`, without waiting for anything.
pub fn send_signal(pid: u32, name: &str) {
    let sent = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "kill -{name}");
}

/// Reads a relay process's stderr to its end on a thread of its own, into the returned buffer (so
/// the relay never blocks on a full pipe). The child must have been spawned with `Stdio::piped()`.
pub fn collect_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let mut stderr = child.stderr.take().expect("stderr piped");
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .expect("log")
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    log
}

/// Sets the soft file size limit of `pid` ("0" or "unlimited"), leaving the hard limit alone: at 0
/// every write to the outbox fails with EFBIG as it would with ENOSPC on a full disk.
pub fn set_file_size_limit(pid: u32, soft: &str) {
    let status = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--fsize={soft}:")])
        .status()
        .expect("prlimit runs (util-linux)");
    assert!(status.success(), "prlimit --fsize={soft}: failed");
}

/// The health endpoint's port, from the start-up line of a relay logging JSON (`log.format = json`).
pub async fn health_port(log: &Mutex<String>) -> u16 {
    let mut port = None;
    eventually(PATIENCE, "the health endpoint listens", || {
        port = log.lock().expect("log").lines().find_map(|line| {
            let line: Value = serde_json::from_str(line).ok()?;
            if !line["message"].as_str()?.starts_with("serving /healthz") {
                return None;
            }
            let addr = line["addr"].as_str()?;
            addr.rsplit_once(':')?.1.parse().ok()
        });
        std::future::ready(port.is_some())
    })
    .await;
    port.expect("a port")
}

/// The body of the relay's `/readyz` on `port` (whatever its status), `None` when it cannot be read.
pub async fn readyz(port: u16) -> Option<Value> {
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .ok()?
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
        .ok()?;
    response.json().await.ok()
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
    /// The first few of them, each with the line it came after.
    pub reordered: Vec<String>,
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
        let mut reordered = Vec::new();
        for text in &stored {
            let Some((speaker, seq)) = chatter_seq(text) else {
                continue;
            };
            if let Some(prev) = last_seq.get(speaker).filter(|prev| **prev > seq) {
                n_reordered += 1;
                if reordered.len() < 10 {
                    reordered.push(format!("{text:?} after #{prev}"));
                }
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
            reordered,
            phantom: stored
                .iter()
                .filter(|m| !handed.contains(*m))
                .cloned()
                .collect(),
        }
    }
}

impl TestEnv {
    /// The lines the viewer handed out outside `windows` (response numbers: each the last response
    /// before a kill, which may have been read but not yet flushed): every one of them must arrive.
    pub fn must_arrive(&self, windows: &HashSet<u64>) -> HashSet<String> {
        self.lg
            .handed_out()
            .into_iter()
            .filter(|h| !windows.contains(&h.response))
            .map(|h| h.message)
            .collect()
    }

    /// Waits until every line of `must_arrive` is stored, for as long as the stored rows keep
    /// growing (`until_done_or_stalled`, 30 s without growth). Whether all arrived.
    pub async fn until_arrived(&self, must_arrive: &HashSet<String>) -> bool {
        until_done_or_stalled(Duration::from_secs(30), || {
            let stored: HashSet<String> = self.stored_texts().into_iter().collect();
            (must_arrive.is_subset(&stored), stored.len())
        })
        .await
    }
}

impl Verdict {
    /// The lost lines that were not in a kill window.
    pub fn lost_outside<'a>(&'a self, must_arrive: &HashSet<String>) -> Vec<&'a String> {
        self.lost
            .iter()
            .filter(|m| must_arrive.contains(*m))
            .collect()
    }

    /// The oracle of the fault runs: nothing duplicated, nothing lost outside the kill windows, no
    /// reordering within a speaker, no row the viewer never handed out, and real traffic. `run`
    /// names the run (and its seed) in each failure.
    pub fn assert_kept(&self, must_arrive: &HashSet<String>, run: &str) {
        assert!(
            self.duplicated.is_empty(),
            "{run}: duplicates: {:?}",
            self.duplicated
        );
        let lost = self.lost_outside(must_arrive);
        assert!(
            lost.is_empty(),
            "{run}: {} lines lost outside the kill windows: {:?}",
            lost.len(),
            lost.iter().take(20).collect::<Vec<_>>()
        );
        assert_eq!(
            self.n_reordered, 0,
            "{run}: reordered: {:?}",
            self.reordered
        );
        assert!(
            self.phantom.is_empty(),
            "{run}: stored but never handed out: {:?}",
            self.phantom
        );
        assert!(self.n_handed > 100, "{run}: the run carried real traffic");
    }
}

/// The speaker of a chatter line and its number.
fn chatter_seq(text: &str) -> Option<(&str, u64)> {
    let (n, speaker) = text.strip_prefix("hello #")?.split_once(" from ")?;
    Some((speaker, n.parse().ok()?))
}

/// The relay's log lines at info and above, captured from this thread (the relay's runtime threads
/// log to the subscriber the test installed).
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

/// What keeps a capture on: the thread's subscriber, and a second dispatcher beside it. tracing
/// caches each callsite's interest for the whole process, and while one dispatcher is registered
/// it asks only the thread that reaches the callsite first (tracing-core's `Rebuilder::JustOne`):
/// a test running beside this one without a subscriber would turn that log line off for this
/// capture too. With two registered, every registered dispatcher is asked.
pub type CaptureGuard = (tracing::subscriber::DefaultGuard, tracing::Dispatch);

impl Logs {
    pub fn capture() -> (Logs, CaptureGuard) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let second = tracing::Dispatch::new(
            tracing_subscriber::fmt()
                .with_writer(std::io::sink)
                .with_max_level(tracing::Level::INFO)
                .finish(),
        );
        let guard = tracing::subscriber::set_default(subscriber);
        (logs, (guard, second))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log lock")).into_owned()
    }

    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|line| line.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The relay's peak resident memory (`VmHWM`), in bytes.
pub fn peak_memory(relay: &std::process::Child) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", relay.id())).expect("status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
        .expect("VmHWM in kB");
    kib * 1024
}

impl TestEnv {
    /// A relay like `start_relay`'s (with `overrides`) whose viewer is `scripted_viewer(bodies)`,
    /// without status and avatar URLs; and the token that stops that viewer.
    pub async fn start_relay_on_scripted_viewer(
        &self,
        bodies: Vec<Vec<u8>>,
        overrides: &[(&str, &str)],
    ) -> (RunningRelay, CancellationToken) {
        self.start_relay_on_scripted_viewer_with("", bodies, overrides)
            .await
    }

    /// Like `start_relay_on_scripted_viewer`, with `toml` as the config file.
    pub async fn start_relay_on_scripted_viewer_with(
        &self,
        toml: &str,
        bodies: Vec<Vec<u8>>,
        overrides: &[(&str, &str)],
    ) -> (RunningRelay, CancellationToken) {
        let (chat_url, stop) = scripted_viewer(bodies).await;
        let mut all = vec![
            ("viewer.chat_url", chat_url.as_str()),
            ("viewer.status_url", ""),
            ("viewer.avatars_url", ""),
        ];
        all.extend_from_slice(overrides);
        (self.start_relay(toml, &all).await, stop)
    }
}

/// A "viewer" on the simulators' HTTP server that answers each request with the next of `bodies`
/// (`200`, `text/json`), then with `{}`: its chat URL, and the token that stops it.
async fn scripted_viewer(bodies: Vec<Vec<u8>>) -> (String, CancellationToken) {
    let bodies = Arc::new(bodies);
    let n_served = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let handler = move |_request: http::Request| {
        let (bodies, n_served) = (bodies.clone(), n_served.clone());
        async move {
            let idx = n_served.fetch_add(1, Ordering::SeqCst);
            let body = bodies.get(idx).cloned().unwrap_or_else(|| b"{}".to_vec());
            Reply::Respond(Response::new(200, "text/json", body))
        }
    };
    tokio::spawn(http::serve(listener, handler, stop.clone()));
    (format!("http://{addr}/api/chat"), stop)
}
