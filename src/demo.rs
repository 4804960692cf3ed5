//! `opensim-chat-relay demo`: both simulators and the relay in one process on free loopback ports,
//! with a temporary outbox, a few avatars chatting (one linked in the CMS, one mapped in the config,
//! one unknown, who opts out of recording with `!nolog`), and every line printed as the CMS stores
//! it; a CMS user types lines in the CMS, and each is printed as the relay says it in-world, as are
//! the privacy notice and the opt-out's confirmation.
//!
//! Demo wiring only: it uses the same `Relay` as `run`, configured through the same `Settings`.

use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::app::Relay;
use crate::cli::DemoArgs;
use crate::config::Settings;
use crate::model::FilterReason;
use crate::sim::cms::{CmsDialect, CmsSim, CmsSimSettings, Permissions};
use crate::sim::lookingglass::{Dialect, ViewerSim, ViewerSimSettings};

/// What the demo avatars say, in turn. Carol opts out after her first line: nothing she says
/// afterwards reaches the CMS.
const SCRIPT: [(&str, &str); 8] = [
    ("Alice Resident", "Hello everyone!"),
    ("Bob Builder", "Hi Alice, building a tower today."),
    ("Carol Visitor", "First time here, what is this place?"),
    (
        "Alice Resident",
        "Welcome Carol! This chat is mirrored to the CMS <3",
    ),
    ("Carol Visitor", OPT_OUT),
    (
        "Carol Visitor",
        "Then this stays between us: I am scouting for a plot.",
    ),
    ("Bob Builder", "Prices went up 100% + tax, by the way."),
    ("Carol Visitor", "Nice 😀"),
];

/// The opt-out command (`privacy.optout_command`'s default).
const OPT_OUT: &str = "!nolog";

/// The privacy notice the relay says at start.
const NOTICE: &str =
    "Local chat here is copied to the CMS. Say {optout} to opt out, {optin} to opt in again.";

/// What a CMS user types in the CMS's chat page, in turn.
const CMS_SCRIPT: [&str; 3] = [
    "Hello from the CMS! Can you hear me in-world?",
    "Meeting in the plaza at 3 + snacks & 100% fun",
    "Welcome, Carol \u{2014} this line was typed in the CMS.",
];

