//! `opensim-chat-relay sim cms`: the command-line options of the simulated CMS and the loop that
//! serves it and prints every chat row it stores (or, for load tests, only their count).
//!
//! It must not reach into the request handling: it starts a [`CmsSim`], steers it through its
//! [`CmsHandle`](crate::sim::cms::CmsHandle) and reads the stored rows.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono_tz::Tz;
use tokio_util::sync::CancellationToken;

use crate::sim::cms::db::{ChatRow, DATE_FORMAT};
use crate::sim::cms::{CmsDialect, CmsSim, CmsSimSettings, CostModel, Fault, Permissions};
use crate::sim::parse_timezone;

/// `sim cms`: serves a simulated OpenSim-CMS 1.1 and prints every chat line it stores.
#[derive(clap::Args, Debug, Clone)]
pub struct CmsArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// `stock` behaves as the OpenSim-CMS 1.1 code does; `documented` as its API docs say.
    #[arg(long, value_enum, default_value = "stock")]
    pub dialect: CmsDialect,
    /// The CMS's PHP time zone (IANA name).
    #[arg(long, default_value = "Europe/Amsterdam", value_parser = parse_timezone)]
    pub timezone: Tz,
    /// Print PHP warnings before the JSON and add debug fields to errors, as the example config does.
    #[arg(long)]
    pub debug_noise: bool,
    /// A user with the relay's permissions (auth 4, chat 5, user 4, grid 4); repeatable.
    #[arg(
        long = "user",
        value_name = "NAME:PASSWORD",
        default_value = "relay:relay-secret-changeme"
    )]
    pub users: Vec<String>,
    /// Fail the next N chat POSTs with `--fail-status`.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub fail_next: usize,
    /// The HTTP status `--fail-next` answers with.
    #[arg(long, value_name = "STATUS", default_value_t = 500)]
    pub fail_status: u16,
    /// Never answer the next N chat POSTs (after the `--fail-next` ones).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub hang_next: usize,
    /// Hold every other chat POST's answer this many milliseconds.
    #[arg(long, value_name = "DURATION_MS")]
    pub slow: Option<u64>,
    /// A chat GET that would return more than N rows answers PHP's "Allowed memory size
    /// exhausted" fatal error page, as PHP's `memory_limit` does (the stock 128M: about 50000).
    /// Off by default.
    #[arg(long, value_name = "N")]
    pub memory_limit_rows: Option<usize>,
    /// Print `stored N` (the number of chat rows so far) instead of every row: for load tests,
    /// where printing each row would cost more than storing it.
    #[arg(long)]
    pub quiet: bool,
    /// `fast` answers at once (the relay's own cost); `php` takes as long as a live OpenSim-CMS
    /// (2.1 ms a request, 0.3 ms a stored row, a GET by its rows and joined users).
    #[arg(long, value_enum, default_value = "fast")]
    pub cost_model: CostMode,
    /// PHP workers under `--cost-model php`: requests beyond these wait for one.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub workers: u16,
}

/// `sim cms --cost-model`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CostMode {
    /// No cost: each request is answered as soon as it is done.
    Fast,
    /// [`CostModel::php`] with `--workers`.
    Php,
}

/// Runs `sim cms` until `shutdown` is cancelled, printing each stored chat line on stdout.
pub async fn run_cli(args: CmsArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut accounts = Vec::new();
    for user in &args.users {
        let Some((name, password)) = user.split_once(':') else {
            anyhow::bail!("--user {user:?} is not NAME:PASSWORD");
        };
        anyhow::ensure!(!name.is_empty(), "--user {user:?} has an empty name");
        accounts.push((name.to_owned(), password.to_owned()));
    }
    let sim = CmsSim::start(CmsSimSettings {
        listen: args.listen,
        dialect: args.dialect,
        timezone: args.timezone,
        debug_noise: args.debug_noise,
    })
    .await?;
    let handle = sim.handle();
    if args.cost_model == CostMode::Php {
        handle.set_cost_model(Some(
            CostModel::php().with_workers(usize::from(args.workers)),
        ));
    }
    for (name, password) in &accounts {
        let id = handle.add_user(name, password, name, "", Permissions::relay());
        println!("user {id} {name:?} created with the relay's permissions");
    }
    handle.fault_next(args.fail_next, Fault::Status(args.fail_status));
    handle.fault_next(args.hang_next, Fault::Hang);
    handle.set_memory_limit_rows(args.memory_limit_rows);
    if let Some(millis) = args.slow {
        handle.fault_next(usize::MAX, Fault::Slow(Duration::from_millis(millis)));
    }
    println!(
        "simulated OpenSim-CMS 1.1 ({:?}, time zone {}, cost model {:?}) at {}",
        args.dialect,
        args.timezone,
        args.cost_model,
        sim.base_url()
    );

    let shared = Arc::clone(&sim.shared);
    let mut n_printed = 0;
    loop {
        // Rows are appended in insertion order and never removed, so an index is a cursor. With a
        // single waiter, `notify_one` keeps a permit when nobody waits: no line is missed.
        if args.quiet {
            let n_rows = shared.lock().chats.len();
            if n_rows != n_printed {
                println!("stored {n_rows}");
                n_printed = n_rows;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                () = shared.stored.notified() => {}
            }
            continue;
        }
        let new_rows: Vec<(ChatRow, String)> = {
            let state = shared.lock();
            let rows = state.chats[n_printed..]
                .iter()
                .map(|row| (row.clone(), state.user_label(row.user_id)))
                .collect();
            n_printed = state.chats.len();
            rows
        };
        for (row, user) in new_rows {
            println!(
                "chat {} grid {} user {} at {} fromCMS {}: {}",
                row.id,
                row.grid_id,
                user,
                row.timestamp.format(DATE_FORMAT),
                u8::from(row.from_cms),
                row.message
            );
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            () = shared.stored.notified() => {}
        }
    }
    sim.stop().await;
    Ok(())
}
