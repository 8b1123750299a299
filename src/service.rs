//! The service's subcommands: `serve` (API + embedded worker), `worker` (a worker alone, for
//! more machines on one PostgreSQL queue), `keys create`, `openapi`. Their flags live here so
//! `cli::Command` gains one line per subcommand.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, AppConfig, AppState, Limits};
use crate::config::{ConfigError, ServiceArgs, Settings};
use crate::exec::device::parse_size;
use crate::jobs::devices::{DeviceSpecError, cpu_device_bytes};
use crate::jobs::host_memory::{available_memory, default_host_memory};
use crate::jobs::{
    Capabilities, DeviceInfo, Worker, WorkerConfig, default_devices, parse_devices, with_gpu_memory,
};
use crate::plan::network::Configured;
use crate::store::{self, StoreError};
use crate::telemetry::{self, LogFormat};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub service: ServiceArgs,

    /// Serve the API only; jobs are run by `chronospipe worker` processes.
    #[arg(long)]
    pub no_worker: bool,

    /// Requests per second allowed per API key (bursts of twice as many).
    #[arg(long, env = "CHRONOSPIPE_RATE_LIMIT", default_value_t = 100.0)]
    pub rate_limit: f64,

    /// Largest uploaded file, in bytes.
    #[arg(long, env = "CHRONOSPIPE_MAX_UPLOAD_BYTES", default_value_t = 4 << 30)]
    pub max_upload_bytes: u64,

    /// How many times a job may go back to the queue after its run was lost (its worker or a
    /// rank died, the database stayed away) before it fails with `too_many_restarts`.
    #[arg(long, env = "CHRONOSPIPE_MAX_RESTARTS", default_value_t = crate::store::DEFAULT_MAX_RESTARTS)]
    pub max_restarts: i64,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub service: ServiceArgs,

    /// Seconds a claim holds a job without renewal before another worker may take it over
    /// (renewed every third of it): how soon a dead worker's jobs resume elsewhere.
    #[arg(long, env = "CHRONOSPIPE_LEASE_SECONDS", default_value_t = 30.0)]
    pub lease_seconds: f64,

    /// The host (name or address) other workers reach this worker's ranks at, when a job
    /// spans workers; each rank listens there on a port the OS chooses [default: this
    /// machine's host name].
    #[arg(long, env = "CHRONOSPIPE_RANK_ADDRESS")]
    pub rank_address: Option<String>,

    /// The name of the machine this worker runs on: workers naming one machine share it
    /// (their devices talk for free in a plan), and the links between machines are measured
    /// and looked up by these names [default: this machine's host name].
    #[arg(long, env = "CHRONOSPIPE_MACHINE")]
    pub machine: Option<String>,

    /// Bandwidth between any two machines, per second (e.g. `1250MB`: 10 Gb/s Ethernet), with
    /// which a job naming no `devices` is placed across machines so that the devices that talk
    /// most share one [default: each pair's measured bandwidth, else the median of the
    /// measured pairs, else 1250MB].
    #[arg(long, env = "CHRONOSPIPE_NETWORK_BANDWIDTH")]
    pub network_bandwidth: Option<String>,

    /// Latency of one message between any two machines, in milliseconds [default: each
    /// pair's measured latency, else the median of the measured pairs, else 0.05].
    #[arg(long, env = "CHRONOSPIPE_NETWORK_LATENCY_MS")]
    pub network_latency_ms: Option<f64>,
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a tenant with a new API key and print the key (it is stored hashed, shown once).
    Create {
        /// Name of the key and its tenant.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        service: ServiceArgs,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Devices(#[from] DeviceSpecError),
    #[error("cannot use the service's GPUs: {0}")]
    Gpus(String),
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "--host-memory {0:?} is not a size: give bytes, or a number with KiB, MiB, GiB, KB, MB or GB"
    )]
    HostMemory(String),
    #[error("--lease-seconds {0} is not a lease: give a number of seconds, at least 0.3")]
    Lease(f64),
    #[error("--max-restarts {0} is not a count: give 0 (never requeue) or more")]
    MaxRestarts(i64),
    #[error(
        "--network-bandwidth {0:?} is not a bandwidth: give bytes per second, or a number with \
         KiB, MiB, GiB, KB, MB or GB (per second), more than 0"
    )]
    NetworkBandwidth(String),
    #[error("--network-latency-ms {0} is not a latency: give milliseconds, 0 or more")]
    NetworkLatency(f64),
    #[error("--machine {0:?} is not a machine name: give a non-empty name")]
    Machine(String),
    #[error(
        "this build has no trainer plugged in, so `chronospipe worker` has nothing to run jobs with"
    )]
    NoRunner,
}

