//! `opensim-chat-relay sim viewer`: the command-line options of the simulated viewer and the loop
//! that serves it, prints what is said in-world, and fails when the viewer "crashed".
//!
//! It must not reach into the request handling: it starts a [`ViewerSim`], generates chatter and
//! reads what the viewer said through its handle.

use std::net::SocketAddr;

use chrono_tz::Tz;
use tokio_util::sync::CancellationToken;

use crate::sim::lookingglass::chatter::{ChatterStyle, spawn_chatter_styled};
use crate::sim::lookingglass::{Dialect, REGION_NAME, ViewerSim, ViewerSimSettings};
use crate::sim::parse_timezone;

/// `opensim-chat-relay sim viewer`: serve the simulated viewer until Ctrl-C.
#[derive(clap::Args, Debug, Clone)]
pub struct ViewerArgs {
    /// Address to listen on. The viewer accepts only requests whose Host header names this
    /// address (KeeKee: `localhost:PORT`); `0.0.0.0` accepts any Host.
    #[arg(long, default_value = "127.0.0.1:9144")]
    pub listen: SocketAddr,
    /// Which implementation to simulate.
    #[arg(long, value_enum, default_value_t = Dialect::Lookingglass)]
    pub dialect: Dialect,
    /// The viewer machine's time zone (IANA name), used for the 12-hour `Time` field.
    #[arg(long, default_value = "UTC", value_parser = parse_timezone)]
    pub timezone: Tz,
    /// The viewer's own avatar name, shown by /api/LLLP/status.
    #[arg(long, default_value = "Relay Bot")]
    pub own_name: String,
    /// The region the viewer is logged in to (and the chatter avatars stand in), as its status
    /// names it: a relay's `viewer.region` or `[[regions]]` name.
    #[arg(long, default_value = REGION_NAME)]
    pub region: String,
    /// Exit with an error, as the real viewer dies, when a client abandons a response mid-write.
    #[arg(long)]
    pub crash_on_abort: bool,
    /// Lines per second of generated avatar chat (0 = none).
    #[arg(long, default_value_t = 0.0)]
    pub chatter: f64,
    /// End each chatter line with ` @<unix microseconds>` of the moment it was said, so a load test
    /// can measure capture → CMS latency across processes.
    #[arg(long)]
    pub chatter_stamp: bool,
    /// Pad each chatter line with words to at least this many bytes (0 = no padding).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub chatter_bytes: usize,
}

/// Runs the simulated viewer for the CLI: prints what it serves and, line by line, what is said
/// in-world; returns an error if it "crashed".
pub async fn run_cli(args: ViewerArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if !args.chatter.is_finite() || args.chatter < 0.0 {
        anyhow::bail!("--chatter must be a number of lines per second, 0 or more");
    }
    let sim = ViewerSim::start(ViewerSimSettings {
        listen: args.listen,
        dialect: args.dialect,
        timezone: args.timezone,
        own_name: args.own_name.clone(),
        crash_on_abort: args.crash_on_abort,
    })
    .await?;
    let handle = sim.handle();
    handle.start_in_region(&args.region);
    println!(
        "viewer simulator ({:?}, {}, own avatar {:?} in region {:?}) on {}",
        args.dialect,
        args.timezone,
        args.own_name,
        args.region,
        sim.addr()
    );
    println!("  chat:    {}", sim.chat_url());
    println!("  avatars: {}", sim.avatars_url());
    println!("  status:  {}", sim.status_url());

    let style = ChatterStyle {
        stamp: args.chatter_stamp,
        min_bytes: args.chatter_bytes,
    };
    let chatter = spawn_chatter_styled(handle.clone(), args.chatter, style, shutdown.child_token());
    let mut n_printed = 0;
    let outcome = loop {
        for said in handle.said().iter().skip(n_printed) {
            println!(
                "said in-world: channel {} {}: {}",
                said.channel, said.chat_type, said.message
            );
            n_printed += 1;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            () = sim.crashed() => break Err(anyhow::anyhow!(
                "the viewer crashed: a client abandoned a chat response mid-write"
            )),
            () = sim.shared.said_notify.notified() => {}
        }
    };
    chatter.abort();
    sim.stop().await;
    outcome
}
