//! The binary: parse the command line, load the configuration, run. Everything else is in the library.

use std::process::ExitCode;

use clap::Parser;
use opensim_chat_relay::app::Relay;
use opensim_chat_relay::cli::{Cli, Command, SimCommand};
use opensim_chat_relay::config::{ConfigError, LogFormat, Settings};
use opensim_chat_relay::health::HealthError;
use opensim_chat_relay::outbox::OutboxError;
use opensim_chat_relay::sim::{cms, lookingglass};
use opensim_chat_relay::{admin, check, demo, notify, shutdown, telemetry};

/// Every file the relay creates is its user's alone (0600, directories 0700), whatever umask it was
/// started under: the outbox holds chat and who opted out, and sled creates files in it while the
/// relay runs (snapshots, blobs). `Outbox::open` tightens what exists at open.
fn private_files() {
    // SAFETY: umask(2) only replaces the process's file mode creation mask and cannot fail; it is
    // called before any thread is started.
    unsafe {
        libc::umask(0o077);
    }
}

/// sysexits' EX_CONFIG: the operator must fix something; systemd units say
/// `RestartPreventExitStatus=78` so this does not become a restart loop.
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    private_files();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run);
    let settings = |cli_config: Option<&std::path::Path>| match Settings::load(cli_config, &[]) {
        Ok(settings) => Ok(settings),
        Err(err) => {
            eprintln!("error: {err}");
            Err(ExitCode::from(EX_CONFIG))
        }
    };
    let result = match command {
        Command::Run => match settings(cli.config.as_deref()) {
            Ok(settings) => {
                telemetry::init(&settings.log.level, settings.log.format);
                for warning in settings.warnings() {
                    tracing::warn!("{warning}");
                }
                let config_file = cli.config.clone();
                run(async move {
                    shutdown::catch_file_size_signal();
                    let relay = Relay::build(&settings)?
                        .with_notifier(notify::Notifier::from_env())
                        .with_reload(config_file);
                    relay.run_until_stopped(shutdown::on_signal()).await
                })
            }
            Err(code) => return code,
        },
        Command::CheckConfig => match settings(cli.config.as_deref()) {
            Ok(settings) => {
                for warning in settings.warnings() {
                    eprintln!("warning: {warning}");
                }
                // As `run` would: an unreadable password file or CA bundle is an error here too.
                let loaded = settings.cms.load_password().and_then(|_| {
                    settings.cms.load_ca_certificates()?;
                    settings.redacted()
                });
                match loaded {
                    Ok(text) => {
                        print!("{text}");
                        Ok(())
                    }
                    Err(err) => {
                        eprintln!("error: {err}");
                        return ExitCode::from(EX_CONFIG);
                    }
                }
            }
            Err(code) => return code,
        },
        Command::Check => {
            let report = match Settings::load(cli.config.as_deref(), &[]) {
                Ok(settings) => match tokio::runtime::Runtime::new() {
                    Ok(runtime) => runtime.block_on(check::run(&settings)),
                    Err(err) => {
                        eprintln!("error: {err:#}");
                        return ExitCode::FAILURE;
                    }
                },
                Err(err) => check::CheckReport::config_failed(&err),
            };
            println!("{report}");
            return if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        Command::Healthcheck => match settings(cli.config.as_deref()) {
            Ok(settings) => run(async move {
                check::healthcheck(settings.http.listen).await?;
                Ok(())
            }),
            Err(code) => return code,
        },
        Command::Outbox(action) => match settings(cli.config.as_deref()) {
            Ok(settings) => run(async move { admin::run(&settings, action).await }),
            Err(code) => return code,
        },
        Command::Privacy(action) => match settings(cli.config.as_deref()) {
            Ok(settings) => run(async move { admin::privacy(&settings, action).await }),
            Err(code) => return code,
        },
        Command::Demo(args) => {
            telemetry::init("warn", LogFormat::Pretty);
            run(async move { demo::run(args, shutdown::on_signal()).await })
        }
        Command::Sim(SimCommand::Viewer(args)) => {
            telemetry::init("info", LogFormat::Pretty);
            run(async move { lookingglass::run_cli(args, shutdown::on_signal()).await })
        }
        Command::Sim(SimCommand::Cms(args)) => {
            telemetry::init("info", LogFormat::Pretty);
            run(async move { cms::run_cli(args, shutdown::on_signal()).await })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            // An outbox that cannot be opened, or a health port that is taken, needs an operator,
            // not a restart loop.
            let needs_operator = err.downcast_ref::<OutboxError>().is_some_and(|e| {
                matches!(
                    e,
                    OutboxError::Locked { .. }
                        | OutboxError::Open { .. }
                        | OutboxError::NotWritable { .. }
                )
            }) || err.downcast_ref::<ConfigError>().is_some()
                || err.downcast_ref::<HealthError>().is_some();
            if needs_operator {
                ExitCode::from(EX_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(future: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(future)
}
