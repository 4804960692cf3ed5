//! The command line (clap). Holds no I/O and repeats no configuration key as a flag: the configuration
//! file and `RELAY__…` variables are the one way to set the relay up.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Carries local chat between an OpenSim region (the LookingGlass viewer chat API) and the
/// OpenSim-CMS chat.
#[derive(Debug, Parser)]
#[command(name = "opensim-chat-relay", version)]
pub struct Cli {
    /// Configuration file (TOML), layered over the built-in defaults and under RELAY__SECTION__KEY
    /// environment variables.
    #[arg(long, global = true, env = "RELAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay until SIGINT or SIGTERM (the default); SIGHUP reloads mapping.users, filter.*
    /// and privacy.* from the configuration.
    Run,
    /// Print the effective configuration as TOML that loads again (the password masked), and exit;
    /// fails like `run` on a bad key or an unreadable `cms.password_file`.
    CheckConfig,
    /// Validate the configuration, then probe the viewer (never its chat URL, which would drain
    /// the chat queue) and the CMS (login, permissions, grid); one line per check with a fix for
    /// each failure. Exits non-zero when a check fails.
    Check,
    /// Exit 0 when the running relay's /healthz answers (for Docker's HEALTHCHECK).
    Healthcheck,
    /// Start both simulators and the relay on free loopback ports and show chat arriving.
    Demo(DemoArgs),
    /// Inspect and repair the outbox while the relay is stopped.
    #[command(subcommand)]
    Outbox(OutboxAction),
    /// List, add or remove the avatars who opted out of recording, while the relay is stopped.
    #[command(subcommand)]
    Privacy(PrivacyAction),
    /// Run a simulator of one of the peers (for tests, demos and compose stacks).
    #[command(subcommand)]
    Sim(SimCommand),
}

/// `outbox` actions.
#[derive(Debug, Subcommand)]
pub enum OutboxAction {
    /// Pending lines and bytes, the oldest line's age, dead letters, quarantined records.
    Stats,
    /// The oldest pending lines.
    List {
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// The dead letters, with the reason the CMS refused each.
    Dead,
    /// The quarantine: unreadable viewer answers (when, size, hash; never their text) and outbox
    /// records that could not be decoded. Each leaves after outbox.max_age.
    Quarantine,
    /// Move dead letters back to the pending lines (after fixing their cause, e.g. a mapping).
    Requeue {
        /// Ids from `outbox dead`.
        ids: Vec<u64>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Delete the dead letters (and with --quarantine the quarantined records).
    Purge {
        /// Also delete the quarantined records.
        #[arg(long)]
        quarantine: bool,
    },
}

/// `privacy` actions.
#[derive(Debug, Subcommand)]
pub enum PrivacyAction {
    /// Who opted out, by avatar UUID or by name, and since when.
    List,
    /// Opt an avatar out by name (e.g. `privacy add Alice Resident`); its lines waiting in the
    /// outbox are dropped.
    Add {
        /// The avatar's name.
        #[arg(required = true, num_args = 1..)]
        name: Vec<String>,
    },
    /// Opt an avatar in again by name: every opt-out of that name is forgotten (by name, and by
    /// UUID where the avatar opted out in-world).
    Remove {
        /// The avatar's name.
        #[arg(required = true, num_args = 1..)]
        name: Vec<String>,
    },
}

/// The simulators.
#[derive(Debug, Subcommand)]
pub enum SimCommand {
    /// The LookingGlass viewer chat interface.
    Viewer(crate::sim::lookingglass::ViewerArgs),
    /// The OpenSim-CMS 1.1 API.
    Cms(crate::sim::cms::CmsArgs),
}

/// `demo` options.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Stop after this long (e.g. "20s"); default: until Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
}