/// What `run_service` and `run_worker` need, resolved from the settings.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    pub database_url: String,
    pub data_dir: PathBuf,
    pub devices: Vec<DeviceInfo>,
    pub api_key: Option<String>,
    pub run_worker: bool,
    pub limits: Limits,
    pub lease: Duration,
    pub poll: Duration,
    /// The host pool a job's offloaded tensors live in (`--host-memory`).
    pub host_memory_bytes: u64,
    /// The host other workers reach this worker's ranks at (`worker --rank-address`); `None`:
    /// this machine's host name.
    pub rank_address: Option<String>,
    /// The machine the worker runs on (`worker --machine`); `None`: the kernel's host name.
    pub machine: Option<String>,
    /// The operator's figures for the links between machines (`worker --network-bandwidth`,
    /// `--network-latency-ms`); unset ones are measured, else assumed.
    pub network: Configured,
}

impl ServiceOptions {
    pub fn from_settings(settings: &Settings) -> Result<Self, ServiceError> {
        let devices = match &settings.devices {
            Some(spec) => with_gpu_memory(parse_devices(spec)?)
                .map_err(|e| ServiceError::Gpus(e.to_string()))?,
            None => default_devices(),
        };
        let host_memory_bytes = match &settings.host_memory {
            Some(text) => {
                parse_size(text).ok_or_else(|| ServiceError::HostMemory(text.clone()))? as u64
            }
            None => {
                let available = available_memory().unwrap_or(0);
                default_host_memory(available, cpu_device_bytes(&devices))
            }
        };
        Ok(ServiceOptions {
            database_url: settings.effective_database_url(),
            data_dir: settings.data_dir.clone(),
            devices,
            api_key: settings.api_key.clone(),
            run_worker: true,
            limits: Limits::default(),
            lease: Duration::from_secs(30),
            poll: Duration::from_millis(500),
            host_memory_bytes,
            rank_address: None,
            machine: None,
            network: Configured::default(),
        })
    }

    fn worker_config(&self) -> WorkerConfig {
        let config = WorkerConfig::new(self.data_dir.clone(), self.devices.clone());
        WorkerConfig {
            lease: self.lease,
            poll: self.poll,
            host_memory_bytes: self.host_memory_bytes,
            rank_address: (self.rank_address.clone()).unwrap_or(config.rank_address.clone()),
            // Ranks are picked up on the workers' polls: a few leases, ten seconds at least.
            gang_start: (self.lease * 3).max(Duration::from_secs(10)),
            machine: (self.machine.clone()).unwrap_or(config.machine.clone()),
            network: self.network,
            ..config
        }
    }
}

