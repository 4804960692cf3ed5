//! The binary: parse the command line, load the configuration, run. Everything else is in the library.

use std::process::ExitCode;

use clap::Parser;
use opensim_chat_relay::app::Relay;
use opensim_chat_relay::cli::{Cli, Command};
use opensim_chat_relay::config::Settings;
use opensim_chat_relay::{shutdown, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run);
    let settings = |cli_config: Option<&std::path::Path>| match Settings::load(cli_config, &[]) {
        Ok(settings) => Ok(settings),
        Err(err) => {
            eprintln!("error: {err}");
            Err(ExitCode::from(2))
        }
    };
    let result = match command {
        Command::Run => match settings(cli.config.as_deref()) {
            Ok(settings) => {
                telemetry::init(&settings.log.level, settings.log.format);
                run(async move {
                    let relay = Relay::build(&settings)?;
                    relay.run_until_stopped(shutdown::on_signal()).await
                })
            }
            Err(code) => return code,
        },
        Command::CheckConfig => match settings(cli.config.as_deref()) {
            Ok(settings) => {
                println!("{}", settings.redacted());
                Ok(())
            }
            Err(code) => return code,
        },
        Command::Demo(_args) => {
            telemetry::init("info", opensim_chat_relay::config::LogFormat::Pretty);
            Err(anyhow::anyhow!("demo not built yet"))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(future: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(future)
}
