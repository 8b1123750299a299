//! The command line: subcommands and their flags. Each flag that configures the service also
//! reads an environment variable (named in `--help`); the service's flags are
//! `config::ServiceArgs`, which `config::Settings` merges over the TOML file.
//! The commands that run without the service live beside this: `plan`, `train`, `selftest`.

pub mod plan;
pub mod selftest;
pub mod train;

use clap::{Parser, Subcommand};

use crate::config::ServiceArgs;
pub use crate::service::{KeysArgs, ServeArgs, WorkerArgs};
use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(name = "chronospipe", version, about = "Train language models with memory-fitting pipeline-parallel plans", long_about = None)]
pub struct Cli {
    /// Log line format on standard error.
    #[arg(long, global = true, env = "CHRONOSPIPE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service (and an embedded worker).
    Serve(ServeArgs),
    /// Run a worker without the HTTP server (more machines on one PostgreSQL queue).
    Worker(WorkerArgs),
    /// Plan a pipeline-parallel schedule that fits the devices' memory.
    Plan(plan::PlanArgs),
    /// Train a job spec on this machine's devices, without the service.
    Train(train::TrainArgs),
    /// Check the CUDA backend against the CPU backend and time it (needs an NVIDIA GPU).
    Selftest(selftest::SelftestArgs),
    /// Manage API keys.
    Keys(KeysArgs),
    /// Print the OpenAPI document.
    Openapi,
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration as TOML, secrets redacted.
    Print(ServiceArgs),
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_parses_its_flags() {
        let cli = Cli::try_parse_from([
            "chronospipe",
            "--log-format",
            "json",
            "serve",
            "--listen",
            "0.0.0.0:8081",
            "--devices",
            "cpu:2x64MiB",
        ])
        .unwrap();
        assert_eq!(cli.log_format, Some(LogFormat::Json));
        let Command::Serve(args) = cli.command else {
            panic!("expected serve")
        };
        assert_eq!(args.service.listen, Some("0.0.0.0:8081".parse().unwrap()));
        assert_eq!(args.service.devices.as_deref(), Some("cpu:2x64MiB"));
    }

    #[test]
    fn bad_values_are_rejected() {
        let err = Cli::try_parse_from(["chronospipe", "serve", "--listen", "nowhere"]).unwrap_err();
        assert!(err.to_string().contains("--listen"), "{err}");
        assert!(Cli::try_parse_from(["chronospipe", "--log-format", "xml", "serve"]).is_err());
        assert!(Cli::try_parse_from(["chronospipe", "frobnicate"]).is_err());
    }
}
