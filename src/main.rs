use clap::Parser;

use chronospipe::cli::{Cli, Command, ConfigCommand};
use chronospipe::config::Settings;
use chronospipe::{service, telemetry};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => Ok(service::serve(&args, cli.log_format)?),
        Command::Worker(args) => Ok(service::worker(&args, cli.log_format)?),
        Command::Keys(args) => Ok(service::keys(&args, cli.log_format)?),
        Command::Openapi => Ok(service::openapi()?),
        Command::Selftest(args) => chronospipe::cli::selftest::run(&args),
        Command::Train(args) => {
            telemetry::init(cli.log_format.unwrap_or_default());
            let summary = chronospipe::cli::train::run(&args)?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            Ok(())
        }
        Command::Plan(args) => {
            print!("{}", chronospipe::cli::plan::run(&args)?);
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Print(args),
        } => {
            let settings = Settings::resolve(&args, cli.log_format)?;
            print!("{}", toml::to_string(&settings.redacted())?);
            Ok(())
        }
    }
}