/// Runs the demo until `token` is cancelled or `args.duration` passes.
pub async fn run(args: DemoArgs, token: CancellationToken) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary outbox directory")?;
    let localhost = "127.0.0.1:0".parse().expect("a valid socket address");
    let viewer = ViewerSim::start(ViewerSimSettings {
        listen: localhost,
        dialect: Dialect::Lookingglass,
        timezone: chrono_tz::UTC,
        own_name: "Relay Bot".into(),
        crash_on_abort: false,
    })
    .await?;
    let cms = CmsSim::start(CmsSimSettings {
        listen: localhost,
        dialect: CmsDialect::Stock,
        timezone: chrono_tz::Europe::Amsterdam,
        debug_noise: false,
    })
    .await?;
    let db = cms.handle();
    let lg = viewer.handle();
    db.add_user(
        "relay",
        "demo-password",
        "Chat",
        "Relay",
        Permissions::relay(),
    );
    let alice = db.add_user(
        "alice",
        "alice-password",
        "Alice",
        "Resident",
        Permissions::relay(),
    );
    lg.add_avatar("Alice Resident");
    db.link_avatar(1, &lg.avatar_uuid("Alice Resident"), alice, true);
    let bob = db.add_user(
        "bob",
        "bob-password",
        "Bob",
        "Builder",
        Permissions::relay(),
    );
    let dora = db.add_user("dora", "dora-password", "Dora", "Admin", Permissions::all());

    let config_file = dir.path().join("demo.toml");
    std::fs::write(
        &config_file,
        format!("[mapping.users]\n\"Bob Builder\" = {bob}\n"),
    )?;
    let (chat_url, avatars_url, status_url, base_url) = (
        viewer.chat_url(),
        viewer.avatars_url(),
        viewer.status_url(),
        cms.base_url(),
    );
    let outbox = dir.path().join("outbox").to_string_lossy().into_owned();
    let settings = Settings::load(
        Some(&config_file),
        &[
            ("viewer.chat_url", &chat_url),
            ("viewer.avatars_url", &avatars_url),
            ("viewer.status_url", &status_url),
            ("viewer.timezone", "UTC"),
            ("cms.base_url", &base_url),
            ("cms.username", "relay"),
            ("cms.password", "demo-password"),
            ("cms.timezone", "Europe/Amsterdam"),
            ("outbox.path", &outbox),
            ("http.listen", "127.0.0.1:0"),
            ("inworld.poll_interval", "500ms"),
            ("privacy.notice", NOTICE),
        ],
    )?;
    println!("viewer simulator  {chat_url}");
    println!(
        "cms simulator     {base_url}  (Alice is linked in the CMS, Bob is in mapping.users, Carol is unknown and says {OPT_OUT})"
    );
    println!("outbox            {outbox}");
    println!(
        "--- grid -> CMS: lines as the CMS stores them; CMS -> grid: lines said in-world (Ctrl-C to stop) ---"
    );

    let relay = Relay::build(&settings)?;
    let (stats, relay_outbox) = (relay.stats(), relay.outbox());
    let relay_token = token.child_token();
    let relay_task = tokio::spawn(relay.run_until_stopped(relay_token.clone()));
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    let (mut n_ticks, mut n_said, mut n_printed) = (0u64, 0usize, 0usize);
    let (mut n_typed, mut n_heard) = (0usize, 0usize);
    loop {
        tokio::select! {
            _ = token.cancelled() => break,
            _ = ticker.tick() => {}
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            break;
        }
        n_ticks += 1;
        if n_ticks % 4 == 1 {
            let (speaker, text) = SCRIPT[n_said % SCRIPT.len()];
            lg.say(speaker, text);
            n_said += 1;
        }
        // Dora types in the CMS every 3 s, starting once the relay has read the CMS once.
        if n_ticks % 15 == 14 {
            db.add_cms_line(1, dora, CMS_SCRIPT[n_typed % CMS_SCRIPT.len()]);
            n_typed += 1;
        }
        print_new(&db, &lg, &mut n_printed, &mut n_heard);
    }
    relay_token.cancel();
    relay_task.await.context("relay task")??;
    // What the relay stored or said while it stopped is printed too, so that the counts add up.
    print_new(&db, &lg, &mut n_printed, &mut n_heard);
    let n_commands = stats.n_filtered(FilterReason::PrivacyCommand);
    let n_kept_out = stats.n_filtered(FilterReason::OptedOut);
    let n_waiting = relay_outbox.len() as u64;
    let n_stored = n_printed as u64;
    // Lines the relay had not yet read from the viewer when it stopped (the viewer keeps them).
    let n_unread = (n_said as u64).saturating_sub(n_stored + n_commands + n_kept_out + n_waiting);
    let n_cms_said = lg
        .said()
        .iter()
        .filter(|said| is_from_cms(&said.message))
        .count();
    println!(
        "--- grid -> cms: {n_said} lines said by avatars = {n_stored} stored by the CMS + {n_commands} {OPT_OUT} commands (never stored) + {n_kept_out} of Carol's kept out by {OPT_OUT} + {n_waiting} waiting in the outbox (sent at the next start) + {n_unread} not yet read from the viewer at the stop ---"
    );
    println!(
        "--- cms -> grid: {n_typed} lines typed in the CMS, {n_cms_said} of them said in-world (the rest come after the relay reads the CMS again); the relay said {} lines of its own (the privacy notice, {OPT_OUT}'s confirmation) ---",
        n_heard.saturating_sub(n_cms_said)
    );
    viewer.stop().await;
    cms.stop().await;
    Ok(())
}

/// Whether a line said in-world is one the CMS user typed (the relay's own lines are the rest).
fn is_from_cms(message: &str) -> bool {
    CMS_SCRIPT.iter().any(|typed| message.ends_with(typed))
}

/// Prints the lines the CMS stored and the lines said in-world since the last call.
fn print_new(
    db: &crate::sim::cms::CmsHandle,
    lg: &crate::sim::lookingglass::ViewerHandle,
    n_printed: &mut usize,
    n_heard: &mut usize,
) {
    for chat in db.chats().iter().filter(|c| !c.from_cms).skip(*n_printed) {
        let who = chat
            .user_id
            .map_or("Anonymous".to_owned(), |id| format!("user {id}"));
        println!(
            "grid -> cms #{:<4} {}  {:<12} {}",
            chat.id, chat.timestamp, who, chat.message
        );
        *n_printed += 1;
    }
    for said in lg.said().iter().skip(*n_heard) {
        let from = if is_from_cms(&said.message) {
            "cms -> grid "
        } else {
            "relay       "
        };
        println!(
            "{from} said in-world on channel {}: {}",
            said.channel, said.message
        );
        *n_heard += 1;
    }
}
