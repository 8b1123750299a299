//! Service configuration. Precedence, highest first: command-line flags, environment variables
//! (`CHRONOSPIPE_*`, `DATABASE_URL`), the TOML file given by `--config`, built-in defaults.
//!
//! Flags and environment variables are read by clap into [`ServiceArgs`] (the flags of
//! `serve`, `worker` and `config print`); this module merges them over the file and the
//! defaults and redacts secrets for printing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::telemetry::LogFormat;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATA_DIR: &str = "data";

/// Settings shared by `serve`, `worker` and `config print`.
#[derive(Debug, Clone, Default, Args)]
pub struct ServiceArgs {
    /// TOML configuration file; flags and environment variables override it.
    #[arg(long, env = "CHRONOSPIPE_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "CHRONOSPIPE_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// `postgres://...` or `sqlite://PATH` [default: a SQLite file in the data directory].
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Directory for uploaded files, checkpoints and the embedded database [default: data].
    #[arg(long, env = "CHRONOSPIPE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Devices to train on, e.g. `cpu:4x256MiB`, `cuda` or `cuda:0,1@40GiB` (each job on as
    /// many of the GPUs as its replicas x stages, at most 40 GiB each), `cuda:0x4` (four
    /// stages sharing GPU 0) [default: one CPU device, half the free memory].
    #[arg(long, env = "CHRONOSPIPE_DEVICES")]
    pub devices: Option<String>,

    /// API key accepted by the service (otherwise keys come from the database).
    #[arg(long, env = "CHRONOSPIPE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Host memory a job's offloaded tensors (and its starting weights) may take, e.g. `16GiB`
    /// [default: three quarters of the memory available at start, less the CPU devices'
    /// budgets and 512 MiB for the service].
    #[arg(long, env = "CHRONOSPIPE_HOST_MEMORY")]
    pub host_memory: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
}

/// What a TOML config file may hold. Every key is optional; unknown keys are an error so a
/// misspelt setting is never silently ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub database_url: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub devices: Option<String>,
    pub log_format: Option<LogFormat>,
    pub api_key: Option<String>,
    pub host_memory: Option<String>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }
}

/// The effective configuration of `serve` and `worker`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    pub listen: SocketAddr,
    /// `postgres://...` or `sqlite://PATH`; `None` means a SQLite file in `data_dir`.
    pub database_url: Option<String>,
    pub data_dir: PathBuf,
    /// Device set, e.g. `cpu:4x256MiB`; `None` means what the machine has.
    pub devices: Option<String>,
    pub log_format: LogFormat,
    pub api_key: Option<String>,
    /// Host memory for offloaded tensors, e.g. `16GiB`; `None` means the default share.
    pub host_memory: Option<String>,
}

impl Settings {
    /// Merges flags/environment (already resolved by clap) over the optional file.
    pub fn resolve(args: &ServiceArgs, log_format: Option<LogFormat>) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Ok(Settings {
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("default address parses")),
            database_url: args.database_url.clone().or(file.database_url),
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            devices: args.devices.clone().or(file.devices),
            log_format: log_format.or(file.log_format).unwrap_or_default(),
            api_key: args.api_key.clone().or(file.api_key),
            host_memory: args.host_memory.clone().or(file.host_memory),
        })
    }

    /// The database URL to connect to: the configured one, else the embedded SQLite file.
    pub fn effective_database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}",
                self.data_dir.join("chronospipe.sqlite").display()
            ),
        }
    }

    /// A copy safe to print: the API key and any password in the database URL are replaced.
    pub fn redacted(&self) -> Settings {
        Settings {
            database_url: self.database_url.as_deref().map(redact_url_password),
            api_key: self.api_key.as_ref().map(|_| "<redacted>".to_owned()),
            ..self.clone()
        }
    }
}

/// `postgres://user:secret@host/db` becomes `postgres://user:<redacted>@host/db`.
pub fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // Tests build `ServiceArgs` directly: parsing argv here would also read the process
    // environment (scripts/test sets DATABASE_URL). tests/cli.rs covers the environment.

    #[test]
    fn defaults_apply_without_flags_or_file() {
        let s = Settings::resolve(&ServiceArgs::default(), None).unwrap();
        assert_eq!(s.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(s.data_dir, PathBuf::from("data"));
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(
            s.effective_database_url(),
            "sqlite://data/chronospipe.sqlite"
        );
    }

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "listen = \"0.0.0.0:9000\"\ndata_dir = \"/srv/cp\"\ndevices = \"cpu:2x1GiB\"\nlog_format = \"json\"\n",
        )
        .unwrap();
        let args = ServiceArgs {
            config: Some(path),
            listen: Some("127.0.0.1:7000".parse().unwrap()),
            ..ServiceArgs::default()
        };
        let s = Settings::resolve(&args, None).unwrap();
        assert_eq!(s.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(s.data_dir, PathBuf::from("/srv/cp"));
        assert_eq!(s.devices.as_deref(), Some("cpu:2x1GiB"));
        assert_eq!(s.log_format, LogFormat::Json);
        let s = Settings::resolve(&args, Some(LogFormat::Text)).unwrap();
        assert_eq!(s.log_format, LogFormat::Text);
    }

    #[test]
    fn unknown_file_keys_are_rejected_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listn = \"0.0.0.0:9000\"\n").unwrap();
        let args = ServiceArgs {
            config: Some(path),
            ..ServiceArgs::default()
        };
        let err = Settings::resolve(&args, None).unwrap_err().to_string();
        assert!(err.contains("c.toml") && err.contains("listn"), "{err}");
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let args = ServiceArgs {
            config: Some("/nonexistent/c.toml".into()),
            ..ServiceArgs::default()
        };
        assert!(matches!(
            Settings::resolve(&args, None),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn secrets_are_redacted() {
        let args = ServiceArgs {
            database_url: Some("postgres://app:hunter2@db:5432/cp".into()),
            api_key: Some("sk-secret".into()),
            ..ServiceArgs::default()
        };
        let s = Settings::resolve(&args, None).unwrap().redacted();
        let printed = serde_json::to_string(&s).unwrap();
        assert!(
            !printed.contains("hunter2") && !printed.contains("sk-secret"),
            "{printed}"
        );
        assert_eq!(
            s.database_url.as_deref(),
            Some("postgres://app:<redacted>@db:5432/cp")
        );
    }

    #[test]
    fn urls_without_password_are_unchanged() {
        for url in [
            "sqlite://data/x.sqlite",
            "postgres://postgres@127.0.0.1/test",
        ] {
            assert_eq!(redact_url_password(url), url);
        }
    }
}
