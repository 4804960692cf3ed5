//! The binary: parse the command line, load the configuration, run. Everything else is in the
//! library, but for `process` (system calls the library, which forbids unsafe code, cannot make).

use std::process::ExitCode;

use clap::Parser;
use opensim_chat_relay::app::Relay;
use opensim_chat_relay::cli::{Cli, Command, SimCommand};
use opensim_chat_relay::cms::client::CmsEndpoint;
use opensim_chat_relay::config::{ConfigError, LogFormat, Settings};
use opensim_chat_relay::health::HealthError;
use opensim_chat_relay::outbox::OutboxError;
use opensim_chat_relay::sim::{cms, lookingglass};
use opensim_chat_relay::{admin, check, demo, notify, shutdown, telemetry};

mod process;

/// sysexits' EX_CONFIG: the operator must fix something; systemd units say
/// `RestartPreventExitStatus=78` so this does not become a restart loop.
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    // Before anything reads the password: a crash from here on writes no core dump.
    let no_core_dumps = process::forbid_core_dumps();
    process::private_files();
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
                if let Err(err) = &no_core_dumps {
                    tracing::warn!(error = %err, "cannot forbid core dumps; a crash could write the password to disk");
                }
                match process::raise_file_limit() {
                    Ok((before, after)) if after > before => {
                        tracing::info!(
                            before,
                            after,
                            "raised the soft open-file limit to the hard limit"
                        );
                    }
                    Ok((limit, _)) => {
                        tracing::debug!(limit, "the soft open-file limit is the hard limit")
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot raise the soft open-file limit")
                    }
                }
                let config_file = cli.config.clone();
                run(async move {
                    shutdown::catch_file_size_signal();
                    let relay = Relay::build(&settings)?
                        .with_notifier(notify::Notifier::from_env())
                        .with_reload(config_file);
                    // The password goes on in the CMS client only, not in this task's state.
                    drop(settings);
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
                let loaded =
                    CmsEndpoint::from_settings(&settings.cms).and_then(|_| settings.redacted());
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