/// Serves the API (and, unless told otherwise, an embedded worker) on `listener` until
/// `shutdown` resolves; then stops claiming, has running jobs checkpoint and requeue, and
/// returns once they have.
pub async fn run_service(
    options: ServiceOptions,
    capabilities: Capabilities,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let store = store::connect(&options.database_url).await?;
    if let Some(key) = api::bootstrap_key(store.as_ref(), options.api_key.as_deref()).await? {
        println!("Created API key (shown once, store it now): {key}");
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut worker_task = None;
    let mut worker_id = None;
    let mut refuse_jobs = None;
    if options.run_worker {
        match capabilities.runner.clone() {
            Some(runner) => {
                let config = options.worker_config();
                let planner = capabilities.planner.clone();
                let worker = Worker::with_planner(store.clone(), runner, planner, config);
                worker_id = Some(worker.id().to_owned());
                worker_task = Some(tokio::spawn(worker.run(stop_rx.clone())));
            }
            None => {
                let why = "this build of the service has no trainer plugged in, so it refuses jobs \
                           (run it with --no-worker to queue jobs for `chronospipe worker` processes)";
                tracing::error!("{why}");
                refuse_jobs = Some(why.to_owned());
            }
        }
    }
    let state = AppState::new(
        store,
        AppConfig {
            planner: capabilities.planner,
            refuse_jobs,
            devices: options.devices.clone(),
            host_memory_bytes: options.host_memory_bytes,
            worker_id,
            data_dir: options.data_dir.clone(),
            limits: options.limits.clone(),
            shutdown: stop_rx,
        },
    );
    let addr = listener.local_addr().map_err(|source| ServiceError::Io {
        what: "read the listening address".into(),
        source,
    })?;
    tracing::info!(%addr, "chronospipe serving");
    let stopping = async move {
        shutdown.await;
        tracing::info!("shutting down: no new claims, running jobs checkpoint and requeue");
        let _ = stop_tx.send(true);
    };
    let served = api::launch_with_listener(state, listener, stopping).await;
    if let Some(task) = worker_task {
        let _ = task.await;
    }
    served.map_err(|source| ServiceError::Io {
        what: "serve HTTP".into(),
        source,
    })?;
    tracing::info!("chronospipe stopped");
    Ok(())
}

/// A worker without the HTTP server, until `shutdown`.
pub async fn run_worker(
    options: ServiceOptions,
    capabilities: Capabilities,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let runner = capabilities.runner.ok_or(ServiceError::NoRunner)?;
    let store = store::connect(&options.database_url).await?;
    let config = options.worker_config();
    let worker: Arc<Worker> = Worker::with_planner(store, runner, capabilities.planner, config);
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    worker.run(stop_rx).await;
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime, ServiceError> {
    tokio::runtime::Runtime::new().map_err(|source| ServiceError::Io {
        what: "start the async runtime".into(),
        source,
    })
}

/// `chronospipe serve`.
pub fn serve(args: &ServeArgs, log_format: Option<LogFormat>) -> Result<(), ServiceError> {
    let settings = Settings::resolve(&args.service, log_format)?;
    telemetry::init(settings.log_format);
    let mut options = ServiceOptions::from_settings(&settings)?;
    options.run_worker = !args.no_worker;
    options.limits.rate_per_second = args.rate_limit;
    options.limits.rate_burst = args.rate_limit * 2.0;
    options.limits.max_upload_bytes = args.max_upload_bytes;
    if args.max_restarts < 0 {
        return Err(ServiceError::MaxRestarts(args.max_restarts));
    }
    options.limits.max_restarts = args.max_restarts;
    runtime()?.block_on(async move {
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| ServiceError::Io {
                    what: format!("listen on {}", settings.listen),
                    source,
                })?;
        run_service(
            options,
            Capabilities::production(),
            listener,
            shutdown_signal(),
        )
        .await
    })
}

/// `chronospipe worker`.
pub fn worker(args: &WorkerArgs, log_format: Option<LogFormat>) -> Result<(), ServiceError> {
    let settings = Settings::resolve(&args.service, log_format)?;
    telemetry::init(settings.log_format);
    let mut options = ServiceOptions::from_settings(&settings)?;
    if !(args.lease_seconds.is_finite() && args.lease_seconds >= 0.3) {
        return Err(ServiceError::Lease(args.lease_seconds));
    }
    options.lease = Duration::from_secs_f64(args.lease_seconds);
    options.rank_address = args.rank_address.clone();
    options.machine = machine(args)?;
    options.network = network(args)?;
    runtime()?.block_on(run_worker(
        options,
        Capabilities::production(),
        shutdown_signal(),
    ))
}

/// The machine `worker --machine` names; `None`: the kernel's host name.
fn machine(args: &WorkerArgs) -> Result<Option<String>, ServiceError> {
    match &args.machine {
        Some(name) if name.trim().is_empty() => Err(ServiceError::Machine(name.clone())),
        name => Ok(name.as_ref().map(|n| n.trim().to_owned())),
    }
}

/// The operator's network figures from `worker`'s flags (those not given stay unset).
fn network(args: &WorkerArgs) -> Result<Configured, ServiceError> {
    let mut network = Configured::default();
    if let Some(text) = &args.network_bandwidth {
        let bytes = parse_size(text).filter(|b| *b > 0);
        let bytes = bytes.ok_or_else(|| ServiceError::NetworkBandwidth(text.clone()))?;
        network.bytes_per_s = Some(bytes as f64);
    }
    if let Some(latency) = args.network_latency_ms {
        if !(latency.is_finite() && latency >= 0.0) {
            return Err(ServiceError::NetworkLatency(latency));
        }
        network.latency_s = Some(latency / 1e3);
    }
    Ok(network)
}

/// `chronospipe keys create --name NAME`.
pub fn keys(args: &KeysArgs, log_format: Option<LogFormat>) -> Result<(), ServiceError> {
    let KeysCommand::Create { name, service } = &args.command;
    let settings = Settings::resolve(service, log_format)?;
    runtime()?.block_on(async {
        let store = store::connect(&settings.effective_database_url()).await?;
        let key = api::create_key(store.as_ref(), name).await?;
        println!("{key}");
        Ok(())
    })
}

/// `chronospipe openapi`: the OpenAPI document, as committed in `openapi/openapi.json`.
pub fn openapi() -> Result<(), ServiceError> {
    print!("{}", api::ApiDoc::pretty_json());
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
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

#[cfg(test)]
mod tests;
