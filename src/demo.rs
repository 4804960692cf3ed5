//! `opensim-chat-relay demo`: both simulators and the relay in one process on free loopback ports,
//! with a temporary outbox. One relay serves two regions, Welcome and Sandbox, each with its own
//! simulated viewer (a `[[regions]]` table each). A few avatars chat in each (one linked in the CMS,
//! one mapped in the config who is in both regions, unknown ones, one of whom opts out of recording
//! with `!nolog`), and every line is printed as the CMS stores it, with the region it was said in; a
//! CMS user types lines in the CMS, and each is printed as the relay says it in each region, as are
//! the privacy notices and the opt-out's confirmation. The closing lines add up region by region.
//!
//! Demo wiring only: it uses the same `Relay` as `run`, configured through the same `Settings`.

use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::app::Relay;
use crate::cli::DemoArgs;
use crate::cms::wire::sanitize_message;
use crate::config::Settings;
use crate::model::FilterReason;
use crate::sim::cms::{CmsDialect, CmsHandle, CmsSim, CmsSimSettings, Permissions};
use crate::sim::lookingglass::{Dialect, ViewerHandle, ViewerSim, ViewerSimSettings};

/// What the demo avatars say in Welcome, in turn. Carol opts out after her first line: nothing she
/// says afterwards reaches the CMS.
const WELCOME_SCRIPT: [(&str, &str); 8] = [
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

/// What the demo avatars say in Sandbox, in turn: Bob (mapped in the config) is here too.
const SANDBOX_SCRIPT: [(&str, &str); 4] = [
    ("Erin Explorer", "Anyone in the Sandbox? Testing a boat."),
    ("Bob Builder", "Over here, Erin: the dock is finished."),
    (
        "Erin Explorer",
        "Does this region's chat reach the CMS too?",
    ),
    ("Bob Builder", "It does, through the same relay."),
];

/// The demo's regions: each name, and what is said there.
const REGIONS: [(&str, &[(&str, &str)]); 2] =
    [("Welcome", &WELCOME_SCRIPT), ("Sandbox", &SANDBOX_SCRIPT)];

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

/// One demo region: its simulated viewer and what was said and printed there.
struct DemoRegion {
    name: &'static str,
    script: &'static [(&'static str, &'static str)],
    viewer: ViewerSim,
    lg: ViewerHandle,
    /// Lines its avatars said.
    n_said: usize,
    /// Lines the CMS stored from it, printed.
    n_printed: usize,
    /// Lines said in-world there, printed.
    n_heard: usize,
}

impl DemoRegion {
    /// Whether a CMS row's text is one said in this region (the scripts share no line), as the
    /// relay sends it (`<` and `>` made harmless for the CMS's pages).
    fn said_here(&self, message: &str) -> bool {
        self.script
            .iter()
            .any(|(_, text)| *text != OPT_OUT && message.ends_with(&sanitize_message(text)))
    }
}

/// Runs the demo until `token` is cancelled or `args.duration` passes.
pub async fn run(args: DemoArgs, token: CancellationToken) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary outbox directory")?;
    let localhost = "127.0.0.1:0".parse().expect("a valid socket address");
    let mut regions = Vec::new();
    for (name, script) in REGIONS {
        let viewer = ViewerSim::start(ViewerSimSettings {
            listen: localhost,
            dialect: Dialect::Lookingglass,
            timezone: chrono_tz::UTC,
            own_name: "Relay Bot".into(),
            crash_on_abort: false,
        })
        .await?;
        let lg = viewer.handle();
        // Each viewer is logged in to its region: the relay checks it is where its entry says.
        lg.start_in_region(name);
        regions.push(DemoRegion {
            name,
            script,
            viewer,
            lg,
            n_said: 0,
            n_printed: 0,
            n_heard: 0,
        });
    }
    let cms = CmsSim::start(CmsSimSettings {
        listen: localhost,
        dialect: CmsDialect::Stock,
        timezone: chrono_tz::Europe::Amsterdam,
        debug_noise: false,
    })
    .await?;
    let db = cms.handle();
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
    let welcome = &regions[0].lg;
    welcome.add_avatar("Alice Resident");
    db.link_avatar(1, &welcome.avatar_uuid("Alice Resident"), alice, true);
    let bob = db.add_user(
        "bob",
        "bob-password",
        "Bob",
        "Builder",
        Permissions::relay(),
    );
    let dora = db.add_user("dora", "dora-password", "Dora", "Admin", Permissions::all());

    // One relay, a [[regions]] table per region; [viewer] holds what they share.
    let mut config = format!(
        "[mapping.users]\n\"Bob Builder\" = {bob}\n\n[cms]\nanonymous_format = \"[{{name}} in {{region}}] {{message}}\"\n"
    );
    for region in &regions {
        config.push_str(&format!(
            "\n[[regions]]\nname = \"{}\"\nchat_url = \"{}\"\navatars_url = \"{}\"\nstatus_url = \"{}\"\n",
            region.name,
            region.viewer.chat_url(),
            region.viewer.avatars_url(),
            region.viewer.status_url()
        ));
    }
    let config_file = dir.path().join("demo.toml");
    std::fs::write(&config_file, config)?;
    let base_url = cms.base_url();
    let outbox = dir.path().join("outbox").to_string_lossy().into_owned();
    let settings = Settings::load(
        Some(&config_file),
        &[
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
    for region in &regions {
        println!(
            "viewer simulator  {:<8} {}",
            region.name,
            region.viewer.chat_url()
        );
    }
    println!(
        "cms simulator     {base_url}  (Alice is linked in the CMS, Bob is in mapping.users, Carol and Erin are unknown, Carol says {OPT_OUT})"
    );
    println!("outbox            {outbox}");
    println!(
        "--- one relay, two regions. grid -> CMS: lines as the CMS stores them; CMS -> grid: lines said in-world in each region (Ctrl-C to stop) ---"
    );

    let relay = Relay::build(&settings)?;
    let (region_stats, relay_outbox) = (relay.region_stats(), relay.outbox());
    let relay_token = token.child_token();
    let relay_task = tokio::spawn(relay.run_until_stopped(relay_token.clone()));
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    let (mut n_ticks, mut n_typed, mut n_rows) = (0u64, 0usize, 0usize);
    loop {
        tokio::select! {
            _ = token.cancelled() => break,
            _ = ticker.tick() => {}
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            break;
        }
        n_ticks += 1;
        // A line in Welcome, then one in Sandbox, 400 ms apart.
        if n_ticks % 2 == 1 {
            let region = &mut regions[usize::from(n_ticks % 4 == 3)];
            let (speaker, text) = region.script[region.n_said % region.script.len()];
            region.lg.say(speaker, text);
            region.n_said += 1;
        }
        // Dora types in the CMS every 3 s, starting once the relay has read the CMS once.
        if n_ticks % 15 == 14 {
            db.add_cms_line(1, dora, CMS_SCRIPT[n_typed % CMS_SCRIPT.len()]);
            n_typed += 1;
        }
        print_new(&db, &mut regions, &mut n_rows);
    }
    relay_token.cancel();
    relay_task.await.context("relay task")??;
    // What the relay stored or said while it stopped is printed too, so that the counts add up.
    print_new(&db, &mut regions, &mut n_rows);
    let waiting = relay_outbox
        .oldest(relay_outbox.len())
        .context("reading the outbox")?;
    for region in &regions {
        let stats = region_stats
            .iter()
            .find(|(name, _)| name == region.name)
            .map(|(_, stats)| stats.clone())
            .context("the relay serves every demo region")?;
        let n_commands = stats.n_filtered(FilterReason::PrivacyCommand);
        let n_kept_out = stats.n_filtered(FilterReason::OptedOut);
        let n_waiting = waiting
            .iter()
            .filter(|pending| pending.line.region == region.name)
            .count() as u64;
        let (n_said, n_stored) = (region.n_said as u64, region.n_printed as u64);
        // Lines the relay had not yet read from the viewer when it stopped (the viewer keeps them).
        let n_unread = n_said.saturating_sub(n_stored + n_commands + n_kept_out + n_waiting);
        println!(
            "--- grid -> cms in {}: {n_said} lines said by avatars = {n_stored} stored by the CMS + {n_commands} {OPT_OUT} commands (never stored) + {n_kept_out} kept out by {OPT_OUT} + {n_waiting} waiting in the outbox (sent at the next start) + {n_unread} not yet read from the viewer at the stop ---",
            region.name
        );
    }
    for region in &regions {
        let n_cms_said = region
            .lg
            .said()
            .iter()
            .filter(|said| is_from_cms(&said.message))
            .count();
        println!(
            "--- cms -> grid in {}: {n_typed} lines typed in the CMS, {n_cms_said} of them said in-world (the rest come after the relay reads the CMS again); the relay said {} lines of its own (the privacy notice, {OPT_OUT}'s confirmation) ---",
            region.name,
            region.n_heard.saturating_sub(n_cms_said)
        );
    }
    for region in regions {
        region.viewer.stop().await;
    }
    cms.stop().await;
    Ok(())
}

/// Whether a line said in-world is one the CMS user typed (the relay's own lines are the rest).
fn is_from_cms(message: &str) -> bool {
    CMS_SCRIPT.iter().any(|typed| message.ends_with(typed))
}

/// Prints the lines the CMS stored and the lines said in-world since the last call, each with its
/// region.
fn print_new(db: &CmsHandle, regions: &mut [DemoRegion], n_rows: &mut usize) {
    for chat in db.chats().iter().filter(|c| !c.from_cms).skip(*n_rows) {
        *n_rows += 1;
        let who = chat
            .user_id
            .map_or("Anonymous".to_owned(), |id| format!("user {id}"));
        let region = regions
            .iter_mut()
            .find(|region| region.said_here(&chat.message));
        // Lines the relay writes itself (a gap marker) were said in no region.
        let name = region.as_ref().map_or("", |region| region.name);
        println!(
            "grid -> cms #{:<4} {}  {:<8} {:<12} {}",
            chat.id, chat.timestamp, name, who, chat.message
        );
        if let Some(region) = region {
            region.n_printed += 1;
        }
    }
    for region in regions.iter_mut() {
        for said in region.lg.said().iter().skip(region.n_heard) {
            let from = if is_from_cms(&said.message) {
                "cms -> grid "
            } else {
                "relay       "
            };
            println!(
                "{from} said in-world in {:<8} on channel {}: {}",
                region.name, said.channel, said.message
            );
            region.n_heard += 1;
        }
    }
}
