//! `opensim-chat-relay outbox …`: look into and repair the outbox while the relay is stopped (its
//! pending lines, dead letters and quarantine); and
//! `opensim-chat-relay privacy …`: the avatars who opted out of recording, kept in the outbox.
//!
//! Owns only the printing and the choice of operation; the storage work is `Outbox`'s, and every
//! opt-out is read, written and applied by `Privacy` (this module never reaches the opt-out
//! records). It refuses to run while a relay holds the outbox (sled's lock), with a message that
//! says so.

use std::sync::Arc;

use chrono::Utc;

use crate::cli::{OutboxAction, PrivacyAction};
use crate::config::Settings;
use crate::outbox::{Outbox, PendingLine};
use crate::privacy::{Privacy, SpeakerKey};

/// Runs one outbox action and prints its result on stdout.
pub async fn run(settings: &Settings, action: OutboxAction) -> anyhow::Result<()> {
    let outbox = Outbox::open(&settings.outbox.path, settings.outbox.cache_bytes)?;
    match action {
        OutboxAction::Stats => {
            let oldest = outbox.oldest_captured_at()?;
            println!("outbox       {}", settings.outbox.path.display());
            println!(
                "pending      {} lines, {} bytes",
                outbox.len(),
                outbox.bytes()
            );
            match oldest {
                Some(at) => println!(
                    "oldest       captured {at} ({} ago)",
                    humantime::format_duration(age(at))
                ),
                None => println!("oldest       -"),
            }
            println!("dead         {} lines", outbox.dead_len());
            println!(
                "quarantine   {} records, {} bytes",
                outbox.quarantine_len(),
                outbox.quarantine_bytes()
            );
        }
        OutboxAction::List { limit } => {
            for line in outbox.oldest(limit)? {
                let state = if line.is_in_flight() {
                    " (outcome unknown: read back before resending)"
                } else {
                    ""
                };
                println!(
                    "{:>20}  {}  {}: {}{state}",
                    line.id, line.line.captured_at, line.line.speaker, line.line.message
                );
                if line.attempts > 0 {
                    println!("{:>20}  {}", "", tries(&line));
                }
            }
        }
        OutboxAction::Dead => {
            for dead in outbox.dead_letters()? {
                let line = &dead.pending.line;
                println!(
                    "{:>20}  {}  {}: {}",
                    dead.pending.id, line.captured_at, line.speaker, line.message
                );
                println!("{:>20}  dead since {}: {}", "", dead.dead_at, dead.reason);
                println!("{:>20}  {}", "", tries(&dead.pending));
            }
        }
        OutboxAction::Quarantine => {
            let records = outbox.quarantined()?;
            for record in &records {
                let at = record
                    .at
                    .map_or_else(|| "-".to_owned(), |at| at.to_string());
                let mut about = format!("{} bytes", record.n_bytes);
                if let Some(hash) = &record.hash {
                    about.push_str(&format!(", fnv1a64 {hash}"));
                }
                if let Some(n_lines) = record.n_lines_before {
                    about.push_str(&format!(", {n_lines} lines read before the break"));
                }
                println!("{:>20}  {at}  {}: {about}", record.id, record.what);
                if !record.kept.is_empty() {
                    println!(
                        "{:>20}  kept as stored: {}",
                        "",
                        crate::text::snippet(&record.kept)
                    );
                }
            }
            println!(
                "{} quarantined records, {} bytes; each leaves after outbox.max_age ({})",
                records.len(),
                outbox.quarantine_bytes(),
                humantime::format_duration(settings.outbox.max_age)
            );
        }
        OutboxAction::Requeue { ids, all } => {
            if ids.is_empty() && !all {
                anyhow::bail!(
                    "name the dead letters to requeue (ids from `outbox dead`), or --all"
                );
            }
            let n = outbox.requeue(if all { None } else { Some(&ids) }).await?;
            println!("requeued {n} dead letters; the relay delivers them at its next start");
        }
        OutboxAction::Purge { quarantine } => {
            let n_dead = outbox.purge_dead().await?;
            println!("purged {n_dead} dead letters");
            if quarantine {
                println!(
                    "purged {} quarantined records",
                    outbox.purge_quarantine().await?
                );
            }
        }
    }
    outbox.flush().await?;
    Ok(())
}

/// Runs one privacy action and prints its result on stdout. Every decision is `Privacy`'s.
pub async fn privacy(settings: &Settings, action: PrivacyAction) -> anyhow::Result<()> {
    let outbox = Arc::new(Outbox::open(
        &settings.outbox.path,
        settings.outbox.cache_bytes,
    )?);
    let privacy = Privacy::open(outbox.clone())?;
    match action {
        PrivacyAction::List => {
            let opt_outs = privacy.stored()?;
            for opt_out in &opt_outs {
                let by = match &opt_out.key {
                    SpeakerKey::Uuid(uuid) => format!("avatar {uuid}"),
                    SpeakerKey::Name(_) => "name".to_owned(),
                };
                println!(
                    "{:<32}  by {:<44}  since {}",
                    opt_out.name, by, opt_out.since
                );
            }
            println!("{} opted out", opt_outs.len());
        }
        PrivacyAction::Add { name } => {
            let (opt_out, n_dropped) = privacy.add(&name.join(" ")).await?;
            println!(
                "{} opted out: not relayed from the next start on; {n_dropped} waiting lines dropped",
                opt_out.name
            );
        }
        PrivacyAction::Remove { name } => {
            let name = name.join(" ");
            match privacy.remove(&name).await? {
                0 => println!("{} had not opted out", name.trim()),
                n => println!(
                    "{} opted in again ({n} opt-outs forgotten): relayed from the next start on",
                    name.trim()
                ),
            }
        }
    }
    outbox.flush().await?;
    Ok(())
}

/// "N attempts, M failures" and the last failure's error: what delivery tried with a line.
fn tries(line: &PendingLine) -> String {
    let mut text = format!("{} attempts, {} failures", line.attempts, line.failures);
    if let Some(error) = &line.last_error {
        text.push_str(&format!(" (last: {error})"));
    }
    text
}

fn age(at: chrono::DateTime<Utc>) -> std::time::Duration {
    let seconds = (Utc::now() - at).num_seconds().max(0);
    std::time::Duration::from_secs(seconds as u64)
}
