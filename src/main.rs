use anyhow::Context;
use clap::Parser;

use chronospipe::cli::{Cli, Command, ConfigCommand};
use chronospipe::config::Settings;
use chronospipe::{api, telemetry};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let settings = Settings::resolve(&args.service, cli.log_format)?;
            telemetry::init(settings.log_format);
            serve(settings)
        }
        Command::Train(args) => {
            telemetry::init(cli.log_format.unwrap_or_default());
            let summary = chronospipe::train_cmd::run(&args)?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            Ok(())
        }
        Command::Plan(args) => {
            print!("{}", chronospipe::plan_cmd::run(&args)?);
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

#[tokio::main]
async fn serve(settings: Settings) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "chronospipe serving");
    api::launch_with_listener(listener, shutdown_signal()).await?;
    tracing::info!("chronospipe stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
